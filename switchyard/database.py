"""The database as a long-lived service: find it (or start the embedded one), wait for it, own the engine."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mode import Service
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from switchyard.db import create_schema, make_engine
from switchyard.embedded import EmbeddedPostgres, start_postgres
from switchyard.settings import Settings

__all__ = ["Database", "connect"]

log = logging.getLogger(__name__)


def connect(settings: Settings, *, wait_s: float | None = None) -> tuple[Engine, EmbeddedPostgres | None]:
    """Open the configured database, or the embedded one, and make sure the schema exists.

    Blocks until the database answers (bounded by ``wait_s``, by default
    ``settings.wait_for_services_s``), logging once while it waits, so that
    processes started together come up in any order.

    Returns:
        The engine, and the embedded server handle when one was started.

    Raises:
        TimeoutError: The database did not answer in time.
    """
    embedded: EmbeddedPostgres | None = None
    url = settings.database_dsn()
    if url is None:
        embedded = start_postgres(settings.embedded_postgres_dir)
        url = embedded.url
    engine = make_engine(url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow)
    limit = settings.wait_for_services_s if wait_s is None else wait_s
    deadline = time.monotonic() + limit
    announced = False
    while True:
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
            break
        except OperationalError as error:
            if time.monotonic() >= deadline:
                engine.dispose()
                reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
                raise TimeoutError(f"PostgreSQL did not answer within {limit:g}s: {reason}") from None
            if not announced:
                log.warning("waiting for PostgreSQL (up to %gs)", limit)
                announced = True
            time.sleep(0.5)
    create_schema(engine)
    return engine, embedded


class Database(Service):
    """Owns the engine for a worker; started before anything that needs it."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._embedded: EmbeddedPostgres | None = None
        super().__init__(**kwargs)

    @property
    def engine(self) -> Engine:
        """The engine (only once the service has started)."""
        if self._engine is None:
            raise RuntimeError("the database service has not started")
        return self._engine

    async def on_start(self) -> None:
        """Connect (blocking work runs in a thread)."""
        self._engine, self._embedded = await asyncio.to_thread(connect, self.settings)
        log.info("database ready")

    async def on_stop(self) -> None:
        """Close the pool and release the embedded server handle."""
        if self._engine is not None:
            await asyncio.to_thread(self._engine.dispose)
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
