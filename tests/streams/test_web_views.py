"""The HTTP API's module-level views one by one, on a small fake app; then the pages and the routing of a run's page.

Each function of :mod:`streams.web` takes the app and the request's parts and
returns an :data:`~streams.web.Answer`, so it is called here directly.
PostgreSQL and the registry are :class:`FakeRepository` and :class:`FakeStore`
(from ``test_web``), the live table a dict. The last tests take the real app of
:func:`streams.app.create_app` for what only it has: the pages it registers and
``table_route`` sending ``GET /runs/{run_id}/`` to the worker that owns the run.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from unittest.mock import AsyncMock

import aiohttp
import pytest
from aiohttp import web as aiohttp_web
from aiohttp.test_utils import make_mocked_request
from faust.exceptions import SameNode
from faust.types import TP
from pydantic import SecretStr
from yarl import URL

from models.agents import AgentEntry
from models.run import RunState
from streams.app import ExecutorApp, create_app
from streams.views import record_view, state_view
from streams.web import (
    PAGES,
    AgentsView,
    AgentView,
    HealthView,
    RunActionView,
    RunsView,
    RunView,
    delete_agent,
    health,
    list_agents,
    list_runs,
    show_agent,
    show_run,
)
from switchyard import http_guard, topics
from switchyard.settings import Settings
from tests.models.run_builders import make_plan, start
from tests.streams.test_web import FakeRepository, FakeStore, record_of


@dataclass
class FakeShell:
    live: dict[str, RunState] = field(default_factory=dict)
    applied: int = 7
    ignored: int = 1

    def load(self, run_id: str) -> RunState | None:
        return self.live.get(run_id)


@dataclass
class FakeApp:
    """The parts of :class:`~streams.app.ExecutorApp` the views read."""

    shell: FakeShell = field(default_factory=FakeShell)
    ready: bool = True
    database: Any = field(default_factory=lambda: SimpleNamespace(engine=object()))
    conf: Any = field(default_factory=lambda: SimpleNamespace(id="switchyard-executor"))
    checkpointer: Any = field(default_factory=lambda: SimpleNamespace(backlog=2, written=5, last_error=None))
    timers: list[str] = field(default_factory=lambda: ["t1", "t2", "t3"])
    partitions: set[TP] = field(default_factory=set)
    settings: Settings = field(default_factory=lambda: Settings(database_url=None))

    @property
    def assignor(self) -> Any:
        return SimpleNamespace(assigned_actives=lambda: self.partitions)

    def as_app(self) -> ExecutorApp:
        return cast(ExecutorApp, self)


@dataclass
class Fakes:
    app: FakeApp
    repo: FakeRepository
    store: FakeStore

    @property
    def executor(self) -> ExecutorApp:
        return self.app.as_app()


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Fakes:
    repo, store = FakeRepository(), FakeStore()
    monkeypatch.setattr("streams.web.WorkflowRepository", lambda engine: repo)
    monkeypatch.setattr("streams.web.RegistryStore", lambda engine, settings=None: store)
    return Fakes(FakeApp(), repo, store)


# ------------------------------------------------------------ health


async def test_health_gives_the_counters_and_the_run_partitions(fakes: Fakes) -> None:
    fakes.app.partitions = {TP(topics.PLANS, 2), TP(topics.PLANS, 0), TP(topics.RESULTS, 1)}
    status, body = await health(fakes.executor)
    assert status == 200
    assert body == {
        "app": "switchyard-executor",
        "ready": True,
        "runs_applied": 7,
        "events_ignored": 1,
        "timers": 3,
        "checkpoint_backlog": 2,
        "checkpoints_written": 5,
        "checkpoint_error": None,
        "assigned_partitions": 3,
        "run_partitions": [0, 2],
    }
    json.dumps(body)  # plain JSON


async def test_health_is_503_until_the_worker_is_ready(fakes: Fakes) -> None:
    fakes.app.ready = False
    status, body = await health(fakes.executor)
    assert (status, body["ready"]) == (503, False)


# ------------------------------------------------------------ runs


async def test_list_runs_passes_the_query_on_and_summarizes(fakes: Fakes) -> None:
    record = record_of(start(make_plan(1), run_id="run-1"))
    fakes.repo.records["run-1"] = record
    status, body = await list_runs(fakes.executor, {"status": "running", "workflow_id": "wf", "limit": "5"})
    assert status == 200
    (summary,) = body["runs"]
    assert summary["run_id"] == "run-1"
    assert not {"steps", "plan", "input"} & set(summary), "a listing leaves the heavy fields out"
    (call,) = fakes.repo.calls
    assert "('limit', 5)" in call
    assert "('workflow_id', 'wf')" in call
    assert "RUNNING" in call


async def test_list_runs_refuses_a_bad_query_without_asking_postgresql(fakes: Fakes) -> None:
    with pytest.raises(http_guard.Problem) as raised:
        await list_runs(fakes.executor, {"limit": "many"})
    assert raised.value.status == 400
    assert fakes.repo.calls == []


async def test_show_run_prefers_the_live_state(fakes: Fakes) -> None:
    state = start(make_plan(2), run_id="run-2")
    fakes.app.shell.live["run-2"] = state
    fakes.repo.records["run-2"] = record_of(state)
    status, body = await show_run(fakes.executor, "run-2")
    assert (status, body) == (200, state_view(state))
    assert fakes.repo.calls == [], "the live state is newer than PostgreSQL's record"


async def test_show_run_falls_back_to_the_record_then_404(fakes: Fakes) -> None:
    record = record_of(start(make_plan(1), run_id="run-3"))
    fakes.repo.records["run-3"] = record
    assert await show_run(fakes.executor, "run-3") == (200, record_view(record))
    assert await show_run(fakes.executor, "run-4") == (404, {"error": "no run 'run-4'"})
    assert fakes.repo.calls == ["get_run run-3", "get_run run-4"]


# ------------------------------------------------------------ agents


def helper(name: str = "helper") -> AgentEntry:
    return AgentEntry.model_validate(
        {"name": name, "url": "http://127.0.0.1:9/", "auth": {"kind": "bearer", "secret": "literal-secret"}}
    )


async def test_list_agents_redacts_secrets(fakes: Fakes) -> None:
    assert await list_agents(fakes.executor) == (200, {"agents": []})
    fakes.store.entries = {"a": helper("a"), "b": helper("b")}
    status, body = await list_agents(fakes.executor)
    assert (status, [a["name"] for a in body["agents"]]) == (200, ["a", "b"])
    assert "literal-secret" not in json.dumps(body)


async def test_show_agent(fakes: Fakes) -> None:
    fakes.store.entries["helper"] = helper()
    status, body = await show_agent(fakes.executor, "helper")
    assert (status, body["name"]) == (200, "helper")
    assert body["auth"]["secret"] == "********"
    assert await show_agent(fakes.executor, "nobody") == (404, {"error": "no agent 'nobody' in the registry"})


async def test_delete_agent(fakes: Fakes) -> None:
    fakes.store.entries["helper"] = helper()
    assert await delete_agent(fakes.executor, "helper") == (200, {"deleted": "helper"})
    assert fakes.store.entries == {}
    assert await delete_agent(fakes.executor, "helper") == (404, {"error": "no agent 'helper' in the registry"})


# ------------------------------------------------------------ the real app: pages and routing


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ExecutorApp:
    settings = Settings(
        broker_url="kafka://127.0.0.1:9", data_dir=tmp_path, database_url=None, api_token=SecretStr("t")
    )
    made = create_app(settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # faust's AlreadyConfiguredWarning
        made.conf.store = URL("memory://")
    repo = FakeRepository()
    monkeypatch.setattr("streams.web.WorkflowRepository", lambda engine: repo)
    monkeypatch.setattr(type(made.database), "engine", property(lambda self: object()))
    return made


def test_register_adds_every_page_with_its_view(app: ExecutorApp) -> None:
    pages = {path: type(view) for path, view in app.web.views.items() if path in dict(PAGES)}
    assert pages == {
        "/health/": HealthView,
        "/runs/": RunsView,
        "/runs/{run_id}/": RunView,
        "/runs/{run_id}/{action}": RunActionView,
        "/agents/": AgentsView,
        "/agents/{name}": AgentView,
    }
    assert all(view.app is app for path, view in app.web.views.items() if path in pages)


def run_page(app: ExecutorApp) -> RunView:
    view = app.web.views["/runs/{run_id}/"]
    assert isinstance(view, RunView)
    return view


def get_run(run_id: str) -> Any:
    return make_mocked_request("GET", f"/runs/{run_id}/", match_info={"run_id": run_id})


def answered(response: Any) -> tuple[int, Any]:
    assert isinstance(response, aiohttp_web.Response)
    assert response.body is not None
    return response.status, json.loads(cast(bytes, response.body))


async def test_a_run_owned_by_another_worker_is_answered_by_it(
    app: ExecutorApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = aiohttp_web.json_response({"run_id": "run-5", "source": "live"})
    route = AsyncMock(return_value=theirs)
    monkeypatch.setattr(app.router, "route_req", route)
    response = await run_page(app).get(get_run("run-5"), run_id="run-5")
    assert answered(response) == (200, {"run_id": "run-5", "source": "live"}), "the owner's answer, as it came"
    ((table, key, _, _),) = [call.args for call in route.await_args_list]
    assert (table, key) == (app.runs.name, "run-5"), "routed by the run's key in the runs table"


async def test_a_run_owned_here_is_answered_here(app: ExecutorApp, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.router, "route_req", AsyncMock(side_effect=SameNode()))
    state = start(make_plan(1), run_id="run-6")
    monkeypatch.setattr(app.shell, "load", {"run-6": state}.get)
    status, body = answered(await run_page(app).get(get_run("run-6"), run_id="run-6"))
    assert (status, body["source"]) == (200, "live")


async def test_an_owner_that_does_not_answer_is_503(app: ExecutorApp, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.router, "route_req", AsyncMock(side_effect=aiohttp.ClientConnectionError("refused")))
    status, body = answered(await run_page(app).get(get_run("run-7"), run_id="run-7"))
    assert status == 503
    assert body == {"error": "the worker that owns run 'run-7' did not answer; try again"}


async def test_a_run_id_that_cannot_be_a_run_is_404_without_routing(
    app: ExecutorApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    route = AsyncMock(side_effect=SameNode())
    monkeypatch.setattr(app.router, "route_req", route)
    status, body = answered(await run_page(app).get(get_run("a b"), run_id="a b"))
    assert (status, body) == (404, {"error": "no run 'a b'"})
    assert route.await_count == 0
