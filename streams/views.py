"""One view of a run, as the HTTP API, the CLI and the demo show it: plain JSON, built by pure functions.

A run is shown the same way whether it is read live from the executor's
table (:func:`state_view`) or from PostgreSQL (:func:`record_view`): its
fields, then its steps in plan order, each with its status, its latest
output and every attempt of every execution (each attempt names its loop
``iteration`` and map ``item``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from models.run import Execution, RunState
from switchyard.db import RunRecord, StepRecord

__all__ = ["record_view", "state_view"]


def state_view(state: RunState) -> dict[str, Any]:
    """A run's live state."""
    data = state.model_dump(mode="json")
    order = [s for s in state.plan.order() if s in state.steps] + [
        s for s in state.steps if s not in state.plan.order()
    ]
    by_step: dict[str, list[tuple[Execution, dict[str, Any]]]] = {}
    for key, execution in state.executions.items():
        by_step.setdefault(execution.step_id, []).append((execution, data["executions"][key]))
    steps = []
    for step_id in order:
        step = data["steps"][step_id]
        executions = by_step.get(step_id, [])
        latest = executions[-1][1] if executions else None
        steps.append(
            {
                "step_id": step_id,
                "agent_name": step["agent_name"],
                "status": step["status"],
                "iteration": step["iteration"],
                "items": len(step["items"]) if step["items"] is not None else None,
                "output": state.output_of(step_id),
                "error": step["error"],
                "skip_reason": step["skip_reason"],
                "started_at": step["started_at"],
                "completed_at": step["completed_at"],
                "next_attempt_at": latest["next_attempt_at"] if latest is not None else None,
                "attempts": [
                    _attempt(a, execution.iteration, execution.item)
                    for execution, e in executions
                    for a in e["attempts"]
                ],
            }
        )
    return {
        **_run_fields(data, state.plan.workflow_id, state.plan.version, state.version),
        "steps": steps,
        "source": "live",
    }


def record_view(record: RunRecord) -> dict[str, Any]:
    """A run from PostgreSQL: from its last snapshot when it has one, else (refused before it ran) from its rows."""
    if record.state is not None:
        return {**state_view(RunState.model_validate(record.state)), "source": "record"}
    data = record.model_dump(mode="json")
    return {
        **_run_fields(data, record.workflow_id, record.workflow_version, record.version),
        "steps": _steps_of_rows(record.steps),
        "source": "record",
    }


def _run_fields(data: dict[str, Any], workflow_id: str, workflow_version: str, version: int) -> dict[str, Any]:
    return {
        "run_id": data["run_id"],
        "status": data["status"],
        "workflow_id": workflow_id,
        "workflow_version": workflow_version,
        "input": data["input"],
        "output": data["output"],
        "error": data["error"],
        "created_at": data["created_at"],
        "started_at": data["started_at"],
        "completed_at": data["completed_at"],
        "updated_at": data["updated_at"],
        "version": version,
    }


def _attempt(a: dict[str, Any], iteration: int, item: int | None) -> dict[str, Any]:
    return {
        "attempt": a["number"],
        "iteration": iteration,
        "item": item,
        "correlation_id": a["correlation_id"],
        "agent_name": a["agent_name"],
        "status": a["status"],
        "input": a["input"],
        "output": a["output"],
        "error": a["error"],
        "started_at": a["dispatch_at"],
        "deadline": a["deadline"],
        "completed_at": a["finished_at"],
    }


def _steps_of_rows(rows: Sequence[StepRecord]) -> list[dict[str, Any]]:
    by_step: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_step.setdefault(row.step_id, []).append(row.model_dump(mode="json"))
    return [_step_of_rows(step_id, attempts) for step_id, attempts in by_step.items()]


def _step_of_rows(step_id: str, attempts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    rows = list(attempts)
    last = rows[-1]
    return {
        "step_id": step_id,
        "agent_name": last["agent_name"],
        "status": last["status"],
        "iteration": last["iteration"],
        "items": None,
        "output": last["output_data"],
        "error": last["error"],
        "skip_reason": None,
        "started_at": rows[0]["started_at"],
        "completed_at": last["completed_at"],
        "next_attempt_at": None,
        "attempts": [
            {
                "attempt": a["attempt"],
                "iteration": a["iteration"],
                "item": a["item"],
                "correlation_id": a["correlation_id"],
                "agent_name": a["agent_name"],
                "status": a["status"],
                "input": a["input_data"],
                "output": a["output_data"],
                "error": a["error"],
                "started_at": a["started_at"],
                "deadline": a["deadline"],
                "completed_at": a["completed_at"],
            }
            for a in rows
        ],
    }
