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
    * The message id is a UUID 5 of the correlation id (:func:`message_id_for`),
      so a repeated attempt carries the same id and an agent that deduplicates
      can. The idempotency key (the correlation id) with ``run_id``,
      ``step_id`` and ``attempt`` travels as ``metadata`` twice: on the request
      (what the SDK hands the executor as ``RequestContext.metadata``) and on
      the message (kept in the task's history).
    * The step input is one data part. In 0.3 a data part must be an object, so
      any other value is wrapped as ``{"value": v}`` with the part metadata
      ``data_part_compat: true``, exactly as the SDK's own conversion does.
      If the input is an object with a non-empty string ``text`` field, a text
      part with that string follows the data part, for agents that only read
      text (the SDK refuses empty text parts); the data part stays the
      authoritative input.
    * 1.0 requests ask for ``historyLength: 0`` so the answer does not echo the
      input back. 0.3 reads 0 as "unlimited", so 0.3 requests leave it out.

Responses (:func:`parse_response`, which never raises)
    * A task ``COMPLETED`` gives :class:`Completed`. Its ``output`` merges the
      parts of every artifact (in order) and then of the final status message:
      data parts that are objects are merged key by key, later parts winning,
      so the status message has the last word; a data part that is not an
      object counts as ``{"data": value}``; text parts are joined with
      newlines as ``text`` unless a data part already set ``text``. File parts
      are not merged. The artifacts are kept as they came. The task's history
      (the caller's own messages) is ignored.
    * ``FAILED``, ``REJECTED`` and ``CANCELED`` give :class:`Failed` with kind
      ``agent_failed`` and the text of the status message (or the state when
      the agent gave no text); not retriable, the agent said no.
    * ``SUBMITTED`` and ``WORKING`` give :class:`Pending`: poll ``GetTask``.
    * ``INPUT_REQUIRED`` and ``AUTH_REQUIRED`` give :class:`Interrupted`.
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

Agent cards (:func:`parse_agent_card`)
    A 1.0 card lists ``supportedInterfaces`` with ``url``, ``protocolBinding``
    and ``protocolVersion``; the first ``JSONRPC`` interface of version 1.x
    wins, then the first of version 0.3.x. Failing that, a 0.3 card's
    top-level ``url`` and ``protocolVersion`` (missing means 0.3, as the SDK
    reads it) are used. Only http(s) URLs with a host are accepted; a relative
    URL is resolved against the card's base URL.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal
from urllib.parse import urljoin, urlsplit

from pydantic import JsonValue

from models.agents import ProtocolVersion
from models.messages import AgentTask, ErrorKind

__all__ = [
    "AGENT_CARD_PATH",
    "MESSAGE_ID_NAMESPACE",
    "MAX_MESSAGE_CHARS",
    "VERSION_HEADER",
    "AgentCardError",
    "CardInfo",
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
    "is_http_url",
    "message_id_for",
    "parse_agent_card",
    "parse_response",
    "request_headers",
    "send_message_request",
]

JsonObject = dict[str, JsonValue]
RequestId = str | int

AGENT_CARD_PATH: Final = "/.well-known/agent-card.json"
VERSION_HEADER: Final = "A2A-Version"
MESSAGE_ID_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:switchyard:a2a:message-id")
"""Namespace of the UUID 5 message ids; changing it changes every message id."""
MAX_MESSAGE_CHARS: Final = 2000
"""Longest error message taken from an agent (``AgentError`` allows 10,000)."""

_METHODS: Final[dict[ProtocolVersion, tuple[str, str, str]]] = {
    "1.0": ("SendMessage", "GetTask", "CancelTask"),
    "0.3": ("message/send", "tasks/get", "tasks/cancel"),
}
_SNIPPET_CHARS: Final = 120
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
    """The agent finished: its output, and the artifacts as they came."""

    output: JsonObject
    artifacts: list[JsonObject] = field(default_factory=list)
    task_id: str | None = None


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
    """The task is accepted but not finished: poll ``GetTask`` with ``task_id``."""

    task_id: str
    state: TaskState


@dataclass(frozen=True)
class Interrupted:
    """The agent waits for something only a human (or an operator) can give."""

    kind: Literal["input_required", "auth_required"]
    message: str
    task_id: str = ""


Outcome = Completed | Failed | Pending | Interrupted


class _Malformed(Exception):
    """Internal: the response does not have the shape of an A2A answer."""


class AgentCardError(ValueError):
    """An agent card could not be fetched or read; the message says why, in one line."""

    def __init__(self, reason: str) -> None:
        self.reason = " ".join(reason.split())
        super().__init__(self.reason)


@dataclass(frozen=True)
class CardInfo:
    """What the bridge needs from an agent card.

    Attributes:
        name: The agent's name.
        url: The JSON-RPC endpoint to call.
        protocol_version: ``1.0`` or ``0.3``: how to call ``url``.
        description: The card's description.
        version: The agent's own version string.
        skills: The ids of the agent's skills.
        streaming: Whether the agent says it can stream.
    """

    name: str
    url: str
    protocol_version: ProtocolVersion
    description: str = ""
    version: str = ""
    skills: tuple[str, ...] = ()
    streaming: bool = False


# --- requests ----------------------------------------------------------------------------------------------------


def message_id_for(correlation_id: str) -> str:
    """The message id of an attempt: a UUID 5 of its correlation id, the same on every retry."""
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, correlation_id))


def request_headers(protocol_version: ProtocolVersion) -> dict[str, str]:
    """The HTTP headers every JSON-RPC request carries (credentials are added by the caller)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if protocol_version == "1.0":
        headers[VERSION_HEADER] = "1.0"
    return headers


def _envelope(method: str, params: JsonObject, request_id: RequestId) -> JsonObject:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


def _input_parts(value: JsonValue, protocol_version: ProtocolVersion) -> list[JsonValue]:
    parts: list[JsonValue] = []
    if protocol_version == "1.0":
        parts.append({"data": value})
    elif isinstance(value, dict):
        parts.append({"kind": "data", "data": value})
    else:
        parts.append({"kind": "data", "data": {"value": value}, "metadata": {"data_part_compat": True}})
    text = value.get("text") if isinstance(value, dict) else None
    if isinstance(text, str) and text:  # the SDK refuses an empty text part
        parts.append({"text": text} if protocol_version == "1.0" else {"kind": "text", "text": text})
    return parts


def send_message_request(task: AgentTask, protocol_version: ProtocolVersion, *, request_id: RequestId) -> JsonObject:
    """The JSON-RPC body that hands one attempt of a step to an agent.

    Args:
        task: The attempt: its input, correlation id, run, step and attempt number.
        protocol_version: ``1.0`` (``SendMessage``) or ``0.3`` (``message/send``).
        request_id: The JSON-RPC id.

    Returns:
        The body, ready for ``json.dumps``.
    """
    metadata: JsonObject = {
        "idempotency_key": task.correlation_id,
        "run_id": task.run_id,
        "step_id": task.step_id,
        "attempt": task.attempt,
    }
    message: JsonObject = {
        "messageId": message_id_for(task.correlation_id),
        "role": "ROLE_USER" if protocol_version == "1.0" else "user",
        "parts": _input_parts(task.input, protocol_version),
        "metadata": dict(metadata),
    }
    params: JsonObject = {"message": message, "metadata": metadata}
    if protocol_version == "1.0":
        params["configuration"] = {"historyLength": 0}
    else:
        message["kind"] = "message"
    return _envelope(_METHODS[protocol_version][0], params, request_id)


def get_task_request(task_id: str, protocol_version: ProtocolVersion, *, request_id: RequestId) -> JsonObject:
    """The JSON-RPC body asking for a task's current state (``GetTask`` / ``tasks/get``)."""
    params: JsonObject = {"id": task_id}
    if protocol_version == "1.0":
        params["historyLength"] = 0
    return _envelope(_METHODS[protocol_version][1], params, request_id)


def cancel_task_request(task_id: str, protocol_version: ProtocolVersion, *, request_id: RequestId) -> JsonObject:
    """The JSON-RPC body asking an agent to cancel a task (``CancelTask`` / ``tasks/cancel``)."""
    return _envelope(_METHODS[protocol_version][2], {"id": task_id}, request_id)


# --- responses ---------------------------------------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise _Malformed(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Malformed(f"number {text[:40]} is out of range")
    return value


def _loads(body: bytes) -> Any:
    return json.loads(body, parse_constant=_no_constants, parse_float=_finite_float)


def _snippet(body: bytes) -> str:
    return repr(body[:_SNIPPET_CHARS]) + ("..." if len(body) > _SNIPPET_CHARS else "")


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


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


def _from_task(task: dict[str, Any]) -> Outcome:
    task_id = task.get("id")
    if not isinstance(task_id, str) or not task_id:
        raise _Malformed("the task has no id")
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
        return Completed(output=_merge(groups), artifacts=kept, task_id=task_id)
    if state in _FINAL_FAILURES:
        text = message_text or f"the agent reported the task {state.value}"
        return Failed(ErrorKind.AGENT_FAILED.value, _clip(text), retriable=False, state=state)
    if state in _PENDING:
        return Pending(task_id=task_id, state=state)
    kind: Literal["input_required", "auth_required"] = (
        "input_required" if state is TaskState.INPUT_REQUIRED else "auth_required"
    )
    text = message_text or f"the agent needs {'input' if kind == 'input_required' else 'authentication'}"
    return Interrupted(kind=kind, message=_clip(text), task_id=task_id)


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
    return Failed(ErrorKind.JSONRPC_ERROR.value, _clip(f"code {shown_code}: {shown_message}"), retriable=retriable)


def _parse(body: bytes, protocol_version: ProtocolVersion, request_id: RequestId | None) -> Outcome:
    try:
        doc = _loads(body)
    except (ValueError, RecursionError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else type(error).__name__
        raise _Malformed(f"not JSON ({reason}): {_snippet(body)}") from None
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
        return Failed(ErrorKind.MALFORMED_RESPONSE.value, _clip(str(error)), retriable=False)
    except RecursionError:
        return Failed(ErrorKind.MALFORMED_RESPONSE.value, "the response is nested too deeply", retriable=False)


# --- agent cards ---------------------------------------------------------------------------------------------------


def is_http_url(url: str) -> bool:
    """Whether ``url`` is an absolute http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def _version_of(raw: Any) -> ProtocolVersion | None:
    text = raw.strip() if isinstance(raw, str) else ""
    if text == "1" or text.startswith("1."):
        return "1.0"
    if text == "0.3" or text.startswith("0.3."):
        return "0.3"
    return None


def _endpoint(raw_url: Any, base_url: str, where: str) -> str:
    if not isinstance(raw_url, str) or not raw_url.strip():
        raise AgentCardError(f"the agent card's {where} has no url")
    url = urljoin(base_url, raw_url.strip())
    if not is_http_url(url):
        raise AgentCardError(f"the agent card's {where} url {url[:200]!r} is not an http(s) URL")
    return url


def _choose_interface(card: Mapping[str, Any], base_url: str) -> tuple[str, ProtocolVersion]:
    interfaces = card.get("supportedInterfaces")
    candidates: dict[ProtocolVersion, tuple[int, Any]] = {}
    if isinstance(interfaces, list):
        for index, interface in enumerate(interfaces):
            if not isinstance(interface, dict):
                continue
            binding = interface.get("protocolBinding", interface.get("transport"))
            version = _version_of(interface.get("protocolVersion"))
            if isinstance(binding, str) and binding.upper() == "JSONRPC" and version is not None:
                candidates.setdefault(version, (index, interface.get("url")))
    for version in ("1.0", "0.3"):
        if version in candidates:
            index, raw_url = candidates[version]
            return _endpoint(raw_url, base_url, f"supportedInterfaces[{index}]"), version
    if "url" in card:
        transport = card.get("preferredTransport", "JSONRPC")
        if not isinstance(transport, str) or transport.upper() != "JSONRPC":
            raise AgentCardError(f"the agent card's preferred transport {str(transport)[:40]!r} is not JSONRPC")
        raw_version = card.get("protocolVersion", "0.3")
        top_version = _version_of(raw_version)
        if top_version is None:
            raise AgentCardError(f"the agent card's protocolVersion {str(raw_version)[:40]!r} is neither 1.x nor 0.3")
        return _endpoint(card["url"], base_url, "top-level"), top_version
    raise AgentCardError(
        "the agent card has no JSONRPC interface of protocol 1.0 or 0.3 in supportedInterfaces and no top-level url"
    )


def parse_agent_card(body: bytes, base_url: str) -> CardInfo:
    """Read an agent card (``GET {base}/.well-known/agent-card.json``).

    Args:
        body: The card as received.
        base_url: Where it was fetched from; resolves relative URLs.

    Returns:
        The endpoint to call and how, with the card's name and description.

    Raises:
        AgentCardError: Naming what is missing or invalid.
    """
    try:
        card = _loads(body)
    except (ValueError, RecursionError, _Malformed):
        raise AgentCardError(f"the agent card is not valid JSON: {_snippet(bytes(body))}") from None
    if not isinstance(card, dict):
        raise AgentCardError(f"the agent card is a JSON {type(card).__name__}, not an object")
    name = card.get("name")
    if not isinstance(name, str) or not name.strip():
        raise AgentCardError("the agent card has no name")
    url, version = _choose_interface(card, base_url)
    description = card.get("description")
    agent_version = card.get("version")
    skills = card.get("skills")
    capabilities = card.get("capabilities")
    return CardInfo(
        name=name.strip(),
        url=url,
        protocol_version=version,
        description=description if isinstance(description, str) else "",
        version=agent_version if isinstance(agent_version, str) else "",
        skills=tuple(
            s["id"]
            for s in (skills if isinstance(skills, list) else [])
            if isinstance(s, dict) and isinstance(s.get("id"), str)
        ),
        streaming=isinstance(capabilities, dict) and capabilities.get("streaming") is True,
    )
