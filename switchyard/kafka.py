"""Plain Kafka clients for processes that are not Faust workers (the CLI, the demo, tests).

Topics are created with the same partition count the workers use, so that a
producer that comes first does not leave a topic with the broker's default
count and break co-partitioning (docs/architecture.md rule 1).

:func:`end_offsets` is the one place that knows where a partition ends: on the
embedded Tansu broker ListOffsets(latest) answers the first offset of the
newest batch + 1, while a fetch reports the true high watermark; the Faust
workers' consumers use it too (:mod:`switchyard.faust_app`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Collection
from typing import Final

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.protocol.fetch import FetchRequest

from switchyard import topics
from switchyard.limits import RecordTooLarge, kafka_sizes, record_size, topic_config
from switchyard.settings import Settings

__all__ = ["RUN_KEYED_TOPICS", "end_offsets", "ensure_topics", "fetched_high_watermarks", "produce"]

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


_HIGH_WATERMARK_FETCH_WAIT_MS: Final = 10
"""Tansu answers a fetch with a zero wait with no partitions at all; it holds any other wait in full."""


async def end_offsets(
    consumer: AIOKafkaConsumer, partitions: Collection[TopicPartition], *, embedded_broker: bool
) -> dict[TopicPartition, int]:
    """Where each partition ends (the offset of the next record), right on every broker.

    Args:
        consumer: A started consumer (its position is not changed).
        partitions: The partitions.
        embedded_broker: Whether the broker is the embedded Tansu, whose
            ListOffsets(latest) is off by the size of the newest batch; then the
            answer comes from the high watermark of a fetch.
    """
    listed: dict[TopicPartition, int] = dict(await consumer.end_offsets(list(partitions)))
    if not embedded_broker:
        return listed
    return await fetched_high_watermarks(consumer._client, listed)


async def fetched_high_watermarks(
    client: AIOKafkaClient, listed: dict[TopicPartition, int], *, attempts: int = 5
) -> dict[TopicPartition, int]:
    """The high watermark a fetch reports for each partition, starting from its ListOffsets answer.

    One small fetch per leader, from the last listed offset (a record that
    exists, so the answer holds the partition). A request that fails is tried
    again (``attempts`` in all, as aiokafka's own ``end_offsets`` retries), then
    the error is raised: the listed offset is the very answer that breaks
    table recovery, so it is kept only, with a warning, for a partition the
    broker answered with an error.

    Args:
        client: The consumer's ``AIOKafkaClient``.
        listed: ListOffsets(latest) per partition.
        attempts: Tries per leader.

    Raises:
        KafkaError: A leader did not answer after ``attempts`` tries.
    """
    ends = dict(listed)
    by_leader: dict[int, dict[str, list[tuple[int, int, int]]]] = defaultdict(lambda: defaultdict(list))
    for tp, offset in listed.items():
        if offset <= 0:
            continue  # empty: nothing to fetch, and the end is 0
        leader = client.cluster.leader_for_partition(tp)
        if leader is None or leader < 0:
            raise KafkaError(f"no leader known for {tp.topic}[{tp.partition}]")
        by_leader[leader][tp.topic].append((tp.partition, offset - 1, 1))  # 1 byte: the broker sends one batch
    for leader, wanted in by_leader.items():
        request = FetchRequest(_HIGH_WATERMARK_FETCH_WAIT_MS, 1, 1, 0, list(wanted.items()))
        for attempt in range(1, attempts + 1):
            try:
                response = await client.send(leader, request)
                break
            except KafkaError as error:
                if attempt == attempts:
                    raise
                log.warning("high watermark fetch from broker %s failed (%s); trying again", leader, error)
                await asyncio.sleep(0.2 * attempt)
        for topic, answers in response.topics:
            for partition, error_code, high_watermark, *_ in answers:
                tp = TopicPartition(topic, partition)
                if tp not in ends:
                    continue
                if error_code != 0:
                    log.warning("%s[%d]: the broker answered error %d; using ListOffsets", topic, partition, error_code)
                elif high_watermark >= ends[tp]:
                    ends[tp] = high_watermark
    return ends
