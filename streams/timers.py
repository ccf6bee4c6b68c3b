"""In-memory timers for delayed dispatches and step deadlines.

Timers only *send* messages (a task to the bridge, a ``step_timeout`` control
event to the executor itself); they never write a table (docs/architecture.md rule 2).
They live in memory: after a restart or a rebalance the executor asks the pure
core (:func:`models.run.resume`) what each running run needs and sets them
again. Keys make setting the same timer twice harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from mode import Service

from models.messages import utcnow

__all__ = ["TimerKey", "Timers"]

log = logging.getLogger(__name__)

Action = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True, order=True)
class TimerKey:
    """What a timer is for: the deadline or the delayed dispatch of one attempt, or a finished run's eviction.

    Attributes:
        kind: ``"timeout"`` (the attempt's deadline), ``"dispatch"`` (a delayed
            retry) or ``"evict"`` (a finished run leaves the table).
        run_id: The run, so that all of a run's timers can be dropped at once.
        correlation_id: The attempt (unique across runs, steps, iterations and
            items); the run id for an eviction.
    """

    kind: Literal["timeout", "dispatch", "evict"]
    run_id: str
    correlation_id: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.correlation_id}"


class Timers(Service):
    """Runs an action at a wall-clock time; one pending action per key."""

    def __init__(self, **kwargs: Any) -> None:
        self._heap: list[tuple[datetime, int, TimerKey]] = []
        self._actions: dict[TimerKey, tuple[datetime, Action]] = {}
        self._counter = itertools.count()
        self._changed = asyncio.Event()
        super().__init__(**kwargs)

    def __len__(self) -> int:
        return len(self._actions)

    def call_at(self, when: datetime, key: TimerKey, action: Action) -> None:
        """Run ``action`` at ``when`` (at once if it is past); replaces a timer with the same key."""
        self._actions[key] = (when, action)
        heapq.heappush(self._heap, (when, next(self._counter), key))
        self._changed.set()

    def cancel(self, key: TimerKey) -> None:
        """Forget a pending timer (no error if there is none)."""
        self._actions.pop(key, None)

    def cancel_where(self, matches: Callable[[TimerKey], bool]) -> int:
        """Forget every pending timer whose key matches; returns how many."""
        keys = [key for key in self._actions if matches(key)]
        for key in keys:
            del self._actions[key]
        return len(keys)

    def _pop_due(self, now: datetime) -> list[tuple[TimerKey, Action]]:
        due: list[tuple[TimerKey, Action]] = []
        while self._heap and self._heap[0][0] <= now:
            when, _, key = heapq.heappop(self._heap)
            entry = self._actions.get(key)
            if entry is not None and entry[0] == when:  # not replaced or cancelled since
                del self._actions[key]
                due.append((key, entry[1]))
        return due

    @Service.task
    async def _run(self) -> None:
        while not self.should_stop:
            now = utcnow()
            for key, action in self._pop_due(now):
                try:
                    await action()
                except Exception:
                    # Usually the broker is briefly away: try again soon rather than lose a deadline.
                    log.exception("timer %s failed; trying again in 1s", key)
                    if key not in self._actions:
                        self.call_at(now + timedelta(seconds=1), key, action)
            wait = 1.0
            if self._heap:
                wait = max(0.0, min(wait, (self._heap[0][0] - utcnow()).total_seconds()))
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=wait)
