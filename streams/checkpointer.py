"""The checkpointer: writes run snapshots to PostgreSQL, batched, idempotent, off the event loop.

Agents hand it every changed :class:`~models.run.RunState` with :meth:`put`,
which never blocks and never awaits. Only the newest snapshot of each run is
kept until the next flush; a flush writes them all in one transaction in a
worker thread (docs/architecture.md rule 6). A failed flush keeps its snapshots and tries
again with backoff, so a database outage delays the record but loses nothing
while the worker lives (and the changelog still has the state if it dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from mode import Service

from models.run import RunState
from switchyard.database import Database
from switchyard.db import Snapshot, SnapshotRepository

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


class _PartlyWritten(Exception):
    """Some snapshots of a batch were written, others not."""

    def __init__(self, written: set[str], cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.written = written


class Checkpointer(Service):
    """Batches run snapshots and upserts them into PostgreSQL."""

    def __init__(
        self,
        database: Database,
        *,
        interval_s: float = 0.2,
        batch_size: int = 500,
        max_backoff_s: float = 10.0,
        **kwargs: Any,
    ) -> None:
        self.database = database
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.max_backoff_s = max_backoff_s
        self._pending: dict[str, Snapshot] = {}
        self._wakeup = asyncio.Event()
        self._flushing = asyncio.Lock()
        self.written = 0
        self.failures = 0
        self.last_error: str | None = None
        super().__init__(**kwargs)

    def put(self, state: RunState, changed: frozenset[str] | None = None) -> None:
        """Queue a snapshot; a newer one of the same run replaces it, keeping both's changes. Never blocks.

        Args:
            state: The run's state.
            changed: The executions that changed since the last snapshot put
                (None: all of them, as for a run's first snapshot).
        """
        snapshot = Snapshot(state, changed)
        kept = self._pending.get(state.run_id)
        self._pending[state.run_id] = snapshot if kept is None else kept.merged(snapshot)
        if len(self._pending) >= self.batch_size:
            self._wakeup.set()

    @property
    def backlog(self) -> int:
        """Snapshots waiting to be written."""
        return len(self._pending)

    async def flush(self) -> int:
        """Write what is pending now; on failure, keep it for the next try.

        Returns:
            How many runs were written.
        """
        # One flush at a time: the shutdown flush waits for a write in flight
        # instead of finding nothing pending and returning early.
        async with self._flushing:
            if not self._pending:
                return 0
            batch, self._pending = self._pending, {}
            try:
                await asyncio.to_thread(self._write, list(batch.values()))
            except BaseException as error:
                # Put the batch back under anything newer that arrived meanwhile
                # (also when cancelled: the write may not have happened, and
                # writing it again is harmless, the upsert being idempotent).
                done = error.written if isinstance(error, _PartlyWritten) else set()
                for run_id, snapshot in batch.items():
                    if run_id in done:
                        continue
                    newer = self._pending.get(run_id)
                    self._pending[run_id] = snapshot if newer is None else snapshot.merged(newer)
                if isinstance(error, Exception):
                    self.failures += 1
                    self.last_error = f"{type(error).__name__}: {error}".splitlines()[0]
                raise
            self.written += len(batch)
            self.last_error = None
            return len(batch)

    def _write(self, states: list[Snapshot]) -> None:
        """Upsert a batch; if it fails, run by run, so one bad snapshot does not hold back the others.

        Raises:
            Exception: The first error, when some snapshots could not be written
                (the written ones are dropped from the batch the caller keeps).
        """
        repo = SnapshotRepository(self.database.engine)
        try:
            repo.upsert(states)
            return
        except Exception as batch_error:
            if len(states) == 1:
                raise
            first: Exception = batch_error
        failed: list[Snapshot] = []
        for state in states:
            try:
                repo.upsert([state])
            except Exception as error:
                failed.append(state)
                first = error
        if failed:
            written = {s.state.run_id for s in states} - {s.state.run_id for s in failed}
            self.written += len(written)
            raise _PartlyWritten(written, first)

    @Service.task
    async def _flush_loop(self) -> None:
        backoff = self.interval_s
        while not self.should_stop:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=backoff)
            self._wakeup.clear()
            try:
                await self.flush()
                backoff = self.interval_s
            except Exception:
                backoff = min(self.max_backoff_s, max(backoff * 2, 0.5))
                log.warning(
                    "checkpoint failed; %d run(s) kept for retry in %.1fs: %s",
                    len(self._pending),
                    backoff,
                    self.last_error,
                )

    async def on_stop(self) -> None:
        """Write what is left before the database closes."""
        for _ in range(3):
            try:
                await self.flush()
                return
            except Exception:
                await asyncio.sleep(0.5)
        if self._pending:
            log.error("stopping with %d run snapshot(s) not written: %s", len(self._pending), self.last_error)
