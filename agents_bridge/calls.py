"""Calling an A2A agent over aiohttp: deadlines, retries, polling.

:class:`AgentCaller` turns one :class:`~models.messages.AgentTask` into one
:class:`~models.messages.AgentResult`. It never raises for a problem with the
call (only ``asyncio.CancelledError`` goes through); every way a call can go
wrong becomes a FAILURE with a kind from :class:`~models.messages.ErrorKind`.
An agent that asks a question (task INPUT_REQUIRED) gives an INPUT_REQUIRED
result carrying it (:class:`~models.messages.AgentQuestion`: its text and
data, the task's id and context), logged at INFO; ``auth_required`` stays a
FAILURE, not retriable. Every result carries the task's ``turn``.

Answers (a task with a ``reply``, turn 1 on)
    The answer continues the agent's task: first a GetTask of
    ``reply.task_id`` with its whole history. If the message id of this turn
    (``message_id_for(task.call_id)``) is in that history, the answer reached
    the agent before (a bridge died after sending it, and the task came
    again): it is not sent again, and the call goes on from the task's state
    (working: polled; a new question; completed or failed). Otherwise a task
    still INPUT_REQUIRED gets the answer (SendMessage with its ``taskId`` and
    ``contextId``), and the call goes on as any other; a task in another
    state (canceled, completed meanwhile...) gives that outcome, and a GetTask
    that fails (task not found: a JSON-RPC error) a FAILURE that names the
    task. A SendMessage that may have reached the agent (a timeout, a 5xx) is
    not simply sent again: the GetTask is made again first, so an answer
    reaches the agent once even across retries and a bridge's kill -9 (an
    agent that has not stored the message yet when the GetTask looks, which
    the a2a-sdk does when the executor's first event comes, may still get it
    twice).

Deadlines
    The whole call, retries and polling included, ends by ``task.deadline``.
    Each HTTP request is also bounded by :attr:`CallSettings.call_timeout_s`.
    A deadline that passes gives ``timeout`` (retriable: the executor's step
    retry decides what happens next).

Retries of one HTTP request (policy: ``agent.call_retry``)
    Connection errors, timeouts of a single request, HTTP 408, 429 and 5xx are
    tried again, up to ``max_attempts`` requests in all, after an exponential
    delay (``initial_delay_s * multiplier ** (n - 1)``, at most
    ``max_delay_s``, spread by ``± jitter``). A ``Retry-After`` header
    (seconds or an HTTP date) on any of these answers replaces the delay; if
    it, or any delay, would end after the deadline, the call gives up at once
    instead of sleeping in vain. When the attempts run out the result is a
    retriable FAILURE of kind ``connection``, ``timeout`` or ``http_status``.
    Other 4xx (and 3xx: redirects are not followed, so credentials never go to
    another host) are final: ``http_status``, not retriable. Any 2xx body is
    read as a JSON-RPC answer. A failure the
    agent reports (task FAILED, a JSON-RPC error, a malformed answer) is final
    too. A request retried after a timeout may reach the agent twice; it
    carries the same message id and idempotency key (at-least-once).

Polling
    SendMessage asks the agent to block until the task is done (the A2A
    default). A task that comes back SUBMITTED or WORKING is polled with
    GetTask every :attr:`CallSettings.poll_interval_s` (each poll retried like
    above) until it is terminal, interrupted, or the deadline passes. The
    agent's task id is remembered meanwhile (an answer's from the start), so
    :meth:`AgentCaller.cancel` accepts the correlation id; it also takes the
    task id itself (the executor knows it for an attempt that waits for an
    answer).

Credentials
    ``agent.auth.headers()`` is read at call time. A secret that names an
    unset environment variable gives a FAILURE of kind ``configuration``
    (:data:`CONFIGURATION_ERROR`), not retriable: the operator has to fix the
    environment; ``auth_required`` stays what it means in A2A, the agent
    asking for credentials. Headers are never logged; URLs are logged without
    user info or query.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Final

import aiohttp
from pydantic import JsonValue, ValidationError

from agents_bridge.a2a import (
    MAX_MESSAGE_CHARS,
    Completed,
    Failed,
    Interrupted,
    JsonObject,
    Outcome,
    Pending,
    TaskState,
    cancel_task_request,
    get_task_request,
    message_id_for,
    parse_response,
    request_headers,
    send_message_request,
)
from models.agents import AgentEntry, CallRetry, SecretReferenceError
from models.messages import (
    MAX_TEXT_CHARS,
    AgentError,
    AgentQuestion,
    AgentResult,
    AgentTask,
    ErrorKind,
    Reply,
    ResultStatus,
    utcnow,
)
from switchyard.http_read import TooLarge, read_limited, safe_url
from switchyard.wire import clip

__all__ = [
    "CONFIGURATION_ERROR",
    "INTERNAL_ERROR",
    "AgentCaller",
    "CallSettings",
    "backoff_delay",
    "parse_retry_after",
]

logger = logging.getLogger(__name__)

CONFIGURATION_ERROR: Final = ErrorKind.CONFIGURATION
"""Error kind: the registry entry cannot be used as it stands (e.g. its secret's variable is unset)."""
INTERNAL_ERROR: Final = ErrorKind.BRIDGE_ERROR
"""Error kind: a bug in the bridge itself; logged with its traceback, retriable."""

_RETRIED_STATUSES: Final = frozenset({408, 429})
_DEADLINE_GRACE_S: Final = 0.1
_COUNT_UP_TO: Final = 4
"""An answer over the limit with no Content-Length is read on (and dropped) up to this many times the limit,
so that its size can be named."""
_LOGGED_QUESTION_CHARS: Final = 200
"""How much of a question the INFO line shows (the whole question goes in the result)."""


@dataclass(frozen=True)
class CallSettings:
    """How the caller behaves, whatever the agent.

    Attributes:
        call_timeout_s: Upper bound of one HTTP request (the deadline may cut it shorter).
        poll_interval_s: Pause between two GetTask polls of a pending task.
        max_response_bytes: Larger answers are a final ``output_too_large`` (``SWITCHYARD_MAX_MESSAGE_BYTES``).
        cancel_timeout_s: Upper bound of a best-effort CancelTask request.
        remembered_tasks: How many correlation id -> agent task id pairs are kept for :meth:`AgentCaller.cancel`.
    """

    call_timeout_s: float = 60.0
    poll_interval_s: float = 0.5
    max_response_bytes: int = 8 * 1024 * 1024
    cancel_timeout_s: float = 5.0
    remembered_tasks: int = 10_000


@dataclass(frozen=True)
class _Transient:
    """A request that may succeed if tried again."""

    kind: str
    message: str
    retry_after_s: float | None = None


def backoff_delay(policy: CallRetry, failed_attempt: int, rng: random.Random) -> float:
    """The pause after the ``failed_attempt``-th request (counted from 1).

    Args:
        policy: The agent's retry policy.
        failed_attempt: The request that just failed.
        rng: Source of the jitter.

    Returns:
        ``min(max_delay_s, initial_delay_s * multiplier ** (failed_attempt - 1))``
        spread by ``± jitter``, never negative.
    """
    base = min(policy.max_delay_s, policy.initial_delay_s * policy.multiplier ** max(0, failed_attempt - 1))
    return max(0.0, base * (1 + policy.jitter * rng.uniform(-1.0, 1.0)))


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header.

    Args:
        value: The header: delay seconds (``"120"``) or an HTTP date.
        now: The current time, timezone-aware.

    Returns:
        Seconds (0 for a date in the past), or None if absent or unreadable.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


class _Call:
    """One :meth:`AgentCaller.call` in progress: the task, the agent, the deadline."""

    def __init__(self, caller: AgentCaller, task: AgentTask, agent: AgentEntry, deadline: float) -> None:
        self.caller = caller
        self.task = task
        self.agent = agent
        self.deadline = deadline  # loop.time() at which the task's deadline passes
        self._ids = itertools.count(1)

    def remaining(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def request_id(self) -> str:
        return f"{self.task.call_id}#{next(self._ids)}"

    def timeout_failure(self, doing: str) -> Failed:
        return Failed(ErrorKind.TIMEOUT.value, f"the deadline passed while {doing}", retriable=True)

    async def run(self, headers: Mapping[str, str]) -> Outcome:
        protocol = self.agent.protocol_version
        if self.task.reply is None:
            body = send_message_request(self.task, protocol, request_id=self.request_id())
            outcome = await self.rpc(body, headers)
        else:
            outcome = await self.answer(self.task.reply, headers)
        while isinstance(outcome, Pending):
            self.caller._remember(self.task.correlation_id, outcome.task_id)
            pause = min(self.caller.settings.poll_interval_s, self.remaining())
            if pause > 0:
                await asyncio.sleep(pause)
            if self.remaining() <= 0:
                return self.timeout_failure(f"the task was still {outcome.state.value}")
            logger.debug("polling task %s of %s", outcome.task_id, self.task.call_id)
            outcome = await self.rpc(get_task_request(outcome.task_id, protocol, request_id=self.request_id()), headers)
        return outcome

    async def answer(self, reply: Reply, headers: Mapping[str, str]) -> Outcome:
        """Continue the agent's waiting task with the answer, unless the answer already reached it.

        Returns:
            The outcome of the SendMessage that carried the answer, or the task's
            state when the answer was delivered before or the task no longer waits.
        """
        protocol = self.agent.protocol_version
        ours = message_id_for(self.task.call_id)
        # Known from the start: a cancel while the answer is being taken up reaches the task.
        self.caller._remember(self.task.correlation_id, reply.task_id)
        attempt = 0
        while True:
            attempt += 1
            look = get_task_request(reply.task_id, protocol, request_id=self.request_id(), history=True)
            current = await self.rpc(look, headers)
            if isinstance(current, Failed):
                if current.state is not None:
                    return current  # the task failed or was canceled: the agent's own words
                message = f"cannot continue the agent's task {reply.task_id}: {current.message}"
                return Failed(current.kind, clip(message, MAX_MESSAGE_CHARS), retriable=current.retriable)
            if ours in current.history_ids:
                logger.info(
                    "the answer of %s already reached task %s at %s: not sent again, going on from the task's state",
                    self.task.call_id,
                    reply.task_id,
                    self.agent.name,
                )
                return current
            if not (isinstance(current, Interrupted) and current.kind == "input_required"):
                logger.info(
                    "task %s at %s no longer waits for an answer (%s): the answer of %s is not sent",
                    reply.task_id,
                    self.agent.name,
                    type(current).__name__,
                    self.task.call_id,
                )
                return current
            body = send_message_request(self.task, protocol, request_id=self.request_id())
            sent = await self.post_once(body, headers)
            if not isinstance(sent, _Transient):
                return sent
            # It may have reached the agent all the same: look at the task again before sending it again.
            gave_up = await self.pause_before_retry(str(body["method"]), sent, attempt)
            if gave_up is not None:
                return gave_up

    async def post_once(self, body: JsonObject, headers: Mapping[str, str]) -> Outcome | _Transient:
        """One JSON-RPC request, cut at the deadline: the outcome, or a transient problem."""
        remaining = self.remaining()
        if remaining <= 0:
            return self.timeout_failure(f"calling {body['method']}")
        timeout_s = min(self.caller.settings.call_timeout_s, remaining)
        return await self.caller._post(self.agent, body, headers, timeout_s)

    async def rpc(self, body: JsonObject, headers: Mapping[str, str]) -> Outcome:
        """One JSON-RPC request, retried on transient problems as the agent's policy says."""
        method = str(body["method"])
        attempt = 0
        while True:
            attempt += 1
            answer = await self.post_once(body, headers)
            if not isinstance(answer, _Transient):
                return answer
            gave_up = await self.pause_before_retry(method, answer, attempt)
            if gave_up is not None:
                return gave_up

    async def pause_before_retry(self, method: str, answer: _Transient, attempt: int) -> Failed | None:
        """Wait before trying again after the ``attempt``-th transient failure, or the failure that ends the call.

        Returns:
            None once it has waited; a retriable failure when the attempts ran out or
            the deadline would pass first (then it does not wait).
        """
        policy = self.agent.call_retry
        if self.remaining() <= 0:
            return self.timeout_failure(f"calling {method} ({answer.message})")
        if attempt >= policy.max_attempts:
            return Failed(
                answer.kind,
                clip(f"gave up after {policy.max_attempts} attempts: {answer.message}", MAX_MESSAGE_CHARS),
                retriable=True,
            )
        delay = answer.retry_after_s
        if delay is None:
            delay = backoff_delay(policy, attempt, self.caller.rng)
        if delay >= self.remaining():
            logger.warning(
                "%s to %s for %s: %s; the next try would start after the deadline",
                method,
                self.agent.name,
                self.task.call_id,
                answer.message,
            )
            return Failed(
                answer.kind, clip(f"{answer.message}; no time left to try again", MAX_MESSAGE_CHARS), retriable=True
            )
        logger.warning(
            "%s to %s for %s failed (attempt %d of %d): %s; retrying in %.2fs",
            method,
            self.agent.name,
            self.task.call_id,
            attempt,
            policy.max_attempts,
            answer.message,
            delay,
        )
        await asyncio.sleep(delay)
        return None


class AgentCaller:
    """Calls agents for the bridge; one instance per worker, sharing one HTTP session.

    Args:
        session: The aiohttp session to use (owned by the caller's owner, who closes it).
        settings: Timeouts, poll interval and limits.
        rng: Source of the backoff jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: CallSettings | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.session = session
        self.settings = settings or CallSettings()
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._task_ids: OrderedDict[str, str] = OrderedDict()

    def _remember(self, correlation_id: str, task_id: str) -> None:
        self._task_ids[correlation_id] = task_id
        self._task_ids.move_to_end(correlation_id)
        while len(self._task_ids) > self.settings.remembered_tasks:
            self._task_ids.popitem(last=False)

    async def _post(
        self, agent: AgentEntry, body: JsonObject, headers: Mapping[str, str], timeout_s: float
    ) -> Outcome | _Transient:
        """POST one JSON-RPC body; the outcome, or a transient problem worth a retry."""
        data = json.dumps(body).encode()
        request_id = body.get("id")
        try:
            async with self.session.post(
                agent.url,
                data=data,
                headers=dict(headers),
                timeout=aiohttp.ClientTimeout(total=max(timeout_s, 0.001)),
                allow_redirects=False,
            ) as response:
                status = response.status
                if 200 <= status <= 299:
                    limit = self.settings.max_response_bytes
                    payload = await read_limited(response, limit, count_up_to=_COUNT_UP_TO * limit)
                    if isinstance(payload, TooLarge):
                        # Final: the same agent gives the same answer, and it can never be carried.
                        size = response.content_length or payload.size
                        shown = f"{size} bytes" if size is not None else f"more than {_COUNT_UP_TO * limit} bytes"
                        return Failed(
                            ErrorKind.OUTPUT_TOO_LARGE.value,
                            f"the agent's answer is {shown}, over the limit of {limit} bytes "
                            "(SWITCHYARD_MAX_MESSAGE_BYTES)",
                            retriable=False,
                        )
                    rid = request_id if isinstance(request_id, str | int) else None
                    return parse_response(payload, agent.protocol_version, request_id=rid)
                reason = f"HTTP {status} {response.reason or ''}".strip()
                if status in _RETRIED_STATUSES or 500 <= status <= 599:
                    wait = parse_retry_after(response.headers.get("Retry-After"), utcnow())
                    return _Transient(ErrorKind.HTTP_STATUS.value, reason, wait)
                return Failed(ErrorKind.HTTP_STATUS.value, reason, retriable=False)
        except TimeoutError:
            return _Transient(ErrorKind.TIMEOUT.value, f"no answer within {timeout_s:.2f}s")
        except aiohttp.InvalidURL:
            return Failed(CONFIGURATION_ERROR, f"invalid agent URL {safe_url(agent.url)}", retriable=False)
        except (aiohttp.ClientError, OSError) as error:
            return _Transient(
                ErrorKind.CONNECTION.value, f"{type(error).__name__}: {clip(str(error), MAX_MESSAGE_CHARS)}"
            )

    async def call(self, task: AgentTask, agent: AgentEntry) -> AgentResult:
        """Carry out one turn of an attempt: send the message (or the answer), poll if needed, report.

        Args:
            task: The attempt (its deadline bounds everything); from turn 1 it
                carries the answer to the agent's question.
            agent: The registry entry of ``task.agent_name``.

        Returns:
            SUCCESS with the agent's output, INPUT_REQUIRED with its question, or
            FAILURE with the reason, each with the task's turn; never raises for a
            problem with the call.
        """
        started_at = utcnow()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (task.deadline - started_at).total_seconds()
        call = _Call(self, task, agent, deadline)
        outcome: Outcome
        try:
            if call.remaining() <= 0:
                outcome = call.timeout_failure("waiting to start")
            else:
                headers = request_headers(agent.protocol_version)
                try:
                    if agent.auth is not None:
                        headers.update(agent.auth.headers())
                except SecretReferenceError as error:
                    outcome = Failed(CONFIGURATION_ERROR, str(error), retriable=False)
                else:
                    # A safety net only: every request and pause inside is already cut at the deadline.
                    async with asyncio.timeout(call.remaining() + _DEADLINE_GRACE_S):
                        outcome = await call.run(headers)
        except TimeoutError:
            outcome = call.timeout_failure("waiting for the agent")
        except Exception as error:  # the contract: a bug in here must still give a result
            logger.exception("calling %s for %s failed unexpectedly", agent.name, task.correlation_id)
            outcome = Failed(
                INTERNAL_ERROR, clip(f"{type(error).__name__} in the bridge", MAX_MESSAGE_CHARS), retriable=True
            )
        finally:
            self._task_ids.pop(task.correlation_id, None)
        return self._result(task, agent, outcome, started_at)

    def _result(self, task: AgentTask, agent: AgentEntry, outcome: Outcome, started_at: datetime) -> AgentResult:
        output: JsonValue = None
        error: AgentError | None = None
        question: AgentQuestion | None = None
        if isinstance(outcome, Completed):
            output = outcome.output
        elif isinstance(outcome, Interrupted) and outcome.kind == "input_required":
            asked = _question(outcome)
            if isinstance(asked, AgentQuestion):
                question = asked
            else:
                error = asked
        elif isinstance(outcome, Interrupted):  # auth_required: an operator's business, not a person's answer
            error = AgentError(kind=outcome.kind, message=clip(outcome.message, MAX_MESSAGE_CHARS), retriable=False)
        elif isinstance(outcome, Failed):
            error = AgentError(
                kind=outcome.kind, message=clip(outcome.message, MAX_MESSAGE_CHARS), retriable=outcome.retriable
            )
        else:  # Pending never leaves _Call.run
            error = AgentError(kind=INTERNAL_ERROR, message="the call ended with a pending task", retriable=True)
        if error is not None:
            status = ResultStatus.FAILURE
        elif question is not None:
            status = ResultStatus.INPUT_REQUIRED
        else:
            status = ResultStatus.SUCCESS
        # One line per failure and per question; successes only at DEBUG (a line per call costs the bridge
        # CPU at thousands a second).
        if question is not None:
            logger.info(
                "%s for %s from %s (%s): task %s asks %r",
                status.value,
                task.call_id,
                agent.name,
                safe_url(agent.url),
                question.task_id,
                clip(question.text, _LOGGED_QUESTION_CHARS),
            )
        else:
            log = logger.debug if error is None else logger.warning
            log(
                "%s for %s from %s (%s): %s",
                status.value,
                task.call_id,
                agent.name,
                safe_url(agent.url),
                "ok" if error is None else f"{error.kind}: {error.message}",
            )
        return AgentResult(
            correlation_id=task.correlation_id,
            run_id=task.run_id,
            step_id=task.step_id,
            attempt=task.attempt,
            iteration=task.iteration,
            item=task.item,
            status=status,
            output=output,
            error=error,
            question=question,
            turn=task.turn,
            started_at=started_at,
            finished_at=max(utcnow(), started_at),
        )

    async def cancel(self, task_id_or_correlation: str, agent: AgentEntry, *, task_id: str | None = None) -> bool:
        """Ask an agent to cancel a task, best-effort: one request, no retries, never raises.

        Args:
            task_id_or_correlation: The correlation id of a call whose task is being polled
                (the caller knows the agent's task id), or the agent's task id itself.
            agent: The agent's registry entry.
            task_id: The agent's task id, when the asker knows it (an attempt waiting for an
                answer has no call in progress here): it wins over the lookup.

        Returns:
            True if the agent answered with the task canceled.
        """
        if not agent.supports_cancel:
            return False
        if not task_id:
            task_id = self._task_ids.get(task_id_or_correlation, task_id_or_correlation)
        headers = request_headers(agent.protocol_version)
        try:
            if agent.auth is not None:
                headers.update(agent.auth.headers())
            body = cancel_task_request(task_id, agent.protocol_version, request_id=f"cancel:{task_id}")
            answer = await self._post(agent, body, headers, self.settings.cancel_timeout_s)
        except SecretReferenceError as error:
            logger.warning("cannot cancel task %s at %s: %s", task_id, agent.name, error)
            return False
        except Exception:  # best-effort by contract
            logger.exception("cancelling task %s at %s failed unexpectedly", task_id, agent.name)
            return False
        cancelled = isinstance(answer, Failed) and answer.state is TaskState.CANCELED
        if not cancelled:
            detail = answer.message if isinstance(answer, Failed | _Transient) else type(answer).__name__
            logger.info("task %s at %s was not cancelled: %s", task_id, agent.name, detail)
        return cancelled


def _question(outcome: Interrupted) -> AgentQuestion | AgentError:
    """The question an INPUT_REQUIRED task asks, or why it cannot be carried to a person."""
    try:
        return AgentQuestion(
            text=clip(outcome.message, MAX_TEXT_CHARS),
            data=outcome.data,
            task_id=outcome.task_id,
            context_id=outcome.context_id,
        )
    except ValidationError as error:  # an id longer than the wire allows: the task could never be continued
        problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors(include_url=False))
        return AgentError(
            kind=ErrorKind.MALFORMED_RESPONSE,
            message=clip(f"the agent's question cannot be carried: {problem}", MAX_MESSAGE_CHARS),
            retriable=False,
        )
