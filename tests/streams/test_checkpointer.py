"""The checkpointer on a real PostgreSQL server: batching, newest-wins, surviving outages, the flush loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from pydantic import JsonValue
from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

from models.messages import AgentResult, ResultStatus
from models.plan import WorkflowPlan, load_plan
from models.run import AgentResultReceived, RunState, RunStatus, RunSubmitted, transition
from streams.checkpointer import Checkpointer
from switchyard.database import Database
from switchyard.db import WorkflowRepository, make_engine

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


class StandInDatabase:
    """What the checkpointer uses of :class:`switchyard.database.Database`: its ``engine``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine


def _plan() -> WorkflowPlan:
    return load_plan(
        {
            "workflow_id": "two-steps",
            "name": "Two steps",
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
                    "next_step": None,
                },
            },
        }
    )


def _history(run_id: str) -> list[RunState]:
    """Every state of one run: submitted (v1), research done (v2), summarize done (v3, COMPLETED)."""
    state, _ = transition(None, RunSubmitted(run_id=run_id, plan=_plan(), input={"topic": "kafka"}, at=T0))
    assert state is not None
    states = [state]
    outputs: list[tuple[str, JsonValue]] = [("research", {"notes": "streams"}), ("summarize", {"summary": "short"})]
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
        states.append(state)
    assert [s.version for s in states] == [1, 2, 3]
    assert states[-1].status is RunStatus.COMPLETED
    return states


def _run_id() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def repo(engine: Engine) -> WorkflowRepository:
    return WorkflowRepository(engine)


@pytest.fixture(scope="module")
def bad_engine(database_url: str) -> Iterator[Engine]:
    """An engine for a database that does not exist on the same server: every connection fails."""
    url = make_url(database_url).set(database="switchyard_no_such_database")
    eng = make_engine(url.render_as_string(hide_password=False))
    try:
        yield eng
    finally:
        eng.dispose()


def _checkpointer(
    db: StandInDatabase, *, interval_s: float = 0.2, batch_size: int = 500, max_backoff_s: float = 10.0
) -> Checkpointer:
    return Checkpointer(cast(Database, db), interval_s=interval_s, batch_size=batch_size, max_backoff_s=max_backoff_s)


@pytest.fixture
async def started() -> AsyncIterator[list[Checkpointer]]:
    """Checkpointers a test starts are stopped at its end (even when it fails)."""
    services: list[Checkpointer] = []
    yield services
    for service in services:
        if not service.should_stop:
            await service.stop()


async def _until(condition: Callable[[], bool], within_s: float = 5.0, step_s: float = 0.01) -> float:
    """Poll (bounded) until ``condition`` holds; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not condition():
        assert loop.time() - start < within_s, "condition not reached in time"
        await asyncio.sleep(step_s)
    return loop.time() - start


def _version(repo: WorkflowRepository, run_id: str) -> int | None:
    record = repo.get_run(run_id, with_steps=False)
    return None if record is None else record.version


# ------------------------------------------------------------------ put and flush


async def test_put_keeps_only_the_newest_version(engine: Engine, repo: WorkflowRepository) -> None:
    checkpointer = _checkpointer(StandInDatabase(engine))
    run_id = _run_id()
    v1, v2, v3 = _history(run_id)
    checkpointer.put(v1)
    checkpointer.put(v3)
    checkpointer.put(v2)  # late, older: ignored
    checkpointer.put(v3)  # the same again: harmless
    assert checkpointer.backlog == 1

    assert await checkpointer.flush() == 1
    record = repo.get_run(run_id)
    assert record is not None
    assert record.version == 3
    assert record.status == str(RunStatus.COMPLETED)
    assert record.output is not None
    assert {s.step_id for s in record.steps} == {"research", "summarize"}


async def test_flush_writes_every_pending_run(engine: Engine, repo: WorkflowRepository) -> None:
    checkpointer = _checkpointer(StandInDatabase(engine))
    histories = {run_id: _history(run_id) for run_id in (_run_id() for _ in range(5))}
    for states in histories.values():
        checkpointer.put(states[1])
    assert checkpointer.backlog == 5
    assert checkpointer.written == 0

    assert await checkpointer.flush() == 5
    assert checkpointer.backlog == 0
    assert checkpointer.written == 5
    assert checkpointer.failures == 0
    assert checkpointer.last_error is None
    for run_id in histories:
        record = repo.get_run(run_id)
        assert record is not None
        assert record.version == 2
        assert record.status == str(RunStatus.RUNNING)
        assert record.input == {"topic": "kafka"}

    # Later snapshots update the same rows.
    for states in histories.values():
        checkpointer.put(states[2])
    assert await checkpointer.flush() == 5
    assert checkpointer.written == 10
    assert all(_version(repo, run_id) == 3 for run_id in histories)


async def test_flush_with_nothing_pending(engine: Engine) -> None:
    checkpointer = _checkpointer(StandInDatabase(engine))
    assert await checkpointer.flush() == 0
    assert checkpointer.written == 0


async def test_an_older_snapshot_never_replaces_a_written_newer_one(engine: Engine, repo: WorkflowRepository) -> None:
    # E.g. a changelog replay after a restart hands the checkpointer states it already wrote.
    checkpointer = _checkpointer(StandInDatabase(engine))
    run_id = _run_id()
    v1, _, v3 = _history(run_id)
    checkpointer.put(v3)
    await checkpointer.flush()
    checkpointer.put(v1)
    await checkpointer.flush()
    assert _version(repo, run_id) == 3


# ------------------------------------------------------------------ failures


async def test_a_failed_flush_keeps_the_batch_until_the_database_is_back(
    engine: Engine, bad_engine: Engine, repo: WorkflowRepository
) -> None:
    db = StandInDatabase(bad_engine)
    checkpointer = _checkpointer(db)
    run_id = _run_id()
    _, v2, _ = _history(run_id)
    checkpointer.put(v2)

    for failures in (1, 2):
        with pytest.raises(Exception, match="switchyard_no_such_database"):
            await checkpointer.flush()
        assert checkpointer.failures == failures
        assert checkpointer.backlog == 1
        assert checkpointer.written == 0
        assert checkpointer.last_error is not None
        assert checkpointer.last_error.startswith("OperationalError: ")
        assert "\n" not in checkpointer.last_error
    assert _version(repo, run_id) is None

    db.engine = engine  # the database is back
    assert await checkpointer.flush() == 1
    assert checkpointer.backlog == 0
    assert checkpointer.written == 1
    assert checkpointer.failures == 2  # a running total
    assert checkpointer.last_error is None
    assert _version(repo, run_id) == 2


async def _flush_failing_while(checkpointer: Checkpointer, meanwhile: Callable[[], None]) -> None:
    """Start a flush that fails, run ``meanwhile`` while its batch is out, then let it fail."""
    flushing = asyncio.create_task(checkpointer.flush())
    await _until(lambda: checkpointer.backlog == 0, step_s=0)  # the batch has been taken
    meanwhile()
    with pytest.raises(Exception, match="switchyard_no_such_database"):
        await flushing


async def test_a_failed_batch_does_not_replace_a_newer_snapshot_put_meanwhile(
    engine: Engine, bad_engine: Engine, repo: WorkflowRepository
) -> None:
    db = StandInDatabase(bad_engine)
    checkpointer = _checkpointer(db)
    run_id, other = _run_id(), _run_id()
    _, v2, v3 = _history(run_id)
    other_v1 = _history(other)[0]
    checkpointer.put(v2)

    def put_newer() -> None:
        checkpointer.put(v3)
        checkpointer.put(other_v1)

    await _flush_failing_while(checkpointer, put_newer)
    assert checkpointer.backlog == 2

    db.engine = engine
    assert await checkpointer.flush() == 2
    assert _version(repo, run_id) == 3  # not the failed batch's v2
    assert _version(repo, other) == 1


async def test_a_failed_batch_wins_over_an_older_snapshot_put_meanwhile(
    engine: Engine, bad_engine: Engine, repo: WorkflowRepository
) -> None:
    db = StandInDatabase(bad_engine)
    checkpointer = _checkpointer(db)
    run_id = _run_id()
    v1, _, v3 = _history(run_id)
    checkpointer.put(v3)
    await _flush_failing_while(checkpointer, lambda: checkpointer.put(v1))
    assert checkpointer.backlog == 1

    db.engine = engine
    assert await checkpointer.flush() == 1
    assert _version(repo, run_id) == 3


# ------------------------------------------------------------------ the service


async def test_the_loop_flushes_within_the_interval(
    engine: Engine, repo: WorkflowRepository, started: list[Checkpointer]
) -> None:
    checkpointer = _checkpointer(StandInDatabase(engine), interval_s=0.1)
    started.append(checkpointer)
    await checkpointer.start()
    run_id = _run_id()
    checkpointer.put(_history(run_id)[0])
    took = await _until(lambda: checkpointer.written == 1, within_s=3.0)
    assert took < 1.0
    assert checkpointer.backlog == 0
    assert _version(repo, run_id) == 1

    # And again for the next snapshot: the loop keeps going.
    checkpointer.put(_history(run_id)[2])
    await _until(lambda: checkpointer.written == 2, within_s=3.0)
    assert _version(repo, run_id) == 3


async def test_a_full_batch_is_flushed_without_waiting_for_the_interval(
    engine: Engine, repo: WorkflowRepository, started: list[Checkpointer]
) -> None:
    checkpointer = _checkpointer(StandInDatabase(engine), interval_s=30, batch_size=3)
    started.append(checkpointer)
    await checkpointer.start()
    run_ids = [_run_id() for _ in range(3)]
    for run_id in run_ids:
        checkpointer.put(_history(run_id)[0])
    took = await _until(lambda: checkpointer.written == 3, within_s=3.0)
    assert took < 1.0
    assert all(_version(repo, run_id) == 1 for run_id in run_ids)


async def test_the_loop_survives_an_outage(
    engine: Engine, bad_engine: Engine, repo: WorkflowRepository, started: list[Checkpointer]
) -> None:
    db = StandInDatabase(bad_engine)
    checkpointer = _checkpointer(db, interval_s=0.05, max_backoff_s=0.5)
    started.append(checkpointer)
    await checkpointer.start()
    run_id = _run_id()
    _, v2, v3 = _history(run_id)
    checkpointer.put(v2)
    await _until(lambda: checkpointer.failures >= 2, within_s=5.0)  # it keeps trying
    assert checkpointer.backlog == 1
    assert checkpointer.last_error is not None

    checkpointer.put(v3)  # a newer snapshot during the outage
    db.engine = engine
    await _until(lambda: checkpointer.written == 1, within_s=5.0)
    assert checkpointer.backlog == 0
    assert checkpointer.last_error is None
    assert _version(repo, run_id) == 3


async def test_stop_flushes_what_is_left(engine: Engine, repo: WorkflowRepository) -> None:
    checkpointer = _checkpointer(StandInDatabase(engine), interval_s=30)  # the loop would not get to it
    await checkpointer.start()
    run_ids = [_run_id() for _ in range(3)]
    for run_id in run_ids:
        checkpointer.put(_history(run_id)[2])
    assert checkpointer.backlog == 3
    await checkpointer.stop()
    assert checkpointer.backlog == 0
    assert checkpointer.written == 3
    assert all(_version(repo, run_id) == 3 for run_id in run_ids)


async def test_stop_during_an_outage_gives_up_and_says_so(bad_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    checkpointer = _checkpointer(StandInDatabase(bad_engine), interval_s=30)
    await checkpointer.start()
    checkpointer.put(_history(_run_id())[0])
    loop = asyncio.get_running_loop()
    began = loop.time()
    with caplog.at_level(logging.ERROR, logger="streams.checkpointer"):
        await checkpointer.stop()
    assert loop.time() - began < 5.0  # shutdown is not held up for long
    assert checkpointer.backlog == 1
    assert checkpointer.failures >= 1
    assert any("not written" in r.getMessage() for r in caplog.records)


class HeldEngine:
    """An engine on the module's database whose statements wait for ``release`` (in the worker thread).

    With ``fail`` set, a released statement raises instead, like a database that went away mid-write.
    """

    def __init__(self, database_url: str, *, fail: bool = False) -> None:
        self.engine = make_engine(database_url)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail = fail
        event.listen(self.engine, "before_cursor_execute", self._hold)

    def _hold(self, *args: object) -> None:
        self.entered.set()
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("database went away mid-write")


@pytest.fixture
def held(database_url: str) -> Iterator[Callable[..., HeldEngine]]:
    made: list[HeldEngine] = []

    def _make(*, fail: bool = False) -> HeldEngine:
        made.append(HeldEngine(database_url, fail=fail))
        return made[-1]

    yield _make
    for h in made:
        h.release.set()
        h.engine.dispose()


async def _stop_with_a_flush_in_flight(
    checkpointer: Checkpointer, held: HeldEngine, look: Callable[[], object]
) -> object:
    """Stop while the loop's write is held in its thread; release it 0.3 s later.

    Returns:
        What ``look()`` saw the moment ``stop()`` returned.
    """
    assert await asyncio.to_thread(held.entered.wait, 5), "the loop did not start a write"

    async def stop_and_look() -> object:
        await checkpointer.stop()
        return look()

    stopping = asyncio.create_task(stop_and_look())
    await asyncio.wait({stopping}, timeout=0.3)
    held.release.set()
    return await asyncio.wait_for(stopping, timeout=10)


async def test_stop_waits_for_a_write_in_flight(held: Callable[..., HeldEngine], repo: WorkflowRepository) -> None:
    # stop() "writes what is left": a snapshot whose write the loop had started is not left behind.
    slow = held()
    checkpointer = _checkpointer(StandInDatabase(slow.engine), interval_s=0.05)
    await checkpointer.start()
    run_id = _run_id()
    checkpointer.put(_history(run_id)[0])
    seen = await _stop_with_a_flush_in_flight(
        checkpointer, slow, lambda: (_version(repo, run_id), checkpointer.backlog, checkpointer.written)
    )
    assert seen == (1, 0, 1), "stop() returned before the snapshot was written (version, backlog, written)"


async def test_stop_reports_a_write_in_flight_that_fails(
    held: Callable[..., HeldEngine], repo: WorkflowRepository, caplog: pytest.LogCaptureFixture
) -> None:
    # The database goes away during the loop's last write: the snapshot must not vanish silently.
    slow = held(fail=True)
    checkpointer = _checkpointer(StandInDatabase(slow.engine), interval_s=0.05)
    await checkpointer.start()
    run_id = _run_id()
    checkpointer.put(_history(run_id)[0])
    with caplog.at_level(logging.ERROR, logger="streams.checkpointer"):
        await _stop_with_a_flush_in_flight(checkpointer, slow, lambda: None)
    assert _version(repo, run_id) is None
    assert checkpointer.backlog == 1, "the failed snapshot was dropped instead of kept"
    assert checkpointer.failures >= 1
    assert any("not written" in r.getMessage() for r in caplog.records), "no error was logged"
