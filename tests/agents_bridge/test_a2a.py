"""The A2A wire format: request shapes (checked with the SDK's own parsers), every mapping rule."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from a2a.compat.v0_3 import conversions
from a2a.compat.v0_3 import types as types_v03
from a2a.helpers import get_data_parts, get_text_parts
from a2a.types import a2a_pb2
from google.protobuf.json_format import ParseDict  # type: ignore[import-untyped,unused-ignore]
from hypothesis import given, settings
from hypothesis import strategies as st

from agents_bridge.a2a import (
    Completed,
    Failed,
    Interrupted,
    Pending,
    TaskState,
    cancel_task_request,
    get_task_request,
    message_id_for,
    parse_response,
    request_headers,
    send_message_request,
)
from models.messages import MAX_TEXT_CHARS, AgentTask, Reply

_DEFAULT: Any = object()


def make_task(
    value: Any = _DEFAULT, correlation: str = "run-1/step-a/1", *, turn: int = 0, reply: Reply | None = None
) -> AgentTask:
    run_id, step_id, attempt = correlation.split("/")
    return AgentTask(
        correlation_id=correlation,
        run_id=run_id,
        step_id=step_id,
        attempt=int(attempt),
        agent_name="researcher",
        input={"topic": "kafka"} if value is _DEFAULT else value,
        deadline=datetime.now(UTC) + timedelta(seconds=30),
        turn=turn,
        reply=reply,
    )


def answering(
    turn: int = 1, *, text: str | None = "the 2020s", data: Any = None, context: str | None = "c-1"
) -> AgentTask:
    """The task that carries a person's answer to the agent's task ``t-1``."""
    return make_task(turn=turn, reply=Reply(task_id="t-1", context_id=context, text=text, data=data))


def rpc(result: Any, request_id: Any = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}).encode()


def task_v1(state: str, *, artifacts: Any = None, message_parts: Any = None, **extra: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"state": f"TASK_STATE_{state}"}
    if message_parts is not None:
        status["message"] = {"messageId": "a1", "role": "ROLE_AGENT", "parts": message_parts}
    task: dict[str, Any] = {"id": "t-1", "contextId": "c-1", "status": status, **extra}
    if artifacts is not None:
        task["artifacts"] = artifacts
    return task


# --- requests --------------------------------------------------------------------------------------------------------


def test_message_id_is_a_uuid_derived_from_the_correlation_id() -> None:
    first = message_id_for("run-1/step-a/1")
    assert first == message_id_for("run-1/step-a/1")
    assert first != message_id_for("run-1/step-a/2")
    assert uuid.UUID(first).version == 5


def test_send_message_1_0_shape_is_what_the_sdk_parses() -> None:
    task = make_task({"topic": "kafka", "depth": 2})
    body = send_message_request(task, "1.0", request_id="r-1")
    assert body["jsonrpc"] == "2.0"
    assert body["id"] == "r-1"
    assert body["method"] == "SendMessage"
    params = body["params"]
    assert isinstance(params, dict)
    expected_meta = {
        "idempotency_key": "run-1/step-a/1",
        "run_id": "run-1",
        "step_id": "step-a",
        "attempt": 1,
        "turn": 0,
    }
    assert params["metadata"] == expected_meta
    assert params["configuration"] == {"historyLength": 0}
    parsed = ParseDict(params, a2a_pb2.SendMessageRequest())  # the SDK server's own parse, strict about unknown fields
    assert parsed.message.role == a2a_pb2.Role.ROLE_USER
    assert parsed.message.message_id == message_id_for("run-1/step-a/1")
    assert get_data_parts(parsed.message.parts) == [{"topic": "kafka", "depth": 2.0}]
    assert get_text_parts(parsed.message.parts) == []
    assert dict(parsed.metadata)["idempotency_key"] == "run-1/step-a/1"
    assert dict(parsed.message.metadata)["attempt"] == 1
    assert parsed.configuration.HasField("history_length")
    assert (parsed.message.task_id, parsed.message.context_id) == ("", ""), "a first message starts a task"


def test_a_string_text_field_also_goes_as_a_text_part() -> None:
    body = send_message_request(make_task({"text": "hello world", "max_words": 3}), "1.0", request_id=1)
    parsed = ParseDict(body["params"], a2a_pb2.SendMessageRequest())
    assert get_text_parts(parsed.message.parts) == ["hello world"]
    assert get_data_parts(parsed.message.parts) == [{"text": "hello world", "max_words": 3.0}]


@pytest.mark.parametrize("value", [{"text": ""}, {"text": 3}, ["text"], "text"])
def test_no_text_part_unless_text_is_a_non_empty_string(value: Any) -> None:
    for version in ("1.0", "0.3"):
        params: Any = send_message_request(make_task(value), version, request_id=1)["params"]
        assert len(params["message"]["parts"]) == 1, version


def test_send_message_0_3_shape_is_what_the_sdk_parses() -> None:
    body = send_message_request(make_task({"text": "hi", "n": 1}), "0.3", request_id=7)
    assert body["method"] == "message/send"
    request = types_v03.SendMessageRequest.model_validate(body)
    assert request.params.message.role == types_v03.Role.user
    assert request.params.message.message_id == message_id_for("run-1/step-a/1")
    assert request.params.metadata is not None
    assert request.params.metadata["idempotency_key"] == "run-1/step-a/1"
    assert request.params.configuration is None  # 0.3 reads historyLength 0 as "unlimited"
    core = conversions.to_core_send_message_request(request)
    assert get_data_parts(core.message.parts) == [{"text": "hi", "n": 1.0}]
    assert get_text_parts(core.message.parts) == ["hi"]


@pytest.mark.parametrize("value", [[1, 2], "plain", 3, None, True])
def test_0_3_wraps_a_non_object_input_the_way_the_sdk_unwraps_it(value: Any) -> None:
    body = send_message_request(make_task(value), "0.3", request_id=1)
    core = conversions.to_core_send_message_request(types_v03.SendMessageRequest.model_validate(body))
    expected = [float(v) for v in value] if isinstance(value, list) else value
    if isinstance(value, int) and not isinstance(value, bool):
        expected = float(value)
    assert get_data_parts(core.message.parts) == [expected]


def test_1_0_sends_any_json_value_as_data() -> None:
    body = send_message_request(make_task([1, "a"]), "1.0", request_id=1)
    parsed = ParseDict(body["params"], a2a_pb2.SendMessageRequest())
    assert get_data_parts(parsed.message.parts) == [[1.0, "a"]]


def test_an_answer_continues_the_task_1_0() -> None:
    body = send_message_request(answering(data={"from": 2020}), "1.0", request_id="r-2")
    params = body["params"]
    assert isinstance(params, dict)
    parsed = ParseDict(params, a2a_pb2.SendMessageRequest())  # strict about unknown fields: camelCase taskId/contextId
    assert (parsed.message.task_id, parsed.message.context_id) == ("t-1", "c-1")
    assert parsed.message.role == a2a_pb2.Role.ROLE_USER
    assert get_text_parts(parsed.message.parts) == ["the 2020s"]
    assert get_data_parts(parsed.message.parts) == [{"from": 2020.0}]
    assert parsed.message.parts[0].HasField("text"), "the text first, then the data"
    assert parsed.message.message_id == message_id_for("run-1/step-a/1#1")
    assert dict(parsed.metadata) == {
        "idempotency_key": "run-1/step-a/1#1",
        "run_id": "run-1",
        "step_id": "step-a",
        "attempt": 1.0,
        "turn": 1.0,
    }
    assert dict(parsed.message.metadata)["turn"] == 1
    assert params["configuration"] == {"historyLength": 0}


def test_an_answer_continues_the_task_0_3() -> None:
    body = send_message_request(answering(2, data=[1, 2]), "0.3", request_id=4)
    assert body["method"] == "message/send"
    request = types_v03.SendMessageRequest.model_validate(body)
    message = request.params.message
    assert (message.task_id, message.context_id) == ("t-1", "c-1")
    assert message.message_id == message_id_for("run-1/step-a/1#2")
    assert request.params.metadata is not None
    assert request.params.metadata["turn"] == 2
    core = conversions.to_core_send_message_request(request)
    assert (core.message.task_id, core.message.context_id) == ("t-1", "c-1")
    assert get_text_parts(core.message.parts) == ["the 2020s"]
    assert get_data_parts(core.message.parts) == [[1.0, 2.0]]  # wrapped in 0.3, unwrapped by the SDK


def sent_message(task: AgentTask, version: Any = "1.0") -> Any:
    """The message of a SendMessage body, as plain JSON."""
    body: Any = send_message_request(task, version, request_id=1)
    return body["params"]["message"]


def test_the_message_id_of_each_turn_is_its_own_and_stable() -> None:
    first = sent_message(make_task())["messageId"]
    ids = [sent_message(answering(turn))["messageId"] for turn in (1, 2)]
    assert first == message_id_for("run-1/step-a/1"), "turn 0 keeps the id it always had"
    assert len({first, *ids}) == 3
    assert sent_message(answering(1, text="another text"))["messageId"] == ids[0], "the same turn again: the same id"
    assert sent_message(answering(1), "0.3")["messageId"] == ids[0], "whatever the protocol"


@pytest.mark.parametrize(
    ("text", "data", "parts_1_0"),
    [
        ("yes", None, [{"text": "yes"}]),
        (None, {"x": 1}, [{"data": {"x": 1}}]),
        ("", {"x": 1}, [{"data": {"x": 1}}]),
        ("", None, [{"data": {}}]),
        (None, None, [{"data": {}}]),
        ("why", "plain", [{"text": "why"}, {"data": "plain"}]),
    ],
)
def test_the_parts_of_an_answer(text: str | None, data: Any, parts_1_0: list[Any]) -> None:
    params: Any = send_message_request(answering(text=text, data=data), "1.0", request_id=1)["params"]
    assert params["message"]["parts"] == parts_1_0
    ParseDict(params, a2a_pb2.SendMessageRequest())
    params_03: Any = send_message_request(answering(text=text, data=data), "0.3", request_id=1)["params"]
    request = types_v03.SendMessageRequest.model_validate(
        {"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": params_03}
    )
    core = conversions.to_core_send_message_request(request)
    assert len(core.message.parts) == len(parts_1_0)
    assert get_text_parts(core.message.parts) == [p["text"] for p in parts_1_0 if "text" in p]


def test_an_answer_without_a_context_leaves_it_to_the_agent() -> None:
    message = sent_message(answering(context=None))
    assert message["taskId"] == "t-1"
    assert "contextId" not in message


def test_get_and_cancel_requests() -> None:
    get_1 = get_task_request("t-9", "1.0", request_id=2)
    assert get_1 == {"jsonrpc": "2.0", "id": 2, "method": "GetTask", "params": {"id": "t-9", "historyLength": 0}}
    assert ParseDict(get_1["params"], a2a_pb2.GetTaskRequest()).id == "t-9"
    cancel_1 = cancel_task_request("t-9", "1.0", request_id=3)
    assert cancel_1["method"] == "CancelTask"
    assert ParseDict(cancel_1["params"], a2a_pb2.CancelTaskRequest()).id == "t-9"
    get_03 = get_task_request("t-9", "0.3", request_id="x")
    assert types_v03.GetTaskRequest.model_validate(get_03).params.id == "t-9"
    cancel_03 = cancel_task_request("t-9", "0.3", request_id="y")
    assert types_v03.CancelTaskRequest.model_validate(cancel_03).params.id == "t-9"


def test_get_task_with_history_asks_for_all_of_it() -> None:
    # The SDK trims the history only when historyLength is set (a2a.utils.task.apply_history_length).
    get_1 = get_task_request("t-9", "1.0", request_id=2, history=True)
    assert get_1["params"] == {"id": "t-9"}
    assert not ParseDict(get_1["params"], a2a_pb2.GetTaskRequest()).HasField("history_length")
    # 0.3 reads an absent (or 0) historyLength as "all": the same request either way.
    get_03 = get_task_request("t-9", "0.3", request_id="x", history=True)
    assert get_03 == get_task_request("t-9", "0.3", request_id="x")
    request = types_v03.GetTaskRequest.model_validate(get_03)
    assert request.params.history_length is None
    assert not conversions.to_core_get_task_request(request).HasField("history_length")


def test_request_headers() -> None:
    assert request_headers("1.0")["A2A-Version"] == "1.0"
    assert "A2A-Version" not in request_headers("0.3")
    assert request_headers("0.3")["Content-Type"] == "application/json"


# --- responses: tasks ------------------------------------------------------------------------------------------------


def test_completed_task_merges_artifact_data_and_keeps_artifacts() -> None:
    artifacts = [{"artifactId": "a", "name": "result", "parts": [{"data": {"summary": "s", "words": 42.0}}]}]
    outcome = parse_response(rpc({"task": task_v1("COMPLETED", artifacts=artifacts)}), "1.0")
    assert outcome == Completed(
        output={"summary": "s", "words": 42},
        artifacts=[{"artifactId": "a", "name": "result", "parts": [{"data": {"summary": "s", "words": 42}}]}],
        task_id="t-1",
    )
    assert isinstance(outcome, Completed)
    assert type(outcome.output["words"]) is int  # 1.0 carries doubles; whole numbers come back as ints


def test_whole_floats_become_ints_but_fractions_stay() -> None:
    artifacts = [{"artifactId": "a", "parts": [{"data": {"a": 3.0, "b": 2.5, "c": [1.0, {"d": -0.0}], "e": 1e300}}]}]
    outcome = parse_response(rpc({"task": task_v1("COMPLETED", artifacts=artifacts)}), "1.0")
    assert isinstance(outcome, Completed)
    assert outcome.output == {"a": 3, "b": 2.5, "c": [1, {"d": 0}], "e": 1e300}
    assert type(outcome.output["e"]) is float  # beyond 2**53 a double is not an exact int


def test_status_message_and_artifacts_are_merged_the_status_message_last() -> None:
    artifacts = [
        {"artifactId": "a", "parts": [{"data": {"x": 1, "y": 1}}, {"text": "artifact text"}]},
        {"artifactId": "b", "parts": [{"data": {"y": 2, "z": 2}}]},
    ]
    status_parts = [{"data": {"z": 3}}, {"text": "done"}]
    outcome = parse_response(
        rpc({"task": task_v1("COMPLETED", artifacts=artifacts, message_parts=status_parts)}), "1.0"
    )
    assert isinstance(outcome, Completed)
    assert outcome.output == {"x": 1, "y": 2, "z": 3, "text": "artifact text\ndone"}
    assert len(outcome.artifacts) == 2


def test_status_message_alone_gives_the_output() -> None:
    outcome = parse_response(rpc({"task": task_v1("COMPLETED", message_parts=[{"data": {"ok": True}}])}), "1.0")
    assert outcome == Completed(output={"ok": True}, artifacts=[], task_id="t-1")


def test_text_only_artifacts_are_joined_as_text() -> None:
    artifacts = [{"artifactId": "a", "parts": [{"text": "line 1"}, {"text": "line 2"}]}]
    outcome = parse_response(rpc({"task": task_v1("COMPLETED", artifacts=artifacts)}), "1.0")
    assert isinstance(outcome, Completed)
    assert outcome.output == {"text": "line 1\nline 2"}


def test_a_text_key_in_data_wins_over_text_parts() -> None:
    parts = [{"data": {"text": "from data"}}, {"text": "from a text part"}]
    outcome = parse_response(rpc({"task": task_v1("COMPLETED", message_parts=parts)}), "1.0")
    assert isinstance(outcome, Completed)
    assert outcome.output == {"text": "from data"}


def test_non_object_data_counts_as_data_key_and_file_parts_are_not_merged() -> None:
    parts = [
        {"data": [1.0, 2.0]},
        {"url": "https://example.org/f.pdf", "mediaType": "application/pdf"},
        {"raw": "AA=="},
    ]
    outcome = parse_response(
        rpc({"task": task_v1("COMPLETED", artifacts=[{"artifactId": "a", "parts": parts}])}), "1.0"
    )
    assert isinstance(outcome, Completed)
    assert outcome.output == {"data": [1, 2]}
    assert outcome.artifacts[0]["parts"] == [{"data": [1, 2]}, parts[1], parts[2]]


def test_completed_task_without_parts_has_an_empty_output() -> None:
    assert parse_response(rpc({"task": task_v1("COMPLETED")}), "1.0") == Completed(output={}, task_id="t-1")


def test_history_is_never_merged_into_the_output_only_its_ids_are_read() -> None:
    history = [
        {"messageId": "m", "role": "ROLE_USER", "parts": [{"data": {"topic": "the input"}}]},
        {"messageId": "q", "role": "ROLE_AGENT", "parts": [{"text": "which year?"}]},
    ]
    outcome = parse_response(rpc({"task": task_v1("COMPLETED", history=history)}), "1.0")
    assert outcome == Completed(output={}, task_id="t-1", history_ids=("m", "q"))


@pytest.mark.parametrize("state", ["FAILED", "REJECTED", "CANCELED"])
def test_failed_rejected_canceled_give_agent_failed_with_the_agents_text(state: str) -> None:
    body = rpc({"task": task_v1(state, message_parts=[{"text": "topic is empty"}, {"text": "try again"}])})
    outcome = parse_response(body, "1.0")
    assert outcome == Failed("agent_failed", "topic is empty\ntry again", retriable=False, state=TaskState[state])


def test_a_failure_without_text_names_the_state() -> None:
    outcome = parse_response(rpc({"task": task_v1("REJECTED")}), "1.0")
    assert outcome == Failed("agent_failed", "the agent reported the task rejected", state=TaskState.REJECTED)


def test_a_very_long_agent_message_is_clipped() -> None:
    outcome = parse_response(rpc({"task": task_v1("FAILED", message_parts=[{"text": "x" * 50_000}])}), "1.0")
    assert isinstance(outcome, Failed)
    assert len(outcome.message) == 2000


@pytest.mark.parametrize(("state", "expected"), [("SUBMITTED", TaskState.SUBMITTED), ("WORKING", TaskState.WORKING)])
def test_submitted_and_working_are_pending(state: str, expected: TaskState) -> None:
    assert parse_response(rpc({"task": task_v1(state)}), "1.0") == Pending(task_id="t-1", state=expected)


def test_get_task_answers_the_task_itself() -> None:
    assert parse_response(rpc(task_v1("WORKING")), "1.0") == Pending(task_id="t-1", state=TaskState.WORKING)


@pytest.mark.parametrize(
    ("state", "kind", "default"),
    [
        ("INPUT_REQUIRED", "input_required", "the agent needs input"),
        ("AUTH_REQUIRED", "auth_required", "authentication"),
    ],
)
def test_interrupted_states(state: str, kind: str, default: str) -> None:
    asked = parse_response(rpc({"task": task_v1(state, message_parts=[{"text": "which year?"}])}), "1.0")
    assert asked == Interrupted(kind=kind, message="which year?", task_id="t-1", context_id="c-1")  # type: ignore[arg-type]
    silent = parse_response(rpc({"task": task_v1(state)}), "1.0")
    assert isinstance(silent, Interrupted)
    assert default in silent.message
    assert silent.data is None


def test_a_question_carries_its_data_its_context_and_the_history_ids() -> None:
    parts = [
        {"text": "Which year?"},
        {"data": {"choices": [2020.0, 2021.0], "k": 1.0}},
        {"text": "Or a range."},
        {"data": {"k": 2.0}},
        {"url": "https://example.org/form.pdf"},
    ]
    history = [{"messageId": "m-0", "role": "ROLE_USER", "parts": [{"data": {"topic": "x"}}]}]
    outcome = parse_response(rpc({"task": task_v1("INPUT_REQUIRED", message_parts=parts, history=history)}), "1.0")
    assert outcome == Interrupted(
        kind="input_required",
        message="Which year?\nOr a range.",
        task_id="t-1",
        data={"choices": [2020, 2021], "k": 2},  # merged like an output: later parts win, whole numbers are ints
        context_id="c-1",
        history_ids=("m-0",),
    )


def test_a_question_with_data_that_is_not_an_object_counts_it_as_data() -> None:
    outcome = parse_response(rpc({"task": task_v1("INPUT_REQUIRED", message_parts=[{"data": ["a", "b"]}])}), "1.0")
    assert isinstance(outcome, Interrupted)
    assert outcome.data == {"data": ["a", "b"]}
    assert outcome.message == "the agent needs input"


def test_a_question_keeps_up_to_a_questions_length_an_auth_request_an_error_messages() -> None:
    long = [{"text": "x" * 50_000}]
    question = parse_response(rpc({"task": task_v1("INPUT_REQUIRED", message_parts=long)}), "1.0")
    auth = parse_response(rpc({"task": task_v1("AUTH_REQUIRED", message_parts=long)}), "1.0")
    assert isinstance(question, Interrupted)
    assert isinstance(auth, Interrupted)
    assert len(question.message) == MAX_TEXT_CHARS
    assert len(auth.message) == 2000


@pytest.mark.parametrize(
    ("history", "ids"),
    [
        (None, ()),
        ("not a list", ()),
        (
            [{"messageId": "a"}, {"no": "id"}, "junk", {"messageId": 3}, {"messageId": ""}, {"messageId": "b"}],
            ("a", "b"),
        ),
    ],
)
def test_history_ids_pass_over_what_is_not_a_message_with_an_id(history: Any, ids: tuple[str, ...]) -> None:
    extra = {} if history is None else {"history": history}
    assert parse_response(rpc({"task": task_v1("WORKING", **extra)}), "1.0") == Pending(
        "t-1", TaskState.WORKING, history_ids=ids
    )
    asked = parse_response(rpc({"task": task_v1("INPUT_REQUIRED", **extra)}), "1.0")
    assert isinstance(asked, Interrupted)
    assert asked.history_ids == ids


def test_direct_message_reply_1_0() -> None:
    message = {"messageId": "m", "role": "ROLE_AGENT", "parts": [{"data": {"answer": 42.0}}, {"text": "hi"}]}
    assert parse_response(rpc({"message": message}), "1.0") == Completed(output={"answer": 42, "text": "hi"})


# --- responses: 0.3 ------------------------------------------------------------------------------------------------


def task_v03(state: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "task", "id": "t-3", "contextId": "c", "status": {"state": state}, **extra}


def test_0_3_completed_task_with_compat_wrapped_data() -> None:
    parts = [
        {"kind": "data", "data": {"a": 1.0}},
        {"kind": "data", "data": {"value": [1.0, 2.0]}, "metadata": {"data_part_compat": True}},
        {"kind": "text", "text": "done"},
        {"kind": "file", "file": {"uri": "https://example.org/x"}},
    ]
    outcome = parse_response(rpc(task_v03("completed", artifacts=[{"artifactId": "a", "parts": parts}])), "0.3")
    assert isinstance(outcome, Completed)
    assert outcome.output == {"a": 1, "data": [1, 2], "text": "done"}
    assert outcome.task_id == "t-3"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("submitted", Pending("t-3", TaskState.SUBMITTED)),
        ("working", Pending("t-3", TaskState.WORKING)),
        ("input-required", Interrupted("input_required", "the agent needs input", "t-3", context_id="c")),
        ("auth-required", Interrupted("auth_required", "the agent needs authentication", "t-3", context_id="c")),
        ("failed", Failed("agent_failed", "the agent reported the task failed", state=TaskState.FAILED)),
        ("canceled", Failed("agent_failed", "the agent reported the task canceled", state=TaskState.CANCELED)),
        ("rejected", Failed("agent_failed", "the agent reported the task rejected", state=TaskState.REJECTED)),
    ],
)
def test_0_3_states(state: str, expected: Any) -> None:
    assert parse_response(rpc(task_v03(state)), "0.3") == expected


def test_0_3_failure_message_text() -> None:
    status = {
        "state": "failed",
        "message": {
            "kind": "message",
            "messageId": "m",
            "role": "agent",
            "parts": [{"kind": "text", "text": "no such topic"}],
        },
    }
    body = rpc({"kind": "task", "id": "t", "contextId": "c", "status": status})
    assert parse_response(body, "0.3") == Failed("agent_failed", "no such topic", state=TaskState.FAILED)


def test_0_3_question_with_compat_wrapped_data_and_history() -> None:
    status = {
        "state": "input-required",
        "message": {
            "kind": "message",
            "messageId": "q-1",
            "role": "agent",
            "parts": [
                {"kind": "text", "text": "Which one?"},
                {"kind": "data", "data": {"value": ["a", "b"]}, "metadata": {"data_part_compat": True}},
            ],
        },
    }
    history = [{"kind": "message", "messageId": "m-0", "role": "user", "parts": []}]
    outcome = parse_response(rpc(task_v03("input-required", status=status, history=history)), "0.3")
    assert outcome == Interrupted(
        "input_required", "Which one?", "t-3", data={"data": ["a", "b"]}, context_id="c", history_ids=("m-0",)
    )


def test_0_3_direct_message_reply() -> None:
    message = {"kind": "message", "messageId": "m", "role": "agent", "parts": [{"kind": "data", "data": {"n": 2.0}}]}
    assert parse_response(rpc(message), "0.3") == Completed(output={"n": 2})


# --- responses: errors and malformed answers -----------------------------------------------------------------------


def test_jsonrpc_error() -> None:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "error": {"code": -32009, "message": "A2A version '0.3' is not supported"}}
    ).encode()
    assert parse_response(body, "1.0") == Failed("jsonrpc_error", "code -32009: A2A version '0.3' is not supported")


def test_an_internal_jsonrpc_error_is_retriable() -> None:
    body = b'{"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "boom"}}'
    assert parse_response(body, "1.0") == Failed("jsonrpc_error", "code -32603: boom", retriable=True)


def test_jsonrpc_error_without_code_or_message() -> None:
    body = b'{"jsonrpc": "2.0", "id": null, "error": {"code": true}}'
    assert parse_response(body, "1.0") == Failed("jsonrpc_error", "code ?: (no message)")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not JSON"),
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"[]", "got list"),
        (b'"task"', "got str"),
        (b'{"id": 1, "result": {}}', "JSON-RPC 2.0"),
        (b'{"jsonrpc": "2.0", "id": 1}', "neither result nor error"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": []}', "result is not an object"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": {"surprise": 1}}', "neither a task nor a message"),
        (b'{"jsonrpc": "2.0", "id": 1, "error": "boom"}', "error is not an object"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": {"task": {"status": {"state": "TASK_STATE_WORKING"}}}}', "no id"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": {"task": {"id": "t", "status": {"state": "DONE"}}}}', "unknown"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": {"task": {"id": "t", "status": "x"}}}', "status is not an object"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": {"task": {"id": "t", "status": {}}}}', "unknown task state"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": {"parts": [1]}}', "not an object"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": {"parts": [{"text": 1}]}}', "text is not a string"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": {"parts": {"text": "x"}}}', "not a list"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": {"parts": [{"data": NaN}]}}', "NaN is not valid JSON"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": {"parts": [{"data": -Infinity}]}}', "not valid JSON"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": {"parts": [{"data": 1e999}]}}', "out of range"),
        (b'{"jsonrpc": "2.0", "id": 1, "result": {"parts": [{"data": 1' + b"0" * 5000 + b"}]}}", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    ],
)
def test_malformed_answers(body: bytes, reason: str) -> None:
    outcome = parse_response(body, "1.0")
    assert isinstance(outcome, Failed)
    assert outcome.kind == "malformed_response"
    assert not outcome.retriable
    assert reason in outcome.message
    assert len(outcome.message) <= 2000


def test_an_answer_to_another_request_is_malformed() -> None:
    body = rpc(task_v1("WORKING"), request_id="other")
    outcome = parse_response(body, "1.0", request_id="mine")
    assert isinstance(outcome, Failed)
    assert outcome.kind == "malformed_response"
    assert parse_response(body, "1.0", request_id="other") == Pending("t-1", TaskState.WORKING)
    null_id = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse"}}).encode()
    assert parse_response(null_id, "1.0", request_id="mine") == Failed("jsonrpc_error", "code -32700: parse")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)
states = st.sampled_from(
    [f"TASK_STATE_{s}" for s in ("COMPLETED", "FAILED", "WORKING", "INPUT_REQUIRED", "UNSPECIFIED")]
    + ["completed", "auth-required", "unknown"]
)
parts = st.lists(
    st.one_of(
        st.fixed_dictionaries({"text": st.one_of(st.text(max_size=10), json_values)}),
        st.fixed_dictionaries({"data": json_values}, optional={"metadata": json_values}),
        json_values,
    ),
    max_size=4,
)
task_like = st.fixed_dictionaries(
    {"id": st.one_of(st.text(min_size=1, max_size=5), json_values)},
    optional={
        "status": st.fixed_dictionaries(
            {"state": st.one_of(states, json_values)},
            optional={"message": st.one_of(json_values, st.fixed_dictionaries({"parts": parts}))},
        ),
        "artifacts": st.one_of(json_values, st.lists(st.fixed_dictionaries({"parts": parts}), max_size=3)),
        "kind": st.sampled_from(["task", "message", "other"]),
        "parts": parts,
    },
)
a2a_like = st.one_of(
    st.fixed_dictionaries(
        {
            "jsonrpc": st.just("2.0"),
            "id": st.one_of(st.none(), st.integers(0, 3)),
            "result": st.one_of(json_values, task_like, task_like.map(lambda task: {"task": task})),
        }
    ),
    st.fixed_dictionaries({"jsonrpc": st.just("2.0"), "id": st.integers(0, 3), "error": json_values}),
    json_values,
)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300))
def test_never_raises_on_any_bytes(body: bytes) -> None:
    for version in ("1.0", "0.3"):
        assert isinstance(parse_response(body, version), Completed | Failed | Pending | Interrupted)


@settings(max_examples=500, deadline=None)
@given(doc=a2a_like, request_id=st.one_of(st.none(), st.integers(0, 3)))
def test_never_raises_on_a2a_like_json(doc: Any, request_id: int | str | None) -> None:
    body = json.dumps(doc).encode()
    outcome = parse_response(body, "1.0", request_id=request_id)
    assert isinstance(outcome, Completed | Failed | Pending | Interrupted)
    if isinstance(outcome, Failed):
        assert outcome.kind in ("malformed_response", "jsonrpc_error", "agent_failed")
        assert outcome.retriable == (outcome.message.startswith("code -32603:"))
        assert len(outcome.message) <= 2000
    if isinstance(outcome, Completed):
        json.dumps(outcome.output, allow_nan=False)  # always plain JSON
