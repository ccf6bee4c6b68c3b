"""The end of Faust's rebalance recovery, in an order that loses no events.

At the end of a rebalance, faust-streaming 0.15 resumes the stream
partitions, then seeks them to their committed offsets, then calls
``flow_control.resume()``, which clears every stream's queue. The consumer's
flow is already running at that point (recovery started it to read the
changelogs; a new consumer starts with it running), so events fetched while
the seek is in flight land in the queues and are cleared, while the
consumer's position has moved past them: they are never processed. After a
restart with a backlog, that silently dropped agent results (seen as
attempts healed only by their deadline), and could as well drop submissions,
step timeouts or the bridge's tasks.

:class:`OrderedRecovery` seeks while the stream partitions are still paused and
resumes them only after the queues are cleared. :class:`SwitchyardTableManager`
installs it; both apps name it in their ``TableManager`` setting.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery

__all__ = ["OrderedRecovery", "SwitchyardTableManager"]


class OrderedRecovery(Recovery):
    """Faust's recovery with its ends reordered: seek, clear the queues, then resume the streams.

    Both ends are faust-streaming 0.15.3's steps in that order:
    :meth:`on_recovery_completed` (an app with tables: the executor) and
    :meth:`_resume_streams` (an app without: the bridge, whose consumer's flow
    is running on its first assignment).
    """

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        """Call when active table recovery is completed."""
        self.log.info("Restore complete!")
        await self.app.on_rebalance_complete.send()
        self._set_recovery_ended()
        callbacks = [
            asyncio.ensure_future(
                table.on_recovery_completed(self.actives_for_table[table], self.standbys_for_table[table])
            )
            for table in self.tables.values()
        ]
        if callbacks:
            await asyncio.wait(callbacks)
        if self.app.consumer_generation_id != generation_id:
            self.log.warning(
                f"Recovery rebalancing again app id {self.app.consumer_generation_id} param {generation_id}"
            )
            return
        await self._seek_then_resume()
        if not self.app.assignor.assigned_standbys():
            self.tables.on_standbys_ready()
        self.app.on_rebalance_end()
        self.log.info("Worker ready")

    async def _resume_streams(self, generation_id: int = 0) -> None:
        await self.app.on_rebalance_complete.send()
        if self.app.consumer_generation_id != generation_id:
            self.log.warning("Recovery rebalancing again")
            return
        await self._seek_then_resume()
        self.tables.on_standbys_ready()
        self.app.on_rebalance_end()
        self.log.info("Worker ready")

    async def _seek_then_resume(self) -> None:
        consumer = self.app.consumer
        assignment = consumer.assignment()
        if assignment:
            # The stream partitions are still paused (Faust pauses all it is
            # assigned): nothing is fetched for them until they are at their
            # committed offsets.
            self.log.info("Seek stream partitions to committed offsets.")
            await self._wait(consumer.perform_seek(), timeout=self.app.conf.broker_request_timeout)
        self.completed.set()
        self.app.flow_control.resume()  # clears the stream queues, which hold nothing yet
        consumer.resume_partitions({tp for tp in assignment if not self._is_changelog_tp(tp)})
        consumer.resume_flow()
        await cast(Any, self.app)._fetcher.maybe_start()
        self.tables.on_actives_ready()


class SwitchyardTableManager(TableManager):
    """Faust's table manager, with :class:`OrderedRecovery`."""

    @property
    def recovery(self) -> Recovery:
        """Recovery service used by this table manager."""
        if self._recovery is None:
            self._recovery = OrderedRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
