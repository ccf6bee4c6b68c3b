"""The schema's Alembic migrations (switchyard/migrations), on a real PostgreSQL server.

Each test gets a fresh, empty database on the session's server (see
tests/conftest.py): a fresh one brought to the latest revision by
:func:`switchyard.db.create_schema`, or one made the way Switchyard made them
before migrations existed (revision 0001's tables, no ``alembic_version``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import JsonValue
from sqlalchemy import Engine, MetaData, Table, create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

import switchyard.db
from models.messages import AgentResult, ResultStatus
from models.plan import WorkflowPlan, load_plan
from models.records import Base
from models.run import AgentResultReceived, RunState, RunStatus, RunSubmitted, StepStatus, transition
from switchyard.db import SnapshotRepository, WorkflowRepository, create_schema, make_engine
from tests.conftest import PostgresServer
from tests.streams.test_views import waiting_map_state

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
MIGRATIONS = Path(switchyard.db.__file__).with_name("migrations")


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


HEAD = ScriptDirectory.from_config(_config()).get_current_head()


@pytest.fixture
def new_engine(postgres_server: PostgresServer) -> Iterator[Callable[[], Engine]]:
    """Makes engines on fresh, empty databases, dropped at the end of the test."""
    admin = create_engine(postgres_server.admin_url, isolation_level="AUTOCOMMIT")
    made: list[tuple[str, Engine]] = []

    def make() -> Engine:
        name = f"t_migrations_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine = make_engine(postgres_server.url_for(name))
        made.append((name, engine))
        return engine

    try:
        yield make
    finally:
        for name, engine in made:
            engine.dispose()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def schema_differences(engine: Engine) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match the ORM ([] when they match)."""
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


def revisions(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(text("SELECT version_num FROM alembic_version")))


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def make_pre_alembic_database(engine: Engine, *, with_state_column: bool = True) -> None:
    """The tables as Switchyard created them before migrations: revision 0001's DDL, no ``alembic_version``.

    ``with_state_column=False`` makes the oldest of them, from before the
    ``state`` column was added by hand.
    """
    config = _config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.execute(text("DROP TABLE alembic_version"))
        if not with_state_column:
            conn.execute(text("ALTER TABLE workflow_runs DROP COLUMN state"))


def _plan() -> WorkflowPlan:
    return load_plan(
        {
            "workflow_id": "old-flow",
            "name": "Old flow",
            "version": "1.0",
            "start_step": "research",
            "steps": {
                "research": {
                    "id": "research",
                    "agent_name": "researcher",
                    "input_mapping": {"topic": "${workflow.input.topic}"},
                    "next_step": "summarize",
                },
                "summarize": {
                    "id": "summarize",
                    "agent_name": "summarizer",
                    "input_mapping": {"text": "${research.output.notes}"},
                },
            },
        }
    )


def _completed_chain(run_id: str) -> RunState:
    state, _ = transition(None, RunSubmitted(run_id=run_id, plan=_plan(), input={"topic": "kafka"}, at=T0))
    assert state is not None
    outputs: list[tuple[str, JsonValue]] = [("research", {"notes": "n"}), ("summarize", {"summary": "s"})]
    for offset, (step_id, output) in enumerate(outputs, start=1):
        execution = state.execution(step_id)
        attempt = execution.current if execution is not None else None
        assert attempt is not None
        at = T0 + timedelta(seconds=offset)
        result = AgentResult(
            correlation_id=attempt.correlation_id,
            run_id=run_id,
            step_id=step_id,
            attempt=attempt.number,
            status=ResultStatus.SUCCESS,
            output=output,
            started_at=at,
            finished_at=at,
        )
        state, _ = transition(state, AgentResultReceived(result=result, at=at))
        assert state is not None
    assert state.status is RunStatus.COMPLETED
    return state


def chain_state_json(state: RunState) -> dict[str, Any]:
    """A chain run as the single-chain version stored it: each step holding its attempts, and ``current_step``."""
    data = state.model_dump(mode="json")
    executions = data.pop("executions")
    steps = {}
    for step_id, step in data["steps"].items():
        execution = executions[f"{step_id}@1"]
        steps[step_id] = {
            "step_id": step_id,
            "agent_name": step["agent_name"],
            "status": step["status"],
            "attempts": execution["attempts"],
            "first_attempt_of_round": execution["first_attempt_of_round"],
            "fallback_agent": execution["fallback_agent"],
            "next_attempt_at": execution["next_attempt_at"],
            "output": state.executions[f"{step_id}@1"].output,
            "error": execution["error"],
            "started_at": execution["started_at"],
            "completed_at": execution["completed_at"],
        }
    data["steps"] = steps
    data["current_step"] = data.pop("last_step")
    return data


def insert_old_rows(engine: Engine, state: RunState, *, with_state: bool = True) -> None:
    """A run row and its attempt rows as the pre-Alembic code wrote them (no iteration, no item)."""
    old = chain_state_json(state)
    run = {
        "run_id": state.run_id,
        "workflow_id": state.plan.workflow_id,
        "workflow_version": state.plan.version,
        "status": str(state.status),
        "input": old["input"],
        "output": old["output"],
        "error": old["error"],
        "plan": old["plan"],
        "version": state.version,
        "created_at": state.created_at,
        "started_at": state.started_at,
        "completed_at": state.completed_at,
        "updated_at": state.updated_at,
    }
    columns = list(run)
    values = [f"CAST(:{c} AS JSONB)" if c in {"input", "output", "error", "plan"} else f":{c}" for c in columns]
    if with_state:
        run["state"] = old
        columns.append("state")
        values.append("CAST(:state AS JSONB)")
    jsonb = {k: _json(v) for k, v in run.items() if k in {"input", "output", "error", "plan", "state"}}
    with engine.begin() as conn:
        conn.execute(
            text(f"INSERT INTO workflow_runs ({', '.join(columns)}) VALUES ({', '.join(values)})"),
            {**run, **jsonb},
        )
        for step_id, step in old["steps"].items():
            for attempt in step["attempts"]:
                conn.execute(
                    text(
                        "INSERT INTO step_executions (run_id, step_id, attempt, agent_name, status, input_data,"
                        " output_data, error, correlation_id, run_version, started_at, deadline, completed_at)"
                        " VALUES (:run_id, :step_id, :attempt, :agent_name, :status, CAST(:input AS JSONB),"
                        " CAST(:output AS JSONB), CAST(:error AS JSONB), :correlation_id, :run_version,"
                        " :started_at, :deadline, :completed_at)"
                    ),
                    {
                        "run_id": state.run_id,
                        "step_id": step_id,
                        "attempt": attempt["number"],
                        "agent_name": attempt["agent_name"],
                        "status": attempt["status"],
                        "input": _json(attempt["input"]),
                        "output": _json(attempt["output"]),
                        "error": _json(attempt["error"]),
                        "correlation_id": attempt["correlation_id"],
                        "run_version": state.version,
                        "started_at": attempt["dispatch_at"],
                        "deadline": attempt["deadline"],
                        "completed_at": attempt["finished_at"],
                    },
                )


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


# --------------------------------------------------------------------- fresh


def test_a_fresh_database_is_brought_to_the_latest_revision_and_matches_the_orm(
    new_engine: Callable[[], Engine],
) -> None:
    engine = new_engine()
    assert tables(engine) == set()

    create_schema(engine)

    assert tables(engine) == {"workflow_runs", "step_executions", "run_executions", "agents", "alembic_version"}
    assert revisions(engine) == [HEAD]
    assert schema_differences(engine) == []


def test_create_schema_twice_is_harmless(new_engine: Callable[[], Engine]) -> None:
    engine = new_engine()
    create_schema(engine)
    state = _completed_chain("twice-run")
    SnapshotRepository(engine).upsert([state])

    create_schema(engine)
    create_schema(engine)

    assert revisions(engine) == [HEAD]
    assert schema_differences(engine) == []
    assert WorkflowRepository(engine).get_state("twice-run") == state


def test_the_revisions_form_one_line_from_the_chain_schema() -> None:
    # create_schema stamps pre-Alembic databases with "0001" and upgrades to the one head.
    script = ScriptDirectory.from_config(_config())
    assert script.get_heads() == [HEAD]
    history = list(script.walk_revisions())
    assert history[-1].revision == "0001"
    assert history[-1].down_revision is None
    assert [r.down_revision for r in history[:-1]] == [r.revision for r in history[1:]]
    assert HEAD != "0001"


# ---------------------------------------------------------------- pre-Alembic


@pytest.mark.parametrize("with_state_column", [True, False], ids=["with-state", "oldest"])
def test_a_database_from_before_migrations_is_stamped_upgraded_and_keeps_its_rows(
    new_engine: Callable[[], Engine], with_state_column: bool
) -> None:
    engine = new_engine()
    make_pre_alembic_database(engine, with_state_column=with_state_column)
    assert "alembic_version" not in tables(engine)
    old = _completed_chain("old-run")
    insert_old_rows(engine, old, with_state=with_state_column)
    before = schema_differences(engine)
    assert {d[0] for d in before} == {"add_column", "add_table", "remove_constraint", "add_constraint", "add_index"}
    assert [d[1].name for d in before if d[0] == "add_table"] == ["run_executions"]
    assert [d[1].name for d in before if d[0] == "add_index"] == ["ix_workflow_runs_waiting_created_at"]
    added = {(d[2], d[3].name) for d in before if d[0] == "add_column"}
    assert added == {
        ("step_executions", "iteration"),
        ("step_executions", "item"),
        ("workflow_runs", "waiting"),
        ("step_executions", "exchanges"),
        ("step_executions", "task_id"),
    } | (set() if with_state_column else {("workflow_runs", "state")})

    create_schema(engine)

    assert revisions(engine) == [HEAD]
    assert schema_differences(engine) == []
    record = WorkflowRepository(engine).get_run("old-run")
    assert record is not None
    assert (record.status, record.version, record.workflow_id) == ("COMPLETED", old.version, "old-flow")
    assert record.output == {"summary": "s"}
    assert record.created_at == T0
    assert record.completed_at == T0 + timedelta(seconds=2)
    assert [(s.step_id, s.attempt, s.status) for s in record.steps] == [
        ("research", 1, "COMPLETED"),
        ("summarize", 1, "COMPLETED"),
    ]
    # Rows from before loops and maps were each a step's only execution.
    assert [(s.iteration, s.item) for s in record.steps] == [(1, None), (1, None)]
    assert [s.correlation_id for s in record.steps] == ["old-run/research/1", "old-run/summarize/1"]
    assert record.steps[0].output_data == {"notes": "n"}

    state = WorkflowRepository(engine).get_state("old-run")
    if not with_state_column:
        assert state is None  # nothing to rebuild from: the column was added empty
    else:
        # The single-chain snapshot reads as today's state.
        assert state is not None
        assert state.status is RunStatus.COMPLETED
        assert state.last_step == "summarize"
        assert list(state.executions) == ["research@1", "summarize@1"]
        assert state.execution("research") == old.execution("research")
        assert state.execution("summarize") == old.execution("summarize")
        assert {k: (s.status, state.output_of(k)) for k, s in state.steps.items()} == {
            k: (s.status, old.output_of(k)) for k, s in old.steps.items()
        }

    # The upgraded database takes today's writes; the old run's rows too (same correlation ids).
    SnapshotRepository(engine).upsert([old.model_copy(update={"version": old.version + 1})])
    rewritten = WorkflowRepository(engine).get_run("old-run")
    assert rewritten is not None
    assert [(s.step_id, s.iteration, s.item, s.attempt) for s in rewritten.steps] == [
        ("research", 1, None, 1),
        ("summarize", 1, None, 1),
    ]
    assert WorkflowRepository(engine).get_state("old-run") == old.model_copy(update={"version": old.version + 1})

    create_schema(engine)  # and again: nothing to do
    assert revisions(engine) == [HEAD]


# ------------------------------------------------------------ the attempt key


def _attempt_row(conn: Any, correlation: str, *, iteration: int, item: int | None, attempt: int = 1) -> None:
    conn.execute(
        text(
            "INSERT INTO step_executions (run_id, step_id, iteration, item, attempt, agent_name, status,"
            " correlation_id, run_version)"
            " VALUES ('key-run', 'each', :iteration, :item, :attempt, 'agent', :status, :correlation, 1)"
        ),
        {
            "iteration": iteration,
            "item": item,
            "attempt": attempt,
            "status": str(StepStatus.COMPLETED),
            "correlation": correlation,
        },
    )


@pytest.fixture
def keyed_engine(new_engine: Callable[[], Engine]) -> Engine:
    """A database upgraded from before migrations, with one run to hang attempt rows on."""
    engine = new_engine()
    make_pre_alembic_database(engine)
    create_schema(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO workflow_runs (run_id, workflow_id, workflow_version, status, input, plan, version)"
                " VALUES ('key-run', 'w', '1', 'RUNNING', '{}', '{}', 1)"
            )
        )
    return engine


def test_attempts_differing_only_in_iteration_or_item_coexist(keyed_engine: Engine) -> None:
    with keyed_engine.begin() as conn:
        _attempt_row(conn, "a", iteration=1, item=None)
        _attempt_row(conn, "b", iteration=2, item=None)
        _attempt_row(conn, "c", iteration=1, item=0)
        _attempt_row(conn, "d", iteration=1, item=1)
        _attempt_row(conn, "e", iteration=2, item=0)
        _attempt_row(conn, "f", iteration=1, item=None, attempt=2)
    with keyed_engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM step_executions WHERE run_id = 'key-run'")) == 6


@pytest.mark.parametrize("item", [None, 3], ids=["no-item", "item"])
def test_the_same_attempt_of_the_same_execution_cannot_be_recorded_twice(
    keyed_engine: Engine, item: int | None
) -> None:
    # NULLS NOT DISTINCT: outside maps (a null item) the key still holds.
    with keyed_engine.begin() as conn:
        _attempt_row(conn, "first", iteration=2, item=item)
    key = "uq_step_executions_run_id_step_id_iteration_item_attempt"
    with pytest.raises(IntegrityError, match=key), keyed_engine.begin() as conn:
        _attempt_row(conn, "second", iteration=2, item=item)
    with keyed_engine.connect() as conn:
        rows = conn.execute(text("SELECT correlation_id, iteration, item FROM step_executions")).all()
    assert rows == [("first", 2, item)]


def test_a_fresh_database_has_the_same_attempt_key(new_engine: Callable[[], Engine]) -> None:
    engine = new_engine()
    create_schema(engine)
    uniques = {u["name"]: u for u in inspect(engine).get_unique_constraints("step_executions")}
    key = uniques["uq_step_executions_run_id_step_id_iteration_item_attempt"]
    assert key["column_names"] == ["run_id", "step_id", "iteration", "item", "attempt"]
    assert "uq_step_executions_run_id_step_id_attempt" not in uniques
    with engine.connect() as conn:
        definition = conn.scalar(
            text("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = :name"),
            {"name": "uq_step_executions_run_id_step_id_iteration_item_attempt"},
        )
    assert "NULLS NOT DISTINCT" in definition


# ------------------------------------------------------ a person in the loop


def migrate(engine: Engine, revision: str, *, down: bool = False) -> None:
    """Bring the database to ``revision`` with Alembic, up (or ``down``)."""
    config = _config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(config, revision)


def columns(engine: Engine, table: str) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns(table)}


def index_definitions(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'workflow_runs'"))
        return {str(name): str(definition) for name, definition in rows}


def insert_0003_rows(engine: Engine, state: RunState) -> None:
    """A run's rows as revision 0003's code wrote them: today's, without the columns 0004 adds."""
    run_row, execution_rows, step_rows = switchyard.db.snapshot_rows(state)
    metadata = MetaData()
    with engine.begin() as conn:
        runs, executions, steps = (
            Table(name, metadata, autoload_with=conn) for name in ("workflow_runs", "run_executions", "step_executions")
        )
        conn.execute(runs.insert(), [{k: v for k, v in run_row.items() if k in runs.c}])
        conn.execute(executions.insert(), execution_rows)
        conn.execute(steps.insert(), [{k: v for k, v in row.items() if k in steps.c} for row in step_rows])


WAITING_INDEX = "ix_workflow_runs_waiting_created_at"


def test_0004_adds_the_waiting_count_and_the_exchanges_and_a_downgrade_takes_them_away(
    new_engine: Callable[[], Engine],
) -> None:
    assert HEAD == "0004"
    engine = new_engine()
    migrate(engine, "0003")
    assert "waiting" not in columns(engine, "workflow_runs")
    assert not {"exchanges", "task_id"} & columns(engine, "step_executions")
    old = _completed_chain("before-0004")
    insert_0003_rows(engine, old)

    migrate(engine, "0004")

    assert revisions(engine) == ["0004"]
    assert schema_differences(engine) == []
    assert "WHERE (waiting > 0)" in index_definitions(engine)[WAITING_INDEX]
    runs = WorkflowRepository(engine)
    # The rows written before wait for nobody and asked nothing, which is what they were.
    record = runs.get_run("before-0004")
    assert record is not None
    assert record.waiting == 0
    assert [(s.step_id, s.exchanges, s.task_id) for s in record.steps] == [
        ("research", None, None),
        ("summarize", None, None),
    ]
    assert runs.get_state("before-0004") == old
    assert runs.list_runs(waiting=True) == []

    # Today's writes: a run waiting for a person.
    waiting = waiting_map_state("waits-0004")
    SnapshotRepository(engine).upsert([waiting])
    assert [(r.run_id, r.waiting) for r in runs.list_runs(waiting=True)] == [("waits-0004", 2)]
    with engine.connect() as conn:
        asked = conn.execute(
            text("SELECT task_id, exchanges FROM step_executions WHERE exchanges IS NOT NULL ORDER BY correlation_id")
        ).all()
    assert [(task, len(exchanges)) for task, exchanges in asked] == [("task-0", 2), ("task-1", 1)]

    migrate(engine, "0003", down=True)

    assert revisions(engine) == ["0003"]
    assert "waiting" not in columns(engine, "workflow_runs")
    assert not {"exchanges", "task_id"} & columns(engine, "step_executions")
    assert WAITING_INDEX not in index_definitions(engine)
    with engine.connect() as conn:
        counts = conn.execute(
            text("SELECT run_id, count(*) FROM step_executions GROUP BY run_id ORDER BY run_id")
        ).all()
    assert counts == [("before-0004", 2), ("waits-0004", 3)], "every row stays"
    # The questions and answers stay in each execution's record: the state reads back whole.
    assert runs.get_state("waits-0004") == waiting
    assert runs.get_state("before-0004") == old

    create_schema(engine)  # and up again, as a process starting would

    assert revisions(engine) == [HEAD]
    assert schema_differences(engine) == []
    assert WAITING_INDEX in index_definitions(engine)
    assert runs.list_runs(waiting=True) == [], "the count is back at 0 until the run's next checkpoint"
    SnapshotRepository(engine).upsert([waiting.model_copy(update={"version": waiting.version + 1})])
    assert [(r.run_id, r.waiting) for r in runs.list_runs(waiting=True)] == [("waits-0004", 2)]
