"""The thin shell around the pure run state machine.

:meth:`RunShell.apply` is the only code that writes the ``runs`` table: it
reads the state, calls :func:`models.run.transition`, and stores the result,
with no ``await`` in between (docs/architecture.md, rule 3). It is called only
from the agents' ``async for`` loops (rule 2). :meth:`RunShell.carry_out` then performs
the effects: sends tasks, sets timers, queues checkpoints, publishes updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeAlias

from pydantic import ValidationError

from models.messages import (
    RUN_ID_PATTERN,
    AgentCancel,
    ControlCommand,
    ControlMessage,
    ErrorKind,
    WorkflowSubmission,
    correlation_id,
    encode,
    utcnow,
)
from models.plan import DEFAULT_INPUT_TIMEOUT_S, WorkflowPlan
from models.run import (
    AgentPolicy,
    CancelAgentTask,
    Checkpoint,
    DeadLetter,
    DispatchTask,
    Effect,
    Event,
    ExecutionDefaults,
    PublishMonitoring,
    RunFinished,
    RunRestored,
    RunState,
    RunStatus,
    RunSubmitted,
    ScheduleTimeout,
    event_run_id,
    fail_too_large,
    fail_unreadable,
    final_update,
    resume,
    transition,
)
from streams.run_store import (
    Layout,
    StoredHead,
    StoredRecords,
    ended_at,
    inline_of,
    is_head_key,
    part_keys,
    parts_named_by,
    read_state,
    records_of,
)
from streams.timers import TimerKey
from switchyard.limits import BoundedSender, DeadLetters, record_size
from switchyard.registry import Registry, RegistryError

__all__ = ["TIMEOUT_REPEAT", "Origin", "RunRecords", "RunShell", "Sender"]

log = logging.getLogger(__name__)


_RUN_ID = re.compile(RUN_ID_PATTERN)

TIMEOUT_REPEAT = timedelta(seconds=30)
"""How often a step timeout is sent again while its attempt has not ended."""

Origin: TypeAlias = tuple[str, bytes | None, bytes]
"""Where an event came from: (topic, key, raw value)."""


class Sender(Protocol):
    """Sends bytes to a topic (a Faust topic's ``send``)."""

    async def send(self, *, key: bytes, value: bytes) -> Any:
        """Send one message."""
        ...


class RunRecords(Protocol):
    """What the shell asks PostgreSQL (blocking; called in a worker thread)."""

    def exists(self, run_id: str) -> str | None:
        """The recorded status of a run, or None."""
        ...

    def versions(self, run_ids: Iterable[str]) -> dict[str, int]:
        """The recorded version of each of these runs PostgreSQL has."""
        ...

    def get_state(self, run_id: str) -> RunState | None:
        """The run's last checkpoint, or None."""
        ...

    def record_rejected(self, run_id: str, *, kind: str, message: str, plan: Any = None) -> bool:
        """Record a submission that could not start as a FAILED run."""
        ...

    def fingerprint(self, run_id: str) -> str | None:
        """The fingerprint of the submission that started a recorded run (None: refused, or unknown)."""
        ...


class _Checkpoints(Protocol):
    def put(self, state: RunState, changed: frozenset[str] | None = None) -> None: ...


class _Timers(Protocol):
    def call_at(self, when: datetime, key: TimerKey, action: Callable[[], Any]) -> None: ...

    def cancel(self, key: TimerKey) -> None: ...

    def cancel_where(self, matches: Callable[[TimerKey], bool]) -> int: ...


class _Unusable(Exception):
    """A stored state the shell cannot go on from.

    Attributes:
        raw: The stored bytes.
        state: The state, when it could be read (then it is too large).
        reason: Why it cannot be read, when it could not.
    """

    def __init__(self, raw: bytes, state: RunState | None, reason: str | None) -> None:
        super().__init__(reason or "the stored state is over the size limit")
        self.raw = raw
        self.state = state
        self.reason = reason

    @property
    def finished(self) -> bool:
        """Whether the stored bytes say the run had finished (as far as they can be read)."""
        if self.state is not None:
            return self.state.status.finished
        try:
            status = json.loads(self.raw).get("status")
        except (ValueError, AttributeError, RecursionError):
            return False
        return status in {s.value for s in RunStatus if s.finished}


class _ParsedStates:
    """The last states read or written, parsed, for the runs that moved last.

    Parsing a run's JSON was a third of the cost of applying an event (py-spy
    on bench W1). A run in flight is read again at its next event, so its
    parsed state is kept and used while the stored bytes are the same (a
    recovered or rewritten record is parsed afresh). States are frozen models
    that the pure core never changes in place, so sharing one is safe.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._states: dict[bytes, tuple[bytes, RunState, StoredHead | None]] = {}

    def get(self, key: bytes, raw: bytes) -> RunState | None:
        kept = self._states.get(key)
        return kept[1] if kept is not None and kept[0] == raw else None

    def stored_head(self, key: bytes) -> StoredHead | None:
        """What the head last read or written holds itself (kept when written; else read from its bytes once)."""
        kept = self._states.get(key)
        if kept is None:
            return None
        raw, state, head = kept
        if head is None:
            head = inline_of(raw)
            self._states[key] = (raw, state, head)
        return head

    def forget(self, key: bytes) -> None:
        self._states.pop(key, None)

    def put(self, key: bytes, raw: bytes, state: RunState, head: StoredHead | None = None) -> None:
        self._states.pop(key, None)
        self._states[key] = (raw, state, head)
        if len(self._states) > self._size:
            del self._states[next(iter(self._states))]


class RunShell:
    """Applies events to runs and carries out the effects.

    Args:
        runs: The ``runs`` table (run_id bytes -> RunState JSON bytes).
        tasks: Where agent tasks go (the bridge's topic).
        cancels: Where requests to cancel an agent's task go (the bridge reads them).
        control: The executor's own control topic (for step timeouts).
        monitoring: Where live updates go.
        deadletter: Where unprocessable events go.
        checkpoints: Receives every changed state.
        timers: Runs delayed dispatches and deadlines.
        records: PostgreSQL's view of runs, for runs the table does not have.
        registry: Where the agents' policies come from (None: global defaults only).
        default_timeout_s: The global default deadline of an attempt.
        default_input_timeout_s: The global default wait of a question for its answer.
        resume_grace_s: After a restart, the least time before a passed deadline fires.
        retention_s: How long a finished run stays in the table after its end
            (once PostgreSQL has its final record; :meth:`evict`).
        app_name: Names this app in dead letters.
        max_message_bytes: The most a record may take (``SWITCHYARD_MAX_MESSAGE_BYTES``):
            a state over it fails its run (``state_too_large``) instead of being
            stored, and no send goes over it.
    """

    def __init__(
        self,
        *,
        runs: MutableMapping[bytes, bytes],
        tasks: Sender,
        cancels: Sender,
        control: Sender,
        monitoring: Sender,
        deadletter: Sender,
        checkpoints: _Checkpoints,
        timers: _Timers,
        records: RunRecords,
        registry: Registry | None = None,
        default_timeout_s: float = 300.0,
        default_input_timeout_s: float = DEFAULT_INPUT_TIMEOUT_S,
        resume_grace_s: float = 0.0,
        retention_s: float = 3600.0,
        app_name: str = "switchyard-executor",
        max_message_bytes: int = 1_000_000,
    ) -> None:
        self.runs = runs
        self._parsed = _ParsedStates()
        self.limit = max_message_bytes
        self.tasks = BoundedSender(tasks, "tasks", max_message_bytes)
        self.cancels = BoundedSender(cancels, "task cancels", max_message_bytes)
        self.control = BoundedSender(control, "control", max_message_bytes)
        self.monitoring = BoundedSender(monitoring, "monitoring", max_message_bytes)
        self.deadletters = DeadLetters(deadletter, app_name, max_message_bytes)
        self.checkpoints = checkpoints
        self.timers = timers
        self.records = records
        self.registry = registry
        self.default_timeout_s = default_timeout_s
        self.default_input_timeout_s = default_input_timeout_s
        self.resume_grace_s = resume_grace_s
        self.retention_s = retention_s
        self.evicted = 0
        self.app_name = app_name
        self.applied = 0
        self.ignored = 0
        self.effect_failures = 0
        self.failed_stored = 0

    # ------------------------------------------------------------ the table

    def load(self, run_id: str) -> RunState | None:
        """The stored state of a run, or None (also when it cannot be read: see :meth:`apply`)."""
        try:
            return self._read(run_id.encode())
        except _Unusable:
            return None

    def _read(self, key: bytes) -> RunState | None:
        """The stored state, strictly (its head and its parts: :mod:`streams.run_store`).

        A finished run over the limit (stored under a larger limit) is read as
        it is: it will not grow, and its record must stay what it was.

        Raises:
            _Unusable: A run that would go on is over the size limit (from an
                earlier version or setting), or the state cannot be read.
        """
        raw = self.runs.get(key)
        if raw is None:
            return None
        state = self._parsed.get(key, raw)
        if state is None:
            try:
                state = read_state(self.runs, key.decode(), raw)
            except (ValidationError, ValueError, RecursionError) as error:
                raise _Unusable(raw, None, f"{type(error).__name__}: {str(error)[:500]}") from None
            self._parsed.put(key, raw, state)
        if not state.status.finished and record_size(key, raw) > self.limit:
            raise _Unusable(raw, state, None)
        return state

    def apply(self, event: Event) -> list[Effect]:
        """Read, transition and write one run. No ``await``: never interleaved.

        A state that would be over the size limit is never written: the run
        fails with ``state_too_large`` and is stored in a reduced form that
        fits. A stored state that cannot be used (too large, unreadable) fails
        its run with the reason, whatever the event.

        Returns:
            The effects to carry out.
        """
        run_id = event_run_id(event)
        key = run_id.encode()
        try:
            state = self._read(key)
        except _Unusable as unusable:
            return self._fail_stored(run_id, unusable, event.at)
        new, effects = transition(state, event)
        if new is not None and new is not state:
            # _read left the stored head in the cache: what it holds is known without reading it again.
            inline = self._parsed.stored_head(key) if state is not None else None
            changed = next((e.changed for e in reversed(effects) if isinstance(e, Checkpoint)), None)
            # A state stored whole (an earlier layout) has no parts yet: written as for a new run.
            stored = state if inline is not None else None
            records = records_of(stored, new, changed, inline)
            size = records.biggest()
            if size > self.limit:
                log.warning(
                    "run %s: its next state has a record of %d bytes, over the limit of %d; failing it",
                    run_id,
                    size,
                    self.limit,
                )
                new, effects = fail_too_large(state, new, size=size, limit=self.limit, at=event.at)
                records = records_of(stored, new, None, inline)
                self._forget_all_timers(run_id)
            self._store(key, new, records)
            self.applied += 1
            self._forget_timers(state, new, changed)
        elif not effects:
            self.ignored += 1
        return effects

    def _store(self, key: bytes, state: RunState, records: StoredRecords) -> None:
        """Write a run's records: its parts, then its head, then delete what it no longer has.

        In this order a crash between two writes leaves a head whose parts are
        all there and all agree with it (:func:`streams.run_store.records_of`).
        """
        head = records.writes[key]
        for part, value in records.writes.items():
            if part != key:
                self.runs[part] = value
        self.runs[key] = head
        for part in records.deletes:
            if part in self.runs:
                del self.runs[part]
        self._parsed.put(key, head, state, records.head)

    def _fail_stored(self, run_id: str, unusable: _Unusable, at: datetime) -> list[Effect]:
        """Fail a run whose stored state cannot be used, and store the failure (no ``await``).

        An unreadable state that says its run had finished is left as it is
        (its record in PostgreSQL too): only a run that would go on is failed.
        """
        key = run_id.encode()
        if unusable.state is None and unusable.finished:
            reason = f"run {run_id!r} has finished, but its stored state cannot be read; it is left as it is"
            return [DeadLetter(run_id=run_id, reason=f"{reason}: {unusable.reason}")]
        if unusable.state is not None:
            size = record_size(key, unusable.raw)
            log.warning(
                "run %s: its stored state is %d bytes, over the limit of %d; failing it", run_id, size, self.limit
            )
            new, effects = fail_too_large(unusable.state, unusable.state, size=size, limit=self.limit, at=at)
        else:
            log.warning("run %s: its stored state cannot be read (%s); failing it", run_id, unusable.reason)
            try:
                raw: Any = json.loads(unusable.raw)
            except ValueError:
                raw = None
            plan_part = self.runs.get(Layout(run_id).plan)
            if isinstance(raw, dict) and "plan" not in raw and plan_part is not None:
                with contextlib.suppress(ValueError):  # a head of the split layout: its plan says which run
                    raw["plan"] = json.loads(plan_part)
            new, effects = fail_unreadable(run_id, raw, unusable.reason or "unreadable", at, limit=self.limit)
        records = records_of(None, new)
        # What the stored head names and the failed state no longer has: gone with it, no orphan left.
        orphans = tuple(part for part in parts_named_by(run_id, unusable.raw) if part not in records.writes)
        self._store(key, new, StoredRecords(records.writes, orphans))
        self.failed_stored += 1
        self._forget_all_timers(run_id)
        return effects

    def _forget_all_timers(self, run_id: str) -> None:
        """Drop every timer of a run that has just failed as a whole (its record may no longer list its attempts)."""
        self.timers.cancel_where(lambda timer: timer.run_id == run_id)

    def _forget_timers(self, old: RunState | None, new: RunState, changed: frozenset[str] | None = None) -> None:
        """Drop the deadline and dispatch timers of attempts that have just ended.

        Only the executions the transition changed are looked at (``changed``,
        else those that are not the very objects of ``old``).
        """
        keys = new.executions if changed is None else changed
        for key in keys:
            execution = new.executions.get(key)
            if execution is None:
                continue
            before = old.executions.get(key) if old is not None else None
            if before is execution:
                continue
            for attempt in execution.attempts:
                if not attempt.status.finished:
                    continue
                known = before is not None and attempt.number <= len(before.attempts)
                if known and before is not None and before.attempts[attempt.number - 1].status.finished:
                    continue
                self.timers.cancel(TimerKey("timeout", new.run_id, attempt.correlation_id))
                self.timers.cancel(TimerKey("dispatch", new.run_id, attempt.correlation_id))

    # -------------------------------------------------------------- effects

    async def handle(self, event: Event, origin: Origin | None = None) -> None:
        """Apply an event and carry out its effects.

        Args:
            event: The event.
            origin: The message it came from (topic, key, bytes), kept in a
                dead letter so that it can be inspected and replayed.
        """
        await self.carry_out(self.apply(event), origin)

    async def carry_out(self, effects: Sequence[Effect], origin: Origin | None = None) -> None:
        """Perform effects in order. Sends are awaited; checkpoints and timers are not.

        The state is already stored, so one effect failing (the broker away, a
        message too large) must not skip the others: a dispatch that was not
        sent is healed by its deadline, which is armed all the same. Failures
        are logged, never raised.
        """
        for effect in effects:
            try:
                await self._carry_out_one(effect, origin)
            except Exception:
                log.exception("could not carry out %s", type(effect).__name__)
                self.effect_failures += 1

    async def _carry_out_one(self, effect: Effect, origin: Origin | None) -> None:
        if isinstance(effect, DispatchTask):
            self._dispatch(effect)
            if effect.not_before is None:
                await self._send_task(effect)
        elif isinstance(effect, ScheduleTimeout):
            self.timers.call_at(effect.at, _timeout_key(effect), self._timeout_action(effect))
        elif isinstance(effect, PublishMonitoring):
            await self.monitoring.send(key=effect.update.run_id.encode(), value=encode(effect.update))
        elif isinstance(effect, Checkpoint):
            self.checkpoints.put(effect.state, effect.changed)
        elif isinstance(effect, RunFinished):
            log.info(
                "run %s finished: %s%s",
                effect.run_id,
                effect.status,
                f" ({effect.error.message})" if effect.error else "",
            )
            self._schedule_eviction(effect.run_id, utcnow() + timedelta(seconds=self.retention_s))
        elif isinstance(effect, DeadLetter):
            if origin is not None:
                await self.park(*origin, effect.reason)
            else:
                await self.deadletters.note(effect.run_id, effect.reason)
        elif isinstance(effect, CancelAgentTask):
            # The bridge sends the agent a CancelTask where it can; a late
            # result is ignored by the state machine either way.
            cancel = AgentCancel(
                correlation_id=effect.correlation_id,
                run_id=effect.run_id,
                step_id=effect.step_id,
                attempt=effect.attempt,
                iteration=effect.iteration,
                item=effect.item,
                agent_name=effect.agent_name,
                task_id=effect.task_id,
            )
            await self.cancels.send(key=effect.run_id.encode(), value=encode(cancel))

    def _dispatch(self, effect: DispatchTask) -> None:
        if effect.not_before is not None:
            key = TimerKey("dispatch", effect.task.run_id, effect.task.correlation_id)
            self.timers.call_at(effect.not_before, key, self._task_action(effect))

    async def _send_task(self, effect: DispatchTask) -> None:
        await self.tasks.send(key=effect.task.run_id.encode(), value=encode(effect.task))

    def _task_action(self, effect: DispatchTask) -> Callable[[], Any]:
        async def action() -> None:
            await self._send_task(effect)

        return action

    def _timeout_action(self, effect: ScheduleTimeout) -> Callable[[], Any]:
        key = _timeout_key(effect)

        async def action() -> None:
            state = self.load(effect.run_id)
            if state is None or not state.awaits(effect.step_id, effect.attempt, effect.iteration, effect.item):
                return  # the attempt ended (or the run moved to another worker)
            message = ControlMessage(
                run_id=effect.run_id,
                command=ControlCommand.STEP_TIMEOUT,
                step_id=effect.step_id,
                attempt=effect.attempt,
                iteration=effect.iteration,
                item=effect.item,
                requested_at=utcnow(),
            )
            await self.control.send(key=effect.run_id.encode(), value=encode(message))
            # A deadline is the last thing that heals a lost message; if this
            # one were lost too, the attempt would stay RUNNING for good. So it
            # fires again until the attempt is seen to end, which forgets it.
            self.timers.call_at(utcnow() + TIMEOUT_REPEAT, key, action)

        return action

    def _schedule_eviction(self, run_id: str, when: datetime) -> None:
        key = TimerKey("evict", run_id, run_id)

        async def action() -> None:
            message = ControlMessage(run_id=run_id, command=ControlCommand.EVICT, requested_at=utcnow())
            await self.control.send(key=run_id.encode(), value=encode(message))

        self.timers.call_at(when, key, action)

    async def evict(self, run_id: str) -> bool:
        """A finished run's retention is over: remove it from the table, once PostgreSQL has its last state.

        So the table, its changelog and the time to recover after a restart
        follow the runs in flight, not the history; PostgreSQL keeps every run,
        and ``status`` and ``GET /runs/{id}/`` read it there. A run that is
        not finished (a retry reopened it) stays; one whose final record is
        not written yet stays, and is asked about again later.

        Returns:
            Whether the run left the table.
        """
        state = self.load(run_id)
        if state is None or not state.status.finished:
            return False
        try:
            recorded = await asyncio.to_thread(self.records.versions, [run_id])
        except Exception as error:
            log.warning("cannot ask PostgreSQL about run %s (%s); it stays for now", run_id, type(error).__name__)
            recorded = {}
        # Read again after the await: the run may have changed meanwhile (rule 3).
        current = self.load(run_id)
        if current is None or current.version != state.version:
            return False
        if recorded.get(run_id, 0) < state.version:
            self._schedule_eviction(run_id, utcnow() + EVICT_AGAIN)
            return False
        key = run_id.encode()
        for part in part_keys(state):
            if part in self.runs:
                del self.runs[part]
        del self.runs[key]
        self._parsed.forget(key)
        self.evicted += 1
        return True

    async def submit(self, submission: WorkflowSubmission, origin: Origin | None = None) -> None:
        """Start a submitted run, at most once per run_id.

        A run the table does not have may still be recorded in PostgreSQL (the
        table was lost, or this is a late copy of a finished run's submission):
        a RUNNING one is restored from its checkpoint, a finished one is not
        started again.
        """
        run_id = submission.run_id
        if self.load(run_id) is None:
            try:
                recorded = await asyncio.to_thread(self.records.exists, run_id)
            except Exception as error:
                # PostgreSQL away: runs must go on without it (the checkpointer
                # catches up later); only a lost table *and* a lost database at
                # once could let a late copy of a finished run start again.
                log.warning("cannot ask PostgreSQL about run %s (%s); starting it", run_id, type(error).__name__)
                recorded = None
            if recorded is not None:
                known = await asyncio.to_thread(self.records.fingerprint, run_id)
                if known != submission.fingerprint():
                    reason = f"run_id {run_id!r} is already used by a different submission; not started again"
                    if origin is not None:
                        await self.park(*origin, reason)
                    else:
                        await self.deadletters.note(run_id, reason)
                    return
                if recorded == RunStatus.RUNNING:
                    await self.restore_or_resume(run_id, origin)
                else:
                    log.info("run %s is already recorded as %s; its submission is ignored", run_id, recorded)
                return
        event = RunSubmitted(
            run_id=run_id,
            plan=submission.plan,
            input=submission.input,
            at=utcnow(),
            defaults=await self.defaults_for(submission.plan),
        )
        await self.handle(event, origin)

    async def defaults_for(self, plan: WorkflowPlan) -> ExecutionDefaults:
        """The global defaults plus the registry's policy for each agent of the plan (and fallbacks)."""
        agents: dict[str, AgentPolicy] = {}
        wanted = sorted({step.agent_name for step in plan.steps.values() if step.approval is None})
        while self.registry is not None and wanted:
            name = wanted.pop()
            if name in agents:
                continue
            try:
                entry = await self.registry.get(name)
            except RegistryError:
                log.warning("registry unavailable; the run uses the global defaults for %s", name)
                continue
            if entry is None:
                continue
            agents[name] = AgentPolicy(
                timeout_s=entry.timeout_s,
                input_timeout_s=entry.input_timeout_s,
                retry=entry.retry,
                recovery=entry.recovery,
            )
            if entry.recovery.fallback_agent and entry.recovery.fallback_agent not in agents:
                wanted.append(entry.recovery.fallback_agent)
        return ExecutionDefaults(
            timeout_s=self.default_timeout_s, input_timeout_s=self.default_input_timeout_s, agents=agents
        )

    async def reject(self, key: bytes | None, payload: bytes, reason: str) -> bool:
        """Record an unreadable submission as a FAILED run when its run_id can be read.

        The message still goes to the dead-letter topic; this is so that a user
        who asks about the run sees why it never started.

        Returns:
            Whether a run was recorded.
        """
        try:
            raw = json.loads(payload)
        except (ValueError, RecursionError):
            return False
        run_id = raw.get("run_id") if isinstance(raw, dict) else None
        if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
            return False
        if key is not None and key != run_id.encode():
            return False  # routed by another key: not this partition's run to record
        if self.load(run_id) is not None:
            return False  # a run with that id exists; a bad copy does not change it
        return await asyncio.to_thread(
            self.records.record_rejected,
            run_id,
            kind=ErrorKind.INVALID_SUBMISSION,
            message=f"the submission could not be read: {reason}",
            # An oversize plan is not copied into the record (the dead letter keeps its start).
            plan=raw.get("plan") if len(payload) <= self.limit else None,
        )

    async def restore_or_resume(self, run_id: str, origin: Origin | None = None) -> bool:
        """A ``restore``/``resume`` request: rebuild from PostgreSQL if the table lacks the run, else kick it.

        A checkpoint that cannot be read fails the run with the reason (it
        would fail the same way at every restart).
        """
        snapshot = None
        if run_id.encode() not in self.runs:
            try:
                snapshot = await asyncio.to_thread(self.records.get_state, run_id)
            except ValidationError as error:
                reason = f"its checkpoint in PostgreSQL cannot be read: {str(error)[:500]}"
                await self.carry_out(self._fail_stored(run_id, _Unusable(b"", None, reason), utcnow()), origin)
                return True
        return await self.restore(run_id, snapshot, origin)

    async def restore(self, run_id: str, snapshot: RunState | None, origin: Origin | None = None) -> bool:
        """Rebuild a run the table lost from its checkpoint, or kick a run the table has.

        A run in the table is newer than any checkpoint: it is not replaced, but
        what it needs to go on is carried out again (attempts in flight
        re-dispatched with the same correlation id, deadlines re-armed).

        Returns:
            Whether there was anything to restore or resume.
        """
        try:
            state = self._read(run_id.encode())
        except _Unusable as unusable:
            await self.carry_out(self._fail_stored(run_id, unusable, utcnow()), origin)
            return True
        if state is not None:
            await self.carry_out(resume(state, utcnow(), self.resume_grace_s), origin)
            return True
        if snapshot is None:
            return False
        await self.handle(RunRestored(state=snapshot, at=utcnow()), origin)
        return True

    async def park(self, source_topic: str, key: bytes | None, payload: bytes, reason: str) -> None:
        """Send an unprocessable message to the dead-letter topic with the reason (cut to fit if it must be)."""
        await self.deadletters.park(source_topic, key, payload, reason)

    async def catch_up(self, run_ids: Iterable[str], recorded: Mapping[str, int]) -> tuple[int, int]:
        """Write again what a crash may have lost of runs that moved last: their checkpoint, their final update.

        A kill -9 loses the snapshots the checkpointer had not written yet and
        the records the producer had not sent. The changelog may still have
        the state those belonged to; then the event that caused them is
        delivered again, changes nothing, and sends nothing. A run that went on
        writes a newer snapshot and update later, but one that finished just
        before the crash would stay RUNNING (or unrecorded) in PostgreSQL, and
        its end unseen on the monitoring topic.

        So: every run whose stored version is newer than PostgreSQL's record is
        checkpointed again, and the final update of every run that finished
        within :data:`CRASH_WINDOW` of the newest change among ``run_ids`` (when
        the last worker stopped, or crashed) is published again. Faust flushes
        the producer before it commits, every few seconds, so records older
        than that window were sent.

        Args:
            run_ids: Runs of the table (the partitions just gained).
            recorded: PostgreSQL's version of each run it has.

        Returns:
            How many runs were checkpointed again, and how many final updates sent again.
        """
        states = [state for state in map(self.load, run_ids) if state is not None]
        behind = [state for state in states if state.version > recorded.get(state.run_id, 0)]
        for state in behind:
            self.checkpoints.put(state)
        if not states:
            return 0, 0
        since = max(state.updated_at for state in states) - CRASH_WINDOW
        updates = [final_update(state) for state in states if state.updated_at >= since]
        resent = [update for update in updates if update is not None]
        await self.carry_out(resent)
        return len(behind), len(resent)

    async def resume_all(
        self, now: datetime, belongs: Callable[[str], bool] | None = None, *, dispatches_only: bool = False
    ) -> int:
        """Re-dispatch and re-arm what the table's RUNNING runs need (after a start or a rebalance).

        Args:
            now: The current time.
            belongs: Only runs whose id it accepts (the partitions just gained).
            dispatches_only: Only send the attempts in flight again (same
                correlation ids), nothing else: the second pass after a
                restart, which asks the bridge again for results that were
                lost on the way in.

        Returns:
            How many runs needed something.
        """
        resumed = 0
        for index, key in enumerate(list(self.runs.keys())):
            if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)  # a long table must not hold up the worker's other work
            if isinstance(key, bytes) and not is_head_key(key):
                continue  # a part of a run (its plan, a finished execution), read with its head
            run_id = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            if belongs is not None and not belongs(run_id):
                continue
            ended = ended_at(self.runs.get(key if isinstance(key, bytes) else run_id.encode(), b""))
            if ended is not None:
                # Finished: nothing to resume (its parts are not even read); it leaves the table in time.
                if not dispatches_only:
                    self._schedule_eviction(run_id, max(now, ended + timedelta(seconds=self.retention_s)))
                continue
            try:
                state = self._read(key if isinstance(key, bytes) else run_id.encode())
            except _Unusable as unusable:
                if unusable.finished:
                    continue  # nothing to go on with; left as it is
                # Tables are written by the agents only: ask the control agent
                # to fail the run, with the reason.
                log.warning("run %s cannot be resumed (%s); asking to fail it", run_id, unusable)
                message = ControlMessage(run_id=run_id, command=ControlCommand.RESTORE, reason=str(unusable)[:2000])
                try:
                    await self.control.send(key=run_id.encode(), value=encode(message))
                except Exception:
                    log.exception("could not ask to fail run %s; the next restart asks again", run_id)
                    continue
                resumed += 1
                continue
            if state is None:
                continue
            effects = resume(state, now, self.resume_grace_s)
            if dispatches_only:
                effects = [e for e in effects if isinstance(e, DispatchTask) and e.not_before is None]
            if effects:
                resumed += 1
                await self.carry_out(effects)
        return resumed


_YIELD_EVERY = 200
"""Runs resumed between two yields to the event loop."""

EVICT_AGAIN = timedelta(seconds=30)
"""How soon to try again to evict a finished run whose final record PostgreSQL does not have yet."""

CRASH_WINDOW = timedelta(seconds=10)
"""How long before a worker's last change records it produced may not have been sent (Faust commits every 2.8 s)."""


def _timeout_key(effect: ScheduleTimeout) -> TimerKey:
    attempt_id = correlation_id(effect.run_id, effect.step_id, effect.attempt, effect.iteration, effect.item)
    return TimerKey("timeout", effect.run_id, attempt_id)
