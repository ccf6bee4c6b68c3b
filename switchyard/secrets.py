"""Encryption at rest of the registry's literal secrets: Fernet, with the key from ``SWITCHYARD_SECRETS_KEY``.

``SWITCHYARD_SECRETS_KEY`` holds one Fernet key (32 url-safe base64-encoded
bytes), or several separated by commas for a rotation: the first encrypts,
every one decrypts (as :class:`cryptography.fernet.MultiFernet`). Make a key
with :func:`generate_key`::

    python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"

An encrypted secret is the string ``fernet:<token>``, so that a stored entry
keeps the shape of an :class:`~models.agents.AgentEntry`. Messages here name
the key's variable, never a key, a token or a secret.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr

from models.agents import ENCRYPTED_SECRET_PREFIX, SecretForm, secret_form

__all__ = [
    "KEY_VARIABLE",
    "MAKE_KEY_COMMAND",
    "SecretCipher",
    "SecretDecryptError",
    "SecretsKeyError",
    "generate_key",
]

KEY_VARIABLE = "SWITCHYARD_SECRETS_KEY"
MAKE_KEY_COMMAND = 'python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'


class SecretsKeyError(ValueError):
    """There is no usable key: ``SWITCHYARD_SECRETS_KEY`` is not set, or is not a Fernet key."""


class SecretDecryptError(ValueError):
    """A token does not decrypt with any of the keys (encrypted with another key, or damaged)."""


def generate_key() -> str:
    """A new Fernet key, as ``SWITCHYARD_SECRETS_KEY`` takes it."""
    return Fernet.generate_key().decode("ascii")


class SecretCipher:
    """Encrypts and decrypts secret strings with the keys of ``SWITCHYARD_SECRETS_KEY``.

    Build it with :meth:`from_key`; without a usable key it still exists, and
    :attr:`problem` says why it cannot encrypt nor decrypt.
    """

    def __init__(self, fernets: Sequence[Fernet], problem: str | None = None) -> None:
        if not fernets and problem is None:
            problem = f"{KEY_VARIABLE} is not set"
        self._fernets = tuple(fernets)
        self._problem = problem

    @classmethod
    def from_key(cls, key: SecretStr | str | None) -> SecretCipher:
        """A cipher for a ``SWITCHYARD_SECRETS_KEY`` value: one key, or several separated by commas.

        Never raises: an invalid value gives a cipher whose :attr:`problem`
        says so (a key that is not valid must not look like no key at all).
        """
        raw = key.get_secret_value() if isinstance(key, SecretStr) else key
        parts = [part.strip() for part in (raw or "").split(",") if part.strip()]
        fernets: list[Fernet] = []
        for index, part in enumerate(parts, start=1):
            try:
                fernets.append(Fernet(part))
            except ValueError:  # also binascii.Error; its message does not hold the key, ours neither
                which = f"key {index} of {len(parts)}" if len(parts) > 1 else "its value"
                return cls(
                    (),
                    f"{KEY_VARIABLE} is not a valid Fernet key ({which} is not 32 url-safe base64-encoded bytes)",
                )
        return cls(fernets)

    @property
    def available(self) -> bool:
        """Whether there is a key to encrypt and decrypt with."""
        return self._problem is None

    @property
    def problem(self) -> str | None:
        """Why there is no usable key, or None."""
        return self._problem

    def _check(self) -> None:
        if self._problem is not None:
            raise SecretsKeyError(self._problem)

    def encrypt(self, secret: str) -> str:
        """``fernet:<token>`` for a secret in clear, with the first key.

        Raises:
            SecretsKeyError: There is no usable key.
        """
        self._check()
        token = self._fernets[0].encrypt(secret.encode("utf-8")).decode("ascii")
        return f"{ENCRYPTED_SECRET_PREFIX}{token}"

    def decrypt(self, stored: str) -> tuple[str, bool]:
        """The secret in clear from ``fernet:<token>``.

        Returns:
            The secret, and whether it was encrypted with another key than the
            first (then it is worth encrypting again).

        Raises:
            SecretsKeyError: There is no usable key.
            SecretDecryptError: No key decrypts it, or it is not ``fernet:<token>``.
        """
        self._check()
        if secret_form(stored) is not SecretForm.ENCRYPTED:
            raise SecretDecryptError("not an encrypted secret (fernet:<token>)")
        token = stored.removeprefix(ENCRYPTED_SECRET_PREFIX).encode("ascii")
        for index, fernet in enumerate(self._fernets):
            try:
                plain = fernet.decrypt(token)
            except InvalidToken:
                continue
            try:
                return plain.decode("utf-8"), index > 0
            except UnicodeDecodeError:  # we only ever encrypt str: a forged or foreign token
                break
        keys = "the key" if len(self._fernets) == 1 else f"any of the {len(self._fernets)} keys"
        raise SecretDecryptError(f"it does not decrypt with {keys} in {KEY_VARIABLE} (another key, or damaged)")
