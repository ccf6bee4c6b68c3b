"""The guarded consumer: records fetched for partitions Faust does not deliver are fetched again."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from faust.types import TP

from switchyard.faust_fetch import GuardedConsumer, GuardedConsumerThread, undelivered

PLANS_0 = TP("orchestrator.plans", 0)
PLANS_1 = TP("orchestrator.plans", 1)
RESULTS_0 = TP("results.topic", 0)


@dataclass
class Rec:
    offset: int


def batch(first: int, last: int) -> list[Rec]:
    return [Rec(o) for o in range(first, last + 1)]


def test_records_of_partitions_not_active_are_to_be_fetched_again_from_their_first_offset() -> None:
    records = {PLANS_0: batch(11, 30), PLANS_1: batch(12, 31), RESULTS_0: batch(5, 6)}

    assert undelivered(records, {PLANS_0}, set()) == {PLANS_1: 12, RESULTS_0: 5}
    assert undelivered(records, {PLANS_0}, {PLANS_1}) == {RESULTS_0: 5}
    assert undelivered(records, set(), set()) == {PLANS_0: 11, PLANS_1: 12, RESULTS_0: 5}


def test_with_every_partition_active_nothing_is_fetched_again() -> None:
    records = {PLANS_0: batch(11, 30), PLANS_1: []}

    assert undelivered(records, None, set()) == {}
    assert undelivered(records, {PLANS_0, PLANS_1}, set()) == {}


class FakeFetcher:
    def __init__(self, answer: Mapping[TP, list[Rec]]) -> None:
        self.answer = answer
        self.asked: list[set[TP]] = []
        self._subscriptions = SimpleNamespace(fetch_context=self._context)

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        yield

    async def fetched_records(self, partitions: set[TP], timeout: float = 0, max_records: int | None = None) -> Any:  # noqa: ASYNC109
        self.asked.append(partitions)
        return {tp: recs for tp, recs in self.answer.items() if tp in partitions}


def consumer_thread(fetcher: FakeFetcher) -> tuple[GuardedConsumerThread, Any]:
    thread = GuardedConsumerThread.__new__(GuardedConsumerThread)
    thread.consumer = SimpleNamespace(flow_active=True)  # type: ignore[assignment]
    aiokafka_consumer = SimpleNamespace(_fetcher=fetcher, _closed=False)
    fetcher._closed = False  # type: ignore[attr-defined]
    return thread, aiokafka_consumer


async def test_the_thread_never_fetches_for_an_empty_set_which_aiokafka_reads_as_every_partition() -> None:
    fetcher = FakeFetcher({PLANS_0: batch(11, 30)})
    thread, consumer = consumer_thread(fetcher)

    assert await thread._fetch_records(consumer, set(), timeout=1.0) == {}
    assert fetcher.asked == []


async def test_the_thread_fetches_for_a_copy_of_the_set_the_event_loop_keeps_changing() -> None:
    fetcher = FakeFetcher({PLANS_0: batch(11, 30), RESULTS_0: batch(1, 2)})
    thread, consumer = consumer_thread(fetcher)
    live = {PLANS_0}

    got = await thread._fetch_records(consumer, live, timeout=1.0)
    live.clear()

    assert got == {PLANS_0: batch(11, 30)}
    assert fetcher.asked == [{PLANS_0}]
    assert fetcher.asked[0] is not live


class FakeThread(GuardedConsumerThread):
    """Answers fetches from a script; records each seek back, and runs ``during_seek`` while it seeks."""

    def __init__(self, answer: Mapping[TP, list[Rec]], during_seek: Any = None) -> None:  # no Faust service
        self.answer = answer
        self.during_seek = during_seek
        self.sought: list[dict[TP, int]] = []

    async def getmany(self, active_partitions: Any, timeout: float) -> Any:  # noqa: ASYNC109
        return dict(self.answer)

    async def fetch_again(self, offsets: dict[TP, int]) -> None:
        self.sought.append(dict(offsets))
        if self.during_seek is not None:
            self.during_seek()
            self.during_seek = None


def guarded_consumer(thread: FakeThread, active: set[TP] | None) -> GuardedConsumer:
    consumer = GuardedConsumer.__new__(GuardedConsumer)
    consumer._thread = thread
    consumer._active_partitions = active  # type: ignore[assignment]  # Faust types it without None
    consumer._buffered_partitions = set()
    return consumer


async def test_records_of_a_partition_paused_during_the_fetch_are_handed_back_not_dropped() -> None:
    # The end of a recovery: the changelog is paused, the plans not resumed yet.
    thread = FakeThread({PLANS_0: batch(11, 30), RESULTS_0: batch(3, 4)})
    consumer = guarded_consumer(thread, {RESULTS_0})

    got = await consumer._getmany({PLANS_0, RESULTS_0}, 1.0)

    assert got == {RESULTS_0: batch(3, 4)}
    assert thread.sought == [{PLANS_0: 11}]


async def test_a_partition_paused_while_others_are_sought_back_is_handed_back_too() -> None:
    active = {PLANS_0, RESULTS_0}
    thread = FakeThread(
        {PLANS_0: batch(11, 30), PLANS_1: batch(7, 9), RESULTS_0: batch(3, 4)},
        during_seek=lambda: active.discard(RESULTS_0),
    )
    consumer = guarded_consumer(thread, active)

    got = await consumer._getmany({PLANS_0, PLANS_1, RESULTS_0}, 1.0)

    assert got == {PLANS_0: batch(11, 30)}
    assert thread.sought == [{PLANS_1: 7}, {RESULTS_0: 3}]


async def test_records_of_active_partitions_are_delivered_as_fetched() -> None:
    thread = FakeThread({PLANS_0: batch(11, 30), PLANS_1: batch(7, 9)})
    consumer = guarded_consumer(thread, {PLANS_0, PLANS_1})

    assert await consumer._getmany({PLANS_0, PLANS_1}, 1.0) == {PLANS_0: batch(11, 30), PLANS_1: batch(7, 9)}
    assert thread.sought == []


class FakeAiokafka:
    """An aiokafka consumer as far as a seek back sees it: positions of assigned partitions, and seeks."""

    def __init__(self, positions: dict[TP, int]) -> None:
        self.positions = positions
        self.seeks: list[tuple[TP, int]] = []
        states = {tp: SimpleNamespace(has_valid_position=True, position=p) for tp, p in positions.items()}
        self._subscription = SimpleNamespace(
            subscription=SimpleNamespace(assignment=SimpleNamespace(state_value=states.__getitem__))
        )

    def assignment(self) -> set[TP]:
        return set(self.positions)

    def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


class SeekingThread(GuardedConsumerThread):
    """A consumer thread whose calls run on the caller's loop."""

    def __init__(self, consumer: FakeAiokafka) -> None:  # no Faust service
        self.fake = consumer

    def _ensure_consumer(self) -> Any:
        return self.fake

    async def call_thread(self, fun: Any, *args: Any, **kwargs: Any) -> Any:
        return await fun(*args, **kwargs)


async def test_fetching_again_seeks_back_only_partitions_still_assigned_and_past_the_offset() -> None:
    # PLANS_1 was sought meanwhile (to its committed offset, 5): it reads those records again anyway.
    consumer = FakeAiokafka({PLANS_0: 31, PLANS_1: 5})
    thread = SeekingThread(consumer)

    await thread.fetch_again({PLANS_0: 11, PLANS_1: 12, RESULTS_0: 3})

    assert consumer.seeks == [(PLANS_0, 11)]
