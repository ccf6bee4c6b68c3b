"""End offsets on the real embedded broker: right after batched produces, where ListOffsets is not."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import cast

import pytest
from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from switchyard.embedded import EmbeddedBroker, start_broker
from switchyard.kafka import end_offsets, fetched_high_watermarks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with log.open("ab") as output:
        running: EmbeddedBroker = start_broker(port, output=output)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        running.stop()


async def _produce(servers: str, topic: str, batches: dict[int, list[int]]) -> dict[int, int]:
    """Produce, per partition, batches of the given sizes; returns each partition's last offset."""
    producer = AIOKafkaProducer(bootstrap_servers=servers, linger_ms=20)
    await producer.start()
    last: dict[int, int] = {}
    try:
        for partition, sizes in batches.items():
            for size in sizes:
                sent = [await producer.send(topic, b"x", partition=partition) for _ in range(size)]
                for metadata in await asyncio.gather(*sent):
                    last[partition] = metadata.offset
    finally:
        await producer.stop()
    return last


async def _ends(servers: str, topic: str, partitions: int, *, embedded: bool) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=servers)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp.partition: end for tp, end in (await end_offsets(consumer, tps, embedded_broker=embedded)).items()}
    finally:
        await consumer.stop()


async def test_end_offsets_are_one_past_the_last_record_of_batched_produces(broker: str) -> None:
    batches = {0: [25, 7], 1: [3], 3: [1, 1, 12]}
    last = await _produce(broker, "t-ends", batches)
    assert last == {0: 31, 1: 2, 3: 13}
    ends = await _ends(broker, "t-ends", 4, embedded=True)
    assert ends == {0: 32, 1: 3, 2: 0, 3: 14}
    # What the shim is for: ListOffsets alone stops at the newest batch's first record + 1.
    listed = await _ends(broker, "t-ends", 4, embedded=False)
    assert listed[0] < 32


class _Cluster:
    def __init__(self, leader: int | None) -> None:
        self.leader = leader

    def leader_for_partition(self, tp: TopicPartition) -> int | None:
        return self.leader


class _Answer:
    def __init__(self, topics: list[tuple[str, list[tuple[int, int, int]]]]) -> None:
        self.topics = topics


class _FlakyClient:
    """Fails ``failures`` sends, then answers each asked partition with (error code, high watermark)."""

    def __init__(self, failures: int, answers: dict[int, tuple[int, int]], leader: int | None = 0) -> None:
        self.cluster = _Cluster(leader)
        self.failures = failures
        self.answers = answers
        self.sends = 0

    async def send(self, node_id: int, request: object) -> _Answer:
        self.sends += 1
        if self.sends <= self.failures:
            raise KafkaError("broker not ready")
        return _Answer([("t", [(p, code, hw) for p, (code, hw) in self.answers.items()])])


async def test_a_failed_high_watermark_fetch_is_tried_again() -> None:
    client = _FlakyClient(failures=2, answers={0: (0, 9), 1: (0, 4)})
    listed = {TopicPartition("t", 0): 5, TopicPartition("t", 1): 4, TopicPartition("t", 2): 0}
    ends = await fetched_high_watermarks(cast(AIOKafkaClient, client), listed, attempts=3)
    assert ends == {TopicPartition("t", 0): 9, TopicPartition("t", 1): 4, TopicPartition("t", 2): 0}
    assert client.sends == 3


async def test_a_leader_that_never_answers_is_an_error_not_the_wrong_end() -> None:
    client = _FlakyClient(failures=9, answers={})
    with pytest.raises(KafkaError):
        await fetched_high_watermarks(cast(AIOKafkaClient, client), {TopicPartition("t", 0): 5}, attempts=2)
    with pytest.raises(KafkaError, match="no leader"):
        await fetched_high_watermarks(
            cast(AIOKafkaClient, _FlakyClient(0, {}, leader=None)), {TopicPartition("t", 0): 5}
        )


async def test_a_partition_answered_with_an_error_keeps_its_listed_offset() -> None:
    client = _FlakyClient(failures=0, answers={0: (6, 99)})
    ends = await fetched_high_watermarks(cast(AIOKafkaClient, client), {TopicPartition("t", 0): 5})
    assert ends == {TopicPartition("t", 0): 5}
