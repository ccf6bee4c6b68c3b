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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
from models.messages import ControlCommand, ControlMessage, decode
from models.run import RunState
from streams.app import ExecutorApp, create_app
from streams.views import record_view, state_view
from streams.web import (
    FORWARDED_HEADER,
    PAGES,
    AgentsView,
    AgentView,
    HealthView,
    RunActionView,
    RunsView,
    RunView,
    StepInputView,
    delete_agent,
    give_input,
    health,
    list_agents,
    list_runs,
    show_agent,
    show_run,
)
from switchyard import http_guard, topics
from switchyard.settings import Settings
from tests.models.run_builders import make_plan, start
from tests.streams.test_answers import StateRepository, approval, asked_twice, mapped, waiting
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
    control_topic: Any = field(default_factory=lambda: SimpleNamespace(send=AsyncMock(return_value=None)))

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


# ------------------------------------------------------------ answers


@pytest.fixture
def checkpoints(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> StateRepository:
    """PostgreSQL's checkpoints, read by ``give_input`` when this worker does not have the run live."""
    repo = StateRepository()
    monkeypatch.setattr("streams.web.WorkflowRepository", lambda engine: repo)
    return repo


def sent(app: FakeApp) -> list[tuple[bytes, ControlMessage]]:
    """What was sent to the control topic: each record's key and message."""
    send = app.control_topic.send
    assert isinstance(send, AsyncMock)
    return [(call.kwargs["key"], decode(ControlMessage, call.kwargs["value"])) for call in send.await_args_list]


async def test_an_answer_is_202_and_its_record_goes_to_the_control_topic(
    fakes: Fakes, checkpoints: StateRepository
) -> None:
    fakes.app.shell.live["run-1"] = waiting()
    status, body = await give_input(fakes.executor, "run-1", "s1", {"text": "1999", "data": {"year": 1999}})
    ((key, message),) = sent(fakes.app)
    assert key == b"run-1"
    assert (message.run_id, message.command, message.step_id) == ("run-1", ControlCommand.INPUT, "s1")
    assert (message.attempt, message.iteration, message.item, message.turn) == (1, 1, None, 0)
    assert message.answer is not None
    assert (message.answer.text, message.answer.data, message.answer.source) == ("1999", {"year": 1999}, "http")
    assert (status, body) == (
        202,
        {
            "run_id": "run-1",
            "step_id": "s1",
            "iteration": 1,
            "item": None,
            "turn": 0,
            "answer_id": message.answer.answer_id,
            "status_url": "/runs/run-1/",
        },
    )
    assert checkpoints.calls == [], "the live state decides"


async def test_an_approval_is_decided_with_its_decision(fakes: Fakes, checkpoints: StateRepository) -> None:
    fakes.app.shell.live["run-1"] = approval()
    status, body = await give_input(fakes.executor, "run-1", "review", {"decision": "approve", "text": "ok"})
    assert (status, body["step_id"], body["turn"]) == (202, "review", 0)
    ((_, message),) = sent(fakes.app)
    assert message.answer is not None
    assert (message.answer.decision, message.answer.text) == ("approve", "ok")


async def test_a_map_item_is_named_in_the_body(fakes: Fakes, checkpoints: StateRepository) -> None:
    fakes.app.shell.live["run-1"] = mapped()
    status, body = await give_input(fakes.executor, "run-1", "s1", {"text": "b", "item": 1, "iteration": 1})
    assert (status, body["item"], body["iteration"]) == (202, 1, 1)
    ((_, message),) = sent(fakes.app)
    assert message.item == 1


async def test_the_live_state_wins_over_postgresql(fakes: Fakes, checkpoints: StateRepository) -> None:
    fakes.app.shell.live["run-1"] = asked_twice()
    checkpoints.states["run-1"] = waiting()  # a checkpoint behind: the first question
    status, body = await give_input(fakes.executor, "run-1", "s1", {"text": "May"})
    assert (status, body["turn"]) == (202, 1), "the question the agent asks now"
    assert checkpoints.calls == []


async def test_a_live_state_that_does_not_wait_refuses_what_postgresql_would_take(
    fakes: Fakes, checkpoints: StateRepository
) -> None:
    fakes.app.shell.live["run-1"] = start(make_plan(2), run_id="run-1")  # s1 running, not waiting
    checkpoints.states["run-1"] = waiting()
    status, body = await give_input(fakes.executor, "run-1", "s1", {"text": "1999"})
    assert (status, body) == (409, {"error": "step 's1' of run 'run-1' is not waiting for input (it is RUNNING)"})
    assert (sent(fakes.app), checkpoints.calls) == ([], [])


async def test_postgresql_answers_when_the_table_does_not_have_the_run(
    fakes: Fakes, checkpoints: StateRepository
) -> None:
    checkpoints.states["run-1"] = asked_twice()
    status, body = await give_input(fakes.executor, "run-1", "s1", {"data": ["May"]})
    assert (status, body["turn"]) == (202, 1)
    assert checkpoints.calls == ["get_state run-1"]
    ((_, message),) = sent(fakes.app)
    assert message.answer is not None
    assert message.answer.data == ["May"]


@pytest.mark.parametrize(
    ("make", "step_id", "body", "status", "error"),
    [
        (None, "s1", {"text": "x"}, 404, "no run 'run-1'"),
        (waiting, "s9", {"text": "x"}, 404, "run 'run-1' has no step 's9'"),
        (waiting, "s2", {"text": "x"}, 409, "step 's2' of run 'run-1' is not waiting for input (it has not started)"),
        (
            mapped,
            "s1",
            {"text": "x"},
            409,
            "2 items of step 's1' of run 'run-1' wait for input (items 0, 1); name one",
        ),
        (
            mapped,
            "s1",
            {"text": "x", "item": 7},
            409,
            "step 's1' item 7 of run 'run-1' is not waiting for input (it is RUNNING)",
        ),
        (
            approval,
            "review",
            {"text": "yes"},
            400,
            "step 'review' is an approval: decide with approve or reject (and optional data)",
        ),
        (
            waiting,
            "s1",
            {"decision": "reject"},
            400,
            "step 's1' waits for an answer to its agent's question, not a decision: give text or data",
        ),
        (waiting, "s1", {}, 400, "an answer to step 's1' needs text or data"),
        (waiting, "s1", {"text": "", "data": None}, 400, "an answer to step 's1' needs text or data"),
    ],
)
async def test_a_refused_answer_sends_nothing(
    fakes: Fakes, checkpoints: StateRepository, make: Any, step_id: str, body: Any, status: int, error: str
) -> None:
    if make is not None:
        checkpoints.states["run-1"] = make()
    assert await give_input(fakes.executor, "run-1", step_id, body) == (status, {"error": error})
    assert sent(fakes.app) == []


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"text": "x" * 10_001}, "invalid answer: text: String should have at most 10000 characters"),
        ({"decision": "yes"}, "invalid answer: decision: Input should be 'approve' or 'reject'"),
        ({"text": 3}, "invalid answer: text: Input should be a valid string"),
        (
            {"text": "x", "answer_id": "mine"},
            "unknown field(s): answer_id; use data, decision, item, iteration, text",
        ),
        ({"answer": "x", "turn": 0}, "unknown field(s): answer, turn; use data, decision, item, iteration, text"),
        (["text"], 'expected a JSON object {"text": ..., "data": ..., "decision": "approve"|"reject"}'),
        ("x", 'expected a JSON object {"text": ..., "data": ..., "decision": "approve"|"reject"}'),
        (http_guard.NO_BODY, 'expected a JSON object {"text": ..., "data": ..., "decision": "approve"|"reject"}'),
    ],
)
async def test_a_body_that_is_not_an_answer_is_400_before_anything_is_read(
    fakes: Fakes, checkpoints: StateRepository, body: Any, error: str
) -> None:
    checkpoints.states["run-1"] = waiting()
    assert await give_input(fakes.executor, "run-1", "s1", body) == (400, {"error": error})
    assert (sent(fakes.app), checkpoints.calls) == ([], [])


@pytest.mark.parametrize("name", ["item", "iteration"])
@pytest.mark.parametrize("value", ["1", True, False, -1, 1.0, 1.5, [1], {"n": 1}])
async def test_an_item_or_iteration_that_is_not_a_whole_number_is_400(
    fakes: Fakes, checkpoints: StateRepository, name: str, value: Any
) -> None:
    checkpoints.states["run-1"] = mapped()
    status, body = await give_input(fakes.executor, "run-1", "s1", {"text": "x", name: value})
    least = 0 if name == "item" else 1
    assert (status, body) == (400, {"error": f"{name} must be a whole number, at least {least}", "path": f"$.{name}"})
    assert (sent(fakes.app), checkpoints.calls) == ([], [])


async def test_null_item_and_iteration_are_as_if_not_given(fakes: Fakes, checkpoints: StateRepository) -> None:
    checkpoints.states["run-1"] = waiting()
    status, _ = await give_input(fakes.executor, "run-1", "s1", {"text": "x", "item": None, "iteration": None})
    assert status == 202


async def test_a_run_id_that_cannot_be_a_run_is_404_without_reading_anything(
    fakes: Fakes, checkpoints: StateRepository
) -> None:
    assert await give_input(fakes.executor, "a b", "s1", {"text": "x"}) == (404, {"error": "no run 'a b'"})
    assert (sent(fakes.app), checkpoints.calls) == ([], [])


async def test_an_answer_too_large_for_a_record_is_413_with_size_and_limit(
    fakes: Fakes, checkpoints: StateRepository
) -> None:
    fakes.app.settings = Settings(database_url=None, max_message_bytes=16_384)
    checkpoints.states["run-1"] = waiting()
    status, body = await give_input(fakes.executor, "run-1", "s1", {"data": "x" * 20_000})
    assert status == 413
    assert body["limit"] == 16_384
    assert body["size"] > 20_000
    assert set(body) == {"error", "size", "limit"}
    assert "SWITCHYARD_MAX_MESSAGE_BYTES" in body["error"]
    assert sent(fakes.app) == []


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
        "/runs/{run_id}/steps/{step_id}/input": StepInputView,
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


# ------------------------------------------------------------ the real app: an answer for another worker's run


@dataclass
class FakeOwner:
    """The HTTP client a worker forwards an answer with, and the owner's reply."""

    status: int = 202
    body: str = '{"run_id": "run-9", "turn": 0}'
    fail: Exception | None = None
    posts: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    @asynccontextmanager
    async def post(self, url: URL, *, data: str, headers: dict[str, str]) -> AsyncIterator[Any]:
        self.posts.append((str(url), data, dict(headers)))
        if self.fail is not None:
            raise self.fail
        yield SimpleNamespace(
            status=self.status, text=AsyncMock(return_value=self.body), content_type="application/json"
        )


OTHER_WORKER = URL("http://other-worker:6067")
INPUT_PATH = "/runs/run-9/steps/s1/input"


@dataclass
class Owned:
    owner: FakeOwner
    control: AsyncMock
    live: dict[str, RunState]
    asked: list[tuple[str, str]]


@pytest.fixture
def another_worker(app: ExecutorApp, monkeypatch: pytest.MonkeyPatch) -> Owned:
    """The runs table says another worker owns every run; this worker's client reaches a :class:`FakeOwner`."""
    asked: list[tuple[str, str]] = []

    def key_store(table: str, key: str) -> URL:
        asked.append((table, key))
        return OTHER_WORKER

    monkeypatch.setattr(app.router, "key_store", key_store)
    owner = FakeOwner()
    app.http_client = cast(Any, owner)
    control = AsyncMock(return_value=None)
    monkeypatch.setattr(app.control_topic, "send", control)
    live: dict[str, RunState] = {}
    monkeypatch.setattr(app.shell, "load", live.get)
    return Owned(owner, control, live, asked)


def input_page(app: ExecutorApp) -> StepInputView:
    view = app.web.views["/runs/{run_id}/steps/{step_id}/input"]
    assert isinstance(view, StepInputView)
    return view


def post_input(body: Any, **headers: str) -> Any:
    """``POST /runs/run-9/steps/s1/input`` as the guard hands it on: its body read and checked already."""
    request = make_mocked_request(
        "POST",
        INPUT_PATH,
        headers={"Host": "127.0.0.1:6066", "Content-Type": "application/json", **headers},
        match_info={"run_id": "run-9", "step_id": "s1"},
    )
    request[http_guard._BODY_KEY] = body
    return request


async def test_an_answer_for_another_workers_run_is_forwarded_once_and_its_reply_relayed(
    app: ExecutorApp, another_worker: Owned
) -> None:
    body = {"text": "1999", "item": 0}
    response = await input_page(app).post(post_input(body, Authorization="Bearer t"), run_id="run-9", step_id="s1")
    assert answered(response) == (202, {"run_id": "run-9", "turn": 0}), "the owner's answer, as it came"
    ((url, data, headers),) = another_worker.owner.posts
    assert url == f"http://other-worker:6067{INPUT_PATH}"
    assert json.loads(data) == body
    assert headers == {"Content-Type": "application/json", FORWARDED_HEADER: "1", "Authorization": "Bearer t"}
    assert another_worker.asked == [(app.runs.name, "run-9")]
    assert another_worker.control.await_count == 0, "the owner sends the answer, not this worker"


async def test_an_owners_refusal_is_relayed_with_its_status(app: ExecutorApp, another_worker: Owned) -> None:
    another_worker.owner.status, another_worker.owner.body = 409, '{"error": "not waiting"}'
    response = await input_page(app).post(post_input({"text": "x"}), run_id="run-9", step_id="s1")
    assert answered(response) == (409, {"error": "not waiting"})
    (_, _, headers) = another_worker.owner.posts[0]
    assert "Authorization" not in headers, "no token is made up"


async def test_a_forwarded_answer_is_answered_here_not_forwarded_again(
    app: ExecutorApp, another_worker: Owned, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = StateRepository()
    monkeypatch.setattr("streams.web.WorkflowRepository", lambda engine: repo)
    repo.states["run-9"] = waiting("run-9")
    request = post_input({"text": "1999"}, **{FORWARDED_HEADER: "1"})
    status, body = answered(await input_page(app).post(request, run_id="run-9", step_id="s1"))
    assert (status, body["run_id"], body["turn"]) == (202, "run-9", 0)
    assert another_worker.owner.posts == []
    ((_, sent_to),) = [(call.args, call.kwargs) for call in another_worker.control.await_args_list]
    assert sent_to["key"] == b"run-9"
    assert decode(ControlMessage, sent_to["value"]).step_id == "s1"


async def test_an_owner_that_does_not_answer_an_answer_is_503(app: ExecutorApp, another_worker: Owned) -> None:
    another_worker.owner.fail = aiohttp.ClientConnectionError("refused")
    status, body = answered(await input_page(app).post(post_input({"text": "x"}), run_id="run-9", step_id="s1"))
    assert (status, body) == (503, {"error": "the worker that owns run 'run-9' did not answer; try again"})
    assert another_worker.control.await_count == 0


async def test_an_answer_for_a_run_owned_here_is_answered_here(
    app: ExecutorApp, another_worker: Owned, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.router, "key_store", lambda table, key: app.conf.canonical_url)
    another_worker.live["run-9"] = waiting("run-9")
    status, body = answered(await input_page(app).post(post_input({"text": "x"}), run_id="run-9", step_id="s1"))
    assert (status, body["turn"]) == (202, 0)
    assert another_worker.owner.posts == []
    assert another_worker.control.await_count == 1


async def test_an_invalid_run_id_is_404_here_without_forwarding(app: ExecutorApp, another_worker: Owned) -> None:
    status, body = answered(await input_page(app).post(post_input({"text": "x"}), run_id="a b", step_id="s1"))
    assert (status, body) == (404, {"error": "no run 'a b'"})
    assert (another_worker.owner.posts, another_worker.asked) == ([], [])


async def test_a_request_without_a_body_for_another_workers_run_is_400(app: ExecutorApp, another_worker: Owned) -> None:
    response = await input_page(app).post(post_input(http_guard.NO_BODY), run_id="run-9", step_id="s1")
    status, _ = answered(response)
    assert status == 400
