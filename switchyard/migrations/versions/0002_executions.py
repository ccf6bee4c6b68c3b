"""Executions: an attempt row names its step's loop iteration and map item.

The old key (run, step, attempt) cannot tell two iterations of a loop or two
items of a map apart; the new one is (run, step, iteration, item, attempt),
with a null item outside maps counted as one value. Existing rows are
iteration 1, no item, which is what they were.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``iteration`` and ``item``, and key attempts by them."""
    op.add_column("step_executions", sa.Column("iteration", sa.Integer, nullable=False, server_default="1"))
    op.add_column("step_executions", sa.Column("item", sa.Integer, nullable=True))
    op.drop_constraint("uq_step_executions_run_id_step_id_attempt", "step_executions", type_="unique")
    op.create_unique_constraint(
        "uq_step_executions_run_id_step_id_iteration_item_attempt",
        "step_executions",
        ["run_id", "step_id", "iteration", "item", "attempt"],
        postgresql_nulls_not_distinct=True,
    )


def downgrade() -> None:
    """Back to one row per (run, step, attempt): only possible while no run used loops or maps."""
    op.drop_constraint("uq_step_executions_run_id_step_id_iteration_item_attempt", "step_executions", type_="unique")
    op.create_unique_constraint(
        "uq_step_executions_run_id_step_id_attempt", "step_executions", ["run_id", "step_id", "attempt"]
    )
    op.drop_column("step_executions", "item")
    op.drop_column("step_executions", "iteration")
