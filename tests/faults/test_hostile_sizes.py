"""Hostile input, sizes: nothing over ``SWITCHYARD_MAX_MESSAGE_BYTES`` is produced, and no size kills a worker.

A real stack with the default limit (1,000,000 bytes): the embedded broker,
PostgreSQL, the executor and bridge workers and a2a-sdk agents. Each case
ends by checking that the workers still serve (a good run completes).

* A valid 600 KB submission whose first step maps the whole input next to a
  part of it: its state would be about 1.2 MB. Before, the executor crashed on
  the changelog send, and again at every restart. Now the run is FAILED with
  ``state_too_large``, stored reduced, and stays so across a kill -9.
* A run checkpointed by an earlier version with a state over the limit, found
  RUNNING in PostgreSQL at a restart: failed with ``state_too_large``, not
  crashed on.
* An agent answer of 2 MB: a final ``output_too_large``, the agent called once.
* Three dead letters over the limit (a 2 MB submission, 900 KB of non-UTF-8
  bytes, 700,000 ``"``): each reaches ``orchestrator.deadletter``, cut to fit,
  with its size and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from models.messages import DeadLetterRecord, WorkflowSubmission, encode, new_run_id, utcnow
from models.plan import load_plan
from models.run import RunStatus, RunSubmitted, transition
from switchyard import topics
from switchyard.db import SnapshotRepository
from tests.faults.conftest import (
    AUTH,
    AgentSpec,
    FaultStack,
    StackPlaces,
    chain,
    dead_letters,
    http_request,
    payload_of,
    poll,
)

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.timeout(300)]

LIMIT = 1_000_000
BIG_ANSWER = 2_000_000

AGENTS = {
    "summarizer": AgentSpec(),
    # Pads every output with 2 MB: an answer the bridge must not carry.
    "big": AgentSpec(flags=("--pad-output", str(BIG_ANSWER))),
}


def doubling_plan() -> dict[str, Any]:
    """One step that maps the whole run input twice: the attempt's input, a record of its own, is twice the run's.

    (Each record is held to the limit: the run's input and an execution are
    stored apart, so a 600 KB input copied once would fit.)
    """
    return {
        "workflow_id": "doubling",
        "name": "Maps the whole input",
        "version": "1",
        "start_step": "summarize",
        "steps": {
            "summarize": {
                "id": "summarize",
                "agent_name": "summarizer",
                "input_mapping": {
                    "text": "${workflow.input.topic}",
                    "all": "${workflow.input}",
                    "again": "${workflow.input}",
                },
            }
        },
    }


@pytest.fixture(scope="module")
def sizes(stack_places: StackPlaces) -> Iterator[FaultStack]:
    with stack_places.stack("hostile-sizes", AGENTS, max_message_bytes=LIMIT) as stack:
        yield stack


def error_of(stack: FaultStack, run_id: str) -> dict[str, Any]:
    record = stack.run(run_id)
    assert record is not None
    assert isinstance(record.error, dict), record
    return record.error


def test_a_state_over_the_limit_fails_its_run_and_stays_failed_across_a_kill(sizes: FaultStack) -> None:
    stack = sizes
    stack.assert_serving("before")

    # 1. The 600 KB submission that doubles itself, through the HTTP API.
    run_id = new_run_id()
    body = {"run_id": run_id, "plan": doubling_plan(), "input": {"topic": "alpha", "notes": "word " * 120_000}}
    assert len(json.dumps(body)) > 600_000
    status, answer = http_request("POST", stack.executor_url("/runs/"), body, headers=AUTH, timeout=30)
    assert status == 202, answer
    record = stack.wait_terminal([run_id], timeout=60)[run_id]
    assert record.status == "FAILED"
    error = error_of(stack, run_id)
    assert error["kind"] == "state_too_large"
    assert f"over the limit of {LIMIT} bytes" in error["message"]
    assert error["details"]["limit"] == LIMIT
    assert error["details"]["size"] > LIMIT
    # Stored reduced, so the failure is recorded: the large input is a note of what it was.
    stored_input: Any = record.input
    assert set(stored_input) == {"dropped"}, stored_input
    assert stored_input["dropped"]["bytes"] > 600_000
    assert stack.calls([run_id]) == {}  # never dispatched
    # Its data were not kept, so a retry would run on notes: refused, over HTTP and the CLI.
    status, answer = http_request("POST", stack.executor_url(f"/runs/{run_id}/retry"), headers=AUTH)
    assert status == 409, answer
    assert "cannot be retried" in answer["error"]
    retried = stack.cli("retry", run_id)
    assert retried.returncode == 1
    assert "cannot be retried" in retried.stderr
    stack.assert_serving("after the doubling run")

    # 2. A run an earlier version checkpointed RUNNING with a state over the limit (its input alone is: each
    # record of a state is held to the limit).
    legacy_id = f"legacy-{uuid.uuid4().hex[:8]}"
    legacy, _ = transition(
        None,
        RunSubmitted(
            run_id=legacy_id, plan=load_plan(chain("summarizer")), input={"text": "x" * 1_200_000}, at=utcnow()
        ),
    )
    assert legacy is not None
    assert legacy.status is RunStatus.RUNNING
    assert len(legacy.model_dump_json()) > LIMIT
    SnapshotRepository(stack.engine).upsert([legacy])

    # 3. kill -9 and restart: the executor restores what PostgreSQL shows RUNNING and must not crash on it.
    stack.kill("executor")
    stack.restart("executor")
    legacy_record = stack.wait_terminal([legacy_id], timeout=60)[legacy_id]
    assert legacy_record.status == "FAILED"
    assert error_of(stack, legacy_id)["kind"] == "state_too_large"
    assert stack.run(run_id) is not None
    assert error_of(stack, run_id)["kind"] == "state_too_large"  # still FAILED, as it was
    status, live = stack.live(run_id)
    assert status == 200
    assert live["status"] == "FAILED", live
    stack.assert_serving("after the restart")


def test_an_agent_answer_over_the_limit_fails_at_once_and_the_agent_is_called_once(sizes: FaultStack) -> None:
    stack = sizes
    plan = {
        "workflow_id": "big-answer",
        "name": "An agent that answers 2 MB",
        "version": "1",
        "start_step": "a",
        "steps": {"a": {"id": "a", "agent_name": "big", "input_mapping": {"text": "${workflow.input.text}"}}},
    }
    (run_id,) = stack.submit(plan, 1, "big answer")
    record = stack.wait_terminal([run_id], timeout=60)[run_id]
    assert record.status == "FAILED"
    error = error_of(stack, run_id)
    assert error["kind"] == "output_too_large"
    assert f"over the limit of {LIMIT} bytes" in error["message"]
    assert [(a.step_id, a.attempt) for a in record.steps] == [("a", 1)]  # not retried
    assert sum(stack.calls([run_id], ["big"]).values()) == 1
    stack.assert_serving("after the big answer")


def test_dead_letters_over_the_limit_are_cut_to_fit_and_never_lost(sizes: FaultStack) -> None:
    stack = sizes
    big_id = new_run_id()
    submission = WorkflowSubmission(run_id=big_id, plan=load_plan(chain("summarizer")), input={"text": "y" * 2_000_000})
    cases = {
        big_id.encode(): encode(submission),  # 2 MB, valid but over the limit
        b"not-utf8-" + uuid.uuid4().hex.encode(): b"\xff\xfe" * 450_000,  # 900 KB; its base64 is 1.2 MB
        b"quotes-" + uuid.uuid4().hex.encode(): b'"' * 700_000,  # 1.4 MB once escaped in JSON
    }
    stack.produce((topics.PLANS, key, value) for key, value in cases.items())

    wanted = {key.decode() for key in cases}

    def found(records: list[Any]) -> bool:
        return wanted <= {letter.key for letter in dead_letters(records)}

    letters = {
        letter.key: letter
        for letter in dead_letters(stack.read(topics.DEADLETTER, until=found, timeout=60))
        if letter.key in wanted
    }
    assert set(letters) == wanted, stack.logs("executor")
    for key, value in cases.items():
        letter: DeadLetterRecord = letters[key.decode()]
        assert letter.truncated, letter.key
        assert letter.original_bytes == len(value)
        assert letter.original_sha256 == hashlib.sha256(value).hexdigest()
        assert value.startswith(payload_of(letter))
        assert payload_of(letter)
        assert len(encode(letter)) + len(key) <= LIMIT
        assert letter.reason.startswith("cannot decode WorkflowSubmission: ")
    # The oversize submission whose run_id could be read is recorded as refused, with the reason.
    poll(lambda: stack.run(big_id), 30, lambda: f"run {big_id} not recorded\n{stack.logs('executor')}")
    error = error_of(stack, big_id)
    assert error["kind"] == "invalid_submission"
    assert "over the limit of" in error["message"]
    stack.assert_serving("after the oversize dead letters")
