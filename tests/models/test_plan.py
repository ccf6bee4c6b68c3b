"""Tests for models.plan: loading, validating and the retry policy."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from models.plan import (
    DEFAULT_RETRY,
    PlanProblem,
    PlanValidationError,
    RetryPolicy,
    WorkflowPlan,
    WorkflowStep,
    check_plan,
    load_plan,
    plan_json_schema,
)


def step(step_id: str, *, next_step: str | None = None, agent: str = "agent", **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"id": step_id, "agent_name": agent, **extra}
    if next_step is not None:
        data["next_step"] = next_step
    return data


def plan(*steps: dict[str, Any], start: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "workflow_id": "wf-1",
        "name": "Test workflow",
        "version": "1.0",
        "start_step": start if start is not None else steps[0]["id"],
        "steps": {s["id"]: s for s in steps},
        **extra,
    }


def problems_of(data: Any) -> list[PlanProblem]:
    with pytest.raises(PlanValidationError) as info:
        load_plan(data)
    assert info.value.problems, "a PlanValidationError must carry at least one problem"
    return list(info.value.problems)


def as_pairs(problems: list[PlanProblem]) -> list[tuple[str, str]]:
    return [(p.path, p.reason) for p in problems]


def assert_only_problem(problems: list[PlanProblem], path: str, reason: str) -> None:
    assert len(problems) == 1, as_pairs(problems)
    assert problems[0].path == path
    assert reason in problems[0].reason, problems[0].reason


TWO_STEPS = plan(
    step("research", next_step="write", input_mapping={"query": "${workflow.input.topic}"}),
    step("write", agent="writer", input_mapping={"notes": "${research.output.summary}", "tone": "plain"}),
)


# --- valid plans ---------------------------------------------------------------------------------------------------


def test_two_step_plan_loads():
    loaded = load_plan(TWO_STEPS)

    assert isinstance(loaded, WorkflowPlan)
    assert loaded.order() == ["research", "write"]
    assert loaded.start_step == "research"
    assert loaded.steps["write"].agent_name == "writer"
    assert loaded.steps["write"].input_mapping == {"notes": "${research.output.summary}", "tone": "plain"}
    assert loaded.steps["write"].next_step is None
    assert loaded.steps["research"].retry is None
    assert check_plan(loaded) == []


def test_three_step_plan_loads_with_options():
    data = plan(
        step("fetch-data", next_step="analyse", input_mapping={"url": "${workflow.input.url}"}, timeout_s=30),
        step(
            "analyse",
            next_step="report_1",
            input_mapping={
                "doc": "${fetch-data.output}",
                "first": "${fetch-data.output.items[0].title}",
                "meta": {"source": "${workflow.input.url}", "list": ["${fetch-data.output.count}", "$${literal}"]},
            },
            retry={"max_attempts": 5, "initial_delay_s": 0.5, "non_retriable_kinds": ["auth_required"]},
        ),
        step(
            "report_1",
            input_mapping={
                "a": "${analyse.output.summary}",
                "b": "${fetch-data.output}",
                "c": "From ${workflow.input}",
            },
        ),
        description="three steps",
    )

    loaded = load_plan(data)

    assert loaded.order() == ["fetch-data", "analyse", "report_1"]
    assert loaded.description == "three steps"
    assert loaded.steps["fetch-data"].timeout_s == 30
    retry = loaded.steps["analyse"].retry
    assert retry is not None
    assert retry.max_attempts == 5
    assert retry.non_retriable_kinds == ("auth_required",)
    assert retry.multiplier == DEFAULT_RETRY.multiplier


@pytest.mark.parametrize(("version", "expected"), [(1, "1"), (2, "2"), (1.5, "1.5"), ("1.0", "1.0"), ("v2", "v2")])
def test_version_becomes_text(version, expected):
    assert load_plan({**TWO_STEPS, "version": version}).version == expected


def test_plan_loads_from_text_bytes_and_mapping_alike():
    text = json.dumps(TWO_STEPS)

    from_text = load_plan(text)

    assert from_text == load_plan(text.encode())
    assert from_text == load_plan(TWO_STEPS)


def test_load_plan_does_not_mutate_its_input():
    data = json.loads(json.dumps({**TWO_STEPS, "version": 3}))
    before = json.loads(json.dumps(data))

    load_plan(data)

    assert data == before


def test_fingerprint_is_stable_and_tells_plans_apart():
    first = load_plan(TWO_STEPS)

    assert first.fingerprint() == load_plan(json.dumps(TWO_STEPS)).fingerprint()
    assert first.fingerprint() != load_plan({**TWO_STEPS, "name": "Other"}).fingerprint()
    assert len(first.fingerprint()) == 64


def test_plan_is_frozen():
    loaded = load_plan(TWO_STEPS)

    with pytest.raises(ValidationError):
        loaded.name = "changed"  # type: ignore[misc]


def test_order_stops_at_a_cycle():
    cyclic = WorkflowPlan.model_validate(plan(step("a", next_step="b"), step("b", next_step="a")))

    assert cyclic.order() == ["a", "b"]


# --- semantic errors, one at a time --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        pytest.param(
            plan(step("a", next_step="b"), step("b"), start="nope"),
            "$.start_step",
            "start_step 'nope' is not a step of this plan",
            id="unknown-start-step",
        ),
        pytest.param(
            plan(step("a", next_step="ghost")),
            "$.steps.a.next_step",
            "next_step 'ghost' is not a step of this plan",
            id="dangling-next-step",
        ),
        pytest.param(
            {**plan(step("a")), "steps": {"a": step("b")}, "start_step": "a"},
            "$.steps.a.id",
            "step id 'b' differs from its key 'a'",
            id="key-differs-from-id",
        ),
        pytest.param(
            plan(step("a", next_step="b"), step("b", next_step="a")),
            "$.steps.b.next_step",
            "steps form a cycle: a -> b -> a",
            id="two-step-cycle",
        ),
        pytest.param(
            plan(step("a", next_step="a")),
            "$.steps.a.next_step",
            "steps form a cycle: a -> a",
            id="self-loop",
        ),
        pytest.param(
            plan(step("a", next_step="b"), step("b", next_step="c"), step("c", next_step="a")),
            "$.steps.c.next_step",
            "steps form a cycle: a -> b -> c -> a",
            id="three-step-cycle",
        ),
        pytest.param(
            plan(step("a"), step("b")),
            "$.steps.b",
            "step 'b' is unreachable from start_step 'a'",
            id="unreachable-step",
        ),
        pytest.param(
            plan(step("a", next_step="b", input_mapping={"q": "${b.output.x}"}), step("b")),
            "$.steps.a.input_mapping.q",
            "step 'b' does not run before 'a'",
            id="reference-to-later-step",
        ),
        pytest.param(
            plan(step("a", input_mapping={"q": "about ${a.output}"})),
            "$.steps.a.input_mapping.q",
            "a step cannot read its own output",
            id="reference-to-itself",
        ),
        pytest.param(
            plan(step("a", next_step="b"), step("b", input_mapping={"q": "${ghost.output}"})),
            "$.steps.b.input_mapping.q",
            "refers to step 'ghost', which is not in this plan",
            id="reference-to-unknown-step",
        ),
        pytest.param(
            plan(step("a", next_step="b"), step("b", input_mapping={"q": {"deep": ["x", "${ghost.output}"]}})),
            "$.steps.b.input_mapping.q.deep[1]",
            "ghost",
            id="reference-in-nested-mapping",
        ),
        pytest.param(
            plan(step("a", input_mapping={"my key": "${ghost.output}"})),
            '$.steps.a.input_mapping["my key"]',
            "ghost",
            id="reference-under-quoted-key",
        ),
        pytest.param(
            plan(step("a", next_step="b"), step("b", input_mapping={"q": "${a.output..x}"})),
            "$.steps.b.input_mapping.q",
            "${a.output..x}: malformed expression",
            id="malformed-double-dot",
        ),
        pytest.param(
            plan(step("a", input_mapping={"q": "text ${workflow.input"})),
            "$.steps.a.input_mapping.q",
            "never closed",
            id="malformed-unclosed",
        ),
        pytest.param(
            plan(step("a", input_mapping={"q": "${workflow.output.x}"})),
            "$.steps.a.input_mapping.q",
            "${workflow.output.x}: malformed expression",
            id="malformed-workflow-output",
        ),
        pytest.param(
            plan(step("a", input_mapping={"q": "${}"})),
            "$.steps.a.input_mapping.q",
            "${}: malformed expression",
            id="malformed-empty",
        ),
        pytest.param(
            plan(step("a", agent="")),
            "$.steps.a.agent_name",
            "agent_name is empty",
            id="empty-agent-name",
        ),
        pytest.param(
            plan(step("a", agent="  \t ")),
            "$.steps.a.agent_name",
            "agent_name is empty",
            id="whitespace-agent-name",
        ),
        pytest.param(
            plan(step("workflow")),
            "$.steps.workflow",
            "'workflow' is reserved",
            id="step-named-workflow",
        ),
    ],
)
def test_semantic_problem_is_reported_with_its_path(data, path, reason):
    assert_only_problem(problems_of(data), path, reason)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(plan(step("a", next_step="b"), step("b", next_step="a")), id="two"),
        pytest.param(plan(step("a", next_step="a")), id="self"),
        pytest.param(plan(step("a", next_step="b"), step("b", next_step="c"), step("c", next_step="b")), id="tail"),
    ],
)
def test_each_cycle_is_reported_once(data):
    cycles = [p for p in problems_of(data) if "cycle" in p.reason]

    assert len(cycles) == 1


def test_two_separate_cycles_are_both_reported():
    data = plan(
        step("a", next_step="b"),
        step("b", next_step="a"),
        step("c", next_step="d"),
        step("d", next_step="c"),
    )

    problems = as_pairs(problems_of(data))

    assert any(p == "$.steps.b.next_step" and r.startswith("steps form a cycle: a -> b -> a") for p, r in problems)
    assert any(p == "$.steps.d.next_step" and r.startswith("steps form a cycle: c -> d -> c") for p, r in problems)
    assert sum("cycle" in reason for _, reason in problems) == 2


def test_earlier_step_and_workflow_input_references_are_fine():
    data = plan(
        step("a", next_step="b"),
        step("b", next_step="c", input_mapping={"x": "${a.output}"}),
        step("c", input_mapping={"x": "${a.output.k}", "y": "${b.output[0]}", "z": "${workflow.input}"}),
    )

    assert load_plan(data).order() == ["a", "b", "c"]


def test_escaped_placeholder_is_not_checked():
    assert load_plan(plan(step("a", input_mapping={"q": "$${ghost.output}"}))).steps["a"].input_mapping == {
        "q": "$${ghost.output}"
    }


# --- structural errors ---------------------------------------------------------------------------------------------


def _without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        pytest.param(
            {**TWO_STEPS, "steps": {**TWO_STEPS["steps"], "write": {"id": "write"}}},
            "$.steps.write.agent_name",
            "required field is missing",
            id="missing-agent-name",
        ),
        pytest.param(_without(TWO_STEPS, "name"), "$.name", "required field is missing", id="missing-name"),
        pytest.param(_without(TWO_STEPS, "steps"), "$.steps", "required field is missing", id="missing-steps"),
        pytest.param(
            _without(TWO_STEPS, "start_step"), "$.start_step", "required field is missing", id="missing-start-step"
        ),
        pytest.param(
            {**TWO_STEPS, "steps": {**TWO_STEPS["steps"], "write": {**step("write"), "agentname": "x"}}},
            "$.steps.write.agentname",
            "unknown field",
            id="unknown-step-field",
        ),
        pytest.param({**TWO_STEPS, "owner": "me"}, "$.owner", "unknown field", id="unknown-plan-field"),
        pytest.param(
            {**TWO_STEPS, "steps": {**TWO_STEPS["steps"], "write": step("write", timeout_s="soon")}},
            "$.steps.write.timeout_s",
            "valid number",
            id="wrong-type-timeout",
        ),
        pytest.param(
            {**TWO_STEPS, "steps": {**TWO_STEPS["steps"], "write": step("write", timeout_s=0)}},
            "$.steps.write.timeout_s",
            "greater than 0",
            id="zero-timeout",
        ),
        pytest.param(
            {**TWO_STEPS, "steps": {**TWO_STEPS["steps"], "write": {**step("write"), "next_step": 5}}},
            "$.steps.write.next_step",
            "valid string",
            id="wrong-type-next-step",
        ),
        pytest.param(
            {**TWO_STEPS, "steps": {**TWO_STEPS["steps"], "write": {**step("write"), "agent_name": 42}}},
            "$.steps.write.agent_name",
            "valid string",
            id="wrong-type-agent-name",
        ),
        pytest.param(
            {**TWO_STEPS, "steps": {**TWO_STEPS["steps"], "write": step("write", input_mapping=["x"])}},
            "$.steps.write.input_mapping",
            "valid dictionary",
            id="wrong-type-input-mapping",
        ),
        pytest.param(
            {**TWO_STEPS, "steps": {**TWO_STEPS["steps"], "write": step("write", retry={"max_attempts": 0})}},
            "$.steps.write.retry.max_attempts",
            "greater than or equal to 1",
            id="retry-max-attempts-zero",
        ),
        pytest.param(
            {**TWO_STEPS, "steps": {**TWO_STEPS["steps"], "write": step("write", retry={"jitter": 2})}},
            "$.steps.write.retry.jitter",
            "less than or equal to 1",
            id="retry-jitter-two",
        ),
        pytest.param(
            {**TWO_STEPS, "steps": {**TWO_STEPS["steps"], "write": step("write", retry={"tries": 2})}},
            "$.steps.write.retry.tries",
            "unknown field",
            id="retry-unknown-field",
        ),
        pytest.param({**TWO_STEPS, "steps": []}, "$.steps", "valid dictionary", id="steps-as-list"),
        pytest.param({**TWO_STEPS, "steps": {}}, "$.steps", "at least 1", id="no-steps"),
        pytest.param({**TWO_STEPS, "steps": {"a": "b"}}, "$.steps.a", "valid dictionary", id="step-as-string"),
        pytest.param({**TWO_STEPS, "version": True}, "$.version", "valid string", id="version-bool"),
        pytest.param({**TWO_STEPS, "version": ""}, "$.version", "at least 1", id="version-empty"),
        pytest.param({**TWO_STEPS, "workflow_id": ""}, "$.workflow_id", "at least 1", id="empty-workflow-id"),
        pytest.param({**TWO_STEPS, "name": None}, "$.name", "valid string", id="null-name"),
        pytest.param({**TWO_STEPS, "start_step": "bad id"}, "$.start_step", "pattern", id="start-step-pattern"),
        pytest.param(
            {**TWO_STEPS, "steps": {"a b": step("a b")}, "start_step": "ab"},
            '$.steps["a b"].id',
            "pattern",
            id="step-id-pattern-quoted-key",
        ),
        pytest.param(
            {**TWO_STEPS, "steps": {"x[1]": {"id": "x1"}}, "start_step": "x1"},
            '$.steps["x[1]"].agent_name',
            "required field is missing",
            id="bracket-in-step-key",
        ),
    ],
)
def test_structural_problem_is_reported_with_its_path(data, path, reason):
    assert_only_problem(problems_of(data), path, reason)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(b"{not json", "not valid JSON", id="bad-json-bytes"),
        pytest.param("{not json", "not valid JSON", id="bad-json-text"),
        pytest.param(b"", "not valid JSON", id="empty-bytes"),
        pytest.param(b'{"name": "\xff"}', "not valid JSON", id="not-utf8"),
        pytest.param(b"[]", "a plan is a JSON object, not list", id="array"),
        pytest.param(b'[{"workflow_id": "x"}]', "a plan is a JSON object, not list", id="array-of-plan"),
        pytest.param(b"42", "a plan is a JSON object, not int", id="number"),
        pytest.param("null", "a plan is a JSON object, not NoneType", id="null"),
        pytest.param(b'"plan"', "a plan is a JSON object, not str", id="string"),
    ],
)
def test_input_that_is_not_a_json_object_is_rejected(raw, reason):
    assert_only_problem(problems_of(raw), "$", reason)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"1" * 5000, id="integer-with-5000-digits"),
        pytest.param(b'{"version": ' + b"1" * 5000 + b"}", id="nested-integer-with-5000-digits"),
        pytest.param(b"[" * 100_000, id="deeply-nested-json"),
    ],
)
def test_pathological_json_is_a_plan_validation_error(raw):
    problems = problems_of(raw)

    assert [p.path for p in problems] == ["$"]


def test_odd_quoted_key_in_a_mapping_is_a_plan_problem():
    data = plan(step("a", input_mapping={"q": '${workflow.input["bad\\q"]}'}))

    problems = problems_of(data)

    assert [p.path for p in problems] == ["$.steps.a.input_mapping.q"]


def test_non_mapping_object_is_rejected():
    assert_only_problem(problems_of(["a"]), "$", "a plan is a JSON object, not list")


# --- all problems at once ------------------------------------------------------------------------------------------


def test_all_semantic_problems_are_reported_together():
    data = plan(
        step("a", next_step="b", input_mapping={"q": "${c.output}"}),
        step("b", agent="  ", next_step="ghost"),
        step("c", next_step="c", input_mapping={"m": "${oops"}),
        step("workflow"),
        start="a",
    )
    data["steps"]["k"] = step("other")

    problems = problems_of(data)

    expected = {
        ("$.steps.a.input_mapping.q", "does not run before"),
        ("$.steps.b.agent_name", "agent_name is empty"),
        ("$.steps.b.next_step", "'ghost' is not a step"),
        ("$.steps.c.next_step", "cycle: c -> c"),
        ("$.steps.c", "unreachable"),
        ("$.steps.c.input_mapping.m", "never closed"),
        ("$.steps.workflow", "reserved"),
        ("$.steps.workflow", "unreachable"),
        ("$.steps.k.id", "differs from its key"),
        ("$.steps.k", "unreachable"),
    }
    assert len(problems) == len(expected), as_pairs(problems)
    for path, reason in expected:
        assert any(p.path == path and reason in p.reason for p in problems), (path, reason, as_pairs(problems))


def test_all_structural_problems_are_reported_together():
    data = plan(
        {"id": "a", "next_step": "b"},
        step("b", next_step="c", colour="red"),
        step("c", timeout_s="never", retry={"max_attempts": 0, "jitter": 2}),
    )
    data["version"] = [1]

    paths = {p.path for p in problems_of(data)}

    assert paths == {
        "$.version",
        "$.steps.a.agent_name",
        "$.steps.b.colour",
        "$.steps.c.timeout_s",
        "$.steps.c.retry.max_attempts",
        "$.steps.c.retry.jitter",
    }


def test_check_plan_returns_problems_in_a_stable_order_without_raising():
    structurally_valid = WorkflowPlan.model_validate(
        plan(step("a", next_step="b", input_mapping={"q": "${b.output}"}), step("b", next_step="a"), step("c"))
    )

    first = check_plan(structurally_valid)

    assert first == check_plan(structurally_valid)
    assert [p.path for p in first] == [
        "$.steps.b.next_step",
        "$.steps.c",
        "$.steps.a.input_mapping.q",
    ]


def test_plan_validation_error_message_lists_every_problem():
    problems = [PlanProblem("$.a", "first"), PlanProblem("$.steps.b", "second")]

    error = PlanValidationError(problems)

    assert error.problems == tuple(problems)
    assert "2 problem(s)" in str(error)
    assert "$.a: first" in str(error)
    assert "$.steps.b: second" in str(error)
    assert isinstance(error, ValueError)


def test_plan_problem_text_and_dict():
    problem = PlanProblem("$.steps.a.next_step", "next_step 'x' is not a step of this plan")

    assert str(problem) == "$.steps.a.next_step: next_step 'x' is not a step of this plan"
    assert problem.to_dict() == {"path": "$.steps.a.next_step", "reason": "next_step 'x' is not a step of this plan"}


# --- retry policy --------------------------------------------------------------------------------------------------


def test_delay_grows_by_multiplier():
    policy = RetryPolicy(initial_delay_s=1.5, multiplier=3, max_delay_s=1000, jitter=0)

    assert [policy.delay_s(n, "seed") for n in range(1, 6)] == [1.5, 4.5, 13.5, 40.5, 121.5]


def test_delay_is_capped_by_max_delay():
    policy = RetryPolicy(initial_delay_s=1, multiplier=2, max_delay_s=10, jitter=0)

    assert [policy.delay_s(n, "seed") for n in range(1, 8)] == [1, 2, 4, 8, 10, 10, 10]


def test_initial_delay_above_max_is_capped():
    assert RetryPolicy(initial_delay_s=50, max_delay_s=20, jitter=0).delay_s(1, "s") == 20


def test_multiplier_one_keeps_delay_constant():
    policy = RetryPolicy(initial_delay_s=2, multiplier=1, jitter=0)

    assert {policy.delay_s(n, "s") for n in range(1, 50)} == {2}


def test_jitter_stays_within_its_fraction_and_actually_spreads():
    policy = RetryPolicy(initial_delay_s=10, multiplier=2, max_delay_s=1000, jitter=0.25)
    delays = [policy.delay_s(2, f"run-{i}/step/2") for i in range(500)]

    assert all(15 <= d <= 25 for d in delays)
    assert min(delays) < 17  # spread reaches well below the base of 20 ...
    assert max(delays) > 23  # ... and well above it
    assert len(set(delays)) > 400


def test_jitter_never_exceeds_max_delay():
    policy = RetryPolicy(initial_delay_s=100, max_delay_s=100, jitter=0.5)
    delays = [policy.delay_s(3, f"seed-{i}") for i in range(300)]

    assert all(50 <= d <= 100 for d in delays)
    assert min(delays) < 60


def test_delay_is_deterministic_per_seed():
    policy = RetryPolicy(jitter=0.5)

    assert policy.delay_s(2, "run/step/2") == policy.delay_s(2, "run/step/2")
    assert policy.delay_s(2, "run/step/2") == RetryPolicy(jitter=0.5).delay_s(2, "run/step/2")
    assert len({policy.delay_s(2, f"run/step/{i}") for i in range(20)}) > 1


def test_full_jitter_never_goes_negative():
    policy = RetryPolicy(initial_delay_s=1, jitter=1)

    assert all(policy.delay_s(1, f"s{i}") >= 0 for i in range(500))


def test_largest_allowed_policy_does_not_overflow():
    policy = RetryPolicy(max_attempts=100, initial_delay_s=86_400, multiplier=100, max_delay_s=86_400, jitter=1)

    assert 0 <= policy.delay_s(99, "s") <= 86_400


@settings(max_examples=300, deadline=None)
@given(
    initial=st.floats(0, 86_400),
    multiplier=st.floats(1, 100),
    max_delay=st.floats(0, 86_400),
    jitter=st.floats(0, 1),
    failed_attempt=st.integers(1, 99),
    seed=st.text(max_size=20),
)
def test_delay_bounds_property(initial, multiplier, max_delay, jitter, failed_attempt, seed):
    policy = RetryPolicy(initial_delay_s=initial, multiplier=multiplier, max_delay_s=max_delay, jitter=jitter)
    base = min(max_delay, initial * multiplier ** (failed_attempt - 1))

    delay = policy.delay_s(failed_attempt, seed)

    assert 0 <= delay <= max_delay
    assert delay >= base * (1 - jitter) - 1e-9 * max(1.0, base)
    assert delay <= base * (1 + jitter) + 1e-9 * max(1.0, base)
    assert delay == policy.delay_s(failed_attempt, seed)
    assert math.isfinite(delay)


def test_retry_policy_defaults():
    assert RetryPolicy() == DEFAULT_RETRY
    assert (DEFAULT_RETRY.max_attempts, DEFAULT_RETRY.jitter, DEFAULT_RETRY.non_retriable_kinds) == (3, 0.1, ())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", 0),
        ("max_attempts", 101),
        ("max_attempts", -1),
        ("initial_delay_s", -0.1),
        ("initial_delay_s", 86_401),
        ("multiplier", 0.5),
        ("multiplier", 101),
        ("max_delay_s", -1),
        ("max_delay_s", 86_401),
        ("jitter", 2),
        ("jitter", -0.1),
        ("unknown", 1),
    ],
)
def test_retry_policy_rejects_out_of_bounds_fields(field, value):
    with pytest.raises(ValidationError) as info:
        RetryPolicy.model_validate({field: value})

    assert info.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_attempts", 1), ("max_attempts", 100), ("jitter", 0), ("jitter", 1), ("multiplier", 1), ("max_delay_s", 0)],
)
def test_retry_policy_accepts_boundary_values(field, value):
    assert getattr(RetryPolicy.model_validate({field: value}), field) == value


# --- schema --------------------------------------------------------------------------------------------------------


def test_plan_json_schema_describes_a_plan():
    schema = plan_json_schema()

    assert isinstance(schema, dict)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "Switchyard workflow plan"
    assert schema["type"] == "object"
    assert {"workflow_id", "name", "version", "description", "start_step", "steps"} <= set(schema["properties"])
    assert {"workflow_id", "name", "version", "start_step", "steps"} <= set(schema["required"])
    assert schema["additionalProperties"] is False
    step_schema = schema["$defs"]["WorkflowStep"]
    assert {"id", "agent_name", "input_mapping", "next_step", "timeout_s", "retry"} <= set(step_schema["properties"])
    assert "RetryPolicy" in schema["$defs"]
    json.dumps(schema)  # the schema is itself JSON


def test_plan_json_schema_returns_a_fresh_dict():
    first = plan_json_schema()
    first["title"] = "changed"

    assert plan_json_schema()["title"] == "Switchyard workflow plan"


def test_workflow_step_defaults():
    built = WorkflowStep(id="a", agent_name="x")

    assert (built.input_mapping, built.next_step, built.timeout_s, built.retry) == ({}, None, None, None)
