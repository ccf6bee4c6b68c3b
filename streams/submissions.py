"""What the two front doors (``POST /runs/`` and ``submit``) check before they produce a submission.

* Size: a submission whose record would be over ``SWITCHYARD_MAX_MESSAGE_BYTES``
  is refused before it is sent (the broker would refuse it, or the executor
  would dead-letter it), naming its size and the limit.
* A run_id means one run: the same run_id with the same plan and input is the
  same request again (idempotent: it points to the existing run); with a
  different plan or input it is refused, naming the existing run.

Both checks are plain functions so that the HTTP API and the CLI give the same
answer for the same submission. A submission produced by any other Kafka
producer gets the same treatment from the executor (dead letter).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from models.messages import WorkflowSubmission, encode, submission_fingerprint
from models.run import RunState
from switchyard.db import RunRecord

__all__ = ["Refusal", "SubmissionRefused", "encode_submission", "is_repeat"]


class Refusal(StrEnum):
    """Why a submission was refused before it was sent."""

    TOO_LARGE = "too_large"
    RUN_ID_IN_USE = "run_id_in_use"


class SubmissionRefused(ValueError):
    """A submission that must not be sent.

    Attributes:
        refusal: Which check refused it.
        details: Figures for a machine (``size``, ``limit``, ``run_id``, ``status``).
    """

    def __init__(self, refusal: Refusal, message: str, **details: Any) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.details = details


def encode_submission(submission: WorkflowSubmission, limit: int) -> bytes:
    """The submission's record, or a refusal when it (with its key) is over ``limit`` bytes.

    Raises:
        SubmissionRefused: With ``size`` and ``limit``.
    """
    value = encode(submission)
    size = len(value) + len(submission.run_id.encode())
    if size > limit:
        raise SubmissionRefused(
            Refusal.TOO_LARGE,
            f"the submission is {size} bytes, over the limit of {limit} (SWITCHYARD_MAX_MESSAGE_BYTES)",
            size=size,
            limit=limit,
        )
    return value


def is_repeat(submission: WorkflowSubmission, live: RunState | None, record: RunRecord | None) -> bool:
    """Whether ``submission`` repeats an existing run; refuses it when its run_id belongs to another.

    Args:
        submission: What is about to be sent.
        live: The run's state in the executor's table, when this worker has it.
        record: The run as recorded in PostgreSQL, if it is.

    Returns:
        True when a run with this id exists and was started by the same plan
        and input (send nothing, point to it); False when no run has the id.

    Raises:
        SubmissionRefused: The run_id is used by a run with another plan or
            input, or by a submission that was refused (recorded without a plan).
    """
    existing = _fingerprint_of(live, record)
    if live is None and record is None:
        return False
    status = str(live.status if live is not None else record.status if record is not None else "")
    if existing is not None and existing == submission.fingerprint():
        return True
    raise SubmissionRefused(
        Refusal.RUN_ID_IN_USE,
        f"run_id {submission.run_id!r} is already used by run {submission.run_id!r} ({status}) with a different"
        " plan or input; submit with another run_id, or without one",
        run_id=submission.run_id,
        status=status,
    )


def _fingerprint_of(live: RunState | None, record: RunRecord | None) -> str | None:
    """The fingerprint of the submission that started a run, from its live state or its record."""
    if live is not None:
        return live.fingerprint or submission_fingerprint(live.plan, live.input)
    return record.submission_fingerprint() if record is not None else None
