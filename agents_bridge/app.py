"""The bridge Faust app: ``faust -A agents_bridge.app --datadir DIR worker``.

It consumes agent tasks (its own consumer group, scalable apart from the
executor), looks each agent up in the registry, calls it over A2A, and
publishes the result keyed by run_id. Many calls are in flight per worker
(``SWITCHYARD_BRIDGE_CONCURRENCY`` actors share the task stream), since agents
are slow. A repeated task (same correlation id) joins the call in flight or
gets the remembered result instead of calling the agent twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import aiohttp
from faust import web
from faust.types import StreamT
from mode import Service

from agents_bridge.calls import AgentCaller, CallSettings
from agents_bridge.memory import CallMemory
from models.messages import (
    AgentCancel,
    AgentError,
    AgentResult,
    AgentTask,
    ErrorKind,
    MessageDecodeError,
    MonitoringUpdate,
    ResultStatus,
    decode,
    encode,
    utcnow,
)
from switchyard import http_guard, topics
from switchyard.database import Database
from switchyard.faust_app import SwitchyardApp, app_settings
from switchyard.limits import BoundedSender, DeadLetters, record_size, topic_config
from switchyard.registry import CachedRegistry, DatabaseRegistry, HttpRegistry, Registry, RegistryError, RegistryStore
from switchyard.settings import Settings

__all__ = ["APP_ID", "Bridge", "BridgeApp", "app", "create_app"]

log = logging.getLogger(__name__)

APP_ID = "switchyard-bridge"


class Bridge(Service):
    """The bridge's long-lived parts: HTTP session, registry, caller, call memory."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.settings = settings
        self.memory = CallMemory()
        self.database: Database | None = None if settings.registry_url else Database(settings)
        self._session: aiohttp.ClientSession | None = None
        self._registry: Registry | None = None
        self._caller: AgentCaller | None = None
        self.calls = 0
        self.cancels = 0
        self.publish: Callable[[AgentTask, AgentResult], Awaitable[None]] | None = None
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        """Open the HTTP session and the registry (waiting for the database if it is used)."""
        connector = aiohttp.TCPConnector(limit=max(100, self.settings.bridge_concurrency * 2))
        self._session = aiohttp.ClientSession(connector=connector)
        inner: Registry
        if self.settings.registry_url:
            inner = HttpRegistry(self.settings.registry_url, self._session)
        else:
            assert self.database is not None
            await self.database.maybe_start()
            inner = DatabaseRegistry(RegistryStore(self.database.engine, self.settings))
        self._registry = CachedRegistry(inner, self.settings.registry_cache_ttl_s)
        self._caller = AgentCaller(
            self._session,
            CallSettings(
                call_timeout_s=self.settings.call_timeout_s,
                poll_interval_s=self.settings.poll_interval_s,
                max_response_bytes=self.settings.max_message_bytes,
            ),
        )

    async def on_stop(self) -> None:
        """Close the HTTP session and the database."""
        if self._session is not None:
            await self._session.close()
        if self.database is not None:
            await self.database.stop()

    async def execute(self, task: AgentTask, delivery: Hashable | None = None) -> AgentResult | None:
        """Carry out one task once per correlation id, and publish its result.

        A repeat that arrives while the call is in flight does not call the
        agent again: a repeat from another message (the executor re-dispatched
        the attempt after its restart) returns at once, since the call
        publishes its result when it ends; the same message delivered again
        waits for it (see :meth:`CallMemory.repeat_in_flight`). A repeat that arrives after
        the call finished gets the remembered result published again: the
        executor asking again means it may have lost the first one, and a
        duplicate result is harmless to it. Never raises for a call problem.

        Args:
            task: The task.
            delivery: The message it came in (partition, offset), if known.

        Returns:
            The result, or None for a repeat that returned at once.
        """
        done = self.memory.finished(task.correlation_id)
        if done is not None:
            if self.publish is not None:
                await self.publish(task, done)
            return done
        if delivery is not None and self.memory.repeat_in_flight(task.correlation_id, delivery):
            return None
        return await self.memory.run(task.correlation_id, lambda: self._execute_and_publish(task), delivery)

    async def _execute_and_publish(self, task: AgentTask) -> AgentResult:
        result = await self._execute(task)
        if self.publish is not None:
            await self.publish(task, result)
        return result

    async def cancel(self, request: AgentCancel) -> bool:
        """Send the agent a CancelTask for an attempt, where its task id is known (best-effort).

        A2A cancels by the agent's task id, which the bridge learns when a call
        comes back still working (then it polls); a blocking call in progress
        has none yet, and its late result is ignored by the executor anyway.
        """
        assert self._registry is not None
        assert self._caller is not None
        try:
            agent = await self._registry.get(request.agent_name)
        except RegistryError:
            return False
        if agent is None:
            return False
        self.cancels += 1
        return await self._caller.cancel(request.correlation_id, agent)

    async def _execute(self, task: AgentTask) -> AgentResult:
        assert self._registry is not None
        assert self._caller is not None
        started = utcnow()
        if task.deadline <= started:
            return _failure(task, started, ErrorKind.TIMEOUT, "the deadline passed before the call could start", True)
        try:
            agent = await self._registry.get(task.agent_name)
        except RegistryError as error:
            return _failure(task, started, ErrorKind.REGISTRY_UNAVAILABLE, str(error), True)
        if agent is None:
            # Retriable: registering the agent is the fix, and the step's retry policy bounds the wait.
            return _failure(
                task, started, ErrorKind.UNKNOWN_AGENT, f"no agent {task.agent_name!r} in the registry", True
            )
        self.calls += 1
        return bounded(await self._caller.call(task, agent), self.settings.max_message_bytes)


def bounded(result: AgentResult, limit: int) -> AgentResult:
    """The result, or, when its record would be over ``limit`` bytes, a final ``output_too_large`` failure.

    The agent's answer fitted the bridge's cap on an HTTP answer, but the
    result that carries its output does not fit a message: publishing it
    would fail (and the run would wait for its deadline, then call the agent
    again). So the attempt fails at once, not retriable, naming both sizes.
    """
    try:
        size = record_size(result.run_id.encode(), encode(result))
    except ValueError as error:  # text that is not text (a lone surrogate from a JSON escape)
        message = f"the agent's output cannot be carried: {str(error)[:200]}"
        return result.model_copy(
            update={
                "status": ResultStatus.FAILURE,
                "output": None,
                "error": AgentError(kind=ErrorKind.MALFORMED_RESPONSE, message=message, retriable=False),
            }
        )
    if size <= limit:
        return result
    message = (
        f"the agent's output makes a result of {size} bytes, over the limit of {limit} bytes "
        "(SWITCHYARD_MAX_MESSAGE_BYTES)"
    )
    log.warning("%s: %s", result.correlation_id, message)
    return result.model_copy(
        update={
            "status": ResultStatus.FAILURE,
            "output": None,
            "error": AgentError(kind=ErrorKind.OUTPUT_TOO_LARGE, message=message, retriable=False),
        }
    )


def _failure(task: AgentTask, started: Any, kind: str, message: str, retriable: bool) -> AgentResult:
    return AgentResult(
        correlation_id=task.correlation_id,
        run_id=task.run_id,
        step_id=task.step_id,
        attempt=task.attempt,
        status=ResultStatus.FAILURE,
        error=AgentError(kind=kind, message=message, retriable=retriable),
        started_at=started,
        finished_at=utcnow(),
    )


class BridgeApp(SwitchyardApp):
    """The bridge app, with its parts reachable for tests."""

    settings: Settings
    bridge: Bridge
    tasks_topic: Any
    cancels_topic: Any
    results_topic: Any
    monitoring_topic: Any
    deadletter_topic: Any

    async def on_first_start(self) -> None:
        """Wait for the broker before Faust tries to reach it."""
        await self.wait_for_services(self.settings, self.bridge)
        await super().on_first_start()


def create_app(settings: Settings | None = None) -> BridgeApp:
    """Build the bridge app.

    Args:
        settings: Defaults to settings from the environment.
    """
    settings = settings or Settings()
    app = BridgeApp(
        APP_ID,
        embedded_broker=settings.embedded_broker,
        **app_settings(settings, web_port=settings.bridge_web_port),
    )
    app.settings = settings
    partitions = settings.topic_partitions
    config = topic_config(settings)
    app.tasks_topic = app.topic(topics.TASKS, partitions=partitions, config=config)
    app.cancels_topic = app.topic(topics.TASK_CANCELS, partitions=partitions, config=config)
    app.results_topic = app.topic(topics.RESULTS, partitions=partitions, config=config)
    app.monitoring_topic = app.topic(topics.MONITORING, partitions=partitions, config=config)
    app.deadletter_topic = app.topic(topics.DEADLETTER, partitions=1, config=config)
    app.bridge = app.attach(Bridge(settings))
    limit = settings.max_message_bytes
    deadletters = DeadLetters(app.deadletter_topic, APP_ID, limit)
    results = BoundedSender(app.results_topic, topics.RESULTS, limit)
    monitoring = BoundedSender(app.monitoring_topic, topics.MONITORING, limit)

    async def handle(key: bytes | None, value: bytes, delivery: tuple[int, int]) -> None:
        try:
            task = decode(AgentTask, value, max_bytes=limit)
        except MessageDecodeError as error:
            await deadletters.park(topics.TASKS, key, value, str(error))
            return
        await app.bridge.execute(task, delivery)

    async def publish(task: AgentTask, result: AgentResult) -> None:
        await results.send(key=task.run_id.encode(), value=encode(result))
        took_ms = (result.finished_at - result.started_at).total_seconds() * 1000
        update = MonitoringUpdate(
            run_id=task.run_id,
            step_id=task.step_id,
            attempt=task.attempt,
            status=f"AGENT_{result.status}",
            detail={"agent": task.agent_name, "took_ms": round(took_ms, 1), "source": "bridge"},
        )
        await monitoring.send(key=task.run_id.encode(), value=encode(update))

    app.bridge.publish = publish

    async def call_agents(stream: StreamT[Any]) -> None:
        async for event in stream.events():
            key = event.key if isinstance(event.key, bytes) else None
            value = event.value if isinstance(event.value, bytes) else b""
            try:
                await handle(key, value, (event.message.partition, event.message.offset))
            except Exception as error:
                log.exception("could not process a task")
                await deadletters.park(topics.TASKS, key, value, f"internal error: {type(error).__name__}: {error}")

    app.agent(app.tasks_topic, name="call_agents", concurrency=settings.bridge_concurrency)(call_agents)

    async def cancel_tasks(stream: StreamT[Any]) -> None:
        async for event in stream.events():
            key = event.key if isinstance(event.key, bytes) else None
            value = event.value if isinstance(event.value, bytes) else b""
            try:
                request = decode(AgentCancel, value, max_bytes=limit)
                cancelled = await app.bridge.cancel(request)
                log.info("cancel of %s at %s: %s", request.correlation_id, request.agent_name, cancelled)
            except Exception as error:
                reason = str(error) if isinstance(error, MessageDecodeError) else f"internal error: {error!r}"
                await deadletters.park(topics.TASK_CANCELS, key, value, reason)

    app.agent(app.cancels_topic, name="cancel_tasks", concurrency=4)(cancel_tasks)

    @app.page("/health/")
    class Health(web.View):
        async def get(self, request: web.Request) -> web.Response:
            bridge = app.bridge
            # 503 until the worker owns its partitions and has recovered them,
            # so that a readiness probe does not pass too early.
            return self.json(
                {
                    "app": app.conf.id,
                    "ready": app.ready,
                    "calls_made": bridge.calls,
                    "calls_in_flight": bridge.memory.in_flight,
                    "repeats_joined": bridge.memory.joined,
                    "repeats_remembered": bridge.memory.remembered,
                    "cancels": bridge.cancels,
                    "assigned_partitions": len(app.assignor.assigned_actives()),
                    "task_partitions": sorted(
                        tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topics.TASKS
                    ),
                },
                status=200 if app.ready else 503,
            )

    http_guard.install(app, settings)
    return app


app = create_app()
