"""Throughput and latency of Switchyard against a direct baseline (and DBOS 3.4), in one invocation.

``python -m bench.throughput [--quick] [--with-dbos] [--json FILE] [--keep]``

Everything runs on the embedded stack, every piece a process on free loopback
ports in a fresh temporary folder (logs in its ``logs/``): the broker,
PostgreSQL, two echo agents (``examples.agents.echo``: ``echo`` answers at
once, ``echo-slow`` after ``--w2-delay`` seconds) and, for Switchyard, the
executor and bridge workers with the settings a user gets. Each system runs
the chain of :mod:`bench.workload` (step ``k`` echoes its predecessor's text
with ``|k`` appended) on the same agents and the same PostgreSQL server,
each on a database of its own:

* direct: plain asyncio + aiohttp sending the bridge's A2A request, asyncpg
  writing the run row (autocommit), a step row after each call, the run's end;
* DBOS 3.4 (``--with-dbos``): an async ``@DBOS.workflow`` calling one
  ``@DBOS.step`` per agent call, in the bench's process;
* Switchyard: submissions produced onto the plans topic by one producer, the
  end of each run seen on the monitoring topic by the bench's consumer.

The baselines run first, with the Switchyard workers not yet started. For
each system: its CPU at rest (``--rest`` seconds, nothing submitted), then a
3-step run after that rest, then the workloads, each after a warm-up of its
shape (``--warm-up`` runs, not counted):

* W0: ``--w0-runs`` runs of 3 steps, one at a time (unloaded latency);
* W1: ``--w1-runs`` runs of 3 steps, ``--in-flight`` at once (a new one as one ends);
* W2: ``--w2-runs`` one-step runs on ``echo-slow``, all submitted at once
  (makespan, and the peak of calls in flight at the agent);
* W3: ``--w3-runs`` runs of ``--w3-steps`` steps (50), ``--in-flight`` at once. Besides its
  throughput, the time from one step's start to the next's, over the first five
  steps and over the last five: a step late in a long run must cost what an early
  one does (Switchyard only: the baselines do not record when each step started).

Latency is from submission to the end seen by the bench. CPU is read from
/proc (psutil) for every process, PostgreSQL with all its backends (exited
ones included); "own" CPU is the system's own processes: executor, bridge and
broker for Switchyard, the bench's process for direct and DBOS (they run in
it). After every batch the bench reads every run and step back from the
system's own records: status, output, one successful execution per step,
exact row counts; and the agent's call count. Any failed check, or a
workload without progress for ``--stall`` seconds, makes the exit status 1.

The bench always uses the embedded broker and PostgreSQL: the
``SWITCHYARD_BROKER_URL``, ``SWITCHYARD_DATABASE_URL`` and
``SWITCHYARD_REGISTRY_URL`` of its environment are ignored. Every process is
stopped by PID at the end, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from sqlalchemy import Engine

from bench.harness import (
    CPU_GROUPS,
    ROOT,
    BenchError,
    cpu_snapshot,
    cpu_used,
    embedded_settings,
    forget_external_services,
    free_port,
    publish,
    register_agents,
    run_guarded,
    say,
    stop_stack,
    tidy,
)
from bench.systems import (
    DBOS_EXTRA_HINT,
    DbosSystem,
    DirectSystem,
    RunFailed,
    SwitchyardSystem,
    System,
    dbos_available,
    destroy_dbos,
)
from bench.workload import ECHO, ECHO_SLOW, Workload, check_runs, ms_per_step, percentile, ratio
from switchyard.db import create_schema, make_engine
from switchyard.stack import Stack, http_json

T = TypeVar("T")

GROUP_LABELS: Final = {
    "executor": "executor",
    "bridge": "bridge",
    "broker": "broker",
    "postgres": "PostgreSQL (all backends)",
    "agents": "echo agents",
    "bench": "bench process (driver)",
}
_SUCCESS: Final = {"dbos": "SUCCESS"}
"""A system's word for a run and a step that succeeded, where it is not COMPLETED."""


# ------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    """What to run."""

    quick: bool
    with_dbos: bool
    w0_runs: int
    w1_runs: int
    w2_runs: int
    w3_runs: int
    steps: int
    w3_steps: int
    in_flight: int
    w2_delay_s: float
    warm_up: int
    rest_s: float
    stall_s: float
    timeout_s: float
    json_path: Path | None
    keep: bool

    def workloads(self) -> list[Workload]:
        """W0 to W3, as the options size them."""
        return [
            Workload("W0", "unloaded run latency", self.w0_runs, self.steps, 1),
            Workload("W1", "throughput", self.w1_runs, self.steps, self.in_flight),
            Workload("W2", "slow agent, all at once", self.w2_runs, 1, self.w2_runs, agent=ECHO_SLOW),
            Workload("W3", "long runs", self.w3_runs, self.w3_steps, self.in_flight),
        ]


_SIZES: Final = {
    # option: (default, --quick)
    "w0_runs": (50, 10),
    "w1_runs": (1000, 100),
    "w2_runs": (500, 50),
    "w3_runs": (200, 20),
    "warm_up": (10, 5),
    "rest_s": (10.0, 5.0),
    "stall_s": (60.0, 30.0),
}


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Options from the command line (sizes default to the issue's, or small ones with ``--quick``)."""
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="small sizes (W0 10, W1 100, W2 50, W3 20 runs, 5 s rest)")
    add("--with-dbos", action="store_true", help="also run the workloads on DBOS 3.4 (the bench extra)")
    add("--w0-runs", type=int, help="W0 runs, one at a time (default 50)")
    add("--w1-runs", type=int, help="W1 runs (default 1000)")
    add("--w2-runs", type=int, help="W2 one-step runs, all at once (default 500)")
    add("--w3-runs", type=int, help="W3 runs (default 200)")
    add("--steps", type=int, default=3, help="steps of the W0 and W1 runs (default 3)")
    add("--w3-steps", type=int, default=50, help="steps of the W3 runs (default 50)")
    add("--in-flight", type=int, default=64, help="runs in flight in W1 and W3 (default 64)")
    add("--w2-delay", type=float, default=1.0, help="seconds the slow agent takes in W2 (default 1)")
    add("--warm-up", type=int, help="runs of each workload's warm-up (default 10)")
    add("--rest", dest="rest_s", type=float, help="seconds of rest measured before the first run (default 10)")
    add("--stall", dest="stall_s", type=float, help="fail a workload without progress for this long, s (default 60)")
    add("--timeout", type=float, default=300.0, help="longest wait for a stack to serve or to write, s")
    add("--json", type=Path, default=None, metavar="FILE", help="also write every figure as JSON")
    add("--keep", action="store_true", help="keep the data folder (PostgreSQL, datadirs, logs) after success")
    args = parser.parse_args(argv)
    sizes = {name: getattr(args, name) for name in _SIZES}
    for name, (default, quick) in _SIZES.items():
        if sizes[name] is None:
            sizes[name] = quick if args.quick else default
    if min(sizes["w0_runs"], sizes["w1_runs"], sizes["w2_runs"], sizes["w3_runs"], sizes["warm_up"]) < 1:
        parser.error("every size must be at least 1")
    if min(args.steps, args.w3_steps, args.in_flight) < 1 or args.w2_delay < 0 or sizes["rest_s"] < 0:
        parser.error("--steps, --w3-steps and --in-flight must be at least 1; --w2-delay and --rest not negative")
    if args.with_dbos and not dbos_available():
        parser.exit(2, f"python -m bench.throughput: {DBOS_EXTRA_HINT}\n")
    return Options(
        quick=args.quick,
        with_dbos=args.with_dbos,
        steps=args.steps,
        w3_steps=args.w3_steps,
        in_flight=args.in_flight,
        w2_delay_s=args.w2_delay,
        timeout_s=args.timeout,
        json_path=args.json,
        keep=args.keep,
        **sizes,
    )


# ------------------------------------------------------------------ figures


@dataclass
class WorkloadFigures:
    """One measured workload on one system."""

    key: str
    title: str
    shape: str
    runs: int
    steps: int
    makespan_s: float = 0.0
    steps_per_s: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    agent_calls: int | None = None
    agent_peak_in_flight: int | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_step: dict[str, float] = field(default_factory=dict)
    own_cpu_ms_per_step: float = 0.0
    all_cpu_ms_per_step: float = 0.0
    step_gap_ms: dict[str, float | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class RestFigures:
    """A system at rest, and its first run after that rest."""

    seconds: float
    cpu_cores: dict[str, float] = field(default_factory=dict)
    own_cores: float = 0.0
    all_cores: float = 0.0
    first_run_ms: float | None = None


@dataclass
class SystemFigures:
    """Everything measured on one system."""

    key: str
    label: str
    own_groups: tuple[str, ...]
    startup_s: float | None = None
    rest: RestFigures | None = None
    workloads: dict[str, WorkloadFigures] = field(default_factory=dict)
    runs_started: int = 0
    steps_started: int = 0
    runs_recorded: int | None = None
    steps_recorded: int | None = None
    problems: list[str] = field(default_factory=list)

    def all_problems(self) -> list[str]:
        """Its own problems and those of its workloads."""
        found = list(self.problems)
        for figures in self.workloads.values():
            found += [f"{figures.key}: {p}" for p in figures.problems]
        return found


@dataclass
class Report:
    """Everything measured, and how the invocation went."""

    options: dict[str, Any]
    cpus: int
    data_dir: str
    loadavg_start: tuple[float, float, float]
    loadavg_end: tuple[float, float, float] | None = None
    services_s: float | None = None
    wall_s: float | None = None
    systems: list[SystemFigures] = field(default_factory=list)
    complete: bool = False
    error: str | None = None

    @property
    def checks_passed(self) -> bool:
        """Whether everything ran and every check passed."""
        return self.complete and self.error is None and not any(s.all_problems() for s in self.systems)

    def system(self, key: str) -> SystemFigures | None:
        """The figures of one system, if it ran."""
        return next((s for s in self.systems if s.key == key), None)

    def as_json(self) -> dict[str, Any]:
        """The report as JSON-ready data, with the summary table's rows."""
        data = asdict(self)
        data["checks_passed"] = self.checks_passed
        data["summary"] = [
            {"row": row.label, "unit": row.unit, **{s.key: row.value(s) for s in self.systems}} for row in SUMMARY
        ]
        return data


# ------------------------------------------------------------------ driving runs


@dataclass
class Driven:
    """What a batch of runs gave: latencies of those that completed, failures of the others."""

    latencies_s: dict[str, float]
    failures: dict[str, str]
    makespan_s: float


async def drive(system: System, workload: Workload, run_ids: Sequence[str], *, stall_s: float) -> Driven:
    """Run ``run_ids`` on ``system``, ``workload.in_flight`` at a time, each slot taking the next run as one ends.

    Raises:
        BenchError: A process of the stack died, or no run ended for ``stall_s``.
    """
    latencies: dict[str, float] = {}
    failures: dict[str, str] = {}
    pending = iter(run_ids)
    last_end = time.monotonic()

    async def slot() -> None:
        nonlocal last_end
        for run_id in pending:  # shared: each slot takes the next run as its own ends
            try:
                latencies[run_id] = await system.run(run_id, workload)
            except RunFailed as error:
                failures[run_id] = str(error)
            except Exception as error:  # a database or client error: the run failed, the bench goes on
                failures[run_id] = repr(error)
            last_end = time.monotonic()

    started = time.perf_counter()
    batch = asyncio.gather(*(slot() for _ in range(min(workload.in_flight, len(run_ids)))))
    try:
        while not batch.done():
            await asyncio.wait({batch}, timeout=1.0)
            if batch.done():
                break
            trouble = system.trouble()
            if trouble is not None:
                raise BenchError(f"{system.label} {workload.key}: {trouble}")
            if time.monotonic() - last_end > stall_s:
                raise BenchError(
                    f"{system.label} {workload.key}: {len(latencies) + len(failures)}/{len(run_ids)} runs ended, "
                    f"none for {stall_s:g}s\n{system.diagnostics()}"
                )
        batch.result()
    finally:
        if not batch.done():
            batch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await batch
    return Driven(latencies, failures, time.perf_counter() - started)


def latency_figures(latencies_s: Sequence[float]) -> dict[str, float | None]:
    """p50, p99, mean and max of latencies, in milliseconds."""
    ms = [s * 1000 for s in latencies_s]
    return {
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
        "mean": sum(ms) / len(ms) if ms else None,
        "max": max(ms) if ms else None,
    }


def own_total(values: dict[str, float], groups: Sequence[str]) -> float:
    """The sum of some groups' figures."""
    return sum(values.get(group, 0.0) for group in groups)


def every_group(system: System) -> list[str]:
    """The groups of every process that works for a system: all but the bench's, unless it is the system."""
    return [g for g in CPU_GROUPS if g != "bench" or g in system.own_groups]


# ------------------------------------------------------------------ the bench


class ThroughputBench:
    """The stack, the systems and the phases of the bench.

    Args:
        options: What to run.
        data_dir: A fresh folder for PostgreSQL, the worker datadirs and the logs.
    """

    def __init__(self, options: Options, data_dir: Path) -> None:
        self.options = options
        self.stack = Stack(embedded_settings(data_dir), ROOT)
        self.ports = {ECHO: free_port(), ECHO_SLOW: free_port()}
        self.agents = {name: f"http://127.0.0.1:{port}/" for name, port in self.ports.items()}
        self.loop = asyncio.new_event_loop()
        self._engine: Engine | None = None
        self._running: list[System] = []

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the bench's one event loop."""
        return self.loop.run_until_complete(coroutine)

    # ------------------------------------------------------------ the stack

    def start_services(self) -> float:
        """The broker, PostgreSQL (Switchyard's schema, the agents registered) and the echo agents."""
        started = time.monotonic()
        self.stack.start_services()
        assert self.stack.postgres is not None, "the bench always starts the embedded PostgreSQL"
        self._engine = make_engine(self.stack.postgres.url)
        create_schema(self._engine)
        fast = self.stack.start_agent("echo", "--log-level", "WARNING", port=self.ports[ECHO], name="agent-echo")
        slow = self.stack.start_agent(
            "echo",
            "--log-level",
            "WARNING",
            "--slow",
            f"{self.options.w2_delay_s:g}",
            port=self.ports[ECHO_SLOW],
            name="agent-echo-slow",
        )
        self.stack.wait_port(self.ports[ECHO], fast)
        self.stack.wait_port(self.ports[ECHO_SLOW], slow)
        register_agents(self._engine, self.agents)
        return time.monotonic() - started

    def systems(self) -> list[System]:
        """The systems to measure, in order: the baselines before Switchyard's workers start."""
        assert self._engine is not None, "the services have not started"
        found: list[System] = [DirectSystem(self.stack, self.agents)]
        if self.options.with_dbos:
            found.append(DbosSystem(self.stack, self.agents))
        found.append(
            SwitchyardSystem(
                self.stack, self.agents, self._engine, timeout_s=self.options.timeout_s, stall_s=self.options.stall_s
            )
        )
        return found

    def agent_stats(self, agent: str, *, reset_peak: bool = False) -> dict[str, Any]:
        """An echo agent's ``/stats``; with ``reset_peak``, as they were before a new peak window starts."""
        method, path = ("POST", "stats/reset-peak") if reset_peak else ("GET", "stats")
        status, body = http_json(method, self.agents[agent] + path, timeout=30.0)
        if status != 200 or not isinstance(body, dict):
            raise BenchError(f"{method} /{path} on {agent} answered {status}")
        return body

    # ------------------------------------------------------------ one system

    def measure(self, system: System, figures: SystemFigures) -> None:
        """Start a system, measure it at rest and after, run every workload, count its records; then stop it."""
        say(f"{system.label}: starting ...")
        self._running.append(system)
        try:
            figures.startup_s = self.call(system.start())
            say(f"{system.label}: up after {figures.startup_s:.1f}s; {self.options.rest_s:g}s at rest ...")
            rest = figures.rest = self.rest(system)
            self.call(system.connect())
            first = Workload("rest", "first run after rest", 1, self.options.steps, 1)
            after_rest = self.batch(system, figures, first, [f"{system.key}-rest"])
            figures.problems += [f"first run after rest: {p}" for p in after_rest.problems]
            rest.first_run_ms = after_rest.latency_ms.get("p50")
            for workload in self.options.workloads():
                figures.workloads[workload.key] = self.workload(system, figures, workload)
            figures.runs_recorded, figures.steps_recorded = self.call(system.totals())
            if (figures.runs_recorded, figures.steps_recorded) != (figures.runs_started, figures.steps_started):
                figures.problems.append(
                    f"{figures.runs_recorded} runs and {figures.steps_recorded} step executions recorded in all, "
                    f"for {figures.runs_started} runs of {figures.steps_started} steps started"
                )
        finally:
            self.stop_system(system)

    def stop_system(self, system: System) -> None:
        """Release what a system holds in the bench's process (bounded)."""
        if system in self._running:
            self._running.remove(system)
            try:
                self.call(asyncio.wait_for(system.stop(), 30))
            except Exception as error:  # stopping must not hide what failed before
                say(f"{system.label} did not stop cleanly: {error!r}")

    def rest(self, system: System) -> RestFigures:
        """CPU used with nothing submitted, over ``--rest`` seconds."""
        before, started = cpu_snapshot(self.stack), time.monotonic()
        time.sleep(self.options.rest_s)  # the loop is idle on purpose: nothing of the bench's runs
        seconds = time.monotonic() - started
        used = cpu_used(before, cpu_snapshot(self.stack))
        cores = {group: cpu / seconds for group, cpu in used.items()} if seconds > 0 else {}
        return RestFigures(
            seconds=seconds,
            cpu_cores=cores,
            own_cores=own_total(cores, system.own_groups),
            all_cores=own_total(cores, every_group(system)),
        )

    def workload(self, system: System, figures: SystemFigures, workload: Workload) -> WorkloadFigures:
        """A warm-up of the workload's shape, then the workload, measured and checked."""
        warm = workload.warm_up(self.options.warm_up)
        say(f"{system.label} {workload.key}: warm-up ({warm.describe()}) ...")
        warmed = self.batch(system, figures, warm, run_ids(system, workload, "w", warm.runs))
        say(f"{system.label} {workload.key}: {workload.describe()} ...")
        measured = self.batch(system, figures, workload, run_ids(system, workload, "m", workload.runs), measure=True)
        measured.problems = [f"warm-up: {p}" for p in warmed.problems] + measured.problems
        lat = measured.latency_ms
        say(
            f"  {measured.steps_per_s:.1f} steps/s, makespan {measured.makespan_s:.2f}s, run p50 {_num(lat['p50'])} ms"
            f" p99 {_num(lat['p99'])} ms, own CPU {measured.own_cpu_ms_per_step:.2f} ms/step"
            + (f"; {len(measured.problems)} problem(s)" if measured.problems else "; checks passed")
        )
        return measured

    def batch(
        self, system: System, figures: SystemFigures, workload: Workload, ids: list[str], *, measure: bool = False
    ) -> WorkloadFigures:
        """Run ``ids``, read each back from the system's records and check it; with ``measure``, CPU figures too."""
        result = WorkloadFigures(workload.key, workload.title, workload.describe(), workload.runs, workload.steps)
        figures.runs_started += len(ids)
        figures.steps_started += len(ids) * workload.steps
        self.call(system.prepare(ids, workload))
        before_calls = int(self.agent_stats(workload.agent, reset_peak=True)["calls"])
        cpu_before = cpu_snapshot(self.stack)
        driven = self.call(drive(system, workload, ids, stall_s=self.options.stall_s))
        self.call(system.settle(ids, workload))  # the records' writing belongs to the work measured
        cpu = cpu_used(cpu_before, cpu_snapshot(self.stack))
        stats = self.agent_stats(workload.agent)
        result.makespan_s = driven.makespan_s
        result.steps_per_s = workload.steps * len(driven.latencies_s) / driven.makespan_s
        result.latency_ms = latency_figures(list(driven.latencies_s.values()))
        result.agent_calls = int(stats["calls"]) - before_calls
        result.agent_peak_in_flight = int(stats["peak_in_flight"])
        if measure:
            steps = workload.total_steps
            result.cpu_s = cpu
            result.cpu_ms_per_step = ms_per_step(cpu, steps)
            result.own_cpu_ms_per_step = own_total(result.cpu_ms_per_step, system.own_groups)
            result.all_cpu_ms_per_step = own_total(result.cpu_ms_per_step, every_group(system))
        result.problems = self.check(system, workload, ids, driven, result.agent_calls)
        result.step_gap_ms = self.call(system.step_gaps(ids, workload.steps))
        return result

    def check(self, system: System, workload: Workload, ids: list[str], driven: Driven, calls: int) -> list[str]:
        """Every run's record, its steps' records and the agent's count of calls."""
        runs, steps = self.call(system.records(ids))
        word = _SUCCESS.get(system.key, "COMPLETED")
        problems = check_runs(ids, workload.steps, runs, steps, completed=word, step_done=word)
        if driven.failures:
            first = sorted(driven.failures.items())[:3]
            problems.insert(0, f"{len(driven.failures)} run(s) failed: " + "; ".join(f"{r}: {e}" for r, e in first))
        if calls != len(ids) * workload.steps:
            problems.append(f"the agent was called {calls} times for {len(ids) * workload.steps} steps")
        return problems

    def cancel_pending(self) -> None:
        """Cancel what an interruption left on the loop (a batch of runs), and let it unwind (bounded)."""
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            gathered = asyncio.gather(*pending, return_exceptions=True)
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(asyncio.wait_for(gathered, 15))

    def close(self) -> list[str]:
        """Stop every system still held, then every process by PID; returns what is still running."""
        self.cancel_pending()
        for system in list(self._running):
            self.stop_system(system)
        destroy_dbos()  # whatever happened: DBOS's threads would keep this process alive
        try:
            if self._engine is not None:
                self._engine.dispose()
        finally:
            left = stop_stack(self.stack)
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
        return left


def run_ids(system: System, workload: Workload, phase: str, count: int) -> list[str]:
    """Run ids that name the system, the workload and the phase (``w`` warm-up, ``m`` measured)."""
    return [f"{system.key}-{workload.key.lower()}-{phase}-{i:05d}" for i in range(count)]


# ------------------------------------------------------------------ report


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _load(average: Sequence[float] | None) -> str:
    return "-" if average is None else " ".join(f"{v:.2f}" for v in average)


@dataclass(frozen=True)
class Row:
    """A row of the summary table: a figure of each system, and its ratio to direct's."""

    label: str
    unit: str
    value: Callable[[SystemFigures], float | None]
    digits: int = 1


def _workload(key: str, pick: Callable[[WorkloadFigures], float | None]) -> Callable[[SystemFigures], float | None]:
    def value(system: SystemFigures) -> float | None:
        figures = system.workloads.get(key)
        return None if figures is None else pick(figures)

    return value


def _w3_over_w1(system: SystemFigures) -> float | None:
    w1, w3 = system.workloads.get("W1"), system.workloads.get("W3")
    if w1 is None or w3 is None or not w1.steps_per_s:
        return None
    return w3.steps_per_s / w1.steps_per_s


def _late_over_early(system: SystemFigures) -> float | None:
    w3 = system.workloads.get("W3")
    if w3 is None:
        return None
    early, late = w3.step_gap_ms.get("first"), w3.step_gap_ms.get("last")
    return late / early if early and late is not None else None


SUMMARY: Final = (
    Row("W0 run latency p50", "ms", _workload("W0", lambda w: w.latency_ms.get("p50"))),
    Row("W1 steps/s", "steps/s", _workload("W1", lambda w: w.steps_per_s)),
    Row("W1 run latency p50", "ms", _workload("W1", lambda w: w.latency_ms.get("p50"))),
    Row("W1 run latency p99", "ms", _workload("W1", lambda w: w.latency_ms.get("p99"))),
    Row("W2 makespan", "s", _workload("W2", lambda w: w.makespan_s), 2),
    Row("W2 peak calls in flight at the agent", "calls", _workload("W2", lambda w: w.agent_peak_in_flight), 0),
    Row("W3 steps/s", "steps/s", _workload("W3", lambda w: w.steps_per_s)),
    Row("W3 steps/s / W1 steps/s", "", _w3_over_w1, 2),
    Row(
        "W3 time from a step to the next, first 5 steps (median)",
        "ms",
        _workload("W3", lambda w: w.step_gap_ms.get("first")),
        2,
    ),
    Row(
        "W3 time from a step to the next, last 5 steps (median)",
        "ms",
        _workload("W3", lambda w: w.step_gap_ms.get("last")),
        2,
    ),
    Row("W3 last steps / first steps", "", _late_over_early, 2),
    Row("W1 system's own CPU per step", "ms", _workload("W1", lambda w: w.own_cpu_ms_per_step), 2),
    Row("W1 CPU per step, every process", "ms", _workload("W1", lambda w: w.all_cpu_ms_per_step), 2),
    Row("CPU at rest, system's own", "cores", lambda s: s.rest.own_cores if s.rest else None, 3),
    Row("CPU at rest, every process", "cores", lambda s: s.rest.all_cores if s.rest else None, 3),
    Row("first 3-step run after rest", "ms", lambda s: s.rest.first_run_ms if s.rest else None),
)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def summary_table(report: Report) -> list[str]:
    """The targets, per system, and as ratios to direct."""
    systems = report.systems
    direct = report.system("direct")
    others = [s for s in systems if s.key != "direct"]
    header = ["workload", *(s.label for s in systems), *(f"{s.label} / direct" for s in reversed(others))]
    rows = []
    for row in SUMMARY:
        label = f"{row.label} ({row.unit})" if row.unit else row.label
        cells = [_num(row.value(s), row.digits) for s in systems]
        base = row.value(direct) if direct is not None else None
        cells += [ratio(row.value(s), base) for s in reversed(others)]
        rows.append([label, *cells])
    return _table(header, rows)


def workload_table(report: Report, key: str) -> list[str]:
    """One workload on every system: its figures and the CPU of every process, per step."""
    found = [(s, s.workloads[key]) for s in report.systems if key in s.workloads]
    if not found:
        return []
    first = found[0][1]
    lines = [f"### {key}: {first.title} ({first.shape})", ""]
    header = ["", *(s.label for s, _ in found)]

    def row(label: str, cell: Callable[[SystemFigures, WorkloadFigures], str]) -> list[str]:
        return [label, *(cell(s, w) for s, w in found)]

    rows = [
        row("steps/s", lambda s, w: _num(w.steps_per_s)),
        row("makespan (s)", lambda s, w: _num(w.makespan_s, 2)),
        row("run latency p50 / p99 / max (ms)", lambda s, w: " / ".join(_num(w.latency_ms.get(q)) for q in _QS)),
        row("agent calls / peak in flight", lambda s, w: f"{w.agent_calls} / {w.agent_peak_in_flight}"),
    ]
    rows += [row(f"CPU ms/step: {GROUP_LABELS[group]}", _cpu_cell(group)) for group in CPU_GROUPS]
    rows += [
        row("CPU ms/step: system's own", lambda s, w: f"**{w.own_cpu_ms_per_step:.2f}**"),
        row("CPU ms/step: every process", lambda s, w: _num(w.all_cpu_ms_per_step, 2)),
        row("checks", lambda s, w: "passed" if not w.problems else f"{len(w.problems)} FAILED"),
    ]
    return [*lines, *_table(header, rows), ""]


_QS: Final = ("p50", "p99", "max")


def _cpu_cell(group: str) -> Callable[[SystemFigures, WorkloadFigures], str]:
    def cell(system: SystemFigures, figures: WorkloadFigures) -> str:
        value = _num(figures.cpu_ms_per_step.get(group), 2)
        return f"{value} (own)" if group in system.own_groups else value

    return cell


def rest_table(report: Report) -> list[str]:
    """Every process's CPU at rest, per system."""
    rested = [s for s in report.systems if s.rest is not None]
    if not rested:
        return []
    header = ["CPU at rest (cores)", *(f"{s.label} ({s.rest.seconds:.0f} s)" for s in rested if s.rest)]
    rows = [[GROUP_LABELS[g], *(_num(s.rest.cpu_cores.get(g), 3) for s in rested if s.rest)] for g in CPU_GROUPS]
    return _table(header, rows)


def render(report: Report) -> str:
    """The whole report: summary, each workload, rest, problems."""
    options = report.options
    lines = [
        "",
        f"## Switchyard throughput bench ({'quick' if options['quick'] else 'full'} sizes)",
        "",
        f"{report.cpus} CPUs, load average {_load(report.loadavg_start)} at the start and"
        f" {_load(report.loadavg_end)} at the end;"
        f" broker, PostgreSQL and agents up in {_num(report.services_s)} s; wall time {_num(report.wall_s)} s.",
        "Own CPU: executor + bridge + broker for Switchyard; the bench's process for direct and DBOS (they run in"
        " it). Ratios are system / direct. Latency: submission to the end seen by the bench.",
        "",
        *summary_table(report),
        "",
    ]
    for key in ("W0", "W1", "W2", "W3"):
        lines += workload_table(report, key)
    lines += [*rest_table(report), ""]
    problems = [(s.label, p) for s in report.systems for p in s.all_problems()]
    if problems:
        lines += ["Checks that FAILED:", *(f"  {label}: {p}" for label, p in problems), ""]
    if report.error:
        lines += [f"FAILED: {report.error}", ""]
    verdict = "all checks passed" if report.checks_passed else "NOT all checks passed"
    lines.append(f"{verdict}; data folder {report.data_dir}")
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def run(bench: ThroughputBench, report: Report) -> None:
    """Every phase, in order; the figures go into ``report`` as they come."""
    report.services_s = bench.start_services()
    say(f"broker, PostgreSQL and the echo agents up after {report.services_s:.1f}s")
    for system in bench.systems():
        figures = SystemFigures(system.key, system.label, system.own_groups)
        report.systems.append(figures)
        bench.measure(system, figures)
    report.complete = True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; returns the exit status (0: it ran and every check passed)."""
    options = parse_args(argv)
    forget_external_services()
    data_dir = Path(tempfile.mkdtemp(prefix="switchyard-bench-throughput-"))
    report = Report(
        options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        cpus=os.cpu_count() or 0,
        data_dir=str(data_dir),
        loadavg_start=os.getloadavg(),
    )
    started = time.monotonic()
    bench = ThroughputBench(options, data_dir)
    say(f"stack in {data_dir} (logs in {data_dir / 'logs'})")
    left: list[str] = []
    report.error = run_guarded(lambda: run(bench, report), lambda: left.extend(bench.close()))
    if left:
        report.error = f"{report.error or ''} still running after the stop: {', '.join(left)}".strip()
    report.wall_s = time.monotonic() - started
    report.loadavg_end = os.getloadavg()
    report.data_dir = tidy(data_dir, success=report.checks_passed, keep=options.keep)
    publish(render(report), report.as_json(), options.json_path)
    return 0 if report.checks_passed else 1


if __name__ == "__main__":
    sys.exit(main())
