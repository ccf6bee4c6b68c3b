"""Plain Kafka clients for processes that are not Faust workers (the CLI, the demo, tests).

Topics are created with the same partition count the workers use, so that a
producer that comes first does not leave a topic with the broker's default
count and break co-partitioning (DESIGN.md rule 1).
"""

from __future__ import annotations

import contextlib
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from switchyard import topics
from switchyard.limits import RecordTooLarge, kafka_sizes, record_size, topic_config
from switchyard.settings import Settings

__all__ = ["RUN_KEYED_TOPICS", "ensure_topics", "produce"]

log = logging.getLogger(__name__)

RUN_KEYED_TOPICS = (
    topics.PLANS,
    topics.RESULTS,
    topics.CONTROL,
    topics.TASKS,
    topics.TASK_CANCELS,
    topics.MONITORING,
)


async def ensure_topics(settings: Settings) -> None:
    """Create Switchyard's topics that do not exist yet (idempotent)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        config = topic_config(settings)
        wanted = [
            NewTopic(name, num_partitions=settings.topic_partitions, replication_factor=1, topic_configs=config)
            for name in RUN_KEYED_TOPICS
            if name not in existing
        ]
        if topics.DEADLETTER not in existing:
            wanted.append(NewTopic(topics.DEADLETTER, num_partitions=1, replication_factor=1, topic_configs=config))
        for topic in wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # created by a worker meanwhile
                await admin.create_topics([topic])
    finally:
        await admin.close()


async def produce(settings: Settings, topic: str, *, key: bytes, value: bytes) -> None:
    """Send one message and wait for the broker's acknowledgement.

    Raises:
        RecordTooLarge: The record is over ``SWITCHYARD_MAX_MESSAGE_BYTES``; nothing was sent.
    """
    size = record_size(key, value)
    if size > settings.max_message_bytes:
        raise RecordTooLarge(topic, size, settings.max_message_bytes)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        request_timeout_ms=10_000,
        max_request_size=kafka_sizes(settings)["producer_max_request_size"],
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()
