"""Runs that cannot be stored: too large for a record, or a stored record that cannot be read.

Both end the run FAILED, with a record that fits: large values are replaced by
:func:`dropped` notes, and, if that is not enough, the plan's mappings and
then the history go too. Pure, like :mod:`models.run`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from pydantic import JsonValue

from models.messages import AgentError, ErrorKind, MonitoringUpdate
from models.plan import WorkflowPlan, WorkflowStep
from models.run_events import CancelAgentTask, Checkpoint, Effect, PublishMonitoring, RunFinished
from models.run_state import (
    Attempt,
    Exchange,
    Execution,
    ExecutionDefaults,
    RunError,
    RunState,
    RunStatus,
    StepStatus,
)

__all__ = ["dropped", "fail_too_large", "fail_unreadable", "step_in_flight"]

_KEEP_BYTES = 1024
"""Values up to this size stay in a reduced state; larger ones are replaced by a note of what they were."""

_UNKNOWN_VERSION = 2**53
"""The version of a record that replaces a snapshot whose version cannot be read: newer than any."""

_STUB_PLAN = WorkflowPlan(
    workflow_id="(unreadable)",
    name="(unreadable)",
    version="0",
    start_step="unreadable",
    steps={"unreadable": WorkflowStep(id="unreadable", agent_name="(none)")},
)


def dropped(value: JsonValue, reason: str) -> dict[str, JsonValue]:
    """What stands in a reduced state for a value that was dropped: its size, its SHA-256 and why.

    Both are of the value as compact UTF-8 JSON.
    """
    raw = _compact_json(value)
    return {"dropped": {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "reason": reason}}


def fail_too_large(
    before: RunState | None, after: RunState, *, size: int, limit: int, at: datetime
) -> tuple[RunState, list[Effect]]:
    """The run's next state would be ``size`` bytes, over ``limit``: fail the run instead.

    The failure must be recorded, so the state is stored in a reduced form
    that fits: large inputs and outputs are replaced by :func:`dropped` notes
    (then all of them, then the plan's mappings, then the history), and the
    run is FAILED with kind ``state_too_large`` naming both sizes. What the
    transition wanted to do (dispatch the next steps, ...) is not done; the
    attempts that were in flight before are cancelled at their agents.

    Args:
        before: The stored state (None for a new run).
        after: The state the transition produced (or ``before`` itself when
            the stored state is already too large).
        size: The encoded size of ``after``, in bytes.
        limit: The most a stored state may take.
        at: The time of the event.

    Returns:
        The reduced FAILED state and its effects.
    """
    error = RunError(
        kind=ErrorKind.STATE_TOO_LARGE,
        message=(
            f"the run's state would be {size} bytes, over the limit of {limit} bytes "
            "(SWITCHYARD_MAX_MESSAGE_BYTES); the run is stored without its large inputs and outputs"
        ),
        step_id=step_in_flight(after),
        details={"size": size, "limit": limit},
    )
    # Above both, so that this record replaces any snapshot PostgreSQL has of either.
    version = max(after.version, before.version if before is not None else 0) + 1
    # Only an attempt sent before this event (not one the transition just opened, nor one whose
    # result this is) may be at an agent now.
    sent = [c for c in _in_flight(after, at) if _sent_before(before, after, c, at)]
    failed = _failed_run(after, error, at).model_copy(update={"version": version})
    reduced = _reduce(failed, limit, ErrorKind.STATE_TOO_LARGE)
    return reduced, [*sent, *_finish_effects(reduced, at)]


def fail_unreadable(run_id: str, raw: Any, reason: str, at: datetime, *, limit: int) -> tuple[RunState, list[Effect]]:
    """A stored state that cannot be read (a broken or foreign record): fail the run with the reason.

    What can be read of it is kept (the plan, the input and the times when
    they are valid), so that the record says which run this was.

    Args:
        run_id: The run.
        raw: The stored JSON, decoded as far as it could be (None if not at all).
        reason: Why it cannot be read.
        at: Now.
        limit: The most a stored state may take: what is kept is reduced to fit.

    Returns:
        A FAILED state of kind ``unreadable_state`` and its effects.
    """
    data: dict[str, Any] = raw if isinstance(raw, dict) else {}
    try:
        plan = WorkflowPlan.model_validate(data.get("plan"))
    except ValueError:
        plan = _STUB_PLAN
    stored_input = data.get("input")
    run_input: dict[str, JsonValue] = stored_input if isinstance(stored_input, dict) else {}
    version = data.get("version")
    error = RunError(
        kind=ErrorKind.UNREADABLE_STATE,
        message=f"the run's stored state cannot be read, so the run cannot go on: {reason}",
        details={"reason": reason[:2000]},
    )
    failed = RunState(
        run_id=run_id,
        status=RunStatus.FAILED,
        plan=plan,
        input={},
        error=error,
        created_at=at,
        completed_at=at,
        updated_at=at,
        version=_UNKNOWN_VERSION,
    )
    salvaged = {
        "input": run_input,
        "created_at": data.get("created_at") or at,
        "started_at": data.get("started_at"),
        # Above the stored snapshot's, so that this record replaces it in PostgreSQL.
        "version": version + 1
        if isinstance(version, int) and not isinstance(version, bool) and version >= 1
        else _UNKNOWN_VERSION,
    }
    try:
        state = RunState.model_validate({**failed.model_dump(), **salvaged})
    except ValueError:  # what was kept is itself broken (a time that is not one, say)
        state = failed
    state = _reduce(state, limit, ErrorKind.UNREADABLE_STATE)
    return state, _finish_effects(state, at)


def step_in_flight(state: RunState) -> str | None:
    """The step the run was at: of its latest open execution, else the last one that ended a path."""
    open_executions = state.open_executions()
    return open_executions[-1].step_id if open_executions else state.last_step


def _failed_run(state: RunState, error: RunError, at: datetime) -> RunState:
    """``state`` FAILED with ``error``; its open executions and steps fail with it."""
    step_error = AgentError(kind=error.kind, message=error.message[:10_000], retriable=False)
    executions = dict(state.executions)
    for key, execution in state.executions.items():
        if execution.status.finished:
            continue
        attempts = execution.attempts
        current = execution.current
        if current is not None and not current.status.finished:
            ended = current.model_copy(update={"status": StepStatus.FAILED, "finished_at": at, "error": step_error})
            attempts = (*attempts[:-1], ended)
        executions[key] = execution.model_copy(
            update={
                "status": StepStatus.FAILED,
                "attempts": attempts,
                "error": step_error,
                "next_attempt_at": None,
                "completed_at": at,
            }
        )
    steps = {
        k: s
        if s.status.finished
        else s.model_copy(update={"status": StepStatus.FAILED, "error": step_error, "completed_at": at})
        for k, s in state.steps.items()
    }
    return state.model_copy(
        update={
            "steps": steps,
            "executions": executions,
            "status": RunStatus.FAILED,
            "output": None,
            "error": error,
            "waiting": 0,  # its waiting executions failed with it
            "completed_at": at,
            "updated_at": max(at, state.updated_at),
        }
    )


def _in_flight(state: RunState, at: datetime) -> list[CancelAgentTask]:
    from models.run import cancel_in_flight  # the transitions build on this module, not the other way

    return cancel_in_flight(state, at)


def _sent_before(before: RunState | None, after: RunState, cancel: CancelAgentTask, at: datetime) -> bool:
    """Whether the attempt ``cancel`` names was in flight before this event (so it may be at an agent)."""
    if before is None:  # a restored run: its attempt was sent before the restore
        execution = after.execution(cancel.step_id, cancel.iteration, cancel.item)
        attempt = execution.current if execution else None
        return attempt is not None and attempt.dispatch_at < at
    execution = before.execution(cancel.step_id, cancel.iteration, cancel.item)
    return execution is not None and any(
        a.correlation_id == cancel.correlation_id and not a.status.finished for a in execution.attempts
    )


def _finish_effects(state: RunState, at: datetime) -> list[Effect]:
    detail: dict[str, JsonValue] = {}
    if state.error is not None:
        detail = {"error": state.error.message, "kind": state.error.kind, "step_id": state.error.step_id}
    return [
        PublishMonitoring(
            update=MonitoringUpdate(run_id=state.run_id, status=state.status, timestamp=at, detail=detail)
        ),
        RunFinished(run_id=state.run_id, status=state.status, output=state.output, error=state.error),
        Checkpoint(state=state),
    ]


def _encoded_size(state: RunState) -> int:
    return len(state.model_dump_json().encode()) + len(state.run_id.encode())


def _reduce(state: RunState, limit: int, reason: str) -> RunState:
    """``state`` made to fit in ``limit`` bytes, giving up as little as it can.

    In turn: inputs and outputs over 1 KiB, then all of them, then the plan's
    mappings and the registry policies copied into the run, then the history
    and the plan itself (the run's identity and its error stay). The last
    form is a few hundred bytes, far below the smallest limit the settings allow.
    """
    for keep in (_KEEP_BYTES, 0):
        state = _drop_values(state, keep, reason)
        if _encoded_size(state) <= limit:
            return state
    plan = state.plan.model_copy(
        update={
            "steps": {k: s.model_copy(update={"input_mapping": {}}) for k, s in state.plan.steps.items()},
            "output": None,
        }
    )
    defaults = ExecutionDefaults(timeout_s=state.defaults.timeout_s, retry=state.defaults.retry)
    state = state.model_copy(update={"plan": plan, "defaults": defaults})
    if _encoded_size(state) <= limit:
        return state
    stub = _STUB_PLAN.model_copy(
        update={
            "workflow_id": state.plan.workflow_id,
            "name": state.plan.name,
            "version": state.plan.version,
        }
    )
    error = state.error
    if error is not None:
        error = error.model_copy(update={"message": error.message[:2000], "details": _small_details(error.details)})
    return state.model_copy(update={"plan": stub, "steps": {}, "executions": {}, "last_step": None, "error": error})


def _small_details(details: JsonValue) -> JsonValue:
    return details if _json_size(details) <= _KEEP_BYTES else None


def _compact_json(value: JsonValue) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def _json_size(value: JsonValue) -> int:
    """The bytes of ``value`` as compact JSON (what :func:`dropped` counts)."""
    return len(_compact_json(value))


def _is_dropped(value: JsonValue) -> bool:
    return isinstance(value, dict) and set(value) == {"dropped"} and isinstance(value["dropped"], dict)


def _drop_values(state: RunState, keep: int, reason: str) -> RunState:
    """Replace inputs and outputs larger than ``keep`` bytes by a note of what they were (notes stay)."""

    def small(value: JsonValue) -> JsonValue:
        if value is None or _is_dropped(value) or _json_size(value) <= keep:
            return value
        return dropped(value, reason)

    def exchange(x: Exchange) -> Exchange:
        question = x.question.model_copy(update={"data": small(x.question.data)})
        answer = x.answer.model_copy(update={"data": small(x.answer.data)}) if x.answer is not None else None
        return x.model_copy(update={"question": question, "answer": answer})

    def attempt(a: Attempt) -> Attempt:
        exchanges = tuple(exchange(x) for x in a.exchanges)
        return a.model_copy(update={"input": small(a.input), "output": small(a.output), "exchanges": exchanges})

    def execution(e: Execution) -> Execution:
        attempts = tuple(attempt(a) for a in e.attempts)
        return e.model_copy(update={"attempts": attempts, "default_output": small(e.default_output)})

    steps = {}
    for step_id, step in state.steps.items():
        items = step.items
        if items is not None and not _is_dropped(list(items)) and _json_size(list(items)) > keep:
            items = tuple(small(i) for i in items)
        steps[step_id] = step.model_copy(update={"items": items})
    executions = {k: execution(e) for k, e in state.executions.items()}
    run_input = state.input
    if run_input and not _is_dropped(run_input) and _json_size(run_input) > keep:
        run_input = dropped(run_input, reason)
    return state.model_copy(
        update={"steps": steps, "executions": executions, "input": run_input, "output": small(state.output)}
    )
