"""The PostgreSQL record: SQLAlchemy 2.0 typed ORM tables (PostgreSQL only).

``workflow_runs`` has one row per run; ``step_executions`` one row per attempt
of an execution of a step, identified by the step, its loop iteration, its
map item (null outside maps) and the attempt number. Both carry the run
state's ``version`` so that a snapshot written late (a retried batch, a slow
checkpointer) never overwrites a newer one.

A run counts the executions that wait for a person (``waiting``); an
attempt keeps the questions it asked and their answers (``exchanges``) and
the agent's A2A task (``task_id``).

The schema is created and changed by Alembic (``switchyard/migrations``);
these classes must match its latest revision.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["AgentRecord", "Base", "RunExecution", "StepExecution", "WorkflowRun"]

# Stable constraint names, so migrations and error messages can refer to them.
_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of Switchyard's tables."""

    metadata = MetaData(naming_convention=_NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: DateTime(timezone=True)}


class WorkflowRun(Base):
    """One run of a workflow plan."""

    __tablename__ = "workflow_runs"

    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    workflow_id: Mapped[str] = mapped_column(String(200))
    workflow_version: Mapped[str] = mapped_column(String(50))
    status: Mapped[str] = mapped_column(String(20))
    input: Mapped[Any] = mapped_column(JSONB, default=dict)
    output: Mapped[Any | None] = mapped_column(JSONB, nullable=True)
    error: Mapped[Any | None] = mapped_column(JSONB, nullable=True)
    plan: Mapped[Any] = mapped_column(JSONB)
    state: Mapped[Any | None] = mapped_column(
        JSONB, nullable=True, doc="The whole RunState of the last snapshot: what a lost run is rebuilt from."
    )
    version: Mapped[int] = mapped_column(BigInteger, default=0, doc="RunState.version of the last snapshot written.")
    waiting: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", doc="RunState.waiting: how many executions wait for a person."
    )
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())

    steps: Mapped[list[StepExecution]] = relationship(
        back_populates="run",
        order_by="(StepExecution.started_at, StepExecution.id)",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    __table_args__ = (
        Index("ix_workflow_runs_status_created_at", "status", "created_at"),
        Index("ix_workflow_runs_workflow_id", "workflow_id"),
        # The runs that wait for a person (GET /runs/?status=WAITING), newest first: a few among many.
        Index("ix_workflow_runs_waiting_created_at", "created_at", postgresql_where=text("waiting > 0")),
    )


class StepExecution(Base):
    """One attempt of one execution (step, iteration, item) of a run."""

    __tablename__ = "step_executions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("workflow_runs.run_id", ondelete="CASCADE"))
    step_id: Mapped[str] = mapped_column(String(128))
    iteration: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    item: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="The map item (null outside maps).")
    attempt: Mapped[int] = mapped_column(Integer)
    agent_name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    input_data: Mapped[Any | None] = mapped_column(JSONB, nullable=True)
    output_data: Mapped[Any | None] = mapped_column(JSONB, nullable=True)
    error: Mapped[Any | None] = mapped_column(JSONB, nullable=True)
    correlation_id: Mapped[str] = mapped_column(Text, unique=True)
    exchanges: Mapped[Any | None] = mapped_column(
        JSONB(none_as_null=True),  # SQL NULL, not JSON null, for an attempt that asked nothing
        nullable=True,
        doc="Attempt.exchanges: the questions asked and their answers (NULL when none).",
    )
    task_id: Mapped[str | None] = mapped_column(Text, nullable=True, doc="The agent's A2A task, once it asked.")
    run_version: Mapped[int] = mapped_column(BigInteger, default=0, doc="RunState.version this row was written from.")
    started_at: Mapped[datetime | None]
    deadline: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]

    run: Mapped[WorkflowRun] = relationship(back_populates="steps")

    __table_args__ = (
        UniqueConstraint("run_id", "step_id", "iteration", "item", "attempt", postgresql_nulls_not_distinct=True),
        Index("ix_step_executions_run_id", "run_id"),
    )


class RunExecution(Base):
    """One execution (step, iteration, item) of a run, whole: what a run lost by the executor is rebuilt from.

    ``workflow_runs.state`` holds the run without its executions (their keys,
    in order); each execution is here, written when it changes.
    """

    __tablename__ = "run_executions"

    run_id: Mapped[str] = mapped_column(ForeignKey("workflow_runs.run_id", ondelete="CASCADE"), primary_key=True)
    execution_key: Mapped[str] = mapped_column(String(300), primary_key=True)
    record: Mapped[Any] = mapped_column(JSONB)
    run_version: Mapped[int] = mapped_column(BigInteger, doc="RunState.version this row was written from.")


class AgentRecord(Base):
    """One agent of the built-in registry; ``entry`` is an :class:`models.agents.AgentEntry` as JSON."""

    __tablename__ = "agents"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    entry: Mapped[Any] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
