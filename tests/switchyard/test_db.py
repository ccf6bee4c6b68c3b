"""Repositories and the snapshot upsert, on a real PostgreSQL server."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.messages import AgentError, AgentResult, ResultStatus
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
from switchyard.db import (
    SnapshotRepository,
    StepRepository,
    WorkflowRepository,
    create_schema,
    normalize_url,
    snapshot_rows,
    upsert_snapshots,
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
    uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("step_executions")}
    assert ("run_id", "step_id", "attempt") in uniques
    assert ("correlation_id",) in uniques
    fks = inspector.get_foreign_keys("step_executions")
    assert fks[0]["referred_table"] == "workflow_runs"


# -------------------------------------------------------------- repositories


def test_create_get_and_update_run(engine: Engine) -> None:
    runs = WorkflowRepository(engine)
    plan = _plan().model_dump(mode="json")
    created = runs.create_run("repo-run-1", plan, {"topic": "x"}, created_at=T0)
    assert created.status == "PENDING"
    assert created.workflow_id == "research-and-summarize"
    assert created.workflow_version == "1.0"
    assert created.created_at == T0

    again = runs.create_run("repo-run-1", plan, {"topic": "other"})
    assert again.input == {"topic": "x"}, "creating an existing run must not overwrite it"

    assert runs.update_run_status("repo-run-1", RunStatus.RUNNING, at=T0 + timedelta(seconds=1))
    running = runs.get_run("repo-run-1")
    assert running is not None
    assert running.status == "RUNNING"
    assert running.started_at == T0 + timedelta(seconds=1)
    assert running.completed_at is None

    assert runs.update_run_status(
        "repo-run-1", RunStatus.COMPLETED, output={"summary": "s"}, at=T0 + timedelta(seconds=2)
    )
    done = runs.get_run("repo-run-1")
    assert done is not None
    assert done.status == "COMPLETED"
    assert done.output == {"summary": "s"}
    assert done.completed_at == T0 + timedelta(seconds=2)

    assert runs.get_run("no-such-run") is None
    assert not runs.update_run_status("no-such-run", RunStatus.FAILED)


def test_list_runs_filters_and_orders(engine: Engine) -> None:
    runs = WorkflowRepository(engine)
    plan = _plan().model_dump(mode="json")
    other_plan = {**plan, "workflow_id": "other-flow"}
    for i in range(5):
        runs.create_run(f"list-{i}", plan if i % 2 == 0 else other_plan, {}, created_at=T0 + timedelta(minutes=i))
    runs.update_run_status("list-3", RunStatus.FAILED, error={"kind": "x", "message": "y"})

    listed = [r.run_id for r in runs.list_runs(workflow_id="research-and-summarize")]
    assert listed[:3] == ["list-4", "list-2", "list-0"], "newest first"
    assert [r.run_id for r in runs.list_runs(status=RunStatus.FAILED)] == ["list-3"]
    assert {r.run_id for r in runs.list_runs(status=[RunStatus.FAILED, RunStatus.PENDING])} >= {"list-3", "list-4"}
    assert len(runs.list_runs(limit=2)) == 2
    assert [r.run_id for r in runs.list_runs(workflow_id="other-flow")] == ["list-3", "list-1"]


def test_steps_create_update_and_read_in_order(engine: Engine) -> None:
    runs, steps = WorkflowRepository(engine), StepRepository(engine)
    runs.create_run("step-run", _plan().model_dump(mode="json"), {})
    first = steps.create_step(
        run_id="step-run",
        step_id="research",
        attempt=1,
        agent_name="researcher",
        correlation_id="step-run/research/1",
        input_data={"topic": "x"},
        started_at=T0,
    )
    assert first.status == "RUNNING"
    again = steps.create_step(
        run_id="step-run",
        step_id="research",
        attempt=1,
        agent_name="researcher",
        correlation_id="step-run/research/1",
        input_data={"topic": "changed"},
    )
    assert again.input_data == {"topic": "x"}, "creating the same attempt again changes nothing"
    steps.create_step(
        run_id="step-run",
        step_id="research",
        attempt=2,
        agent_name="researcher",
        correlation_id="step-run/research/2",
        started_at=T0 + timedelta(seconds=5),
    )
    assert steps.update_step(
        "step-run/research/1",
        StepStatus.FAILED,
        error={"kind": "timeout", "message": "late"},
        completed_at=T0 + timedelta(seconds=4),
    )
    assert steps.update_step("step-run/research/2", StepStatus.COMPLETED, output_data={"notes": "n"})
    assert not steps.update_step("nope", StepStatus.COMPLETED)

    rows = steps.get_steps_by_run_id("step-run")
    assert [(r.step_id, r.attempt, r.status) for r in rows] == [
        ("research", 1, "FAILED"),
        ("research", 2, "COMPLETED"),
    ]
    assert rows[0].error == {"kind": "timeout", "message": "late"}
    assert rows[0].completed_at == T0 + timedelta(seconds=4)
    assert rows[1].completed_at is not None
    assert rows[1].output_data == {"notes": "n"}

    record = runs.get_run("step-run")
    assert record is not None
    assert [s.attempt for s in record.steps] == [1, 2]


def test_step_for_unknown_run_is_refused(engine: Engine) -> None:
    with pytest.raises(IntegrityError):
        StepRepository(engine).create_step(
            run_id="ghost", step_id="s", attempt=1, agent_name="a", correlation_id="ghost/s/1"
        )


# ---------------------------------------------------------- snapshot upsert


def test_snapshot_rows_describe_every_attempt() -> None:
    final = _history("rows-run")[-1]
    run_row, step_rows = snapshot_rows(final)
    assert run_row["status"] == "COMPLETED"
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
    (row,) = StepRepository(engine).get_steps_by_run_id("times-run")
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
