"""Starting and stopping the whole stack as processes: for the demo, the tests and the benchmarks.

Every process is started by this module, tracked by PID, logs to its own file
and is stopped by PID (SIGTERM, then SIGKILL). Nothing binds outside
127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from switchyard.embedded import EmbeddedBroker, EmbeddedPostgres, port_is_open, start_broker, start_postgres
from switchyard.settings import Settings

__all__ = ["AGENT_PORTS", "Process", "Stack", "StackError", "http_json"]

log = logging.getLogger(__name__)

AGENT_PORTS = {"researcher": 8101, "summarizer": 8102, "reviewer": 8103}


class StackError(RuntimeError):
    """A process of the stack did not start or stopped unexpectedly."""


def http_json(method: str, url: str, body: Any = None, *, timeout: float = 5.0) -> tuple[int, Any]:
    """A small blocking JSON request to a loopback server; returns (status, decoded body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback URLs we build
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw or b"null")
        except ValueError:
            return error.code, raw.decode("utf-8", "replace")


@dataclass
class Process:
    """A process of the stack."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)  # None: a view of a process logging elsewhere

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether it still runs."""
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Its exit code once it has exited (negative: killed by that signal), else None."""
        return self.popen.poll()

    def exit_reason(self) -> str:
        """How it ended, in words: ``exited with code 1``, ``was killed by SIGKILL``, or ``is running``."""
        code = self.returncode
        if code is None:
            return "is running"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %gs; killing it", self.name, self.pid, timeout)
                self.popen.kill()
                self.popen.wait(timeout)
        if self._log is not None:
            self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL, at once (fault injection)."""
        if self.alive():
            self.popen.kill()
            self.popen.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        """The end of its log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Stack:
    """The embedded broker and database, the two workers and the example agents, as processes.

    Args:
        settings: Ports, data folder, broker and database (embedded when unset).
        root: The checkout (the working directory of every process).
    """

    def __init__(self, settings: Settings, root: Path | None = None) -> None:
        self.settings = settings
        self.root = root or Path(__file__).resolve().parents[1]
        self.data_dir = (self.root / settings.data_dir).resolve()
        self.logs = self.data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.broker: EmbeddedBroker | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.processes: dict[str, Process] = {}

    # ------------------------------------------------------------------ env

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process: these settings, as variables."""
        values = {
            "SWITCHYARD_BROKER_PORT": str(self.settings.broker_port),
            "SWITCHYARD_DATA_DIR": str(self.data_dir),
            "SWITCHYARD_EXECUTOR_WEB_PORT": str(self.settings.executor_web_port),
            "SWITCHYARD_BRIDGE_WEB_PORT": str(self.settings.bridge_web_port),
            "SWITCHYARD_TOPIC_PARTITIONS": str(self.settings.topic_partitions),
            "SWITCHYARD_DEFAULT_STEP_TIMEOUT_S": str(self.settings.default_step_timeout_s),
        }
        if self.settings.broker_url:
            values["SWITCHYARD_BROKER_URL"] = self.settings.broker_url
        dsn = self.settings.database_dsn()
        if dsn:
            values["SWITCHYARD_DATABASE_URL"] = dsn
        if self.settings.secrets_key is not None:
            values["SWITCHYARD_SECRETS_KEY"] = self.settings.secrets_key.get_secret_value()
        return {**os.environ, **values, "PYTHONUNBUFFERED": "1", **extra}

    # ------------------------------------------------------------- services

    def start_services(self) -> None:
        """Start the embedded broker and PostgreSQL (those that are not configured)."""
        if self.settings.embedded_broker and self.broker is None:
            with (self.logs / "broker.log").open("ab") as output:
                self.broker = start_broker(self.settings.broker_port, output=output)
        if self.settings.database_dsn() is None and self.postgres is None:
            self.postgres = start_postgres(self.settings.embedded_postgres_dir)

    def spawn(self, name: str, args: list[str], **env: str) -> Process:
        """Start a process of the stack, logging to ``<data_dir>/logs/<name>.log``."""
        if name in self.processes and self.processes[name].alive():
            raise StackError(f"{name} is already running (pid {self.processes[name].pid})")
        log_path = self.logs / f"{name}.log"
        output = log_path.open("ab")
        popen = subprocess.Popen(  # noqa: S603 - our own interpreter and modules
            args, cwd=self.root, env=self.env(**env), stdout=output, stderr=subprocess.STDOUT
        )
        process = Process(name=name, popen=popen, log_path=log_path, _log=output)
        self.processes[name] = process
        return process

    def start_worker(self, app: str, name: str | None = None, **env: str) -> Process:
        """Start ``faust -A streams.app`` or ``faust -A agents_bridge.app`` with its own datadir."""
        name = name or ("executor" if app.startswith("streams") else "bridge")
        datadir = self.data_dir / f"{name}-data"
        args = [sys.executable, "-m", "faust", "-A", app, "--datadir", str(datadir), "worker", "-l", "info"]
        return self.spawn(name, args, **env)

    def start_agent(self, agent: str, *flags: str, port: int | None = None, name: str | None = None) -> Process:
        """Start an example agent (``python -m examples.agents.<agent>``)."""
        port = port or AGENT_PORTS[agent]
        args = [sys.executable, "-m", f"examples.agents.{agent}", "--port", str(port), *flags]
        return self.spawn(name or agent, args)

    # ------------------------------------------------------------- waiting

    def wait_http(self, url: str, process: Process | None, timeout: float = 60.0) -> Any:
        """Wait until ``url`` answers 200 (or the process dies); returns the body."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                raise StackError(f"{process.name} exited with code {process.popen.returncode}:\n{process.log_tail()}")
            try:
                status, body = http_json("GET", url, timeout=2.0)
                if status == 200:
                    return body
            except OSError:
                pass
            time.sleep(0.2)
        tail = process.log_tail() if process else ""
        raise StackError(f"{url} did not answer within {timeout:g}s\n{tail}")

    def wait_port(self, port: int, process: Process, timeout: float = 30.0) -> None:
        """Wait until something listens on ``127.0.0.1:port``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.alive():
                raise StackError(f"{process.name} exited with code {process.popen.returncode}:\n{process.log_tail()}")
            if port_is_open("127.0.0.1", port, 0.2):
                return
            time.sleep(0.1)
        raise StackError(f"{process.name} did not open port {port} within {timeout:g}s\n{process.log_tail()}")

    def executor_url(self, path: str = "") -> str:
        """A URL on the executor's web server."""
        return f"http://127.0.0.1:{self.settings.executor_web_port}{path}"

    def bridge_url(self, path: str = "") -> str:
        """A URL on the bridge's web server."""
        return f"http://127.0.0.1:{self.settings.bridge_web_port}{path}"

    def dead(self) -> list[Process]:
        """The processes of the stack that have exited on their own: the embedded broker first, then the others.

        Processes stopped by :meth:`stop` are no longer the stack's, so they
        are not listed; a worker killed on purpose (fault injection) is.
        """
        dead = [p for p in self.processes.values() if not p.alive()]
        if self.broker is not None and self.broker.process.poll() is not None:
            dead.insert(0, Process(name="broker", popen=self.broker.process, log_path=self.logs / "broker.log"))
        return dead

    # ------------------------------------------------------------- stopping

    def stop(self) -> list[str]:
        """Stop every process (workers first, then agents), then the broker and the database.

        Returns:
            What is still running afterwards (``name (pid N)``), normally
            nothing: a process that outlives SIGKILL is reported, not waited for.
        """
        left: list[str] = []
        order = sorted(self.processes.values(), key=lambda p: not p.name.startswith(("executor", "bridge")))
        for process in order:
            try:
                process.stop()
            except subprocess.TimeoutExpired:
                left.append(f"{process.name} (pid {process.pid})")
        self.processes.clear()
        if self.broker is not None:
            try:
                self.broker.stop()
            except subprocess.TimeoutExpired:
                left.append(f"broker (pid {self.broker.process.pid})")
            self.broker = None
        if self.postgres is not None:
            pid = self.postgres.pid
            self.postgres.stop(force=True)  # a killed worker may have left its handle behind
            self.postgres = None
            if pid is not None and not _gone(pid):
                left.append(f"PostgreSQL (pid {pid})")
        return left


def _gone(pid: int, within: float = 3.0) -> bool:
    """Whether a process that is not our child (the postmaster, started by pg_ctl) is gone, or goes within ``within`` s.

    It is not ours to reap, so it may take a moment to disappear after SIGKILL.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # it exists, as another user (under root the wheel runs the server as its own user)
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
