"""Settings, from the environment (prefix ``SWITCHYARD_``) or a ``.env`` file.

The defaults are the embedded stack: with no database URL, an embedded
PostgreSQL server runs in ``<data_dir>/postgres``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Switchyard's settings. Every field is ``SWITCHYARD_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="SWITCHYARD_", env_file=".env", extra="ignore")

    database_url: SecretStr | None = Field(
        None, description="PostgreSQL URL; unset starts the embedded server. Secret: it may hold a password."
    )
    data_dir: Path = Field(Path(".switchyard"), description="Folder for embedded servers' data and worker state.")
    db_pool_size: int = Field(5, ge=1, le=100)
    db_max_overflow: int = Field(10, ge=0, le=100)
    default_step_timeout_s: float = Field(300.0, gt=0, le=86_400, description="Deadline of an attempt, by default.")
    max_message_bytes: int = Field(1_000_000, ge=1024, description="Larger messages go to the dead-letter topic.")

    @property
    def embedded_postgres_dir(self) -> Path:
        """Where the embedded PostgreSQL keeps its data."""
        return self.data_dir / "postgres"

    def database_dsn(self) -> str | None:
        """The configured database URL in clear, or None for the embedded server."""
        if self.database_url is None:
            return None
        return self.database_url.get_secret_value()
