"""Nothing over the size limit is ever produced: one setting, checked before every send.

``SWITCHYARD_MAX_MESSAGE_BYTES`` is the most a record (key and value) may
take. From it come the producers' request size and the consumers' fetch size
(:func:`kafka_sizes`) and, on a real broker, the topics' ``max.message.bytes``
(:func:`topic_config`). A producer that meets a record over its request size
raises inside Faust's background sender and crashes the worker, so every send
is checked here first: :class:`BoundedSender` refuses (raises
:class:`RecordTooLarge`, which the caller handles) and :class:`DeadLetters`
cuts a dead letter to fit instead (a dead letter is never lost).
"""

from __future__ import annotations

import logging
from typing import Any, Final, Protocol

from models.messages import DeadLetterRecord, encode
from switchyard.settings import Settings

__all__ = [
    "RECORD_OVERHEAD_BYTES",
    "BoundedSender",
    "DeadLetters",
    "RecordTooLarge",
    "kafka_sizes",
    "record_size",
    "topic_config",
]

log = logging.getLogger(__name__)

RECORD_OVERHEAD_BYTES: Final = 4096
"""What Kafka adds to a record's key and value (batch and record headers), with room to spare."""


class _Topic(Protocol):
    async def send(self, *, key: bytes, value: bytes) -> Any: ...


class RecordTooLarge(ValueError):
    """A record that must not be produced: its key and value take more than the limit.

    Attributes:
        topic: Where it was going.
        size: Its key and value, in bytes.
        limit: ``SWITCHYARD_MAX_MESSAGE_BYTES``.
    """

    def __init__(self, topic: str, size: int, limit: int) -> None:
        super().__init__(f"a record of {size} bytes for {topic} is over the limit of {limit} bytes")
        self.topic = topic
        self.size = size
        self.limit = limit


def record_size(key: bytes | None, value: bytes) -> int:
    """The bytes a record's key and value take (what the limit counts)."""
    return len(key or b"") + len(value)


class BoundedSender:
    """A topic that refuses, before producing, any record over the limit.

    Args:
        topic: The Faust topic (anything with ``send(key=, value=)``).
        name: The topic's name, for messages.
        limit: ``SWITCHYARD_MAX_MESSAGE_BYTES``.
    """

    def __init__(self, topic: _Topic, name: str, limit: int) -> None:
        self.topic = topic
        self.name = name
        self.limit = limit

    async def send(self, *, key: bytes, value: bytes) -> Any:
        """Send one record.

        Raises:
            RecordTooLarge: It is over the limit; nothing was sent.
        """
        size = record_size(key, value)
        if size > self.limit:
            raise RecordTooLarge(self.name, size, self.limit)
        return await self.topic.send(key=key, value=value)


class DeadLetters:
    """Parks what could not be processed on the dead-letter topic, cut to fit the limit if it must be.

    Args:
        topic: The dead-letter topic.
        app: The app that parks (named in each record).
        limit: ``SWITCHYARD_MAX_MESSAGE_BYTES``.
    """

    def __init__(self, topic: _Topic, app: str, limit: int) -> None:
        self.topic = topic
        self.app = app
        self.limit = limit
        self.parked = 0

    async def park(self, source_topic: str, key: bytes | None, payload: bytes, reason: str) -> DeadLetterRecord:
        """Send ``payload`` (from ``source_topic``) to the dead-letter topic with the reason.

        Returns:
            The record sent (``truncated`` when only the start of the payload fitted).
        """
        record = DeadLetterRecord.of(source_topic, key, payload, reason, self.app, max_bytes=self.limit)
        log.warning(
            "dead letter from %s (key %r, %d bytes%s): %s",
            source_topic,
            record.key,
            len(payload),
            ", kept its start" if record.truncated else "",
            record.reason,
        )
        await self.topic.send(key=record.record_key(), value=encode(record))
        self.parked += 1
        return record

    async def note(self, run_id: str, reason: str) -> DeadLetterRecord:
        """Park a note about a run that did not come from a message (an effect of the executor's own)."""
        return await self.park("(executor)", run_id.encode(), b"", reason)


def kafka_sizes(settings: Settings) -> dict[str, int]:
    """Faust's producer request size and consumer fetch size for the limit."""
    request = settings.max_message_bytes + RECORD_OVERHEAD_BYTES
    return {
        "producer_max_request_size": request,
        # At least one whole record per partition per fetch (and Faust's default of 1 MiB).
        "consumer_max_fetch_size": max(1024**2, request),
    }


def topic_config(settings: Settings) -> dict[str, str]:
    """Per-topic settings Switchyard asks for when it creates a topic.

    On a real broker a topic takes records up to the limit (its
    ``max.message.bytes``). The embedded broker gets none: it has no such
    limit to raise.
    """
    if settings.embedded_broker:
        return {}
    return {"max.message.bytes": str(settings.max_message_bytes + RECORD_OVERHEAD_BYTES)}
