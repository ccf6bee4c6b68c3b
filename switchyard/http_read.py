"""Reading another server's HTTP answer within a size limit, and naming its URL without secrets.

:func:`read_limited` never holds more than the limit in memory, whatever the
server sends (a missing or false ``Content-Length`` included). :func:`safe_url`
is how a URL appears in logs and error messages: without user info, query or
fragment, where credentials and tokens tend to be. The bridge's calls to
agents (:mod:`agents_bridge.calls`) and the agent card fetch
(:mod:`switchyard.agent_cards`) use both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp

__all__ = ["TooLarge", "read_limited", "safe_url"]

_CHUNK_BYTES: Final = 64 * 1024


@dataclass(frozen=True)
class TooLarge:
    """A body over the limit; ``size`` is its whole size when it was counted (None: past what is counted)."""

    size: int | None


async def read_limited(response: aiohttp.ClientResponse, limit: int, *, count_up_to: int = 0) -> bytes | TooLarge:
    """The body, or :class:`TooLarge` if it is longer than ``limit`` bytes.

    Args:
        response: The answer whose body is read.
        limit: The most bytes kept.
        count_up_to: A body over the limit is read on, and dropped, up to this
            many bytes, so that its size can be named.

    Returns:
        The whole body, or how large it was when it is over ``limit``.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
        size += len(chunk)
        if size > max(limit, count_up_to):
            return TooLarge(None)
        if size <= limit:
            chunks.append(chunk)
    return b"".join(chunks) if size <= limit else TooLarge(size)


def safe_url(url: str) -> str:
    """The URL as it may appear in logs and messages: no user info, query or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<invalid url>"
    return urlunsplit((parts.scheme, host + port, parts.path, "", ""))
