"""The bridge's memory of calls in flight and finished recently.

A task delivered again (the executor re-dispatched it after a restart, or the
topic redelivered it after a rebalance) carries the same call id
(:attr:`~models.messages.AgentTask.call_id`: the correlation id, with the turn
once a person's answers carry the attempt on). The bridge then joins the call
in flight, or answers with the remembered result, instead of calling the agent
a second time. The answer of each turn has a call id of its own, so it is a
new call. The memory is in-process and
bounded: a bridge that dies forgets, and those calls are made again with the
same idempotency key (at-least-once, see README "Guarantees").
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable

from models.messages import AgentResult

__all__ = ["CallMemory"]


class CallMemory:
    """Deduplicates calls by call id.

    Args:
        capacity: How many finished results to remember (oldest forgotten first).
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._in_flight: dict[str, asyncio.Future[AgentResult]] = {}
        self._origin: dict[str, Hashable | None] = {}  # the message that started each call in flight
        self._finished: OrderedDict[str, AgentResult] = OrderedDict()
        self.joined = 0
        self.remembered = 0

    @property
    def in_flight(self) -> int:
        """Calls running now."""
        return len(self._in_flight)

    def finished(self, call_id: str) -> AgentResult | None:
        """The remembered result of a finished call, or None."""
        done = self._finished.get(call_id)
        if done is not None:
            self._finished.move_to_end(call_id)
            self.remembered += 1
        return done

    def repeat_in_flight(self, call_id: str, delivery: Hashable) -> bool:
        """Whether a call for this id is in flight, started by another message.

        Such a repeat (the executor re-dispatched the attempt after a restart)
        can return at once: the call publishes its result when it ends, and
        the repeat must not hold a call slot meanwhile. The message that
        started the call delivered again (after a rebalance) is not one: it
        waits in :meth:`run`, so that it stays unacknowledged, and is
        redelivered after a crash, until the call has ended.
        """
        if call_id in self._in_flight and self._origin.get(call_id) != delivery:
            self.joined += 1
            return True
        return False

    async def run(
        self,
        call_id: str,
        call: Callable[[], Awaitable[AgentResult]],
        delivery: Hashable | None = None,
    ) -> AgentResult:
        """Run ``call`` once per call id; repeats wait for it and share its result.

        Args:
            call_id: The call's id (the attempt's correlation id, and its turn).
            call: Makes the agent call.
            delivery: The message that asked (partition and offset), kept for
                :meth:`repeat_in_flight`.

        Returns:
            The result of the one call made for this call id.
        """
        done = self._finished.get(call_id)
        if done is not None:
            self._finished.move_to_end(call_id)
            self.remembered += 1
            return done
        running = self._in_flight.get(call_id)
        if running is not None:
            self.joined += 1
            return await asyncio.shield(running)
        # The call runs as its own task: cancelling the caller that started it
        # (Faust restarts actors on a rebalance) does not cancel it for the
        # others waiting on it, nor lose its result.
        task = asyncio.ensure_future(call())
        self._in_flight[call_id] = task
        self._origin[call_id] = delivery
        task.add_done_callback(lambda done: self._finish(call_id, done))
        return await asyncio.shield(task)

    def _finish(self, call_id: str, task: asyncio.Future[AgentResult]) -> None:
        self._in_flight.pop(call_id, None)
        self._origin.pop(call_id, None)
        if task.cancelled() or task.exception() is not None:
            return  # not remembered: a later repeat tries again
        self._finished[call_id] = task.result()
        while len(self._finished) > self.capacity:
            self._finished.popitem(last=False)
