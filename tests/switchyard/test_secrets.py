"""Secrets at rest: the Fernet cipher, the registry store encrypting literal secrets, and what a call gets."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from sqlalchemy import Engine, delete, insert, select, text

from agents_bridge.calls import AgentCaller, CallSettings
from models.agents import AgentEntry, EncryptedSecretError, SecretForm, SecretReferenceError, secret_form
from models.messages import AgentTask, ResultStatus
from models.records import AgentRecord
from switchyard import registry as registry_module
from switchyard.registry import (
    DatabaseRegistry,
    RegistrySecretError,
    RegistryStore,
    load_registry_file,
)
from switchyard.secrets import SecretCipher, SecretDecryptError, SecretsKeyError, generate_key
from switchyard.settings import Settings

pytestmark = pytest.mark.timeout(60)

SECRET = "at-rest-s3cret-91c4e2"
KEY_A = generate_key()
KEY_B = generate_key()
ENV_REF = "env:SWITCHYARD_TEST_SECRETS_TOKEN"


def _entry(name: str = "secure", secret: str | None = SECRET, **fields: Any) -> AgentEntry:
    data: dict[str, Any] = {"name": name, "url": f"http://127.0.0.1:9/{name}"}
    if secret is not None:
        data["auth"] = {"kind": "bearer", "secret": secret}
    data.update(fields)
    return AgentEntry.model_validate(data)


def _settings(key: str | None) -> Settings:
    return Settings(secrets_key=None if key is None else SecretStr(key))


def _raw_row(engine: Engine, name: str) -> str:
    """The whole stored row as text (every column), to look for a secret anywhere in it."""
    with engine.connect() as conn:
        row: str | None = conn.execute(
            text("SELECT agents::text FROM agents WHERE name = :name"), {"name": name}
        ).scalar()
    assert row is not None
    return row


def _raw_entry(engine: Engine, name: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(AgentRecord.entry).where(AgentRecord.name == name)).scalar_one()


def _stored_secret(engine: Engine, name: str) -> str:
    secret: str = _raw_entry(engine, name)["auth"]["secret"]
    return secret


def _insert_plaintext_row(engine: Engine, entry: AgentEntry) -> None:
    """A row as an earlier version wrote it: the literal secret in clear in the JSONB."""
    with engine.begin() as conn:
        conn.execute(insert(AgentRecord).values(name=entry.name, entry=entry.to_storage()))


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The warn-once memory is per process; each test starts with none, and with no key in the environment.
    monkeypatch.delenv("SWITCHYARD_SECRETS_KEY", raising=False)
    registry_module._warned.clear()
    yield
    registry_module._warned.clear()


@pytest.fixture
def empty(engine: Engine) -> Engine:
    """The module's database with an empty agents table."""
    with engine.begin() as conn:
        conn.execute(delete(AgentRecord))
    return engine


# ====================================================================== the cipher


def test_encrypt_gives_a_fernet_string_that_decrypts_back() -> None:
    cipher = SecretCipher.from_key(KEY_A)
    assert cipher.available
    assert cipher.problem is None
    stored = cipher.encrypt(SECRET)
    assert stored.startswith("fernet:")
    assert SECRET not in stored
    assert secret_form(stored) is SecretForm.ENCRYPTED
    assert cipher.decrypt(stored) == (SECRET, False)
    assert cipher.encrypt(SECRET) != stored  # a fresh IV every time


def test_the_key_may_come_as_a_secret_str() -> None:
    stored = SecretCipher.from_key(SecretStr(KEY_A)).encrypt(SECRET)
    assert SecretCipher.from_key(KEY_A).decrypt(stored)[0] == SECRET


def test_generate_key_is_a_fernet_key() -> None:
    key = generate_key()
    assert Fernet(key).decrypt(Fernet(key).encrypt(b"x")) == b"x"


@pytest.mark.parametrize("key", [None, "", " , "])
def test_without_a_key_nothing_is_encrypted_nor_decrypted(key: str | None) -> None:
    cipher = SecretCipher.from_key(key)
    assert not cipher.available
    assert cipher.problem == "SWITCHYARD_SECRETS_KEY is not set"
    with pytest.raises(SecretsKeyError, match="SWITCHYARD_SECRETS_KEY is not set"):
        cipher.encrypt(SECRET)
    with pytest.raises(SecretsKeyError):
        cipher.decrypt(SecretCipher.from_key(KEY_A).encrypt(SECRET))


@pytest.mark.parametrize(
    ("key", "which"),
    [("not-a-fernet-key", "its value"), (f"{KEY_A},short", "key 2 of 2"), ("x" * 44, "its value")],
)
def test_an_invalid_key_is_reported_without_showing_it(key: str, which: str) -> None:
    cipher = SecretCipher.from_key(key)  # never raises: it says what is wrong when used
    assert not cipher.available
    assert cipher.problem is not None
    assert "not a valid Fernet key" in cipher.problem
    assert which in cipher.problem
    for part in key.split(","):
        assert part not in cipher.problem
    with pytest.raises(SecretsKeyError, match="not a valid Fernet key"):
        cipher.encrypt(SECRET)


def test_another_key_does_not_decrypt_and_the_message_holds_no_secret() -> None:
    stored = SecretCipher.from_key(KEY_A).encrypt(SECRET)
    with pytest.raises(SecretDecryptError) as caught:
        SecretCipher.from_key(KEY_B).decrypt(stored)
    message = str(caught.value)
    assert "SWITCHYARD_SECRETS_KEY" in message
    for hidden in (SECRET, stored, stored.removeprefix("fernet:"), KEY_A, KEY_B):
        assert hidden not in message


def test_rotation_the_first_key_encrypts_every_key_decrypts() -> None:
    old = SecretCipher.from_key(KEY_A).encrypt(SECRET)
    rotating = SecretCipher.from_key(f" {KEY_B} , {KEY_A} ")
    assert rotating.decrypt(old) == (SECRET, True)  # stale: worth encrypting again with the first key
    new = rotating.encrypt(SECRET)
    assert rotating.decrypt(new) == (SECRET, False)
    assert SecretCipher.from_key(KEY_B).decrypt(new)[0] == SECRET
    with pytest.raises(SecretDecryptError, match="any of the 2 keys"):
        rotating.decrypt(SecretCipher.from_key(generate_key()).encrypt(SECRET))


@pytest.mark.parametrize("value", [SECRET, "fernet:", "fernet:not-a-token", ENV_REF])
def test_decrypt_refuses_what_is_not_encrypted(value: str) -> None:
    with pytest.raises(SecretDecryptError, match="not an encrypted secret"):
        SecretCipher.from_key(KEY_A).decrypt(value)


def test_a_token_that_is_not_text_does_not_decrypt() -> None:
    forged = "fernet:" + Fernet(KEY_A).encrypt(b"\xff\xfe").decode()
    with pytest.raises(SecretDecryptError):
        SecretCipher.from_key(KEY_A).decrypt(forged)


# ====================================================================== the store: put


@pytest.mark.postgres
def test_a_literal_secret_is_stored_encrypted_and_reads_back_for_the_call(empty: Engine) -> None:
    store = RegistryStore(empty, _settings(KEY_A))
    assert store.put(_entry()) is True
    row = _raw_row(empty, "secure")
    assert SECRET not in row  # not in the JSONB, nor anywhere in the row
    stored = _stored_secret(empty, "secure")
    assert stored.startswith("fernet:")
    assert SecretCipher.from_key(KEY_A).decrypt(stored) == (SECRET, False)

    loaded = store.get("secure")
    assert loaded is not None
    assert loaded.auth is not None
    assert loaded.auth.headers() == {"Authorization": f"Bearer {SECRET}"}
    assert loaded == _entry()  # the entry as it was put
    assert store.list() == [loaded]
    # What the API shows: masked, neither the secret nor the token.
    for view in (json.dumps(loaded.redacted()), repr(loaded), str(loaded)):
        assert SECRET not in view
        assert stored not in view
    assert loaded.redacted()["auth"] == {"kind": "bearer", "header": "X-API-Key", "secret": "********"}


@pytest.mark.postgres
def test_an_api_key_secret_is_encrypted_too(empty: Engine) -> None:
    store = RegistryStore(empty, _settings(KEY_A))
    store.put(_entry("keyed", secret=None, auth={"kind": "api_key", "header": "X-Token", "secret": SECRET}))
    assert SECRET not in _raw_row(empty, "keyed")
    loaded = store.get("keyed")
    assert loaded is not None
    assert loaded.auth is not None
    assert loaded.auth.headers() == {"X-Token": SECRET}


@pytest.mark.postgres
def test_without_a_key_a_literal_secret_is_refused_and_nothing_is_stored(empty: Engine) -> None:
    store = RegistryStore(empty, _settings(None))
    with pytest.raises(RegistrySecretError) as caught:
        store.put(_entry())
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)  # the HTTP API answers 400, the CLI exits 2
    assert "'secure'" in message
    assert "env:NAME" in message
    assert "SWITCHYARD_SECRETS_KEY" in message
    assert "Fernet.generate_key()" in message  # how to make one
    assert SECRET not in message
    assert "\n" not in message
    assert store.get("secure") is None
    with empty.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM agents")).scalar_one() == 0


@pytest.mark.postgres
def test_a_refused_replacement_leaves_the_old_entry(empty: Engine) -> None:
    store = RegistryStore(empty, _settings(None))
    store.put(_entry("secure", secret=ENV_REF, description="old"))
    with pytest.raises(RegistrySecretError):
        store.put(_entry("secure", description="new"))
    loaded = store.get("secure")
    assert loaded is not None
    assert loaded.description == "old"


@pytest.mark.postgres
@pytest.mark.parametrize("key", [None, KEY_A])
def test_env_references_are_stored_as_they_are(empty: Engine, key: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_REF.removeprefix("env:"), SECRET)
    store = RegistryStore(empty, _settings(key))
    store.put(_entry("ref", secret=ENV_REF))
    assert _stored_secret(empty, "ref") == ENV_REF
    assert SECRET not in _raw_row(empty, "ref")
    loaded = store.get("ref")
    assert loaded is not None
    assert loaded.auth is not None
    assert loaded.auth.headers() == {"Authorization": f"Bearer {SECRET}"}
    assert loaded.redacted()["auth"] == {"kind": "bearer", "header": "X-API-Key", "secret": ENV_REF}


@pytest.mark.postgres
def test_entries_without_credentials_need_no_key(empty: Engine) -> None:
    store = RegistryStore(empty, _settings(None))
    store.put(_entry("open", secret=None))
    assert store.get("open") == _entry("open", secret=None)


@pytest.mark.postgres
def test_an_already_encrypted_secret_is_stored_as_it_is(empty: Engine) -> None:
    # E.g. an entry read where the key was missing, and put back: it is not encrypted twice.
    token = SecretCipher.from_key(KEY_A).encrypt(SECRET)
    RegistryStore(empty, _settings(None)).put(_entry(secret=token))
    assert _stored_secret(empty, "secure") == token
    RegistryStore(empty, _settings(KEY_A)).put(_entry(secret=token))
    assert _stored_secret(empty, "secure") == token
    loaded = RegistryStore(empty, _settings(KEY_A)).get("secure")
    assert loaded is not None
    assert loaded.auth is not None
    assert loaded.auth.resolve_secret() == SECRET


@pytest.mark.postgres
def test_the_key_comes_from_the_environment_by_default(empty: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHYARD_SECRETS_KEY", KEY_A)
    RegistryStore(empty).put(_entry())
    assert SECRET not in _raw_row(empty, "secure")
    assert SecretCipher.from_key(KEY_A).decrypt(_stored_secret(empty, "secure"))[0] == SECRET
    monkeypatch.delenv("SWITCHYARD_SECRETS_KEY")
    with pytest.raises(RegistrySecretError):
        RegistryStore(empty).put(_entry("other"))


@pytest.mark.postgres
def test_a_registry_file_goes_through_the_same_put(empty: Engine, tmp_path: Path) -> None:
    path = tmp_path / "agents.json"
    agents = [_entry("a").to_storage(), _entry("b", secret=ENV_REF).to_storage()]
    path.write_text(json.dumps({"agents": agents}))
    entries = load_registry_file(path)

    refusing = RegistryStore(empty, _settings(None))
    assert refusing.put(entries[1]) is True  # the reference is fine
    with pytest.raises(RegistrySecretError, match="'a'"):
        refusing.put(entries[0])
    assert refusing.get("a") is None

    store = RegistryStore(empty, _settings(KEY_A))
    for entry in entries:
        store.put(entry)
    assert SECRET not in _raw_row(empty, "a")
    assert _stored_secret(empty, "b") == ENV_REF
    loaded = store.get("a")
    assert loaded is not None
    assert loaded.auth is not None
    assert loaded.auth.resolve_secret() == SECRET


# ====================================================================== the store: a secret it cannot decrypt


@pytest.mark.postgres
@pytest.mark.parametrize("reader_key", [KEY_B, None, "not-a-fernet-key"], ids=["wrong key", "no key", "invalid key"])
def test_an_undecryptable_secret_is_a_configuration_problem_not_a_crash(
    empty: Engine, reader_key: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    RegistryStore(empty, _settings(KEY_A)).put(_entry())
    token = _stored_secret(empty, "secure")
    store = RegistryStore(empty, _settings(reader_key))

    loaded = store.get("secure")  # no exception: the entry still serves timeouts, retries, recovery
    assert loaded is not None
    assert loaded.auth is not None
    assert loaded.auth.secret_form is SecretForm.ENCRYPTED
    assert store.list() == [loaded]
    with pytest.raises(EncryptedSecretError) as caught:
        loaded.auth.headers()
    assert isinstance(caught.value, SecretReferenceError)  # the bridge's configuration failure
    assert "SWITCHYARD_SECRETS_KEY" in str(caught.value)
    # Shown masked like a literal; nothing anywhere holds the secret or the token.
    assert loaded.redacted()["auth"] == {"kind": "bearer", "header": "X-API-Key", "secret": "********"}
    texts = [str(caught.value), json.dumps(loaded.redacted()), repr(loaded)]
    texts += [logging.Formatter().format(r) for r in caplog.records]
    for shown in texts:
        assert SECRET not in shown
        assert token.removeprefix("fernet:") not in shown
    # The row is left as it was (another process may have the right key).
    assert _stored_secret(empty, "secure") == token
    # Logged once, naming the agent.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "'secure'" in r.getMessage()]
    assert len(warnings) == 1
    assert "cannot be decrypted" in warnings[0].getMessage()


@pytest.mark.postgres
async def test_a_wrong_key_gives_the_call_a_configuration_failure(
    empty: Engine, session: aiohttp.ClientSession
) -> None:
    RegistryStore(empty, _settings(KEY_A)).put(_entry())
    registry = DatabaseRegistry(RegistryStore(empty, _settings(KEY_B)))
    entry = await registry.get("secure")  # the bridge's lookup does not fail
    assert entry is not None
    caller = AgentCaller(session, CallSettings(call_timeout_s=5, poll_interval_s=0.05), rng=random.Random(7))
    task = AgentTask(
        correlation_id="run-1/step/1",
        run_id="run-1",
        step_id="step",
        attempt=1,
        agent_name="secure",
        input={},
        deadline=datetime.now(UTC) + timedelta(seconds=10),
    )
    result = await caller.call(task, entry)
    assert result.status is ResultStatus.FAILURE
    assert result.error is not None
    assert (result.error.kind, result.error.retriable) == ("configuration", False)
    assert "SWITCHYARD_SECRETS_KEY" in result.error.message
    assert SECRET not in result.model_dump_json()
    assert _stored_secret(empty, "secure").removeprefix("fernet:") not in result.model_dump_json()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


@pytest.mark.postgres
def test_an_invalid_key_refuses_literal_secrets_with_a_clear_message(
    empty: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    store = RegistryStore(empty, _settings("not-a-fernet-key"))  # constructing never fails
    with pytest.raises(RegistrySecretError, match="not a valid Fernet key") as caught:
        store.put(_entry())
    assert "not-a-fernet-key" not in str(caught.value)
    assert store.get("secure") is None
    assert any("not a valid Fernet key" in r.getMessage() for r in caplog.records)
    assert all("not-a-fernet-key" not in r.getMessage() for r in caplog.records)


# ====================================================================== the store: rows in clear (an earlier version)


@pytest.mark.postgres
def test_without_a_key_a_plaintext_row_keeps_working_with_one_warning(
    empty: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    _insert_plaintext_row(empty, _entry("legacy"))
    store = RegistryStore(empty, _settings(None))
    for _ in range(3):
        loaded = store.get("legacy")
        assert loaded is not None
        assert loaded.auth is not None
        assert loaded.auth.headers() == {"Authorization": f"Bearer {SECRET}"}
    RegistryStore(empty, _settings(None)).list()  # another store of the same process: no second warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "'legacy'" in message
    assert "plain text" in message
    assert "SWITCHYARD_SECRETS_KEY" in message
    assert SECRET not in message
    assert _stored_secret(empty, "legacy") == SECRET  # unchanged: there is nothing to encrypt it with
    assert store.encrypt_plaintext() == 0


@pytest.mark.postgres
def test_with_a_key_a_plaintext_row_is_encrypted_when_read(empty: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    _insert_plaintext_row(empty, _entry("legacy"))
    with empty.connect() as conn:
        updated = conn.execute(select(AgentRecord.updated_at).where(AgentRecord.name == "legacy")).scalar_one()
    store = RegistryStore(empty, _settings(KEY_A))

    loaded = store.get("legacy")
    assert loaded is not None
    assert loaded.auth is not None
    assert loaded.auth.headers() == {"Authorization": f"Bearer {SECRET}"}
    assert SECRET not in _raw_row(empty, "legacy")
    assert SecretCipher.from_key(KEY_A).decrypt(_stored_secret(empty, "legacy")) == (SECRET, False)
    with empty.connect() as conn:
        # The agent did not change, only how its secret is kept.
        assert conn.execute(select(AgentRecord.updated_at).where(AgentRecord.name == "legacy")).scalar_one() == updated
    assert store.get("legacy") == loaded
    assert all(SECRET not in logging.Formatter().format(r) for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.postgres
def test_encrypt_plaintext_does_every_row_once(empty: Engine) -> None:
    for name in ("one", "two"):
        _insert_plaintext_row(empty, _entry(name))
    _insert_plaintext_row(empty, _entry("ref", secret=ENV_REF))
    _insert_plaintext_row(empty, _entry("open", secret=None))
    store = RegistryStore(empty, _settings(KEY_A))
    assert store.encrypt_plaintext() == 2
    assert store.encrypt_plaintext() == 0
    for name in ("one", "two"):
        assert SECRET not in _raw_row(empty, name)
    assert _stored_secret(empty, "ref") == ENV_REF
    assert [e.name for e in store.list()] == ["one", "open", "ref", "two"]


@pytest.mark.postgres
def test_an_upgrade_never_overwrites_a_newer_put(empty: Engine) -> None:
    _insert_plaintext_row(empty, _entry("legacy", description="old"))
    with empty.connect() as conn:
        read_at = conn.execute(select(AgentRecord.updated_at).where(AgentRecord.name == "legacy")).scalar_one()
    store = RegistryStore(empty, _settings(KEY_A))
    store.put(_entry("legacy", secret=ENV_REF, description="new"))  # between the read and the upgrade
    upgraded = _entry("legacy", secret=SecretCipher.from_key(KEY_A).encrypt(SECRET), description="old")
    assert store._rewrite([("legacy", read_at, upgraded)]) == 0
    loaded = store.get("legacy")
    assert loaded is not None
    assert loaded.description == "new"


# ====================================================================== key rotation


@pytest.mark.postgres
def test_rotation_re_encrypts_with_the_first_key_when_read(empty: Engine) -> None:
    RegistryStore(empty, _settings(KEY_A)).put(_entry())
    old_token = _stored_secret(empty, "secure")

    rotating = RegistryStore(empty, _settings(f"{KEY_B},{KEY_A}"))
    loaded = rotating.get("secure")
    assert loaded is not None
    assert loaded.auth is not None
    assert loaded.auth.resolve_secret() == SECRET
    new_token = _stored_secret(empty, "secure")
    assert new_token != old_token
    assert SecretCipher.from_key(KEY_B).decrypt(new_token) == (SECRET, False)

    # Once every row is read (or encrypt_plaintext ran), the old key can go.
    rotating.put(_entry("second"))
    assert rotating.encrypt_plaintext() == 0
    only_new = RegistryStore(empty, _settings(KEY_B))
    assert [e.auth.resolve_secret() for e in only_new.list() if e.auth] == [SECRET, SECRET]
    old_only = RegistryStore(empty, _settings(KEY_A)).get("secure")
    assert old_only is not None
    assert old_only.auth is not None
    with pytest.raises(EncryptedSecretError):
        old_only.auth.headers()


@pytest.mark.postgres
def test_encrypt_plaintext_also_rotates(empty: Engine) -> None:
    old = RegistryStore(empty, _settings(KEY_A))
    old.put(_entry("a"))
    old.put(_entry("b"))
    assert RegistryStore(empty, _settings(f"{KEY_B},{KEY_A}")).encrypt_plaintext() == 2
    for name in ("a", "b"):
        assert SecretCipher.from_key(KEY_B).decrypt(_stored_secret(empty, name)) == (SECRET, False)
