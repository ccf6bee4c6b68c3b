"""What both doors for a person's answer check (streams/answers.py), on run states made by the pure state machine.

A waiting run is made as the executor makes it: a plan is submitted, then its
agent's result says ``INPUT_REQUIRED`` with a question (:func:`asked`), or its
approval step waits as soon as it starts. Each refusal is checked for its
status and that its message names what it refuses. The builders and
:class:`StateRepository` (PostgreSQL's checkpoints, faked) serve the HTTP and
CLI tests too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from models.messages import (
    MAX_TEXT_CHARS,
    AgentQuestion,
    AgentResult,
    Answer,
    ControlCommand,
    ControlMessage,
    ResultStatus,
    decode,
    encode,
)
from models.plan import WorkflowPlan
from models.run import AgentResultReceived, CancelRequested, DeadLetter, RunState, RunStatus, StepStatus
from streams.answers import ANSWER_FIELDS, AnswerRefused, answer_from, answer_record
from streams.app import _event_from_control
from switchyard.limits import record_size
from tests.models.run_builders import NO_DELAY, RUN_ID, at, failure, make_plan, result, start, step
from tests.streams.test_web import FakeRepository

LIMIT = 1_000_000

# ------------------------------------------------------------------ builders


def asked(
    state: RunState, step_id: str, seconds: float = 1.0, *, item: int | None = None, text: str = "Which year?"
) -> RunState:
    """``state`` after the agent of ``step_id`` (its current iteration, that item) asks a question."""
    execution = state.execution(step_id, None, item)
    assert execution is not None
    attempt = execution.current
    assert attempt is not None
    question = AgentQuestion(text=text, task_id="t1", context_id="c1")
    got = AgentResult(
        correlation_id=attempt.correlation_id,
        run_id=state.run_id,
        step_id=step_id,
        attempt=attempt.number,
        iteration=execution.iteration,
        item=item,
        status=ResultStatus.INPUT_REQUIRED,
        question=question,
        turn=attempt.turn,
        started_at=at(seconds),
        finished_at=at(seconds),
    )
    new, _ = step(state, AgentResultReceived(result=got, at=at(seconds)))
    return new


def applied(state: RunState, message: ControlMessage) -> tuple[RunState, list[Any]]:
    """``state`` after the executor applies a control message (as it turns one into an event)."""
    new, effects = step(state, _event_from_control(message))
    return new, list(effects)


def waiting(run_id: str = RUN_ID) -> RunState:
    """A run of s1 -> s2 whose s1 agent asks its first question."""
    return asked(start(make_plan(2), run_id=run_id), "s1")


def asked_twice(run_id: str = RUN_ID) -> RunState:
    """The run of :func:`waiting` after its first answer, when the agent asks again (turn 1)."""
    first = waiting(run_id)
    message, _ = answer_record(first, run_id, "s1", Answer(text="1999"), limit=LIMIT)
    answered, _ = applied(first, message)
    return asked(answered, "s1", 3.0, text="Which month?")


APPROVAL_PLAN = WorkflowPlan.model_validate(
    {
        "workflow_id": "ship",
        "name": "ship it",
        "version": "1",
        "start_step": "review",
        "steps": {
            "review": {"id": "review", "approval": {"prompt": "Ship ${workflow.input.x}?"}, "next_step": "ship"},
            "ship": {"id": "ship", "agent_name": "shipper", "next_step": None},
        },
    }
)


def approval(run_id: str = RUN_ID) -> RunState:
    """A run whose approval step ``review`` waits for a decision."""
    return start(APPROVAL_PLAN, run_id=run_id, run_input={"x": "it"})


def mapped(run_id: str = RUN_ID) -> RunState:
    """A run whose map step s1 has two items, both of whose agents ask."""
    plan = make_plan(
        1, overrides={"s1": {"map": {"over": "${workflow.input.items}"}, "input_mapping": {"t": "${map.item}"}}}
    )
    state = start(plan, run_id=run_id, run_input={"items": ["a", "b"]})
    return asked(asked(state, "s1", item=0), "s1", item=1)


def looped(run_id: str = RUN_ID) -> RunState:
    """A one-step loop in its second iteration, whose agent asks."""
    loop = {"back_to": "s1", "while": "${s1.output.n} < 3", "max_iterations": 5}
    state = start(make_plan(1, overrides={"s1": {"loop": loop}}), run_id=run_id)
    state, _ = step(state, result(state, at(1), output={"n": 1}))
    assert state.steps["s1"].iteration == 2
    return asked(state, "s1", 2.0)


@dataclass
class StateRepository(FakeRepository):
    """:class:`FakeRepository` with the checkpoints ``get_state`` reads."""

    states: dict[str, RunState] = field(default_factory=dict)

    def get_state(self, run_id: str) -> RunState | None:
        self._ask(f"get_state {run_id}")
        return self.states.get(run_id)


def refusal(
    state: RunState | None,
    step_id: str,
    answer: Answer,
    *,
    run_id: str = RUN_ID,
    limit: int = LIMIT,
    item: int | None = None,
    iteration: int | None = None,
) -> AnswerRefused:
    with pytest.raises(AnswerRefused) as raised:
        answer_record(state, run_id, step_id, answer, limit=limit, item=item, iteration=iteration)
    return raised.value


# ------------------------------------------------------------------ answer_from


def test_answer_from_takes_the_answers_fields_and_the_source() -> None:
    answer = answer_from({"text": "1999", "data": {"year": 1999}, "decision": "approve"}, "http")
    assert (answer.text, answer.data, answer.decision, answer.source) == ("1999", {"year": 1999}, "approve", "http")
    assert ANSWER_FIELDS == ("text", "data", "decision")


def test_answer_from_names_each_answer_anew_and_takes_nothing_else() -> None:
    given = {"text": "x", "answer_id": "chosen", "source": "forged", "item": 1}
    first, second = answer_from(given, "cli"), answer_from(given, "cli")
    assert first.answer_id != second.answer_id
    assert "chosen" not in (first.answer_id, second.answer_id), "the answer's id is not the client's to pick"
    assert first.source == "cli"


def test_answer_from_of_nothing_is_an_empty_answer() -> None:
    answer = answer_from({}, "http")
    assert (answer.text, answer.data, answer.decision) == (None, None, None)


def test_answer_from_takes_a_text_of_the_longest_length() -> None:
    assert answer_from({"text": "x" * MAX_TEXT_CHARS}, "http").text == "x" * MAX_TEXT_CHARS


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"text": "x" * (MAX_TEXT_CHARS + 1)}, "text: String should have at most 10000 characters"),
        ({"text": 5}, "text: Input should be a valid string"),
        ({"decision": "maybe"}, "decision: Input should be 'approve' or 'reject'"),
        ({"decision": "APPROVE"}, "decision: Input should be 'approve' or 'reject'"),
        ({"data": {1, 2}}, "data"),
    ],
)
def test_answer_from_refuses_a_wrong_field_with_400_naming_it(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(AnswerRefused) as raised:
        answer_from(fields, "http")
    assert raised.value.status == 400
    assert str(raised.value).startswith("invalid answer: ")
    assert named in str(raised.value)
    assert raised.value.details == {}


# ------------------------------------------------------------------ the record


def test_the_record_names_the_waiting_attempt_and_its_question() -> None:
    state = waiting()
    answer = Answer(text="1999", source="http")
    message, value = answer_record(state, RUN_ID, "s1", answer, limit=LIMIT)
    assert message.run_id == RUN_ID
    assert message.command is ControlCommand.INPUT
    assert (message.step_id, message.attempt, message.iteration, message.item) == ("s1", 1, 1, None)
    assert message.turn == 0
    assert message.answer == answer
    assert message.reason is None
    assert value == encode(message)
    assert decode(ControlMessage, value) == message


def test_the_record_decodes_back_within_the_limit_it_was_checked_against() -> None:
    message, value = answer_record(waiting(), RUN_ID, "s1", Answer(data=[1, {"a": None}]), limit=LIMIT)
    assert decode(ControlMessage, value, max_bytes=LIMIT) == message


def test_after_a_first_answer_the_agents_next_question_is_turn_1() -> None:
    state = asked_twice()
    execution = state.execution("s1")
    assert execution is not None
    assert execution.current is not None
    assert [e.question.text for e in execution.current.exchanges] == ["Which year?", "Which month?"]
    message, _ = answer_record(state, RUN_ID, "s1", Answer(text="May"), limit=LIMIT)
    assert (message.attempt, message.turn) == (1, 1)


def test_the_record_names_the_attempt_that_waits_after_a_retry() -> None:
    state = start(make_plan(1, retry=NO_DELAY), run_id=RUN_ID)
    state, _ = step(state, failure(state, at(1)))
    execution = state.execution("s1")
    assert execution is not None
    assert execution.current is not None
    assert (execution.current.number, execution.current.status) == (2, StepStatus.RUNNING)
    message, _ = answer_record(asked(state, "s1", 2.0), RUN_ID, "s1", Answer(text="x"), limit=LIMIT)
    assert (message.attempt, message.turn) == (2, 0)


def test_applied_the_record_answers_the_question_and_a_second_one_from_the_same_view_is_refused() -> None:
    state = waiting()
    first, _ = answer_record(state, RUN_ID, "s1", Answer(text="1999"), limit=LIMIT)
    second, _ = answer_record(state, RUN_ID, "s1", Answer(text="2001"), limit=LIMIT)  # read before the first landed
    answered, _ = applied(state, decode(ControlMessage, encode(first)))
    execution = answered.execution("s1")
    assert execution is not None
    assert execution.status is StepStatus.RUNNING
    assert execution.current is not None
    assert execution.current.exchanges[0].answer == first.answer
    again, effects = applied(answered, second)
    assert again is answered
    (dead,) = effects
    assert isinstance(dead, DeadLetter)
    assert "answer refused" in dead.reason
    repeat, effects = applied(answered, first)
    assert (repeat, effects) == (answered, []), "the same answer delivered twice is applied once"


def test_an_approval_takes_a_decision_with_optional_text_and_data() -> None:
    state = approval()
    (execution,) = state.waiting_executions()
    assert execution.current is not None
    assert execution.current.exchanges[0].question.text == "Ship it?"
    answer = Answer(decision="reject", text="not yet", data={"after": "friday"})
    message, _ = answer_record(state, RUN_ID, "review", answer, limit=LIMIT)
    assert (message.step_id, message.turn, message.answer) == ("review", 0, answer)
    decided, _ = applied(state, message)
    assert decided.output_of("review") == {
        "approved": False,
        "decision": "reject",
        "text": "not yet",
        "data": {"after": "friday"},
    }


@pytest.mark.parametrize("data", [0, False, "", [], {}, "words", 4.5])
def test_data_that_is_not_null_is_an_answer_even_when_falsy(data: Any) -> None:
    message, _ = answer_record(waiting(), RUN_ID, "s1", Answer(data=data), limit=LIMIT)
    assert message.answer is not None
    assert message.answer.data == data


# ------------------------------------------------------------------ 404 / 409: not waiting


def test_no_run_is_404_naming_it() -> None:
    refused = refusal(None, "s1", Answer(text="x"), run_id="nobody")
    assert (refused.status, str(refused)) == (404, "no run 'nobody'")


def test_no_such_step_is_404_naming_the_run_and_the_step() -> None:
    refused = refusal(waiting(), "s9", Answer(text="x"))
    assert (refused.status, str(refused)) == (404, "run 'run-1' has no step 's9'")


def test_a_step_not_started_yet_is_409() -> None:
    refused = refusal(waiting(), "s2", Answer(text="x"))
    assert (refused.status, str(refused)) == (
        409,
        "step 's2' of run 'run-1' is not waiting for input (it has not started)",
    )


def test_a_running_step_is_409_saying_what_it_does() -> None:
    refused = refusal(start(make_plan(2)), "s1", Answer(text="x"))
    assert (refused.status, str(refused)) == (409, "step 's1' of run 'run-1' is not waiting for input (it is RUNNING)")


def test_a_question_answered_already_is_409() -> None:
    state = waiting()
    message, _ = answer_record(state, RUN_ID, "s1", Answer(text="1999"), limit=LIMIT)
    answered, _ = applied(state, message)
    refused = refusal(answered, "s1", Answer(text="again"))
    assert refused.status == 409
    assert str(refused) == "step 's1' of run 'run-1' is not waiting for input (it is RUNNING)"


def finished(status: RunStatus) -> RunState:
    """A run that waited on s1 and was cancelled, or whose s1 failed for good."""
    if status is RunStatus.CANCELLED:
        state, _ = step(waiting(), CancelRequested(run_id=RUN_ID, at=at(2), reason="stop"))
    else:
        state = start(make_plan(2), run_id=RUN_ID)
        state, _ = step(state, failure(state, at(2), retriable=False))
    assert state.status is status
    return state


@pytest.mark.parametrize("status", [RunStatus.CANCELLED, RunStatus.FAILED])
def test_a_run_that_is_not_running_is_409_naming_it_and_its_status(status: RunStatus) -> None:
    refused = refusal(finished(status), "s1", Answer(text="x"))
    assert refused.status == 409
    assert str(refused) == (
        f"step 's1' of run 'run-1' does not wait for input: the run is {status} (only a RUNNING run waits for input)"
    )


def test_a_run_that_is_not_running_is_refused_naming_the_step_too() -> None:
    assert "'s1'" in str(refusal(finished(RunStatus.CANCELLED), "s1", Answer(text="x")))


def test_an_item_that_does_not_wait_is_409_naming_it() -> None:
    refused = refusal(waiting(), "s1", Answer(text="x"), item=3)
    # "it is" tells the step's status: RUNNING while one of its executions waits.
    assert (refused.status, str(refused)) == (
        409,
        "step 's1' item 3 of run 'run-1' is not waiting for input (it is RUNNING)",
    )


# ------------------------------------------------------------------ maps and loops


def test_two_waiting_items_and_none_named_is_409_listing_them() -> None:
    refused = refusal(mapped(), "s1", Answer(text="x"))
    assert (refused.status, str(refused)) == (
        409,
        "2 items of step 's1' of run 'run-1' wait for input (items 0, 1); name one",
    )


def test_a_named_item_of_two_waiting_is_answered() -> None:
    state = mapped()
    message, _ = answer_record(state, RUN_ID, "s1", Answer(text="b it is"), limit=LIMIT, item=1)
    assert (message.item, message.attempt, message.turn, message.iteration) == (1, 1, 0, 1)
    answered, _ = applied(state, message)
    assert [e.item for e in answered.waiting_executions()] == [0]
    alone, _ = answer_record(answered, RUN_ID, "s1", Answer(text="a"), limit=LIMIT)
    assert alone.item == 0, "once one item waits, it needs no name"
    refused = refusal(answered, "s1", Answer(text="b again"), item=1)
    assert (refused.status, str(refused)) == (
        409,
        "step 's1' item 1 of run 'run-1' is not waiting for input (it is RUNNING)",
    )


def test_a_loop_answers_its_waiting_iteration_by_default() -> None:
    state = looped()
    message, _ = answer_record(state, RUN_ID, "s1", Answer(text="x"), limit=LIMIT)
    assert (message.iteration, message.turn) == (2, 0)
    named, _ = answer_record(state, RUN_ID, "s1", Answer(text="x"), limit=LIMIT, iteration=2)
    assert named.iteration == 2
    refused = refusal(state, "s1", Answer(text="x"), iteration=1)
    assert refused.status == 409
    assert "step 's1' of run 'run-1' is not waiting for input" in str(refused)


# ------------------------------------------------------------------ 400: the answer's form


@pytest.mark.parametrize(
    ("make", "step_id", "answer", "reason"),
    [
        (
            approval,
            "review",
            Answer(text="yes"),
            "step 'review' is an approval: decide with approve or reject (and optional data)",
        ),
        (
            waiting,
            "s1",
            Answer(decision="approve"),
            "step 's1' waits for an answer to its agent's question, not a decision: give text or data",
        ),
        (waiting, "s1", Answer(), "an answer to step 's1' needs text or data"),
        (waiting, "s1", Answer(text=""), "an answer to step 's1' needs text or data"),
        (waiting, "s1", Answer(text="", data=None), "an answer to step 's1' needs text or data"),
    ],
)
def test_an_answer_of_the_wrong_form_is_400_naming_the_step(
    make: Any, step_id: str, answer: Answer, reason: str
) -> None:
    refused = refusal(make(), step_id, answer)
    assert (refused.status, str(refused), refused.details) == (400, reason, {})


def test_not_waiting_is_checked_before_the_form() -> None:
    assert refusal(start(make_plan(1)), "s1", Answer(decision="approve")).status == 409


# ------------------------------------------------------------------ 413: too large


def test_an_answer_whose_record_is_over_the_limit_is_413_with_size_and_limit() -> None:
    state = waiting()
    answer = Answer(data="x" * 20_000)
    refused = refusal(state, "s1", answer, limit=16_384)
    assert refused.status == 413
    size = refused.details["size"]
    assert refused.details == {"size": size, "limit": 16_384}
    assert size > 20_000
    assert str(refused) == (
        f"the answer makes a record of {size} bytes, over the limit of 16384 (SWITCHYARD_MAX_MESSAGE_BYTES)"
    )


def test_the_limit_counts_the_key_and_the_value_and_is_inclusive() -> None:
    state = waiting()
    answer = Answer(data="x" * 20_000)
    _, value = answer_record(state, RUN_ID, "s1", answer, limit=LIMIT)
    size = record_size(RUN_ID.encode(), value)
    assert size == len(RUN_ID) + len(value)
    # The record's time is part of it: a whole second (no fraction) would be 7 bytes shorter, once in a million.
    answer_record(state, RUN_ID, "s1", answer, limit=size)
    assert refusal(state, "s1", answer, limit=size - 8).status == 413


# ------------------------------------------------------------------ values the record cannot carry


def test_a_text_that_is_not_unicode_is_refused_with_400() -> None:
    with pytest.raises(AnswerRefused) as raised:
        answer_from({"text": "caf\udce9"}, "cli")  # what argv bytes that are not UTF-8 become
    assert raised.value.status == 400
    assert "text: Input should be a valid string" in str(raised.value)


def test_data_that_is_not_unicode_is_refused_with_400() -> None:
    with pytest.raises(AnswerRefused) as refused:
        answer_from({"data": {"word": "caf\udce9"}}, "cli")
    assert refused.value.status == 400
    assert refused.value.details == {"path": "$.data.word"}
    assert "lone surrogate" in str(refused.value)


def test_data_with_a_number_out_of_range_is_refused_with_400() -> None:
    with pytest.raises(AnswerRefused) as refused:
        answer_from({"data": json.loads("1e400")}, "cli")  # inf: what the CLI's --data 1e400 gives
    assert refused.value.status == 400
    assert str(refused.value) == "invalid answer: $.data is a number out of range"


def test_text_with_a_nul_is_refused_with_400() -> None:
    with pytest.raises(AnswerRefused) as refused:
        answer_from({"text": "a\x00b"}, "http")
    assert refused.value.details == {"path": "$.text"}
