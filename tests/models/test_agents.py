"""Agent registry entries: URL and name rules, credentials, and keeping secrets out of sight."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from models.agents import (
    AgentAuth,
    AgentEntry,
    AuthKind,
    CallRetry,
    EncryptedSecretError,
    RecoveryAction,
    SecretForm,
    SecretReferenceError,
    secret_form,
)

SECRET = "tok-9f2c1e7a-never-print-me"
ENV_NAME = "SWITCHYARD_TEST_AGENT_TOKEN"
# What the registry stores for a literal secret (switchyard.secrets makes these).
ENCRYPTED = "fernet:" + Fernet(Fernet.generate_key()).encrypt(SECRET.encode()).decode()


def _entry(**fields: Any) -> AgentEntry:
    data: dict[str, Any] = {"name": "researcher", "url": "http://127.0.0.1:8101/"}
    data.update(fields)
    return AgentEntry.model_validate(data)


# ------------------------------------------------------------------ URL and name


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8101/",
        "https://agents.example.com/a2a/v1",
        "http://researcher:8101",
        "https://[::1]:8443/rpc?x=1",
    ],
)
def test_http_and_https_urls_are_accepted(url: str) -> None:
    assert _entry(url=url).url == url


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://files.example.com/agent",
        "javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "http://",
        "https:///path-without-host",
        "http:// spaced.example.com/",
        "//example.com/no-scheme",
        "example.com",
        "",
    ],
)
def test_other_urls_are_rejected(url: str) -> None:
    with pytest.raises(ValidationError, match=r"http:// or https://|spaces or control characters"):
        _entry(url=url)


def test_url_length_is_bounded() -> None:
    with pytest.raises(ValidationError, match="url"):
        _entry(url="http://example.com/" + "a" * 2000)


@pytest.mark.parametrize("name", ["researcher", "r", "Agent.v2_beta-1", "9lives", "a" * 200])
def test_valid_names(name: str) -> None:
    assert _entry(name=name).name == name


@pytest.mark.parametrize(
    "name", ["", "-leading-dash", ".hidden", "_under", "with space", "slash/name", "ünïcode", "a" * 201, "x\n"]
)
def test_invalid_names_are_rejected(name: str) -> None:
    with pytest.raises(ValidationError, match="name"):
        _entry(name=name)


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        _entry(endpoint="http://x/")


def test_defaults() -> None:
    entry = _entry()
    assert entry.protocol_version == "1.0"
    assert entry.auth is None
    assert entry.timeout_s is None
    assert entry.call_retry == CallRetry()
    assert entry.recovery.action is RecoveryAction.FAIL
    assert entry.supports_cancel is True


def test_entries_are_immutable() -> None:
    entry = _entry()
    with pytest.raises(ValidationError):
        entry.url = "http://elsewhere/"  # type: ignore[misc]


# ------------------------------------------------------------------ credentials


def test_bearer_headers() -> None:
    auth = AgentAuth(kind=AuthKind.BEARER, secret=SECRET)  # type: ignore[arg-type]
    assert auth.headers() == {"Authorization": f"Bearer {SECRET}"}


def test_api_key_headers_default_header() -> None:
    auth = AgentAuth.model_validate({"kind": "api_key", "secret": SECRET})
    assert auth.headers() == {"X-API-Key": SECRET}


def test_api_key_headers_custom_header() -> None:
    auth = AgentAuth.model_validate({"kind": "api_key", "header": "X-Agent-Token", "secret": SECRET})
    assert auth.headers() == {"X-Agent-Token": SECRET}


@pytest.mark.parametrize("header", ["", "Bad Header", "X-Key:", "X\r\nInjected: 1", "a" * 101])
def test_api_key_header_name_is_validated(header: str) -> None:
    with pytest.raises(ValidationError, match="header"):
        AgentAuth.model_validate({"kind": "api_key", "header": header, "secret": SECRET})


def test_unknown_auth_kind_is_rejected() -> None:
    with pytest.raises(ValidationError, match="kind"):
        AgentAuth.model_validate({"kind": "basic", "secret": SECRET})


def test_env_reference_is_resolved_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_NAME, raising=False)
    auth = AgentAuth.model_validate({"kind": "bearer", "secret": f"env:{ENV_NAME}"})  # built while unset
    monkeypatch.setenv(ENV_NAME, "first-value")
    assert auth.headers() == {"Authorization": "Bearer first-value"}
    monkeypatch.setenv(ENV_NAME, "rotated-value")  # a rotated token is picked up by the next call
    assert auth.resolve_secret() == "rotated-value"
    assert auth.headers() == {"Authorization": "Bearer rotated-value"}


def test_env_reference_for_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_NAME, SECRET)
    auth = AgentAuth.model_validate({"kind": "api_key", "header": "X-Token", "secret": f"env:{ENV_NAME}"})
    assert auth.headers() == {"X-Token": SECRET}


def test_missing_env_variable_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_NAME, raising=False)
    auth = AgentAuth.model_validate({"kind": "bearer", "secret": f"env:{ENV_NAME}"})
    with pytest.raises(SecretReferenceError, match=ENV_NAME):
        auth.headers()
    assert issubclass(SecretReferenceError, ValueError)


@pytest.mark.parametrize("secret", ["env:", "env:1BAD", "env:has-dash", "ENV:LOWER_PREFIX", "xenv:NAME"])
def test_strings_that_are_not_references_are_literal_secrets(secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAME", "from-env")
    auth = AgentAuth.model_validate({"kind": "bearer", "secret": secret})
    assert auth.resolve_secret() == secret


# ------------------------------------------------------------------ secrets stay hidden


def test_redacted_hides_a_literal_secret() -> None:
    entry = _entry(auth={"kind": "bearer", "secret": SECRET})
    view = entry.redacted()
    assert SECRET not in json.dumps(view)
    assert view["auth"] == {"kind": "bearer", "header": "X-API-Key", "secret": "********"}
    assert view["name"] == "researcher"
    assert view["url"] == "http://127.0.0.1:8101/"


def test_redacted_shows_an_env_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_NAME, SECRET)
    entry = _entry(auth={"kind": "api_key", "header": "X-Token", "secret": f"env:{ENV_NAME}"})
    view = entry.redacted()
    assert view["auth"] == {"kind": "api_key", "header": "X-Token", "secret": f"env:{ENV_NAME}"}
    assert SECRET not in json.dumps(view)  # the reference, never the value it points to


def test_redacted_without_auth() -> None:
    view = _entry().redacted()
    assert view["auth"] is None
    json.dumps(view)  # JSON-safe


def test_repr_str_and_dumps_never_contain_the_secret() -> None:
    entry = _entry(auth={"kind": "bearer", "secret": SECRET})
    assert entry.auth is not None
    for text in (
        repr(entry),
        str(entry),
        f"{entry}",
        repr(entry.auth),
        str(entry.auth),
        entry.model_dump_json(),
        json.dumps(entry.model_dump(mode="json")),
    ):
        assert SECRET not in text


def test_to_storage_keeps_the_secret_and_round_trips() -> None:
    entry = _entry(
        auth={"kind": "api_key", "header": "X-Token", "secret": SECRET},
        timeout_s=12.5,
        retry={"max_attempts": 4, "initial_delay_s": 0.5, "jitter": 0},
        call_retry={"max_attempts": 2},
        recovery={"action": "fallback", "fallback_agent": "backup"},
        supports_cancel=False,
        description="test agent",
        protocol_version="0.3",
    )
    stored = entry.to_storage()
    assert stored["auth"] == {"kind": "api_key", "header": "X-Token", "secret": SECRET}
    # It is plain JSON (goes into a JSONB column) and reads back as the same entry.
    again = AgentEntry.model_validate(json.loads(json.dumps(stored)))
    assert again == entry
    assert again.auth is not None
    assert again.auth.resolve_secret() == SECRET


def test_to_storage_keeps_an_env_reference_as_a_reference() -> None:
    entry = _entry(auth={"kind": "bearer", "secret": f"env:{ENV_NAME}"})
    stored = entry.to_storage()
    assert isinstance(stored["auth"], dict)
    assert stored["auth"]["secret"] == f"env:{ENV_NAME}"
    assert AgentEntry.model_validate(stored) == entry


def test_to_storage_without_auth_round_trips() -> None:
    entry = _entry()
    stored = entry.to_storage()
    assert stored["auth"] is None
    assert AgentEntry.model_validate(stored) == entry


# ------------------------------------------------------------------ encrypted secrets (the registry's storage)


@pytest.mark.parametrize(
    ("secret", "form"),
    [
        (f"env:{ENV_NAME}", SecretForm.REFERENCE),
        (ENCRYPTED, SecretForm.ENCRYPTED),
        (SECRET, SecretForm.LITERAL),
        ("fernet:", SecretForm.LITERAL),
        ("fernet:not-a-token", SecretForm.LITERAL),
        ("fernet:" + "A" * 100, SecretForm.LITERAL),  # base64, but not the shape of a Fernet token
        (ENCRYPTED[:-4], SecretForm.LITERAL),
        (ENCRYPTED.upper(), SecretForm.LITERAL),
        ("FERNET:" + ENCRYPTED.removeprefix("fernet:"), SecretForm.LITERAL),
        (ENCRYPTED + " ", SecretForm.LITERAL),
        (ENCRYPTED + "\n", SecretForm.LITERAL),
    ],
)
def test_secret_form(secret: str, form: SecretForm) -> None:
    assert secret_form(secret) is form
    assert AgentAuth.model_validate({"kind": "bearer", "secret": secret}).secret_form is form


def test_an_encrypted_secret_is_never_sent_and_the_error_holds_no_token() -> None:
    auth = AgentAuth.model_validate({"kind": "bearer", "secret": ENCRYPTED})
    with pytest.raises(EncryptedSecretError) as caught:
        auth.headers()
    assert isinstance(caught.value, SecretReferenceError)  # the bridge's configuration failure
    assert "SWITCHYARD_SECRETS_KEY" in str(caught.value)
    assert ENCRYPTED.removeprefix("fernet:") not in str(caught.value)


def test_redacted_hides_an_encrypted_secret() -> None:
    entry = _entry(auth={"kind": "api_key", "secret": ENCRYPTED})
    assert entry.redacted()["auth"] == {"kind": "api_key", "header": "X-API-Key", "secret": "********"}
    for text in (json.dumps(entry.redacted()), repr(entry), str(entry), entry.model_dump_json()):
        assert ENCRYPTED.removeprefix("fernet:") not in text


def test_with_secret_changes_only_the_secret() -> None:
    entry = _entry(auth={"kind": "api_key", "header": "X-Token", "secret": SECRET}, timeout_s=3)
    sealed = entry.with_secret(ENCRYPTED)
    assert sealed.auth is not None
    assert sealed.auth.secret.get_secret_value() == ENCRYPTED
    assert sealed.auth.secret_form is SecretForm.ENCRYPTED
    assert sealed.model_dump(exclude={"auth"}) == entry.model_dump(exclude={"auth"})
    assert (sealed.auth.kind, sealed.auth.header) == (AuthKind.API_KEY, "X-Token")
    assert sealed.with_secret(SECRET) == entry
    assert AgentEntry.model_validate(sealed.to_storage()) == sealed  # stored and read back as it is
    with pytest.raises(ValueError, match="no credentials"):
        _entry().with_secret(SECRET)


# ------------------------------------------------------------ max_concurrency


def test_max_concurrency_is_unset_by_default() -> None:
    assert _entry().max_concurrency is None


@pytest.mark.parametrize("limit", [1, 2, 100_000])
def test_max_concurrency_accepts_a_positive_whole_number(limit: int) -> None:
    entry = _entry(max_concurrency=limit)
    assert entry.max_concurrency == limit
    assert AgentEntry.model_validate(entry.to_storage()) == entry
    assert AgentEntry.model_validate_json(json.dumps(entry.to_storage())).max_concurrency == limit
    assert entry.redacted()["max_concurrency"] == limit


@pytest.mark.parametrize("limit", [0, -1, 100_001, "2", 2.0, 2.5, True, [2]])
def test_max_concurrency_refuses_anything_else(limit: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        _entry(max_concurrency=limit)
    assert caught.value.errors()[0]["loc"] == ("max_concurrency",)
