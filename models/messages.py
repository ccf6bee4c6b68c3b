"""Messages on the topics: JSON bytes, each with a ``schema_version``.

Every message is a frozen pydantic model. :func:`encode` turns one into bytes;
:func:`decode` turns untrusted bytes into one or raises
:class:`MessageDecodeError`, the single error type callers catch (malformed
bytes, invalid UTF-8, wrong JSON shape, unknown schema version, too large).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    model_validator,
)

from models.plan import WorkflowPlan

__all__ = [
    "RUN_ID_PATTERN",
    "RunId",
    "SCHEMA_VERSION",
    "AgentCancel",
    "AgentError",
    "AgentResult",
    "AgentQuestion",
    "AgentTask",
    "Answer",
    "ControlCommand",
    "ControlMessage",
    "DeadLetterRecord",
    "ErrorKind",
    "Message",
    "MessageDecodeError",
    "MonitoringUpdate",
    "Question",
    "Reply",
    "ResultStatus",
    "WorkflowSubmission",
    "correlation_id",
    "decode",
    "encode",
    "new_run_id",
    "submission_fingerprint",
    "utcnow",
]

SCHEMA_VERSION: Final = 1
RUN_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
RunId = Annotated[str, Field(pattern=RUN_ID_PATTERN, description="Letters, digits, '.', '_', ':' and '-'.")]


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def new_run_id() -> str:
    """A fresh, random run id."""
    return str(uuid.uuid4())


def correlation_id(run_id: str, step_id: str, attempt: int, iteration: int = 1, item: int | None = None) -> str:
    """The id of one attempt of one execution of a step: also the agent call's idempotency key.

    It is derived, not random, so that a re-dispatch after a crash carries the
    same id and the bridge and agents can recognise the repeat. ``/``, ``@``
    and ``[`` appear in neither run ids nor step ids, so the id is
    unambiguous: ``run/step/2`` for the second attempt of a plain step,
    ``run/step@3/1`` in a loop's third iteration, ``run/step@1[17]/1`` for
    item 17 of a map.
    """
    if iteration == 1 and item is None:
        return f"{run_id}/{step_id}/{attempt}"
    where = f"{step_id}@{iteration}" if item is None else f"{step_id}@{iteration}[{item}]"
    return f"{run_id}/{where}/{attempt}"


class ErrorKind(StrEnum):
    """Known error kinds. Agents and later versions may add others."""

    AGENT_FAILED = "agent_failed"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    HTTP_STATUS = "http_status"
    JSONRPC_ERROR = "jsonrpc_error"
    MALFORMED_RESPONSE = "malformed_response"
    INPUT_REQUIRED = "input_required"
    AUTH_REQUIRED = "auth_required"
    UNKNOWN_AGENT = "unknown_agent"
    MAPPING_ERROR = "mapping_error"
    INVALID_PLAN = "invalid_plan"
    INVALID_SUBMISSION = "invalid_submission"
    CANCELLED = "cancelled"
    CONFIGURATION = "configuration"
    BRIDGE_ERROR = "bridge_error"
    REGISTRY_UNAVAILABLE = "registry_unavailable"
    STATE_TOO_LARGE = "state_too_large"
    CONDITION_ERROR = "condition_error"
    LOOP_EXHAUSTED = "loop_exhausted"
    INVALID_MAP_LIST = "invalid_map_list"
    OUTPUT_TOO_LARGE = "output_too_large"
    UNREADABLE_STATE = "unreadable_state"
    INPUT_TIMEOUT = "input_timeout"
    REJECTED = "rejected"


class ResultStatus(StrEnum):
    """The outcome of one agent call: done, failed, or stopped to ask a person (A2A ``INPUT_REQUIRED``)."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    INPUT_REQUIRED = "INPUT_REQUIRED"


class Message(BaseModel):
    """Base of all wire messages: frozen, strict about unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION


class AgentError(BaseModel):
    """Why an agent call failed.

    Attributes:
        kind: One of :class:`ErrorKind`, or an agent's own kind.
        message: The agent's own message where there is one.
        retriable: Whether trying again may help.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(min_length=1, max_length=100)
    message: str = Field(max_length=10_000)
    retriable: bool = False


MAX_TEXT_CHARS: Final = 10_000
"""The longest question or answer text (its data is bounded by the message size)."""


class Question(BaseModel):
    """What a person is asked: an agent's question (A2A ``INPUT_REQUIRED``), or an approval step's prompt.

    Attributes:
        text: The question in words (the text parts of the agent's status message).
        data: Structured content that goes with it (its data parts, merged), if any.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field("", max_length=MAX_TEXT_CHARS)
    data: JsonValue = None


class AgentQuestion(Question):
    """An agent's question, with the A2A task that waits for the answer.

    Attributes:
        task_id: The agent's task, continued by the answer (same ``taskId``).
        context_id: The task's context (same ``contextId``).
    """

    task_id: str = Field(min_length=1, max_length=400)
    context_id: str | None = Field(None, max_length=400)


class Answer(BaseModel):
    """A person's answer to a question, or decision on an approval.

    Attributes:
        answer_id: Names this answer: the same answer delivered twice is applied once.
        text: The answer in words.
        data: Structured content.
        decision: An approval step's ``approve`` or ``reject`` (None for an agent's question).
        source: Where it came from (``http``, ``cli``, ``timeout`` for a default decision).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    answer_id: str = Field(default_factory=lambda: str(uuid.uuid4()), min_length=1, max_length=100)
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    data: JsonValue = None
    decision: Literal["approve", "reject"] | None = None
    source: str | None = Field(None, max_length=100)


class Reply(BaseModel):
    """The answer an attempt carries back to the agent's waiting A2A task.

    Attributes:
        task_id: The agent's task (its ``taskId``).
        context_id: Its ``contextId``.
        text: The answer's text (a text part).
        data: The answer's data (a data part).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str = Field(min_length=1, max_length=400)
    context_id: str | None = Field(None, max_length=400)
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    data: JsonValue = None


def submission_fingerprint(plan: WorkflowPlan, run_input: dict[str, JsonValue]) -> str:
    """A stable hash of what a submission asks for (its plan and input, not its time).

    A run_id means one run: a second submission with the same id is the same
    request again when its fingerprint is equal, and a conflict otherwise.
    """
    canonical = json.dumps(
        {"plan": plan.fingerprint(), "input": run_input}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


class WorkflowSubmission(Message):
    """Start a run: what a producer puts on ``orchestrator.plans`` (key = run_id)."""

    run_id: RunId
    plan: WorkflowPlan
    input: dict[str, JsonValue] = Field(default_factory=dict)
    submitted_at: AwareDatetime = Field(default_factory=utcnow)

    def fingerprint(self) -> str:
        """See :func:`submission_fingerprint`."""
        return submission_fingerprint(self.plan, self.input)


class AgentTask(Message):
    """One attempt of one step, for the bridge to carry out (key = run_id)."""

    correlation_id: str = Field(min_length=1, max_length=400)
    run_id: RunId
    step_id: str = Field(min_length=1, max_length=128)
    attempt: int = Field(ge=1)
    iteration: int = Field(1, ge=1, le=1000, description="The loop iteration (1 outside loops).")
    item: int | None = Field(None, ge=0, description="The item of a map step (None outside maps).")
    agent_name: str = Field(min_length=1, max_length=200)
    input: JsonValue
    deadline: AwareDatetime
    turn: int = Field(0, ge=0, description="How many answers the call carries on from (0: the first message).")
    reply: Reply | None = Field(None, description="From turn 1: the answer that continues the agent's task.")

    @model_validator(mode="after")
    def _reply_from_turn_one(self) -> AgentTask:
        if (self.turn > 0) != (self.reply is not None):
            raise ValueError("a task after an answer (turn > 0) carries a reply, and only such a task does")
        return self

    @property
    def call_id(self) -> str:
        """The id of this call to the agent: the correlation id, and the turn once answers carry it on."""
        return self.correlation_id if self.turn == 0 else f"{self.correlation_id}#{self.turn}"


class AgentResult(Message):
    """The outcome of one attempt, from the bridge (key = run_id)."""

    correlation_id: str = Field(min_length=1, max_length=400)
    run_id: RunId
    step_id: str = Field(min_length=1, max_length=128)
    attempt: int = Field(ge=1)
    iteration: int = Field(1, ge=1, le=1000, description="The loop iteration (1 outside loops).")
    item: int | None = Field(None, ge=0, description="The item of a map step (None outside maps).")
    status: ResultStatus
    output: JsonValue = None
    error: AgentError | None = None
    question: AgentQuestion | None = Field(None, description="What an INPUT_REQUIRED agent asks.")
    turn: int = Field(0, ge=0, description="The task's turn this answers (AgentTask.turn).")
    started_at: AwareDatetime
    finished_at: AwareDatetime

    @model_validator(mode="after")
    def _error_matches_status(self) -> AgentResult:
        if self.status is ResultStatus.FAILURE and self.error is None:
            raise ValueError("a FAILURE result needs an error")
        if self.status is not ResultStatus.FAILURE and self.error is not None:
            raise ValueError(f"a {self.status} result cannot carry an error")
        if (self.status is ResultStatus.INPUT_REQUIRED) != (self.question is not None):
            raise ValueError("an INPUT_REQUIRED result carries the agent's question, and only such a result does")
        return self


class MonitoringUpdate(Message):
    """A change worth showing live, on ``orchestrator.monitoring``."""

    run_id: RunId
    step_id: str | None = None
    attempt: int | None = None
    iteration: int | None = None
    item: int | None = None
    status: str
    timestamp: AwareDatetime = Field(default_factory=utcnow)
    detail: dict[str, JsonValue] = Field(default_factory=dict)


class ControlCommand(StrEnum):
    """What a control message asks for."""

    CANCEL = "cancel"
    RETRY = "retry"
    RESUME = "resume"
    RESTORE = "restore"
    STEP_TIMEOUT = "step_timeout"
    EVICT = "evict"
    INPUT = "input"


class ControlMessage(Message):
    """A command about one run, on ``orchestrator.control`` (key = run_id).

    Users send ``cancel``, ``retry`` and ``resume`` (rebuild the run from its
    PostgreSQL checkpoint if the executor lost it, and re-dispatch what is in
    flight), and ``input``: the ``answer`` to the question that an execution
    (``step_id``, ``iteration``, ``item``) waits on, its ``turn``-th (from 0).
    The executor sends itself ``step_timeout`` from its timers,
    ``restore`` after a rebalance and ``evict`` when a finished run's
    retention is over (tables are only written by agents, so a timer sends an
    event instead of changing the run itself).
    """

    run_id: RunId
    command: ControlCommand
    step_id: str | None = Field(None, max_length=128)
    attempt: int | None = Field(None, ge=1)
    iteration: int = Field(1, ge=1, le=1000)
    item: int | None = Field(None, ge=0)
    reason: str | None = Field(None, max_length=2000)
    answer: Answer | None = None
    turn: int | None = Field(None, ge=0)
    requested_at: AwareDatetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _timeout_names_attempt(self) -> ControlMessage:
        if self.command is ControlCommand.STEP_TIMEOUT and (self.step_id is None or self.attempt is None):
            raise ValueError("a step_timeout names its step_id and attempt")
        if self.command is ControlCommand.INPUT and (self.step_id is None or self.answer is None or self.turn is None):
            raise ValueError("an input names its step_id, turn and answer")
        return self


class AgentCancel(Message):
    """Ask the bridge to cancel an attempt's A2A task, on ``orchestrator.tasks.cancel`` (key = run_id)."""

    correlation_id: str = Field(min_length=1, max_length=400)
    run_id: RunId
    step_id: str = Field(min_length=1, max_length=128)
    attempt: int = Field(ge=1)
    iteration: int = Field(1, ge=1, le=1000, description="The loop iteration (1 outside loops).")
    item: int | None = Field(None, ge=0, description="The item of a map step (None outside maps).")
    agent_name: str = Field(min_length=1, max_length=200)
    task_id: str | None = Field(None, max_length=400, description="The agent's task, when the executor knows it.")


class DeadLetterRecord(Message):
    """Something that could not be processed, on ``orchestrator.deadletter``, with the reason.

    A dead letter is never lost for being large: when the original would not
    fit in a message, the record keeps its first bytes, its size and its
    SHA-256 (``truncated`` is then true).

    Attributes:
        source_topic: Where it was read from.
        key: The message key as text (None if it had none; its start if very long).
        reason: Why it was parked, in plain words.
        payload: The original bytes (or their start) as UTF-8 text when they are text.
        payload_base64: The original bytes (or their start) in base64 when they are not text.
        app: Which app parked it.
        original_bytes: The size of the original payload.
        original_sha256: The SHA-256 of the original payload, hex.
        truncated: Whether ``payload`` / ``payload_base64`` hold only the start of the original.
    """

    source_topic: str
    key: str | None = None
    reason: str
    payload: str | None = None
    payload_base64: str | None = None
    app: str
    received_at: AwareDatetime = Field(default_factory=utcnow)
    original_bytes: int | None = None
    original_sha256: str | None = None
    truncated: bool = False

    @classmethod
    def of(
        cls,
        source_topic: str,
        key: bytes | None,
        payload: bytes,
        reason: str,
        app: str,
        *,
        max_bytes: int | None = None,
    ) -> DeadLetterRecord:
        """Describe something that could not be processed, keeping the original bytes.

        Args:
            source_topic: Where it was read from.
            key: Its key.
            payload: Its bytes.
            reason: Why it is parked.
            app: Which app parks it.
            max_bytes: When given, the record's encoding (with :meth:`record_key`)
                fits in this many bytes: the payload is cut to its start if it must be.
        """
        full = cls._build(source_topic, key, payload, reason, app, len(payload))
        if max_bytes is None or full.fits(max_bytes):
            return full
        reason = _clip(reason, _REASON_CHARS)
        whole = cls._build(source_topic, key, payload, reason, app, len(payload))
        if whole.fits(max_bytes):
            return whole  # the reason was what did not fit
        keep = min(len(payload), max_bytes // 2)
        while keep > 0:
            cut = cls._build(source_topic, key, payload[:keep], reason, app, len(payload), original=payload)
            if cut.fits(max_bytes):
                return cut
            keep //= 2
        # Even without the payload it does not fit (a key and a reason of characters JSON escapes six
        # times): keep their starts. A few hundred bytes, below any limit the settings allow.
        short_key = None if key is None else key[:_SHORT_KEY_BYTES]
        return cls._build(
            source_topic, short_key, b"", _clip(reason, _SHORT_REASON_CHARS), app, len(payload), original=payload
        )

    @classmethod
    def _build(
        cls,
        source_topic: str,
        key: bytes | None,
        payload: bytes,
        reason: str,
        app: str,
        size: int,
        *,
        original: bytes | None = None,
    ) -> DeadLetterRecord:
        try:
            # A cut may split a UTF-8 sequence; the text that remains is still text.
            text: str | None = payload.decode("utf-8") if original is None else _text_prefix(payload)
            encoded: str | None = None
        except UnicodeDecodeError:
            text, encoded = None, base64.b64encode(payload).decode()
        whole = original if original is not None else payload
        key_text = None if key is None else _key_text(key)
        return cls(
            source_topic=source_topic,
            key=key_text,
            reason=reason,
            payload=text,
            payload_base64=encoded,
            app=app,
            original_bytes=size,
            original_sha256=hashlib.sha256(whole).hexdigest(),
            truncated=original is not None,
        )

    def record_key(self) -> bytes:
        """The Kafka key to park it under (the original key, or its start)."""
        return (self.key or "").encode()

    def fits(self, max_bytes: int) -> bool:
        """Whether its record (key and JSON value) takes at most ``max_bytes``."""
        return len(self.record_key()) + len(encode(self)) <= max_bytes


_REASON_CHARS = 2000
_KEY_BYTES = 1024
_SHORT_REASON_CHARS = 200
_SHORT_KEY_BYTES = 64


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 3] + "..."


def _key_text(key: bytes) -> str:
    """A key as text, at most ``_KEY_BYTES`` bytes once encoded (a UTF-8 key: its start, whole characters)."""
    try:
        return _text_prefix(key[:_KEY_BYTES]) if len(key) > _KEY_BYTES else key.decode("utf-8")
    except UnicodeDecodeError:
        text = key[:_KEY_BYTES].decode("utf-8", "replace")
        while len(text.encode()) > _KEY_BYTES:  # each replacement character takes 3 bytes
            text = text[:-1]
        return text


def _text_prefix(payload: bytes) -> str:
    """The start of a UTF-8 text, without the partial character a cut may leave at its end.

    Raises:
        UnicodeDecodeError: The bytes are not UTF-8 text.
    """
    for trim in range(3):
        try:
            return payload[: max(0, len(payload) - trim)].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return payload[: max(0, len(payload) - 3)].decode("utf-8")


class MessageDecodeError(ValueError):
    """Bytes could not be turned into a message.

    Attributes:
        message_type: The message type that was expected.
        reason: What was wrong, in plain words, with the JSON path when the
            shape was wrong.
    """

    def __init__(self, message_type: str, reason: str) -> None:
        self.message_type = message_type
        self.reason = reason
        super().__init__(f"cannot decode {message_type}: {reason}")


M = TypeVar("M", bound=Message)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
"""Where a lone surrogate can come from: JSON text holds one only as a ``\\uD8xx``-``\\uDFxx`` escape."""


def _has_lone_surrogate(value: Any) -> bool:
    """Whether decoded JSON holds a string that cannot be UTF-8 (nothing could encode or store it)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def encode(message: Message) -> bytes:
    """Serialize a message to compact JSON bytes."""
    return message.model_dump_json().encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loc(loc: tuple[int | str, ...]) -> str:
    out = "$"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def decode(message_type: type[M], raw: bytes | str | dict[str, Any], *, max_bytes: int | None = None) -> M:
    """Turn untrusted input into a message, or raise one clear error.

    Args:
        message_type: The expected message class.
        raw: JSON bytes or text, or an already-decoded object.
        max_bytes: Reject payloads larger than this.

    Returns:
        The validated message.

    Raises:
        MessageDecodeError: For any problem with the input.
    """
    name = message_type.__name__
    if isinstance(raw, bytes | bytearray | memoryview):
        raw = bytes(raw)
        if max_bytes is not None and len(raw) > max_bytes:
            raise MessageDecodeError(name, f"payload of {len(raw)} bytes is over the limit of {max_bytes}")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise MessageDecodeError(name, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    if isinstance(raw, str):
        if max_bytes is not None and len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
            raise MessageDecodeError(name, f"payload is over the limit of {max_bytes} bytes")
        text = raw
        try:
            raw = json.loads(raw, parse_constant=_reject_constant)
        except json.JSONDecodeError as error:
            raise MessageDecodeError(
                name, f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
            ) from None
        except RecursionError:
            raise MessageDecodeError(name, "JSON is nested too deeply") from None
        except ValueError as error:  # NaN/Infinity, integers past Python's digit limit
            raise MessageDecodeError(name, f"not valid JSON: {error}") from None
        if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(raw):
            raise MessageDecodeError(name, "a \\u escape makes a lone surrogate (U+D800 to U+DFFF), which is not text")
    if not isinstance(raw, dict):
        raise MessageDecodeError(name, f"expected a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise MessageDecodeError(name, f"unsupported schema_version {version!r} (this version reads {SCHEMA_VERSION})")
    try:
        return message_type.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in error.errors(include_url=False)[:20])
        raise MessageDecodeError(name, problems) from None
    except RecursionError:
        raise MessageDecodeError(name, "value is nested too deeply") from None
