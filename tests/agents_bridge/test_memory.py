"""CallMemory: one agent call per correlation id, however often the task is delivered."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from agents_bridge.memory import CallMemory
from models.messages import AgentError, AgentResult, ResultStatus, correlation_id

pytestmark = pytest.mark.timeout(30)

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def _result(cid: str, output: str = "done") -> AgentResult:
    run_id, step_id, attempt = cid.split("/")
    return AgentResult(
        correlation_id=cid,
        run_id=run_id,
        step_id=step_id,
        attempt=int(attempt),
        status=ResultStatus.SUCCESS,
        output={"text": output},
        started_at=T0,
        finished_at=T0,
    )


def _failure(cid: str) -> AgentResult:
    run_id, step_id, attempt = cid.split("/")
    return AgentResult(
        correlation_id=cid,
        run_id=run_id,
        step_id=step_id,
        attempt=int(attempt),
        status=ResultStatus.FAILURE,
        error=AgentError(kind="http_status", message="503 from agent", retriable=True),
        started_at=T0,
        finished_at=T0,
    )


CID = correlation_id("run-1", "research", 1)


class Agent:
    """Counts calls per correlation id; each call waits for ``gate`` (open by default)."""

    def __init__(self, *, gated: bool = False) -> None:
        self.calls: Counter[str] = Counter()
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.started = asyncio.Event()
        self.finished = 0
        self.cancelled = 0
        self.fail_with: BaseException | None = None

    def call(self, cid: str, output: str = "done") -> Callable[[], Awaitable[AgentResult]]:
        async def _call() -> AgentResult:
            self.calls[cid] += 1
            self.started.set()
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            if self.fail_with is not None:
                raise self.fail_with
            self.finished += 1
            return _result(cid, output)

        return _call


async def _until(condition: Callable[[], bool], within_s: float = 2.0) -> None:
    """Let the loop run until ``condition`` holds (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


async def test_one_call_then_remembered() -> None:
    memory = CallMemory()
    agent = Agent()
    first = await memory.run(CID, agent.call(CID, "first"))
    again = await memory.run(CID, agent.call(CID, "second"))  # a redelivered task
    assert agent.calls[CID] == 1
    assert again == first
    assert again.output == {"text": "first"}
    assert memory.remembered == 1
    assert memory.joined == 0
    assert memory.in_flight == 0


async def test_different_correlation_ids_are_separate_calls() -> None:
    memory = CallMemory()
    agent = Agent()
    other = correlation_id("run-1", "research", 2)  # the next attempt is a new call
    a = await memory.run(CID, agent.call(CID))
    b = await memory.run(other, agent.call(other))
    assert agent.calls == Counter({CID: 1, other: 1})
    assert a.correlation_id == CID
    assert b.correlation_id == other
    assert memory.remembered == 0


async def test_a_failure_result_is_remembered_like_any_result() -> None:
    # A FAILURE result is an answer (the agent said no); only an exception means "no answer".
    memory = CallMemory()
    calls = 0

    async def failing() -> AgentResult:
        nonlocal calls
        calls += 1
        return _failure(CID)

    assert (await memory.run(CID, failing)).status is ResultStatus.FAILURE
    assert (await memory.run(CID, failing)).status is ResultStatus.FAILURE
    assert calls == 1


async def test_concurrent_repeats_join_the_call_in_flight() -> None:
    memory = CallMemory()
    agent = Agent(gated=True)
    tasks = [asyncio.create_task(memory.run(CID, agent.call(CID, f"call-{i}"))) for i in range(5)]
    await _until(lambda: memory.joined == 4)
    assert memory.in_flight == 1
    assert agent.calls[CID] == 1
    assert not any(t.done() for t in tasks)

    agent.gate.set()
    results = await asyncio.gather(*tasks)
    assert agent.calls[CID] == 1
    assert all(r == results[0] for r in results)
    assert results[0].output == {"text": "call-0"}  # the first delivery's call
    assert memory.in_flight == 0
    # And a later repeat gets the remembered result.
    assert await memory.run(CID, agent.call(CID, "late")) == results[0]
    assert memory.remembered == 1
    assert agent.calls[CID] == 1


async def test_in_flight_counts_distinct_calls() -> None:
    memory = CallMemory()
    agent = Agent(gated=True)
    cids = [correlation_id("run-1", f"s{i}", 1) for i in range(3)]
    tasks = [asyncio.create_task(memory.run(c, agent.call(c))) for c in cids + cids]
    await _until(lambda: memory.in_flight == 3 and memory.joined == 3)
    agent.gate.set()
    await asyncio.gather(*tasks)
    assert agent.calls == Counter(dict.fromkeys(cids, 1))
    assert memory.in_flight == 0


async def test_capacity_evicts_the_oldest() -> None:
    memory = CallMemory(capacity=2)
    agent = Agent()
    a, b, c = (correlation_id("run-1", s, 1) for s in ("a", "b", "c"))
    for cid in (a, b, c):
        await memory.run(cid, agent.call(cid))
    assert agent.calls == Counter({a: 1, b: 1, c: 1})

    await memory.run(c, agent.call(c))  # still remembered
    await memory.run(b, agent.call(b))  # still remembered
    assert memory.remembered == 2
    await memory.run(a, agent.call(a))  # forgotten: called again
    assert agent.calls == Counter({a: 2, b: 1, c: 1})


async def test_capacity_bounds_the_memory() -> None:
    memory = CallMemory(capacity=10)
    agent = Agent()
    cids = [correlation_id("run-1", f"s{i}", 1) for i in range(100)]
    for cid in cids:
        await memory.run(cid, agent.call(cid))
    for cid in cids[-10:]:  # the newest ten are remembered
        await memory.run(cid, agent.call(cid))
    assert memory.remembered == 10
    assert sum(agent.calls.values()) == 100
    await memory.run(cids[0], agent.call(cids[0]))
    assert agent.calls[cids[0]] == 2


async def test_a_failed_call_is_not_remembered_and_reaches_every_joiner() -> None:
    memory = CallMemory()
    agent = Agent(gated=True)
    agent.fail_with = ConnectionResetError("agent went away")
    tasks = [asyncio.create_task(memory.run(CID, agent.call(CID))) for _ in range(3)]
    await _until(lambda: memory.joined == 2)
    agent.gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, ConnectionResetError) for o in outcomes), outcomes
    assert all(str(o) == "agent went away" for o in outcomes)
    assert agent.calls[CID] == 1
    assert memory.in_flight == 0
    assert memory.remembered == 0

    # A later repeat tries again, and that success is remembered.
    agent.fail_with = None
    result = await memory.run(CID, agent.call(CID, "second try"))
    assert result.output == {"text": "second try"}
    assert agent.calls[CID] == 2
    assert await memory.run(CID, agent.call(CID)) == result
    assert agent.calls[CID] == 2


async def test_a_failed_call_without_joiners_reraises() -> None:
    memory = CallMemory()

    async def boom() -> AgentResult:
        raise ValueError("bad answer")

    with pytest.raises(ValueError, match="bad answer"):
        await memory.run(CID, boom)
    assert memory.in_flight == 0
    with pytest.raises(ValueError, match="bad answer"):
        await memory.run(CID, boom)  # not remembered: tried again


async def test_cancelling_a_joiner_does_not_cancel_the_shared_call() -> None:
    memory = CallMemory()
    agent = Agent(gated=True)
    owner = asyncio.create_task(memory.run(CID, agent.call(CID)))
    await agent.started.wait()
    joiner = asyncio.create_task(memory.run(CID, agent.call(CID)))
    other_joiner = asyncio.create_task(memory.run(CID, agent.call(CID)))
    await _until(lambda: memory.joined == 2)

    joiner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await joiner
    assert memory.in_flight == 1
    assert not owner.done()
    assert not other_joiner.done()

    agent.gate.set()
    result = await owner
    assert await other_joiner == result
    assert agent.calls[CID] == 1
    assert agent.cancelled == 0
    assert agent.finished == 1
    # The call finished for everyone else and is remembered.
    assert await memory.run(CID, agent.call(CID)) == result
    assert agent.calls[CID] == 1


async def test_cancelling_the_first_caller_does_not_cancel_the_call() -> None:
    # Faust cancels actors on a rebalance; the call they started goes on, and a
    # repeat of the task (redelivered to another actor) joins it.
    memory = CallMemory()
    agent = Agent(gated=True)
    owner = asyncio.create_task(memory.run(CID, agent.call(CID)))
    await agent.started.wait()
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    assert memory.in_flight == 1
    assert agent.cancelled == 0
    repeat = asyncio.create_task(memory.run(CID, agent.call(CID, "a second call must not happen")))
    await asyncio.sleep(0)
    agent.gate.set()
    result = await repeat
    assert result.output == {"text": "done"}, "the first call's result, not the repeat's"
    assert agent.calls[CID] == 1
    assert memory.joined == 1
    assert memory.in_flight == 0


async def test_a_repeat_in_flight_is_one_from_another_message_only() -> None:
    memory = CallMemory()
    agent = Agent(gated=True)
    assert not memory.repeat_in_flight(CID, (0, 5)), "nothing in flight"
    first = asyncio.create_task(memory.run(CID, agent.call(CID), (0, 5)))
    await _until(lambda: memory.in_flight == 1)

    assert memory.repeat_in_flight(CID, (0, 9)), "another message: the executor's re-dispatch"
    assert not memory.repeat_in_flight(CID, (0, 5)), "the same message again waits in run()"
    assert memory.joined == 1

    agent.gate.set()
    await first
    assert not memory.repeat_in_flight(CID, (0, 9)), "finished: the remembered result answers it"
    assert agent.calls[CID] == 1
