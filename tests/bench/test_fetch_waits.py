"""The fetch-wait curve: what it reads from a throughput report, and how it prints it."""

from __future__ import annotations

from typing import Any

from bench.fetch_waits import point_of, render


def _system(key: str, p50: float, steps_per_s: float, own: float, rest: float, first: float) -> dict[str, Any]:
    return {
        "key": key,
        "workloads": {
            "W0": {"latency_ms": {"p50": p50}},
            "W1": {"steps_per_s": steps_per_s, "own_cpu_ms_per_step": own},
        },
        "rest": {"own_cores": rest, "first_run_ms": first},
    }


def test_a_point_takes_switchyards_figures_and_the_direct_baseline_of_the_same_run() -> None:
    report = {
        "systems": [
            _system("direct", 16.0, 200.0, 0.8, 0.001, 30.0),
            _system("switchyard", 40.0, 150.0, 6.0, 0.02, 300.0),
        ]
    }
    point = point_of(5, 500, report)
    assert (point.w0_p50_ms, point.direct_w0_p50_ms) == (40.0, 16.0)
    assert (point.w1_steps_per_s, point.direct_w1_steps_per_s) == (150.0, 200.0)
    assert (point.rest_cores, point.first_run_after_rest_ms) == (0.02, 300.0)
    table = render([point])
    assert "| 5 | 500 | 40.0 | 2.50x | 150.0 | 0.75x | 6.00 | 0.020 | 300 |" in table
