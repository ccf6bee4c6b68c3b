"""The run state machine: pure ``transition(state, event) -> (state, effects)``.

No Faust, Kafka, HTTP or database here. Time comes in with the events (``at``)
and randomness (retry jitter) is derived from the correlation id, so a
transition is a pure function of its arguments: replaying the same events
gives the same states and effects.

How a plan runs (the README's "Plans" section says it for users):

* A step starts when the steps leading to it have finished: all of them
  (``"join": "all"``, the default), or the first that chose it
  (``"join": "any"``, which then stops the others racing into it).
* A finished step chooses where to go: every ``next_step``, or the first
  route whose condition holds (else ``otherwise``). A step that no finished
  step chose is SKIPPED, and tells the steps after it in turn, so joins
  count skipped branches as done.
* A loop step whose ``while`` holds starts its body again, as a new
  iteration, at most ``max_iterations`` times.
* A map step runs one execution per item, at most ``max_concurrency`` at a
  time, and its output is their outputs in the items' order.
* An agent that asks a question (A2A ``INPUT_REQUIRED``) leaves its attempt
  WAITING for a person, with an input deadline in place of the call's; the
  answer carries the call on (the same A2A task, the next turn). An approval
  step's one attempt waits for a decision the same way, and calls no agent.
* The run completes when no step is waiting or running.

Rules this module keeps (docs/architecture.md, "The run state machine"):

* Idempotent: an event that changes nothing (a duplicate or stale result, a
  timeout of an attempt that already ended, a second submission of the same
  run, anything for a finished run) returns the state unchanged and **no**
  effects; the one exception is a stale question on an A2A task that no
  attempt holds, whose task the agent is asked to cancel (no one will answer it).
* Every change bumps ``RunState.version`` by one; the PostgreSQL snapshot
  upsert uses it so an older snapshot never overwrites a newer one.
* Events that cannot belong to any run (a result for an unknown run or step)
  return a single :class:`DeadLetter` effect and no state change.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import TypeAlias

from pydantic import JsonValue

from models.agents import RecoveryAction
from models.conditions import ConditionError, evaluate, parse_condition
from models.mapping import MappingContext, MappingError, resolve_mapping
from models.messages import (
    MAX_TEXT_CHARS,
    AgentError,
    AgentResult,
    AgentTask,
    Answer,
    ErrorKind,
    MonitoringUpdate,
    Question,
    Reply,
    ResultStatus,
    correlation_id,
    submission_fingerprint,
)
from models.plan import APPROVAL_AGENT, MAX_MAP_ITEMS, RetryPolicy, WorkflowStep, check_plan
from models.run_events import (
    AgentResultReceived,
    CancelAgentTask,
    CancelRequested,
    Checkpoint,
    DeadLetter,
    DispatchTask,
    Effect,
    Event,
    InputGiven,
    PublishMonitoring,
    RetryRequested,
    RunFinished,
    RunRestored,
    RunSubmitted,
    ScheduleTimeout,
    StepTimedOut,
    event_run_id,
)
from models.run_input import answer_refusal, answered_already
from models.run_limits import dropped, fail_too_large, fail_unreadable, step_in_flight
from models.run_state import (
    AgentPolicy,
    Attempt,
    Exchange,
    Execution,
    ExecutionDefaults,
    RunError,
    RunState,
    RunStatus,
    StepState,
    StepStatus,
    execution_key,
    step_output,
)

__all__ = [
    "UNRETRIABLE_RUN_ERRORS",
    "AgentPolicy",
    "AgentResultReceived",
    "Attempt",
    "CancelAgentTask",
    "CancelRequested",
    "Checkpoint",
    "DeadLetter",
    "DispatchTask",
    "Effect",
    "Event",
    "Execution",
    "ExecutionDefaults",
    "InputGiven",
    "PublishMonitoring",
    "RetryRequested",
    "RunError",
    "RunFinished",
    "RunRestored",
    "RunState",
    "RunStatus",
    "RunSubmitted",
    "ScheduleTimeout",
    "StepState",
    "StepStatus",
    "StepTimedOut",
    "cancel_in_flight",
    "dropped",
    "event_run_id",
    "execution_key",
    "fail_too_large",
    "fail_unreadable",
    "final_update",
    "resume",
    "retry_refusal",
    "transition",
]

Outcome: TypeAlias = tuple[RunState | None, list[Effect]]

UNRETRIABLE_RUN_ERRORS = frozenset(
    {ErrorKind.STATE_TOO_LARGE, ErrorKind.UNREADABLE_STATE, ErrorKind.CONDITION_ERROR, ErrorKind.LOOP_EXHAUSTED}
)
"""Runs a retry cannot help: stored without their data (or unreadable), or failed on a condition of
outputs that a retry would not change."""

_NOT_CHOSEN = "no step that leads here chose it"


def retry_refusal(run_id: str, error_kind: str | None) -> str | None:
    """Why a FAILED run with this error kind cannot be retried, or None if it can."""
    if error_kind in {ErrorKind.STATE_TOO_LARGE, ErrorKind.UNREADABLE_STATE}:
        return f"run {run_id!r} failed with {error_kind}: its data were not kept, so it cannot be retried"
    if error_kind in UNRETRIABLE_RUN_ERRORS:
        return (
            f"run {run_id!r} failed with {error_kind}: the outputs it was decided on would not change, "
            "so a retry would fail the same way"
        )
    return None


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
        return _on_submitted(state, event)
    if isinstance(event, RunRestored):
        if state is not None:
            return state, []  # the table has it: the table is newer than any checkpoint
        restored = event.state
        return restored, [
            _monitor(restored, event.at, "RESTORED", detail={"version": restored.version}),
            *resume(restored, event.at),
        ]
    if state is None:
        return None, [DeadLetter(run_id=event_run_id(event), reason=f"no run {event_run_id(event)!r} is known")]
    if isinstance(event, AgentResultReceived):
        result = event.result
        if result.step_id not in state.plan.steps:
            return state, [
                DeadLetter(run_id=state.run_id, reason=f"run {state.run_id!r} has no step {result.step_id!r}")
            ]
        execution = state.executions.get(execution_key(result.step_id, result.iteration, result.item))
        attempt = execution.current if execution else None
        if (
            execution is None
            or attempt is None
            or not state.awaits(result.step_id, result.attempt, result.iteration, result.item)
            or attempt.correlation_id != result.correlation_id
            or attempt.status is StepStatus.WAITING
            or result.turn != attempt.turn
        ):
            # Stale or duplicate: idempotent. (A PENDING attempt's result is
            # accepted: it proves the delayed dispatch happened. A waiting one
            # waits for a person; a result of an earlier turn is a repeat.)
            return state, _orphan_question(state, result)
        draft = _Draft(state, event.at)
        if result.status is ResultStatus.SUCCESS:
            _succeed(draft, execution, attempt, result.output)
        elif result.question is not None:  # INPUT_REQUIRED
            question = result.question
            asked = attempt.model_copy(update={"task_id": question.task_id, "context_id": question.context_id})
            _ask(draft, execution, asked, Question(text=question.text, data=question.data))
        else:
            assert result.error is not None  # guaranteed by AgentResult's validator
            _fail_attempt(draft, execution, attempt, result.error)
        return draft.outcome()
    if isinstance(event, StepTimedOut):
        execution = state.executions.get(execution_key(event.step_id, event.iteration, event.item))
        attempt = execution.current if execution else None
        if (
            execution is None
            or attempt is None
            or not state.awaits(event.step_id, event.attempt, event.iteration, event.item)
            or event.at < attempt.deadline
        ):
            return state, []
        draft = _Draft(state, event.at)
        if attempt.status is StepStatus.WAITING:
            _input_timed_out(draft, execution, attempt)
            return draft.outcome()
        timeout_s, _ = _policy(state, state.plan.steps[execution.step_id], attempt.agent_name)
        error = AgentError(
            kind=ErrorKind.TIMEOUT,
            message=f"no result from agent {attempt.agent_name!r} within {timeout_s:g}s",
            retriable=True,
        )
        draft.effects.append(_cancel_task(state.run_id, execution, attempt))
        _fail_attempt(draft, execution, attempt, error)
        return draft.outcome()
    if isinstance(event, InputGiven):
        return _on_input(state, event)
    if isinstance(event, CancelRequested):
        if state.status.finished:
            return state, []
        draft = _Draft(state, event.at)
        stopped_at = step_in_flight(state)
        _stop_open(draft, StepStatus.CANCELLED, None)
        cancelled = RunError(kind=ErrorKind.CANCELLED, message=event.reason, step_id=stopped_at)
        _finish(draft, RunStatus.CANCELLED, error=cancelled)
        return draft.outcome()
    return _on_retry(state, event)


def resume(state: RunState, now: datetime, grace_s: float = 0.0) -> list[Effect]:
    """What a RUNNING run needs to go on after a restart or a rebalance.

    Attempts in flight are dispatched again with the same correlation id (the
    bridge and agents recognise the repeat), delayed retries keep their time,
    attempts waiting for a person are not dispatched (their question stands),
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
    if state.status is not RunStatus.RUNNING:
        return []
    effects: list[Effect] = []
    for execution in state.open_executions():
        attempt = execution.current
        if attempt is None or attempt.status.finished:
            continue
        if attempt.status is not StepStatus.WAITING:  # a waiting attempt has no call in flight: only its deadline
            not_before = attempt.dispatch_at if attempt.dispatch_at > now else None
            effects.append(DispatchTask(task=_task(state.run_id, execution, attempt), not_before=not_before))
        effects.append(
            _timeout(state.run_id, execution, attempt, max(attempt.deadline, now + timedelta(seconds=grace_s)))
        )
    return effects


def cancel_in_flight(state: RunState | None, at: datetime) -> list[CancelAgentTask]:
    """Ask the agents to stop the attempts ``state`` waits for that may have been sent (their time has come)."""
    if state is None or state.status.finished:
        return []
    out = []
    for execution in state.open_executions():
        attempt = execution.current
        if attempt is not None and _has_call(attempt) and attempt.dispatch_at <= at:
            out.append(_cancel_task(state.run_id, execution, attempt))
    return out


def final_update(state: RunState) -> PublishMonitoring | None:
    """The monitoring update that told the world a finished run's end (None while it runs).

    The same update every time, so it can be published again after a crash
    lost it: a consumer sees a copy with the same status and timestamp.
    """
    if not state.status.finished or state.completed_at is None:
        return None
    return _monitor(state, state.completed_at, state.status, detail=_end_detail(state.error))


# --------------------------------------------------------------------- drafts


class _Draft:
    """The run being changed by one event: copies of its maps, changed in place, and the effects so far.

    The state passed in is never changed; :meth:`outcome` builds the new one.
    """

    def __init__(self, state: RunState, at: datetime) -> None:
        self.state = state
        self.at = at
        self.plan = state.plan
        self.graph = state.plan.graph()
        self.steps = dict(state.steps)
        self.executions = dict(state.executions)
        self.fields: dict[str, object] = {}
        self.effects: list[Effect] = []
        self.filling: set[str] = set()
        self.touched: set[str] = set()

    @property
    def status(self) -> RunStatus:
        return self.fields.get("status", self.state.status)  # type: ignore[return-value]

    @property
    def last_step(self) -> str | None:
        return self.fields.get("last_step", self.state.last_step)  # type: ignore[return-value]

    def put(self, item: StepState | Execution) -> None:
        if isinstance(item, StepState):
            self.steps[item.step_id] = item
        else:
            before = self.executions.get(item.key)
            was = before is not None and before.status is StepStatus.WAITING
            now = item.status is StepStatus.WAITING
            if was != now:  # the run's count of executions waiting for a person follows every change
                waiting = self.fields.get("waiting", self.state.waiting)
                assert isinstance(waiting, int)
                self.fields["waiting"] = waiting + (1 if now else -1)
            self.executions[item.key] = item
            self.touched.add(item.key)

    def build(self) -> RunState:
        return self.state.model_copy(
            update={
                "steps": self.steps,
                "executions": self.executions,
                "updated_at": max(self.at, self.state.updated_at),
                **self.fields,
            }
        )

    def outcome(self) -> Outcome:
        new = self.build().model_copy(update={"version": self.state.version + 1})
        # One checkpoint per change, of the final state, after the other effects
        # that describe it (the snapshot is the durable record of all of them).
        before = self.state.executions
        changed = frozenset(k for k in self.touched if before.get(k) != self.executions.get(k))
        return new, [*self.effects, Checkpoint(state=new, changed=changed)]

    def context(self, execution: Execution | None = None) -> MappingContext:
        outputs = _Outputs(self.steps, self.executions)
        if execution is None or execution.item is None:
            return MappingContext(workflow_input=self.state.input, step_outputs=outputs)
        items = self.steps[execution.step_id].items or ()
        return MappingContext(
            workflow_input=self.state.input, step_outputs=outputs, item=items[execution.item], index=execution.item
        )

    def monitor(
        self, status: str, execution: Execution | None = None, *, step_id: str | None = None, **detail: JsonValue
    ) -> None:
        attempt = execution.current if execution is not None else None
        self.effects.append(
            PublishMonitoring(
                update=MonitoringUpdate(
                    run_id=self.state.run_id,
                    step_id=execution.step_id if execution is not None else step_id,
                    attempt=attempt.number if attempt is not None else None,
                    iteration=execution.iteration if execution is not None else None,
                    item=execution.item if execution is not None else None,
                    status=status,
                    timestamp=self.at,
                    detail=dict(detail),
                )
            )
        )


# ------------------------------------------------------------------- handlers


class _Outputs(Mapping[str, JsonValue]):
    """The steps' latest outputs, as mappings read them: each looked up only when a placeholder names it."""

    def __init__(self, steps: Mapping[str, StepState], executions: Mapping[str, Execution]) -> None:
        self._steps = steps
        self._executions = executions
        self._read: dict[str, JsonValue] = {}

    def __contains__(self, step_id: object) -> bool:
        step = self._steps.get(step_id) if isinstance(step_id, str) else None
        return step is not None and step.has_output

    def __getitem__(self, step_id: str) -> JsonValue:
        if step_id not in self:
            raise KeyError(step_id)
        if step_id not in self._read:
            self._read[step_id] = step_output(self._steps[step_id], self._executions)
        return self._read[step_id]

    def __iter__(self) -> Iterator[str]:
        return (s for s, step in self._steps.items() if step.has_output)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _on_submitted(state: RunState | None, event: RunSubmitted) -> Outcome:
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
    draft = _Draft(run, event.at)
    problems = check_plan(event.plan)
    if problems:
        error = RunError(
            kind=ErrorKind.INVALID_PLAN,
            message="; ".join(str(p) for p in problems),
            details=[{"path": p.path, "reason": p.reason} for p in problems],
        )
        _finish(draft, RunStatus.FAILED, error=error, started=False)
    else:
        draft.monitor(RunStatus.RUNNING)
        _signal(draft, None, run.plan.start_step, chosen=True)
    new = draft.build()  # a new run starts at version 1
    return new, [*draft.effects, Checkpoint(state=new)]


def _on_retry(state: RunState, event: RetryRequested) -> Outcome:
    refusal = retry_refusal(state.run_id, state.error.kind if state.error is not None else None)
    if state.status is RunStatus.FAILED and refusal is not None:
        return state, [DeadLetter(run_id=state.run_id, reason=refusal)]
    if state.status is not RunStatus.FAILED:
        return state, []  # only a failed run can be retried
    failed = [s for s in state.steps.values() if s.status in {StepStatus.FAILED, StepStatus.CANCELLED}]
    if not failed:
        return state, []
    draft = _Draft(state, event.at)
    draft.fields.update({"status": RunStatus.RUNNING, "error": None, "completed_at": None, "output": None})
    draft.monitor(RunStatus.RUNNING, retry_requested=True)
    for step in failed:
        reopen = [
            e
            for e in state.executions.values()
            if e.step_id == step.step_id
            and e.iteration == step.iteration
            and e.status in {StepStatus.FAILED, StepStatus.CANCELLED}
        ]
        if not reopen:
            # It failed before any call of this iteration (its input or list could not be mapped): start it again.
            draft.put(step.model_copy(update={"status": StepStatus.PENDING, "error": None, "completed_at": None}))
            _start(draft, step.step_id)
            continue
        draft.put(
            step.model_copy(
                update={
                    "status": StepStatus.RUNNING,
                    "error": None,
                    "completed_at": None,
                    "open_items": step.open_items + sum(1 for e in reopen if e.item is not None),
                }
            )
        )
        for execution in reopen:
            execution = execution.model_copy(
                update={
                    "status": StepStatus.RUNNING,
                    "error": None,
                    "completed_at": None,
                    "first_attempt_of_round": len(execution.attempts) + 1,
                    "fallback_agent": None,
                }
            )
            draft.put(execution)
            _new_attempt(draft, execution, event.at)
            if draft.status is not RunStatus.RUNNING:
                break
        if draft.status is not RunStatus.RUNNING:
            break
    return draft.outcome()


# ------------------------------------------------------------- the step graph


def _signal(draft: _Draft, source: str | None, target: str, *, chosen: bool) -> None:
    """``source`` finished (None: the run or a loop starts ``target``); tell ``target``, and on down its skips."""
    work: deque[tuple[str | None, str, bool]] = deque([(source, target, chosen)])
    while work and draft.status is RunStatus.RUNNING:
        source, target, chosen = work.popleft()
        plan_step = draft.plan.steps[target]
        step = draft.steps.get(target) or StepState(
            step_id=target, agent_name=plan_step.agent_name, status=StepStatus.PENDING
        )
        if step.status is not StepStatus.PENDING:
            continue  # it started already (an any-join), or lost its race
        if source is not None and source not in step.arrived:
            step = step.model_copy(
                update={
                    "arrived": (*step.arrived, source),
                    "chosen_by": (*step.chosen_by, source) if chosen else step.chosen_by,
                }
            )
        draft.put(step)
        waiting_for = [p for p in draft.graph.predecessors[target] if p in draft.graph.reachable]
        if source is None or (plan_step.join == "any" and step.chosen_by):
            start = True
        elif all(p in step.arrived for p in waiting_for):
            start = bool(step.chosen_by)
        else:
            continue  # a join still waiting for some of its branches
        if start:
            _start(draft, target)
            continue
        # Skipped in this iteration: an output of an earlier one is not the latest.
        step = step.model_copy(
            update={
                "status": StepStatus.SKIPPED,
                "skip_reason": _NOT_CHOSEN,
                "completed_at": draft.at,
                "has_output": False,
                "output_key": None,
                "output_items": None,
            }
        )
        draft.put(step)
        draft.monitor(StepStatus.SKIPPED, step_id=target, reason=_NOT_CHOSEN)
        for after in draft.graph.targets[target]:
            work.append((target, after, False))


def _start(draft: _Draft, step_id: str) -> None:
    """Start a step whose join is satisfied: its execution, or a map step's first items."""
    plan_step = draft.plan.steps[step_id]
    step = draft.steps[step_id].model_copy(
        update={"status": StepStatus.RUNNING, "started_at": draft.at, "completed_at": None, "error": None}
    )
    draft.put(step)
    if plan_step.join == "any":
        _stop_racers(draft, step_id)
    if plan_step.map is None:
        _open_execution(draft, step, None)
        return
    if step.items is None:
        items = _map_items(draft, step_id, plan_step)
        if items is None:
            return
        step = step.model_copy(update={"items": tuple(items), "next_item": 0, "open_items": 0})
        draft.put(step)
    if not step.items:
        _step_done(draft, step_id, execution_key(step_id, step.iteration), items=0)
        return
    _fill_map(draft, step_id)


def _stop_racers(draft: _Draft, join_id: str) -> None:
    """An any-join started: the steps that only lead to it are no longer needed."""
    for racer in sorted(draft.graph.won_by(join_id)):
        step = draft.steps.get(racer)
        if step is not None and step.status.finished:
            continue
        for execution in list(draft.executions.values()):
            if execution.step_id == racer and not execution.status.finished:
                _end_execution(draft, execution, StepStatus.CANCELLED, None)
        reason = f"{join_id!r} started with another branch"
        plan_step = draft.plan.steps[racer]
        base = step or StepState(step_id=racer, agent_name=plan_step.agent_name, status=StepStatus.PENDING)
        draft.put(
            base.model_copy(
                update={"status": StepStatus.SKIPPED, "skip_reason": reason, "completed_at": draft.at, "open_items": 0}
            )
        )
        draft.monitor(StepStatus.SKIPPED, step_id=racer, reason=reason)


def _map_items(draft: _Draft, step_id: str, plan_step: WorkflowStep) -> list[JsonValue] | None:
    """The list a map step goes over, or None after failing the step with the reason."""
    assert plan_step.map is not None
    over = plan_step.map.over
    try:
        items = resolve_mapping(over, draft.context())
    except MappingError as error:
        _fail_step(draft, step_id, ErrorKind.MAPPING_ERROR, f"step {step_id!r}: map.over cannot be read: {error}")
        return None
    if not isinstance(items, list):
        _fail_step(
            draft,
            step_id,
            ErrorKind.INVALID_MAP_LIST,
            f"step {step_id!r}: map.over {over!r} is {type(items).__name__}, not a list",
        )
        return None
    if len(items) > MAX_MAP_ITEMS:
        _fail_step(
            draft,
            step_id,
            ErrorKind.INVALID_MAP_LIST,
            f"step {step_id!r}: map.over has {len(items)} items, over the most a map takes ({MAX_MAP_ITEMS})",
        )
        return None
    return items


def _fill_map(draft: _Draft, step_id: str) -> None:
    """Open a map step's next items up to ``max_concurrency``; complete the step once all have ended.

    An item may end as it opens (its input cannot be mapped): then this loop
    opens the next, rather than a call nested one deeper per item.
    """
    if step_id in draft.filling:
        return  # an item ended while the loop below was opening it: the loop goes on
    plan_step = draft.plan.steps[step_id]
    assert plan_step.map is not None
    draft.filling.add(step_id)
    try:
        while draft.status is RunStatus.RUNNING:
            step = draft.steps[step_id]
            if (
                step.status is not StepStatus.RUNNING
                or step.items is None
                or step.next_item >= len(step.items)
                or step.open_items >= plan_step.map.max_concurrency
            ):
                break
            item = step.next_item
            draft.put(step.model_copy(update={"next_item": item + 1, "open_items": step.open_items + 1}))
            _open_execution(draft, draft.steps[step_id], item)
    finally:
        draft.filling.discard(step_id)
    step = draft.steps[step_id]
    if (
        draft.status is not RunStatus.RUNNING
        or step.status is not StepStatus.RUNNING
        or step.open_items > 0
        or step.items is None
        or step.next_item < len(step.items)
    ):
        return
    _step_done(draft, step_id, execution_key(step_id, step.iteration), items=len(step.items))


def _open_execution(draft: _Draft, step: StepState, item: int | None) -> None:
    execution = Execution(
        step_id=step.step_id,
        iteration=step.iteration,
        item=item,
        agent_name=step.agent_name,
        status=StepStatus.RUNNING,
        started_at=draft.at,
    )
    draft.put(execution)
    _new_attempt(draft, execution, draft.at)


def _new_attempt(draft: _Draft, execution: Execution, dispatch_at: datetime) -> None:
    """Add the next attempt to ``execution``, or fail it if its input cannot be mapped."""
    plan_step = draft.plan.steps[execution.step_id]
    if plan_step.approval is not None:
        _ask_approval(draft, execution, plan_step)
        return
    try:
        task_input = resolve_mapping(plan_step.input_mapping, draft.context(execution))
    except MappingError as error:
        mapping_error = AgentError(kind=ErrorKind.MAPPING_ERROR, message=str(error), retriable=False)
        _execution_failed(draft, execution, mapping_error, why="input mapping failed")
        return
    agent_name = execution.agent
    timeout_s, _ = _policy(draft.state, plan_step, agent_name)
    number = len(execution.attempts) + 1
    delayed = dispatch_at > draft.at
    attempt = Attempt(
        number=number,
        correlation_id=correlation_id(
            draft.state.run_id, execution.step_id, number, execution.iteration, execution.item
        ),
        agent_name=agent_name,
        status=StepStatus.PENDING if delayed else StepStatus.RUNNING,
        input=task_input,
        dispatch_at=dispatch_at,
        deadline=dispatch_at + timedelta(seconds=timeout_s),
    )
    execution = execution.model_copy(
        update={
            "attempts": (*execution.attempts, attempt),
            "next_attempt_at": dispatch_at if delayed else None,
            "status": StepStatus.RUNNING,
        }
    )
    draft.put(execution)
    draft.effects.append(
        DispatchTask(task=_task(draft.state.run_id, execution, attempt), not_before=dispatch_at if delayed else None)
    )
    draft.effects.append(_timeout(draft.state.run_id, execution, attempt, attempt.deadline))
    draft.monitor(
        "SCHEDULED" if delayed else StepStatus.RUNNING,
        execution,
        agent=agent_name,
        dispatch_at=dispatch_at.isoformat(),
    )


def _succeed(draft: _Draft, execution: Execution, attempt: Attempt, output: JsonValue) -> None:
    done = attempt.model_copy(update={"status": StepStatus.COMPLETED, "finished_at": draft.at, "output": output})
    execution = execution.model_copy(
        update={
            "status": StepStatus.COMPLETED,
            "attempts": (*execution.attempts[:-1], done),
            "error": None,
            "next_attempt_at": None,
            "completed_at": draft.at,
        }
    )
    draft.put(execution)
    draft.monitor(StepStatus.COMPLETED, execution)
    _execution_ended(draft, execution)


def _execution_ended(draft: _Draft, execution: Execution, *, skipped: bool = False) -> None:
    """An execution ended with an output (done, or skipped by its recovery policy): its step goes on."""
    if execution.item is None:
        _step_done(draft, execution.step_id, execution.key, skipped=skipped)
        return
    step = draft.steps[execution.step_id]
    draft.put(step.model_copy(update={"open_items": step.open_items - 1}))
    _fill_map(draft, execution.step_id)


def _step_done(
    draft: _Draft, step_id: str, output_key: str, *, items: int | None = None, skipped: bool = False
) -> None:
    """A step has its output (in ``output_key``, or its items): decide its loop and routes, then lead on."""
    plan_step = draft.plan.steps[step_id]
    step = draft.steps[step_id].model_copy(
        update={
            "status": StepStatus.SKIPPED if skipped else StepStatus.COMPLETED,
            "has_output": True,
            "output_key": output_key,
            "output_items": items,
            "error": None,
            "completed_at": draft.at,
        }
    )
    draft.put(step)
    if plan_step.map is not None:
        draft.monitor(step.status, step_id=step_id, items=len(step.items or ()))
    context = draft.context()
    if plan_step.loop is not None:
        loop = plan_step.loop
        try:
            again = evaluate(parse_condition(loop.while_), context)
        except ConditionError as error:
            _fail_step(draft, step_id, ErrorKind.CONDITION_ERROR, f"step {step_id!r}: loop.while {error.reason}")
            return
        if again and step.iteration < loop.max_iterations:
            _next_iteration(draft, step_id)
            return
        if again and loop.when_exhausted == "fail":
            _fail_step(
                draft,
                step_id,
                ErrorKind.LOOP_EXHAUSTED,
                f"step {step_id!r}: the loop back to {loop.back_to!r} ran {step.iteration} of "
                f"{loop.max_iterations} iteration(s) and its condition still holds: {loop.while_}",
            )
            return
        if again:
            draft.monitor("LOOP_EXHAUSTED", step_id=step_id, iterations=step.iteration, going_on=True)
    chosen = _chosen(draft, step_id, plan_step, context)
    if chosen is None:
        return
    if not chosen:  # no link, or no route that held: a path of the run ends here
        draft.fields["last_step"] = step_id
    for target in draft.graph.targets[step_id]:
        _signal(draft, step_id, target, chosen=target in chosen)
    _finish_if_done(draft)


def _chosen(draft: _Draft, step_id: str, plan_step: WorkflowStep, context: MappingContext) -> set[str] | None:
    """Where a finished step leads (None after failing it: a condition could not be evaluated)."""
    if plan_step.routes is None:
        return set(draft.graph.targets[step_id])
    for index, route in enumerate(plan_step.routes):
        try:
            taken = evaluate(parse_condition(route.when), context)
        except ConditionError as error:
            _fail_step(draft, step_id, ErrorKind.CONDITION_ERROR, f"step {step_id!r}: routes[{index}] {error.reason}")
            return None
        if taken:
            return _targets_of(route.to)
    return _targets_of(plan_step.otherwise)


def _targets_of(value: str | list[str] | None) -> set[str]:
    if value is None:
        return set()
    return {value} if isinstance(value, str) else set(value)


def _next_iteration(draft: _Draft, loop_step: str) -> None:
    """Start the loop's body again, as its next iteration: outputs stay readable until replaced."""
    loop = draft.plan.steps[loop_step].loop
    assert loop is not None
    iteration = draft.steps[loop_step].iteration + 1
    for member in draft.graph.bodies[loop_step]:
        old = draft.steps.get(member)
        plan_step = draft.plan.steps[member]
        past: tuple[int, ...] = ()
        if plan_step.map is not None:  # the items each iteration started: where their executions are
            past = (*(old.past_items if old else ()), old.next_item if old else 0)
            past = (0,) * (iteration - 1 - len(past)) + past
        draft.put(
            StepState(
                step_id=member,
                agent_name=plan_step.agent_name,
                status=StepStatus.PENDING,
                iteration=iteration,
                has_output=old.has_output if old else False,
                output_key=old.output_key if old else None,
                output_items=old.output_items if old else None,
                past_items=past,
            )
        )
    draft.monitor("ITERATION", step_id=loop.back_to, iteration=iteration, loop=loop_step)
    _signal(draft, None, loop.back_to, chosen=True)


def _finish_if_done(draft: _Draft) -> None:
    if draft.status is not RunStatus.RUNNING:
        return
    if any(not s.status.finished for s in draft.steps.values()):
        return
    if draft.plan.output is not None:
        try:
            output = resolve_mapping(draft.plan.output, draft.context())
        except MappingError as error:
            run_error = RunError(kind=ErrorKind.MAPPING_ERROR, message=f"the plan's output cannot be mapped: {error}")
            _finish(draft, RunStatus.FAILED, error=run_error)
            return
    else:
        last = draft.steps.get(draft.last_step or "")
        output = step_output(last, draft.executions) if last is not None else None
    _finish(draft, RunStatus.COMPLETED, output=output)


# ---------------------------------------------------------------- people


def _orphan_question(state: RunState, result: AgentResult) -> list[Effect]:
    """A stale result that asks on an A2A task no attempt holds: cancel that task, or it waits for ever.

    A call made again (a bridge that died before its offsets were committed
    delivers a task that had ended) starts a new task at the agent; when it
    asks, no one will answer it. The question of the task an attempt holds
    (the same question, delivered again) is left alone.
    """
    question = result.question
    if question is None:
        return []
    for execution in state.executions.values():
        if execution.step_id == result.step_id and any(a.task_id == question.task_id for a in execution.attempts):
            return []
    return [
        CancelAgentTask(
            run_id=state.run_id,
            step_id=result.step_id,
            attempt=result.attempt,
            iteration=result.iteration,
            item=result.item,
            correlation_id=result.correlation_id,
            agent_name=_agent_of(state, result),
            task_id=question.task_id,
        )
    ]


def _agent_of(state: RunState, result: AgentResult) -> str:
    """The agent an attempt called (the plan's, when the run no longer knows the attempt)."""
    execution = state.executions.get(execution_key(result.step_id, result.iteration, result.item))
    if execution is not None and result.attempt <= len(execution.attempts):
        return execution.attempts[result.attempt - 1].agent_name
    return state.plan.steps[result.step_id].agent_name


def _ask(draft: _Draft, execution: Execution, attempt: Attempt, question: Question) -> None:
    """The attempt's agent (or its approval step) asks a person: it waits, under an input deadline, not the call's."""
    plan_step = draft.plan.steps[execution.step_id]
    deadline = draft.at + timedelta(seconds=_input_timeout_s(draft.state, plan_step, attempt.agent_name))
    waiting = attempt.model_copy(
        update={
            "status": StepStatus.WAITING,
            "exchanges": (*attempt.exchanges, Exchange(question=question, asked_at=draft.at)),
            "deadline": deadline,
        }
    )
    execution = execution.model_copy(
        update={"attempts": (*execution.attempts[:-1], waiting), "status": StepStatus.WAITING, "next_attempt_at": None}
    )
    draft.put(execution)
    draft.effects.append(_timeout(draft.state.run_id, execution, waiting, deadline))
    draft.monitor(
        StepStatus.WAITING,
        execution,
        question=question.text,
        data=question.data,
        turn=waiting.turn,
        deadline=deadline.isoformat(),
    )


def _ask_approval(draft: _Draft, execution: Execution, plan_step: WorkflowStep) -> None:
    """An approval step's attempt: its prompt, mapped like an input, waits for a decision (no agent is called)."""
    assert plan_step.approval is not None
    try:
        prompt = resolve_mapping(plan_step.approval.prompt, draft.context(execution))
    except MappingError as error:
        mapping_error = AgentError(kind=ErrorKind.MAPPING_ERROR, message=str(error), retriable=False)
        _execution_failed(draft, execution, mapping_error, why="the approval prompt cannot be mapped")
        return
    number = len(execution.attempts) + 1
    attempt = Attempt(
        number=number,
        correlation_id=correlation_id(
            draft.state.run_id, execution.step_id, number, execution.iteration, execution.item
        ),
        agent_name=APPROVAL_AGENT,
        status=StepStatus.RUNNING,
        input=prompt,
        dispatch_at=draft.at,
        deadline=draft.at,
    )
    execution = execution.model_copy(update={"attempts": (*execution.attempts, attempt)})
    # A text prompt is the question; an object is its data, and its "text", if any, the question too.
    text = prompt if isinstance(prompt, str) else prompt.get("text") if isinstance(prompt, dict) else None
    question = Question(
        text=text[:MAX_TEXT_CHARS] if isinstance(text, str) else "", data=None if isinstance(prompt, str) else prompt
    )
    _ask(draft, execution, attempt, question)


def _on_input(state: RunState, event: InputGiven) -> Outcome:
    """A person's answer: applied to the question it names if that question still waits, else refused."""
    if answered_already(state, event.step_id, event.iteration, event.item, event.answer.answer_id):
        return state, []  # this very answer, delivered again: applied already
    refusal = answer_refusal(state, event.step_id, event.iteration, event.item, event.turn, event.answer, event.attempt)
    if refusal is not None:
        return state, [DeadLetter(run_id=state.run_id, reason=f"answer refused: {refusal}")]
    execution = state.executions[execution_key(event.step_id, event.iteration, event.item)]
    attempt = execution.current
    assert attempt is not None  # answer_refusal found it waiting
    draft = _Draft(state, event.at)
    _answer(draft, execution, attempt, event.answer)
    return draft.outcome()


def _answer(draft: _Draft, execution: Execution, attempt: Attempt, answer: Answer) -> None:
    """Record the answer; an approval is decided by it, an agent's call goes on with it (its next turn)."""
    question = attempt.exchanges[-1].model_copy(update={"answer": answer, "answered_at": draft.at})
    answered = attempt.model_copy(update={"exchanges": (*attempt.exchanges[:-1], question)})
    plan_step = draft.plan.steps[execution.step_id]
    if plan_step.approval is not None:
        approved = answer.decision == "approve"
        draft.monitor("ANSWERED", execution, decision=answer.decision, turn=attempt.turn, source=answer.source)
        if not approved and plan_step.approval.on_reject == "fail":
            why = f": {answer.text}" if answer.text else ""
            error = AgentError(kind=ErrorKind.REJECTED, message=f"step {execution.step_id!r} was rejected{why}")
            _fail_attempt(draft, execution, answered.model_copy(update={"status": StepStatus.RUNNING}), error)
            return
        output: JsonValue = {
            "approved": approved,
            "decision": answer.decision,
            "text": answer.text,
            "data": answer.data,
        }
        _succeed(draft, execution, answered, output)
        return
    timeout_s, _ = _policy(draft.state, plan_step, attempt.agent_name)
    going_on = answered.model_copy(
        update={"status": StepStatus.RUNNING, "deadline": draft.at + timedelta(seconds=timeout_s)}
    )
    execution = execution.model_copy(
        update={"attempts": (*execution.attempts[:-1], going_on), "status": StepStatus.RUNNING}
    )
    draft.put(execution)
    draft.effects.append(DispatchTask(task=_task(draft.state.run_id, execution, going_on)))
    draft.effects.append(_timeout(draft.state.run_id, execution, going_on, going_on.deadline))
    draft.monitor("ANSWERED", execution, turn=attempt.turn, source=answer.source)


def _input_timed_out(draft: _Draft, execution: Execution, attempt: Attempt) -> None:
    """No answer in time: an approval takes its default decision if it has one; else the attempt fails."""
    plan_step = draft.plan.steps[execution.step_id]
    timeout_s = _input_timeout_s(draft.state, plan_step, attempt.agent_name)
    approval = plan_step.approval
    if approval is not None and approval.default_decision is not None:
        _answer(
            draft,
            execution,
            attempt,
            Answer(answer_id=f"timeout:{attempt.correlation_id}", decision=approval.default_decision, source="timeout"),
        )
        return
    asked = "the approval" if approval is not None else f"the question of agent {attempt.agent_name!r}"
    error = AgentError(kind=ErrorKind.INPUT_TIMEOUT, message=f"no answer to {asked} within {timeout_s:g}s")
    if _has_call(attempt):
        draft.effects.append(_cancel_task(draft.state.run_id, execution, attempt))  # its task waits for nothing now
    _fail_attempt(draft, execution, attempt, error)


# ------------------------------------------------------------------- failures


def _policy(state: RunState, step: WorkflowStep, agent_name: str) -> tuple[float, RetryPolicy]:
    agent = state.defaults.agent(agent_name)
    timeout_s = next(t for t in (step.timeout_s, agent.timeout_s, state.defaults.timeout_s) if t is not None)
    retry = next(r for r in (step.retry, agent.retry, state.defaults.retry) if r is not None)
    return timeout_s, retry


def _input_timeout_s(state: RunState, step: WorkflowStep, agent_name: str) -> float:
    """How long a question waits for its answer: the step's, else the agent's, else the run's default."""
    agent = state.defaults.agent(agent_name)
    return next(t for t in (step.input_timeout_s, agent.input_timeout_s, state.defaults.input_timeout_s) if t)


def _fail_attempt(draft: _Draft, execution: Execution, attempt: Attempt, error: AgentError) -> None:
    plan_step = draft.plan.steps[execution.step_id]
    _, policy = _policy(draft.state, plan_step, execution.agent)
    failed = attempt.model_copy(update={"status": StepStatus.FAILED, "finished_at": draft.at, "error": error})
    execution = execution.model_copy(update={"attempts": (*execution.attempts[:-1], failed), "error": error})
    draft.put(execution)
    used = attempt.number - execution.first_attempt_of_round + 1
    retriable = error.retriable and error.kind not in policy.non_retriable_kinds
    if retriable and used < policy.max_attempts:
        delay = policy.delay_s(used, attempt.correlation_id)
        draft.monitor(StepStatus.FAILED, execution, error=error.message, kind=error.kind, will_retry=True)
        _new_attempt(draft, execution, draft.at + timedelta(seconds=delay))
        return
    why = "not retriable" if not retriable else f"{used} attempt(s) used of {policy.max_attempts}"
    recovery = draft.state.defaults.agent(execution.agent_name).recovery
    if recovery.action is RecoveryAction.FALLBACK and recovery.fallback_agent and execution.fallback_agent is None:
        execution = execution.model_copy(
            update={"fallback_agent": recovery.fallback_agent, "first_attempt_of_round": len(execution.attempts) + 1}
        )
        draft.put(execution)
        draft.monitor(
            StepStatus.FAILED,
            execution,
            error=error.message,
            kind=error.kind,
            why=why,
            fallback_agent=recovery.fallback_agent,
        )
        _new_attempt(draft, execution, draft.at)
        return
    if recovery.action is RecoveryAction.SKIP:
        execution = execution.model_copy(
            update={
                "status": StepStatus.SKIPPED,
                "default_output": recovery.default_output,
                "next_attempt_at": None,
                "completed_at": draft.at,
            }
        )
        draft.put(execution)
        draft.monitor(StepStatus.SKIPPED, execution, error=error.message, kind=error.kind, why=why)
        _execution_ended(draft, execution, skipped=True)
        return
    _execution_failed(draft, execution, error, why=why)


def _execution_failed(draft: _Draft, execution: Execution, error: AgentError, *, why: str) -> None:
    """An execution failed for good: a collecting map goes on; anything else fails its step, and the run."""
    execution = execution.model_copy(
        update={"status": StepStatus.FAILED, "error": error, "next_attempt_at": None, "completed_at": draft.at}
    )
    draft.put(execution)
    draft.monitor(StepStatus.FAILED, execution, error=error.message, kind=error.kind, will_retry=False)
    plan_step = draft.plan.steps[execution.step_id]
    if execution.item is not None and plan_step.map is not None and plan_step.map.on_item_failure == "collect":
        step = draft.steps[execution.step_id]
        draft.put(step.model_copy(update={"open_items": step.open_items - 1}))
        _fill_map(draft, execution.step_id)
        return
    where = f"step {execution.step_id!r}"
    if execution.item is not None:
        where += f" item {execution.item}"
    if execution.iteration > 1:
        where += f" (iteration {execution.iteration})"
    if error.kind == ErrorKind.MAPPING_ERROR:
        message = f"{where}: input mapping failed: {error.message}"
    else:
        message = f"{where} failed ({why}): {error.message}"
    current = execution.current
    _fail_step(
        draft,
        execution.step_id,
        error.kind,
        message,
        attempt=current.number if current is not None else None,
        execution=execution,
    )


def _fail_step(
    draft: _Draft,
    step_id: str,
    kind: str,
    message: str,
    *,
    attempt: int | None = None,
    execution: Execution | None = None,
) -> None:
    """A step failed: everything still open stops (cancelled at the agents), and the run fails."""
    step = draft.steps[step_id]
    step_error = AgentError(kind=kind, message=message[:10_000], retriable=False)
    draft.put(step.model_copy(update={"status": StepStatus.FAILED, "error": step_error, "completed_at": draft.at}))
    if execution is None:
        draft.monitor(StepStatus.FAILED, step_id=step_id, error=message, kind=kind)
    _stop_open(draft, StepStatus.CANCELLED, f"cancelled: step {step_id!r} failed")
    draft.fields["last_step"] = step_id
    error = RunError(
        kind=kind,
        message=message,
        step_id=step_id,
        attempt=attempt,
        iteration=step.iteration if step.iteration > 1 else None,
        item=execution.item if execution is not None else None,
    )
    _finish(draft, RunStatus.FAILED, error=error)


def _stop_open(draft: _Draft, status: StepStatus, reason: str | None) -> None:
    """End every open execution and running step with ``status`` (the calls in flight are cancelled)."""
    for execution in list(draft.executions.values()):
        if not execution.status.finished:
            _end_execution(draft, execution, status, reason)
    for step in list(draft.steps.values()):
        if step.status is StepStatus.RUNNING:
            draft.put(step.model_copy(update={"status": status, "completed_at": draft.at, "open_items": 0}))
        elif step.open_items:
            draft.put(step.model_copy(update={"open_items": 0}))  # the failed map step: its items were stopped


def _end_execution(draft: _Draft, execution: Execution, status: StepStatus, reason: str | None) -> None:
    attempt = execution.current
    attempts = execution.attempts
    if attempt is not None and not attempt.status.finished:
        if _has_call(attempt) and attempt.dispatch_at <= draft.at:
            draft.effects.append(_cancel_task(draft.state.run_id, execution, attempt))
        ended = attempt.model_copy(update={"status": status, "finished_at": draft.at})
        attempts = (*attempts[:-1], ended)
    error = AgentError(kind=ErrorKind.CANCELLED, message=reason) if reason else execution.error
    draft.put(
        execution.model_copy(
            update={
                "status": status,
                "attempts": attempts,
                "error": error,
                "next_attempt_at": None,
                "completed_at": draft.at,
            }
        )
    )


def _finish(
    draft: _Draft,
    status: RunStatus,
    *,
    output: JsonValue = None,
    error: RunError | None = None,
    started: bool = True,
) -> None:
    draft.fields.update(
        {
            "status": status,
            "output": output,
            "error": error,
            "completed_at": draft.at,
            "started_at": draft.state.started_at if started else None,
        }
    )
    draft.effects.append(_monitor(draft.state, draft.at, status, detail=_end_detail(error)))
    draft.effects.append(RunFinished(run_id=draft.state.run_id, status=status, output=output, error=error))


# -------------------------------------------------------------------- helpers


def _monitor(
    state: RunState, at: datetime, status: str, *, detail: dict[str, JsonValue] | None = None
) -> PublishMonitoring:
    return PublishMonitoring(
        update=MonitoringUpdate(run_id=state.run_id, status=status, timestamp=at, detail=detail or {})
    )


def _end_detail(error: RunError | None) -> dict[str, JsonValue]:
    """What a run's final monitoring update says of its error."""
    if error is None:
        return {}
    return {"error": error.message, "kind": error.kind, "step_id": error.step_id}


def _task(run_id: str, execution: Execution, attempt: Attempt) -> AgentTask:
    turn = attempt.turn
    reply = None
    if turn > 0:  # the call goes on from the latest answer, on the agent's own task
        answer = attempt.exchanges[-1].answer
        assert answer is not None  # answered: the attempt is running again
        assert attempt.task_id is not None
        reply = Reply(task_id=attempt.task_id, context_id=attempt.context_id, text=answer.text, data=answer.data)
    return AgentTask(
        correlation_id=attempt.correlation_id,
        run_id=run_id,
        step_id=execution.step_id,
        attempt=attempt.number,
        iteration=execution.iteration,
        item=execution.item,
        agent_name=attempt.agent_name,
        input=attempt.input,
        deadline=attempt.deadline,
        turn=turn,
        reply=reply,
    )


def _has_call(attempt: Attempt) -> bool:
    """Whether an unfinished attempt may have a call at its agent to cancel (an approval has none)."""
    return not attempt.status.finished and attempt.agent_name != APPROVAL_AGENT


def _timeout(run_id: str, execution: Execution, attempt: Attempt, at: datetime) -> ScheduleTimeout:
    return ScheduleTimeout(
        run_id=run_id,
        step_id=execution.step_id,
        attempt=attempt.number,
        iteration=execution.iteration,
        item=execution.item,
        at=at,
    )


def _cancel_task(run_id: str, execution: Execution, attempt: Attempt) -> CancelAgentTask:
    return CancelAgentTask(
        run_id=run_id,
        step_id=execution.step_id,
        attempt=attempt.number,
        iteration=execution.iteration,
        item=execution.item,
        correlation_id=attempt.correlation_id,
        agent_name=attempt.agent_name,
        task_id=attempt.task_id,
    )
