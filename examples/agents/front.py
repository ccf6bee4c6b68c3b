"""The aiohttp front of an example agent: counting and fault injection before the SDK's app.

Everything an agent is asked goes through :meth:`Front.rpc` (``POST /``):

* Counting: ``GET /stats`` (:meth:`Front.stats_view`) answers ``{"calls": N,
  "by_message_id": {...}, "by_idempotency_key": {...}, "continuations":
  {...}, "continued_tasks": {...}, "cancelled_task_ids": [...], "methods":
  {...}, "injected_failures": N, "auth_rejected": N, "in_flight": N,
  "peak_in_flight": N}``. ``calls`` counts every SendMessage request that
  arrived (``message/send`` in 0.3), failed ones included, so it can be
  compared with the attempts a caller recorded. Of those, the ones whose
  message carries a ``taskId`` (a person's answer continuing a task that
  asked, see ``ask`` in :mod:`examples.agents.executor`) are also counted in
  ``continuations`` by message id and in ``continued_tasks`` by task id.
  ``cancelled_task_ids`` lists the ``id`` of every CancelTask request
  (``tasks/cancel`` in 0.3) in the order they came (``""`` when missing);
  ``methods`` counts the requests of each method. ``in_flight`` is the number
  of SendMessage requests being answered now, ``peak_in_flight`` the most at
  once since the start or since ``POST /stats/reset-peak`` (which answers the
  stats as they were, then starts a new peak from the calls in flight).
* Auth (``auth_token``): requests without the token get HTTP 401.
* ``protocol="0.3"``: the SDK's 0.3 compatibility layer sits beside its 1.0
  methods, so the front answers 1.0 method names with JSON-RPC -32601, as a
  0.3-only agent would (otherwise a client speaking 1.0 to a "0.3" agent
  would go unnoticed).
* ``always_5xx``: every JSON-RPC request fails with HTTP 500.
* ``fail_times`` N: the first N SendMessage requests fail with
  ``fail_status`` (503 by default) and ``Retry-After: retry_after`` if set.
  Counted per message id by default, so each distinct call fails N times then
  succeeds, and tests sharing an agent do not disturb each other;
  ``fail_scope="global"`` counts all SendMessage requests together.
* ``malformed``: HTTP 200 with a JSON-RPC result that is neither a task nor a
  message.
* ``working``: SendMessage is handed to the SDK as if it asked for an
  immediate answer (``returnImmediately`` in 1.0, ``blocking: false`` in
  0.3), so the caller gets the task SUBMITTED and must poll GetTask.

Anything else (the agent card, unknown paths) goes to the SDK's app as it is.
"""

from __future__ import annotations

import hmac
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from starlette.types import ASGIApp

from examples.agents.asgi import serve_asgi
from examples.agents.config import AgentConfig

__all__ = ["Front", "Stats"]

_SEND_METHODS: Final = frozenset({"SendMessage", "message/send"})
_CANCEL_METHODS: Final = frozenset({"CancelTask", "tasks/cancel"})


@dataclass
class Stats:
    """What the agent has received (see the module docstring).

    Attributes:
        calls: SendMessage requests, failed ones included.
        by_message_id: SendMessage requests per message id (``""`` when missing).
        by_idempotency_key: SendMessage requests per ``metadata.idempotency_key``, for those that have one.
        continuations: SendMessage requests whose message has a ``taskId``, per message id.
        continued_tasks: SendMessage requests whose message has a ``taskId``, per task id.
        cancelled_task_ids: The task id of each CancelTask request, in order (``""`` when missing).
        methods: JSON-RPC requests per method (``"?"`` when unreadable).
        injected_failures: Requests failed by ``fail_times``.
        auth_rejected: Requests refused for a missing or wrong token.
        in_flight: SendMessage requests being answered now.
        peak_in_flight: The most SendMessage requests answered at once in the current peak window.
    """

    calls: int = 0
    by_message_id: Counter[str] = field(default_factory=Counter)
    by_idempotency_key: Counter[str] = field(default_factory=Counter)
    continuations: Counter[str] = field(default_factory=Counter)
    continued_tasks: Counter[str] = field(default_factory=Counter)
    cancelled_task_ids: list[str] = field(default_factory=list)
    methods: Counter[str] = field(default_factory=Counter)
    injected_failures: int = 0
    auth_rejected: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0

    def call_started(self) -> None:
        """A SendMessage request is being answered."""
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def call_finished(self) -> None:
        """A SendMessage request has been answered (or failed)."""
        self.in_flight -= 1

    def reset_peak(self) -> None:
        """Start a new peak window: from the calls in flight now."""
        self.peak_in_flight = self.in_flight

    def snapshot(self) -> dict[str, Any]:
        """A JSON view, as ``GET /stats`` serves it."""
        return {
            "calls": self.calls,
            "by_message_id": dict(self.by_message_id),
            "by_idempotency_key": dict(self.by_idempotency_key),
            "continuations": dict(self.continuations),
            "continued_tasks": dict(self.continued_tasks),
            "cancelled_task_ids": list(self.cancelled_task_ids),
            "methods": dict(self.methods),
            "injected_failures": self.injected_failures,
            "auth_rejected": self.auth_rejected,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
        }


@dataclass(frozen=True)
class _Request:
    """What the front reads from a JSON-RPC body (never trusted: any field may be missing)."""

    method: str | None
    request_id: Any
    message_id: str | None
    idempotency_key: str | None
    doc: dict[str, Any] | None
    task_id: str | None = None
    params_id: str | None = None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _read_request(body: bytes) -> _Request:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return _Request(None, None, None, None, None)
    if not isinstance(doc, dict):
        return _Request(None, None, None, None, None)
    params = _dict(doc.get("params"))
    message = _dict(params.get("message"))
    metadata = _dict(params.get("metadata"))
    method, message_id, key = doc.get("method"), message.get("messageId"), metadata.get("idempotency_key")
    task_id, params_id = message.get("taskId"), params.get("id")
    return _Request(
        method=method if isinstance(method, str) else None,
        request_id=doc.get("id"),
        message_id=message_id if isinstance(message_id, str) else None,
        idempotency_key=key if isinstance(key, str) else None,
        doc=doc,
        task_id=task_id if isinstance(task_id, str) and task_id else None,
        params_id=params_id if isinstance(params_id, str) else None,
    )


def _returning_immediately(request: _Request) -> bytes:
    """The SendMessage body rewritten to ask for an immediate answer (``working``)."""
    doc = dict(request.doc or {})
    params = _dict(doc.get("params")).copy()
    configuration = _dict(params.get("configuration")).copy()
    if request.method == "SendMessage":
        configuration["returnImmediately"] = True
    else:
        configuration["blocking"] = False
    params["configuration"] = configuration
    doc["params"] = params
    return json.dumps(doc).encode()


class Front:
    """The aiohttp handlers in front of the SDK's app.

    Args:
        config: The agent's configuration (its faults).
        sdk_app: The a2a-sdk's Starlette app.
        stats: Where the counts go.
    """

    def __init__(self, config: AgentConfig, sdk_app: ASGIApp, stats: Stats) -> None:
        self.config = config
        self.sdk_app = sdk_app
        self.stats = stats

    def _authorized(self, request: web.Request) -> bool:
        token = self.config.auth_token
        if token is None:
            return True
        expected = f"Bearer {token}" if self.config.auth_header.lower() == "authorization" else token
        given = request.headers.get(self.config.auth_header, "")
        return hmac.compare_digest(given.encode(), expected.encode())

    def _count(self, request: _Request) -> None:
        self.stats.methods[request.method or "?"] += 1
        if request.method in _SEND_METHODS:
            self.stats.calls += 1
            self.stats.by_message_id[request.message_id or ""] += 1
            if request.idempotency_key is not None:
                self.stats.by_idempotency_key[request.idempotency_key] += 1
            if request.task_id is not None:
                self.stats.continuations[request.message_id or ""] += 1
                self.stats.continued_tasks[request.task_id] += 1
        elif request.method in _CANCEL_METHODS:
            self.stats.cancelled_task_ids.append(request.params_id or "")

    def _should_fail(self, request: _Request) -> bool:
        if self.config.fail_times <= 0 or request.method not in _SEND_METHODS:
            return False
        if self.config.fail_scope == "global":
            count = self.stats.calls
        else:
            count = self.stats.by_message_id[request.message_id or ""]
        return count <= self.config.fail_times

    async def rpc(self, request: web.Request) -> web.StreamResponse:
        """``POST /``: count, maybe misbehave, else let the SDK answer."""
        body = await request.read()
        parsed = _read_request(body)
        self._count(parsed)
        if parsed.method not in _SEND_METHODS:
            return await self._answer(request, parsed, body)
        self.stats.call_started()
        try:
            return await self._answer(request, parsed, body)
        finally:
            self.stats.call_finished()

    async def _answer(self, request: web.Request, parsed: _Request, body: bytes) -> web.StreamResponse:
        config = self.config
        if not self._authorized(request):
            self.stats.auth_rejected += 1
            return web.json_response({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})
        if config.protocol == "0.3" and parsed.method is not None and "/" not in parsed.method:
            error = {"code": -32601, "message": f"Method not found: {parsed.method[:60]} (this agent speaks A2A 0.3)"}
            return web.json_response({"jsonrpc": "2.0", "id": parsed.request_id, "error": error})
        if config.always_5xx:
            return web.json_response({"error": "injected failure (always 5xx)"}, status=500)
        if self._should_fail(parsed):
            self.stats.injected_failures += 1
            headers = {"Retry-After": config.retry_after} if config.retry_after else None
            failure = {"error": f"injected failure (fail {config.fail_times} times)"}
            return web.json_response(failure, status=config.fail_status, headers=headers)
        if config.malformed:
            result = {"surprise": "this is neither a task nor a message"}
            return web.json_response({"jsonrpc": "2.0", "id": parsed.request_id, "result": result})
        if config.working and parsed.method in _SEND_METHODS:
            body = _returning_immediately(parsed)
        return await serve_asgi(self.sdk_app, request, body)

    async def stats_view(self, request: web.Request) -> web.Response:
        """``GET /stats``: the counts."""
        return web.json_response(self.stats.snapshot())

    async def reset_peak_view(self, request: web.Request) -> web.Response:
        """``POST /stats/reset-peak``: the counts as they were, then a new peak window."""
        snapshot = self.stats.snapshot()
        self.stats.reset_peak()
        return web.json_response(snapshot)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Anything else: the SDK's app answers."""
        return await serve_asgi(self.sdk_app, request, await request.read())
