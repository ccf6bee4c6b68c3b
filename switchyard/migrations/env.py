"""Alembic's environment: migrations run on the connection :func:`switchyard.db.create_schema` hands over."""

from __future__ import annotations

from alembic import context

from models.records import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
