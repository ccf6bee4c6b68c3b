"""Property tests of the run state machine: random event sequences for one run.

A scenario is a plan of 2-4 steps with a small retry budget and a list of
*actions*. Each action is turned into an event against the state reached so
far (so "the result of the current attempt" or "a timeout at its deadline" can
be expressed), and is tagged with what the requirements say must happen:

* ``live``: a result for the attempt in flight of a RUNNING run: must change it.
* ``due``: a timeout, at or after its deadline, of the attempt in flight: must change it.
* ``stale``: a duplicate or stale result, an early or old timeout, the same
  submission again: must leave the very same state and give no effects.
* ``dead_letter``: a result for a step not in the plan, a conflicting
  submission: same state and exactly one DeadLetter.
* ``cancel`` / ``retry``: change the run exactly when it is not finished /
  failed at a step; otherwise nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import JsonValue

from models.messages import AgentError
from models.plan import RetryPolicy, WorkflowPlan
from models.run import (
    AgentResultReceived,
    CancelAgentTask,
    CancelRequested,
    Checkpoint,
    DeadLetter,
    DispatchTask,
    Effect,
    Event,
    ExecutionDefaults,
    RetryRequested,
    RunFinished,
    RunState,
    RunStatus,
    RunSubmitted,
    ScheduleTimeout,
    StepStatus,
    StepTimedOut,
    resume,
    transition,
)
from tests.models.run_builders import (
    INPUT,
    RUN_ID,
    T0,
    assert_checkpoint,
    current_step,
    execution_of,
    make_plan,
    of_type,
    result,
    secs,
    step_ids,
    submitted,
)

SETTINGS = settings(max_examples=200, deadline=None)
DEFAULT_TIMEOUT_S = 20.0

# ------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Succeed:
    dt: int


@dataclass(frozen=True)
class Fail:
    dt: int
    retriable: bool
    kind: str


@dataclass(frozen=True)
class Duplicate:
    pick: int


@dataclass(frozen=True)
class Stale:
    variant: str
    pick: int


@dataclass(frozen=True)
class UnknownStep:
    dt: int


@dataclass(frozen=True)
class Timeout:
    older: bool
    when: str
    dt: int


@dataclass(frozen=True)
class Cancel:
    dt: int


@dataclass(frozen=True)
class Retry:
    dt: int


@dataclass(frozen=True)
class Resubmit:
    conflicting: bool


Action = Succeed | Fail | Duplicate | Stale | UnknownStep | Timeout | Cancel | Retry | Resubmit

_dt = st.integers(0, 90)
_succeed = st.builds(Succeed, _dt)
_fail = st.builds(Fail, _dt, st.sampled_from([True, True, False]), st.sampled_from(["agent_failed", "fatal"]))


def _actions(*, with_retry: bool) -> st.SearchStrategy[Action]:
    retries = [st.builds(Retry, _dt)] if with_retry else []
    noise = st.one_of(
        st.builds(Duplicate, st.integers(0, 50)),
        st.builds(
            Stale,
            st.sampled_from(["wrong_attempt", "wrong_correlation", "older_attempt", "other_step"]),
            st.integers(0, 50),
        ),
        st.builds(UnknownStep, _dt),
        st.builds(Timeout, st.booleans(), st.sampled_from(["early", "deadline", "late", "now"]), _dt),
        st.builds(Resubmit, st.booleans()),
        *retries,
    )
    # Mostly results (so runs get far, fail and complete), some noise, rare cancels.
    return st.one_of(
        *[_succeed] * 5,
        *[_fail] * 3,
        *[noise] * 4,
        st.builds(Timeout, st.just(False), st.sampled_from(["deadline", "late"]), _dt),
        st.builds(Cancel, _dt),
        *retries,
    )


ACTIONS = _actions(with_retry=True)
WITHOUT_RETRY = _actions(with_retry=False)


@dataclass(frozen=True)
class Scenario:
    plan: WorkflowPlan
    defaults: ExecutionDefaults
    actions: tuple[Action, ...]


@st.composite
def scenarios(draw: st.DrawFn, actions: st.SearchStrategy[Action] = ACTIONS) -> Scenario:
    n_steps = draw(st.integers(2, 4))
    policy = RetryPolicy(
        max_attempts=draw(st.integers(1, 3)),
        initial_delay_s=draw(st.sampled_from([0.0, 1.0, 5.0])),
        jitter=draw(st.sampled_from([0.0, 0.5])),
        non_retriable_kinds=draw(st.sampled_from([(), ("fatal",), ("timeout",)])),
    )
    timeout_s = draw(st.sampled_from([None, 10.0, 60.0]))
    # Now and then one step cannot map its input (the run fails with mapping_error).
    broken = draw(st.sampled_from([*[None] * 8, *step_ids(n_steps)]))
    overrides = {broken: {"input_mapping": {"q": "${workflow.input.missing}"}}} if broken else None
    plan = make_plan(n_steps, timeout_s=timeout_s, retry=policy, overrides=overrides)
    return Scenario(
        plan=plan,
        defaults=ExecutionDefaults(timeout_s=DEFAULT_TIMEOUT_S),
        actions=tuple(draw(st.lists(actions, min_size=3, max_size=30))),
    )


# -------------------------------------------------------------------- player


@dataclass
class Step:
    before: RunState | None
    action: Action | None
    event: Event
    tag: str
    after: RunState | None
    effects: list[Effect]


@dataclass
class Player:
    scenario: Scenario
    clock: datetime = T0
    delivered: list[AgentResultReceived] = field(default_factory=list)

    def event_for(self, state: RunState, action: Action) -> tuple[Event, str]:
        step_id = current_step(state) or state.plan.start_step
        step = state.execution(step_id)
        attempt = step.current if step is not None else None
        number = attempt.number if attempt is not None else 1
        in_flight = state.status is RunStatus.RUNNING and attempt is not None and not attempt.status.finished

        if isinstance(action, Succeed | Fail):
            when = self.clock + secs(action.dt)
            if attempt is not None:
                when = max(when, attempt.dispatch_at)  # the bridge sends a delayed retry at its time
            self.clock = when
            event: Event
            if isinstance(action, Succeed):
                event = result(state, when, step_id=step_id, output={"summary": f"{step_id}@{when.isoformat()}"})
            else:
                error = AgentError(kind=action.kind, message=f"{action.kind} at {when}", retriable=action.retriable)
                event = result(state, when, ok=False, error=error, step_id=step_id)
            return event, "live" if in_flight else "stale"

        if isinstance(action, Duplicate) and self.delivered:
            return self.delivered[action.pick % len(self.delivered)], "stale"

        if isinstance(action, Duplicate | Stale):
            variant = action.variant if isinstance(action, Stale) else "wrong_attempt"
            pick = action.pick
            when = self.clock + secs(1)
            if variant == "wrong_correlation":
                return result(state, when, step_id=step_id, correlation=f"{RUN_ID}/{step_id}/{number}-x"), "stale"
            if variant == "older_attempt" and number > 1:
                return result(state, when, step_id=step_id, attempt=1 + pick % (number - 1)), "stale"
            others = [s for s in state.plan.steps if s != step_id]
            if variant == "other_step" and others:
                other = others[pick % len(others)]
                other_step = state.execution(other)
                other_current = other_step.current if other_step is not None else None
                other_number = other_current.number if other_current is not None else 1
                return result(state, when, step_id=other, attempt=other_number), "stale"
            # an attempt that was never dispatched
            return result(state, when, step_id=step_id, attempt=number + 1 + pick % 2), "stale"

        if isinstance(action, UnknownStep):
            return result(state, self.clock + secs(action.dt), step_id="ghost", attempt=1), "dead_letter"

        if isinstance(action, Timeout):
            target = number - 1 if action.older and number > 1 else number
            target_attempt = step.attempts[target - 1] if step is not None and step.attempts else None
            deadline = target_attempt.deadline if target_attempt is not None else self.clock
            if action.when == "early":
                when = deadline - secs(0.5)
            elif action.when == "deadline":
                when = deadline
            elif action.when == "late":
                when = deadline + secs(action.dt)
            else:
                when = self.clock + secs(action.dt)
            self.clock = max(self.clock, when)
            timeout = StepTimedOut(run_id=RUN_ID, step_id=step_id, attempt=target, at=when)
            if target_attempt is None or target != number or not in_flight or when < deadline:
                return timeout, "stale"
            return timeout, "due"

        if isinstance(action, Cancel):
            self.clock += secs(action.dt)
            return CancelRequested(run_id=RUN_ID, at=self.clock), "cancel"

        if isinstance(action, Retry):
            self.clock += secs(action.dt)
            return RetryRequested(run_id=RUN_ID, at=self.clock), "retry"

        assert isinstance(action, Resubmit)
        run_input: dict[str, JsonValue] = {"text": "another input"} if action.conflicting else dict(INPUT)
        again = RunSubmitted(run_id=RUN_ID, plan=state.plan, input=run_input, at=self.clock)
        return again, "dead_letter" if action.conflicting else "stale"

    def play(self) -> list[Step]:
        first = submitted(self.scenario.plan, defaults=self.scenario.defaults)
        state, effects = transition(None, first)
        trace = [Step(None, None, first, "submit", state, effects)]
        for action in self.scenario.actions:
            assert state is not None
            event, tag = self.event_for(state, action)
            new, effects = transition(state, event)
            trace.append(Step(state, action, event, tag, new, effects))
            if tag == "live" and isinstance(event, AgentResultReceived):
                self.delivered.append(event)
            state = new
        return trace


def play(scenario: Scenario) -> list[Step]:
    return Player(scenario).play()


def final(trace: list[Step]) -> RunState:
    state = trace[-1].after
    assert state is not None
    return state


def changed(entry: Step) -> bool:
    return entry.after is not entry.before


# ---------------------------------------------------------------- properties


@SETTINGS
@given(scenarios())
def test_a_completed_step_completes_once_and_never_changes(scenario: Scenario):
    frozen: dict[str, object] = {}
    frozen_steps: dict[str, object] = {}
    for entry in play(scenario):
        state = entry.after
        assert state is not None
        for key, execution in state.executions.items():
            completed = [a for a in execution.attempts if a.status is StepStatus.COMPLETED]
            assert len(completed) <= 1
            if key in frozen:
                assert execution == frozen[key]
            elif execution.status is StepStatus.COMPLETED:
                assert completed == [execution.attempts[-1]]
                frozen[key] = execution
        for step_id, step_state in state.steps.items():
            if step_id in frozen_steps:
                assert step_state == frozen_steps[step_id]
            elif step_state.status is StepStatus.COMPLETED:
                frozen_steps[step_id] = step_state


@SETTINGS
@given(scenarios())
def test_run_finishes_at_most_once_per_round(scenario: Scenario):
    trace = play(scenario)
    finished = [effect for entry in trace for effect in of_type(entry.effects, RunFinished)]
    rounds = sum(1 for entry in trace if isinstance(entry.event, RetryRequested) and changed(entry))
    assert len(finished) <= 1 + rounds
    for entry in trace:
        after = entry.after
        assert after is not None
        reports = of_type(entry.effects, RunFinished)
        if changed(entry) and after.status.finished:
            # reaching an end is reported exactly once, with the run's outcome
            assert reports == [RunFinished(run_id=RUN_ID, status=after.status, output=after.output, error=after.error)]
        else:
            assert reports == []


@SETTINGS
@given(scenarios(actions=WITHOUT_RETRY))
def test_without_retry_requests_a_run_finishes_at_most_once(scenario: Scenario):
    trace = play(scenario)
    assert len([e for entry in trace for e in of_type(entry.effects, RunFinished)]) <= 1


@SETTINGS
@given(scenarios())
def test_no_change_means_no_effects(scenario: Scenario):
    for entry in play(scenario):
        if entry.tag == "dead_letter":
            assert entry.after is entry.before
            assert len(entry.effects) == 1
            assert isinstance(entry.effects[0], DeadLetter)
            assert entry.effects[0].run_id == RUN_ID
        elif entry.tag == "stale":
            assert entry.after is entry.before
            assert entry.effects == []
        elif not changed(entry):
            assert entry.effects == []
        else:
            assert not of_type(entry.effects, DeadLetter)


@SETTINGS
@given(scenarios())
def test_every_change_bumps_the_version_and_ends_with_its_checkpoint(scenario: Scenario):
    for entry in play(scenario):
        after = entry.after
        assert after is not None
        if not changed(entry):
            continue
        expected = 1 if entry.before is None else entry.before.version + 1
        assert after.version == expected
        assert_checkpoint(entry.before, after, entry.effects[-1])
        assert len(of_type(entry.effects, Checkpoint)) == 1
        if entry.before is not None:
            assert after.updated_at >= entry.before.updated_at


@SETTINGS
@given(scenarios())
def test_events_that_must_act_do_act(scenario: Scenario):
    for entry in play(scenario):
        before, after = entry.before, entry.after
        assert after is not None
        if entry.tag in {"live", "due"}:
            # a result of (or a timeout for) the attempt in flight is never ignored
            assert changed(entry), entry.event
        if entry.tag == "due":
            assert isinstance(entry.event, StepTimedOut)
            assert [c.attempt for c in of_type(entry.effects, CancelAgentTask)] == [entry.event.attempt]
            attempt = execution_of(after, entry.event.step_id).attempts[entry.event.attempt - 1]
            assert attempt.status is StepStatus.FAILED
            assert attempt.error is not None
            assert attempt.error.kind == "timeout"
        if entry.tag == "cancel":
            assert before is not None
            if before.status.finished:
                assert after is before
            else:
                assert after.status is RunStatus.CANCELLED
        if entry.tag == "retry":
            assert before is not None
            if before.status is RunStatus.FAILED and before.steps:
                assert changed(entry)
                assert after.status in {RunStatus.RUNNING, RunStatus.FAILED}
            else:
                assert after is before


@SETTINGS
@given(scenarios())
def test_state_stays_well_formed(scenario: Scenario):
    for entry in play(scenario):
        state = entry.after
        assert state is not None
        plan = state.plan
        # A chain: one execution per step reached, in the order reached.
        assert list(state.executions) == [f"{s}@1" for s in state.steps]
        at_step = current_step(state)
        for execution in state.executions.values():
            step_id = execution.step_id
            assert (execution.iteration, execution.item) == (1, None)
            plan_step = plan.steps[step_id]
            timeout_s = plan_step.timeout_s if plan_step.timeout_s is not None else DEFAULT_TIMEOUT_S
            assert [a.number for a in execution.attempts] == list(range(1, len(execution.attempts) + 1))
            for attempt in execution.attempts:
                assert attempt.correlation_id == f"{RUN_ID}/{step_id}/{attempt.number}"
                assert attempt.deadline == attempt.dispatch_at + secs(timeout_s)
            assert all(a.status.finished for a in execution.attempts[:-1])
            if step_id != at_step or state.status.finished:
                assert all(a.status.finished for a in execution.attempts)
            assert execution.status is state.steps[step_id].status
        if state.status is RunStatus.RUNNING:
            # never hung: the current step always has an attempt in flight that resume() can restart
            assert at_step is not None
            current = execution_of(state, at_step).current
            assert current is not None
            assert not current.status.finished
            effects = resume(state, current.dispatch_at)
            assert [type(e) for e in effects] == [DispatchTask, ScheduleTimeout]
            dispatch = effects[0]
            assert isinstance(dispatch, DispatchTask)
            assert dispatch.task.correlation_id == current.correlation_id
            assert dispatch.task.deadline == current.deadline
        else:
            assert resume(state, state.updated_at) == []


@SETTINGS
@given(scenarios())
def test_final_state_round_trips_through_json(scenario: Scenario):
    state = final(play(scenario))
    restored = RunState.model_validate_json(state.model_dump_json())
    assert restored == state
    assert restored.model_dump_json() == state.model_dump_json()


@settings(max_examples=50, deadline=None)
@given(scenarios())
def test_replaying_the_same_events_gives_the_same_results(scenario: Scenario):
    trace = play(scenario)
    state: RunState | None = None
    for entry in trace:
        state, effects = transition(state, entry.event)
        assert state == entry.after
        assert effects == entry.effects
