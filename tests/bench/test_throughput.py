"""The throughput bench: its options, its driver and its report; and the whole bench with --quick (the slow one)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import throughput
from bench.harness import BenchError
from bench.systems import RunFailed, System
from bench.throughput import (
    SUMMARY,
    Report,
    RestFigures,
    SystemFigures,
    WorkloadFigures,
    drive,
    latency_figures,
    parse_args,
    render,
)
from bench.workload import Workload

ROOT = Path(__file__).resolve().parents[2]


# --- options -----------------------------------------------------------------------------------------------------


def test_default_sizes_are_the_issue_s() -> None:
    options = parse_args([])
    assert [(w.key, w.runs, w.steps, w.in_flight, w.agent) for w in options.workloads()] == [
        ("W0", 50, 3, 1, "echo"),
        ("W1", 1000, 3, 64, "echo"),
        ("W2", 500, 1, 500, "echo-slow"),
        ("W3", 200, 50, 64, "echo"),
    ]
    assert (options.warm_up, options.rest_s, options.w2_delay_s, options.with_dbos) == (10, 10.0, 1.0, False)


def test_quick_sizes_and_overrides() -> None:
    quick = parse_args(["--quick"])
    assert [w.runs for w in quick.workloads()] == [10, 100, 50, 20]
    assert (quick.warm_up, quick.rest_s) == (5, 5.0)
    given = parse_args(["--quick", "--w1-runs", "300", "--rest", "0", "--w3-steps", "5", "--json", "out.json"])
    assert [w.runs for w in given.workloads()] == [10, 300, 50, 20]
    assert given.workloads()[3].steps == 5
    assert (given.rest_s, given.json_path) == (0.0, Path("out.json"))


def test_bad_sizes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--w1-runs", "0"])
    assert exit_info.value.code == 2
    assert "at least 1" in capsys.readouterr().err


def test_with_dbos_without_dbos_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(throughput, "dbos_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--with-dbos"])
    assert exit_info.value.code == 2
    assert "pip install -e '.[bench]'" in capsys.readouterr().err


# --- the driver --------------------------------------------------------------------------------------------------


class FakeSystem(System):
    """Runs that take a moment, count how many are in flight, and fail or hang when told."""

    key = "fake"
    label = "fake"

    def __init__(self, *, fail: set[str] | None = None, hang: bool = False) -> None:
        super().__init__(stack=None, agents={})  # type: ignore[arg-type]
        self.fail = fail or set()
        self.hang = hang
        self.in_flight = self.peak = 0
        self.order: list[str] = []

    async def run(self, run_id: str, workload: Workload) -> float:
        self.order.append(run_id)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(3600 if self.hang else 0.01)
        finally:
            self.in_flight -= 1
        if run_id in self.fail:
            raise RunFailed(f"{run_id} ended FAILED")
        return 0.01

    def trouble(self) -> str | None:
        return None

    def diagnostics(self) -> str:
        return "(the fake's logs)"


async def test_drive_keeps_the_number_in_flight_and_records_every_run() -> None:
    system = FakeSystem(fail={"r3"})
    ids = [f"r{i}" for i in range(20)]
    driven = await drive(system, Workload("W1", "t", 20, 3, 4), ids, stall_s=10)
    assert system.peak == 4
    assert system.order == ids  # each slot takes the next run as its own ends
    assert sorted(driven.latencies_s) == sorted(set(ids) - {"r3"})
    assert driven.failures == {"r3": "r3 ended FAILED"}
    assert driven.makespan_s > 0


async def test_drive_all_at_once_and_one_at_a_time() -> None:
    everything = FakeSystem()
    await drive(everything, Workload("W2", "t", 30, 1, 30), [f"r{i}" for i in range(30)], stall_s=10)
    assert everything.peak == 30
    single = FakeSystem()
    await drive(single, Workload("W0", "t", 5, 3, 1), [f"r{i}" for i in range(5)], stall_s=10)
    assert single.peak == 1


async def test_drive_gives_up_a_workload_without_progress() -> None:
    system = FakeSystem(hang=True)
    started = time.monotonic()
    with pytest.raises(BenchError, match=r"fake W1: 0/3 runs ended, none for 1\.5s\n\(the fake's logs\)"):
        await drive(system, Workload("W1", "t", 3, 3, 2), ["a", "b", "c"], stall_s=1.5)
    assert time.monotonic() - started < 5
    assert system.in_flight == 0  # the runs in flight were cancelled


async def test_drive_stops_when_a_process_dies() -> None:
    system = FakeSystem(hang=True)
    system.trouble = lambda: "bridge exited with code 1\n(its log)"  # type: ignore[method-assign]
    with pytest.raises(BenchError, match="fake W1: bridge exited with code 1"):
        await drive(system, Workload("W1", "t", 3, 3, 2), ["a", "b", "c"], stall_s=60)


def test_latency_figures_in_milliseconds() -> None:
    figures = latency_figures([0.010, 0.020, 0.030])
    assert figures == {"p50": 20.0, "p99": pytest.approx(29.8), "mean": pytest.approx(20.0), "max": 30.0}
    assert latency_figures([]) == {"p50": None, "p99": None, "mean": None, "max": None}


# --- the report --------------------------------------------------------------------------------------------------


def figures(key: str, label: str, own: tuple[str, ...], scale: float) -> SystemFigures:
    system = SystemFigures(key, label, own, rest=RestFigures(10.0, {"bench": 0.001 * scale}, 0.001 * scale, 0.01, 20.0))
    for name, steps_per_s in (("W0", 100.0), ("W1", 400.0), ("W2", 50.0), ("W3", 300.0)):
        system.workloads[name] = WorkloadFigures(
            name,
            "t",
            "shape",
            10,
            3,
            makespan_s=2.0 * scale,
            steps_per_s=steps_per_s / scale,
            latency_ms={"p50": 10.0 * scale, "p99": 20.0 * scale, "mean": 12.0, "max": 30.0},
            agent_calls=30,
            agent_peak_in_flight=64,
            cpu_ms_per_step={"bench": 1.0 * scale},
            own_cpu_ms_per_step=1.0 * scale,
            all_cpu_ms_per_step=2.0 * scale,
        )
    return system


def report(*systems: SystemFigures, problems: list[str] | None = None) -> Report:
    made = Report(options={"quick": True}, cpus=2, data_dir="/tmp/x", loadavg_start=(1.0, 0.5, 0.25))
    made.systems = list(systems)
    made.complete = True
    if problems:
        made.systems[-1].workloads["W1"].problems = problems
    return made


def test_the_summary_gives_each_target_and_its_ratio_to_direct() -> None:
    made = report(figures("direct", "direct", ("bench",), 1.0), figures("switchyard", "Switchyard", ("executor",), 2.0))
    text = render(made)
    assert "| workload | direct | Switchyard | Switchyard / direct |" in text
    assert "| W1 steps/s (steps/s) | 400.0 | 200.0 | 0.5x |" in text
    assert "| W2 makespan (s) | 2.00 | 4.00 | 2x |" in text
    assert "| W3 steps/s / W1 steps/s | 0.75 | 0.75 | 1x |" in text
    assert "| CPU at rest, system's own (cores) | 0.001 | 0.002 | 2x |" in text
    assert "### W1: t (shape)" in text
    assert "| CPU ms/step: bench process (driver) | 1.00 (own) | 2.00 |" in text
    assert text.rstrip().endswith("all checks passed; data folder /tmp/x")
    assert made.checks_passed


def test_the_json_has_the_summary_and_the_verdict() -> None:
    made = report(figures("direct", "direct", ("bench",), 1.0), figures("dbos", "DBOS 3.4", ("bench",), 3.0))
    data = json.loads(json.dumps(made.as_json()))
    assert data["checks_passed"] is True
    assert [row["row"] for row in data["summary"]] == [row.label for row in SUMMARY]
    w1 = next(row for row in data["summary"] if row["row"] == "W1 steps/s")
    assert (w1["direct"], w1["dbos"]) == (400.0, pytest.approx(133.33, abs=0.01))


def test_a_failed_check_fails_the_report() -> None:
    made = report(figures("direct", "direct", ("bench",), 1.0), problems=["1 run(s) with a wrong output: r1"])
    assert not made.checks_passed
    text = render(made)
    assert "  direct: W1: 1 run(s) with a wrong output: r1" in text
    assert "NOT all checks passed" in text


# --- the whole bench ---------------------------------------------------------------------------------------------


def _positive(data: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert data[key] is not None, key
        assert data[key] > 0, key


@pytest.mark.bench
@pytest.mark.timeout(300)
def test_the_quick_bench_runs_and_every_check_passes(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "| workload | direct | Switchyard | Switchyard / direct |" in done.stdout
    data = json.loads(out.read_text())
    assert data["checks_passed"] is True
    assert data["error"] is None
    systems = {s["key"]: s for s in data["systems"]}
    assert set(systems) == {"direct", "switchyard"}
    for system in systems.values():
        assert system["problems"] == []
        assert system["runs_recorded"] == system["runs_started"] > 0
        assert system["steps_recorded"] == system["steps_started"] > 0
        _positive(system["rest"], "seconds", "first_run_ms")
        assert set(system["workloads"]) == {"W0", "W1", "W2", "W3"}
        for workload in system["workloads"].values():
            assert workload["problems"] == []
            _positive(workload, "steps_per_s", "makespan_s", "all_cpu_ms_per_step", "agent_calls")
            _positive(workload["latency_ms"], "p50", "p99")
            assert workload["agent_calls"] == workload["runs"] * workload["steps"]
    assert systems["switchyard"]["workloads"]["W1"]["own_cpu_ms_per_step"] > 0
    assert systems["switchyard"]["workloads"]["W2"]["agent_peak_in_flight"] >= 1
