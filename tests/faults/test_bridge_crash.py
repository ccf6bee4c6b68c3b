"""kill -9 of the bridge while agent calls are in flight.

The bridge's memory of calls dies with it, so the calls in flight are made
again when the tasks are delivered to the new bridge: at-least-once, with the
same idempotency key (docs/architecture.md, "Recovery: what heals what"). Nothing else
may be called twice, and the executor takes one result per attempt.
"""

from __future__ import annotations

import pytest

from tests.faults.conftest import RUNS, FaultStack, chain, poll

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


def test_bridge_killed_with_calls_in_flight(faults: FaultStack) -> None:
    plan = chain("slow")  # the agent takes 3 s
    run_ids = faults.submit(plan, RUNS, "bridge crash")
    wanted = {f"{run_id}/a/1" for run_id in run_ids}
    poll(
        lambda: wanted <= set(faults.calls(run_ids, ["slow"])),
        30,
        lambda: f"the slow agent has {len(wanted & set(faults.calls(run_ids, ['slow'])))} of {len(wanted)} calls",
    )
    health = faults.health("bridge") or {}
    in_flight = sum(faults.calls(run_ids).values())  # every call so far is still running: none has taken 3 s
    faults.kill("bridge")
    print(
        f"bridge killed with {in_flight} agent calls in flight "
        f"(the bridge's /health/ said {health.get('calls_in_flight')})"
    )
    faults.restart("bridge")
    figures = faults.verify_completed(run_ids, "bridge kill -9 with agent calls in flight")
    print(f"extra agent invocations: {figures.extra} (bound: {in_flight} calls in flight at the kill)")
    assert not figures.unknown_keys, f"calls that match no recorded attempt: {sorted(figures.unknown_keys)[:5]}"
    assert 0 <= figures.extra <= in_flight, (
        f"{figures.line()}: extra invocations must be calls that were in flight at the kill ({in_flight})"
    )
    assert figures.attempts == 2 * RUNS, (
        f"{figures.line()}: expected 2 attempts per run; more means a task in flight at the kill was lost "
        "and healed only by its deadline"
    )
