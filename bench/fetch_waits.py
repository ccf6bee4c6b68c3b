"""The embedded broker's fetch waits against latency and CPU: the curve behind their defaults.

``python -m bench.fetch_waits [--busy 2,5,10,20] [--idle 100,250,500,1000] [--json FILE]``

Tansu holds every fetch for its whole wait (docs/architecture.md, "The embedded stack"),
so each hop of a run waits for a fetch: a short wait while records flow
(``SWITCHYARD_EMBEDDED_FETCH_WAIT_MS``) buys latency with CPU, and the wait
once a consumer is idle (``SWITCHYARD_EMBEDDED_IDLE_FETCH_WAIT_MS``) buys CPU
at rest with the latency of the first run after a rest. For each busy wait
(with the default idle wait), then each idle wait (with the default busy
wait), this runs :mod:`bench.throughput` with small sizes in a process of its
own, with only that setting changed, and prints W0's run p50, W1's steps/s
and the system's own CPU per step, the stack's CPU at rest and the first run
after a rest, each next to the direct baseline of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from switchyard.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SIZES = ["--w0-runs", "50", "--w1-runs", "300", "--w2-runs", "50", "--w3-runs", "20", "--rest", "10"]


@dataclass(frozen=True)
class Point:
    """One invocation's figures, for one pair of waits."""

    busy_ms: int
    idle_ms: int
    w0_p50_ms: float
    direct_w0_p50_ms: float
    w1_steps_per_s: float
    direct_w1_steps_per_s: float
    w1_own_cpu_ms_per_step: float
    rest_cores: float
    first_run_after_rest_ms: float


def point_of(busy_ms: int, idle_ms: int, figures: dict[str, Any]) -> Point:
    """The figures of one :mod:`bench.throughput` JSON report that the curve shows."""
    systems = {system["key"]: system for system in figures["systems"]}
    ours, direct = systems["switchyard"], systems["direct"]
    return Point(
        busy_ms=busy_ms,
        idle_ms=idle_ms,
        w0_p50_ms=ours["workloads"]["W0"]["latency_ms"]["p50"],
        direct_w0_p50_ms=direct["workloads"]["W0"]["latency_ms"]["p50"],
        w1_steps_per_s=ours["workloads"]["W1"]["steps_per_s"],
        direct_w1_steps_per_s=direct["workloads"]["W1"]["steps_per_s"],
        w1_own_cpu_ms_per_step=ours["workloads"]["W1"]["own_cpu_ms_per_step"],
        rest_cores=ours["rest"]["own_cores"],
        first_run_after_rest_ms=ours["rest"]["first_run_ms"],
    )


def measure(busy_ms: int, idle_ms: int) -> Point:
    """Run the throughput bench once with these waits; raises when it fails."""
    with tempfile.TemporaryDirectory(prefix="switchyard-fetch-waits-") as folder:
        out = Path(folder) / "figures.json"
        env = {
            **os.environ,
            "SWITCHYARD_EMBEDDED_FETCH_WAIT_MS": str(busy_ms),
            "SWITCHYARD_EMBEDDED_IDLE_FETCH_WAIT_MS": str(idle_ms),
        }
        command = [sys.executable, "-m", "bench.throughput", *SIZES, "--json", str(out)]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"bench.throughput failed with waits {busy_ms}/{idle_ms} ms:\n{done.stdout[-3000:]}")
        return point_of(busy_ms, idle_ms, json.loads(out.read_text()))


def render(points: Sequence[Point]) -> str:
    """The curve as a Markdown table."""
    lines = [
        "| busy wait (ms) | idle wait (ms) | W0 p50 (ms) | / direct | W1 steps/s | / direct "
        "| W1 own CPU (ms/step) | CPU at rest (cores) | first run after rest (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p.busy_ms} | {p.idle_ms} | {p.w0_p50_ms:.1f} | {p.w0_p50_ms / p.direct_w0_p50_ms:.2f}x "
            f"| {p.w1_steps_per_s:.1f} | {p.w1_steps_per_s / p.direct_w1_steps_per_s:.2f}x "
            f"| {p.w1_own_cpu_ms_per_step:.2f} | {p.rest_cores:.3f} | {p.first_run_after_rest_ms:.0f} |"
        )
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the curve and print it."""
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m bench.fetch_waits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=_ints, default=[2, 5, 10, 20], help="busy waits to try, ms")
    parser.add_argument("--idle", type=_ints, default=[100, 250, 500, 1000], help="idle waits to try, ms")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the points as JSON")
    args = parser.parse_args(argv)
    pairs = [(busy, defaults.embedded_idle_fetch_wait_ms) for busy in args.busy]
    pairs += [(defaults.embedded_fetch_wait_ms, idle) for idle in args.idle if idle != pairs[0][1]]
    points = []
    for busy, idle in dict.fromkeys(pairs):
        print(f"busy {busy} ms, idle {idle} ms ...", flush=True)
        points.append(measure(busy, idle))
    print(render(points))
    if args.json is not None:
        args.json.write_text(json.dumps([p.__dict__ for p in points], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
