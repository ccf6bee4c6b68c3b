"""Serve an ASGI application (the a2a-sdk's Starlette app) from an aiohttp handler.

The SDK's ``http-server`` extra brings Starlette but no ASGI server, and the
project's HTTP stack is aiohttp; this ~60-line adapter avoids a new dependency
(uvicorn) and lets the example agents put their fault injection and
``/stats`` in plain aiohttp in front of the SDK's untouched app.

Scope: HTTP only (no websockets, no lifespan: the SDK's routes need neither).
The request body is read by aiohttp first (the fault injection looks at it)
and handed to the app in one piece; the response is streamed as the app sends
it, so server-sent events work too. After the body, ``receive()`` waits until
the app has finished and then reports ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from starlette.types import ASGIApp, Message

__all__ = ["serve_asgi"]


def _address(request: web.Request, name: str) -> tuple[str, int] | None:
    info = request.transport.get_extra_info(name) if request.transport is not None else None
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return None


def _scope(request: web.Request) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.raw_path.split("?", 1)[0].encode("latin-1"),
        "query_string": request.query_string.encode("latin-1"),
        "root_path": "",
        "headers": [(name.lower(), value) for name, value in request.raw_headers],
        "client": _address(request, "peername"),
        "server": _address(request, "sockname"),
        "state": {},
        "extensions": {},
    }


async def serve_asgi(app: ASGIApp, request: web.Request, body: bytes) -> web.StreamResponse:
    """Let an ASGI app answer an aiohttp request.

    Args:
        app: The ASGI application.
        request: The aiohttp request being answered.
        body: Its body (already read, possibly rewritten).

    Returns:
        The response the app produced (already sent when streamed), or 500 if it sent none.
    """
    finished = asyncio.Event()
    body_delivered = False
    response: web.StreamResponse | None = None

    async def receive() -> Message:
        nonlocal body_delivered
        if not body_delivered:
            body_delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal response
        if message["type"] == "http.response.start":
            response = web.StreamResponse(status=int(message["status"]))
            for name, value in message.get("headers", []):
                response.headers.add(name.decode("latin-1"), value.decode("latin-1"))
            await response.prepare(request)
        elif message["type"] == "http.response.body" and response is not None:
            await response.write(message.get("body", b""))
            if not message.get("more_body", False):
                await response.write_eof()

    try:
        await app(_scope(request), receive, send)
    finally:
        finished.set()
    if response is None:
        return web.Response(status=500, text="the application sent no response")
    return response
