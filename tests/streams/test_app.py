"""The executor's Faust agents in isolation: ``agent.test_context()`` over a ``memory://`` table.

Every outbound send is a mock: the shell's topics (tasks, control, monitoring,
dead letters) are replaced on the :class:`~streams.shell.RunShell` instance,
the checkpointer and the timers too, and the ``send`` of the plans, results
and control topics (used to re-key a message) is replaced on each topic.

How the agents are driven (what ``test_context`` does and does not promise):

* ``test_context()`` feeds the agent from a fresh in-memory channel; the
  agent body and the app's ``runs`` table are the real ones.
* These agents never ``yield``. For such agents, ``put(wait=True)`` returns
  once the stream has *taken* the value, before the agent body has handled
  it. Since each agent has ``concurrency=1``, the agent takes the next value
  only after the body finished with the previous one. :meth:`Harness.settle`
  uses that: it puts a barrier (bytes that cannot be decoded), then waits for
  the barrier's own dead letter. After it, every earlier message has been
  fully handled and the agent is idle.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock, Mock

import pytest
from faust.stores.memory import Store as MemoryStore
from faust.types import AgentT
from yarl import URL

from models.messages import (
    AgentResult,
    AgentTask,
    ControlCommand,
    ControlMessage,
    DeadLetterRecord,
    MonitoringUpdate,
    ResultStatus,
    WorkflowSubmission,
    decode,
    encode,
    utcnow,
)
from models.plan import RetryPolicy
from models.run import RunState, RunStatus, StepStatus
from streams.app import ExecutorApp, create_app
from streams.run_store import read_state
from streams.timers import TimerKey
from switchyard import topics
from switchyard.settings import Settings
from tests.models.run_builders import current_step, execution_of, make_plan, success_for

RUN_ID = "run-1"
KEY = RUN_ID.encode()
BARRIER_PREFIX = b"barrier-"


def sender() -> Mock:
    """A stand-in for a topic: only ``send``, awaited."""
    return Mock(spec=["send"], send=AsyncMock(return_value=None))


def sends(mock: Any) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of every awaited ``send`` call."""
    return [(call.kwargs["key"], call.kwargs["value"]) for call in mock.await_args_list]


@dataclass
class Harness:
    app: ExecutorApp
    tasks: Mock
    control: Mock
    monitoring: Mock
    deadletter: Mock
    checkpoints: Mock
    timers: Mock
    resend: dict[str, AsyncMock]  # topic name -> that topic's patched ``send``
    cancels: Mock = field(default_factory=lambda: sender())
    barriers: int = 0

    def agent(self, name: str) -> AgentT[Any]:
        agent: AgentT[Any] = self.app.agents[name]
        return agent

    def state(self, run_id: str = RUN_ID) -> RunState:
        raw = self.app.runs[run_id.encode()]
        assert isinstance(raw, bytes)
        return read_state(self.app.runs, run_id, raw)

    def tasks_sent(self) -> list[tuple[bytes | None, AgentTask]]:
        return [(key, decode(AgentTask, value)) for key, value in sends(self.tasks.send)]

    def updates(self) -> list[MonitoringUpdate]:
        return [decode(MonitoringUpdate, value) for _, value in sends(self.monitoring.send)]

    def dead_letters(self) -> list[tuple[bytes | None, DeadLetterRecord]]:
        """Dead letters, without the barriers'."""
        return [
            (key, decode(DeadLetterRecord, value))
            for key, value in sends(self.deadletter.send)
            if not (key or b"").startswith(BARRIER_PREFIX)
        ]

    async def settle(self, agent: Any) -> None:
        """Return once everything put on ``agent`` so far has been handled (see the module doc)."""
        self.barriers += 1
        key = BARRIER_PREFIX + str(self.barriers).encode()
        await agent.put(key=key, value=b"\x00barrier")
        for _ in range(2000):
            if any(sent_key == key for sent_key, _ in sends(self.deadletter.send)):
                return
            await asyncio.sleep(0.001)
        raise AssertionError(f"the agent did not handle the barrier {key!r}")

    async def deliver(self, agent: Any, key: bytes | None, value: bytes) -> None:
        """Put one message on the agent and wait until it has been handled."""
        await agent.put(key=key, value=value)
        await self.settle(agent)


@pytest.fixture
async def harness(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Harness]:
    settings = Settings(
        broker_url="kafka://127.0.0.1:9",  # never contacted
        data_dir=tmp_path,
        database_url=None,
        topic_partitions=4,
        default_step_timeout_s=300.0,
        max_message_bytes=100_000,
    )
    app = create_app(settings)
    # create_app fixes store="rocksdb://"; the table's store is only built on
    # first use, so switching the setting now gives the table a memory store.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # faust's AlreadyConfiguredWarning
        app.conf.store = URL("memory://")
    assert isinstance(app.runs.data, MemoryStore)

    harness = Harness(
        app=app,
        tasks=sender(),
        control=sender(),
        monitoring=sender(),
        deadletter=sender(),
        checkpoints=Mock(spec=["put"]),
        timers=Mock(spec=["call_at", "cancel", "cancel_where"]),
        resend={},
    )
    for name in ("tasks", "control", "monitoring", "checkpoints", "timers"):
        monkeypatch.setattr(app.shell, name, getattr(harness, name))
    monkeypatch.setattr(app.shell.deadletters, "topic", harness.deadletter)
    monkeypatch.setattr(app.shell, "cancels", harness.cancels)
    monkeypatch.setattr(
        app.shell, "records", Mock(spec=["exists", "get_state", "record_rejected"], exists=Mock(return_value=None))
    )
    monkeypatch.setattr(app.shell, "registry", None)
    # test_context delivers every message on partition 0: make that where every key belongs.
    monkeypatch.setattr("streams.app.partition_of", lambda run_id, partitions: 0)
    for topic in (app.plans_topic, app.results_topic, app.control_topic):
        resend = AsyncMock(return_value=None)
        monkeypatch.setattr(topic, "send", resend)
        harness.resend[topic.get_topic_name()] = resend
    yield harness
    # Building an event for test_context reads the consumer's generation id,
    # which creates the consumer and its (never started) thread event loop.
    # Close that loop, or each test leaks one (a ResourceWarning under -W error).
    thread = getattr(app._consumer, "_thread", None)
    thread_loop = getattr(thread, "thread_loop", None)
    if thread_loop is not None and not thread_loop.is_running():
        thread_loop.close()


def submission(run_id: str = RUN_ID, **plan: Any) -> WorkflowSubmission:
    return WorkflowSubmission(run_id=run_id, plan=make_plan(2, **plan), input={"text": "hello"})


async def start_run(h: Harness, run_id: str = RUN_ID, **plan: Any) -> AgentTask:
    """Submit a run through the plans agent; return the task it sent."""
    async with h.agent("plans").test_context() as agent:
        await h.deliver(agent, run_id.encode(), encode(submission(run_id, **plan)))
    keyed = [task for key, task in h.tasks_sent() if key == run_id.encode()]
    assert len(keyed) == 1
    return keyed[0]


# ---------------------------------------------------------------------- plans


def test_the_three_agents_exist_with_concurrency_one(harness: Harness) -> None:
    agents = harness.app.agents
    assert {"plans", "results", "control"} <= set(agents)
    for name, topic in (("plans", topics.PLANS), ("results", topics.RESULTS), ("control", topics.CONTROL)):
        agent = agents[name]
        assert agent.concurrency == 1
        assert agent.channel.get_topic_name() == topic


async def test_submission_on_plans_sends_one_task_keyed_by_run_id(harness: Harness) -> None:
    h = harness
    async with h.agent("plans").test_context() as agent:
        await h.deliver(agent, KEY, encode(submission()))

    assert len(h.tasks.send.await_args_list) == 1
    ((key, task),) = h.tasks_sent()
    assert key == KEY
    assert (task.run_id, task.step_id, task.attempt) == (RUN_ID, "s1", 1)
    assert task.correlation_id == f"{RUN_ID}/s1/1"
    assert task.input == {"text": "hello"}
    state = h.state()
    assert state.status is RunStatus.RUNNING
    assert current_step(state) == "s1"
    assert h.dead_letters() == []
    h.checkpoints.put.assert_called_once_with(state, None)  # a new run: all of it
    timer_keys = [call.args[1] for call in h.timers.call_at.call_args_list]
    assert timer_keys == [TimerKey("timeout", RUN_ID, f"{RUN_ID}/s1/1")]
    assert [u.status for u in h.updates()] == ["RUNNING", "RUNNING"]
    assert all(key == KEY for key, _ in sends(h.monitoring.send))
    assert all(not mock.await_args_list for mock in h.resend.values())


async def test_same_submission_twice_dispatches_once(harness: Harness) -> None:
    h = harness
    raw = encode(submission())
    async with h.agent("plans").test_context() as agent:
        await h.deliver(agent, KEY, raw)
        await h.deliver(agent, KEY, raw)

    assert len(h.tasks_sent()) == 1
    assert h.state().version == 1
    assert h.dead_letters() == []


async def test_malformed_bytes_are_dead_lettered_and_the_agent_keeps_going(harness: Harness) -> None:
    h = harness
    junk = b"\xff\xfe{not json"
    async with h.agent("plans").test_context() as agent:
        await h.deliver(agent, b"junk-1", junk)
        ((key, record),) = h.dead_letters()
        assert h.tasks_sent() == []

        await h.deliver(agent, KEY, encode(submission()))

    assert key == b"junk-1"
    assert record.source_topic == topics.PLANS
    assert record.key == "junk-1"
    # The reason is the decode error itself, not an "internal error".
    assert record.reason.startswith("cannot decode WorkflowSubmission: not UTF-8 text")
    assert record.payload_base64 is not None
    assert record.app == "switchyard-executor"
    # The next message is processed as usual.
    assert [key for key, _ in h.tasks_sent()] == [KEY]
    assert h.state().run_id == RUN_ID
    assert b"junk-1" not in h.app.runs.data


async def test_invalid_shape_is_dead_lettered_with_the_json_path(harness: Harness) -> None:
    h = harness
    async with h.agent("plans").test_context() as agent:
        await h.deliver(agent, KEY, b'{"run_id": "run-1", "plan": {"steps": 3}}')

    ((_, record),) = h.dead_letters()
    assert record.reason.startswith("cannot decode WorkflowSubmission: ")
    assert "$.plan" in record.reason
    assert record.payload == '{"run_id": "run-1", "plan": {"steps": 3}}'
    assert h.tasks_sent() == []


async def test_oversized_message_is_dead_lettered(harness: Harness) -> None:
    h = harness
    big = submission().model_copy(update={"input": {"text": "x" * 200_000}})
    async with h.agent("plans").test_context() as agent:
        await h.deliver(agent, KEY, encode(big))

    ((_, record),) = h.dead_letters()
    assert record.reason.startswith("cannot decode WorkflowSubmission: payload of ")
    assert "over the limit of 100000" in record.reason
    assert h.tasks_sent() == []


async def test_a_failing_dispatch_still_arms_its_deadline_and_the_agent_survives(harness: Harness) -> None:
    # The run is stored before its effects run: a dispatch the broker refused is
    # healed by the attempt's deadline (a timeout, then a retry), not dead-lettered.
    h = harness
    h.tasks.send.side_effect = [RuntimeError("broker went away"), None]
    async with h.agent("plans").test_context() as agent:
        await h.deliver(agent, KEY, encode(submission()))
        await h.deliver(agent, b"run-2", encode(submission("run-2")))

    assert h.dead_letters() == []
    assert h.app.shell.effect_failures == 1
    timer_keys = [call.args[1] for call in h.timers.call_at.call_args_list]
    assert TimerKey("timeout", RUN_ID, f"{RUN_ID}/s1/1") in timer_keys
    assert h.checkpoints.put.call_count == 2
    assert [task.run_id for _, task in h.tasks_sent()] == [RUN_ID, "run-2"]
    assert h.state(RUN_ID).status is RunStatus.RUNNING
    assert h.state("run-2").status is RunStatus.RUNNING


@pytest.mark.parametrize(
    ("agent_name", "topic_name"),
    [("plans", topics.PLANS), ("results", topics.RESULTS), ("control", topics.CONTROL)],
)
async def test_keyless_message_is_resent_keyed_by_its_run_id(
    harness: Harness, agent_name: str, topic_name: str
) -> None:
    h = harness
    value = {
        "plans": encode(submission()),
        "results": encode(
            AgentResult(
                correlation_id=f"{RUN_ID}/s1/1",
                run_id=RUN_ID,
                step_id="s1",
                attempt=1,
                status=ResultStatus.SUCCESS,
                output={},
                started_at=utcnow(),
                finished_at=utcnow(),
            )
        ),
        "control": encode(ControlMessage(run_id=RUN_ID, command=ControlCommand.CANCEL)),
    }[agent_name]
    async with h.agent(agent_name).test_context() as agent:
        await h.deliver(agent, None, value)

    h.resend[topic_name].assert_awaited_once_with(key=KEY, value=value)
    for other, mock in h.resend.items():
        if other != topic_name:
            mock.assert_not_awaited()
    assert KEY not in h.app.runs.data  # not applied here: the keyed copy will be
    assert h.tasks_sent() == []
    assert h.updates() == []
    assert h.dead_letters() == []


async def test_message_keyed_by_something_else_is_resent_keyed_by_its_run_id(harness: Harness) -> None:
    h = harness
    value = encode(submission())
    async with h.agent("plans").test_context() as agent:
        await h.deliver(agent, b"wrong-key", value)

    h.resend[topics.PLANS].assert_awaited_once_with(key=KEY, value=value)
    assert KEY not in h.app.runs.data
    assert h.tasks_sent() == []


async def test_keyless_malformed_message_is_dead_lettered_without_a_key(harness: Harness) -> None:
    h = harness
    async with h.agent("plans").test_context() as agent:
        await h.deliver(agent, None, b"[1, 2]")

    ((key, record),) = h.dead_letters()
    assert key == b""
    assert record.key is None
    assert record.reason == "cannot decode WorkflowSubmission: expected a JSON object, got list"
    h.resend[topics.PLANS].assert_not_awaited()


# -------------------------------------------------------------------- results


async def test_result_advances_the_run(harness: Harness) -> None:
    h = harness
    first = await start_run(h)

    async with h.agent("results").test_context() as agent:
        await h.deliver(agent, KEY, encode(success_for(first)))

    state = h.state()
    assert state.version == 2
    assert state.steps["s1"].status is StepStatus.COMPLETED
    assert state.output_of("s1") == {"summary": "out-s1"}
    assert current_step(state) == "s2"
    sent = h.tasks_sent()
    assert [(key, task.correlation_id) for key, task in sent] == [(KEY, f"{RUN_ID}/s1/1"), (KEY, f"{RUN_ID}/s2/1")]
    assert sent[1][1].input == {"previous": "out-s1", "topic": "hello"}
    assert h.checkpoints.put.call_args.args == (state, frozenset({"s1@1", "s2@1"}))  # what this result touched
    assert h.dead_letters() == []


async def test_duplicate_result_is_ignored(harness: Harness) -> None:
    h = harness
    first = await start_run(h)
    raw = encode(success_for(first))

    async with h.agent("results").test_context() as agent:
        await h.deliver(agent, KEY, raw)
        sends_before = len(h.tasks_sent()), len(h.updates()), h.checkpoints.put.call_count
        await h.deliver(agent, KEY, raw)

    assert (len(h.tasks_sent()), len(h.updates()), h.checkpoints.put.call_count) == sends_before
    assert h.state().version == 2
    assert h.dead_letters() == []


async def test_result_for_an_unknown_run_is_dead_lettered(harness: Harness) -> None:
    h = harness
    stray = AgentResult(
        correlation_id="ghost/s1/1",
        run_id="ghost",
        step_id="s1",
        attempt=1,
        status=ResultStatus.SUCCESS,
        output={},
        started_at=utcnow(),
        finished_at=utcnow(),
    )
    async with h.agent("results").test_context() as agent:
        await h.deliver(agent, b"ghost", encode(stray))

    ((key, record),) = h.dead_letters()
    assert key == b"ghost"
    assert "ghost" in record.reason
    assert b"ghost" not in h.app.runs.data
    assert h.tasks_sent() == []


async def test_result_agent_dead_letters_a_plan_sent_to_it(harness: Harness) -> None:
    h = harness
    async with h.agent("results").test_context() as agent:
        await h.deliver(agent, KEY, encode(submission()))

    ((_, record),) = h.dead_letters()
    assert record.source_topic == topics.RESULTS
    assert record.reason.startswith("cannot decode AgentResult: ")


# -------------------------------------------------------------------- control


async def test_cancel_cancels_the_run(harness: Harness) -> None:
    h = harness
    await start_run(h)
    cancel = ControlMessage(run_id=RUN_ID, command=ControlCommand.CANCEL, reason="operator said so")

    async with h.agent("control").test_context() as agent:
        await h.deliver(agent, KEY, encode(cancel))

    state = h.state()
    assert state.status is RunStatus.CANCELLED
    assert state.error is not None
    assert state.error.message == "operator said so"
    assert state.steps["s1"].status is StepStatus.CANCELLED
    assert len(h.tasks_sent()) == 1  # only the first dispatch
    assert h.updates()[-1].status == "CANCELLED"
    assert h.checkpoints.put.call_args.args[0] == state
    assert h.dead_letters() == []


async def test_result_after_cancel_is_ignored(harness: Harness) -> None:
    h = harness
    first = await start_run(h)
    async with h.agent("control").test_context() as agent:
        await h.deliver(agent, KEY, encode(ControlMessage(run_id=RUN_ID, command=ControlCommand.CANCEL)))
    version = h.state().version

    async with h.agent("results").test_context() as agent:
        await h.deliver(agent, KEY, encode(success_for(first)))

    assert h.state().version == version
    assert h.state().status is RunStatus.CANCELLED
    assert len(h.tasks_sent()) == 1


async def test_step_timeout_fails_the_attempt_and_schedules_a_retry(harness: Harness) -> None:
    h = harness
    retry = RetryPolicy(max_attempts=2, initial_delay_s=60.0, jitter=0.0)
    await start_run(h, timeout_s=0.001, retry=retry)  # the deadline has passed by the time the timeout arrives
    await asyncio.sleep(0.01)
    timeout = ControlMessage(run_id=RUN_ID, command=ControlCommand.STEP_TIMEOUT, step_id="s1", attempt=1)

    async with h.agent("control").test_context() as agent:
        await h.deliver(agent, KEY, encode(timeout))

    step = execution_of(h.state(), "s1")
    assert [a.status for a in step.attempts] == [StepStatus.FAILED, StepStatus.PENDING]
    assert step.attempts[0].error is not None
    assert step.attempts[0].error.kind == "timeout"
    timer_keys = [call.args[1] for call in h.timers.call_at.call_args_list]
    assert TimerKey("dispatch", RUN_ID, f"{RUN_ID}/s1/2") in timer_keys
    assert len(h.tasks_sent()) == 1  # the retry waits for its timer


async def test_retry_request_on_a_running_run_changes_nothing(harness: Harness) -> None:
    h = harness
    await start_run(h)
    async with h.agent("control").test_context() as agent:
        await h.deliver(agent, KEY, encode(ControlMessage(run_id=RUN_ID, command=ControlCommand.RETRY)))

    assert h.state().version == 1
    assert len(h.tasks_sent()) == 1
    assert h.dead_letters() == []
