"""The schema before Alembic: runs, one row per attempt of a step, and the agent registry.

Databases created before migrations existed are stamped with this revision
(their tables are exactly these), then upgraded like any other.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the three tables as the single-chain version had them."""
    op.create_table(
        "workflow_runs",
        sa.Column("run_id", sa.String(128), primary_key=True),
        sa.Column("workflow_id", sa.String(200), nullable=False),
        sa.Column("workflow_version", sa.String(50), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("input", JSONB, nullable=False),
        sa.Column("output", JSONB),
        sa.Column("error", JSONB),
        sa.Column("plan", JSONB, nullable=False),
        sa.Column("state", JSONB),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name="pk_workflow_runs"),
    )
    op.create_index("ix_workflow_runs_status_created_at", "workflow_runs", ["status", "created_at"])
    op.create_index("ix_workflow_runs_workflow_id", "workflow_runs", ["workflow_id"])
    op.create_table(
        "step_executions",
        sa.Column("id", sa.BigInteger, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("step_id", sa.String(128), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("agent_name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("input_data", JSONB),
        sa.Column("output_data", JSONB),
        sa.Column("error", JSONB),
        sa.Column("correlation_id", sa.Text, nullable=False),
        sa.Column("run_version", sa.BigInteger, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("deadline", sa.DateTime(timezone=True)),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("id", name="pk_step_executions"),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["workflow_runs.run_id"],
            name="fk_step_executions_run_id_workflow_runs",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("correlation_id", name="uq_step_executions_correlation_id"),
        sa.UniqueConstraint("run_id", "step_id", "attempt", name="uq_step_executions_run_id_step_id_attempt"),
    )
    op.create_index("ix_step_executions_run_id", "step_executions", ["run_id"])
    op.create_table(
        "agents",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("entry", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_agents"),
    )


def downgrade() -> None:
    """Drop everything."""
    op.drop_table("agents")
    op.drop_table("step_executions")
    op.drop_table("workflow_runs")
