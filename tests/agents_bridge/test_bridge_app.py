"""The bridge calls the agent once per attempt; repeats in flight share one published result."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from agents_bridge.app import Bridge
from models.messages import AgentResult, AgentTask, ResultStatus, utcnow
from switchyard.settings import Settings


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


async def test_a_repeat_in_flight_shares_the_call_and_a_late_repeat_is_answered_again(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = asyncio.Event()
    calls: list[str] = []
    published: list[AgentResult] = []

    async def execute(task: AgentTask) -> AgentResult:
        calls.append(task.correlation_id)
        await gate.wait()
        now = utcnow()
        return AgentResult(
            correlation_id=task.correlation_id,
            run_id=task.run_id,
            step_id=task.step_id,
            attempt=task.attempt,
            status=ResultStatus.SUCCESS,
            output={"ok": True},
            started_at=now,
            finished_at=now,
        )

    async def publish(task: AgentTask, result: AgentResult) -> None:
        published.append(result)

    monkeypatch.setattr(bridge, "_execute", execute)
    bridge.publish = publish
    first = asyncio.create_task(bridge.execute(_task()))
    second = asyncio.create_task(bridge.execute(_task()))  # redelivered while in flight
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(first, second)
    third = await bridge.execute(_task())  # redelivered after the call finished
    assert calls == ["run-1/s1/1"], "one agent call"
    assert results[0] == results[1] == third
    # Published once for the two deliveries in flight, and again for the late
    # repeat: the executor asking again may have lost the first result.
    assert published == [results[0], results[0]]
