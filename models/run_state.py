"""What is known about a run: its steps, their executions and attempts (the state the machine transforms).

Three levels, each with one job:

* :class:`StepState`: one per step of the plan that the run has reached, in
  its current loop iteration: waiting for its join, running, done or skipped,
  with its latest output (what mappings read).
* :class:`Execution`: one run of a step, identified by the step, its loop
  iteration and, in a map step, the item. Every iteration and every item is
  its own execution, recorded with its own attempts.
* :class:`Attempt`: one agent call of an execution, identified by its
  correlation id (also the call's idempotency key). An attempt whose agent
  asked a question (A2A ``INPUT_REQUIRED``), or an approval step's attempt,
  is WAITING for a person; its :class:`Exchange` records hold each question
  and answer.

Pure data: the transitions live in :mod:`models.run`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, model_validator

from models.agents import RecoveryPolicy
from models.messages import AgentError, Answer, Question
from models.plan import DEFAULT_INPUT_TIMEOUT_S, DEFAULT_RETRY, MAX_INPUT_TIMEOUT_S, RetryPolicy, WorkflowPlan

__all__ = [
    "AgentPolicy",
    "Attempt",
    "DEFAULT_INPUT_TIMEOUT_S",
    "Exchange",
    "Execution",
    "ExecutionDefaults",
    "RunError",
    "RunState",
    "RunStatus",
    "StepState",
    "StepStatus",
    "execution_key",
    "map_item_counts",
    "map_item_keys",
    "step_output",
]

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class RunStatus(StrEnum):
    """Where a run is in its life."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        """Whether the run has reached an end (a retry may reopen FAILED)."""
        return self in _RUN_ENDS


class StepStatus(StrEnum):
    """Where a step, an execution, or one attempt is.

    A step is PENDING while it waits for the steps that lead to it (its
    join); an attempt is PENDING while it waits for its delayed dispatch. An
    attempt, and its execution, are WAITING while a person has a question to
    answer (an agent's, or an approval step's). A
    step is SKIPPED when no route taken leads to it, when it lost a race into
    an any-join, or when its attempts ran out and the agent's recovery policy
    says to go on with a default output (then it has an output).
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"

    @property
    def finished(self) -> bool:
        """Whether nothing more will happen to it."""
        return self in _STEP_ENDS


_RUN_ENDS = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
_STEP_ENDS = frozenset({StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.CANCELLED, StepStatus.SKIPPED})


class AgentPolicy(BaseModel):
    """What the registry says about one agent, copied into the run when it starts."""

    model_config = _FROZEN

    timeout_s: float | None = Field(None, gt=0, le=86_400)
    input_timeout_s: float | None = Field(None, gt=0, le=MAX_INPUT_TIMEOUT_S)
    retry: RetryPolicy | None = None
    recovery: RecoveryPolicy = RecoveryPolicy()


class ExecutionDefaults(BaseModel):
    """What a step uses when the plan does not say.

    The order is: the plan's step, then the agent's registry entry
    (``agents``), then these global defaults. The registry is read once, when
    the run starts, so a run behaves the same after a restart.
    """

    model_config = _FROZEN

    timeout_s: float = Field(300.0, gt=0, le=86_400)
    input_timeout_s: float = Field(DEFAULT_INPUT_TIMEOUT_S, gt=0, le=MAX_INPUT_TIMEOUT_S)
    retry: RetryPolicy = DEFAULT_RETRY
    agents: dict[str, AgentPolicy] = Field(default_factory=dict)

    def agent(self, name: str) -> AgentPolicy:
        """The registry's policy for an agent (empty when it says nothing)."""
        return self.agents.get(name) or _NO_POLICY


_NO_POLICY = AgentPolicy()


class RunError(BaseModel):
    """Why a run failed (or was cancelled)."""

    model_config = _FROZEN

    kind: str
    message: str
    step_id: str | None = None
    attempt: int | None = None
    iteration: int | None = None
    item: int | None = None
    details: JsonValue = None


def map_item_counts(state: RunState) -> dict[str, list[int]]:
    """How many items each map step has started, per iteration (its earlier ones, then its current one).

    This names a run's item executions (:func:`map_item_keys`) without listing
    them: a map of 1,000 items is a number, not 1,000 keys, in what is stored
    at every change.
    """
    return {k: [*s.past_items, s.next_item] for k, s in state.steps.items() if s.next_item or s.past_items}


def map_item_keys(counts: Mapping[str, Sequence[int]]) -> Iterator[str]:
    """The keys of the item executions that :func:`map_item_counts` counted, step by step, in order."""
    for step_id, per_iteration in counts.items():
        for iteration, count in enumerate(per_iteration, start=1):
            for item in range(count):
                yield execution_key(step_id, iteration, item)


def execution_key(step_id: str, iteration: int = 1, item: int | None = None) -> str:
    """The key of an execution in :attr:`RunState.executions`: ``step@iteration`` or ``step@iteration[item]``.

    Step ids hold neither ``@`` nor ``[``, so the key is unambiguous; it is
    only ever built here, never parsed.
    """
    return f"{step_id}@{iteration}" if item is None else f"{step_id}@{iteration}[{item}]"


class Exchange(BaseModel):
    """One question a person was asked during an attempt, and their answer once given."""

    model_config = _FROZEN

    question: Question
    asked_at: AwareDatetime
    answer: Answer | None = None
    answered_at: AwareDatetime | None = None


class Attempt(BaseModel):
    """One try at an execution: one agent call, identified by its correlation id.

    While it is WAITING, its ``deadline`` is the input deadline (the call's
    deadline is suspended); once answered, the call goes on with a new one.
    """

    model_config = _FROZEN

    number: int = Field(ge=1)
    correlation_id: str
    agent_name: str
    status: StepStatus
    input: JsonValue
    dispatch_at: AwareDatetime = Field(
        description="When the call is (or was) sent; later than now for a delayed retry."
    )
    deadline: AwareDatetime
    finished_at: AwareDatetime | None = None
    output: JsonValue = None
    error: AgentError | None = None
    exchanges: tuple[Exchange, ...] = Field((), description="The questions asked so far, and their answers.")
    task_id: str | None = Field(None, description="The agent's A2A task, once it asked a question.")
    context_id: str | None = Field(None, description="The A2A task's context.")

    @property
    def turn(self) -> int:
        """How many answers the call has carried on from (the turn of its next task or result)."""
        return sum(1 for exchange in self.exchanges if exchange.answer is not None)

    @property
    def question(self) -> Exchange | None:
        """The exchange that waits for its answer, while the attempt is WAITING."""
        if self.status is StepStatus.WAITING and self.exchanges and self.exchanges[-1].answer is None:
            return self.exchanges[-1]
        return None


class Execution(BaseModel):
    """One run of a step (an iteration of a loop, an item of a map), with all its attempts."""

    model_config = _FROZEN

    step_id: str
    iteration: int = Field(1, ge=1)
    item: int | None = Field(None, ge=0)
    agent_name: str
    status: StepStatus
    attempts: tuple[Attempt, ...] = ()
    first_attempt_of_round: int = Field(1, description="A retry request opens a new round with a fresh budget.")
    fallback_agent: str | None = Field(
        None, description="Set when the recovery policy moved the execution to another agent."
    )
    next_attempt_at: AwareDatetime | None = None
    default_output: JsonValue = Field(
        None,
        description="The output the recovery policy gave a SKIPPED execution (a completed one's is its attempt's).",
    )
    error: AgentError | None = None
    started_at: AwareDatetime | None = None
    completed_at: AwareDatetime | None = None

    @property
    def output(self) -> JsonValue:
        """Its output: the completed attempt's, or the recovery policy's default (each stored once)."""
        if self.status is StepStatus.SKIPPED:
            return self.default_output
        current = self.current
        return current.output if self.status is StepStatus.COMPLETED and current is not None else None

    @property
    def key(self) -> str:
        """Its key in :attr:`RunState.executions`."""
        return execution_key(self.step_id, self.iteration, self.item)

    @property
    def current(self) -> Attempt | None:
        """The latest attempt, if any."""
        return self.attempts[-1] if self.attempts else None

    @property
    def agent(self) -> str:
        """The agent its next attempt calls (the fallback once the recovery policy chose one)."""
        return self.fallback_agent or self.agent_name


class StepState(BaseModel):
    """A step of one run, in its current loop iteration."""

    model_config = _FROZEN

    step_id: str
    agent_name: str
    status: StepStatus
    iteration: int = Field(1, ge=1, description="The loop iteration it is in (1 outside loops).")
    arrived: tuple[str, ...] = Field((), description="The steps leading here that have finished, this iteration.")
    chosen_by: tuple[str, ...] = Field((), description="Those of them that chose this step (a route taken).")
    has_output: bool = Field(False, description="Whether later steps can read its output (the latest iteration's).")
    output_key: str | None = Field(
        None,
        description="The execution whose output is the step's; for a map step, of its items (the output is theirs, "
        "in order): the output is stored once, in the execution.",
    )
    output_items: int | None = Field(None, ge=0, description="A map step's item count in that iteration.")
    error: AgentError | None = None
    skip_reason: str | None = None
    items: tuple[JsonValue, ...] | None = Field(None, description="A map step's list, once read.")
    next_item: int = Field(0, ge=0, description="A map step's next item to start.")
    open_items: int = Field(0, ge=0, description="A map step's items in flight.")
    past_items: tuple[int, ...] = Field(
        (), description="A map step in a loop: how many items each earlier iteration started."
    )
    started_at: AwareDatetime | None = None
    completed_at: AwareDatetime | None = None


class RunState(BaseModel):
    """Everything known about one run. Stored in the ``runs`` table as JSON."""

    model_config = _FROZEN

    run_id: str
    status: RunStatus
    plan: WorkflowPlan
    input: dict[str, JsonValue]
    fingerprint: str | None = Field(
        None, description="submission_fingerprint of the submission that started the run (a run_id means one run)."
    )
    defaults: ExecutionDefaults = ExecutionDefaults()
    steps: dict[str, StepState] = Field(default_factory=dict, description="Steps reached, in the order reached.")
    executions: dict[str, Execution] = Field(
        default_factory=dict, description="Every execution, in the order started, by execution_key."
    )
    last_step: str | None = Field(
        None,
        description="The step that ended a path last (its output is the run's by default), or the one that failed.",
    )
    output: JsonValue = None
    error: RunError | None = None
    waiting: int = Field(0, ge=0, description="How many executions wait for a person's answer (a RUNNING run).")
    created_at: AwareDatetime
    started_at: AwareDatetime | None = None
    completed_at: AwareDatetime | None = None
    updated_at: AwareDatetime
    version: int = Field(1, ge=1, description="Bumped by every change; orders snapshots.")

    @model_validator(mode="before")
    @classmethod
    def _from_chain_state(cls, data: Any) -> Any:
        # States written before plans had branches: one StepState per step, holding its attempts.
        if isinstance(data, dict) and "current_step" in data:
            return _upgrade_chain_state(data)
        return data

    def execution(self, step_id: str, iteration: int | None = None, item: int | None = None) -> Execution | None:
        """An execution of a step: of its current iteration unless one is given."""
        if iteration is None:
            step = self.steps.get(step_id)
            iteration = step.iteration if step is not None else 1
        return self.executions.get(execution_key(step_id, iteration, item))

    def output_of(self, step_id: str) -> JsonValue:
        """A step's latest output (None when it has none): read from its execution, or its items, in order."""
        step = self.steps.get(step_id)
        return None if step is None else step_output(step, self.executions)

    def open_executions(self) -> list[Execution]:
        """The executions that have not finished, in the order they started."""
        return [e for e in self.executions.values() if not e.status.finished]

    def waiting_executions(self) -> list[Execution]:
        """The executions waiting for a person's answer, in the order they started."""
        return [e for e in self.executions.values() if e.status is StepStatus.WAITING]

    def awaits(self, step_id: str, attempt: int, iteration: int = 1, item: int | None = None) -> bool:
        """Whether that attempt is its execution's latest and still waits for its result, in a running run."""
        execution = self.executions.get(execution_key(step_id, iteration, item))
        current = execution.current if execution else None
        return (
            self.status is RunStatus.RUNNING
            and execution is not None
            and not execution.status.finished
            and current is not None
            and current.number == attempt
            and not current.status.finished
        )


def step_output(step: StepState, executions: Mapping[str, Execution]) -> JsonValue:
    """What :meth:`RunState.output_of` reads, for a state still being built (``executions`` of a draft)."""
    if not step.has_output or step.output_key is None:
        return None
    if step.output_items is None:
        execution = executions.get(step.output_key)
        return execution.output if execution is not None else None
    outputs: list[JsonValue] = []
    for index in range(step.output_items):
        execution = executions.get(f"{step.output_key}[{index}]")
        if execution is not None and execution.status is StepStatus.FAILED and execution.error is not None:
            outputs.append({"error": {"kind": execution.error.kind, "message": execution.error.message}})
        else:
            outputs.append(execution.output if execution is not None else None)
    return outputs


def _upgrade_chain_state(data: dict[str, Any]) -> dict[str, Any]:
    """A state of the single-chain model in today's form: each step's attempts become its one execution."""
    data = dict(data)
    current = data.pop("current_step", None)
    steps: dict[str, Any] = {}
    executions: dict[str, Any] = {}
    for step_id, old in (data.get("steps") or {}).items():
        if not isinstance(old, dict):
            return data  # not a state this code wrote: let validation say what is wrong
        status = old.get("status")
        executions[execution_key(step_id)] = {
            "step_id": step_id,
            "agent_name": old.get("agent_name"),
            "status": status,
            "attempts": old.get("attempts", ()),
            "first_attempt_of_round": old.get("first_attempt_of_round", 1),
            "fallback_agent": old.get("fallback_agent"),
            "next_attempt_at": old.get("next_attempt_at"),
            "default_output": old.get("output") if status == StepStatus.SKIPPED else None,
            "error": old.get("error"),
            "started_at": old.get("started_at"),
            "completed_at": old.get("completed_at"),
        }
        steps[step_id] = {
            "step_id": step_id,
            "agent_name": old.get("agent_name"),
            "status": status,
            "has_output": status in {StepStatus.COMPLETED, StepStatus.SKIPPED},
            "output_key": execution_key(step_id),
            "error": old.get("error"),
            "started_at": old.get("started_at"),
            "completed_at": old.get("completed_at"),
        }
    data["steps"] = steps
    data["executions"] = executions
    data["last_step"] = current
    return data
