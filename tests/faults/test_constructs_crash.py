"""kill -9 of the executor in the middle of the plan constructs: parallel branches, a map, a loop.

The executor dies while calls of several executions of one run are at the
agents; after its restart, every execution must be called exactly once (the
attempts in flight are dispatched again with their correlation ids, and the
bridge, which lives on, answers them from memory), a join must start once, a
map must keep its items' order, and a loop must not run an iteration twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from models.messages import WorkflowSubmission, encode, new_run_id
from models.plan import load_plan
from switchyard import topics
from tests.faults.conftest import AgentSpec, FaultStack, StackPlaces, poll

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

AGENTS = {
    "summarizer": AgentSpec(),
    "slow": AgentSpec(flags=("--slow", "3")),
    "quick": AgentSpec(module="echo", flags=("--slow", "0.2")),
    "writer": AgentSpec(flags=("--slow", "1")),
    "reviewer": AgentSpec(module="reviewer", flags=("--slow", "1")),
}


@pytest.fixture(scope="module")
def constructs(stack_places: StackPlaces) -> Iterator[FaultStack]:
    with stack_places.stack("faults-constructs", AGENTS) as stack:
        yield stack


def plan(name: str, start: str, *steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "workflow_id": f"crash-{name}",
        "name": name,
        "version": "1",
        "start_step": start,
        "steps": {s["id"]: s for s in steps},
        **extra,
    }


def wait_for(faults: FaultStack, describe: str, ready: Callable[[], bool], timeout: float = 60.0) -> None:
    poll(lambda: True if ready() else None, timeout, lambda: f"{describe}\n{faults.logs()}")


def completed_rows(faults: FaultStack, run_ids: list[str]) -> Counter[tuple[str, str, int, int | None]]:
    return Counter(
        (row.run_id, row.step_id, row.iteration, row.item)
        for row in faults.attempts(run_ids)
        if row.status == "COMPLETED"
    )


def assert_each_called_once(faults: FaultStack, run_ids: list[str], agents: list[str]) -> Counter[str]:
    calls = faults.calls(run_ids, agents)
    repeated = {key: n for key, n in calls.items() if n > 1}
    assert not repeated, f"keys called more than once after the restart: {dict(list(repeated.items())[:10])}"
    return calls


def test_kill_while_three_branches_are_in_flight(constructs: FaultStack) -> None:
    faults = constructs
    branches = [
        {"id": f"b{i}", "agent_name": "slow", "input_mapping": {"text": f"branch {i}"}, "next_step": "join"}
        for i in (1, 2, 3)
    ]
    fan = plan(
        "branches",
        "fork",
        {
            "id": "fork",
            "agent_name": "summarizer",
            "input_mapping": {"text": "${workflow.input.text}"},
            "next_step": ["b1", "b2", "b3"],
        },
        *branches,
        {
            "id": "join",
            "agent_name": "summarizer",
            "input_mapping": {"text": "${b1.output.summary} ${b2.output.summary} ${b3.output.summary}"},
        },
    )
    load_plan(fan)
    run_ids = faults.submit(fan, 8, "branches")
    wanted = {f"{run_id}/b{i}/1" for run_id in run_ids for i in (1, 2, 3)}
    wait_for(faults, "every branch at the agent", lambda: wanted <= set(faults.calls(run_ids, ["slow"])))
    faults.kill("executor")
    faults.restart("executor")
    records = faults.wait_terminal(run_ids, timeout=90)
    assert {r: rec.status for r, rec in records.items()} == dict.fromkeys(run_ids, "COMPLETED")
    calls = assert_each_called_once(faults, run_ids, ["slow", "summarizer"])
    assert sum(1 for key in calls if "/b" in key) == 3 * len(run_ids)
    rows = completed_rows(faults, run_ids)
    for run_id in run_ids:
        assert rows[(run_id, "join", 1, None)] == 1, (
            f"{run_id}: the join completed {rows[(run_id, 'join', 1, None)]} times"
        )
        assert calls[f"{run_id}/join/1"] == 1
        for i in (1, 2, 3):
            assert rows[(run_id, f"b{i}", 1, None)] == 1
        assert records[run_id].output == {"summary": "branch 1 branch 2 branch 3", "words": 6}


def test_kill_during_a_map_of_two_hundred_items(constructs: FaultStack) -> None:
    faults = constructs
    mapped = plan(
        "map",
        "each",
        {
            "id": "each",
            "agent_name": "quick",
            "map": {"over": "${workflow.input.items}", "max_concurrency": 20},
            "input_mapping": {"n": "${map.item}"},
        },
    )
    loaded = load_plan(mapped)
    run_id = new_run_id()
    submission = WorkflowSubmission(run_id=run_id, plan=loaded, input={"items": list(range(200))})
    faults.produce([(topics.PLANS, run_id.encode(), encode(submission))])
    wait_for(faults, "a third of the items called", lambda: len(faults.calls([run_id], ["quick"])) >= 60)
    faults.kill("executor")
    called_before = len(faults.calls([run_id], ["quick"]))
    assert called_before < 200, "the map finished before the kill: the scenario needs slower items"
    faults.restart("executor")
    record = faults.wait_terminal([run_id], timeout=120)[run_id]
    assert record.status == "COMPLETED", record.error
    assert record.output == [{"n": i} for i in range(200)]
    calls = assert_each_called_once(faults, [run_id], ["quick"])
    assert len(calls) == 200
    rows = completed_rows(faults, [run_id])
    assert sorted(item for (_, _, _, item) in rows if item is not None) == list(range(200))
    assert set(rows.values()) == {1}
    print(f"map of 200: {called_before} items called before the kill")


def test_kill_in_the_middle_of_a_loop_iteration(constructs: FaultStack) -> None:
    faults = constructs
    looping = plan(
        "loop",
        "write",
        {
            "id": "write",
            "agent_name": "writer",
            "input_mapping": {
                "text": "${workflow.input.text} " * 8,
                "max_words": 10,
                "previous": "${write.output.summary ?? ''}",
            },
            "next_step": "review",
        },
        {
            "id": "review",
            "agent_name": "reviewer",
            "input_mapping": {"summary": "${write.output.summary}", "sources": ["https://x"], "min_words": 25},
            "loop": {"back_to": "write", "while": "${review.output.approved} == false", "max_iterations": 4},
        },
    )
    load_plan(looping)
    run_ids = faults.submit(looping, 4, "loop text with enough words")
    second = {f"{run_id}/write@2/1" for run_id in run_ids}
    wait_for(faults, "iteration 2 of the writer at the agent", lambda: second <= set(faults.calls(run_ids, ["writer"])))
    faults.kill("executor")
    faults.restart("executor")
    records = faults.wait_terminal(run_ids, timeout=120)
    assert {r: rec.status for r, rec in records.items()} == dict.fromkeys(run_ids, "COMPLETED"), {
        r: rec.error for r, rec in records.items()
    }
    calls = assert_each_called_once(faults, run_ids, ["writer", "reviewer"])
    rows = completed_rows(faults, run_ids)
    for run_id in run_ids:
        iterations = sorted(it for (r, step, it, _) in rows if r == run_id and step == "review")
        assert iterations == [1, 2, 3], f"{run_id}: review iterations {iterations}"
        assert calls[f"{run_id}/write/1"] == 1
        assert calls[f"{run_id}/write@2/1"] == 1
        assert calls[f"{run_id}/review@3/1"] == 1
        assert f"{run_id}/write@4/1" not in calls
