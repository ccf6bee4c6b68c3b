"""The throughput bench's workloads, as pure values: the chain every system runs, what its output must be, the checks.

A run of ``n`` steps is a chain ``s1 -> s2 -> ... -> sn`` on an echo agent.
The run's input is ``{"text": <run id>}``; step ``k`` is sent the text its
predecessor returned (the run's input for ``s1``) with ``|k`` appended, so
the echo agent's answer to step ``k`` is ``<run id>|1|2|...|k`` and the run's
output is that of its last step. A step skipped, repeated, run out of order
or given another run's data shows in the text; :func:`check_runs` compares
every system's records with it.

No I/O here: the systems (:mod:`bench.systems`, :mod:`bench.throughput`)
read their records and hand them to the checks.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from models.plan import WorkflowPlan, load_plan

__all__ = [
    "ECHO",
    "ECHO_SLOW",
    "RunRow",
    "StepRow",
    "Workload",
    "chain_plan",
    "check_runs",
    "expected_output",
    "ms_per_step",
    "step_gap_figures",
    "percentile",
    "ratio",
    "step_id",
    "step_input",
]

ECHO: Final = "echo"
ECHO_SLOW: Final = "echo-slow"
"""The registry names of the two echo agents: at once, and after the W2 delay."""

_MAX_EXAMPLES: Final = 3
"""How many run ids a problem names (the count says how many there are)."""


@dataclass(frozen=True)
class Workload:
    """One workload: how many runs of how many steps, how many in flight, on which agent.

    Attributes:
        key: ``W0`` ... ``W3``.
        title: What it measures, for the report.
        runs: Runs measured.
        steps: Steps per run.
        in_flight: Runs in flight at once; a new one starts as one finishes
            (``runs`` means all submitted at once, 1 means one at a time).
        agent: The agent's registry name (:data:`ECHO` or :data:`ECHO_SLOW`).
    """

    key: str
    title: str
    runs: int
    steps: int
    in_flight: int
    agent: str = ECHO

    @property
    def total_steps(self) -> int:
        """Steps of all its runs."""
        return self.runs * self.steps

    def warm_up(self, runs: int) -> Workload:
        """The same shape with ``runs`` runs (as many in flight as the shape allows), for a warm-up."""
        return Workload(
            key=self.key,
            title=f"warm-up of {self.key}",
            runs=runs,
            steps=self.steps,
            in_flight=max(1, min(self.in_flight, runs)),
            agent=self.agent,
        )

    def describe(self) -> str:
        """E.g. ``1000 runs x 3 steps, 64 in flight``."""
        if self.in_flight >= self.runs and self.runs > 1:
            pattern = "all at once"
        elif self.in_flight == 1:
            pattern = "one at a time"
        else:
            pattern = f"{self.in_flight} in flight"
        return f"{self.runs} runs x {self.steps} step{'s' if self.steps != 1 else ''}, {pattern}, on {self.agent}"


# ------------------------------------------------------------------ the chain


def step_id(k: int) -> str:
    """The id of the ``k``-th step (from 1)."""
    return f"s{k}"


def step_input(previous_text: str, k: int) -> dict[str, Any]:
    """What step ``k`` is sent, given the text the step before it returned (the run id for the first)."""
    return {"text": f"{previous_text}|{k}"}


def expected_output(run_id: str, k: int) -> dict[str, Any]:
    """What the echo agent answers to step ``k`` of run ``run_id``; for the last step, the run's output."""
    return {"text": run_id + "".join(f"|{n}" for n in range(1, k + 1))}


def chain_plan(workflow_id: str, steps: int, agent: str) -> WorkflowPlan:
    """The Switchyard plan of the chain: each step maps its predecessor's output, as :func:`step_input` does."""
    spec: dict[str, Any] = {}
    for k in range(1, steps + 1):
        source = "${workflow.input.text}" if k == 1 else f"${{{step_id(k - 1)}.output.text}}"
        spec[step_id(k)] = {
            "id": step_id(k),
            "agent_name": agent,
            "input_mapping": {"text": f"{source}|{k}"},
            "next_step": step_id(k + 1) if k < steps else None,
        }
    return load_plan(
        {
            "workflow_id": workflow_id,
            "name": f"{steps}-step echo chain",
            "version": "1",
            "start_step": step_id(1),
            "steps": spec,
        }
    )


# ------------------------------------------------------------------ checks


@dataclass(frozen=True)
class RunRow:
    """A run as a system recorded it."""

    run_id: str
    status: str
    output: Any


@dataclass(frozen=True)
class StepRow:
    """One execution of one step as a system recorded it (every attempt is a row)."""

    run_id: str
    step_id: str
    status: str
    output: Any


def _some(run_ids: Iterable[str]) -> str:
    ids = sorted(run_ids)
    shown = ", ".join(ids[:_MAX_EXAMPLES])
    return shown + (f" and {len(ids) - _MAX_EXAMPLES} more" if len(ids) > _MAX_EXAMPLES else "")


def _problem(what: str, run_ids: set[str]) -> list[str]:
    return [f"{len(run_ids)} run(s) {what}: {_some(run_ids)}"] if run_ids else []


def check_runs(
    run_ids: Sequence[str],
    steps: int,
    runs: Iterable[RunRow],
    step_rows: Iterable[StepRow],
    *,
    completed: str = "COMPLETED",
    step_done: str = "COMPLETED",
) -> list[str]:
    """What is wrong with the records of ``run_ids``, runs of the chain of ``steps`` steps (empty: all right).

    Every run is recorded once, has the status ``completed`` and the
    expected output; it has exactly ``steps`` step rows (no retry, no
    duplicate), each step exactly once with the status ``step_done`` and the
    echo of the expected text. Rows of runs not asked about are ignored.

    Args:
        run_ids: The runs the bench started.
        steps: Steps per run.
        runs: The system's run records (those it has, whatever they are).
        step_rows: The system's step records of these runs.
        completed: The system's word for a run that succeeded.
        step_done: The system's word for a step that succeeded.
    """
    wanted = set(run_ids)
    by_run: dict[str, list[RunRow]] = {}
    for row in runs:
        if row.run_id in wanted:
            by_run.setdefault(row.run_id, []).append(row)
    problems = _problem("not recorded", wanted - by_run.keys())
    problems += _problem("recorded more than once", {r for r, rows in by_run.items() if len(rows) > 1})
    firsts = {r: rows[0] for r, rows in by_run.items()}
    not_done = {r for r, row in firsts.items() if row.status != completed}
    problems += _problem(f"not {completed}", not_done)
    wrong = {r for r, row in firsts.items() if r not in not_done and row.output != expected_output(r, steps)}
    problems += _problem("with a wrong output", wrong)
    problems += _check_steps(wanted, steps, step_rows, step_done)
    return problems


def _check_steps(wanted: set[str], steps: int, step_rows: Iterable[StepRow], step_done: str) -> list[str]:
    rows = [row for row in step_rows if row.run_id in wanted]
    per_run = Counter(row.run_id for row in rows)
    done = Counter((row.run_id, row.step_id) for row in rows if row.status == step_done)
    names = {step_id(k): k for k in range(1, steps + 1)}
    problems = []
    if len(rows) != len(wanted) * steps:
        problems.append(f"{len(rows)} step rows for {len(wanted)} runs of {steps} steps, not {len(wanted) * steps}")
    problems += _problem(f"without exactly {steps} step rows", {r for r in wanted if per_run[r] != steps})
    missing = {r for r in wanted for s in names if done[(r, s)] != 1}
    problems += _problem("without exactly one successful execution of every step", missing)
    foreign = {row.run_id for row in rows if row.step_id not in names}
    problems += _problem("with a step that is not in the chain", foreign)
    wrong = {
        row.run_id
        for row in rows
        if row.status == step_done and row.step_id in names
        if row.output != expected_output(row.run_id, names[row.step_id])
    }
    problems += _problem("with a step whose output is wrong", wrong)
    return problems


# ------------------------------------------------------------------ figures


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, interpolated between the closest ranks; None when empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"a percentile is from 0 to 100, not {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(value: float | None, base: float | None, *, least: float = 1e-9) -> str:
    """``value / base`` for a table cell, e.g. ``2.5x``; ``-`` when either is missing or ``base`` is about 0."""
    if value is None or base is None or abs(base) < least:
        return "-"
    share = value / base
    return f"{share:.3g}x" if abs(share) < 100 else f"{share:.0f}x"


def step_gap_figures(
    started: Mapping[str, Mapping[str, datetime]], steps: int, span: int = 5
) -> dict[str, float | None]:
    """The median time from step k's start to step k+1's (ms), over the first and the last ``span`` gaps of each run.

    Args:
        started: For each run, when each step (``s1``, ``s2``, ...) started.
        steps: Steps per run.
        span: How many gaps at each end.
    """
    first: list[float] = []
    last: list[float] = []
    for times in started.values():
        at = [times.get(step_id(k)) for k in range(1, steps + 1)]
        if any(t is None for t in at):
            continue
        gaps = [(b - a).total_seconds() * 1000 for a, b in itertools.pairwise(at) if a and b]
        first.extend(gaps[:span])
        last.extend(gaps[-span:])
    return {"first": percentile(first, 50), "last": percentile(last, 50)}


def ms_per_step(seconds: Mapping[str, float], steps: int) -> dict[str, float]:
    """CPU seconds by process group as milliseconds per step."""
    return {group: cpu * 1000 / steps for group, cpu in seconds.items()} if steps else {}
