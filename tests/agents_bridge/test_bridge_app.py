"""The bridge calls the agent once per attempt and turn; repeats in flight share one published result."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.types import TP, ConsumerMessage

from agents_bridge.app import Bridge, BridgeApp, Taken, create_app, take_apart
from agents_bridge.intake import Intake
from agents_bridge.slots import SentAway
from models.agents import AgentEntry
from models.messages import (
    AgentCancel,
    AgentQuestion,
    AgentResult,
    AgentTask,
    MonitoringUpdate,
    Reply,
    ResultStatus,
    decode,
    encode,
    utcnow,
)
from switchyard.settings import Settings
from tests.models.run_builders import success_for


def _task(turn: int = 0) -> AgentTask:
    return AgentTask(
        correlation_id="run-1/s1/1",
        run_id="run-1",
        step_id="s1",
        attempt=1,
        agent_name="a",
        input={},
        deadline=utcnow() + timedelta(seconds=30),
        turn=turn,
        reply=Reply(task_id="t-1", context_id="c-1", text=f"answer {turn}") if turn else None,
    )


def _asking(task: AgentTask) -> AgentResult:
    """The agent's question in answer to ``task``."""
    now = utcnow()
    return AgentResult(
        correlation_id=task.correlation_id,
        run_id=task.run_id,
        step_id=task.step_id,
        attempt=task.attempt,
        status=ResultStatus.INPUT_REQUIRED,
        question=AgentQuestion(text="which year?", task_id="t-1", context_id="c-1"),
        turn=task.turn,
        started_at=now,
        finished_at=now,
    )


@pytest.fixture
def bridge(tmp_path: Path) -> Bridge:
    return Bridge(Settings(data_dir=tmp_path, registry_url="http://127.0.0.1:9"))


@dataclass
class GatedAgent:
    """Stands in for the agent call: counts calls, answers when the gate opens, records publishes."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    calls: list[str] = field(default_factory=list)
    published: list[AgentResult] = field(default_factory=list)

    async def execute(self, task: AgentTask, started: Callable[[], None]) -> AgentResult:
        started()
        self.calls.append(task.call_id)
        await self.gate.wait()
        return (
            _asking(task) if task.turn == 0 else success_for(task, {"ok": True}).model_copy(update={"turn": task.turn})
        )

    async def publish(self, task: AgentTask, result: AgentResult) -> None:
        self.published.append(result)


@pytest.fixture
def agent(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> GatedAgent:
    gated = GatedAgent()
    monkeypatch.setattr(bridge, "_execute", gated.execute)
    bridge.publish = gated.publish
    return gated


async def test_a_repeat_in_flight_shares_the_call_and_a_late_repeat_is_answered_again(
    bridge: Bridge, agent: GatedAgent
) -> None:
    first = asyncio.create_task(bridge.execute(_task()))
    second = asyncio.create_task(bridge.execute(_task()))  # redelivered while in flight
    await asyncio.sleep(0.01)
    agent.gate.set()
    results = await asyncio.gather(first, second)
    third = await bridge.execute(_task())  # redelivered after the call finished
    assert agent.calls == ["run-1/s1/1"], "one agent call"
    assert results[0] == results[1] == third
    # Published once for the two deliveries in flight, and again for the late
    # repeat: the executor asking again may have lost the first result.
    assert agent.published == [results[0], results[0]]


async def test_an_answer_is_a_call_of_its_own_and_its_repeat_is_remembered(bridge: Bridge, agent: GatedAgent) -> None:
    agent.gate.set()
    question = await bridge.execute(_task())
    answered = await bridge.execute(_task(turn=1))  # the same correlation id, the next turn
    again = await bridge.execute(_task(turn=1))  # that answer delivered again
    assert agent.calls == ["run-1/s1/1", "run-1/s1/1#1"], "one call per turn"
    assert question is not None
    assert answered is not None
    assert (question.status, question.turn) == (ResultStatus.INPUT_REQUIRED, 0)
    assert (answered.status, answered.turn) == (ResultStatus.SUCCESS, 1)
    assert again == answered
    assert bridge.memory.remembered == 1
    assert await bridge.execute(_task()) == question, "turn 0 is remembered apart"


async def test_a_repeat_from_another_message_returns_at_once_and_the_same_message_waits(
    bridge: Bridge, agent: GatedAgent
) -> None:
    # After an executor restart every attempt in flight arrives twice: the
    # re-dispatch must not hold a call slot while the first call runs. The
    # first message delivered again (a rebalance) must wait, so that it stays
    # unacknowledged until the call ends.
    first = asyncio.create_task(bridge.execute(_task(), delivery=(0, 5)))
    await asyncio.sleep(0.01)

    assert await asyncio.wait_for(bridge.execute(_task(), delivery=(0, 9)), timeout=1) is None
    same_again = asyncio.create_task(bridge.execute(_task(), delivery=(0, 5)))
    await asyncio.sleep(0.01)
    assert not first.done(), "the message that started the call waits for it"
    assert not same_again.done(), "so does that message delivered again"
    assert agent.published == []

    agent.gate.set()
    result, again = await asyncio.gather(first, same_again)
    assert agent.calls == ["run-1/s1/1"], "one agent call"
    assert again == result
    assert agent.published == [result], "published once, by the call"
    assert bridge.memory.joined == 2


# ------------------------------------------------- slots: per-agent limits


def _task_for(agent: str, n: int, *, within_s: float = 30) -> AgentTask:
    return AgentTask(
        correlation_id=f"run-{agent}-{n}/s1/1",
        run_id=f"run-{agent}-{n}",
        step_id="s1",
        attempt=1,
        agent_name=agent,
        input={},
        deadline=utcnow() + timedelta(seconds=within_s),
    )


@dataclass
class Registry:
    entries: dict[str, AgentEntry]

    async def get(self, name: str) -> AgentEntry | None:
        return self.entries.get(name)


@dataclass
class Caller:
    """Stands in for AgentCaller: each call waits for its gate; records which calls are running, and cancels."""

    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    called: list[str] = field(default_factory=list)
    cancelled: list[tuple[str, str, str | None]] = field(default_factory=list)

    async def cancel(self, key: str, agent: AgentEntry, *, task_id: str | None = None) -> bool:
        self.cancelled.append((key, agent.name, task_id))
        return True

    async def call(self, task: AgentTask, agent: AgentEntry) -> AgentResult:
        self.called.append(task.correlation_id)
        self.running.add(task.correlation_id)
        try:
            await self.gates.setdefault(task.correlation_id, asyncio.Event()).wait()
        finally:
            self.running.discard(task.correlation_id)
        return success_for(task, {"ok": True})

    def open(self, task: AgentTask) -> None:
        self.gates.setdefault(task.correlation_id, asyncio.Event()).set()


@pytest.fixture
def limited(tmp_path: Path) -> tuple[Bridge, Caller]:
    bridge = Bridge(Settings(data_dir=tmp_path, registry_url="http://127.0.0.1:9", bridge_concurrency=4))
    caller = Caller()
    bridge._registry = Registry(
        {
            "slow": AgentEntry(name="slow", url="http://127.0.0.1:9/", max_concurrency=2),
            "fast": AgentEntry(name="fast", url="http://127.0.0.1:9/"),
        }
    )
    bridge._caller = caller  # type: ignore[assignment]
    return bridge, caller


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_calls_beyond_an_agents_max_concurrency_wait_and_other_agents_go_through(
    limited: tuple[Bridge, Caller],
) -> None:
    bridge, caller = limited
    started: list[str] = []
    slow = [_task_for("slow", n) for n in range(6)]
    fast = [_task_for("fast", n) for n in range(2)]

    def starts(task: AgentTask) -> Callable[[], None]:
        return lambda: started.append(task.correlation_id)

    runs = [asyncio.create_task(bridge.execute(task, started=starts(task))) for task in slow + fast]
    await settle()
    assert caller.running == {t.correlation_id for t in slow[:2] + fast}, "2 slow calls (its limit) and the fast ones"
    assert started == [t.correlation_id for t in slow[:2] + fast]
    assert (bridge.slots.in_flight, bridge.slots.waiting) == (4, 4)
    for task in fast:
        caller.open(task)
    await settle()
    assert caller.running == {t.correlation_id for t in slow[:2]}, "the freed worker slots stay free: slow is at 2"
    caller.open(slow[0])
    await settle()
    assert caller.running == {slow[1].correlation_id, slow[2].correlation_id}, "the next slow call, in order"
    for task in slow:
        caller.open(task)
    await asyncio.gather(*runs)
    assert caller.called == [t.correlation_id for t in slow[:2] + fast + slow[2:]]


async def test_a_call_waiting_past_its_deadline_fails_as_a_timeout_without_calling_the_agent(
    limited: tuple[Bridge, Caller],
) -> None:
    bridge, caller = limited
    busy = [asyncio.create_task(bridge.execute(_task_for("slow", n))) for n in range(2)]
    await settle()
    late = _task_for("slow", 9, within_s=0.05)
    result = await bridge.execute(late)
    assert result is not None
    assert result.error is not None
    assert result.error.kind == "timeout"
    assert result.error.retriable
    assert "waited for a free slot" in result.error.message
    assert "max_concurrency 2" in result.error.message
    assert late.correlation_id not in caller.called
    for n in range(2):
        caller.open(_task_for("slow", n))
    await asyncio.gather(*busy)


async def test_calls_sent_away_are_not_made_nor_remembered(limited: tuple[Bridge, Caller]) -> None:
    bridge, caller = limited
    in_flight = [asyncio.create_task(bridge.execute(_task_for("slow", n))) for n in range(2)]
    waiting = _task_for("slow", 2)
    sent = asyncio.create_task(bridge.execute(waiting, delivery=(0, 7)))
    again = asyncio.create_task(bridge.execute(waiting, delivery=(0, 7)))  # the same message again joins it
    await settle()
    assert bridge.slots.send_away() == 1
    for run in (sent, again):
        with pytest.raises(SentAway):
            await run
    assert caller.running == {f"run-slow-{n}/s1/1" for n in range(2)}, "calls in flight go on"
    for n in range(2):
        caller.open(_task_for("slow", n))
    await asyncio.gather(*in_flight)
    with pytest.raises(SentAway):
        await bridge.execute(waiting)  # delivered again before the partitions are assigned
    bridge.slots.reopen()
    caller.open(waiting)
    assert await bridge.execute(waiting) is not None, "delivered again later, it is called"
    assert caller.called.count(waiting.correlation_id) == 1


def _cancel(agent: str, task_id: str | None) -> AgentCancel:
    return AgentCancel(
        correlation_id="run-1/s1/1", run_id="run-1", step_id="s1", attempt=1, agent_name=agent, task_id=task_id
    )


async def test_a_cancel_names_the_agents_task_when_the_executor_knows_it(limited: tuple[Bridge, Caller]) -> None:
    bridge, caller = limited
    assert await bridge.cancel(_cancel("slow", "t-9")) is True  # an attempt waiting for an answer
    assert await bridge.cancel(_cancel("fast", None)) is True  # a call in progress: looked up by correlation id
    assert await bridge.cancel(_cancel("nobody", "t-9")) is False  # not in the registry
    assert caller.cancelled == [("run-1/s1/1", "slow", "t-9"), ("run-1/s1/1", "fast", None)]
    assert bridge.cancels == 2


async def test_the_bridges_own_failures_keep_the_turn(limited: tuple[Bridge, Caller]) -> None:
    bridge, caller = limited
    unknown = _task(turn=2)  # agent "a" is not in the registry
    result = await bridge.execute(unknown)
    assert result is not None
    assert result.error is not None
    assert (result.error.kind, result.turn) == ("unknown_agent", 2)
    # Another call (same call id: the memory would answer with the result above).
    late = AgentTask.model_validate(
        unknown.model_dump()
        | {"correlation_id": "run-1/s1/2", "attempt": 2, "agent_name": "fast", "deadline": utcnow()}
    )
    result = await bridge.execute(late)
    assert result is not None
    assert result.error is not None
    assert (result.error.kind, result.turn) == ("timeout", 2)
    assert caller.called == []


# ------------------------------------------------------- the Faust app


@pytest.fixture
def bridge_app(tmp_path: Path) -> BridgeApp:
    return create_app(Settings(data_dir=tmp_path, registry_url="http://127.0.0.1:9", broker_url="kafka://127.0.0.1:9"))


async def test_a_rebalance_sends_every_call_away_until_the_partitions_are_assigned(bridge_app: BridgeApp) -> None:
    app = bridge_app
    released: list[Taken] = []
    acknowledged: list[Taken] = []

    async def acknowledge(taken: Taken) -> None:
        acknowledged.append(taken)

    app.intake = Intake(acknowledge=acknowledge, release=released.append, max_waiting=10)
    tasks = [Taken(object(), _message(b"", offset)) for offset in range(3)]  # type: ignore[arg-type]

    async def sent_away(started: Callable[[], None]) -> bool:
        return False

    async def carried_out(started: Callable[[], None]) -> bool:
        return True

    assert app.loop is asyncio.get_running_loop()
    # aiokafka calls it from the consumer's thread; the slots belong to the app's loop.
    thread = threading.Thread(target=app.on_rebalance_start)
    thread.start()
    thread.join()
    await settle()
    with pytest.raises(SentAway, match="reassigned"):
        async with app.bridge.slots.hold("a", None, within_s=1):
            pytest.fail("free slots, but the partitions are being reassigned")
    await app.intake.take(tasks[0], "p", sent_away)
    await settle()
    await app.intake.take(tasks[1], "p", carried_out)  # taken before Faust stopped the flow: let go at once
    assert released == tasks[:2]

    await app.on_partitions_assigned.send({TP("switchyard.tasks", 0)})
    async with app.bridge.slots.hold("a", None, within_s=1):
        assert app.bridge.slots.in_flight == 1
    await app.intake.take(tasks[2], "p", carried_out)
    await settle()
    assert (released, acknowledged) == (tasks[:2], tasks[2:])


def _message(value: bytes, offset: int = 7) -> ConsumerMessage:
    return ConsumerMessage("switchyard.tasks", 3, offset, 0.0, 0, [], b"run-1", value, None)


async def test_a_task_waiting_for_its_acknowledgement_keeps_its_message_not_its_bytes(bridge_app: BridgeApp) -> None:
    value = encode(_task()) + b" " * 500_000
    message = _message(value)
    event = faust.Event(bridge_app, b"run-1", value, None, message)
    acked: list[Any] = []

    class Stream:
        app = bridge_app

        async def ack(self, event: Any) -> bool:
            acked.append(event.message)
            return True

    stream: Any = Stream()
    taken, key, got = take_apart(stream, event)
    assert (key, got) == (b"run-1", value), "the handler gets the task's bytes"
    assert taken == Taken(stream, message)
    assert message.value is None, "Faust decoded the event: the message no longer holds the bytes"
    assert not any(ref is value for ref in gc.get_referents(message)), "nor does anything the ticket keeps"
    await taken.acknowledge()
    assert acked == [message], "acknowledged through its stream, by its message"


async def test_a_question_is_published_with_its_monitoring_status(
    bridge_app: BridgeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: dict[str, list[bytes]] = {"results": [], "monitoring": []}

    def recorder(name: str) -> Callable[..., Any]:
        async def send(*, key: bytes, value: bytes) -> None:
            sent[name].append(value)

        return send

    monkeypatch.setattr(bridge_app.results_topic, "send", recorder("results"))
    monkeypatch.setattr(bridge_app.monitoring_topic, "send", recorder("monitoring"))
    task = _task()
    result = _asking(task)
    assert bridge_app.bridge.publish is not None
    await bridge_app.bridge.publish(task, result)
    assert [decode(AgentResult, value) for value in sent["results"]] == [result]
    [update] = [decode(MonitoringUpdate, value) for value in sent["monitoring"]]
    assert update.status == "AGENT_INPUT_REQUIRED"
    assert (update.run_id, update.step_id, update.attempt) == ("run-1", "s1", 1)
