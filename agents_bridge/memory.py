"""The bridge's memory of calls in flight and finished recently.

A task delivered again (the executor re-dispatched it after a restart, or the
topic redelivered it after a rebalance) carries the same correlation id. The
bridge then joins the call in flight, or answers with the remembered result,
instead of calling the agent a second time. The memory is in-process and
bounded: a bridge that dies forgets, and those calls are made again with the
same idempotency key (at-least-once, see README "Guarantees").
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from models.messages import AgentResult

__all__ = ["CallMemory"]


class CallMemory:
    """Deduplicates calls by correlation id.

    Args:
        capacity: How many finished results to remember (oldest forgotten first).
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._in_flight: dict[str, asyncio.Future[AgentResult]] = {}
        self._finished: OrderedDict[str, AgentResult] = OrderedDict()
        self.joined = 0
        self.remembered = 0

    @property
    def in_flight(self) -> int:
        """Calls running now."""
        return len(self._in_flight)

    async def run(self, correlation_id: str, call: Callable[[], Awaitable[AgentResult]]) -> AgentResult:
        """Run ``call`` once per correlation id; repeats share its result.

        Returns:
            The result of the one call made for this correlation id.
        """
        done = self._finished.get(correlation_id)
        if done is not None:
            self._finished.move_to_end(correlation_id)
            self.remembered += 1
            return done
        running = self._in_flight.get(correlation_id)
        if running is not None:
            self.joined += 1
            return await asyncio.shield(running)
        future: asyncio.Future[AgentResult] = asyncio.get_running_loop().create_future()
        self._in_flight[correlation_id] = future
        try:
            result = await call()
        except BaseException as error:
            # Not remembered: a later repeat tries again.
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved, so an unjoined failure is not logged as lost
            raise
        else:
            future.set_result(result)
            self._finished[correlation_id] = result
            while len(self._finished) > self.capacity:
                self._finished.popitem(last=False)
            return result
        finally:
            del self._in_flight[correlation_id]
