"""The one view of a run (streams/views.py): live from a state, or from PostgreSQL's record.

States are built by the pure state machine (:func:`models.run.transition`),
driven by :func:`drive`: submit a plan, answer every task it sends, one a
second, in the order sent. States that wait for a person are made by hand
from them (:func:`waiting_map_state`, :func:`approval_state`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import JsonValue

from models.messages import AgentError, AgentResult, AgentTask, Question, ResultStatus
from models.messages import Answer as GivenAnswer
from models.plan import APPROVAL_AGENT, WorkflowPlan, load_plan
from models.run import (
    AgentResultReceived,
    DispatchTask,
    Effect,
    RunState,
    RunStatus,
    RunSubmitted,
    StepStatus,
    transition,
)
from models.run_state import Attempt, Exchange, Execution, StepState
from streams.views import record_view, state_view
from switchyard.db import RunRecord, StepRecord, snapshot_rows, whole_state

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
RUN_ID = "run-v"

Answer = Callable[[AgentTask], JsonValue | AgentError]
"""What the agent says to a task: an output, or an error (a failed attempt)."""

RUN_KEYS = {
    "run_id",
    "status",
    "workflow_id",
    "workflow_version",
    "input",
    "output",
    "error",
    "created_at",
    "started_at",
    "completed_at",
    "updated_at",
    "version",
    "waiting",
    "questions",
    "steps",
    "source",
}
STEP_KEYS = {
    "step_id",
    "agent_name",
    "status",
    "iteration",
    "items",
    "output",
    "error",
    "skip_reason",
    "started_at",
    "completed_at",
    "next_attempt_at",
    "attempts",
    "questions",
}
ATTEMPT_KEYS = {
    "attempt",
    "iteration",
    "item",
    "correlation_id",
    "agent_name",
    "status",
    "input",
    "output",
    "error",
    "started_at",
    "deadline",
    "completed_at",
    "task_id",
    "exchanges",
}
QUESTION_KEYS = {"step_id", "iteration", "item", "attempt", "turn", "kind", "text", "data", "asked_at", "deadline"}


# -------------------------------------------------------------------- driving


def make_plan(start: str, *steps: dict[str, Any], **extra: Any) -> WorkflowPlan:
    """A plan of these steps (each a step's JSON with at least ``id``), in the order given."""
    return load_plan(
        {
            "workflow_id": "views-flow",
            "name": "views",
            "version": "3",
            "start_step": start,
            "steps": {s["id"]: {"agent_name": f"agent-{s['id']}", **s} for s in steps},
            **extra,
        }
    )


def _tasks(effects: list[Effect]) -> list[AgentTask]:
    return [e.task for e in effects if isinstance(e, DispatchTask)]


def drive(
    plan: WorkflowPlan,
    answer: Answer,
    run_input: dict[str, JsonValue] | None = None,
    *,
    run_id: str = RUN_ID,
    answers: int | None = None,
) -> list[RunState]:
    """Every state of a run: submitted, then one per answer, until no task is left (or ``answers`` were given).

    Tasks are answered in the order they were sent, the n-th at T0 + n seconds
    (a delayed retry too: its result proves the dispatch happened).
    """
    state, effects = transition(None, RunSubmitted(run_id=run_id, plan=plan, input=run_input or {}, at=T0))
    assert state is not None
    states = [state]
    pending = _tasks(effects)
    while pending and (answers is None or len(states) <= answers):
        task = pending.pop(0)
        when = T0 + timedelta(seconds=len(states))
        said = answer(task)
        if isinstance(said, AgentError):
            status, output, error = ResultStatus.FAILURE, None, said
        else:
            status, output, error = ResultStatus.SUCCESS, said, None
        result = AgentResult(
            correlation_id=task.correlation_id,
            run_id=task.run_id,
            step_id=task.step_id,
            attempt=task.attempt,
            iteration=task.iteration,
            item=task.item,
            status=status,
            output=output,
            error=error,
            started_at=when,
            finished_at=when,
        )
        new, effects = transition(state, AgentResultReceived(result=result, at=when))
        assert new is not None
        assert new is not state, f"the answer to {task.correlation_id} changed nothing"
        state = new
        states.append(state)
        pending += _tasks(effects)
    return states


def flaky(times: int = 1) -> Callable[[str], bool]:
    """Says True the first ``times`` times it is asked about each key: whether to fail that call."""
    seen: dict[str, int] = {}

    def fails(key: str) -> bool:
        seen[key] = seen.get(key, 0) + 1
        return seen[key] <= times

    return fails


BUSY = AgentError(kind="http_status", message="503 from agent", retriable=True)
NO_DELAY = {"max_attempts": 3, "initial_delay_s": 0, "jitter": 0}


def steps_by_id(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["step_id"]: s for s in view["steps"]}


def attempt_keys(step: dict[str, Any]) -> list[tuple[int, int, int | None, str]]:
    """(attempt, iteration, item, status) of each attempt of a step's view, in order."""
    return [(a["attempt"], a["iteration"], a["item"], a["status"]) for a in step["attempts"]]


def assert_plain_json(view: dict[str, Any]) -> None:
    assert json.loads(json.dumps(view)) == view


# ---------------------------------------------------------------------- chain


def chain_plan() -> WorkflowPlan:
    """s1 -> s2 -> s3, written in the plan backwards (the view follows the plan's order, not the JSON's)."""
    return make_plan(
        "s1",
        {"id": "s3", "input_mapping": {"draft": "${s2.output.text}"}},
        {"id": "s2", "input_mapping": {"notes": "${s1.output.text}"}, "next_step": "s3", "retry": NO_DELAY},
        {"id": "s1", "input_mapping": {"topic": "${workflow.input.topic}"}, "next_step": "s2"},
    )


def chain_answer() -> Answer:
    fails = flaky()

    def answer(task: AgentTask) -> JsonValue | AgentError:
        if task.step_id == "s2" and fails(task.step_id):
            return BUSY
        assert isinstance(task.input, dict)
        (value,) = task.input.values()
        return {"text": f"{task.step_id}<{value}>"}

    return answer


def test_a_chain_run_shows_its_steps_in_plan_order_with_every_attempt_and_output() -> None:
    plan = chain_plan()
    final = drive(plan, chain_answer(), {"topic": "kafka"})[-1]
    assert final.status is RunStatus.COMPLETED

    view = state_view(final)

    assert set(view) == RUN_KEYS
    assert_plain_json(view)
    assert view["source"] == "live"
    assert (view["run_id"], view["status"], view["version"]) == (RUN_ID, "COMPLETED", final.version)
    assert (view["workflow_id"], view["workflow_version"]) == ("views-flow", "3")
    assert view["input"] == {"topic": "kafka"}
    assert view["output"] == {"text": "s3<s2<s1<kafka>>>"}
    assert view["error"] is None
    assert view["created_at"] == view["started_at"] == "2024-05-01T12:00:00Z"
    assert view["completed_at"] == view["updated_at"] == "2024-05-01T12:00:04Z"
    assert (view["waiting"], view["questions"]) == (0, [])

    assert list(plan.steps) == ["s3", "s2", "s1"]
    assert [s["step_id"] for s in view["steps"]] == plan.order() == ["s1", "s2", "s3"]
    steps = steps_by_id(view)
    for step_id, step in steps.items():
        assert set(step) == STEP_KEYS
        assert step["status"] == "COMPLETED"
        assert step["agent_name"] == f"agent-{step_id}"
        assert (step["iteration"], step["items"], step["skip_reason"], step["error"]) == (1, None, None, None)
        assert step["output"] == final.output_of(step_id)
        assert step["next_attempt_at"] is None
        assert step["questions"] == []
        for attempt in step["attempts"]:
            assert set(attempt) == ATTEMPT_KEYS
            assert (attempt["task_id"], attempt["exchanges"]) == (None, [])
            assert (attempt["iteration"], attempt["item"]) == (1, None)
            assert attempt["agent_name"] == f"agent-{step_id}"
    assert steps["s1"]["output"] == {"text": "s1<kafka>"}
    assert steps["s2"]["output"] == {"text": "s2<s1<kafka>>"}
    assert attempt_keys(steps["s1"]) == [(1, 1, None, "COMPLETED")]
    assert attempt_keys(steps["s2"]) == [(1, 1, None, "FAILED"), (2, 1, None, "COMPLETED")]
    assert attempt_keys(steps["s3"]) == [(1, 1, None, "COMPLETED")]

    first, second = steps["s2"]["attempts"]
    assert [first["correlation_id"], second["correlation_id"]] == [f"{RUN_ID}/s2/1", f"{RUN_ID}/s2/2"]
    assert first["input"] == second["input"] == {"notes": "s1<kafka>"}
    assert first["output"] is None
    assert first["error"] == BUSY.model_dump(mode="json")
    assert first["error"]["kind"] == "http_status"
    assert second["error"] is None
    assert second["output"] == steps["s2"]["output"]
    assert (first["started_at"], first["completed_at"]) == ("2024-05-01T12:00:01Z", "2024-05-01T12:00:02Z")
    assert (second["started_at"], second["completed_at"]) == ("2024-05-01T12:00:02Z", "2024-05-01T12:00:03Z")
    assert first["deadline"] == "2024-05-01T12:05:01Z"  # the default timeout, 300 s, after its dispatch
    assert steps["s2"]["started_at"] == "2024-05-01T12:00:01Z"
    assert steps["s2"]["completed_at"] == "2024-05-01T12:00:03Z"


def test_a_running_chain_shows_only_the_steps_reached_and_a_delayed_retry() -> None:
    plan = make_plan(
        "s1",
        {"id": "s1", "next_step": "s2", "retry": {"max_attempts": 3, "initial_delay_s": 10, "jitter": 0}},
        {"id": "s2"},
    )
    state = drive(plan, lambda task: BUSY, answers=1)[-1]
    assert state.status is RunStatus.RUNNING

    view = state_view(state)

    assert view["status"] == "RUNNING"
    assert view["completed_at"] is None
    assert view["output"] is None
    ((step,),) = [view["steps"]]
    assert step["step_id"] == "s1"
    assert step["status"] == "RUNNING"
    assert step["output"] is None
    assert step["next_attempt_at"] == "2024-05-01T12:00:11Z"  # failed at 1 s, retried 10 s later
    assert attempt_keys(step) == [(1, 1, None, "FAILED"), (2, 1, None, "PENDING")]
    assert step["attempts"][1]["started_at"] == step["next_attempt_at"]
    assert step["attempts"][1]["completed_at"] is None


# ----------------------------------------------------------------------- loop


def loop_plan() -> WorkflowPlan:
    return make_plan(
        "write",
        {"id": "write", "input_mapping": {"comments": "${review.output.comments ?? ''}"}, "next_step": "review"},
        {
            "id": "review",
            "input_mapping": {"draft": "${write.output.text}"},
            "loop": {"back_to": "write", "while": "${review.output.approved} == false", "max_iterations": 5},
            "next_step": "publish",
            "retry": NO_DELAY,
        },
        {"id": "publish", "input_mapping": {"text": "${write.output.text}"}},
    )


def loop_answer(approve_at: int = 3) -> Answer:
    reviews = {"n": 0}
    fails = flaky()

    def answer(task: AgentTask) -> JsonValue | AgentError:
        if task.step_id == "review":
            if task.iteration == 2 and fails("review@2"):
                return BUSY  # one failed attempt inside the second iteration
            reviews["n"] += 1
            return {"approved": reviews["n"] >= approve_at, "comments": f"c{reviews['n']}"}
        if task.step_id == "write":
            return {"text": f"draft {task.iteration}"}
        return {"published": task.input}

    return answer


def test_a_loop_shows_one_entry_per_step_with_the_attempts_of_every_iteration() -> None:
    final = drive(loop_plan(), loop_answer(approve_at=3))[-1]
    assert final.status is RunStatus.COMPLETED

    view = state_view(final)

    assert_plain_json(view)
    assert [s["step_id"] for s in view["steps"]] == ["write", "review", "publish"]
    steps = steps_by_id(view)
    write, review, publish = steps["write"], steps["review"], steps["publish"]
    assert (write["iteration"], review["iteration"], publish["iteration"]) == (3, 3, 1)
    assert attempt_keys(write) == [(1, 1, None, "COMPLETED"), (1, 2, None, "COMPLETED"), (1, 3, None, "COMPLETED")]
    assert attempt_keys(review) == [
        (1, 1, None, "COMPLETED"),
        (1, 2, None, "FAILED"),
        (2, 2, None, "COMPLETED"),
        (1, 3, None, "COMPLETED"),
    ]
    assert [a["correlation_id"] for a in write["attempts"]] == [
        f"{RUN_ID}/write/1",
        f"{RUN_ID}/write@2/1",
        f"{RUN_ID}/write@3/1",
    ]
    assert [a["correlation_id"] for a in review["attempts"]][1:3] == [f"{RUN_ID}/review@2/1", f"{RUN_ID}/review@2/2"]
    # Each iteration read the one before: its attempt's input and output are its own.
    assert [a["input"] for a in write["attempts"]] == [{"comments": ""}, {"comments": "c1"}, {"comments": "c2"}]
    assert [a["output"] for a in write["attempts"]] == [{"text": f"draft {i}"} for i in (1, 2, 3)]
    # The step's output is that of its latest iteration.
    assert write["output"] == {"text": "draft 3"}
    assert review["output"] == {"approved": True, "comments": "c3"}
    assert publish["output"] == {"published": {"text": "draft 3"}}
    assert attempt_keys(publish) == [(1, 1, None, "COMPLETED")]
    assert all(s["status"] == "COMPLETED" and s["items"] is None for s in view["steps"])


def test_a_loop_in_its_second_iteration_shows_the_iteration_it_is_in() -> None:
    states = drive(loop_plan(), loop_answer(approve_at=3))
    # submitted, write 1, review 1, write 2: review's second iteration is in flight.
    state = states[3]
    assert state.status is RunStatus.RUNNING

    steps = steps_by_id(state_view(state))

    assert list(steps) == ["write", "review"]
    assert (steps["write"]["iteration"], steps["write"]["status"]) == (2, "COMPLETED")
    assert (steps["review"]["iteration"], steps["review"]["status"]) == (2, "RUNNING")
    assert attempt_keys(steps["review"]) == [(1, 1, None, "COMPLETED"), (1, 2, None, "RUNNING")]
    # Until the second iteration has an output, the first one's stays readable.
    assert steps["review"]["output"] == {"approved": False, "comments": "c1"}


# ------------------------------------------------------------------------ map


def map_plan() -> WorkflowPlan:
    return make_plan(
        "split",
        {"id": "split", "input_mapping": {"n": "${workflow.input.n}"}, "next_step": "each"},
        {
            "id": "each",
            "map": {"over": "${split.output.docs}", "max_concurrency": 2},
            "input_mapping": {"doc": "${map.item}", "index": "${map.index}"},
            "next_step": "merge",
        },
        {"id": "merge", "input_mapping": {"all": "${each.output}"}},
    )


def map_answer(task: AgentTask) -> JsonValue:
    if task.step_id == "split":
        return {"docs": [f"doc-{i}" for i in range(4)]}
    if task.step_id == "each":
        assert isinstance(task.input, dict)
        return f"{task.input['doc']}!".upper()
    return {"merged": task.input}


def test_a_map_step_shows_one_attempt_per_item_and_how_many_items() -> None:
    final = drive(map_plan(), map_answer, {"n": 4})[-1]
    assert final.status is RunStatus.COMPLETED

    view = state_view(final)

    assert_plain_json(view)
    assert [s["step_id"] for s in view["steps"]] == ["split", "each", "merge"]
    steps = steps_by_id(view)
    each = steps["each"]
    assert each["items"] == 4
    assert each["iteration"] == 1
    assert each["status"] == "COMPLETED"
    assert each["output"] == ["DOC-0!", "DOC-1!", "DOC-2!", "DOC-3!"]
    assert attempt_keys(each) == [(1, 1, i, "COMPLETED") for i in range(4)]
    assert [a["correlation_id"] for a in each["attempts"]] == [f"{RUN_ID}/each@1[{i}]/1" for i in range(4)]
    assert [a["input"] for a in each["attempts"]] == [{"doc": f"doc-{i}", "index": i} for i in range(4)]
    assert [a["output"] for a in each["attempts"]] == each["output"]
    assert (steps["split"]["items"], steps["merge"]["items"]) == (None, None)
    assert steps["merge"]["output"] == {"merged": {"all": each["output"]}}
    assert attempt_keys(steps["merge"]) == [(1, 1, None, "COMPLETED")]


def test_a_map_step_in_flight_counts_its_items_and_shows_those_started() -> None:
    # split, then items 0 and 1 start (at most 2 at a time); item 0's answer starts item 2.
    state = drive(map_plan(), map_answer, {"n": 4}, answers=2)[-1]

    each = steps_by_id(state_view(state))["each"]

    assert each["status"] == "RUNNING"
    assert each["items"] == 4
    assert each["output"] is None
    assert attempt_keys(each) == [(1, 1, 0, "COMPLETED"), (1, 1, 1, "RUNNING"), (1, 1, 2, "RUNNING")]


# --------------------------------------------------------------------- routes


def route_plan() -> WorkflowPlan:
    return make_plan(
        "classify",
        {
            "id": "classify",
            "routes": [{"when": "${classify.output.label} == 'bug'", "to": "bug"}],
            "otherwise": "other",
        },
        {"id": "bug", "next_step": "reply"},
        {"id": "other", "next_step": "reply"},
        {
            "id": "reply",
            "input_mapping": {"bug": "${bug.output ?? 'none'}", "other": "${other.output ?? 'none'}"},
        },
    )


def test_a_step_on_a_route_not_taken_is_skipped_with_its_reason_and_no_output() -> None:
    def answer(task: AgentTask) -> JsonValue:
        return {"label": "bug"} if task.step_id == "classify" else f"{task.step_id} done"

    final = drive(route_plan(), answer)[-1]
    assert final.status is RunStatus.COMPLETED
    assert final.steps["other"].status is StepStatus.SKIPPED

    view = state_view(final)

    assert_plain_json(view)
    assert [s["step_id"] for s in view["steps"]] == [s for s in route_plan().order() if s in final.steps]
    steps = steps_by_id(view)
    assert set(steps) == {"classify", "bug", "other", "reply"}
    other = steps["other"]
    assert set(other) == STEP_KEYS
    assert other["status"] == "SKIPPED"
    assert other["skip_reason"] == final.steps["other"].skip_reason
    assert other["skip_reason"]
    assert other["output"] is None
    assert other["attempts"] == []
    assert (other["error"], other["started_at"], other["next_attempt_at"]) == (None, None, None)
    assert other["completed_at"] == "2024-05-01T12:00:01Z"  # when classify chose the other way
    assert steps["bug"]["status"] == "COMPLETED"
    assert steps["bug"]["skip_reason"] is None
    assert steps["reply"]["attempts"][0]["input"] == {"bug": "bug done", "other": "none"}


# ------------------------------------------------------- a person in the loop


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


HOUR = timedelta(hours=1)
FORMAT = Exchange(
    question=Question(text="Which format?", data={"choices": ["pdf", "html"]}),
    asked_at=at(2),
    answer=GivenAnswer(answer_id="answer-1", text="pdf", data={"dpi": 300}, source="http"),
    answered_at=at(3),
)
"""An agent's question, answered."""
FONT = Exchange(question=Question(text="Which font?"), asked_at=at(4))
"""The same agent's next question (the second turn), open."""
WHICH = Exchange(question=Question(text="Which?"), asked_at=at(5))


def waiting_on(state: RunState, key: str, exchanges: tuple[Exchange, ...], *, task_id: str | None) -> RunState:
    """``state`` with the running execution ``key`` WAITING for a person after these exchanges, as a new version.

    The attempt's deadline is the input deadline: an hour after the last question.
    """
    execution = state.executions[key]
    current = execution.current
    assert current is not None
    assert current.status is StepStatus.RUNNING
    asked = exchanges[-1].asked_at
    attempt = current.model_copy(
        update={
            "status": StepStatus.WAITING,
            "exchanges": exchanges,
            "task_id": task_id,
            "context_id": None if task_id is None else f"context-of-{task_id}",
            "deadline": asked + HOUR,
        }
    )
    executions = {
        **state.executions,
        key: execution.model_copy(
            update={"status": StepStatus.WAITING, "attempts": (*execution.attempts[:-1], attempt)}
        ),
    }
    changed = state.model_copy(
        update={
            "executions": executions,
            "waiting": sum(1 for e in executions.values() if e.status is StepStatus.WAITING),
            "version": state.version + 1,
            "updated_at": max(state.updated_at, asked),
        }
    )
    return RunState.model_validate(changed.model_dump())  # a state that reads back as itself


def waiting_map_state(run_id: str = RUN_ID) -> RunState:
    """A map run whose two items in flight wait for a person.

    Item 0's agent asked twice: which format (answered), then which font
    (open, its second turn); item 1's agent asked once (open).
    """
    state = drive(map_plan(), map_answer, {"n": 4}, run_id=run_id, answers=1)[-1]
    assert [k for k, e in state.executions.items() if e.status is StepStatus.RUNNING] == ["each@1[0]", "each@1[1]"]
    state = waiting_on(state, "each@1[0]", (FORMAT, FONT), task_id="task-0")
    state = waiting_on(state, "each@1[1]", (WHICH,), task_id="task-1")
    assert [e.key for e in state.waiting_executions()] == ["each@1[0]", "each@1[1]"]
    assert state.waiting == 2
    return state


def approval_plan() -> WorkflowPlan:
    return load_plan(
        {
            "workflow_id": "views-approval",
            "name": "approval",
            "version": "1",
            "start_step": "ok",
            "steps": {
                "ok": {"id": "ok", "approval": {"prompt": {"text": "Ship it?", "build": 7}}, "next_step": "ship"},
                "ship": {"id": "ship", "agent_name": "shipper"},
            },
        }
    )


def approval_state(run_id: str = RUN_ID, *, decided: bool = False) -> RunState:
    """A run whose approval step waits for a decision (or, ``decided``, was approved and goes on to ``ship``)."""
    prompt = Exchange(question=Question(text="Ship it?", data={"text": "Ship it?", "build": 7}), asked_at=T0)
    attempt = Attempt(
        number=1,
        correlation_id=f"{run_id}/ok/1",
        agent_name=APPROVAL_AGENT,
        status=StepStatus.WAITING,
        input={"text": "Ship it?", "build": 7},
        dispatch_at=T0,
        deadline=T0 + timedelta(days=7),
        exchanges=(prompt,),
    )
    execution = Execution(
        step_id="ok", agent_name=APPROVAL_AGENT, status=StepStatus.WAITING, attempts=(attempt,), started_at=T0
    )
    step = StepState(step_id="ok", agent_name=APPROVAL_AGENT, status=StepStatus.RUNNING, started_at=T0)
    state = RunState(
        run_id=run_id,
        status=RunStatus.RUNNING,
        plan=approval_plan(),
        input={},
        steps={"ok": step},
        executions={"ok@1": execution},
        waiting=1,
        created_at=T0,
        started_at=T0,
        updated_at=T0,
    )
    if not decided:
        return state
    answer = GivenAnswer(answer_id="decision-1", text="looks good", decision="approve", source="cli")
    output: JsonValue = {"approved": True, "decision": "approve", "text": "looks good", "data": None}
    attempt = attempt.model_copy(
        update={
            "status": StepStatus.COMPLETED,
            "exchanges": (prompt.model_copy(update={"answer": answer, "answered_at": at(60)}),),
            "finished_at": at(60),
            "output": output,
        }
    )
    done = execution.model_copy(update={"status": StepStatus.COMPLETED, "attempts": (attempt,), "completed_at": at(60)})
    ship_attempt = Attempt(
        number=1,
        correlation_id=f"{run_id}/ship/1",
        agent_name="shipper",
        status=StepStatus.RUNNING,
        input=None,
        dispatch_at=at(60),
        deadline=at(360),
    )
    ship = Execution(
        step_id="ship", agent_name="shipper", status=StepStatus.RUNNING, attempts=(ship_attempt,), started_at=at(60)
    )
    decided_state = state.model_copy(
        update={
            "steps": {
                "ok": step.model_copy(
                    update={
                        "status": StepStatus.COMPLETED,
                        "has_output": True,
                        "output_key": "ok@1",
                        "completed_at": at(60),
                    }
                ),
                "ship": StepState(step_id="ship", agent_name="shipper", status=StepStatus.RUNNING, started_at=at(60)),
            },
            "executions": {"ok@1": done, "ship@1": ship},
            "waiting": 0,
            "updated_at": at(60),
            "version": 2,
        }
    )
    return RunState.model_validate(decided_state.model_dump())


def test_a_map_waiting_for_a_person_shows_each_open_question_on_its_step_and_on_the_run() -> None:
    state = waiting_map_state()

    view = state_view(state)

    assert set(view) == RUN_KEYS
    assert_plain_json(view)
    assert (view["status"], view["waiting"]) == ("RUNNING", 2)
    font = {
        "step_id": "each",
        "iteration": 1,
        "item": 0,
        "attempt": 1,
        "turn": 1,  # its second question: the first was answered
        "kind": "question",
        "text": "Which font?",
        "data": None,
        "asked_at": "2024-05-01T12:00:04Z",
        "deadline": "2024-05-01T13:00:04Z",
    }
    which = {
        **font,
        "item": 1,
        "turn": 0,
        "text": "Which?",
        "asked_at": "2024-05-01T12:00:05Z",
        "deadline": "2024-05-01T13:00:05Z",
    }
    assert view["questions"] == [font, which]
    assert all(set(q) == QUESTION_KEYS for q in view["questions"])
    # The turn a view shows is the one an answer names (what streams.answers puts in its record).
    assert [q["turn"] for q in view["questions"]] == [e.current.turn for e in state.waiting_executions() if e.current]
    steps = steps_by_id(view)
    assert steps["each"]["questions"] == [font, which]
    assert steps["split"]["questions"] == []
    assert all(set(s) == STEP_KEYS for s in view["steps"])
    assert attempt_keys(steps["each"]) == [(1, 1, 0, "WAITING"), (1, 1, 1, "WAITING")]

    first, second = steps["each"]["attempts"]
    assert (first["task_id"], second["task_id"]) == ("task-0", "task-1")
    assert first["deadline"] == font["deadline"], "a waiting attempt's deadline is the input deadline"
    assert first["exchanges"] == [
        {
            "question": {"text": "Which format?", "data": {"choices": ["pdf", "html"]}},
            "asked_at": "2024-05-01T12:00:02Z",
            "answer": {
                "answer_id": "answer-1",
                "text": "pdf",
                "data": {"dpi": 300},
                "decision": None,
                "source": "http",
            },
            "answered_at": "2024-05-01T12:00:03Z",
        },
        {
            "question": {"text": "Which font?", "data": None},
            "asked_at": "2024-05-01T12:00:04Z",
            "answer": None,
            "answered_at": None,
        },
    ]
    assert second["exchanges"] == [WHICH.model_dump(mode="json")]
    assert steps["split"]["attempts"][0]["exchanges"] == []


def test_an_approval_waits_as_a_question_of_its_own_kind_and_once_decided_keeps_its_exchange() -> None:
    view = state_view(approval_state())

    assert_plain_json(view)
    assert view["waiting"] == 1
    (question,) = view["questions"]
    assert question == {
        "step_id": "ok",
        "iteration": 1,
        "item": None,
        "attempt": 1,
        "turn": 0,
        "kind": "approval",
        "text": "Ship it?",
        "data": {"text": "Ship it?", "build": 7},
        "asked_at": "2024-05-01T12:00:00Z",
        "deadline": "2024-05-08T12:00:00Z",
    }
    assert steps_by_id(view)["ok"]["questions"] == [question]
    assert steps_by_id(view)["ok"]["attempts"][0]["task_id"] is None, "an approval calls no agent"

    decided = state_view(approval_state(decided=True))

    assert (decided["waiting"], decided["questions"]) == (0, [])
    steps = steps_by_id(decided)
    assert [s["questions"] for s in decided["steps"]] == [[], []]
    assert steps["ok"]["status"] == "COMPLETED"
    assert steps["ok"]["output"] == {"approved": True, "decision": "approve", "text": "looks good", "data": None}
    (exchange,) = steps["ok"]["attempts"][0]["exchanges"]
    assert exchange["answer"] == {
        "answer_id": "decision-1",
        "text": "looks good",
        "data": None,
        "decision": "approve",
        "source": "cli",
    }
    assert exchange["answered_at"] == "2024-05-01T12:01:00Z"
    assert steps["ship"]["attempts"][0]["exchanges"] == []


def test_an_attempt_answered_and_running_again_has_no_open_question() -> None:
    # Item 1's answer carried its call on: RUNNING again, its exchange answered; item 0 still waits.
    state = waiting_map_state()
    execution = state.executions["each@1[1]"]
    assert execution.current is not None
    answered = WHICH.model_copy(update={"answer": GivenAnswer(answer_id="a-2", text="that one"), "answered_at": at(6)})
    attempt = execution.current.model_copy(update={"status": StepStatus.RUNNING, "exchanges": (answered,)})
    going_on = execution.model_copy(update={"status": StepStatus.RUNNING, "attempts": (attempt,)})
    state = state.model_copy(
        update={"executions": {**state.executions, "each@1[1]": going_on}, "waiting": 1, "version": state.version + 1}
    )

    view = state_view(state)

    assert view["waiting"] == 1
    assert [(q["item"], q["turn"], q["text"]) for q in view["questions"]] == [(0, 1, "Which font?")]
    second = steps_by_id(view)["each"]["attempts"][1]
    assert (second["status"], second["task_id"]) == ("RUNNING", "task-1")
    assert second["exchanges"][0]["answer"]["text"] == "that one"
    assert record_view(record_of(state)) == {**view, "source": "record"}


# -------------------------------------------------------------------- records


def record_of(state: RunState, *, with_snapshot: bool = True) -> RunRecord:
    """The record PostgreSQL holds of a state (its run row and attempt rows), with or without its snapshot."""
    run_row, execution_rows, step_rows = snapshot_rows(state)
    # As WorkflowRepository.get_run reads it back: the run's state with its plan, its input and its executions' rows.
    executions = {row["execution_key"]: row["record"] for row in execution_rows}
    whole = whole_state(run_row["state"], executions, run_row["plan"], run_row["input"])
    return RunRecord.model_validate(
        {
            **run_row,
            "state": whole if with_snapshot else None,
            "steps": [StepRecord.model_validate(row) for row in step_rows],
        }
    )


def test_a_record_with_a_snapshot_is_shown_as_its_state() -> None:
    for final in (
        drive(chain_plan(), chain_answer(), {"topic": "kafka"})[-1],
        drive(loop_plan(), loop_answer())[-1],
        drive(map_plan(), map_answer, {"n": 4})[-1],
        waiting_map_state(),
        approval_state(),
        approval_state(decided=True),
    ):
        view = record_view(record_of(final))
        assert view == {**state_view(final), "source": "record"}


def refused_record() -> RunRecord:
    """What WorkflowRepository.record_rejected writes of a submission that never ran: a row, no snapshot, no steps."""
    plan = chain_plan().model_dump(mode="json")
    return RunRecord(
        run_id="refused-1",
        workflow_id=plan["workflow_id"],
        workflow_version=plan["version"],
        status="FAILED",
        input={},
        plan=plan,
        error={"kind": "invalid_submission", "message": "the submission could not be read", "details": None},
        version=0,
        created_at=T0,
        completed_at=T0,
        updated_at=T0,
    )


def test_a_refused_submission_is_shown_from_its_row_with_the_keys_of_the_live_view() -> None:
    live = state_view(drive(chain_plan(), chain_answer(), {"topic": "kafka"})[-1])

    view = record_view(refused_record())

    assert set(view) == set(live) == RUN_KEYS
    assert_plain_json(view)
    assert view["source"] == "record"
    assert (view["run_id"], view["status"], view["version"]) == ("refused-1", "FAILED", 0)
    assert (view["workflow_id"], view["workflow_version"]) == ("views-flow", "3")
    assert view["error"] == {
        "kind": "invalid_submission",
        "message": "the submission could not be read",
        "details": None,
    }
    assert (view["input"], view["output"], view["started_at"]) == ({}, None, None)
    assert view["created_at"] == view["completed_at"] == "2024-05-01T12:00:00Z"
    assert view["steps"] == []


def test_rows_without_a_snapshot_show_steps_and_attempts_with_the_keys_of_the_live_view() -> None:
    final = drive(chain_plan(), chain_answer(), {"topic": "kafka"})[-1]
    live = state_view(final)

    view = record_view(record_of(final, with_snapshot=False))

    assert set(view) == set(live)
    assert view["source"] == "record"
    assert [s["step_id"] for s in view["steps"]] == [s["step_id"] for s in live["steps"]]
    for from_rows, from_state in zip(view["steps"], live["steps"], strict=True):
        assert set(from_rows) == set(from_state) == STEP_KEYS
        assert from_rows["attempts"] == from_state["attempts"], "an attempt reads the same from its row"
        assert (from_rows["status"], from_rows["output"]) == (from_state["status"], from_state["output"])
        assert from_rows["iteration"] == from_state["iteration"] == 1


def test_rows_of_a_loop_without_a_snapshot_name_each_attempts_iteration_and_item() -> None:
    for final in (drive(loop_plan(), loop_answer())[-1], drive(map_plan(), map_answer, {"n": 4})[-1]):
        live = steps_by_id(state_view(final))
        view = steps_by_id(record_view(record_of(final, with_snapshot=False)))
        assert set(view) == set(live)
        for step_id, step in view.items():
            assert set(step) == STEP_KEYS
            assert step["attempts"] == live[step_id]["attempts"]


def test_rows_without_a_snapshot_show_the_same_questions_exchanges_and_count() -> None:
    for state in (waiting_map_state(), approval_state(), approval_state(decided=True)):
        live = state_view(state)

        view = record_view(record_of(state, with_snapshot=False))

        assert set(view) == set(live) == RUN_KEYS
        assert (view["waiting"], view["questions"]) == (live["waiting"], live["questions"])
        rows, steps = steps_by_id(view), steps_by_id(live)
        assert set(rows) == set(steps)
        for step_id, step in rows.items():
            assert set(step) == STEP_KEYS
            assert step["attempts"] == steps[step_id]["attempts"], "exchanges and task ids read the same from rows"
            assert step["questions"] == steps[step_id]["questions"]
    assert record_view(record_of(waiting_map_state(), with_snapshot=False))["waiting"] == 2
