"""Dead letters that always fit (``DeadLetterRecord.of(..., max_bytes=)``) and submission fingerprints."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import JsonValue

from models.messages import (
    DeadLetterRecord,
    WorkflowSubmission,
    decode,
    encode,
    submission_fingerprint,
)
from tests.models.run_builders import make_plan

LIMITS = [16_384, 100_000, 1_000_000]


def record_bytes(record: DeadLetterRecord) -> int:
    return len(record.record_key()) + len(encode(record))


def kept_bytes(record: DeadLetterRecord) -> bytes:
    """The payload bytes the record holds (text or base64)."""
    if record.payload is not None:
        assert record.payload_base64 is None
        return record.payload.encode("utf-8")
    if record.payload_base64 is not None:
        return base64.b64decode(record.payload_base64, validate=True)
    return b""


def assert_dead_letter(
    record: DeadLetterRecord, payload: bytes, reason: str, max_bytes: int, *, key: bytes | None = b"run-1"
) -> None:
    assert record.fits(max_bytes)
    assert record_bytes(record) <= max_bytes
    assert record.original_bytes == len(payload)
    assert record.original_sha256 == hashlib.sha256(payload).hexdigest()  # of the whole original
    assert record.source_topic == "orchestrator.results"
    assert record.app == "test-app"
    kept = kept_bytes(record)
    assert payload.startswith(kept)  # a real prefix
    if record.truncated:
        assert record.reason == (reason if len(reason) <= 2000 else reason[:1997] + "...")
    else:
        assert kept == payload
        assert record.reason == reason
    # What goes on the topic reads back as the same record.
    assert decode(DeadLetterRecord, encode(record)) == record
    if key is not None and len(key) <= 1024:
        assert record.record_key() == key


def park(payload: bytes, reason: str = "could not decode", max_bytes: int | None = 16_384, key: bytes | None = None):
    return DeadLetterRecord.of(
        "orchestrator.results", b"run-1" if key is None else key, payload, reason, "test-app", max_bytes=max_bytes
    )


# ---------------------------------------------------------------- small ones


@pytest.mark.parametrize("payload", [b"", b"{}", b'{"run_id": "r"}', "h\u00e9llo \u20ac".encode(), b"\xff\xfe\x00"])
def test_a_small_payload_is_kept_whole(payload: bytes) -> None:
    record = park(payload, max_bytes=16_384)
    assert not record.truncated
    assert kept_bytes(record) == payload
    assert record == park(payload, max_bytes=None).model_copy(update={"received_at": record.received_at})
    assert_dead_letter(record, payload, "could not decode", 16_384)


def test_a_small_text_payload_is_text_and_a_binary_one_base64() -> None:
    text = park(b'{"a": 1}')
    assert text.payload == '{"a": 1}'
    assert text.payload_base64 is None
    binary = park(b"\x80\x81")
    assert binary.payload is None
    assert binary.payload_base64 == base64.b64encode(b"\x80\x81").decode()


# ------------------------------------------------------------------ big ones


@pytest.mark.parametrize("max_bytes", LIMITS)
def test_900_kb_that_are_not_utf8_are_cut_to_fit_as_base64(max_bytes: int) -> None:
    payload = bytes(range(256)) * 3600  # 921,600 bytes, not UTF-8
    record = park(payload, max_bytes=max_bytes)
    assert record.truncated
    assert record.payload is None
    assert record.payload_base64 is not None
    assert len(kept_bytes(record)) > 0
    assert_dead_letter(record, payload, "could not decode", max_bytes)


@pytest.mark.parametrize("max_bytes", LIMITS)
def test_700_000_quotes_are_cut_to_fit_although_each_takes_two_bytes_in_json(max_bytes: int) -> None:
    payload = b'"' * 700_000
    record = park(payload, max_bytes=max_bytes)
    assert record.truncated
    assert record.payload is not None
    assert set(record.payload) == {'"'}
    assert_dead_letter(record, payload, "could not decode", max_bytes)
    assert record.payload == payload.decode()[: len(record.payload)]


@pytest.mark.parametrize("char", ["\u00e9", "\u20ac", "\U0001f600"])
@pytest.mark.parametrize("max_bytes", [16_384, 16_385, 16_386, 16_387, 50_001])
def test_multibyte_text_cut_in_a_character_keeps_whole_characters(char: str, max_bytes: int) -> None:
    text = "a" + char * 300_000  # the 'a' puts every character boundary off by one
    payload = text.encode()
    record = park(payload, max_bytes=max_bytes)
    assert record.truncated
    assert record.payload is not None  # still text: the partial character is left out
    assert text.startswith(record.payload)
    assert_dead_letter(record, payload, "could not decode", max_bytes)


def test_a_long_reason_is_clipped_to_2000_characters_when_the_record_is_cut() -> None:
    payload = b"x" * 100_000
    reason = "why " * 1000
    record = park(payload, reason=reason, max_bytes=16_384)
    assert record.truncated
    assert len(record.reason) == 2000
    assert record.reason == reason[:1997] + "..."
    assert_dead_letter(record, payload, reason, 16_384)


def test_a_short_reason_is_kept_whole_when_the_record_is_cut() -> None:
    payload = b"x" * 100_000
    record = park(payload, reason="too big", max_bytes=16_384)
    assert record.truncated
    assert record.reason == "too big"


def test_a_huge_key_is_parked_under_its_first_1024_bytes() -> None:
    key = b"k" * 5000
    record = park(b"payload", key=key, max_bytes=16_384)
    assert record.record_key() == key[:1024]
    assert record.key == "k" * 1024
    assert record.fits(16_384)
    assert_dead_letter(record, b"payload", "could not decode", 16_384, key=key)


def test_no_key_gives_an_empty_record_key() -> None:
    record = DeadLetterRecord.of("orchestrator.results", None, b"x" * 100_000, "r", "test-app", max_bytes=16_384)
    assert record.key is None
    assert record.record_key() == b""
    assert record.fits(16_384)


def test_without_a_limit_nothing_is_cut() -> None:
    payload = b"x" * 2_000_000
    record = park(payload, max_bytes=None)
    assert not record.truncated
    assert record.payload == payload.decode()
    assert record.original_bytes == len(payload)


def test_fits_counts_the_key_and_the_value() -> None:
    record = park(b"abc", key=b"kkkk")
    size = len(b"kkkk") + len(encode(record))
    assert record.fits(size)
    assert not record.fits(size - 1)


def test_a_tiny_payload_with_a_huge_reason_is_not_called_truncated() -> None:
    record = park(b"abc", reason="r" * 20_000, max_bytes=16_384)
    assert record.fits(16_384)
    assert kept_bytes(record) == b"abc"
    assert not record.truncated


def test_a_huge_multibyte_key_is_parked_under_a_prefix_of_at_most_1024_bytes() -> None:
    key = ("\u20ac" * 600).encode()  # 1800 bytes; byte 1024 is inside a character
    record = park(b"payload", key=key, max_bytes=16_384)
    assert len(record.record_key()) <= 1024
    assert key.startswith(record.record_key())


def test_a_record_with_a_control_character_key_and_reason_still_fits() -> None:
    record = park(b"abc", reason="\x01" * 5000, key=b"\x01" * 2000, max_bytes=16_384)
    assert record.fits(16_384)


# ---------------------------------------------------------------- properties

TEXT = st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"])


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """Text (ASCII, quotes, multi-byte) or binary, from tiny to well over the limits."""
    kind = draw(st.sampled_from(["text", "binary", "mixed"]))
    size = draw(st.sampled_from([0, 1, 100, 10_000, 40_000, 200_000]))
    if kind == "binary":
        chunk = draw(st.binary(min_size=1, max_size=64))
        return (chunk * (size // len(chunk) + 1))[:size]
    chunk_text = draw(st.text(min_size=1, max_size=16))
    raw = (chunk_text * (size // max(1, len(chunk_text)) + 1))[: max(size // 2, 1)].encode("utf-8", "surrogatepass")
    if kind == "mixed":  # text with a non-UTF-8 tail
        raw += b"\xff" * draw(st.integers(0, 3))
    return raw


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    payload=payloads(),
    # No control characters here: with 2000 of them (6 JSON bytes each) the reason itself is clipped harder
    # (test_a_record_with_a_control_character_key_and_reason_still_fits).
    reason=st.text(alphabet=TEXT, max_size=50).map(lambda r: r * 60),
    key=st.one_of(
        st.none(), st.binary(max_size=40), st.text(alphabet=TEXT, max_size=8).map(lambda k: (k * 300).encode())
    ),
    max_bytes=st.sampled_from([16_384, 20_000, 65_536, 300_000]),
)
def test_every_record_fits_and_describes_the_whole_original(
    payload: bytes, reason: str, key: bytes | None, max_bytes: int
) -> None:
    record = DeadLetterRecord.of("orchestrator.results", key, payload, reason, "test-app", max_bytes=max_bytes)
    assert record.fits(max_bytes)
    assert record.original_bytes == len(payload)
    assert record.original_sha256 == hashlib.sha256(payload).hexdigest()
    kept = kept_bytes(record)
    assert payload.startswith(kept)
    clipped = reason if len(reason) <= 2000 else reason[:1997] + "..."
    if not record.truncated:
        assert kept == payload
        # The reason is clipped first when the whole record does not fit with it (hypothesis found one).
        assert record.reason in {reason, clipped}
    else:
        assert record.reason == clipped
    if record.payload is not None:
        try:
            whole = payload.decode("utf-8")
        except UnicodeDecodeError:
            whole = None
        if whole is not None:
            assert whole.startswith(record.payload)
    assert decode(DeadLetterRecord, encode(record)) == record
    if key is None:
        assert record.key is None


# ----------------------------------------------------------- fingerprints


def submission(run_input: dict[str, JsonValue], *, when: datetime | None = None, n_steps: int = 2):
    return WorkflowSubmission(
        run_id="run-1",
        plan=make_plan(n_steps),
        input=run_input,
        submitted_at=when or datetime(2024, 5, 1, tzinfo=UTC),
    )


def test_the_fingerprint_does_not_depend_on_the_time_of_submission() -> None:
    early = submission({"text": "hi"}, when=datetime(2024, 5, 1, tzinfo=UTC))
    late = submission({"text": "hi"}, when=datetime(2025, 1, 1, 13, 14, tzinfo=UTC))
    assert early.fingerprint() == late.fingerprint()
    assert early.fingerprint() == submission_fingerprint(early.plan, early.input)


def test_the_fingerprint_is_a_sha256_hex_digest() -> None:
    fingerprint = submission({"text": "hi"}).fingerprint()
    assert len(fingerprint) == 64
    int(fingerprint, 16)


def test_a_different_input_gives_a_different_fingerprint() -> None:
    assert submission({"text": "hi"}).fingerprint() != submission({"text": "ho"}).fingerprint()
    assert submission({"text": "hi"}).fingerprint() != submission({"text": "hi", "extra": None}).fingerprint()
    assert submission({"n": 1}).fingerprint() != submission({"n": "1"}).fingerprint()


def test_a_different_plan_gives_a_different_fingerprint() -> None:
    assert submission({"text": "hi"}).fingerprint() != submission({"text": "hi"}, n_steps=3).fingerprint()
    plan = make_plan(2)
    other = plan.model_copy(update={"description": "changed"})
    assert submission_fingerprint(plan, {}) != submission_fingerprint(other, {})


def test_key_order_does_not_matter() -> None:
    one = submission({"a": 1, "b": {"x": [1, 2], "y": "é"}})
    two = submission({"b": {"y": "é", "x": [1, 2]}, "a": 1})
    assert one.fingerprint() == two.fingerprint()
    # The plan's own key order does not matter either.
    raw = json.loads(make_plan(2).model_dump_json())
    reordered = dict(reversed(list(raw.items())))
    reordered["steps"] = dict(reversed(list(raw["steps"].items())))
    plan_one = WorkflowSubmission.model_validate({"run_id": "r", "plan": raw, "input": {}})
    plan_two = WorkflowSubmission.model_validate({"run_id": "r", "plan": reordered, "input": {}})
    assert plan_one.fingerprint() == plan_two.fingerprint()


def test_a_decoded_submission_has_the_same_fingerprint() -> None:
    original = submission({"text": "hi", "nested": {"z": 1, "a": [True, None]}})
    again = decode(WorkflowSubmission, encode(original))
    assert again.fingerprint() == original.fingerprint()


@settings(max_examples=50, deadline=None)
@given(
    run_input=st.dictionaries(
        st.text(max_size=5),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
            max_leaves=8,
        ),
        max_size=5,
    )
)
def test_the_fingerprint_ignores_key_order_of_any_input(run_input: dict[str, JsonValue]) -> None:
    plan = make_plan(2)
    shuffled: dict[str, JsonValue] = dict(reversed(list(run_input.items())))
    assert submission_fingerprint(plan, run_input) == submission_fingerprint(plan, shuffled)


def test_a_lone_surrogate_escape_is_refused_and_a_pair_is_text() -> None:
    from models.messages import MessageDecodeError, WorkflowSubmission, decode

    plan = {
        "workflow_id": "w",
        "name": "n",
        "version": "1",
        "start_step": "a",
        "steps": {"a": {"id": "a", "agent_name": "x"}},
    }
    lone = json.dumps({"run_id": "r1", "plan": plan, "input": {"t": "\udc80"}})  # json.dumps escapes it
    with pytest.raises(MessageDecodeError, match="lone surrogate"):
        decode(WorkflowSubmission, lone.encode())
    pair = json.dumps({"run_id": "r1", "plan": plan, "input": {"t": "\U0001f600", "u": "\\ud800 as text"}})
    assert decode(WorkflowSubmission, pair.encode()).input == {"t": "\U0001f600", "u": "\\ud800 as text"}
