"""The A2A wire format, and nothing else: JSON-RPC bodies out, outcomes in.

Pure functions, no I/O. :mod:`agents_bridge.calls` does the HTTP. The shapes
were checked against the a2a-sdk 1.3 server (``a2a/server/routes`` and the
0.3 compatibility layer in ``a2a/compat/v0_3``).

Requests
    * Protocol 1.0 uses the methods ``SendMessage``, ``GetTask`` and
      ``CancelTask``, the JSON form of the protobuf types (camelCase fields,
      enums such as ``ROLE_USER``, parts without a ``kind``: ``{"text": ...}``,
      ``{"data": <any JSON>}``) and needs the header ``A2A-Version: 1.0``
      (:func:`request_headers`). Protocol 0.3 uses ``message/send``,
      ``tasks/get`` and ``tasks/cancel``, parts with a ``kind``, role ``user``,
      and no version header.
    * The message id is a UUID 5 of the call id (:func:`message_id_for`): the
      correlation id for an attempt's first message, ``<correlation id>#<turn>``
      for the answer of turn ``turn``. A repeated attempt (or turn) carries the
      same id, so an agent that deduplicates can, and the bridge finds its own
      answer in the task's history (:mod:`agents_bridge.calls`). The
      idempotency key (the call id too: the correlation id at turn 0, so an
      agent that deduplicates by key never takes an answer for a repeat) with
      ``run_id``, ``step_id``, ``attempt`` and ``turn`` travels as
      ``metadata`` twice: on the request (what the SDK hands the executor as
      ``RequestContext.metadata``) and on the message (kept in the task's
      history).
    * The step input is one data part. In 0.3 a data part must be an object, so
      any other value is wrapped as ``{"value": v}`` with the part metadata
      ``data_part_compat: true``, exactly as the SDK's own conversion does.
      If the input is an object with a non-empty string ``text`` field, a text
      part with that string follows the data part, for agents that only read
      text (the SDK refuses empty text parts); the data part stays the
      authoritative input.
    * An answer (a task with a ``reply``, turn 1 on) continues the agent's
      waiting task: its message carries the task's ``taskId`` and ``contextId``
      (both versions spell them so on the Message) and the answer instead of
      the step input: a text part for a non-empty ``reply.text``, then a data
      part for a ``reply.data`` that is not None (wrapped in 0.3 like the
      input). An answer with neither goes as one empty object data part
      (``{}``): a message needs a part, and the SDK refuses an empty text part.
    * 1.0 requests ask for ``historyLength: 0`` so the answer does not echo the
      input back. 0.3 reads 0 as "unlimited", so 0.3 requests leave it out.
      ``get_task_request(..., history=True)`` asks for the whole history:
      1.0 leaves ``historyLength`` out (the SDK then trims nothing), and so
      does 0.3, as always.

Responses (:func:`parse_response`, which never raises)
    * A task ``COMPLETED`` gives :class:`Completed`. Its ``output`` merges the
      parts of every artifact (in order) and then of the final status message:
      data parts that are objects are merged key by key, later parts winning,
      so the status message has the last word; a data part that is not an
      object counts as ``{"data": value}``; text parts are joined with
      newlines as ``text`` unless a data part already set ``text``. File parts
      are not merged. The artifacts are kept as they came. The task's history
      is never merged; only the ids of its messages are read.
    * ``FAILED``, ``REJECTED`` and ``CANCELED`` give :class:`Failed` with kind
      ``agent_failed`` and the text of the status message (or the state when
      the agent gave no text); not retriable, the agent said no.
    * ``SUBMITTED`` and ``WORKING`` give :class:`Pending`: poll ``GetTask``.
    * ``INPUT_REQUIRED`` and ``AUTH_REQUIRED`` give :class:`Interrupted`: the
      status message's text (up to ``MAX_TEXT_CHARS`` for a question,
      ``MAX_MESSAGE_CHARS`` otherwise, or a default sentence), its data parts
      merged like an output's (None when it has none), the task's id and
      ``contextId``.
    * Every outcome read from a task (:class:`Completed`, :class:`Pending`,
      :class:`Interrupted`) carries ``history_ids``: the ``messageId`` of each
      message in the task's ``history``, in order. An absent history, one that
      is not a list, and entries without a string id are passed over (the
      ids are a hint for not sending an answer twice, not part of the outcome).
    * A direct ``Message`` reply gives :class:`Completed` from its parts.
    * A JSON-RPC error gives ``Failed("jsonrpc_error", "code N: message")``,
      retriable only for -32603 (internal error: the a2a-sdk answers it when
      the agent's code raised, which may be transient); the others (method
      not found, invalid params, version not supported, task not found...)
      will not change by trying again.
    * Anything else (not JSON, not JSON-RPC 2.0, an unknown state such as
      ``TASK_STATE_UNSPECIFIED`` or 0.3's ``unknown``, a task without an id,
      ``NaN``/``Infinity``, a response id that is not the request's) gives
      ``Failed("malformed_response", why)``, not retriable.
    * The SDK carries numbers as protobuf doubles in both versions (it
      answers ``3.0`` for ``3``), so whole numbers up to 2**53 in the output
      become ints.
    * Both state spellings (``TASK_STATE_COMPLETED`` and ``completed``) and
      both part shapes are read whatever the protocol version: being lenient
      here costs nothing and the outcome is the same.

Agent cards are read by :mod:`switchyard.agent_cards`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import JsonValue

from models.agents import ProtocolVersion
from models.messages import MAX_TEXT_CHARS, AgentTask, ErrorKind, Reply
from switchyard.wire import StrictJsonError, clip, snippet, strict_loads

__all__ = [
    "MESSAGE_ID_NAMESPACE",
    "MAX_MESSAGE_CHARS",
    "VERSION_HEADER",
    "Completed",
    "Failed",
    "Interrupted",
    "JsonObject",
    "Outcome",
    "Pending",
    "RequestId",
    "TaskState",
    "cancel_task_request",
    "get_task_request",
    "message_id_for",
    "parse_response",
    "request_headers",
    "send_message_request",
]

JsonObject = dict[str, JsonValue]
RequestId = str | int

VERSION_HEADER: Final = "A2A-Version"
MESSAGE_ID_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:switchyard:a2a:message-id")
"""Namespace of the UUID 5 message ids; changing it changes every message id."""
MAX_MESSAGE_CHARS: Final = 2000
"""Longest error message taken from an agent (``AgentError`` allows 10,000)."""

_METHODS: Final[dict[ProtocolVersion, tuple[str, str, str]]] = {
    "1.0": ("SendMessage", "GetTask", "CancelTask"),
    "0.3": ("message/send", "tasks/get", "tasks/cancel"),
}
_JSONRPC_INTERNAL_ERROR: Final = -32603


class TaskState(StrEnum):
    """A task's state, whatever the protocol version spelled it."""

    SUBMITTED = "submitted"
    WORKING = "working"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    REJECTED = "rejected"
    INPUT_REQUIRED = "input_required"
    AUTH_REQUIRED = "auth_required"


_STATES: Final[dict[str, TaskState]] = {
    **{f"TASK_STATE_{state.name}": state for state in TaskState},
    **{state.value.replace("_", "-"): state for state in TaskState},
}
_FINAL_FAILURES: Final = frozenset({TaskState.FAILED, TaskState.CANCELED, TaskState.REJECTED})
_PENDING: Final = frozenset({TaskState.SUBMITTED, TaskState.WORKING})


@dataclass(frozen=True)
class Completed:
    """The agent finished: its output, and the artifacts as they came.

    Attributes:
        output: The artifacts' and the status message's parts, merged.
        artifacts: The artifacts as they came.
        task_id: The task's id (None for a direct Message reply).
        history_ids: The message ids in the task's history, in order.
    """

    output: JsonObject
    artifacts: list[JsonObject] = field(default_factory=list)
    task_id: str | None = None
    history_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failed:
    """The call failed: the agent said so, the RPC failed or the answer was unreadable.

    Attributes:
        kind: An :class:`~models.messages.ErrorKind` value.
        message: Why, in one line where possible.
        retriable: Whether trying again may help.
        state: The task state, when the agent reported one.
    """

    kind: str
    message: str
    retriable: bool = False
    state: TaskState | None = None


@dataclass(frozen=True)
class Pending:
    """The task is accepted but not finished: poll ``GetTask`` with ``task_id``.

    Attributes:
        task_id: The task's id.
        state: ``submitted`` or ``working``.
        history_ids: The message ids in the task's history, in order.
    """

    task_id: str
    state: TaskState
    history_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Interrupted:
    """The agent waits for something only a human (or an operator) can give.

    Attributes:
        kind: ``input_required`` (a question for a person) or ``auth_required``.
        message: The status message's text, or a default sentence when it has none.
        task_id: The waiting task's id.
        data: The status message's data parts, merged like an output's; None when it has none.
        context_id: The task's ``contextId``, if it has one.
        history_ids: The message ids in the task's history, in order.
    """

    kind: Literal["input_required", "auth_required"]
    message: str
    task_id: str = ""
    data: JsonValue = None
    context_id: str | None = None
    history_ids: tuple[str, ...] = ()


Outcome = Completed | Failed | Pending | Interrupted


class _Malformed(Exception):
    """Internal: the response does not have the shape of an A2A answer."""


# --- requests ----------------------------------------------------------------------------------------------------


def message_id_for(call_id: str) -> str:
    """The message id of a call: a UUID 5 of its call id, the same on every retry.

    Args:
        call_id: :attr:`AgentTask.call_id <models.messages.AgentTask.call_id>`: the
            correlation id for an attempt's first message, ``<correlation id>#<turn>``
            for an answer.
    """
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, call_id))


def request_headers(protocol_version: ProtocolVersion) -> dict[str, str]:
    """The HTTP headers every JSON-RPC request carries (credentials are added by the caller)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if protocol_version == "1.0":
        headers[VERSION_HEADER] = "1.0"
    return headers


def _envelope(method: str, params: JsonObject, request_id: RequestId) -> JsonObject:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


def _input_parts(value: JsonValue, protocol_version: ProtocolVersion) -> list[JsonValue]:
    parts: list[JsonValue] = [_data_part(value, protocol_version)]
    text = value.get("text") if isinstance(value, dict) else None
    if isinstance(text, str) and text:  # the SDK refuses an empty text part
        parts.append({"text": text} if protocol_version == "1.0" else {"kind": "text", "text": text})
    return parts


def _data_part(value: JsonValue, protocol_version: ProtocolVersion) -> JsonValue:
    if protocol_version == "1.0":
        return {"data": value}
    if isinstance(value, dict):
        return {"kind": "data", "data": value}
    # 0.3 data parts are objects: wrap the value the way the SDK's own conversion does
    return {"kind": "data", "data": {"value": value}, "metadata": {"data_part_compat": True}}


def _reply_parts(reply: Reply, protocol_version: ProtocolVersion) -> list[JsonValue]:
    parts: list[JsonValue] = []
    if isinstance(reply.text, str) and reply.text:  # the SDK refuses an empty text part
        parts.append({"text": reply.text} if protocol_version == "1.0" else {"kind": "text", "text": reply.text})
    if reply.data is not None:
        parts.append(_data_part(reply.data, protocol_version))
    if not parts:  # a message needs a part: an empty answer is an empty object
        parts.append(_data_part({}, protocol_version))
    return parts


def send_message_request(task: AgentTask, protocol_version: ProtocolVersion, *, request_id: RequestId) -> JsonObject:
    """The JSON-RPC body that hands one attempt of a step to an agent, or an answer to its waiting task.

    Args:
        task: The attempt: its input, correlation id, run, step and attempt
            number, and from turn 1 the reply that continues the agent's task.
        protocol_version: ``1.0`` (``SendMessage``) or ``0.3`` (``message/send``).
        request_id: The JSON-RPC id.

    Returns:
        The body, ready for ``json.dumps``.
    """
    metadata: JsonObject = {
        # Per call, like the message id: an agent that deduplicates by key must not take an answer for a repeat.
        "idempotency_key": task.call_id,
        "run_id": task.run_id,
        "step_id": task.step_id,
        "attempt": task.attempt,
        "turn": task.turn,
    }
    message: JsonObject = {
        # Turn 0 keeps the correlation id's message id (call_id is the correlation id then).
        "messageId": message_id_for(task.call_id),
        "role": "ROLE_USER" if protocol_version == "1.0" else "user",
        "parts": _input_parts(task.input, protocol_version)
        if task.reply is None
        else _reply_parts(task.reply, protocol_version),
        "metadata": dict(metadata),
    }
    if task.reply is not None:
        message["taskId"] = task.reply.task_id
        if task.reply.context_id:
            message["contextId"] = task.reply.context_id
    params: JsonObject = {"message": message, "metadata": metadata}
    if protocol_version == "1.0":
        params["configuration"] = {"historyLength": 0}
    else:
        message["kind"] = "message"
    return _envelope(_METHODS[protocol_version][0], params, request_id)


def get_task_request(
    task_id: str, protocol_version: ProtocolVersion, *, request_id: RequestId, history: bool = False
) -> JsonObject:
    """The JSON-RPC body asking for a task's current state (``GetTask`` / ``tasks/get``).

    Args:
        task_id: The agent's task.
        protocol_version: ``1.0`` or ``0.3``.
        request_id: The JSON-RPC id.
        history: Ask for the task's whole history too (1.0 leaves ``historyLength`` out, and
            the SDK trims nothing then; 0.3 always leaves it out, as 0 would mean the same).
    """
    params: JsonObject = {"id": task_id}
    if protocol_version == "1.0" and not history:
        params["historyLength"] = 0
    return _envelope(_METHODS[protocol_version][1], params, request_id)


def cancel_task_request(task_id: str, protocol_version: ProtocolVersion, *, request_id: RequestId) -> JsonObject:
    """The JSON-RPC body asking an agent to cancel a task (``CancelTask`` / ``tasks/cancel``)."""
    return _envelope(_METHODS[protocol_version][2], {"id": task_id}, request_id)


# --- responses ---------------------------------------------------------------------------------------------------


def _normalize(value: Any) -> JsonValue:
    """JSON from ``json.loads``, with whole floats turned into ints (1.0 carries doubles only)."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) <= 2**53 else value
    if isinstance(value, dict):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    raise _Malformed(f"unexpected JSON value of type {type(value).__name__}")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"{what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Malformed(f"{what} is not a list")
    return value


def _part_values(parts: Iterable[Any], where: str) -> tuple[list[JsonValue], list[str]]:
    """The data values and the texts of a list of parts, in order."""
    data: list[JsonValue] = []
    texts: list[str] = []
    for index, raw in enumerate(parts):
        part = _object(raw, f"{where}.parts[{index}]")
        if "text" in part:
            if not isinstance(part["text"], str):
                raise _Malformed(f"{where}.parts[{index}].text is not a string")
            texts.append(part["text"])
        elif "data" in part:
            value = part["data"]
            metadata = part.get("metadata")
            if (
                isinstance(metadata, dict)
                and metadata.get("data_part_compat") is True
                and isinstance(value, dict)
                and "value" in value
            ):
                value = value["value"]  # 0.3 wraps a non-object value this way
            data.append(_normalize(value))
        # file, raw and url parts are not merged into the output
    return data, texts


def _merge(groups: Iterable[tuple[list[JsonValue], list[str]]]) -> JsonObject:
    output: JsonObject = {}
    texts: list[str] = []
    for data, group_texts in groups:
        for value in data:
            output.update(value if isinstance(value, dict) else {"data": value})
        texts.extend(group_texts)
    if texts and "text" not in output:
        output["text"] = "\n".join(texts)
    return output


def _message_parts(message: Any, where: str) -> tuple[list[JsonValue], list[str]]:
    if message is None:
        return [], []
    return _part_values(_list(_object(message, where).get("parts"), f"{where}.parts"), where)


def _state(raw: Any) -> TaskState:
    if not isinstance(raw, str) or raw not in _STATES:
        raise _Malformed(f"unknown task state {str(raw)[:60]!r}")
    return _STATES[raw]


def _history_ids(task: dict[str, Any]) -> tuple[str, ...]:
    """The message ids in a task's history; whatever is not a message with a string id is passed over."""
    history = task.get("history")
    if not isinstance(history, list):
        return ()
    return tuple(
        m["messageId"]
        for m in history
        if isinstance(m, dict) and isinstance(m.get("messageId"), str) and m["messageId"]
    )


def _from_task(task: dict[str, Any]) -> Outcome:
    task_id = task.get("id")
    if not isinstance(task_id, str) or not task_id:
        raise _Malformed("the task has no id")
    history_ids = _history_ids(task)
    status = _object(task.get("status"), "task.status")
    state = _state(status.get("state"))
    status_parts = _message_parts(status.get("message"), "task.status.message")
    message_text = "\n".join(status_parts[1])
    if state is TaskState.COMPLETED:
        artifacts = [
            _object(a, f"task.artifacts[{i}]") for i, a in enumerate(_list(task.get("artifacts"), "artifacts"))
        ]
        groups = [
            _part_values(_list(a.get("parts"), f"task.artifacts[{i}].parts"), f"task.artifacts[{i}]")
            for i, a in enumerate(artifacts)
        ]
        groups.append(status_parts)
        kept = [_object(_normalize(a), "artifact") for a in artifacts]
        return Completed(output=_merge(groups), artifacts=kept, task_id=task_id, history_ids=history_ids)
    if state in _FINAL_FAILURES:
        text = message_text or f"the agent reported the task {state.value}"
        return Failed(ErrorKind.AGENT_FAILED.value, clip(text, MAX_MESSAGE_CHARS), retriable=False, state=state)
    if state in _PENDING:
        return Pending(task_id=task_id, state=state, history_ids=history_ids)
    asks = state is TaskState.INPUT_REQUIRED
    kind: Literal["input_required", "auth_required"] = "input_required" if asks else "auth_required"
    text = message_text or f"the agent needs {'input' if asks else 'authentication'}"
    context_id = task.get("contextId")
    return Interrupted(
        kind=kind,
        # A question goes to a person whole (up to what a question carries); anything else is an error message.
        message=clip(text, MAX_TEXT_CHARS if asks else MAX_MESSAGE_CHARS),
        task_id=task_id,
        data=_merge([(status_parts[0], [])]) if status_parts[0] else None,
        context_id=context_id if isinstance(context_id, str) and context_id else None,
        history_ids=history_ids,
    )


def _from_result(result: dict[str, Any]) -> Outcome:
    if isinstance(result.get("task"), dict):  # 1.0 SendMessage: {"task": {...}}
        return _from_task(result["task"])
    if isinstance(result.get("message"), dict) and "status" not in result:  # 1.0 SendMessage: {"message": {...}}
        return Completed(output=_merge([_message_parts(result["message"], "message")]))
    kind = result.get("kind")
    if kind == "task" or (kind is None and "status" in result):  # 0.3 result, or 1.0 GetTask / CancelTask
        return _from_task(result)
    if kind == "message" or (kind is None and "parts" in result):
        return Completed(output=_merge([_message_parts(result, "message")]))
    raise _Malformed("the result is neither a task nor a message")


def _from_error(error: Any) -> Failed:
    if not isinstance(error, dict):
        raise _Malformed("the JSON-RPC error is not an object")
    code = error.get("code")
    message = error.get("message")
    shown_code = code if isinstance(code, int) and not isinstance(code, bool) else "?"
    shown_message = message if isinstance(message, str) and message else "(no message)"
    retriable = shown_code == _JSONRPC_INTERNAL_ERROR
    return Failed(
        ErrorKind.JSONRPC_ERROR.value,
        clip(f"code {shown_code}: {shown_message}", MAX_MESSAGE_CHARS),
        retriable=retriable,
    )


def _parse(body: bytes, protocol_version: ProtocolVersion, request_id: RequestId | None) -> Outcome:
    try:
        doc = strict_loads(body)
    except StrictJsonError as error:  # NaN, Infinity, 1e999: say which, not "not JSON"
        raise _Malformed(str(error)) from None
    except (ValueError, RecursionError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else type(error).__name__
        raise _Malformed(f"not JSON ({reason}): {snippet(body)}") from None
    if not isinstance(doc, dict):
        raise _Malformed(f"expected a JSON-RPC object, got {type(doc).__name__}")
    if doc.get("jsonrpc") != "2.0":
        raise _Malformed("not a JSON-RPC 2.0 response")
    answered_id = doc.get("id")
    if request_id is not None and answered_id is not None and answered_id != request_id:
        raise _Malformed(f"response id {str(answered_id)[:60]!r} is not the request id {request_id!r}")
    if "error" in doc and doc["error"] is not None:
        return _from_error(doc["error"])
    if "result" not in doc:
        raise _Malformed("neither result nor error")
    try:
        return _from_result(_object(doc["result"], "result"))
    except _Malformed as error:
        raise _Malformed(f"not an A2A {protocol_version} answer: {error}") from None


def parse_response(body: bytes, protocol_version: ProtocolVersion, *, request_id: RequestId | None = None) -> Outcome:
    """Read an agent's answer to any of the requests above; never raises.

    Args:
        body: The HTTP response body, as received.
        protocol_version: The version the request was made with.
        request_id: If given, an answer carrying another (non-null) id is malformed.

    Returns:
        The outcome; see the module docstring for the mapping rules.
    """
    try:
        return _parse(bytes(body), protocol_version, request_id)
    except _Malformed as error:
        return Failed(ErrorKind.MALFORMED_RESPONSE.value, clip(str(error), MAX_MESSAGE_CHARS), retriable=False)
    except RecursionError:
        return Failed(ErrorKind.MALFORMED_RESPONSE.value, "the response is nested too deeply", retriable=False)
