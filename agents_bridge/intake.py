"""Taking tasks from the topic: one consumer, many tasks at once, acknowledged in order.

The bridge reads its task stream with one Faust actor and hands every task to
a task of its own (:meth:`Intake.take`), so thousands of calls can be in
flight without thousands of actors. Calls end in any order, but a task's
message is acknowledged only once its call has ended and its result was
published, *and* every earlier message of its partition was acknowledged.

Why in order (faust-streaming 0.15.3, ``faust/transport/consumer.py``): an
acknowledged offset goes into ``Consumer._acked[tp]``, and the commit
(``_new_offset``) takes the first run of consecutive offsets there and
commits past its end. It only declines when the run starts more than one
offset past the last commit, and not at all before the first commit of a
partition (``_committed_offset`` is None, and 0 counts as None). So with
offset 5 still running and 6 acknowledged, Faust may commit 7 (faust-streaming
issue #606): a crash would then lose task 5. Acknowledging in order per
partition keeps ``_acked[tp]`` a run that starts where the last commit ended
(offsets the topic skips are filled in by Faust's own gap tracking), so the
committed offset never passes a task still being handled.

A task that is *let go* (its call was sent away because the worker is
stopping or losing its partitions) is never acknowledged, nor is anything after
it in its partition: those messages are released from Faust's list of
unacknowledged messages (so its rebalance and shutdown, which wait for that
list to empty, do not wait for them) and are delivered again to the
partition's next owner. The calls after it that ended here may be made again
there (at-least-once, with the same idempotency key).

The partition stays *cut* until the next assignment (:meth:`Intake.reopen`):
a task taken from it meanwhile (the consumer takes a few more from its buffer
before Faust stops the flow) is released at once, neither handled nor
acknowledged. Acknowledging it would lose the tasks let go: Faust's revocation
forgets the partition's committed offset (``_committed_offset`` back to None)
before it waits for the messages in hand and commits, and with no committed
offset ``_new_offset`` commits past the first run of acknowledged offsets,
wherever it starts.

A message whose acknowledgement fails is released too: it stays uncommitted
(delivered again later), and Faust's rebalance and shutdown do not wait for it.

Bounds (backpressure): :meth:`Intake.take` returns once there is room for
another task. There is none while ``max_waiting`` tasks wait for their call to
start, or while ``max_unacknowledged`` tasks are held (running, or finished
and waiting for an earlier task of their partition). The consumer then stops
taking tasks from the topic; Faust's buffer fills, and its fetcher waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

__all__ = ["MAX_UNACKNOWLEDGED", "Intake", "Work"]

log = logging.getLogger(__name__)

MAX_UNACKNOWLEDGED: Final = 100_000
"""Tasks held at most, finished ones waiting for an earlier task of their partition included: a call that runs
minutes while the rest of its partition flows holds back this many acknowledgements. A finished task costs
under 1 KiB (its ticket and message, not the task's bytes: the caller keeps only what acknowledging needs);
one waiting or in flight also holds its task, bounded by the worker's waiting and call limits."""

E = TypeVar("E")

Work = Callable[[Callable[[], None]], Awaitable[bool]]
"""Handles one task: called with ``started`` (to call when its agent call starts), returns whether the task was
carried out (True: acknowledge it) or let go (False: leave it unacknowledged, for the partition's next owner)."""


@dataclass(eq=False)
class _Ticket(Generic[E]):
    item: E
    partition: Hashable
    waiting: bool = True  # taken, call not started
    finished: bool = False
    cut: bool = False  # let go, or after a task let go in its partition: never acknowledged


@dataclass
class _Settled(Generic[E]):
    acknowledge: list[E] = field(default_factory=list)
    release: list[E] = field(default_factory=list)


class Intake(Generic[E]):
    """Handles taken tasks each in an asyncio task, and acknowledges them in order per partition.

    Args:
        acknowledge: Acknowledges an item (Faust: ``Stream.ack``), in order per partition.
        release: Forgets an item that will not be acknowledged (Faust: drop
            its message from the consumer's unacknowledged set).
        max_waiting: Tasks at most whose call has not started.
        max_unacknowledged: Tasks at most taken and not yet acknowledged or released.
    """

    def __init__(
        self,
        *,
        acknowledge: Callable[[E], Awaitable[object]],
        release: Callable[[E], object],
        max_waiting: int,
        max_unacknowledged: int = MAX_UNACKNOWLEDGED,
    ) -> None:
        self._acknowledge = acknowledge
        self._release = release
        self.max_waiting = max_waiting
        self.max_unacknowledged = max_unacknowledged
        self._order: dict[Hashable, deque[_Ticket[E]]] = {}
        self._cut: set[Hashable] = set()
        """Partitions with a task let go since the last assignment: nothing more of theirs is acknowledged."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._room.set()
        self.waiting = 0
        """Tasks taken whose call has not started."""
        self.unacknowledged = 0
        """Tasks taken and not yet acknowledged or released."""
        self.acknowledged = 0
        self.released = 0

    @property
    def running(self) -> int:
        """Tasks being handled now."""
        return len(self._tasks)

    @property
    def full(self) -> bool:
        """Whether the consumer waits before taking another task."""
        return not self._room.is_set()

    async def take(self, item: E, partition: Hashable, work: Work) -> None:
        """Start handling a task; return once there is room for the next one.

        Args:
            item: The task as delivered (acknowledged or released later).
            partition: Its partition: items of one partition are acknowledged in the order taken.
            work: What to do with it (see :data:`Work`); not called when the partition is cut (see the module).
        """
        if partition in self._cut:
            # After a task let go: acknowledged, it would be committed past the one let go (see the module).
            self.released += 1
            self._settle(_Settled(release=[item]))
            await self._room.wait()
            return
        ticket = _Ticket(item, partition)
        self._order.setdefault(partition, deque()).append(ticket)
        self.waiting += 1
        self.unacknowledged += 1
        self._update_room()
        task = asyncio.ensure_future(self._run(ticket, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await self._room.wait()

    async def wait_for_room(self) -> None:
        """Wait until another task may be taken."""
        await self._room.wait()

    def reopen(self) -> None:
        """The partitions were assigned anew: tasks of the partitions cut since the last assignment are handled again.

        Call it once the revocation is over (Faust has waited for every
        message it handed out, and committed), before the new assignment's
        tasks flow: those are delivered from the committed offset, the
        tasks let go among them.
        """
        if self._cut:
            log.info("partitions assigned: tasks are taken again from the %d that had tasks let go", len(self._cut))
        self._cut.clear()

    async def close(self) -> None:
        """Cancel the tasks still running (their items are released, not acknowledged) and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, ticket: _Ticket[E], work: Work) -> None:
        def started() -> None:
            if ticket.waiting:
                ticket.waiting = False
                self.waiting -= 1
                self._update_room()

        try:
            carried_out = await work(started)
        except asyncio.CancelledError:
            started()
            self._settle(self._let_go(ticket))
            raise
        except Exception:
            # Work is expected to handle its own errors (dead letters); acknowledging
            # is what Faust does with a message whose handler raised (docs/architecture.md rule 4).
            log.exception("a task's handler raised; its message is acknowledged")
            carried_out = True
        started()
        settled = self._finish(ticket) if carried_out else self._let_go(ticket)
        for item in settled.acknowledge:
            try:
                await self._acknowledge(item)
            except Exception:
                # Left in Faust's unacknowledged set, it would hold the next rebalance and the shutdown for good
                # (they wait for that set to empty). Released, it stays uncommitted: delivered again later, its
                # repeat answered from the call memory. The tasks after it go on: this one was carried out.
                log.exception("could not acknowledge a task; it is released (delivered again later)")
                self.acknowledged -= 1
                self.released += 1
                settled.release.append(item)
        self._settle(_Settled(release=settled.release))

    def _settle(self, settled: _Settled[E]) -> None:
        for item in settled.release:
            try:
                self._release(item)
            except Exception:
                log.exception("could not release a task")

    def _finish(self, ticket: _Ticket[E]) -> _Settled[E]:
        """The ticket's work is done: what can be acknowledged now (in order), or released."""
        ticket.finished = True
        if ticket.cut:
            return self._count(_Settled(release=[ticket.item]))
        queue = self._order[ticket.partition]
        settled: _Settled[E] = _Settled()
        while queue and queue[0].finished:
            settled.acknowledge.append(queue.popleft().item)
        if not queue:
            del self._order[ticket.partition]
        return self._count(settled)

    def _let_go(self, ticket: _Ticket[E]) -> _Settled[E]:
        """The ticket will not be carried out: it and every later ticket of its partition are never acknowledged."""
        ticket.finished = True
        settled: _Settled[E] = _Settled()
        if ticket.cut:
            settled.release.append(ticket.item)
            return self._count(settled)
        queue = self._order[ticket.partition]
        while queue and queue[-1] is not ticket:
            later = queue.pop()
            later.cut = True
            if later.finished:
                settled.release.append(later.item)
        queue.pop()
        ticket.cut = True
        settled.release.append(ticket.item)
        if not queue:
            del self._order[ticket.partition]
        self._cut.add(ticket.partition)  # and the tasks taken from it later, until the next assignment
        return self._count(settled)

    def _count(self, settled: _Settled[E]) -> _Settled[E]:
        self.acknowledged += len(settled.acknowledge)
        self.released += len(settled.release)
        self.unacknowledged -= len(settled.acknowledge) + len(settled.release)
        self._update_room()
        return settled

    def _update_room(self) -> None:
        if self.waiting < self.max_waiting and self.unacknowledged < self.max_unacknowledged:
            self._room.set()
        else:
            self._room.clear()
