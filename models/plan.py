"""Workflow plans: the model, its retry policy, and validation.

A plan is data a user writes (JSON). :func:`load_plan` turns untrusted input
into a :class:`WorkflowPlan` or raises :class:`PlanValidationError` carrying
*every* problem found, each with its JSON path and a plain reason.

A plan is a graph of steps: ``next_step`` names one step or several (they run
in parallel), ``routes`` choose by condition, ``loop`` leads back to an
earlier step while a condition holds, ``map`` calls the agent once per item
of a list, and a step several steps lead to waits for them (``join``). The
README's "Plans" section describes the language; :mod:`models.graph` holds
the graph facts the checks below rely on.

An unreachable step is an **error**: a step that no link reaches can never
run, and that is almost always a typo. Reporting it keeps the mistake from
shipping silently.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from pydantic_core import InitErrorDetails

from models.conditions import ConditionError, parse_condition
from models.mapping import WORKFLOW_ROOT, Expression, MappingError, find_expressions

if TYPE_CHECKING:
    from models.graph import PlanGraph

__all__ = [
    "APPROVAL_AGENT",
    "DEFAULT_INPUT_TIMEOUT_S",
    "DEFAULT_RETRY",
    "MAX_INPUT_TIMEOUT_S",
    "MAX_MAP_ITEMS",
    "STEP_ID_PATTERN",
    "Approval",
    "Loop",
    "MapOver",
    "Route",
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

MAX_MAP_ITEMS: Final = 10_000
"""The most items one map step calls its agent for (one execution each, all recorded)."""

DEFAULT_INPUT_TIMEOUT_S: Final = 7 * 86_400.0
"""How long a question waits for its answer when neither the step, nor the agent, nor the settings say."""

MAX_INPUT_TIMEOUT_S: Final = 365 * 86_400.0
"""The longest a question or an approval may wait for a person (a year)."""

APPROVAL_AGENT: Final = ""
"""The ``agent_name`` of an approval step: it calls no agent."""

StepId = Annotated[str, Field(pattern=STEP_ID_PATTERN, description="Letters, digits, '_' and '-'.")]
StepTargets = Annotated[
    StepId | list[StepId],
    Field(description="One step, or a list of steps that then run at the same time."),
]


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


class Route(BaseModel):
    """One way out of a step, taken when its condition holds (the first that holds wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    when: str = Field(
        min_length=1, max_length=4000, description="A CEL condition, e.g. \"${classify.output.label} == 'bug'\"."
    )
    to: StepTargets


class Loop(BaseModel):
    """Run the steps from ``back_to`` to this one again while a condition holds."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    back_to: StepId = Field(description="The first step of each iteration (this step itself, or one before it).")
    while_: str = Field(
        alias="while",
        min_length=1,
        max_length=4000,
        description="A CEL condition, read after this step: while it holds, another iteration runs.",
    )
    max_iterations: int = Field(ge=1, le=1000, description="The most iterations, the first included (required).")
    when_exhausted: Literal["fail", "continue"] = Field(
        "fail", description="When the condition still holds after max_iterations: fail the run, or go on."
    )


class MapOver(BaseModel):
    """Call the step's agent once per item of a list; ``${map.item}`` and ``${map.index}`` name the item."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    over: str | list[JsonValue] = Field(
        description='The list: one placeholder ("${workflow.input.documents}") or a literal JSON list.'
    )
    max_concurrency: int = Field(10, ge=1, le=1000, description="The most items in flight at once.")
    on_item_failure: Literal["fail", "collect"] = Field(
        "fail",
        description='fail: a failed item (after its retries) fails the step; collect: it is kept as {"error": ...}.',
    )


class Approval(BaseModel):
    """Wait for a person to approve or reject, instead of calling an agent.

    The step's output is ``{"approved": bool, "decision": "approve"|"reject",
    "text": ..., "data": ...}`` (what the person gave with the decision), so a
    reject routes like any condition (``${review.output.approved}``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: JsonValue = Field(
        description="What the person is shown, mapped like an input: text (with ${...} placeholders) or an object."
    )
    default_decision: Literal["approve", "reject"] | None = Field(
        None, description="Taken when input_timeout_s passes without a decision; without one, the step fails."
    )
    on_reject: Literal["continue", "fail"] = Field(
        "continue", description="continue: the step completes with approved false (route on it); fail: the run fails."
    )


class WorkflowStep(BaseModel):
    """One step: call one agent with an input mapped from earlier values (or ask a person), then lead on."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        # What _agent_name_unless_approval checks, for editors that read the schema.
        json_schema_extra={
            "anyOf": [
                {"required": ["agent_name"]},
                {"required": ["approval"], "properties": {"approval": {"type": "object"}}},
            ]
        },
    )

    id: StepId
    agent_name: str = Field(
        APPROVAL_AGENT, max_length=200, description="Name of the agent in the registry (none for an approval step)."
    )
    input_mapping: dict[str, JsonValue] = Field(
        default_factory=dict, description="The agent's input; strings may hold ${...} placeholders."
    )
    next_step: StepTargets | None = Field(
        None, description="The step after this one, or several to run in parallel; null ends this path."
    )
    routes: list[Route] | None = Field(
        None, max_length=100, description="Instead of next_step: the first route whose condition holds is taken."
    )
    otherwise: StepTargets | None = Field(None, description="With routes: where to go when no condition holds.")
    join: Literal["all", "any"] | None = Field(
        None,
        description="For a step several steps lead to: wait for all of them (default), or start at the first.",
    )
    loop: Loop | None = None
    map: MapOver | None = None
    approval: Approval | None = Field(None, description="Ask a person to approve or reject, instead of an agent.")

    @model_validator(mode="wrap")
    @classmethod
    def _agent_name_unless_approval(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> WorkflowStep:
        # agent_name is required of every step but an approval step, which calls no agent: reported as missing
        # with the step's other structural problems, as a required field is.
        missing = isinstance(data, Mapping) and "agent_name" not in data and data.get("approval") is None
        absent = InitErrorDetails(type="missing", loc=("agent_name",), input=data)
        try:
            step = handler(data)
        except ValidationError as error:
            if not missing:
                raise
            details = [
                absent,
                *(
                    InitErrorDetails(type=e["type"], loc=e["loc"], input=e["input"], ctx=e.get("ctx", {}))
                    for e in error.errors()
                ),
            ]
            raise ValidationError.from_exception_data(error.title, details) from None
        if missing:
            raise ValidationError.from_exception_data(cls.__name__, [absent])
        assert isinstance(step, WorkflowStep)
        return step

    timeout_s: float | None = Field(None, gt=0, le=86_400, description="Deadline of each attempt.")
    input_timeout_s: float | None = Field(
        None,
        gt=0,
        le=MAX_INPUT_TIMEOUT_S,
        description="How long a question (the agent's, or an approval) waits for its answer; then the step fails "
        "(or takes the approval's default_decision).",
    )
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
    output: JsonValue = Field(
        None, description="The run's output, mapped like an input; by default the output of the last step to finish."
    )

    _graph: _GraphCache = PrivateAttr(default_factory=lambda: _GraphCache())

    def graph(self) -> PlanGraph:
        """The plan's graph (:mod:`models.graph`), built once and kept: plans are immutable."""
        return self._graph.of(self)

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
        """The steps reachable from the start, each after every step that leads to it.

        In a plan with a cycle (which the validator refuses), the link that
        closes each cycle is left out.
        """
        return list(self.graph().order)

    def fingerprint(self) -> str:
        """A stable hash of the plan's content, to tell two submissions apart.

        Fields added to the language later are left out while unset, so that a
        plan written before them keeps its fingerprint.
        """
        data = self.model_dump(mode="json")
        if data.get("output") is None:
            data.pop("output", None)
        for step in data["steps"].values():
            for name in _LATER_STEP_FIELDS:
                if step.get(name) is None:
                    step.pop(name, None)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


_LATER_STEP_FIELDS: Final = ("routes", "otherwise", "join", "loop", "map", "approval", "input_timeout_s")


class _GraphCache:
    """Where a plan keeps its graph; no part of the plan's value (equal plans are equal, cached or not)."""

    __slots__ = ("_for", "_graph")

    def __init__(self) -> None:
        self._for: tuple[object, str] | None = None
        self._graph: PlanGraph | None = None

    def of(self, plan: WorkflowPlan) -> PlanGraph:
        # ``model_copy`` shares this object with the copy: the graph is kept for these very steps only.
        if (
            self._graph is None
            or self._for is None
            or self._for[0] is not plan.steps
            or self._for[1] != plan.start_step
        ):
            from models.graph import build_graph  # the graph module reads plans

            self._graph = build_graph(plan)
            self._for = (plan.steps, plan.start_step)
        return self._graph

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _GraphCache)

    __hash__ = None  # type: ignore[assignment]


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
    seen: set[str] = set()
    for item in error.errors(include_url=False):
        loc = _user_loc(data, tuple(item["loc"]), missing=item["type"] == "missing")
        if _path(*loc) in seen:
            continue  # the other branches of a union ("a step id, or a list of them"): one problem is enough
        seen.add(_path(*loc))
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
        problems.extend(_check_step(key, step, steps))
    if plan.start_step not in steps:
        problems.append(
            PlanProblem(
                _path("start_step"),
                f"start_step {plan.start_step!r} is not a step of this plan (steps: {', '.join(steps)})",
            )
        )

    graph = plan.graph()
    for cycle in graph.cycles:
        problems.append(
            PlanProblem(
                _link_path(plan, cycle[-2], cycle[-1]),
                f"steps form a cycle: {' -> '.join(cycle)} (to repeat steps, give the last one a loop with "
                "back_to, while and max_iterations)",
            )
        )
    if plan.start_step in steps:
        for key in steps:
            if key not in graph.reachable:
                problems.append(
                    PlanProblem(_path("steps", key), f"step {key!r} is unreachable from start_step {plan.start_step!r}")
                )
    for key, step in steps.items():
        preds = graph.predecessors[key]
        if step.join is not None and len(preds) < 2:
            led_by = ", ".join(repr(p) for p in preds) or "no step"
            problems.append(
                PlanProblem(
                    _path("steps", key, "join"),
                    f"join waits for the steps that lead to {key!r}, but only {led_by} does: it has nothing to join",
                )
            )
    problems.extend(_check_loops(plan, graph))
    for key, step in steps.items():
        problems.extend(_check_step_references(key, step, plan, graph))
    problems.extend(_check_output_references(plan, graph))
    return problems


def _links(key: str, step: WorkflowStep) -> list[tuple[str, str, str]]:
    """``(json_path, field name, target)`` for every forward link of a step, in the order written."""
    out: list[tuple[str, str, str]] = []

    def add(value: str | list[str] | None, *parts: str | int) -> None:
        if isinstance(value, str):
            out.append((_path("steps", key, *parts), str(parts[-1]), value))
        elif value is not None:
            for index, target in enumerate(value):
                out.append((_path("steps", key, *parts, index), str(parts[-1]), target))

    add(step.next_step, "next_step")
    for index, route in enumerate(step.routes or ()):
        add(route.to, "routes", index, "to")
    add(step.otherwise, "otherwise")
    return out


def _check_step(key: str, step: WorkflowStep, steps: Mapping[str, WorkflowStep]) -> list[PlanProblem]:
    problems: list[PlanProblem] = []
    if key != step.id:
        problems.append(PlanProblem(_path("steps", key, "id"), f"step id {step.id!r} differs from its key {key!r}"))
    if not _STEP_ID_RE.match(key):
        problems.append(PlanProblem(_path("steps", key), "step key must be letters, digits, '_' and '-' (at most 128)"))
    if key == WORKFLOW_ROOT:
        problems.append(
            PlanProblem(_path("steps", key), "'workflow' is reserved for ${workflow.input}; rename the step")
        )
    if step.approval is not None:
        problems.extend(_check_approval(key, step))
    elif not step.agent_name.strip():
        problems.append(PlanProblem(_path("steps", key, "agent_name"), "agent_name is empty"))
    seen: set[str] = set()
    for json_path, name, target in _links(key, step):
        if target not in steps:
            problems.append(PlanProblem(json_path, f"{name} {target!r} is not a step of this plan"))
        elif target in seen:
            problems.append(PlanProblem(json_path, f"{target!r} is named twice among the steps {key!r} leads to"))
        seen.add(target)
    if step.routes is not None and step.next_step is not None:
        problems.append(
            PlanProblem(
                _path("steps", key, "routes"),
                "a step has next_step or routes, not both (put the unconditional way on 'otherwise')",
            )
        )
    if step.otherwise is not None and step.routes is None:
        problems.append(PlanProblem(_path("steps", key, "otherwise"), "otherwise goes with routes; use next_step"))
    if step.routes is not None and not step.routes:
        problems.append(PlanProblem(_path("steps", key, "routes"), "routes is empty"))
    for index, route in enumerate(step.routes or ()):
        problems.extend(_check_condition(route.when, _path("steps", key, "routes", index, "when")))
    if step.loop is not None:
        if step.loop.back_to not in steps:
            problems.append(
                PlanProblem(
                    _path("steps", key, "loop", "back_to"),
                    f"loop.back_to {step.loop.back_to!r} is not a step of this plan",
                )
            )
        problems.extend(_check_condition(step.loop.while_, _path("steps", key, "loop", "while")))
    if step.map is not None:
        problems.extend(_check_map_list(step.map.over, _path("steps", key, "map", "over")))
    return problems


def _check_approval(key: str, step: WorkflowStep) -> list[PlanProblem]:
    """An approval step asks a person: it has no agent, no input of its own and no items."""
    problems: list[PlanProblem] = []
    for name, present in (
        ("agent_name", step.agent_name != APPROVAL_AGENT),
        ("input_mapping", bool(step.input_mapping)),
        ("map", step.map is not None),
        ("retry", step.retry is not None),
        ("timeout_s", step.timeout_s is not None),
    ):
        if present:
            problems.append(
                PlanProblem(
                    _path("steps", key, name),
                    f"an approval step calls no agent, so it has no {name} (its prompt is approval.prompt, its wait "
                    "input_timeout_s)",
                )
            )
    return problems


def _check_condition(text: str, json_path: str) -> list[PlanProblem]:
    try:
        parse_condition(text)
    except ConditionError as error:
        return [PlanProblem(json_path, error.reason)]
    return []


def _check_map_list(over: str | list[JsonValue], json_path: str) -> list[PlanProblem]:
    if isinstance(over, list):
        if len(over) > MAX_MAP_ITEMS:
            return [
                PlanProblem(json_path, f"the list has {len(over)} items, over the most a map takes ({MAX_MAP_ITEMS})")
            ]
        return []
    found = list(find_expressions(over, json_path))
    errors = [e for _, e in found if isinstance(e, MappingError)]
    if errors:
        return []  # reported with the step's other placeholders
    stripped = over.strip()
    whole = len(found) == 1 and stripped.startswith("${") and stripped.endswith("}") and stripped == over
    if not whole:
        return [
            PlanProblem(
                json_path,
                f'{over[:60]!r} cannot be a list: give one placeholder, such as "${{workflow.input.items}}", '
                "or a JSON list (text around a placeholder makes a string)",
            )
        ]
    expression = found[0][1]
    assert isinstance(expression, Expression)
    if expression.reads_item:
        return [PlanProblem(json_path, f"{expression.text}: the list of a map cannot be read from its own item")]
    return []


def _link_path(plan: WorkflowPlan, source: str, target: str) -> str:
    for json_path, _, linked in _links(source, plan.steps[source]):
        if linked == target:
            return json_path
    return _path("steps", source)


def _check_loops(plan: WorkflowPlan, graph: PlanGraph) -> list[PlanProblem]:
    problems: list[PlanProblem] = []
    owner: dict[str, str] = {}
    for key, step in plan.steps.items():
        if step.loop is None or step.loop.back_to not in plan.steps or key not in graph.reachable:
            continue
        where = _path("steps", key, "loop", "back_to")
        body = graph.bodies.get(key)
        if body is None:
            problems.append(
                PlanProblem(
                    where, f"loop.back_to {step.loop.back_to!r} does not lead to {key!r}, so it cannot repeat it"
                )
            )
            continue
        inside = set(body)
        for member in body:
            if member in owner:
                problems.append(
                    PlanProblem(
                        where,
                        f"the loops of {owner[member]!r} and {key!r} share step {member!r}; loops inside loops are "
                        "not supported",
                    )
                )
                break
        for member in body:
            owner.setdefault(member, key)
            if member != key:
                for target in graph.targets[member]:
                    if target not in inside:
                        problems.append(
                            PlanProblem(
                                _link_path(plan, member, target),
                                f"step {member!r} is inside the loop from {step.loop.back_to!r} to {key!r} but leads "
                                f"out of it, to {target!r}; only {key!r} leaves the loop",
                            )
                        )
            if member != step.loop.back_to:
                for pred in graph.predecessors[member]:
                    if pred not in inside and pred in graph.reachable:
                        problems.append(
                            PlanProblem(
                                _link_path(plan, pred, member),
                                f"step {pred!r} leads into the loop from {step.loop.back_to!r} to {key!r} at "
                                f"{member!r}; an iteration starts at {step.loop.back_to!r} only",
                            )
                        )
    return problems


def _condition_expressions(text: str, json_path: str) -> list[tuple[str, Expression | MappingError]]:
    try:
        return [(json_path, e) for e in parse_condition(text).expressions]
    except ConditionError:
        return []  # reported by _check_condition


def _step_expressions(key: str, step: WorkflowStep) -> list[tuple[str, Expression | MappingError]]:
    """The placeholders a step reads before its call (mapping and map list)."""
    found = list(find_expressions(step.input_mapping, _path("steps", key, "input_mapping")))
    if step.approval is not None:
        found.extend(find_expressions(step.approval.prompt, _path("steps", key, "approval", "prompt")))
    if step.map is not None and isinstance(step.map.over, str):
        found.extend(find_expressions(step.map.over, _path("steps", key, "map", "over")))
    return found


def _check_step_references(key: str, step: WorkflowStep, plan: WorkflowPlan, graph: PlanGraph) -> list[PlanProblem]:
    problems: list[PlanProblem] = []
    in_mapping = _path("steps", key, "input_mapping")
    for json_path, found in _step_expressions(key, step):
        if isinstance(found, MappingError):
            problems.append(PlanProblem(json_path, f"{found.expression}: {found.reason}"))
            continue
        if found.reads_item and (step.map is None or not json_path.startswith(in_mapping)):
            problems.append(PlanProblem(json_path, f"{found.text} is only known in the input_mapping of a map step"))
            continue
        problems.extend(_check_reference(found, key, json_path, plan, graph, after=False))
    after: list[tuple[str, Expression | MappingError]] = []
    for index, route in enumerate(step.routes or ()):
        after.extend(_condition_expressions(route.when, _path("steps", key, "routes", index, "when")))
    if step.loop is not None:
        after.extend(_condition_expressions(step.loop.while_, _path("steps", key, "loop", "while")))
    for json_path, found in after:
        if isinstance(found, Expression):
            if found.reads_item:
                problems.append(
                    PlanProblem(json_path, f"{found.text} is only known in the input_mapping of a map step")
                )
                continue
            problems.extend(_check_reference(found, key, json_path, plan, graph, after=True))
    return problems


def _check_output_references(plan: WorkflowPlan, graph: PlanGraph) -> list[PlanProblem]:
    problems: list[PlanProblem] = []
    for json_path, found in find_expressions(plan.output, _path("output")):
        if isinstance(found, MappingError):
            problems.append(PlanProblem(json_path, f"{found.expression}: {found.reason}"))
            continue
        source = found.step_id
        if found.reads_item:
            problems.append(PlanProblem(json_path, f"{found.text} is only known in the input_mapping of a map step"))
        elif source is not None and source not in plan.steps:
            problems.append(
                PlanProblem(json_path, f"{found.text} refers to step {source!r}, which is not in this plan")
            )
        elif source is not None and source not in graph.always and not found.has_default:
            problems.append(
                PlanProblem(
                    json_path,
                    f"{found.text}: step {source!r} may not run (it is on a route or a race that may be skipped); "
                    f"give a default, such as ${{{source}.output ?? null}}",
                )
            )
    return problems


def _check_reference(
    expression: Expression, step_key: str, json_path: str, plan: WorkflowPlan, graph: PlanGraph, *, after: bool
) -> list[PlanProblem]:
    """Whether ``step_key`` may read what ``expression`` names (``after``: in a condition read once it is done)."""
    source = expression.step_id
    if source is None:
        return []
    if source not in plan.steps:
        return [PlanProblem(json_path, f"{expression.text} refers to step {source!r}, which is not in this plan")]
    if source == step_key:
        if after or (expression.has_default and graph.loop_of(step_key) is not None):
            return []  # a condition read once it is done; its own previous iteration, inside a loop
        return [PlanProblem(json_path, f"{expression.text}: a step cannot read its own output")]
    if step_key not in graph.reachable or source in graph.surely_done(step_key) or expression.has_default:
        return []
    same_loop = graph.loop_of(step_key)
    if same_loop is not None and graph.loop_of(source) == same_loop:
        return [
            PlanProblem(
                json_path,
                f"{expression.text}: step {source!r} has no output in the first iteration of the loop of "
                f"{same_loop!r}; give a default, such as ${{{source}.output ?? null}}",
            )
        ]
    if source in graph.ancestors(step_key):
        return [
            PlanProblem(
                json_path,
                f"{expression.text}: step {source!r} may not have run when {step_key!r} starts (it is on a route "
                f"or a race that may be skipped); give a default, such as ${{{source}.output ?? null}}",
            )
        ]
    return [
        PlanProblem(
            json_path,
            f"{expression.text}: step {source!r} does not run before {step_key!r}, so its output cannot exist yet",
        )
    ]


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
