"""HTTP hardening shared by both Faust apps' web servers: one aiohttp middleware.

:func:`install` puts a :class:`Guard` in front of every view of a Faust app
(its aiohttp application), so the rules hold for every endpoint, Switchyard's
and Faust's own:

* Every error is JSON ``{"error": ..., ...}``: the router's own 404 and 405,
  413, an ``HTTPException`` from anywhere, and any unexpected exception (500
  ``{"error": "internal error"}``, logged with its traceback, never sent).
* Faust's built-in views (``/router/``, ``/table/``, ``/graph/``, ``/``,
  ``/assignment/``, ``/performance/``) answer 404 unless ``SWITCHYARD_API_TOKEN``
  is set and given: they show table data and the cluster's layout.
  ``@app.table_route`` does not use them (it forwards the request itself to
  the owner's same path), so routing between workers is unaffected.
* Mutating requests (any method but GET, HEAD and OPTIONS):

  1. refused (403) when cross-site: a ``Sec-Fetch-Site: cross-site`` header,
     or an ``Origin`` that is not the server's own (see :meth:`Guard.own_origin`);
     no ``Origin`` at all (curl, the CLI, other servers) is fine;
  2. need ``Authorization: Bearer <SWITCHYARD_API_TOKEN>`` when a token is set (401);
  3. need ``Content-Type: application/json`` (415; a charset, if given, must be
     UTF-8). A DELETE without a body needs none: browsers always preflight a
     cross-site DELETE, and there is no body to misread;
  4. a body over ``SWITCHYARD_MAX_MESSAGE_BYTES`` is 413 ``{"error", "size", "limit"}``,
     refused before it is read when it says its length;
  5. the body must be UTF-8 JSON that PostgreSQL can store: no NUL, no lone
     surrogate, no non-finite number, at most :data:`MAX_DEPTH` levels deep;
     otherwise 400 naming the JSON path of the offending value (``"path": "$.input.text"``).

* A path or query parameter with a NUL (or a lone surrogate) is 400 naming it
  (``"parameter": "run_id"``), before any view runs (PostgreSQL refuses NUL in text).
* With ``SWITCHYARD_API_TOKEN_FOR_READS`` (and a token), reads need the token
  too, except the public paths (``/health/``).

Views read the checked body with :func:`json_body`.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Final, NoReturn, cast

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from switchyard.settings import Settings

__all__ = [
    "MAX_DEPTH",
    "NO_BODY",
    "PUBLIC_PATHS",
    "SAFE_METHODS",
    "Guard",
    "Problem",
    "faust_builtin",
    "find_unstorable",
    "install",
    "json_body",
    "parse_json",
    "problem",
    "unstorable_text",
]

log = logging.getLogger(__name__)

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that change nothing; every other one is guarded as mutating."""

PUBLIC_PATHS: Final = ("/health/",)
"""Paths readable without the token even with ``SWITCHYARD_API_TOKEN_FOR_READS``: probes carry no token."""

MAX_DEPTH: Final = 100
"""Deepest nesting of arrays and objects accepted in a body (plans and inputs need far less)."""

NO_BODY: Final[Any] = object()
"""What :func:`json_body` returns for a request without a body."""

_LOOPBACK_NAMES: Final = ("127.0.0.1", "localhost", "::1")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

try:  # aiohttp >= 3.12 warns on plain string keys in a request's storage
    from aiohttp.web import RequestKey

    _BODY_KEY: Any = RequestKey("switchyard_json_body", object)
except ImportError:  # pragma: no cover - older aiohttp
    _BODY_KEY = "switchyard_json_body"


class Problem(Exception):
    """An HTTP error to answer as JSON ``{"error": message, **extra}``; raise it from a view or a helper.

    Attributes:
        status: The HTTP status.
        extra: More fields of the answer (``size``, ``limit``, ``path``, ...).
    """

    def __init__(self, status: int, message: str, /, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra

    def response(self) -> web.Response:
        """The JSON answer."""
        return problem(self.status, str(self), **self.extra)


def problem(status: int, error: str, /, *, headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    """A JSON error answer ``{"error": error, **extra}`` (positional-only: ``extra`` may hold a "status")."""
    return web.json_response({"error": error, **extra}, status=status, headers=headers)


# ------------------------------------------------------------------ bodies


def unstorable_text(text: str) -> str | None:
    """Why PostgreSQL (or UTF-8) cannot hold ``text``, or None when it can."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which PostgreSQL cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (\\ud800-\\udfff), which is not Unicode text"
    return None


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}"
    # ensure_ascii: a NUL or a surrogate in the key shows as an escape, not as itself.
    return f"{path}[{json.dumps(key, ensure_ascii=True)}]"


def find_unstorable(value: Any, path: str = "$") -> tuple[str, str] | None:
    """The first value (or key) in decoded JSON that PostgreSQL cannot store, as (JSON path, why).

    Walks iteratively, so a deep document cannot exhaust the stack.

    Returns:
        None when everything can be stored.
    """
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            reason = unstorable_text(item)
            if reason is not None:
                return where, reason
        elif isinstance(item, float):
            if not math.isfinite(item):
                return where, "is a number out of range"
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                return where, f"is nested more than {MAX_DEPTH} levels deep"
            children: list[tuple[Any, str, int]] = []
            if isinstance(item, dict):
                for key, child in item.items():
                    reason = unstorable_text(key)
                    if reason is not None:
                        return _child(where, key), f"is a key that {reason}"
                    children.append((child, _child(where, key), depth + 1))
            else:
                children = [(child, _child(where, i), depth + 1) for i, child in enumerate(item)]
            # Reversed onto the stack: the first offending value in document order is the one named.
            stack.extend(reversed(children))
    return None


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    """Decode a request body: strict UTF-8 JSON whose every value PostgreSQL can store.

    Raises:
        Problem: 400, with ``path`` when one value is the problem.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Problem(400, f"the body is not UTF-8: {error}") from None
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise Problem(400, f"the body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as error:
        raise Problem(400, f"the body is not valid JSON: {error}") from None
    found = find_unstorable(value)
    if found is not None:
        where, reason = found
        raise Problem(400, f"{where} {reason}", path=where)
    return value


async def json_body(request: Any, limit: int | None = None) -> Any:
    """The request's body, decoded and checked (:func:`parse_json`); :data:`NO_BODY` when it has none.

    Read once: the :class:`Guard` reads it before the view runs, and the view
    gets the same value.

    Args:
        request: The aiohttp request (Faust's views type it as their own ``Request``).
        limit: Refuse a body over this many bytes (413).

    Raises:
        Problem: 400 (unreadable) or 413 (too large).
    """
    req = cast(web.Request, request)
    if _BODY_KEY in req:
        return req[_BODY_KEY]
    value: Any = NO_BODY
    if req.body_exists:
        try:
            raw = await req.read()
        except web.HTTPRequestEntityTooLarge:
            # Only a body that did not say its length gets here: the size is not known.
            raise _too_large(None, limit) from None
        if limit is not None and len(raw) > limit:
            raise _too_large(len(raw), limit)
        if raw:
            value = parse_json(raw)
    req[_BODY_KEY] = value
    return value


def _too_large(size: int | None, limit: int | None) -> Problem:
    shown = "the body" if size is None else f"the body of {size} bytes"
    return Problem(
        413, f"{shown} is over the limit of {limit} bytes (SWITCHYARD_MAX_MESSAGE_BYTES)", size=size, limit=limit
    )


# ------------------------------------------------------------------ the guard


def faust_builtin(app: Any) -> Callable[[str], bool]:
    """Whether a route (by its canonical path) is one of Faust's built-in views (``faust.web.apps``).

    Asked per request: the blueprints are added when the web server starts, after :func:`install`.
    """

    def builtin(path: str) -> bool:
        view = app.web.views.get(path)
        return view is not None and type(view).__module__.startswith("faust.web.apps.")

    return builtin


class Guard:
    """The aiohttp middleware (see the module); one per web server.

    Args:
        settings: Token, body size limit.
        port: The server's own port, for :meth:`own_origin`.
        internal: Tells, by a route's canonical path, the views that only a
            token holder may see (Faust's built-ins).
        public: Paths readable without the token even when reads need it.
    """

    # aiohttp calls a middleware marked as "new style" with (request, handler).
    __middleware_version__: ClassVar[int] = 1

    def __init__(
        self,
        settings: Settings,
        *,
        port: int,
        internal: Callable[[str], bool] | None = None,
        public: Iterable[str] = PUBLIC_PATHS,
    ) -> None:
        self.token = settings.api_token.get_secret_value() if settings.api_token else None
        self.tokens_for_reads = settings.api_token_for_reads
        self.limit = settings.max_message_bytes
        self.port = port
        self.internal = internal or (lambda path: False)
        self.public = frozenset(public)
        hosts = {*_LOOPBACK_NAMES, settings.web_host}
        self.loopback_origins = frozenset(("http", host.lower(), port) for host in hosts)

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Guard one request (aiohttp's middleware interface)."""
        try:
            response = await self._guarded(request, handler)
        except Problem as refused:
            return refused.response()
        except web.HTTPException as error:
            if error.status < 400:
                raise  # a redirect is not an error
            return _http_error(request, error)
        except Exception:
            # Logged (with %r: the path may hold anything), never shown: a traceback tells an attacker too much.
            log.exception("unexpected error answering %s %r", request.method, request.path)
            return problem(500, "internal error")
        if (
            isinstance(response, web.Response)
            and response.status >= 400
            and response.content_type != "application/json"
        ):
            return problem(response.status, (response.reason or "error").lower())
        return response

    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        match = request.match_info
        if match.http_exception is not None:  # the router's own 404 / 405
            raise match.http_exception
        resource = match.route.resource
        path = resource.canonical if resource is not None else request.path
        mutating = request.method not in SAFE_METHODS
        if self.internal(path):
            if not self._token_given(request):
                # As if it did not exist: a 401 would confirm it does.
                raise Problem(404, f"no such endpoint: {request.method} {request.path}")
        elif mutating:
            self._refuse_cross_site(request)
            self._require_token(request)
        elif self.tokens_for_reads and path not in self.public:
            self._require_token(request)
        _check_parameters(request)
        if not mutating:
            return await handler(request)
        if request.method != "DELETE" or request.body_exists:
            _require_json(request)
        size = request.content_length
        if size is not None and size > self.limit:
            raise _too_large(size, self.limit)  # before reading a byte of it
        # A body that does not say its length is read up to the limit only.
        checked = request.clone(client_max_size=self.limit)
        await json_body(checked, self.limit)
        return await handler(checked)

    def _token_given(self, request: web.Request) -> bool:
        if self.token is None:
            return False
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def _require_token(self, request: web.Request) -> None:
        if self.token is not None and not self._token_given(request):
            raise _Unauthorized()

    def own_origin(self, origin: str, request: web.Request) -> bool:
        """Whether a request's ``Origin`` is the server's own.

        Its own: the origin's host and port are the request's ``Host`` (what
        the browser connected to; a port left out is the scheme's default), or
        ``http://`` 127.0.0.1, localhost, [::1] or ``SWITCHYARD_WEB_BIND`` with
        the server's port. ``Origin: null`` (a sandboxed page, a file) is never own.
        """
        try:
            url = URL(origin)
            if url.scheme not in {"http", "https"} or not url.host or url.path not in {"", "/"}:
                return False
            key = (url.scheme, url.host.lower(), url.port)
            if key in self.loopback_origins:
                return True
            host = URL(f"{url.scheme}://{request.headers.get('Host', '')}")
        except ValueError:
            return False
        return host.host is not None and (host.host.lower(), host.port) == key[1:]

    def _refuse_cross_site(self, request: web.Request) -> None:
        if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
            raise Problem(403, "cross-site requests are refused (Sec-Fetch-Site: cross-site)")
        origin = request.headers.get("Origin")
        if origin is not None and not self.own_origin(origin, request):
            raise Problem(403, f"cross-site requests are refused: Origin {origin!r} is not this server", origin=origin)


class _Unauthorized(Problem):
    def __init__(self) -> None:
        super().__init__(401, "this endpoint needs 'Authorization: Bearer <token>' (SWITCHYARD_API_TOKEN)")

    def response(self) -> web.Response:
        return problem(self.status, str(self), headers={"WWW-Authenticate": "Bearer"}, **self.extra)


def _check_parameters(request: web.Request) -> None:
    for name, value in request.match_info.items():
        reason = unstorable_text(value)
        if reason is not None:
            raise Problem(400, f"the path parameter {name!r} {reason}", parameter=name)
    for name, value in request.query.items():
        reason = unstorable_text(name) or unstorable_text(value)
        if reason is not None:
            shown = json.dumps(name, ensure_ascii=True)
            raise Problem(400, f"the query parameter {shown} {reason}", parameter=name)


def _require_json(request: web.Request) -> None:
    given = request.headers.get("Content-Type")
    charset = (request.charset or "utf-8").lower()
    if request.content_type != "application/json" or given is None:
        raise Problem(415, "send the body as 'Content-Type: application/json'", content_type=given)
    if charset not in {"utf-8", "utf8"}:
        raise Problem(415, f"JSON must be UTF-8, not {charset!r}", content_type=given)


def _http_error(request: web.Request, error: web.HTTPException) -> web.Response:
    headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
    if isinstance(error, web.HTTPNotFound):
        return problem(404, f"no such endpoint: {request.method} {request.path}", headers=headers)
    if isinstance(error, web.HTTPMethodNotAllowed):
        allowed = sorted(error.allowed_methods)
        return problem(
            405,
            f"{request.method} is not allowed on {request.path}; use {', '.join(allowed)}",
            headers=headers,
            allowed=allowed,
        )
    if isinstance(error, web.HTTPRequestEntityTooLarge):
        return _too_large(None, request.client_max_size).response()
    return problem(error.status, (error.reason or "error").lower(), headers=headers)


def install(app: Any, settings: Settings, *, public: Iterable[str] = PUBLIC_PATHS) -> Guard:
    """Put a :class:`Guard` in front of a Faust app's web server (its aiohttp application).

    Call it when building the app (before the server starts: aiohttp freezes
    its middlewares then). Faust's built-in views become token-only. Calling
    it again returns the guard already installed.

    Args:
        app: The Faust app (with the default aiohttp web driver).
        settings: The app's settings.
        public: Paths readable without the token even when reads need it.

    Returns:
        The guard installed.

    Raises:
        TypeError: The app's web driver is not aiohttp.
    """
    web_app = getattr(app.web, "web_app", None)
    if not isinstance(web_app, web.Application):
        raise TypeError(f"the HTTP guard needs Faust's aiohttp web driver, not {type(app.web).__name__}")
    for installed in web_app.middlewares:
        if isinstance(installed, Guard):
            return installed  # once per server: a second guard would only repeat the first
    guard = Guard(settings, port=int(app.conf.web_port), internal=faust_builtin(app), public=public)
    # Outermost (first): it turns what every later middleware and view raises into JSON.
    web_app.middlewares.insert(0, guard)
    return guard
