"""Agent cards: reading them (as the a2a-sdk serves them, and broken ones) and fetching them over real HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from aiohttp import web

from examples.agents.researcher import SPEC as RESEARCHER
from examples.agents.server import AgentConfig, build_card, running_agent
from switchyard.agent_cards import (
    AGENT_CARD_PATH,
    CARD_MAX_BYTES,
    AgentCardError,
    fetch_card,
    is_http_url,
    parse_agent_card,
)
from tests.switchyard.test_http_read import serving

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def serving_card(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """Serve ``handler`` at the well-known card path on a free port; yields the base URL."""
    app = web.Application()
    app.router.add_get(AGENT_CARD_PATH, handler)
    async with serving(app) as url:
        yield url


# --- reading ---------------------------------------------------------------------------------------------------------


def sdk_card(protocol: str, url: str = "http://127.0.0.1:8101/") -> bytes:
    """The card exactly as the SDK serves it for an example agent."""
    card = build_card(RESEARCHER, AgentConfig(protocol=protocol), url)  # type: ignore[arg-type]
    return json.dumps(agent_card_to_dict(card)).encode()


@pytest.mark.parametrize(("protocol", "expected"), [("1.0", "1.0"), ("0.3", "0.3"), ("both", "1.0")])
def test_cards_served_by_the_sdk(protocol: str, expected: str) -> None:
    info = parse_agent_card(sdk_card(protocol), "http://127.0.0.1:8101")
    assert info.name == "researcher"
    assert info.url == "http://127.0.0.1:8101/"
    assert info.protocol_version == expected
    assert info.skills == ("research",)
    assert info.description.startswith("Gathers")
    assert info.version == "1.0.0"
    assert info.streaming is False


def test_a_plain_0_3_card_uses_the_top_level_url() -> None:
    card = {"name": "old", "url": "https://agents.example.org/a2a", "protocolVersion": "0.3.0", "description": "d"}
    info = parse_agent_card(json.dumps(card).encode(), "https://agents.example.org/")
    assert (info.url, info.protocol_version) == ("https://agents.example.org/a2a", "0.3")
    no_version = {"name": "old", "url": "http://h/"}
    assert parse_agent_card(json.dumps(no_version).encode(), "http://h/").protocol_version == "0.3"


def test_a_jsonrpc_interface_is_preferred_and_relative_urls_are_resolved() -> None:
    card = {
        "name": "multi",
        "supportedInterfaces": [
            {"url": "http://h/grpc", "protocolBinding": "GRPC", "protocolVersion": "1.0"},
            {"url": "/a2a/v03", "protocolBinding": "JSONRPC", "protocolVersion": "0.3"},
            {"url": "/a2a/v1", "protocolBinding": "jsonrpc", "protocolVersion": "1.0.2"},
        ],
    }
    info = parse_agent_card(json.dumps(card).encode(), "https://h.example:8443/.well-known/agent-card.json")
    assert (info.url, info.protocol_version) == ("https://h.example:8443/a2a/v1", "1.0")


@pytest.mark.parametrize(
    ("card", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b'{"name": "x", "url": "http://h/", "n": NaN}', "not valid JSON"),
        (b'{"name": "x", "url": "http://h/", "n": 1e999}', "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[1]", "JSON list, not an object"),
        (b'{"url": "http://h/"}', "has no name"),
        (b'{"name": " ", "url": "http://h/"}', "has no name"),
        (b'{"name": "x"}', "no JSONRPC interface"),
        (b'{"name": "x", "supportedInterfaces": [{"url": "http://h", "protocolBinding": "GRPC"}]}', "no JSONRPC"),
        (
            b'{"name": "x", "supportedInterfaces": [{"url": "http://h", "protocolBinding": "JSONRPC", '
            b'"protocolVersion": "2.0"}]}',
            "no JSONRPC interface",
        ),
        (
            b'{"name": "x", "supportedInterfaces": [{"url": "ftp://h/x", "protocolBinding": "JSONRPC", '
            b'"protocolVersion": "1.0"}]}',
            "'ftp://h/x' is not an http(s) URL",
        ),
        (
            b'{"name": "x", "supportedInterfaces": [{"protocolBinding": "JSONRPC", "protocolVersion": "1.0"}]}',
            "supportedInterfaces[0] has no url",
        ),
        (b'{"name": "x", "url": "javascript:alert(1)"}', "is not an http(s) URL"),
        (b'{"name": "x", "url": "http://h/", "protocolVersion": "0.2.5"}', "neither 1.x nor 0.3"),
        (b'{"name": "x", "url": "http://h/", "preferredTransport": "GRPC"}', "is not JSONRPC"),
    ],
)
def test_invalid_cards_name_the_problem(card: bytes, reason: str) -> None:
    with pytest.raises(AgentCardError, match=r".") as raised:
        parse_agent_card(card, "http://h/")
    assert reason in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_card_error_is_one_line() -> None:
    error = AgentCardError("first line\n  second   line")
    assert str(error) == error.reason == "first line second line"


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://127.0.0.1:8101/", True),
        ("https://agents.example.org/a2a", True),
        ("ftp://h/x", False),
        ("file:///etc/passwd", False),
        ("http:///nohost", False),
        ("http://[::1", False),
        ("javascript:alert(1)", False),
    ],
)
def test_is_http_url(url: str, ok: bool) -> None:
    assert is_http_url(url) is ok


# --- fetching --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "expected"), [("1.0", "1.0"), ("0.3", "0.3"), ("both", "1.0")])
async def test_fetch_card(session: aiohttp.ClientSession, protocol: str, expected: str) -> None:
    async with running_agent(RESEARCHER, AgentConfig(protocol=protocol)) as agent:  # type: ignore[arg-type]
        info = await fetch_card(session, agent.url)
        assert (info.name, info.url, info.protocol_version) == ("researcher", agent.url, expected)
        same = await fetch_card(session, agent.url.rstrip("/") + AGENT_CARD_PATH)
        assert same == info


async def test_fetch_card_errors(session: aiohttp.ClientSession) -> None:
    async with running_agent(RESEARCHER) as agent:
        with pytest.raises(AgentCardError, match=r"answered HTTP 404$"):
            await fetch_card(session, agent.url + "nowhere/")
    with pytest.raises(AgentCardError, match=r"^cannot reach http://127\.0\.0\.1:\d+/\.well-known/agent-card\.json"):
        await fetch_card(session, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(AgentCardError, match="is not an http"):
        await fetch_card(session, "ftp://127.0.0.1/")


async def test_the_url_in_a_card_error_has_no_credentials(session: aiohttp.ClientSession) -> None:
    with pytest.raises(AgentCardError) as raised:
        await fetch_card(session, f"http://user:s3cret@127.0.0.1:{free_port()}/?token=t0ken")
    assert "s3cret" not in str(raised.value)
    assert "t0ken" not in str(raised.value)
    assert "user" not in str(raised.value)


async def test_fetch_card_rejects_an_invalid_card(session: aiohttp.ClientSession) -> None:
    async def card(request: web.Request) -> web.Response:
        return web.json_response({"name": "x", "url": "file:///etc/passwd"})

    async with serving_card(card) as base_url:
        with pytest.raises(AgentCardError, match="is not an http"):
            await fetch_card(session, base_url)


async def test_a_card_over_the_limit_is_refused(session: aiohttp.ClientSession) -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length to go by
        await response.prepare(request)
        await response.write(b'{"name": "x", "pad": "' + b"x" * CARD_MAX_BYTES + b'"}')
        return response

    async with serving_card(huge) as base_url:
        with pytest.raises(AgentCardError, match=f"is larger than {CARD_MAX_BYTES} bytes$"):
            await fetch_card(session, base_url)


async def test_a_card_that_does_not_come_in_time_is_named(session: aiohttp.ClientSession) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1)  # well past the timeout, short enough for the cleanup
        return web.json_response({})

    async with serving_card(slow) as base_url:
        with pytest.raises(AgentCardError, match=r"did not answer within 0\.1s$"):
            await fetch_card(session, base_url, timeout_s=0.1)
