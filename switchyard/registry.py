"""The agent registry: the built-in store in PostgreSQL, an external HTTP registry, and a TTL cache.

The bridge looks agents up through :class:`CachedRegistry` in front of either
:class:`DatabaseRegistry` (the default) or :class:`HttpRegistry` (when
``SWITCHYARD_REGISTRY_URL`` is set: any service that answers
``GET /agents/{name}`` with an :class:`~models.agents.AgentEntry` as JSON).

Secrets at rest: :class:`RegistryStore` stores a literal secret encrypted
(``fernet:<token>``, key from ``SWITCHYARD_SECRETS_KEY``, see
:mod:`switchyard.secrets`) and refuses it without a key; ``env:NAME``
references are stored as they are. Entries from an :class:`HttpRegistry` are
not at rest here and are used as they come.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from pydantic import ValidationError
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from models.agents import AgentEntry, SecretForm
from models.messages import utcnow
from models.records import AgentRecord
from switchyard.secrets import KEY_VARIABLE, MAKE_KEY_COMMAND, SecretCipher, SecretDecryptError, SecretsKeyError
from switchyard.settings import Settings

__all__ = [
    "CachedRegistry",
    "DatabaseRegistry",
    "HttpRegistry",
    "Registry",
    "RegistryError",
    "RegistryFileError",
    "RegistrySecretError",
    "RegistryStore",
    "load_registry_file",
]

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """The registry could not be asked (as opposed to: the agent is not in it)."""


class RegistryFileError(ValueError):
    """A registry file is unreadable or holds an invalid entry; the message says where."""


class RegistrySecretError(ValueError):
    """A literal secret cannot be stored: there is no usable ``SWITCHYARD_SECRETS_KEY``; the message says what to do."""


# Rows as read (name, entry JSON, updated_at) and rewrites (name, updated_at read, entry to store);
# aliases, since inside RegistryStore ``list`` is its method.
_Rows = list[tuple[str, Any, datetime]]
_Rewrites = list[tuple[str, datetime, AgentEntry]]
_Entries = list[AgentEntry]

# (agent, problem) pairs already logged: stores are made per request, the warning once per process.
_warned: set[tuple[str, str]] = set()


def _warn_once(name: str, problem: str, message: str) -> None:
    if (name, problem) not in _warned:
        _warned.add((name, problem))
        log.warning(message)


class Registry(Protocol):
    """Looks agents up by name."""

    async def get(self, name: str) -> AgentEntry | None:
        """The agent, or None when it is not registered.

        Raises:
            RegistryError: The registry could not be asked.
        """
        ...


class RegistryStore:
    """The built-in registry's table (blocking; call it from a thread in async code).

    A literal secret is stored encrypted with ``SWITCHYARD_SECRETS_KEY`` and
    decrypted when the entry is read; without a usable key :meth:`put`
    refuses it. An entry whose secret cannot be decrypted (no key, another
    key) is still returned, with the secret encrypted: the entry works for
    everything but a call, and a call fails with a configuration error
    (:class:`~models.agents.EncryptedSecretError`). Reading also upgrades
    what is stored, when there is a key: a literal secret written by an
    earlier version is encrypted, and one encrypted with an older key (not the
    first of ``SWITCHYARD_SECRETS_KEY``) is encrypted again with the first.
    Without a key such a literal secret keeps working, with a warning (once
    per agent and process) that names the agent.

    Args:
        engine: The database.
        settings: Where ``secrets_key`` comes from; by default the settings of
            the environment (and ``.env``), read now.
    """

    def __init__(self, engine: Engine, settings: Settings | None = None) -> None:
        self._engine = engine
        key = (settings if settings is not None else Settings()).secrets_key
        self._cipher = SecretCipher.from_key(key)
        if key is not None and self._cipher.problem is not None:
            problem = self._cipher.problem
            _warn_once("", problem, f"{problem}: literal secrets can be neither stored nor read ({MAKE_KEY_COMMAND})")

    def get(self, name: str) -> AgentEntry | None:
        """One agent, or None."""
        with Session(self._engine) as session:
            rows = session.execute(
                select(AgentRecord.name, AgentRecord.entry, AgentRecord.updated_at).where(AgentRecord.name == name)
            ).all()
        entries = self._open([(row.name, row.entry, row.updated_at) for row in rows])
        return entries[0] if entries else None

    def list(self) -> list[AgentEntry]:
        """Every agent, by name."""
        with Session(self._engine) as session:
            rows = session.execute(
                select(AgentRecord.name, AgentRecord.entry, AgentRecord.updated_at).order_by(AgentRecord.name)
            ).all()
        return self._open([(row.name, row.entry, row.updated_at) for row in rows])

    def encrypt_plaintext(self) -> int:
        """Encrypt every literal secret still stored in clear (and re-encrypt those of an older key) now.

        Reading an entry does the same for that entry; this does it for all
        (for example at start-up). Without a usable key it changes nothing.

        Returns:
            How many entries were written again.
        """
        with Session(self._engine) as session:
            rows = session.execute(select(AgentRecord.name, AgentRecord.entry, AgentRecord.updated_at)).all()
        return self._rewrite(self._upgrades([(row.name, row.entry, row.updated_at) for row in rows])[1])

    def put(self, entry: AgentEntry) -> bool:
        """Add or replace an agent; a literal secret is stored encrypted.

        Returns:
            True if it was new.

        Raises:
            RegistrySecretError: The entry holds a literal secret and there is no
                usable ``SWITCHYARD_SECRETS_KEY``.
        """
        stored = self._sealed(entry)
        now = utcnow()
        values = insert(AgentRecord).values(name=entry.name, entry=stored.to_storage(), created_at=now, updated_at=now)
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

    def _sealed(self, entry: AgentEntry) -> AgentEntry:
        """The entry as it is stored: a literal secret encrypted; references and encrypted secrets as they are."""
        if entry.auth is None or entry.auth.secret_form is not SecretForm.LITERAL:
            return entry
        try:
            return entry.with_secret(self._cipher.encrypt(entry.auth.secret.get_secret_value()))
        except SecretsKeyError as error:
            raise RegistrySecretError(
                f"agent {entry.name!r} has a literal secret, which is stored only encrypted, and {error}:"
                f" use an env:NAME reference (read from the bridge's environment at call time),"
                f" or set {KEY_VARIABLE} to a Fernet key (make one with: {MAKE_KEY_COMMAND})"
            ) from None

    def _open(self, rows: _Rows) -> _Entries:
        entries, rewrites = self._upgrades(rows)
        self._rewrite(rewrites)
        return entries

    def _upgrades(self, rows: _Rows) -> tuple[_Entries, _Rewrites]:
        """The entries for use (secrets decrypted), and what is worth storing again (name, updated_at, entry)."""
        entries: _Entries = []
        rewrites: _Rewrites = []
        for name, data, updated_at in rows:
            entry = AgentEntry.model_validate(data)
            form = None if entry.auth is None else entry.auth.secret_form
            if entry.auth is None or form is SecretForm.REFERENCE:
                entries.append(entry)
            elif form is SecretForm.ENCRYPTED:
                try:
                    secret, stale = self._cipher.decrypt(entry.auth.secret.get_secret_value())
                except (SecretsKeyError, SecretDecryptError) as error:
                    # Kept encrypted: the call fails (configuration), the rest of the entry serves.
                    _warn_once(
                        name,
                        str(error),
                        f"agent {name!r}: its secret is stored encrypted and cannot be decrypted ({error});"
                        f" calls to it fail until {KEY_VARIABLE} holds the key it was encrypted with",
                    )
                    entries.append(entry)
                    continue
                entries.append(entry.with_secret(secret))
                if stale:
                    rewrites.append((name, updated_at, entry.with_secret(self._cipher.encrypt(secret))))
            elif self._cipher.available:  # a literal secret stored by an earlier version
                entries.append(entry)
                rewrites.append((name, updated_at, self._sealed(entry)))
            else:
                _warn_once(
                    name,
                    "plain text",
                    f"agent {name!r}: its secret is stored in plain text (an earlier version);"
                    f" set {KEY_VARIABLE} to store it encrypted, or use an env:NAME reference",
                )
                entries.append(entry)
        return entries, rewrites

    def _rewrite(self, rewrites: _Rewrites) -> int:
        """Store upgraded secrets, unless the entry changed since it was read; best-effort (a read must not fail)."""
        written = 0
        for name, updated_at, entry in rewrites:
            # updated_at as the guard: a put in between moved it, and its entry wins.
            # updated_at itself stays: the agent did not change, only how its secret is kept.
            stmt = (
                update(AgentRecord)
                .where(AgentRecord.name == name, AgentRecord.updated_at == updated_at)
                .values(entry=entry.to_storage())
            )
            try:
                with Session(self._engine) as session, session.begin():
                    changed = bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]
            except SQLAlchemyError as error:
                # The type only: the error's text would show the statement's parameters.
                log.warning("agent %r: could not store its secret encrypted (%s)", name, type(error).__name__)
                continue
            if changed:
                written += 1
                log.info("agent %r: secret stored encrypted with the first key of %s", name, KEY_VARIABLE)
        return written


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
    """A TTL cache in front of another registry; misses are cached too, for a shorter time.

    Lookups of one name that miss at the same time share one request to the
    inner registry: the bridge takes thousands of tasks at once, and they
    would otherwise all ask the database (or the registry service) together
    when an entry expires.
    """

    def __init__(self, inner: Registry, ttl_s: float = 30.0, *, miss_ttl_s: float | None = None) -> None:
        self._inner = inner
        self._ttl = ttl_s
        self._miss_ttl = min(ttl_s, 2.0) if miss_ttl_s is None else miss_ttl_s
        self._entries: dict[str, tuple[float, AgentEntry | None]] = {}
        self._asking: dict[str, asyncio.Future[AgentEntry | None]] = {}
        self.lookups = 0
        self.misses = 0

    async def get(self, name: str) -> AgentEntry | None:
        """See :class:`Registry`."""
        self.lookups += 1
        cached = self._entries.get(name)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        asking = self._asking.get(name)
        if asking is None:
            self.misses += 1
            asking = self._asking[name] = asyncio.ensure_future(self._ask(name))
            # Read the outcome even when every waiter was cancelled (no "exception never retrieved").
            asking.add_done_callback(lambda done: done.cancelled() or done.exception())
        # Shielded: a waiter cancelled does not cancel the lookup the others wait for.
        return await asyncio.shield(asking)

    async def _ask(self, name: str) -> AgentEntry | None:
        asked = time.monotonic()
        try:
            entry = await self._inner.get(name)
        finally:
            self._asking.pop(name, None)
        self._entries[name] = (asked + (self._ttl if entry is not None else self._miss_ttl), entry)
        return entry

    def invalidate(self, name: str | None = None) -> None:
        """Forget one agent, or everything (a lookup under way still stores what it finds)."""
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
