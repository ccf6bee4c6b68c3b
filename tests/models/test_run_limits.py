"""Runs that cannot be stored (models/run.py, the end section): ``fail_too_large``, ``fail_unreadable``, ``dropped``.

A state over ``SWITCHYARD_MAX_MESSAGE_BYTES`` is never stored: the run fails
with ``state_too_large`` and is stored reduced so that it fits. A stored state
that cannot be read fails its run with ``unreadable_state``. Either run cannot
be retried (a RetryRequested is a dead letter and changes nothing).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import JsonValue

from models.agents import RecoveryAction, RecoveryPolicy
from models.messages import AgentQuestion, AgentResult, ErrorKind, ResultStatus
from models.plan import RetryPolicy, WorkflowPlan
from models.run import (
    AgentPolicy,
    AgentResultReceived,
    Attempt,
    CancelAgentTask,
    Checkpoint,
    DeadLetter,
    DispatchTask,
    Effect,
    Execution,
    ExecutionDefaults,
    PublishMonitoring,
    RetryRequested,
    RunError,
    RunFinished,
    RunState,
    RunStatus,
    ScheduleTimeout,
    StepState,
    StepStatus,
    dropped,
    fail_too_large,
    fail_unreadable,
    transition,
)
from streams.run_store import read_state, records_of
from tests.models.run_builders import (
    RUN_ID,
    at,
    current_step,
    execution_of,
    failure,
    make_plan,
    of_type,
    result,
    step,
    submitted,
)

LIMIT = 16_384  # the least SWITCHYARD_MAX_MESSAGE_BYTES allows
DELAYED = RetryPolicy(max_attempts=3, initial_delay_s=10.0, multiplier=2.0, jitter=0.0)


def encoded_size(state: RunState) -> int:
    """The whole state as one record (JSON value and key): more than any of the records it is stored in."""
    return len(state.model_dump_json().encode()) + len(state.run_id.encode())


def stored_size(state: RunState) -> int:
    """What the shell counts against the limit: the largest record the state is stored in (key and value)."""
    return records_of(None, state).biggest()


def read_back(state: RunState) -> RunState:
    """``state`` written to a table in its records and read from them again."""
    table = dict(records_of(None, state).writes)
    return read_state(table, state.run_id, table[state.run_id.encode()])


def compact(value: JsonValue) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def note_for(value: JsonValue, reason: str = "state_too_large") -> dict[str, JsonValue]:
    raw = compact(value)
    return {"dropped": {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "reason": reason}}


def started(plan: WorkflowPlan | None = None, **kwargs: Any) -> RunState:
    state, _ = step(None, submitted(plan if plan is not None else make_plan(2), **kwargs))
    return state


def too_large(before: RunState | None, after: RunState, limit: int = LIMIT, when: datetime | None = None):
    size = stored_size(after)
    assert size > limit, "the shell would store this state as it is"
    reduced, effects = fail_too_large(before, after, size=size, limit=limit, at=when or after.updated_at)
    return size, reduced, effects


def assert_failed_too_large(
    before: RunState | None, after: RunState, reduced: RunState, effects: list[Effect], size: int, limit: int
) -> None:
    assert stored_size(reduced) <= limit  # every record it is stored in fits
    assert read_back(reduced) == reduced
    assert reduced.run_id == after.run_id
    assert reduced.status is RunStatus.FAILED
    assert reduced.output is None
    assert reduced.error is not None
    assert reduced.error.kind == ErrorKind.STATE_TOO_LARGE
    assert reduced.error.details == {"size": size, "limit": limit}
    assert str(size) in reduced.error.message
    assert str(limit) in reduced.error.message
    assert reduced.version > after.version
    if before is not None:
        assert reduced.version > before.version
    assert reduced.created_at == after.created_at
    # The transition's own plans are not carried out, and the record ends the run.
    assert not of_type(effects, DispatchTask)
    assert not of_type(effects, ScheduleTimeout)
    assert not of_type(effects, DeadLetter)
    tail = effects[-3:]
    assert [type(e) for e in tail] == [PublishMonitoring, RunFinished, Checkpoint]
    monitoring, finished, checkpoint = tail
    assert isinstance(monitoring, PublishMonitoring)
    assert monitoring.update.status == RunStatus.FAILED
    assert monitoring.update.detail["kind"] == ErrorKind.STATE_TOO_LARGE
    assert finished == RunFinished(run_id=after.run_id, status=RunStatus.FAILED, output=None, error=reduced.error)
    assert checkpoint == Checkpoint(state=reduced)
    assert len(of_type(effects, Checkpoint)) == 1
    # An open step of ``after`` fails with the run (when the history is kept at all).
    current = current_step(after)
    if current is not None and current in reduced.steps and not after.steps[current].status.finished:
        failed_step = reduced.steps[current]
        assert failed_step.status is StepStatus.FAILED
        assert failed_step.error is not None
        assert failed_step.error.kind == ErrorKind.STATE_TOO_LARGE
        assert not failed_step.error.retriable
        failed_execution = execution_of(reduced, current)
        assert failed_execution.status is StepStatus.FAILED
        assert failed_execution.error is not None
        assert failed_execution.error.kind == ErrorKind.STATE_TOO_LARGE
        assert not failed_execution.error.retriable
        assert failed_execution.next_attempt_at is None
        last = failed_execution.current
        assert last is not None
        assert last.status is StepStatus.FAILED


# ------------------------------------------------------------------ dropped


@pytest.mark.parametrize(
    "value",
    [
        {"summary": "x" * 5000},
        ["é", "€", "😀", '"quoted"', "back\\slash"],
        "plain text",
        12345,
        None,
        {"nested": {"deep": [1, 2.5, True, None]}},
    ],
)
def test_dropped_names_the_size_and_sha256_of_the_compact_json(value: JsonValue) -> None:
    raw = compact(value)
    note = dropped(value, "because")
    assert note == {"dropped": {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "reason": "because"}}
    json.dumps(note)  # it is JSON itself


def test_dropped_counts_utf8_bytes_not_characters() -> None:
    note = dropped("€" * 10, "r")
    assert note["dropped"]["bytes"] == 2 + 30  # type: ignore[index,call-overload]


# -------------------------------------------------------------- fail_too_large


def test_a_big_output_fails_the_run_and_the_reduced_state_fits() -> None:
    before = started()
    big: JsonValue = {"summary": "x" * 30_000}
    after, _ = step(before, result(before, at(1), output=big))
    assert stored_size(after) > LIMIT
    size, reduced, effects = too_large(before, after, when=at(1))
    assert_failed_too_large(before, after, reduced, effects, size, LIMIT)
    assert reduced.error is not None
    assert reduced.error.step_id == "s2"  # the step the transition had opened
    assert f"{size} bytes" in reduced.error.message
    assert f"{LIMIT} bytes" in reduced.error.message


def test_a_run_that_waits_for_a_person_fails_whole_with_its_large_question_data_replaced() -> None:
    before = started()
    question = AgentQuestion(text="which one?", data={"choices": "x" * 30_000}, task_id="task-1")
    asking = AgentResult(
        correlation_id="run-1/s1/1",
        run_id=before.run_id,
        step_id="s1",
        attempt=1,
        status=ResultStatus.INPUT_REQUIRED,
        question=question,
        started_at=at(1),
        finished_at=at(1),
    )
    after, _ = step(before, AgentResultReceived(result=asking, at=at(1)))
    assert after.waiting == 1
    size, reduced, effects = too_large(before, after, when=at(1))
    assert_failed_too_large(before, after, reduced, effects, size, LIMIT)
    assert reduced.waiting == 0, "a failed run waits for no one"
    kept = execution_of(reduced, "s1").attempts[0].exchanges[0].question
    assert kept.text == "which one?"
    assert kept.data == note_for({"choices": "x" * 30_000})


def test_large_values_are_replaced_by_notes_and_small_ones_are_kept() -> None:
    before = started()
    big: JsonValue = {"summary": "x" * 30_000}
    after, _ = step(before, result(before, at(1), output=big))
    _, reduced, _ = too_large(before, after, when=at(1))
    # Small values: as they were.
    assert reduced.input == {"text": "hello"}
    s1 = execution_of(reduced, "s1")
    assert s1.attempts[0].input == {"text": "hello"}
    # Large ones: a note of their size and hash.
    assert reduced.output_of("s1") == note_for(big)
    assert s1.output == note_for(big)
    assert s1.attempts[0].output == note_for(big)
    s2_input = execution_of(after, "s2").attempts[0].input
    assert len(compact(s2_input)) > 1024
    assert execution_of(reduced, "s2").attempts[0].input == note_for(s2_input)
    # The history stays: both steps, the completed one completed, the open one failed.
    assert list(reduced.steps) == ["s1", "s2"]
    assert list(reduced.executions) == ["s1@1", "s2@1"]
    assert reduced.steps["s1"].status is StepStatus.COMPLETED
    assert s1.status is StepStatus.COMPLETED
    assert reduced.steps["s2"].status is StepStatus.FAILED
    assert execution_of(reduced, "s2").status is StepStatus.FAILED
    assert execution_of(reduced, "s2").attempts[0].status is StepStatus.FAILED
    assert reduced.plan == after.plan


def test_the_note_of_a_non_ascii_output_counts_its_utf8_bytes() -> None:
    before = started()
    big: JsonValue = {"summary": "€😀" * 4000}
    after, _ = step(before, result(before, at(1), output=big))
    _, reduced, _ = too_large(before, after, when=at(1))
    note = reduced.output_of("s1")
    assert note == note_for(big)
    assert execution_of(reduced, "s1").output == note
    assert isinstance(note, dict)
    assert isinstance(note["dropped"], dict)
    assert note["dropped"]["bytes"] == len(json.dumps(big, ensure_ascii=False, separators=(",", ":")).encode())


def test_a_big_run_input_is_dropped_from_a_new_run() -> None:
    run_input: dict[str, JsonValue] = {"text": "y" * 40_000}
    after = started(run_input=run_input)
    size, reduced, effects = too_large(None, after, when=at(0))
    assert_failed_too_large(None, after, reduced, effects, size, LIMIT)
    assert reduced.input == note_for(run_input)
    assert execution_of(reduced, "s1").attempts[0].input == note_for({"text": "y" * 40_000})
    assert reduced.version == after.version + 1
    assert not of_type(effects, CancelAgentTask)  # nothing was in flight before


def test_the_version_is_above_both_before_and_after() -> None:
    before = started().model_copy(update={"version": 41})
    after = before.model_copy(update={"version": 7, "input": {"text": "z" * 20_000}})
    _, reduced, _ = too_large(before, after, when=at(1))
    assert reduced.version == 42
    _, reduced, _ = too_large(after, before.model_copy(update={"input": {"text": "z" * 20_000}}), when=at(1))
    assert reduced.version == 42


def test_neither_the_attempt_whose_result_arrived_nor_the_next_unsent_one_is_cancelled() -> None:
    before = started()
    after, _ = step(before, result(before, at(1), output={"summary": "x" * 30_000}))
    _, reduced, effects = too_large(before, after, when=at(1))
    assert of_type(effects, CancelAgentTask) == []
    assert reduced.steps["s2"].status is StepStatus.FAILED  # opened by the transition, never sent


def test_a_stored_state_already_too_large_cancels_its_dispatched_attempt() -> None:
    stored = started(run_input={"text": "y" * 40_000})
    size, reduced, effects = too_large(stored, stored, when=at(5))
    assert_failed_too_large(stored, stored, reduced, effects, size, LIMIT)
    assert reduced.version == stored.version + 1
    assert [c.correlation_id for c in of_type(effects, CancelAgentTask)] == [f"{RUN_ID}/s1/1"]
    assert reduced.steps["s1"].status is StepStatus.FAILED
    assert execution_of(reduced, "s1").attempts[0].status is StepStatus.FAILED
    assert execution_of(reduced, "s1").attempts[0].finished_at == at(5)


def test_the_error_of_a_stored_state_already_too_large_names_the_step_in_flight() -> None:
    stored = started(run_input={"text": "y" * 40_000})
    _, reduced, effects = too_large(stored, stored, when=at(5))
    assert reduced.error is not None
    assert reduced.error.step_id == "s1"
    (monitoring,) = of_type(effects, PublishMonitoring)
    assert monitoring.update.detail["step_id"] == "s1"


def delayed_retry_run(run_input: dict[str, JsonValue] | None = None) -> RunState:
    """s1's first attempt failed; its second waits until at(11) (PENDING)."""
    state = started(make_plan(2, retry=DELAYED), run_input=run_input)
    state, _ = step(state, failure(state, at(1)))
    current = execution_of(state, "s1").current
    assert current is not None
    assert current.status is StepStatus.PENDING
    assert current.dispatch_at == at(11)
    return state


def test_a_delayed_attempt_not_yet_sent_is_not_cancelled() -> None:
    stored = delayed_retry_run({"text": "y" * 40_000})
    size, reduced, effects = too_large(stored, stored, when=at(5))
    assert_failed_too_large(stored, stored, reduced, effects, size, LIMIT)
    assert not of_type(effects, CancelAgentTask)
    assert reduced.steps["s1"].status is StepStatus.FAILED
    s1 = execution_of(reduced, "s1")
    assert s1.status is StepStatus.FAILED
    assert [a.status for a in s1.attempts] == [StepStatus.FAILED, StepStatus.FAILED]
    assert s1.next_attempt_at is None


def test_a_delayed_attempt_whose_time_has_come_is_cancelled() -> None:
    stored = delayed_retry_run({"text": "y" * 40_000})
    _, _, effects = too_large(stored, stored, when=at(11))  # dispatch_at <= at: it may have been sent
    assert [(c.attempt, c.correlation_id) for c in of_type(effects, CancelAgentTask)] == [(2, f"{RUN_ID}/s1/2")]


def test_a_completing_result_with_a_big_output_fails_instead_of_completing() -> None:
    state = started(make_plan(1))
    big: JsonValue = {"summary": "x" * 30_000}
    after, _ = step(state, result(state, at(1), output=big))
    assert after.status is RunStatus.COMPLETED
    size, reduced, effects = too_large(state, after, when=at(1))
    assert_failed_too_large(state, after, reduced, effects, size, LIMIT)
    assert reduced.output is None
    assert reduced.completed_at == at(1)


def test_a_huge_plan_description_is_dropped_with_the_plan() -> None:
    plan = make_plan(2).model_copy(update={"description": "d" * 40_000})
    after = started(plan)
    size, reduced, effects = too_large(None, after, when=at(0))
    assert_failed_too_large(None, after, reduced, effects, size, LIMIT)
    assert reduced.plan.workflow_id == plan.workflow_id
    assert reduced.plan.name == plan.name
    assert reduced.plan.description is None


def test_huge_mappings_are_removed_from_the_plan() -> None:
    # Big constants in the mappings of steps not yet run: the plan itself is too large.
    overrides = {f"s{i}": {"input_mapping": {"blob": "m" * 3000}} for i in range(2, 9)}
    plan = make_plan(8, overrides=overrides)
    after = started(plan)
    size, reduced, effects = too_large(None, after, when=at(0))
    assert_failed_too_large(None, after, reduced, effects, size, LIMIT)
    assert all(s.input_mapping == {} for s in reduced.plan.steps.values())
    assert list(reduced.plan.steps) == list(plan.steps)  # the plan's shape is kept
    assert reduced.steps["s1"].status is StepStatus.FAILED


def test_a_long_history_is_given_up_last() -> None:
    # 60 steps each with a (small) output: only dropping the history can make the whole of it fit.
    plan = make_plan(60)
    state = started(plan)
    for i in range(59):
        state, _ = step(state, result(state, at(i + 1), output={"summary": f"{i:04d}" * 200}))
    assert encoded_size(state) > LIMIT
    # The last step's output is too large for its record: the run fails, and is reduced to fit.
    after, _ = step(state, result(state, at(100), output={"summary": "x" * 30_000}))
    size, reduced, effects = too_large(state, after, when=at(100))
    assert_failed_too_large(state, after, reduced, effects, size, LIMIT)


def test_a_reduced_run_cannot_be_retried() -> None:
    before = started()
    after, _ = step(before, result(before, at(1), output={"summary": "x" * 30_000}))
    _, reduced, _ = too_large(before, after, when=at(1))
    assert current_step(reduced) is not None
    new, effects = transition(reduced, RetryRequested(run_id=RUN_ID, at=at(2)))
    assert new is reduced
    assert len(effects) == 1
    dead = effects[0]
    assert isinstance(dead, DeadLetter)
    assert dead.run_id == RUN_ID
    assert "state_too_large" in dead.reason
    assert "retried" in dead.reason


def test_an_unreadable_state_failed_at_a_step_cannot_be_retried() -> None:
    state = started()
    s1 = state.steps["s1"]
    failed = state.model_copy(
        update={
            "status": RunStatus.FAILED,
            "error": RunError(kind=ErrorKind.UNREADABLE_STATE, message="broken"),
            "steps": {"s1": s1.model_copy(update={"status": StepStatus.FAILED})},
        }
    )
    new, effects = transition(failed, RetryRequested(run_id=RUN_ID, at=at(2)))
    assert new is failed
    assert [type(e) for e in effects] == [DeadLetter]


def test_a_run_failed_by_fail_unreadable_refuses_a_retry_with_a_dead_letter() -> None:
    failed, _ = fail_unreadable(RUN_ID, None, "broken", at(1), limit=1_000_000)
    new, effects = transition(failed, RetryRequested(run_id=RUN_ID, at=at(2)))
    assert new is failed
    assert [type(e) for e in effects] == [DeadLetter]


def test_a_run_input_of_at_most_1024_compact_bytes_is_kept() -> None:
    run_input: dict[str, JsonValue] = {f"k{i:02d}": i for i in range(95)}
    run_input["text"] = "hi"
    assert len(compact(run_input)) <= 1024
    before = started(run_input=run_input)
    after, _ = step(before, result(before, at(1), output={"summary": "x" * 30_000}))
    _, reduced, _ = too_large(before, after, when=at(1))
    assert reduced.output_of("s1") == note_for({"summary": "x" * 30_000})  # the first pass was enough
    assert reduced.input == run_input


def test_a_value_dropped_in_the_first_pass_still_names_its_size_after_the_second() -> None:
    # A 30 KB input (dropped in the first pass) and eight 900-byte outputs (kept in the first pass,
    # so the state is still too large, and dropped in the second).
    run_input: dict[str, JsonValue] = {"text": "y" * 30_000}
    state = started(make_plan(9), run_input=run_input)
    for i in range(8):
        state, _ = step(state, result(state, at(i + 1), output={"summary": str(i) * 900}))
    size, reduced, effects = too_large(state, state, when=at(20))
    assert_failed_too_large(state, state, reduced, effects, size, LIMIT)
    assert "s1" in reduced.steps  # the history is kept: the second pass was enough
    assert reduced.input == note_for(run_input)


def test_large_execution_defaults_still_fit() -> None:
    skip = RecoveryPolicy(action=RecoveryAction.SKIP, default_output={"summary": "z" * 20_000})
    defaults = ExecutionDefaults(agents={"agent-s1": AgentPolicy(recovery=skip)})
    after = started(defaults=defaults)
    size, reduced, effects = too_large(None, after, when=at(0))
    assert_failed_too_large(None, after, reduced, effects, size, LIMIT)


# ----------------------------------------------------------- property: it fits

CHARS = st.sampled_from(["x", "é", "€", "😀", '"', "\\", "\n"])


@st.composite
def oversize_cases(draw: st.DrawFn) -> tuple[RunState | None, RunState, int, datetime]:
    """A run and its next state that is too large, built from big inputs, outputs, plans and histories."""
    limit = draw(st.integers(LIMIT, 120_000))
    char = draw(CHARS)
    n_steps = draw(st.integers(1, 25))
    input_len = draw(st.sampled_from([0, 10, 2000, limit]))
    output_len = draw(st.sampled_from([0, 10, 600, 3000]))
    description_len = draw(st.sampled_from([0, 100, limit]))
    mapping_len = draw(st.sampled_from([0, 100, limit // 4]))
    done = draw(st.integers(0, n_steps - 1))
    delayed = draw(st.booleans())
    ending = draw(st.sampled_from(["big_output", "stored", "new_run"]))

    overrides: dict[str, dict[str, Any]] = {}
    if mapping_len:
        for i in range(1, n_steps + 1):
            overrides[f"s{i}"] = {
                "input_mapping": {"text": "${workflow.input.text}", "blob": char * mapping_len},
            }
    plan = make_plan(n_steps, retry=DELAYED if delayed else None, overrides=overrides)
    if description_len:
        plan = plan.model_copy(update={"description": char * description_len})
    run_input: dict[str, JsonValue] = {"text": char * input_len}
    first = started(plan, run_input=run_input)
    if ending == "new_run":
        # The very first state (a submission) is over the limit: make sure it is.
        if stored_size(first) <= limit:
            first = first.model_copy(update={"input": {"text": char * limit}})
        return None, first, limit, at(0)
    state = first
    for i in range(done):
        state, _ = step(state, result(state, at(i + 1), output={"summary": char * output_len}))
    if delayed:
        state, _ = step(state, failure(state, at(done + 1)))  # a PENDING retry, due at +10 s
    when = at(done + 5)
    if ending == "stored":
        if stored_size(state) <= limit:
            state = state.model_copy(update={"input": {"text": char * limit}})
        return state, state, limit, when
    after, _ = step(state, result(state, when, output={"summary": char * limit}))
    return state, after, limit, when


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(oversize_cases())
def test_any_oversize_run_is_failed_and_stored_reduced_within_the_limit(
    case: tuple[RunState | None, RunState, int, datetime],
) -> None:
    before, after, limit, when = case
    size = stored_size(after)
    assert size > limit
    reduced, effects = fail_too_large(before, after, size=size, limit=limit, at=when)
    assert_failed_too_large(before, after, reduced, effects, size, limit)
    # Reading it back gives the same state (it is stored as JSON, in its records or as one).
    assert RunState.model_validate_json(reduced.model_dump_json()) == reduced
    assert read_back(reduced) == reduced
    # A cancel exactly when an attempt was in flight before (sent: dispatch_at <= at) and is still
    # waited for after the event (not the attempt whose result this is).
    expected_cancels = []
    before_step = current_step(before) if before is not None else None
    if before is not None and before.status is RunStatus.RUNNING and before_step is not None:
        current = execution_of(before, before_step).current
        later = after.execution(before_step)
        still = later is not None and later.current is not None and not later.current.status.finished
        if current is not None and not current.status.finished and current.dispatch_at <= when and still:
            expected_cancels = [current.correlation_id]
    assert [c.correlation_id for c in of_type(effects, CancelAgentTask)] == expected_cancels
    # Every value still there is either unchanged or a note of a dropped value.
    for step_id in reduced.steps:
        kept_output = reduced.output_of(step_id)
        assert kept_output == after.output_of(step_id) or is_note(kept_output)
    for key, reduced_execution in reduced.executions.items():
        original = after.executions[key]
        assert reduced_execution.output == original.output or is_note(reduced_execution.output)
        for kept, was in zip(reduced_execution.attempts, original.attempts, strict=True):
            for now, then in ((kept.input, was.input), (kept.output, was.output)):
                assert now == then or is_note(now)
    assert reduced.input == after.input or is_note(reduced.input)


def is_note(value: JsonValue) -> bool:
    if not isinstance(value, dict) or set(value) != {"dropped"}:
        return False
    note = value["dropped"]
    return (
        isinstance(note, dict)
        and set(note) == {"bytes", "sha256", "reason"}
        and isinstance(note["bytes"], int)
        and isinstance(note["sha256"], str)
        and len(note["sha256"]) == 64
        and note["reason"] == "state_too_large"
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    limit=st.integers(LIMIT, 60_000),
    big=st.integers(1100, 50_000),
    char=CHARS,
)
def test_a_value_dropped_in_the_first_pass_keeps_its_own_size_and_hash(limit: int, big: int, char: str) -> None:
    # One step, a big output: the first pass (values over 1024 bytes) is enough.
    before = started(make_plan(1))
    output: JsonValue = {"summary": char * big}
    after, _ = step(before, result(before, at(1), output=output))
    size = stored_size(after)
    if size <= limit:
        return
    reduced, _ = fail_too_large(before, after, size=size, limit=limit, at=at(1))
    assert stored_size(reduced) <= limit
    assert reduced.output_of("s1") == note_for(output)
    assert execution_of(reduced, "s1").attempts[0].output == note_for(output)
    assert execution_of(reduced, "s1").attempts[0].input == {"text": "hello"}
    assert reduced.input == {"text": "hello"}


# ------------------------------------------------------------- fail_unreadable


def assert_failed_unreadable(state: RunState, effects: list[Effect], run_id: str, reason: str, when: datetime) -> None:
    assert state.run_id == run_id
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.kind == ErrorKind.UNREADABLE_STATE
    assert reason in state.error.message
    assert state.error.details == {"reason": reason[:2000]}
    assert state.completed_at == when
    assert state.updated_at == when
    assert [type(e) for e in effects] == [PublishMonitoring, RunFinished, Checkpoint]
    monitoring, finished, checkpoint = effects
    assert isinstance(monitoring, PublishMonitoring)
    assert monitoring.update.status == RunStatus.FAILED
    assert monitoring.update.detail["kind"] == ErrorKind.UNREADABLE_STATE
    assert finished == RunFinished(run_id=run_id, status=RunStatus.FAILED, output=None, error=state.error)
    assert checkpoint == Checkpoint(state=state)
    # It is a state that can be stored and read again.
    assert RunState.model_validate_json(state.model_dump_json()) == state


def test_fail_unreadable_with_nothing_readable() -> None:
    state, effects = fail_unreadable(RUN_ID, None, "ValidationError: broken", at(3), limit=1_000_000)
    assert_failed_unreadable(state, effects, RUN_ID, "ValidationError: broken", at(3))
    assert state.created_at == at(3)
    assert state.input == {}
    assert state.steps == {}
    assert state.executions == {}
    assert state.last_step is None
    assert state.version >= 2**31  # newer than any snapshot whose version is unknown


@pytest.mark.parametrize(
    "garbage",
    [
        {"plan": 3, "version": "x", "created_at": "garbage", "input": [1, 2]},
        {"plan": {"steps": {}}, "version": -5, "created_at": "never"},
        {"unrelated": True},
        [1, 2, 3],
        "a string",
        42,
    ],
)
def test_fail_unreadable_with_garbage(garbage: Any) -> None:
    state, effects = fail_unreadable(RUN_ID, garbage, "no such shape", at(3), limit=1_000_000)
    assert_failed_unreadable(state, effects, RUN_ID, "no such shape", at(3))
    assert state.input == {}
    assert state.created_at == at(3)
    assert state.version >= 2**31


def test_fail_unreadable_keeps_a_valid_plan_input_and_times_and_bumps_the_version() -> None:
    stored = started()
    raw = json.loads(stored.model_dump_json())
    raw["status"] = "SOMETHING_NEW"
    raw["version"] = 7
    state, effects = fail_unreadable(RUN_ID, raw, "unknown status", at(9), limit=1_000_000)
    assert_failed_unreadable(state, effects, RUN_ID, "unknown status", at(9))
    assert state.plan == stored.plan
    assert state.input == stored.input
    assert state.version == 8
    assert state.created_at == stored.created_at
    assert state.started_at == stored.started_at


def test_fail_unreadable_with_a_valid_plan_but_a_broken_time_keeps_the_plan() -> None:
    stored = started()
    raw = json.loads(stored.model_dump_json())
    raw["created_at"] = "not a time"
    raw["version"] = 3
    state, effects = fail_unreadable(RUN_ID, raw, "bad time", at(9), limit=1_000_000)
    assert_failed_unreadable(state, effects, RUN_ID, "bad time", at(9))
    assert state.plan == stored.plan
    assert state.created_at == at(9)


def test_fail_unreadable_clips_a_long_reason_in_the_details() -> None:
    reason = "r" * 5000
    state, _ = fail_unreadable(RUN_ID, None, reason, at(1), limit=1_000_000)
    assert state.error is not None
    assert state.error.details == {"reason": "r" * 2000}


def test_fail_unreadable_does_not_take_a_boolean_for_a_version() -> None:
    raw = json.loads(started().model_dump_json())
    raw["version"] = True
    raw["status"] = "BROKEN"
    state, _ = fail_unreadable(RUN_ID, raw, "broken", at(1), limit=1_000_000)
    assert state.version >= 2**31


# ----------------------------------------------- the builders are as they seem


def test_the_open_step_in_a_fresh_run_is_in_flight() -> None:
    state = started()
    assert isinstance(state.steps["s1"], StepState)
    assert state.steps["s1"].status is StepStatus.RUNNING
    s1 = state.execution("s1")
    assert isinstance(s1, Execution)
    assert isinstance(s1.current, Attempt)
    assert s1.current.status is StepStatus.RUNNING
    assert s1.current.dispatch_at == state.created_at
