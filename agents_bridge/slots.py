"""Call slots: how many agent calls a bridge worker makes at once, in all and per agent.

A call in flight holds two slots: one of its agent's (``max_concurrency`` in
the agent's registry entry; none when unset) and one of the worker's
(``SWITCHYARD_BRIDGE_CONCURRENCY``). A call takes its agent's slot first and
the worker's second, so a call waiting because its agent is at its limit holds
none of the worker's slots: one slow agent can fill its own limit, never the
worker's. Waiting calls go in the order they came, per agent and for the
worker's slots.

A call waits at most until its task's deadline (the caller turns that into a
``timeout`` result without calling the agent). When the worker stops, or a
rebalance takes its partitions, :meth:`CallSlots.send_away` ends every wait
with :class:`SentAway`: those calls are not made here, and their tasks stay
unacknowledged, so the partition's next owner gets them again. Until the
partitions are assigned again (:meth:`CallSlots.reopen`), or for good once the
worker stops, every later call is sent away at once too: Faust's rebalance
waits for every task it handed out, so a call that queued behind an agent's
limit meanwhile would hold the rebalance for as many call times.

Every call in flight also holds an HTTP connection, which is a file
descriptor: :func:`open_file_budget` raises the process's soft limit where it
can, and says how many calls fit.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "RESERVED_FILES",
    "AgentUsage",
    "CallSlots",
    "Limit",
    "SentAway",
    "open_file_budget",
]

log = logging.getLogger(__name__)

RESERVED_FILES: Final = 256
"""File descriptors kept for everything but agent calls: Kafka and PostgreSQL connections, the web server's
clients, registry lookups and cancels, logs."""


class SentAway(Exception):
    """A call waiting for a slot was sent away: the worker is stopping or losing its partitions."""


class Limit:
    """A first-come, first-served limit on how many holders there are at once, whose size may change.

    ``asyncio.Semaphore`` has a fixed size, and an agent's ``max_concurrency``
    can change in the registry while calls wait for it; this is the same
    queue of waiters with a size that can move and a way to send every
    waiter away.

    Args:
        size: The most holders at once; None for no limit.
    """

    def __init__(self, size: int | None) -> None:
        self._size = size
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def size(self) -> int | None:
        """The most holders at once (None: no limit)."""
        return self._size

    @size.setter
    def size(self, size: int | None) -> None:
        # A smaller size lets no one in until enough holders have left; nobody is thrown out.
        self._size = size
        self._wake()

    @property
    def waiting(self) -> int:
        """Acquirers waiting for their turn."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    def _room(self) -> bool:
        return self._size is None or self.held < self._size

    async def acquire(self) -> None:
        """Wait for a turn (first come, first served), then hold it until :meth:`release`.

        Raises:
            SentAway: :meth:`send_away` was called while this waited.
        """
        if not self._waiters and self._room():
            self.held += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Granted, then cancelled (a timeout) before it could run: give the turn back.
                self.release()
            else:
                self._discard(waiter)
            raise

    def release(self) -> None:
        """Give a turn back; the first waiter, if any, takes it."""
        self.held -= 1
        self._wake()

    def send_away(self, error: BaseException) -> int:
        """End every wait with ``error``; returns how many waited."""
        sent = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
                sent += 1
        return sent

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        with suppress(ValueError):  # already taken off by _wake or send_away
            self._waiters.remove(waiter)
        self._wake()  # it may have stood in front of others that fit now

    def _wake(self) -> None:
        while self._waiters and self._room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.held += 1
                waiter.set_result(None)


@dataclass
class AgentUsage:
    """One agent's calls on this worker.

    Attributes:
        limit: Its ``max_concurrency`` (the size of its :class:`Limit`).
        in_flight: Calls being made now.
        waiting: Calls waiting for a slot (their agent's or the worker's).
    """

    limit: Limit = field(default_factory=lambda: Limit(None))
    in_flight: int = 0
    waiting: int = 0


class CallSlots:
    """The worker's call slots and each agent's.

    Args:
        size: The worker's slots (``SWITCHYARD_BRIDGE_CONCURRENCY``, or fewer
            when the open-file limit is lower; see :func:`open_file_budget`).
    """

    def __init__(self, size: int) -> None:
        self.worker = Limit(size)
        self._agents: dict[str, AgentUsage] = {}
        self._closed = False
        self._reassigning = False

    @property
    def size(self) -> int:
        """How many calls the worker makes at once."""
        assert self.worker.size is not None
        return self.worker.size

    @size.setter
    def size(self, size: int) -> None:
        self.worker.size = size

    @property
    def in_flight(self) -> int:
        """Calls being made now."""
        return sum(usage.in_flight for usage in self._agents.values())

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot."""
        return sum(usage.waiting for usage in self._agents.values())

    def usage(self) -> dict[str, AgentUsage]:
        """Agents with calls in flight or waiting, by name."""
        return dict(self._agents)

    @asynccontextmanager
    async def hold(self, agent: str, max_concurrency: int | None, *, within_s: float) -> AsyncIterator[None]:
        """Hold a slot of ``agent``'s and one of the worker's while the block runs.

        Args:
            agent: The agent's name.
            max_concurrency: Its limit as the registry has it now (None: no
                limit of its own); a change applies to the calls that wait.
            within_s: The longest wait (the time left before the task's deadline).

        Raises:
            TimeoutError: No slot within ``within_s``.
            SentAway: The worker is stopping or losing its partitions (at
                once, from :meth:`send_away` until :meth:`reopen`).
        """
        if self._closed:
            raise SentAway("the bridge is stopping")
        if self._reassigning:
            raise SentAway("the bridge's partitions are being reassigned")
        usage = self._agents.get(agent)
        if usage is None:
            usage = self._agents[agent] = AgentUsage()
        usage.limit.size = max_concurrency
        usage.waiting += 1
        try:
            async with asyncio.timeout(within_s):
                await usage.limit.acquire()
                try:
                    await self.worker.acquire()
                except BaseException:
                    usage.limit.release()
                    raise
        except BaseException:
            usage.waiting -= 1
            self._forget_if_idle(agent, usage)
            raise
        usage.waiting -= 1
        usage.in_flight += 1
        try:
            yield
        finally:
            usage.in_flight -= 1
            self.worker.release()
            usage.limit.release()
            self._forget_if_idle(agent, usage)

    def send_away(self, *, close: bool = False) -> int:
        """End the wait of every call waiting for a slot with :class:`SentAway`, and refuse later calls.

        Calls in flight go on. Later calls are sent away at once until
        :meth:`reopen` (a rebalance), or for good (``close``).

        Args:
            close: The worker is stopping: :meth:`reopen` does not take the slots back into use.

        Returns:
            How many calls were sent away.
        """
        self._closed = self._closed or close
        self._reassigning = True
        reason = "the bridge is stopping" if close else "the bridge's partitions are being reassigned"
        # Agents' waiters first: a call sent away from the worker's queue gives
        # its agent's slot back, and nobody must be left to take it.
        sent = sum(usage.limit.send_away(SentAway(reason)) for usage in list(self._agents.values()))
        return sent + self.worker.send_away(SentAway(reason))

    def reopen(self) -> None:
        """The partitions were assigned anew: calls wait for their slots again (unless the worker is stopping)."""
        self._reassigning = False

    def _forget_if_idle(self, agent: str, usage: AgentUsage) -> None:
        if usage.in_flight == 0 and usage.waiting == 0 and self._agents.get(agent) is usage:
            del self._agents[agent]


def open_file_budget(calls: int, reserved: int = RESERVED_FILES) -> int:
    """How many calls can hold a connection at once, raising the soft open-file limit toward its hard limit.

    Each call in flight holds a socket. If the process may open fewer files
    than ``calls + reserved``, its soft limit is raised (up to the hard limit,
    which only an administrator can raise); what still does not fit is the
    answer: calls beyond it would fail with "Too many open files".

    Args:
        calls: The calls wanted in flight at once.
        reserved: Files kept for everything else.

    Returns:
        The calls that fit (at least 1); ``calls`` where the platform has no such limit.
    """
    if sys.platform == "win32":  # no RLIMIT_NOFILE; sockets are not bounded that way
        return calls
    import resource

    wanted = calls + reserved
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("raised the open-file limit from %d to %d for %d calls in flight", soft, target, calls)
            soft = target
        except (ValueError, OSError) as error:  # macOS caps the soft limit below an unlimited hard one
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, error)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return calls
    return max(1, soft - reserved)
