"""AgentCaller against real example agents (the a2a-sdk server) on loopback ports: real HTTP, no mocks."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agents_bridge.a2a import message_id_for
from agents_bridge.calls import AgentCaller, CallSettings, backoff_delay, parse_retry_after
from examples.agents.researcher import SPEC as RESEARCHER
from examples.agents.server import AgentConfig, AgentSpec, RunningAgent, start_agent
from examples.agents.skills import research, summarize
from examples.agents.summarizer import SPEC as SUMMARIZER
from models.agents import AgentAuth, AgentEntry, AuthKind, CallRetry
from models.messages import AgentResult, AgentTask, ResultStatus

pytestmark = pytest.mark.timeout(60)

FAST_RETRY = CallRetry(max_attempts=3, initial_delay_s=0.01, multiplier=2, max_delay_s=0.05, jitter=0)
SECRET = "s3cr3t-t0ken-4f1d"  # a test token, looked for in the logs

StartAgent = Callable[..., Awaitable[RunningAgent]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


@pytest.fixture
def caller(session: aiohttp.ClientSession) -> AgentCaller:
    return AgentCaller(session, CallSettings(call_timeout_s=5, poll_interval_s=0.05), rng=random.Random(7))


@pytest.fixture
async def start() -> AsyncIterator[StartAgent]:
    """Start example agents on free ports; every one is stopped at the end of the test."""
    running: list[RunningAgent] = []

    async def _start(spec: AgentSpec = RESEARCHER, **config: Any) -> RunningAgent:
        agent = await start_agent(spec, AgentConfig(**config))
        running.append(agent)
        return agent

    yield _start
    for agent in running:
        await agent.stop()


_counter = iter(range(1, 1_000_000))


def make_task(agent_name: str = "researcher", value: Any = None, *, deadline_s: float = 10.0) -> AgentTask:
    n = next(_counter)
    return AgentTask(
        correlation_id=f"run-{n}/step/1",
        run_id=f"run-{n}",
        step_id="step",
        attempt=1,
        agent_name=agent_name,
        input={"topic": "stream processing"} if value is None else value,
        deadline=datetime.now(UTC) + timedelta(seconds=deadline_s),
    )


def entry(agent: RunningAgent | str, **fields: Any) -> AgentEntry:
    url = agent if isinstance(agent, str) else agent.url
    protocol = "1.0" if isinstance(agent, str) or agent.config.protocol != "0.3" else "0.3"
    values: dict[str, Any] = {"name": "researcher", "url": url, "protocol_version": protocol, "call_retry": FAST_RETRY}
    values.update(fields)
    return AgentEntry.model_validate(values)


def assert_result_matches(result: AgentResult, task: AgentTask) -> None:
    assert result.correlation_id == task.correlation_id
    assert (result.run_id, result.step_id, result.attempt) == (task.run_id, task.step_id, task.attempt)
    assert result.started_at <= result.finished_at


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- success ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["1.0", "0.3"])
async def test_success(start: StartAgent, caller: AgentCaller, protocol: str) -> None:
    agent = await start(protocol=protocol)
    task = make_task(value={"topic": "stream processing", "depth": 3})
    result = await caller.call(task, entry(agent))
    assert result.status is ResultStatus.SUCCESS, result.error
    assert result.error is None
    assert result.output == research({"topic": "stream processing", "depth": 3})
    assert_result_matches(result, task)
    assert agent.stats.calls == 1
    assert agent.stats.by_message_id == {message_id_for(task.correlation_id): 1}
    assert agent.stats.by_idempotency_key == {task.correlation_id: 1}


async def test_integers_come_back_as_integers(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(SUMMARIZER)
    text = "one two three four five six"
    result = await caller.call(make_task("summarizer", {"text": text, "max_words": 2}), entry(agent, name="summarizer"))
    assert result.output == summarize({"text": text, "max_words": 2})
    assert isinstance(result.output, dict)
    assert type(result.output["words"]) is int


async def test_concurrent_calls_to_one_agent(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start()
    tasks = [make_task(value={"topic": f"topic {n}"}) for n in range(10)]
    results = await asyncio.gather(*(caller.call(task, entry(agent)) for task in tasks))
    assert [r.status for r in results] == [ResultStatus.SUCCESS] * 10
    assert [r.output["topic"] for r in results] == [f"topic {n}" for n in range(10)]  # type: ignore[call-overload,index]
    assert agent.stats.calls == 10


@pytest.mark.parametrize(("agent_protocol", "entry_protocol"), [("1.0", "0.3"), ("0.3", "1.0")])
async def test_a_protocol_mismatch_is_a_jsonrpc_error(
    start: StartAgent, caller: AgentCaller, agent_protocol: str, entry_protocol: str
) -> None:
    agent = await start(protocol=agent_protocol)
    result = await caller.call(make_task(), entry(agent, protocol_version=entry_protocol))
    assert result.status is ResultStatus.FAILURE
    assert result.error is not None
    assert result.error.kind == "jsonrpc_error"
    assert result.error.message.startswith("code -32")
    assert not result.error.retriable


# --- failures the agent reports --------------------------------------------------------------------------------------


async def test_an_agent_reported_failure_is_final(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start()
    result = await caller.call(make_task(value={"depth": 2}), entry(agent))
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("agent_failed", False)
    assert result.error.message == "the researcher needs a non-empty string 'topic'"
    assert agent.stats.calls == 1


async def test_malformed_answer(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(malformed=True)
    result = await caller.call(make_task(), entry(agent))
    assert result.error is not None
    assert result.error.kind == "malformed_response"
    assert "neither a task nor a message" in result.error.message
    assert not result.error.retriable
    assert agent.stats.calls == 1


async def test_an_answer_over_the_size_limit_is_a_final_output_too_large(
    start: StartAgent, session: aiohttp.ClientSession
) -> None:
    agent = await start()
    small = AgentCaller(session, CallSettings(max_response_bytes=100))
    result = await small.call(make_task(), entry(agent))
    assert result.error is not None
    assert result.error.kind == "output_too_large"
    assert re.search(r"the agent's answer is \d+ bytes, over the limit of 100 bytes", result.error.message)
    assert not result.error.retriable
    assert agent.stats.calls == 1  # not asked again: the same agent would give the same answer


@pytest.mark.parametrize(("body_bytes", "named"), [(300, "300 bytes"), (1000, "more than 400 bytes")])
async def test_an_answer_over_the_limit_without_a_length_names_its_size(
    session: aiohttp.ClientSession, body_bytes: int, named: str
) -> None:
    # A chunked answer carries no Content-Length: the bridge counts it (up to 4x the limit) to name its size.
    from aiohttp.test_utils import TestServer

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(body_bytes // 50):
            await response.write(b"x" * 50)
        await response.write_eof()
        return response

    server_app = web.Application()
    server_app.router.add_post("/", chunked)
    async with TestServer(server_app, host="127.0.0.1") as server:
        small = AgentCaller(session, CallSettings(max_response_bytes=100))
        result = await small.call(make_task(), entry(str(server.make_url("/"))))
    assert result.error is not None
    assert result.error.kind == "output_too_large"
    assert f"the agent's answer is {named}, over the limit of 100 bytes" in result.error.message
    assert not result.error.retriable


async def test_input_required(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(input_required=True)
    result = await caller.call(make_task(), entry(agent))
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("input_required", False)
    assert "Which aspect" in result.error.message


# --- retries ---------------------------------------------------------------------------------------------------------


async def test_fail_n_times_then_succeed_through_retries(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(fail_times=2)
    task = make_task()
    result = await caller.call(task, entry(agent))
    assert result.status is ResultStatus.SUCCESS
    assert agent.stats.injected_failures == 2
    assert agent.stats.by_message_id == {message_id_for(task.correlation_id): 3}  # the same message id each time


async def test_always_5xx_gives_a_retriable_failure_after_all_attempts(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(always_5xx=True)
    result = await caller.call(make_task(), entry(agent, call_retry=FAST_RETRY.model_copy(update={"max_attempts": 4})))
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("http_status", True)
    assert result.error.message.startswith("gave up after 4 attempts: HTTP 500")
    assert agent.stats.calls == 4


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_other_4xx_are_not_retried(start: StartAgent, caller: AgentCaller, status: int) -> None:
    agent = await start(fail_times=5, fail_status=status)
    result = await caller.call(make_task(), entry(agent))
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("http_status", False)
    assert result.error.message.startswith(f"HTTP {status}")
    assert agent.stats.calls == 1


@pytest.mark.parametrize("status", [408, 429, 502, 503])
async def test_408_429_and_5xx_are_retried(start: StartAgent, caller: AgentCaller, status: int) -> None:
    agent = await start(fail_times=1, fail_status=status)
    assert (await caller.call(make_task(), entry(agent))).status is ResultStatus.SUCCESS
    assert agent.stats.calls == 2


async def test_retry_after_seconds_is_honoured(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(fail_times=1, fail_status=429, retry_after="1")
    began = time.monotonic()
    result = await caller.call(make_task(), entry(agent))
    assert result.status is ResultStatus.SUCCESS
    assert time.monotonic() - began >= 0.95  # the backoff alone would be 0.01 s
    assert agent.stats.calls == 2


async def test_a_retry_after_beyond_the_deadline_gives_up_at_once(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(fail_times=1, fail_status=503, retry_after="30")
    began = time.monotonic()
    result = await caller.call(make_task(deadline_s=3), entry(agent))
    assert time.monotonic() - began < 1.0
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("http_status", True)
    assert "no time left" in result.error.message
    assert agent.stats.calls == 1


async def test_retry_after_http_date_is_honoured(caller: AgentCaller) -> None:
    """A tiny server: 429 with an HTTP-date Retry-After, then a completed task."""
    answers: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        answers.append(time.monotonic())
        if len(answers) == 1:
            when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
            return web.Response(status=429, headers={"Retry-After": format_datetime(when, usegmt=True)})
        task = {"id": "t", "status": {"state": "TASK_STATE_COMPLETED"}, "artifacts": [{"parts": [{"data": {"ok": 1}}]}]}
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {"task": task}})

    app = web.Application()
    app.router.add_post("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        result = await caller.call(make_task(), entry(f"http://127.0.0.1:{port}/"))
    finally:
        await runner.cleanup()
    assert result.output == {"ok": 1}
    assert len(answers) == 2
    assert answers[1] - answers[0] >= 0.95  # the date is 1 to 2 s ahead (whole seconds)


async def test_connection_refused_is_a_retriable_connection_failure(caller: AgentCaller) -> None:
    result = await caller.call(make_task(), entry(f"http://127.0.0.1:{free_port()}/"))
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("connection", True)
    assert result.error.message.startswith("gave up after 3 attempts: ClientConnectorError")


async def test_a_slow_request_times_out_and_is_retried(start: StartAgent, session: aiohttp.ClientSession) -> None:
    agent = await start(slow_s=2.0)
    impatient = AgentCaller(session, CallSettings(call_timeout_s=0.2))
    result = await impatient.call(
        make_task(), entry(agent, call_retry=FAST_RETRY.model_copy(update={"max_attempts": 2}))
    )
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("timeout", True)
    assert result.error.message.startswith("gave up after 2 attempts: no answer within 0.20s")
    assert agent.stats.calls == 2


# --- polling and deadlines ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["1.0", "0.3"])
async def test_working_is_polled_to_completion(start: StartAgent, caller: AgentCaller, protocol: str) -> None:
    agent = await start(working=True, slow_s=0.3, protocol=protocol)
    result = await caller.call(make_task(), entry(agent))
    assert result.status is ResultStatus.SUCCESS, result.error
    assert result.output == research({"topic": "stream processing"})
    assert agent.stats.calls == 1
    polls = agent.stats.methods["GetTask" if protocol == "1.0" else "tasks/get"]
    assert polls >= 2  # 0.3 s of work polled every 0.05 s


async def test_a_deadline_passing_while_the_agent_works_is_a_timeout(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(slow_s=5)
    began = time.monotonic()
    result = await caller.call(make_task(deadline_s=0.5), entry(agent))
    assert time.monotonic() - began < 1.5
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("timeout", True)
    assert agent.stats.calls == 1


async def test_a_deadline_passing_while_polling_is_a_timeout(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(slow_s=5, working=True)
    began = time.monotonic()
    result = await caller.call(make_task(deadline_s=0.6), entry(agent))
    assert time.monotonic() - began < 1.5
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("timeout", True)
    assert "still" in result.error.message
    assert agent.stats.methods["GetTask"] >= 1


async def test_a_deadline_already_past_makes_no_call(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start()
    result = await caller.call(make_task(deadline_s=-1), entry(agent))
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("timeout", True)
    assert agent.stats.calls == 0


async def test_cancel_a_task_being_polled(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(slow_s=10, working=True)
    task = make_task()
    call = asyncio.create_task(caller.call(task, entry(agent)))
    for _ in range(200):
        if agent.stats.methods["GetTask"]:
            break
        await asyncio.sleep(0.01)
    assert await caller.cancel(task.correlation_id, entry(agent)) is True
    result = await asyncio.wait_for(call, 5)
    assert result.error is not None
    assert (result.error.kind, result.error.message) == ("agent_failed", "the agent reported the task canceled")
    assert agent.stats.methods["CancelTask"] == 1
    assert await caller.cancel(task.correlation_id, entry(agent)) is False  # forgotten, and no such task
    assert await caller.cancel("no-such-task", entry(agent, supports_cancel=False)) is False
    assert agent.stats.methods["CancelTask"] == 2


# --- credentials -----------------------------------------------------------------------------------------------------


async def test_bearer_token_reaches_the_agent(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(auth_token=SECRET)
    auth = AgentAuth(kind=AuthKind.BEARER, secret=SECRET)  # type: ignore[arg-type]
    assert (await caller.call(make_task(), entry(agent, auth=auth))).status is ResultStatus.SUCCESS
    assert agent.stats.auth_rejected == 0


async def test_api_key_from_an_env_reference_reaches_the_agent(
    start: StartAgent, caller: AgentCaller, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESEARCHER_KEY", SECRET)
    agent = await start(auth_token=SECRET, auth_header="X-Api-Key")
    auth = AgentAuth(kind=AuthKind.API_KEY, header="X-Api-Key", secret="env:RESEARCHER_KEY")  # type: ignore[arg-type]
    assert (await caller.call(make_task(), entry(agent, auth=auth))).status is ResultStatus.SUCCESS


async def test_a_wrong_token_is_a_final_401(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(auth_token=SECRET)
    auth = AgentAuth(kind=AuthKind.BEARER, secret="wrong")  # type: ignore[arg-type]
    result = await caller.call(make_task(), entry(agent, auth=auth))
    assert result.error is not None
    assert (result.error.kind, result.error.message, result.error.retriable) == (
        "http_status",
        "HTTP 401 Unauthorized",
        False,
    )
    assert agent.stats.auth_rejected == 1


async def test_an_unset_secret_variable_is_a_configuration_failure(
    start: StartAgent, caller: AgentCaller, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MISSING_AGENT_KEY", raising=False)
    agent = await start(auth_token=SECRET)
    auth = AgentAuth(kind=AuthKind.BEARER, secret="env:MISSING_AGENT_KEY")  # type: ignore[arg-type]
    result = await caller.call(make_task(), entry(agent, auth=auth))
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("configuration", False)
    assert "MISSING_AGENT_KEY" in result.error.message
    assert agent.stats.calls == 0


async def test_the_secret_never_reaches_the_logs(
    start: StartAgent, caller: AgentCaller, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("THE_KEY", SECRET)
    bearer = AgentAuth(kind=AuthKind.BEARER, secret=SECRET)  # type: ignore[arg-type]
    by_env = AgentAuth(kind=AuthKind.API_KEY, secret="env:THE_KEY")  # type: ignore[arg-type]
    good = await start(auth_token=SECRET)
    flaky = await start(auth_token=SECRET, auth_header="X-API-Key", fail_times=1)
    picky = await start(auth_token="another-token")
    results = [
        await caller.call(make_task(), entry(good, auth=bearer)),
        await caller.call(make_task(), entry(flaky, auth=by_env)),
        await caller.call(make_task(), entry(picky, auth=bearer)),
        await caller.call(make_task(), entry(f"http://127.0.0.1:{free_port()}/", auth=bearer)),
    ]
    assert [r.status for r in results] == [ResultStatus.SUCCESS, ResultStatus.SUCCESS] + [ResultStatus.FAILURE] * 2
    # The agents run in this process too, and the a2a-sdk server logs whole request headers at DEBUG
    # (``ServerCallContext``): that is the agent's log, not the bridge's, so its records are left out.
    bridge_side = [r for r in caplog.records if not r.name.startswith("a2a.")]
    assert any(r.name == "agents_bridge.calls" for r in bridge_side), "the calls were logged"
    for record in bridge_side:
        assert SECRET not in record.getMessage(), record.name
        assert SECRET not in logging.Formatter().format(record), record.name
    assert all(SECRET not in r.model_dump_json() for r in results)


# --- pure helpers ----------------------------------------------------------------------------------------------------


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    for unreadable in (None, "", "-5", "soon", "1.5", "Thu, 01 Jan 2026 12:00:30"):
        assert parse_retry_after(unreadable, now) is None, unreadable


def test_backoff_grows_is_capped_and_jittered() -> None:
    policy = CallRetry(max_attempts=5, initial_delay_s=0.1, multiplier=2, max_delay_s=0.3, jitter=0)
    assert [backoff_delay(policy, n, random.Random(1)) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    jittered = policy.model_copy(update={"jitter": 0.5})
    delays = {backoff_delay(jittered, 2, random.Random(seed)) for seed in range(50)}
    assert len(delays) > 1
    assert all(0.1 <= d <= 0.3 for d in delays)
