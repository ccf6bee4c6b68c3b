"""kill -9 of the executor at three points of a step's life, and its RocksDB folder deleted.

Each scenario has 20 runs in flight when the executor dies. The bridge lives
through all of them, so the agents must see exactly one call per attempt
recorded: after the restart an attempt in flight is dispatched again with the
same correlation id and the bridge answers it from memory (docs/architecture.md,
"Recovery: what heals what").
"""

from __future__ import annotations

import shutil

import pytest

from switchyard import topics
from tests.faults.conftest import RUNS, FaultStack, chain, poll, result_ids

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


def wait_calls(faults: FaultStack, run_ids: list[str], agent: str, step_id: str, timeout: float = 30.0) -> int:
    """Wait until ``agent`` has received the first attempt of ``step_id`` of every run; returns how many keys."""
    wanted = {f"{run_id}/{step_id}/1" for run_id in run_ids}

    def arrived() -> int | None:
        seen = wanted & set(faults.calls(run_ids, [agent]))
        return len(seen) if seen == wanted else None

    return poll(
        arrived,
        timeout,
        lambda: (
            f"{agent} received {len(wanted & set(faults.calls(run_ids, [agent])))} of {len(wanted)} calls"
            f"\n{faults.logs()}"
        ),
    )


def assert_one_call_per_attempt(faults: FaultStack, run_ids: list[str], label: str, attempts_per_run: int) -> None:
    figures = faults.verify_completed(run_ids, label)
    assert figures.invocations == figures.attempts, (
        f"{figures.line()}: an executor restart must not call an agent twice "
        f"(keys called more than once: {dict(list(figures.repeated_keys.items())[:10])})"
    )
    if figures.attempts != attempts_per_run * len(run_ids):
        extra = [
            f"{row.run_id} {row.step_id}/{row.attempt} {row.status} started {row.started_at} "
            f"deadline {row.deadline} ended {row.completed_at}: {row.error}"
            for row in faults.attempts(run_ids)
            if row.attempt > 1 or row.status != "COMPLETED"
        ]
        raise AssertionError(
            f"{figures.line()}: expected {attempts_per_run} attempts per run; more means an attempt was lost "
            "and healed only by its deadline. Attempts other than a completed first one:\n" + "\n".join(extra[:20])
        )


def test_kill_while_the_next_attempt_waits_in_a_timer(faults: FaultStack) -> None:
    # Every first attempt of step a fails retriably (503, one HTTP try); the
    # second is due 6 s later and, until then, exists only as a timer.
    run_ids = faults.submit_waiting_for_a_retry(6, "timer")
    faults.kill("executor")
    sent = [key for key in faults.calls(run_ids, ["flaky"]) if key.endswith("/a/2")]
    assert not sent, f"{len(sent)} delayed attempts were sent before the kill: the scenario needs a longer delay"
    faults.restart("executor")
    # a/1 failed, a/2 and b/1 completed: three attempts and three agent calls per run.
    assert_one_call_per_attempt(faults, run_ids, "executor kill -9 during a retry delay", attempts_per_run=3)


def test_kill_while_agent_calls_are_in_flight(faults: FaultStack) -> None:
    plan = chain("slow")  # the agent takes 3 s
    run_ids = faults.submit(plan, RUNS, "in flight")
    in_flight = wait_calls(faults, run_ids, "slow", "a")
    faults.kill("executor")
    print(f"executor killed with {in_flight} agent calls in flight")
    faults.restart("executor")
    assert_one_call_per_attempt(faults, run_ids, "executor kill -9 with agent calls in flight", attempts_per_run=2)


def test_kill_after_results_are_published_before_they_are_applied(faults: FaultStack) -> None:
    plan = chain("slow")
    run_ids = faults.submit(plan, RUNS, "unapplied")
    wait_calls(faults, run_ids, "slow", "a")
    faults.pause("executor")  # SIGSTOP: it applies nothing from now on
    wanted = {f"{run_id}/a/1" for run_id in run_ids}
    records = faults.read(topics.RESULTS, until=lambda records: wanted <= result_ids(records), timeout=30)
    missing = wanted - result_ids(records)
    assert not missing, f"the bridge did not publish {len(missing)} result(s) while the executor was paused"
    applied = [row for row in faults.attempts(run_ids) if row.step_id == "a" and row.status == "COMPLETED"]
    assert not applied, f"{len(applied)} results were applied although the executor was paused"
    faults.kill("executor")
    faults.restart("executor")
    assert_one_call_per_attempt(
        faults, run_ids, "executor kill -9 after results were published, before they were applied", attempts_per_run=2
    )


def test_rocksdb_folder_deleted_state_comes_back_from_the_changelog(faults: FaultStack) -> None:
    # Step a completes at once; step b is in flight on the slow agent when the
    # executor dies and loses its RocksDB folder.
    plan = chain("summarizer", "slow")
    run_ids = faults.submit(plan, RUNS, "datadir")
    wait_calls(faults, run_ids, "slow", "b")
    faults.kill("executor")
    datadir = faults.datadir("executor")
    assert datadir.is_dir(), f"no datadir at {datadir}"
    shutil.rmtree(datadir)
    faults.restart("executor")
    assert_one_call_per_attempt(faults, run_ids, "executor kill -9 and RocksDB folder deleted", attempts_per_run=2)
