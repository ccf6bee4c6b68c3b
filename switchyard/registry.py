"""The agent registry: the built-in store in PostgreSQL, an external HTTP registry, and a TTL cache.

The bridge looks agents up through :class:`CachedRegistry` in front of either
:class:`DatabaseRegistry` (the default) or :class:`HttpRegistry` (when
``SWITCHYARD_REGISTRY_URL`` is set: any service that answers
``GET /agents/{name}`` with an :class:`~models.agents.AgentEntry` as JSON).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import aiohttp
from pydantic import ValidationError
from sqlalchemy import Engine, delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from models.agents import AgentEntry
from models.messages import utcnow
from models.records import AgentRecord

__all__ = [
    "CachedRegistry",
    "DatabaseRegistry",
    "HttpRegistry",
    "Registry",
    "RegistryError",
    "RegistryFileError",
    "RegistryStore",
    "load_registry_file",
]

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """The registry could not be asked (as opposed to: the agent is not in it)."""


class RegistryFileError(ValueError):
    """A registry file is unreadable or holds an invalid entry; the message says where."""


class Registry(Protocol):
    """Looks agents up by name."""

    async def get(self, name: str) -> AgentEntry | None:
        """The agent, or None when it is not registered.

        Raises:
            RegistryError: The registry could not be asked.
        """
        ...


class RegistryStore:
    """The built-in registry's table (blocking; call it from a thread in async code)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def get(self, name: str) -> AgentEntry | None:
        """One agent, or None."""
        with Session(self._engine) as session:
            row = session.get(AgentRecord, name)
            return None if row is None else AgentEntry.model_validate(row.entry)

    def list(self) -> list[AgentEntry]:
        """Every agent, by name."""
        with Session(self._engine) as session:
            rows = session.scalars(select(AgentRecord).order_by(AgentRecord.name))
            return [AgentEntry.model_validate(row.entry) for row in rows]

    def put(self, entry: AgentEntry) -> bool:
        """Add or replace an agent.

        Returns:
            True if it was new.
        """
        now = utcnow()
        values = insert(AgentRecord).values(name=entry.name, entry=entry.to_storage(), created_at=now, updated_at=now)
        stmt = values.on_conflict_do_update(
            index_elements=["name"], set_={"entry": values.excluded.entry, "updated_at": now}
        ).returning(AgentRecord.created_at)
        with Session(self._engine) as session, session.begin():
            created: datetime = session.execute(stmt).scalar_one()
        return created == now

    def delete(self, name: str) -> bool:
        """Remove an agent.

        Returns:
            Whether it existed.
        """
        with Session(self._engine) as session, session.begin():
            result = session.execute(delete(AgentRecord).where(AgentRecord.name == name))
            return bool(result.rowcount)  # type: ignore[attr-defined]


class DatabaseRegistry:
    """:class:`Registry` over the built-in store, without blocking the event loop."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    async def get(self, name: str) -> AgentEntry | None:
        """See :class:`Registry`."""
        try:
            return await asyncio.to_thread(self._store.get, name)
        except Exception as error:
            raise RegistryError(f"registry database error: {type(error).__name__}") from error


class HttpRegistry:
    """:class:`Registry` over an external service answering ``GET {base}/agents/{name}``.

    404 means "not registered"; connection errors and 5xx are retried a few
    times with backoff, then reported as :class:`RegistryError`.
    """

    def __init__(
        self, base_url: str, session: aiohttp.ClientSession, *, attempts: int = 3, timeout_s: float = 5.0
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("the registry URL must be http:// or https://")
        self._base = base_url.rstrip("/")
        self._session = session
        self._attempts = attempts
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def get(self, name: str) -> AgentEntry | None:
        """See :class:`Registry`."""
        url = f"{self._base}/agents/{quote(name, safe='')}"
        problem = "no answer"
        for attempt in range(1, self._attempts + 1):
            try:
                async with self._session.get(url, timeout=self._timeout) as response:
                    if response.status == 404:
                        return None
                    if response.status < 500:
                        if response.status != 200:
                            raise RegistryError(f"registry answered HTTP {response.status} for {name!r}")
                        try:
                            return AgentEntry.model_validate(await response.json(content_type=None))
                        except (ValidationError, json.JSONDecodeError, aiohttp.ContentTypeError) as error:
                            raise RegistryError(f"registry entry for {name!r} is invalid: {error}") from None
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as error:
                problem = type(error).__name__
            if attempt < self._attempts:
                await asyncio.sleep(0.2 * 2 ** (attempt - 1))
        raise RegistryError(f"registry at {self._base} unavailable ({problem})")


class CachedRegistry:
    """A TTL cache in front of another registry; misses are cached too, for a shorter time."""

    def __init__(self, inner: Registry, ttl_s: float = 30.0, *, miss_ttl_s: float | None = None) -> None:
        self._inner = inner
        self._ttl = ttl_s
        self._miss_ttl = min(ttl_s, 2.0) if miss_ttl_s is None else miss_ttl_s
        self._entries: dict[str, tuple[float, AgentEntry | None]] = {}
        self.lookups = 0
        self.misses = 0

    async def get(self, name: str) -> AgentEntry | None:
        """See :class:`Registry`."""
        self.lookups += 1
        now = time.monotonic()
        cached = self._entries.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        self.misses += 1
        entry = await self._inner.get(name)
        self._entries[name] = (now + (self._ttl if entry is not None else self._miss_ttl), entry)
        return entry

    def invalidate(self, name: str | None = None) -> None:
        """Forget one agent, or everything."""
        if name is None:
            self._entries.clear()
        else:
            self._entries.pop(name, None)


def load_registry_file(path: Path | str) -> list[AgentEntry]:
    """Read agents from a JSON file: ``{"agents": [...]}`` or a bare list.

    Raises:
        RegistryFileError: The file is missing, not JSON, or an entry is invalid
            (the message names the entry's index and field).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryFileError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RegistryFileError(f"{path}: not valid JSON ({error})") from None
    items = data.get("agents") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise RegistryFileError(f'{path}: expected {{"agents": [...]}} or a list of agents')
    entries: list[AgentEntry] = []
    problems: list[str] = []
    for index, item in enumerate(items):
        try:
            entries.append(AgentEntry.model_validate(item))
        except ValidationError as error:
            for e in error.errors(include_url=False):
                where = ".".join(str(p) for p in e["loc"])
                problems.append(f"agents[{index}].{where}: {e['msg']}" if where else f"agents[{index}]: {e['msg']}")
    if problems:
        raise RegistryFileError(f"{path}: " + "; ".join(problems))
    names = [e.name for e in entries]
    duplicates: Sequence[str] = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegistryFileError(f"{path}: agent names appear twice: {', '.join(duplicates)}")
    return entries
