"""A person's answers to the questions a run waits on: which execution is answered, and whether an answer fits.

Pure functions of a :class:`~models.run_state.RunState`, used twice with the
same rules: by the HTTP API and the CLI, to refuse a wrong answer at once
with the reason, before anything is sent; and by the state machine
(:mod:`models.run`), which applies an answer only when it still fits (two
people answering at once: the first wins, the second is refused).
"""

from __future__ import annotations

from models.messages import Answer
from models.plan import WorkflowStep
from models.run_state import Execution, RunState, RunStatus, execution_key

__all__ = ["InputRefused", "answer_refusal", "answered_already", "check_answer", "waiting_execution"]


class InputRefused(ValueError):
    """An answer that cannot be applied; the message says why, naming the run and the step.

    Attributes:
        form: Whether the answer itself is wrong (a decision where text was
            asked for, or none where one was), rather than the run not waiting.
    """

    def __init__(self, message: str, *, form: bool = False) -> None:
        super().__init__(message)
        self.form = form


def waiting_execution(
    state: RunState, step_id: str, *, iteration: int | None = None, item: int | None = None
) -> Execution:
    """The execution of ``step_id`` that waits for a person now.

    Args:
        state: The run.
        step_id: The step the person answers.
        iteration: Only in this loop iteration (any, when None).
        item: Only this map item (any, when None: then exactly one may wait).

    Raises:
        InputRefused: The run is not running, has no such step, the step does
            not wait, or several of its map items wait and none was named.
    """
    run_id = state.run_id
    if step_id not in state.plan.steps:
        raise InputRefused(f"run {run_id!r} has no step {step_id!r}")
    if state.status is not RunStatus.RUNNING:
        raise InputRefused(
            f"step {step_id!r} of run {run_id!r} does not wait for input: the run is {state.status}"
            " (only a RUNNING run waits for input)"
        )
    waiting = [
        execution
        for execution in state.waiting_executions()
        if execution.step_id == step_id
        and (iteration is None or execution.iteration == iteration)
        and (item is None or execution.item == item)
    ]
    if not waiting:
        step = state.steps.get(step_id)
        now = f"it is {step.status}" if step is not None else "it has not started"
        where = "" if item is None else f" item {item}"
        raise InputRefused(f"step {step_id!r}{where} of run {run_id!r} is not waiting for input ({now})")
    if len(waiting) > 1:
        items = ", ".join(str(e.item) for e in waiting[:20])
        raise InputRefused(
            f"{len(waiting)} items of step {step_id!r} of run {run_id!r} wait for input (items {items}); name one"
        )
    return waiting[0]


def check_answer(step: WorkflowStep, answer: Answer) -> None:
    """Whether an answer has the form its step asks for: a decision for an approval, text or data for a question.

    Raises:
        InputRefused: It has not.
    """
    if step.approval is not None:
        if answer.decision is None:
            raise InputRefused(
                f"step {step.id!r} is an approval: decide with approve or reject (and optional data)", form=True
            )
        return
    if answer.decision is not None:
        raise InputRefused(
            f"step {step.id!r} waits for an answer to its agent's question, not a decision: give text or data",
            form=True,
        )
    if not answer.text and answer.data is None:
        raise InputRefused(f"an answer to step {step.id!r} needs text or data", form=True)


def answered_already(state: RunState, step_id: str, iteration: int, item: int | None, answer_id: str) -> bool:
    """Whether an answer with this id was applied to the execution already (in any of its attempts)."""
    execution = state.executions.get(execution_key(step_id, iteration, item))
    if execution is None:
        return False
    return any(
        exchange.answer is not None and exchange.answer.answer_id == answer_id
        for attempt in execution.attempts
        for exchange in attempt.exchanges
    )


def answer_refusal(
    state: RunState,
    step_id: str,
    iteration: int,
    item: int | None,
    turn: int,
    answer: Answer,
    attempt: int | None = None,
) -> str | None:
    """Why the state machine does not apply this answer now, or None when it does.

    It applies to the execution (``step_id``, ``iteration``, ``item``) only
    while that execution waits on its ``turn``-th question (from 0), in
    ``attempt`` when one is named. An answer applied already is a repeat
    (:func:`answered_already`), which the caller ignores first.
    """
    try:
        found = waiting_execution(state, step_id, iteration=iteration, item=item)
        check_answer(state.plan.steps[step_id], answer)
    except InputRefused as refused:
        return str(refused)
    current = found.current
    assert current is not None  # a waiting execution waits in its latest attempt
    where = f"step {step_id!r}" if item is None else f"step {step_id!r} item {item}"
    if found.item != item:
        return f"{where} of run {state.run_id!r} is not waiting for input; item {found.item} is"
    if attempt is not None and attempt != current.number:
        return (
            f"{where} of run {state.run_id!r}: the answer is for attempt {attempt}, and attempt {current.number} waits"
        )
    if turn != current.turn:
        said = "was answered already" if turn < current.turn else "has not been asked"
        return f"{where} of run {state.run_id!r}: question {turn + 1} {said}; question {current.turn + 1} waits"
    return None
