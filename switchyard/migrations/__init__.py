"""Alembic migrations of the PostgreSQL record (see switchyard/db.py create_schema)."""
