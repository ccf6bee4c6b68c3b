"""RunShell and the size limit: no state over SWITCHYARD_MAX_MESSAGE_BYTES is stored, and unusable ones fail.

The rig of tests/streams/test_shell.py (a dict as the ``runs`` table, recording
fakes) with the least limit the settings allow.
"""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
from pydantic import JsonValue, ValidationError

from models.agents import RecoveryAction, RecoveryPolicy
from models.messages import (
    AgentCancel,
    ControlCommand,
    ControlMessage,
    DeadLetterRecord,
    ErrorKind,
    WorkflowSubmission,
    decode,
    utcnow,
)
from models.run import (
    AgentPolicy,
    CancelRequested,
    DeadLetter,
    Event,
    ExecutionDefaults,
    RetryRequested,
    RunState,
    RunStatus,
    StepStatus,
    StepTimedOut,
)
from streams.run_store import Layout, records_of
from streams.timers import TimerKey
from switchyard.limits import record_size
from tests.models.run_builders import RUN_ID, at, make_plan, result, start, submitted
from tests.streams.test_run_store import CountingTable
from tests.streams.test_shell import FakeTimers, FakeTopic, NoRecords, Rig, make_rig, tkey

LIMIT = 16_384  # the least SWITCHYARD_MAX_MESSAGE_BYTES allows
KEY = RUN_ID.encode()
INPUT_KEY = Layout(RUN_ID).input
BIG = "y" * 40_000


@pytest.fixture
def rig() -> Rig:
    return make_rig(max_message_bytes=LIMIT)


def cancels_sent(rig: Rig) -> list[AgentCancel]:
    topic = cast(FakeTopic, rig.shell.cancels.topic)
    return [decode(AgentCancel, value) for _, value in topic.sent]


def control_sent(rig: Rig) -> list[ControlMessage]:
    return [decode(ControlMessage, value) for _, value in rig.control.sent]


def assert_stored_failed(rig: Rig, kind: str, run_id: str = RUN_ID) -> RunState:
    """The run is stored FAILED with ``kind``, in records that each fit, readable as a RunState."""
    head = run_id.encode()
    stored = {key: value for key, value in rig.runs.items() if key == head or key.startswith(head + b"/")}
    assert all(record_size(key, value) <= LIMIT for key, value in stored.items())
    state = rig.state(run_id)
    assert stored == records_of(None, state).writes  # those of this state, and no other part of the run
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.kind == kind
    assert rig.shell.load(run_id) == state  # usable again
    return state


def assert_everything_sent_fits(rig: Rig) -> None:
    topics = [rig.tasks, rig.control, rig.monitoring, rig.deadletter, cast(FakeTopic, rig.shell.cancels.topic)]
    for topic in topics:
        for key, value in topic.sent:
            assert record_size(key, value) <= LIMIT


def oversize_running_state(run_input: dict[str, JsonValue] | None = None) -> RunState:
    """A valid RUNNING state (s1 in flight since T0) that is over the limit."""
    state = start(make_plan(2), run_input=run_input if run_input is not None else {"text": BIG})
    assert record_size(KEY, state.model_dump_json().encode()) > LIMIT
    return state


def arm_timers(timers: FakeTimers, keys: list[TimerKey]) -> None:
    async def nothing() -> None:
        return None

    for key in keys:
        timers.call_at(at(300), key, nothing)


# ------------------------------------------------------------ new states too large


async def test_a_submission_whose_first_state_is_too_large_is_stored_failed(rig: Rig) -> None:
    await rig.shell.handle(submitted(make_plan(2), run_input={"text": BIG}))
    state = assert_stored_failed(rig, ErrorKind.STATE_TOO_LARGE)
    assert state.error is not None
    assert state.error.details is not None
    assert isinstance(state.error.details, dict)
    assert state.error.details["limit"] == LIMIT
    assert state.error.details["size"] > LIMIT  # type: ignore[operator]
    assert state.input != {"text": BIG}  # dropped
    assert rig.tasks.sent == []
    assert rig.timers.of_attempts() == set()
    assert cancels_sent(rig) == []  # nothing was in flight
    updates = rig.updates()
    assert [u.status for u in updates] == [RunStatus.FAILED]
    assert updates[0].detail["kind"] == ErrorKind.STATE_TOO_LARGE
    assert rig.checkpoints.put_states == [state]
    assert rig.deadletter.sent == []
    assert rig.shell.applied == 1
    assert_everything_sent_fits(rig)


async def test_a_submission_of_the_same_big_run_again_changes_nothing(rig: Rig) -> None:
    event = submitted(make_plan(2), run_input={"text": BIG})
    await rig.shell.handle(event)
    stored = rig.runs[KEY]
    outbound = rig.outbound()
    await rig.shell.handle(event)
    # The fingerprint is kept: the same submission is recognised, not a conflict.
    assert rig.runs[KEY] == stored
    assert rig.outbound() == outbound


async def test_a_result_whose_output_is_too_large_fails_the_run_and_does_not_dispatch_the_next_step(
    rig: Rig,
) -> None:
    await rig.shell.handle(submitted(make_plan(2)))
    running = rig.state()
    assert len(rig.tasks_sent()) == 1
    assert tkey("timeout", "s1", 1) in rig.timers.pending
    await rig.shell.handle(result(running, at(1), output={"summary": BIG}))
    state = assert_stored_failed(rig, ErrorKind.STATE_TOO_LARGE)
    assert state.version > running.version
    assert [t.step_id for t in rig.tasks_sent()] == ["s1"]  # s2 is not dispatched
    assert rig.timers.of_attempts() == set()  # s1's deadline forgotten, none armed for s2
    assert state.steps["s2"].status is StepStatus.FAILED
    s1_output = state.output_of("s1")
    assert isinstance(s1_output, dict)
    assert set(s1_output) == {"dropped"}
    assert rig.updates()[-1].status == RunStatus.FAILED
    assert rig.checkpoints.put_states[-1] == state
    assert cancels_sent(rig) == []  # s1's result is in; s2 was never sent
    assert_everything_sent_fits(rig)


async def test_a_result_that_fits_is_stored_as_usual(rig: Rig) -> None:
    await rig.shell.handle(submitted(make_plan(2)))
    await rig.shell.handle(result(rig.state(), at(1), output={"summary": "x" * 2000}))
    assert rig.state().status is RunStatus.RUNNING
    assert [t.step_id for t in rig.tasks_sent()] == ["s1", "s2"]


# ------------------------------------------------------- stored states that cannot be used


def stored_too_large(rig: Rig) -> RunState:
    """An oversize RUNNING state in the table, in one record (as stored before the split layout).

    Only such a state can be over the limit as it is stored: a head of the split layout holds neither the
    input nor the plan nor any execution, and a part over the limit fails its run only when it is written
    again (see :func:`test_no_event_fails_a_split_run_whose_stored_input_part_is_over_a_lowered_limit`).
    """
    state = oversize_running_state()
    rig.runs[KEY] = state.model_dump_json().encode()
    arm_timers(
        rig.timers,
        [
            tkey("timeout", "s1", 1),
            tkey("dispatch", "s1", 2),
            tkey("timeout", "s1", 1, run_id="run-10"),
            tkey("timeout", "s1", 1, run_id="run-2"),
        ],
    )
    return state


@pytest.mark.parametrize(
    "make_event",
    [
        lambda s: result(s, at(1)),
        lambda s: CancelRequested(run_id=RUN_ID, at=at(1)),
        lambda s: StepTimedOut(run_id=RUN_ID, step_id="s1", attempt=1, at=at(400)),
        lambda s: RetryRequested(run_id=RUN_ID, at=at(1)),
        lambda s: result(s, at(1), step_id="nope"),
    ],
    ids=["result", "cancel", "timeout", "retry", "stray-result"],
)
async def test_any_event_fails_a_stored_state_already_over_the_limit(rig: Rig, make_event: Any) -> None:
    stored = stored_too_large(rig)
    assert rig.shell.load(RUN_ID) is None  # too large: not usable
    event: Event = make_event(stored)
    await rig.shell.handle(event)
    state = assert_stored_failed(rig, ErrorKind.STATE_TOO_LARGE)
    assert state.version > stored.version
    assert state.steps["s1"].status is StepStatus.FAILED
    # This run's timers are gone; others' (run-10 and run-2 share a prefix, not the run) are not.
    assert rig.timers.of_attempts() == {
        tkey("timeout", "s1", 1, run_id="run-10"),
        tkey("timeout", "s1", 1, run_id="run-2"),
    }
    assert [c.correlation_id for c in cancels_sent(rig)] == ["run-1/s1/1"]
    assert rig.tasks.sent == []
    assert rig.updates()[-1].status == RunStatus.FAILED
    assert rig.checkpoints.put_states == [state]
    assert rig.shell.failed_stored == 1
    assert_everything_sent_fits(rig)


def stored_with_a_big_input(runs: CountingTable) -> RunState:
    """A RUNNING state (s1 in flight since T0) stored split under a larger limit: its input part is over LIMIT.

    No other record is near it: s1 reads only the input's small field, so no attempt holds the big one.
    """
    state = start(make_plan(2), run_input={"text": "hello", "big": BIG})
    runs.update(records_of(None, state).writes)
    runs.forget()
    sizes = {key: record_size(key, value) for key, value in runs.items()}
    assert sizes.pop(INPUT_KEY) > LIMIT
    assert max(sizes.values()) < LIMIT // 2
    return state


@pytest.mark.parametrize(
    ("make_event", "status"),
    [
        (lambda s: result(s, at(1)), RunStatus.RUNNING),
        (lambda s: CancelRequested(run_id=RUN_ID, at=at(1)), RunStatus.CANCELLED),
        (lambda s: StepTimedOut(run_id=RUN_ID, step_id="s1", attempt=1, at=at(400)), RunStatus.RUNNING),
        (lambda s: RetryRequested(run_id=RUN_ID, at=at(1)), RunStatus.RUNNING),
        (lambda s: result(s, at(1), step_id="nope"), RunStatus.RUNNING),
    ],
    ids=["result", "cancel", "timeout", "retry", "stray-result"],
)
async def test_no_event_fails_a_split_run_whose_stored_input_part_is_over_a_lowered_limit(
    make_event: Any, status: RunStatus
) -> None:
    # Stored under a larger limit, read under the least one: the input part is over it, but it is written once
    # and never again, and nothing else is near the limit: nothing over it is written, so the run goes on.
    runs = CountingTable()
    rig = make_rig(runs=runs, max_message_bytes=LIMIT)
    stored = stored_with_a_big_input(runs)
    big_input = runs[INPUT_KEY]
    assert rig.shell.load(RUN_ID) == stored  # usable: its head is small

    await rig.shell.handle(make_event(stored))

    state = rig.state()
    assert state.status is status
    assert state.error is None or state.error.kind != ErrorKind.STATE_TOO_LARGE
    assert state.input == stored.input
    assert rig.shell.failed_stored == 0
    assert INPUT_KEY not in runs.written
    assert runs[INPUT_KEY] == big_input
    assert all(record_size(key, runs[key]) <= LIMIT for key in runs.written)
    assert rig.shell.load(RUN_ID) == state
    assert_everything_sent_fits(rig)


async def test_a_split_run_whose_stored_input_part_is_over_a_lowered_limit_goes_on_to_its_next_step() -> None:
    runs = CountingTable()
    rig = make_rig(runs=runs, max_message_bytes=LIMIT)
    stored = stored_with_a_big_input(runs)

    await rig.shell.handle(result(stored, at(1)))

    state = rig.state()
    assert state.status is RunStatus.RUNNING
    assert state.steps["s1"].status is StepStatus.COMPLETED
    assert [t.step_id for t in rig.tasks_sent()] == ["s2"]
    assert tkey("timeout", "s2", 1) in rig.timers.pending
    # What the submission changed settles (the parts of s1's step and execution, as the head held them),
    # then the head: the input is not written again.
    layout = Layout(RUN_ID)
    assert layout.input not in runs.written
    assert runs.written[-1] == KEY
    assert runs.deleted == []
    assert rig.checkpoints.put_states == [state]

    await rig.shell.handle(result(state, at(2)))
    assert rig.state().status is RunStatus.COMPLETED
    assert rig.state().input == stored.input


@pytest.mark.parametrize(
    "raw",
    [b"not json", b'{"hello": "world"}', b"[1, 2, 3]", b"\xff\xfe", b'{"run_id": "run-1", "status": "RUNNING"}'],
    ids=["garbage", "other-object", "array", "binary", "partial"],
)
async def test_an_unreadable_stored_value_fails_the_run_with_the_reason(rig: Rig, raw: bytes) -> None:
    rig.runs[KEY] = raw
    arm_timers(rig.timers, [tkey("timeout", "s1", 1), tkey("timeout", "s1", 1, run_id="run-11")])
    assert rig.shell.load(RUN_ID) is None  # unreadable: None, not an exception
    await rig.shell.handle(result(start(make_plan(2)), at(1)))
    state = assert_stored_failed(rig, ErrorKind.UNREADABLE_STATE)
    assert state.error is not None
    assert "cannot be read" in state.error.message
    assert "Error" in state.error.message  # the reason names the error
    assert rig.timers.of_attempts() == {tkey("timeout", "s1", 1, run_id="run-11")}
    assert rig.tasks.sent == []
    assert rig.updates()[-1].status == RunStatus.FAILED
    assert rig.checkpoints.put_states == [state]
    assert rig.shell.failed_stored == 1
    # Now readable: the next event is applied to the FAILED state, which it does not change.
    before = rig.runs[KEY]
    await rig.shell.handle(result(start(make_plan(2)), at(2)))
    assert rig.runs[KEY] == before
    assert rig.shell.failed_stored == 1


async def test_an_unreadable_state_with_a_valid_plan_keeps_it(rig: Rig) -> None:
    stored = json.loads(start(make_plan(3)).model_dump_json())
    stored["status"] = "PAUSED"  # from a later version, say
    stored["version"] = 5
    rig.runs[KEY] = json.dumps(stored).encode()
    await rig.shell.handle(CancelRequested(run_id=RUN_ID, at=at(1)))
    state = assert_stored_failed(rig, ErrorKind.UNREADABLE_STATE)
    assert state.plan == make_plan(3)
    assert state.version == 6
    assert state.error is not None
    assert "PAUSED" in state.error.message  # the reason names what could not be read


async def test_an_unreadable_state_with_a_large_input_is_stored_within_the_limit(rig: Rig) -> None:
    stored = json.loads(start(make_plan(2)).model_dump_json())
    stored["status"] = "PAUSED"
    stored["input"] = {"text": BIG}
    rig.runs[KEY] = json.dumps(stored).encode()
    await rig.shell.handle(result(start(make_plan(2)), at(1)))
    assert_stored_failed(rig, ErrorKind.UNREADABLE_STATE)


async def test_a_run_with_large_registry_defaults_is_stored_within_the_limit(rig: Rig) -> None:
    skip = RecoveryPolicy(action=RecoveryAction.SKIP, default_output={"summary": BIG})
    defaults = ExecutionDefaults(agents={"agent-s1": AgentPolicy(recovery=skip)})
    await rig.shell.handle(submitted(make_plan(2), defaults=defaults))
    assert_stored_failed(rig, ErrorKind.STATE_TOO_LARGE)


def test_load_returns_none_for_unusable_states(rig: Rig) -> None:
    rig.runs[KEY] = b"not json"
    assert rig.shell.load(RUN_ID) is None
    rig.runs[KEY] = oversize_running_state().model_dump_json().encode()
    assert rig.shell.load(RUN_ID) is None
    assert rig.shell.load("unknown") is None
    assert rig.runs[KEY]  # load changes nothing


# --------------------------------------------------------------- resume and restore


@pytest.mark.parametrize("kind", ["oversize", "unreadable"])
async def test_resume_all_asks_the_control_agent_to_fail_an_unusable_run(rig: Rig, kind: str) -> None:
    await rig.shell.handle(submitted(make_plan(2), run_id="run-ok"))
    rig.runs[KEY] = b"not json" if kind == "unreadable" else oversize_running_state().model_dump_json().encode()
    tasks_before = len(rig.tasks.sent)
    resumed = await rig.shell.resume_all(utcnow())
    assert resumed == 2  # the good run re-dispatched, the bad one reported
    messages = control_sent(rig)
    assert len(messages) == 1
    message = messages[0]
    assert message.run_id == RUN_ID
    assert message.command is ControlCommand.RESTORE
    assert message.reason
    assert rig.control.sent[0][0] == KEY
    assert len(rig.tasks.sent) == tasks_before + 1  # only the good run's attempt again
    # The table is left as it was: only the control agent writes it.
    assert rig.shell.load(RUN_ID) is None
    # The control agent then fails it.
    assert await rig.shell.restore_or_resume(RUN_ID) is True
    expected = ErrorKind.UNREADABLE_STATE if kind == "unreadable" else ErrorKind.STATE_TOO_LARGE
    assert_stored_failed(rig, expected)
    assert rig.state("run-ok").status is RunStatus.RUNNING
    assert_everything_sent_fits(rig)


async def test_resume_all_with_only_belonging_runs(rig: Rig) -> None:
    rig.runs[KEY] = b"not json"
    assert await rig.shell.resume_all(utcnow(), belongs=lambda run_id: run_id != RUN_ID) == 0
    assert rig.control.sent == []


class UnreadableCheckpoint(NoRecords):
    """PostgreSQL has a checkpoint of the run that does not validate."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def get_state(self, run_id: str) -> RunState | None:
        self.asked.append(run_id)
        return RunState.model_validate({"run_id": run_id, "status": "RUNNING"})  # raises ValidationError


def test_the_fake_checkpoint_raises_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        UnreadableCheckpoint().get_state(RUN_ID)


async def test_restore_or_resume_fails_a_run_whose_postgresql_checkpoint_cannot_be_read(rig: Rig) -> None:
    records = UnreadableCheckpoint()
    rig.shell.records = records
    assert await rig.shell.restore_or_resume(RUN_ID) is True
    assert records.asked == [RUN_ID]
    state = assert_stored_failed(rig, ErrorKind.UNREADABLE_STATE)
    assert state.error is not None
    assert "PostgreSQL" in state.error.message
    assert rig.updates()[-1].status == RunStatus.FAILED
    assert rig.checkpoints.put_states == [state]
    assert rig.tasks.sent == []


async def test_restore_or_resume_of_a_readable_run_does_not_ask_postgresql(rig: Rig) -> None:
    rig.shell.records = UnreadableCheckpoint()
    await rig.shell.handle(submitted(make_plan(2)))
    assert await rig.shell.restore_or_resume(RUN_ID) is True
    assert rig.state().status is RunStatus.RUNNING


# ---------------------------------------------------------------- dead letters


async def test_park_of_a_2_mb_payload_sends_one_dead_letter_that_fits(rig: Rig) -> None:
    payload = b'{"run_id": "run-1", "blob": "' + b"z" * 2_000_000 + b'"}'
    await rig.shell.park("orchestrator.results", KEY, payload, "payload over the limit")
    assert len(rig.deadletter.sent) == 1
    key, value = rig.deadletter.sent[0]
    assert record_size(key, value) <= LIMIT
    record = decode(DeadLetterRecord, value)
    assert record.truncated
    assert record.original_bytes == len(payload)
    assert record.payload is not None
    assert payload.startswith(record.payload.encode())
    assert record.app == "test-executor"
    assert rig.shell.deadletters.parked == 1


async def test_a_dead_letter_effect_without_origin_is_a_note(rig: Rig) -> None:
    await rig.shell.carry_out([DeadLetter(run_id=RUN_ID, reason="something about run-1")])
    assert len(rig.deadletter.sent) == 1
    key, _ = rig.deadletter.sent[0]
    assert key == KEY
    record = rig.dead_letters()[0]
    assert record.source_topic == "(executor)"
    assert record.reason == "something about run-1"
    assert record.payload == ""
    assert record.original_bytes == 0


async def test_a_retry_of_a_run_failed_too_large_is_a_dead_letter(rig: Rig) -> None:
    await rig.shell.handle(submitted(make_plan(2)))
    await rig.shell.handle(result(rig.state(), at(1), output={"summary": BIG}))
    failed = rig.runs[KEY]
    await rig.shell.handle(RetryRequested(run_id=RUN_ID, at=at(2)))
    assert rig.runs[KEY] == failed  # no change
    records = rig.dead_letters()
    assert len(records) == 1
    assert records[0].source_topic == "(executor)"
    assert "state_too_large" in records[0].reason
    origin_payload = b'{"run_id": "run-1", "command": "retry"}'
    await rig.shell.handle(
        RetryRequested(run_id=RUN_ID, at=at(3)), origin=("orchestrator.control", KEY, origin_payload)
    )
    records = rig.dead_letters()
    assert len(records) == 2
    assert records[1].source_topic == "orchestrator.control"
    assert records[1].payload == origin_payload.decode()


async def test_a_big_submission_through_submit_is_stored_failed(rig: Rig) -> None:
    submission = WorkflowSubmission(run_id=RUN_ID, plan=make_plan(2), input={"text": BIG})
    await rig.shell.submit(submission)
    state = assert_stored_failed(rig, ErrorKind.STATE_TOO_LARGE)
    assert state.fingerprint == submission.fingerprint()
    assert rig.tasks.sent == []


def test_the_rig_limit_is_the_settings_minimum() -> None:
    from switchyard.settings import Settings

    field = Settings.model_fields["max_message_bytes"]
    assert any(getattr(m, "ge", None) == LIMIT for m in field.metadata)
    assert make_rig(max_message_bytes=LIMIT).shell.limit == LIMIT


async def test_a_finished_run_over_a_lowered_limit_is_left_as_it_is(rig: Rig) -> None:
    # Stored COMPLETED under a larger limit: it will not grow, and its record must stay what it was.
    running = oversize_running_state()
    done = running.model_copy(update={"status": RunStatus.COMPLETED, "output": {"summary": "ok"}})
    rig.runs[KEY] = raw = done.model_dump_json().encode()
    assert rig.shell.load(RUN_ID) == done
    await rig.shell.handle(result(running, at(1)))  # a late duplicate result
    assert rig.runs[KEY] == raw
    assert rig.checkpoints.put_states == []
    assert await rig.shell.resume_all(at(2)) == 0
    assert control_sent(rig) == []


async def test_an_unreadable_finished_run_is_left_as_it_is_and_the_event_parked(rig: Rig) -> None:
    stored = json.loads(start(make_plan(2)).model_dump_json())
    stored["status"] = "COMPLETED"
    stored["steps"] = "not steps"  # unreadable, but it says it finished
    rig.runs[KEY] = raw = json.dumps(stored).encode()
    await rig.shell.handle(result(start(make_plan(2)), at(1)))
    assert rig.runs[KEY] == raw
    assert rig.checkpoints.put_states == []
    (letter,) = rig.dead_letters()
    assert "has finished, but its stored state cannot be read" in letter.reason
    assert await rig.shell.resume_all(at(2)) == 0
    assert control_sent(rig) == []
