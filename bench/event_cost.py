"""What one event costs the executor by where it falls in a run: CPU and bytes written, early and late.

The executor's shell (read, transition, store) is run in-process on a plain
dict for its table, with no broker and no database, on a 50-step chain and
on a map of 1,000 items. For each event it records the CPU time of
``RunShell.apply`` and the bytes it wrote to the table, and prints the medians
over the first and the last events, next to the size of the whole state (what
a one-record layout would write at every event).

    python -m bench.event_cost [--steps 50] [--items 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from models.messages import AgentResult, ResultStatus
from models.plan import WorkflowPlan, load_plan
from models.run import AgentResultReceived, DispatchTask, Effect, RunState, RunSubmitted
from streams.shell import RunShell
from streams.timers import TimerKey

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class _Table(dict[bytes, bytes]):
    """The table, counting the bytes written to it."""

    written = 0

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.written += len(key) + len(value)
        super().__setitem__(key, value)


class _Nowhere:
    async def send(self, *, key: bytes, value: bytes) -> None:
        pass

    def put(self, state: RunState, changed: frozenset[str] | None = None) -> None:
        pass

    def call_at(self, when: datetime, key: TimerKey, action: Callable[[], Any]) -> None:
        pass

    def cancel(self, key: TimerKey) -> None:
        pass

    def cancel_where(self, matches: Callable[[TimerKey], bool]) -> int:
        return 0

    def exists(self, run_id: str) -> str | None:
        return None

    def get_state(self, run_id: str) -> RunState | None:
        return None

    def record_rejected(self, run_id: str, *, kind: str, message: str, plan: Any = None) -> bool:
        return False

    def fingerprint(self, run_id: str) -> str | None:
        return None

    def versions(self, run_ids: Iterable[str]) -> dict[str, int]:
        return {}


def chain(steps: int) -> WorkflowPlan:
    """A chain of ``steps`` echo steps, each reading the one before."""
    spec: dict[str, Any] = {}
    for k in range(1, steps + 1):
        text = "${workflow.input.text}" if k == 1 else f"${{s{k - 1}.output.text}}"
        spec[f"s{k}"] = {
            "id": f"s{k}",
            "agent_name": "echo",
            "input_mapping": {"text": text},
            "next_step": f"s{k + 1}" if k < steps else None,
        }
    return load_plan({"workflow_id": "cost", "name": "chain", "version": "1", "start_step": "s1", "steps": spec})


def mapping() -> WorkflowPlan:
    """One map step over the run input's ``items``, 50 at a time."""
    step = {
        "id": "each",
        "agent_name": "echo",
        "map": {"over": "${workflow.input.items}", "max_concurrency": 50},
        "input_mapping": {"text": "${map.item}"},
    }
    return load_plan(
        {"workflow_id": "cost", "name": "map", "version": "1", "start_step": "each", "steps": {"each": step}}
    )


def _answers(effects: list[Effect], at: datetime) -> Iterator[AgentResultReceived]:
    for effect in effects:
        if isinstance(effect, DispatchTask):
            task = effect.task
            yield AgentResultReceived(
                result=AgentResult(
                    correlation_id=task.correlation_id,
                    run_id=task.run_id,
                    step_id=task.step_id,
                    attempt=task.attempt,
                    iteration=task.iteration,
                    item=task.item,
                    status=ResultStatus.SUCCESS,
                    output=task.input,
                    started_at=at,
                    finished_at=at,
                ),
                at=at,
            )


def measure(plan: WorkflowPlan, run_input: dict[str, Any]) -> list[tuple[float, int, int]]:
    """Drive one run to its end; per result event: (CPU µs of apply, bytes written, whole state's bytes)."""
    nowhere = _Nowhere()
    table = _Table()
    shell = RunShell(
        runs=table,
        tasks=nowhere,
        cancels=nowhere,
        control=nowhere,
        monitoring=nowhere,
        deadletter=nowhere,
        checkpoints=nowhere,
        timers=nowhere,
        records=nowhere,
    )
    pending = list(_answers(shell.apply(RunSubmitted(run_id="cost", plan=plan, input=run_input, at=T0)), T0))
    figures = []
    n = 0
    while pending:
        event = pending.pop(0)
        n += 1
        event = event.model_copy(update={"at": T0 + timedelta(milliseconds=n)})
        before, started = table.written, time.process_time_ns()
        effects = shell.apply(event)
        took = (time.process_time_ns() - started) / 1000
        state = shell.load("cost")
        assert state is not None
        figures.append((took, table.written - before, len(state.model_dump_json())))
        pending.extend(_answers(effects, event.at))
    final = shell.load("cost")
    if final is None or final.status != "COMPLETED":
        raise RuntimeError(f"the run did not complete: {final}")
    return figures


def _report(name: str, runs: list[list[tuple[float, int, int]]], span: int) -> None:
    def median(index: int, part: slice) -> float:
        return statistics.median(value for figures in runs for value in (f[index] for f in figures[part]))

    first, last = slice(0, span), slice(-span, None)
    cpu_first, cpu_last = median(0, first), median(0, last)
    print(f"{name}: {len(runs[0])} result events, medians over the first and the last {span}, {len(runs)} run(s)")
    print(f"  CPU of apply           {cpu_first:8.0f} µs   {cpu_last:8.0f} µs   ({cpu_last / cpu_first:.2f}x)")
    print(f"  bytes written          {median(1, first):8.0f}      {median(1, last):8.0f}")
    print(
        f"  the whole state        {median(2, first):8.0f}      {median(2, last):8.0f}   (one record would write this)"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    _report(
        f"chain of {args.steps} steps",
        [measure(chain(args.steps), {"text": "hello"}) for _ in range(args.repeat)],
        5,
    )
    _report(
        f"map of {args.items} items",
        [measure(mapping(), {"items": [f"item {i}" for i in range(args.items)]}) for _ in range(args.repeat)],
        50,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
