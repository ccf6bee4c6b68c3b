"""How fast the executor heals: after a kill -9, and after the broker lost its topics.

``python -m bench.recovery [--runs 10000] [--in-flight 2000] [--json out.json] [--keep]``

docs/architecture.md ("Recovery: what heals what") says what should happen; this measures it
on the real embedded stack, every piece a process on free loopback ports, in a
fresh temporary folder (logs in its ``logs/``):

1. Start the broker, PostgreSQL, the executor, the bridge and two summarizer
   example agents registered as ``fast`` and ``stuck``; ``stuck`` runs with
   ``--slow 600`` so that the runs waiting on it stay in flight. Deadlines are
   an hour (``SWITCHYARD_DEFAULT_STEP_TIMEOUT_S``, and the bridge's
   per-request ``SWITCHYARD_CALL_TIMEOUT_S``): nothing times out or is retried
   during the bench.
2. Load: ``runs - in_flight`` one-step runs on ``fast``, produced by one
   producer, until PostgreSQL has them all COMPLETED; then ``in_flight``
   two-step runs (``a`` on ``stuck``, ``b`` on ``fast``) until PostgreSQL has
   each RUNNING with attempt 1 of ``a`` RUNNING. Runs per second, both phases.
   Then a one-step run on ``fast`` is submitted and given ``--stalled-probe``
   seconds: it shows whether calls to other agents still get through while
   the bridge's call slots (``SWITCHYARD_BRIDGE_CONCURRENCY``) wait on ``stuck``.
3. Restart: kill -9 the executor and the bridge, replace the ``stuck`` agent
   by a fast summarizer on the same port, start both workers again (same
   datadirs) and submit a fresh one-step run on ``fast`` at once. Measured from
   the restart: the executor's ``/health/`` answering, the fresh run RUNNING
   and COMPLETED in PostgreSQL (serving new runs again), and the in-flight runs
   completing (first, half, all): the executor re-dispatched their attempts
   with the same correlation ids, the new agent answered, step ``b`` ran.
   The bridge is killed too because a live bridge would make the re-dispatch
   join the call it still holds to the old agent (its in-memory call memory);
   killing it makes the re-dispatched attempts reach the new agent.
4. Broker lost: put the slow ``stuck`` back, load ``in_flight`` new runs
   waiting on it, then kill -9 executor and bridge, stop the broker and start
   an empty one on the same port, replace ``stuck`` again, restart both
   workers. The executor discards its RocksDB state (newer than the broker's)
   and rebuilds the runs PostgreSQL has RUNNING from their checkpoints. Same
   figures, for every run PostgreSQL showed RUNNING before the kill.

The executor's resident memory (RSS, psutil) is taken before each kill, at
its peak during recovery and once recovery is over; the CPU time of each
process (group) over each phase too. Agent calls are counted on the agents'
``/stats`` (each re-dispatched attempt should reach the new agent once), and
the workers' ``/health/`` counters and the executor's log are read after each
recovery (runs resumed, restores asked, tables discarded). Every process is
stopped by PID at the end, also on failure, Ctrl-C or SIGTERM; the folder is
deleted after a successful run unless ``--keep``, and kept (with its logs)
after a failure.

The bench always uses the embedded broker and PostgreSQL: the
``SWITCHYARD_BROKER_URL``, ``SWITCHYARD_DATABASE_URL`` and
``SWITCHYARD_REGISTRY_URL`` of its environment are ignored.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from bench.harness import (
    CPU_GROUPS,
    ROOT,
    BenchError,
    CpuSnapshot,
    Submitter,
    cpu_snapshot,
    cpu_used,
    embedded_settings,
    forget_external_services,
    free_port,
    health,
    logs_tail,
    publish,
    register_agents,
    rss_mib,
    run_guarded,
    say,
    stop_stack,
    tidy,
    wait_progress,
    wait_serving,
)
from models.messages import WorkflowSubmission, encode
from models.plan import WorkflowPlan, load_plan
from switchyard.db import create_schema, make_engine
from switchyard.embedded import port_is_open
from switchyard.stack import Process, Stack, http_json

POLL_S = 0.2

FINISHING_PLAN: dict[str, Any] = {
    "workflow_id": "bench-recovery-finished",
    "name": "one step on fast",
    "version": "1",
    "start_step": "only",
    "steps": {
        "only": {
            "id": "only",
            "agent_name": "fast",
            "input_mapping": {"text": "${workflow.input.text}"},
            "next_step": None,
        }
    },
}

IN_FLIGHT_PLAN: dict[str, Any] = {
    "workflow_id": "bench-recovery-in-flight",
    "name": "stuck, then fast",
    "version": "1",
    "start_step": "a",
    "steps": {
        "a": {
            "id": "a",
            "agent_name": "stuck",
            "input_mapping": {"text": "${workflow.input.text}"},
            "next_step": "b",
        },
        "b": {
            "id": "b",
            "agent_name": "fast",
            "input_mapping": {"text": "${a.output.summary} moved on"},
            "next_step": None,
        },
    },
}

_STATUS_COUNTS = text("select status, count(*) from workflow_runs where run_id like :prefix group by status")
_STATUS_COUNTS_OF = text("select status, count(*) from workflow_runs where run_id = any(:ids) group by status")
_STATUS_OF = text("select status from workflow_runs where run_id = :run_id")
_WAITING_ON_A = text(
    "select count(*) from workflow_runs r join step_executions s on s.run_id = r.run_id "
    "where r.run_id like :prefix and r.status = 'RUNNING' "
    "and s.step_id = 'a' and s.attempt = 1 and s.status = 'RUNNING'"
)
_RUNNING_IDS = text("select run_id from workflow_runs where status = 'RUNNING' order by run_id")
_ATTEMPTS_OF = text(
    "select count(*), count(*) filter (where attempt > 1) from step_executions where run_id = any(:ids)"
)


_RESUMED = re.compile(r"resumed (\d+) run\(s\), asked to restore (\d+) from PostgreSQL")


# ------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    """What to run."""

    runs: int
    in_flight: int
    json_path: Path | None
    keep: bool
    slow_s: float
    step_timeout_s: float
    partitions: int
    timeout_s: float
    stall_s: float
    stalled_probe_s: float

    @property
    def finished(self) -> int:
        """Runs that finish during the load."""
        return self.runs - self.in_flight


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Options from the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--runs", type=int, default=10_000, help="runs loaded into the executor's state (default 10000)")
    add("--in-flight", type=int, default=2_000, help="of which waiting on the stuck agent (default 2000)")
    add("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON")
    add("--keep", action="store_true", help="keep the data folder (PostgreSQL, datadirs, logs) after success")
    add("--slow", type=float, default=600.0, help="seconds the stuck agent takes (default 600)")
    add("--step-timeout", type=float, default=3600.0, help="deadline of every attempt, s (default 3600)")
    add("--partitions", type=int, default=4, help="partitions of the run-keyed topics (default 4)")
    add("--timeout", type=float, default=900.0, help="longest wait of one phase, s (default 900)")
    add("--stall", type=float, default=180.0, help="give up when a phase makes no progress for this long, s")
    add(
        "--stalled-probe",
        type=float,
        default=10.0,
        help="before the first kill, wait this long for a fast run submitted while runs wait on stuck (0: skip)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or not 1 <= args.in_flight <= args.runs:
        parser.error("need 1 <= --in-flight <= --runs")
    if args.slow <= 0 or args.step_timeout <= 0:
        parser.error("--slow and --step-timeout must be positive")
    return Options(
        runs=args.runs,
        in_flight=args.in_flight,
        json_path=args.json,
        keep=args.keep,
        slow_s=args.slow,
        step_timeout_s=args.step_timeout,
        partitions=args.partitions,
        timeout_s=args.timeout,
        stall_s=args.stall,
        stalled_probe_s=args.stalled_probe,
    )


# ------------------------------------------------------------------ figures


@dataclass
class LoadFigures:
    """The load phase."""

    finished_runs: int = 0
    finished_produce_s: float = 0.0
    finished_s: float = 0.0
    in_flight_runs: int = 0
    in_flight_produce_s: float = 0.0
    in_flight_s: float = 0.0
    stuck_calls: int = 0
    stalled_probe_wait_s: float = 0.0
    stalled_probe_status: str | None = None
    executor_rss_mib: float | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        """Both phases."""
        return self.finished_s + self.in_flight_s


@dataclass
class RecoveryFigures:
    """One recovery scenario. Times are seconds from the restart of the workers."""

    scenario: str
    in_flight: int
    load_s: float | None = None
    down_s: float | None = None
    broker_restart_s: float | None = None
    probe_submit_s: float | None = None
    health_s: float | None = None
    partitions_s: float | None = None
    bridge_partitions_s: float | None = None
    probe_running_s: float | None = None
    probe_completed_s: float | None = None
    first_completed_s: float | None = None
    half_completed_s: float | None = None
    all_completed_s: float | None = None
    rss_before_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_after_mib: float | None = None
    bridge_rss_before_mib: float | None = None
    bridge_rss_after_mib: float | None = None
    step_a_calls: int | None = None
    step_a_keys_repeated: int | None = None
    step_b_calls: int | None = None
    finished_runs_called_again: int | None = None
    attempts_recorded: int | None = None
    later_attempts: int | None = None
    runs_resumed: int | None = None
    restore_requests: int | None = None
    tables_discarded: int | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_wall_s: float | None = None
    executor_health_before: dict[str, Any] = field(default_factory=dict)
    executor_health: dict[str, Any] = field(default_factory=dict)
    bridge_health: dict[str, Any] = field(default_factory=dict)

    @property
    def per_1000_s(self) -> float | None:
        """Seconds until all in-flight runs completed, per 1000 of them."""
        if self.all_completed_s is None or not self.in_flight:
            return None
        return self.all_completed_s * 1000 / self.in_flight

    @property
    def after_joined_s(self) -> float | None:
        """Seconds from both workers owning their partitions until all in-flight runs completed."""
        if self.all_completed_s is None or self.partitions_s is None or self.bridge_partitions_s is None:
            return None
        return self.all_completed_s - max(self.partitions_s, self.bridge_partitions_s)

    @property
    def after_joined_per_1000_s(self) -> float | None:
        """:attr:`after_joined_s` per 1000 in-flight runs."""
        if self.after_joined_s is None or not self.in_flight:
            return None
        return self.after_joined_s * 1000 / self.in_flight


@dataclass
class Report:
    """Everything measured."""

    runs: int
    in_flight: int
    partitions: int
    cpus: int
    data_dir: str
    complete: bool = False
    error: str | None = None
    startup_s: float | None = None
    loadavg_start: tuple[float, float, float] | None = None
    loadavg_end: tuple[float, float, float] | None = None
    load: LoadFigures = field(default_factory=LoadFigures)
    scenarios: list[RecoveryFigures] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The report as JSON-ready data, derived figures included."""
        data = asdict(self)
        data["load"]["total_s"] = self.load.total_s
        for raw, figures in zip(data["scenarios"], self.scenarios, strict=True):
            raw["all_completed_per_1000_s"] = figures.per_1000_s
            raw["after_joined_s"] = figures.after_joined_s
            raw["after_joined_per_1000_s"] = figures.after_joined_per_1000_s
        return data


# ------------------------------------------------------------------ helpers


def submissions(plan: WorkflowPlan, prefix: str, count: int) -> list[tuple[str, bytes]]:
    """``count`` submissions of ``plan`` with ids ``<prefix>-000000``...: (run_id, encoded)."""
    made = []
    for i in range(count):
        run_id = f"{prefix}-{i:06d}"
        submission = WorkflowSubmission(run_id=run_id, plan=plan, input={"text": f"{prefix} run number {i}"})
        made.append((run_id, encode(submission)))
    return made


# ------------------------------------------------------------------ the bench


class RecoveryBench:
    """The stack under test and the phases of the bench.

    Args:
        options: What to run.
        data_dir: A fresh folder for PostgreSQL, the worker datadirs and the logs.
    """

    def __init__(self, options: Options, data_dir: Path) -> None:
        self.options = options
        self.settings = embedded_settings(
            data_dir, topic_partitions=options.partitions, default_step_timeout_s=options.step_timeout_s
        )
        self.stack = Stack(self.settings, ROOT)
        self.ports = {"fast": free_port(), "stuck": free_port()}
        # The bridge's single HTTP request may last as long as the attempt: a
        # 600 s call to the stuck agent is not cut (and retried) at 30 s.
        self.worker_env = {"SWITCHYARD_CALL_TIMEOUT_S": f"{min(3600.0, options.step_timeout_s):g}"}
        self.submitter = Submitter(self.settings)
        self._engine: Engine | None = None
        self._log_offsets: dict[str, int] = {}
        self._finished_calls_before = 0
        self._cpu_before: CpuSnapshot = {}
        self._cpu_at = 0.0

    # ------------------------------------------------------------ plumbing

    @property
    def engine(self) -> Engine:
        """The bench's own connection pool to the stack's PostgreSQL."""
        assert self._engine is not None, "the stack has not started"
        return self._engine

    def process(self, name: str) -> Process | None:
        """A process of the stack by name, if started."""
        return self.stack.processes.get(name)

    def start_worker(self, kind: str) -> Process:
        """Start (again) the ``executor`` or the ``bridge``, with its own datadir (the same every time)."""
        old = self.stack.processes.pop(kind, None)
        if old is not None:
            old.kill()
            old.stop()  # closes its log file
        log_path = self.stack.logs / f"{kind}.log"
        self._log_offsets[kind] = log_path.stat().st_size if log_path.exists() else 0
        app = "streams.app" if kind == "executor" else "agents_bridge.app"
        return self.stack.start_worker(app, name=kind, **self.worker_env)

    def log_since_start(self, kind: str) -> list[str]:
        """The log lines a worker wrote since it was last started (its log file is appended to)."""
        path = self.stack.logs / f"{kind}.log"
        with path.open("rb") as file:
            file.seek(self._log_offsets.get(kind, 0))
            return file.read().decode("utf-8", "replace").splitlines()

    def kill(self, name: str) -> None:
        """kill -9 a process of the stack (by its PID)."""
        process = self.stack.processes[name]
        process.kill()
        process.stop()

    def start_stuck_agent(self, *, slow: bool) -> Process:
        """(Re)start what answers on the ``stuck`` port: the slow summarizer, or a fast one in its place."""
        for name in ("agent-stuck", "agent-stuck-replacement"):
            old = self.stack.processes.pop(name, None)
            if old is not None:
                old.stop(timeout=10)
        port = self.ports["stuck"]
        deadline = time.monotonic() + 10
        while port_is_open("127.0.0.1", port, 0.2) and time.monotonic() < deadline:
            time.sleep(0.1)
        flags = ("--slow", f"{self.options.slow_s:g}") if slow else ()
        name = "agent-stuck" if slow else "agent-stuck-replacement"
        process = self.stack.start_agent("summarizer", *flags, port=port, name=name)
        self.stack.wait_port(port, process)
        return process

    def agent_stats(self, port: int) -> dict[str, Any]:
        """An example agent's ``/stats`` (what it received)."""
        status, body = http_json("GET", f"http://127.0.0.1:{port}/stats", timeout=30.0)
        if status != 200 or not isinstance(body, dict):
            raise BenchError(f"GET /stats on port {port} answered {status}")
        return body

    def cpu_snapshot(self) -> CpuSnapshot:
        """CPU used so far by every live process of the stack (PostgreSQL with its backends) and the bench."""
        return cpu_snapshot(self.stack)

    def finished_calls(self) -> int:
        """SendMessage requests the ``fast`` agent received for the runs that finished during the load."""
        keys = self.agent_stats(self.ports["fast"])["by_idempotency_key"]
        return sum(int(n) for key, n in keys.items() if key.startswith("fin-"))

    def executor_health(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The executor's ``/health/``, or None while it does not answer."""
        return health(self.stack.executor_url("/health/"), timeout)

    def bridge_health(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The bridge's ``/health/``, or None while it does not answer."""
        return health(self.stack.bridge_url("/health/"), timeout)

    def logs_tail(self, *names: str, lines: int = 15) -> str:
        """The last lines of some processes' logs, for error messages."""
        return logs_tail(self.stack, *names, lines=lines)

    # ------------------------------------------------------------ queries

    def counts(self, prefix: str) -> dict[str, int]:
        """Runs by status in PostgreSQL whose id starts with ``prefix``."""
        with self.engine.connect() as conn:
            return {str(s): int(n) for s, n in conn.execute(_STATUS_COUNTS, {"prefix": f"{prefix}%"})}

    def counts_of(self, run_ids: Sequence[str]) -> dict[str, int]:
        """Runs by status in PostgreSQL among ``run_ids``."""
        with self.engine.connect() as conn:
            return {str(s): int(n) for s, n in conn.execute(_STATUS_COUNTS_OF, {"ids": list(run_ids)})}

    def status_of(self, run_id: str) -> str | None:
        """One run's status in PostgreSQL."""
        with self.engine.connect() as conn:
            value = conn.execute(_STATUS_OF, {"run_id": run_id}).scalar()
        return None if value is None else str(value)

    def waiting_on_a(self, prefix: str) -> int:
        """Runs RUNNING in PostgreSQL with attempt 1 of step ``a`` RUNNING."""
        with self.engine.connect() as conn:
            return int(conn.execute(_WAITING_ON_A, {"prefix": f"{prefix}%"}).scalar() or 0)

    def running_ids(self) -> list[str]:
        """Every run PostgreSQL has RUNNING."""
        with self.engine.connect() as conn:
            return [str(r) for r in conn.execute(_RUNNING_IDS).scalars()]

    def attempts_of(self, run_ids: Sequence[str]) -> tuple[int, int]:
        """Attempts recorded for these runs: all, and those beyond the first of their step."""
        with self.engine.connect() as conn:
            row = conn.execute(_ATTEMPTS_OF, {"ids": list(run_ids)}).one()
        return int(row[0]), int(row[1])

    def wait_progress(
        self,
        what: str,
        progress: Callable[[], int],
        goal: int,
        *,
        watch: Sequence[str] = ("executor", "bridge"),
    ) -> float:
        """Wait until ``progress()`` reaches ``goal``; bounded overall and by a lack of progress (the options').

        Returns:
            How long it took, in seconds.
        """
        return wait_progress(
            self.stack,
            what,
            progress,
            goal,
            timeout_s=self.options.timeout_s,
            stall_s=self.options.stall_s,
            watch=watch,
        )

    # ------------------------------------------------------------ phases

    def start(self) -> float:
        """Start the whole stack and wait until both workers own every partition.

        Returns:
            How long that took.
        """
        started = time.monotonic()
        self.stack.start_services()
        assert self.stack.postgres is not None, "the bench always starts the embedded PostgreSQL"
        self._engine = make_engine(self.stack.postgres.url)
        create_schema(self.engine)
        fast = self.stack.start_agent("summarizer", port=self.ports["fast"], name="agent-fast")
        self.start_worker("executor")
        self.start_worker("bridge")
        self.stack.wait_port(self.ports["fast"], fast)
        self.start_stuck_agent(slow=True)
        register_agents(self.engine, {name: f"http://127.0.0.1:{port}/" for name, port in self.ports.items()})
        wait_serving(self.stack, timeout_s=self.options.timeout_s, stall_s=self.options.stall_s)
        self.submitter.start()
        return time.monotonic() - started

    def load(self, figures: LoadFigures) -> None:
        """Load the finished runs, then the runs left waiting on ``stuck``."""
        n = self.options.finished
        figures.finished_runs = n
        cpu_before = self.cpu_snapshot()
        if n:
            plan = load_plan(FINISHING_PLAN)
            messages = submissions(plan, "fin", n)
            say(f"loading {n} one-step runs on fast ...")
            started = time.monotonic()
            self.submitter.send(messages)
            figures.finished_produce_s = time.monotonic() - started
            self.wait_progress("finished runs COMPLETED", lambda: self.counts("fin-").get("COMPLETED", 0), n)
            figures.finished_s = time.monotonic() - started
            failed = {s: c for s, c in self.counts("fin-").items() if s != "COMPLETED"}
            if failed:
                raise BenchError(f"finished runs that did not complete: {failed}")
            say(f"  {n} runs COMPLETED in {figures.finished_s:.1f}s ({n / figures.finished_s:.1f} runs/s)")
        figures.in_flight_runs = self.options.in_flight
        figures.in_flight_produce_s, figures.in_flight_s = self.load_in_flight("fly1")
        figures.cpu_s = cpu_used(cpu_before, self.cpu_snapshot())
        figures.stuck_calls = int(self.agent_stats(self.ports["stuck"])["calls"])
        figures.stalled_probe_wait_s = self.options.stalled_probe_s
        if self.options.stalled_probe_s > 0:
            figures.stalled_probe_status = self.stalled_probe("probe-stalled", self.options.stalled_probe_s)
        figures.executor_rss_mib = rss_mib(self.process("executor"))

    def stalled_probe(self, run_id: str, wait_s: float) -> str | None:
        """Submit a one-step run on ``fast`` while runs wait on ``stuck``; its status after ``wait_s``."""
        say(f"a one-step run on fast while runs wait on stuck: waiting up to {wait_s:g}s for it ...")
        self.submit_probe(run_id)
        deadline = time.monotonic() + wait_s
        status = self.status_of(run_id)
        while status != "COMPLETED" and time.monotonic() < deadline:
            time.sleep(POLL_S)
            status = self.status_of(run_id)
        say(f"  it is {status}")
        return status

    def load_in_flight(self, prefix: str) -> tuple[float, float]:
        """Submit ``in_flight`` runs waiting on ``stuck``; wait until PostgreSQL shows them so.

        Returns:
            Seconds to produce them, seconds until PostgreSQL showed them all.
        """
        n = self.options.in_flight
        plan = load_plan(IN_FLIGHT_PLAN)
        messages = submissions(plan, prefix, n)
        say(f"loading {n} runs waiting on stuck ({prefix}-*) ...")
        started = time.monotonic()
        self.submitter.send(messages)
        produced = time.monotonic() - started
        self.wait_progress(f"{prefix} runs RUNNING on a/1", lambda: self.waiting_on_a(f"{prefix}-"), n)
        took = time.monotonic() - started
        say(f"  {n} runs RUNNING with a/1 in flight after {took:.1f}s ({n / took:.1f} runs/s)")
        return produced, took

    def restart_after_kill(self, figures: RecoveryFigures) -> None:
        """Scenario 1: kill -9 executor and bridge, replace ``stuck``, restart, watch the runs move on."""
        run_ids = [f"fly1-{i:06d}" for i in range(self.options.in_flight)]
        self.before_kill(figures)
        say("kill -9 executor and bridge; stuck agent replaced by a fast one ...")
        killed = time.monotonic()
        self.kill("executor")
        self.kill("bridge")
        self.start_stuck_agent(slow=False)
        restarted = time.monotonic()
        figures.down_s = restarted - killed
        self.start_worker("executor")
        self.start_worker("bridge")
        self.submit_probe("probe-restart")
        figures.probe_submit_s = time.monotonic() - restarted
        self.watch(run_ids, "probe-restart", restarted, figures)

    def restart_after_broker_loss(self, figures: RecoveryFigures) -> None:
        """Scenario 2: runs waiting on ``stuck``; kill -9 the workers, a new empty broker, restart, rebuild."""
        self.start_stuck_agent(slow=True)
        _, figures.load_s = self.load_in_flight("fly2")
        run_ids = self.running_ids()
        expected = {f"fly2-{i:06d}" for i in range(self.options.in_flight)}
        if set(run_ids) != expected:
            say(f"  note: PostgreSQL has {len(run_ids)} RUNNING run(s), {len(set(run_ids) - expected)} not of fly2")
        figures.in_flight = len(run_ids)
        self.before_kill(figures)
        say("kill -9 executor and bridge; broker stopped and started empty; stuck agent replaced ...")
        killed = time.monotonic()
        self.kill("executor")
        self.kill("bridge")
        self.submitter.stop()
        broker_started = time.monotonic()
        self.restart_broker()
        figures.broker_restart_s = time.monotonic() - broker_started
        self.start_stuck_agent(slow=False)
        restarted = time.monotonic()
        figures.down_s = restarted - killed
        self.start_worker("executor")
        self.start_worker("bridge")
        self.submitter.start()  # creates the topics on the new broker, as the CLI does before it produces
        self.submit_probe("probe-broker")
        figures.probe_submit_s = time.monotonic() - restarted
        self.watch(run_ids, "probe-broker", restarted, figures)

    def restart_broker(self) -> None:
        """Stop the embedded broker (its topics are lost) and start an empty one on the same port."""
        assert self.stack.broker is not None
        self.stack.broker.stop()
        self.stack.broker = None
        for attempt in range(5):
            try:
                self.stack.start_services()
                return
            except RuntimeError as error:  # the port not free yet
                say(f"  broker did not start again ({error}); retrying")
                time.sleep(1 + attempt)
        raise BenchError("the new broker did not start")

    def before_kill(self, figures: RecoveryFigures) -> None:
        """Memory of the workers just before they are killed."""
        figures.rss_before_mib = rss_mib(self.process("executor"))
        figures.bridge_rss_before_mib = rss_mib(self.process("bridge"))
        figures.executor_health_before = self.executor_health(timeout=5.0) or {}
        self._finished_calls_before = self.finished_calls()
        self._cpu_before = self.cpu_snapshot()
        self._cpu_at = time.monotonic()

    def submit_probe(self, run_id: str) -> None:
        """Submit a fresh one-step run on ``fast``."""
        plan = load_plan(FINISHING_PLAN)
        submission = WorkflowSubmission(run_id=run_id, plan=plan, input={"text": f"a fresh run: {run_id}"})
        self.submitter.send([(run_id, encode(submission))])

    def watch(self, run_ids: Sequence[str], probe: str, restarted: float, figures: RecoveryFigures) -> None:
        """Poll until the probe and every run of ``run_ids`` are COMPLETED; record when each milestone came."""
        n = len(run_ids)
        peak = 0.0
        last_done, last_change = -1, time.monotonic()
        shown = time.monotonic()
        while True:
            now = time.monotonic()
            elapsed = now - restarted
            if figures.partitions_s is None:
                health = self.executor_health(timeout=0.5)
                if health is not None and figures.health_s is None:
                    figures.health_s = elapsed
                if health is not None and health.get("run_partitions") == list(range(self.options.partitions)):
                    figures.partitions_s = elapsed
            if figures.bridge_partitions_s is None:
                bridge = self.bridge_health(timeout=0.5)
                if bridge is not None and bridge.get("assigned_partitions"):
                    figures.bridge_partitions_s = elapsed
            status = self.status_of(probe)
            if status in {"RUNNING", "COMPLETED"} and figures.probe_running_s is None:
                figures.probe_running_s = elapsed
            if status == "COMPLETED" and figures.probe_completed_s is None:
                figures.probe_completed_s = elapsed
            if status in {"FAILED", "CANCELLED"}:
                raise BenchError(f"the fresh run {probe} ended {status}")
            counts = self.counts_of(run_ids)
            done = counts.get("COMPLETED", 0)
            if done and figures.first_completed_s is None:
                figures.first_completed_s = elapsed
            if done * 2 >= n and figures.half_completed_s is None:
                figures.half_completed_s = elapsed
            if done >= n and figures.all_completed_s is None:
                figures.all_completed_s = elapsed
            bad = {s: c for s, c in counts.items() if s in {"FAILED", "CANCELLED"}}
            if bad:
                raise BenchError(f"in-flight runs that ended badly: {bad}")
            peak = max(peak, rss_mib(self.process("executor")) or 0.0)
            if figures.all_completed_s is not None and figures.probe_completed_s is not None:
                break
            if done != last_done:
                last_done, last_change = done, now
            for name in ("executor", "bridge"):
                process = self.stack.processes[name]
                if not process.alive():
                    raise BenchError(f"{name} exited with code {process.popen.returncode}\n{self.logs_tail(name)}")
            if elapsed > self.options.timeout_s or now - last_change > self.options.stall_s:
                raise BenchError(
                    f"recovery: {done}/{n} runs COMPLETED, fresh run {status}, after {elapsed:.0f}s "
                    f"(no progress for {now - last_change:.0f}s): {counts}\n{self.logs_tail('executor', 'bridge')}"
                )
            if now - shown >= 15:
                say(f"  {done}/{n} runs COMPLETED, fresh run {status}, {elapsed:.0f}s after the restart")
                shown = now
            time.sleep(POLL_S)
        figures.cpu_s = cpu_used(self._cpu_before, self.cpu_snapshot())
        figures.cpu_wall_s = time.monotonic() - self._cpu_at
        say(f"  all {n} runs COMPLETED {figures.all_completed_s:.1f}s after the restart")
        figures.rss_peak_mib = peak
        self.settle_and_measure(run_ids, figures)

    def settle_and_measure(self, run_ids: Sequence[str], figures: RecoveryFigures) -> None:
        """Once recovered: let the checkpointer drain, then memory, health counters and agent calls."""
        deadline = time.monotonic() + 30
        health = self.executor_health()
        while time.monotonic() < deadline and (health is None or health.get("checkpoint_backlog")):
            time.sleep(0.5)
            health = self.executor_health()
        time.sleep(1.0)
        figures.rss_after_mib = rss_mib(self.process("executor"))
        figures.bridge_rss_after_mib = rss_mib(self.process("bridge"))
        figures.executor_health = self.executor_health() or {}
        figures.bridge_health = self.bridge_health() or {}
        resumed = restores = discarded = 0
        for line in self.log_since_start("executor"):
            found = _RESUMED.search(line)
            if found:
                resumed += int(found.group(1))
                restores += int(found.group(2))
            discarded += "is from an earlier broker" in line
        figures.runs_resumed, figures.restore_requests, figures.tables_discarded = resumed, restores, discarded
        wanted = set(run_ids)
        replaced = self.agent_stats(self.ports["stuck"])["by_idempotency_key"]
        step_a = {k: int(v) for k, v in replaced.items() if k.split("/", 1)[0] in wanted}
        figures.step_a_calls = sum(step_a.values())
        figures.step_a_keys_repeated = sum(1 for v in step_a.values() if v > 1)
        fast = self.agent_stats(self.ports["fast"])["by_idempotency_key"]
        figures.step_b_calls = sum(int(v) for k, v in fast.items() if k.split("/", 1)[0] in wanted)
        figures.finished_runs_called_again = self.finished_calls() - self._finished_calls_before
        figures.attempts_recorded, figures.later_attempts = self.attempts_of(run_ids)

    def close(self) -> None:
        """Stop every process by PID (workers first), the broker and PostgreSQL."""
        try:
            self.submitter.close()
        finally:
            try:
                if self._engine is not None:
                    self._engine.dispose()
            finally:
                stop_stack(self.stack)


# ------------------------------------------------------------------ report


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


def _rate(count: int, seconds: float | None) -> str:
    return "-" if not seconds else f"{count / seconds:.1f} runs/s"


def render(report: Report) -> str:
    """The figures as a table."""
    load = report.load
    lines = [
        "",
        f"Switchyard recovery bench: {report.runs} runs ({load.finished_runs} finished, {report.in_flight} in flight),"
        f" {report.partitions} partitions, {report.cpus} CPUs, load average at start {report.loadavg_start}",
        f"stack started in {_s(report.startup_s)}",
        "",
        "load (produced by one producer, counted in PostgreSQL)",
    ]
    rows: list[tuple[str, str, str]] = []
    if load.finished_runs:
        rows.append(
            (
                f"{load.finished_runs} one-step runs on fast: all COMPLETED",
                _s(load.finished_s),
                _rate(load.finished_runs, load.finished_s),
            )
        )
        rows.append(("  of which producing them", _s(load.finished_produce_s), ""))
    rows.append(
        (
            f"{load.in_flight_runs} runs: RUNNING, attempt a/1 in flight",
            _s(load.in_flight_s),
            _rate(load.in_flight_runs, load.in_flight_s),
        )
    )
    rows.append(("  of which producing them", _s(load.in_flight_produce_s), ""))
    rows.append((f"all {report.runs} runs", _s(load.total_s), _rate(report.runs, load.total_s)))
    rows.append(("calls that reached the stuck agent", str(load.stuck_calls), "(the others wait in the bridge)"))
    rows.append(("executor RSS once loaded", _mib(load.executor_rss_mib), ""))
    if load.stalled_probe_wait_s:
        rows.append(
            (
                f"a fresh run on fast, {load.stalled_probe_wait_s:g} s after its submission",
                str(load.stalled_probe_status),
                "(while runs wait on stuck)",
            )
        )
    lines += [f"  {a:<52} {b:>10}  {c}" for a, b, c in rows]
    if report.scenarios:
        names = [s.scenario for s in report.scenarios]
        lines += ["", f"  {'recovery (times from the restart)':<52}" + "".join(f"{n:>20}" for n in names)]

        def row(label: str, cell: Callable[[RecoveryFigures], str]) -> None:
            lines.append(f"  {label:<52}" + "".join(f"{cell(s):>20}" for s in report.scenarios))

        def ratio(s: RecoveryFigures) -> str:
            if s.rss_before_mib and s.rss_after_mib:
                return f"x{s.rss_after_mib / s.rss_before_mib:.2f}"
            return "-"

        row("in-flight runs to recover", lambda s: str(s.in_flight))
        row("loading them (RUNNING in PostgreSQL)", lambda s: _s(s.load_s))
        row("down: kill -9 -> restart", lambda s: _s(s.down_s))
        row("  of which the broker's stop and start", lambda s: _s(s.broker_restart_s))
        row("fresh run submitted", lambda s: _s(s.probe_submit_s))
        row("executor /health/ answers", lambda s: _s(s.health_s))
        row("executor owns every run partition again", lambda s: _s(s.partitions_s))
        row("bridge owns its partitions again", lambda s: _s(s.bridge_partitions_s))
        row("fresh run RUNNING in PostgreSQL", lambda s: _s(s.probe_running_s))
        row("fresh run COMPLETED (serving new runs)", lambda s: _s(s.probe_completed_s))
        row("in-flight runs: first COMPLETED", lambda s: _s(s.first_completed_s))
        row("in-flight runs: half COMPLETED", lambda s: _s(s.half_completed_s))
        row("in-flight runs: all COMPLETED (moved on)", lambda s: _s(s.all_completed_s))
        row("  per 1000 in-flight runs", lambda s: _s(s.per_1000_s))
        row("  counted from both workers owning their partitions", lambda s: _s(s.after_joined_s))
        row("    per 1000 in-flight runs", lambda s: _s(s.after_joined_per_1000_s))
        row(
            "  rate",
            lambda s: f"{s.in_flight / s.all_completed_s:.1f} runs/s" if s.all_completed_s else "-",
        )
        row("executor RSS before the kill", lambda s: _mib(s.rss_before_mib))
        row("executor RSS peak during recovery", lambda s: _mib(s.rss_peak_mib))
        row("executor RSS after recovery", lambda s: _mib(s.rss_after_mib))
        row("  after / before", ratio)
        row(
            "bridge RSS before -> after", lambda s: f"{_mib(s.bridge_rss_before_mib)} -> {_mib(s.bridge_rss_after_mib)}"
        )
        row("step a calls at the new agent (1 per run)", lambda s: str(s.step_a_calls))
        row("  idempotency keys called more than once", lambda s: str(s.step_a_keys_repeated))
        row("step b calls at fast (1 per run)", lambda s: str(s.step_b_calls))
        row("calls again for runs finished before the kill", lambda s: str(s.finished_runs_called_again))
        row("attempts recorded (2 per run) / beyond #1", lambda s: f"{s.attempts_recorded} / {s.later_attempts}")
        row("executor: runs resumed / restores asked (its log)", lambda s: f"{s.runs_resumed} / {s.restore_requests}")
        row("executor: RocksDB partitions discarded", lambda s: str(s.tables_discarded))
        row("executor: events ignored (duplicates, stale)", lambda s: str(s.executor_health.get("events_ignored", "-")))
        row(
            "executor: timers before kill -> after recovery",
            lambda s: f"{s.executor_health_before.get('timers', '-')} -> {s.executor_health.get('timers', '-')}",
        )
        row(
            "bridge: calls made / repeats joined / remembered",
            lambda s: "{} / {} / {}".format(
                s.bridge_health.get("calls_made", "-"),
                s.bridge_health.get("repeats_joined", "-"),
                s.bridge_health.get("repeats_remembered", "-"),
            ),
        )
        lines += ["", f"  {'CPU seconds used (user + system)':<52}{'load':>20}" + "".join(f"{n:>20}" for n in names)]
        walls = [load.total_s] + [s.cpu_wall_s for s in report.scenarios]
        lines.append(
            f"  {'  wall time (kill -> all COMPLETED for recoveries)':<52}" + "".join(f"{_s(w):>20}" for w in walls)
        )
        for group in CPU_GROUPS:
            cells = [load.cpu_s.get(group)] + [s.cpu_s.get(group) for s in report.scenarios]
            lines.append(f"  {'  ' + group:<52}" + "".join(f"{_s(c):>20}" for c in cells))
        lines += [
            "",
            "  'fresh run RUNNING': the executor took the new run and dispatched its step. 'COMPLETED' adds the",
            "  bridge, which takes tasks in topic order (the fresh run's task waits behind the re-dispatched",
            "  attempts, and after a restart behind the redelivered originals too), and the executor, which",
            "  applies its result after the results queued before it.",
        ]
    if report.error:
        lines += ["", f"FAILED: {report.error}"]
    lines.append(f"\nload average at the end {report.loadavg_end}; data folder {report.data_dir}")
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def run(bench: RecoveryBench, report: Report, options: Options) -> None:
    """Every phase, in order; the figures go into ``report`` as they come."""
    report.startup_s = bench.start()
    say(f"stack serving after {report.startup_s:.1f}s")
    bench.load(report.load)
    restart = RecoveryFigures(scenario="restart", in_flight=options.in_flight, load_s=report.load.in_flight_s)
    report.scenarios.append(restart)
    bench.restart_after_kill(restart)
    lost = RecoveryFigures(scenario="broker lost", in_flight=options.in_flight)
    report.scenarios.append(lost)
    bench.restart_after_broker_loss(lost)
    report.complete = True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; returns the exit status."""
    options = parse_args(argv)
    forget_external_services()
    data_dir = Path(tempfile.mkdtemp(prefix="switchyard-bench-recovery-"))
    report = Report(
        runs=options.runs,
        in_flight=options.in_flight,
        partitions=options.partitions,
        cpus=os.cpu_count() or 0,
        data_dir=str(data_dir),
        loadavg_start=os.getloadavg(),
    )
    bench = RecoveryBench(options, data_dir)
    say(f"stack in {data_dir} (logs in {data_dir / 'logs'})")
    report.error = run_guarded(lambda: run(bench, report, options), bench.close)
    report.loadavg_end = os.getloadavg()
    report.data_dir = tidy(data_dir, success=report.complete, keep=options.keep)
    publish(render(report), report.as_json(), options.json_path)
    return 0 if report.complete else 1


if __name__ == "__main__":
    sys.exit(main())
