"""What both Faust apps share: broker settings, the embedded-broker shim, waiting for services.

On the embedded Tansu broker (DESIGN.md, "The embedded stack"):

* Tansu holds every fetch for the full ``fetch_max_wait_ms``, and Faust
  hard-codes 1500 ms for its consumer. :class:`EmbeddedBrokerTransport` builds
  the consumer with a short wait instead; it is used only on that broker.
* ListOffsets(latest) is off by one batch unless batches hold one record, so
  ``producer_max_batch_size=1`` (otherwise table recovery can die with
  ``ConsistencyError`` after a kill -9).
* Group joins wait half the session timeout: a 6 s session joins in about 3 s.

On a real Kafka, Faust's own defaults apply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final, TypeVar, cast

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TransportT
from mode import Service
from yarl import URL

from switchyard.embedded import port_is_open
from switchyard.faust_recovery import SwitchyardTableManager
from switchyard.limits import kafka_sizes
from switchyard.logs import faust_logging_config
from switchyard.settings import Settings

__all__ = [
    "EMBEDDED_FETCH_WAIT_MS",
    "EmbeddedBrokerTransport",
    "SwitchyardApp",
    "app_settings",
    "wait_for_broker",
]

log = logging.getLogger(__name__)

EMBEDDED_FETCH_WAIT_MS: Final = 10


class _ShortFetchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # The fetcher is built from this attribute when the consumer starts.
        consumer._fetch_max_wait_ms = EMBEDDED_FETCH_WAIT_MS
        return consumer


class _ShortFetchConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ShortFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)


class EmbeddedBrokerTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport with a short consumer fetch wait, for Tansu only."""

    Consumer = _ShortFetchConsumer


S = TypeVar("S", bound=Service)


class SwitchyardApp(faust.App):
    """A Faust app that uses :class:`EmbeddedBrokerTransport` on the embedded broker."""

    def __init__(self, *args: Any, embedded_broker: bool = False, **kwargs: Any) -> None:
        self.embedded_broker = embedded_broker
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
            producer_max_batch_size=1,
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
