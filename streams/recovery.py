"""What heals the executor after a restart, a rebalance, or lost state (docs/architecture.md, "Recovery").

* Before Faust opens its tables, :func:`discard_stale_tables` compares each
  RocksDB partition's persisted changelog offset with the broker's end offset.
  A folder ahead of its broker belongs to an earlier broker (the embedded one
  keeps topics in memory): it is discarded instead of letting Faust die with
  ``ConsistencyError`` at every start.
* After every rebalance, once the tables have recovered,
  :class:`PartitionRecovery` looks at the run partitions this worker gained
  and lost. Timers of runs it lost are dropped (their new owner sets its own);
  for runs it gained it re-dispatches attempts in flight (same correlation id),
  re-arms deadlines and delayed retries, and asks for the runs PostgreSQL shows
  RUNNING but the table does not have to be restored from their checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2

from models.messages import ControlCommand, ControlMessage, encode, utcnow
from streams.run_store import is_head_key
from switchyard.db import WorkflowRepository
from switchyard.kafka import end_offsets
from switchyard.settings import Settings

if TYPE_CHECKING:
    from streams.app import ExecutorApp

__all__ = ["PartitionRecovery", "discard_stale_tables", "partition_of", "persisted_offset"]

log = logging.getLogger(__name__)

_OFFSET_KEY = b"__faust\0offset__"  # where faust's RocksDB store keeps a partition's changelog offset


def partition_of(run_id: str, partitions: int) -> int:
    """The partition a run_id key lands on (Kafka's default murmur2 partitioner, as Faust and aiokafka use)."""
    return int(murmur2(run_id.encode()) & 0x7FFFFFFF) % partitions


def persisted_offset(db_path: Path) -> int | None:
    """The changelog offset Faust recorded in one partition's RocksDB folder, or None."""
    from rocksdict import AccessType, Options, Rdict

    db = Rdict(str(db_path), options=Options(raw_mode=True), access_type=AccessType.read_only())
    try:
        raw = db.get(_OFFSET_KEY)
    finally:
        db.close()
    return int(raw) if raw is not None else None


async def _end_offsets(settings: Settings, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return {}
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await end_offsets(consumer, tps, embedded_broker=settings.embedded_broker)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def discard_stale_tables(settings: Settings, tabledir: Path, table: str, changelog_topic: str) -> list[int]:
    """Delete RocksDB partitions that are ahead of the broker's changelog.

    Returns:
        The partitions discarded.
    """
    folders = {p: tabledir / f"{table}-{p}.db" for p in range(settings.topic_partitions)}
    folders = {p: path for p, path in folders.items() if path.exists()}
    if not folders:
        return []
    ends = await _end_offsets(settings, changelog_topic, settings.topic_partitions)
    stale: list[int] = []
    for partition, path in sorted(folders.items()):
        try:
            offset = await asyncio.to_thread(persisted_offset, path)
        except Exception as error:  # unreadable: as good as stale
            log.warning("cannot read %s (%s); discarding it", path, error)
            offset, end = -1, -1
        else:
            end = ends.get(partition, 0)
        if offset is None or (offset >= 0 and offset < end):
            continue
        log.warning(
            "table state %s is from an earlier broker (changelog offset %s, the broker has %s); "
            "discarding it: runs are rebuilt from the changelog and PostgreSQL",
            path,
            offset,
            end,
        )
        shutil.rmtree(path, ignore_errors=True)
        stale.append(partition)
    return stale


class PartitionRecovery:
    """Tracks which run partitions this worker owns and heals the ones it gains."""

    def __init__(self, app: ExecutorApp) -> None:
        self.app = app
        self.owned: set[int] = set()
        self.resumed = 0
        self.restore_requests = 0
        self.checkpointed_again = 0
        self._running: asyncio.Task[None] | None = None

    def current(self) -> set[int]:
        """The run partitions assigned to this worker now."""
        plans = self.app.plans_topic.get_topic_name()
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == plans}

    def on_rebalance_complete(self, *args: Any, **kwargs: Any) -> None:
        """Signal receiver: heal in the background, so recovery is not held up."""
        if self._running is not None and not self._running.done():
            self._running.cancel()
        self._running = asyncio.ensure_future(self._heal())

    async def _heal(self) -> None:
        try:
            # The signal comes once the tables have recovered; let it return first.
            await asyncio.sleep(0)
            current = self.current()
            gained, lost = current - self.owned, self.owned - current
            self.owned = current
            if lost:
                n = self.app.settings.topic_partitions
                dropped = self.app.timers.cancel_where(lambda key: partition_of(key.run_id, n) in lost)
                log.info("partitions %s moved away; dropped %d timer(s)", sorted(lost), dropped)
            if gained:
                await self.heal(gained)
                await self.ask_again(gained)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("could not resume the runs of newly assigned partitions")

    async def heal(self, partitions: Iterable[int]) -> None:
        """Resume the table's RUNNING runs in ``partitions`` and ask to restore the ones it lacks."""
        wanted = set(partitions)
        n = self.app.settings.topic_partitions

        def belongs(run_id: str) -> bool:
            return partition_of(run_id, n) in wanted

        resumed = await self.app.shell.resume_all(utcnow(), belongs)
        self.resumed += resumed
        local = {
            run_id
            for run_id in (
                k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
                for k in self.app.runs
                if not isinstance(k, bytes) or is_head_key(k)
            )
            if belongs(run_id)
        }
        missing = await self._running_in_postgres(wanted, local)
        for run_id in missing:
            message = ControlMessage(run_id=run_id, command=ControlCommand.RESTORE, reason="not in the table")
            await self.app.control_topic.send(key=run_id.encode(), value=encode(message))
            self.restore_requests += 1
        behind = resent = 0
        try:
            recorded = await asyncio.to_thread(WorkflowRepository(self.app.database.engine).versions, local)
        except Exception as error:  # PostgreSQL away: runs go on; the next rebalance or restart catches up
            log.warning("partitions %s: cannot compare with PostgreSQL (%s)", sorted(wanted), type(error).__name__)
        else:
            behind, resent = await self.app.shell.catch_up(local, recorded)
        self.checkpointed_again += behind
        if resumed or missing or behind or resent:
            log.info(
                "partitions %s: resumed %d run(s), asked to restore %d from PostgreSQL, "
                "checkpointed %d again, sent %d final update(s) again",
                sorted(wanted),
                resumed,
                len(missing),
                behind,
                resent,
            )

    async def ask_again(self, partitions: Iterable[int]) -> None:
        """Some seconds after :meth:`heal`, send the attempts in flight of ``partitions`` once more.

        Results that reach the results topic around a restart have been seen
        to go missing: Faust's end of recovery dropped them (fixed in
        :mod:`switchyard.faust_recovery`), and once more, under load, because
        Faust skipped records fetched for partitions it had paused and counted
        them as processed (fixed in :mod:`switchyard.faust_fetch`); the
        bridge's re-published ones, sent at once by :meth:`heal`, went with
        them. Kept as a second line. Asked again once things have
        settled, the bridge answers from its memory (or joins the call still
        running, or calls again if it forgot), long before the attempt's
        deadline would heal it with a retry. Half the resume grace, so this
        comes before the deadlines that passed while the worker was down.
        A rebalance meanwhile cancels it (the next one heals).
        """
        delay = self.app.settings.resume_grace_s / 2
        if delay <= 0:
            return
        await asyncio.sleep(delay)
        wanted = set(partitions) & self.owned
        n = self.app.settings.topic_partitions
        asked = await self.app.shell.resume_all(
            utcnow(), lambda run_id: partition_of(run_id, n) in wanted, dispatches_only=True
        )
        if asked:
            log.info("partitions %s: asked again for the results of %d attempt(s) in flight", sorted(wanted), asked)

    async def _running_in_postgres(self, partitions: set[int], local: set[str]) -> list[str]:
        repo = WorkflowRepository(self.app.database.engine)
        n = self.app.settings.topic_partitions
        missing: list[str] = []
        after = ""
        while True:
            page = await asyncio.to_thread(repo.running_ids, after=after, limit=2000)
            if not page:
                return missing
            missing.extend(r for r in page if r not in local and partition_of(r, n) in partitions)
            after = page[-1]
