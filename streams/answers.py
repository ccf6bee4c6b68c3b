"""What the two doors for a person's answer check before they send it.

``POST /runs/{run_id}/steps/{step_id}/input`` and ``faust -A streams.app input``
give the same answer for the same request:

* The run must wait on that step, now (:func:`models.run_input.waiting_execution`):
  otherwise the refusal names the run, the step and what it is doing.
* The answer must have the step's form (:func:`models.run_input.check_answer`):
  ``approve`` or ``reject`` for an approval step; text or data for an agent's
  question.
* Its control record must fit ``SWITCHYARD_MAX_MESSAGE_BYTES``.

The record names the question it answers (its ``turn``), so that of two
answers sent at once only the first is applied: the state machine refuses the
second (a dead letter with the reason), and an answer delivered twice is
applied once (its ``answer_id``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from models.messages import Answer, ControlCommand, ControlMessage, encode
from models.run import RunState
from models.run_input import InputRefused, check_answer, waiting_execution
from switchyard.http_guard import find_unstorable
from switchyard.limits import record_size

__all__ = ["ANSWER_FIELDS", "AnswerRefused", "answer_from", "answer_record"]

ANSWER_FIELDS = ("text", "data", "decision")
"""What an answer is made of, as the HTTP body and the CLI's options name it."""


class AnswerRefused(ValueError):
    """An answer that must not be sent.

    Attributes:
        status: The HTTP status that says why: 404 no such run, 409 not
            waiting, 400 a wrong form, 413 too large.
        details: For a machine: ``size`` and ``limit`` (413), ``path`` (a value the run cannot keep).
    """

    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.details = details


def answer_from(fields: Mapping[str, Any], source: str) -> Answer:
    """An answer from the fields a person gave (``text``, ``data``, ``decision``).

    Raises:
        AnswerRefused: 400, naming the field that is wrong.
    """
    try:
        answer = Answer(**{name: fields[name] for name in ANSWER_FIELDS if name in fields}, source=source)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}" for e in error.errors(include_url=False)
        )
        raise AnswerRefused(400, f"invalid answer: {problems}") from None
    # What the run cannot keep (a number out of range, a lone surrogate, a NUL): refused by both doors alike.
    found = find_unstorable({"text": answer.text, "data": answer.data})
    if found is not None:
        where, reason = found
        raise AnswerRefused(400, f"invalid answer: {where} {reason}", path=where)
    return answer


def answer_record(
    state: RunState | None,
    run_id: str,
    step_id: str,
    answer: Answer,
    *,
    limit: int,
    item: int | None = None,
    iteration: int | None = None,
) -> tuple[ControlMessage, bytes]:
    """The control message that carries an answer to the question ``step_id`` waits on, and its bytes.

    Args:
        state: The run as known (its live state, else its checkpoint); None if unknown.
        run_id: The run.
        step_id: The step answered.
        answer: The answer.
        limit: The most bytes a record may take.
        item: The map item answered (needed when several wait).
        iteration: The loop iteration answered (the one waiting, by default).

    Raises:
        AnswerRefused: See the module docstring.
    """
    if state is None:
        raise AnswerRefused(404, f"no run {run_id!r}")
    if step_id not in state.plan.steps:
        raise AnswerRefused(404, f"run {run_id!r} has no step {step_id!r}")
    try:
        execution = waiting_execution(state, step_id, iteration=iteration, item=item)
        check_answer(state.plan.steps[step_id], answer)
    except InputRefused as refused:
        raise AnswerRefused(400 if refused.form else 409, str(refused)) from None
    attempt = execution.current
    assert attempt is not None  # a waiting execution waits in its latest attempt
    message = ControlMessage(
        run_id=run_id,
        command=ControlCommand.INPUT,
        step_id=step_id,
        attempt=attempt.number,
        iteration=execution.iteration,
        item=execution.item,
        turn=attempt.turn,
        answer=answer,
    )
    try:
        value = encode(message)
    except ValueError as error:  # text that is not text: a lone surrogate in the data
        raise AnswerRefused(400, f"invalid answer: its data cannot be encoded ({str(error)[:200]})") from None
    size = record_size(run_id.encode(), value)
    if size > limit:
        raise AnswerRefused(
            413,
            f"the answer makes a record of {size} bytes, over the limit of {limit} (SWITCHYARD_MAX_MESSAGE_BYTES)",
            size=size,
            limit=limit,
        )
    return message, value
