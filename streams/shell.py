"""The thin shell around the pure run state machine.

:meth:`RunShell.apply` is the only code that writes the ``runs`` table: it
reads the state, calls :func:`models.run.transition`, and stores the result,
with no ``await`` in between (DESIGN.md rule 3). It is called only from the
agents' ``async for`` loops (rule 2). :meth:`RunShell.carry_out` then performs
the effects: sends tasks, sets timers, queues checkpoints, publishes updates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeAlias

from models.messages import (
    ControlCommand,
    ControlMessage,
    DeadLetterRecord,
    encode,
    utcnow,
)
from models.run import (
    CancelAgentTask,
    Checkpoint,
    DeadLetter,
    DispatchTask,
    Effect,
    Event,
    PublishMonitoring,
    RunFinished,
    RunState,
    ScheduleTimeout,
    event_run_id,
    resume,
    transition,
)

__all__ = ["RunShell", "Sender"]

log = logging.getLogger(__name__)


Origin: TypeAlias = tuple[str, bytes | None, bytes]
"""Where an event came from: (topic, key, raw value)."""


class Sender(Protocol):
    """Sends bytes to a topic (a Faust topic's ``send``)."""

    async def send(self, *, key: bytes, value: bytes) -> Any:
        """Send one message."""
        ...


class _Checkpoints(Protocol):
    def put(self, state: RunState) -> None: ...


class _Timers(Protocol):
    def call_at(self, when: datetime, key: str, action: Callable[[], Any]) -> None: ...


class RunShell:
    """Applies events to runs and carries out the effects.

    Args:
        runs: The ``runs`` table (run_id bytes -> RunState JSON bytes).
        tasks: Where agent tasks go (the bridge's topic).
        control: The executor's own control topic (for step timeouts).
        monitoring: Where live updates go.
        deadletter: Where unprocessable events go.
        checkpoints: Receives every changed state.
        timers: Runs delayed dispatches and deadlines.
        app_name: Names this app in dead letters.
    """

    def __init__(
        self,
        *,
        runs: MutableMapping[bytes, bytes],
        tasks: Sender,
        control: Sender,
        monitoring: Sender,
        deadletter: Sender,
        checkpoints: _Checkpoints,
        timers: _Timers,
        app_name: str = "switchyard-executor",
    ) -> None:
        self.runs = runs
        self.tasks = tasks
        self.control = control
        self.monitoring = monitoring
        self.deadletter = deadletter
        self.checkpoints = checkpoints
        self.timers = timers
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
        elif not effects:
            self.ignored += 1
        return effects

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
            # The bridge's CancelTask forwarding arrives with durable execution
            # (issue 9); until then the late result is simply ignored.
            log.info("attempt %s abandoned (timeout or cancel)", effect.correlation_id)

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
        async def action() -> None:
            message = ControlMessage(
                run_id=effect.run_id,
                command=ControlCommand.STEP_TIMEOUT,
                step_id=effect.step_id,
                attempt=effect.attempt,
                requested_at=utcnow(),
            )
            await self.control.send(key=effect.run_id.encode(), value=encode(message))

        return action

    async def park(self, source_topic: str, key: bytes | None, payload: bytes, reason: str) -> None:
        """Send an unprocessable message to the dead-letter topic with the reason."""
        log.warning("dead letter from %s (key %r): %s", source_topic, key, reason)
        record = DeadLetterRecord.of(source_topic, key, payload, reason, self.app_name)
        await self.deadletter.send(key=key or b"", value=encode(record))

    async def resume_all(self, now: datetime) -> int:
        """Set the timers and re-dispatch what every RUNNING run in the table needs.

        Returns:
            How many runs needed something.
        """
        resumed = 0
        for key, raw in list(self.runs.items()):
            try:
                effects = resume(RunState.model_validate_json(raw), now)
            except Exception:
                log.exception("cannot resume run %r: its stored state is unreadable", key)
                continue
            if effects:
                resumed += 1
                await self.carry_out(effects)
        return resumed


def _timeout_key(effect: ScheduleTimeout) -> str:
    return f"timeout:{effect.run_id}/{effect.step_id}/{effect.attempt}"
