"""Poison input through the real topics: every bad message reaches the dead-letter topic with its reason,
runs that cannot start are recorded as FAILED, and the workers go on serving (docs/architecture.md rule 4).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.messages import (
    AgentResult,
    ControlCommand,
    ControlMessage,
    DeadLetterRecord,
    MessageDecodeError,
    ResultStatus,
    WorkflowSubmission,
    decode,
    encode,
    utcnow,
)
from models.plan import load_plan
from switchyard import topics
from tests.faults.conftest import (
    MAX_MESSAGE_BYTES,
    AgentSpec,
    FaultStack,
    Record,
    StackPlaces,
    chain,
    dead_letters,
    payload_of,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def faults(stack_places: StackPlaces) -> Iterator[FaultStack]:
    """A stack of this module's own: poison that breaks a worker must not break the other scenarios."""
    with stack_places.stack("faults-poison", {"summarizer": AgentSpec()}) as stack:
        yield stack


@dataclass(frozen=True)
class Poison:
    """One bad message and what its dead letter must say."""

    name: str
    topic: str
    key: bytes | None
    value: bytes
    reason: str
    """A part of the dead letter's reason."""


def letter_for(poison: Poison, letters: list[DeadLetterRecord]) -> DeadLetterRecord | None:
    """The dead letter of ``poison``: same source topic and key (or, without a key, the same bytes)."""
    for letter in letters:
        if letter.source_topic != poison.topic:
            continue
        if poison.key is None:
            if letter.key is None and payload_of(letter) == poison.value:
                return letter
        elif letter.key == poison.key.decode() and poison.reason in letter.reason:
            return letter
    return None


def submission(run_id: str, text: str = "poison", **changes: Any) -> dict[str, Any]:
    """A valid submission as a JSON object, with top-level fields changed."""
    valid = WorkflowSubmission(run_id=run_id, plan=load_plan(chain("summarizer")), input={"text": text})
    return {**json.loads(encode(valid)), **changes}


def result(run_id: str, step_id: str, output: Any = None) -> bytes:
    now = utcnow()
    return encode(
        AgentResult(
            correlation_id=f"{run_id}/{step_id}/1",
            run_id=run_id,
            step_id=step_id,
            attempt=1,
            status=ResultStatus.SUCCESS,
            output=output if output is not None else {"summary": "late", "words": 1},
            started_at=now - timedelta(seconds=1),
            finished_at=now,
        )
    )


def test_poison_messages_are_dead_lettered_with_their_reason(faults: FaultStack) -> None:
    known_step, known_duplicate = faults.submit(chain("summarizer"), 2, "known")
    faults.verify_completed([known_step, known_duplicate], "known runs")
    tag = uuid.uuid4().hex[:8]

    def key(name: str) -> bytes:
        return f"poison-{tag}-{name}".encode()

    unreadable_plan = f"rejected-plan-{tag}"
    unknown_version = f"rejected-version-{tag}"
    nul_plan = f"rejected-nul-{tag}"  # PostgreSQL's JSONB cannot hold \u0000
    cycle = f"cycle-{tag}"
    oversize = f"oversize-{tag}"
    ghost = f"ghost-{tag}"
    cycle_plan = chain("summarizer")
    cycle_plan["steps"]["b"]["next_step"] = "a"
    poisons = [
        Poison("not UTF-8", topics.PLANS, key("utf8"), b"\xff\xfe\xfa not text", "not UTF-8"),
        Poison("malformed JSON", topics.PLANS, key("json"), b'{"schema_version": 1, "run_id": ', "not valid JSON"),
        Poison("not an object", topics.PLANS, key("array"), b"[1, 2, 3]", "expected a JSON object"),
        Poison("keyless", topics.PLANS, None, f"keyless junk {tag}".encode(), "not valid JSON"),
        Poison(
            "unknown field",
            topics.PLANS,
            key("field"),
            json.dumps(submission(f"field-{tag}", priority="high")).encode(),
            "$.priority",
        ),
        Poison(
            "unknown schema version",
            topics.PLANS,
            unknown_version.encode(),
            json.dumps(submission(unknown_version, schema_version=2)).encode(),
            "unsupported schema_version 2",
        ),
        Poison(
            "structurally invalid plan",
            topics.PLANS,
            unreadable_plan.encode(),
            json.dumps(submission(unreadable_plan, plan={"workflow_id": "broken", "steps": 7})).encode(),
            "$.plan.",
        ),
        Poison(
            "oversize",
            topics.PLANS,
            oversize.encode(),
            json.dumps(submission(oversize, text="word " * (MAX_MESSAGE_BYTES // 4))).encode(),
            f"over the limit of {MAX_MESSAGE_BYTES}",
        ),
        Poison(
            "same run_id, other input",
            topics.PLANS,
            known_duplicate.encode(),
            json.dumps(submission(known_duplicate, text="something else")).encode(),
            "already used by a different submission",
        ),
        Poison("result not UTF-8", topics.RESULTS, key("result-utf8"), b"\x80\x81", "not UTF-8"),
        Poison("result for an unknown run", topics.RESULTS, ghost.encode(), result(ghost, "a"), f"no run {ghost!r}"),
        Poison(
            "result for an unknown step",
            topics.RESULTS,
            known_step.encode(),
            result(known_step, "nowhere"),
            "has no step 'nowhere'",
        ),
        Poison("control malformed", topics.CONTROL, key("control"), b"{]", "not valid JSON"),
        Poison(
            "control wrong shape",
            topics.CONTROL,
            key("control-shape"),
            json.dumps({"schema_version": 1, "run_id": f"shape-{tag}", "command": "step_timeout"}).encode(),
            "a step_timeout names its step_id and attempt",
        ),
        Poison(
            "cancel of an unknown run",
            topics.CONTROL,
            f"nobody-{tag}".encode(),
            encode(ControlMessage(run_id=f"nobody-{tag}", command=ControlCommand.CANCEL)),
            f"no run 'nobody-{tag}'",
        ),
        Poison(
            "invalid submission holding \\u0000",
            topics.PLANS,
            nul_plan.encode(),
            json.dumps(submission(nul_plan, plan={"workflow_id": "nul\u0000here", "steps": 7})).encode(),
            "$.plan.",
        ),
        Poison("task malformed (bridge)", topics.TASKS, key("task"), b"\xff\x00 not a task", "not UTF-8"),
    ]
    # Well-formed, so it decodes; its plan's meaning is wrong (a -> b -> a), so the run fails at once.
    cycle_submission = json.dumps(submission(cycle, plan=cycle_plan)).encode()
    messages: list[tuple[str, bytes | None, bytes | None]] = [(p.topic, p.key, p.value) for p in poisons]
    messages.append((topics.PLANS, cycle.encode(), cycle_submission))
    faults.produce(messages)

    def all_found(records: list[Record]) -> bool:
        letters = dead_letters(records)
        return all(letter_for(p, letters) is not None for p in poisons)

    letters = dead_letters(faults.read(topics.DEADLETTER, until=all_found, timeout=15))
    problems = [
        f"{p.name}: no dead letter from {p.topic} saying {p.reason!r}" for p in poisons if not letter_for(p, letters)
    ]
    for poison in poisons:
        letter = letter_for(poison, letters)
        if letter is not None:
            print(f"dead letter for {poison.name}: {letter.reason[:140]}")
            value = poison.value or b""
            if letter.original_bytes != len(value) or letter.original_sha256 != hashlib.sha256(value).hexdigest():
                problems.append(f"{poison.name}: the dead letter does not describe the original bytes")
            if letter.truncated:
                # Over the limit with its envelope: the start of it is kept, with its size and SHA-256.
                if not (value.startswith(payload_of(letter)) and len(encode(letter)) <= MAX_MESSAGE_BYTES):
                    problems.append(f"{poison.name}: the cut dead letter is not a start of the original, or is too big")
            elif payload_of(letter) != value:
                problems.append(f"{poison.name}: the dead letter does not keep the original bytes")
    assert not problems, "\n".join([*problems, faults.logs()])

    # Submissions that could not start are FAILED runs that say why.
    records = faults.wait_terminal([unreadable_plan, unknown_version, nul_plan, cycle], timeout=20)
    for run_id in (unreadable_plan, unknown_version, nul_plan):
        record = records[run_id]
        error: Any = record.error
        assert record.status == "FAILED", record
        assert error["kind"] == "invalid_submission", error
        assert error["message"], error
    error = records[unreadable_plan].error
    assert isinstance(error, dict)
    assert "$.plan." in error["message"]
    error = records[cycle].error
    assert records[cycle].status == "FAILED"
    assert isinstance(error, dict)
    assert error["kind"] == "invalid_plan", error
    assert "cycle" in error["message"], error
    # The known runs are as they were.
    for run_id in (known_step, known_duplicate):
        known = faults.run(run_id)
        assert known is not None
        assert known.status == "COMPLETED"
    # Still serving.
    assert faults.process("executor").alive(), faults.logs("executor")
    assert faults.process("bridge").alive(), faults.logs("bridge")
    faults.verify_completed(faults.submit(chain("summarizer"), 1, "after poison"), "a run after the poison")


# ------------------------------------------------------------------ fuzzing

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
KEYS = st.none() | st.binary(max_size=16)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Paths to every value inside a JSON document (not the document itself)."""
    items: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for name, child in items:
        yield (*prefix, name)
        yield from _paths(child, (*prefix, name))


@st.composite
def mutated_submissions(draw: st.DrawFn) -> tuple[bytes | None, bytes]:
    """A valid submission with one to three fields deleted, replaced or added."""
    doc = submission(f"fuzz-{draw(st.uuids()).hex}", text=draw(st.text(min_size=1, max_size=20)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = list(_paths(doc))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for part in path[:-1]:
            parent = parent[part]
        operation = draw(st.sampled_from(["delete", "replace", "add"]))
        if operation == "delete":
            del parent[path[-1]]
        elif operation == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(JSON_VALUES)
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    run_id = doc.get("run_id")
    own_key = run_id.encode() if isinstance(run_id, str) else None
    key = draw(st.just(own_key) | KEYS)
    return key, json.dumps(doc).encode()


FUZZED = st.one_of(
    st.tuples(KEYS, st.binary(max_size=600)),
    st.tuples(KEYS, JSON_VALUES.map(lambda v: json.dumps(v).encode())),
    mutated_submissions(),
)


def test_fuzzed_submissions_never_stop_the_executor(faults: FaultStack) -> None:
    sent: list[tuple[bytes | None, bytes]] = []
    loop = asyncio.new_event_loop()

    async def started() -> AIOKafkaProducer:
        producer = AIOKafkaProducer(bootstrap_servers=faults.settings.bootstrap_servers, request_timeout_ms=10_000)
        await producer.start()
        return producer

    producer = loop.run_until_complete(started())
    futures: list[asyncio.Future[Any]] = []
    try:

        @settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(message=FUZZED)
        def produce_one(message: tuple[bytes | None, bytes]) -> None:
            key, value = message
            futures.append(loop.run_until_complete(producer.send(topics.PLANS, key=key, value=value)))
            sent.append(message)

        produce_one()
        loop.run_until_complete(asyncio.gather(*futures))
    finally:
        loop.run_until_complete(producer.stop())
        loop.close()

    # Whatever cannot be read as a submission must reach the dead-letter topic, bytes kept.
    unreadable: Counter[bytes] = Counter()
    for _, value in sent:
        try:
            decode(WorkflowSubmission, value, max_bytes=MAX_MESSAGE_BYTES)
        except MessageDecodeError:
            unreadable[value] += 1
    print(f"fuzz: {len(sent)} submissions produced, {sum(unreadable.values())} of them unreadable")

    def parked(records: list[Record]) -> Counter[bytes]:
        return Counter(payload_of(letter) for letter in dead_letters(records) if letter.source_topic == topics.PLANS)

    def all_parked(records: list[Record]) -> bool:
        found = parked(records)
        return all(found[value] >= n for value, n in unreadable.items())

    records = faults.read(topics.DEADLETTER, until=all_parked, timeout=30)
    found = parked(records)
    missing = {value: n - found[value] for value, n in unreadable.items() if found[value] < n}
    assert not missing, (
        f"{sum(missing.values())} unreadable submissions never reached the dead-letter topic, e.g. "
        f"{list(missing)[:3]}\n{faults.logs('executor')}"
    )
    # Still alive and serving.
    assert faults.process("executor").alive(), faults.logs("executor")
    health = faults.health("executor")
    assert health is not None
    assert health["ready"] is True
    faults.verify_completed(faults.submit(chain("summarizer"), 1, "after fuzz"), "a run after the fuzzing")
    # Nothing readable was dropped either: every run_id of a readable submission is a recorded run
    # (started, or FAILED as an invalid plan; a second submission of an id is dead-lettered instead).
    readable = {decode(WorkflowSubmission, v).run_id for _, v in sent if v not in unreadable}
    print(f"fuzz: {len(readable)} distinct run ids among the readable submissions")
    faults.wait_recorded(readable, timeout=30)


def test_a_nul_character_in_an_input_does_not_stop_the_record(faults: FaultStack) -> None:
    # JSON allows "\u0000" in a string and the run may well go on with it, but
    # PostgreSQL's JSONB refuses it: a snapshot holding one must not stop the
    # checkpoints of every other run.
    run_id = f"nul-input-{uuid.uuid4().hex[:8]}"
    nul = WorkflowSubmission(run_id=run_id, plan=load_plan(chain("summarizer")), input={"text": "nul \u0000 inside"})
    faults.produce([(topics.PLANS, run_id.encode(), encode(nul))])
    others = faults.submit(chain("summarizer"), 3, "after a nul")
    try:
        faults.verify_completed(others, "runs submitted after one holding \\u0000", timeout=20)
    except AssertionError as error:
        raise AssertionError(f"{error}\nexecutor /health/: {faults.health('executor')}") from None
    # The run itself is accounted for: recorded in PostgreSQL, or dead-lettered with its reason.
    recorded = faults.statuses([run_id])
    letters = [letter for letter in dead_letters(faults.read(topics.DEADLETTER)) if letter.key == run_id]
    print(f"the run holding \\u0000: recorded {recorded}, dead letters {[letter.reason for letter in letters]}")
    assert recorded or letters, "the run holding \\u0000 is neither recorded nor dead-lettered"
