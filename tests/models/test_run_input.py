"""Questions and approvals in the run state machine (models/run.py) and the answer rules (models/run_input.py).

An agent that answers ``INPUT_REQUIRED`` leaves its attempt WAITING for a
person under an input deadline; the answer (:class:`InputGiven`) carries the
call on as its next turn. An approval step's one attempt waits for a decision
the same way, without calling an agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import JsonValue

from models.agents import RecoveryAction, RecoveryPolicy
from models.messages import AgentError, AgentQuestion, AgentResult, Answer, ErrorKind, ResultStatus
from models.plan import APPROVAL_AGENT, DEFAULT_INPUT_TIMEOUT_S, WorkflowPlan
from models.run import (
    AgentPolicy,
    AgentResultReceived,
    CancelAgentTask,
    CancelRequested,
    DeadLetter,
    DispatchTask,
    Effect,
    Event,
    Execution,
    ExecutionDefaults,
    InputGiven,
    PublishMonitoring,
    RetryRequested,
    RunFinished,
    RunState,
    RunStatus,
    ScheduleTimeout,
    StepStatus,
    StepTimedOut,
    cancel_in_flight,
    resume,
    transition,
)
from models.run_input import InputRefused, answer_refusal, answered_already, check_answer, waiting_execution
from tests.models.run_builders import (
    NO_DELAY,
    RUN_ID,
    assert_changed,
    assert_unchanged,
    at,
    execution_of,
    make_plan,
    of_type,
    secs,
    start,
    step,
    submitted,
)

CALL_TIMEOUT_S = 30.0
TASK_ID = "task-7"
CONTEXT_ID = "ctx-7"

# ------------------------------------------------------------------ builders


def changed(state: RunState | None, event: Event) -> tuple[RunState, list[Effect]]:
    """Apply an event that must change the run (version + 1, one checkpoint last), keeping the waiting count."""
    new, effects = step(state, event)
    assert_changed(state, new, effects)
    assert_waiting_count(new)
    return new, effects


def unchanged(state: RunState, event: Event) -> None:
    """Apply an event that must change nothing and ask for nothing."""
    new, effects = transition(state, event)
    assert_unchanged(state, new, effects)


def refused(state: RunState, event: Event) -> str:
    """Apply an event that must be dead-lettered with no change; the reason."""
    new, effects = transition(state, event)
    assert new is state
    assert len(effects) == 1, effects
    (dead,) = of_type(effects, DeadLetter)
    assert dead.run_id == state.run_id
    return dead.reason


def assert_waiting_count(state: RunState) -> None:
    assert state.waiting == len(state.waiting_executions())


def current(state: RunState, step_id: str = "s1", item: int | None = None) -> Execution:
    return execution_of(state, step_id, item=item)


def agent_result(
    state: RunState,
    when: datetime,
    *,
    status: ResultStatus,
    step_id: str = "s1",
    item: int | None = None,
    turn: int | None = None,
    text: str = "which colour?",
    data: JsonValue = None,
    output: JsonValue = None,
    task_id: str = TASK_ID,
) -> AgentResultReceived:
    """A result for the current attempt of ``step_id`` (its turn unless one is given)."""
    execution = current(state, step_id, item)
    attempt = execution.current
    assert attempt is not None
    question = None
    error = None
    if status is ResultStatus.INPUT_REQUIRED:
        question = AgentQuestion(text=text, data=data, task_id=task_id, context_id=CONTEXT_ID)
    elif status is ResultStatus.FAILURE:
        error = AgentError(kind="agent_failed", message="agent exploded", retriable=True)
    elif output is None:
        output = {"summary": f"out-{step_id}"}
    return AgentResultReceived(
        result=AgentResult(
            correlation_id=attempt.correlation_id,
            run_id=state.run_id,
            step_id=step_id,
            attempt=attempt.number,
            iteration=execution.iteration,
            item=item,
            status=status,
            output=output if status is ResultStatus.SUCCESS else None,
            error=error,
            question=question,
            turn=attempt.turn if turn is None else turn,
            started_at=when,
            finished_at=when,
        ),
        at=when,
    )


def asks(state: RunState, when: datetime, **kwargs: Any) -> AgentResultReceived:
    return agent_result(state, when, status=ResultStatus.INPUT_REQUIRED, **kwargs)


def succeeds(state: RunState, when: datetime, **kwargs: Any) -> AgentResultReceived:
    return agent_result(state, when, status=ResultStatus.SUCCESS, **kwargs)


def fails(state: RunState, when: datetime, **kwargs: Any) -> AgentResultReceived:
    return agent_result(state, when, status=ResultStatus.FAILURE, **kwargs)


def answer(
    when: datetime,
    *,
    step_id: str = "s1",
    turn: int = 0,
    item: int | None = None,
    iteration: int = 1,
    answer_id: str = "answer-1",
    text: str | None = "blue",
    data: JsonValue = None,
    decision: str | None = None,
    run_id: str = RUN_ID,
) -> InputGiven:
    return InputGiven(
        run_id=run_id,
        step_id=step_id,
        iteration=iteration,
        item=item,
        turn=turn,
        answer=Answer.model_validate({"answer_id": answer_id, "text": text, "data": data, "decision": decision}),
        at=when,
    )


def decide(when: datetime, decision: str, *, step_id: str = "review", text: str | None = None, **kw: Any) -> InputGiven:
    return answer(when, step_id=step_id, decision=decision, text=text, answer_id=f"decision-{decision}", **kw)


def timed_out(state: RunState, when: datetime, step_id: str = "s1", item: int | None = None) -> StepTimedOut:
    execution = current(state, step_id, item)
    attempt = execution.current
    assert attempt is not None
    return StepTimedOut(
        run_id=state.run_id,
        step_id=step_id,
        attempt=attempt.number,
        iteration=execution.iteration,
        item=item,
        at=when,
    )


def statuses(effects: list[Effect]) -> list[str]:
    return [e.update.status for e in of_type(effects, PublishMonitoring)]


def as_dict(value: JsonValue) -> dict[str, JsonValue]:
    assert isinstance(value, dict), value
    return value


# ----------------------------------------------------------------- scenarios


def running(**kwargs: Any) -> RunState:
    """s1 -> s2, 30 s per call, retried at once (three attempts)."""
    return start(make_plan(2, timeout_s=CALL_TIMEOUT_S, retry=NO_DELAY), **kwargs)


def asked(**kwargs: Any) -> RunState:
    """s1's agent asked its first question at at(1)."""
    state = running(**kwargs)
    state, _ = changed(state, asks(state, at(1)))
    return state


def answered() -> RunState:
    """s1's question was answered at at(2): its call goes on (turn 1)."""
    state = asked()
    state, _ = changed(state, answer(at(2)))
    return state


def asked_twice() -> RunState:
    """s1's agent asked again (turn 1) at at(3)."""
    state = answered()
    state, _ = changed(state, asks(state, at(3), text="which shade?"))
    return state


def approval_plan(
    prompt: JsonValue = "Publish ${workflow.input.text}?",
    *,
    first: bool = True,
    input_timeout_s: float | None = None,
    **approval: Any,
) -> WorkflowPlan:
    """``review`` (an approval, after ``write`` unless ``first``) leads to ``publish`` if approved, else ``discard``."""
    steps: dict[str, Any] = {
        "review": {
            "id": "review",
            "approval": {"prompt": prompt, **approval},
            "routes": [{"when": "${review.output.approved} == true", "to": "publish"}],
            "otherwise": "discard",
            "input_timeout_s": input_timeout_s,
        },
        "publish": {"id": "publish", "agent_name": "publisher", "input_mapping": {"n": "${review.output.text}"}},
        "discard": {"id": "discard", "agent_name": "shredder"},
    }
    if not first:
        steps["write"] = {
            "id": "write",
            "agent_name": "writer",
            "input_mapping": {"t": "${workflow.input.text}"},
            "next_step": "review",
        }
    return WorkflowPlan.model_validate(
        {
            "workflow_id": "wf",
            "name": "approval",
            "version": "1",
            "start_step": "review" if first else "write",
            "steps": steps,
        }
    )


def reviewing(prompt: JsonValue = "Publish ${workflow.input.text}?", **fields: Any) -> RunState:
    return start(approval_plan(prompt, **fields))


def map_plan() -> WorkflowPlan:
    return WorkflowPlan.model_validate(
        {
            "workflow_id": "wf",
            "name": "map",
            "version": "1",
            "start_step": "m",
            "steps": {
                "m": {
                    "id": "m",
                    "agent_name": "asker",
                    "map": {"over": ["a", "b", "c"], "max_concurrency": 3},
                    "input_mapping": {"d": "${map.item}"},
                    "timeout_s": CALL_TIMEOUT_S,
                }
            },
        }
    )


# ------------------------------------------------------------ agent questions


def test_an_agent_question_leaves_the_attempt_waiting_under_the_input_deadline() -> None:
    state = running()
    state, effects = changed(state, asks(state, at(1), data={"choices": ["red", "blue"]}))

    assert state.status is RunStatus.RUNNING
    assert state.steps["s1"].status is StepStatus.RUNNING
    execution = current(state)
    attempt = execution.current
    assert attempt is not None
    assert execution.status is StepStatus.WAITING
    assert attempt.status is StepStatus.WAITING
    assert state.waiting == 1
    assert state.waiting_executions() == [execution]
    assert (attempt.task_id, attempt.context_id) == (TASK_ID, CONTEXT_ID)
    assert attempt.turn == 0
    (exchange,) = attempt.exchanges
    assert attempt.question == exchange
    assert exchange.question.text == "which colour?"
    assert exchange.question.data == {"choices": ["red", "blue"]}
    assert exchange.asked_at == at(1)
    assert exchange.answer is None
    deadline = at(1) + secs(DEFAULT_INPUT_TIMEOUT_S)
    assert attempt.deadline == deadline
    assert of_type(effects, ScheduleTimeout) == [ScheduleTimeout(run_id=RUN_ID, step_id="s1", attempt=1, at=deadline)]
    assert not of_type(effects, DispatchTask)
    assert not of_type(effects, RunFinished)
    (waiting,) = [e.update for e in of_type(effects, PublishMonitoring) if e.update.status == StepStatus.WAITING]
    assert waiting.step_id == "s1"
    assert waiting.detail["question"] == "which colour?"
    assert waiting.detail["turn"] == 0


@pytest.mark.parametrize(
    ("step_s", "agent_s", "global_s", "expected"),
    [
        (60.0, 120.0, 240.0, 60.0),
        (None, 120.0, 240.0, 120.0),
        (None, None, 240.0, 240.0),
    ],
    ids=["the step's", "the agent's", "the run's default"],
)
def test_the_input_deadline_comes_from_the_step_then_the_agent_then_the_default(
    step_s: float | None, agent_s: float | None, global_s: float, expected: float
) -> None:
    overrides = {"s1": {"input_timeout_s": step_s}} if step_s is not None else {}
    plan = make_plan(1, timeout_s=CALL_TIMEOUT_S, overrides=overrides)
    agents = {"agent-s1": AgentPolicy(input_timeout_s=agent_s)} if agent_s is not None else {}
    state = start(plan, defaults=ExecutionDefaults(input_timeout_s=global_s, agents=agents))
    state, effects = changed(state, asks(state, at(5)))
    attempt = current(state).current
    assert attempt is not None
    assert attempt.deadline == at(5 + expected)
    assert [t.at for t in of_type(effects, ScheduleTimeout)] == [at(5 + expected)]


@pytest.mark.parametrize("status", list(ResultStatus))
def test_a_waiting_attempt_ignores_any_result(status: ResultStatus) -> None:
    state = asked()
    unchanged(state, agent_result(state, at(2), status=status))
    unchanged(state, agent_result(state, at(2), status=status, turn=1))


def test_an_answer_carries_the_call_on_as_its_next_turn() -> None:
    state = asked()
    before = current(state).current
    assert before is not None
    state, effects = changed(state, answer(at(10), text="blue", data={"hex": "#00f"}))

    execution = current(state)
    attempt = execution.current
    assert attempt is not None
    assert execution.status is StepStatus.RUNNING
    assert attempt.status is StepStatus.RUNNING
    assert state.waiting == 0
    assert attempt.turn == 1
    assert attempt.question is None
    (exchange,) = attempt.exchanges
    assert exchange.answer is not None
    assert (exchange.answer.answer_id, exchange.answer.text, exchange.answer.data) == (
        "answer-1",
        "blue",
        {"hex": "#00f"},
    )
    assert exchange.answered_at == at(10)
    assert attempt.deadline == at(10 + CALL_TIMEOUT_S), "a fresh call deadline"
    (dispatch,) = of_type(effects, DispatchTask)
    task = dispatch.task
    assert dispatch.not_before is None
    assert (task.correlation_id, task.attempt, task.turn) == (before.correlation_id, 1, 1)
    assert task.call_id == f"{before.correlation_id}#1"
    assert task.input == before.input
    assert task.deadline == attempt.deadline
    assert task.reply is not None
    assert (task.reply.task_id, task.reply.context_id) == (TASK_ID, CONTEXT_ID)
    assert (task.reply.text, task.reply.data) == ("blue", {"hex": "#00f"})
    assert of_type(effects, ScheduleTimeout) == [
        ScheduleTimeout(run_id=RUN_ID, step_id="s1", attempt=1, at=at(10 + CALL_TIMEOUT_S))
    ]
    assert "ANSWERED" in statuses(effects)


def test_the_call_deadline_comes_from_the_agent_then_the_default_after_an_answer() -> None:
    plan = make_plan(1)
    state = start(plan, defaults=ExecutionDefaults(timeout_s=50, agents={"agent-s1": AgentPolicy(timeout_s=7)}))
    state, _ = changed(state, asks(state, at(1)))
    state, _ = changed(state, answer(at(100)))
    attempt = current(state).current
    assert attempt is not None
    assert attempt.deadline == at(107)

    state = start(plan, defaults=ExecutionDefaults(timeout_s=50))
    state, _ = changed(state, asks(state, at(1)))
    state, _ = changed(state, answer(at(100)))
    attempt = current(state).current
    assert attempt is not None
    assert attempt.deadline == at(150)


def test_the_same_answer_delivered_again_changes_nothing() -> None:
    state = answered()
    unchanged(state, answer(at(3)))
    unchanged(state, answer(at(3), text="something else, same id"))


def test_a_second_different_answer_to_an_answered_question_is_refused() -> None:
    state = answered()
    reason = refused(state, answer(at(3), answer_id="answer-2", text="red"))
    assert reason.startswith("answer refused:")
    assert "'s1'" in reason
    assert RUN_ID in reason


def test_an_answer_to_a_question_not_asked_yet_is_refused() -> None:
    state = asked()
    reason = refused(state, answer(at(3), turn=1))
    assert reason.startswith("answer refused:")
    assert "'s1'" in reason
    assert "question 1 waits" in reason


def test_a_different_answer_to_the_first_question_while_the_second_waits_is_refused() -> None:
    state = asked_twice()
    reason = refused(state, answer(at(4), turn=0, answer_id="late", text="red"))
    assert reason.startswith("answer refused:")
    assert "question 1 was answered already; question 2 waits" in reason


@pytest.mark.parametrize(
    ("scenario", "step_id", "expected"),
    [
        ("running", "s1", "is not waiting for input (it is RUNNING)"),
        ("running", "s2", "is not waiting for input (it has not started)"),
        ("running", "nope", "has no step 'nope'"),
        ("completed", "s1", "the run is COMPLETED (only a RUNNING run waits for input)"),
        ("cancelled", "s1", "the run is CANCELLED (only a RUNNING run waits for input)"),
    ],
)
def test_an_answer_to_a_run_or_step_that_does_not_wait_is_dead_lettered(
    scenario: str, step_id: str, expected: str
) -> None:
    state = running()
    if scenario == "completed":
        state, _ = changed(state, succeeds(state, at(1)))
        state, _ = changed(state, succeeds(state, at(2), step_id="s2"))
        assert state.status is RunStatus.COMPLETED
    elif scenario == "cancelled":
        state, _ = changed(state, asks(state, at(1)))
        state, _ = changed(state, CancelRequested(run_id=RUN_ID, at=at(2)))
    reason = refused(state, answer(at(3), step_id=step_id))
    assert reason.startswith("answer refused:")
    assert expected in reason
    assert RUN_ID in reason


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"decision": "approve"}, "not a decision"),
        ({"text": None}, "needs text or data"),
        ({"text": ""}, "needs text or data"),
    ],
    ids=["a decision", "nothing", "empty text"],
)
def test_an_answer_of_the_wrong_form_for_a_question_is_refused(fields: dict[str, Any], expected: str) -> None:
    state = asked()
    reason = refused(state, answer(at(2), **fields))
    assert reason.startswith("answer refused:")
    assert expected in reason
    assert "'s1'" in reason


def test_an_answer_of_data_alone_is_an_answer() -> None:
    state = asked()
    state, effects = changed(state, answer(at(2), text=None, data=[1, 2]))
    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.task.reply is not None
    assert (dispatch.task.reply.text, dispatch.task.reply.data) == (None, [1, 2])


def test_after_an_answer_only_a_result_of_the_new_turn_counts() -> None:
    state = answered()
    for status in ResultStatus:
        unchanged(state, agent_result(state, at(3), status=status, turn=0))
    state, effects = changed(state, succeeds(state, at(4), turn=1, output={"summary": "blue it is"}))
    assert current(state).status is StepStatus.COMPLETED
    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.task.step_id == "s2"
    assert dispatch.task.input == {"previous": "blue it is", "topic": "hello"}
    assert dispatch.task.turn == 0


def test_an_agent_may_ask_again_and_the_next_answer_is_its_second_turn() -> None:
    state = asked_twice()
    attempt = current(state).current
    assert attempt is not None
    assert current(state).status is StepStatus.WAITING
    assert state.waiting == 1
    assert attempt.turn == 1
    assert [e.question.text for e in attempt.exchanges] == ["which colour?", "which shade?"]
    assert attempt.question == attempt.exchanges[1]
    assert attempt.deadline == at(3) + secs(DEFAULT_INPUT_TIMEOUT_S)

    unchanged(state, asks(state, at(4), turn=1, text="which shade?"))  # the same question again
    state, effects = changed(state, answer(at(5), turn=1, answer_id="answer-2", text="navy"))
    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.task.turn == 2
    assert dispatch.task.reply is not None
    assert (dispatch.task.reply.task_id, dispatch.task.reply.text) == (TASK_ID, "navy")
    assert dispatch.task.call_id.endswith("#2")

    unchanged(state, succeeds(state, at(6), turn=1))
    state, effects = changed(state, succeeds(state, at(6), turn=2))
    assert current(state).status is StepStatus.COMPLETED
    done = current(state).current
    assert done is not None
    assert [e.answer.text for e in done.exchanges if e.answer is not None] == ["blue", "navy"]
    assert [t.task.step_id for t in of_type(effects, DispatchTask)] == ["s2"]


def test_the_first_answer_delivered_again_while_the_second_question_waits_changes_nothing() -> None:
    state = asked_twice()
    unchanged(state, answer(at(4), turn=0))  # "answer-1" again, exactly as it was given


def test_an_answer_to_an_earlier_attempt_delivered_again_changes_nothing() -> None:
    state = answered()
    state, _ = changed(state, fails(state, at(3)))  # retriable: attempt 2 at once
    assert [a.number for a in current(state).attempts] == [1, 2]
    state, _ = changed(state, asks(state, at(4), task_id="task-8"))
    unchanged(state, answer(at(5), turn=0))  # attempt 1's "answer-1" again


def test_a_failure_after_an_answer_retries_with_a_fresh_call() -> None:
    state = answered()
    state, effects = changed(state, fails(state, at(3), turn=1))
    (dispatch,) = of_type(effects, DispatchTask)
    assert (dispatch.task.attempt, dispatch.task.turn, dispatch.task.reply) == (2, 0, None)
    attempt = current(state).current
    assert attempt is not None
    assert (attempt.exchanges, attempt.task_id) == ((), None)


# -------------------------------------------------------------- input timeout


def test_a_timeout_before_the_input_deadline_changes_nothing() -> None:
    state = asked()
    attempt = current(state).current
    assert attempt is not None
    unchanged(state, timed_out(state, at(CALL_TIMEOUT_S)))  # the call's own deadline, scheduled before it asked
    unchanged(state, timed_out(state, attempt.deadline - secs(1)))


def test_no_answer_in_time_fails_the_step_and_cancels_the_agent_task() -> None:
    state = asked()
    attempt = current(state).current
    assert attempt is not None
    state, effects = changed(state, timed_out(state, attempt.deadline))

    (cancel,) = of_type(effects, CancelAgentTask)
    assert (cancel.step_id, cancel.attempt, cancel.task_id) == ("s1", 1, TASK_ID)
    assert cancel.correlation_id == attempt.correlation_id
    assert cancel.agent_name == "agent-s1"
    assert not of_type(effects, DispatchTask), "an input timeout is not retried"
    execution = current(state)
    failed = execution.current
    assert failed is not None
    assert failed.status is StepStatus.FAILED
    assert failed.error is not None
    assert failed.error.kind == ErrorKind.INPUT_TIMEOUT
    assert "agent 'agent-s1'" in failed.error.message
    assert execution.status is StepStatus.FAILED
    assert state.steps["s1"].status is StepStatus.FAILED
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.kind == ErrorKind.INPUT_TIMEOUT
    assert state.error.step_id == "s1"
    assert state.waiting == 0
    (finished,) = of_type(effects, RunFinished)
    assert finished.status is RunStatus.FAILED


def test_a_late_answer_after_the_input_timeout_is_refused() -> None:
    state = asked()
    attempt = current(state).current
    assert attempt is not None
    state, _ = changed(state, timed_out(state, attempt.deadline + secs(5)))
    assert refused(state, answer(attempt.deadline + secs(6))).startswith("answer refused:")
    unchanged(state, timed_out(state, attempt.deadline + secs(7)))


def test_an_input_timeout_follows_the_agents_recovery_policy_skip() -> None:
    skip = RecoveryPolicy(action=RecoveryAction.SKIP, default_output={"summary": "nobody answered"})
    state = asked(defaults=ExecutionDefaults(agents={"agent-s1": AgentPolicy(recovery=skip)}))
    attempt = current(state).current
    assert attempt is not None
    state, effects = changed(state, timed_out(state, attempt.deadline))
    assert current(state).status is StepStatus.SKIPPED
    assert state.status is RunStatus.RUNNING
    assert state.waiting == 0
    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.task.step_id == "s2"
    assert dispatch.task.input == {"previous": "nobody answered", "topic": "hello"}


def test_an_input_timeout_follows_the_agents_recovery_policy_fallback() -> None:
    fallback = RecoveryPolicy(action=RecoveryAction.FALLBACK, fallback_agent="agent-backup")
    state = asked(defaults=ExecutionDefaults(agents={"agent-s1": AgentPolicy(recovery=fallback)}))
    attempt = current(state).current
    assert attempt is not None
    state, effects = changed(state, timed_out(state, attempt.deadline))
    assert of_type(effects, CancelAgentTask)[0].task_id == TASK_ID
    (dispatch,) = of_type(effects, DispatchTask)
    assert (dispatch.task.agent_name, dispatch.task.attempt, dispatch.task.turn) == ("agent-backup", 2, 0)
    assert current(state).status is StepStatus.RUNNING
    assert state.waiting == 0


def test_after_an_answer_the_call_deadline_applies_again() -> None:
    state = answered()
    attempt = current(state).current
    assert attempt is not None
    unchanged(state, timed_out(state, attempt.deadline - secs(1)))
    state, effects = changed(state, timed_out(state, attempt.deadline))
    failed = current(state).attempts[0]
    assert failed.error is not None
    assert failed.error.kind == ErrorKind.TIMEOUT
    (cancel,) = of_type(effects, CancelAgentTask)
    assert cancel.task_id == TASK_ID
    assert [d.task.attempt for d in of_type(effects, DispatchTask)] == [2], "a call timeout is retried"


# --------------------------------------------------------- resume and cancel


def test_resume_does_not_dispatch_a_waiting_attempt_and_schedules_its_input_deadline() -> None:
    state = asked()
    attempt = current(state).current
    assert attempt is not None
    effects = resume(state, at(10))
    assert not of_type(effects, DispatchTask)
    assert of_type(effects, ScheduleTimeout) == [
        ScheduleTimeout(run_id=RUN_ID, step_id="s1", attempt=1, at=attempt.deadline)
    ]
    late = attempt.deadline + secs(100)
    (timeout,) = of_type(resume(state, late, grace_s=5), ScheduleTimeout)
    assert timeout.at == late + secs(5)


def test_resume_of_an_answered_attempt_sends_the_same_turn_and_reply() -> None:
    state = asked()
    state, answer_effects = changed(state, answer(at(2)))
    (sent,) = of_type(answer_effects, DispatchTask)
    effects = resume(state, at(3))
    (again,) = of_type(effects, DispatchTask)
    assert again.task == sent.task
    assert again.task.call_id == sent.task.call_id
    assert [t.at for t in of_type(effects, ScheduleTimeout)] == [at(2 + CALL_TIMEOUT_S)]

    state = asked_twice()
    state, answer_effects = changed(state, answer(at(4), turn=1, answer_id="answer-2", text="navy"))
    (sent,) = of_type(answer_effects, DispatchTask)
    (again,) = of_type(resume(state, at(5)), DispatchTask)
    assert again.task == sent.task
    assert (again.task.turn, again.task.call_id) == (2, sent.task.call_id)


def test_cancelling_a_run_waiting_on_an_agent_cancels_its_task() -> None:
    state = asked()
    assert [c.task_id for c in cancel_in_flight(state, at(2))] == [TASK_ID]
    state, effects = changed(state, CancelRequested(run_id=RUN_ID, at=at(2)))
    (cancel,) = of_type(effects, CancelAgentTask)
    assert (cancel.step_id, cancel.attempt, cancel.task_id) == ("s1", 1, TASK_ID)
    assert state.status is RunStatus.CANCELLED
    assert state.waiting == 0
    assert current(state).status is StepStatus.CANCELLED
    attempt = current(state).current
    assert attempt is not None
    assert attempt.status is StepStatus.CANCELLED
    assert cancel_in_flight(state, at(3)) == []
    assert resume(state, at(3)) == []


def test_a_question_in_a_finished_branch_of_a_failed_run_stops_waiting() -> None:
    """A parallel branch fails while another branch waits: the waiting execution is cancelled with the run."""
    plan = WorkflowPlan.model_validate(
        {
            "workflow_id": "wf",
            "name": "fork",
            "version": "1",
            "start_step": "a",
            "steps": {
                "a": {"id": "a", "agent_name": "agent-a", "next_step": ["b", "c"]},
                "b": {"id": "b", "agent_name": "agent-b", "retry": {"max_attempts": 1}},
                "c": {"id": "c", "agent_name": "agent-c", "retry": {"max_attempts": 1}},
            },
        }
    )
    state = start(plan)
    state, _ = changed(state, succeeds(state, at(1), step_id="a"))
    state, _ = changed(state, asks(state, at(2), step_id="b"))
    assert state.waiting == 1
    state, effects = changed(state, fails(state, at(3), step_id="c"))
    assert state.status is RunStatus.FAILED
    assert state.waiting == 0
    assert current(state, "b").status is StepStatus.CANCELLED
    assert [c.task_id for c in of_type(effects, CancelAgentTask)] == [TASK_ID]


# ------------------------------------------------------------------ approvals


def test_an_approval_step_waits_for_a_decision_at_once_without_calling_an_agent() -> None:
    plan = approval_plan(input_timeout_s=600)
    state, effects = step(None, submitted(plan))
    assert state.version == 1
    assert_waiting_count(state)
    assert not of_type(effects, DispatchTask)
    execution = current(state, "review")
    attempt = execution.current
    assert attempt is not None
    assert execution.status is StepStatus.WAITING
    assert attempt.status is StepStatus.WAITING
    assert attempt.agent_name == APPROVAL_AGENT
    assert state.waiting == 1
    assert state.status is RunStatus.RUNNING
    (exchange,) = attempt.exchanges
    assert (exchange.question.text, exchange.question.data) == ("Publish hello?", None)
    assert attempt.deadline == at(600)
    assert of_type(effects, ScheduleTimeout) == [
        ScheduleTimeout(run_id=RUN_ID, step_id="review", attempt=1, at=at(600))
    ]
    waiting = [e.update for e in of_type(effects, PublishMonitoring) if e.update.status == StepStatus.WAITING]
    assert [w.detail["question"] for w in waiting] == ["Publish hello?"]
    assert cancel_in_flight(state, at(1)) == [], "an approval has no call to cancel"


def test_an_approval_prompt_object_is_the_questions_data() -> None:
    state = reviewing({"title": "${workflow.input.text}", "pages": 3})
    attempt = current(state, "review").current
    assert attempt is not None
    (exchange,) = attempt.exchanges
    assert (exchange.question.text, exchange.question.data) == ("", {"title": "hello", "pages": 3})


def test_an_approval_after_a_step_reads_its_output_in_the_prompt() -> None:
    state = start(approval_plan("Publish ${write.output.summary}?", first=False))
    assert state.waiting == 0
    state, effects = changed(state, succeeds(state, at(1), step_id="write", output={"summary": "the draft"}))
    assert not of_type(effects, DispatchTask)
    assert state.waiting == 1
    attempt = current(state, "review").current
    assert attempt is not None
    assert attempt.exchanges[0].question.text == "Publish the draft?"
    assert attempt.deadline == at(1) + secs(DEFAULT_INPUT_TIMEOUT_S)


def test_approving_completes_the_step_and_takes_the_approved_route() -> None:
    state = reviewing()
    state, effects = changed(state, decide(at(5), "approve", text="ship it", data={"note": 1}))
    review = current(state, "review")
    assert review.status is StepStatus.COMPLETED
    assert review.output == {"approved": True, "decision": "approve", "text": "ship it", "data": {"note": 1}}
    assert state.output_of("review") == review.output
    assert state.waiting == 0
    assert state.steps["discard"].status is StepStatus.SKIPPED
    (dispatch,) = of_type(effects, DispatchTask)
    assert (dispatch.task.step_id, dispatch.task.agent_name, dispatch.task.input) == (
        "publish",
        "publisher",
        {"n": "ship it"},
    )
    assert "ANSWERED" in statuses(effects)
    attempt = review.current
    assert attempt is not None
    assert attempt.exchanges[0].answer is not None
    assert attempt.exchanges[0].answer.decision == "approve"


def test_rejecting_by_default_completes_the_step_unapproved_and_its_route_is_taken() -> None:
    state = reviewing()
    state, effects = changed(state, decide(at(5), "reject", text="not yet"))
    review = current(state, "review")
    assert review.status is StepStatus.COMPLETED
    assert review.output == {"approved": False, "decision": "reject", "text": "not yet", "data": None}
    assert state.steps["publish"].status is StepStatus.SKIPPED
    assert [d.task.step_id for d in of_type(effects, DispatchTask)] == ["discard"]
    assert state.status is RunStatus.RUNNING


def test_rejecting_an_approval_that_fails_on_reject_fails_the_run() -> None:
    state = reviewing(on_reject="fail")
    state, effects = changed(state, decide(at(5), "reject", text="too risky"))
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.kind == ErrorKind.REJECTED
    assert state.error.step_id == "review"
    assert "too risky" in state.error.message
    assert current(state, "review").status is StepStatus.FAILED
    assert state.waiting == 0
    assert not of_type(effects, DispatchTask)
    assert not of_type(effects, CancelAgentTask)
    (finished,) = of_type(effects, RunFinished)
    assert finished.error is not None
    assert finished.error.kind == ErrorKind.REJECTED


def test_a_rejected_approval_that_failed_the_run_asks_again_on_retry() -> None:
    state = reviewing(on_reject="fail")
    state, _ = changed(state, decide(at(5), "reject"))
    state, effects = changed(state, RetryRequested(run_id=RUN_ID, at=at(6)))
    assert state.status is RunStatus.RUNNING
    assert state.waiting == 1
    execution = current(state, "review")
    assert [a.status for a in execution.attempts] == [StepStatus.FAILED, StepStatus.WAITING]
    assert not of_type(effects, DispatchTask)
    state, _ = changed(state, answer(at(7), step_id="review", decision="approve", answer_id="second", text=None))
    assert current(state, "review").output == {"approved": True, "decision": "approve", "text": None, "data": None}


@pytest.mark.parametrize(
    ("default", "approved", "next_step"), [("approve", True, "publish"), ("reject", False, "discard")]
)
def test_an_approval_without_a_decision_in_time_takes_its_default_decision(
    default: str, approved: bool, next_step: str
) -> None:
    state = reviewing(default_decision=default, input_timeout_s=60)
    unchanged(state, timed_out(state, at(59), step_id="review"))
    state, effects = changed(state, timed_out(state, at(60), step_id="review"))
    review = current(state, "review")
    assert review.status is StepStatus.COMPLETED
    assert as_dict(review.output)["approved"] is approved
    assert as_dict(review.output)["decision"] == default
    attempt = review.current
    assert attempt is not None
    given_answer = attempt.exchanges[0].answer
    assert given_answer is not None
    assert (given_answer.decision, given_answer.source) == (default, "timeout")
    assert [d.task.step_id for d in of_type(effects, DispatchTask)] == [next_step]
    assert not of_type(effects, CancelAgentTask)
    answered_update = [e.update for e in of_type(effects, PublishMonitoring) if e.update.status == "ANSWERED"]
    assert [u.detail["source"] for u in answered_update] == ["timeout"]
    assert refused(state, decide(at(61), "approve")).startswith("answer refused:")


def test_a_default_reject_of_an_approval_that_fails_on_reject_fails_the_run() -> None:
    state = reviewing(default_decision="reject", on_reject="fail", input_timeout_s=60)
    state, _ = changed(state, timed_out(state, at(60), step_id="review"))
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.kind == ErrorKind.REJECTED


def test_an_approval_without_a_decision_or_default_in_time_fails_the_run() -> None:
    state = reviewing(input_timeout_s=60)
    state, effects = changed(state, timed_out(state, at(60), step_id="review"))
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.kind == ErrorKind.INPUT_TIMEOUT
    assert state.error.step_id == "review"
    assert "the approval" in state.error.message
    assert not of_type(effects, CancelAgentTask), "an approval has no agent task"
    assert state.waiting == 0


def test_the_same_decision_again_changes_nothing_and_another_is_refused() -> None:
    state = reviewing()
    state, _ = changed(state, decide(at(5), "approve"))
    unchanged(state, decide(at(6), "approve"))
    reason = refused(state, decide(at(6), "reject"))
    assert reason.startswith("answer refused:")
    assert "'review'" in reason


def test_an_approval_needs_a_decision() -> None:
    state = reviewing()
    reason = refused(state, answer(at(5), step_id="review", text="yes please"))
    assert reason.startswith("answer refused:")
    assert "step 'review' is an approval" in reason


def test_an_approval_ignores_agent_results() -> None:
    state = reviewing()
    execution = current(state, "review")
    attempt = execution.current
    assert attempt is not None
    stray = AgentResultReceived(
        result=AgentResult(
            correlation_id=attempt.correlation_id,
            run_id=RUN_ID,
            step_id="review",
            attempt=1,
            status=ResultStatus.SUCCESS,
            output={"approved": True},
            started_at=at(1),
            finished_at=at(1),
        ),
        at=at(1),
    )
    unchanged(state, stray)


def test_an_approval_prompt_that_cannot_be_mapped_fails_the_step() -> None:
    state = reviewing("Publish ${workflow.input.missing}?")
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.kind == ErrorKind.MAPPING_ERROR
    assert state.error.step_id == "review"
    assert state.waiting == 0
    assert current(state, "review").status is StepStatus.FAILED


def test_cancelling_a_run_waiting_on_an_approval_cancels_no_agent_task() -> None:
    state = reviewing()
    state, effects = changed(state, CancelRequested(run_id=RUN_ID, at=at(5)))
    assert not of_type(effects, CancelAgentTask)
    assert state.status is RunStatus.CANCELLED
    assert state.waiting == 0
    assert current(state, "review").status is StepStatus.CANCELLED


def test_resume_of_a_waiting_approval_only_schedules_its_deadline() -> None:
    state = reviewing(input_timeout_s=600)
    effects = resume(state, at(10))
    assert effects == [ScheduleTimeout(run_id=RUN_ID, step_id="review", attempt=1, at=at(600))]


# ------------------------------------------------------------------------ maps


def test_each_item_of_a_map_waits_on_its_own() -> None:
    state = start(map_plan())
    for item in (0, 1):
        state, _ = changed(state, asks(state, at(1 + item), step_id="m", item=item, task_id=f"task-{item}"))
    assert state.waiting == 2
    assert [e.item for e in state.waiting_executions()] == [0, 1]

    with pytest.raises(InputRefused) as refusal:
        waiting_execution(state, "m")
    message = str(refusal.value)
    assert "2 items of step 'm'" in message
    assert "items 0, 1" in message
    assert RUN_ID in message
    assert not refusal.value.form
    assert waiting_execution(state, "m", item=1).item == 1
    with pytest.raises(InputRefused, match=r"step 'm' item 2 of run 'run-1' is not waiting"):
        waiting_execution(state, "m", item=2)

    assert refused(state, answer(at(3), step_id="m")).startswith("answer refused:"), "an item must be named"
    state, effects = changed(state, answer(at(3), step_id="m", item=1, text="for b"))
    assert state.waiting == 1
    assert current(state, "m", item=0).status is StepStatus.WAITING
    assert current(state, "m", item=1).status is StepStatus.RUNNING
    assert current(state, "m", item=2).status is StepStatus.RUNNING
    (dispatch,) = of_type(effects, DispatchTask)
    assert (dispatch.task.item, dispatch.task.turn) == (1, 1)
    assert dispatch.task.reply is not None
    assert (dispatch.task.reply.task_id, dispatch.task.reply.text) == ("task-1", "for b")
    assert waiting_execution(state, "m").item == 0, "one waits: no need to name it"

    state, _ = changed(state, succeeds(state, at(4), step_id="m", item=1, output="B"))
    state, _ = changed(state, succeeds(state, at(4), step_id="m", item=2, output="C"))
    state, _ = changed(state, answer(at(5), step_id="m", item=0, answer_id="a0", text="for a"))
    state, _ = changed(state, succeeds(state, at(6), step_id="m", item=0, output="A"))
    assert state.status is RunStatus.COMPLETED
    assert state.output == ["A", "B", "C"]


def test_cancelling_a_map_with_waiting_items_cancels_each_task() -> None:
    state = start(map_plan())
    for item in (0, 2):
        state, _ = changed(state, asks(state, at(1), step_id="m", item=item, task_id=f"task-{item}"))
    state, effects = changed(state, CancelRequested(run_id=RUN_ID, at=at(2)))
    assert sorted(c.task_id or "" for c in of_type(effects, CancelAgentTask)) == ["", "task-0", "task-2"]
    assert state.waiting == 0


# ---------------------------------------------------------- models/run_input


def test_waiting_execution_names_the_run_and_the_step_when_it_refuses() -> None:
    state = running()
    cases = [
        ("nope", "run 'run-1' has no step 'nope'"),
        ("s1", "step 's1' of run 'run-1' is not waiting for input (it is RUNNING)"),
        ("s2", "step 's2' of run 'run-1' is not waiting for input (it has not started)"),
    ]
    for step_id, expected in cases:
        with pytest.raises(InputRefused) as refusal:
            waiting_execution(state, step_id)
        assert str(refusal.value) == expected
        assert refusal.value.form is False

    state, _ = changed(state, asks(state, at(1)))
    found = waiting_execution(state, "s1")
    assert found == current(state)
    assert waiting_execution(state, "s1", iteration=1) == found
    with pytest.raises(InputRefused, match="not waiting"):
        waiting_execution(state, "s1", iteration=2)

    state, _ = changed(state, CancelRequested(run_id=RUN_ID, at=at(2)))
    with pytest.raises(InputRefused) as refusal:
        waiting_execution(state, "s1")
    assert str(refusal.value) == (
        "step 's1' of run 'run-1' does not wait for input: the run is CANCELLED (only a RUNNING run waits for input)"
    )


def test_check_answer_asks_a_decision_of_an_approval_and_text_or_data_of_a_question() -> None:
    question_step = make_plan(1).steps["s1"]
    approval_step = approval_plan().steps["review"]

    check_answer(question_step, Answer(text="blue"))
    check_answer(question_step, Answer(data={"a": 1}))
    check_answer(question_step, Answer(data=0))
    check_answer(question_step, Answer(text="", data=False))
    check_answer(approval_step, Answer(decision="approve"))
    check_answer(approval_step, Answer(decision="reject", text="why not", data=[1]))

    wrong = [
        (question_step, Answer(text="blue", decision="approve"), "step 's1' waits for an answer to its agent's"),
        (question_step, Answer(), "an answer to step 's1' needs text or data"),
        (question_step, Answer(text=""), "an answer to step 's1' needs text or data"),
        (approval_step, Answer(text="ok"), "step 'review' is an approval: decide with approve or reject"),
    ]
    for plan_step, wrong_answer, expected in wrong:
        with pytest.raises(InputRefused) as refusal:
            check_answer(plan_step, wrong_answer)
        assert str(refusal.value).startswith(expected)
        assert refusal.value.form is True


def test_answer_refusal_says_why_or_none() -> None:
    state = asked()
    first = Answer(answer_id="answer-1", text="blue")
    assert answer_refusal(state, "s1", 1, None, 0, first) is None
    wrong_turn = answer_refusal(state, "s1", 1, None, 1, first)
    assert wrong_turn is not None
    assert wrong_turn.startswith("step 's1' of run 'run-1': ")
    assert wrong_turn.endswith("question 1 waits")
    assert answer_refusal(state, "s1", 1, None, 0, Answer(decision="reject")) == (
        "step 's1' waits for an answer to its agent's question, not a decision: give text or data"
    )
    assert answer_refusal(state, "s2", 1, None, 0, first) == (
        "step 's2' of run 'run-1' is not waiting for input (it has not started)"
    )
    assert answer_refusal(state, "s1", 2, None, 0, first) == (
        "step 's1' of run 'run-1' is not waiting for input (it is RUNNING)"
    )

    state, _ = changed(state, answer(at(2)))
    assert answered_already(state, "s1", 1, None, "answer-1"), "a repeat is known: the caller ignores it"
    assert not answered_already(state, "s1", 1, None, "answer-2")
    other = answer_refusal(state, "s1", 1, None, 0, Answer(answer_id="answer-2", text="red"))
    assert other == "step 's1' of run 'run-1' is not waiting for input (it is RUNNING)"


def test_answer_refusal_of_a_map_item_not_named() -> None:
    state = start(map_plan())
    state, _ = changed(state, asks(state, at(1), step_id="m", item=1))
    reply = Answer(text="x")
    assert answer_refusal(state, "m", 1, 1, 0, reply) is None
    assert answer_refusal(state, "m", 1, 0, 0, reply) == (
        "step 'm' item 0 of run 'run-1' is not waiting for input (it is RUNNING)"
    )
    assert answer_refusal(state, "m", 1, None, 0, reply) is not None


@pytest.mark.parametrize("case", ["a question not asked yet", "a map item not named"])
def test_answer_refusal_does_not_say_answered_already_when_it_was_not(case: str) -> None:
    if case == "a map item not named":
        state = start(map_plan())
        state, _ = changed(state, asks(state, at(1), step_id="m", item=1))
        why = answer_refusal(state, "m", 1, None, 0, Answer(text="x"))  # item 1 waits at question 1
    else:
        state = asked()
        why = answer_refusal(state, "s1", 1, None, 3, Answer(text="x"))  # question 1 waits; 4 was never asked
    assert why is not None
    assert "answered already" not in why


# ------------------------------------------------------------------ property


@dataclass(frozen=True)
class Ask:
    turn_offset: int


@dataclass(frozen=True)
class Reply:
    new_id: bool
    turn_offset: int


@dataclass(frozen=True)
class Result:
    ok: bool
    turn_offset: int


@dataclass(frozen=True)
class Timeout:
    due: bool


@dataclass(frozen=True)
class Cancel:
    pass


Action = Ask | Reply | Result | Timeout | Cancel

ACTIONS = st.one_of(
    st.builds(Ask, turn_offset=st.sampled_from([0, 0, 0, -1, 1])),
    st.builds(Reply, new_id=st.booleans(), turn_offset=st.sampled_from([0, 0, 0, -1, 1])),
    st.builds(Result, ok=st.booleans(), turn_offset=st.sampled_from([0, 0, -1, 1])),
    st.builds(Timeout, due=st.booleans()),
)


def event_for(state: RunState, action: Action, when: datetime, answers: int) -> Event:
    """The event an action means against the state reached so far (s1's current attempt, at its turn)."""
    attempt = current(state).current
    assert attempt is not None
    turn = attempt.turn
    if isinstance(action, Ask):
        return asks(state, when, turn=max(0, turn + action.turn_offset))
    if isinstance(action, Reply):
        return answer(when, turn=max(0, turn + action.turn_offset), answer_id=f"answer-{answers}", text=f"t{answers}")
    if isinstance(action, Result):
        status = ResultStatus.SUCCESS if action.ok else ResultStatus.FAILURE
        return agent_result(state, when, status=status, turn=max(0, turn + action.turn_offset))
    if isinstance(action, Timeout):
        return timed_out(state, attempt.deadline if action.due else attempt.deadline - secs(1))
    return CancelRequested(run_id=RUN_ID, at=when)


@settings(max_examples=200, deadline=None)
@given(actions=st.lists(ACTIONS, max_size=25), cancel_at=st.none() | st.integers(0, 25))
def test_any_sequence_of_questions_answers_and_results_keeps_the_rules(
    actions: list[Action], cancel_at: int | None
) -> None:
    """The waiting count, the change rules, stale events and finished runs, whatever happens."""
    if cancel_at is not None:
        actions = [*actions[:cancel_at], Cancel(), *actions[cancel_at:]]
    state = start(make_plan(1, timeout_s=CALL_TIMEOUT_S, retry=NO_DELAY))
    answers = 0
    for clock, action in enumerate(actions, start=1):
        if isinstance(action, Reply) and (action.new_id or answers == 0):
            answers += 1
        event = event_for(state, action, at(clock), answers)
        attempt = current(state).current
        assert attempt is not None
        new, effects = transition(state, event)
        assert new is not None
        assert_waiting_count(new)
        if new is state:
            assert effects == [] or (len(effects) == 1 and isinstance(effects[0], DeadLetter | CancelAgentTask)), (
                effects
            )
            for cancel in of_type(effects, CancelAgentTask):  # only a task no attempt holds: a question no one answers
                assert cancel.task_id not in {a.task_id for a in current(state).attempts}, cancel
        else:
            assert_changed(state, new, effects)
        if state.status.finished:
            assert new is state, "a finished run never changes"
        if isinstance(event, AgentResultReceived) and (
            attempt.status is StepStatus.WAITING or event.result.turn != attempt.turn
        ):
            assert new is state
        if isinstance(action, Timeout) and not action.due:
            assert_unchanged(state, new, effects)
        if isinstance(action, Reply) and not action.new_id and attempt.status is not StepStatus.WAITING:
            assert new is state, "a repeat of the last answer changes nothing"
        if new.status is not RunStatus.RUNNING:
            assert new.waiting == 0
            assert resume(new, at(clock)) == []
            assert cancel_in_flight(new, at(clock)) == []
        for effect in of_type(effects, DispatchTask):
            latest = current(new).current
            assert latest is not None
            assert (effect.task.attempt, effect.task.turn) == (latest.number, latest.turn)
            assert (effect.task.reply is not None) == (latest.turn > 0)
        state = new


# ------------------------------------------------------------ orphan questions


def test_a_stale_question_on_a_task_no_attempt_holds_cancels_that_task() -> None:
    """A call made again after a bridge crash starts a new task at the agent; its question has no one to answer it."""
    state = answered()  # the attempt holds task-1 and goes on at turn 1
    held = current(state).current
    assert held is not None
    stale = asks(state, at(3), turn=0, task_id="task-made-again")
    new, effects = transition(state, stale)
    assert new is state
    assert effects == [
        CancelAgentTask(
            run_id=RUN_ID,
            step_id="s1",
            attempt=1,
            iteration=1,
            item=None,
            correlation_id=held.correlation_id,
            agent_name=held.agent_name,
            task_id="task-made-again",
        )
    ]


def test_the_held_tasks_question_delivered_again_asks_for_nothing() -> None:
    state = answered()
    held = current(state).current
    assert held is not None
    unchanged(state, asks(state, at(3), turn=0, task_id=held.task_id))
