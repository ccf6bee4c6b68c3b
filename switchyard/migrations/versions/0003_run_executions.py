"""Executions of a run in their own rows: a checkpoint writes what changed, not the whole run.

Until now ``workflow_runs.state`` held the whole run state, every execution
included, and every checkpoint rewrote it: a long run's checkpoints grew with
its length. From this revision ``state`` holds the run without its
executions (their keys, in order) and ``run_executions`` one row per
execution, written when it changes. States written before stay readable as
they are (whole).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``run_executions``."""
    op.create_table(
        "run_executions",
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("execution_key", sa.String(300), nullable=False),
        sa.Column("record", JSONB, nullable=False),
        sa.Column("run_version", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "execution_key", name="pk_run_executions"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["workflow_runs.run_id"], name="fk_run_executions_run_id_workflow_runs", ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    """Drop ``run_executions`` (runs checkpointed since cannot be rebuilt from ``state`` alone)."""
    op.drop_table("run_executions")
