"""AgentCaller against real example agents (the a2a-sdk server) on loopback ports: real HTTP, no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from a2a.helpers import get_data_parts, get_text_parts, new_data_part, new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import AgentCapabilities, AgentCard, AgentInterface
from aiohttp import web
from starlette.applications import Starlette

from agents_bridge.a2a import message_id_for
from agents_bridge.calls import AgentCaller, CallSettings, backoff_delay, parse_retry_after
from examples.agents.asgi import serve_asgi
from examples.agents.researcher import SPEC as RESEARCHER
from examples.agents.server import AgentConfig, AgentSpec, RunningAgent, start_agent
from examples.agents.skills import research, summarize
from examples.agents.summarizer import SPEC as SUMMARIZER
from models.agents import AgentAuth, AgentEntry, AuthKind, CallRetry
from models.messages import MAX_TEXT_CHARS, AgentQuestion, AgentResult, AgentTask, Reply, ResultStatus

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


async def test_input_required_is_a_question_not_a_failure(
    start: StartAgent, caller: AgentCaller, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agents_bridge.calls")
    agent = await start(input_required=True)
    task = make_task()
    result = await caller.call(task, entry(agent))
    assert result.status is ResultStatus.INPUT_REQUIRED
    assert result.error is None
    assert result.output is None
    assert result.question is not None
    assert result.question.text == "Which aspect should I focus on? Reply with more detail."
    assert result.question.data is None
    assert result.question.task_id
    assert result.question.context_id
    assert result.turn == 0
    assert_result_matches(result, task)
    [line] = [r for r in caplog.records if r.name == "agents_bridge.calls" and r.levelno == logging.INFO]
    assert line.getMessage().startswith(f"INPUT_REQUIRED for {task.correlation_id} from researcher")
    assert result.question.task_id in line.getMessage()


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


# --- a person in the loop: questions and answers ---------------------------------------------------------------------

QUESTION = "Which decade should I look at?"
SEND = {"1.0": "SendMessage", "0.3": "message/send"}
GET = {"1.0": "GetTask", "0.3": "tasks/get"}


class AskOnce(AgentExecutor):
    """A tiny a2a-sdk agent: asks one question on a task's first message, completes quoting the answer on the next."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Ask (INPUT_REQUIRED), or complete with an artifact that quotes the answer and names the task."""
        first = context.current_task is None
        if first and context.message is not None:
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        await updater.start_work()
        if first:
            question = [new_text_part(QUESTION), new_data_part({"choices": ["1990s", "2020s"]})]
            await updater.requires_input(updater.new_agent_message(question))
            return
        assert context.message is not None
        output = {
            "answer": "\n".join(get_text_parts(context.message.parts)),
            "answer_data": get_data_parts(context.message.parts),
            "task_id": context.task_id,
            "context_id": context.context_id,
        }
        await updater.add_artifact([new_data_part(output)], name="result")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Mark the task canceled."""
        await TaskUpdater(event_queue, str(context.task_id), str(context.context_id)).cancel()


@dataclass
class SdkAgent:
    """An a2a-sdk app on a loopback port, with every JSON-RPC body it was sent, in order."""

    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return [str(body.get("method")) for body in self.bodies]


@contextlib.asynccontextmanager
async def sdk_agent(executor: AgentExecutor) -> AsyncIterator[SdkAgent]:
    """Serve ``executor`` with the SDK's own handler and routes (1.0, and 0.3 through its compat layer)."""
    card = AgentCard(
        name="asker",
        description="asks once",
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url="http://127.0.0.1/", protocol_binding="JSONRPC", protocol_version=v)
            for v in ("1.0", "0.3")
        ],
        capabilities=AgentCapabilities(streaming=False, push_notifications=False),
        default_input_modes=["application/json", "text/plain"],
        default_output_modes=["application/json"],
    )
    handler = DefaultRequestHandler(agent_executor=executor, task_store=InMemoryTaskStore(), agent_card=card)
    sdk_app = Starlette(routes=create_jsonrpc_routes(handler, "/", enable_v0_3_compat=True))
    recorded: list[dict[str, Any]] = []

    async def rpc(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        recorded.append(json.loads(body))
        return await serve_asgi(sdk_app, request, body)

    app = web.Application()
    app.router.add_post("/", rpc)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield SdkAgent(url=f"http://127.0.0.1:{runner.addresses[0][1]}/", bodies=recorded)
    finally:
        await handler.aclose()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def fake_agent(handler: Callable[[dict[str, Any]], Awaitable[Any]]) -> AsyncIterator[str]:
    """Serve a JSON-RPC ``handler`` (the request body in, the ``result`` out) on a loopback port; yields its URL."""

    async def rpc(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": await handler(body)})

    app = web.Application()
    app.router.add_post("/", rpc)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


def answer_to(task: AgentTask, question: AgentQuestion, text: str | None = "the 2020s", **fields: Any) -> AgentTask:
    """The task that carries a person's answer to ``question`` (the next turn of ``task``)."""
    reply = Reply(task_id=question.task_id, context_id=question.context_id, text=text, data=fields.pop("data", None))
    values = task.model_dump() | {"turn": task.turn + 1, "reply": reply.model_dump()} | fields
    return AgentTask.model_validate(values)


def asked(result: AgentResult) -> AgentQuestion:
    assert result.status is ResultStatus.INPUT_REQUIRED, result.error
    assert result.question is not None
    return result.question


@pytest.mark.parametrize("protocol", ["1.0", "0.3"])
async def test_a_real_sdk_agent_asks_and_the_answer_continues_the_same_task(
    caller: AgentCaller, session: aiohttp.ClientSession, protocol: str
) -> None:
    async with sdk_agent(AskOnce()) as agent:
        asker = entry(agent.url, name="asker", protocol_version=protocol)
        first = make_task("asker")
        result = await caller.call(first, asker)
        question = asked(result)
        assert (question.text, question.data) == (QUESTION, {"choices": ["1990s", "2020s"]})
        assert question.context_id
        assert (result.turn, result.error, result.output) == (0, None, None)

        answer = answer_to(first, question, data={"from": 2020})
        done = await caller.call(answer, asker)
        assert done.status is ResultStatus.SUCCESS, done.error
        assert done.turn == 1
        assert done.correlation_id == first.correlation_id
        assert done.output == {
            "answer": "the 2020s",
            "answer_data": [{"from": 2020}],
            "task_id": question.task_id,  # the same task, continued
            "context_id": question.context_id,
        }
        assert agent.methods == [SEND[protocol], GET[protocol], SEND[protocol]]
        sent = agent.bodies[2]["params"]["message"]
        assert (sent["taskId"], sent["contextId"]) == (question.task_id, question.context_id)
        assert sent["messageId"] == message_id_for(answer.call_id) != message_id_for(first.correlation_id)

        # Another bridge gets the same answer again (the first died after sending it): the SDK kept the
        # answer in the task's history with its message id, so it is not sent again.
        again = await AgentCaller(session, CallSettings(poll_interval_s=0.05)).call(answer, asker)
        assert again.status is ResultStatus.SUCCESS
        assert again.output == done.output
        assert agent.methods == [SEND[protocol], GET[protocol], SEND[protocol], GET[protocol]]


@pytest.mark.parametrize("protocol", ["1.0", "0.3"])
async def test_an_answer_delivered_twice_reaches_the_agent_once_and_gives_its_next_question(
    start: StartAgent, session: aiohttp.ClientSession, caller: AgentCaller, protocol: str
) -> None:
    agent = await start(ask=2, protocol=protocol)
    first = make_task(value={"topic": "tides"})
    one = asked(await caller.call(first, entry(agent)))
    assert one.text.startswith("Question 1 of 2")
    assert one.data == {"question": 1, "of": 2}

    answer = answer_to(first, one, text="costs")
    two = asked(await caller.call(answer, entry(agent)))
    assert two.text.startswith("Question 2 of 2")
    assert two.task_id == one.task_id
    repeat = await AgentCaller(session, CallSettings(poll_interval_s=0.05)).call(answer, entry(agent))
    assert repeat.question == two, "the agent's next question, read from the task"
    assert repeat.turn == 1
    assert agent.stats.continuations == {message_id_for(answer.call_id): 1}

    done = await caller.call(answer_to(answer, two, text=None, data={"why": "budget"}), entry(agent))
    assert done.status is ResultStatus.SUCCESS, done.error
    assert done.turn == 2
    assert done.output == {**research({"topic": "tides"}), "answers": ["costs", {"why": "budget"}]}
    assert agent.stats.continued_tasks == {one.task_id: 2}
    assert agent.stats.by_idempotency_key == {
        first.correlation_id: 1,
        f"{first.correlation_id}#1": 1,
        f"{first.correlation_id}#2": 1,
    }


async def test_an_answer_the_agent_is_working_on_is_polled_not_sent_again(
    start: StartAgent, session: aiohttp.ClientSession, caller: AgentCaller
) -> None:
    agent = await start(ask=1, working=True, slow_s=1.0)
    first = make_task()
    answer = answer_to(first, asked(await caller.call(first, entry(agent))))
    sending = asyncio.create_task(caller.call(answer, entry(agent)))
    for _ in range(200):
        if agent.stats.continuations:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the agent has taken the answer up and works on it
    other_bridge = AgentCaller(session, CallSettings(poll_interval_s=0.05))
    repeat = await other_bridge.call(answer, entry(agent))
    done = await sending
    assert done.status is repeat.status is ResultStatus.SUCCESS
    assert repeat.output == done.output
    assert agent.stats.continuations == {message_id_for(answer.call_id): 1}


async def test_an_answer_is_retried_only_after_looking_at_the_task_again(
    start: StartAgent, caller: AgentCaller, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await start(ask=1, fail_times=1)  # each message id: one 503 first
    first = make_task()
    answer = answer_to(first, asked(await caller.call(first, entry(agent))))
    caplog.clear()
    done = await caller.call(answer, entry(agent))
    assert done.status is ResultStatus.SUCCESS, done.error
    assert agent.stats.continuations == {message_id_for(answer.call_id): 2}
    assert agent.stats.methods == {"SendMessage": 4, "GetTask": 2}  # GetTask, 503, GetTask, sent
    retried = [
        r.getMessage() for r in caplog.records if r.name == "agents_bridge.calls" and r.levelno == logging.WARNING
    ]
    assert len(retried) == 1
    assert retried[0].startswith(f"SendMessage to researcher for {answer.call_id} failed (attempt 1 of 3): HTTP 503")


async def test_an_answer_that_timed_out_after_reaching_the_agent_is_not_sent_again(
    session: aiohttp.ClientSession,
) -> None:
    # A fake agent takes the answer into the task's history, then answers too late: the bridge's
    # next look at the task finds it there and polls instead of sending it again.
    task: dict[str, Any] = {
        "id": "t-7",
        "contextId": "c-7",
        "status": {"state": "TASK_STATE_INPUT_REQUIRED"},
        "history": [{"messageId": "m-0", "role": "ROLE_USER", "parts": []}],
    }
    sends: list[str] = []

    def complete() -> None:
        task["status"] = {"state": "TASK_STATE_COMPLETED"}
        task["artifacts"] = [{"artifactId": "a", "parts": [{"data": {"ok": True}}]}]

    async def agent(body: dict[str, Any]) -> Any:
        if body["method"] == "SendMessage":
            sends.append(body["params"]["message"]["messageId"])
            task["history"].append(body["params"]["message"])
            task["status"] = {"state": "TASK_STATE_WORKING"}
            asyncio.get_running_loop().call_later(0.5, complete)
            await asyncio.sleep(1.0)
            return {"task": task}
        assert body["method"] == "GetTask"
        return task

    impatient = AgentCaller(session, CallSettings(call_timeout_s=0.2, poll_interval_s=0.05))
    first = make_task()
    answer = answer_to(first, AgentQuestion(text="?", task_id="t-7", context_id="c-7"))
    async with fake_agent(agent) as url:
        result = await impatient.call(answer, entry(url))
    assert result.status is ResultStatus.SUCCESS, result.error
    assert result.output == {"ok": True}
    assert sends == [message_id_for(answer.call_id)], "sent once"


async def test_an_answer_to_a_task_the_agent_does_not_know_is_a_clear_failure(
    start: StartAgent, caller: AgentCaller
) -> None:
    agent = await start()
    answer = answer_to(make_task(), AgentQuestion(text="?", task_id="no-such-task"))
    result = await caller.call(answer, entry(agent))
    assert result.error is not None
    assert result.error.kind == "jsonrpc_error"
    assert result.error.message == "cannot continue the agent's task no-such-task: code -32001: Task not found"
    assert not result.error.retriable
    assert result.turn == 1
    assert agent.stats.calls == 0, "nothing was sent"


async def test_a_waiting_task_is_cancelled_by_its_task_id_and_then_takes_no_answer(
    start: StartAgent, caller: AgentCaller
) -> None:
    agent = await start(ask=1)
    first = make_task()
    question = asked(await caller.call(first, entry(agent)))
    # No call is in progress: the correlation id alone names no task the bridge knows.
    assert await caller.cancel(first.correlation_id, entry(agent)) is False
    assert await caller.cancel(first.correlation_id, entry(agent), task_id=question.task_id) is True
    assert agent.stats.cancelled_task_ids == [first.correlation_id, question.task_id]

    result = await caller.call(answer_to(first, question), entry(agent))
    assert result.error is not None
    assert (result.error.kind, result.error.message) == ("agent_failed", "the agent reported the task canceled")
    assert agent.stats.continuations == {}, "a canceled task is not sent the answer"


async def test_cancel_reaches_the_task_an_answer_is_being_taken_up_by(start: StartAgent, caller: AgentCaller) -> None:
    agent = await start(ask=1, slow_s=10)
    first = make_task(deadline_s=20)
    answer = answer_to(first, asked(await caller.call(first, entry(agent))))
    call = asyncio.create_task(caller.call(answer, entry(agent)))
    for _ in range(200):
        if agent.stats.continuations:
            break
        await asyncio.sleep(0.01)
    assert await caller.cancel(first.correlation_id, entry(agent)) is True  # known from the reply
    result = await asyncio.wait_for(call, 5)
    assert result.error is not None
    assert result.error.kind == "agent_failed"
    assert result.turn == 1


async def test_auth_required_stays_a_failure(caller: AgentCaller) -> None:
    async def agent(body: dict[str, Any]) -> Any:
        return {"task": {"id": "t", "contextId": "c", "status": {"state": "TASK_STATE_AUTH_REQUIRED"}}}

    async with fake_agent(agent) as url:
        result = await caller.call(make_task(), entry(url))
    assert result.status is ResultStatus.FAILURE
    assert result.question is None
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("auth_required", False)


@pytest.mark.parametrize(
    ("task_id", "text", "where"),
    [("t" * 401, "which?", "task_id"), ("t", "lone \ud800 surrogate", "text")],  # the text from a JSON escape
)
async def test_a_question_that_cannot_be_carried_is_a_malformed_response(
    caller: AgentCaller, task_id: str, text: str, where: str
) -> None:
    async def agent(body: dict[str, Any]) -> Any:
        message = {"messageId": "q", "role": "ROLE_AGENT", "parts": [{"text": text}]}
        return {"task": {"id": task_id, "status": {"state": "TASK_STATE_INPUT_REQUIRED", "message": message}}}

    async with fake_agent(agent) as url:
        result = await caller.call(make_task(), entry(url))
    assert result.status is ResultStatus.FAILURE
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("malformed_response", False)
    assert result.error.message.startswith(f"the agent's question cannot be carried: {where}:")


async def test_a_long_question_is_clipped_to_what_a_question_carries(caller: AgentCaller) -> None:
    async def agent(body: dict[str, Any]) -> Any:
        message = {"messageId": "q", "role": "ROLE_AGENT", "parts": [{"text": "?" * 50_000}]}
        return {"task": {"id": "t", "status": {"state": "TASK_STATE_INPUT_REQUIRED", "message": message}}}

    async with fake_agent(agent) as url:
        question = asked(await caller.call(make_task(), entry(url)))
    assert len(question.text) == MAX_TEXT_CHARS
    assert question.context_id is None


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
