"""Repositories and the snapshot upsert, on a real PostgreSQL server."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import JsonValue
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.messages import AgentError, AgentResult, Answer, ResultStatus
from models.plan import RetryPolicy, WorkflowPlan, load_plan
from models.records import StepExecution, WorkflowRun
from models.run import (
    AgentResultReceived,
    DispatchTask,
    RunState,
    RunStatus,
    RunSubmitted,
    StepStatus,
    transition,
)
from streams.views import record_view, state_view
from switchyard.db import (
    Snapshot,
    SnapshotRepository,
    WorkflowRepository,
    create_schema,
    normalize_url,
    postgresql_json,
    snapshot_rows,
    state_of,
    storable,
    upsert_snapshots,
)
from tests.streams.test_views import (
    FONT,
    FORMAT,
    WHICH,
    approval_state,
    drive,
    loop_answer,
    loop_plan,
    map_answer,
    map_plan,
    waiting_map_state,
)

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def _plan() -> WorkflowPlan:
    return load_plan(
        {
            "workflow_id": "research-and-summarize",
            "name": "Research and summarize",
            "version": "1.0",
            "start_step": "research",
            "steps": {
                "research": {
                    "id": "research",
                    "agent_name": "researcher",
                    "input_mapping": {"topic": "${workflow.input.topic}"},
                    "next_step": "summarize",
                    "retry": {"max_attempts": 3, "initial_delay_s": 1, "jitter": 0},
                },
                "summarize": {
                    "id": "summarize",
                    "agent_name": "summarizer",
                    "input_mapping": {"text": "${research.output.notes}"},
                    "next_step": None,
                },
            },
        }
    )


def _history(run_id: str) -> list[RunState]:
    """Every state of one run, in order: submitted, failed once, retried, both steps done."""
    states: list[RunState] = []
    state, _ = transition(None, RunSubmitted(run_id=run_id, plan=_plan(), input={"topic": "kafka"}, at=T0))
    assert state is not None
    states.append(state)

    def result(step_id: str, attempt: int, ok: bool, at: datetime, output: object = None) -> None:
        nonlocal state
        assert state is not None
        res = AgentResult(
            correlation_id=f"{run_id}/{step_id}/{attempt}",
            run_id=run_id,
            step_id=step_id,
            attempt=attempt,
            status=ResultStatus.SUCCESS if ok else ResultStatus.FAILURE,
            output=output if ok else None,  # type: ignore[arg-type]
            error=None if ok else AgentError(kind="http_status", message="503 from agent", retriable=True),
            started_at=at,
            finished_at=at,
        )
        state, _ = transition(state, AgentResultReceived(result=res, at=at))
        assert state is not None
        states.append(state)

    result("research", 1, False, T0 + timedelta(seconds=1))
    result("research", 2, True, T0 + timedelta(seconds=3), {"notes": "streams"})
    result("summarize", 1, True, T0 + timedelta(seconds=4), {"summary": "short"})
    assert [s.version for s in states] == [1, 2, 3, 4]
    assert states[-1].status is RunStatus.COMPLETED
    return states


def _run_row(session: Session, run_id: str) -> WorkflowRun:
    return session.get_one(WorkflowRun, run_id, populate_existing=True)


# ------------------------------------------------------------------ plumbing


@pytest.mark.parametrize(
    ("given", "expected_prefix"),
    [
        ("postgresql://u:p@h:5432/db", "postgresql+psycopg2://u:p@h:5432/db"),
        ("postgres://u:p@h/db", "postgresql+psycopg2://u:p@h/db"),
        ("postgresql+psycopg2://u@/db?host=/tmp/x", "postgresql+psycopg2://u@/db?host=%2Ftmp%2Fx"),
    ],
)
def test_normalize_url_pins_psycopg2(given: str, expected_prefix: str) -> None:
    assert normalize_url(given) == expected_prefix


def test_normalize_url_rejects_other_databases() -> None:
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        normalize_url("sqlite:///x.db")


def test_server_is_real_postgresql(engine: Engine) -> None:
    with engine.connect() as conn:
        version = conn.execute(text("SHOW server_version_num")).scalar_one()
    assert int(version) >= 140000


def test_schema_has_tables_columns_and_indexes(engine: Engine) -> None:
    create_schema(engine)  # a second time: idempotent
    inspector = inspect(engine)
    assert {"workflow_runs", "step_executions"} <= set(inspector.get_table_names())
    run_cols = {c["name"]: c for c in inspector.get_columns("workflow_runs")}
    for name in ("input", "output", "error", "plan"):
        assert str(run_cols[name]["type"]) == "JSONB"
    assert {
        "run_id",
        "workflow_id",
        "workflow_version",
        "status",
        "created_at",
        "started_at",
        "completed_at",
        "updated_at",
    } <= set(run_cols)
    run_indexes = {tuple(i["column_names"]) for i in inspector.get_indexes("workflow_runs")}
    assert ("status", "created_at") in run_indexes
    assert ("workflow_id",) in run_indexes
    step_indexes = {tuple(i["column_names"]) for i in inspector.get_indexes("step_executions")}
    assert ("run_id",) in step_indexes
    step_cols = {c["name"]: c for c in inspector.get_columns("step_executions")}
    assert not step_cols["iteration"]["nullable"]
    assert step_cols["item"]["nullable"]
    uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("step_executions")}
    assert ("run_id", "step_id", "iteration", "item", "attempt") in uniques
    assert ("run_id", "step_id", "attempt") not in uniques
    assert ("correlation_id",) in uniques
    fks = inspector.get_foreign_keys("step_executions")
    assert fks[0]["referred_table"] == "workflow_runs"
    # A person in the loop: how many executions of a run wait, and each attempt's questions and A2A task.
    assert not run_cols["waiting"]["nullable"]
    assert str(run_cols["waiting"]["type"]) == "INTEGER"
    assert str(step_cols["exchanges"]["type"]) == "JSONB"
    assert step_cols["exchanges"]["nullable"]
    assert step_cols["task_id"]["nullable"]
    waiting_index = {i["name"]: i for i in inspector.get_indexes("workflow_runs")}[
        "ix_workflow_runs_waiting_created_at"
    ]
    assert waiting_index["column_names"] == ["created_at"]
    assert waiting_index["dialect_options"]["postgresql_where"] == "(waiting > 0)"


# -------------------------------------------------------------- repositories


def _submitted(run_id: str, plan: WorkflowPlan, at: datetime, run_input: dict[str, JsonValue]) -> RunState:
    state, _ = transition(None, RunSubmitted(run_id=run_id, plan=plan, input=run_input, at=at))
    assert state is not None
    return state


def _failed(state: RunState, at: datetime) -> RunState:
    """``state`` after its first step's attempt failed for good (an error no retry helps)."""
    execution = next(reversed(state.executions.values()))
    attempt = execution.current
    assert attempt is not None
    res = AgentResult(
        correlation_id=attempt.correlation_id,
        run_id=state.run_id,
        step_id=execution.step_id,
        attempt=attempt.number,
        status=ResultStatus.FAILURE,
        error=AgentError(kind="bad_request", message="400 from agent", retriable=False),
        started_at=at,
        finished_at=at,
    )
    failed, _ = transition(state, AgentResultReceived(result=res, at=at))
    assert failed is not None
    assert failed.status is RunStatus.FAILED
    return failed


def test_snapshots_are_read_back_as_runs(engine: Engine) -> None:
    runs, snapshots = WorkflowRepository(engine), SnapshotRepository(engine)
    history = _history("repo-run-1")
    assert snapshots.upsert([history[0]]) == 1
    created = runs.get_run("repo-run-1")
    assert created is not None
    assert created.status == "RUNNING"
    assert created.workflow_id == "research-and-summarize"
    assert created.workflow_version == "1.0"
    assert created.input == {"topic": "kafka"}
    assert created.created_at == created.started_at == T0
    assert created.completed_at is None
    assert created.version == 1
    assert runs.get_state("repo-run-1") == history[0]
    assert runs.exists("repo-run-1") == "RUNNING"

    # Another submission under the same run_id (a version no newer) must not overwrite it.
    other = _submitted("repo-run-1", _plan(), T0 + timedelta(seconds=9), {"topic": "other"})
    assert other.version == created.version
    snapshots.upsert([other])
    again = runs.get_run("repo-run-1")
    assert again is not None
    assert again.input == {"topic": "kafka"}, "a snapshot no newer than the record must not overwrite it"
    assert again.created_at == T0

    snapshots.upsert([history[-1]])
    done = runs.get_run("repo-run-1")
    assert done is not None
    assert done.status == "COMPLETED"
    assert done.output == {"summary": "short"}
    assert done.started_at == T0
    assert done.completed_at == T0 + timedelta(seconds=4)
    assert done.updated_at == T0 + timedelta(seconds=4)
    assert done.version == 4
    assert done.submission_fingerprint() == history[0].fingerprint
    assert runs.get_state("repo-run-1") == history[-1]
    assert runs.exists("repo-run-1") == "COMPLETED"

    assert runs.get_run("no-such-run") is None
    assert runs.get_state("no-such-run") is None
    assert runs.exists("no-such-run") is None


def test_list_runs_filters_and_orders(engine: Engine) -> None:
    runs = WorkflowRepository(engine)
    base = T0 + timedelta(hours=1)  # after every other run of the module
    other_plan = _plan().model_copy(update={"workflow_id": "other-flow"})
    states = [
        _submitted(f"list-{i}", _plan() if i % 2 == 0 else other_plan, base + timedelta(minutes=i), {"topic": f"t{i}"})
        for i in range(5)
    ]
    states[3] = _failed(states[3], base + timedelta(minutes=6))
    SnapshotRepository(engine).upsert(states)

    listed = [r.run_id for r in runs.list_runs(workflow_id="research-and-summarize")]
    assert listed[:3] == ["list-4", "list-2", "list-0"], "newest first"
    assert [r.run_id for r in runs.list_runs(status=RunStatus.FAILED) if r.run_id.startswith("list-")] == ["list-3"]
    assert {r.run_id for r in runs.list_runs(status=[RunStatus.FAILED, RunStatus.RUNNING])} >= {"list-3", "list-4"}
    assert not {r.run_id for r in runs.list_runs(status=RunStatus.COMPLETED)} & {s.run_id for s in states}
    assert len(runs.list_runs(limit=2)) == 2
    assert [r.run_id for r in runs.list_runs(workflow_id="research-and-summarize", limit=2, offset=1)] == [
        "list-2",
        "list-0",
    ]
    assert [r.run_id for r in runs.list_runs(workflow_id="other-flow")] == ["list-3", "list-1"]
    assert all(r.steps == () for r in runs.list_runs(workflow_id="other-flow")), "a listing reads no attempts"


def test_attempts_are_read_back_in_order(engine: Engine) -> None:
    runs, snapshots = WorkflowRepository(engine), SnapshotRepository(engine)
    history = _history("step-run")
    snapshots.upsert([history[1]])  # research/1 failed, research/2 waits for its delayed dispatch
    snapshots.upsert([history[1]])  # the same snapshot again changes nothing
    record = runs.get_run("step-run")
    assert record is not None
    assert [(r.step_id, r.attempt, r.status) for r in record.steps] == [
        ("research", 1, "FAILED"),
        ("research", 2, "PENDING"),
    ]
    snapshots.upsert([history[-1]])

    record = runs.get_run("step-run")
    assert record is not None
    rows = record.steps
    assert [(r.step_id, r.iteration, r.item, r.attempt, r.status) for r in rows] == [
        ("research", 1, None, 1, "FAILED"),
        ("research", 1, None, 2, "COMPLETED"),
        ("summarize", 1, None, 1, "COMPLETED"),
    ]
    assert [r.correlation_id for r in rows] == ["step-run/research/1", "step-run/research/2", "step-run/summarize/1"]
    assert rows[0].error == {"kind": "http_status", "message": "503 from agent", "retriable": True}
    assert rows[0].started_at == T0
    assert rows[0].completed_at == T0 + timedelta(seconds=1)
    assert rows[1].started_at == T0 + timedelta(seconds=2)  # the retry's delay: 1 s
    assert rows[1].completed_at == T0 + timedelta(seconds=3)
    assert rows[1].input_data == {"topic": "kafka"}
    assert rows[1].output_data == {"notes": "streams"}
    assert rows[1].error is None
    assert rows[2].input_data == {"text": "streams"}
    assert {r.agent_name for r in rows} == {"researcher", "summarizer"}


def test_an_attempt_row_of_an_unknown_run_is_refused(engine: Engine) -> None:
    # The snapshot upsert always writes the run first; the foreign key guards any other writer.
    with pytest.raises(IntegrityError), Session(engine) as session, session.begin():
        session.add(
            StepExecution(
                run_id="ghost",
                step_id="s",
                attempt=1,
                agent_name="a",
                status="RUNNING",
                correlation_id="ghost/s/1",
                run_version=1,
            )
        )


def test_a_refused_submission_is_recorded_once_without_a_state(engine: Engine) -> None:
    runs = WorkflowRepository(engine)
    plan = _plan().model_dump(mode="json")
    assert runs.record_rejected("refused-run", kind="invalid_submission", message="bad", plan=plan, at=T0)
    assert not runs.record_rejected("refused-run", kind="invalid_submission", message="other", at=T0)
    record = runs.get_run("refused-run")
    assert record is not None
    assert (record.status, record.version, record.workflow_id, record.workflow_version) == (
        "FAILED",
        0,
        "research-and-summarize",
        "1.0",
    )
    assert record.error == {"kind": "invalid_submission", "message": "bad", "details": None}
    assert record.steps == ()
    assert record.state is None
    assert record.submission_fingerprint() is None
    assert runs.get_state("refused-run") is None
    # The view of it (built from its row) has the fields of a live run's.
    live = state_view(_history("refused-live")[-1])
    view = record_view(record)
    assert set(view) == set(live)
    assert view["steps"] == []
    # A run that ran is not replaced by a refusal of a later copy.
    SnapshotRepository(engine).upsert([_history("ran-run")[-1]])
    assert not runs.record_rejected("ran-run", kind="invalid_submission", message="late copy")
    ran = runs.get_run("ran-run")
    assert ran is not None
    assert ran.status == "COMPLETED"


# ---------------------------------------------------------- snapshot upsert


def test_the_state_column_names_a_maps_items_by_their_count() -> None:
    final = drive(map_plan(), map_answer, {"n": 4})[-1]
    run_row, execution_rows, _ = snapshot_rows(final)
    item_keys = [k for k, e in final.executions.items() if e.item is not None]
    assert len(item_keys) == 4
    assert not set(item_keys) & set(run_row["state"]["executions"])
    assert run_row["state"]["map_items"] == {"each": [4]}
    records = {r["execution_key"]: r["record"] for r in execution_rows}
    assert state_of(run_row["state"], records, run_row["plan"], run_row["input"]) == final
    # A state whose counts would not name its executions (a reduced one) lists every key.
    fewer = final.model_copy(update={"executions": {k: e for k, e in final.executions.items() if k != item_keys[0]}})
    listed = snapshot_rows(fewer)[0]["state"]
    assert "map_items" not in listed
    assert listed["executions"] == list(fewer.executions)


def test_snapshot_rows_describe_every_attempt() -> None:
    final = _history("rows-run")[-1]
    run_row, execution_rows, step_rows = snapshot_rows(final)
    assert run_row["status"] == "COMPLETED"
    # The run row's state names its executions; each has its own row (stored once).
    assert run_row["state"]["executions"] == ["research@1", "summarize@1"]
    # The plan and the input have their own columns: the state leaves them out, and reads back whole with them.
    assert "plan" not in run_row["state"]
    assert "input" not in run_row["state"]
    assert run_row["plan"] == final.plan.model_dump(mode="json")
    records = {r["execution_key"]: r["record"] for r in execution_rows}
    assert state_of(run_row["state"], records, run_row["plan"], run_row["input"]) == final
    assert [r["execution_key"] for r in execution_rows] == ["research@1", "summarize@1"]
    assert [r["record"] for r in execution_rows] == [e.model_dump(mode="json") for e in final.executions.values()]
    assert run_row["output"] == {"summary": "short"}
    assert run_row["version"] == 4
    assert [(r["step_id"], r["attempt"], r["status"]) for r in step_rows] == [
        ("research", 1, "FAILED"),
        ("research", 2, "COMPLETED"),
        ("summarize", 1, "COMPLETED"),
    ]
    assert step_rows[0]["error"]["kind"] == "http_status"
    assert step_rows[1]["input_data"] == {"topic": "kafka"}


def test_upsert_writes_runs_and_attempts(engine: Engine) -> None:
    history = _history("snap-run")
    repo = SnapshotRepository(engine)
    assert repo.upsert([history[0]]) == 1
    record = WorkflowRepository(engine).get_run("snap-run")
    assert record is not None
    assert record.status == "RUNNING"
    assert [(s.step_id, s.attempt, s.status) for s in record.steps] == [("research", 1, "RUNNING")]

    repo.upsert([history[-1]])
    record = WorkflowRepository(engine).get_run("snap-run")
    assert record is not None
    assert record.status == "COMPLETED"
    assert record.version == 4
    assert record.output == {"summary": "short"}
    assert record.completed_at == T0 + timedelta(seconds=4)
    assert record.plan == _plan().model_dump(mode="json")
    assert [(s.step_id, s.attempt, s.status) for s in record.steps] == [
        ("research", 1, "FAILED"),
        ("research", 2, "COMPLETED"),
        ("summarize", 1, "COMPLETED"),
    ]


def test_a_snapshot_with_changed_executions_writes_only_their_rows(engine: Engine) -> None:
    history = _history("changed-run")
    repo = SnapshotRepository(engine)
    repo.upsert([history[1]])  # all of it: research/1 FAILED, research/2 waiting for its delayed dispatch
    # A later change that (as far as the checkpoint says) touched summarize only: research's rows stay as they were.
    assert repo.upsert([Snapshot(history[-1], frozenset({"summarize@1"}))]) == 1

    def attempts(version: int) -> list[tuple[str, int, str]]:
        record = WorkflowRepository(engine).get_run("changed-run")
        assert record is not None
        assert (record.version, record.status) == (version, "COMPLETED")
        return [(s.step_id, s.attempt, s.status) for s in record.steps]

    assert attempts(4) == [("research", 1, "FAILED"), ("research", 2, "PENDING"), ("summarize", 1, "COMPLETED")]

    # None: every execution; a plain state is a snapshot of all of it too.
    newer = history[-1].model_copy(update={"version": history[-1].version + 1})
    repo.upsert([newer])
    assert attempts(5) == [("research", 1, "FAILED"), ("research", 2, "COMPLETED"), ("summarize", 1, "COMPLETED")]
    assert WorkflowRepository(engine).get_state("changed-run") == newer


def test_upsert_is_idempotent_and_never_goes_back(engine: Engine) -> None:
    history = _history("order-run")
    repo = SnapshotRepository(engine)
    repo.upsert([history[2]])
    repo.upsert([history[2]])  # the same snapshot again
    repo.upsert([history[1]])  # an older one arriving late
    repo.upsert([history[0]])
    with Session(engine) as session:
        row = _run_row(session, "order-run")
        assert row.version == 3
        assert row.status == "RUNNING"
        attempts = session.scalars(
            select(StepExecution).where(StepExecution.run_id == "order-run").order_by(StepExecution.id)
        ).all()
        # research/1 FAILED, research/2 COMPLETED, summarize/1 RUNNING: the older
        # snapshots (where research/1 was RUNNING) did not bring it back.
        assert [(a.step_id, a.attempt, a.status, a.run_version) for a in attempts] == [
            ("research", 1, "FAILED", 3),
            ("research", 2, "COMPLETED", 3),
            ("summarize", 1, "RUNNING", 3),
        ]


def test_upsert_records_every_iteration_and_item_and_keeps_them_up_to_date(engine: Engine) -> None:
    runs, snapshots = WorkflowRepository(engine), SnapshotRepository(engine)
    loop = drive(loop_plan(), loop_answer(approve_at=2), run_id="loop-run")
    mapped = drive(map_plan(), map_answer, {"n": 4}, run_id="map-run")
    # Every state in turn, as the checkpointer writes them: a row is updated in place (by its correlation id).
    for state in [*loop, *mapped]:
        snapshots.upsert([state])

    record = runs.get_run("loop-run")
    assert record is not None
    assert record.status == "COMPLETED"
    assert [(r.step_id, r.iteration, r.item, r.attempt, r.status) for r in record.steps] == [
        ("write", 1, None, 1, "COMPLETED"),
        ("review", 1, None, 1, "COMPLETED"),
        ("write", 2, None, 1, "COMPLETED"),
        ("review", 2, None, 1, "FAILED"),
        ("review", 2, None, 2, "COMPLETED"),
        ("publish", 1, None, 1, "COMPLETED"),
    ]
    assert [r.correlation_id for r in record.steps][2:5] == [
        "loop-run/write@2/1",
        "loop-run/review@2/1",
        "loop-run/review@2/2",
    ]
    assert all(r.run_version == loop[-1].version for r in _rows(engine, "loop-run"))

    record = runs.get_run("map-run")
    assert record is not None
    each = [r for r in record.steps if r.step_id == "each"]
    assert [(r.iteration, r.item, r.attempt, r.status) for r in each] == [(1, i, 1, "COMPLETED") for i in range(4)]
    assert [r.input_data for r in each] == [{"doc": f"doc-{i}", "index": i} for i in range(4)]
    assert [r.output_data for r in each] == ["DOC-0!", "DOC-1!", "DOC-2!", "DOC-3!"]
    assert record_view(record) == {**state_view(mapped[-1]), "source": "record"}

    # An older snapshot arriving late brings no row back (item 2 was RUNNING in it).
    snapshots.upsert([mapped[2]])
    again = runs.get_run("map-run")
    assert again is not None
    assert again.steps == record.steps


def test_a_run_waiting_for_a_person_is_recorded_with_its_questions_and_answers(engine: Engine) -> None:
    runs, snapshots = WorkflowRepository(engine), SnapshotRepository(engine)
    state = waiting_map_state("ask-run")
    run_row, _, step_rows = snapshot_rows(state)
    assert run_row["waiting"] == 2
    assert [(r["item"], r["task_id"], r["exchanges"]) for r in step_rows] == [
        (None, None, None),  # split asked nothing: no exchanges, not an empty list
        (0, "task-0", [FORMAT.model_dump(mode="json"), FONT.model_dump(mode="json")]),
        (1, "task-1", [WHICH.model_dump(mode="json")]),
    ]

    snapshots.upsert([state])

    with Session(engine) as session:
        assert _run_row(session, "ask-run").waiting == 2
    rows = sorted(_rows(engine, "ask-run"), key=lambda r: (r.started_at or T0, r.id))  # written by correlation id
    assert [(r.step_id, r.item, r.status, r.task_id) for r in rows] == [
        ("split", None, "COMPLETED", None),
        ("each", 0, "WAITING", "task-0"),
        ("each", 1, "WAITING", "task-1"),
    ]
    assert rows[0].exchanges is None
    with engine.connect() as conn:
        asked_nothing = conn.scalars(
            text("SELECT step_id FROM step_executions WHERE run_id = 'ask-run' AND exchanges IS NULL")
        ).all()
    assert asked_nothing == ["split"], "SQL NULL, not JSON null, when an attempt asked nothing"
    exchanges: Any = rows[1].exchanges
    assert exchanges[0]["question"] == {"text": "Which format?", "data": {"choices": ["pdf", "html"]}}
    assert exchanges[0]["answer"]["text"] == "pdf"
    assert exchanges[1]["answer"] is None
    record = runs.get_run("ask-run")
    assert record is not None
    assert record.waiting == 2
    assert [s.exchanges for s in record.steps] == [r["exchanges"] for r in step_rows]
    assert runs.get_state("ask-run") == state
    assert record_view(record) == {**state_view(state), "source": "record"}
    assert [(q["item"], q["turn"], q["text"]) for q in record_view(record)["questions"]] == [
        (0, 1, "Which font?"),
        (1, 0, "Which?"),
    ]

    # Item 1 is answered and its call goes on: a checkpoint of that change alone updates its row and the count.
    execution = state.executions["each@1[1]"]
    assert execution.current is not None
    answer = Answer(answer_id="answer-2", text="that one", source="http")
    answered = WHICH.model_copy(update={"answer": answer, "answered_at": WHICH.asked_at})
    attempt = execution.current.model_copy(update={"status": StepStatus.RUNNING, "exchanges": (answered,)})
    going_on = execution.model_copy(update={"status": StepStatus.RUNNING, "attempts": (attempt,)})
    later = state.model_copy(
        update={"executions": {**state.executions, "each@1[1]": going_on}, "waiting": 1, "version": state.version + 1}
    )
    snapshots.upsert([Snapshot(later, frozenset({"each@1[1]"}))])

    again = runs.get_run("ask-run")
    assert again is not None
    assert (again.waiting, again.version) == (1, later.version)
    assert [(s.item, s.status) for s in again.steps] == [(None, "COMPLETED"), (0, "WAITING"), (1, "RUNNING")]
    assert again.steps[1] == record.steps[1], "an execution that did not change keeps its row"
    assert again.steps[2].exchanges == [answered.model_dump(mode="json")]
    assert runs.get_state("ask-run") == later
    assert [q["item"] for q in record_view(again)["questions"]] == [0]


def test_list_runs_can_list_the_running_runs_that_wait_for_a_person(engine: Engine) -> None:
    runs = WorkflowRepository(engine)
    approval = approval_state("wait-approval")
    states = [
        waiting_map_state("wait-map"),
        approval,
        approval_state("wait-decided", decided=True),  # it waited, and was answered
        drive(map_plan(), map_answer, {"n": 4}, run_id="wait-none", answers=1)[-1],  # running, waits for nobody
        # A run that ended with a count left over (it cannot, but even so) is no longer waiting for anybody.
        approval.model_copy(update={"run_id": "wait-cancelled", "status": RunStatus.CANCELLED}),
    ]
    other_flow = approval.plan.model_copy(update={"workflow_id": "other-approval"})
    states.append(approval.model_copy(update={"run_id": "wait-other", "plan": other_flow}))
    SnapshotRepository(engine).upsert(states)

    def waiting(**filters: Any) -> list[str]:
        return [r.run_id for r in runs.list_runs(waiting=True, **filters) if r.run_id.startswith("wait-")]

    # Newest first, as every listing (all were created at once here: then by run_id).
    assert waiting() == ["wait-approval", "wait-map", "wait-other"]
    assert {r.run_id: r.waiting for r in runs.list_runs(waiting=True) if r.run_id.startswith("wait-")} == {
        "wait-approval": 1,
        "wait-map": 2,
        "wait-other": 1,
    }
    assert waiting(workflow_id="views-approval") == ["wait-approval"]
    every = [r.run_id for r in runs.list_runs(waiting=True)]
    assert [r.run_id for r in runs.list_runs(waiting=True, status=RunStatus.RUNNING, limit=2, offset=1)] == every[1:3]
    assert waiting(status=[RunStatus.CANCELLED, RunStatus.COMPLETED]) == []
    listed = {r.run_id: r.waiting for r in runs.list_runs() if r.run_id.startswith("wait-")}
    assert listed == {
        "wait-map": 2,
        "wait-approval": 1,
        "wait-decided": 0,
        "wait-none": 0,
        "wait-cancelled": 1,
        "wait-other": 1,
    }, "without the filter every run is listed, with its count"


def _rows(engine: Engine, run_id: str) -> list[StepExecution]:
    with Session(engine) as session:
        return list(
            session.scalars(select(StepExecution).where(StepExecution.run_id == run_id).order_by(StepExecution.id))
        )


def test_versions_are_read_in_pages_and_unrecorded_runs_are_absent(engine: Engine) -> None:
    SnapshotRepository(engine).upsert([_history("versions-a")[2], _history("versions-b")[0]])
    found = WorkflowRepository(engine).versions(["versions-b", "versions-a", "versions-none", "versions-a"], page=1)
    assert found == {"versions-a": 3, "versions-b": 1}
    assert WorkflowRepository(engine).versions([]) == {}


def test_upsert_batch_keeps_newest_copy_of_each_run(engine: Engine) -> None:
    histories = {f"batch-{i}": _history(f"batch-{i}") for i in range(50)}
    batch = [state for history in histories.values() for state in reversed(history)]  # newest first, then older
    assert SnapshotRepository(engine).upsert(batch) == 50
    with Session(engine) as session:
        statuses = session.execute(
            select(WorkflowRun.status, func.count()).where(WorkflowRun.run_id.like("batch-%")).group_by("status")
        ).all()
        assert statuses == [("COMPLETED", 50)]
        attempts = session.scalar(
            select(func.count()).select_from(StepExecution).where(StepExecution.run_id.like("batch-%"))
        )
        assert attempts == 150
    assert SnapshotRepository(engine).upsert([]) == 0


def _blocked(thread: threading.Thread, seconds: float = 0.5) -> bool:
    thread.join(seconds)
    return thread.is_alive()


@pytest.mark.parametrize("holder_is_newer", [True, False], ids=["newer-first", "older-first"])
def test_concurrent_upserts_of_one_run_leave_the_newest(engine: Engine, holder_is_newer: bool) -> None:
    run_id = f"race-{holder_is_newer}"
    history = _history(run_id)
    SnapshotRepository(engine).upsert([history[0]])
    newer, older = history[3], history[2]
    first, second = (newer, older) if holder_is_newer else (older, newer)

    errors: list[BaseException] = []

    def write_second() -> None:
        try:
            SnapshotRepository(engine).upsert([second])
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    # Connection A writes ``first`` and holds the row lock; B's upsert must
    # wait for it, then re-check the version against what A committed.
    with Session(engine) as session_a, session_a.begin():
        upsert_snapshots(session_a, [first])
        other = threading.Thread(target=write_second)
        other.start()
        assert _blocked(other), "the second writer should wait for the first one's row lock"
    other.join(10)
    assert not other.is_alive()
    assert errors == []
    with Session(engine) as session:
        row = _run_row(session, run_id)
        assert row.version == newer.version
        assert row.status == "COMPLETED"
        summarize = session.scalars(
            select(StepExecution).where(StepExecution.run_id == run_id, StepExecution.step_id == "summarize")
        ).one()
        assert summarize.status == "COMPLETED"


def test_many_concurrent_writers_end_with_the_newest(engine: Engine) -> None:
    history = _history("stampede")
    versions = history * 10
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        repo = SnapshotRepository(engine)
        barrier.wait()
        try:
            for state in versions[offset::4]:
                repo.upsert([state])
                time.sleep(0)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with Session(engine) as session:
        assert _run_row(session, "stampede").version == 4


def test_retry_policy_is_stored_with_the_plan(engine: Engine) -> None:
    final = _history("policy-run")[-1]
    SnapshotRepository(engine).upsert([final])
    record = WorkflowRepository(engine).get_run("policy-run", with_steps=False)
    assert record is not None
    assert record.steps == ()
    assert isinstance(record.plan, dict)
    stored = WorkflowPlan.model_validate(record.plan)
    assert stored.steps["research"].retry == RetryPolicy(max_attempts=3, initial_delay_s=1, jitter=0)


def test_upsert_records_dispatch_and_deadline_times(engine: Engine) -> None:
    state, effects = transition(None, RunSubmitted(run_id="times-run", plan=_plan(), input={"topic": "t"}, at=T0))
    assert state is not None
    dispatch = next(e for e in effects if isinstance(e, DispatchTask))
    SnapshotRepository(engine).upsert([state])
    record = WorkflowRepository(engine).get_run("times-run")
    assert record is not None
    (row,) = record.steps
    assert row.started_at == T0
    assert row.deadline == dispatch.task.deadline
    assert row.correlation_id == dispatch.task.correlation_id == "times-run/research/1"


def test_schema_creation_from_many_processes_at_once(postgres_server) -> None:
    """Executor, bridge and CLI start together: concurrent create_schema must not collide."""
    from sqlalchemy import create_engine

    from switchyard.db import make_engine

    name = "t_schema_race"
    admin = create_engine(postgres_server.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engines = [make_engine(postgres_server.url_for(name)) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(engines))

    def create(engine: Engine) -> None:
        barrier.wait()
        try:
            create_schema(engine)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=create, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for engine in engines:
        engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()
    assert errors == []


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(alphabet=st.sampled_from('a\\\x00u0\ufffd"')),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(alphabet=st.sampled_from("k\\\x00u0")), inner, max_size=3)
        ),
        max_leaves=8,
    )
)
def test_the_json_written_to_postgresql_has_every_nul_replaced_and_nothing_else(value: JsonValue) -> None:
    # Backslashes next to NULs, and text that spells the escape itself, are what a rewrite of the JSON text
    # could get wrong: the text must read back as the value with each NUL replaced, and only those.
    text = postgresql_json(value)
    assert json.loads(text) == storable(value)


def test_nul_characters_are_stored_as_replacement_characters(engine: Engine) -> None:
    state, _ = transition(
        None, RunSubmitted(run_id="nul-run", plan=_plan(), input={"topic": "a\x00b", "k\x00": ["\x00"]}, at=T0)
    )
    assert state is not None
    SnapshotRepository(engine).upsert([state])
    record = WorkflowRepository(engine).get_run("nul-run")
    assert record is not None
    assert record.input == {"topic": "a\ufffdb", "k\ufffd": ["\ufffd"]}
    assert record.steps[0].input_data == {"topic": "a\ufffdb"}
    assert WorkflowRepository(engine).record_rejected("nul-rejected", kind="invalid_submission", message="bad \x00")
