"""Plans beyond a chain, end to end: parallel branches and joins, routes, loops and maps on the real stack.

The same stack as test_end_to_end.py (embedded broker, PostgreSQL, both
workers, a2a-sdk example agents over HTTP); each test submits one plan that
uses one construct and checks what PostgreSQL recorded and what the agents saw.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from switchyard.stack import http_json
from tests.e2e.conftest import API_TOKEN, RETENTION_S, RunningStack
from tests.e2e.test_end_to_end import cli, submit, wait_done

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def plan(name: str, start: str, *steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "workflow_id": f"constructs-{name}",
        "name": name,
        "version": "1",
        "start_step": start,
        "steps": {s["id"]: s for s in steps},
        **extra,
    }


def step(step_id: str, agent: str, text: str = "${workflow.input.text}", **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "agent_name": agent, "input_mapping": {"text": text}, **fields}


def obj(value: Any) -> dict[str, Any]:
    """A recorded JSON value that the test knows is an object."""
    assert isinstance(value, dict), value
    return value


def live_view(e2e: RunningStack, run_id: str) -> dict[str, Any]:
    status, body = http_json("GET", e2e.stack.executor_url(f"/runs/{run_id}/"))
    assert status == 200, body
    return dict(body)


def post(e2e: RunningStack, path: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        e2e.stack.executor_url(path),
        data=json.dumps(body).encode(),
        method="POST",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_three_parallel_branches_of_one_second_finish_well_under_two_seconds(e2e: RunningStack) -> None:
    branches = [step(f"b{i}", "slow1", f"branch {i} of ${{workflow.input.text}}", next_step="join") for i in (1, 2, 3)]
    joined = step("join", "summarizer", "${b1.output.summary} | ${b2.output.summary} | ${b3.output.summary}")
    run_id = submit(
        e2e,
        plan("parallel", "fork", step("fork", "summarizer", next_step=["b1", "b2", "b3"]), *branches, joined),
        {"text": "three at once"},
    )
    record = wait_done(e2e, run_id, timeout=60)
    assert record.status == "COMPLETED", record.error
    rows = {row.step_id: row for row in record.steps}
    assert {s: (rows[s].attempt, rows[s].status) for s in ("b1", "b2", "b3", "join")} == dict.fromkeys(
        ("b1", "b2", "b3", "join"), (1, "COMPLETED")
    )
    started = min(rows[s].started_at for s in ("b1", "b2", "b3"))  # type: ignore[type-var]
    finished = max(rows[s].completed_at for s in ("b1", "b2", "b3"))  # type: ignore[type-var]
    assert finished is not None
    assert started is not None
    took = (finished - started).total_seconds()
    assert took < 1.8, f"three 1 s branches took {took:.2f}s from the first start to the last end"
    # The join read each branch's output by step id, and ran once.
    assert record.output == {
        "summary": " | ".join(f"branch {i} of three at once" for i in (1, 2, 3)),
        "words": 20,
    }
    assert sum(1 for row in record.steps if row.step_id == "join") == 1


def test_a_route_runs_the_matching_branch_skips_the_other_and_merges(e2e: RunningStack) -> None:
    routed = plan(
        "routes",
        "triage",
        step(
            "triage",
            "summarizer",
            routes=[{"when": "${workflow.input.kind} == 'short'", "to": "brief"}],
            otherwise="detailed",
        ),
        step("brief", "summarizer", "brief: ${triage.output.summary}", next_step="merge"),
        step("detailed", "researcher", next_step="merge"),
        {
            "id": "merge",
            "agent_name": "summarizer",
            "input_mapping": {"text": "${brief.output.summary ?? 'no brief'} / ${detailed.output.notes ?? 'no notes'}"},
        },
    )
    routed["steps"]["detailed"]["input_mapping"] = {"topic": "${workflow.input.text}"}
    run_id = submit(e2e, routed, {"text": "routing", "kind": "short"})
    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED", record.error
    assert [row.step_id for row in record.steps] == ["triage", "brief", "merge"]
    assert record.output == {"summary": "brief: routing / no notes", "words": 5}
    view = live_view(e2e, run_id)
    statuses = {s["step_id"]: (s["status"], s["skip_reason"]) for s in view["steps"]}
    assert statuses["detailed"][0] == "SKIPPED"
    assert statuses["detailed"][1]
    assert statuses["brief"] == ("COMPLETED", None)


def test_a_condition_that_cannot_be_evaluated_fails_the_step_with_a_clear_error(e2e: RunningStack) -> None:
    broken = plan(
        "condition-error",
        "first",
        step("first", "summarizer", routes=[{"when": "${first.output.label} == 'x'", "to": "second"}]),
        step("second", "summarizer"),
    )
    run_id = submit(e2e, broken, {"text": "no label here"})
    record = wait_done(e2e, run_id)
    assert record.status == "FAILED"
    error: Any = record.error
    assert error["kind"] == "condition_error"
    assert "step 'first'" in error["message"], error
    assert "no key 'label'" in error["message"], error
    assert [row.step_id for row in record.steps] == ["first"]


def test_a_writer_and_reviewer_loop_runs_until_approved_with_each_iteration_recorded(e2e: RunningStack) -> None:
    before = e2e.stats("reviewer")["calls"]
    data = json.loads((ROOT / "examples/workflows/research-write-review.json").read_text())
    run_id = submit(e2e, data, {"topic": "event sourcing"})
    record = wait_done(e2e, run_id, timeout=90)
    assert record.status == "COMPLETED", record.error
    loop_rows = [
        (row.step_id, row.iteration, row.attempt) for row in record.steps if row.step_id in {"write", "review"}
    ]
    assert sorted(loop_rows) == sorted([("write", i, 1) for i in (1, 2, 3)] + [("review", i, 1) for i in (1, 2, 3)])
    reviews = sorted((row for row in record.steps if row.step_id == "review"), key=lambda r: r.iteration)
    verdicts = [obj(row.output_data)["approved"] for row in reviews]
    assert verdicts == [False, False, True]
    writes = sorted((row for row in record.steps if row.step_id == "write"), key=lambda r: r.iteration)
    # The writer got the reviewer's comments of the iteration before, and its own previous draft.
    assert obj(writes[0].input_data)["feedback"] == ""
    assert obj(writes[1].input_data)["feedback"] == obj(reviews[0].output_data)["comments"]
    assert obj(writes[2].input_data)["previous"] == obj(writes[1].output_data)["summary"]
    # The three researchers ran in parallel once each; the map wrote one note per source, in order.
    assert sorted(row.step_id for row in record.steps if row.step_id.startswith("research-")) == [
        "research-history",
        "research-practice",
        "research-questions",
    ]
    output: Any = record.output
    assert output["review"].startswith("Approved")
    assert [note["summary"].split(":")[0] for note in output["source_notes"]] == ["source 0", "source 1", "source 2"]
    assert e2e.stats("reviewer")["calls"] - before == 3
    # The idempotency key of a later iteration names it.
    assert f"{run_id}/write@2/1" in e2e.stats("summarizer")["by_idempotency_key"]


def test_a_loop_that_runs_out_of_iterations_fails_or_goes_on_as_the_plan_says(e2e: RunningStack) -> None:
    def looping(when_exhausted: str) -> dict[str, Any]:
        return plan(
            f"loop-{when_exhausted}",
            "write",
            step("write", "summarizer", next_step="review"),
            {
                "id": "review",
                "agent_name": "reviewer",
                "input_mapping": {"summary": "${write.output.summary}", "sources": [], "min_words": 1},
                "loop": {
                    "back_to": "write",
                    "while": "${review.output.approved} == false",
                    "max_iterations": 2,
                    "when_exhausted": when_exhausted,
                },
                "next_step": "after",
            },
            step("after", "summarizer", "went on after ${review.output.comments}"),
        )

    failing = wait_done(e2e, submit(e2e, looping("fail"), {"text": "never approved"}))
    assert failing.status == "FAILED"
    assert obj(failing.error)["kind"] == "loop_exhausted", failing.error
    assert sorted((r.step_id, r.iteration) for r in failing.steps) == [
        ("review", 1),
        ("review", 2),
        ("write", 1),
        ("write", 2),
    ]
    going_on = wait_done(e2e, submit(e2e, looping("continue"), {"text": "never approved"}))
    assert going_on.status == "COMPLETED", going_on.error
    assert obj(going_on.output)["summary"].startswith("went on after No sources")


def test_a_map_over_a_list_calls_the_agent_once_per_item_in_order(e2e: RunningStack) -> None:
    items = [f"document {i}" for i in range(40)]
    mapped = plan(
        "map",
        "each",
        {
            "id": "each",
            "agent_name": "echo",
            "map": {"over": "${workflow.input.documents}", "max_concurrency": 5},
            "input_mapping": {"doc": "${map.item}", "index": "${map.index}"},
        },
    )
    run_id = submit(e2e, mapped, {"documents": items})
    record = wait_done(e2e, run_id, timeout=90)
    assert record.status == "COMPLETED", record.error
    assert record.output == [{"doc": doc, "index": i} for i, doc in enumerate(items)]
    assert sorted(row.item for row in record.steps if row.item is not None) == list(range(40))
    # Never more than max_concurrency items in flight at once.
    events = sorted(
        [(row.started_at, 1) for row in record.steps] + [(row.completed_at, -1) for row in record.steps],
        key=lambda e: (e[0], e[1]),
    )
    in_flight = peak = 0
    for _, change in events:
        in_flight += change
        peak = max(peak, in_flight)
    assert peak <= 5, peak


def test_a_map_of_a_thousand_items_completes(e2e: RunningStack) -> None:
    mapped = plan(
        "map-1000",
        "each",
        {
            "id": "each",
            "agent_name": "echo",
            "map": {"over": "${workflow.input.n}", "max_concurrency": 100},
            "input_mapping": {"n": "${map.item}"},
        },
    )
    run_id = submit(e2e, mapped, {"n": list(range(1000))})
    record = wait_done(e2e, run_id, timeout=200)
    assert record.status == "COMPLETED", record.error
    assert record.output == [{"n": i} for i in range(1000)]
    assert len(record.steps) == 1000


def test_a_failed_item_fails_the_map_unless_failures_are_collected(e2e: RunningStack) -> None:
    def mapped(on_item_failure: str) -> dict[str, Any]:
        return plan(
            f"map-{on_item_failure}",
            "each",
            {
                "id": "each",
                "agent_name": "summarizer",
                "map": {"over": "${workflow.input.texts}", "max_concurrency": 2, "on_item_failure": on_item_failure},
                "input_mapping": {"text": "${map.item}"},
                "retry": {"max_attempts": 1},
            },
        )

    texts = ["one two", "", "three four"]  # the summarizer refuses an empty text
    collected = wait_done(e2e, submit(e2e, mapped("collect"), {"texts": texts}))
    assert collected.status == "COMPLETED", collected.error
    output: Any = collected.output
    assert output[0] == {"summary": "one two", "words": 2}
    assert output[1]["error"]["kind"] == "agent_failed"
    assert "non-empty string 'text'" in output[1]["error"]["message"]
    assert output[2] == {"summary": "three four", "words": 2}
    failed = wait_done(e2e, submit(e2e, mapped("fail"), {"texts": texts}))
    assert failed.status == "FAILED"
    error: Any = failed.error
    assert error["step_id"] == "each", error
    assert error["item"] == 1, error
    assert "item 1" in error["message"]


def test_an_invalid_plan_of_the_new_constructs_is_refused_with_every_problem(e2e: RunningStack) -> None:
    bad = plan(
        "bad",
        "a",
        step("a", "summarizer", next_step=["b", "ghost"]),
        step("b", "summarizer", routes=[{"when": "${a.output.x} ==", "to": "c"}]),
        step("c", "summarizer", "${b.output.summary}", loop={"back_to": "a", "while": "true"}),
        step("d", "summarizer", map={"over": "text ${workflow.input.text}"}),
    )
    status, body = post(e2e, "/runs/", {"plan": bad, "input": {}})
    assert status == 400, body
    problems = {p["path"]: p["reason"] for p in body["problems"]}
    # A missing max_iterations is a structural problem: it is reported (with any other of its kind) first.
    assert problems == {"$.steps.c.loop.max_iterations": "required field is missing"}, problems
    bad["steps"]["c"]["loop"]["max_iterations"] = 3
    status, body = post(e2e, "/runs/", {"plan": bad, "input": {}})
    assert status == 400, body
    problems = {p["path"]: p["reason"] for p in body["problems"]}
    assert "'ghost' is not a step" in problems["$.steps.a.next_step[1]"]
    assert "does not parse" in problems["$.steps.b.routes[0].when"]
    assert "cannot be a list" in problems["$.steps.d.map.over"]
    assert "unreachable" in problems["$.steps.d"]


def test_a_finished_run_leaves_the_table_after_its_retention_and_is_still_shown_from_postgresql(
    e2e: RunningStack,
) -> None:
    one = plan("retention", "only", step("only", "summarizer"))
    run_id = submit(e2e, one, {"text": "kept in postgresql"})
    record = wait_done(e2e, run_id)
    assert record.status == "COMPLETED", record.error
    assert live_view(e2e, run_id)["source"] == "live"
    deadline = time.monotonic() + RETENTION_S + 45
    while live_view(e2e, run_id)["source"] != "record":
        assert time.monotonic() < deadline, f"run {run_id} still in the table {RETENTION_S + 45}s after its end"
        time.sleep(1)
    shown = live_view(e2e, run_id)
    assert shown["status"] == "COMPLETED"
    assert shown["output"] == record.output
    assert [s["status"] for s in shown["steps"]] == ["COMPLETED"]
    status = cli(e2e, "status", run_id)
    assert status.returncode == 0, status.stderr
    assert "COMPLETED" in status.stdout
    # The same submission again is recognised from PostgreSQL: not run a second time.
    calls = e2e.stats("summarizer")["calls"]
    submit(e2e, one, {"text": "kept in postgresql"}, run_id=run_id)
    time.sleep(3)
    assert e2e.stats("summarizer")["calls"] == calls
    assert live_view(e2e, run_id)["source"] == "record"
