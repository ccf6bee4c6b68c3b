"""Waiting for a person through faults: kill -9 of the executor while runs wait, of the bridge while it answers.

What waits is part of a run's state (the question, the A2A task's ids, the
input deadline), so it survives the executor; an answer given while the
executor is down waits on the control topic. The agent must see each question
asked once and each answer once: a waiting attempt is never dispatched again,
and the bridge reads the agent's task before it sends an answer, so that an
answer it sent before it died is not sent twice.
"""

from __future__ import annotations

from typing import Any

import pytest

from models.run import RunState
from switchyard.db import RunRecord, WorkflowRepository
from tests.faults.conftest import AUTH, FaultStack, http_request, poll

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]


def ask_plan(agent: str) -> dict[str, Any]:
    return {
        "workflow_id": f"faults-ask-{agent}",
        "name": "ask",
        "version": "1",
        "start_step": "ask",
        "steps": {
            "ask": {"id": "ask", "agent_name": agent, "input_mapping": {"topic": "${workflow.input.text}"}},
        },
    }


def waiting(faults: FaultStack, run_id: str) -> RunState | None:
    """The run's checkpoint when its step waits for a person, else None."""
    state = WorkflowRepository(faults.engine).get_state(run_id)
    return state if state is not None and state.waiting == 1 else None


def answers_of(record: RunRecord) -> Any:
    """The answers the asking agent put in a completed run's output."""
    assert isinstance(record.output, dict), record.output
    return record.output["answers"]


def task_of(state: RunState) -> tuple[str, str]:
    """The waiting attempt's correlation id and the agent's task id."""
    attempt = state.waiting_executions()[0].current
    assert attempt is not None
    assert attempt.task_id is not None
    return attempt.correlation_id, attempt.task_id


def test_executor_killed_while_runs_wait(faults: FaultStack) -> None:
    answered_after, answered_while_down = faults.submit(ask_plan("asker"), 2, "waiting through a crash")
    states = {
        run_id: poll(lambda r=run_id: waiting(faults, r), 60, lambda: "the runs never asked")  # type: ignore[misc]
        for run_id in (answered_after, answered_while_down)
    }
    faults.kill("executor")
    # The CLI checks against PostgreSQL's checkpoint: an answer can be given while no executor runs.
    down = faults.cli("input", answered_while_down, "ask", "--text", "given while it was down")
    assert down.returncode == 0, down.stderr
    faults.restart("executor")

    _, view = poll(
        lambda: (lambda got: got if got[0] == 200 else None)(faults.live(answered_after)),
        30,
        lambda: f"no live view of {answered_after}",
    )
    assert view["status"] == "RUNNING"
    assert [q["step_id"] for q in view["questions"]] == ["ask"], view["questions"]
    assert "Question 1 of 1" in view["questions"][0]["text"]
    code, body = http_request(
        "POST",
        faults.executor_url(f"/runs/{answered_after}/steps/ask/input"),
        {"text": "given after the restart"},
        headers=AUTH,
    )
    assert code == 202, body

    done = faults.wait_terminal([answered_after, answered_while_down], timeout=90)
    answers = {run_id: answers_of(record) for run_id, record in done.items()}
    assert answers == {
        answered_after: ["given after the restart"],
        answered_while_down: ["given while it was down"],
    }
    stats = faults.stats("asker")
    for run_id, state in states.items():
        correlation, task_id = task_of(state)
        # Once for the question, once for the answer (its key is the call's: turn 1): nothing dispatched again.
        assert stats["by_idempotency_key"].get(correlation) == 1, (run_id, stats["by_idempotency_key"])
        assert stats["by_idempotency_key"].get(f"{correlation}#1") == 1, (run_id, stats["by_idempotency_key"])
        assert stats["continued_tasks"].get(task_id) == 1, (run_id, stats["continued_tasks"])


def test_bridge_killed_while_it_sends_an_answer(faults: FaultStack) -> None:
    (run_id,) = faults.submit(ask_plan("slow-asker"), 1, "answer through a bridge crash")
    state = poll(lambda: waiting(faults, run_id), 60, lambda: "the run never asked")
    correlation, task_id = task_of(state)
    answered = faults.cli("input", run_id, "ask", "--text", "carry on")
    assert answered.returncode == 0, answered.stderr
    # The agent has the answer and works on it for 4 s: the bridge dies before it has the result.
    poll(
        lambda: faults.stats("slow-asker")["continued_tasks"].get(task_id) == 1,
        30,
        lambda: f"the answer never reached the agent: {faults.stats('slow-asker')['continued_tasks']}",
        interval=0.05,
    )
    faults.kill("bridge")
    faults.restart("bridge")
    record = faults.wait_terminal([run_id], timeout=90)[run_id]
    assert record.status == "COMPLETED", record.error
    assert answers_of(record) == ["carry on"]
    stats = faults.stats("slow-asker")
    assert stats["continued_tasks"].get(task_id) == 1, "the answer reached the agent twice"
    assert stats["by_idempotency_key"].get(f"{correlation}#1") == 1, stats["by_idempotency_key"]
    first_calls = stats["by_idempotency_key"].get(correlation)
    print(f"first message sent {first_calls} time(s); cancelled tasks: {stats['cancelled_task_ids']}")
    if first_calls == 2:
        # The question's task had ended, but its offset was not committed when the bridge died: the new bridge
        # called again (at-least-once), and the agent opened a second task that asks. No one will answer it, so
        # the executor has it cancelled; the run's own task is left alone.
        orphans = poll(
            lambda: faults.stats("slow-asker")["cancelled_task_ids"] or None,
            30,
            lambda: "the second task's question was never cancelled",
        )
        assert task_id not in orphans
        assert len(orphans) == 1, orphans
    else:
        assert first_calls == 1, stats["by_idempotency_key"]
        assert stats["cancelled_task_ids"] == []
    assert len([row for row in record.steps if row.step_id == "ask"]) == 1


def test_runs_wait_through_a_rebalance_and_answers_reach_their_owner(faults: FaultStack) -> None:
    """A second executor takes half the partitions while runs wait; answers sent to the first reach each owner."""
    run_ids = faults.submit(ask_plan("asker"), 8, "waiting through a rebalance")
    states = {
        run_id: poll(lambda r=run_id: waiting(faults, r), 60, lambda: "the runs never asked")  # type: ignore[misc]
        for run_id in run_ids
    }
    faults.start_worker("executor-2")
    faults.wait_ready(each=True)
    owned = faults.owned_partitions()
    print(f"executor-2 joined while 8 runs wait: run partitions {owned}")
    for run_id in run_ids:
        # The first executor's API: a run the second owns is forwarded to it, with the body.
        code, body = http_request(
            "POST",
            faults.url("executor", f"/runs/{run_id}/steps/ask/input"),
            {"text": f"answer to {run_id}"},
            headers=AUTH,
        )
        assert code == 202, (run_id, body)
    done = faults.wait_terminal(run_ids, timeout=90)
    assert {run_id: answers_of(record) for run_id, record in done.items()} == {
        run_id: [f"answer to {run_id}"] for run_id in run_ids
    }
    stats = faults.stats("asker")
    for run_id, state in states.items():
        correlation, task_id = task_of(state)
        # The partitions moved while the runs waited: nothing was asked again, each answer went once.
        assert stats["by_idempotency_key"].get(correlation) == 1, (run_id, stats["by_idempotency_key"])
        assert stats["continued_tasks"].get(task_id) == 1, (run_id, stats["continued_tasks"])
