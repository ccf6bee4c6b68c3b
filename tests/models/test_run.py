"""Example-based tests of the pure run state machine (models/run.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from pydantic import JsonValue

from models.messages import AgentError, submission_fingerprint
from models.plan import RetryPolicy
from models.run import (
    CancelAgentTask,
    CancelRequested,
    Checkpoint,
    DeadLetter,
    DispatchTask,
    Effect,
    Event,
    ExecutionDefaults,
    PublishMonitoring,
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
    NO_DELAY,
    RUN_ID,
    T0,
    assert_changed,
    assert_unchanged,
    at,
    current_step,
    execution_of,
    failure,
    make_plan,
    of_type,
    result,
    secs,
    start,
    step,
    step_ids,
    submitted,
)

DELAYED = RetryPolicy(max_attempts=3, initial_delay_s=10.0, multiplier=2.0, jitter=0.0)


def timed_out(step_id: str, attempt: int, when: datetime) -> StepTimedOut:
    return StepTimedOut(run_id=RUN_ID, step_id=step_id, attempt=attempt, at=when)


def cancel(when: datetime, reason: str = "cancelled by request") -> CancelRequested:
    return CancelRequested(run_id=RUN_ID, at=when, reason=reason)


def retry(when: datetime) -> RetryRequested:
    return RetryRequested(run_id=RUN_ID, at=when)


def changed(state: RunState | None, event: Event) -> tuple[RunState, list[Effect]]:
    """Apply an event that must change the run, checking version and checkpoint."""
    new, effects = step(state, event)
    assert_changed(state, new, effects)
    return new, effects


# ------------------------------------------------------------------ scenarios


def running(n_steps: int = 2, retry_policy: RetryPolicy = NO_DELAY) -> RunState:
    return start(make_plan(n_steps, timeout_s=30, retry=retry_policy))


def completed() -> RunState:
    state = running(2)
    state, _ = changed(state, result(state, at(1)))
    state, _ = changed(state, result(state, at(2), output={"b": 2}))
    assert state.status is RunStatus.COMPLETED
    return state


def failed_at_second_step(max_attempts: int = 3) -> RunState:
    """s1 done, s2 failed ``max_attempts`` times in a row (no delay between attempts)."""
    policy = NO_DELAY.model_copy(update={"max_attempts": max_attempts})
    state = running(3, policy)
    state, _ = changed(state, result(state, at(1), output={"summary": "first"}))
    for attempt in range(1, max_attempts + 1):
        state, _ = changed(state, failure(state, at(1 + attempt), message=f"failure {attempt}"))
    assert state.status is RunStatus.FAILED
    return state


def cancelled() -> RunState:
    state = running(2)
    state, _ = changed(state, cancel(at(1)))
    return state


def delayed_retry() -> RunState:
    """s1 failed once; attempt 2 waits until at(15)."""
    state = running(2, DELAYED)
    state, _ = changed(state, failure(state, at(5)))
    return state


def invalid_plan() -> RunState:
    plan = make_plan(2, overrides={"s2": {"next_step": "s1"}})
    state, _ = changed(None, submitted(plan))
    return state


def mapping_failed() -> RunState:
    plan = make_plan(2, overrides={"s1": {"input_mapping": {"q": "${workflow.input.missing}"}}})
    state, _ = changed(None, submitted(plan))
    return state


def retried() -> RunState:
    state = failed_at_second_step()
    state, _ = changed(state, retry(at(50)))
    return state


SCENARIOS: dict[str, Callable[[], RunState]] = {
    "running": running,
    "completed": completed,
    "failed": failed_at_second_step,
    "cancelled": cancelled,
    "delayed_retry": delayed_retry,
    "invalid_plan": invalid_plan,
    "mapping_failed": mapping_failed,
    "retried": retried,
}


# ----------------------------------------------------------------- happy path


def test_submission_starts_the_first_step():
    plan = make_plan(2, timeout_s=30)
    state, effects = changed(None, submitted(plan))

    assert state.run_id == RUN_ID
    assert state.status is RunStatus.RUNNING
    assert state.version == 1
    assert state.created_at == T0
    assert state.started_at == T0
    assert current_step(state) == "s1"
    assert list(state.steps) == ["s1"]
    assert state.steps["s1"].status is StepStatus.RUNNING
    assert list(state.executions) == ["s1@1"]
    first = execution_of(state, "s1")
    assert first.status is StepStatus.RUNNING
    assert first.started_at == T0
    attempt = first.current
    assert attempt is not None
    assert attempt.number == 1
    assert attempt.status is StepStatus.RUNNING
    assert attempt.input == {"text": "hello"}

    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.not_before is None
    task = dispatch.task
    assert (task.run_id, task.step_id, task.attempt, task.agent_name) == (RUN_ID, "s1", 1, "agent-s1")
    assert task.correlation_id == f"{RUN_ID}/s1/1"
    assert task.input == {"text": "hello"}
    assert task.deadline == T0 + secs(30)
    assert of_type(effects, ScheduleTimeout) == [
        ScheduleTimeout(run_id=RUN_ID, step_id="s1", attempt=1, at=T0 + secs(30))
    ]
    assert of_type(effects, PublishMonitoring)
    assert all(update.update.run_id == RUN_ID for update in of_type(effects, PublishMonitoring))
    assert not of_type(effects, RunFinished)


@pytest.mark.parametrize("n_steps", [2, 3])
def test_happy_path_maps_inputs_and_completes_once(n_steps: int):
    plan = make_plan(n_steps, timeout_s=30)
    state, effects = changed(None, submitted(plan))
    all_effects = list(effects)
    outputs: dict[str, JsonValue] = {}
    clock = 0.0
    ids = step_ids(n_steps)

    for index, step_id in enumerate(ids):
        assert state.status is RunStatus.RUNNING
        assert current_step(state) == step_id
        (dispatch,) = of_type(effects, DispatchTask)
        task = dispatch.task
        assert dispatch.not_before is None
        assert task.step_id == step_id
        assert task.attempt == 1
        assert task.agent_name == f"agent-{step_id}"
        assert task.correlation_id == f"{RUN_ID}/{step_id}/1"
        expected_input = {"text": "hello"} if index == 0 else {"previous": f"about {ids[index - 1]}", "topic": "hello"}
        assert task.input == expected_input
        assert task.deadline == at(clock) + secs(30)
        assert of_type(effects, ScheduleTimeout) == [
            ScheduleTimeout(run_id=RUN_ID, step_id=step_id, attempt=1, at=task.deadline)
        ]

        clock += 7
        output: JsonValue = {"summary": f"about {step_id}", "items": [index, "x"]}
        outputs[step_id] = output
        state, effects = changed(state, result(state, at(clock), output=output))
        all_effects.extend(effects)
        assert state.steps[step_id].status is StepStatus.COMPLETED
        assert state.output_of(step_id) == output

    assert state.status is RunStatus.COMPLETED
    assert state.output == outputs[ids[-1]]
    assert state.completed_at == at(clock)
    assert state.error is None
    assert state.version == n_steps + 1
    assert of_type(effects, DispatchTask) == []
    assert of_type(all_effects, RunFinished) == [
        RunFinished(run_id=RUN_ID, status=RunStatus.COMPLETED, output=outputs[ids[-1]])
    ]
    assert [s.status for s in state.steps.values()] == [StepStatus.COMPLETED] * n_steps
    assert {s: state.output_of(s) for s in ids} == outputs


@pytest.mark.parametrize(
    ("step_timeout", "default_timeout", "expected"),
    [(5.0, 42.0, 5.0), (None, 42.0, 42.0), (None, None, 300.0)],
)
def test_deadline_uses_step_timeout_else_defaults(
    step_timeout: float | None, default_timeout: float | None, expected: float
):
    plan = make_plan(2, timeout_s=step_timeout)
    defaults = ExecutionDefaults() if default_timeout is None else ExecutionDefaults(timeout_s=default_timeout)
    state, effects = changed(None, submitted(plan, defaults=defaults))
    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.task.deadline == T0 + secs(expected)
    assert of_type(effects, ScheduleTimeout)[0].at == T0 + secs(expected)

    # The second step is dispatched at the time of the first result.
    state, effects = changed(state, result(state, at(3)))
    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.task.deadline == at(3) + secs(expected)


def test_dispatch_input_keeps_the_json_type_of_a_whole_placeholder():
    # "A string that is exactly one placeholder keeps the value's JSON type" (models/mapping.py).
    mapping = {"whole": "${s1.output}", "count": "${s1.output.count}", "text": "n=${s1.output.count}"}
    state = start(make_plan(2, overrides={"s2": {"input_mapping": mapping}}))
    output: JsonValue = {"summary": "x", "count": 3}
    _, effects = changed(state, result(state, at(1), output=output))
    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.task.input == {"whole": output, "count": 3, "text": "n=3"}


def test_transition_is_deterministic_and_does_not_touch_its_input():
    state = delayed_retry()
    before = state.model_dump_json()
    event = timed_out("s1", 2, at(100))
    first = transition(state, event)
    second = transition(state, event)
    assert first == second
    assert state.model_dump_json() == before


# ---------------------------------------------------------------- idempotency


def test_duplicate_result_changes_nothing():
    state = running()
    event = result(state, at(1))
    after, _ = changed(state, event)
    again, effects = transition(after, event)
    assert_unchanged(after, again, effects)


def test_duplicate_failure_does_not_use_another_attempt():
    state = running()
    event = failure(state, at(1))
    after, _ = changed(state, event)
    again, effects = transition(after, event)
    assert_unchanged(after, again, effects)
    assert [a.number for a in execution_of(after, "s1").attempts] == [1, 2]


def _stale_results() -> dict[str, Callable[[], tuple[RunState, Event]]]:
    def wrong_attempt() -> tuple[RunState, Event]:
        state = running()
        return state, result(state, at(1), attempt=2)

    def wrong_correlation() -> tuple[RunState, Event]:
        state = running()
        return state, result(state, at(1), correlation=f"{RUN_ID}/s1/1-other")

    def older_attempt() -> tuple[RunState, Event]:
        state = running()
        state, _ = changed(state, failure(state, at(1)))
        return state, result(state, at(2), attempt=1, output="late")

    def step_already_finished() -> tuple[RunState, Event]:
        state = running()
        state, _ = changed(state, result(state, at(1)))
        return state, result(state, at(2), step_id="s1", attempt=1, output="different")

    def failure_of_finished_step() -> tuple[RunState, Event]:
        state = running()
        state, _ = changed(state, result(state, at(1)))
        return state, failure(state, at(2), step_id="s1", attempt=1)

    def step_not_started() -> tuple[RunState, Event]:
        state = running()
        return state, result(state, at(1), step_id="s2", attempt=1)

    def run_completed() -> tuple[RunState, Event]:
        state = completed()
        return state, failure(state, at(9), step_id="s2", attempt=1)

    def run_failed() -> tuple[RunState, Event]:
        state = failed_at_second_step()
        return state, result(state, at(9), step_id="s2", attempt=3, output="too late")

    def run_cancelled() -> tuple[RunState, Event]:
        state = cancelled()
        return state, result(state, at(9), step_id="s1", attempt=1, output="too late")

    return {
        "wrong_attempt": wrong_attempt,
        "wrong_correlation": wrong_correlation,
        "older_attempt": older_attempt,
        "step_already_finished": step_already_finished,
        "failure_of_finished_step": failure_of_finished_step,
        "step_not_started": step_not_started,
        "run_completed": run_completed,
        "run_failed": run_failed,
        "run_cancelled": run_cancelled,
    }


@pytest.mark.parametrize("case", list(_stale_results()))
def test_stale_result_changes_nothing(case: str):
    state, event = _stale_results()[case]()
    new, effects = transition(state, event)
    assert_unchanged(state, new, effects)


def test_timeout_of_a_finished_attempt_changes_nothing():
    state = running()
    state, _ = changed(state, result(state, at(1)))
    new, effects = transition(state, timed_out("s1", 1, at(30)))
    assert_unchanged(state, new, effects)


def test_timeout_of_an_older_attempt_changes_nothing():
    state = running()
    state, _ = changed(state, failure(state, at(1)))
    new, effects = transition(state, timed_out("s1", 1, at(31)))
    assert_unchanged(state, new, effects)


def test_timeout_before_the_deadline_changes_nothing():
    state = running()
    deadline = T0 + secs(30)
    new, effects = transition(state, timed_out("s1", 1, deadline - secs(0.001)))
    assert_unchanged(state, new, effects)


@pytest.mark.parametrize("scenario", ["completed", "failed", "cancelled", "invalid_plan"])
def test_timeout_of_a_finished_run_changes_nothing(scenario: str):
    state = SCENARIOS[scenario]()
    step_id = current_step(state) or "s1"
    execution = state.execution(step_id)
    current = execution.current if execution is not None else None
    number = current.number if current is not None else 1
    new, effects = transition(state, timed_out(step_id, number, at(10_000)))
    assert_unchanged(state, new, effects)


@pytest.mark.parametrize("scenario", ["completed", "failed", "cancelled", "invalid_plan", "mapping_failed"])
def test_cancel_of_a_finished_run_changes_nothing(scenario: str):
    state = SCENARIOS[scenario]()
    new, effects = transition(state, cancel(at(10_000)))
    assert_unchanged(state, new, effects)


@pytest.mark.parametrize("scenario", ["running", "delayed_retry", "completed", "cancelled", "retried"])
def test_retry_of_a_run_that_has_not_failed_changes_nothing(scenario: str):
    state = SCENARIOS[scenario]()
    new, effects = transition(state, retry(at(10_000)))
    assert_unchanged(state, new, effects)


@pytest.mark.parametrize("scenario", ["running", "completed", "failed", "invalid_plan"])
def test_same_submission_again_changes_nothing(scenario: str):
    state = SCENARIOS[scenario]()
    again = RunSubmitted(run_id=state.run_id, plan=state.plan, input=dict(state.input), at=at(500))
    new, effects = transition(state, again)
    assert_unchanged(state, new, effects)


@pytest.mark.parametrize("difference", ["plan", "input"])
def test_conflicting_submission_is_dead_lettered(difference: str):
    state = running()
    plan = make_plan(3, timeout_s=30, retry=NO_DELAY) if difference == "plan" else state.plan
    run_input: dict[str, JsonValue] = {"text": "something else"} if difference == "input" else dict(INPUT)
    new, effects = transition(state, submitted(plan, run_input=run_input, when=at(1)))
    assert new is state
    assert len(effects) == 1
    (dead,) = effects
    assert isinstance(dead, DeadLetter)
    assert dead.run_id == RUN_ID


# ----------------------------------------------------------- unknown run/step


@pytest.mark.parametrize("kind", ["result", "timeout", "cancel", "retry"])
def test_event_for_an_unknown_run_is_dead_lettered(kind: str):
    some_run = running()
    events: dict[str, Event] = {
        "result": result(some_run, at(1), output="x"),
        "timeout": timed_out("s1", 1, at(100)),
        "cancel": cancel(at(1)),
        "retry": retry(at(1)),
    }
    new, effects = transition(None, events[kind])
    assert new is None
    assert len(effects) == 1
    assert isinstance(effects[0], DeadLetter)
    assert effects[0].run_id == RUN_ID


@pytest.mark.parametrize("scenario", ["running", "completed"])
def test_result_for_a_step_not_in_the_plan_is_dead_lettered(scenario: str):
    state = SCENARIOS[scenario]()
    new, effects = transition(state, result(state, at(1), step_id="ghost", attempt=1, output="boo"))
    assert new is state
    assert len(effects) == 1
    assert isinstance(effects[0], DeadLetter)
    assert effects[0].run_id == RUN_ID
    assert "ghost" in effects[0].reason


# -------------------------------------------------------------------- retries


def test_retriable_failure_schedules_a_delayed_attempt():
    policy = RetryPolicy(max_attempts=3, initial_delay_s=10.0, multiplier=2.0, jitter=0.2)
    state = running(2, policy)
    failed_at = at(5)
    new, effects = changed(state, failure(state, failed_at, message="rate limited"))

    delay = policy.delay_s(1, f"{RUN_ID}/s1/1")
    assert delay > 0
    due = failed_at + secs(delay)
    assert new.status is RunStatus.RUNNING
    assert new.error is None
    assert new.steps["s1"].status is StepStatus.RUNNING
    s1 = execution_of(new, "s1")
    assert s1.status is StepStatus.RUNNING
    assert s1.next_attempt_at == due
    assert [a.number for a in s1.attempts] == [1, 2]
    first, second = s1.attempts
    assert first.status is StepStatus.FAILED
    assert first.finished_at == failed_at
    assert first.error is not None
    assert first.error.message == "rate limited"
    assert second.status is StepStatus.PENDING
    assert second.correlation_id == f"{RUN_ID}/s1/2"
    assert second.dispatch_at == due
    assert second.deadline == due + secs(30)
    assert second.input == first.input

    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.not_before == due
    assert dispatch.task.attempt == 2
    assert dispatch.task.correlation_id == f"{RUN_ID}/s1/2"
    assert dispatch.task.deadline == due + secs(30)
    assert dispatch.task.input == {"text": "hello"}
    assert of_type(effects, ScheduleTimeout) == [
        ScheduleTimeout(run_id=RUN_ID, step_id="s1", attempt=2, at=due + secs(30))
    ]
    assert not of_type(effects, RunFinished)
    assert not of_type(effects, CancelAgentTask)


def test_result_of_a_delayed_retry_is_applied():
    # The retried attempt is PENDING until its dispatch time; its result, which
    # arrives after the bridge sent it, must still complete the step.
    state = delayed_retry()
    second = execution_of(state, "s1").current
    assert second is not None
    assert second.status is StepStatus.PENDING
    when = second.dispatch_at + secs(3)
    new, effects = step(state, result(state, when, output={"summary": "finally"}))
    assert_changed(state, new, effects)
    assert new.steps["s1"].status is StepStatus.COMPLETED
    assert new.output_of("s1") == {"summary": "finally"}
    assert current_step(new) == "s2"


def test_timeouts_use_up_attempts_with_growing_backoff():
    state = running(2, DELAYED)  # 10 s, then 20 s, no jitter
    # attempt 1 times out at its deadline
    state, effects = changed(state, timed_out("s1", 1, at(30)))
    second = execution_of(state, "s1").attempts[1]
    assert second.number == 2
    assert second.dispatch_at == at(30 + 10)
    assert of_type(effects, DispatchTask)[0].not_before == at(40)
    # attempt 2 (still PENDING: its call was never answered) times out too
    state, effects = changed(state, timed_out("s1", 2, second.deadline))
    third = execution_of(state, "s1").attempts[2]
    assert third.number == 3
    assert third.correlation_id == f"{RUN_ID}/s1/3"
    assert third.dispatch_at == second.deadline + secs(20)
    assert execution_of(state, "s1").next_attempt_at == third.dispatch_at
    # attempt 3 was the last one
    state, effects = changed(state, timed_out("s1", 3, third.deadline + secs(1)))
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.kind == "timeout"
    assert state.error.step_id == "s1"
    assert state.error.attempt == 3
    assert [a.status for a in execution_of(state, "s1").attempts] == [StepStatus.FAILED] * 3
    assert execution_of(state, "s1").next_attempt_at is None
    assert len(of_type(effects, RunFinished)) == 1
    assert not of_type(effects, DispatchTask)


@pytest.mark.parametrize(
    ("retriable", "kind", "non_retriable_kinds"),
    [(False, "agent_failed", ()), (True, "bad_request", ("bad_request",))],
)
def test_non_retriable_failure_fails_the_run(retriable: bool, kind: str, non_retriable_kinds: tuple[str, ...]):
    policy = RetryPolicy(max_attempts=5, initial_delay_s=0.0, jitter=0.0, non_retriable_kinds=non_retriable_kinds)
    state = running(2, policy)
    new, effects = changed(state, failure(state, at(4), kind=kind, message="the agent said no", retriable=retriable))

    assert new.status is RunStatus.FAILED
    assert new.completed_at == at(4)
    error = new.error
    assert error is not None
    assert error.step_id == "s1"
    assert error.kind == kind
    assert error.attempt == 1
    assert "the agent said no" in error.message
    assert new.steps["s1"].status is StepStatus.FAILED
    s1 = execution_of(new, "s1")
    assert s1.status is StepStatus.FAILED
    assert len(s1.attempts) == 1
    assert s1.next_attempt_at is None
    assert s1.error is not None
    assert s1.error.message == "the agent said no"
    assert not of_type(effects, DispatchTask)
    assert of_type(effects, RunFinished) == [RunFinished(run_id=RUN_ID, status=RunStatus.FAILED, error=error)]


def test_last_attempt_failing_fails_the_run():
    state = running(3, NO_DELAY)
    state, _ = changed(state, result(state, at(1)))
    all_effects: list[Effect] = []
    for attempt in (1, 2, 3):
        current = execution_of(state, "s2").current
        assert current is not None
        assert current.number == attempt
        assert current.status is StepStatus.RUNNING  # no delay: dispatched at once
        state, effects = changed(state, failure(state, at(1 + attempt), message=f"oops {attempt}"))
        all_effects.extend(effects)
    assert [t.task.attempt for t in of_type(all_effects, DispatchTask)] == [2, 3]
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.kind == "agent_failed"
    assert state.error.step_id == "s2"
    assert state.error.attempt == 3
    assert "oops 3" in state.error.message
    assert len(of_type(all_effects, RunFinished)) == 1
    assert state.steps["s1"].status is StepStatus.COMPLETED


def test_single_attempt_policy_fails_on_first_retriable_failure():
    state = running(2, RetryPolicy(max_attempts=1))
    new, _ = changed(state, failure(state, at(1), message="flaky"))
    assert new.status is RunStatus.FAILED
    assert new.error is not None
    assert new.error.kind == "agent_failed"
    assert "flaky" in new.error.message


# ------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("late_by", [0.0, 12.5])
def test_timeout_at_or_after_deadline_is_a_retriable_timeout(late_by: float):
    policy = RetryPolicy(max_attempts=2, initial_delay_s=1.0, jitter=0.0)
    state = running(2, policy)
    when = at(30 + late_by)
    new, effects = changed(state, timed_out("s1", 1, when))

    assert of_type(effects, CancelAgentTask) == [
        CancelAgentTask(run_id=RUN_ID, step_id="s1", attempt=1, correlation_id=f"{RUN_ID}/s1/1", agent_name="agent-s1")
    ]
    first, second = execution_of(new, "s1").attempts
    assert first.status is StepStatus.FAILED
    assert first.error is not None
    assert first.error.kind == "timeout"
    assert first.error.retriable
    assert second.number == 2
    assert second.dispatch_at == when + secs(1)
    assert new.status is RunStatus.RUNNING


def test_timeout_without_attempts_left_fails_the_run():
    state = running(2, RetryPolicy(max_attempts=1))
    new, effects = changed(state, timed_out("s1", 1, at(31)))
    assert new.status is RunStatus.FAILED
    assert new.error is not None
    assert new.error.kind == "timeout"
    assert new.error.step_id == "s1"
    assert len(of_type(effects, CancelAgentTask)) == 1
    assert len(of_type(effects, RunFinished)) == 1


def test_timeout_listed_as_non_retriable_fails_at_once():
    state = running(2, RetryPolicy(max_attempts=5, non_retriable_kinds=("timeout",)))
    new, _ = changed(state, timed_out("s1", 1, at(30)))
    assert new.status is RunStatus.FAILED
    assert new.error is not None
    assert new.error.kind == "timeout"
    assert len(execution_of(new, "s1").attempts) == 1


# -------------------------------------------------------------- mapping error


def test_mapping_error_in_first_step_fails_the_run():
    state = mapping_failed()  # also checks it did not raise, and the checkpoint
    assert state.status is RunStatus.FAILED
    error = state.error
    assert error is not None
    assert error.kind == "mapping_error"
    assert error.step_id == "s1"
    assert "s1" in error.message
    assert "missing" in error.message
    assert state.steps["s1"].status is StepStatus.FAILED
    s1 = execution_of(state, "s1")
    assert s1.status is StepStatus.FAILED
    assert s1.error is not None
    assert s1.error.kind == "mapping_error"
    assert s1.attempts == ()


def test_mapping_error_effects_do_not_dispatch():
    plan = make_plan(2, overrides={"s1": {"input_mapping": {"q": "${workflow.input.missing}"}}})
    _, effects = changed(None, submitted(plan))
    assert not of_type(effects, DispatchTask)
    assert not of_type(effects, ScheduleTimeout)
    (finished,) = of_type(effects, RunFinished)
    assert finished.status is RunStatus.FAILED
    assert finished.error is not None
    assert finished.error.kind == "mapping_error"


def test_mapping_error_in_a_later_step_keeps_earlier_outputs():
    plan = make_plan(2, overrides={"s2": {"input_mapping": {"q": "${s1.output.nope}"}}})
    state = start(plan)
    new, effects = changed(state, result(state, at(2), output={"yes": 1}))
    assert new.status is RunStatus.FAILED
    assert new.error is not None
    assert new.error.kind == "mapping_error"
    assert new.error.step_id == "s2"
    assert "nope" in new.error.message
    assert new.steps["s1"].status is StepStatus.COMPLETED
    assert new.output_of("s1") == {"yes": 1}
    assert new.steps["s2"].status is StepStatus.FAILED
    assert not of_type(effects, DispatchTask)
    assert len(of_type(effects, RunFinished)) == 1


# --------------------------------------------------------------- invalid plan


def test_cyclic_plan_fails_the_run_with_the_problems():
    plan = make_plan(2, overrides={"s2": {"next_step": "s1"}})
    state, effects = changed(None, submitted(plan))
    assert state.status is RunStatus.FAILED
    assert state.version == 1
    assert state.steps == {}
    error = state.error
    assert error is not None
    assert error.kind == "invalid_plan"
    assert isinstance(error.details, list)
    assert error.details
    reasons = [problem["reason"] for problem in error.details if isinstance(problem, dict)]
    assert any("cycle" in str(reason) for reason in reasons)
    assert "cycle" in error.message
    assert not of_type(effects, DispatchTask)
    (finished,) = of_type(effects, RunFinished)
    assert finished.status is RunStatus.FAILED
    assert finished.error == error


def test_dangling_next_step_is_an_invalid_plan():
    plan = make_plan(2, overrides={"s2": {"next_step": "nowhere"}})
    state, _ = changed(None, submitted(plan))
    assert state.error is not None
    assert state.error.kind == "invalid_plan"
    assert isinstance(state.error.details, list)
    assert any("nowhere" in str(problem) for problem in state.error.details)


# --------------------------------------------------------------------- cancel


def test_cancel_stops_the_running_attempt():
    state = running(2)
    state, _ = changed(state, result(state, at(1)))
    s1_before = state.steps["s1"]
    s1_execution_before = execution_of(state, "s1")
    new, effects = changed(state, cancel(at(3), reason="user changed their mind"))

    assert new.status is RunStatus.CANCELLED
    assert new.completed_at == at(3)
    assert new.steps["s1"] == s1_before
    assert execution_of(new, "s1") == s1_execution_before
    assert new.steps["s2"].status is StepStatus.CANCELLED
    s2 = execution_of(new, "s2")
    assert s2.status is StepStatus.CANCELLED
    assert s2.current is not None
    assert s2.current.status is StepStatus.CANCELLED
    assert of_type(effects, CancelAgentTask) == [
        CancelAgentTask(run_id=RUN_ID, step_id="s2", attempt=1, correlation_id=f"{RUN_ID}/s2/1", agent_name="agent-s2")
    ]
    assert new.error is not None
    assert new.error.kind == "cancelled"
    assert new.error.message == "user changed their mind"
    assert new.error.step_id == "s2"
    (finished,) = of_type(effects, RunFinished)
    assert finished.status is RunStatus.CANCELLED

    for later in (
        result(new, at(4), step_id="s2", attempt=1, output="late"),
        failure(new, at(4), step_id="s2", attempt=1),
        timed_out("s2", 1, at(1000)),
        cancel(at(5)),
        retry(at(6)),
    ):
        after, more = transition(new, later)
        assert_unchanged(new, after, more)


def test_cancel_during_a_delayed_retry_drops_the_retry():
    state = delayed_retry()
    new, effects = changed(state, cancel(at(6)))
    assert new.steps["s1"].status is StepStatus.CANCELLED
    s1 = execution_of(new, "s1")
    assert new.status is RunStatus.CANCELLED
    assert s1.status is StepStatus.CANCELLED
    assert s1.next_attempt_at is None
    assert [a.status for a in s1.attempts] == [StepStatus.FAILED, StepStatus.CANCELLED]
    assert new.error is not None
    assert new.error.step_id == "s1"
    assert not of_type(effects, DispatchTask)
    assert resume(new, at(7)) == []


def test_cancel_after_a_delayed_retry_was_due_stops_that_attempt():
    # Once its dispatch time has passed the delayed attempt may be running at the agent.
    state = delayed_retry()
    second = execution_of(state, "s1").current
    assert second is not None
    new, effects = changed(state, cancel(second.dispatch_at + secs(1)))
    assert new.status is RunStatus.CANCELLED
    assert of_type(effects, CancelAgentTask) == [
        CancelAgentTask(run_id=RUN_ID, step_id="s1", attempt=2, correlation_id=f"{RUN_ID}/s1/2", agent_name="agent-s1")
    ]


# ---------------------------------------------------------------------- retry


def test_retry_reopens_the_failed_step_with_a_new_round():
    failed = failed_at_second_step(max_attempts=3)
    assert failed.error is not None
    assert failed.error.attempt == 3
    new, effects = changed(failed, retry(at(100)))

    assert new.status is RunStatus.RUNNING
    assert new.error is None
    assert new.output is None
    assert new.completed_at is None
    assert current_step(new) == "s2"
    assert new.steps["s1"] == failed.steps["s1"]
    assert execution_of(new, "s1") == execution_of(failed, "s1")
    assert new.steps["s2"].status is StepStatus.RUNNING
    s2 = execution_of(new, "s2")
    assert s2.status is StepStatus.RUNNING
    assert s2.error is None
    assert [a.number for a in s2.attempts] == [1, 2, 3, 4]
    assert s2.attempts[:3] == execution_of(failed, "s2").attempts
    fourth = s2.attempts[3]
    assert fourth.status is StepStatus.RUNNING
    assert fourth.correlation_id == f"{RUN_ID}/s2/4"

    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.not_before is None
    assert dispatch.task.attempt == 4
    assert dispatch.task.correlation_id == f"{RUN_ID}/s2/4"
    assert dispatch.task.input == {"previous": "first", "topic": "hello"}
    assert dispatch.task.deadline == at(100) + secs(30)
    assert not of_type(effects, RunFinished)

    # a late answer to the old round is stale
    late, more = transition(new, result(new, at(101), attempt=3, output="old round"))
    assert_unchanged(new, late, more)


def test_retry_gives_a_fresh_budget_of_attempts():
    state = retried()  # attempt 4 is running, max_attempts is 3
    for number in (4, 5):
        state, effects = changed(state, failure(state, at(100 + number)))
        assert state.status is RunStatus.RUNNING
        assert of_type(effects, DispatchTask)[0].task.attempt == number + 1
    state, effects = changed(state, failure(state, at(110), message="sixth"))
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.attempt == 6
    assert "sixth" in state.error.message
    assert len(of_type(effects, RunFinished)) == 1
    assert len(execution_of(state, "s2").attempts) == 6


def test_retried_run_can_complete():
    state = retried()
    state, _ = changed(state, result(state, at(101)))
    state, effects = changed(state, result(state, at(102), output="three"))
    assert state.status is RunStatus.COMPLETED
    assert state.output == "three"
    assert of_type(effects, RunFinished) == [RunFinished(run_id=RUN_ID, status=RunStatus.COMPLETED, output="three")]
    assert execution_of(state, "s2").attempts[-1].number == 4
    assert execution_of(state, "s2").attempts[-1].status is StepStatus.COMPLETED


def test_retry_after_timeouts_continues_numbering():
    state = running(2, RetryPolicy(max_attempts=1))
    state, _ = changed(state, timed_out("s1", 1, at(30)))
    assert state.status is RunStatus.FAILED
    state, effects = changed(state, retry(at(40)))
    assert execution_of(state, "s1").first_attempt_of_round == 2
    assert of_type(effects, DispatchTask)[0].task.correlation_id == f"{RUN_ID}/s1/2"
    assert of_type(effects, ScheduleTimeout)[0].at == at(70)


# --------------------------------------------------------------------- resume


def test_resume_redispatches_the_attempt_in_flight():
    plan = make_plan(2, timeout_s=30)
    state, effects = changed(None, submitted(plan))
    (original,) = of_type(effects, DispatchTask)
    resumed = resume(state, at(10))
    assert resumed == [
        DispatchTask(task=original.task, not_before=None),
        ScheduleTimeout(run_id=RUN_ID, step_id="s1", attempt=1, at=at(30)),
    ]
    assert isinstance(resumed[0], DispatchTask)
    assert resumed[0].task.correlation_id == f"{RUN_ID}/s1/1"


def test_resume_keeps_the_time_of_a_delayed_retry():
    state = delayed_retry()
    second = execution_of(state, "s1").current
    assert second is not None
    due = second.dispatch_at
    assert due == at(15)

    early = resume(state, at(10))
    assert len(early) == 2
    dispatch, timeout = early
    assert isinstance(dispatch, DispatchTask)
    assert dispatch.not_before == due
    assert dispatch.task.correlation_id == f"{RUN_ID}/s1/2"
    assert dispatch.task.deadline == due + secs(30)
    assert timeout == ScheduleTimeout(run_id=RUN_ID, step_id="s1", attempt=2, at=due + secs(30))

    late = resume(state, at(20))
    assert isinstance(late[0], DispatchTask)
    assert late[0].not_before is None
    assert late[0].task == dispatch.task


@pytest.mark.parametrize("scenario", ["completed", "failed", "cancelled", "invalid_plan", "mapping_failed"])
def test_resume_does_nothing_for_a_finished_run(scenario: str):
    assert resume(SCENARIOS[scenario](), at(10_000)) == []


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_state_round_trips_through_json(scenario: str):
    state = SCENARIOS[scenario]()
    restored = RunState.model_validate_json(state.model_dump_json())
    assert restored == state
    assert restored.model_dump() == state.model_dump()
    assert restored.model_dump_json() == state.model_dump_json()


def test_checkpoint_carries_the_final_state_every_time():
    state = running(2, NO_DELAY)
    events: list[Callable[[RunState], Event]] = [
        lambda s: failure(s, at(1)),
        lambda s: result(s, at(2)),
        lambda s: timed_out("s2", 1, at(100)),
        lambda s: cancel(at(101)),
    ]
    versions = [state.version]
    for make in events:
        state, effects = changed(state, make(state))
        assert isinstance(effects[-1], Checkpoint)
        assert effects[-1].state is state
        versions.append(state.version)
    assert versions == [1, 2, 3, 4, 5]


def test_failure_result_keeps_the_agent_error():
    state = running(2, RetryPolicy(max_attempts=1))
    error = AgentError(kind="http_status", message="HTTP 503 from agent", retriable=True)
    new, _ = changed(state, result(state, at(1), ok=False, error=error))
    assert execution_of(new, "s1").attempts[0].error == error
    assert execution_of(new, "s1").error == error
    assert new.error is not None
    assert new.error.kind == "http_status"
    assert "HTTP 503 from agent" in new.error.message


def test_awaits_is_true_only_for_the_latest_unfinished_attempt_of_a_running_run() -> None:
    state = start(make_plan(2))
    assert state.awaits("s1", 1)
    assert not state.awaits("s1", 2), "no such attempt"
    assert not state.awaits("s2", 1), "step not started"

    after_result, _ = step(state, result(state, at(5)))
    assert not after_result.awaits("s1", 1), "the attempt has its result"
    assert after_result.awaits("s2", 1)

    cancelled, _ = step(after_result, cancel(at(6)))
    assert not cancelled.awaits("s2", 1), "the run is no longer running"


# ------------------------------------------------- states of the chain model


def iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def chain_shaped_state(*, failed: bool = False) -> dict[str, Any]:
    """A run stored before plans had branches: s1 done, s2's attempt 1 in flight (or failed, the run with it).

    The old form: the attempts inside their steps, ``current_step``, no
    ``executions`` and no ``last_step``.
    """
    plan = make_plan(2, timeout_s=30)
    s2_error = {"kind": "agent_failed", "message": "agent exploded", "retriable": False}
    s2_attempt: dict[str, Any] = {
        "number": 1,
        "correlation_id": f"{RUN_ID}/s2/1",
        "agent_name": "agent-s2",
        "status": "FAILED" if failed else "RUNNING",
        "input": {"previous": "first", "topic": "hello"},
        "dispatch_at": iso(at(1)),
        "deadline": iso(at(31)),
        "finished_at": iso(at(2)) if failed else None,
        "output": None,
        "error": s2_error if failed else None,
    }
    return {
        "run_id": RUN_ID,
        "status": "FAILED" if failed else "RUNNING",
        "plan": json.loads(plan.model_dump_json(exclude_defaults=True)),
        "input": dict(INPUT),
        "fingerprint": submission_fingerprint(plan, dict(INPUT)),
        "steps": {
            "s1": {
                "step_id": "s1",
                "agent_name": "agent-s1",
                "status": "COMPLETED",
                "attempts": [
                    {
                        "number": 1,
                        "correlation_id": f"{RUN_ID}/s1/1",
                        "agent_name": "agent-s1",
                        "status": "COMPLETED",
                        "input": {"text": "hello"},
                        "dispatch_at": iso(T0),
                        "deadline": iso(at(30)),
                        "finished_at": iso(at(1)),
                        "output": {"summary": "first"},
                        "error": None,
                    }
                ],
                "first_attempt_of_round": 1,
                "fallback_agent": None,
                "next_attempt_at": None,
                "output": {"summary": "first"},
                "error": None,
                "started_at": iso(T0),
                "completed_at": iso(at(1)),
            },
            "s2": {
                "step_id": "s2",
                "agent_name": "agent-s2",
                "status": "FAILED" if failed else "RUNNING",
                "attempts": [s2_attempt],
                "first_attempt_of_round": 1,
                "fallback_agent": None,
                "next_attempt_at": None,
                "output": None,
                "error": s2_error if failed else None,
                "started_at": iso(at(1)),
                "completed_at": iso(at(2)) if failed else None,
            },
        },
        "current_step": "s2",
        "output": None,
        "error": (
            {
                "kind": "agent_failed",
                "message": "step 's2' failed (not retriable): agent exploded",
                "step_id": "s2",
                "attempt": 1,
            }
            if failed
            else None
        ),
        "created_at": iso(T0),
        "started_at": iso(T0),
        "completed_at": iso(at(2)) if failed else None,
        "updated_at": iso(at(2)) if failed else iso(at(1)),
        "version": 3,
    }


def test_a_stored_chain_shaped_state_loads_and_goes_on():
    loaded = RunState.model_validate_json(json.dumps(chain_shaped_state()))

    assert loaded.status is RunStatus.RUNNING
    assert loaded.version == 3
    assert list(loaded.steps) == ["s1", "s2"]
    assert list(loaded.executions) == ["s1@1", "s2@1"]
    s1 = loaded.steps["s1"]
    assert (s1.status, s1.iteration, s1.has_output, loaded.output_of("s1")) == (
        StepStatus.COMPLETED,
        1,
        True,
        {"summary": "first"},
    )
    assert loaded.steps["s2"].status is StepStatus.RUNNING
    assert not loaded.steps["s2"].has_output
    assert [a.status for a in execution_of(loaded, "s1").attempts] == [StepStatus.COMPLETED]
    s2 = execution_of(loaded, "s2")
    assert (s2.step_id, s2.iteration, s2.item, s2.agent_name) == ("s2", 1, None, "agent-s2")
    assert s2.status is StepStatus.RUNNING
    assert s2.current is not None
    assert s2.current.correlation_id == f"{RUN_ID}/s2/1"
    assert loaded.awaits("s2", 1)
    assert current_step(loaded) == "s2"
    # Stored again, it is in today's form and reads back the same.
    dumped = json.loads(loaded.model_dump_json())
    assert "current_step" not in dumped
    assert RunState.model_validate(dumped) == loaded

    # After a restart the attempt in flight is sent again, with its id, input and deadline.
    resumed = resume(loaded, at(5))
    assert [type(e) for e in resumed] == [DispatchTask, ScheduleTimeout]
    dispatch = resumed[0]
    assert isinstance(dispatch, DispatchTask)
    task = dispatch.task
    assert (task.step_id, task.attempt, task.iteration, task.item) == ("s2", 1, 1, None)
    assert task.correlation_id == f"{RUN_ID}/s2/1"
    assert task.input == {"previous": "first", "topic": "hello"}
    assert task.deadline == at(31)
    assert resumed[1] == ScheduleTimeout(run_id=RUN_ID, step_id="s2", attempt=1, at=at(31))

    # The result of that attempt completes the run with its output.
    new, effects = changed(loaded, result(loaded, at(6), output={"summary": "second"}))
    assert new.status is RunStatus.COMPLETED
    assert new.output == {"summary": "second"}
    assert new.last_step == "s2"
    assert new.steps["s2"].status is StepStatus.COMPLETED
    assert execution_of(new, "s2").status is StepStatus.COMPLETED
    assert execution_of(new, "s1") == execution_of(loaded, "s1")
    assert not of_type(effects, DispatchTask)
    assert of_type(effects, RunFinished) == [
        RunFinished(run_id=RUN_ID, status=RunStatus.COMPLETED, output={"summary": "second"})
    ]
    # A late copy of the same result changes nothing.
    again, more = transition(new, result(loaded, at(7), output={"summary": "second"}))
    assert_unchanged(new, again, more)


def test_a_stored_chain_shaped_failed_state_can_be_retried():
    loaded = RunState.model_validate(chain_shaped_state(failed=True))
    assert loaded.status is RunStatus.FAILED
    assert loaded.last_step == "s2"
    assert loaded.steps["s2"].status is StepStatus.FAILED
    assert execution_of(loaded, "s2").status is StepStatus.FAILED
    assert resume(loaded, at(5)) == []

    new, effects = changed(loaded, retry(at(10)))
    assert new.status is RunStatus.RUNNING
    s2 = execution_of(new, "s2")
    assert [a.number for a in s2.attempts] == [1, 2]
    assert s2.first_attempt_of_round == 2
    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.task.correlation_id == f"{RUN_ID}/s2/2"
    assert dispatch.task.input == {"previous": "first", "topic": "hello"}, "s1's stored output is read"

    done, effects = changed(new, result(new, at(11), output="fine now"))
    assert done.status is RunStatus.COMPLETED
    assert done.output == "fine now"
