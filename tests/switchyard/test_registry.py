"""The agent registry: the PostgreSQL store, the TTL cache, the HTTP registry (real server) and registry files."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr
from sqlalchemy import Engine, delete, select, text
from sqlalchemy.engine import make_url

from models.agents import AgentEntry
from models.records import AgentRecord
from switchyard import registry as registry_module
from switchyard.db import make_engine
from switchyard.registry import (
    CachedRegistry,
    DatabaseRegistry,
    HttpRegistry,
    RegistryError,
    RegistryFileError,
    RegistrySecretError,
    RegistryStore,
    load_registry_file,
)
from switchyard.secrets import SecretCipher, generate_key
from switchyard.settings import Settings

pytestmark = pytest.mark.timeout(60)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "agents"
SECRET = "reg-s3cret-6d1b0c"
ENV_REF = "env:SWITCHYARD_TEST_REGISTRY_TOKEN"
SECRETS_KEY = generate_key()


def _entry(name: str = "researcher", **fields: Any) -> AgentEntry:
    data: dict[str, Any] = {"name": name, "url": f"http://127.0.0.1:8101/{name}"}
    data.update(fields)
    return AgentEntry.model_validate(data)


# ====================================================================== RegistryStore (PostgreSQL)


@pytest.fixture
def store(engine: Engine) -> RegistryStore:
    """The store on the module's database, with an empty agents table and a secrets key."""
    with engine.begin() as conn:
        conn.execute(delete(AgentRecord))
    return RegistryStore(engine, Settings(secrets_key=SecretStr(SECRETS_KEY)))


@pytest.mark.postgres
def test_put_new_then_replace(store: RegistryStore) -> None:
    first = _entry("researcher", timeout_s=10)
    assert store.put(first) is True
    assert store.get("researcher") == first

    second = _entry("researcher", url="https://agents.example.com/researcher", timeout_s=20)
    assert store.put(second) is False  # replaced, not new
    assert store.get("researcher") == second
    assert [e.name for e in store.list()] == ["researcher"]


@pytest.mark.postgres
def test_put_again_after_delete_is_new(store: RegistryStore) -> None:
    assert store.put(_entry("a")) is True
    assert store.delete("a") is True
    assert store.put(_entry("a")) is True


@pytest.mark.postgres
def test_replace_keeps_created_at_and_moves_updated_at(store: RegistryStore, engine: Engine) -> None:
    store.put(_entry("a"))
    with engine.connect() as conn:
        created, updated = conn.execute(
            select(AgentRecord.created_at, AgentRecord.updated_at).where(AgentRecord.name == "a")
        ).one()
    store.put(_entry("a", description="changed"))
    with engine.connect() as conn:
        created2, updated2 = conn.execute(
            select(AgentRecord.created_at, AgentRecord.updated_at).where(AgentRecord.name == "a")
        ).one()
    assert created2 == created
    assert updated2 > updated


@pytest.mark.postgres
def test_max_concurrency_is_stored_and_read_back(store: RegistryStore) -> None:
    store.put(_entry("limited", max_concurrency=3))
    found = store.get("limited")
    assert found is not None
    assert found.max_concurrency == 3
    store.put(_entry("limited"))
    found = store.get("limited")
    assert found is not None
    assert found.max_concurrency is None


def test_get_unknown_is_none(store: RegistryStore) -> None:
    assert store.get("nobody") is None


@pytest.mark.postgres
def test_list_is_sorted_by_name(store: RegistryStore) -> None:
    assert store.list() == []
    for name in ["zeta", "alpha", "mid", "beta2", "beta1"]:
        store.put(_entry(name))
    assert [e.name for e in store.list()] == ["alpha", "beta1", "beta2", "mid", "zeta"]


@pytest.mark.postgres
def test_delete(store: RegistryStore) -> None:
    store.put(_entry("a"))
    store.put(_entry("b"))
    assert store.delete("a") is True
    assert store.delete("a") is False
    assert store.delete("never-there") is False
    assert store.get("a") is None
    assert [e.name for e in store.list()] == ["b"]


@pytest.mark.postgres
def test_secret_is_stored_encrypted_and_shown_redacted(store: RegistryStore, engine: Engine) -> None:
    store.put(_entry("secure", auth={"kind": "bearer", "secret": SECRET}))
    with engine.connect() as conn:
        raw = conn.execute(select(AgentRecord.entry).where(AgentRecord.name == "secure")).scalar_one()
        row = conn.execute(text("SELECT agents::text FROM agents WHERE name = 'secure'")).scalar_one()
    assert SECRET not in row  # encrypted at rest (tests/switchyard/test_secrets.py has the details)
    assert raw["auth"]["secret"].startswith("fernet:")
    assert SecretCipher.from_key(SECRETS_KEY).decrypt(raw["auth"]["secret"])[0] == SECRET

    loaded = store.get("secure")
    assert loaded is not None
    assert loaded.auth is not None
    assert loaded.auth.headers() == {"Authorization": f"Bearer {SECRET}"}
    assert SECRET not in json.dumps(loaded.redacted())
    assert SECRET not in repr(loaded)
    assert all(SECRET not in repr(e) for e in store.list())


@pytest.mark.postgres
def test_env_reference_is_stored_as_a_reference(
    store: RegistryStore, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_REF.removeprefix("env:"), SECRET)
    store.put(_entry("ref", auth={"kind": "api_key", "header": "X-Token", "secret": ENV_REF}))
    with engine.connect() as conn:
        raw = conn.execute(select(AgentRecord.entry).where(AgentRecord.name == "ref")).scalar_one()
    assert raw["auth"]["secret"] == ENV_REF
    assert SECRET not in json.dumps(raw)  # the value is read at call time, never stored

    loaded = store.get("ref")
    assert loaded is not None
    assert loaded.auth is not None
    assert loaded.redacted()["auth"] == {"kind": "api_key", "header": "X-Token", "secret": ENV_REF}
    assert loaded.auth.headers() == {"X-Token": SECRET}


@pytest.mark.postgres
def test_a_literal_secret_without_a_key_is_refused(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(delete(AgentRecord))
    keyless = RegistryStore(engine, Settings(secrets_key=None))
    with pytest.raises(RegistrySecretError, match="env:NAME") as caught:
        keyless.put(_entry("secure", auth={"kind": "bearer", "secret": SECRET}))
    assert SECRET not in str(caught.value)
    assert keyless.list() == []


# ====================================================================== DatabaseRegistry


@pytest.mark.postgres
async def test_database_registry_get(store: RegistryStore) -> None:
    entry = _entry("researcher", timeout_s=5)
    store.put(entry)
    registry = DatabaseRegistry(store)
    assert await registry.get("researcher") == entry
    assert await registry.get("missing") is None


@pytest.mark.postgres
async def test_database_registry_broken_engine_raises_registry_error(database_url: str) -> None:
    missing_db = make_url(database_url).set(database="switchyard_no_such_database")
    broken = make_engine(missing_db.render_as_string(hide_password=False))
    try:
        registry = DatabaseRegistry(RegistryStore(broken))
        with pytest.raises(RegistryError, match="registry database error") as info:
            await registry.get("researcher")
        assert info.value.__cause__ is not None  # the original error is kept for the logs
    finally:
        broken.dispose()


# ====================================================================== CachedRegistry


class FakeRegistry:
    """A registry that counts lookups per name; a unit-test stand-in for the inner registry."""

    def __init__(self, entries: dict[str, AgentEntry] | None = None) -> None:
        self.entries = dict(entries or {})
        self.calls: Counter[str] = Counter()
        self.fail = False

    async def get(self, name: str) -> AgentEntry | None:
        self.calls[name] += 1
        if self.fail:
            raise RegistryError("down")
        return self.entries.get(name)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Replace the clock the cache reads (only in switchyard.registry; the event loop keeps the real one)."""
    fake = FakeClock()
    monkeypatch.setattr(registry_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


async def test_cache_hit_within_ttl() -> None:
    entry = _entry("a")
    inner = FakeRegistry({"a": entry})
    cache = CachedRegistry(inner, ttl_s=30)
    for _ in range(5):
        assert await cache.get("a") == entry
    assert inner.calls["a"] == 1
    assert cache.lookups == 5
    assert cache.misses == 1


async def test_cache_entry_expires_after_ttl() -> None:
    entry = _entry("a")
    inner = FakeRegistry({"a": entry})
    cache = CachedRegistry(inner, ttl_s=0.02)
    assert await cache.get("a") == entry
    assert inner.calls["a"] == 1
    await asyncio.sleep(0.04)
    changed = _entry("a", url="http://127.0.0.1:9999/")
    inner.entries["a"] = changed
    assert await cache.get("a") == changed  # asked again, so a changed entry is seen
    assert inner.calls["a"] == 2


async def test_cache_ttl_boundaries(clock: FakeClock) -> None:
    inner = FakeRegistry({"a": _entry("a")})
    cache = CachedRegistry(inner, ttl_s=30)
    await cache.get("a")
    clock.now += 29.9
    await cache.get("a")
    assert inner.calls["a"] == 1
    clock.now += 0.2
    await cache.get("a")
    assert inner.calls["a"] == 2


async def test_misses_are_cached_for_the_short_miss_ttl(clock: FakeClock) -> None:
    inner = FakeRegistry({"known": _entry("known")})
    cache = CachedRegistry(inner, ttl_s=30)  # miss TTL defaults to min(ttl, 2 s)
    assert await cache.get("ghost") is None
    assert await cache.get("known") is not None
    clock.now += 1.9
    assert await cache.get("ghost") is None
    assert inner.calls["ghost"] == 1  # a miss is remembered a little while (no stampede)
    inner.entries["ghost"] = _entry("ghost")  # ... the agent gets registered
    clock.now += 0.2
    assert await cache.get("ghost") == _entry("ghost")  # ... and is found within the short miss TTL
    assert inner.calls["ghost"] == 2
    assert await cache.get("known") is not None
    assert inner.calls["known"] == 1  # hits keep the long TTL


async def test_miss_ttl_with_real_time() -> None:
    inner = FakeRegistry()
    cache = CachedRegistry(inner, ttl_s=30, miss_ttl_s=0.02)
    assert await cache.get("ghost") is None
    assert await cache.get("ghost") is None
    assert inner.calls["ghost"] == 1
    await asyncio.sleep(0.04)
    assert await cache.get("ghost") is None
    assert inner.calls["ghost"] == 2


async def test_miss_ttl_never_exceeds_a_short_ttl(clock: FakeClock) -> None:
    inner = FakeRegistry()
    cache = CachedRegistry(inner, ttl_s=0.5)
    await cache.get("ghost")
    clock.now += 0.6
    await cache.get("ghost")
    assert inner.calls["ghost"] == 2


async def test_errors_are_not_cached() -> None:
    inner = FakeRegistry({"a": _entry("a")})
    inner.fail = True
    cache = CachedRegistry(inner, ttl_s=30)
    with pytest.raises(RegistryError):
        await cache.get("a")
    inner.fail = False
    assert await cache.get("a") == _entry("a")
    assert inner.calls["a"] == 2


async def test_invalidate_one_and_all() -> None:
    inner = FakeRegistry({"a": _entry("a"), "b": _entry("b")})
    cache = CachedRegistry(inner, ttl_s=30)
    await cache.get("a")
    await cache.get("b")
    cache.invalidate("a")
    cache.invalidate("never-cached")  # no error
    await cache.get("a")
    await cache.get("b")
    assert inner.calls == Counter({"a": 2, "b": 1})
    cache.invalidate()
    await cache.get("a")
    await cache.get("b")
    assert inner.calls == Counter({"a": 3, "b": 2})


class GatedRegistry(FakeRegistry):
    """A FakeRegistry whose lookups wait for a gate: lookups that overlap can be made."""

    def __init__(self, entries: dict[str, AgentEntry] | None = None) -> None:
        super().__init__(entries)
        self.gate = asyncio.Event()

    async def get(self, name: str) -> AgentEntry | None:
        self.calls[name] += 1
        await self.gate.wait()
        if self.fail:
            raise RegistryError("down")
        return self.entries.get(name)


async def test_lookups_that_miss_together_share_one_request() -> None:
    inner = GatedRegistry({"a": _entry("a")})
    cache = CachedRegistry(inner, ttl_s=30)
    waiting = [asyncio.create_task(cache.get("a")) for _ in range(500)]
    other = asyncio.create_task(cache.get("b"))
    await asyncio.sleep(0.01)
    inner.gate.set()
    assert await asyncio.gather(*waiting) == [_entry("a")] * 500
    assert await other is None
    assert inner.calls == Counter({"a": 1, "b": 1})
    assert (cache.lookups, cache.misses) == (501, 2)


async def test_a_failed_shared_lookup_fails_every_waiter_and_is_not_cached() -> None:
    inner = GatedRegistry({"a": _entry("a")})
    inner.fail = True
    cache = CachedRegistry(inner, ttl_s=30)
    waiting = [asyncio.create_task(cache.get("a")) for _ in range(3)]
    await asyncio.sleep(0.01)
    inner.gate.set()
    for outcome in await asyncio.gather(*waiting, return_exceptions=True):
        assert isinstance(outcome, RegistryError)
    inner.fail = False
    assert await cache.get("a") == _entry("a")
    assert inner.calls["a"] == 2


async def test_a_waiter_cancelled_does_not_cancel_the_shared_lookup() -> None:
    inner = GatedRegistry({"a": _entry("a")})
    cache = CachedRegistry(inner, ttl_s=30)
    first = asyncio.create_task(cache.get("a"))
    second = asyncio.create_task(cache.get("a"))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    inner.gate.set()
    assert await second == _entry("a")
    assert first.cancelled()
    assert await cache.get("a") == _entry("a")
    assert inner.calls["a"] == 1


# ====================================================================== HttpRegistry (real aiohttp server)


@dataclass
class Script:
    """What the test registry server answers, in order (the last reply repeats), and what it was asked."""

    replies: list[tuple[int, str]] = field(default_factory=lambda: [(404, "{}")])
    paths: list[str] = field(default_factory=list)
    hang: asyncio.Event = field(default_factory=asyncio.Event)

    def next_reply(self) -> tuple[int, str]:
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


@dataclass
class RegistryServer:
    script: Script
    url: str


@pytest.fixture
async def server() -> AsyncIterator[RegistryServer]:
    script = Script()

    async def handle(request: web.Request) -> web.Response:
        script.paths.append(request.raw_path)
        status, body = script.next_reply()
        if status == 0:  # never answers (until the test ends)
            await script.hang.wait()
            status, body = 503, ""
        return web.Response(status=status, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    test_server = TestServer(app, host="127.0.0.1", port=0)
    await test_server.start_server()
    try:
        yield RegistryServer(script, str(test_server.make_url("")).rstrip("/"))
    finally:
        script.hang.set()
        await test_server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def _body(entry: AgentEntry) -> str:
    return json.dumps(entry.to_storage())


async def test_http_200_returns_the_entry(server: RegistryServer, session: aiohttp.ClientSession) -> None:
    entry = _entry("researcher", timeout_s=7, max_concurrency=5, auth={"kind": "bearer", "secret": ENV_REF})
    server.script.replies = [(200, _body(entry))]
    got = await HttpRegistry(server.url, session).get("researcher")
    assert got == entry
    assert server.script.paths == ["/agents/researcher"]


async def test_http_404_is_none(server: RegistryServer, session: aiohttp.ClientSession) -> None:
    server.script.replies = [(404, '{"error": "not found"}')]
    assert await HttpRegistry(server.url, session).get("nobody") is None
    assert len(server.script.paths) == 1  # not retried


async def test_http_5xx_is_retried(server: RegistryServer, session: aiohttp.ClientSession) -> None:
    entry = _entry("researcher")
    server.script.replies = [(500, "oops"), (503, ""), (200, _body(entry))]
    assert await HttpRegistry(server.url, session, attempts=3).get("researcher") == entry
    assert server.script.paths == ["/agents/researcher"] * 3


async def test_http_always_5xx_raises(server: RegistryServer, session: aiohttp.ClientSession) -> None:
    server.script.replies = [(500, "oops")]
    with pytest.raises(RegistryError, match=r"unavailable \(HTTP 500\)"):
        await HttpRegistry(server.url, session, attempts=3).get("researcher")
    assert len(server.script.paths) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 302])
async def test_http_other_status_raises_without_retry(
    status: int, server: RegistryServer, session: aiohttp.ClientSession
) -> None:
    server.script.replies = [(status, "{}")]
    with pytest.raises(RegistryError, match=f"HTTP {status}"):
        await HttpRegistry(server.url, session).get("researcher")
    assert len(server.script.paths) == 1


@pytest.mark.parametrize(
    "body",
    [
        "this is not json",
        "",
        '{"name": "researcher"}',  # no url
        '{"name": "researcher", "url": "file:///etc/passwd"}',
        '["researcher"]',
        "null",
    ],
)
async def test_http_invalid_entry_raises(body: str, server: RegistryServer, session: aiohttp.ClientSession) -> None:
    server.script.replies = [(200, body)]
    with pytest.raises(RegistryError, match="invalid"):
        await HttpRegistry(server.url, session).get("researcher")
    assert len(server.script.paths) == 1  # a bad answer is not retried


async def test_http_invalid_entry_error_does_not_leak_the_secret(
    server: RegistryServer, session: aiohttp.ClientSession
) -> None:
    bad = {"name": "researcher", "url": "ftp://x/", "auth": {"kind": "bearer", "secret": SECRET}}
    server.script.replies = [(200, json.dumps(bad))]
    with pytest.raises(RegistryError) as info:
        await HttpRegistry(server.url, session).get("researcher")
    assert SECRET not in str(info.value)


async def test_http_timeout_raises(server: RegistryServer, session: aiohttp.ClientSession) -> None:
    server.script.replies = [(0, "")]
    with pytest.raises(RegistryError, match="unavailable"):
        await HttpRegistry(server.url, session, attempts=1, timeout_s=0.2).get("researcher")


async def test_http_connection_refused_raises(session: aiohttp.ClientSession) -> None:
    # A port that was just free: nothing listens there.
    app = web.Application()
    probe = TestServer(app, host="127.0.0.1", port=0)
    await probe.start_server()
    url = str(probe.make_url(""))
    await probe.close()
    with pytest.raises(RegistryError, match="unavailable"):
        await HttpRegistry(url, session, attempts=2).get("researcher")


@pytest.mark.parametrize("base", ["ftp://registry/", "registry.local:8080", "file:///tmp/registry", ""])
async def test_http_base_url_must_be_http(base: str, session: aiohttp.ClientSession) -> None:
    with pytest.raises(ValueError, match="http"):
        HttpRegistry(base, session)


@pytest.mark.parametrize("name", ["a/../../admin", "x?y=1#z", "with space", "100%", "plain.name_1-2"])
async def test_http_name_is_url_quoted(name: str, server: RegistryServer, session: aiohttp.ClientSession) -> None:
    server.script.replies = [(404, "")]
    assert await HttpRegistry(server.url, session).get(name) is None
    [path] = server.script.paths
    # One path segment under /agents/, no query or fragment, that decodes back to the name.
    assert path.startswith("/agents/")
    segment = path.removeprefix("/agents/")
    assert not set("/?# ") & set(segment)
    assert unquote(segment) == name


async def test_http_traversal_name_stays_under_agents(server: RegistryServer, session: aiohttp.ClientSession) -> None:
    server.script.replies = [(404, "")]
    await HttpRegistry(server.url + "/v1", session).get("../../admin")
    assert server.script.paths == ["/v1/agents/..%2F..%2Fadmin"]


async def test_http_base_path_and_trailing_slash(server: RegistryServer, session: aiohttp.ClientSession) -> None:
    server.script.replies = [(404, "")]
    await HttpRegistry(server.url + "/v1/", session).get("a")
    await HttpRegistry(server.url + "/", session).get("b")
    assert server.script.paths == ["/v1/agents/a", "/agents/b"]


# ====================================================================== registry files


@pytest.mark.parametrize("filename", ["registry.json", "registry.compose.json"])
def test_example_registry_files_load(filename: str) -> None:
    entries = load_registry_file(EXAMPLES / filename)
    assert [e.name for e in entries] == ["researcher", "summarizer", "reviewer"]
    assert all(e.url.startswith("http://") for e in entries)
    assert all(e.auth is None for e in entries)


def test_example_registry_file_accepts_str_path() -> None:
    assert len(load_registry_file(str(EXAMPLES / "registry.json"))) == 3


def _write(tmp_path: Path, content: Any, name: str = "agents.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_bare_list_is_accepted(tmp_path: Path) -> None:
    # The documented alternative to {"agents": [...]}.
    path = _write(tmp_path, [{"name": "a", "url": "http://a/"}, {"name": "b", "url": "https://b/"}])
    assert [e.name for e in load_registry_file(path)] == ["a", "b"]


def test_empty_list_loads_nothing(tmp_path: Path) -> None:
    assert load_registry_file(_write(tmp_path, {"agents": []})) == []


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(RegistryFileError, match="no such file") as info:
        load_registry_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", ['{"agents": [', "not json at all", "{'agents': []}"])
def test_bad_json(content: str, tmp_path: Path) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(RegistryFileError, match="not valid JSON") as info:
        load_registry_file(path)
    assert str(path) in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"agents": [{"name": "caf\xe9", "url": "http://x/"}]}')
    with pytest.raises(RegistryFileError, match="not valid JSON"):
        load_registry_file(path)


def test_invalid_entry_names_index_and_field(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {"agents": [{"name": "ok", "url": "http://ok/"}, {"name": "bad", "url": "file:///etc/passwd"}]},
    )
    with pytest.raises(RegistryFileError) as info:
        load_registry_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "agents[1].url" in message
    assert "http:// or https://" in message
    assert "agents[0]" not in message


def test_every_invalid_entry_is_reported(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "agents": [
                {"name": "-bad", "url": "http://ok/"},
                {"name": "ok", "url": "http://ok/", "timeout_s": -1},
                42,
                {"name": "x", "url": "http://x/", "surprise": True},
            ]
        },
    )
    with pytest.raises(RegistryFileError) as info:
        load_registry_file(path)
    message = str(info.value)
    assert "agents[0].name" in message
    assert "agents[1].timeout_s" in message
    assert "agents[2]:" in message  # not an object at all
    assert "agents[3].surprise" in message


def test_duplicate_names(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "agents": [
                {"name": "a", "url": "http://a/"},
                {"name": "b", "url": "http://b/"},
                {"name": "a", "url": "http://a2/"},
            ]
        },
    )
    with pytest.raises(RegistryFileError, match=r"appear twice: a$"):
        load_registry_file(path)


@pytest.mark.parametrize(
    "content",
    [
        {"agents": {"name": "a", "url": "http://a/"}},  # an object where a list belongs
        {"agent": []},  # misspelt key
        {},
        42,
        "agents",
        None,
    ],
)
def test_wrong_shape(content: Any, tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps(content))
    with pytest.raises(RegistryFileError, match=r'expected \{"agents": \[\.\.\.\]\} or a list of agents'):
        load_registry_file(path)


def test_file_errors_are_value_errors() -> None:
    # Callers (the CLI) may catch ValueError for any bad input.
    assert issubclass(RegistryFileError, ValueError)
