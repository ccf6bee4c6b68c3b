"""Call slots: the worker's limit and each agent's, first come first served, sent away on stop."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

import pytest

from agents_bridge.slots import CallSlots, Limit, SentAway, open_file_budget

pytestmark = pytest.mark.timeout(30)


async def settle() -> None:
    """Let every task that can run, run."""
    for _ in range(5):
        await asyncio.sleep(0)


class Calls:
    """Calls that hold their slots until told to end; records the order they started in."""

    def __init__(self, slots: CallSlots) -> None:
        self.slots = slots
        self.started: list[str] = []
        self.ends: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, agent: str, max_concurrency: int | None = None, within_s: float = 10.0) -> None:
        self.ends[name] = asyncio.Event()
        self.tasks[name] = asyncio.create_task(self._call(name, agent, max_concurrency, within_s))

    async def _call(self, name: str, agent: str, max_concurrency: int | None, within_s: float) -> None:
        async with self.slots.hold(agent, max_concurrency, within_s=within_s):
            self.started.append(name)
            await self.ends[name].wait()

    async def end(self, *names: str) -> None:
        for name in names:
            self.ends[name].set()
        await asyncio.gather(*(self.tasks[name] for name in names))
        await settle()


# ------------------------------------------------------------------ Limit


async def test_a_limit_lets_in_first_come_first_served() -> None:
    limit = Limit(1)
    order: list[int] = []

    async def holder(n: int) -> None:
        await limit.acquire()
        order.append(n)
        await asyncio.sleep(0)
        limit.release()

    await asyncio.gather(*(holder(n) for n in range(6)))
    assert order == list(range(6))
    assert limit.held == 0


async def test_a_larger_size_lets_waiters_in_and_a_smaller_one_throws_nobody_out() -> None:
    limit = Limit(1)
    await limit.acquire()
    waiters = [asyncio.create_task(limit.acquire()) for _ in range(3)]
    await settle()
    assert limit.waiting == 3
    limit.size = 3
    await settle()
    assert [w.done() for w in waiters] == [True, True, False]
    limit.size = 1
    assert limit.held == 3, "holders keep their turn"
    limit.release()
    limit.release()
    await settle()
    assert not waiters[2].done(), "still 1 held: the size is 1"
    limit.release()
    await settle()
    assert waiters[2].done()


async def test_no_limit_never_waits() -> None:
    limit = Limit(None)
    for _ in range(1000):
        await limit.acquire()
    assert limit.held == 1000


async def test_a_waiter_cancelled_leaves_the_queue_and_the_next_one_gets_the_turn() -> None:
    limit = Limit(1)
    await limit.acquire()
    first = asyncio.create_task(limit.acquire())
    second = asyncio.create_task(limit.acquire())
    await settle()
    first.cancel()
    await settle()
    limit.release()
    await settle()
    assert second.done()
    assert not second.cancelled()
    assert limit.held == 1
    assert limit.waiting == 0


async def test_a_turn_granted_to_a_waiter_cancelled_before_it_ran_is_given_back() -> None:
    limit = Limit(1)
    await limit.acquire()
    waiter = asyncio.create_task(limit.acquire())
    await settle()
    limit.release()  # grants the turn to the waiter...
    waiter.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limit.held == 0, "the turn went back"


async def test_send_away_ends_every_wait() -> None:
    limit = Limit(1)
    await limit.acquire()
    waiters = [asyncio.create_task(limit.acquire()) for _ in range(3)]
    await settle()
    assert limit.send_away(SentAway("stop")) == 3
    for waiter in waiters:
        with pytest.raises(SentAway):
            await waiter
    assert limit.held == 1


# -------------------------------------------------------------- CallSlots


async def test_an_agent_at_its_limit_holds_none_of_the_workers_slots() -> None:
    calls = Calls(CallSlots(3))
    for n in range(5):
        calls.start(f"slow-{n}", "slow", max_concurrency=1)
    await settle()
    calls.start("fast-0", "fast")
    calls.start("fast-1", "fast")
    await settle()
    assert calls.started == ["slow-0", "fast-0", "fast-1"], "the slow agent's waiting calls take no worker slot"
    usage = calls.slots.usage()
    assert (usage["slow"].in_flight, usage["slow"].waiting) == (1, 4)
    assert (usage["fast"].in_flight, usage["fast"].waiting) == (2, 0)
    assert (calls.slots.in_flight, calls.slots.waiting) == (3, 4)
    await calls.end("slow-0")
    assert calls.started[-1] == "slow-1", "the agent's next call, in order"
    await calls.end("fast-0", "fast-1", *[f"slow-{n}" for n in range(1, 4)])
    assert calls.started[3:] == ["slow-1", "slow-2", "slow-3", "slow-4"]
    await calls.end("slow-4")
    assert calls.slots.usage() == {}, "idle agents are forgotten"


async def test_calls_beyond_the_workers_slots_wait_in_order_whatever_their_agent() -> None:
    calls = Calls(CallSlots(2))
    for n, agent in enumerate(["a", "b", "a", "c", "b"]):
        calls.start(f"{agent}-{n}", agent)
    await settle()
    assert calls.started == ["a-0", "b-1"]
    assert calls.slots.waiting == 3
    await calls.end("a-0")
    await calls.end("b-1")
    assert calls.started == ["a-0", "b-1", "a-2", "c-3"]
    await calls.end("a-2", "c-3")
    assert calls.started[-1] == "b-4"


async def test_a_new_max_concurrency_applies_to_the_calls_that_wait() -> None:
    calls = Calls(CallSlots(10))
    for n in range(4):
        calls.start(f"s-{n}", "s", max_concurrency=1)
    await settle()
    assert calls.started == ["s-0"]
    calls.start("s-4", "s", max_concurrency=3)  # the registry entry changed
    await settle()
    assert calls.started == ["s-0", "s-1", "s-2"], "the waiting ones first, in order"
    assert calls.slots.usage()["s"].limit.size == 3


async def test_a_wait_is_bounded_and_leaves_no_slot_behind() -> None:
    slots = CallSlots(1)
    calls = Calls(slots)
    calls.start("first", "a")
    await settle()
    with pytest.raises(TimeoutError):
        async with slots.hold("a", None, within_s=0.05):
            pytest.fail("there is no free slot")
    with pytest.raises(TimeoutError):
        async with slots.hold("b", 1, within_s=0):
            pytest.fail("the deadline has passed")
    await calls.end("first")
    assert (slots.in_flight, slots.waiting, slots.worker.held) == (0, 0, 0)
    async with slots.hold("a", None, within_s=1):
        assert slots.in_flight == 1


async def test_send_away_ends_the_waits_and_the_calls_in_flight_go_on() -> None:
    calls = Calls(CallSlots(2))
    calls.start("a-0", "a", max_concurrency=1)
    calls.start("a-1", "a", max_concurrency=1)  # waits for its agent
    calls.start("b-0", "b")
    calls.start("c-0", "c")  # waits for the worker, holding c's slot
    await settle()
    assert calls.slots.send_away() == 2
    for name in ("a-1", "c-0"):
        with pytest.raises(SentAway):
            await calls.tasks[name]
    assert calls.slots.waiting == 0
    assert calls.slots.in_flight == 2
    calls.slots.reopen()  # the rebalance is over: later calls are made
    calls.start("d-0", "d")
    await calls.end("a-0")
    assert calls.started[-1] == "d-0"
    await calls.end("b-0", "d-0")
    assert calls.slots.usage() == {}
    assert calls.slots.worker.held == 0


async def test_during_a_rebalance_a_later_call_is_sent_away_at_once_even_with_free_slots() -> None:
    # Faust's rebalance waits for every task it handed out, with no time limit:
    # a call queued behind its agent's limit after the rebalance began would hold it.
    calls = Calls(CallSlots(10))
    calls.start("a-0", "a", max_concurrency=1)
    await settle()
    assert calls.slots.send_away() == 0
    calls.start("a-1", "a", max_concurrency=1)  # would wait for a-0
    calls.start("b-0", "b")  # would start at once
    await settle()
    for name in ("a-1", "b-0"):
        assert calls.tasks[name].done(), f"{name} waits for nothing"
        with pytest.raises(SentAway, match="reassigned"):
            await calls.tasks[name]
    assert (calls.slots.in_flight, calls.slots.waiting) == (1, 0), "the call in flight goes on"
    calls.slots.reopen()  # the partitions are assigned
    calls.start("b-1", "b")
    await settle()
    assert calls.started == ["a-0", "b-1"]
    await calls.end("a-0", "b-1")
    assert calls.slots.usage() == {}


async def test_reopening_does_not_undo_a_stop() -> None:
    slots = CallSlots(5)
    slots.send_away(close=True)
    slots.reopen()  # a rebalance that ends while the worker stops
    with pytest.raises(SentAway, match="stopping"):
        async with slots.hold("a", None, within_s=1):
            pytest.fail("closed")


async def test_once_closed_every_call_is_sent_away_at_once() -> None:
    slots = CallSlots(5)
    assert slots.send_away(close=True) == 0
    with pytest.raises(SentAway, match="stopping"):
        async with slots.hold("a", None, within_s=1):
            pytest.fail("closed")


# --------------------------------------------------------- open files


class FakeLimits:
    def __init__(self, soft: int, hard: int, *, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import resource

        monkeypatch.setattr(resource, "getrlimit", lambda _which: (self.soft, self.hard))
        monkeypatch.setattr(resource, "setrlimit", self.set)

    def set(self, _which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.soft, self.hard = limits


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeLimits]:
    if sys.platform == "win32":  # pragma: no cover
        pytest.skip("no open-file limit on Windows")

    def make(soft: int, hard: int, **options: Any) -> FakeLimits:
        fake = FakeLimits(soft, hard, **options)
        fake.install(monkeypatch)
        return fake

    return make


def test_the_soft_limit_is_raised_when_the_hard_one_allows(limits: Callable[..., FakeLimits]) -> None:
    fake = limits(1024, 1_048_576)
    assert open_file_budget(4096, reserved=256) == 4096
    assert fake.soft == 4096 + 256


def test_a_limit_already_high_enough_is_left_alone(limits: Callable[..., FakeLimits]) -> None:
    fake = limits(20_000, 20_000)
    assert open_file_budget(4096, reserved=256) == 4096
    assert fake.soft == 20_000


def test_below_the_hard_limit_the_budget_is_what_fits(
    limits: Callable[..., FakeLimits], caplog: pytest.LogCaptureFixture
) -> None:
    fake = limits(1024, 2048)
    assert open_file_budget(4096, reserved=256) == 2048 - 256
    assert fake.soft == 2048
    refused = limits(1024, 8192, refuse=True)
    with caplog.at_level(logging.WARNING, logger="agents_bridge.slots"):
        assert open_file_budget(4096, reserved=256) == 1024 - 256
    assert refused.soft == 1024
    assert "could not raise the open-file limit" in caplog.text
    limits(100, 100)
    assert open_file_budget(4096, reserved=256) == 1, "at least one call"
