"""PostgreSQL access: the engine, the schema, the repositories and the snapshot upsert.

All functions here block; async callers run them in a worker thread
(docs/architecture.md, rule 6). Every repository method is its own transaction.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, cast

from alembic import command
from alembic.config import Config
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from sqlalchemy import Engine, Executable, Table, bindparam, create_engine, inspect, literal_column, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, selectinload, sessionmaker

from models.messages import submission_fingerprint, utcnow
from models.plan import WorkflowPlan
from models.records import RunExecution, StepExecution, WorkflowRun
from models.run import RunState, RunStatus
from models.run_state import map_item_counts, map_item_keys

__all__ = [
    "RunRecord",
    "Snapshot",
    "SnapshotRepository",
    "StepRecord",
    "WorkflowRepository",
    "create_schema",
    "execution_keys_of",
    "make_engine",
    "normalize_url",
    "postgresql_json",
    "snapshot_rows",
    "state_of",
    "storable",
    "upsert_snapshots",
    "whole_state",
]


def normalize_url(url: str) -> str:
    """Pin a PostgreSQL URL to the psycopg2 driver.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, which is not a
    dependency; ``postgres://`` (Heroku style) is accepted too.

    Raises:
        ValueError: The URL is not a PostgreSQL URL.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() not in {"postgresql", "postgres"}:
        raise ValueError(f"Switchyard needs PostgreSQL; got a {parsed.get_backend_name()!r} URL")
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 10, echo: bool = False) -> Engine:
    """Create a pooled engine for a PostgreSQL URL.

    Connections are checked before use (``pool_pre_ping``), so a database
    restart costs one failed ping, not a failed transaction.
    """
    return create_engine(
        normalize_url(url),
        json_serializer=postgresql_json,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        pool_recycle=1800,
        echo=echo,
    )


# Any constant shared by every Switchyard process; serializes schema changes.
_SCHEMA_LOCK_KEY = 0x5377_6974_6368  # "Switch"
_MIGRATIONS = Path(__file__).with_name("migrations")
_FIRST_REVISION = "0001"


def create_schema(engine: Engine) -> None:
    """Bring the schema to the latest Alembic revision (idempotent).

    A database created before migrations existed (its tables there, no
    ``alembic_version``) is stamped with the first revision, which is exactly
    those tables, and upgraded from there. Processes started together
    (executor, bridge, CLI) may all call this at once; a transaction-scoped
    advisory lock makes them take turns instead of colliding in PostgreSQL's
    catalog.
    """
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as connection:
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        config.attributes["connection"] = connection
        tables = set(inspect(connection).get_table_names())
        if "workflow_runs" in tables and "alembic_version" not in tables:
            # Columns the last pre-Alembic versions added by hand, so that the stamp is true.
            connection.execute(text("ALTER TABLE workflow_runs ADD COLUMN IF NOT EXISTS state JSONB"))
            command.stamp(config, _FIRST_REVISION)
        command.upgrade(config, "head")


class StepRecord(BaseModel):
    """One attempt of one execution (step, iteration, item), as recorded."""

    model_config = ConfigDict(from_attributes=True, frozen=True)

    run_id: str
    step_id: str
    iteration: int = 1
    item: int | None = None
    attempt: int
    agent_name: str
    status: str
    input_data: JsonValue = None
    output_data: JsonValue = None
    error: JsonValue = None
    correlation_id: str
    started_at: datetime | None = None
    deadline: datetime | None = None
    completed_at: datetime | None = None
    exchanges: JsonValue = Field(
        None, description="Its questions and answers (Attempt.exchanges as JSON); None when it asked none."
    )
    task_id: str | None = Field(None, description="The agent's A2A task, once it asked a question.")


class RunRecord(BaseModel):
    """One run, as recorded; ``steps`` is filled when asked for."""

    model_config = ConfigDict(from_attributes=True, frozen=True)

    run_id: str
    workflow_id: str
    workflow_version: str
    status: str
    input: JsonValue = None
    output: JsonValue = None
    error: JsonValue = None
    plan: JsonValue = None
    state: JsonValue = Field(None, exclude=True, repr=False)
    version: int
    waiting: int = Field(0, description="How many executions wait for a person (RunState.waiting).")
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    updated_at: datetime
    steps: tuple[StepRecord, ...] = ()

    def submission_fingerprint(self) -> str | None:
        """The fingerprint of the submission that started the run (see :func:`models.messages.submission_fingerprint`).

        None for a submission that was refused: it is recorded without a state,
        and no submission can be "the same" as one that never ran.
        """
        if not isinstance(self.state, dict):
            return None
        stored = self.state.get("fingerprint")
        if isinstance(stored, str):
            return stored
        try:  # a snapshot from before fingerprints were kept
            state = RunState.model_validate(self.state)
        except ValueError:
            return None
        return submission_fingerprint(state.plan, state.input)


def _to_record(run: WorkflowRun, *, with_steps: bool) -> RunRecord:
    record = RunRecord.model_validate({c.key: getattr(run, c.key) for c in WorkflowRun.__table__.columns})
    if with_steps:
        steps = tuple(StepRecord.model_validate(s) for s in run.steps)
        record = record.model_copy(update={"steps": steps})
    return record


_STATUS_OF_RUN = select(WorkflowRun.status).where(WorkflowRun.run_id == bindparam("run_id"))


def _executions_of(session: Session, run_id: str) -> dict[str, Any]:
    rows = session.execute(select(RunExecution.execution_key, RunExecution.record).where(RunExecution.run_id == run_id))
    return {str(key): record for key, record in rows}


class _Repository:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def _begin(self) -> AbstractContextManager[Session]:
        return self._sessions.begin()


class WorkflowRepository(_Repository):
    """Runs: read, list, and record a submission refused before it ran.

    Runs are written by the checkpointer's snapshot upsert
    (:func:`upsert_snapshots`), the one write path that checks versions.
    """

    def get_run(self, run_id: str, *, with_steps: bool = True) -> RunRecord | None:
        """A run and (by default) every attempt of its steps, or None."""
        with self._begin() as session:
            query = select(WorkflowRun).where(WorkflowRun.run_id == run_id)
            if with_steps:
                query = query.options(selectinload(WorkflowRun.steps))
            run = session.scalars(query).one_or_none()
            if run is None:
                return None
            record = _to_record(run, with_steps=with_steps)
            state = record.state
            if with_steps and isinstance(state, dict) and isinstance(state.get("executions"), list):
                # The whole state, for the views: the executions are in their own rows.
                whole = whole_state(state, _executions_of(session, run_id), record.plan, record.input)
                record = record.model_copy(update={"state": whole})
            return record

    def list_runs(
        self,
        *,
        status: RunStatus | Sequence[RunStatus] | None = None,
        workflow_id: str | None = None,
        waiting: bool = False,
        limit: int = 50,
        offset: int = 0,
    ) -> list[RunRecord]:
        """Recent runs first, optionally filtered by status and workflow.

        Args:
            status: Only runs in this status (or one of these).
            workflow_id: Only runs of this workflow.
            waiting: Only the RUNNING runs that wait for a person (``waiting > 0``), with the other filters too.
            limit: At most this many (capped at 1,000).
            offset: Skip this many first.
        """
        query = select(WorkflowRun).order_by(WorkflowRun.created_at.desc(), WorkflowRun.run_id)
        if status is not None:
            statuses = [status] if isinstance(status, RunStatus) else list(status)
            query = query.where(WorkflowRun.status.in_([str(s) for s in statuses]))
        if waiting:
            # "waiting > 0" written out (not a parameter): the predicate of ix_workflow_runs_waiting_created_at.
            waits = WorkflowRun.waiting > literal_column("0")
            query = query.where(WorkflowRun.status == str(RunStatus.RUNNING), waits)
        if workflow_id is not None:
            query = query.where(WorkflowRun.workflow_id == workflow_id)
        query = query.limit(max(0, min(limit, 1000))).offset(max(0, offset))
        with self._begin() as session:
            return [_to_record(run, with_steps=False) for run in session.scalars(query)]

    def get_state(self, run_id: str) -> RunState | None:
        """The run's last snapshot as a state, or None (unknown run, or recorded without one)."""
        with self._begin() as session:
            row = session.execute(
                select(WorkflowRun.state, WorkflowRun.plan, WorkflowRun.input).where(WorkflowRun.run_id == run_id)
            ).one_or_none()
            if row is None or row.state is None:
                return None
            return state_of(row.state, _executions_of(session, run_id), row.plan, row.input)

    def exists(self, run_id: str) -> str | None:
        """The recorded status of a run, or None when there is no such run."""
        # Asked for every new submission: a Core statement, without an ORM session.
        with self._engine.connect() as connection:
            return connection.scalar(_STATUS_OF_RUN, {"run_id": run_id})

    def versions(self, run_ids: Iterable[str], *, page: int = 2000) -> dict[str, int]:
        """The recorded ``version`` of each of these runs that PostgreSQL has (absent: not recorded)."""
        wanted = sorted(set(run_ids))
        found: dict[str, int] = {}
        with self._begin() as session:
            for start in range(0, len(wanted), page):
                chunk = wanted[start : start + page]
                rows = session.execute(
                    select(WorkflowRun.run_id, WorkflowRun.version).where(WorkflowRun.run_id.in_(chunk))
                )
                found.update({run_id: int(version) for run_id, version in rows})
        return found

    def running_ids(self, *, after: str = "", limit: int = 1000) -> list[str]:
        """Ids of RUNNING runs, by run_id, a page at a time (``after`` the last id seen)."""
        query = (
            select(WorkflowRun.run_id)
            .where(WorkflowRun.status == str(RunStatus.RUNNING), WorkflowRun.run_id > after)
            .order_by(WorkflowRun.run_id)
            .limit(limit)
        )
        with self._begin() as session:
            return list(session.scalars(query))

    def record_rejected(
        self, run_id: str, *, kind: str, message: str, details: Any = None, plan: Any = None, at: datetime | None = None
    ) -> bool:
        """Record a submission that could not start as a FAILED run, so a user can see why.

        Returns:
            False when the run_id is already recorded (then nothing changes).
        """
        now = at or utcnow()
        plan_data = storable(plan) if isinstance(plan, dict) else {}
        message, details = storable(message), storable(details)
        values = {
            "run_id": run_id,
            "workflow_id": str(plan_data.get("workflow_id", ""))[:200],
            "workflow_version": str(plan_data.get("version", ""))[:50],
            "status": str(RunStatus.FAILED),
            "input": {},
            "plan": plan_data,
            "error": {"kind": kind, "message": message, "details": details},
            "version": 0,
            "created_at": now,
            "completed_at": now,
            "updated_at": now,
        }
        with self._begin() as session:
            result = session.execute(
                insert(WorkflowRun).values(values).on_conflict_do_nothing(index_elements=["run_id"])
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]


_ESCAPED_NUL: Final = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
r"""A NUL character escaped in JSON text (``\u0000`` after an even run of backslashes, not an escaped backslash)."""


def postgresql_json(value: Any) -> str:
    r"""JSON text for a JSONB column, with every NUL character (which JSONB refuses) as U+FFFD.

    The engine's serializer: one NUL in a run's input or an agent's output
    must not stop the record of that run, or of the others in its batch. It
    works on the JSON text, where a NUL can only be the escape ``\u0000``:
    rewriting the escapes costs nothing when there are none, where walking
    every value of every row (what :func:`storable` does) took about 4 % of
    the executor's CPU under load (py-spy, bench W1).
    """
    text = json.dumps(value)
    return _ESCAPED_NUL.sub(r"\1\\ufffd", text) if "\\u0000" in text else text


def storable(value: Any) -> Any:
    """JSON that PostgreSQL can store: NUL characters become U+FFFD.

    JSONB and text columns refuse NUL; one such character in a run's input or
    an agent's output must not stop the record of that run, or of the others
    written in the same batch.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A run state to record, and the executions changed since the last one (None: all of them)."""

    state: RunState
    changed: frozenset[str] | None = None

    def merged(self, other: Snapshot) -> Snapshot:
        """The newer state of the two, with the changes of both (rows to write for either)."""
        newer = self.state if self.state.version >= other.state.version else other.state
        if self.changed is None or other.changed is None:
            return Snapshot(newer, None)
        return Snapshot(newer, self.changed | other.changed)


def snapshot_rows(
    state: RunState, changed: frozenset[str] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows that record a run state: its run row, and for each execution in ``changed`` its row and attempts.

    The run row's ``state`` is the run without its executions (their keys,
    in order: :func:`state_of`); each execution has its own row. With
    ``changed`` (a later snapshot of a recorded run), only the executions
    that changed are written: the cost of a checkpoint follows the change,
    not the run's length. The run row counts the executions that wait for a
    person (``waiting``); an attempt row holds its questions and answers
    (``exchanges``, None when it asked none) and its agent's A2A task.

    Returns:
        The run row, the execution rows and the attempt rows.
    """
    dump = state.model_dump(mode="json", exclude={"executions", "plan", "input"})
    run_row = {
        "run_id": state.run_id,
        "workflow_id": state.plan.workflow_id,
        "workflow_version": state.plan.version,
        "status": str(state.status),
        "input": state.input,
        "output": dump["output"],
        "error": dump["error"],
        "plan": _plan_json(state.plan),
        # The plan and the input are in their own columns (state_of puts them back).
        "state": {**dump, **_execution_keys(state)},
        "version": state.version,
        "waiting": state.waiting,
        "created_at": state.created_at,
        "started_at": state.started_at,
        "completed_at": state.completed_at,
        "updated_at": state.updated_at,
    }
    step_rows = []
    execution_rows = []
    # Only the changed ones are looked at (a map of 1,000 items changes one or two per event), in key order.
    keys = state.executions if changed is None else sorted(k for k in changed if k in state.executions)
    for key in keys:
        execution = state.executions[key]
        execution_rows.append(
            {
                "run_id": state.run_id,
                "execution_key": key,
                "record": execution.model_dump(mode="json"),
                "run_version": state.version,
            }
        )
        for attempt in execution.attempts:
            attempt_dump = attempt.model_dump(mode="json", include={"input", "output", "error", "exchanges"})
            step_rows.append(
                {
                    "run_id": state.run_id,
                    "step_id": execution.step_id,
                    "iteration": execution.iteration,
                    "item": execution.item,
                    "attempt": attempt.number,
                    "agent_name": attempt.agent_name,
                    "status": str(attempt.status),
                    "input_data": attempt_dump["input"],
                    "output_data": attempt_dump["output"],
                    "error": attempt_dump["error"],
                    "correlation_id": attempt.correlation_id,
                    "run_version": state.version,
                    "started_at": attempt.dispatch_at,
                    "deadline": attempt.deadline,
                    "completed_at": attempt.finished_at,
                    "exchanges": attempt_dump["exchanges"] or None,
                    "task_id": attempt.task_id,
                }
            )
    return run_row, execution_rows, step_rows


@functools.cache
def _run_upsert(columns: tuple[str, ...], *, partial: bool = False) -> Executable:
    """The upsert of run rows with these columns: a newer ``version`` wins.

    A ``partial`` one (a later snapshot) inserts every column but leaves the
    plan and the input of a recorded run alone: a change never alters them.
    """
    runs = cast(Table, WorkflowRun.__table__)
    statement = insert(runs)
    kept = {"run_id", "created_at"} | ({"plan", "input"} if partial else set())
    return statement.on_conflict_do_update(
        index_elements=["run_id"],
        set_={k: statement.excluded[k] for k in columns if k not in kept},
        where=runs.c.version < statement.excluded.version,
    )


@functools.cache
def _step_upsert(columns: tuple[str, ...]) -> Executable:
    """The upsert of attempt rows with these columns: a newer ``run_version`` wins."""
    steps = cast(Table, StepExecution.__table__)
    statement = insert(steps)
    # The correlation id names the attempt of one execution (step, iteration, item) of one run.
    key = {"run_id", "step_id", "iteration", "item", "attempt", "correlation_id"}
    return statement.on_conflict_do_update(
        index_elements=["correlation_id"],
        set_={k: statement.excluded[k] for k in columns if k not in key},
        where=steps.c.run_version < statement.excluded.run_version,
    )


def _execution_upsert() -> Executable:
    executions = cast(Table, RunExecution.__table__)
    statement = insert(executions)
    return statement.on_conflict_do_update(
        index_elements=["run_id", "execution_key"],
        set_={"record": statement.excluded.record, "run_version": statement.excluded.run_version},
        where=executions.c.run_version < statement.excluded.run_version,
    )


_EXECUTION_UPSERT: Final = _execution_upsert()


def _execution_keys(state: RunState) -> dict[str, Any]:
    """How the ``state`` column names a run's executions: their keys, a map's items by their counts.

    A map of 1,000 items would otherwise write 1,000 keys at every checkpoint.
    The counts are used only when they name exactly the executions the run
    has (a reduced state may have given some up): else every key is listed.
    """
    counts = map_item_counts(state)
    plain = [k for k, e in state.executions.items() if e.item is None]
    if len(plain) + sum(sum(c) for c in counts.values()) == len(state.executions):
        return {"executions": plain, "map_items": counts}
    return {"executions": list(state.executions)}


def execution_keys_of(raw: Mapping[str, Any]) -> list[str]:
    """The keys of the executions a ``state`` column names (:func:`_execution_keys`), in order."""
    return [*(str(k) for k in raw.get("executions") or ()), *map_item_keys(raw.get("map_items") or {})]


def _plan_json(plan: WorkflowPlan) -> Any:
    """A plan as JSON, made once per plan: every snapshot of a run shares its plan object."""
    kept = _PLAN_JSON.get(id(plan))
    if kept is not None and kept[0] is plan:
        return kept[1]
    data = plan.model_dump(mode="json")
    with _PLAN_JSON_LOCK:  # checkpointers of several apps in one process (tests) share it
        if len(_PLAN_JSON) >= _PLAN_JSON_SIZE:
            del _PLAN_JSON[next(iter(_PLAN_JSON))]
        _PLAN_JSON[id(plan)] = (plan, data)  # the plan is kept alive with its id: the id cannot be reused meanwhile
    return data


_PLAN_JSON: dict[int, tuple[WorkflowPlan, Any]] = {}
_PLAN_JSON_LOCK: Final = threading.Lock()
_PLAN_JSON_SIZE: Final = 256
"""Plans kept dumped: a checkpoint batch of runs in flight, not every run (a plan may be up to a megabyte)."""


def state_of(raw: Any, executions: Mapping[str, Any], plan: Any = None, run_input: Any = None) -> RunState:
    """A run state from its ``state`` column and its ``run_executions`` records (by key).

    The state column leaves out the plan and the input, which have their own
    columns (``plan`` and ``input``, given here). A ``state`` written before executions
    had their own rows holds them itself, and its plan and input, and is read
    as it is.

    Raises:
        ValueError: The state cannot be read, or names an execution that has no row.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("executions"), list):
        return RunState.model_validate(raw)
    missing = [key for key in execution_keys_of(raw) if key not in executions]
    if missing:
        raise ValueError(f"the run's state names execution(s) with no record: {', '.join(missing[:5])}")
    return RunState.model_validate(whole_state(raw, executions, plan, run_input))


def whole_state(raw: Mapping[str, Any], executions: Mapping[str, Any], plan: Any, run_input: Any) -> dict[str, Any]:
    """A ``state`` column made whole again, as JSON: its plan, its input and its executions put back.

    An execution without a row is None (:func:`state_of` refuses such a state first).
    """
    stored = {k: v for k, v in raw.items() if k != "map_items"}
    keys = execution_keys_of(raw)
    return {"plan": plan, "input": run_input, **stored, "executions": {k: executions.get(k) for k in keys}}


def upsert_snapshots(session: Session, states: Iterable[RunState | Snapshot]) -> int:
    """Write run snapshots and their attempts inside the caller's transaction.

    Idempotent: writing the same snapshot again changes nothing, and a
    snapshot older (lower ``version``) than the recorded one is skipped,
    whatever order batches arrive in; PostgreSQL re-checks the version under
    the row lock, so concurrent writers end with the newest. Rows are written
    in key order so that concurrent batches do not deadlock.

    Returns:
        How many distinct runs were in the batch.
    """
    newest: dict[str, Snapshot] = {}
    for item in states:
        snapshot = item if isinstance(item, Snapshot) else Snapshot(item)
        kept = newest.get(snapshot.state.run_id)
        newest[snapshot.state.run_id] = snapshot if kept is None else kept.merged(snapshot)
    if not newest:
        return 0
    full_rows: list[dict[str, Any]] = []
    partial_rows: list[dict[str, Any]] = []
    execution_rows: list[dict[str, Any]] = []
    step_rows: list[dict[str, Any]] = []
    for run_id in sorted(newest):
        snapshot = newest[run_id]
        run_row, executions, rows = snapshot_rows(snapshot.state, snapshot.changed)
        (full_rows if snapshot.changed is None else partial_rows).append(run_row)
        execution_rows.extend(executions)
        step_rows.extend(rows)
    step_rows.sort(key=lambda r: r["correlation_id"])

    # Core statements on the session's connection: the ORM's bulk insert
    # machinery cost as much CPU as the rest of the executor's step together.
    connection = session.connection()
    for run_rows, partial in ((full_rows, False), (partial_rows, True)):
        if run_rows:
            connection.execute(_run_upsert(tuple(run_rows[0]), partial=partial), run_rows)
    if execution_rows:
        connection.execute(_EXECUTION_UPSERT, execution_rows)
    if step_rows:
        connection.execute(_step_upsert(tuple(step_rows[0])), step_rows)
    return len(newest)


class SnapshotRepository(_Repository):
    """Bulk, idempotent writes of run snapshots (for the checkpointer)."""

    def upsert(self, states: Iterable[RunState | Snapshot]) -> int:
        """Write many run snapshots in one transaction; see :func:`upsert_snapshots`."""
        with self._begin() as session:
            return upsert_snapshots(session, states)
