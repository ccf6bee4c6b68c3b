"""Cancel, retry and resume a run, from the command line and over HTTP, against the real stack."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from models.messages import AgentResult, ResultStatus, encode, new_run_id, utcnow
from models.plan import load_plan
from models.run import AgentResultReceived, ExecutionDefaults, RunState, RunSubmitted, transition
from switchyard import topics
from switchyard.db import SnapshotRepository
from tests.faults.conftest import (
    AUTH,
    STEP_TIMEOUT_S,
    FaultStack,
    Record,
    chain,
    dead_letters,
    http_request,
    poll,
    result_ids,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]


def wait_call(faults: FaultStack, agent: str, key: str, timeout: float = 30.0) -> None:
    run_id = key.split("/", 1)[0]
    poll(lambda: key in faults.calls([run_id], [agent]), timeout, lambda: f"{agent} never received {key}")


def success(run_id: str, step_id: str, attempt: int = 1) -> bytes:
    now = utcnow()
    return encode(
        AgentResult(
            correlation_id=f"{run_id}/{step_id}/{attempt}",
            run_id=run_id,
            step_id=step_id,
            attempt=attempt,
            status=ResultStatus.SUCCESS,
            output={"summary": "too late", "words": 2},
            started_at=now - timedelta(seconds=1),
            finished_at=now,
        )
    )


def assert_late_results_ignored(faults: FaultStack, run_id: str) -> None:
    """The agent's own late answer, and one more sent by hand, change nothing on a CANCELLED run."""
    before = faults.run(run_id)
    assert before is not None
    key = f"{run_id}/a/1"
    records = faults.read(topics.RESULTS, until=lambda rs: key in result_ids(rs), timeout=30)
    assert key in result_ids(records), "the bridge never published the cancelled call's late result"
    # A result for a step the plan lacks, on the same partition after a late
    # one: the executor reads a partition in order, so once this one is
    # dead-lettered, the late result before it has been handled.
    barrier = f"barrier-{new_run_id()[:8]}"
    faults.produce(
        [
            (topics.RESULTS, run_id.encode(), success(run_id, "a")),
            (topics.RESULTS, run_id.encode(), success(run_id, barrier)),
        ]
    )

    def barrier_parked(rs: list[Record]) -> bool:
        return any(letter.key == run_id and barrier in letter.reason for letter in dead_letters(rs))

    assert barrier_parked(faults.read(topics.DEADLETTER, until=barrier_parked, timeout=30)), "barrier never parked"
    after = faults.run(run_id)
    assert after is not None
    assert after.status == "CANCELLED"
    assert after.version == before.version, "a late result changed the cancelled run"
    assert [(s.step_id, s.attempt, s.status) for s in after.steps] == [("a", 1, "CANCELLED")]
    status, view = faults.live(run_id)
    assert status == 200
    assert (view["status"], view["version"]) == ("CANCELLED", before.version)


def start_slow_run(faults: FaultStack, label: str) -> str:
    (run_id,) = faults.submit(chain("very-slow", timeout_s=30), 1, label)  # the agent takes 8 s
    wait_call(faults, "very-slow", f"{run_id}/a/1")
    return run_id


def assert_cancelled(faults: FaultStack, run_id: str) -> None:
    record = faults.wait_terminal([run_id], timeout=20)[run_id]
    assert record.status == "CANCELLED", record
    error: Any = record.error
    assert error["kind"] == "cancelled", error
    assert [(s.step_id, s.attempt, s.status) for s in record.steps] == [("a", 1, "CANCELLED")]


def test_cancel_from_the_command_line(faults: FaultStack) -> None:
    run_id = start_slow_run(faults, "cancel cli")
    done = faults.cli("cancel", run_id)
    assert done.returncode == 0, done.stderr
    assert_cancelled(faults, run_id)
    assert_late_results_ignored(faults, run_id)


def test_cancel_over_http(faults: FaultStack) -> None:
    run_id = start_slow_run(faults, "cancel http")
    url = faults.executor_url(f"/runs/{run_id}/cancel")
    status, body = http_request("POST", url, {})
    assert status == 401, f"cancelling needs the API token: {status} {body}"
    status, body = http_request("POST", url, {}, headers=AUTH)
    assert status in {200, 202}, body
    assert_cancelled(faults, run_id)
    assert_late_results_ignored(faults, run_id)


def failed_run(faults: FaultStack, agent: str) -> str:
    """A run that failed at step a: ``agent`` fails its first two requests, the plan allows two attempts."""
    assert faults.stats(agent)["calls"] == 0, f"{agent} fails its first requests: one scenario only"
    plan = chain(agent, retry={"max_attempts": 2, "initial_delay_s": 0.2, "jitter": 0}, timeout_s=20)
    (run_id,) = faults.submit(plan, 1, f"retry {agent}")
    record = faults.wait_terminal([run_id], timeout=30)[run_id]
    assert record.status == "FAILED", record
    assert [(s.step_id, s.attempt, s.status) for s in record.steps] == [("a", 1, "FAILED"), ("a", 2, "FAILED")]
    return run_id


def assert_retried(faults: FaultStack, run_id: str, agent: str, label: str) -> None:
    # The run is FAILED until the executor applies the request: wait for the new attempt first.
    faults.wait_attempts([run_id], lambda rows: any(r.step_id == "a" and r.attempt == 3 for r in rows), "attempt 3")
    faults.verify_completed([run_id], label, agents=[agent, "summarizer"])
    record = faults.run(run_id)
    assert record is not None
    # Attempt numbers go on from the failed ones, which stay in the history with their errors.
    assert [(s.step_id, s.attempt, s.status) for s in record.steps] == [
        ("a", 1, "FAILED"),
        ("a", 2, "FAILED"),
        ("a", 3, "COMPLETED"),
        ("b", 1, "COMPLETED"),
    ]
    assert all(s.error for s in record.steps if s.status == "FAILED")
    assert record.error is None
    assert dict(faults.calls([run_id], [agent])) == {f"{run_id}/a/{n}": 1 for n in (1, 2, 3)}


def test_retry_a_failed_run_from_the_command_line(faults: FaultStack) -> None:
    run_id = failed_run(faults, "retrier-cli")
    done = faults.cli("retry", run_id)
    assert done.returncode == 0, done.stderr
    assert_retried(faults, run_id, "retrier-cli", "retry from the command line")


def test_retry_a_failed_run_over_http(faults: FaultStack) -> None:
    run_id = failed_run(faults, "retrier-http")
    url = faults.executor_url(f"/runs/{run_id}/retry")
    assert http_request("POST", url, {})[0] == 401
    status, body = http_request("POST", url, {}, headers=AUTH)
    assert status in {200, 202}, body
    assert_retried(faults, run_id, "retrier-http", "retry over HTTP")


def lost_run(faults: FaultStack, label: str) -> str:
    """A run PostgreSQL has RUNNING at step b (a done), which the executor's table never had.

    That is what a run looks like when the table's state is gone (a lost
    changelog) and nothing has restored it yet.
    """
    run_id, text = new_run_id(), label
    plan = load_plan(chain("summarizer", timeout_s=60))
    now = utcnow()
    defaults = ExecutionDefaults(timeout_s=STEP_TIMEOUT_S)
    state: RunState | None
    state, _ = transition(None, RunSubmitted(run_id=run_id, plan=plan, input={"text": text}, at=now, defaults=defaults))
    done = AgentResult(
        correlation_id=f"{run_id}/a/1",
        run_id=run_id,
        step_id="a",
        attempt=1,
        status=ResultStatus.SUCCESS,
        output={"summary": text, "words": len(text.split())},
        started_at=now,
        finished_at=now,
    )
    state, _ = transition(state, AgentResultReceived(result=done, at=now))
    assert state is not None
    SnapshotRepository(faults.engine).upsert([state])
    faults.inputs[run_id] = text
    status, view = faults.live(run_id)
    assert (status, view["status"], view["source"]) == (200, "RUNNING", "record"), view
    return run_id


def assert_resumed(faults: FaultStack, run_id: str, label: str) -> None:
    faults.verify_completed([run_id], label)
    # Step a was done before the loss and is not called; b is called once.
    assert dict(faults.calls([run_id])) == {f"{run_id}/b/1": 1}


def test_resume_a_run_the_table_lost_from_the_command_line(faults: FaultStack) -> None:
    run_id = lost_run(faults, "resume cli")
    done = faults.cli("resume", run_id)
    assert done.returncode == 0, done.stderr
    assert_resumed(faults, run_id, "resume from the command line")


def test_resume_a_run_the_table_lost_over_http(faults: FaultStack) -> None:
    run_id = lost_run(faults, "resume http")
    url = faults.executor_url(f"/runs/{run_id}/resume")
    assert http_request("POST", url, {})[0] == 401
    status, body = http_request("POST", url, {}, headers=AUTH)
    assert status in {200, 202}, body
    assert_resumed(faults, run_id, "resume over HTTP")
