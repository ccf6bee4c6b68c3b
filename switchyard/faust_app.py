"""What both Faust apps share: broker settings, the embedded-broker shim, waiting for services.

On the embedded Tansu broker (docs/architecture.md, "The embedded stack"):

* Tansu holds every fetch for the full ``fetch_max_wait_ms``, and Faust
  hard-codes 1500 ms for its consumer. :class:`EmbeddedBrokerTransport` builds
  the consumer with an :class:`AdaptiveFetchWait`: a short wait while records
  flow (each hop of a run waits for a fetch), a long one once the consumer has
  been idle for a while (so a stack at rest does not keep the broker answering
  empty fetches a hundred times a second). It is used only on that broker.
* ListOffsets(latest) answers the first offset of the newest batch + 1, which
  table recovery takes for the end of a changelog (a kill -9 restart could die
  with ``ConsistencyError``, or a rebuild skip the last records). The
  consumer's end offsets come from a fetch's high watermark instead
  (:func:`switchyard.kafka.end_offsets`), so producers batch as Faust's
  defaults say.
* Group joins wait half the session timeout: a 6 s session joins in about 3 s.

On a real Kafka, Faust's own defaults apply. On both, the consumer is
:mod:`switchyard.faust_fetch`'s, which never moves past records it did not
deliver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

import aiokafka
import faust
from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, TransportT
from mode import Service
from yarl import URL

from switchyard.embedded import port_is_open
from switchyard.faust_fetch import GuardedConsumer, GuardedConsumerThread, GuardedTransport
from switchyard.faust_recovery import SwitchyardTableManager
from switchyard.kafka import end_offsets
from switchyard.limits import kafka_sizes
from switchyard.logs import faust_logging_config
from switchyard.settings import Settings

__all__ = [
    "AdaptiveFetchWait",
    "EmbeddedBrokerTransport",
    "FetchWaits",
    "SwitchyardApp",
    "app_settings",
    "wait_for_broker",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchWaits:
    """How long the embedded broker may hold a fetch: busy, at rest, and when a consumer counts as at rest."""

    busy_ms: int
    idle_ms: int
    idle_after_s: float

    @classmethod
    def of(cls, settings: Settings) -> FetchWaits:
        """The waits the settings give."""
        return cls(
            busy_ms=settings.embedded_fetch_wait_ms,
            idle_ms=max(settings.embedded_idle_fetch_wait_ms, settings.embedded_fetch_wait_ms),
            idle_after_s=settings.embedded_idle_after_s,
        )


class AdaptiveFetchWait:
    """Sets an aiokafka fetcher's wait before each fetch: short while records come, long once idle.

    aiokafka builds every fetch request from the fetcher's ``_fetch_max_wait_ms``
    and learns whether a fetch brought records from ``_proc_fetch_request``
    (true when it did); this wraps that method on one fetcher instance.

    Args:
        waits: The two waits and the idle time.
        clock: Monotonic seconds (a test passes its own).
    """

    EMPTY_FETCHES_WHEN_IDLE: Final = 3
    """Empty answers in a row, besides the idle time, before the long wait: a consumer that was
    busy processing what it had (and so sent no fetch for a while) is not taken for idle at once."""

    def __init__(self, waits: FetchWaits, clock: Callable[[], float] = time.monotonic) -> None:
        self.waits = waits
        self._clock = clock
        self._last_records = clock()
        self._empty = 0

    def wait_ms(self, got_records: bool) -> int:
        """The wait of the next fetch, after one that brought records or not."""
        now = self._clock()
        if got_records:
            self._last_records, self._empty = now, 0
        else:
            self._empty += 1
        idle = now - self._last_records >= self.waits.idle_after_s and self._empty >= self.EMPTY_FETCHES_WHEN_IDLE
        return self.waits.idle_ms if idle else self.waits.busy_ms

    def install(self, fetcher: Any) -> None:
        """Wrap ``fetcher._proc_fetch_request`` so that each answer sets the next wait."""
        process = fetcher._proc_fetch_request
        fetcher._fetch_max_wait_ms = self.waits.busy_ms

        async def proc_fetch_request(*args: Any, **kwargs: Any) -> bool:
            got_records = bool(await process(*args, **kwargs))
            fetcher._fetch_max_wait_ms = self.wait_ms(got_records)
            return got_records

        fetcher._proc_fetch_request = proc_fetch_request


class _EmbeddedBrokerConsumerThread(GuardedConsumerThread):
    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        waits = cast(SwitchyardApp, self.app).fetch_waits
        # The fetcher is built from this attribute when the consumer starts, then adapts.
        consumer._fetch_max_wait_ms = waits.busy_ms
        start = consumer.start

        async def start_adapting() -> None:
            await start()
            AdaptiveFetchWait(waits).install(consumer._fetcher)

        consumer.start = start_adapting
        return consumer

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        # Table recovery reads to here: Tansu's ListOffsets is off by one batch.
        consumer = self._ensure_consumer()
        ends = await end_offsets(
            consumer, [TopicPartition(tp.topic, tp.partition) for tp in partitions], embedded_broker=True
        )
        return {TP(tp.topic, tp.partition): offset for tp, offset in ends.items()}


class _EmbeddedBrokerConsumer(GuardedConsumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _EmbeddedBrokerConsumerThread(self, loop=self.loop, beacon=self.beacon)


class EmbeddedBrokerTransport(GuardedTransport):
    """The guarded transport with adaptive fetch waits and true partition ends, for Tansu only."""

    Consumer = _EmbeddedBrokerConsumer


S = TypeVar("S", bound=Service)


class SwitchyardApp(faust.App):
    """A Faust app on :class:`~switchyard.faust_fetch.GuardedTransport` (:class:`EmbeddedBrokerTransport` on Tansu)."""

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        self.embedded_broker = settings.embedded_broker
        self.fetch_waits = FetchWaits.of(settings)
        super().__init__(*args, **kwargs)

    async def wait_for_services(self, settings: Settings, *services: Service) -> None:
        """Wait for the broker, then start ``services`` (the database), each bounded.

        On a timeout, log one clear line and exit 1: a traceback would bury
        the one thing an operator needs to read.
        """
        try:
            await asyncio.to_thread(wait_for_broker, settings)
        except TimeoutError as error:
            log.critical("%s; exiting (set SWITCHYARD_BROKER_URL, or start the broker)", error)
            raise SystemExit(1) from None
        for service in services:
            try:
                await service.maybe_start()
            except TimeoutError as error:
                log.critical("%s; exiting (check SWITCHYARD_DATABASE_URL)", error)
                raise SystemExit(1) from None

    def attach(self, service: S) -> S:
        """Run ``service`` with the app; returns it (Faust accepts instances; its annotation says classes)."""
        self.service(cast(Any, service))
        return service

    @property
    def ready(self) -> bool:
        """Whether the worker owns its partitions and its tables have recovered (not mid-rebalance)."""
        recovery = getattr(self.tables, "recovery", None)  # the concrete TableManager has it; its interface not
        return not self.rebalancing and recovery is not None and recovery.completed.is_set()

    def _new_transport(self) -> TransportT:
        if self.embedded_broker:
            return EmbeddedBrokerTransport(self.conf.broker_consumer, self)
        if self.conf.broker_consumer[0].scheme in {"kafka", "aiokafka"}:
            return GuardedTransport(self.conf.broker_consumer, self)
        return super()._new_transport()


def app_settings(settings: Settings, *, web_port: int) -> dict[str, Any]:
    """Faust settings common to both apps.

    Values are raw bytes on every topic: Switchyard decodes them itself, so a
    malformed message becomes a dead letter with a reason instead of a Faust
    decode error.
    """
    conf: dict[str, Any] = {
        "broker": settings.broker,
        "topic_partitions": settings.topic_partitions,
        "topic_replication_factor": 1,
        "key_serializer": "raw",
        "value_serializer": "raw",
        "consumer_auto_offset_reset": "earliest",
        "web_bind": settings.web_bind,
        "web_port": web_port,
        "web_host": settings.web_host,
        "store": "rocksdb://",
        # Faust's own recovery can drop events queued while it seeks (see the module).
        "TableManager": SwitchyardTableManager,
        # No record over SWITCHYARD_MAX_MESSAGE_BYTES is sent (switchyard.limits), and every one fits a request.
        **kafka_sizes(settings),
    }
    logging_config = faust_logging_config(settings)
    if logging_config is not None:
        conf["logging_config"] = logging_config
    if settings.embedded_broker:
        conf.update(
            broker_session_timeout=6.0,
            broker_heartbeat_interval=1.0,
            broker_request_timeout=30.0,
        )
    return conf


def wait_for_broker(settings: Settings, timeout: float | None = None) -> None:
    """Block until the broker accepts TCP connections, logging while it waits.

    Processes started together (Procfile, compose) come up in any order; a
    worker waits for its broker instead of crashing.

    Raises:
        TimeoutError: The broker did not answer within the timeout.
    """
    limit = settings.wait_for_services_s if timeout is None else timeout
    hosts = [URL(f"kafka://{part}") for part in settings.bootstrap_servers.split(",")]
    deadline = time.monotonic() + limit
    announced = False
    while True:
        if any(port_is_open(h.host or "127.0.0.1", h.port or 9092) for h in hosts):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no Kafka broker answers at {settings.bootstrap_servers} after {limit:g}s")
        if not announced:
            log.warning("waiting for the Kafka broker at %s (up to %gs)", settings.bootstrap_servers, limit)
            announced = True
        time.sleep(0.5)
