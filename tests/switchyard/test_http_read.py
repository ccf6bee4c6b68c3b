"""Bounded body reading over real HTTP, and URLs as they may be shown (no credentials)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from switchyard.http_read import TooLarge, read_limited, safe_url

pytestmark = pytest.mark.timeout(60)

BODY = b"0123456789" * 1000


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    """A server with ``/sized`` (Content-Length) and ``/chunked`` (none), both answering :data:`BODY`."""

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=BODY)

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for start in range(0, len(BODY), 1000):
            await response.write(BODY[start : start + 1000])
        return response

    app = web.Application()
    app.router.add_get("/sized", sized)
    app.router.add_get("/chunked", chunked)
    async with serving(app) as url:
        yield url


@pytest.mark.parametrize("path", ["/sized", "/chunked"])
@pytest.mark.parametrize(
    ("limit", "count_up_to", "expected"),
    [
        (len(BODY), 0, BODY),
        (len(BODY) - 1, 0, TooLarge(None)),
        (len(BODY) - 1, 4 * len(BODY), TooLarge(len(BODY))),
    ],
    ids=["fits", "over", "over-and-counted"],
)
async def test_read_limited(base_url: str, path: str, limit: int, count_up_to: int, expected: bytes | TooLarge) -> None:
    async with aiohttp.ClientSession() as session, session.get(base_url + path) as response:
        assert await read_limited(response, limit, count_up_to=count_up_to) == expected


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:secret@agents.example.org:8443/a2a?token=t#frag", "https://agents.example.org:8443/a2a"),
        ("http://127.0.0.1:8101/", "http://127.0.0.1:8101/"),
        ("http://[::1]:9/x", "http://[::1]:9/x"),
        ("http://h:99999/", "<invalid url>"),
    ],
)
def test_safe_url(url: str, shown: str) -> None:
    assert safe_url(url) == shown
