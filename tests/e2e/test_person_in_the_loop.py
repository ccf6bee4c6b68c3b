"""A person in the loop, end to end: agents that ask (A2A INPUT_REQUIRED) and approval steps, on the real stack.

The same stack as test_end_to_end.py: embedded broker, PostgreSQL, both
workers, and a2a-sdk example agents over HTTP. ``asker`` asks one question
before it completes, ``asker2`` two; each completes with its research notes
and the answers it was given, in order. The answers go in through the CLI
(``faust -A streams.app input``) and through ``POST
/runs/{run_id}/steps/{step_id}/input``; the tests check what PostgreSQL, the
live view and the agents saw.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from models.messages import Answer, ControlCommand, ControlMessage, MonitoringUpdate, decode, encode
from models.run import RunState, StepStatus
from switchyard import topics
from switchyard.db import WorkflowRepository
from switchyard.kafka import produce
from switchyard.stack import http_json
from tests.e2e.conftest import RunningStack
from tests.e2e.test_end_to_end import _dead_letters, cli, read_topic, submit, wait_done
from tests.e2e.test_plan_constructs import live_view, obj, plan, post

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def ask_plan(agent: str, **fields: Any) -> dict[str, Any]:
    return plan(
        f"ask-{agent}",
        "ask",
        {"id": "ask", "agent_name": agent, "input_mapping": {"topic": "${workflow.input.topic}"}, **fields},
    )


def approval_plan(name: str, **approval: Any) -> dict[str, Any]:
    """research -> review (an approval) -> summarize when approved, else note (echo)."""
    review: dict[str, Any] = {
        "id": "review",
        "approval": {"prompt": {"text": "Summarize the notes on ${workflow.input.topic}?"}, **approval},
        "routes": [{"when": "${review.output.approved}", "to": "summarize"}],
        "otherwise": "note",
    }
    timeout = review["approval"].pop("input_timeout_s", None)
    if timeout is not None:
        review["input_timeout_s"] = timeout
    return plan(
        f"approve-{name}",
        "research",
        {
            "id": "research",
            "agent_name": "researcher",
            "input_mapping": {"topic": "${workflow.input.topic}"},
            "next_step": "review",
        },
        review,
        {
            "id": "summarize",
            "agent_name": "summarizer",
            "input_mapping": {"text": "${research.output.notes}", "max_words": "${review.output.data.words ?? 5}"},
        },
        {"id": "note", "agent_name": "echo", "input_mapping": {"why": "${review.output.text ?? 'no reason'}"}},
    )


def wait_question(e2e: RunningStack, run_id: str, step_id: str, turn: int, timeout: float = 60.0) -> RunState:
    """The run's checkpoint once ``step_id`` waits on its ``turn``-th question (from 0)."""
    repo = WorkflowRepository(e2e.engine)
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = repo.get_state(run_id)
        if state is not None:
            for execution in state.waiting_executions():
                current = execution.current
                if execution.step_id == step_id and current is not None and current.turn == turn:
                    return state
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} step {step_id!r} did not ask question {turn + 1} in {timeout}s: {state}")


def monitoring_of(e2e: RunningStack, run_id: str, statuses: set[str], timeout: float = 20.0) -> list[MonitoringUpdate]:
    """The run's updates on the monitoring topic with these statuses, once one of each is there."""

    def keep(key: bytes | None, value: bytes) -> MonitoringUpdate | None:
        update = decode(MonitoringUpdate, value) if key == run_id.encode() else None
        return update if update is not None and update.status in statuses else None

    return read_topic(e2e, topics.MONITORING, keep, lambda found: statuses <= {u.status for u in found}, timeout)


def agent_task(state: RunState, step_id: str) -> str:
    execution = next(e for e in state.waiting_executions() if e.step_id == step_id)
    assert execution.current is not None
    assert execution.current.task_id is not None
    return execution.current.task_id


def test_a_question_answered_through_the_cli(e2e: RunningStack) -> None:
    before = e2e.stats("asker")
    run_id = submit(e2e, ask_plan("asker"), {"topic": "tides"})
    state = wait_question(e2e, run_id, "ask", 0)
    assert state.status == "RUNNING"
    assert state.waiting == 1
    task_id = agent_task(state, "ask")
    question = state.waiting_executions()[0].current
    assert question is not None
    assert question.exchanges[0].question.text.startswith("Question 1 of 1")
    assert question.exchanges[0].question.data == {"question": 1, "of": 1}

    shown = cli(e2e, "status", run_id)
    assert shown.returncode == 0, shown.stderr
    assert "Question 1 of 1" in shown.stdout, shown.stdout
    assert "WAITING" in shown.stdout, shown.stdout

    answered = cli(e2e, "input", run_id, "ask", "--text", "the spring tides")
    assert answered.returncode == 0, answered.stderr
    assert f"of run {run_id} (question 1)" in answered.stdout

    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED", record.error
    output = obj(record.output)
    assert output["answers"] == ["the spring tides"]
    assert output["topic"] == "tides"
    after = e2e.stats("asker")
    assert after["calls"] - before["calls"] == 2  # the question, then the answer: each once
    assert after["continued_tasks"].get(task_id) == 1
    rows = [row for row in record.steps if row.step_id == "ask"]
    assert len(rows) == 1, rows  # one attempt: the answer carried the call on
    updates = {u.status: u for u in monitoring_of(e2e, run_id, {"WAITING", "ANSWERED"})}
    assert str(updates["WAITING"].detail["question"]).startswith("Question 1 of 1"), updates
    assert updates["ANSWERED"].detail["source"] == "cli"
    exchanges = rows[0].exchanges
    assert isinstance(exchanges, list)
    assert len(exchanges) == 1
    assert obj(obj(exchanges[0])["answer"])["text"] == "the spring tides"
    assert obj(obj(exchanges[0])["answer"])["source"] == "cli"


def test_a_question_answered_over_http_is_shown_first(e2e: RunningStack) -> None:
    run_id = submit(e2e, ask_plan("asker"), {"topic": "glaciers"})
    wait_question(e2e, run_id, "ask", 0)
    view = live_view(e2e, run_id)
    assert view["status"] == "RUNNING"
    questions = view["questions"]
    assert len(questions) == 1, questions
    assert questions[0]["step_id"] == "ask"
    assert "Question 1 of 1" in questions[0]["text"]

    status, listed = http_json("GET", e2e.stack.executor_url("/runs/?status=WAITING&limit=1000"))
    assert status == 200, listed
    assert run_id in {run["run_id"] for run in listed["runs"]}

    status, body = post(e2e, f"/runs/{run_id}/steps/ask/input", {"data": {"focus": "melt rates"}})
    assert status == 202, body
    assert body["turn"] == 0
    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED", record.error
    assert obj(record.output)["answers"] == [{"focus": "melt rates"}]

    status, listed = http_json("GET", e2e.stack.executor_url("/runs/?status=WAITING&limit=1000"))
    assert run_id not in {run["run_id"] for run in listed["runs"]}


def test_two_questions_in_a_row_answered_twice(e2e: RunningStack) -> None:
    before = e2e.stats("asker2")
    run_id = submit(e2e, ask_plan("asker2"), {"topic": "volcanoes"})
    first = wait_question(e2e, run_id, "ask", 0)
    task_id = agent_task(first, "ask")
    assert cli(e2e, "input", run_id, "ask", "--text", "the ash").returncode == 0
    second = wait_question(e2e, run_id, "ask", 1)
    assert agent_task(second, "ask") == task_id  # the same A2A task asks again
    status, body = post(e2e, f"/runs/{run_id}/steps/ask/input", {"text": "and the lava", "data": {"n": 2}})
    assert status == 202, body
    assert body["turn"] == 1

    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED", record.error
    assert obj(record.output)["answers"] == ["the ash", {"text": "and the lava", "n": 2}]
    after = e2e.stats("asker2")
    assert after["calls"] - before["calls"] == 3
    assert after["continued_tasks"].get(task_id) == 2


def test_approved_routes_on_with_the_data_given(e2e: RunningStack) -> None:
    run_id = submit(e2e, approval_plan("yes"), {"topic": "rivers"})
    state = wait_question(e2e, run_id, "review", 0)
    execution = state.waiting_executions()[0]
    assert execution.current is not None
    assert execution.current.exchanges[0].question.text == "Summarize the notes on rivers?"
    status, body = post(e2e, f"/runs/{run_id}/steps/review/input", {"decision": "approve", "data": {"words": 3}})
    assert status == 202, body
    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED", record.error
    summary = obj(record.output)["summary"]
    assert len(summary.removesuffix(" ...").split()) == 3
    assert {row.step_id for row in record.steps} == {"research", "review", "summarize"}


def test_rejected_routes_to_the_other_way(e2e: RunningStack) -> None:
    run_id = submit(e2e, approval_plan("no"), {"topic": "deserts"})
    wait_question(e2e, run_id, "review", 0)
    done = cli(e2e, "input", run_id, "review", "--reject", "--text", "too dry")
    assert done.returncode == 0, done.stderr
    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED", record.error
    assert obj(record.output) == {"why": "too dry"}
    assert "summarize" not in {row.step_id for row in record.steps}


def test_approval_times_out_and_takes_the_default_decision(e2e: RunningStack) -> None:
    run_id = submit(e2e, approval_plan("late", default_decision="approve", input_timeout_s=2), {"topic": "caves"})
    record = wait_done(e2e, run_id, timeout=60)
    assert record.status == "COMPLETED", record.error
    assert "summary" in obj(record.output)
    review = next(row for row in record.steps if row.step_id == "review")
    assert isinstance(review.exchanges, list)
    assert obj(obj(review.exchanges[0])["answer"])["source"] == "timeout"
    assert obj(review.output_data)["approved"] is True


def test_reject_can_fail_the_run(e2e: RunningStack) -> None:
    run_id = submit(e2e, approval_plan("strict", on_reject="fail"), {"topic": "moons"})
    wait_question(e2e, run_id, "review", 0)
    status, body = post(e2e, f"/runs/{run_id}/steps/review/input", {"decision": "reject", "text": "not now"})
    assert status == 202, body
    record = wait_done(e2e, run_id)
    assert record.status == "FAILED"
    error = obj(record.error)
    assert error["kind"] == "rejected"
    assert "not now" in error["message"]


# ------------------------------------------------------------- bad input


def test_answers_to_what_does_not_wait_are_refused_and_change_nothing(e2e: RunningStack) -> None:
    run_id = submit(e2e, ask_plan("asker"), {"topic": "storms"})
    wait_question(e2e, run_id, "ask", 0)

    status, body = post(e2e, f"/runs/{run_id}/steps/nowhere/input", {"text": "x"})
    assert status == 404, body
    assert "no step 'nowhere'" in body["error"]
    status, body = post(e2e, "/runs/no-such-run/steps/ask/input", {"text": "x"})
    assert status == 404, body
    status, body = post(e2e, f"/runs/{run_id}/steps/ask/input", {"decision": "approve"})
    assert status == 400, body
    assert "not a decision" in body["error"]
    status, body = post(e2e, f"/runs/{run_id}/steps/ask/input", {})
    assert status == 400, body
    assert "needs text or data" in body["error"]
    refused = cli(e2e, "input", run_id, "ask", "--data", "{not json")
    assert refused.returncode == 2
    assert "--data is not JSON" in refused.stderr

    status, body = post(e2e, f"/runs/{run_id}/steps/ask/input", {"text": "first"})
    assert status == 202, body
    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED", record.error
    # The run is done: a second answer is refused at once, by both doors.
    status, body = post(e2e, f"/runs/{run_id}/steps/ask/input", {"text": "second"})
    assert status == 409, body
    assert "only a RUNNING run waits for input" in body["error"]
    again = cli(e2e, "input", run_id, "ask", "--text", "second")
    assert again.returncode == 1
    assert "COMPLETED" in again.stderr
    assert obj(WorkflowRepository(e2e.engine).get_run(run_id).output)["answers"] == ["first"]  # type: ignore[union-attr]


def test_a_second_answer_to_the_same_question_is_refused(e2e: RunningStack) -> None:
    """Two answers sent at once (both doors checked before either was applied): the first wins."""
    run_id = submit(e2e, ask_plan("asker"), {"topic": "comets"})
    state = wait_question(e2e, run_id, "ask", 0)
    execution = state.waiting_executions()[0]
    assert execution.current is not None

    def record(text: str) -> tuple[str, bytes | None, bytes | None]:
        message = ControlMessage(
            run_id=run_id,
            command=ControlCommand.INPUT,
            step_id="ask",
            attempt=execution.current.number if execution.current else 1,
            turn=0,
            answer=Answer(answer_id=str(uuid.uuid4()), text=text, source="test"),
        )
        return topics.CONTROL, run_id.encode(), encode(message)

    async def send_both() -> None:
        for topic, key, value in (record("one"), record("two")):
            assert key is not None
            assert value is not None
            await produce(e2e.settings, topic, key=key, value=value)

    asyncio.run(send_both())
    done = wait_done(e2e, run_id)
    assert done.status == "COMPLETED", done.error
    assert obj(done.output)["answers"] == ["one"]
    letters = _dead_letters(e2e, f"answer refused: step 'ask' of run '{run_id}'")
    assert letters, "the second answer was not refused with its reason"


def test_an_answer_too_large_for_a_message_is_refused_at_once(e2e: RunningStack) -> None:
    run_id = submit(e2e, ask_plan("asker"), {"topic": "reefs"})
    wait_question(e2e, run_id, "ask", 0)
    limit = e2e.settings.max_message_bytes
    # The body fits (the HTTP guard takes it), the control record that would carry it does not.
    status, body = post(e2e, f"/runs/{run_id}/steps/ask/input", {"data": "x" * (limit - 100)})
    assert status == 413, body
    assert body["limit"] == limit
    assert body["size"] > limit
    assert "over the limit" in body["error"]
    state = wait_question(e2e, run_id, "ask", 0)  # still waiting: nothing was sent
    assert state.waiting == 1
    assert cli(e2e, "cancel", run_id).returncode == 0
    assert wait_done(e2e, run_id).status == "CANCELLED"


def test_cancelling_a_waiting_run_cancels_the_agents_task(e2e: RunningStack) -> None:
    run_id = submit(e2e, ask_plan("asker"), {"topic": "dunes"})
    task_id = agent_task(wait_question(e2e, run_id, "ask", 0), "ask")
    assert cli(e2e, "cancel", run_id).returncode == 0
    record = wait_done(e2e, run_id)
    assert record.status == "CANCELLED"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and task_id not in e2e.stats("asker")["cancelled_task_ids"]:
        time.sleep(0.2)
    assert task_id in e2e.stats("asker")["cancelled_task_ids"]
    row = next(row for row in record.steps if row.step_id == "ask")
    assert row.status == StepStatus.CANCELLED
