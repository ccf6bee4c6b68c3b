"""The intake: many tasks at once, acknowledged in order per partition, bounded, let go on a stop.

The property tests drive Faust's own commit arithmetic
(``faust.transport.consumer.Consumer._new_offset``) with the acknowledgements
the intake makes, and check that the committed offset never passes a task
still being handled or let go, whatever order the calls end in, across a
revocation too.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import pytest
from faust.transport.consumer import Consumer
from hypothesis import given, settings
from hypothesis import strategies as st
from intervaltree import IntervalTree

from agents_bridge.intake import Intake

pytestmark = pytest.mark.timeout(60)

Item = tuple[Hashable, int]  # (partition, offset)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


class FaustCommits:
    """Faust's consumer bookkeeping of acknowledged offsets, with its real commit arithmetic.

    ``ack`` does what ``Consumer.ack`` does with an offset, and ``commit`` what
    ``Consumer._filter_committable_offsets`` and ``_commit_offsets`` do,
    calling Faust's own ``_new_offset``.
    """

    def __init__(self) -> None:
        self._acked: defaultdict[Hashable, list[int]] = defaultdict(list)
        self._acked_index: defaultdict[Hashable, set[int]] = defaultdict(set)
        self._gap: defaultdict[Hashable, IntervalTree] = defaultdict(IntervalTree)
        # Faust reads committed offsets with `offset if offset else None`: no commit yet, or 0, is None.
        self._committed_offset: defaultdict[Hashable, int | None] = defaultdict(lambda: None)
        # What the broker has: the last commit, which a revocation does not forget.
        self._broker: dict[Hashable, int] = {}

    def ack(self, partition: Hashable, offset: int) -> None:
        committed = self._committed_offset[partition]
        if (committed is None or offset >= committed) and offset not in self._acked_index[partition]:
            self._acked_index[partition].add(offset)
            self._acked[partition].append(offset)

    def commit(self) -> None:
        for partition in list(self._acked):
            offset = Consumer._new_offset(self, partition)  # type: ignore[arg-type]
            if offset is not None and Consumer._should_commit(self, partition, offset):  # type: ignore[arg-type]
                self._committed_offset[partition] = offset
                self._broker[partition] = offset

    def revoke(self, partition: Hashable) -> None:
        """What ``Consumer.on_partitions_revoked`` does, before Faust waits for the messages in hand and commits."""
        for state in (self._acked, self._acked_index, self._gap, self._committed_offset):
            state.pop(partition, None)

    def committed(self, partition: Hashable) -> int:
        """The partition's committed offset on the broker (0 before any commit)."""
        return self._broker.get(partition, 0)


@dataclass
class Scenario:
    """Tasks that end when told to, taken by an intake that acknowledges into :class:`FaustCommits`."""

    max_waiting: int = 1000
    max_unacknowledged: int = 1000
    faust: FaustCommits = field(default_factory=FaustCommits)
    acknowledged: list[Item] = field(default_factory=list)
    released: list[Item] = field(default_factory=list)
    ends: dict[Item, asyncio.Future[bool]] = field(default_factory=dict)
    started: dict[Item, Callable[[], None]] = field(default_factory=dict)
    offsets: defaultdict[Hashable, int] = field(default_factory=lambda: defaultdict(int))
    intake: Intake[Item] = field(init=False)

    def __post_init__(self) -> None:
        self.intake = Intake(
            acknowledge=self._acknowledge,
            release=self.released.append,
            max_waiting=self.max_waiting,
            max_unacknowledged=self.max_unacknowledged,
        )

    async def _acknowledge(self, item: Item) -> None:
        self.acknowledged.append(item)
        self.faust.ack(*item)

    async def take(self, partition: Hashable = 0) -> Item:
        item = (partition, self.offsets[partition])
        self.offsets[partition] += 1
        self.ends[item] = asyncio.get_running_loop().create_future()

        async def work(started: Callable[[], None]) -> bool:
            self.started[item] = started
            return await self.ends[item]

        await self.intake.take(item, partition, work)
        return item

    async def end(self, item: Item, carried_out: bool = True) -> None:
        self.ends[item].set_result(carried_out)
        await settle()

    async def fail(self, item: Item, error: BaseException) -> None:
        self.ends[item].set_exception(error)
        await settle()


# ------------------------------------------------------------- order


async def test_a_task_is_acknowledged_once_every_earlier_one_of_its_partition_is() -> None:
    s = Scenario()
    items = [await s.take() for _ in range(4)]
    await s.end(items[2])
    await s.end(items[1])
    assert s.acknowledged == []
    assert s.intake.unacknowledged == 4
    await s.end(items[0])
    assert s.acknowledged == items[:3], "in offset order"
    await s.end(items[3])
    assert s.acknowledged == items
    assert (s.intake.unacknowledged, s.intake.running) == (0, 0)


async def test_partitions_are_acknowledged_independently() -> None:
    s = Scenario()
    slow = await s.take(0)
    fast = [await s.take(1) for _ in range(3)]
    for item in fast:
        await s.end(item)
    assert s.acknowledged == fast, "partition 1 does not wait for partition 0"
    await s.end(slow)
    assert s.acknowledged[-1] == slow


async def test_a_task_let_go_and_every_later_one_of_its_partition_stay_unacknowledged() -> None:
    s = Scenario()
    items = [await s.take() for _ in range(5)]
    other = await s.take(1)
    await s.end(items[0])
    await s.end(items[2])  # finished before the let-go: released with it
    await s.end(items[1], carried_out=False)
    assert s.acknowledged == [items[0]]
    assert sorted(s.released) == [items[1], items[2]]
    await s.end(items[4])  # finished after it: released when it ends
    await s.end(items[3])
    await s.end(other)
    assert s.acknowledged == [items[0], other]
    assert sorted(s.released) == items[1:]
    assert s.intake.unacknowledged == 0
    cut = await s.take()  # taken before the next assignment: let go at once
    await settle()
    assert cut not in s.started, "not handled"
    assert s.released[-1] == cut
    assert (s.intake.unacknowledged, s.intake.running) == (0, 0)
    s.intake.reopen()  # the partitions were assigned again
    after = await s.take()  # delivered again: acknowledged as usual
    await s.end(after)
    assert s.acknowledged[-1] == after


async def test_a_task_taken_after_a_let_go_is_not_committed_past_it_when_the_partition_is_revoked() -> None:
    # Offsets 0-4 acknowledged, 5-8 sent away (they waited behind their agent's
    # limit), then the consumer takes 9 (another agent) before Faust stops the
    # flow. Faust's revocation forgets the committed offset and commits what is
    # acknowledged next: had 9 been acknowledged, it would commit 10, and 5-8
    # would never be delivered again.
    s = Scenario()
    items = [await s.take() for _ in range(9)]
    for item in items[:5]:
        await s.end(item)
    s.faust.commit()
    assert s.faust.committed(0) == 5
    for item in items[5:]:
        await s.end(item, carried_out=False)
    late = await s.take()
    await settle()
    assert late not in s.started, "not handled: its partition is cut"
    assert s.released[-1] == late
    s.faust.revoke(0)
    await s.end(late)  # harmless: it never ran
    s.faust.commit()
    assert s.faust.committed(0) == 5, "the tasks let go are delivered again"
    assert s.intake.unacknowledged == 0


async def test_a_cut_holds_for_every_task_of_its_partition_until_the_next_assignment() -> None:
    s = Scenario()
    head = await s.take(0)
    sent = await s.take(0)
    other = await s.take(1)
    await s.end(sent, carried_out=False)
    behind = await s.take(0)  # after the let-go, while the head still runs
    await settle()
    assert behind not in s.started
    assert s.released == [sent, behind]
    await s.end(head)
    assert s.acknowledged == [head], "earlier tasks are acknowledged as usual"
    await s.end(other)
    assert s.acknowledged[-1] == other, "other partitions go on"
    more = await s.take(1)
    await settle()
    assert more in s.started
    s.intake.reopen()
    again = await s.take(0)
    await s.end(again)
    assert s.acknowledged[-1] == again


async def test_a_handler_that_raises_is_acknowledged_like_faust_would() -> None:
    s = Scenario()
    item = await s.take()
    await s.fail(item, RuntimeError("bug"))
    assert s.acknowledged == [item]


async def test_a_failed_acknowledgement_releases_the_task(caplog: pytest.LogCaptureFixture) -> None:
    s = Scenario()
    items = [await s.take() for _ in range(3)]
    acknowledge = s.intake._acknowledge

    async def failing(item: Item) -> None:
        if item == items[1]:
            raise RuntimeError("broken")
        await acknowledge(item)

    s.intake._acknowledge = failing
    with caplog.at_level(logging.ERROR, logger="agents_bridge.intake"):
        for item in items:
            await s.end(item)
    assert s.acknowledged == [items[0], items[2]], "the tasks after it were carried out: acknowledged"
    assert s.released == [items[1]], "not left in Faust's unacknowledged set, which a rebalance waits to empty"
    assert (s.intake.unacknowledged, s.intake.acknowledged, s.intake.released) == (0, 2, 1)
    assert "could not acknowledge a task" in caplog.text


async def test_close_cancels_the_running_tasks_and_releases_them() -> None:
    s = Scenario()
    done = await s.take()
    running = [await s.take() for _ in range(2)]
    await s.end(done)
    await s.intake.close()
    assert s.acknowledged == [done]
    assert sorted(s.released) == running
    assert (s.intake.running, s.intake.unacknowledged) == (0, 0)


# ------------------------------------------------------- backpressure


async def test_take_waits_while_max_waiting_tasks_have_not_started() -> None:
    s = Scenario(max_waiting=2)
    first = await s.take()
    second = asyncio.create_task(s.take())
    await settle()
    assert not second.done(), "two tasks wait for their call: the consumer waits before taking a third"
    assert s.intake.full
    s.started[first]()  # its call starts: it no longer waits
    await asyncio.wait_for(second, 1)
    assert not s.intake.full
    assert (s.intake.waiting, s.intake.running) == (1, 2)


async def test_take_waits_while_max_unacknowledged_tasks_are_held() -> None:
    s = Scenario(max_unacknowledged=3)
    head = await s.take()
    behind = await s.take()
    third = asyncio.create_task(s.take())
    await settle()
    assert s.intake.full
    for item in (behind, (0, 2)):
        s.started[item]()
        await s.end(item)  # finished, but behind the head of the partition
    assert not third.done(), "finished tasks waiting for an earlier one count too"
    await s.end(head)
    await asyncio.wait_for(third, 1)
    assert s.acknowledged == [head, behind, (0, 2)]


# ------------------------------------------- Faust's commit arithmetic


def test_faust_alone_commits_past_a_task_still_running() -> None:
    """Why the intake orders acknowledgements (faust-streaming issue #606): the two ways Faust goes past."""
    faust = FaustCommits()
    faust.ack(0, 1)  # offset 0 still running, before the partition's first commit
    faust.commit()
    assert faust.committed(0) == 2, "Faust committed past offset 0"
    faust.ack(0, 3)  # offset 2 still running: the run 3.. starts one past the commit
    faust.commit()
    assert faust.committed(0) == 4, "Faust committed past offset 2"


@settings(max_examples=300, deadline=None)
@given(
    partitions=st.lists(st.integers(0, 2), min_size=1, max_size=30),
    order=st.randoms(use_true_random=False),
    let_go=st.sets(st.integers(0, 29), max_size=3),
    rebalance=st.none() | st.tuples(st.integers(0, 30), st.lists(st.integers(0, 2), max_size=6)),
)
def test_the_committed_offset_never_passes_a_task_still_being_handled_or_let_go(
    partitions: list[int], order: Any, let_go: set[int], rebalance: tuple[int, list[int]] | None
) -> None:
    """Calls end in any order; ``let_go`` ones are sent away.

    With a ``rebalance`` (after ``at`` calls ended): the calls to let go that
    are still waiting are sent away, the consumer takes the ``later`` tasks
    (it goes on a few turns before Faust stops the flow), Faust revokes every
    partition (forgetting its committed offsets, as ``on_partitions_revoked``
    does), and then the calls in hand end and are committed.
    """

    async def scenario() -> None:
        s = Scenario()
        items = [await s.take(p) for p in partitions]
        ending = list(items)
        order.shuffle(ending)
        let_go_items = {items[i] for i in let_go if i < len(items)}
        unfinished = set(items)
        later_items: list[Item] = []

        async def end(item: Item, carried_out: bool) -> None:
            await s.end(item, carried_out=carried_out)
            unfinished.discard(item)
            s.faust.commit()
            for partition in {p for p, _ in items + later_items}:
                committed = s.faust.committed(partition)
                first_open = min(
                    [o for p, o in unfinished | let_go_items if p == partition], default=s.offsets[partition]
                )
                assert committed <= first_open, "never past a task running or let go"
                assert all((partition, o) in s.acknowledged for o in range(committed)), "nor past one released"

        if rebalance is None:
            for item in ending:
                await end(item, item not in let_go_items)
        else:
            at, later = rebalance
            for item in ending[:at]:
                await end(item, item not in let_go_items)
            for item in ending[at:]:
                if item in let_go_items:
                    await end(item, False)  # sent away when the rebalance began
            later_items = [await s.take(p) for p in later]
            await settle()
            cut = {p for p, _ in let_go_items}
            assert not [item for item in later_items if item[0] in cut and item in s.started], "not handled"
            for partition in {p for p, _ in items + later_items}:
                s.faust.revoke(partition)
            rest = [item for item in ending[at:] if item not in let_go_items] + later_items
            order.shuffle(rest)
            unfinished.update(later_items)
            for item in rest:
                await end(item, True)
        for partition in {p for p, _ in items + later_items}:
            first_released = min([o for p, o in s.released if p == partition], default=s.offsets[partition])
            assert s.faust.committed(partition) == first_released, "everything before the first let-go is committed"
        assert s.intake.unacknowledged == 0
        assert sorted(s.acknowledged + s.released) == sorted(items + later_items)

    asyncio.run(scenario())
