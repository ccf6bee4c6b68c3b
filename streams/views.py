"""One view of a run, as the HTTP API, the CLI and the demo show it: plain JSON, built by pure functions.

A run is shown the same way whether it is read live from the executor's
table (:func:`state_view`) or from PostgreSQL (:func:`record_view`): its
fields, then its steps in plan order, each with its status, its latest
output and every attempt of every execution (each attempt names its loop
``iteration`` and map ``item``).

A person in the loop: each attempt shows its ``exchanges`` (every question
asked and its answer, as :class:`models.run_state.Exchange` in JSON) and its
agent's A2A ``task_id``; each step its open ``questions``, those its waiting
executions wait to have answered; the run how many executions wait
(``waiting``) and every open question of every step (``questions``), so a
person sees at once what to answer. An open question reads::

    {"step_id", "iteration", "item", "attempt", "turn", "kind", "text", "data", "asked_at", "deadline"}

``turn`` is the question's place among its attempt's exchanges (what an
answer names), ``kind`` is ``approval`` (answered by approve or reject) or
``question`` (an agent's), and ``deadline`` is when the wait for an answer
ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from models.plan import APPROVAL_AGENT
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
        attempts = [
            _attempt(a, execution.iteration, execution.item) for execution, e in executions for a in e["attempts"]
        ]
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
                "attempts": attempts,
                "questions": _open_questions(step_id, attempts),
            }
        )
    return {
        **_run_fields(data, state.plan.workflow_id, state.plan.version, state.version),
        **_waiting_fields(state.waiting, steps),
        "steps": steps,
        "source": "live",
    }


def record_view(record: RunRecord) -> dict[str, Any]:
    """A run from PostgreSQL: from its last snapshot when it has one, else (refused before it ran) from its rows."""
    if record.state is not None:
        return {**state_view(RunState.model_validate(record.state)), "source": "record"}
    data = record.model_dump(mode="json")
    steps = _steps_of_rows(record.steps)
    return {
        **_run_fields(data, record.workflow_id, record.workflow_version, record.version),
        **_waiting_fields(record.waiting, steps),
        "steps": steps,
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
        "task_id": a["task_id"],
        "exchanges": a["exchanges"],
    }


def _waiting_fields(waiting: int, steps: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The run's count of executions waiting for a person, and the open questions of its steps, in step order."""
    return {"waiting": waiting, "questions": [q for step in steps for q in step["questions"]]}


def _open_questions(step_id: str, attempts: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The open questions of a step: one per attempt (of its views) that waits for an answer.

    An attempt waits for one when it is WAITING and its latest exchange has no
    answer (:attr:`models.run_state.Attempt.question`); only an execution's
    latest attempt can.
    """
    questions = []
    for a in attempts:
        exchanges = a["exchanges"]
        if a["status"] != "WAITING" or not exchanges or exchanges[-1]["answer"] is not None:
            continue
        open_exchange = exchanges[-1]
        questions.append(
            {
                "step_id": step_id,
                "iteration": a["iteration"],
                "item": a["item"],
                "attempt": a["attempt"],
                "turn": sum(1 for e in exchanges if e["answer"] is not None),
                "kind": "approval" if a["agent_name"] == APPROVAL_AGENT else "question",
                "text": open_exchange["question"]["text"],
                "data": open_exchange["question"]["data"],
                "asked_at": open_exchange["asked_at"],
                "deadline": a["deadline"],
            }
        )
    return questions


def _steps_of_rows(rows: Sequence[StepRecord]) -> list[dict[str, Any]]:
    by_step: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_step.setdefault(row.step_id, []).append(row.model_dump(mode="json"))
    return [_step_of_rows(step_id, attempts) for step_id, attempts in by_step.items()]


def _step_of_rows(step_id: str, attempts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    rows = list(attempts)
    last = rows[-1]
    attempt_views = [
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
            "task_id": a["task_id"],
            "exchanges": a["exchanges"] or [],
        }
        for a in rows
    ]
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
        "attempts": attempt_views,
        "questions": _open_questions(step_id, attempt_views),
    }
