"""The executor Faust app: ``faust -A streams.app --datadir DIR worker``.

:func:`create_app` builds an app from :class:`~switchyard.settings.Settings`;
the module-level ``app`` is what the ``faust`` command loads. Importing this
module connects to nothing: the database and the broker are reached when a
worker starts (waiting, bounded, for each).

Agents (one per input topic, each with ``concurrency=1``, the only writers of
the ``runs`` table) decode their input, turn it into an event of the pure
state machine and hand it to :class:`~streams.shell.RunShell`. Anything that
cannot be processed goes to the dead-letter topic with the reason; the worker
goes on (docs/architecture.md rule 4).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from faust.types import EventT, StreamT, TableT, TopicT

from models.agents import AgentEntry
from models.messages import (
    AgentResult,
    ControlCommand,
    ControlMessage,
    MessageDecodeError,
    WorkflowSubmission,
    decode,
    utcnow,
)
from models.run import (
    AgentResultReceived,
    CancelRequested,
    Event,
    InputGiven,
    RetryRequested,
    RunState,
    StepTimedOut,
)
from streams.checkpointer import Checkpointer
from streams.recovery import PartitionRecovery, discard_stale_tables, partition_of
from streams.shell import RunShell
from streams.timers import Timers
from switchyard import topics
from switchyard.database import Database
from switchyard.db import WorkflowRepository
from switchyard.faust_app import SwitchyardApp, app_settings
from switchyard.limits import topic_config
from switchyard.registry import CachedRegistry, DatabaseRegistry, RegistryStore
from switchyard.settings import Settings

__all__ = ["ExecutorApp", "app", "create_app"]

log = logging.getLogger(__name__)

APP_ID = "switchyard-executor"


class ExecutorApp(SwitchyardApp):
    """The executor, with its parts reachable for views, commands and tests."""

    settings: Settings
    database: Database
    checkpointer: Checkpointer
    timers: Timers
    shell: RunShell
    runs: TableT[bytes, bytes]
    plans_topic: TopicT
    results_topic: TopicT
    control_topic: TopicT
    tasks_topic: TopicT
    cancels_topic: TopicT
    monitoring_topic: TopicT
    deadletter_topic: TopicT
    recovery: PartitionRecovery

    async def on_first_start(self) -> None:
        """Wait for the broker and the database, and discard table state from an earlier broker."""
        await self.wait_for_services(self.settings, self.database)
        await discard_stale_tables(
            self.settings, Path(self.conf.tabledir), topics.RUNS_TABLE, self.runs.changelog_topic.get_topic_name()
        )
        await super().on_first_start()


_MAX_KEY_BYTES = 1024
"""Keys are run ids (at most 128 characters); a longer key is not a run's."""
_MESSAGE_TYPES = {topics.PLANS: "WorkflowSubmission", topics.RESULTS: "AgentResult", topics.CONTROL: "ControlMessage"}


class _Records:
    """PostgreSQL's view of runs for the shell; the engine exists once the worker has started."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def exists(self, run_id: str) -> str | None:
        return WorkflowRepository(self._database.engine).exists(run_id)

    def get_state(self, run_id: str) -> RunState | None:
        return WorkflowRepository(self._database.engine).get_state(run_id)

    def versions(self, run_ids: Iterable[str]) -> dict[str, int]:
        return WorkflowRepository(self._database.engine).versions(run_ids)

    def record_rejected(self, run_id: str, *, kind: str, message: str, plan: Any = None) -> bool:
        return WorkflowRepository(self._database.engine).record_rejected(run_id, kind=kind, message=message, plan=plan)

    def fingerprint(self, run_id: str) -> str | None:
        record = WorkflowRepository(self._database.engine).get_run(run_id, with_steps=False)
        return record.submission_fingerprint() if record is not None else None


class _Registry:
    """The built-in registry, reached through the worker's database service."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def get(self, name: str) -> AgentEntry | None:
        return await DatabaseRegistry(RegistryStore(self._database.engine, self._database.settings)).get(name)


def _event_from_control(message: ControlMessage) -> Event:
    at = utcnow()
    if message.command is ControlCommand.CANCEL:
        return CancelRequested(run_id=message.run_id, at=at, reason=message.reason or "cancelled by request")
    if message.command is ControlCommand.RETRY:
        return RetryRequested(run_id=message.run_id, at=at)
    if message.command is ControlCommand.INPUT:
        assert message.step_id is not None  # checked by ControlMessage
        assert message.answer is not None
        assert message.turn is not None
        return InputGiven(
            run_id=message.run_id,
            step_id=message.step_id,
            iteration=message.iteration,
            item=message.item,
            attempt=message.attempt,
            turn=message.turn,
            answer=message.answer,
            at=at,
        )
    # RESTORE, RESUME and EVICT are handled before this; what is left is a step timeout.
    assert message.step_id is not None  # checked by ControlMessage
    assert message.attempt is not None
    return StepTimedOut(
        run_id=message.run_id,
        step_id=message.step_id,
        attempt=message.attempt,
        iteration=message.iteration,
        item=message.item,
        at=at,
    )


def create_app(settings: Settings | None = None) -> ExecutorApp:
    """Build the executor app.

    Args:
        settings: Defaults to settings from the environment.

    Returns:
        The app, with its topics, table, agents, services, views and commands.
    """
    settings = settings or Settings()
    app = ExecutorApp(
        APP_ID,
        settings=settings,
        **app_settings(settings, web_port=settings.executor_web_port),
    )
    app.settings = settings
    partitions = settings.topic_partitions
    config = topic_config(settings)
    app.plans_topic = app.topic(topics.PLANS, partitions=partitions, config=config)
    app.results_topic = app.topic(topics.RESULTS, partitions=partitions, config=config)
    app.control_topic = app.topic(topics.CONTROL, partitions=partitions, config=config)
    app.tasks_topic = app.topic(topics.TASKS, partitions=partitions, config=config)
    app.cancels_topic = app.topic(topics.TASK_CANCELS, partitions=partitions, config=config)
    app.monitoring_topic = app.topic(topics.MONITORING, partitions=partitions, config=config)
    app.deadletter_topic = app.topic(topics.DEADLETTER, partitions=1, config=config)
    app.runs = app.Table(
        topics.RUNS_TABLE,
        default=None,
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        extra_topic_configs=config,
    )

    app.database = app.attach(Database(settings))
    app.checkpointer = app.attach(
        Checkpointer(
            app.database,
            interval_s=settings.checkpoint_interval_s,
            batch_size=settings.checkpoint_batch_size,
        ),
    )
    app.timers = app.attach(Timers())
    app.shell = RunShell(
        runs=app.runs,
        tasks=app.tasks_topic,
        cancels=app.cancels_topic,
        control=app.control_topic,
        monitoring=app.monitoring_topic,
        deadletter=app.deadletter_topic,
        checkpoints=app.checkpointer,
        timers=app.timers,
        records=_Records(app.database),
        registry=CachedRegistry(_Registry(app.database), settings.registry_cache_ttl_s),
        default_timeout_s=settings.default_step_timeout_s,
        default_input_timeout_s=settings.default_input_timeout_s,
        resume_grace_s=settings.resume_grace_s,
        retention_s=settings.finished_run_retention_s,
        app_name=APP_ID,
        max_message_bytes=settings.max_message_bytes,
    )
    limit = settings.max_message_bytes

    async def guarded(source: str, event: EventT[Any], handler: Callable[[bytes, bytes], Awaitable[None]]) -> None:
        key = event.key if isinstance(event.key, bytes) else None
        value = event.value if isinstance(event.value, bytes) else b""
        try:
            if key is None:
                # Without a key the event may sit on the wrong partition, and
                # its run's state on another worker (rule 1).
                await _rekey(app, source, value)
                return
            if len(value) > limit or len(key) > _MAX_KEY_BYTES:
                # Checked before the event is moved or re-keyed: a copy over the limit could not be sent.
                what = f"payload of {len(value)} bytes" if len(value) > limit else f"key of {len(key)} bytes"
                raise MessageDecodeError(_MESSAGE_TYPES.get(source, "message"), f"{what} is over the limit of {limit}")
            expected = partition_of(key.decode("utf-8", "replace"), partitions)
            if event.message.partition != expected:
                # A producer with another partitioner (librdkafka's default is
                # crc32): move the event to where the run's state lives.
                topic = {topics.PLANS: app.plans_topic, topics.RESULTS: app.results_topic}.get(
                    source, app.control_topic
                )
                await topic.send(key=key, value=value, partition=expected)
                return
            await handler(key, value)
        except MessageDecodeError as error:
            await app.shell.park(source, key, value, str(error))
            if source == topics.PLANS:
                try:
                    await app.shell.reject(key, value, error.reason)
                except Exception:
                    log.exception("could not record the rejected submission (it is in the dead-letter topic)")
        except Exception as error:
            log.exception("could not process a message from %s", source)
            await app.shell.park(source, key, value, f"internal error: {type(error).__name__}: {error}")

    async def on_plan(key: bytes, value: bytes) -> None:
        submission = decode(WorkflowSubmission, value, max_bytes=limit)
        if key != submission.run_id.encode():
            await app.plans_topic.send(key=submission.run_id.encode(), value=value)
            return
        await app.shell.submit(submission, (topics.PLANS, key, value))

    async def on_result(key: bytes, value: bytes) -> None:
        result = decode(AgentResult, value, max_bytes=limit)
        if key != result.run_id.encode():
            await app.results_topic.send(key=result.run_id.encode(), value=value)
            return
        await app.shell.handle(AgentResultReceived(result=result, at=utcnow()), (topics.RESULTS, key, value))

    async def on_control(key: bytes, value: bytes) -> None:
        message = decode(ControlMessage, value, max_bytes=limit)
        if key != message.run_id.encode():
            await app.control_topic.send(key=message.run_id.encode(), value=value)
            return
        origin = (topics.CONTROL, key, value)
        if message.command in {ControlCommand.RESTORE, ControlCommand.RESUME}:
            if not await app.shell.restore_or_resume(message.run_id, origin):
                await app.shell.park(topics.CONTROL, key, value, f"no run {message.run_id!r} to {message.command}")
            return
        if message.command is ControlCommand.EVICT:
            await app.shell.evict(message.run_id)
            return
        await app.shell.handle(_event_from_control(message), origin)

    def consume(topic: Any, name: str, handler: Callable[[bytes, bytes], Awaitable[None]]) -> None:
        async def agent(stream: StreamT[Any]) -> None:
            async for event in stream.events():
                await guarded(topic.get_topic_name(), event, handler)

        agent.__name__ = agent.__qualname__ = name
        app.agent(topic, name=name, concurrency=1)(agent)

    consume(app.plans_topic, "plans", on_plan)
    consume(app.results_topic, "results", on_result)
    consume(app.control_topic, "control", on_control)

    app.recovery = PartitionRecovery(app)
    app.on_rebalance_complete.connect(app.recovery.on_rebalance_complete)

    from streams import cli, web

    web.register(app)
    cli.register(app)
    return app


async def _rekey(app: ExecutorApp, source: str, value: bytes) -> None:
    """Send a key-less event again, keyed by its run_id, or park it."""
    limit = app.settings.max_message_bytes
    message: WorkflowSubmission | AgentResult | ControlMessage
    if source == topics.PLANS:
        target, message = app.plans_topic, decode(WorkflowSubmission, value, max_bytes=limit)
    elif source == topics.RESULTS:
        target, message = app.results_topic, decode(AgentResult, value, max_bytes=limit)
    else:
        target, message = app.control_topic, decode(ControlMessage, value, max_bytes=limit)
    await target.send(key=message.run_id.encode(), value=value)


app = create_app()
