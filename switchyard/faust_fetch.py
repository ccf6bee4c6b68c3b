"""A Faust consumer that never moves past records it did not deliver.

faust-streaming 0.15 "pauses" a partition only in its own bookkeeping: the
set of active partitions shrinks, while aiokafka goes on fetching every
assigned partition. Two things follow, and together they lost records:

* The consumer thread is handed that very set, which the event loop keeps
  changing, and passes it to aiokafka's ``fetched_records``. Once it is empty
  (at the end of a recovery the changelogs are paused before the streams are
  resumed), aiokafka reads it as "no filter" and hands out the records of
  *every* partition, moving its position past them.
* Faust's ``getmany`` then drops the records of partitions that are not
  active, silently. When the next records of such a partition arrive, Faust
  sees a gap in the offsets and marks the skipped ones as done
  (``Consumer._add_gap``), so the next commit goes past them.

After a ``kill -9`` restart with a backlog, that lost whole runs of
submissions and results (seen in ``tests/faults/test_restart_backlog.py``).
Here the thread fetches for a fixed copy of the set, and records of
partitions that stopped being active meanwhile are handed back: aiokafka is
sought back to the first of them, so they are fetched again. A gap Faust
still sees is logged as a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Set
from typing import Any

import aiokafka
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

__all__ = ["GuardedConsumer", "GuardedConsumerThread", "GuardedTransport", "undelivered"]

log = logging.getLogger(__name__)

RecordMap = Mapping[TP, list[Any]]


def undelivered(records: RecordMap, active: Set[TP] | None, buffered: Set[TP]) -> dict[TP, int]:
    """The partitions of ``records`` that Faust's ``getmany`` would drop, with the offset to fetch again from.

    Args:
        records: Fetched records by partition, in offset order.
        active: The partitions Faust delivers now (None: all of them).
        buffered: Partitions Faust delivers although their stream's buffer is full.
    """
    if active is None:
        return {}
    return {tp: batch[0].offset for tp, batch in records.items() if batch and tp not in active and tp not in buffered}


class GuardedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Fetches for a fixed copy of the active partitions, never for an empty set."""

    async def _fetch_records(
        self,
        consumer: aiokafka.AIOKafkaConsumer,
        active_partitions: Set[TP],
        timeout: float | None = None,  # noqa: ASYNC109 (Faust's signature)
        max_records: int | None = None,
    ) -> RecordMap:
        # A copy: the event loop changes the set while this call waits.
        # Empty means "every partition" to aiokafka, not "none".
        wanted = set(active_partitions)
        if not wanted:
            return {}
        return await super()._fetch_records(consumer, wanted, timeout=timeout, max_records=max_records)

    async def fetch_again(self, offsets: dict[TP, int]) -> None:
        """Seek partitions back so that records handed out but not delivered are fetched again."""
        consumer = self._ensure_consumer()

        async def seek() -> None:
            assignment = consumer._subscription.subscription.assignment
            for tp, offset in offsets.items():
                if assignment is None or tp not in consumer.assignment():
                    continue  # a revoked partition is sought by its next owner
                state = assignment.state_value(tp)
                # Only back: a seek made meanwhile (to the committed offset) already re-reads these records.
                if state.has_valid_position and state.position > offset:
                    consumer.seek(tp, offset)

        await self.call_thread(seek)


class GuardedConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer whose fetches never skip records (see the module)."""

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return GuardedConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _getmany(self, active_partitions: Set[TP] | None, timeout: float) -> RecordMap:  # noqa: ASYNC109
        thread = self._thread
        assert isinstance(thread, GuardedConsumerThread)
        wanted = None if active_partitions is None else set(active_partitions)
        records = dict(await thread.getmany(wanted, timeout))
        # Checked again after each await: Faust's getmany filters right after
        # this returns, against the active partitions of that moment.
        while again := undelivered(records, self._active_partitions, self._buffered_partitions):
            for tp in again:
                del records[tp]
            log.info(
                "fetching again from %s: paused during the fetch",
                ", ".join(f"{tp.topic}[{tp.partition}]@{offset}" for tp, offset in sorted(again.items())),
            )
            await thread.fetch_again(again)
        return records

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # Faust counts the records of a gap as done; on these topics (not
        # compacted, not transactional) a gap means records were skipped.
        log.warning(
            "%s: offsets %d..%d were skipped by the consumer; Faust counts them as processed",
            tp,
            offset_from,
            offset_to - 1,
        )
        await super()._add_gap(tp, offset_from, offset_to)


class GuardedTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport with :class:`GuardedConsumer`."""

    Consumer = GuardedConsumer
