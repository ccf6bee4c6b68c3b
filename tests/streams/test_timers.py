"""Timers: the running service fires actions at their time, one per key, and retries failures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta

import pytest

from models.messages import utcnow
from streams.timers import TimerKey, Timers

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def timers() -> AsyncIterator[Timers]:
    service = Timers()
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


class Log:
    """Records which actions ran, and when (monotonic)."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.times: dict[str, list[float]] = {}
        self.changed = asyncio.Event()

    def action(self, label: str) -> Callable[[], Awaitable[None]]:
        async def _act() -> None:
            self.ran.append(label)
            self.times.setdefault(label, []).append(asyncio.get_running_loop().time())
            self.changed.set()

        return _act

    async def wait_for(self, condition: Callable[[], bool], within_s: float = 3.0) -> None:
        """Wait (bounded) until ``condition`` holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while not condition():
            left = deadline - loop.time()
            assert left > 0, f"timed out; ran so far: {self.ran}"
            self.changed.clear()
            if condition():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=left)


def key(name: str) -> TimerKey:
    """A timer key named ``name`` (the timers do not care what it is for)."""
    return TimerKey("timeout", "run-1", name)


def _in(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


async def test_a_past_time_runs_at_once(timers: Timers) -> None:
    log = Log()
    loop = asyncio.get_running_loop()
    started = loop.time()
    timers.call_at(_in(-60), key("late"), log.action("late"))
    await log.wait_for(lambda: log.ran == ["late"], within_s=1.0)
    assert loop.time() - started < 0.5
    assert len(timers) == 0


async def test_a_future_time_waits_until_then(timers: Timers) -> None:
    log = Log()
    loop = asyncio.get_running_loop()
    started = loop.time()
    timers.call_at(_in(0.2), key("soon"), log.action("soon"))
    assert len(timers) == 1
    await log.wait_for(lambda: log.ran == ["soon"])
    took = log.times["soon"][0] - started
    assert 0.15 <= took < 1.0
    assert len(timers) == 0


async def test_actions_run_in_order_of_time(timers: Timers) -> None:
    log = Log()
    timers.call_at(_in(0.15), key("c"), log.action("c"))
    timers.call_at(_in(0.05), key("a"), log.action("a"))
    timers.call_at(_in(0.10), key("b"), log.action("b"))
    assert len(timers) == 3
    await log.wait_for(lambda: len(log.ran) == 3)
    assert log.ran == ["a", "b", "c"]


async def test_past_actions_run_oldest_first(timers: Timers) -> None:
    log = Log()
    # Set all at once (no await in between), so they are all due together.
    timers.call_at(_in(-1), key("newest"), log.action("newest"))
    timers.call_at(_in(-3), key("oldest"), log.action("oldest"))
    timers.call_at(_in(-2), key("middle"), log.action("middle"))
    await log.wait_for(lambda: len(log.ran) == 3)
    assert log.ran == ["oldest", "middle", "newest"]


async def test_an_earlier_timer_set_while_waiting_runs_on_time(timers: Timers) -> None:
    log = Log()
    timers.call_at(_in(30), key("far"), log.action("far"))
    await asyncio.sleep(0.05)  # the service is now waiting for "far" (or its 1 s poll)
    loop = asyncio.get_running_loop()
    started = loop.time()
    timers.call_at(_in(0.05), key("near"), log.action("near"))
    await log.wait_for(lambda: log.ran == ["near"], within_s=2.0)
    assert log.times["near"][0] - started < 0.5
    assert len(timers) == 1  # "far" still pending


async def test_same_key_replaces(timers: Timers) -> None:
    log = Log()
    timers.call_at(_in(0.05), key("deadline"), log.action("first"))
    timers.call_at(_in(0.10), key("deadline"), log.action("second"))
    timers.call_at(_in(0.15), key("deadline"), log.action("third"))
    assert len(timers) == 1
    timers.call_at(_in(0.3), key("sentinel"), log.action("sentinel"))
    await log.wait_for(lambda: "sentinel" in log.ran)
    assert log.ran == ["third", "sentinel"]


async def test_same_key_replaced_by_an_earlier_time(timers: Timers) -> None:
    log = Log()
    timers.call_at(_in(0.2), key("k"), log.action("later"))
    timers.call_at(_in(0.05), key("k"), log.action("earlier"))
    timers.call_at(_in(0.4), key("sentinel"), log.action("sentinel"))
    await log.wait_for(lambda: "sentinel" in log.ran)
    assert log.ran == ["earlier", "sentinel"]


async def test_same_key_same_time_runs_once(timers: Timers) -> None:
    log = Log()
    when = _in(0.05)
    timers.call_at(when, key("k"), log.action("first"))
    timers.call_at(when, key("k"), log.action("second"))  # e.g. resume() setting the same deadline again
    timers.call_at(_in(0.2), key("sentinel"), log.action("sentinel"))
    await log.wait_for(lambda: "sentinel" in log.ran)
    assert log.ran == ["second", "sentinel"]


async def test_cancel(timers: Timers) -> None:
    log = Log()
    timers.call_at(_in(0.05), key("k"), log.action("cancelled"))
    timers.call_at(_in(0.15), key("sentinel"), log.action("sentinel"))
    assert len(timers) == 2
    timers.cancel(key("k"))
    timers.cancel(key("no-such-key"))  # no error
    assert len(timers) == 1
    await log.wait_for(lambda: "sentinel" in log.ran)
    assert log.ran == ["sentinel"]
    assert len(timers) == 0


async def test_set_again_after_cancel(timers: Timers) -> None:
    log = Log()
    when = _in(0.05)
    timers.call_at(when, key("k"), log.action("old"))
    timers.cancel(key("k"))
    timers.call_at(when, key("k"), log.action("new"))
    timers.call_at(_in(0.2), key("sentinel"), log.action("sentinel"))
    await log.wait_for(lambda: "sentinel" in log.ran)
    assert log.ran == ["new", "sentinel"]


async def test_an_action_may_set_its_own_key_again(timers: Timers) -> None:
    log = Log()
    rounds = 0

    async def again() -> None:
        nonlocal rounds
        rounds += 1
        log.ran.append(f"round-{rounds}")
        log.changed.set()
        if rounds < 3:
            timers.call_at(_in(0.02), key("periodic"), again)

    timers.call_at(_in(0.02), key("periodic"), again)
    await log.wait_for(lambda: rounds == 3)
    assert log.ran == ["round-1", "round-2", "round-3"]
    assert len(timers) == 0


async def test_a_failing_action_is_retried_about_a_second_later(
    timers: Timers, caplog: pytest.LogCaptureFixture
) -> None:
    log = Log()
    attempts: list[float] = []

    async def flaky() -> None:
        attempts.append(asyncio.get_running_loop().time())
        log.changed.set()
        if len(attempts) == 1:
            raise ConnectionError("broker briefly away")

    with caplog.at_level(logging.ERROR, logger="streams.timers"):
        timers.call_at(_in(-0.01), key("deadline"), flaky)
        await log.wait_for(lambda: len(attempts) == 1, within_s=1.0)
        assert len(timers) == 1  # the retry is pending
        await log.wait_for(lambda: len(attempts) == 2, within_s=3.0)
    gap = attempts[1] - attempts[0]
    assert 0.8 <= gap <= 2.0, gap
    assert len(timers) == 0  # succeeded: not retried again
    assert any("deadline" in r.getMessage() for r in caplog.records)


async def test_a_failing_action_does_not_override_a_newer_timer(timers: Timers) -> None:
    log = Log()
    gate = asyncio.Event()

    async def failing() -> None:
        log.ran.append("failing")
        log.changed.set()
        await gate.wait()
        raise ConnectionError("broker briefly away")

    timers.call_at(_in(-0.01), key("k"), failing)
    await log.wait_for(lambda: log.ran == ["failing"])
    timers.call_at(_in(0.05), key("k"), log.action("newer"))  # set while the failing one runs
    gate.set()
    await log.wait_for(lambda: "newer" in log.ran)
    # A retry of "failing" would have been set at once, replacing "newer" (same key) and staying pending.
    assert log.ran == ["failing", "newer"]
    assert len(timers) == 0


async def test_a_failing_action_does_not_stop_the_others(timers: Timers) -> None:
    log = Log()

    async def broken() -> None:
        raise RuntimeError("always")

    timers.call_at(_in(-0.02), key("broken"), broken)
    timers.call_at(_in(-0.01), key("fine"), log.action("fine"))
    timers.call_at(_in(0.05), key("later"), log.action("later"))
    await log.wait_for(lambda: log.ran == ["fine", "later"])
    assert len(timers) == 1  # only "broken", waiting for its retry
    timers.cancel(key("broken"))
    assert len(timers) == 0


async def test_len_counts_pending_keys(timers: Timers) -> None:
    async def nothing() -> None:
        return None

    assert len(timers) == 0
    for i in range(5):
        timers.call_at(_in(60), key(f"k{i}"), nothing)
    timers.call_at(_in(60), key("k0"), nothing)
    assert len(timers) == 5
    timers.cancel(key("k1"))
    assert len(timers) == 4


async def test_stop_drops_pending_timers_without_running_them() -> None:
    log = Log()
    service = Timers()
    await service.start()
    service.call_at(_in(0.1), key("k"), log.action("k"))
    await service.stop()
    await asyncio.sleep(0.2)
    assert log.ran == []
