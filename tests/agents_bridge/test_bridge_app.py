"""The bridge calls the agent once per attempt; repeats in flight share one published result."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest

from agents_bridge.app import Bridge
from models.messages import AgentResult, AgentTask, utcnow
from switchyard.settings import Settings
from tests.models.run_builders import success_for


def _task() -> AgentTask:
    return AgentTask(
        correlation_id="run-1/s1/1",
        run_id="run-1",
        step_id="s1",
        attempt=1,
        agent_name="a",
        input={},
        deadline=utcnow() + timedelta(seconds=30),
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

    async def execute(self, task: AgentTask) -> AgentResult:
        self.calls.append(task.correlation_id)
        await self.gate.wait()
        return success_for(task, {"ok": True})

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
