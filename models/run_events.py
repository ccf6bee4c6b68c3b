"""The events a run reacts to and the effects its transitions ask for (data only)."""

from __future__ import annotations

from typing import TypeAlias

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue

from models.messages import AgentResult, AgentTask, Answer, MonitoringUpdate, RunId
from models.plan import WorkflowPlan
from models.run_state import ExecutionDefaults, RunError, RunState, RunStatus

__all__ = [
    "AgentResultReceived",
    "CancelAgentTask",
    "CancelRequested",
    "Checkpoint",
    "DeadLetter",
    "DispatchTask",
    "Effect",
    "Event",
    "InputGiven",
    "PublishMonitoring",
    "RetryRequested",
    "RunFinished",
    "RunRestored",
    "RunSubmitted",
    "ScheduleTimeout",
    "StepTimedOut",
    "event_run_id",
]

_FROZEN = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------- events


class RunSubmitted(BaseModel):
    """A submission arrived for ``run_id``."""

    model_config = _FROZEN

    run_id: RunId
    plan: WorkflowPlan
    input: dict[str, JsonValue] = Field(default_factory=dict)
    at: AwareDatetime
    defaults: ExecutionDefaults = ExecutionDefaults()


class AgentResultReceived(BaseModel):
    """The bridge reported the outcome of an attempt."""

    model_config = _FROZEN

    result: AgentResult
    at: AwareDatetime


class StepTimedOut(BaseModel):
    """An attempt's deadline passed (sent by a timer as a control event)."""

    model_config = _FROZEN

    run_id: str
    step_id: str
    attempt: int
    iteration: int = 1
    item: int | None = None
    at: AwareDatetime


class CancelRequested(BaseModel):
    """A user asked to stop the run."""

    model_config = _FROZEN

    run_id: str
    at: AwareDatetime
    reason: str = "cancelled by request"


class RetryRequested(BaseModel):
    """A user asked to run a FAILED run again from its failed executions."""

    model_config = _FROZEN

    run_id: str
    at: AwareDatetime


class InputGiven(BaseModel):
    """A person answered the question an execution waits on, or decided its approval.

    ``turn`` names the question: the attempt's ``turn``-th (from 0), in
    ``attempt`` when given. An answer to a question already answered, or not
    asked, is refused; the same answer again changes nothing.
    """

    model_config = _FROZEN

    run_id: str
    step_id: str
    iteration: int = 1
    item: int | None = None
    attempt: int | None = Field(None, ge=1)
    turn: int = Field(ge=0)
    answer: Answer
    at: AwareDatetime


class RunRestored(BaseModel):
    """The run's last checkpoint, to rebuild it when the table lost it (broker or disk gone)."""

    model_config = _FROZEN

    state: RunState
    at: AwareDatetime

    @property
    def run_id(self) -> str:
        """The run being restored."""
        return self.state.run_id


Event: TypeAlias = (
    RunSubmitted | AgentResultReceived | StepTimedOut | CancelRequested | RetryRequested | RunRestored | InputGiven
)


def event_run_id(event: Event) -> str:
    """The run an event belongs to."""
    return event.result.run_id if isinstance(event, AgentResultReceived) else event.run_id


# -------------------------------------------------------------------- effects


class DispatchTask(BaseModel):
    """Send ``task`` to the bridge, not before ``not_before`` (a delayed retry)."""

    model_config = _FROZEN

    task: AgentTask
    not_before: AwareDatetime | None = None


class ScheduleTimeout(BaseModel):
    """At ``at``, deliver :class:`StepTimedOut` for this attempt."""

    model_config = _FROZEN

    run_id: str
    step_id: str
    attempt: int
    iteration: int = 1
    item: int | None = None
    at: AwareDatetime


class CancelAgentTask(BaseModel):
    """Ask the agent to cancel the call with this correlation id, if it can."""

    model_config = _FROZEN

    run_id: str
    step_id: str
    attempt: int
    iteration: int = 1
    item: int | None = None
    correlation_id: str
    agent_name: str
    task_id: str | None = None


class PublishMonitoring(BaseModel):
    """Publish a live update."""

    model_config = _FROZEN

    update: MonitoringUpdate


class Checkpoint(BaseModel):
    """Write this snapshot to PostgreSQL.

    ``changed`` names the executions this change touched (their attempt rows
    are the ones to write); None means all of them.
    """

    model_config = _FROZEN

    state: RunState
    changed: frozenset[str] | None = None


class RunFinished(BaseModel):
    """The run reached an end."""

    model_config = _FROZEN

    run_id: str
    status: RunStatus
    output: JsonValue = None
    error: RunError | None = None


class DeadLetter(BaseModel):
    """The event cannot be applied to any run; park it with the reason."""

    model_config = _FROZEN

    run_id: str
    reason: str


Effect: TypeAlias = (
    DispatchTask | ScheduleTimeout | CancelAgentTask | PublishMonitoring | Checkpoint | RunFinished | DeadLetter
)
