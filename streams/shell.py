"""The thin shell around the pure run state machine.

:meth:`RunShell.apply` is the only code that writes the ``runs`` table: it
reads the state, calls :func:`models.run.transition`, and stores the result,
with no ``await`` in between (DESIGN.md rule 3). It is called only from the
agents' ``async for`` loops (rule 2). :meth:`RunShell.carry_out` then performs
the effects: sends tasks, sets timers, queues checkpoints, publishes updates.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, MutableMapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeAlias

from models.messages import (
    RUN_ID_PATTERN,
    AgentCancel,
    ControlCommand,
    ControlMessage,
    DeadLetterRecord,
    ErrorKind,
    WorkflowSubmission,
    encode,
    utcnow,
)
from models.plan import WorkflowPlan
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
    resume,
    transition,
)

__all__ = ["TIMEOUT_REPEAT", "Origin", "RunRecords", "RunShell", "Sender"]

from switchyard.registry import Registry, RegistryError

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

    def get_state(self, run_id: str) -> RunState | None:
        """The run's last checkpoint, or None."""
        ...

    def record_rejected(self, run_id: str, *, kind: str, message: str, plan: Any = None) -> bool:
        """Record a submission that could not start as a FAILED run."""
        ...


class _Checkpoints(Protocol):
    def put(self, state: RunState) -> None: ...


class _Timers(Protocol):
    def call_at(self, when: datetime, key: str, action: Callable[[], Any]) -> None: ...

    def cancel(self, key: str) -> None: ...


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
        resume_grace_s: After a restart, the least time before a passed deadline fires.
        app_name: Names this app in dead letters.
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
        resume_grace_s: float = 0.0,
        app_name: str = "switchyard-executor",
    ) -> None:
        self.runs = runs
        self.tasks = tasks
        self.cancels = cancels
        self.control = control
        self.monitoring = monitoring
        self.deadletter = deadletter
        self.checkpoints = checkpoints
        self.timers = timers
        self.records = records
        self.registry = registry
        self.default_timeout_s = default_timeout_s
        self.resume_grace_s = resume_grace_s
        self.app_name = app_name
        self.applied = 0
        self.ignored = 0
        self.effect_failures = 0

    # ------------------------------------------------------------ the table

    def load(self, run_id: str) -> RunState | None:
        """The stored state of a run, or None."""
        raw = self.runs.get(run_id.encode())
        return None if raw is None else RunState.model_validate_json(raw)

    def apply(self, event: Event) -> list[Effect]:
        """Read, transition and write one run. No ``await``: never interleaved.

        Returns:
            The effects to carry out.
        """
        run_id = event_run_id(event)
        state = self.load(run_id)
        new, effects = transition(state, event)
        if new is not None and new is not state:
            self.runs[run_id.encode()] = new.model_dump_json().encode()
            self.applied += 1
            self._forget_timers(state, new)
        elif not effects:
            self.ignored += 1
        return effects

    def _forget_timers(self, old: RunState | None, new: RunState) -> None:
        """Drop the deadline and dispatch timers of attempts that have just ended."""
        for step in new.steps.values():
            before = old.steps.get(step.step_id) if old is not None else None
            for attempt in step.attempts:
                if not attempt.status.finished:
                    continue
                known = before is not None and attempt.number <= len(before.attempts)
                if known and before is not None and before.attempts[attempt.number - 1].status.finished:
                    continue
                self.timers.cancel(f"timeout:{attempt.correlation_id}")
                self.timers.cancel(f"dispatch:{attempt.correlation_id}")

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
            self.checkpoints.put(effect.state)
        elif isinstance(effect, RunFinished):
            log.info(
                "run %s finished: %s%s",
                effect.run_id,
                effect.status,
                f" ({effect.error.message})" if effect.error else "",
            )
        elif isinstance(effect, DeadLetter):
            if origin is not None:
                await self.park(*origin, effect.reason)
            else:
                log.warning("dead letter for run %s: %s", effect.run_id, effect.reason)
                record = DeadLetterRecord(
                    source_topic="(executor)", key=effect.run_id, reason=effect.reason, app=self.app_name
                )
                await self.deadletter.send(key=effect.run_id.encode(), value=encode(record))
        elif isinstance(effect, CancelAgentTask):
            # The bridge sends the agent a CancelTask where it can; a late
            # result is ignored by the state machine either way.
            cancel = AgentCancel(
                correlation_id=effect.correlation_id,
                run_id=effect.run_id,
                step_id=effect.step_id,
                attempt=effect.attempt,
                agent_name=effect.agent_name,
            )
            await self.cancels.send(key=effect.run_id.encode(), value=encode(cancel))

    def _dispatch(self, effect: DispatchTask) -> None:
        if effect.not_before is not None:
            self.timers.call_at(effect.not_before, f"dispatch:{effect.task.correlation_id}", self._task_action(effect))

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
            if state is None or not state.awaits(effect.step_id, effect.attempt):
                return  # the attempt ended (or the run moved to another worker)
            message = ControlMessage(
                run_id=effect.run_id,
                command=ControlCommand.STEP_TIMEOUT,
                step_id=effect.step_id,
                attempt=effect.attempt,
                requested_at=utcnow(),
            )
            await self.control.send(key=effect.run_id.encode(), value=encode(message))
            # A deadline is the last thing that heals a lost message; if this
            # one were lost too, the attempt would stay RUNNING for good. So it
            # fires again until the attempt is seen to end, which forgets it.
            self.timers.call_at(utcnow() + TIMEOUT_REPEAT, key, action)

        return action

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
                if recorded == RunStatus.RUNNING:
                    await self.restore(run_id, await asyncio.to_thread(self.records.get_state, run_id), origin)
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
        wanted = sorted({step.agent_name for step in plan.steps.values()})
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
            agents[name] = AgentPolicy(timeout_s=entry.timeout_s, retry=entry.retry, recovery=entry.recovery)
            if entry.recovery.fallback_agent and entry.recovery.fallback_agent not in agents:
                wanted.append(entry.recovery.fallback_agent)
        return ExecutionDefaults(timeout_s=self.default_timeout_s, agents=agents)

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
            plan=raw.get("plan"),
        )

    async def restore_or_resume(self, run_id: str, origin: Origin | None = None) -> bool:
        """A ``restore``/``resume`` request: rebuild from PostgreSQL if the table lacks the run, else kick it."""
        snapshot = None
        if self.load(run_id) is None:
            snapshot = await asyncio.to_thread(self.records.get_state, run_id)
        return await self.restore(run_id, snapshot, origin)

    async def restore(self, run_id: str, snapshot: RunState | None, origin: Origin | None = None) -> bool:
        """Rebuild a run the table lost from its checkpoint, or kick a run the table has.

        A run in the table is newer than any checkpoint: it is not replaced, but
        what it needs to go on is carried out again (attempts in flight
        re-dispatched with the same correlation id, deadlines re-armed).

        Returns:
            Whether there was anything to restore or resume.
        """
        state = self.load(run_id)
        if state is not None:
            await self.carry_out(resume(state, utcnow(), self.resume_grace_s), origin)
            return True
        if snapshot is None:
            return False
        await self.handle(RunRestored(state=snapshot, at=utcnow()), origin)
        return True

    async def park(self, source_topic: str, key: bytes | None, payload: bytes, reason: str) -> None:
        """Send an unprocessable message to the dead-letter topic with the reason."""
        log.warning("dead letter from %s (key %r): %s", source_topic, key, reason)
        record = DeadLetterRecord.of(source_topic, key, payload, reason, self.app_name)
        await self.deadletter.send(key=key or b"", value=encode(record))

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
        for key, raw in list(self.runs.items()):
            run_id = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            if belongs is not None and not belongs(run_id):
                continue
            try:
                effects = resume(RunState.model_validate_json(raw), now, self.resume_grace_s)
            except Exception:
                log.exception("cannot resume run %r: its stored state is unreadable", run_id)
                continue
            if dispatches_only:
                effects = [e for e in effects if isinstance(e, DispatchTask) and e.not_before is None]
            if effects:
                resumed += 1
                await self.carry_out(effects)
        return resumed


def _timeout_key(effect: ScheduleTimeout) -> str:
    return f"timeout:{effect.run_id}/{effect.step_id}/{effect.attempt}"
