"""``make demo DEMO_ARGS=--keep`` tells the truth when a process of its stack dies.

The real demo as a process (embedded broker and PostgreSQL, both workers, the
example agents): once it holds the stack up, its executor is killed with -9.
The demo must name it, show the end of its log, stop everything else and exit
1 (before, it said "stopped; nothing left running" and exited 0).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from switchyard.embedded import port_is_open
from switchyard.stack import AGENT_PORTS
from tests.e2e.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_names_a_dead_executor_and_exits_1(tmp_path: Path) -> None:
    busy = [port for port in AGENT_PORTS.values() if port_is_open("127.0.0.1", port, 0.2)]
    if busy:
        pytest.skip(f"the demo's agent ports {busy} are in use")
    env = {
        **os.environ,
        "SWITCHYARD_DATA_DIR": str(tmp_path / "demo"),
        "SWITCHYARD_BROKER_PORT": str(free_port()),
        "SWITCHYARD_EXECUTOR_WEB_PORT": str(free_port()),
        "SWITCHYARD_BRIDGE_WEB_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("SWITCHYARD_DATABASE_URL", None)
    env.pop("SWITCHYARD_BROKER_URL", None)
    output = tmp_path / "demo.out"
    with output.open("wb") as sink:
        demo = subprocess.Popen(
            [sys.executable, "-m", "switchyard.demo", "--keep"],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 150
            while "the stack stays up" not in output.read_text(errors="replace"):
                assert demo.poll() is None, output.read_text(errors="replace")
                assert time.monotonic() < deadline, output.read_text(errors="replace")
                time.sleep(0.3)
            children = psutil.Process(demo.pid).children(recursive=True)
            (executor,) = [p for p in children if "streams.app" in " ".join(p.cmdline())]
            executor.send_signal(signal.SIGKILL)
            code = demo.wait(60)
        finally:
            if demo.poll() is None:
                demo.send_signal(signal.SIGTERM)
                demo.wait(60)
    text = output.read_text(errors="replace")
    assert code == 1, text
    assert f"the executor (pid {executor.pid}) was killed by SIGKILL while --keep held the stack up" in text, text
    assert "executor.log" in text, text  # the end of its log is shown
    left = [p for p in children if p.pid != executor.pid and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"still running after the demo: {[p.cmdline() for p in left]}\n{text}"
