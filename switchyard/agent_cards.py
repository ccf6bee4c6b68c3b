"""Agent cards: where an A2A agent says what it is and how to call it.

:func:`fetch_card` gets ``{base}/.well-known/agent-card.json`` and
:func:`parse_agent_card` reads it into a :class:`CardInfo`, what a registry
entry needs (``agents add URL`` registers an agent this way).

A 1.0 card lists ``supportedInterfaces`` with ``url``, ``protocolBinding``
and ``protocolVersion``; the first ``JSONRPC`` interface of version 1.x wins,
then the first of version 0.3.x. Failing that, a 0.3 card's top-level ``url``
and ``protocolVersion`` (missing means 0.3, as the a2a-sdk reads it) are used.
Only http(s) URLs with a host are accepted; a relative URL is resolved against
the card's base URL. Every problem is an :class:`AgentCardError` whose message
says why in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urljoin, urlsplit

import aiohttp

from models.agents import ProtocolVersion
from switchyard.http_read import TooLarge, read_limited, safe_url
from switchyard.wire import snippet, strict_loads

__all__ = [
    "AGENT_CARD_PATH",
    "CARD_MAX_BYTES",
    "AgentCardError",
    "CardInfo",
    "fetch_card",
    "is_http_url",
    "parse_agent_card",
]

AGENT_CARD_PATH: Final = "/.well-known/agent-card.json"
CARD_MAX_BYTES: Final = 1024 * 1024
"""A larger card is refused (cards are a few kilobytes)."""


class AgentCardError(ValueError):
    """An agent card could not be fetched or read; the message says why, in one line."""

    def __init__(self, reason: str) -> None:
        self.reason = " ".join(reason.split())
        super().__init__(self.reason)


@dataclass(frozen=True)
class CardInfo:
    """What the registry needs from an agent card.

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
        card = strict_loads(body)
    except (ValueError, RecursionError):
        raise AgentCardError(f"the agent card is not valid JSON: {snippet(bytes(body))}") from None
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


async def fetch_card(session: aiohttp.ClientSession, base_url: str, *, timeout_s: float = 10.0) -> CardInfo:
    """Fetch and read an agent's card from ``{base_url}/.well-known/agent-card.json``.

    Args:
        session: The HTTP session to use.
        base_url: The agent's base URL (http or https); a URL that already ends
            with the well-known path is used as it is.
        timeout_s: Upper bound of the whole request.

    Returns:
        The card's endpoint, protocol version, name and description.

    Raises:
        AgentCardError: The URL is not http(s), the agent is unreachable, answers
            another status than 200, or serves an invalid card (one-line reason).
    """
    if not is_http_url(base_url):
        raise AgentCardError(f"{safe_url(base_url)!r} is not an http(s) URL")
    card_url = base_url if base_url.rstrip("/").endswith(AGENT_CARD_PATH) else base_url.rstrip("/") + AGENT_CARD_PATH
    shown = safe_url(card_url)
    try:
        async with session.get(
            card_url, headers={"Accept": "application/json"}, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            if response.status != 200:
                raise AgentCardError(f"{shown} answered HTTP {response.status}")
            body = await read_limited(response, CARD_MAX_BYTES)
    except TimeoutError:
        raise AgentCardError(f"{shown} did not answer within {timeout_s:g}s") from None
    except (aiohttp.ClientError, OSError) as error:
        raise AgentCardError(f"cannot reach {shown}: {type(error).__name__}: {error}") from None
    if isinstance(body, TooLarge):
        raise AgentCardError(f"the agent card at {shown} is larger than {CARD_MAX_BYTES} bytes")
    return parse_agent_card(body, str(response.url))
