"""The run state machine on plans with branches, joins, routes, loops and maps (example based)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from pydantic import JsonValue

from models.messages import AgentError, AgentResult, AgentTask, ErrorKind, ResultStatus
from models.plan import load_plan
from models.run import (
    AgentResultReceived,
    CancelAgentTask,
    CancelRequested,
    Checkpoint,
    DeadLetter,
    DispatchTask,
    Effect,
    Event,
    Execution,
    RetryRequested,
    RunFinished,
    RunState,
    RunStatus,
    RunSubmitted,
    ScheduleTimeout,
    StepStatus,
    StepTimedOut,
    execution_key,
    resume,
    transition,
)
from tests.models.run_builders import assert_checkpoint

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
RUN_ID = "run-g"
NO_RETRY = {"max_attempts": 1}
QUICK_RETRY = {"max_attempts": 3, "initial_delay_s": 0, "jitter": 0}

E = TypeVar("E")


def of_type(effects: Iterable[object], kind: type[E]) -> list[E]:
    return [effect for effect in effects if isinstance(effect, kind)]


def tasks(effects: Iterable[object]) -> list[AgentTask]:
    return [effect.task for effect in of_type(effects, DispatchTask)]


# Outputs and task inputs are typed JsonValue; these check the shape a test's own plan gives them.


def as_dict(value: JsonValue) -> dict[str, JsonValue]:
    assert isinstance(value, dict), value
    return value


def as_list(value: JsonValue) -> list[JsonValue]:
    assert isinstance(value, list), value
    return value


def as_int(value: JsonValue) -> int:
    assert isinstance(value, int), value
    return value


def as_str(value: JsonValue) -> str:
    assert isinstance(value, str), value
    return value


def arg(task: AgentTask, name: str) -> JsonValue:
    """One field of a task's input (an object, for every step whose plan has an input mapping)."""
    return as_dict(task.input)[name]


def item_of(task: AgentTask) -> int:
    """The item of a task of a map step."""
    assert task.item is not None, task
    return task.item


def json_list(values: Iterable[JsonValue]) -> list[JsonValue]:
    """A list of JSON values (a ``list[str]`` is no ``list[JsonValue]`` to mypy: lists are invariant)."""
    return list(values)


def step(step_id: str, agent: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "agent_name": agent or f"agent-{step_id}", **fields}


def plan(*steps: dict[str, Any], start: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "workflow_id": "wf",
        "name": "graph run",
        "version": "1",
        "start_step": start if start is not None else steps[0]["id"],
        "steps": {s["id"]: s for s in steps},
        **extra,
    }


class Run:
    """One run driven event by event; every transition is checked for the change rules."""

    def __init__(self, data: dict[str, Any], run_input: dict[str, JsonValue] | None = None) -> None:
        self.plan = load_plan(data)
        self.clock = 0.0
        self.calls: list[AgentTask] = []
        self.finished: list[RunFinished] = []
        state, effects = transition(
            None, RunSubmitted(run_id=RUN_ID, plan=self.plan, input=run_input or {}, at=self.now())
        )
        assert state is not None
        assert_checkpoint(None, state, effects[-1])
        self.state: RunState = state
        self.last: list[Effect] = effects
        self._record(effects)

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.clock)

    def tick(self, seconds: float = 1.0) -> datetime:
        self.clock += seconds
        return self.now()

    def _record(self, effects: list[Effect]) -> None:
        self.calls.extend(tasks(effects))
        self.finished.extend(of_type(effects, RunFinished))

    def send(self, event: Event) -> list[Effect]:
        old = self.state
        new, effects = transition(old, event)
        assert new is not None
        if new is old:
            assert effects == [] or (len(effects) == 1 and isinstance(effects[0], DeadLetter)), effects
        else:
            assert new.version == old.version + 1
            assert_checkpoint(old, new, effects[-1])
            assert len(of_type(effects, Checkpoint)) == 1
        self.state = new
        self.last = effects
        self._record(effects)
        return effects

    # --- looking at the run

    def execution(self, step_id: str, iteration: int = 1, item: int | None = None) -> Execution:
        return self.state.executions[execution_key(step_id, iteration, item)]

    def open_keys(self) -> list[str]:
        return [e.key for e in self.state.open_executions()]

    def run_status(self) -> RunStatus:
        """The run's status, read afresh (mypy keeps ``run.state.status`` narrowed across events)."""
        return self.state.status

    def status(self, step_id: str) -> StepStatus:
        return self.state.steps[step_id].status

    def statuses(self) -> dict[str, StepStatus]:
        return {key: s.status for key, s in self.state.steps.items()}

    # --- events

    def result_for(
        self,
        step_id: str,
        *,
        iteration: int = 1,
        item: int | None = None,
        output: JsonValue = None,
        error: AgentError | None = None,
        attempt: int | None = None,
    ) -> AgentResultReceived:
        execution = self.execution(step_id, iteration, item)
        current = execution.current
        assert current is not None
        number = attempt if attempt is not None else current.number
        chosen = next(a for a in execution.attempts if a.number == number)
        when = self.tick()
        return AgentResultReceived(
            result=AgentResult(
                correlation_id=chosen.correlation_id,
                run_id=RUN_ID,
                step_id=step_id,
                attempt=number,
                iteration=iteration,
                item=item,
                status=ResultStatus.FAILURE if error is not None else ResultStatus.SUCCESS,
                output=None if error is not None else output,
                error=error,
                started_at=when,
                finished_at=when,
            ),
            at=when,
        )

    def ok(self, step_id: str, output: JsonValue = None, **where: Any) -> list[Effect]:
        if output is None:
            output = {"from": step_id}
        return self.send(self.result_for(step_id, output=output, **where))

    def fail(
        self, step_id: str, *, kind: str = "agent_failed", retriable: bool = False, message: str = "boom", **where: Any
    ) -> list[Effect]:
        error = AgentError(kind=kind, message=message, retriable=retriable)
        return self.send(self.result_for(step_id, error=error, **where))

    def timeout(self, step_id: str, *, iteration: int = 1, item: int | None = None) -> list[Effect]:
        execution = self.execution(step_id, iteration, item)
        current = execution.current
        assert current is not None
        self.clock = max(self.clock, (current.deadline - T0).total_seconds())
        event = StepTimedOut(
            run_id=RUN_ID, step_id=step_id, attempt=current.number, iteration=iteration, item=item, at=self.now()
        )
        return self.send(event)

    def retry(self) -> list[Effect]:
        return self.send(RetryRequested(run_id=RUN_ID, at=self.tick()))

    def cancel(self) -> list[Effect]:
        return self.send(CancelRequested(run_id=RUN_ID, at=self.tick()))

    def drive(self, answer: Callable[[AgentTask], JsonValue], *, limit: int = 100_000) -> None:
        """Answer every dispatched task successfully, first in, first out, until nothing is in flight."""
        pending = tasks(self.last)
        for _ in range(limit):
            if not pending:
                return
            task = pending.pop(0)
            effects = self.ok(task.step_id, answer(task), iteration=task.iteration, item=task.item)
            pending.extend(tasks(effects))
        raise AssertionError("the run did not settle")


def calls_of(run: Run, step_id: str) -> list[AgentTask]:
    return [t for t in run.calls if t.step_id == step_id]


# ===================================================================== parallel branches and join "all"


def three_branches(join: str | None = None) -> dict[str, Any]:
    fields = {"join": join} if join is not None else {}
    return plan(
        step("a", next_step=["b", "c", "d"], input_mapping={"topic": "${workflow.input.topic}"}),
        step("b", next_step="j", input_mapping={"a": "${a.output.n}"}),
        step("c", next_step="j", input_mapping={"a": "${a.output.n}"}),
        step("d", next_step="j", input_mapping={"a": "${a.output.n}"}),
        step(
            "j",
            **fields,
            input_mapping={"b": "${b.output}", "c": "${c.output.v}", "d": "${d.output}", "a": "${a.output.n}"},
        ),
    )


def test_parallel_branches_are_dispatched_by_the_same_transition():
    run = Run(three_branches(), {"topic": "kafka"})
    assert [t.step_id for t in tasks(run.last)] == ["a"]

    effects = run.ok("a", {"n": 7})

    dispatched = tasks(effects)
    assert [t.step_id for t in dispatched] == ["b", "c", "d"]
    assert all(t.input == {"a": 7} for t in dispatched)
    assert [(s.step_id, s.attempt) for s in of_type(effects, ScheduleTimeout)] == [("b", 1), ("c", 1), ("d", 1)]
    assert run.open_keys() == ["b@1", "c@1", "d@1"]
    assert {k: run.status(k) for k in "bcd"} == dict.fromkeys("bcd", StepStatus.RUNNING)


def test_join_all_fires_once_with_each_branch_output():
    run = Run(three_branches("all"), {"topic": "kafka"})
    run.ok("a", {"n": 1})

    assert tasks(run.ok("c", {"v": "C"})) == []
    assert tasks(run.ok("b", "B")) == []
    assert run.status("j") is StepStatus.PENDING
    assert set(run.state.steps["j"].arrived) == {"b", "c"}
    effects = run.ok("d", ["D"])

    [join_task] = tasks(effects)
    assert join_task.step_id == "j"
    assert join_task.input == {"b": "B", "c": "C", "d": ["D"], "a": 1}
    # A duplicate of the last branch's result changes nothing, and the join is not started again.
    duplicate = AgentResultReceived(
        result=AgentResult(
            correlation_id=run.execution("d").attempts[0].correlation_id,
            run_id=RUN_ID,
            step_id="d",
            attempt=1,
            status=ResultStatus.SUCCESS,
            output=["D"],
            started_at=run.now(),
            finished_at=run.now(),
        ),
        at=run.tick(),
    )
    assert run.send(duplicate) == []
    run.ok("j", {"joined": True})

    assert run.state.status is RunStatus.COMPLETED
    assert run.state.output == {"joined": True}
    assert [t.step_id for t in run.calls].count("j") == 1
    assert len(run.finished) == 1


def test_default_join_waits_like_all_for_a_longer_branch():
    run = Run(
        plan(
            step("a", next_step=["b", "c"]),
            step("b", next_step="b2"),
            step("b2", next_step="j"),
            step("c", next_step="j"),
            step("j", input_mapping={"b2": "${b2.output}", "c": "${c.output}"}),
        )
    )
    run.ok("a")
    run.ok("c", "C")
    run.ok("b", "B")
    assert run.status("j") is StepStatus.PENDING

    [join_task] = tasks(run.ok("b2", "B2"))

    assert join_task.input == {"b2": "B2", "c": "C"}


# ===================================================================== join "any"


def race() -> dict[str, Any]:
    return plan(
        step("a", next_step=["fast", "slow"]),
        step("fast", next_step="j"),
        step("slow", next_step="j"),
        step("j", join="any", input_mapping={"fast": "${fast.output ?? null}", "slow": "${slow.output ?? null}"}),
    )


def test_join_any_starts_at_the_first_branch_and_cancels_the_other():
    run = Run(race())
    run.ok("a")
    slow_attempt = run.execution("slow").attempts[0]

    effects = run.ok("fast", "won")

    [join_task] = tasks(effects)
    assert join_task.step_id == "j"
    assert join_task.input == {"fast": "won", "slow": None}
    assert of_type(effects, CancelAgentTask) == [
        CancelAgentTask(
            run_id=RUN_ID,
            step_id="slow",
            attempt=1,
            iteration=1,
            item=None,
            correlation_id=slow_attempt.correlation_id,
            agent_name="agent-slow",
        )
    ]
    assert run.status("slow") is StepStatus.SKIPPED
    assert run.execution("slow").status is StepStatus.CANCELLED
    assert run.status("j") is StepStatus.RUNNING


def test_a_late_result_of_the_loser_is_ignored():
    run = Run(race())
    run.ok("a")
    late = run.result_for("slow", output="too late")
    run.ok("fast", "won")
    before = run.state

    assert run.send(late) == []
    assert run.state is before

    run.ok("j", "done")
    assert run.state.status is RunStatus.COMPLETED
    assert run.state.output == "done"
    assert run.send(run.result_for("slow", output="later still")) == []
    assert len(run.finished) == 1


def test_join_any_skips_a_racer_that_had_not_started():
    run = Run(
        plan(
            step("a", next_step=["fast", "slow"]),
            step("fast", next_step="j"),
            step("slow", next_step="slow2"),
            step("slow2", next_step="j"),
            step("j", join="any"),
        )
    )
    run.ok("a")

    effects = run.ok("fast")

    assert [c.step_id for c in of_type(effects, CancelAgentTask)] == ["slow"]
    assert run.status("slow") is StepStatus.SKIPPED
    assert run.status("slow2") is StepStatus.SKIPPED
    assert "slow2" not in {t.step_id for t in run.calls}
    run.ok("j")
    assert run.state.status is RunStatus.COMPLETED


# ===================================================================== routes


def triage(*, otherwise: bool = True) -> dict[str, Any]:
    cl: dict[str, Any] = {
        "routes": [
            {"when": '${cl.output.label} in ["bug", "crash"]', "to": "fix"},
            {"when": "${cl.output.label} == 'feature'", "to": ["plan", "estimate"]},
        ]
    }
    if otherwise:
        cl["otherwise"] = "answer"
    else:
        cl["routes"].append({"when": "${cl.output.label} == 'support'", "to": "answer"})
    return plan(
        step("cl", **cl),
        step("fix", next_step="end"),
        step("plan", next_step="end"),
        step("estimate", next_step="end"),
        step("answer", next_step="end"),
        step(
            "end",
            input_mapping={
                "fix": "${fix.output ?? 'none'}",
                "plan": "${plan.output ?? 'none'}",
                "answer": "${answer.output ?? 'none'}",
                "label": "${cl.output.label}",
            },
        ),
    )


def test_the_matching_route_runs_the_others_are_skipped_and_the_merge_runs():
    run = Run(triage())

    effects = run.ok("cl", {"label": "crash"})

    assert [t.step_id for t in tasks(effects)] == ["fix"]
    assert run.status("plan") is StepStatus.SKIPPED
    assert run.status("estimate") is StepStatus.SKIPPED
    assert run.status("answer") is StepStatus.SKIPPED
    assert run.status("end") is StepStatus.PENDING
    [end_task] = tasks(run.ok("fix", "patched"))
    assert end_task.input == {"fix": "patched", "plan": "none", "answer": "none", "label": "crash"}
    run.ok("end", "closed")
    assert run.state.status is RunStatus.COMPLETED
    assert run.state.output == "closed"
    assert {t.step_id for t in run.calls} == {"cl", "fix", "end"}


def test_a_route_to_several_steps_runs_them_in_parallel():
    run = Run(triage())

    effects = run.ok("cl", {"label": "feature"})

    assert [t.step_id for t in tasks(effects)] == ["plan", "estimate"]
    assert run.status("fix") is StepStatus.SKIPPED
    run.ok("plan", "P")
    [end_task] = tasks(run.ok("estimate", "E"))
    assert arg(end_task, "plan") == "P"


def test_otherwise_is_taken_when_no_route_holds():
    run = Run(triage())

    effects = run.ok("cl", {"label": "question"})

    assert [t.step_id for t in tasks(effects)] == ["answer"]
    assert {k: run.status(k) for k in ("fix", "plan", "estimate")} == dict.fromkeys(
        ("fix", "plan", "estimate"), StepStatus.SKIPPED
    )
    [end_task] = tasks(run.ok("answer", "42"))
    assert arg(end_task, "answer") == "42"


def test_no_route_and_no_otherwise_ends_that_path():
    run = Run(triage(otherwise=False))

    effects = run.ok("cl", {"label": "question"})

    assert tasks(effects) == []
    assert {k: run.status(k) for k in ("fix", "plan", "estimate", "answer", "end")} == dict.fromkeys(
        ("fix", "plan", "estimate", "answer", "end"), StepStatus.SKIPPED
    )
    assert run.state.status is RunStatus.COMPLETED
    assert len(run.finished) == 1


def test_the_output_of_a_run_whose_path_ended_at_a_route_is_that_step_output():
    run = Run(triage(otherwise=False))

    run.ok("cl", {"label": "question"})

    # 'cl' ended the run's only path: by default, its output is the run's.
    assert run.state.output == {"label": "question"}
    assert run.finished[-1].output == {"label": "question"}


def test_skips_propagate_through_a_branch_but_a_join_still_runs_when_one_chose_it():
    run = Run(
        plan(
            step("a", next_step=["r", "other"]),
            step("r", routes=[{"when": "${r.output.go} == true", "to": "r1"}]),
            step("r1", next_step="r2"),
            step("r2", next_step="j"),
            step("other", next_step="j"),
            step("j", input_mapping={"r2": "${r2.output ?? 'skipped'}", "other": "${other.output}"}),
        )
    )
    run.ok("a")
    run.ok("r", {"go": False})

    assert run.status("r1") is StepStatus.SKIPPED
    assert run.status("r2") is StepStatus.SKIPPED
    [join_task] = tasks(run.ok("other", "O"))

    assert join_task.input == {"r2": "skipped", "other": "O"}


def test_has_condition_on_the_workflow_input():
    data = plan(
        step("a", routes=[{"when": "has(${workflow.input.urgent})", "to": "page"}], otherwise="queue"),
        step("page"),
        step("queue"),
    )

    urgent = Run(data, {"urgent": True})
    assert [t.step_id for t in tasks(urgent.ok("a"))] == ["page"]
    calm = Run(data, {})
    assert [t.step_id for t in tasks(calm.ok("a"))] == ["queue"]


def test_a_condition_error_fails_the_run_naming_the_step_and_the_missing_key():
    run = Run(triage())

    effects = run.ok("cl", {"lable": "bug"})

    assert tasks(effects) == []
    assert run.state.status is RunStatus.FAILED
    error = run.state.error
    assert error is not None
    assert error.kind == ErrorKind.CONDITION_ERROR
    assert error.step_id == "cl"
    assert "'cl'" in error.message
    assert "label" in error.message
    assert "lable" in error.message  # what was there instead
    assert run.status("cl") is StepStatus.FAILED
    [finished] = of_type(effects, RunFinished)
    assert finished.status is RunStatus.FAILED
    # A retry would decide on the same output: refused.
    assert of_type(run.retry(), DeadLetter)


@pytest.mark.parametrize(
    ("when", "output"),
    [
        ("${cl.output.score} > 3", {"score": "high"}),  # string compared with a number
        ("${cl.output.label}", {"label": "bug"}),  # not a boolean
    ],
)
def test_a_condition_that_cannot_be_evaluated_fails_the_run(when: str, output: JsonValue):
    run = Run(plan(step("cl", routes=[{"when": when, "to": "b"}], otherwise="c"), step("b"), step("c")))

    run.ok("cl", output)

    assert run.state.status is RunStatus.FAILED
    assert run.state.error is not None
    assert run.state.error.kind == ErrorKind.CONDITION_ERROR
    assert "'cl'" in run.state.error.message


# ===================================================================== loops


def writing_loop(max_iterations: int = 5, when_exhausted: str = "fail") -> dict[str, Any]:
    return plan(
        step(
            "write",
            next_step="review",
            input_mapping={"topic": "${workflow.input.topic}", "comments": "${review.output.comments ?? ''}"},
        ),
        step(
            "review",
            input_mapping={"draft": "${write.output.text}"},
            loop={
                "back_to": "write",
                "while": "${review.output.approved} == false",
                "max_iterations": max_iterations,
                "when_exhausted": when_exhausted,
            },
            next_step="publish",
        ),
        step("publish", input_mapping={"text": "${write.output.text}"}),
    )


def test_loop_runs_each_iteration_as_its_own_execution():
    run = Run(writing_loop(), {"topic": "kafka"})
    verdicts = iter([False, False, True])

    def answer(task: AgentTask) -> JsonValue:
        if task.step_id == "write":
            return {"text": f"draft {task.iteration}"}
        if task.step_id == "review":
            return {"approved": next(verdicts), "comments": f"fix {task.iteration}"}
        return {"published": arg(task, "text")}

    run.drive(answer)

    assert list(run.state.executions) == [
        "write@1",
        "review@1",
        "write@2",
        "review@2",
        "write@3",
        "review@3",
        "publish@1",
    ]
    assert [(t.step_id, t.iteration) for t in run.calls] == [
        ("write", 1),
        ("review", 1),
        ("write", 2),
        ("review", 2),
        ("write", 3),
        ("review", 3),
        ("publish", 1),
    ]
    writes = calls_of(run, "write")
    assert writes[0].input == {"topic": "kafka", "comments": ""}
    assert writes[1].input == {"topic": "kafka", "comments": "fix 1"}
    assert writes[2].input == {"topic": "kafka", "comments": "fix 2"}
    assert [t.input for t in calls_of(run, "review")] == [{"draft": f"draft {i}"} for i in (1, 2, 3)]
    assert calls_of(run, "publish")[0].input == {"text": "draft 3"}
    assert run.state.status is RunStatus.COMPLETED
    assert run.state.output == {"published": "draft 3"}
    assert run.state.steps["write"].iteration == 3
    assert run.execution("write", 2).output == {"text": "draft 2"}
    # Each iteration's correlation id is distinct: a result of iteration 1 cannot be taken for iteration 2.
    assert len({t.correlation_id for t in run.calls}) == len(run.calls)


def test_a_result_of_a_previous_iteration_is_ignored():
    run = Run(writing_loop(), {"topic": "kafka"})
    run.ok("write", {"text": "d1"})
    old_review = run.result_for("review", output={"approved": False, "comments": "again"})
    run.send(old_review)
    assert run.state.steps["write"].iteration == 2

    assert run.send(old_review) == []
    stale_write = run.result_for("write", iteration=1, output={"text": "old"})
    assert run.send(stale_write) == []


def test_loop_exhausted_with_fail_fails_the_run():
    run = Run(writing_loop(max_iterations=2, when_exhausted="fail"), {"topic": "kafka"})

    run.drive(lambda t: {"approved": False, "comments": "no"} if t.step_id == "review" else {"text": "x"})

    assert run.state.status is RunStatus.FAILED
    error = run.state.error
    assert error is not None
    assert error.kind == ErrorKind.LOOP_EXHAUSTED
    assert error.step_id == "review"
    assert error.iteration == 2
    assert list(run.state.executions) == ["write@1", "review@1", "write@2", "review@2"]
    assert "publish" not in run.state.steps or run.status("publish") is not StepStatus.COMPLETED
    assert len(run.finished) == 1
    assert of_type(run.retry(), DeadLetter)


def test_loop_exhausted_with_continue_goes_on_to_next_step():
    run = Run(writing_loop(max_iterations=2, when_exhausted="continue"), {"topic": "kafka"})

    run.drive(
        lambda t: (
            {"approved": False, "comments": "no"}
            if t.step_id == "review"
            else {"text": f"v{t.iteration}"}
            if t.step_id == "write"
            else "published"
        )
    )

    assert run.state.status is RunStatus.COMPLETED
    assert list(run.state.executions) == ["write@1", "review@1", "write@2", "review@2", "publish@1"]
    assert calls_of(run, "publish")[0].input == {"text": "v2"}
    assert run.state.output == "published"


def test_a_loop_of_one_step():
    run = Run(
        plan(
            step(
                "poll",
                input_mapping={"last": "${poll.output.n ?? 0}"},
                loop={"back_to": "poll", "while": "${poll.output.n} < 3", "max_iterations": 10},
            )
        )
    )

    run.drive(lambda t: {"n": as_int(arg(t, "last")) + 1})

    assert run.state.status is RunStatus.COMPLETED
    assert list(run.state.executions) == ["poll@1", "poll@2", "poll@3"]
    assert run.state.output == {"n": 3}


def test_a_branch_skipped_in_a_later_iteration_reads_as_its_default():
    run = Run(
        plan(
            step("w", next_step="r"),
            step("r", routes=[{"when": "${r.output.ok} == true", "to": "yes"}], otherwise="no"),
            step("yes", next_step="z"),
            step("no", next_step="z"),
            step(
                "z",
                input_mapping={"yes": "${yes.output ?? 'skipped'}", "no": "${no.output ?? 'skipped'}"},
                loop={"back_to": "w", "while": "${z.output.again} == true", "max_iterations": 3},
            ),
        )
    )

    def answer(task: AgentTask) -> JsonValue:
        if task.step_id == "r":
            return {"ok": task.iteration == 1}
        if task.step_id == "z":
            return {"again": task.iteration < 2}
        return f"{task.step_id}{task.iteration}"

    run.drive(answer)

    assert run.state.status is RunStatus.COMPLETED
    assert [t.input for t in calls_of(run, "z")] == [
        {"yes": "yes1", "no": "skipped"},
        # In iteration 2 the route chose 'no': 'yes' was skipped, so z reads its default, not iteration 1's output.
        {"yes": "skipped", "no": "no2"},
    ]


def test_a_loop_condition_error_fails_the_run():
    run = Run(writing_loop(), {"topic": "kafka"})
    run.ok("write", {"text": "x"})

    run.ok("review", {"verdict": "meh"})

    assert run.state.status is RunStatus.FAILED
    assert run.state.error is not None
    assert run.state.error.kind == ErrorKind.CONDITION_ERROR
    assert "'review'" in run.state.error.message
    assert "approved" in run.state.error.message


# ===================================================================== map


def mapping_plan(
    over: Any = "${workflow.input.docs}", *, concurrency: int = 3, on_item_failure: str = "fail", **fields: Any
) -> dict[str, Any]:
    return plan(
        step(
            "m",
            map={"over": over, "max_concurrency": concurrency, "on_item_failure": on_item_failure},
            input_mapping={"doc": "${map.item}", "index": "${map.index}", "topic": "${workflow.input.topic ?? ''}"},
            next_step="after",
            **fields,
        ),
        step("after", input_mapping={"all": "${m.output}"}),
    )


def test_map_keeps_to_max_concurrency_and_outputs_in_item_order():
    docs = [f"doc{i}" for i in range(10)]
    run = Run(mapping_plan(concurrency=3), {"docs": json_list(docs)})
    assert [(t.step_id, t.item, arg(t, "doc")) for t in tasks(run.last)] == [
        ("m", 0, "doc0"),
        ("m", 1, "doc1"),
        ("m", 2, "doc2"),
    ]
    in_flight = {item_of(t) for t in tasks(run.last)}
    answered: list[int] = []
    while in_flight:
        assert len(in_flight) <= 3
        assert len([k for k in run.open_keys() if k.startswith("m@")]) <= 3
        item = max(in_flight)  # the latest first: results arrive out of order
        in_flight.remove(item)
        answered.append(item)
        effects = run.ok("m", {"summary": docs[item].upper()}, item=item)
        in_flight |= {item_of(t) for t in tasks(effects) if t.step_id == "m"}

    assert answered != sorted(answered)
    assert sorted(answered) == list(range(10))
    assert run.state.steps["m"].status is StepStatus.COMPLETED
    expected = [{"summary": d.upper()} for d in docs]
    assert run.state.output_of("m") == expected
    assert [k for k in run.state.executions if k.startswith("m@")] == [f"m@1[{i}]" for i in range(10)]
    [after] = calls_of(run, "after")
    assert after.input == {"all": expected}
    assert [arg(t, "index") for t in calls_of(run, "m")] == sorted(item_of(t) for t in calls_of(run, "m"))


def test_map_over_an_empty_list_completes_with_an_empty_list():
    run = Run(mapping_plan(), {"docs": []})

    [after] = tasks(run.last)

    assert after.step_id == "after"
    assert after.input == {"all": []}
    assert run.state.steps["m"].status is StepStatus.COMPLETED
    assert run.state.output_of("m") == []
    run.ok("after", "end")
    assert run.state.status is RunStatus.COMPLETED


def test_map_over_a_literal_list():
    run = Run(mapping_plan(["x", "y"]))

    run.drive(lambda t: as_str(arg(t, "doc")) * 2 if t.step_id == "m" else arg(t, "all"))

    assert run.state.status is RunStatus.COMPLETED
    assert run.state.output == ["xx", "yy"]


@pytest.mark.parametrize("docs", ["not a list", {"a": 1}, 3, None])
def test_map_over_something_that_is_not_a_list_fails_with_invalid_map_list(docs: JsonValue):
    run = Run(mapping_plan(), {"docs": docs})

    assert tasks(run.last) == []
    assert run.state.status is RunStatus.FAILED
    assert run.state.error is not None
    assert run.state.error.kind == ErrorKind.INVALID_MAP_LIST
    assert run.state.error.step_id == "m"
    assert run.status("m") is StepStatus.FAILED


def test_map_item_failure_with_fail_fails_the_run_and_cancels_the_other_items():
    run = Run(mapping_plan(concurrency=3, retry=NO_RETRY), {"docs": list(range(6))})
    run.ok("m", "zero", item=0)  # opens item 3
    assert set(run.open_keys()) == {"m@1[1]", "m@1[2]", "m@1[3]"}

    effects = run.fail("m", item=2)

    assert run.state.status is RunStatus.FAILED
    assert run.state.error is not None
    assert run.state.error.step_id == "m"
    assert run.state.error.item == 2
    assert {(c.step_id, c.item) for c in of_type(effects, CancelAgentTask)} == {("m", 1), ("m", 3)}
    assert tasks(effects) == []
    assert run.execution("m", item=1).status is StepStatus.CANCELLED
    assert run.execution("m", item=3).status is StepStatus.CANCELLED
    assert run.execution("m", item=0).status is StepStatus.COMPLETED
    assert run.open_keys() == []
    assert "m@1[4]" not in run.state.executions
    assert run.send(run.result_for("m", item=1, output="late")) == []


def test_map_item_failure_with_collect_keeps_an_error_entry():
    run = Run(mapping_plan(concurrency=2, on_item_failure="collect", retry=NO_RETRY), {"docs": ["a", "b", "c"]})
    run.fail("m", item=1, kind="agent_failed", message="item b broke")
    assert run.state.status is RunStatus.RUNNING

    run.ok("m", "A", item=0)
    effects = run.ok("m", "C", item=2)

    expected = ["A", {"error": {"kind": "agent_failed", "message": "item b broke"}}, "C"]
    assert run.state.output_of("m") == expected
    [after] = tasks(effects)
    assert after.input == {"all": expected}
    run.ok("after", "fine")
    assert run.run_status() is RunStatus.COMPLETED


def test_map_items_whose_input_cannot_be_mapped_are_collected_as_errors():
    data = plan(
        step(
            "m",
            map={"over": "${workflow.input.docs}", "max_concurrency": 2, "on_item_failure": "collect"},
            input_mapping={"title": "${map.item.title}"},
        )
    )
    run = Run(data, {"docs": [{"title": "a"}, {"name": "b"}, {"title": "c"}]})
    assert [t.item for t in tasks(run.last)] == [0, 2]

    run.ok("m", "A", item=0)
    run.ok("m", "C", item=2)

    assert run.state.status is RunStatus.COMPLETED
    output = run.state.output
    assert isinstance(output, list)
    assert output[0] == "A"
    assert output[2] == "C"
    assert as_dict(as_dict(output[1])["error"])["kind"] == ErrorKind.MAPPING_ERROR


def test_a_long_map_whose_items_cannot_be_mapped_is_collected_without_crashing():
    data = plan(
        step(
            "m",
            map={"over": "${workflow.input.docs}", "max_concurrency": 5, "on_item_failure": "collect"},
            input_mapping={"title": "${map.item.title}"},
        )
    )

    run = Run(data, {"docs": list(range(1000))})

    assert run.state.status is RunStatus.COMPLETED
    assert isinstance(run.state.output, list)
    assert len(run.state.output) == 1000
    assert all(as_dict(as_dict(entry)["error"])["kind"] == ErrorKind.MAPPING_ERROR for entry in run.state.output)


def test_a_map_of_1000_items_completes():
    docs = list(range(1000))
    run = Run(mapping_plan(concurrency=50), {"docs": json_list(docs)})
    started = time.perf_counter()

    run.drive(lambda t: as_int(arg(t, "doc")) * 2 if t.step_id == "m" else len(as_list(arg(t, "all"))))

    assert time.perf_counter() - started < 30
    assert run.state.status is RunStatus.COMPLETED
    assert run.state.output_of("m") == [d * 2 for d in docs]
    assert run.state.output == 1000
    assert len(calls_of(run, "m")) == 1000


def test_map_item_retries_after_a_retriable_failure():
    run = Run(mapping_plan(concurrency=2, retry=QUICK_RETRY), {"docs": ["a", "b"]})

    effects = run.fail("m", item=1, retriable=True)

    [again] = tasks(effects)
    assert (again.step_id, again.item, again.attempt) == ("m", 1, 2)
    run.ok("m", "A", item=0)
    run.ok("m", "B", item=1)
    assert run.state.output_of("m") == ["A", "B"]


def test_retry_after_a_failed_map_item_completes_the_map():
    run = Run(mapping_plan(concurrency=2, retry=NO_RETRY), {"docs": ["a", "b", "c", "d"]})
    run.fail("m", item=0)
    assert run.state.status is RunStatus.FAILED

    effects = run.retry()

    assert sorted(item_of(t) for t in tasks(effects)) == [0, 1]
    run.last = effects
    run.drive(lambda t: as_str(arg(t, "doc")).upper() if t.step_id == "m" else arg(t, "all"))
    assert run.run_status() is RunStatus.COMPLETED
    assert run.state.output == ["A", "B", "C", "D"]


# ===================================================================== retry of a failed branch


def test_retry_after_a_failed_branch_reopens_only_the_failed_execution():
    run = Run(
        plan(
            step("a", next_step=["b", "c"]),
            step("b", next_step="j", retry=NO_RETRY),
            step("c", next_step="j"),
            step("j", input_mapping={"b": "${b.output}", "c": "${c.output}"}),
        )
    )
    run.ok("a")
    run.ok("c", "C")
    run.fail("b", retriable=False)
    assert run.state.status is RunStatus.FAILED
    assert run.state.error is not None
    assert run.state.error.step_id == "b"

    effects = run.retry()

    [again] = tasks(effects)
    assert (again.step_id, again.attempt) == ("b", 2)
    assert run.run_status() is RunStatus.RUNNING
    assert run.execution("c").status is StepStatus.COMPLETED
    assert run.status("c") is StepStatus.COMPLETED
    [join_task] = tasks(run.ok("b", "B"))
    assert join_task.input == {"b": "B", "c": "C"}
    run.ok("j", "J")
    assert run.run_status() is RunStatus.COMPLETED
    assert [t.step_id for t in run.calls] == ["a", "b", "c", "b", "j"]
    assert len(run.finished) == 2  # one per ending: failed, then completed


def test_retry_reopens_a_branch_that_was_cancelled_by_the_failure():
    run = Run(
        plan(
            step("a", next_step=["b", "c"]),
            step("b", next_step="j", retry=NO_RETRY),
            step("c", next_step="j"),
            step("j"),
        )
    )
    run.ok("a")
    effects = run.fail("b")
    assert [c.step_id for c in of_type(effects, CancelAgentTask)] == ["c"]
    assert run.status("c") is StepStatus.CANCELLED

    effects = run.retry()

    assert sorted((t.step_id, t.attempt) for t in tasks(effects)) == [("b", 2), ("c", 2)]
    run.last = effects
    run.drive(lambda t: t.step_id)
    assert run.state.status is RunStatus.COMPLETED
    assert [t.step_id for t in run.calls].count("a") == 1


def test_retry_inside_a_loop_reopens_the_failed_iteration():
    data = writing_loop()
    data["steps"]["review"]["retry"] = NO_RETRY
    run = Run(data, {"topic": "kafka"})
    run.ok("write", {"text": "d1"})
    run.ok("review", {"approved": False, "comments": "more"})
    run.ok("write", {"text": "d2"}, iteration=2)
    run.fail("review", iteration=2)
    assert run.state.status is RunStatus.FAILED
    assert run.state.error is not None
    assert run.state.error.iteration == 2

    [again] = tasks(run.retry())

    assert (again.step_id, again.iteration, again.attempt) == ("review", 2, 2)
    assert again.input == {"draft": "d2"}
    run.ok("review", {"approved": True, "comments": ""}, iteration=2)
    run.ok("publish", "ok")
    assert run.run_status() is RunStatus.COMPLETED
    assert list(run.state.executions) == ["write@1", "review@1", "write@2", "review@2", "publish@1"]


# ===================================================================== timeouts


def test_a_timeout_in_a_loop_iteration_retries_that_execution():
    data = writing_loop()
    data["steps"]["write"]["retry"] = QUICK_RETRY
    data["steps"]["write"]["timeout_s"] = 30
    run = Run(data, {"topic": "kafka"})
    run.ok("write", {"text": "d1"})
    run.ok("review", {"approved": False, "comments": "c1"})
    first = run.execution("write", 2).attempts[0]

    effects = run.timeout("write", iteration=2)

    [cancel] = of_type(effects, CancelAgentTask)
    assert (cancel.step_id, cancel.iteration, cancel.attempt, cancel.correlation_id) == (
        "write",
        2,
        1,
        first.correlation_id,
    )
    [again] = tasks(effects)
    assert (again.step_id, again.iteration, again.attempt) == ("write", 2, 2)
    assert again.input == {"topic": "kafka", "comments": "c1"}
    [timer] = of_type(effects, ScheduleTimeout)
    assert (timer.step_id, timer.iteration, timer.attempt) == ("write", 2, 2)
    assert len(run.execution("write", 1).attempts) == 1
    error = run.execution("write", 2).attempts[0].error
    assert error is not None
    assert error.kind == ErrorKind.TIMEOUT


def test_a_timeout_of_a_map_item_retries_that_item_only():
    run = Run(mapping_plan(concurrency=3, retry=QUICK_RETRY, timeout_s=10), {"docs": ["a", "b", "c"]})

    effects = run.timeout("m", item=1)

    [cancel] = of_type(effects, CancelAgentTask)
    assert (cancel.item, cancel.attempt) == (1, 1)
    [again] = tasks(effects)
    assert (again.step_id, again.item, again.attempt, arg(again, "doc")) == ("m", 1, 2, "b")
    assert [len(run.execution("m", item=i).attempts) for i in range(3)] == [1, 2, 1]


def test_a_timeout_naming_another_iteration_or_item_changes_nothing():
    run = Run(mapping_plan(concurrency=2, timeout_s=10), {"docs": ["a", "b"]})
    late = run.now() + timedelta(seconds=100)

    for event in (
        StepTimedOut(run_id=RUN_ID, step_id="m", attempt=1, iteration=1, item=7, at=late),
        StepTimedOut(run_id=RUN_ID, step_id="m", attempt=1, iteration=2, item=0, at=late),
        StepTimedOut(run_id=RUN_ID, step_id="m", attempt=1, iteration=1, item=None, at=late),
        StepTimedOut(run_id=RUN_ID, step_id="m", attempt=1, iteration=1, item=0, at=run.now()),  # too early
    ):
        before = run.state
        assert run.send(event) == []
        assert run.state is before


def test_resume_dispatches_every_open_execution_again():
    run = Run(
        plan(
            step("a", next_step=["b", "m"]),
            step("b", next_step="j"),
            step("m", map={"over": [1, 2, 3], "max_concurrency": 2}, input_mapping={"d": "${map.item}"}, next_step="j"),
            step("j"),
        )
    )
    run.ok("a")
    sent = {(t.step_id, t.item, t.correlation_id) for t in tasks(run.last)}

    effects = resume(run.state, run.now())

    assert {(t.step_id, t.item, t.correlation_id) for t in tasks(effects)} == sent
    assert {(s.step_id, s.item) for s in of_type(effects, ScheduleTimeout)} == {("b", None), ("m", 0), ("m", 1)}


# ===================================================================== cancel


def test_cancel_stops_every_open_execution_of_every_branch():
    run = Run(
        plan(
            step("a", next_step=["b", "m", "c"]),
            step("b", next_step="j"),
            step(
                "m",
                map={"over": "${workflow.input.docs}", "max_concurrency": 2},
                input_mapping={"d": "${map.item}"},
                next_step="j",
            ),
            step("c", next_step="c2"),
            step("c2", next_step="j"),
            step("j"),
        ),
        {"docs": [1, 2, 3]},
    )
    run.ok("a")
    run.ok("c")
    assert set(run.open_keys()) == {"b@1", "m@1[0]", "m@1[1]", "c2@1"}

    effects = run.cancel()

    assert {(c.step_id, c.item) for c in of_type(effects, CancelAgentTask)} == {
        ("b", None),
        ("m", 0),
        ("m", 1),
        ("c2", None),
    }
    assert tasks(effects) == []
    assert run.state.status is RunStatus.CANCELLED
    assert run.open_keys() == []
    assert all(run.state.executions[k].status is StepStatus.CANCELLED for k in ("b@1", "m@1[0]", "m@1[1]", "c2@1"))
    assert run.state.executions["c@1"].status is StepStatus.COMPLETED
    [finished] = of_type(effects, RunFinished)
    assert finished.status is RunStatus.CANCELLED
    assert run.send(run.result_for("b", output="late")) == []
    assert run.cancel() == []
    assert len(run.finished) == 1
