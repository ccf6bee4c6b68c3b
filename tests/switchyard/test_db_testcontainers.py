"""The repositories on a PostgreSQL container, where a Docker engine answers.

The default suite uses the embedded server (see conftest); this module is the
testcontainers path, for machines with Docker. Without an engine it skips and
says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine

from models.plan import load_plan
from models.run import RunStatus, RunSubmitted, transition
from switchyard.db import SnapshotRepository, WorkflowRepository, create_schema, make_engine

pytestmark = pytest.mark.postgres


def _docker_problem() -> str | None:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
    except Exception as error:
        return f"no Docker engine answers ({type(error).__name__}: {str(error)[:120]})"
    return None


@pytest.fixture(scope="module")
def container_engine() -> Iterator[Engine]:
    problem = _docker_problem()
    if problem:
        pytest.skip(f"testcontainers path skipped: {problem}; the embedded PostgreSQL covers these tests")
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:17-alpine", driver="psycopg2") as container:
        engine = make_engine(container.get_connection_url())
        create_schema(engine)
        yield engine
        engine.dispose()


def test_snapshot_round_trip_on_a_container(container_engine: Engine) -> None:
    plan = load_plan(
        {
            "workflow_id": "w",
            "name": "n",
            "version": "1",
            "start_step": "a",
            "steps": {"a": {"id": "a", "agent_name": "agent", "next_step": None}},
        }
    )
    state, _ = transition(None, RunSubmitted(run_id="tc-run", plan=plan, input={}, at=datetime.now(UTC)))
    assert state is not None
    SnapshotRepository(container_engine).upsert([state])
    record = WorkflowRepository(container_engine).get_run("tc-run")
    assert record is not None
    assert record.status == RunStatus.RUNNING
    assert [s.correlation_id for s in record.steps] == ["tc-run/a/1"]
