"""switchyard/limits.py: nothing over SWITCHYARD_MAX_MESSAGE_BYTES is produced; dead letters are cut to fit.

Also ``switchyard.kafka.produce``, which must refuse an oversize record before it connects.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from models.messages import DeadLetterRecord, decode
from switchyard.kafka import produce
from switchyard.limits import (
    RECORD_OVERHEAD_BYTES,
    BoundedSender,
    DeadLetters,
    RecordTooLarge,
    kafka_sizes,
    record_size,
    topic_config,
)
from switchyard.settings import Settings


@dataclass
class FakeTopic:
    sent: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def send(self, *, key: bytes, value: bytes) -> str:
        self.sent.append((key, value))
        return "sent"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No .env file and no SWITCHYARD_* variables that would change the settings under test."""
    monkeypatch.chdir(tmp_path)
    for name in ("SWITCHYARD_BROKER_URL", "SWITCHYARD_MAX_MESSAGE_BYTES", "SWITCHYARD_BROKER_PORT"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- record_size


def test_record_size_counts_key_and_value() -> None:
    assert record_size(b"abc", b"12345") == 8
    assert record_size(None, b"12345") == 5
    assert record_size(b"", b"") == 0


# -------------------------------------------------------------- BoundedSender


async def test_a_record_over_the_limit_is_refused_and_nothing_is_sent() -> None:
    topic = FakeTopic()
    sender = BoundedSender(topic, "orchestrator.tasks", 100)
    with pytest.raises(RecordTooLarge) as raised:
        await sender.send(key=b"k", value=b"v" * 100)
    assert topic.sent == []
    error = raised.value
    assert error.topic == "orchestrator.tasks"
    assert error.size == 101
    assert error.limit == 100
    assert "101" in str(error)
    assert "100" in str(error)
    assert "orchestrator.tasks" in str(error)
    assert isinstance(error, ValueError)


async def test_a_record_at_the_limit_is_sent() -> None:
    topic = FakeTopic()
    sender = BoundedSender(topic, "orchestrator.tasks", 100)
    assert await sender.send(key=b"k" * 10, value=b"v" * 90) == "sent"
    assert topic.sent == [(b"k" * 10, b"v" * 90)]


async def test_a_record_below_the_limit_is_sent() -> None:
    topic = FakeTopic()
    sender = BoundedSender(topic, "t", 100)
    await sender.send(key=b"", value=b"{}")
    assert topic.sent == [(b"", b"{}")]


async def test_the_key_counts_towards_the_limit() -> None:
    topic = FakeTopic()
    sender = BoundedSender(topic, "t", 100)
    with pytest.raises(RecordTooLarge) as raised:
        await sender.send(key=b"k" * 11, value=b"v" * 90)  # the value alone would fit
    assert raised.value.size == 101
    assert topic.sent == []


# --------------------------------------------------------------- DeadLetters


@pytest.mark.parametrize("limit", [16_384, 100_000])
@pytest.mark.parametrize(
    "payload",
    [b"", b'{"run_id": "r"}', b"x" * 2_000_000, bytes(range(256)) * 4000, b'"' * 300_000, ("\u20ac" * 90_000).encode()],
)
async def test_park_always_sends_one_record_that_fits(limit: int, payload: bytes) -> None:
    topic = FakeTopic()
    dead = DeadLetters(topic, "test-app", limit)
    record = await dead.park("orchestrator.results", b"run-1", payload, "could not decode")
    assert dead.parked == 1
    assert len(topic.sent) == 1
    key, value = topic.sent[0]
    assert record_size(key, value) <= limit
    assert key == b"run-1"
    sent = decode(DeadLetterRecord, value)
    assert sent == record
    assert sent.app == "test-app"
    assert sent.source_topic == "orchestrator.results"
    assert sent.reason == "could not decode"
    assert sent.original_bytes == len(payload)
    assert sent.original_sha256 == hashlib.sha256(payload).hexdigest()
    assert sent.truncated == (len(payload) > limit)  # the big ones here are all well over either limit
    kept = sent.payload.encode() if sent.payload is not None else b""
    if sent.payload_base64 is not None:
        kept = base64.b64decode(sent.payload_base64)
    assert payload.startswith(kept)


async def test_park_keeps_a_small_payload_whole() -> None:
    topic = FakeTopic()
    dead = DeadLetters(topic, "test-app", 16_384)
    record = await dead.park("orchestrator.plans", None, b'{"broken":', "not JSON")
    assert not record.truncated
    assert record.payload == '{"broken":'
    assert topic.sent[0][0] == b""  # no key: an empty record key


async def test_park_cuts_a_big_payload_and_says_so() -> None:
    topic = FakeTopic()
    dead = DeadLetters(topic, "test-app", 16_384)
    record = await dead.park("orchestrator.plans", b"run-1", b"x" * 2_000_000, "too large")
    assert record.truncated
    assert record.payload is not None
    assert 0 < len(record.payload) < 16_384


async def test_park_counts_every_parked_record() -> None:
    topic = FakeTopic()
    dead = DeadLetters(topic, "test-app", 16_384)
    for i in range(3):
        await dead.park("t", b"k", b"x" * (i * 10_000), "r")
    assert dead.parked == 3
    assert len(topic.sent) == 3
    assert all(record_size(k, v) <= 16_384 for k, v in topic.sent)


async def test_note_parks_a_record_about_a_run_with_no_payload() -> None:
    topic = FakeTopic()
    dead = DeadLetters(topic, "test-app", 16_384)
    record = await dead.note("run-7", "run 'run-7' failed with state_too_large: it cannot be retried")
    assert dead.parked == 1
    key, value = topic.sent[0]
    assert key == b"run-7"
    sent = decode(DeadLetterRecord, value)
    assert sent == record
    assert sent.source_topic == "(executor)"
    assert sent.key == "run-7"
    assert sent.reason == "run 'run-7' failed with state_too_large: it cannot be retried"
    assert sent.payload == ""
    assert sent.original_bytes == 0
    assert sent.original_sha256 == hashlib.sha256(b"").hexdigest()
    assert not sent.truncated


async def test_note_with_a_huge_reason_still_fits() -> None:
    topic = FakeTopic()
    dead = DeadLetters(topic, "test-app", 16_384)
    await dead.note("run-7", "why " * 50_000)
    key, value = topic.sent[0]
    assert record_size(key, value) <= 16_384
    assert len(decode(DeadLetterRecord, value).reason) == 2000


# --------------------------------------------------------------- kafka sizes


@pytest.mark.parametrize("limit", [16_384, 500_000, 1_000_000, 1_048_576, 10_000_000, 100_000_000])
def test_kafka_sizes_leave_room_for_one_whole_record(clean_env: None, limit: int) -> None:
    sizes = kafka_sizes(Settings(max_message_bytes=limit))
    request = sizes["producer_max_request_size"]
    fetch = sizes["consumer_max_fetch_size"]
    assert request >= limit + RECORD_OVERHEAD_BYTES
    assert fetch >= request
    assert fetch >= 1024**2
    assert set(sizes) == {"producer_max_request_size", "consumer_max_fetch_size"}


def test_the_record_overhead_is_room_for_kafkas_headers() -> None:
    assert RECORD_OVERHEAD_BYTES >= 1024


# -------------------------------------------------------------- topic config


def test_the_embedded_broker_gets_no_topic_config(clean_env: None) -> None:
    settings = Settings()
    assert settings.embedded_broker
    assert topic_config(settings) == {}
    assert topic_config(Settings(max_message_bytes=5_000_000)) == {}


@pytest.mark.parametrize("limit", [16_384, 1_000_000, 5_000_000])
def test_a_real_broker_gets_max_message_bytes_for_the_limit(clean_env: None, limit: int) -> None:
    settings = Settings(broker_url="kafka://h:9092", max_message_bytes=limit)
    assert not settings.embedded_broker
    config = topic_config(settings)
    assert set(config) == {"max.message.bytes"}
    assert int(config["max.message.bytes"]) >= limit
    assert int(config["max.message.bytes"]) <= kafka_sizes(settings)["producer_max_request_size"]


# ---------------------------------------------------------- kafka.produce


async def test_produce_refuses_an_oversize_record_before_connecting(clean_env: None) -> None:
    # Nothing listens on port 9: any attempt to connect would fail with a connection error instead.
    settings = Settings(broker_url="kafka://127.0.0.1:9", max_message_bytes=16_384)
    with pytest.raises(RecordTooLarge) as raised:
        await produce(settings, "orchestrator.plans", key=b"run-1", value=b"x" * 16_384)
    assert raised.value.topic == "orchestrator.plans"
    assert raised.value.size == 16_384 + 5
    assert raised.value.limit == 16_384


async def test_produce_counts_the_key(clean_env: None) -> None:
    settings = Settings(broker_url="kafka://127.0.0.1:9", max_message_bytes=16_384)
    with pytest.raises(RecordTooLarge):
        await produce(settings, "orchestrator.plans", key=b"k" * 16_384, value=b"{}")
