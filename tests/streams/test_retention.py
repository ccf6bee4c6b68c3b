"""Finished runs leave the executor's table after their retention, once PostgreSQL has them.

Resuming after a restart reads only the runs in flight.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from models.messages import ControlCommand, ControlMessage, decode
from models.run import RunState, RunSubmitted
from streams.run_store import Layout, is_head_key
from streams.shell import RunShell
from streams.timers import TimerKey
from tests.models.run_builders import RUN_ID, T0, make_plan, result
from tests.streams.test_shell import FakeCheckpoints, FakeTimers, FakeTopic

KEY = RUN_ID.encode()


class Records:
    """PostgreSQL as far as eviction asks: the recorded version of each run."""

    def __init__(self) -> None:
        self.recorded: dict[str, int] = {}

    def exists(self, run_id: str) -> str | None:
        return None

    def get_state(self, run_id: str) -> RunState | None:
        return None

    def record_rejected(self, run_id: str, *, kind: str, message: str, plan: Any = None) -> bool:
        return False

    def fingerprint(self, run_id: str) -> str | None:
        return None

    def versions(self, run_ids: Iterable[str]) -> dict[str, int]:
        return {r: self.recorded[r] for r in run_ids if r in self.recorded}


def make_shell(runs: dict[bytes, bytes] | None = None) -> tuple[RunShell, FakeTopic, FakeTimers, Records]:
    control, timers, records = FakeTopic(), FakeTimers(), Records()
    shell = RunShell(
        runs={} if runs is None else runs,
        tasks=FakeTopic(),
        cancels=FakeTopic(),
        control=control,
        monitoring=FakeTopic(),
        deadletter=FakeTopic(),
        checkpoints=FakeCheckpoints(),
        timers=timers,
        records=records,
        retention_s=60,
    )
    return shell, control, timers, records


async def finished_run(shell: RunShell) -> RunState:
    await shell.handle(RunSubmitted(run_id=RUN_ID, plan=make_plan(1), input={"text": "hi"}, at=T0))
    state = shell.load(RUN_ID)
    assert state is not None
    await shell.handle(result(state, T0 + timedelta(seconds=1)))
    done = shell.load(RUN_ID)
    assert done is not None
    assert done.status.finished
    return done


async def test_a_finished_run_schedules_its_eviction_after_the_retention() -> None:
    shell, control, timers, _ = make_shell()
    await finished_run(shell)
    key = TimerKey("evict", RUN_ID, RUN_ID)
    assert key in timers.pending
    when, action = timers.pending[key]
    assert timedelta(seconds=55) < when - datetime.now(when.tzinfo) <= timedelta(seconds=60)
    await action()  # the timer only asks: the control agent writes the table
    (sent,) = control.sent
    assert decode(ControlMessage, sent[1]).command is ControlCommand.EVICT
    assert shell.load(RUN_ID) is not None


async def test_eviction_removes_every_record_once_postgresql_has_the_final_version() -> None:
    runs: dict[bytes, bytes] = {}
    shell, _, _, records = make_shell(runs)
    state = await finished_run(shell)
    assert len(runs) > 1  # the head and its parts
    records.recorded[RUN_ID] = state.version
    assert await shell.evict(RUN_ID)
    assert runs == {}
    assert shell.load(RUN_ID) is None
    assert shell.evicted == 1


async def test_a_run_postgresql_has_not_recorded_yet_stays_and_is_asked_about_again() -> None:
    shell, _, timers, records = make_shell()
    state = await finished_run(shell)
    records.recorded[RUN_ID] = state.version - 1
    timers.pending.clear()
    assert not await shell.evict(RUN_ID)
    assert shell.load(RUN_ID) == state
    assert TimerKey("evict", RUN_ID, RUN_ID) in timers.pending


async def test_a_run_still_running_is_not_evicted() -> None:
    shell, _, _, records = make_shell()
    await shell.handle(RunSubmitted(run_id=RUN_ID, plan=make_plan(2), input={"text": "hi"}, at=T0))
    records.recorded[RUN_ID] = 10**6
    assert not await shell.evict(RUN_ID)
    assert shell.load(RUN_ID) is not None


class CountingTable(dict[bytes, bytes]):
    """A table that notes the reads of runs' parts, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parts_read: list[bytes] = []

    def get(self, key: bytes, default: Any = None) -> Any:
        if not is_head_key(key):
            self.parts_read.append(key)
        return super().get(key, default)

    def __getitem__(self, key: bytes) -> bytes:
        if not is_head_key(key):
            self.parts_read.append(key)
        return super().__getitem__(key)


async def test_resuming_skips_finished_runs_without_reading_their_parts_and_schedules_their_eviction() -> None:
    runs: dict[bytes, bytes] = {}
    shell, _, _, _ = make_shell(runs)
    await finished_run(shell)
    await shell.handle(RunSubmitted(run_id="other-run", plan=make_plan(2), input={"text": "hi"}, at=T0))
    table = CountingTable(runs)
    fresh, _, timers, _ = make_shell(table)
    resumed = await fresh.resume_all(datetime.now(T0.tzinfo))
    assert resumed == 1  # the run in flight
    # Its plan and its input (its open step and execution are in its head); nothing of the finished run.
    other = Layout("other-run")
    assert table.parts_read == [other.plan, other.input]
    assert TimerKey("evict", RUN_ID, RUN_ID) in timers.pending
    assert TimerKey("evict", "other-run", "other-run") not in timers.pending
