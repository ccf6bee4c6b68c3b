"""Tests for the plan graph language: validation of branches, routes, joins, loops and maps, and the graph facts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.plan import PlanProblem, PlanValidationError, WorkflowPlan, check_plan, load_plan

ROOT = Path(__file__).resolve().parents[2]
NEW_FIELDS = ("routes", "otherwise", "join", "loop", "map")


def _is_chain(path: Path) -> bool:
    data = json.loads(path.read_text())
    return all(
        not isinstance(s.get("next_step"), list) and not any(s.get(f) is not None for f in NEW_FIELDS)
        for s in data["steps"].values()
    )


CHAIN_EXAMPLES = [p for p in sorted((ROOT / "examples" / "workflows").glob("*.json")) if _is_chain(p)]


# --- builders ------------------------------------------------------------------------------------------------------


def step(step_id: str, agent: str = "agent", **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "agent_name": agent, **fields}


def plan(*steps: dict[str, Any], start: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "workflow_id": "wf",
        "name": "graph plan",
        "version": "1",
        "start_step": start if start is not None else steps[0]["id"],
        "steps": {s["id"]: s for s in steps},
        **extra,
    }


def loop(back_to: str, max_iterations: int = 3, when: str = "true", **extra: Any) -> dict[str, Any]:
    return {"back_to": back_to, "while": when, "max_iterations": max_iterations, **extra}


def problems_of(data: dict[str, Any]) -> list[PlanProblem]:
    with pytest.raises(PlanValidationError) as info:
        load_plan(data)
    assert info.value.problems
    return list(info.value.problems)


def pairs(problems: list[PlanProblem]) -> list[tuple[str, str]]:
    return [(p.path, p.reason) for p in problems]


def has_problem(problems: list[PlanProblem], path: str, reason: str) -> bool:
    return any(p.path == path and reason in p.reason for p in problems)


def assert_only_problem(data: dict[str, Any], path: str, reason: str) -> PlanProblem:
    problems = problems_of(data)
    assert len(problems) == 1, pairs(problems)
    assert problems[0].path == path, pairs(problems)
    assert reason in problems[0].reason, problems[0].reason
    return problems[0]


def assert_valid(data: dict[str, Any]) -> WorkflowPlan:
    loaded = load_plan(data)
    assert check_plan(loaded) == []
    return loaded


def diamond(join: str | None = None, **last: Any) -> dict[str, Any]:
    """a -> [b, c] -> d."""
    fields = {"join": join} if join is not None else {}
    return plan(
        step("a", next_step=["b", "c"]),
        step("b", next_step="d"),
        step("c", next_step="d"),
        step("d", **fields, **last),
    )


def routed(*, otherwise: bool = True, merge: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """cl routes to bug (label == 'bug') or other (otherwise); both lead to end."""
    cl: dict[str, Any] = {"routes": [{"when": "${cl.output.label} == 'bug'", "to": "bug"}]}
    steps = [step("bug", next_step="end")]
    if otherwise:
        cl["otherwise"] = "other"
        steps.append(step("other", next_step="end"))
    else:
        cl["routes"].append({"when": "${cl.output.label} == 'question'", "to": "other"})
        steps.append(step("other", next_step="end"))
    return plan(step("cl", **cl), *steps, step("end", **(merge or {})), **extra)


# --- links to steps that do not exist -----------------------------------------------------------------------------


def test_every_link_to_a_missing_step_is_reported_at_once():
    data = plan(
        step("a", next_step=["b", "ghost"]),
        step(
            "b",
            routes=[{"when": "true", "to": "c"}, {"when": "false", "to": ["c2", "nowhere"]}],
            otherwise="void",
        ),
        step("c", loop=loop("phantom")),
        step("c2"),
    )

    problems = problems_of(data)

    assert has_problem(problems, "$.steps.a.next_step[1]", "'ghost' is not a step"), pairs(problems)
    assert has_problem(problems, "$.steps.b.routes[1].to[1]", "'nowhere' is not a step"), pairs(problems)
    assert has_problem(problems, "$.steps.b.otherwise", "'void' is not a step"), pairs(problems)
    assert has_problem(problems, "$.steps.c.loop.back_to", "'phantom' is not a step"), pairs(problems)
    assert len(problems) == 4, pairs(problems)


def test_a_single_route_target_that_is_not_a_step():
    data = plan(step("a", routes=[{"when": "true", "to": "missing"}], otherwise="b"), step("b"))

    assert_only_problem(data, "$.steps.a.routes[0].to", "'missing' is not a step of this plan")


def test_routes_together_with_next_step():
    data = plan(
        step("a", next_step="b", routes=[{"when": "${a.output.x} == 1", "to": "c"}]),
        step("b"),
        step("c"),
    )

    assert_only_problem(data, "$.steps.a.routes", "next_step or routes, not both")


def test_otherwise_without_routes():
    data = plan(step("a", otherwise="b"), step("b"))

    assert_only_problem(data, "$.steps.a.otherwise", "otherwise goes with routes")


def test_empty_routes():
    data = plan(step("a", routes=[], otherwise="b"), step("b"))

    assert_only_problem(data, "$.steps.a.routes", "routes is empty")


def test_loop_without_max_iterations_is_a_missing_field():
    data = plan(step("a", loop={"back_to": "a", "while": "${a.output.again} == true"}))

    assert_only_problem(data, "$.steps.a.loop.max_iterations", "required field is missing")


@pytest.mark.parametrize("bad", [0, 1001])
def test_loop_max_iterations_is_bounded(bad: int):
    problems = problems_of(plan(step("a", loop=loop("a", max_iterations=bad))))

    assert [p.path for p in problems] == ["$.steps.a.loop.max_iterations"]


# --- cycles and loops --------------------------------------------------------------------------------------------


def test_a_cycle_through_next_step_points_to_loops():
    data = plan(step("a", next_step="b"), step("b", next_step="c"), step("c", next_step="a"))

    problem = assert_only_problem(data, "$.steps.c.next_step", "cycle")

    assert "a -> b -> c -> a" in problem.reason
    assert "loop" in problem.reason


def test_a_cycle_through_a_route_is_a_cycle_too():
    data = plan(
        step("a", next_step="b"),
        step("b", routes=[{"when": "${b.output.again} == true", "to": "a"}], otherwise="c"),
        step("c"),
    )

    problems = problems_of(data)

    assert has_problem(problems, "$.steps.b.routes[0].to", "cycle"), pairs(problems)


def test_loop_whose_back_to_does_not_lead_to_it():
    data = plan(
        step("a", next_step=["b", "c"]),
        step("b"),
        step("c", loop=loop("b")),
    )

    assert_only_problem(data, "$.steps.c.loop.back_to", "'b' does not lead to 'c'")


def test_loop_whose_back_to_is_a_later_step():
    data = plan(step("a", next_step="b", loop=loop("b")), step("b"))

    assert_only_problem(data, "$.steps.a.loop.back_to", "does not lead to 'a'")


def test_a_step_inside_a_loop_body_leading_out_of_it():
    data = plan(
        step("a", next_step="b"),
        step("b", next_step=["c", "x"]),
        step("c", loop=loop("a")),
        step("x"),
    )

    problem = assert_only_problem(data, "$.steps.b.next_step[1]", "inside the loop")

    assert "'x'" in problem.reason
    assert "only 'c' leaves the loop" in problem.reason


def test_a_step_outside_leading_into_the_middle_of_a_loop_body():
    data = plan(
        step("s", next_step=["a", "b"]),
        step("a", next_step="b"),
        step("b", next_step="c"),
        step("c", loop=loop("a")),
    )

    problem = assert_only_problem(data, "$.steps.s.next_step[1]", "leads into the loop")

    assert "at 'b'" in problem.reason
    assert "starts at 'a' only" in problem.reason


def test_leading_into_the_first_step_of_a_loop_is_fine():
    data = plan(
        step("s", next_step=["a", "z"]),
        step("z", next_step="a"),
        step("a", join="all", next_step="b"),
        step("b", loop=loop("a")),
    )

    assert_valid(data)


def test_overlapping_loops():
    data = plan(
        step("a", next_step="b"),
        step("b", next_step="c", loop=loop("a")),
        step("c", loop=loop("b")),
    )

    problem = assert_only_problem(data, "$.steps.c.loop.back_to", "share step 'b'")

    assert "loops inside loops are not supported" in problem.reason


def test_nested_loops_are_refused():
    data = plan(
        step("a", next_step="b"),
        step("b", next_step="c", loop=loop("b")),
        step("c", loop=loop("a")),
    )

    problems = problems_of(data)

    assert any("share step" in p.reason for p in problems), pairs(problems)


def test_two_loops_one_after_the_other_are_fine():
    data = plan(
        step("a", next_step="b"),
        step("b", next_step="c", loop=loop("a")),
        step("c", next_step="d"),
        step("d", loop=loop("c")),
    )

    assert_valid(data)


# --- joins and reachability ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("join", ["all", "any"])
def test_join_on_a_step_with_one_predecessor(join: str):
    data = plan(step("a", next_step="b"), step("b", join=join))

    problem = assert_only_problem(data, "$.steps.b.join", "nothing to join")

    assert "'a'" in problem.reason


def test_join_on_the_start_step():
    assert_only_problem(plan(step("a", join="any")), "$.steps.a.join", "nothing to join")


def test_join_on_a_step_several_steps_lead_to_is_fine():
    assert_valid(diamond("any"))
    assert_valid(diamond("all"))
    assert_valid(diamond())


def test_unreachable_step():
    data = plan(step("a", next_step="b"), step("b"), step("orphan", next_step="b"))

    assert_only_problem(data, "$.steps.orphan", "unreachable from start_step 'a'")


def test_a_step_reached_only_through_a_route_is_reachable():
    data = plan(step("a", routes=[{"when": "true", "to": "b"}]), step("b"))

    assert_valid(data)


def test_the_same_target_twice():
    data = plan(step("a", next_step=["b", "b"]), step("b"))

    assert_only_problem(data, "$.steps.a.next_step[1]", "named twice")


# --- map ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("over", ["text ${workflow.input.x}", "plain", "${workflow.input.a}${workflow.input.b}"])
def test_map_over_text_cannot_be_a_list(over: str):
    data = plan(step("m", map={"over": over}, input_mapping={"item": "${map.item}"}))

    assert_only_problem(data, "$.steps.m.map.over", "cannot be a list")


@pytest.mark.parametrize("over", [5, True, {"a": 1}, None])
def test_map_over_of_the_wrong_type_is_refused_by_the_schema(over: Any):
    problems = problems_of(plan(step("m", map={"over": over})))

    assert [p.path for p in problems] == ["$.steps.m.map.over"], pairs(problems)
    assert "valid" in problems[0].reason


@pytest.mark.parametrize("over", ["${workflow.input.docs}", [1, 2, 3], [], "${first.output.items}"])
def test_map_over_a_placeholder_or_a_literal_list(over: Any):
    data = plan(
        step("first", next_step="m"),
        step("m", map={"over": over, "max_concurrency": 2}, input_mapping={"doc": "${map.item}", "n": "${map.index}"}),
    )

    assert_valid(data)


def test_map_over_its_own_item():
    problems = problems_of(plan(step("m", map={"over": "${map.item}"})))

    assert has_problem(problems, "$.steps.m.map.over", "cannot be read from its own item"), pairs(problems)


@pytest.mark.parametrize("concurrency", [0, 1001])
def test_map_max_concurrency_is_bounded(concurrency: int):
    problems = problems_of(plan(step("m", map={"over": [1], "max_concurrency": concurrency})))

    assert [p.path for p in problems] == ["$.steps.m.map.max_concurrency"]


def test_map_item_outside_a_map_step():
    data = plan(
        step("a", next_step="m", input_mapping={"x": "${map.item}", "i": "${map.index}"}),
        step(
            "m",
            map={"over": [1, 2]},
            routes=[{"when": "${map.item} == 1", "to": "z"}],
        ),
        step("z"),
        output={"last": "${map.item.title}"},
    )

    problems = problems_of(data)

    assert has_problem(problems, "$.steps.a.input_mapping.x", "only known in the input_mapping of a map step")
    assert has_problem(problems, "$.steps.a.input_mapping.i", "only known in the input_mapping of a map step")
    assert has_problem(problems, "$.steps.m.routes[0].when", "only known in the input_mapping of a map step")
    assert has_problem(problems, "$.output.last", "only known in the input_mapping of a map step")
    assert len(problems) == 4, pairs(problems)


# --- what a mapping may read --------------------------------------------------------------------------------------


def test_reading_a_step_on_one_side_of_a_condition_needs_a_default():
    data = routed(merge={"input_mapping": {"fix": "${bug.output.patch}"}})

    problem = assert_only_problem(data, "$.steps.end.input_mapping.fix", "'bug' may not have run")

    assert "??" in problem.reason


def test_reading_a_step_on_one_side_of_a_condition_with_a_default_is_fine():
    data = routed(
        merge={
            "input_mapping": {
                "fix": "${bug.output.patch ?? null}",
                "answer": "${other.output ?? 'none'}",
                "label": "${cl.output.label}",
            }
        }
    )

    assert_valid(data)


def test_a_join_all_after_unconditional_branches_reads_each_branch():
    data = plan(
        step("a", next_step=["b", "c", "d"]),
        step("b", next_step="b2"),
        step("b2", next_step="j"),
        step("c", next_step="j"),
        step("d", next_step="j"),
        step(
            "j",
            join="all",
            next_step="after",
            input_mapping={"b": "${b.output}", "b2": "${b2.output.x}", "c": "${c.output}", "d": "${d.output}"},
        ),
        step("after", input_mapping={"b": "${b.output}", "a": "${a.output}", "j": "${j.output}"}),
    )

    assert_valid(data)


def test_a_join_all_after_routes_reads_its_unconditional_branches():
    # Whenever 'j' starts, 'm' ran, and so did both of the branches it always leads to.
    data = routed(merge={"next_step": ["p", "q"]})
    data["steps"].update(
        {
            "p": step("p", next_step="j"),
            "q": step("q", next_step="j"),
            "j": step("j", input_mapping={"p": "${p.output}", "q": "${q.output}", "end": "${end.output}"}),
        }
    )

    assert_valid(data)


def test_a_branch_cannot_read_its_sibling():
    data = diamond()
    data["steps"]["b"]["input_mapping"] = {"c": "${c.output}"}

    assert_only_problem(data, "$.steps.b.input_mapping.c", "does not run before 'b'")


def test_a_step_after_an_any_join_cannot_read_a_racing_branch():
    data = plan(
        step("a", next_step=["b", "c"]),
        step("b", next_step="j"),
        step("c", next_step="j"),
        step("j", join="any", next_step="after", input_mapping={"fork": "${a.output}"}),
        step("after", input_mapping={"b": "${b.output}", "fork": "${a.output}", "j": "${j.output}"}),
    )

    problem = assert_only_problem(data, "$.steps.after.input_mapping.b", "'b' may not have run")

    assert "race" in problem.reason


def test_an_any_join_cannot_read_a_racing_branch_without_a_default():
    problems = problems_of(diamond("any", input_mapping={"b": "${b.output}", "c": "${c.output ?? null}"}))

    assert [p.path for p in problems] == ["$.steps.d.input_mapping.b"], pairs(problems)


def test_a_loop_body_reading_a_later_body_step_needs_a_default():
    data = plan(
        step("write", next_step="review", input_mapping={"comments": "${review.output.comments}"}),
        step("review", loop=loop("write", when="${review.output.approved} == false")),
    )

    problem = assert_only_problem(data, "$.steps.write.input_mapping.comments", "first iteration")

    assert "??" in problem.reason


def test_a_loop_body_reading_a_later_body_step_with_a_default_is_fine():
    data = plan(
        step("write", next_step="review", input_mapping={"comments": "${review.output.comments ?? ''}"}),
        step(
            "review",
            input_mapping={"draft": "${write.output.text}", "mine": "${review.output ?? null}"},
            loop=loop("write", when="${review.output.approved} == false"),
            next_step="publish",
        ),
        step("publish", input_mapping={"text": "${write.output.text}", "review": "${review.output}"}),
    )

    assert_valid(data)


def test_a_step_cannot_read_its_own_output_outside_a_loop():
    data = plan(step("a", input_mapping={"me": "${a.output ?? null}"}))

    assert_only_problem(data, "$.steps.a.input_mapping.me", "cannot read its own output")


def test_a_condition_reads_its_own_step():
    data = plan(step("a", routes=[{"when": "${a.output.ok} == true", "to": "b"}]), step("b"))

    assert_valid(data)


def test_a_condition_cannot_read_a_later_step():
    data = plan(step("a", routes=[{"when": "${b.output.ok} == true", "to": "b"}]), step("b"))

    assert_only_problem(data, "$.steps.a.routes[0].when", "does not run before 'a'")


# --- conditions --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "when",
    [
        "${review.output.approved} == false",
        '${cl.output.label} in ["bug", "crash"]',
        "has(${workflow.input.x})",
        "has(${workflow.input.x}) && ${workflow.input.x} > 3 || size(${cl.output.items ?? []}) > 10",
        '${review.output.comments ?? ""} != ""',
    ],
)
def test_conditions_that_parse(when: str):
    data = plan(
        step("cl", next_step="review"),
        step("review", routes=[{"when": when, "to": "z"}]),
        step("z"),
    )

    assert_valid(data)


@pytest.mark.parametrize("when", ["${a.output.x} ==", "(${a.output.x}", "${a.output.x} === 1"])
def test_a_condition_that_does_not_parse(when: str):
    data = plan(step("a", routes=[{"when": when, "to": "b"}]), step("b"))

    assert_only_problem(data, "$.steps.a.routes[0].when", "does not parse")


def test_a_loop_condition_that_does_not_parse():
    data = plan(step("a", loop=loop("a", when="${a.output.x} &&")))

    assert_only_problem(data, "$.steps.a.loop.while", "does not parse")


def test_a_condition_naming_an_unknown_bare_variable():
    data = plan(step("a", routes=[{"when": "approved == true", "to": "b"}]), step("b"))

    problem = assert_only_problem(data, "$.steps.a.routes[0].when", "unknown name 'approved'")

    assert "${" in problem.reason


def test_a_malformed_placeholder_in_a_condition():
    data = plan(step("a", routes=[{"when": "${a.outptu.x} == 1", "to": "b"}]), step("b"))

    assert_only_problem(data, "$.steps.a.routes[0].when", "malformed expression")


# --- the plan's output --------------------------------------------------------------------------------------------


def test_plan_output_reading_a_step_on_a_route_needs_a_default():
    data = routed(output={"fix": "${bug.output}", "label": "${cl.output.label}"})

    problem = assert_only_problem(data, "$.output.fix", "'bug' may not run")

    assert "??" in problem.reason


def test_plan_output_reading_a_step_on_a_route_with_a_default_is_fine():
    assert_valid(routed(output={"fix": "${bug.output ?? null}", "label": "${cl.output.label}"}))


def test_plan_output_reading_an_unknown_step():
    data = plan(step("a"), output="${zz.output}")

    assert_only_problem(data, "$.output", "'zz', which is not in this plan")


def test_plan_output_may_read_the_fork_before_an_any_join():
    # 'a' starts both racers: it has finished whenever the run completes.
    data = plan(
        step("a", next_step=["b", "c"]),
        step("b", next_step="j"),
        step("c", next_step="j"),
        step("j", join="any"),
        output={"fork": "${a.output}", "winner": "${j.output}"},
    )

    assert_valid(data)


def test_plan_output_may_read_the_merge_after_routes_with_otherwise():
    # One of 'bug' and 'other' always runs, so 'end' (which waits for all, and runs if one chose it) always runs.
    assert_valid(routed(output={"end": "${end.output}"}))


# --- all at once -------------------------------------------------------------------------------------------------


def test_every_problem_of_the_new_constructs_is_reported_at_once():
    data = plan(
        step("a", next_step=["b", "ghost"]),
        step("b", next_step="c", routes=[{"when": "nope == 1", "to": "c"}]),
        step("c", join="all", next_step="d", input_mapping={"x": "${map.item}"}),
        step("d", map={"over": "plain"}, loop=loop("zz")),
        step("lonely"),
    )

    problems = problems_of(data)

    assert has_problem(problems, "$.steps.a.next_step[1]", "'ghost' is not a step")
    assert has_problem(problems, "$.steps.b.routes", "not both")
    assert has_problem(problems, "$.steps.b.routes[0].when", "unknown name 'nope'")
    assert has_problem(problems, "$.steps.c.join", "nothing to join")
    assert has_problem(problems, "$.steps.c.input_mapping.x", "only known in the input_mapping of a map step")
    assert has_problem(problems, "$.steps.d.map.over", "cannot be a list")
    assert has_problem(problems, "$.steps.d.loop.back_to", "'zz' is not a step")
    assert has_problem(problems, "$.steps.lonely", "unreachable")


def test_problems_come_in_a_stable_order():
    data = plan(
        step("a", next_step=["b", "ghost"]),
        step("b", routes=[{"when": "x", "to": "c"}], otherwise="c"),
        step("c"),
        step("lonely"),
    )

    assert pairs(problems_of(data)) == pairs(problems_of(json.loads(json.dumps(data))))


# --- graph facts --------------------------------------------------------------------------------------------------


def test_order_of_a_diamond_puts_the_join_last_and_ties_in_written_order():
    loaded = assert_valid(
        plan(
            step("a", next_step=["c", "b"]),
            step("b", next_step="d"),
            step("c", next_step="c2"),
            step("c2", next_step="d"),
            step("d"),
        )
    )
    graph = loaded.graph()

    assert loaded.order() == ["a", "b", "c", "c2", "d"]
    assert graph.predecessors["d"] == ("b", "c2")
    assert graph.targets["a"] == ("c", "b")
    assert graph.reachable == frozenset(["a", "b", "c", "c2", "d"])
    assert graph.is_terminal("d")
    assert not graph.is_terminal("a")
    assert graph.cycles == ()


def test_targets_of_routes_and_otherwise():
    graph = assert_valid(routed()).graph()

    assert graph.targets["cl"] == ("bug", "other")
    assert graph.predecessors["end"] == ("bug", "other")
    assert graph.order == ("cl", "bug", "other", "end")


def test_surely_done_after_a_join_all_of_unconditional_branches():
    graph = assert_valid(diamond()).graph()

    assert graph.surely_done("a") == frozenset()
    assert graph.surely_done("b") == {"a"}
    assert graph.surely_done("c") == {"a"}
    assert graph.surely_done("d") == {"a", "b", "c"}


def test_surely_done_after_routes_is_only_what_comes_before_the_condition():
    graph = assert_valid(routed()).graph()

    assert graph.surely_done("bug") == {"cl"}
    assert graph.surely_done("end") == {"cl"}


def test_surely_done_after_an_any_join_leaves_the_racers_out():
    graph = assert_valid(
        plan(
            step("a", next_step=["b", "c"]),
            step("b", next_step="j"),
            step("c", next_step="j"),
            step("j", join="any", next_step="after"),
            step("after"),
        )
    ).graph()

    assert graph.surely_done("j") == {"a"}
    assert graph.surely_done("after") == {"a", "j"}


def test_won_by_is_the_steps_that_lead_only_to_the_any_join():
    graph = assert_valid(
        plan(
            step("a", next_step=["b", "c", "x"]),
            step("b", next_step="b2"),
            step("b2", next_step="j"),
            step("c", next_step=["j", "side"]),
            step("j", join="any", next_step="after"),
            step("x"),
            step("side"),
            step("after"),
        )
    ).graph()

    assert graph.won_by("j") == {"b", "b2"}


def test_won_by_of_a_plain_diamond_holds_both_racers():
    graph = assert_valid(diamond("any")).graph()

    assert {"b", "c"} <= graph.won_by("d")
    assert "d" not in graph.won_by("d")


def test_loop_bodies():
    loaded = assert_valid(
        plan(
            step("s", next_step="w"),
            step("w", next_step=["r1", "r2"]),
            step("r1", next_step="r"),
            step("r2", next_step="r"),
            step("r", loop=loop("w"), next_step="x"),
            step("x", loop=loop("x")),
        )
    )
    graph = loaded.graph()

    assert dict(graph.bodies) == {"r": ("w", "r1", "r2", "r"), "x": ("x",)}
    assert graph.loop_of("r1") == "r"
    assert graph.loop_of("w") == "r"
    assert graph.loop_of("x") == "x"
    assert graph.loop_of("s") is None
    assert graph.surely_done("x") == {"s", "w", "r1", "r2", "r"}


def test_the_graph_is_built_once_per_plan():
    loaded = assert_valid(diamond())

    assert loaded.graph() is loaded.graph()


# --- old-style chains ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CHAIN_EXAMPLES, ids=[p.name for p in CHAIN_EXAMPLES])
def test_example_chain_plans_still_validate_in_chain_order(path: Path):
    data = json.loads(path.read_text())
    loaded = assert_valid(data)

    expected = [data["start_step"]]
    while (following := data["steps"][expected[-1]].get("next_step")) is not None:
        expected.append(following)
    assert loaded.order() == expected
    graph = loaded.graph()
    for index, step_id in enumerate(expected):
        assert graph.surely_done(step_id) == set(expected[:index])
        assert graph.loop_of(step_id) is None


@st.composite
def chain_plans(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    ids = draw(
        st.lists(st.from_regex(r"[a-z][a-z0-9_-]{0,6}", fullmatch=True), min_size=1, max_size=8, unique=True).filter(
            lambda names: "workflow" not in names
        )
    )
    written = draw(st.permutations(ids))
    steps: dict[str, dict[str, Any]] = {}
    for index, step_id in enumerate(ids):
        mapping: dict[str, Any] = {"topic": "${workflow.input.topic}"}
        if index > 0:
            earlier = ids[draw(st.integers(0, index - 1))]
            mapping["previous"] = "${" + earlier + ".output.summary}"
        steps[step_id] = {
            "id": step_id,
            "agent_name": f"agent-{step_id}",
            "input_mapping": mapping,
            "next_step": ids[index + 1] if index + 1 < len(ids) else None,
        }
        if draw(st.booleans()):
            steps[step_id]["timeout_s"] = draw(st.integers(1, 100))
    data = {
        "workflow_id": "chain",
        "name": "chain",
        "version": 1,
        "start_step": ids[0],
        "steps": {key: steps[key] for key in written},
    }
    return data, ids


@settings(max_examples=100, deadline=None)
@given(chain_plans())
def test_every_chain_plan_still_validates_and_orders_its_steps(case: tuple[dict[str, Any], list[str]]):
    data, ids = case

    loaded = assert_valid(data)

    assert loaded.order() == ids
    graph = loaded.graph()
    assert graph.bodies == {}
    for index, step_id in enumerate(ids):
        assert graph.surely_done(step_id) == set(ids[:index])
        assert graph.is_terminal(step_id) == (index == len(ids) - 1)
