"""The end of table recovery loses no stream events (switchyard.faust_recovery).

A small model of Faust's consumer: a stream partition holds ten events, a
fetch moves every *active* partition's position forward and puts its events
into a stream queue that ``flow_control.resume()`` clears (as Faust's stream
queues are), and the seek to committed offsets yields to the event loop once,
as the real one does while it asks the broker. The events must all reach the
stream queue, whatever happens while the seek is in flight.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest
from faust.types import TP

from switchyard.faust_app import SwitchyardApp, app_settings
from switchyard.faust_recovery import OrderedRecovery, SwitchyardTableManager
from switchyard.settings import Settings

STREAM = TP("results.topic", 0)
EVENTS = 10


class _Fetcher:
    async def maybe_start(self) -> None:
        return None


class _Consumer:
    """Faust's consumer reduced to what the end of recovery touches."""

    def __init__(self, app: SwitchyardApp) -> None:
        self.queue = app.FlowControlQueue(maxsize=100, clear_on_resume=True)
        self.active: set[TP] = set()
        self.position = 0
        self.calls: list[str] = []

    def assignment(self) -> set[TP]:
        return {STREAM}

    def fetch(self) -> None:
        if STREAM in self.active:
            while self.position < EVENTS:
                self.queue.put_nowait(self.position)
                self.position += 1

    async def perform_seek(self) -> None:
        self.calls.append("seek")
        await asyncio.sleep(0)
        self.fetch()  # the fetcher runs while the seek waits for the broker
        # nothing was committed yet: the position stays where it is

    def resume_partitions(self, tps: set[TP]) -> None:
        self.calls.append("resume_partitions")
        self.active |= set(tps)

    def resume_flow(self) -> None:
        self.calls.append("resume_flow")


def _app(tmp_path: Path) -> tuple[SwitchyardApp, _Consumer]:
    settings = Settings(broker_port=19998, data_dir=tmp_path)
    app = SwitchyardApp("t-recovery", settings=settings, **app_settings(settings, web_port=6998))
    consumer = _Consumer(app)
    app.consumer = consumer  # type: ignore[assignment]
    app.__dict__["_fetcher"] = _Fetcher()
    return app, consumer


def test_both_apps_use_the_ordered_recovery(tmp_path: Path) -> None:
    app, _ = _app(tmp_path)
    assert isinstance(app.tables, SwitchyardTableManager)
    assert isinstance(app.tables.recovery, OrderedRecovery)


@pytest.mark.parametrize("end", ["on_recovery_completed", "_resume_streams"])
def test_events_fetched_around_the_seek_all_reach_the_stream(tmp_path: Path, end: str) -> None:
    # on_recovery_completed ends a rebalance of an app with tables (the
    # executor), _resume_streams one without (the bridge).
    app, consumer = _app(tmp_path)
    recovery: Any = cast(Any, app.tables).recovery
    resume = app.flow_control.resume

    def recording_resume() -> None:
        consumer.calls.append("flow_control.resume")
        resume()

    app.flow_control.resume = recording_resume  # type: ignore[method-assign]

    async def wait(coro: Any, **_: Any) -> None:
        await coro  # the service is not started here; its _wait only adds "a rebalance interrupts"

    recovery._wait = wait

    async def scenario() -> None:
        await getattr(recovery, end)(generation_id=app.consumer_generation_id)
        consumer.fetch()  # the fetcher goes on after recovery

    asyncio.run(scenario())
    delivered = []
    while not consumer.queue.empty():
        delivered.append(consumer.queue.get_nowait())
    assert delivered == list(range(EVENTS)), f"events lost at the end of recovery; calls: {consumer.calls}"
    assert consumer.calls == ["seek", "flow_control.resume", "resume_partitions", "resume_flow"]
    assert recovery.completed.is_set()
