"""A crash between the records one event writes never leaves a torn run in the table.

An event writes several records (parts, then the head, then deletes); kill -9
may stop it after any of them. Whatever prefix was written, the table must
read back as the state before the event (the event is then delivered again)
or, once the head is written, as the state after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from models.messages import AgentResult, ResultStatus
from models.plan import WorkflowPlan, load_plan
from models.run import AgentResultReceived, Checkpoint, DispatchTask, Effect, RunState, RunSubmitted, transition
from streams.run_store import inline_of, read_state, records_of
from tests.models.run_builders import T0, secs

RUN = "crash-run"


def plan_of(steps: dict[str, dict[str, Any]], start: str) -> WorkflowPlan:
    return load_plan({"workflow_id": "w", "name": "n", "version": "1", "start_step": start, "steps": steps})


def chain() -> WorkflowPlan:
    return plan_of(
        {f"s{i}": {"id": f"s{i}", "agent_name": "a", "next_step": f"s{i + 1}" if i < 6 else None} for i in range(1, 7)},
        "s1",
    )


def mapped() -> WorkflowPlan:
    return plan_of(
        {
            "m": {
                "id": "m",
                "agent_name": "a",
                "map": {"over": [1, 2, 3, 4, 5, 6, 7], "max_concurrency": 3},
                "input_mapping": {"n": "${map.item}"},
                "next_step": "z",
            },
            "z": {"id": "z", "agent_name": "a", "input_mapping": {"all": "${m.output}"}},
        },
        "m",
    )


def looped() -> WorkflowPlan:
    return plan_of(
        {
            "w": {"id": "w", "agent_name": "a", "next_step": ["r1", "r2"]},
            "r1": {"id": "r1", "agent_name": "a", "next_step": "j"},
            "r2": {"id": "r2", "agent_name": "a", "next_step": "j"},
            "j": {
                "id": "j",
                "agent_name": "a",
                "loop": {"back_to": "w", "while": "${j.output.again} == true", "max_iterations": 3},
            },
        },
        "w",
    )


def answers(effects: list[Effect], n: int) -> list[AgentResultReceived]:
    out = []
    for effect in effects:
        if isinstance(effect, DispatchTask):
            task = effect.task
            output: Any = {"again": task.iteration < 3} if task.step_id == "j" else {"n": n}
            out.append(
                AgentResultReceived(
                    result=AgentResult(
                        correlation_id=task.correlation_id,
                        run_id=task.run_id,
                        step_id=task.step_id,
                        attempt=task.attempt,
                        iteration=task.iteration,
                        item=task.item,
                        status=ResultStatus.SUCCESS,
                        output=output,
                        started_at=T0,
                        finished_at=T0,
                    ),
                    at=T0 + secs(n),
                )
            )
    return out


@pytest.mark.parametrize("make", [chain, mapped, looped], ids=["chain", "map", "loop"])
def test_any_prefix_of_an_events_writes_reads_back_as_the_state_before_or_after(
    make: Callable[[], WorkflowPlan],
) -> None:
    table: dict[bytes, bytes] = {}
    state, effects = transition(None, RunSubmitted(run_id=RUN, plan=make(), input={"x": 1}, at=T0))
    assert state is not None
    first = records_of(None, state)
    table.update(first.writes)
    pending = answers(effects, 1)
    n, checked = 1, 0
    while pending:
        event = pending.pop(0)
        n += 1
        old = state
        new, effects = transition(old, event)
        if new is old:
            continue
        assert new is not None
        changed = next(e.changed for e in effects if isinstance(e, Checkpoint))
        head_key = RUN.encode()
        records = records_of(old, new, changed, inline_of(table[head_key]))
        parts = [(k, v) for k, v in records.writes.items() if k != head_key]
        for cut in range(len(parts) + 1):
            torn = dict(table)
            torn.update(parts[:cut])
            assert read_state(torn, RUN, torn[head_key]) == old, f"event {n}: {cut} of {len(parts)} parts written"
            checked += 1
        table.update(parts)
        table[head_key] = records.writes[head_key]
        for cut in range(len(records.deletes) + 1):
            torn = dict(table)
            for key in records.deletes[:cut]:
                torn.pop(key, None)
            assert read_state(torn, RUN, torn[head_key]) == new, f"event {n}: {cut} deletes done"
        for key in records.deletes:
            table.pop(key, None)
        state = new
        pending.extend(answers(effects, n))
    assert state.status == "COMPLETED"
    assert checked > 10


def test_a_part_is_only_ever_written_with_the_value_the_stored_head_already_has() -> None:
    state, effects = transition(None, RunSubmitted(run_id=RUN, plan=mapped(), input={}, at=T0))
    assert state is not None
    table: dict[bytes, bytes] = dict(records_of(None, state).writes)
    pending = answers(effects, 1)
    n = 1
    while pending:
        event = pending.pop(0)
        n += 1
        new, effects = transition(state, event)
        assert new is not None
        changed = next(e.changed for e in effects if isinstance(e, Checkpoint))
        before = read_state(table, RUN, table[RUN.encode()])
        records = records_of(state, new, changed, inline_of(table[RUN.encode()]))
        for key, value in records.writes.items():
            if b"/x/" in key:
                execution_key = key.decode().split("/x/", 1)[1]
                stored = before.executions[execution_key]
                assert type(stored).model_validate_json(value) == stored
        table.update(records.writes)
        state = new
        pending.extend(answers(effects, n))
    assert state.status == "COMPLETED"
    assert isinstance(state, RunState)
