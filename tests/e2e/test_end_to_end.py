"""End to end on real parts: the embedded broker, PostgreSQL, both Faust workers and a2a-sdk agents over HTTP."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiokafka import AIOKafkaConsumer
from sqlalchemy import text

from models.messages import DeadLetterRecord, WorkflowSubmission, decode, encode, new_run_id
from models.plan import load_plan
from switchyard import topics
from switchyard.db import RunRecord, WorkflowRepository
from switchyard.kafka import produce
from switchyard.stack import http_json
from tests.e2e.conftest import API_TOKEN, RunningStack

T = TypeVar("T")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}


def one_step(agent: str, *, retry: dict[str, Any] | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    step: dict[str, Any] = {
        "id": "work",
        "agent_name": agent,
        "input_mapping": {"text": "${workflow.input.text}"},
        "next_step": None,
    }
    if retry is not None:
        step["retry"] = retry
    if timeout_s is not None:
        step["timeout_s"] = timeout_s
    return {
        "workflow_id": f"one-{agent}",
        "name": f"one step on {agent}",
        "version": "1",
        "start_step": "work",
        "steps": {"work": step},
    }


def submit(e2e: RunningStack, plan: dict[str, Any], run_input: dict[str, Any], run_id: str | None = None) -> str:
    run_id = run_id or new_run_id()
    submission = WorkflowSubmission(run_id=run_id, plan=load_plan(plan), input=run_input)
    asyncio.run(produce(e2e.settings, topics.PLANS, key=run_id.encode(), value=encode(submission)))
    return run_id


def wait_done(e2e: RunningStack, run_id: str, timeout: float = 60.0) -> RunRecord:
    repo = WorkflowRepository(e2e.engine)
    deadline = time.monotonic() + timeout
    record = None
    while time.monotonic() < deadline:
        record = repo.get_run(run_id)
        if record is not None and record.status in {"COMPLETED", "FAILED", "CANCELLED"}:
            return record
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not finish in {timeout}s: {record}")


def cli(e2e: RunningStack, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "faust", "-A", "streams.app", *args],
        cwd=ROOT,
        env=e2e.stack.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_three_step_workflow_through_kafka(e2e: RunningStack) -> None:
    before = {name: e2e.stats(name)["calls"] for name in ("researcher", "summarizer", "reviewer")}
    plan = json.loads((ROOT / "examples/workflows/research-summarize-review.json").read_text())
    run_id = submit(e2e, plan, {"topic": "event sourcing"})
    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED", record.error
    assert record.output == {"approved": True, "comments": "Approved: 30 words backed by 3 source(s)."}
    assert [(s.step_id, s.attempt, s.status) for s in record.steps] == [
        ("research-step", 1, "COMPLETED"),
        ("summarize-step", 1, "COMPLETED"),
        ("review-step", 1, "COMPLETED"),
    ]
    research = record.steps[0]
    assert research.input_data == {"topic": "event sourcing"}
    assert isinstance(research.output_data, dict)
    review_input: Any = record.steps[2].input_data
    sources: Any = research.output_data["sources"]
    assert review_input["sources"] == sources
    assert review_input["first_source"] == sources[0]
    # Each agent was called exactly once for this run.
    after = {name: e2e.stats(name)["calls"] for name in before}
    assert {name: after[name] - before[name] for name in before} == {"researcher": 1, "summarizer": 1, "reviewer": 1}
    # The agent received the idempotency key derived from (run, step, attempt).
    assert f"{run_id}/research-step/1" in e2e.stats("researcher")["by_idempotency_key"]


def test_http_api_submit_read_and_list(e2e: RunningStack) -> None:
    plan = one_step("summarizer")
    status, _ = http_json("POST", e2e.stack.executor_url("/runs/"), {"plan": plan, "input": {"text": "one two three"}})
    assert status == 401, "submitting needs the API token when one is configured"

    import urllib.request

    request = urllib.request.Request(
        e2e.stack.executor_url("/runs/"),
        data=json.dumps({"plan": plan, "input": {"text": "one two three"}}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **AUTH},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 202
        run_id = json.loads(response.read())["run_id"]
    wait_done(e2e, run_id)
    status, view = http_json("GET", e2e.stack.executor_url(f"/runs/{run_id}/"))
    assert status == 200
    assert view["status"] == "COMPLETED"
    assert view["output"] == {"summary": "one two three", "words": 3}
    (step,) = view["steps"]
    assert step["step_id"] == "work"
    (attempt,) = step["attempts"]
    assert attempt["correlation_id"] == f"{run_id}/work/1"
    assert attempt["input"] == {"text": "one two three"}
    assert attempt["started_at"]
    assert attempt["completed_at"]

    status, listing = http_json("GET", e2e.stack.executor_url("/runs/?status=COMPLETED&limit=200"))
    assert status == 200
    assert run_id in [r["run_id"] for r in listing["runs"]]
    status, bad = http_json("GET", e2e.stack.executor_url("/runs/?status=DONE"))
    assert status == 400
    assert "unknown status" in bad["error"]
    assert http_json("GET", e2e.stack.executor_url("/runs/no-such-run/"))[0] == 404


def test_http_api_rejects_an_invalid_plan_with_every_problem(e2e: RunningStack) -> None:
    plan = one_step("summarizer")
    plan["start_step"] = "nowhere"
    plan["steps"]["work"]["next_step"] = "missing"
    request_body = json.dumps({"plan": plan, "input": {}}).encode()
    import urllib.error
    import urllib.request

    request = urllib.request.Request(e2e.stack.executor_url("/runs/"), data=request_body, method="POST", headers=AUTH)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 400
    body = json.loads(caught.value.read())
    paths = {p["path"] for p in body["problems"]}
    assert {"$.start_step", "$.steps.work.next_step"} <= paths


def test_transient_5xx_is_retried_by_the_bridge(e2e: RunningStack) -> None:
    run_id = submit(e2e, one_step("flaky"), {"text": "alpha beta"})
    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED", record.error
    assert [s.attempt for s in record.steps] == [1], "the HTTP retry happens inside one attempt"
    stats = e2e.stats("flaky")
    assert stats["by_idempotency_key"][f"{run_id}/work/1"] == 2  # 503 once, then success


def test_agent_always_failing_fails_the_run_after_the_step_retries(e2e: RunningStack) -> None:
    retry = {"max_attempts": 2, "initial_delay_s": 0.1, "jitter": 0}
    run_id = submit(e2e, one_step("broken", retry=retry), {"text": "x"})
    record = wait_done(e2e, run_id)
    assert record.status == "FAILED"
    assert [(s.attempt, s.status) for s in record.steps] == [(1, "FAILED"), (2, "FAILED")]
    error: Any = record.error
    assert error["step_id"] == "work"
    assert error["kind"] == "http_status"
    assert "500" in error["message"]


def test_a2a_0_3_agent(e2e: RunningStack) -> None:
    run_id = submit(e2e, one_step("legacy"), {"text": "old protocol still works"})
    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED", record.error
    assert record.output == {"summary": "old protocol still works", "words": 4}
    assert e2e.stats("legacy")["methods"].get("message/send", 0) >= 1


def test_working_task_is_polled_to_completion(e2e: RunningStack) -> None:
    run_id = submit(e2e, one_step("polled"), {"text": "poll me"})
    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED", record.error
    assert record.output == {"summary": "poll me", "words": 2}


def test_malformed_reply_fails_without_retry(e2e: RunningStack) -> None:
    run_id = submit(e2e, one_step("garbled"), {"text": "x"})
    record = wait_done(e2e, run_id)
    assert record.status == "FAILED"
    assert isinstance(record.error, dict)
    assert record.error["kind"] == "malformed_response"
    assert len(record.steps) == 1, "a malformed answer is final"


def test_step_timeout_becomes_a_retry_then_a_failure(e2e: RunningStack) -> None:
    retry = {"max_attempts": 2, "initial_delay_s": 0.1, "jitter": 0}
    run_id = submit(e2e, one_step("slow", retry=retry, timeout_s=1), {"text": "too slow"})
    record = wait_done(e2e, run_id, timeout=30)
    assert record.status == "FAILED"
    assert [(s.attempt, s.status) for s in record.steps] == [(1, "FAILED"), (2, "FAILED")]
    assert isinstance(record.error, dict)
    assert record.error["kind"] == "timeout"


def test_unknown_agent_fails_the_run_with_a_clear_error(e2e: RunningStack) -> None:
    retry = {"max_attempts": 1}
    run_id = submit(e2e, one_step("nobody-registered", retry=retry), {"text": "x"})
    record = wait_done(e2e, run_id)
    assert record.status == "FAILED"
    error: Any = record.error
    assert error["kind"] == "unknown_agent"
    assert "nobody-registered" in error["message"]


def test_same_run_id_twice_runs_once(e2e: RunningStack) -> None:
    before = e2e.stats("summarizer")["calls"]
    run_id = new_run_id()
    submit(e2e, one_step("summarizer"), {"text": "once"}, run_id=run_id)
    submit(e2e, one_step("summarizer"), {"text": "once"}, run_id=run_id)
    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED"
    time.sleep(1.0)
    assert e2e.stats("summarizer")["calls"] - before == 1


def read_topic(
    e2e: RunningStack,
    topic: str,
    keep: Callable[[bytes | None, bytes], T | None],
    enough: Callable[[list[T]], bool],
    timeout: float = 20.0,
) -> list[T]:
    """What ``keep`` makes of a topic's records, from its start, until ``enough`` of them or the time is up."""

    async def read() -> list[T]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=e2e.settings.bootstrap_servers, auto_offset_reset="earliest"
        )
        await consumer.start()
        found: list[T] = []
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not enough(found):
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    for message in messages:
                        kept = keep(message.key, message.value)
                        if kept is not None:
                            found.append(kept)
        finally:
            await consumer.stop()
        return found

    return asyncio.run(read())


def _dead_letters(e2e: RunningStack, reason_part: str, timeout: float = 20.0) -> list[DeadLetterRecord]:
    def keep(key: bytes | None, value: bytes) -> DeadLetterRecord | None:
        record = decode(DeadLetterRecord, value)
        return record if reason_part in record.reason else None

    return read_topic(e2e, topics.DEADLETTER, keep, bool, timeout)


def test_malformed_submission_goes_to_the_dead_letter_topic_and_the_worker_goes_on(e2e: RunningStack) -> None:
    asyncio.run(produce(e2e.settings, topics.PLANS, key=b"junk-1", value=b"\xff\xfenot json"))
    asyncio.run(produce(e2e.settings, topics.PLANS, key=b"junk-2", value=b'{"run_id": "junk-2", "plan": 7}'))
    letters = _dead_letters(e2e, "not UTF-8")
    assert letters
    assert letters[0].source_topic == topics.PLANS
    assert letters[0].payload_base64 is not None
    assert _dead_letters(e2e, "$.plan")
    # Still serving.
    run_id = submit(e2e, one_step("summarizer"), {"text": "still alive"})
    assert wait_done(e2e, run_id).status == "COMPLETED"


def test_cli_agents_submit_status(e2e: RunningStack) -> None:
    added = cli(e2e, "agents", "add", e2e.agent_url("reviewer"), "--name", "reviewer-by-card")
    assert added.returncode == 0, added.stderr
    assert "registered reviewer-by-card" in added.stdout
    listed = cli(e2e, "agents", "list")
    assert "reviewer-by-card" in listed.stdout

    legacy = cli(e2e, "agents", "add", e2e.agent_url("legacy"), "--name", "legacy-by-card")
    assert legacy.returncode == 0, legacy.stderr
    assert "(A2A 0.3)" in legacy.stdout, "the protocol version comes from the card"

    not_a_card = cli(e2e, "agents", "add", e2e.stack.bridge_url("/"))
    assert not_a_card.returncode != 0
    assert not_a_card.stderr.startswith("error:")
    assert not_a_card.stderr.strip().count("\n") == 0, "one line"

    unreachable = cli(e2e, "agents", "add", "http://127.0.0.1:9/")
    assert unreachable.returncode != 0
    assert unreachable.stderr.strip().count("\n") == 0, "one line"
    assert unreachable.stderr.startswith("error:")

    plan = ROOT / "examples/workflows/research-summarize.json"
    done = cli(e2e, "submit", str(plan), "--input", '{"topic": "cli"}', "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.splitlines()[0]
    assert "COMPLETED" in done.stdout
    assert '"summary"' in done.stdout
    shown = cli(e2e, "status", run_id, "--json")
    assert shown.returncode == 0
    view = json.loads(shown.stdout)
    assert view["status"] == "COMPLETED"
    assert [s["step_id"] for s in view["steps"]] == ["research", "summarize"]


def test_cli_submit_wait_exits_non_zero_with_the_agents_message(e2e: RunningStack, tmp_path: Path) -> None:
    plan_file = tmp_path / "broken.json"
    plan_file.write_text(json.dumps(one_step("broken", retry={"max_attempts": 1})))
    failed = cli(e2e, "submit", str(plan_file), "--input", '{"text": "x"}', "--wait")
    assert failed.returncode == 1
    assert "FAILED at step 'work'" in failed.stderr
    assert "500" in failed.stderr

    bad_plan = tmp_path / "bad.json"
    bad_plan.write_text('{"workflow_id": "w"}')
    rejected = cli(e2e, "submit", str(bad_plan))
    assert rejected.returncode == 2
    assert "required field is missing" in rejected.stderr


def test_registry_over_http(e2e: RunningStack) -> None:
    import urllib.request

    url = e2e.stack.executor_url("/agents/temp-agent")
    entry = {"url": "http://127.0.0.1:9/", "auth": {"kind": "bearer", "secret": "do-not-show"}}
    status, _ = http_json("PUT", url, entry)
    assert status == 401
    request = urllib.request.Request(url, data=json.dumps(entry).encode(), method="PUT", headers=AUTH)
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 201
        assert b"do-not-show" not in response.read()
    status, shown = http_json("GET", url)
    assert status == 200
    assert shown["auth"]["secret"] == "********"
    with e2e.engine.connect() as conn:  # encrypted at rest, not in clear anywhere in the row
        row = conn.execute(text("SELECT agents::text FROM agents WHERE name = 'temp-agent'")).scalar_one()
    assert "do-not-show" not in row
    assert "fernet:" in row
    bad = urllib.request.Request(
        url, data=json.dumps({"url": "file:///etc/passwd"}).encode(), method="PUT", headers=AUTH
    )
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(bad, timeout=5)
    assert caught.value.code == 400
    delete = urllib.request.Request(url, method="DELETE", headers=AUTH)
    with urllib.request.urlopen(delete, timeout=5) as response:
        assert response.status == 200
    assert http_json("GET", url)[0] == 404


def test_every_server_listens_on_loopback_only(e2e: RunningStack) -> None:
    import psutil

    pids = {name: p.pid for name, p in e2e.stack.processes.items()}
    assert e2e.stack.broker is not None
    pids["broker"] = e2e.stack.broker.process.pid
    for name, pid in pids.items():
        listening = [
            c.laddr for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
        ]
        assert listening, f"{name} listens nowhere?"
        for address in listening:
            assert address.ip in {"127.0.0.1", "::1"}, f"{name} (pid {pid}) listens on {address.ip}:{address.port}"


def test_the_bridge_calls_agents_concurrently(e2e: RunningStack) -> None:
    # Eight runs on an agent that takes 3 s each: their calls overlap in time,
    # which they could not with one call at a time per partition.
    run_ids = [submit(e2e, one_step("slow", timeout_s=20), {"text": f"run {i}"}) for i in range(8)]
    records = [wait_done(e2e, run_id, timeout=90) for run_id in run_ids]
    assert all(r.status == "COMPLETED" for r in records), [r.error for r in records]
    spans = sorted((r.steps[0].started_at, r.steps[0].completed_at) for r in records)
    overlapping = sum(1 for (_, end), (start, _) in itertools.pairwise(spans) if start and end and start < end)
    assert overlapping >= 4, spans


def test_registry_recovery_policy_falls_back_then_skips(e2e: RunningStack) -> None:
    from models.agents import AgentEntry, RecoveryAction, RecoveryPolicy
    from models.plan import RetryPolicy

    one_try = RetryPolicy(max_attempts=1)
    e2e.register(
        AgentEntry(
            name="broken-with-fallback",
            url=e2e.agent_url("broken"),
            retry=one_try,
            recovery=RecoveryPolicy(action=RecoveryAction.FALLBACK, fallback_agent="summarizer"),
        )
    )
    e2e.register(
        AgentEntry(
            name="broken-skippable",
            url=e2e.agent_url("broken"),
            retry=one_try,
            recovery=RecoveryPolicy(action=RecoveryAction.SKIP, default_output={"summary": "(skipped)"}),
        )
    )
    fallen_back = wait_done(e2e, submit(e2e, one_step("broken-with-fallback"), {"text": "backup did it"}))
    assert fallen_back.status == "COMPLETED", fallen_back.error
    assert [(s.attempt, s.agent_name, s.status) for s in fallen_back.steps] == [
        (1, "broken-with-fallback", "FAILED"),
        (2, "summarizer", "COMPLETED"),
    ]
    assert fallen_back.output == {"summary": "backup did it", "words": 3}

    skipped = wait_done(e2e, submit(e2e, one_step("broken-skippable"), {"text": "x"}))
    assert skipped.status == "COMPLETED", skipped.error
    assert skipped.output == {"summary": "(skipped)"}
    status, view = http_json("GET", e2e.stack.executor_url(f"/runs/{skipped.run_id}/"))
    assert status == 200
    assert view["steps"][0]["status"] == "SKIPPED"
