"""The throughput bench's pure parts: the chain, its checks, percentiles and ratios."""

from __future__ import annotations

import pytest

from bench.workload import (
    ECHO_SLOW,
    RunRow,
    StepRow,
    Workload,
    chain_plan,
    check_runs,
    expected_output,
    ms_per_step,
    percentile,
    ratio,
    step_input,
)


def good_records(run_ids: list[str], steps: int) -> tuple[list[RunRow], list[StepRow]]:
    runs = [RunRow(r, "COMPLETED", expected_output(r, steps)) for r in run_ids]
    rows = [StepRow(r, f"s{k}", "COMPLETED", expected_output(r, k)) for r in run_ids for k in range(1, steps + 1)]
    return runs, rows


# --- the chain ---------------------------------------------------------------------------------------------------


def test_each_step_appends_its_number_to_what_the_step_before_returned() -> None:
    text = "run-1"
    for k in range(1, 4):
        text = step_input(text, k)["text"]  # the echo agent answers what it is sent
    assert text == "run-1|1|2|3"
    assert expected_output("run-1", 3) == {"text": "run-1|1|2|3"}
    assert expected_output("run-1", 0) == {"text": "run-1"}


def test_the_plan_maps_each_step_from_the_one_before() -> None:
    plan = chain_plan("bench-chain", 3, "echo")
    assert plan.order() == ["s1", "s2", "s3"]
    assert plan.steps["s1"].input_mapping == {"text": "${workflow.input.text}|1"}
    assert plan.steps["s3"].input_mapping == {"text": "${s2.output.text}|3"}
    assert {s.agent_name for s in plan.steps.values()} == {"echo"}
    assert plan.steps["s3"].next_step is None
    assert chain_plan("one", 1, ECHO_SLOW).order() == ["s1"]


def test_a_warm_up_keeps_the_shape() -> None:
    w1 = Workload("W1", "throughput", 1000, 3, 64)
    warm = w1.warm_up(10)
    assert (warm.runs, warm.steps, warm.in_flight, warm.agent) == (10, 3, 10, "echo")
    assert w1.warm_up(100).in_flight == 64
    assert Workload("W0", "latency", 50, 3, 1).warm_up(10).in_flight == 1
    assert w1.describe() == "1000 runs x 3 steps, 64 in flight, on echo"
    assert Workload("W2", "slow", 500, 1, 500, ECHO_SLOW).describe() == "500 runs x 1 step, all at once, on echo-slow"
    assert Workload("W0", "latency", 50, 3, 1).describe().endswith("one at a time, on echo")
    assert w1.total_steps == 3000


# --- the checks --------------------------------------------------------------------------------------------------


def test_right_records_pass() -> None:
    ids = ["a", "b"]
    runs, rows = good_records(ids, 3)
    other = RunRow("someone-else", "FAILED", None)  # rows of other runs are not asked about
    assert check_runs(ids, 3, [*runs, other], rows) == []
    dbos_runs = [RunRow(r.run_id, "SUCCESS", r.output) for r in runs]
    dbos_rows = [StepRow(s.run_id, s.step_id, "SUCCESS", s.output) for s in rows]
    assert check_runs(ids, 3, dbos_runs, dbos_rows, completed="SUCCESS", step_done="SUCCESS") == []


def test_a_wrong_output_is_refused() -> None:
    ids = ["a", "b"]
    runs, rows = good_records(ids, 3)
    runs[1] = RunRow("b", "COMPLETED", {"text": "b|1|2"})  # a step short: fast, and wrong
    assert check_runs(ids, 3, runs, rows) == ["1 run(s) with a wrong output: b"]
    runs[1] = RunRow("b", "COMPLETED", expected_output("a", 3))  # another run's answer
    assert check_runs(ids, 3, runs, rows) == ["1 run(s) with a wrong output: b"]


def test_a_run_missing_or_not_completed_is_refused() -> None:
    ids = ["a", "b", "c"]
    runs, rows = good_records(ids, 1)
    runs = [runs[0], RunRow("b", "RUNNING", None)]
    problems = check_runs(ids, 1, runs, rows)
    assert "1 run(s) not recorded: c" in problems
    assert "1 run(s) not COMPLETED: b" in problems


def test_a_duplicate_run_record_is_refused() -> None:
    runs, rows = good_records(["a"], 1)
    assert check_runs(["a"], 1, runs * 2, rows) == ["1 run(s) recorded more than once: a"]


def test_a_retried_missing_or_wrong_step_is_refused() -> None:
    ids = ["a", "b"]
    runs, rows = good_records(ids, 2)
    retried = [*rows, StepRow("a", "s1", "FAILED", None)]
    problems = check_runs(ids, 2, runs, retried)
    assert problems == ["5 step rows for 2 runs of 2 steps, not 4", "1 run(s) without exactly 2 step rows: a"]
    twice = [*rows, StepRow("b", "s2", "COMPLETED", expected_output("b", 2))]
    assert "1 run(s) without exactly one successful execution of every step: b" in check_runs(ids, 2, runs, twice)
    missing = rows[:-1]
    assert "1 run(s) without exactly one successful execution of every step: b" in check_runs(ids, 2, runs, missing)
    wrong = [*rows[:-1], StepRow("b", "s2", "COMPLETED", {"text": "b|2"})]
    assert check_runs(ids, 2, runs, wrong) == ["1 run(s) with a step whose output is wrong: b"]
    foreign = [*rows[:-1], StepRow("b", "s9", "COMPLETED", {})]
    assert "1 run(s) with a step that is not in the chain: b" in check_runs(ids, 2, runs, foreign)


def test_a_problem_names_a_few_runs_and_counts_them_all() -> None:
    ids = [f"r{i}" for i in range(5)]
    runs, rows = good_records(ids, 1)
    runs = [RunRow(r.run_id, "FAILED", None) for r in runs]
    assert check_runs(ids, 1, runs, rows) == ["5 run(s) not COMPLETED: r0, r1, r2 and 2 more"]


# --- figures -----------------------------------------------------------------------------------------------------


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0  # order does not matter
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 99) == pytest.approx(99.01)
    with pytest.raises(ValueError, match="from 0 to 100"):
        percentile(values, 101)


def test_ratios_for_table_cells() -> None:
    assert ratio(10.0, 4.0) == "2.5x"
    assert ratio(1.0, 3.0) == "0.333x"
    assert ratio(1234.0, 1.0) == "1234x"
    assert ratio(None, 1.0) == "-"
    assert ratio(1.0, None) == "-"
    assert ratio(1.0, 0.0) == "-"  # direct at rest uses about nothing: no ratio
    assert ratio(0.0, 2.0) == "0x"


def test_cpu_as_milliseconds_per_step() -> None:
    assert ms_per_step({"executor": 1.5, "bridge": 0.3}, 300) == {"executor": 5.0, "bridge": 1.0}
    assert ms_per_step({"executor": 1.5}, 0) == {}
