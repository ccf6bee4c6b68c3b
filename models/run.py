"""The run state machine: pure ``transition(state, event) -> (state, effects)``.

No Faust, Kafka, HTTP or database here. Time comes in with the events (``at``)
and randomness (retry jitter) is derived from the correlation id, so a
transition is a pure function of its arguments: replaying the same events
gives the same states and effects.

Rules this module keeps (DESIGN.md, rule 5):

* Idempotent: an event that changes nothing (a duplicate or stale result, a
  timeout of an attempt that already ended, a second submission of the same
  run, anything for a finished run) returns the state unchanged and **no**
  effects.
* Every change bumps ``RunState.version`` by one; the PostgreSQL snapshot
  upsert uses it so an older snapshot never overwrites a newer one.
* Events that cannot belong to any run (a result for an unknown run or step)
  return a single :class:`DeadLetter` effect and no state change.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeAlias

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue

from models.agents import RecoveryAction, RecoveryPolicy
from models.mapping import MappingContext, MappingError, resolve_mapping
from models.messages import (
    AgentError,
    AgentResult,
    AgentTask,
    ErrorKind,
    MonitoringUpdate,
    ResultStatus,
    RunId,
    correlation_id,
    submission_fingerprint,
)
from models.plan import DEFAULT_RETRY, RetryPolicy, WorkflowPlan, WorkflowStep, check_plan

__all__ = [
    "UNRETRIABLE_RUN_ERRORS",
    "Attempt",
    "AgentPolicy",
    "AgentResultReceived",
    "CancelAgentTask",
    "CancelRequested",
    "Checkpoint",
    "DeadLetter",
    "DispatchTask",
    "Effect",
    "Event",
    "ExecutionDefaults",
    "PublishMonitoring",
    "RetryRequested",
    "RunError",
    "RunFinished",
    "RunState",
    "RunRestored",
    "RunStatus",
    "RunSubmitted",
    "ScheduleTimeout",
    "StepState",
    "StepStatus",
    "StepTimedOut",
    "dropped",
    "fail_too_large",
    "final_update",
    "fail_unreadable",
    "resume",
    "retry_refusal",
    "transition",
]

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class RunStatus(StrEnum):
    """Where a run is in its life."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        """Whether the run has reached an end (a retry may reopen FAILED)."""
        return self in {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED}


class StepStatus(StrEnum):
    """Where a step, or one attempt of it, is.

    An attempt is PENDING while it waits for its (delayed) dispatch time. A
    step is SKIPPED when its attempts ran out and the agent's recovery policy
    says to go on with a default output.
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"

    @property
    def finished(self) -> bool:
        """Whether nothing more will happen to it."""
        return self in {StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.CANCELLED, StepStatus.SKIPPED}

    @property
    def has_output(self) -> bool:
        """Whether later steps can read its output (a skipped step has its default output)."""
        return self in {StepStatus.COMPLETED, StepStatus.SKIPPED}


class AgentPolicy(BaseModel):
    """What the registry says about one agent, copied into the run when it starts."""

    model_config = _FROZEN

    timeout_s: float | None = Field(None, gt=0, le=86_400)
    retry: RetryPolicy | None = None
    recovery: RecoveryPolicy = RecoveryPolicy()


class ExecutionDefaults(BaseModel):
    """What a step uses when the plan does not say.

    The order is: the plan's step, then the agent's registry entry
    (``agents``), then these global defaults. The registry is read once, when
    the run starts, so a run behaves the same after a restart.
    """

    model_config = _FROZEN

    timeout_s: float = Field(300.0, gt=0, le=86_400)
    retry: RetryPolicy = DEFAULT_RETRY
    agents: dict[str, AgentPolicy] = Field(default_factory=dict)

    def agent(self, name: str) -> AgentPolicy:
        """The registry's policy for an agent (empty when it says nothing)."""
        return self.agents.get(name) or _NO_POLICY


_NO_POLICY = AgentPolicy()


class RunError(BaseModel):
    """Why a run failed (or was cancelled)."""

    model_config = _FROZEN

    kind: str
    message: str
    step_id: str | None = None
    attempt: int | None = None
    details: JsonValue = None


class Attempt(BaseModel):
    """One try at a step: one agent call, identified by its correlation id."""

    model_config = _FROZEN

    number: int = Field(ge=1)
    correlation_id: str
    agent_name: str
    status: StepStatus
    input: JsonValue
    dispatch_at: AwareDatetime = Field(
        description="When the call is (or was) sent; later than now for a delayed retry."
    )
    deadline: AwareDatetime
    finished_at: AwareDatetime | None = None
    output: JsonValue = None
    error: AgentError | None = None


class StepState(BaseModel):
    """A step of one run, with all its attempts."""

    model_config = _FROZEN

    step_id: str
    agent_name: str
    status: StepStatus
    attempts: tuple[Attempt, ...] = ()
    first_attempt_of_round: int = Field(1, description="A retry request opens a new round with a fresh budget.")
    fallback_agent: str | None = Field(
        None, description="Set when the recovery policy moved the step to another agent."
    )
    next_attempt_at: AwareDatetime | None = None
    output: JsonValue = None
    error: AgentError | None = None
    started_at: AwareDatetime | None = None
    completed_at: AwareDatetime | None = None

    @property
    def current(self) -> Attempt | None:
        """The latest attempt, if any."""
        return self.attempts[-1] if self.attempts else None


class RunState(BaseModel):
    """Everything known about one run. Stored in the ``runs`` table as JSON."""

    model_config = _FROZEN

    run_id: str
    status: RunStatus
    plan: WorkflowPlan
    input: dict[str, JsonValue]
    fingerprint: str | None = Field(
        None, description="submission_fingerprint of the submission that started the run (a run_id means one run)."
    )
    defaults: ExecutionDefaults = ExecutionDefaults()
    steps: dict[str, StepState] = Field(default_factory=dict, description="Steps that have started, in order.")
    current_step: str | None = None
    output: JsonValue = None
    error: RunError | None = None
    created_at: AwareDatetime
    started_at: AwareDatetime | None = None
    completed_at: AwareDatetime | None = None
    updated_at: AwareDatetime
    version: int = Field(1, ge=1, description="Bumped by every change; orders snapshots.")

    def awaits(self, step_id: str, attempt: int) -> bool:
        """Whether that attempt is its step's latest and still waits for its result, in a running run."""
        step = self.steps.get(step_id)
        current = step.current if step else None
        return (
            self.status is RunStatus.RUNNING
            and current is not None
            and current.number == attempt
            and not current.status.finished
        )


# --------------------------------------------------------------------- events


class RunSubmitted(BaseModel):
    """A submission arrived for ``run_id``."""

    model_config = _FROZEN

    run_id: RunId
    plan: WorkflowPlan
    input: dict[str, JsonValue] = Field(default_factory=dict)
    at: AwareDatetime
    defaults: ExecutionDefaults = ExecutionDefaults()


class AgentResultReceived(BaseModel):
    """The bridge reported the outcome of an attempt."""

    model_config = _FROZEN

    result: AgentResult
    at: AwareDatetime


class StepTimedOut(BaseModel):
    """An attempt's deadline passed (sent by a timer as a control event)."""

    model_config = _FROZEN

    run_id: str
    step_id: str
    attempt: int
    at: AwareDatetime


class CancelRequested(BaseModel):
    """A user asked to stop the run."""

    model_config = _FROZEN

    run_id: str
    at: AwareDatetime
    reason: str = "cancelled by request"


class RetryRequested(BaseModel):
    """A user asked to run a FAILED run again from its failed step."""

    model_config = _FROZEN

    run_id: str
    at: AwareDatetime


class RunRestored(BaseModel):
    """The run's last checkpoint, to rebuild it when the table lost it (broker or disk gone)."""

    model_config = _FROZEN

    state: RunState
    at: AwareDatetime

    @property
    def run_id(self) -> str:
        """The run being restored."""
        return self.state.run_id


Event: TypeAlias = RunSubmitted | AgentResultReceived | StepTimedOut | CancelRequested | RetryRequested | RunRestored


def event_run_id(event: Event) -> str:
    """The run an event belongs to."""
    return event.result.run_id if isinstance(event, AgentResultReceived) else event.run_id


# -------------------------------------------------------------------- effects


class DispatchTask(BaseModel):
    """Send ``task`` to the bridge, not before ``not_before`` (a delayed retry)."""

    model_config = _FROZEN

    task: AgentTask
    not_before: AwareDatetime | None = None


class ScheduleTimeout(BaseModel):
    """At ``at``, deliver :class:`StepTimedOut` for this attempt."""

    model_config = _FROZEN

    run_id: str
    step_id: str
    attempt: int
    at: AwareDatetime


class CancelAgentTask(BaseModel):
    """Ask the agent to cancel the call with this correlation id, if it can."""

    model_config = _FROZEN

    run_id: str
    step_id: str
    attempt: int
    correlation_id: str
    agent_name: str


class PublishMonitoring(BaseModel):
    """Publish a live update."""

    model_config = _FROZEN

    update: MonitoringUpdate


class Checkpoint(BaseModel):
    """Write this snapshot to PostgreSQL."""

    model_config = _FROZEN

    state: RunState


class RunFinished(BaseModel):
    """The run reached an end."""

    model_config = _FROZEN

    run_id: str
    status: RunStatus
    output: JsonValue = None
    error: RunError | None = None


class DeadLetter(BaseModel):
    """The event cannot be applied to any run; park it with the reason."""

    model_config = _FROZEN

    run_id: str
    reason: str


Effect: TypeAlias = (
    DispatchTask | ScheduleTimeout | CancelAgentTask | PublishMonitoring | Checkpoint | RunFinished | DeadLetter
)
Outcome: TypeAlias = tuple[RunState | None, list[Effect]]
_Changed: TypeAlias = tuple[RunState, list[Effect]]


# ----------------------------------------------------------------- transition


def transition(state: RunState | None, event: Event) -> Outcome:
    """Apply one event to one run.

    Args:
        state: The run's state, or None when the run is not known yet.
        event: What happened.

    Returns:
        The new state (the same object when nothing changed) and the effects
        to carry out, in order.
    """
    if isinstance(event, RunSubmitted):
        new, effects = _on_submitted(state, event)
    elif isinstance(event, RunRestored):
        if state is not None:
            return state, []  # the table has it: the table is newer than any checkpoint
        restored = event.state
        return restored, [
            _monitor(restored, event.at, "RESTORED", detail={"version": restored.version}),
            *resume(restored, event.at),
        ]
    elif state is None:
        return None, [DeadLetter(run_id=event_run_id(event), reason=f"no run {event_run_id(event)!r} is known")]
    elif isinstance(event, AgentResultReceived):
        new, effects = _on_result(state, event)
    elif isinstance(event, StepTimedOut):
        new, effects = _on_timeout(state, event)
    elif isinstance(event, CancelRequested):
        new, effects = _on_cancel(state, event)
    else:
        new, effects = _on_retry(state, event)
    if new is None or new is state:
        return state, effects
    if state is not None:
        new = new.model_copy(update={"version": state.version + 1})
    # One checkpoint per change, of the final state, after the other effects
    # that describe it (the snapshot is the durable record of all of them).
    return new, [*effects, Checkpoint(state=new)]


def resume(state: RunState, now: datetime, grace_s: float = 0.0) -> list[Effect]:
    """What a RUNNING run needs to go on after a restart or a rebalance.

    Attempts in flight are dispatched again with the same correlation id (the
    bridge and agents recognise the repeat), delayed retries keep their time,
    and every deadline is scheduled again, no earlier than ``now + grace_s``.

    The grace matters after a restart: results that arrived while the
    executor was down wait on the results topic, and a deadline that passed
    meanwhile must not fire before they are read, or a result that came in
    time would lose to its own timeout.

    Args:
        state: The run as recovered.
        now: The current time.
        grace_s: The least time from now before a deadline fires.

    Returns:
        The effects to carry out; empty for a finished run.
    """
    if state.status is not RunStatus.RUNNING or state.current_step is None:
        return []
    step = state.steps.get(state.current_step)
    attempt = step.current if step else None
    if step is None or attempt is None or attempt.status.finished:
        return []
    not_before = attempt.dispatch_at if attempt.dispatch_at > now else None
    return [
        DispatchTask(task=_task(state, step.step_id, attempt), not_before=not_before),
        ScheduleTimeout(
            run_id=state.run_id,
            step_id=step.step_id,
            attempt=attempt.number,
            at=max(attempt.deadline, now + timedelta(seconds=grace_s)),
        ),
    ]


# ------------------------------------------------------------------- handlers


def _on_submitted(state: RunState | None, event: RunSubmitted) -> _Changed:
    fingerprint = submission_fingerprint(event.plan, event.input)
    if state is not None:
        if state.fingerprint is not None:
            same = state.fingerprint == fingerprint
        else:  # a state from before fingerprints were kept
            same = state.plan.fingerprint() == event.plan.fingerprint() and state.input == event.input
        if same:
            return state, []  # the same submission again: idempotent
        return state, [
            DeadLetter(
                run_id=event.run_id,
                reason=f"run_id {event.run_id!r} is already used by a different submission; not started again",
            )
        ]
    run = RunState(
        run_id=event.run_id,
        status=RunStatus.RUNNING,
        plan=event.plan,
        input=event.input,
        fingerprint=fingerprint,
        defaults=event.defaults,
        created_at=event.at,
        started_at=event.at,
        updated_at=event.at,
    )
    problems = check_plan(event.plan)
    if problems:
        error = RunError(
            kind=ErrorKind.INVALID_PLAN,
            message="; ".join(str(p) for p in problems),
            details=[{"path": p.path, "reason": p.reason} for p in problems],
        )
        return _finish(run, RunStatus.FAILED, event.at, error=error, started=False)
    effects: list[Effect] = [_monitor(run, event.at, RunStatus.RUNNING)]
    run, step_effects = _start_step(run, run.plan.start_step, event.at)
    return run, effects + step_effects


def _on_result(state: RunState, event: AgentResultReceived) -> _Changed:
    result = event.result
    if result.step_id not in state.plan.steps:
        return state, [DeadLetter(run_id=state.run_id, reason=f"run {state.run_id!r} has no step {result.step_id!r}")]
    step = state.steps.get(result.step_id)
    attempt = step.current if step else None
    if (
        state.status is not RunStatus.RUNNING
        or step is None
        or attempt is None
        or step.status.finished
        or attempt.number != result.attempt
        or attempt.correlation_id != result.correlation_id
        or attempt.status.finished
    ):
        # Stale or duplicate: idempotent. (A PENDING attempt's result is
        # accepted: it proves the delayed dispatch happened.)
        return state, []
    if result.status is ResultStatus.SUCCESS:
        return _succeed(state, step, attempt, result.output, event.at)
    assert result.error is not None  # guaranteed by AgentResult's validator
    return _fail_attempt(state, step, attempt, result.error, event.at)


def _on_timeout(state: RunState, event: StepTimedOut) -> _Changed:
    step = state.steps.get(event.step_id)
    attempt = step.current if step else None
    if step is None or attempt is None or not state.awaits(event.step_id, event.attempt) or event.at < attempt.deadline:
        return state, []
    timeout_s = (attempt.deadline - attempt.dispatch_at).total_seconds()
    error = AgentError(
        kind=ErrorKind.TIMEOUT,
        message=f"no result from agent {attempt.agent_name!r} within {timeout_s:g}s",
        retriable=True,
    )
    state, effects = _fail_attempt(state, step, attempt, error, event.at)
    return state, [_cancel_task(state.run_id, step.step_id, attempt), *effects]


def _on_cancel(state: RunState, event: CancelRequested) -> _Changed:
    if state.status.finished:
        return state, []
    effects = _cancel_in_flight(state, event.at)
    state = _end_open_step(state, StepStatus.CANCELLED, event.at)
    error = RunError(kind=ErrorKind.CANCELLED, message=event.reason, step_id=state.current_step)
    state, finish = _finish(state, RunStatus.CANCELLED, event.at, error=error)
    return state, effects + finish


UNRETRIABLE_RUN_ERRORS = frozenset({ErrorKind.STATE_TOO_LARGE, ErrorKind.UNREADABLE_STATE})
"""Runs stored without their data (or unreadable): a retry would run on what is left, so it is refused."""


def retry_refusal(run_id: str, error_kind: str | None) -> str | None:
    """Why a FAILED run with this error kind cannot be retried, or None if it can."""
    if error_kind not in UNRETRIABLE_RUN_ERRORS:
        return None
    return f"run {run_id!r} failed with {error_kind}: its data were not kept, so it cannot be retried"


def _on_retry(state: RunState, event: RetryRequested) -> _Changed:
    refusal = retry_refusal(state.run_id, state.error.kind if state.error is not None else None)
    if state.status is RunStatus.FAILED and refusal is not None:
        return state, [DeadLetter(run_id=state.run_id, reason=refusal)]
    if state.status is not RunStatus.FAILED or state.current_step is None:
        return state, []  # only a run that failed at a step can be retried
    step = state.steps.get(state.current_step)
    if step is None or step.status is not StepStatus.FAILED:
        return state, []
    reopened = state.model_copy(
        update={"status": RunStatus.RUNNING, "error": None, "completed_at": None, "output": None}
    )
    next_number = len(step.attempts) + 1
    step = step.model_copy(
        update={
            "status": StepStatus.RUNNING,
            "error": None,
            "completed_at": None,
            "first_attempt_of_round": next_number,
            "fallback_agent": None,
        }
    )
    reopened = _put_step(reopened, step, event.at)
    effects: list[Effect] = [_monitor(reopened, event.at, RunStatus.RUNNING, detail={"retry_requested": True})]
    reopened, step_effects = _new_attempt(reopened, step, event.at, event.at)
    return reopened, effects + step_effects


# -------------------------------------------------------------------- helpers


def _policy(state: RunState, step: WorkflowStep, agent_name: str) -> tuple[float, RetryPolicy]:
    agent = state.defaults.agent(agent_name)
    timeout_s = next(t for t in (step.timeout_s, agent.timeout_s, state.defaults.timeout_s) if t is not None)
    retry = next(r for r in (step.retry, agent.retry, state.defaults.retry) if r is not None)
    return timeout_s, retry


def _agent_of(step: StepState) -> str:
    return step.fallback_agent or step.agent_name


def _put_step(state: RunState, step: StepState, at: datetime) -> RunState:
    steps = dict(state.steps)
    steps[step.step_id] = step
    return state.model_copy(
        update={"steps": steps, "current_step": step.step_id, "updated_at": max(at, state.updated_at)}
    )


def _monitor(
    state: RunState,
    at: datetime,
    status: str,
    *,
    step_id: str | None = None,
    attempt: int | None = None,
    detail: dict[str, JsonValue] | None = None,
) -> PublishMonitoring:
    return PublishMonitoring(
        update=MonitoringUpdate(
            run_id=state.run_id, step_id=step_id, attempt=attempt, status=status, timestamp=at, detail=detail or {}
        )
    )


def _task(state: RunState, step_id: str, attempt: Attempt) -> AgentTask:
    return AgentTask(
        correlation_id=attempt.correlation_id,
        run_id=state.run_id,
        step_id=step_id,
        attempt=attempt.number,
        agent_name=attempt.agent_name,
        input=attempt.input,
        deadline=attempt.deadline,
    )


def _start_step(state: RunState, step_id: str, at: datetime) -> _Changed:
    """Open ``step_id`` and make its first attempt (the run is RUNNING)."""
    plan_step = state.plan.steps[step_id]
    step = StepState(step_id=step_id, agent_name=plan_step.agent_name, status=StepStatus.RUNNING, started_at=at)
    state = _put_step(state, step, at)
    return _new_attempt(state, step, at, at)


def _new_attempt(state: RunState, step: StepState, at: datetime, dispatch_at: datetime) -> _Changed:
    """Add the next attempt to ``step``, or fail it if its input cannot be mapped."""
    plan_step = state.plan.steps[step.step_id]
    outputs = {s.step_id: s.output for s in state.steps.values() if s.status.has_output}
    try:
        task_input = resolve_mapping(
            plan_step.input_mapping, MappingContext(workflow_input=state.input, step_outputs=outputs)
        )
    except MappingError as error:
        mapping_error = AgentError(kind=ErrorKind.MAPPING_ERROR, message=str(error), retriable=False)
        failed = step.model_copy(
            update={"status": StepStatus.FAILED, "error": mapping_error, "completed_at": at, "next_attempt_at": None}
        )
        state = _put_step(state, failed, at)
        run_error = RunError(
            kind=ErrorKind.MAPPING_ERROR,
            message=f"step {step.step_id!r}: input mapping failed: {error}",
            step_id=step.step_id,
        )
        effects: list[Effect] = [
            _monitor(state, at, StepStatus.FAILED, step_id=step.step_id, detail={"error": mapping_error.message})
        ]
        state, finish = _finish(state, RunStatus.FAILED, at, error=run_error)
        return state, effects + finish
    agent_name = _agent_of(step)
    timeout_s, _ = _policy(state, plan_step, agent_name)
    number = len(step.attempts) + 1
    delayed = dispatch_at > at
    attempt = Attempt(
        number=number,
        correlation_id=correlation_id(state.run_id, step.step_id, number),
        agent_name=agent_name,
        status=StepStatus.PENDING if delayed else StepStatus.RUNNING,
        input=task_input,
        dispatch_at=dispatch_at,
        deadline=dispatch_at + timedelta(seconds=timeout_s),
    )
    step = step.model_copy(
        update={
            "attempts": (*step.attempts, attempt),
            "next_attempt_at": dispatch_at if delayed else None,
            "status": StepStatus.RUNNING,
        }
    )
    state = _put_step(state, step, at)
    effects = [
        DispatchTask(task=_task(state, step.step_id, attempt), not_before=dispatch_at if delayed else None),
        ScheduleTimeout(run_id=state.run_id, step_id=step.step_id, attempt=number, at=attempt.deadline),
        _monitor(
            state,
            at,
            "SCHEDULED" if delayed else StepStatus.RUNNING,
            step_id=step.step_id,
            attempt=number,
            detail={"agent": agent_name, "dispatch_at": dispatch_at.isoformat()},
        ),
    ]
    return state, effects


def _succeed(state: RunState, step: StepState, attempt: Attempt, output: JsonValue, at: datetime) -> _Changed:
    done = attempt.model_copy(update={"status": StepStatus.COMPLETED, "finished_at": at, "output": output})
    step = step.model_copy(
        update={
            "status": StepStatus.COMPLETED,
            "attempts": (*step.attempts[:-1], done),
            "output": output,
            "error": None,
            "next_attempt_at": None,
            "completed_at": at,
        }
    )
    state = _put_step(state, step, at)
    effects: list[Effect] = [_monitor(state, at, StepStatus.COMPLETED, step_id=step.step_id, attempt=attempt.number)]
    state, advance_effects = _advance(state, step.step_id, output, at)
    return state, effects + advance_effects


def _fail_attempt(state: RunState, step: StepState, attempt: Attempt, error: AgentError, at: datetime) -> _Changed:
    plan_step = state.plan.steps[step.step_id]
    _, policy = _policy(state, plan_step, _agent_of(step))
    failed = attempt.model_copy(update={"status": StepStatus.FAILED, "finished_at": at, "error": error})
    step = step.model_copy(update={"attempts": (*step.attempts[:-1], failed), "error": error})
    used = attempt.number - step.first_attempt_of_round + 1
    retriable = error.retriable and error.kind not in policy.non_retriable_kinds
    if retriable and used < policy.max_attempts:
        delay = policy.delay_s(used, attempt.correlation_id)
        state = _put_step(state, step, at)
        effects: list[Effect] = [_failed(state, step, attempt, error, at, will_retry=True)]
        state, retry_effects = _new_attempt(state, step, at, at + timedelta(seconds=delay))
        return state, effects + retry_effects
    why = "not retriable" if not retriable else f"{used} attempt(s) used of {policy.max_attempts}"
    recovery = state.defaults.agent(step.agent_name).recovery
    if recovery.action is RecoveryAction.FALLBACK and recovery.fallback_agent and step.fallback_agent is None:
        return _fall_back(state, step, attempt, error, recovery.fallback_agent, why, at)
    if recovery.action is RecoveryAction.SKIP:
        return _skip(state, step, attempt, error, recovery.default_output, why, at)
    step = step.model_copy(update={"status": StepStatus.FAILED, "completed_at": at, "next_attempt_at": None})
    state = _put_step(state, step, at)
    run_error = RunError(
        kind=error.kind,
        message=f"step {step.step_id!r} failed ({why}): {error.message}",
        step_id=step.step_id,
        attempt=attempt.number,
    )
    effects = [_failed(state, step, attempt, error, at, will_retry=False)]
    state, finish = _finish(state, RunStatus.FAILED, at, error=run_error)
    return state, effects + finish


def _failed(
    state: RunState,
    step: StepState,
    attempt: Attempt,
    error: AgentError,
    at: datetime,
    *,
    status: StepStatus = StepStatus.FAILED,
    **detail: JsonValue,
) -> PublishMonitoring:
    """The live update for an attempt that failed (and what happens next, in ``detail``)."""
    return _monitor(
        state,
        at,
        status,
        step_id=step.step_id,
        attempt=attempt.number,
        detail={"error": error.message, "kind": error.kind, **detail},
    )


def _advance(state: RunState, step_id: str, output: JsonValue, at: datetime) -> _Changed:
    """After a step ended with an output (done or skipped): start the next one, or complete the run."""
    next_step = state.plan.steps[step_id].next_step
    if next_step is None:
        return _finish(state, RunStatus.COMPLETED, at, output=output)
    return _start_step(state, next_step, at)


def _fall_back(
    state: RunState, step: StepState, attempt: Attempt, error: AgentError, fallback: str, why: str, at: datetime
) -> _Changed:
    """The recovery policy moves the step to another agent, with a fresh round of attempts."""
    step = step.model_copy(
        update={"fallback_agent": fallback, "first_attempt_of_round": len(step.attempts) + 1, "error": error}
    )
    state = _put_step(state, step, at)
    effects: list[Effect] = [_failed(state, step, attempt, error, at, why=why, fallback_agent=fallback)]
    state, attempt_effects = _new_attempt(state, step, at, at)
    return state, effects + attempt_effects


def _skip(
    state: RunState, step: StepState, attempt: Attempt, error: AgentError, output: JsonValue, why: str, at: datetime
) -> _Changed:
    """The recovery policy gives up on the step but not on the run: it goes on with a default output."""
    step = step.model_copy(
        update={
            "status": StepStatus.SKIPPED,
            "output": output,
            "error": error,
            "next_attempt_at": None,
            "completed_at": at,
        }
    )
    state = _put_step(state, step, at)
    effects: list[Effect] = [_failed(state, step, attempt, error, at, status=StepStatus.SKIPPED, why=why)]
    state, advance_effects = _advance(state, step.step_id, output, at)
    return state, effects + advance_effects


def _finish(
    state: RunState,
    status: RunStatus,
    at: datetime,
    *,
    output: JsonValue = None,
    error: RunError | None = None,
    started: bool = True,
) -> _Changed:
    state = state.model_copy(
        update={
            "status": status,
            "output": output,
            "error": error,
            "completed_at": at,
            "updated_at": max(at, state.updated_at),
            "started_at": state.started_at if started else None,
        }
    )
    update = final_update(state)
    assert update is not None  # the state has just finished
    return state, [update, RunFinished(run_id=state.run_id, status=status, output=output, error=error)]


def final_update(state: RunState) -> PublishMonitoring | None:
    """The monitoring update that told the world a finished run's end (None while it runs).

    The same update every time, so it can be published again after a crash
    lost it: a consumer sees a copy with the same status and timestamp.
    """
    if not state.status.finished or state.completed_at is None:
        return None
    return _monitor(state, state.completed_at, state.status, detail=_end_detail(state.error))


def _end_detail(error: RunError | None) -> dict[str, JsonValue]:
    """What a run's final monitoring update says of its error."""
    if error is None:
        return {}
    return {"error": error.message, "kind": error.kind, "step_id": error.step_id}


# ------------------------------------------------- runs that cannot be stored

_KEEP_BYTES = 1024
"""Values up to this size stay in a reduced state; larger ones are replaced by a note of what they were."""


def dropped(value: JsonValue, reason: str) -> dict[str, JsonValue]:
    """What stands in a reduced state for a value that was dropped: its size, its SHA-256 and why.

    Both are of the value as compact UTF-8 JSON.
    """
    raw = _compact_json(value)
    return {"dropped": {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "reason": reason}}


def fail_too_large(
    before: RunState | None, after: RunState, *, size: int, limit: int, at: datetime
) -> tuple[RunState, list[Effect]]:
    """The run's next state would be ``size`` bytes, over ``limit``: fail the run instead.

    The failure must be recorded, so the state is stored in a reduced form
    that fits: large inputs and outputs are replaced by :func:`dropped` notes
    (then all of them, then the plan's mappings, then the history), and the
    run is FAILED with kind ``state_too_large`` naming both sizes. What the
    transition wanted to do (dispatch the next step, ...) is not done; an
    attempt that was in flight before is cancelled at the agent.

    Args:
        before: The stored state (None for a new run).
        after: The state the transition produced (or ``before`` itself when
            the stored state is already too large).
        size: The encoded size of ``after``, in bytes.
        limit: The most a stored state may take.
        at: The time of the event.

    Returns:
        The reduced FAILED state and its effects.
    """
    error = RunError(
        kind=ErrorKind.STATE_TOO_LARGE,
        message=(
            f"the run's state would be {size} bytes, over the limit of {limit} bytes "
            "(SWITCHYARD_MAX_MESSAGE_BYTES); the run is stored without its large inputs and outputs"
        ),
        step_id=after.current_step,
        details={"size": size, "limit": limit},
    )
    # Above both, so that this record replaces any snapshot PostgreSQL has of either.
    version = max(after.version, before.version if before is not None else 0) + 1
    failed = _failed_run(after, error, at).model_copy(update={"version": version})
    reduced = _reduce(failed, limit, ErrorKind.STATE_TOO_LARGE)
    # Only an attempt sent before this event (not one the transition just opened, nor one whose result
    # this is) may be at an agent now.
    sent = [c for c in _cancel_in_flight(after, at) if _sent_before(before, after, c, at)]
    return reduced, [*sent, *_finish_effects(reduced, at)]


def fail_unreadable(run_id: str, raw: Any, reason: str, at: datetime, *, limit: int) -> tuple[RunState, list[Effect]]:
    """A stored state that cannot be read (a broken or foreign record): fail the run with the reason.

    What can be read of it is kept (the plan, the input and the times when
    they are valid), so that the record says which run this was.

    Args:
        run_id: The run.
        raw: The stored JSON, decoded as far as it could be (None if not at all).
        reason: Why it cannot be read.
        at: Now.
        limit: The most a stored state may take: what is kept is reduced to fit.

    Returns:
        A FAILED state of kind ``unreadable_state`` and its effects.
    """
    data: dict[str, Any] = raw if isinstance(raw, dict) else {}
    try:
        plan = WorkflowPlan.model_validate(data.get("plan"))
    except ValueError:
        plan = _STUB_PLAN
    stored_input = data.get("input")
    run_input: dict[str, JsonValue] = stored_input if isinstance(stored_input, dict) else {}
    version = data.get("version")
    error = RunError(
        kind=ErrorKind.UNREADABLE_STATE,
        message=f"the run's stored state cannot be read, so the run cannot go on: {reason}",
        details={"reason": reason[:2000]},
    )
    failed = RunState(
        run_id=run_id,
        status=RunStatus.FAILED,
        plan=plan,
        input={},
        error=error,
        created_at=at,
        completed_at=at,
        updated_at=at,
        version=_UNKNOWN_VERSION,
    )
    salvaged = {
        "input": run_input,
        "created_at": data.get("created_at") or at,
        "started_at": data.get("started_at"),
        # Above the stored snapshot's, so that this record replaces it in PostgreSQL.
        "version": version + 1
        if isinstance(version, int) and not isinstance(version, bool) and version >= 1
        else _UNKNOWN_VERSION,
    }
    try:
        state = RunState.model_validate({**failed.model_dump(), **salvaged})
    except ValueError:  # what was kept is itself broken (a time that is not one, say)
        state = failed
    state = _reduce(state, limit, ErrorKind.UNREADABLE_STATE)
    return state, _finish_effects(state, at)


_UNKNOWN_VERSION = 2**53
"""The version of a record that replaces a snapshot whose version cannot be read: newer than any."""

_STUB_PLAN = WorkflowPlan(
    workflow_id="(unreadable)",
    name="(unreadable)",
    version="0",
    start_step="unreadable",
    steps={"unreadable": WorkflowStep(id="unreadable", agent_name="(none)")},
)


def _failed_run(state: RunState, error: RunError, at: datetime) -> RunState:
    """``state`` FAILED with ``error``; its step still open fails with it (the attempt in flight too)."""
    step_error = AgentError(kind=error.kind, message=error.message[:10_000], retriable=False)
    state = _end_open_step(state, StepStatus.FAILED, at, step_error)
    return state.model_copy(
        update={
            "status": RunStatus.FAILED,
            "output": None,
            "error": error,
            "completed_at": at,
            "updated_at": max(at, state.updated_at),
        }
    )


def _end_open_step(state: RunState, status: StepStatus, at: datetime, error: AgentError | None = None) -> RunState:
    """End the run's current step with ``status`` if it is still open, and its attempt not yet finished."""
    step = state.steps.get(state.current_step or "")
    if step is None or step.status.finished:
        return state
    attempts = step.attempts
    current = step.current
    if current is not None and not current.status.finished:
        ended = current.model_copy(update={"status": status, "finished_at": at, "error": error or current.error})
        attempts = (*attempts[:-1], ended)
    step = step.model_copy(
        update={
            "status": status,
            "attempts": attempts,
            "error": error or step.error,
            "next_attempt_at": None,
            "completed_at": at,
        }
    )
    return state.model_copy(update={"steps": {**state.steps, step.step_id: step}})


def _sent_before(before: RunState | None, after: RunState, cancel: Effect, at: datetime) -> bool:
    """Whether the attempt ``cancel`` names was in flight before this event (so it may be at an agent)."""
    if not isinstance(cancel, CancelAgentTask):
        return False
    if before is None:  # a restored run: its attempt was sent before the restore
        step = after.steps.get(cancel.step_id)
        attempt = step.current if step else None
        return attempt is not None and attempt.dispatch_at < at
    step = before.steps.get(cancel.step_id)
    return (
        any(a.correlation_id == cancel.correlation_id and not a.status.finished for a in step.attempts)
        if step
        else False
    )


def _cancel_task(run_id: str, step_id: str, attempt: Attempt) -> CancelAgentTask:
    return CancelAgentTask(
        run_id=run_id,
        step_id=step_id,
        attempt=attempt.number,
        correlation_id=attempt.correlation_id,
        agent_name=attempt.agent_name,
    )


def _cancel_in_flight(state: RunState | None, at: datetime) -> list[Effect]:
    """Ask the agent to stop the attempt ``state`` waits for, if it may have been sent (its time has come)."""
    if state is None or state.status.finished or state.current_step is None:
        return []
    step = state.steps.get(state.current_step)
    attempt = step.current if step else None
    if step is None or attempt is None or attempt.status.finished or attempt.dispatch_at > at:
        return []
    return [_cancel_task(state.run_id, step.step_id, attempt)]


def _finish_effects(state: RunState, at: datetime) -> list[Effect]:
    return [
        _monitor(state, at, state.status, detail=_end_detail(state.error)),
        RunFinished(run_id=state.run_id, status=state.status, output=state.output, error=state.error),
        Checkpoint(state=state),
    ]


def _encoded_size(state: RunState) -> int:
    return len(state.model_dump_json().encode()) + len(state.run_id.encode())


def _reduce(state: RunState, limit: int, reason: str) -> RunState:
    """``state`` made to fit in ``limit`` bytes, giving up as little as it can.

    In turn: inputs and outputs over 1 KiB, then all of them, then the plan's
    mappings and the registry policies copied into the run, then the history
    and the plan itself (the run's identity and its error stay). The last
    form is a few hundred bytes, far below the smallest limit the settings allow.
    """
    for keep in (_KEEP_BYTES, 0):
        state = _drop_values(state, keep, reason)
        if _encoded_size(state) <= limit:
            return state
    plan = state.plan.model_copy(
        update={"steps": {k: s.model_copy(update={"input_mapping": {}}) for k, s in state.plan.steps.items()}}
    )
    defaults = ExecutionDefaults(timeout_s=state.defaults.timeout_s, retry=state.defaults.retry)
    state = state.model_copy(update={"plan": plan, "defaults": defaults})
    if _encoded_size(state) <= limit:
        return state
    stub = _STUB_PLAN.model_copy(
        update={
            "workflow_id": state.plan.workflow_id,
            "name": state.plan.name,
            "version": state.plan.version,
        }
    )
    error = state.error
    if error is not None:
        error = error.model_copy(update={"message": error.message[:2000], "details": _small_details(error.details)})
    return state.model_copy(update={"plan": stub, "steps": {}, "current_step": None, "error": error})


def _small_details(details: JsonValue) -> JsonValue:
    return details if _json_size(details) <= _KEEP_BYTES else None


def _compact_json(value: JsonValue) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def _json_size(value: JsonValue) -> int:
    """The bytes of ``value`` as compact JSON (what :func:`dropped` counts)."""
    return len(_compact_json(value))


def _is_dropped(value: JsonValue) -> bool:
    return isinstance(value, dict) and set(value) == {"dropped"} and isinstance(value["dropped"], dict)


def _drop_values(state: RunState, keep: int, reason: str) -> RunState:
    """Replace inputs and outputs larger than ``keep`` bytes by a note of what they were (notes stay)."""

    def small(value: JsonValue) -> JsonValue:
        if value is None or _is_dropped(value) or _json_size(value) <= keep:
            return value
        return dropped(value, reason)

    steps = {}
    for step_id, step in state.steps.items():
        attempts = tuple(
            a.model_copy(update={"input": small(a.input), "output": small(a.output)}) for a in step.attempts
        )
        steps[step_id] = step.model_copy(update={"attempts": attempts, "output": small(step.output)})
    run_input = state.input
    if run_input and not _is_dropped(run_input) and _json_size(run_input) > keep:
        run_input = dropped(run_input, reason)
    return state.model_copy(update={"steps": steps, "input": run_input, "output": small(state.output)})
