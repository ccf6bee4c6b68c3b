"""The embedded broker restarts with every topic lost (its storage is in memory).

The workers come back with RocksDB folders from the old broker: they must not
crash-loop on them, and the runs PostgreSQL shows RUNNING are rebuilt from
their checkpoints and finish; steps the checkpoints show COMPLETED are not run
again (docs/architecture.md, "Recovery: what heals what").
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.faults.conftest import RUNS, AgentSpec, FaultStack, chain, poll

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


def test_broker_restart_with_all_topics_lost(make_stack: Callable[..., FaultStack]) -> None:
    # 6 s: long enough that PostgreSQL shows step b RUNNING on a loaded machine before it ends.
    stack = make_stack({"summarizer": AgentSpec(), "slow": AgentSpec(flags=("--slow", "6"))})
    # Step a completes at once; step b is in flight on the slow agent when everything goes.
    plan = chain("summarizer", "slow")
    run_ids = stack.submit(plan, RUNS, "broker restart")
    wanted = {f"{run_id}/b/1" for run_id in run_ids}
    poll(
        lambda: wanted <= set(stack.calls(run_ids, ["slow"])),
        30,
        lambda: f"the slow agent has {len(wanted & set(stack.calls(run_ids, ['slow'])))} of {RUNS} calls",
    )
    stack.wait_attempts(
        run_ids,
        lambda rows: (
            any(r.step_id == "a" and r.status == "COMPLETED" for r in rows)
            and any(r.step_id == "b" and r.status == "RUNNING" for r in rows)
        ),
        "PostgreSQL shows step a COMPLETED and step b RUNNING",
    )
    running = [run_id for run_id, status in stack.statuses(run_ids).items() if status == "RUNNING"]
    assert len(running) == RUNS
    first_steps = stack.calls(run_ids, ["summarizer"])
    assert first_steps == {f"{run_id}/a/1": 1 for run_id in run_ids}

    stack.kill("executor")
    stack.kill("bridge")
    assert stack.stack.broker is not None
    stack.stack.broker.stop()  # in-memory storage: every topic, offset and changelog is gone
    stack.stack.broker = None
    stack.stack.start_services()  # a new broker on the same port
    stack.start_worker("executor")
    stack.start_worker("bridge")
    stack.wait_ready(timeout=120)
    discarded = stack.log_lines("executor", "from an earlier broker")
    print(f"after the broker restart the executor discarded {len(discarded)} stale RocksDB partition(s)")

    figures = stack.verify_completed(running, "broker restart, every topic lost", timeout=90)
    assert stack.process("executor").alive(), "the executor stopped after recovering"
    assert stack.process("bridge").alive()
    again = {key: n for key, n in stack.calls(run_ids, ["summarizer"]).items() if key.endswith("/a/1") and n != 1}
    assert not again, f"steps COMPLETED before the loss were called again: {again}"
    print(
        f"step b calls made again after the loss (the bridge that had them in flight died): "
        f"{sum(1 for key, n in figures.calls.items() if key.endswith('/b/1') and n > 1)}"
    )
