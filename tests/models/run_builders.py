"""Builders shared by the run state machine tests: plans, events and checks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from pydantic import JsonValue

from models.messages import AgentError, AgentResult, AgentTask, ResultStatus, utcnow
from models.plan import RetryPolicy, WorkflowPlan
from models.run import (
    AgentResultReceived,
    Checkpoint,
    DeadLetter,
    Effect,
    Event,
    Execution,
    ExecutionDefaults,
    RunState,
    RunSubmitted,
    transition,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
RUN_ID = "run-1"
INPUT: dict[str, JsonValue] = {"text": "hello"}

# Retries happen at once: the retried attempt is RUNNING, not PENDING.
NO_DELAY = RetryPolicy(max_attempts=3, initial_delay_s=0.0, jitter=0.0)

E = TypeVar("E")


def secs(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def at(seconds: float) -> datetime:
    """T0 plus ``seconds``."""
    return T0 + secs(seconds)


def step_ids(n_steps: int) -> list[str]:
    return [f"s{i}" for i in range(1, n_steps + 1)]


def make_plan(
    n_steps: int = 2,
    *,
    timeout_s: float | None = None,
    retry: RetryPolicy | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> WorkflowPlan:
    """A linear plan s1 -> s2 -> ...; s1 reads the workflow input, each later step the previous ``summary``.

    Args:
        n_steps: How many steps.
        timeout_s: Every step's ``timeout_s`` (None: the run's defaults).
        retry: Every step's retry policy (None: the run's defaults).
        overrides: Per step id, fields that replace the generated ones.
    """
    ids = step_ids(n_steps)
    steps: dict[str, dict[str, Any]] = {}
    for index, step_id in enumerate(ids):
        mapping: dict[str, Any] = (
            {"text": "${workflow.input.text}"}
            if index == 0
            else {"previous": "${" + ids[index - 1] + ".output.summary}", "topic": "${workflow.input.text}"}
        )
        step: dict[str, Any] = {
            "id": step_id,
            "agent_name": f"agent-{step_id}",
            "input_mapping": mapping,
            "next_step": ids[index + 1] if index + 1 < len(ids) else None,
        }
        if timeout_s is not None:
            step["timeout_s"] = timeout_s
        if retry is not None:
            step["retry"] = retry.model_dump()
        step.update((overrides or {}).get(step_id, {}))
        steps[step_id] = step
    return WorkflowPlan.model_validate(
        {"workflow_id": "wf", "name": "test workflow", "version": "1", "start_step": ids[0], "steps": steps}
    )


def submitted(
    plan: WorkflowPlan,
    *,
    when: datetime = T0,
    run_input: dict[str, JsonValue] | None = None,
    defaults: ExecutionDefaults | None = None,
    run_id: str = RUN_ID,
) -> RunSubmitted:
    return RunSubmitted(
        run_id=run_id,
        plan=plan,
        input=dict(INPUT) if run_input is None else run_input,
        at=when,
        defaults=defaults if defaults is not None else ExecutionDefaults(),
    )


def current_step(state: RunState) -> str | None:
    """The step a chain run is at: that of its latest execution, else the step that ended the run last."""
    latest = latest_execution(state)
    return latest.step_id if latest is not None else state.last_step


def latest_execution(state: RunState) -> Execution | None:
    """The execution started last, if any."""
    return next(reversed(state.executions.values()), None)


def execution_of(state: RunState, step_id: str, iteration: int | None = None, item: int | None = None) -> Execution:
    """The step's execution (of its current iteration unless one is given); asserts there is one."""
    found = state.execution(step_id, iteration, item)
    assert found is not None, f"no execution of {step_id!r}"
    return found


def start(plan: WorkflowPlan, **kwargs: Any) -> RunState:
    """A freshly submitted run (asserts it was created)."""
    state, _ = transition(None, submitted(plan, **kwargs))
    assert state is not None
    return state


def result(
    state: RunState,
    when: datetime,
    *,
    ok: bool = True,
    output: JsonValue = None,
    error: AgentError | None = None,
    step_id: str | None = None,
    attempt: int | None = None,
    correlation: str | None = None,
) -> AgentResultReceived:
    """A result for ``step_id`` (default: the current step), by default for its latest attempt.

    A success without an ``output`` carries ``{"summary": "out-<step>"}``, which the next step reads.
    """
    step_id = step_id if step_id is not None else current_step(state)
    assert step_id is not None
    execution = state.execution(step_id)
    current = execution.current if execution is not None else None
    number = attempt if attempt is not None else (current.number if current is not None else 1)
    if correlation is None:
        correlation = f"{state.run_id}/{step_id}/{number}"
    if ok and output is None:
        output = {"summary": f"out-{step_id}"}
    if not ok and error is None:
        error = AgentError(kind="agent_failed", message="agent exploded", retriable=True)
    return AgentResultReceived(
        result=AgentResult(
            correlation_id=correlation,
            run_id=state.run_id,
            step_id=step_id,
            attempt=number,
            status=ResultStatus.SUCCESS if ok else ResultStatus.FAILURE,
            output=output if ok else None,
            error=None if ok else error,
            started_at=when,
            finished_at=when,
        ),
        at=when,
    )


def success_for(task: AgentTask, output: JsonValue = None) -> AgentResult:
    """The agent's successful answer to ``task``, now; by default ``{"summary": "out-<step>"}``."""
    now = utcnow()
    return AgentResult(
        correlation_id=task.correlation_id,
        run_id=task.run_id,
        step_id=task.step_id,
        attempt=task.attempt,
        status=ResultStatus.SUCCESS,
        output={"summary": f"out-{task.step_id}"} if output is None else output,
        started_at=now,
        finished_at=now,
    )


def failure(
    state: RunState,
    when: datetime,
    *,
    kind: str = "agent_failed",
    message: str = "agent exploded",
    retriable: bool = True,
    **kwargs: Any,
) -> AgentResultReceived:
    error = AgentError(kind=kind, message=message, retriable=retriable)
    return result(state, when, ok=False, error=error, **kwargs)


def step(state: RunState | None, event: Event) -> tuple[RunState, list[Effect]]:
    """One transition that must leave a state (not None)."""
    new, effects = transition(state, event)
    assert new is not None
    return new, effects


def of_type(effects: Iterable[object], kind: type[E]) -> list[E]:
    return [effect for effect in effects if isinstance(effect, kind)]


def assert_changed(old: RunState | None, new: RunState | None, effects: Sequence[Effect]) -> None:
    """A changing transition: a new object, version + 1, one Checkpoint of it, last."""
    assert new is not None
    assert new is not old
    assert new.version == (1 if old is None else old.version + 1)
    assert effects, "a change has effects"
    assert_checkpoint(old, new, effects[-1])
    assert len(of_type(effects, Checkpoint)) == 1
    assert not of_type(effects, DeadLetter)


def changed_executions(old: RunState | None, new: RunState) -> frozenset[str]:
    """The keys of the executions that differ between ``old`` and ``new`` (added, changed or gone)."""
    before = old.executions if old is not None else {}
    differ = {k for k, e in new.executions.items() if before.get(k) is not e and before.get(k) != e}
    return frozenset(differ | (before.keys() - new.executions.keys()))


def assert_checkpoint(old: RunState | None, new: RunState, effect: object) -> None:
    """``effect`` checkpoints ``new``, naming the executions that changed since ``old`` (None: all of them).

    A missing one would leave its rows stale in PostgreSQL; an extra one costs a write for nothing.
    """
    assert isinstance(effect, Checkpoint), effect
    assert effect.state == new
    if effect.changed is not None:
        assert effect.changed == changed_executions(old, new)


def assert_unchanged(old: RunState | None, new: RunState | None, effects: Sequence[Effect]) -> None:
    """An idempotent transition: the very same object and no effects."""
    assert new is old
    assert effects == []
