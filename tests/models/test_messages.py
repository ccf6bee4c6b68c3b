"""Tests for models.messages: wire messages, encode/decode and ids."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from models.messages import (
    RUN_ID_PATTERN,
    SCHEMA_VERSION,
    AgentError,
    AgentResult,
    AgentTask,
    ErrorKind,
    Message,
    MessageDecodeError,
    MonitoringUpdate,
    ResultStatus,
    WorkflowSubmission,
    correlation_id,
    decode,
    encode,
    new_run_id,
    utcnow,
)
from models.plan import STEP_ID_PATTERN, load_plan

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
PLAN_DATA: dict[str, Any] = {
    "workflow_id": "wf",
    "name": "Research",
    "version": "1",
    "start_step": "research",
    "steps": {
        "research": {
            "id": "research",
            "agent_name": "researcher",
            "next_step": "write",
            "input_mapping": {"q": "${workflow.input.topic}"},
        },
        "write": {
            "id": "write",
            "agent_name": "writer",
            "input_mapping": {"notes": "${research.output}"},
            "retry": {"max_attempts": 2},
        },
    },
}


def submission(**changes: Any) -> WorkflowSubmission:
    fields: dict[str, Any] = {
        "run_id": "run-1",
        "plan": load_plan(PLAN_DATA),
        "input": {"topic": "ships", "n": 3, "tags": ["a", "b"], "extra": None},
        "submitted_at": T0,
    }
    return WorkflowSubmission(**{**fields, **changes})


def task(**changes: Any) -> AgentTask:
    fields: dict[str, Any] = {
        "correlation_id": correlation_id("run-1", "research", 1),
        "run_id": "run-1",
        "step_id": "research",
        "attempt": 1,
        "agent_name": "researcher",
        "input": {"q": "ships", "nested": [1, 2.5, True, None, {"k": "v"}]},
        "deadline": T0 + timedelta(seconds=30),
    }
    return AgentTask(**{**fields, **changes})


def result(**changes: Any) -> AgentResult:
    fields: dict[str, Any] = {
        "correlation_id": correlation_id("run-1", "research", 2),
        "run_id": "run-1",
        "step_id": "research",
        "attempt": 2,
        "status": ResultStatus.SUCCESS,
        "output": {"summary": "done", "items": [1, 2]},
        "started_at": T0,
        "finished_at": T0 + timedelta(seconds=2),
    }
    return AgentResult(**{**fields, **changes})


def failure(**changes: Any) -> AgentResult:
    fields: dict[str, Any] = {
        "status": ResultStatus.FAILURE,
        "output": None,
        "error": AgentError(kind=ErrorKind.TIMEOUT, message="took too long", retriable=True),
    }
    return result(**{**fields, **changes})


def update(**changes: Any) -> MonitoringUpdate:
    fields: dict[str, Any] = {
        "run_id": "run-1",
        "step_id": "research",
        "attempt": 1,
        "status": "RUNNING",
        "timestamp": T0,
        "detail": {"agent": "researcher", "n": 1},
    }
    return MonitoringUpdate(**{**fields, **changes})


def wire(message: Message) -> dict[str, Any]:
    """The message as the JSON object that goes on the wire."""
    loaded = json.loads(encode(message))
    assert isinstance(loaded, dict)
    return loaded


def decode_error(message_type: type[Message], raw: Any, **kwargs: Any) -> MessageDecodeError:
    with pytest.raises(MessageDecodeError) as info:
        decode(message_type, raw, **kwargs)
    return info.value


# --- round trips ---------------------------------------------------------------------------------------------------

MESSAGES = [
    pytest.param(submission(), id="submission"),
    pytest.param(submission(input={}), id="submission-empty-input"),
    pytest.param(task(), id="task"),
    pytest.param(task(input="just text"), id="task-text-input"),
    pytest.param(task(input=None), id="task-null-input"),
    pytest.param(result(), id="result-success"),
    pytest.param(result(output=None), id="result-success-null-output"),
    pytest.param(result(output=[1, "two", {"3": [4.5]}]), id="result-success-list-output"),
    pytest.param(failure(), id="result-failure"),
    pytest.param(failure(error=AgentError(kind="custom_kind", message="")), id="result-failure-custom-kind"),
    pytest.param(update(), id="update"),
    pytest.param(MonitoringUpdate(run_id="run-1", status="STARTED", timestamp=T0), id="update-minimal"),
    pytest.param(
        update(timestamp=datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))), id="update-offset"
    ),
    pytest.param(task(input={"text": 'héllo \u2603 "quoted" \n newline'}), id="task-unicode"),
    pytest.param(
        task(iteration=3, item=17, correlation_id=correlation_id("run-1", "research", 1, 3, 17)),
        id="task-in-a-loop-map",
    ),
    pytest.param(result(iteration=2, correlation_id=correlation_id("run-1", "research", 2, 2)), id="result-in-a-loop"),
    pytest.param(update(iteration=1, item=0), id="update-of-an-item"),
]


@pytest.mark.parametrize("message", MESSAGES)
def test_round_trip_preserves_equality(message):
    raw = encode(message)

    assert isinstance(raw, bytes)
    assert decode(type(message), raw) == message
    assert decode(type(message), raw.decode()) == message
    assert decode(type(message), json.loads(raw)) == message


@pytest.mark.parametrize("message", MESSAGES)
def test_schema_version_is_one_on_the_wire(message):
    assert message.schema_version == SCHEMA_VERSION == 1
    assert wire(message)["schema_version"] == 1


def test_encoding_is_deterministic_and_json():
    assert encode(task()) == encode(task())
    assert wire(result())["status"] == "SUCCESS"
    assert wire(failure())["error"] == {"kind": "timeout", "message": "took too long", "retriable": True}
    assert wire(submission())["plan"]["steps"]["write"]["retry"]["max_attempts"] == 2


def test_round_trip_keeps_the_instant_of_offset_datetimes():
    message = update(timestamp=datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))))

    decoded = decode(MonitoringUpdate, encode(message))

    assert decoded.timestamp == T0
    assert decoded.timestamp.utcoffset() == timedelta(hours=2)


def test_missing_schema_version_defaults_to_one():
    data = wire(update())
    del data["schema_version"]

    assert decode(MonitoringUpdate, data) == update()


@pytest.mark.parametrize("message", [task(), result(), failure()], ids=["task", "result", "failure"])
def test_a_message_without_iteration_and_item_is_of_a_plain_step(message):
    # Messages written before plans had loops and maps carry neither field.
    data = _without(message, "iteration", "item")

    decoded = decode(type(message), data)

    assert (decoded.iteration, decoded.item) == (1, None)
    assert decoded == message


def test_monitoring_update_without_iteration_and_item_names_none():
    decoded = decode(MonitoringUpdate, _without(update(), "iteration", "item"))

    assert (decoded.iteration, decoded.item) == (None, None)
    assert decoded == update()


@pytest.mark.parametrize(
    ("field", "value"),
    [("iteration", 0), ("iteration", 1001), ("item", -1)],
    ids=["iteration-0", "iteration-1001", "item-negative"],
)
def test_iteration_and_item_are_bounded(field, value):
    for message in (task(), result()):
        error = decode_error(type(message), _with(message, **{field: value}))
        assert field in str(error)


def test_messages_are_frozen():
    message = task()

    with pytest.raises(ValidationError):
        message.attempt = 2  # type: ignore[misc]


def test_default_timestamps_are_aware_and_recent():
    before = utcnow()
    made = MonitoringUpdate(run_id="r", status="x")
    after = utcnow()

    assert made.timestamp.tzinfo is not None
    assert before <= made.timestamp <= after
    assert before.tzinfo is not None


# --- decode errors -------------------------------------------------------------------------------------------------


def _with(message: Message, **changes: Any) -> dict[str, Any]:
    return {**wire(message), **changes}


def _without(message: Message, *keys: str) -> dict[str, Any]:
    return {k: v for k, v in wire(message).items() if k not in keys}


def _bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("message_type", "raw", "fragments"),
    [
        pytest.param(AgentResult, b"\xff\xfe{}", ["not UTF-8"], id="not-utf8"),
        pytest.param(AgentResult, b'{"run_id": "\xc3"}', ["not UTF-8"], id="truncated-utf8"),
        pytest.param(AgentResult, b"{", ["not valid JSON"], id="unclosed-json"),
        pytest.param(AgentResult, b"", ["not valid JSON"], id="empty"),
        pytest.param(AgentResult, "{'single': 'quotes'}", ["not valid JSON"], id="python-literal"),
        pytest.param(AgentResult, b"[]", ["expected a JSON object, got list"], id="array"),
        pytest.param(AgentTask, b"[1, 2]", ["expected a JSON object, got list"], id="array-of-numbers"),
        pytest.param(AgentResult, b"42", ["expected a JSON object, got int"], id="number"),
        pytest.param(AgentResult, b"null", ["expected a JSON object"], id="null"),
        pytest.param(AgentResult, b'"text"', ["expected a JSON object, got str"], id="string"),
        pytest.param(AgentResult, b"{}", ["$.run_id", "Field required", "$.status", "$.started_at"], id="empty-obj"),
        pytest.param(AgentTask, _bytes(_without(task(), "deadline")), ["$.deadline", "Field required"], id="no-dl"),
        pytest.param(AgentResult, _bytes(_with(result(), attempt="two")), ["$.attempt", "integer"], id="attempt-str"),
        pytest.param(AgentResult, _bytes(_with(result(), attempt=0)), ["$.attempt", "greater than"], id="attempt-0"),
        pytest.param(AgentTask, _bytes(_with(task(), attempt=1.5)), ["$.attempt"], id="attempt-float"),
        pytest.param(AgentResult, _bytes(_with(result(), status="MAYBE")), ["$.status"], id="bad-status"),
        pytest.param(AgentResult, _bytes(_with(result(), step_id="")), ["$.step_id"], id="empty-step-id"),
        pytest.param(AgentTask, _bytes(_with(task(), agent_name=7)), ["$.agent_name", "string"], id="agent-int"),
        pytest.param(
            AgentResult,
            _bytes(_with(failure(), error={"kind": "", "message": "m"})),
            ["$.error.kind"],
            id="empty-error-kind",
        ),
        pytest.param(
            AgentResult,
            _bytes(_with(failure(), error={"kind": "k", "message": "m", "extra": 1})),
            ["$.error.extra", "Extra inputs"],
            id="unknown-error-field",
        ),
        pytest.param(AgentResult, _bytes(_with(result(), bogus=1)), ["$.bogus", "Extra inputs"], id="unknown-field"),
        pytest.param(
            MonitoringUpdate, _bytes(_with(update(), surprise="x")), ["$.surprise", "Extra inputs"], id="update-extra"
        ),
        pytest.param(
            AgentResult, _bytes(_with(result(), schema_version=2)), ["unsupported schema_version 2"], id="version-2"
        ),
        pytest.param(
            AgentTask, _bytes(_with(task(), schema_version=0)), ["unsupported schema_version 0"], id="version-0"
        ),
        pytest.param(
            AgentTask, _bytes(_with(task(), schema_version="1")), ["unsupported schema_version '1'"], id="version-str"
        ),
        pytest.param(
            AgentResult,
            _bytes(_with(result(), started_at="2024-05-01T12:00:00")),
            ["$.started_at", "timezone"],
            id="naive-started-at",
        ),
        pytest.param(
            AgentTask, _bytes(_with(task(), deadline="2024-05-01T12:00:00")), ["$.deadline", "timezone"], id="naive-dl"
        ),
        pytest.param(
            MonitoringUpdate,
            _bytes(_with(update(), timestamp="2024-05-01 12:00")),
            ["$.timestamp", "timezone"],
            id="naive-timestamp",
        ),
        pytest.param(
            WorkflowSubmission,
            _bytes(_with(submission(), submitted_at="2024-05-01T12:00:00")),
            ["$.submitted_at", "timezone"],
            id="naive-submitted-at",
        ),
        pytest.param(
            AgentResult, _bytes(_with(result(), started_at="yesterday")), ["$.started_at"], id="unparseable-datetime"
        ),
        pytest.param(AgentResult, _bytes(_with(result(), run_id="a/b")), ["$.run_id", "pattern"], id="slash-run-id"),
        pytest.param(AgentTask, _bytes(_with(task(), run_id="a b")), ["$.run_id", "pattern"], id="space-run-id"),
        pytest.param(MonitoringUpdate, _bytes(_with(update(), run_id="")), ["$.run_id"], id="empty-run-id"),
        pytest.param(MonitoringUpdate, _bytes(_with(update(), run_id="-x")), ["$.run_id"], id="leading-dash-run-id"),
        pytest.param(MonitoringUpdate, _bytes(_with(update(), run_id="r\n")), ["$.run_id"], id="newline-run-id"),
        pytest.param(MonitoringUpdate, _bytes(_with(update(), run_id="r" * 129)), ["$.run_id"], id="long-run-id"),
        pytest.param(
            WorkflowSubmission, _bytes(_with(submission(), run_id="x/y")), ["$.run_id"], id="submission-run-id"
        ),
        pytest.param(
            AgentResult,
            _bytes(_without(failure(), "error")),
            ["a FAILURE result needs an error"],
            id="failure-without-error",
        ),
        pytest.param(
            AgentResult,
            _bytes(_with(failure(), error=None)),
            ["a FAILURE result needs an error"],
            id="failure-with-null-error",
        ),
        pytest.param(
            AgentResult,
            _bytes(_with(result(), error={"kind": "timeout", "message": "m"})),
            ["a SUCCESS result cannot carry an error"],
            id="success-with-error",
        ),
        pytest.param(
            WorkflowSubmission,
            _bytes(_with(submission(), plan={**PLAN_DATA, "steps": {"a": {"id": "a"}}})),
            ["$.plan.steps.a.agent_name", "Field required"],
            id="submission-plan-missing-field",
        ),
        pytest.param(
            WorkflowSubmission, _bytes(_with(submission(), input=[1])), ["$.input", "dictionary"], id="input-list"
        ),
        pytest.param(AgentResult, b"[" * 100_000, ["nested too deeply"], id="deeply-nested"),
    ],
)
def test_decode_rejects_bad_input(message_type, raw, fragments):
    error = decode_error(message_type, raw)

    assert error.message_type == message_type.__name__
    for fragment in fragments:
        assert fragment in error.reason, error.reason
    assert str(error).startswith(f"cannot decode {message_type.__name__}: ")
    assert isinstance(error, ValueError)


def test_decode_error_names_the_json_path_of_a_list_item():
    data = _with(submission(), plan={**PLAN_DATA, "steps": {**PLAN_DATA["steps"], "write": {"id": "write"}}})

    assert "$.plan.steps.write.agent_name" in decode_error(WorkflowSubmission, data).reason


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"1" * 5000, id="integer-with-5000-digits"),
        pytest.param(b'{"attempt": ' + b"1" * 5000 + b"}", id="field-with-5000-digits"),
        pytest.param("1" * 5000, id="text-integer-with-5000-digits"),
    ],
)
def test_decode_rejects_huge_integer_literals_with_decode_error(raw):
    decode_error(AgentResult, raw)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_decode_rejects_non_json_number_constants(constant):
    # Python's json module accepts these tokens, but they are not JSON (RFC 8259), and
    # encode() would silently turn them into null.
    raw = encode(update()).replace(b'"n":1', b'"n":' + constant.encode())
    assert constant.encode() in raw

    assert "not valid JSON" in decode_error(MonitoringUpdate, raw).reason


def test_max_bytes_rejects_large_payloads():
    raw = encode(result())

    assert decode(AgentResult, raw, max_bytes=len(raw)) == result()
    error = decode_error(AgentResult, raw, max_bytes=len(raw) - 1)
    assert f"payload of {len(raw)} bytes is over the limit of {len(raw) - 1}" in error.reason


def test_max_bytes_counts_utf8_bytes_of_text():
    text = encode(task(input="ü" * 50)).decode()

    limit = len(text.encode())
    assert decode(AgentTask, text, max_bytes=limit) == task(input="ü" * 50)
    assert "over the limit" in decode_error(AgentTask, text, max_bytes=limit - 1).reason
    # Counting characters instead of bytes would let this one through.
    assert len(text) < limit - 1


def test_max_bytes_is_checked_before_parsing():
    assert "over the limit" in decode_error(AgentResult, b"\xff" * 100, max_bytes=10).reason


def test_decode_does_not_check_plan_semantics():
    # The submission carries the plan's structure; check_plan runs in the executor, not in decode.
    cyclic = {
        **PLAN_DATA,
        "steps": {**PLAN_DATA["steps"], "write": {"id": "write", "agent_name": "w", "next_step": "research"}},
    }

    decoded = decode(WorkflowSubmission, _with(submission(), plan=cyclic))

    assert decoded.plan.steps["write"].next_step == "research"


# --- properties: decode raises only MessageDecodeError ---------------------------------------------------------------

_json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=10),
        st.sampled_from(["2024-05-01T12:00:00Z", "2024-05-01T12:00:00", "run-1", "SUCCESS", "FAILURE", ""]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        _json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(sorted(AgentResult.model_fields)), _json_values, max_size=10).map(
            lambda d: json.dumps(d).encode()
        ),
    )
)
def test_decode_result_from_arbitrary_bytes_raises_only_decode_error(raw):
    try:
        decoded = decode(AgentResult, raw)
    except MessageDecodeError:
        return
    assert isinstance(decoded, AgentResult)


_SUBMISSION_WIRE = wire(submission())


def _submission_variants() -> st.SearchStrategy[dict[str, Any]]:
    arbitrary = st.dictionaries(
        st.one_of(st.sampled_from(sorted(WorkflowSubmission.model_fields)), st.text(max_size=8)),
        _json_values,
        max_size=6,
    )
    # A valid submission with one top-level field (or one plan field) replaced by arbitrary JSON.
    replaced_top = st.tuples(st.sampled_from(sorted(_SUBMISSION_WIRE)), _json_values).map(
        lambda kv: {**_SUBMISSION_WIRE, kv[0]: kv[1]}
    )
    replaced_plan = st.tuples(st.sampled_from(sorted(_SUBMISSION_WIRE["plan"])), _json_values).map(
        lambda kv: {**_SUBMISSION_WIRE, "plan": {**_SUBMISSION_WIRE["plan"], kv[0]: kv[1]}}
    )
    return st.one_of(arbitrary, replaced_top, replaced_plan)


@settings(max_examples=300, deadline=None)
@given(raw=_submission_variants())
def test_decode_submission_from_arbitrary_objects_raises_only_decode_error(raw):
    try:
        decoded = decode(WorkflowSubmission, raw)
    except MessageDecodeError:
        return
    assert isinstance(decoded, WorkflowSubmission)
    assert decode(WorkflowSubmission, encode(decoded)) == decoded


# --- ids -----------------------------------------------------------------------------------------------------------


def test_correlation_id_is_deterministic():
    assert correlation_id("run-1", "research", 2) == correlation_id("run-1", "research", 2)
    assert correlation_id("run-1", "research", 2) == "run-1/research/2"


def test_correlation_id_of_a_plain_step_is_unchanged_by_loops_and_maps():
    assert correlation_id("run-1", "research", 2, 1, None) == "run-1/research/2"
    assert correlation_id("run-1", "research", 1, 3) == "run-1/research@3/1"
    assert correlation_id("run-1", "research", 1, 1, 17) == "run-1/research@1[17]/1"
    assert correlation_id("run-1", "research", 1, 1, 0) != correlation_id("run-1", "research", 1)


@pytest.mark.parametrize(
    "other",
    [("run-2", "research", 1), ("run-1", "write", 1), ("run-1", "research", 2), ("run-1", "research", 11)],
)
def test_correlation_id_differs_when_any_part_differs(other):
    assert correlation_id("run-1", "research", 1) != correlation_id(*other)


_run_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True)
_step_ids = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,20}", fullmatch=True)
_triples = st.tuples(_run_ids, _step_ids, st.integers(1, 10_000))


@settings(max_examples=300, deadline=None)
@given(first=_triples, second=_triples)
def test_correlation_id_is_injective(first, second):
    assert (correlation_id(*first) == correlation_id(*second)) == (first == second)


_executions = st.tuples(
    _run_ids, _step_ids, st.integers(1, 10_000), st.integers(1, 1000), st.none() | st.integers(0, 999)
)


@settings(max_examples=300, deadline=None)
@given(first=_executions, second=_executions)
def test_correlation_id_is_injective_over_iterations_and_items(first, second):
    assert (correlation_id(*first) == correlation_id(*second)) == (first == second)


@settings(max_examples=200, deadline=None)
@given(triple=_triples)
def test_correlation_id_splits_back_into_its_parts(triple):
    assert re.fullmatch(RUN_ID_PATTERN, triple[0])
    assert re.fullmatch(STEP_ID_PATTERN, triple[1])
    run_id, step_id, attempt = triple

    assert correlation_id(run_id, step_id, attempt).split("/") == [run_id, step_id, str(attempt)]


def test_new_run_id_is_a_valid_fresh_run_id():
    ids = {new_run_id() for _ in range(100)}

    assert len(ids) == 100
    for run_id in ids:
        assert re.fullmatch(RUN_ID_PATTERN, run_id)
        assert MonitoringUpdate(run_id=run_id, status="x").run_id == run_id
