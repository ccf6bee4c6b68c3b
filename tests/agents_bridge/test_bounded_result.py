"""agents_bridge.app.bounded: a result too large to publish becomes a final ``output_too_large`` failure."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import JsonValue

from agents_bridge.app import bounded
from models.messages import AgentError, AgentQuestion, AgentResult, ErrorKind, ResultStatus, decode, encode
from switchyard.limits import record_size

LIMIT = 16_384
STARTED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
FINISHED = datetime(2024, 5, 1, 12, 0, 3, tzinfo=UTC)


def success(output: JsonValue, run_id: str = "run-1") -> AgentResult:
    return AgentResult(
        correlation_id=f"{run_id}/s1/2",
        run_id=run_id,
        step_id="s1",
        attempt=2,
        status=ResultStatus.SUCCESS,
        output=output,
        started_at=STARTED,
        finished_at=FINISHED,
    )


def size_of(result: AgentResult) -> int:
    return record_size(result.run_id.encode(), encode(result))


def test_a_result_under_the_limit_is_returned_as_it_is() -> None:
    result = success({"summary": "x" * 1000})
    assert bounded(result, LIMIT) is result


def test_a_result_exactly_at_the_limit_is_returned_as_it_is() -> None:
    base = size_of(success(""))
    result = success("x" * (LIMIT - base))
    assert size_of(result) == LIMIT
    assert bounded(result, LIMIT) is result


def test_a_failure_under_the_limit_is_returned_as_it_is() -> None:
    result = success(None).model_copy(
        update={
            "status": ResultStatus.FAILURE,
            "output": None,
            "error": AgentError(kind="agent_failed", message="no", retriable=True),
        }
    )
    assert bounded(result, LIMIT) is result


@pytest.mark.parametrize("extra", [1, 100, 1_000_000])
def test_a_result_over_the_limit_becomes_a_final_failure(extra: int) -> None:
    base = size_of(success(""))
    result = success("x" * (LIMIT - base + extra))
    size = size_of(result)
    assert size == LIMIT + extra
    bounded_result = bounded(result, LIMIT)
    assert bounded_result.status is ResultStatus.FAILURE
    assert bounded_result.output is None
    error = bounded_result.error
    assert error is not None
    assert error.kind == ErrorKind.OUTPUT_TOO_LARGE
    assert not error.retriable
    assert f"{size} bytes" in error.message
    assert f"{LIMIT} bytes" in error.message
    # It is the same attempt.
    for name in ("correlation_id", "run_id", "step_id", "attempt", "started_at", "finished_at"):
        assert getattr(bounded_result, name) == getattr(result, name)
    # Its own record fits, and it is a valid result (a FAILURE with its error).
    assert size_of(bounded_result) <= LIMIT
    assert decode(AgentResult, encode(bounded_result)) == bounded_result


def question(data: JsonValue, text: str = "which one?") -> AgentResult:
    return success(None).model_copy(
        update={
            "status": ResultStatus.INPUT_REQUIRED,
            "question": AgentQuestion(text=text, data=data, task_id="t-1", context_id="c-1"),
            "turn": 3,
        }
    )


def test_a_question_under_the_limit_is_returned_as_it_is() -> None:
    result = question({"choices": ["a", "b"]})
    assert bounded(result, LIMIT) is result


def test_a_question_over_the_limit_becomes_a_final_failure_of_the_same_turn() -> None:
    result = question({"choices": ["x" * 100] * 1000})
    size = size_of(result)
    assert size > LIMIT
    out = bounded(result, LIMIT)
    assert out.status is ResultStatus.FAILURE
    assert (out.question, out.output, out.turn) == (None, None, 3)
    assert out.error is not None
    assert out.error.kind == ErrorKind.OUTPUT_TOO_LARGE
    assert not out.error.retriable
    assert out.error.message.startswith(f"the agent's question makes a result of {size} bytes")
    assert decode(AgentResult, encode(out)) == out


def test_a_question_that_is_not_text_becomes_a_malformed_response() -> None:
    out = bounded(question({"s": "lone \ud800 surrogate"}), LIMIT)  # from a JSON escape in the agent's answer
    assert out.status is ResultStatus.FAILURE
    assert out.question is None
    assert out.error is not None
    assert out.error.kind == ErrorKind.MALFORMED_RESPONSE
    assert out.error.message.startswith("the agent's question cannot be carried")
    assert decode(AgentResult, encode(out)) == out


def test_the_key_counts_towards_the_limit() -> None:
    run_id = "r" * 128  # the longest run_id
    base = size_of(success("", run_id=run_id))
    value_only = len(encode(success("x" * (LIMIT - base + 1), run_id=run_id)))
    result = success("x" * (LIMIT - base + 1), run_id=run_id)
    assert value_only <= LIMIT  # the value alone fits ...
    assert bounded(result, LIMIT).status is ResultStatus.FAILURE  # ... but not with its key


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 200_000),
    char=st.sampled_from(["x", "é", "😀", '"', "\n"]),
    limit=st.sampled_from([16_384, 50_000, 1_000_000]),
)
def test_what_bounded_returns_always_fits(size: int, char: str, limit: int) -> None:
    result = success({"summary": char * size, "n": size})
    out = bounded(result, limit)
    assert size_of(out) <= limit
    if size_of(result) <= limit:
        assert out is result
    else:
        assert out.status is ResultStatus.FAILURE
        assert out.error is not None
        assert out.error.kind == ErrorKind.OUTPUT_TOO_LARGE
        assert str(size_of(result)) in out.error.message
