"""A person in the loop: runs count what waits for an answer, attempts keep their questions and answers.

An attempt whose agent asked a question (A2A ``INPUT_REQUIRED``), or an
approval step's attempt, waits for a person. ``workflow_runs.waiting`` is
how many executions of the run wait so (``RunState.waiting``), with a
partial index on the few runs that do, for ``GET /runs/?status=WAITING``.
``step_executions.exchanges`` holds an attempt's questions and answers
(``Attempt.exchanges`` as JSON, null when it asked none) and ``task_id`` the
agent's A2A task. Existing rows wait for nobody and asked nothing, which is
what they were.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``workflow_runs.waiting`` (and its index), ``step_executions.exchanges`` and ``task_id``."""
    op.add_column("workflow_runs", sa.Column("waiting", sa.Integer, nullable=False, server_default="0"))
    op.create_index(
        "ix_workflow_runs_waiting_created_at",
        "workflow_runs",
        ["created_at"],
        postgresql_where=sa.text("waiting > 0"),
    )
    op.add_column("step_executions", sa.Column("exchanges", JSONB, nullable=True))
    op.add_column("step_executions", sa.Column("task_id", sa.Text, nullable=True))


def downgrade() -> None:
    """Drop them: the questions and answers stay in each execution's record (``run_executions``)."""
    op.drop_column("step_executions", "task_id")
    op.drop_column("step_executions", "exchanges")
    op.drop_index("ix_workflow_runs_waiting_created_at", table_name="workflow_runs")
    op.drop_column("workflow_runs", "waiting")
