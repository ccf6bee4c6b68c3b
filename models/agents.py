"""The agent registry's entries: where an agent lives and how to call it.

Pure data. Secrets are :class:`pydantic.SecretStr` (never printed) and may be
an environment-variable reference (``"env:NAME"``), resolved only when a call
is made. In the built-in registry's storage a literal secret is held encrypted
(``"fernet:<token>"``, see :mod:`switchyard.secrets`); the store decrypts it when
it reads the entry, and one it could not decrypt fails the call (never shown).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from enum import StrEnum
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, JsonValue, SecretStr, field_validator

from models.plan import MAX_INPUT_TIMEOUT_S, RetryPolicy

__all__ = [
    "AGENT_NAME_PATTERN",
    "AgentAuth",
    "AgentEntry",
    "AuthKind",
    "CallRetry",
    "ENCRYPTED_SECRET_PREFIX",
    "EncryptedSecretError",
    "ProtocolVersion",
    "RecoveryAction",
    "RecoveryPolicy",
    "SecretForm",
    "SecretReferenceError",
    "secret_form",
]

AGENT_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
_ENV_REF: Final = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")
ENCRYPTED_SECRET_PREFIX: Final = "fernet:"  # noqa: S105 (a marker, not a password)
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]+={0,2}")

ProtocolVersion = Literal["1.0", "0.3"]


class SecretReferenceError(ValueError):
    """A secret is not there for a call: it names an environment variable that is not set (or is still encrypted)."""


class EncryptedSecretError(SecretReferenceError):
    """A secret is still encrypted: the registry could not decrypt it (no key, or another key)."""


class SecretForm(StrEnum):
    """What a ``secret`` string holds."""

    REFERENCE = "reference"
    """``env:NAME``: read from the environment at call time; not itself a secret."""
    ENCRYPTED = "encrypted"
    """``fernet:<token>``: a literal secret as the registry stores it."""
    LITERAL = "literal"
    """The token in clear."""


def _is_fernet_token(token: str) -> bool:
    # The shape of a Fernet token (version byte 0x80, 8-byte time, 16-byte IV,
    # whole AES blocks, 32-byte HMAC), so that a literal secret that merely
    # starts with "fernet:" is not taken for one.
    if not _TOKEN.fullmatch(token):
        return False
    try:
        data = base64.urlsafe_b64decode(token)
    except (binascii.Error, ValueError):
        return False
    return len(data) >= 73 and (len(data) - 57) % 16 == 0 and data[0] == 0x80


def secret_form(raw: str) -> SecretForm:
    """Whether a secret string is a reference, an encrypted secret or a literal one."""
    if _ENV_REF.match(raw):
        return SecretForm.REFERENCE
    if raw.startswith(ENCRYPTED_SECRET_PREFIX) and _is_fernet_token(raw.removeprefix(ENCRYPTED_SECRET_PREFIX)):
        return SecretForm.ENCRYPTED
    return SecretForm.LITERAL


class AuthKind(StrEnum):
    """How an agent wants to be authenticated."""

    BEARER = "bearer"
    API_KEY = "api_key"


class AgentAuth(BaseModel):
    """Credentials sent with every call to an agent.

    Attributes:
        kind: ``bearer`` sends ``Authorization: Bearer <secret>``; ``api_key``
            sends ``<header>: <secret>``.
        header: The header name for ``api_key`` (default ``X-API-Key``).
        secret: The token itself, or ``env:NAME`` to read it from the
            environment at call time (the registry then never holds it). The
            built-in registry stores a literal token as ``fernet:<token>``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: AuthKind
    header: str = Field("X-API-Key", pattern=r"^[A-Za-z0-9-]{1,100}$")
    secret: SecretStr

    @property
    def secret_form(self) -> SecretForm:
        """What :attr:`secret` holds: a reference, an encrypted secret or a literal one."""
        return secret_form(self.secret.get_secret_value())

    def with_secret(self, secret: str) -> AgentAuth:
        """The same credentials with another secret string (the registry's encryption and decryption)."""
        return self.model_copy(update={"secret": SecretStr(secret)})

    def resolve_secret(self) -> str:
        """The secret in clear, reading an ``env:NAME`` reference now.

        Raises:
            SecretReferenceError: The referenced variable is not set.
            EncryptedSecretError: The secret is still encrypted (the registry
                had no key that decrypts it).
        """
        raw = self.secret.get_secret_value()
        match = _ENV_REF.match(raw)
        if match is None:
            if secret_form(raw) is SecretForm.ENCRYPTED:
                # The message is about the key: the token itself is never shown.
                raise EncryptedSecretError(
                    "the agent's secret is stored encrypted and the registry could not decrypt it:"
                    " SWITCHYARD_SECRETS_KEY must hold the key it was encrypted with"
                )
            return raw
        value = os.environ.get(match.group(1))
        if value is None:
            raise SecretReferenceError(f"environment variable {match.group(1)} (the agent's secret) is not set")
        return value

    def headers(self) -> dict[str, str]:
        """The HTTP headers that carry the credentials."""
        secret = self.resolve_secret()
        if self.kind is AuthKind.BEARER:
            return {"Authorization": f"Bearer {secret}"}
        return {self.header: secret}

    def redacted(self) -> dict[str, JsonValue]:
        """A JSON view safe to show: a reference is shown, any other secret (literal or encrypted) replaced."""
        raw = self.secret.get_secret_value()
        shown = raw if _ENV_REF.match(raw) else "********"
        return {"kind": str(self.kind), "header": self.header, "secret": shown}


class CallRetry(BaseModel):
    """Retries of one HTTP call inside the bridge (connection errors, 408, 429, 5xx)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(3, ge=1, le=20)
    initial_delay_s: float = Field(0.2, ge=0, le=60)
    multiplier: float = Field(2.0, ge=1, le=10)
    max_delay_s: float = Field(5.0, ge=0, le=300)
    jitter: float = Field(0.2, ge=0, le=1)


class RecoveryAction(StrEnum):
    """What happens when a step's attempts run out."""

    FAIL = "fail"
    FALLBACK = "fallback"
    SKIP = "skip"


class RecoveryPolicy(BaseModel):
    """The registry's answer to "the step failed for good" (applied by the executor)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: RecoveryAction = RecoveryAction.FAIL
    fallback_agent: str | None = Field(None, description="For ``fallback``: the agent to call instead.")
    default_output: JsonValue = Field(None, description="For ``skip``: the step's output.")


class AgentEntry(BaseModel):
    """One agent in the registry.

    Attributes:
        name: The name plans use in ``agent_name``.
        url: The A2A JSON-RPC endpoint (http or https only).
        protocol_version: ``1.0`` (``SendMessage``, header ``A2A-Version``) or
            ``0.3`` (``message/send``).
        auth: Credentials, if the agent needs them.
        timeout_s: Default deadline of a step calling this agent.
        input_timeout_s: How long a question this agent asks (A2A
            ``INPUT_REQUIRED``) waits for a person's answer, unless the step says.
        retry: Default step retry policy for this agent.
        call_retry: Retries of a single HTTP call in the bridge.
        recovery: What to do when a step's attempts run out.
        supports_cancel: Whether ``CancelTask`` is worth sending.
        max_concurrency: The most calls to this agent each bridge worker
            makes at once; more wait in the bridge, in order, without holding
            call slots other agents need. None: only the worker's own limit
            (``SWITCHYARD_BRIDGE_CONCURRENCY``) applies.
        description: Free text, e.g. from the agent card.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=AGENT_NAME_PATTERN)]
    url: str = Field(max_length=2000)
    protocol_version: ProtocolVersion = "1.0"
    auth: AgentAuth | None = None
    timeout_s: float | None = Field(None, gt=0, le=86_400)
    input_timeout_s: float | None = Field(None, gt=0, le=MAX_INPUT_TIMEOUT_S)
    retry: RetryPolicy | None = None
    call_retry: CallRetry = CallRetry()
    recovery: RecoveryPolicy = RecoveryPolicy()
    supports_cancel: bool = True
    # Strict: a limit written as "2" or true is a mistake to report, not to guess at.
    max_concurrency: int | None = Field(None, strict=True, ge=1, le=100_000)
    description: str | None = Field(None, max_length=2000)

    @field_validator("url")
    @classmethod
    def _http_only(cls, url: str) -> str:
        # Agent URLs come from operators: refuse file:, ftp:, javascript: and the
        # like, and anything with spaces or control characters (header injection).
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
            raise ValueError("an agent URL cannot contain spaces or control characters")
        parts = urlsplit(url)
        if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
            raise ValueError("an agent URL must be http:// or https:// with a host")
        return url

    def redacted(self) -> dict[str, JsonValue]:
        """A JSON view safe to show or log (no secrets)."""
        data = self.model_dump(mode="json", exclude={"auth"})
        data["auth"] = self.auth.redacted() if self.auth else None
        return data

    def with_secret(self, secret: str) -> AgentEntry:
        """The same entry with another secret string (it must have ``auth``)."""
        if self.auth is None:
            raise ValueError(f"agent {self.name!r} has no credentials")
        return self.model_copy(update={"auth": self.auth.with_secret(secret)})

    def to_storage(self) -> dict[str, JsonValue]:
        """A JSON view with the secret as it is held (in clear unless encrypted): for the registry's storage only.

        :class:`switchyard.registry.RegistryStore` encrypts a literal secret
        before it stores this.
        """
        data = self.model_dump(mode="json")
        if self.auth is not None:
            auth = dict(data["auth"])
            auth["secret"] = self.auth.secret.get_secret_value()
            data["auth"] = auth
        return data
