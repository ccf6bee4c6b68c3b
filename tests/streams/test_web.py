"""The executor's HTTP API in-process: the real views and guard on aiohttp's test server, PostgreSQL and Kafka faked.

The app is :func:`streams.app.create_app`'s, never started as a worker: the
views' reads of PostgreSQL go to :class:`FakeRepository` and the registry to
:class:`FakeStore`, sends to mocks, and ``table_route`` answers on this node.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from faust.exceptions import SameNode
from pydantic import SecretStr
from sqlalchemy.exc import OperationalError
from yarl import URL

from models.agents import AgentEntry
from models.messages import ControlMessage, WorkflowSubmission, decode, utcnow
from models.run import RunState
from streams.app import ExecutorApp, create_app
from switchyard.db import RunRecord
from switchyard.registry import RegistrySecretError
from switchyard.settings import Settings
from tests.models.run_builders import make_plan, start

TOKEN = "web-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 16_384
PLAN = make_plan(1).model_dump(mode="json")


@dataclass
class FakeRepository:
    """What the views ask PostgreSQL, answered from dicts; ``down`` makes every call fail."""

    records: dict[str, RunRecord] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    down: bool = False

    def _ask(self, what: str) -> None:
        self.calls.append(what)
        if self.down:
            raise OperationalError("SELECT", {}, Exception("connection refused"))

    def get_run(self, run_id: str, *, with_steps: bool = True) -> RunRecord | None:
        self._ask(f"get_run {run_id}")
        return self.records.get(run_id)

    def exists(self, run_id: str) -> str | None:
        self._ask(f"exists {run_id}")
        record = self.records.get(run_id)
        return None if record is None else record.status

    def list_runs(self, **kwargs: Any) -> list[RunRecord]:
        self._ask(f"list_runs {sorted(kwargs.items(), key=str)}")
        return list(self.records.values())


@dataclass
class FakeStore:
    entries: dict[str, AgentEntry] = field(default_factory=dict)
    refuse: Exception | None = None

    def put(self, entry: AgentEntry) -> bool:
        if self.refuse is not None:
            raise self.refuse
        created = entry.name not in self.entries
        self.entries[entry.name] = entry
        return created

    def get(self, name: str) -> AgentEntry | None:
        return self.entries.get(name)

    def list(self) -> list[AgentEntry]:
        return list(self.entries.values())

    def delete(self, name: str) -> bool:
        return self.entries.pop(name, None) is not None


@dataclass
class Api:
    app: ExecutorApp
    client: TestClient[web.Request, web.Application]
    repo: FakeRepository
    store: FakeStore
    plans: AsyncMock
    control: AsyncMock
    live: dict[str, RunState]

    async def call(self, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **AUTH, **headers}
        response = await self.client.request(method, path, data=data, headers=sent)
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()

    def sent_submissions(self) -> list[WorkflowSubmission]:
        return [decode(WorkflowSubmission, call.kwargs["value"]) for call in self.plans.await_args_list]


@pytest.fixture
async def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Api]:
    settings = Settings(
        broker_url="kafka://127.0.0.1:9",  # never contacted
        data_dir=tmp_path,
        database_url=None,
        max_message_bytes=LIMIT,
        api_token=SecretStr(TOKEN),
    )
    app = create_app(settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # faust's AlreadyConfiguredWarning
        app.conf.store = URL("memory://")
    repo, store = FakeRepository(), FakeStore()
    live: dict[str, RunState] = {}
    monkeypatch.setattr("streams.web.WorkflowRepository", lambda engine: repo)
    monkeypatch.setattr("streams.web.RegistryStore", lambda engine, settings=None: store)
    monkeypatch.setattr(type(app.database), "engine", property(lambda self: object()))
    monkeypatch.setattr(app.shell, "load", live.get)
    monkeypatch.setattr(app.router, "route_req", AsyncMock(side_effect=SameNode()))
    plans, control = AsyncMock(return_value=None), AsyncMock(return_value=None)
    monkeypatch.setattr(app.plans_topic, "send", plans)
    monkeypatch.setattr(app.control_topic, "send", control)
    app.web.init_server()  # Faust's built-in blueprints, as when the worker's web server starts
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(app.web.web_app))  # type: ignore[attr-defined]
    await client.start_server()
    try:
        yield Api(app, client, repo, store, plans, control, live)
    finally:
        await client.close()


def record_of(state: RunState) -> RunRecord:
    """The PostgreSQL record of a run whose state is ``state`` (written by the checkpointer)."""
    return RunRecord(
        run_id=state.run_id,
        workflow_id=state.plan.workflow_id,
        workflow_version=state.plan.version,
        status=str(state.status),
        input=state.input,
        plan=state.plan.model_dump(mode="json"),
        state=state.model_dump(mode="json"),
        version=state.version,
        created_at=utcnow(),
        updated_at=utcnow(),
    )


# ------------------------------------------------------------ POST /runs/


async def test_a_submission_is_sent_once_keyed_by_its_run_id(api: Api) -> None:
    status, body = await api.call("POST", "/runs/", {"plan": PLAN, "input": {"text": "hi"}})
    assert status == 202
    run_id = body["run_id"]
    assert body == {"run_id": run_id, "status_url": f"/runs/{run_id}/"}
    (sent,) = api.plans.await_args_list
    assert sent.kwargs["key"] == run_id.encode()
    assert api.sent_submissions()[0].input == {"text": "hi"}
    assert api.repo.calls == [], "a run_id the API makes up needs no look-up"


async def test_an_encoded_submission_over_the_limit_is_413(api: Api) -> None:
    # A plan without its defaults, sent compactly: the body fits, the record (defaults filled in) does not.
    plan = {
        "workflow_id": "wf",
        "name": "n",
        "version": "1",
        "start_step": "s1",
        "steps": {"s1": {"id": "s1", "agent_name": "a", "input_mapping": {}, "next_step": None}},
    }
    empty = json.dumps({"plan": plan, "input": {"text": ""}, "run_id": "big-run"}, separators=(",", ":"))
    body = {"plan": plan, "input": {"text": "x" * (LIMIT - len(empty))}, "run_id": "big-run"}
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert len(raw) == LIMIT, "the body itself fits"
    response = await api.client.post("/runs/", data=raw, headers={"Content-Type": "application/json", **AUTH})
    answer = await response.json()
    assert response.status == 413, answer
    assert answer["limit"] == LIMIT
    assert answer["size"] > LIMIT
    assert "SWITCHYARD_MAX_MESSAGE_BYTES" in answer["error"]
    assert api.plans.await_count == 0


async def test_a_body_over_the_limit_is_413_before_anything_else(api: Api) -> None:
    status, answer = await api.call("POST", "/runs/", {"plan": PLAN, "input": {"text": "x" * LIMIT}})
    assert status == 413
    assert answer["size"] > LIMIT
    assert answer["limit"] == LIMIT


async def test_the_same_run_id_with_the_same_request_points_to_the_run_and_sends_nothing(api: Api) -> None:
    state = start(make_plan(1), run_input={"text": "hi"}, run_id="run-7")
    api.live["run-7"] = state
    status, body = await api.call("POST", "/runs/", {"plan": PLAN, "input": {"text": "hi"}, "run_id": "run-7"})
    assert status == 202
    assert body == {"run_id": "run-7", "status_url": "/runs/run-7/", "existing": True, "status": "RUNNING"}
    assert api.plans.await_count == 0
    assert api.repo.calls == [], "the live state decides"


async def test_a_recorded_run_is_found_in_postgresql(api: Api) -> None:
    state = start(make_plan(1), run_input={"text": "hi"}, run_id="run-8")
    api.repo.records["run-8"] = record_of(state)
    status, body = await api.call("POST", "/runs/", {"plan": PLAN, "input": {"text": "hi"}, "run_id": "run-8"})
    assert (status, body["existing"]) == (202, True)
    status, body = await api.call("POST", "/runs/", {"plan": PLAN, "input": {"text": "other"}, "run_id": "run-8"})
    assert status == 409
    assert body["run_id"] == "run-8"
    assert body["status"] == "RUNNING"
    assert "run-8" in body["error"]
    assert api.plans.await_count == 0


async def test_a_new_chosen_run_id_is_looked_up_then_sent(api: Api) -> None:
    status, body = await api.call("POST", "/runs/", {"plan": PLAN, "input": {}, "run_id": "fresh-1"})
    assert (status, body["run_id"]) == (202, "fresh-1")
    assert api.repo.calls == ["get_run fresh-1"]
    assert [s.run_id for s in api.sent_submissions()] == ["fresh-1"]


async def test_a_chosen_run_id_without_postgresql_is_503(api: Api) -> None:
    api.repo.down = True
    status, body = await api.call("POST", "/runs/", {"plan": PLAN, "input": {}, "run_id": "fresh-2"})
    assert status == 503
    assert body["run_id"] == "fresh-2"
    assert api.plans.await_count == 0
    status, _ = await api.call("POST", "/runs/", {"plan": PLAN, "input": {}})
    assert status == 202, "without a run_id nothing needs PostgreSQL"


@pytest.mark.parametrize("run_id", ["a\n", "-x", "a" * 129, "a/b", 7])
async def test_a_bad_run_id_is_400(api: Api, run_id: Any) -> None:
    status, body = await api.call("POST", "/runs/", {"plan": PLAN, "input": {}, "run_id": run_id})
    assert status == 400
    assert body["path"] == "$.run_id"


async def test_nul_in_the_input_is_400_naming_the_field(api: Api) -> None:
    status, body = await api.call("POST", "/runs/", {"plan": PLAN, "input": {"text": "a\x00b"}})
    assert status == 400
    assert body["path"] == "$.input.text"
    assert api.plans.await_count == 0


async def test_submissions_need_the_token_and_json(api: Api) -> None:
    response = await api.client.post("/runs/", json={"plan": PLAN})
    assert response.status == 401
    response = await api.client.post("/runs/", data=json.dumps({"plan": PLAN}), headers=AUTH)
    assert response.status == 415
    status, _ = await api.call("POST", "/runs/", {"plan": PLAN}, Origin="http://evil.example")
    assert status == 403
    assert api.plans.await_count == 0


# ------------------------------------------------------------ reads and commands


async def test_run_ids_that_cannot_be_runs_are_404_without_postgresql(api: Api) -> None:
    status, body = await api.call("GET", "/runs/bad%20id/")
    assert status == 404
    assert "no run" in body["error"]
    status, _ = await api.call("POST", "/runs/bad%20id/cancel")
    assert status == 404
    assert api.repo.calls == []
    status, body = await api.call("GET", "/runs/run%00x/")
    assert (status, body["parameter"]) == (400, "run_id")


async def test_a_run_is_read_from_its_live_state_or_record(api: Api) -> None:
    api.live["run-9"] = start(make_plan(1), run_id="run-9")
    status, body = await api.call("GET", "/runs/run-9/")
    assert (status, body["source"]) == (200, "live")
    api.repo.records["run-10"] = record_of(start(make_plan(1), run_id="run-10"))
    status, body = await api.call("GET", "/runs/run-10/")
    assert (status, body["source"]) == (200, "record")
    assert (await api.call("GET", "/runs/run-11/"))[0] == 404


async def test_commands(api: Api) -> None:
    api.repo.records["run-12"] = record_of(start(make_plan(1), run_id="run-12"))
    status, body = await api.call("POST", "/runs/run-12/cancel")
    assert (status, body) == (202, {"run_id": "run-12", "requested": "cancel"})
    (sent,) = api.control.await_args_list
    assert decode(ControlMessage, sent.kwargs["value"]).run_id == "run-12"
    assert (await api.call("POST", "/runs/run-12/retry"))[0] == 409
    assert (await api.call("POST", "/runs/run-12/explode"))[0] == 404
    assert (await api.call("POST", "/runs/nope/cancel"))[0] == 404


async def test_a_command_for_a_run_not_checkpointed_yet_goes_by_the_live_state(api: Api) -> None:
    api.live["run-13"] = start(make_plan(1), run_id="run-13")
    status, _ = await api.call("POST", "/runs/run-13/cancel")
    assert status == 202
    assert "exists run-13" not in api.repo.calls, "the live state is newer than PostgreSQL's record"
    assert (await api.call("POST", "/runs/run-13/retry"))[0] == 409, "RUNNING: nothing to retry"


@pytest.mark.parametrize(
    ("query", "parameter"),
    [("offset=-1", "offset"), ("offset=10000000000000000000000", "offset"), ("status=DONE", "status")],
)
async def test_bad_listing_queries_are_400(api: Api, query: str, parameter: str) -> None:
    status, body = await api.call("GET", f"/runs/?{query}")
    assert status == 400
    assert body["parameter"] == parameter
    assert api.repo.calls == []


async def test_listing(api: Api) -> None:
    status, body = await api.call("GET", "/runs/?status=completed,failed&limit=5&offset=2")
    assert (status, body) == (200, {"runs": []})
    (call,) = api.repo.calls
    assert "('limit', 5)" in call
    assert "('offset', 2)" in call


# ------------------------------------------------------------ agents


async def test_agents_round_trip(api: Api) -> None:
    status, body = await api.call("PUT", "/agents/helper", {"url": "http://127.0.0.1:9/"})
    assert (status, body["name"]) == (201, "helper")
    assert (await api.call("PUT", "/agents/helper", {"url": "http://127.0.0.1:9/"}))[0] == 200
    assert (await api.call("GET", "/agents/helper"))[0] == 200
    status, body = await api.call("GET", "/agents/")
    assert [a["name"] for a in body["agents"]] == ["helper"]
    response = await api.client.delete("/agents/helper", headers=AUTH)
    assert response.status == 200, "a DELETE without a body needs no content type"
    assert (await api.call("GET", "/agents/helper"))[0] == 404


async def test_an_agents_max_concurrency_is_accepted_and_checked(api: Api) -> None:
    status, body = await api.call("PUT", "/agents/helper", {"url": "http://127.0.0.1:9/", "max_concurrency": 2})
    assert (status, body["max_concurrency"]) == (201, 2)
    status, body = await api.call("GET", "/agents/helper")
    assert (status, body["max_concurrency"]) == (200, 2)
    status, body = await api.call("PUT", "/agents/helper", {"url": "http://127.0.0.1:9/", "max_concurrency": 0})
    assert status == 400
    assert "max_concurrency" in json.dumps(body["problems"])


async def test_a_literal_secret_without_a_key_is_400(api: Api) -> None:
    api.store.refuse = RegistrySecretError("set SWITCHYARD_SECRETS_KEY to store a literal secret")
    entry = {"url": "http://127.0.0.1:9/", "auth": {"kind": "bearer", "secret": "literal"}}
    status, body = await api.call("PUT", "/agents/helper", entry)
    assert status == 400
    assert "SWITCHYARD_SECRETS_KEY" in body["error"]


async def test_bad_agent_entries_are_400(api: Api) -> None:
    status, body = await api.call("PUT", "/agents/helper", {"url": "file:///etc/passwd"})
    assert status == 400
    assert body["problems"]
    status, body = await api.call("PUT", "/agents/helper", {"url": "http://127.0.0.1:9/", "name": "other"})
    assert (status, body["path"]) == (400, "$.name")
    status, body = await api.call("PUT", "/agents/helper", {"url": "http://127.0.0.1:9/\x00"})
    assert (status, body["path"]) == (400, "$.url")


# ------------------------------------------------------------ Faust's own views


@pytest.mark.parametrize("path", ["/router/", "/table/", "/table/runs/", "/router/runs/", "/"])
async def test_fausts_views_are_404_without_the_token(api: Api, path: str) -> None:
    response = await api.client.get(path)
    assert response.status == 404
    assert response.content_type == "application/json"
    assert (await response.json())["error"].startswith("no such endpoint")
    with_token = await api.client.get(path, headers=AUTH)
    assert with_token.status == 200, await with_token.text()


async def test_router_errors_and_unexpected_ones_are_json(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    status, body = await api.call("GET", "/nowhere/")
    assert status == 404
    status, body = await api.call("PATCH", "/runs/")
    assert (status, body["allowed"]) == (405, ["GET", "HEAD", "POST"])

    def broken(**kwargs: Any) -> list[RunRecord]:
        raise KeyError("a bug")

    monkeypatch.setattr(api.repo, "list_runs", broken)
    assert await api.call("GET", "/runs/") == (500, {"error": "internal error"})
    status, _ = await api.call("GET", "/health/")
    assert status in {200, 503}, "the server goes on"


def test_a_run_stored_without_its_data_cannot_be_retried() -> None:
    from models.messages import ControlCommand
    from streams.web import refuse_command

    for kind in ("state_too_large", "unreadable_state"):
        refusal = refuse_command(ControlCommand.RETRY, "FAILED", "r1", kind)
        assert refusal is not None
        assert kind in refusal
        assert "cannot be retried" in refusal
    assert refuse_command(ControlCommand.RETRY, "FAILED", "r1", "agent_failed") is None
    assert refuse_command(ControlCommand.CANCEL, "FAILED", "r1", "state_too_large") is not None  # finished anyway
