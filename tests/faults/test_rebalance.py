"""Workers joining and leaving while runs are in flight: partitions move, nothing is lost or done twice.

The module has a stack of its own (the shared one keeps one worker of each).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.conftest import RUNS, AgentSpec, FaultStack, StackPlaces, chain, poll

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

AGENTS = {
    "summarizer": AgentSpec(),
    "slow": AgentSpec(flags=("--slow", "3")),
    "flaky": AgentSpec(flags=("--fail-times", str(RUNS), "--fail-scope", "global"), call_attempts=1),
}


@pytest.fixture(scope="module")
def stack(stack_places: StackPlaces) -> Iterator[FaultStack]:
    with stack_places.stack("faults-rebalance", AGENTS) as built:
        yield built


def in_flight(stack: FaultStack, bridge: str) -> int:
    health = stack.health(bridge)
    return int(health["calls_in_flight"]) if health else 0


def test_a_second_bridge_joins_and_leaves(stack: FaultStack) -> None:
    stack.ensure_serving()
    plan = chain("slow", "slow")  # two 3 s calls per run: calls in flight through both changes
    joining = stack.submit(plan, RUNS, "bridge joins")
    poll(
        lambda: len(stack.calls(joining, ["slow"])) >= RUNS // 2,
        30,
        lambda: f"calls so far: {len(stack.calls(joining, ['slow']))}",
    )
    at_join = in_flight(stack, "bridge")
    try:
        stack.start_worker("bridge-2")
        stack.wait_ready(each=True)
        print(f"bridge-2 joined with {at_join} calls in flight on bridge; tasks partitions {stack.bridge_partitions()}")
        leaving = stack.submit(plan, RUNS, "bridge leaves")
        at_leave = poll(
            lambda: in_flight(stack, "bridge-2") or None,
            30,
            lambda: f"bridge-2 never had a call in flight: {stack.health('bridge-2')}",
        )
        stack.process("bridge-2").stop()  # SIGTERM
        print(f"bridge-2 stopped (SIGTERM) with {at_leave} calls in flight")
        stack.wait_ready()
        run_ids = joining + leaving
        figures = stack.verify_completed(run_ids, "a bridge joins and leaves")
    finally:
        if stack.process("bridge-2").alive():
            stack.process("bridge-2").stop()
    print(f"extra agent invocations: {figures.extra} (calls in flight at the join {at_join}, at the leave {at_leave})")
    assert not figures.unknown_keys, f"calls that match no recorded attempt: {sorted(figures.unknown_keys)[:5]}"
    assert figures.attempts == 2 * len(run_ids), (
        f"{figures.line()}: expected 2 attempts per run; more means a task was lost in a rebalance "
        "and healed only by its deadline"
    )
    assert figures.extra <= at_join + at_leave, figures.line()


def test_a_second_executor_joins_and_the_first_leaves(stack: FaultStack) -> None:
    stack.ensure_serving()
    # Every first attempt of step a fails; the second is due 30 s later and
    # lives only in the first executor's timers until the partitions move.
    run_ids = stack.submit_waiting_for_a_retry(30, "executor rebalance")
    try:
        stack.start_worker("executor-2")
        stack.wait_ready(each=True)
        print(f"executor-2 joined: run partitions {stack.owned_partitions()}")
        stack.process("executor").stop()  # SIGTERM: its timers go with it
        stack.wait_ready()
        print(f"executor stopped (SIGTERM): run partitions {stack.owned_partitions()}")
        sent = [key for key in stack.calls(run_ids, ["flaky"]) if key.endswith("/a/2")]
        assert len(sent) < RUNS, "every delayed attempt went out before the first executor left: delay too short"
        figures = stack.verify_completed(run_ids, "an executor joins, the first one leaves", timeout=90)
    finally:
        if stack.process("executor-2").alive():
            stack.process("executor-2").stop()
    assert figures.invocations == figures.attempts, (
        f"{figures.line()}: a rebalance must not call an agent twice "
        f"(keys called more than once: {dict(list(figures.repeated_keys.items())[:10])})"
    )
    assert figures.attempts == 3 * RUNS, (
        f"{figures.line()}: expected 3 attempts per run; more means a delayed attempt was lost in the "
        "rebalance and healed only by its deadline"
    )
