"""Workflow plans: the model, its retry policy, and validation.

A plan is data a user writes (JSON). :func:`load_plan` turns untrusted input
into a :class:`WorkflowPlan` or raises :class:`PlanValidationError` carrying
*every* problem found, each with its JSON path and a plain reason.

An unreachable step is an **error**: plans are linear chains (``next_step``),
so a step that the chain never reaches can never run, and that is almost
always a typo in a ``next_step``. Reporting it keeps the mistake from
shipping silently.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from models.mapping import WORKFLOW_ROOT, Expression, MappingError, find_expressions

__all__ = [
    "DEFAULT_RETRY",
    "STEP_ID_PATTERN",
    "PlanProblem",
    "PlanValidationError",
    "RetryPolicy",
    "WorkflowPlan",
    "WorkflowStep",
    "check_plan",
    "load_plan",
    "plan_json_schema",
]

STEP_ID_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$"
_STEP_ID_RE: Final = re.compile(STEP_ID_PATTERN)
_JSON_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]+")

StepId = Annotated[str, Field(pattern=STEP_ID_PATTERN, description="Letters, digits, '_' and '-'.")]


class RetryPolicy(BaseModel):
    """How often and how fast a failed step is tried again.

    The delay before attempt ``n + 1`` is
    ``min(max_delay_s, initial_delay_s * multiplier ** (n - 1))``, spread by
    ``± jitter`` (a fraction of the delay) so that many runs failing together
    do not retry in lockstep.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(3, ge=1, le=100, description="Attempts in all, the first included.")
    initial_delay_s: float = Field(1.0, ge=0, le=86_400, description="Delay before the second attempt.")
    multiplier: float = Field(2.0, ge=1, le=100, description="Growth of the delay per attempt.")
    max_delay_s: float = Field(300.0, ge=0, le=86_400, description="Upper bound of any delay.")
    jitter: float = Field(0.1, ge=0, le=1, description="Random spread, as a fraction of the delay.")
    non_retriable_kinds: tuple[str, ...] = Field(
        (), description="Error kinds that fail the step at once, whatever the agent says."
    )

    def delay_s(self, failed_attempt: int, seed: str) -> float:
        """The delay before the attempt after ``failed_attempt``.

        Args:
            failed_attempt: The attempt that just failed, counted from 1 within
                this round of attempts.
            seed: Makes the jitter deterministic (the correlation id), so the
                run state machine stays a pure function.

        Returns:
            Seconds to wait, never negative and never above ``max_delay_s``.
        """
        base = min(self.max_delay_s, self.initial_delay_s * self.multiplier ** max(0, failed_attempt - 1))
        digest = hashlib.blake2b(seed.encode(), digest_size=8).digest()
        unit = int.from_bytes(digest, "big") / 2**64  # uniform in [0, 1)
        spread = base * self.jitter * (2 * unit - 1)
        return max(0.0, min(self.max_delay_s, base + spread))


DEFAULT_RETRY: Final = RetryPolicy()


class WorkflowStep(BaseModel):
    """One step: call one agent with an input mapped from earlier values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: StepId
    agent_name: str = Field(max_length=200, description="Name of the agent in the registry.")
    input_mapping: dict[str, JsonValue] = Field(
        default_factory=dict, description="The agent's input; strings may hold ${...} placeholders."
    )
    next_step: StepId | None = Field(None, description="The step after this one; null ends the run.")
    timeout_s: float | None = Field(None, gt=0, le=86_400, description="Deadline of each attempt.")
    retry: RetryPolicy | None = Field(None, description="Overrides the agent's or the global retry policy.")


class WorkflowPlan(BaseModel):
    """A workflow: a chain of steps from ``start_step`` along ``next_step``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_ref: str | None = Field(
        None, alias="$schema", exclude=True, description="Optional link to this schema, for editors; ignored."
    )
    workflow_id: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=200)
    version: str = Field(min_length=1, max_length=50)
    description: str | None = None
    start_step: StepId
    steps: dict[str, WorkflowStep] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _version_as_text(cls, data: Any) -> Any:
        # Users write ``"version": 1`` as often as ``"1.0"``; both are labels.
        if (
            isinstance(data, dict)
            and isinstance(data.get("version"), int | float)
            and not isinstance(data.get("version"), bool)
        ):
            return {**data, "version": str(data["version"])}
        return data

    def order(self) -> list[str]:
        """The step ids in the order they run, stopping at a cycle or a dangling link."""
        seen: list[str] = []
        current: str | None = self.start_step
        while current is not None and current in self.steps and current not in seen:
            seen.append(current)
            current = self.steps[current].next_step
        return seen

    def fingerprint(self) -> str:
        """A stable hash of the plan's content, to tell two submissions apart."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class PlanProblem:
    """One thing wrong with a plan.

    Attributes:
        path: JSON path of the offending value, e.g. ``$.steps.research.next_step``.
        reason: What is wrong, in plain words.
    """

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        """As a JSON object, for messages and the database."""
        return {"path": self.path, "reason": self.reason}


class PlanValidationError(ValueError):
    """A plan is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[PlanProblem]) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid workflow plan ({len(self.problems)} problem(s)):\n{lines}")


def _path(*parts: str | int) -> str:
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _JSON_NAME_RE.fullmatch(part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _user_loc(data: Any, loc: tuple[Any, ...], *, missing: bool) -> list[str | int]:
    """Keep the parts of a pydantic location that exist in the user's data.

    Pydantic also names union branches and validator steps in ``loc``; users
    never wrote those, so they are left out of the path. A missing field is
    the one part that cannot be in the data, and is kept.
    """
    out: list[str | int] = []
    node = data
    for index, part in enumerate(loc):
        present = (isinstance(node, Mapping) and isinstance(part, str) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        )
        if present:
            node = node[part]
            out.append(part)
        elif missing and index == len(loc) - 1 and isinstance(part, str | int):
            out.append(part)
    return out


def _from_pydantic(error: ValidationError, data: Any) -> list[PlanProblem]:
    problems = []
    for item in error.errors(include_url=False):
        loc = _user_loc(data, tuple(item["loc"]), missing=item["type"] == "missing")
        reason = item["msg"]
        if item["type"] == "extra_forbidden":
            reason = "unknown field (check the spelling)"
        elif item["type"] == "missing":
            reason = "required field is missing"
        problems.append(PlanProblem(_path(*loc), reason))
    return problems


def check_plan(plan: WorkflowPlan) -> list[PlanProblem]:
    """Find every semantic problem in a structurally valid plan.

    Args:
        plan: A plan that passed the pydantic model.

    Returns:
        All problems found, in a stable order; empty when the plan is valid.
    """
    problems: list[PlanProblem] = []
    steps = plan.steps

    for key, step in steps.items():
        if key != step.id:
            problems.append(PlanProblem(_path("steps", key, "id"), f"step id {step.id!r} differs from its key {key!r}"))
        if not _STEP_ID_RE.match(key):
            problems.append(
                PlanProblem(_path("steps", key), "step key must be letters, digits, '_' and '-' (at most 128)")
            )
        if key == WORKFLOW_ROOT:
            problems.append(
                PlanProblem(_path("steps", key), "'workflow' is reserved for ${workflow.input}; rename the step")
            )
        if not step.agent_name.strip():
            problems.append(PlanProblem(_path("steps", key, "agent_name"), "agent_name is empty"))
        if step.next_step is not None and step.next_step not in steps:
            problems.append(
                PlanProblem(
                    _path("steps", key, "next_step"), f"next_step {step.next_step!r} is not a step of this plan"
                )
            )

    if plan.start_step not in steps:
        problems.append(
            PlanProblem(
                _path("start_step"),
                f"start_step {plan.start_step!r} is not a step of this plan (steps: {', '.join(steps)})",
            )
        )

    order = plan.order()
    # A cycle: following next_step from any step comes back to a visited one.
    reported_cycles: set[frozenset[str]] = set()
    for key in steps:
        trail: list[str] = []
        current: str | None = key
        while current is not None and current in steps and current not in trail:
            trail.append(current)
            current = steps[current].next_step
        if current is not None and current in trail:
            cycle = trail[trail.index(current) :]
            members = frozenset(cycle)
            if members not in reported_cycles:
                reported_cycles.add(members)
                loop = " -> ".join([*cycle, current])
                problems.append(PlanProblem(_path("steps", cycle[-1], "next_step"), f"steps form a cycle: {loop}"))

    if plan.start_step in steps:
        for key in steps:
            if key not in order:
                problems.append(
                    PlanProblem(_path("steps", key), f"step {key!r} is unreachable from start_step {plan.start_step!r}")
                )

    position = {step_id: index for index, step_id in enumerate(order)}
    for key, step in steps.items():
        for json_path, found in find_expressions(step.input_mapping, _path("steps", key, "input_mapping")):
            if isinstance(found, MappingError):
                problems.append(PlanProblem(json_path, f"{found.expression}: {found.reason}"))
                continue
            problems.extend(_check_reference(found, key, json_path, steps, position))
    return problems


def _check_reference(
    expression: Expression,
    step_key: str,
    json_path: str,
    steps: Mapping[str, WorkflowStep],
    position: Mapping[str, int],
) -> list[PlanProblem]:
    source = expression.step_id
    if source is None:
        return []
    if source not in steps:
        return [PlanProblem(json_path, f"{expression.text} refers to step {source!r}, which is not in this plan")]
    if source == step_key:
        return [PlanProblem(json_path, f"{expression.text}: a step cannot read its own output")]
    if step_key in position and (source not in position or position[source] >= position[step_key]):
        return [
            PlanProblem(
                json_path,
                f"{expression.text}: step {source!r} does not run before {step_key!r}, so its output cannot exist yet",
            )
        ]
    return []


def load_plan(data: Mapping[str, Any] | str | bytes) -> WorkflowPlan:
    """Parse and validate a plan from JSON text or an already-decoded object.

    Args:
        data: The plan as JSON (``str``/``bytes``) or as a mapping.

    Returns:
        The valid plan.

    Raises:
        PlanValidationError: With every problem found (structure first: when
            the structure is wrong, semantic checks cannot run).
    """
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data, parse_constant=_reject_constant)
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, huge integers
            raise PlanValidationError([PlanProblem("$", f"not valid JSON: {error}")]) from None
        except RecursionError:
            raise PlanValidationError([PlanProblem("$", "not valid JSON: nested too deeply")]) from None
    if not isinstance(data, Mapping):
        raise PlanValidationError([PlanProblem("$", f"a plan is a JSON object, not {type(data).__name__}")])
    try:
        plan = WorkflowPlan.model_validate(dict(data))
    except ValidationError as error:
        raise PlanValidationError(_from_pydantic(error, data)) from None
    problems = check_plan(plan)
    if problems:
        raise PlanValidationError(problems)
    return plan


def plan_json_schema() -> dict[str, Any]:
    """The JSON Schema of a plan, as written to ``schemas/workflow-plan.schema.json``."""
    schema = WorkflowPlan.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Switchyard workflow plan"
    return schema
