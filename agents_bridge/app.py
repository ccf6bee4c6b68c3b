"""The bridge Faust app: ``faust -A agents_bridge.app --datadir DIR worker``.

It consumes agent tasks (its own consumer group, scalable apart from the
executor), looks each agent up in the registry, calls it over A2A, and
publishes the result keyed by run_id. A repeated task (same call id: the
correlation id, and the turn once a person's answers carry the call on)
joins the call in flight or gets the remembered result instead of calling the
agent twice; an answer (the same correlation id, a later turn) is a call of
its own.

Agents are slow (seconds to minutes), so one worker holds thousands of calls at
once: one Faust actor reads the task stream and hands each task to an asyncio
task of its own (:mod:`agents_bridge.intake`, which acknowledges a task only
after its call ended and its result was published, in offset order per
partition). A call holds one of its agent's slots (``max_concurrency`` in the
registry) and one of the worker's (``SWITCHYARD_BRIDGE_CONCURRENCY``);
calls beyond an agent's limit wait in order without holding the worker's
(:mod:`agents_bridge.slots`). At most ``SWITCHYARD_BRIDGE_MAX_WAITING`` tasks
wait for their call to start; then the worker takes no more tasks from the
topic until one starts.

On SIGTERM and at a rebalance, calls waiting for a slot are sent away: they
are not made here and their tasks stay unacknowledged, so the partition's next
owner gets them again. Until the partitions are assigned again (for good on
SIGTERM), later calls are sent away at once, and tasks taken from a partition
that had tasks sent away are let go too (:mod:`agents_bridge.intake`). Calls in
flight end first (Faust waits for them) and their results are published, as
before.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Final, NamedTuple

import aiohttp
import faust
from faust import web
from faust.types import EventT, Message, StreamT, TopicT
from mode import BaseSignalT, Service

from agents_bridge.calls import AgentCaller, CallSettings
from agents_bridge.intake import Intake
from agents_bridge.memory import CallMemory
from agents_bridge.slots import CallSlots, SentAway, open_file_budget
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

OTHER_CONNECTIONS: Final = 64
"""HTTP connections beyond the calls in flight: cancels, registry lookups (``SWITCHYARD_REGISTRY_URL``)."""


def _no_call_started() -> None:
    """The ``started`` of a task whose caller does not count starts."""


class Bridge(Service):
    """The bridge's long-lived parts: HTTP session, registry, caller, call memory, call slots."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.settings = settings
        self.memory = CallMemory()
        self.slots = CallSlots(settings.bridge_concurrency)
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
        wanted = self.settings.bridge_concurrency
        # Every call in flight holds a connection, so a file descriptor. Calls
        # beyond what the open-file limit allows wait for a slot here, in order,
        # rather than fail with "Too many open files" (or wait inside aiohttp for
        # a connection, where the wait would count against the request's timeout).
        fit = open_file_budget(wanted + OTHER_CONNECTIONS) - OTHER_CONNECTIONS
        if fit < wanted:
            log.warning(
                "the open-file limit allows %d agent calls in flight, fewer than SWITCHYARD_BRIDGE_CONCURRENCY=%d:"
                " the other calls wait for a slot (raise the hard limit, e.g. ulimit -Hn, to allow more)",
                max(fit, 1),
                wanted,
            )
            self.slots.size = max(fit, 1)
        # No per-host limit: an agent's own limit is its max_concurrency in the registry.
        connector = aiohttp.TCPConnector(limit=self.slots.size + OTHER_CONNECTIONS, limit_per_host=0)
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
                # Task ids of calls being polled, for cancels: at least one per call in flight.
                remembered_tasks=max(10_000, self.settings.bridge_concurrency),
            ),
        )

    async def on_stop(self) -> None:
        """Close the HTTP session and the database."""
        if self._session is not None:
            await self._session.close()
        if self.database is not None:
            await self.database.stop()

    async def execute(
        self,
        task: AgentTask,
        delivery: Hashable | None = None,
        started: Callable[[], None] = _no_call_started,
    ) -> AgentResult | None:
        """Carry out one task once per call id (correlation id and turn), and publish its result.

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
            started: Called when the agent call starts (it holds its slots).

        Returns:
            The result, or None for a repeat that returned at once.

        Raises:
            SentAway: The call waited for a slot when the worker began to stop
                or to lose its partitions; it was not made.
        """
        # By call id: the answer that continues an attempt (turn 1, 2...) is a new call, not a repeat of turn 0.
        done = self.memory.finished(task.call_id)
        if done is not None:
            if self.publish is not None:
                await self.publish(task, done)
            return done
        if delivery is not None and self.memory.repeat_in_flight(task.call_id, delivery):
            return None
        return await self.memory.run(task.call_id, lambda: self._execute_and_publish(task, started), delivery)

    async def _execute_and_publish(self, task: AgentTask, started: Callable[[], None]) -> AgentResult:
        result = await self._execute(task, started)
        if self.publish is not None:
            await self.publish(task, result)
        return result

    async def cancel(self, request: AgentCancel) -> bool:
        """Send the agent a CancelTask for an attempt, where its task id is known (best-effort).

        A2A cancels by the agent's task id. The executor knows it for an
        attempt that waits for a person's answer (``request.task_id``, from
        the agent's question); otherwise the bridge knows it when a call comes
        back still working (then it polls) or carries an answer. A blocking
        call in progress has none yet, and its late result is ignored by the
        executor anyway.
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
        return await self._caller.cancel(request.correlation_id, agent, task_id=request.task_id)

    async def _execute(self, task: AgentTask, started: Callable[[], None]) -> AgentResult:
        assert self._registry is not None
        assert self._caller is not None
        taken = utcnow()
        if task.deadline <= taken:
            return _failure(task, taken, ErrorKind.TIMEOUT, "the deadline passed before the call could start", True)
        try:
            agent = await self._registry.get(task.agent_name)
        except RegistryError as error:
            return _failure(task, taken, ErrorKind.REGISTRY_UNAVAILABLE, str(error), True)
        if agent is None:
            # Retriable: registering the agent is the fix, and the step's retry policy bounds the wait.
            return _failure(task, taken, ErrorKind.UNKNOWN_AGENT, f"no agent {task.agent_name!r} in the registry", True)
        try:
            # A call waits for its slots no longer than its deadline: the executor
            # times the attempt out then anyway, and the agent is not called in vain.
            async with self.slots.hold(
                agent.name, agent.max_concurrency, within_s=(task.deadline - utcnow()).total_seconds()
            ):
                started()
                self.calls += 1
                result = await self._caller.call(task, agent)  # never raises (but CancelledError)
        except TimeoutError:
            limits = f"SWITCHYARD_BRIDGE_CONCURRENCY {self.slots.size}"
            if agent.max_concurrency is not None:
                limits = f"agent {agent.name!r} max_concurrency {agent.max_concurrency}, {limits}"
            message = f"the deadline passed while the call waited for a free slot ({limits})"
            return _failure(task, taken, ErrorKind.TIMEOUT, message, True)
        return bounded(result, self.settings.max_message_bytes)


def bounded(result: AgentResult, limit: int) -> AgentResult:
    """The result, or, when its record would be over ``limit`` bytes, a final ``output_too_large`` failure.

    The agent's answer fitted the bridge's cap on an HTTP answer, but the
    result that carries its output (or its question) does not fit a message:
    publishing it would fail (and the run would wait for its deadline, then
    call the agent again). So the attempt fails at once, not retriable, naming
    both sizes. The failure keeps the result's ids and turn, and drops the
    output and the question (a FAILURE carries neither).
    """
    try:
        size = record_size(result.run_id.encode(), encode(result))
    except ValueError as error:  # text that is not text (a lone surrogate from a JSON escape)
        message = f"the agent's {_what(result)} cannot be carried: {str(error)[:200]}"
        return _failed(result, AgentError(kind=ErrorKind.MALFORMED_RESPONSE, message=message, retriable=False))
    if size <= limit:
        return result
    message = (
        f"the agent's {_what(result)} makes a result of {size} bytes, over the limit of {limit} bytes "
        "(SWITCHYARD_MAX_MESSAGE_BYTES)"
    )
    log.warning("%s: %s", result.correlation_id, message)
    return _failed(result, AgentError(kind=ErrorKind.OUTPUT_TOO_LARGE, message=message, retriable=False))


def _what(result: AgentResult) -> str:
    return "question" if result.question is not None else "output"


def _failed(result: AgentResult, error: AgentError) -> AgentResult:
    """The result as a FAILURE with ``error``: same ids, times and turn, no output, no question."""
    # model_copy does not validate: validating the copy keeps the status, error and question consistent.
    changed = result.model_dump() | {"status": ResultStatus.FAILURE, "output": None, "question": None, "error": error}
    return AgentResult.model_validate(changed)


def _failure(task: AgentTask, started: Any, kind: str, message: str, retriable: bool) -> AgentResult:
    return AgentResult(
        correlation_id=task.correlation_id,
        run_id=task.run_id,
        step_id=task.step_id,
        attempt=task.attempt,
        iteration=task.iteration,
        item=task.item,
        status=ResultStatus.FAILURE,
        error=AgentError(kind=kind, message=message, retriable=retriable),
        turn=task.turn,
        started_at=started,
        finished_at=utcnow(),
    )


class Taken(NamedTuple):
    """A task message as taken from the stream: what its acknowledgement needs, not the task.

    The intake keeps it until the task is acknowledged, which may be long
    after its call ended (while an earlier task of its partition runs), for up
    to ``MAX_UNACKNOWLEDGED`` tasks: so it holds the message without its value
    (up to ``SWITCHYARD_MAX_MESSAGE_BYTES``), and not the event, which holds the
    value too. See :func:`take_apart`.
    """

    stream: StreamT[Any]
    message: Message

    async def acknowledge(self) -> None:
        """Acknowledge the message through its stream, as ``Stream.ack`` does its event's."""
        # Stream.ack needs an event (it acknowledges event.message and tells the
        # sensors); one around the message alone is all it reads.
        await self.stream.ack(faust.Event(self.stream.app, None, None, None, self.message))


def take_apart(stream: StreamT[Any], event: EventT[Any]) -> tuple[Taken, bytes | None, bytes]:
    """Split a task event into what its acknowledgement needs and its key and value (the task's bytes).

    The value goes to the task's handler only, which drops it when it ends;
    the message forgets it (Faust has decoded the event, and the raw
    serializer's value is the message's bytes), so a task waiting for its
    acknowledgement holds only its :class:`Taken`.

    Returns:
        The message as taken, its key (None when not bytes) and its value (empty when not bytes).
    """
    key = event.key if isinstance(event.key, bytes) else None
    value = event.value if isinstance(event.value, bytes) else b""
    message = event.message
    message.value = None
    return Taken(stream, message), key, value


class BridgeApp(SwitchyardApp):
    """The bridge app, with its parts reachable for tests."""

    settings: Settings
    bridge: Bridge
    intake: Intake[Taken]
    tasks_topic: TopicT
    cancels_topic: TopicT
    results_topic: TopicT
    monitoring_topic: TopicT
    deadletter_topic: TopicT

    async def on_first_start(self) -> None:
        """Wait for the broker before Faust tries to reach it."""
        await self.wait_for_services(self.settings, self.bridge)
        await super().on_first_start()

    def on_rebalance_start(self) -> None:
        """Send away the calls waiting for a slot, and later ones, before Faust waits for every task it handed out.

        Faust (``stream_wait_empty``) lets a rebalance go on only once every
        message it delivered was acknowledged (with no time limit); calls
        waiting behind an agent's limit could hold it for many call times, and
        so could calls that reach their slots during the rebalance (the
        consumer takes a few more tasks from its buffer before Faust stops the
        flow). Neither is made: until the assignment (:meth:`reopen_after_rebalance`)
        every call is sent away at once, and its task goes to the partition's
        owner after the rebalance. Calls in flight end, as before. Faust calls
        this first thing when partitions are revoked, from its consumer's
        thread (aiokafka runs in a thread of its own): the calls' waits belong
        to the app's event loop, so they are ended there, before the revocation
        Faust hands over to that loop next.
        """
        super().on_rebalance_start()
        self.loop.call_soon_threadsafe(self._send_away_for_rebalance)

    def _send_away_for_rebalance(self) -> None:
        sent = self.bridge.slots.send_away()
        if sent:
            log.info("rebalance: %d calls waiting for a slot were sent away (the tasks are delivered again)", sent)

    def reopen_after_rebalance(self, sender: Any, /, *args: Any, signal: BaseSignalT[Any], **kwargs: Any) -> None:
        """Make calls and take tasks again once the partitions are assigned (the ``on_partitions_assigned`` signal).

        Faust sends the signal on the app's event loop at the end of the
        assignment, after the revocation waited for every task it handed out
        and committed, and before the flow resumes (the recovery that resumes
        it is signalled just before, and gets the loop only after this
        receiver, which never waits): the calls sent away and the tasks let go
        since the rebalance began are delivered again from the committed
        offsets. A rebalance that begins later sends calls away again; the
        consumer's thread does not start one before the assignment returns.

        Args:
            sender: The app.
            *args: The partitions assigned (every partition gets calls again: aiokafka revokes them all).
            signal: The signal.
            **kwargs: What else the signal passes.
        """
        self.bridge.slots.reopen()
        self.intake.reopen()

    async def on_stop(self) -> None:
        """Stop: calls waiting for a slot are not made; Faust then waits for the calls in flight and commits."""
        sent = self.bridge.slots.send_away(close=True)
        log.info(
            "stopping: %d calls in flight end first; %d calls waiting for a slot are left for the next bridge",
            self.bridge.slots.in_flight,
            sent,
        )
        await super().on_stop()
        await self.intake.close()


def create_app(settings: Settings | None = None) -> BridgeApp:
    """Build the bridge app.

    Args:
        settings: Defaults to settings from the environment.
    """
    settings = settings or Settings()
    app = BridgeApp(
        APP_ID,
        settings=settings,
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

    async def handle(message: Message, key: bytes | None, value: bytes, started: Callable[[], None]) -> bool:
        """Carry out one task message; False when its call was sent away (it stays unacknowledged)."""
        try:
            try:
                task = decode(AgentTask, value, max_bytes=limit)
            except MessageDecodeError as error:
                await deadletters.park(topics.TASKS, key, value, str(error))
                return True
            await app.bridge.execute(task, (message.partition, message.offset), started)
        except SentAway:
            return False
        except Exception as error:
            log.exception("could not process a task")
            await deadletters.park(topics.TASKS, key, value, f"internal error: {type(error).__name__}: {error}")
        return True

    async def publish(task: AgentTask, result: AgentResult) -> None:
        await results.send(key=task.run_id.encode(), value=encode(result))
        took_ms = (result.finished_at - result.started_at).total_seconds() * 1000
        update = MonitoringUpdate(
            run_id=task.run_id,
            step_id=task.step_id,
            attempt=task.attempt,
            iteration=task.iteration,
            item=task.item,
            status=f"AGENT_{result.status}",
            detail={"agent": task.agent_name, "took_ms": round(took_ms, 1), "source": "bridge"},
        )
        await monitoring.send(key=task.run_id.encode(), value=encode(update))

    app.bridge.publish = publish

    def release(taken: Taken) -> None:
        # Faust's rebalance and shutdown wait until this set is empty; the
        # message stays uncommitted, so the partition's next owner gets it again.
        app.consumer.unacked.discard(taken.message)

    app.intake = Intake(acknowledge=Taken.acknowledge, release=release, max_waiting=settings.bridge_max_waiting)
    app.on_partitions_assigned.connect(app.reopen_after_rebalance)

    async def call_agents(stream: StreamT[Any]) -> None:
        # One actor and manual acknowledgements: each task is handled in a task
        # of its own, and acknowledged by the intake when its call has ended.
        assert isinstance(stream, faust.Stream)  # what Faust hands an agent; noack() is not in StreamT
        tasks = stream.noack()
        async for event in tasks.events():
            taken, key, value = take_apart(tasks, event)
            await app.intake.take(taken, taken.message.tp, functools.partial(handle, taken.message, key, value))

    app.agent(app.tasks_topic, name="call_agents", concurrency=1)(call_agents)

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
                    "calls_in_flight": bridge.slots.in_flight,
                    "calls_waiting": bridge.slots.waiting,
                    "call_slots": bridge.slots.size,
                    "tasks_waiting": app.intake.waiting,
                    "tasks_unacknowledged": app.intake.unacknowledged,
                    "taking_tasks": not app.intake.full,
                    "agents": {
                        name: {
                            "in_flight": usage.in_flight,
                            "waiting": usage.waiting,
                            "max_concurrency": usage.limit.size,
                        }
                        for name, usage in sorted(bridge.slots.usage().items())
                    },
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
