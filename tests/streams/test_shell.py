"""RunShell (streams/shell.py) with a plain dict as the ``runs`` table and recording fakes.

No Faust, no broker: the topics, the checkpointer and the timers are small
fakes that record what the shell asks of them.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import inspect
import json
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import pytest

from models.agents import AgentEntry
from models.messages import (
    AgentTask,
    ControlCommand,
    ControlMessage,
    DeadLetterRecord,
    MonitoringUpdate,
    WorkflowSubmission,
    decode,
    utcnow,
)
from models.plan import RetryPolicy, WorkflowPlan
from models.run import (
    AgentResultReceived,
    RunState,
    RunStatus,
    StepStatus,
    StepTimedOut,
)
from streams.run_store import read_state, records_of
from streams.shell import TIMEOUT_REPEAT, RunShell
from streams.timers import TimerKey
from tests.models.run_builders import (
    INPUT,
    RUN_ID,
    T0,
    at,
    current_step,
    execution_of,
    failure,
    make_plan,
    result,
    submitted,
)

KEY = RUN_ID.encode()
DEFAULT_TIMEOUT = timedelta(seconds=300)  # ExecutionDefaults().timeout_s
DELAYED = RetryPolicy(max_attempts=3, initial_delay_s=10.0, multiplier=2.0, jitter=0.0)


def tkey(kind: Literal["timeout", "dispatch"], step_id: str, attempt: int, *, run_id: str = RUN_ID) -> TimerKey:
    """The timer of one attempt of a plain (chain) step: its deadline or its delayed dispatch."""
    return TimerKey(kind, run_id, f"{run_id}/{step_id}/{attempt}")


# ---------------------------------------------------------------------- fakes


@dataclass
class FakeTopic:
    """Records every send, in order."""

    sent: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def send(self, *, key: bytes, value: bytes) -> None:
        self.sent.append((key, value))


@dataclass
class FailingTopic(FakeTopic):
    """Raises (as a producer does when the broker is away or a message is too large) for some keys."""

    failing_keys: frozenset[bytes] = frozenset({KEY})

    async def send(self, *, key: bytes, value: bytes) -> None:
        if key in self.failing_keys:
            raise RuntimeError("broker went away")
        await super().send(key=key, value=value)


@dataclass
class FakeCheckpoints:
    put_states: list[RunState] = field(default_factory=list)
    put_changed: list[frozenset[str] | None] = field(default_factory=list)

    def put(self, state: RunState, changed: frozenset[str] | None = None) -> None:
        self.put_states.append(state)
        self.put_changed.append(changed)


@dataclass
class FakeTimers:
    """Keeps the latest timer per key (as the real Timers do) and every call."""

    pending: dict[TimerKey, tuple[datetime, Callable[[], Any]]] = field(default_factory=dict)
    calls: list[tuple[datetime, TimerKey]] = field(default_factory=list)

    def call_at(self, when: datetime, key: TimerKey, action: Callable[[], Any]) -> None:
        self.pending[key] = (when, action)
        self.calls.append((when, key))

    def cancel(self, key: TimerKey) -> None:
        self.pending.pop(key, None)

    def cancel_where(self, matches: Callable[[TimerKey], bool]) -> int:
        gone = [key for key in self.pending if matches(key)]
        for key in gone:
            del self.pending[key]
        return len(gone)

    async def fire(self, key: TimerKey) -> None:
        _, action = self.pending.pop(key)
        await action()

    def of_attempts(self) -> set[TimerKey]:
        """The pending timers of attempts (deadlines, delayed dispatches), not those that evict finished runs."""
        return {key for key in self.pending if key.kind != "evict"}


@dataclass
class Rig:
    runs: dict[bytes, bytes]
    tasks: FakeTopic
    control: FakeTopic
    monitoring: FakeTopic
    deadletter: FakeTopic
    checkpoints: FakeCheckpoints
    timers: FakeTimers
    shell: RunShell

    def state(self, run_id: str = RUN_ID) -> RunState:
        """The stored state, read from its records (strictly: a missing part fails)."""
        return read_state(self.runs, run_id, self.runs[run_id.encode()])

    def tasks_sent(self) -> list[AgentTask]:
        return [decode(AgentTask, value) for _, value in self.tasks.sent]

    def updates(self) -> list[MonitoringUpdate]:
        return [decode(MonitoringUpdate, value) for _, value in self.monitoring.sent]

    def dead_letters(self) -> list[DeadLetterRecord]:
        return [decode(DeadLetterRecord, value) for _, value in self.deadletter.sent]

    def outbound(self) -> tuple[int, ...]:
        """How much went anywhere: a fingerprint for "nothing happened"."""
        return (
            len(self.tasks.sent),
            len(self.control.sent),
            len(self.monitoring.sent),
            len(self.deadletter.sent),
            len(self.checkpoints.put_states),
            len(self.timers.calls),
        )


def make_rig(
    runs: dict[bytes, bytes] | None = None, tasks: FakeTopic | None = None, max_message_bytes: int = 1_000_000
) -> Rig:
    parts: dict[str, Any] = {
        "runs": {} if runs is None else runs,
        "tasks": FakeTopic() if tasks is None else tasks,
        "control": FakeTopic(),
        "monitoring": FakeTopic(),
        "deadletter": FakeTopic(),
        "checkpoints": FakeCheckpoints(),
        "timers": FakeTimers(),
    }
    shell = RunShell(
        **parts,
        cancels=FakeTopic(),
        records=NoRecords(),
        app_name="test-executor",
        max_message_bytes=max_message_bytes,
    )
    return Rig(**parts, shell=shell)


class NoRecords:
    """PostgreSQL knows no run (the table is the only state in these tests)."""

    def exists(self, run_id: str) -> str | None:
        return None

    def versions(self, run_ids: Iterable[str]) -> dict[str, int]:
        return {}

    def get_state(self, run_id: str) -> RunState | None:
        return None

    def record_rejected(self, run_id: str, *, kind: str, message: str, plan: Any = None) -> bool:
        return False

    def fingerprint(self, run_id: str) -> str | None:
        return None


@pytest.fixture
def rig() -> Rig:
    return make_rig()


async def submit(rig: Rig, retry: RetryPolicy | None = None, n_steps: int = 2) -> RunState:
    await rig.shell.handle(submitted(make_plan(n_steps, retry=retry)))
    return rig.state()


# ---------------------------------------------------------------- submission


async def test_submission_stores_state_as_json_bytes_under_run_id_bytes(rig: Rig) -> None:
    await rig.shell.handle(submitted(make_plan(2)))

    # The head under the run id, holding what the submission changed (s1's step and execution); plan, input apart.
    assert set(rig.runs) == {KEY, b"run-1/plan", b"run-1/input"}
    raw = rig.runs[KEY]
    assert isinstance(raw, bytes)
    assert raw.endswith(b',"layout":2}')
    document = json.loads(raw)
    assert document["run_id"] == RUN_ID
    assert document["status"] == "RUNNING"
    assert document["steps"] == ["s1"]
    assert list(document["inline_steps"]) == ["s1"]
    assert document["executions"] == ["s1@1"]
    assert document["inline"]["s1@1"]["status"] == "RUNNING"
    assert document["map_items"] == {}
    assert "plan" not in document
    assert "input" not in document
    assert json.loads(rig.runs[b"run-1/plan"]) == make_plan(2).model_dump(mode="json")
    assert json.loads(rig.runs[b"run-1/input"]) == INPUT
    state = read_state(rig.runs, RUN_ID, raw)
    assert current_step(state) == "s1"
    assert state.version == 1
    assert rig.shell.applied == 1
    assert rig.shell.ignored == 0


async def test_submission_sends_exactly_one_task_keyed_by_run_id(rig: Rig) -> None:
    state = await submit(rig)

    assert len(rig.tasks.sent) == 1
    key, value = rig.tasks.sent[0]
    assert key == KEY
    task = decode(AgentTask, value)
    assert task.run_id == RUN_ID
    assert task.step_id == "s1"
    assert task.attempt == 1
    assert task.correlation_id == f"{RUN_ID}/s1/1"
    assert task.agent_name == "agent-s1"
    assert task.input == {"text": INPUT["text"]}
    assert task.deadline == T0 + DEFAULT_TIMEOUT
    attempt = execution_of(state, "s1").current
    assert attempt is not None
    assert attempt.correlation_id == task.correlation_id
    assert rig.control.sent == []
    assert rig.deadletter.sent == []


async def test_submission_sets_a_timeout_timer_and_no_dispatch_timer(rig: Rig) -> None:
    await submit(rig)

    assert list(rig.timers.pending) == [tkey("timeout", "s1", 1)]
    when, _ = rig.timers.pending[tkey("timeout", "s1", 1)]
    assert when == T0 + DEFAULT_TIMEOUT


async def test_submission_queues_a_checkpoint_of_the_stored_state(rig: Rig) -> None:
    state = await submit(rig)

    assert rig.checkpoints.put_states == [state]
    assert rig.checkpoints.put_changed == [None]  # a new run: all of it


async def test_submission_publishes_monitoring_updates_keyed_by_run_id(rig: Rig) -> None:
    await submit(rig)

    assert {key for key, _ in rig.monitoring.sent} == {KEY}
    updates = rig.updates()
    assert [(u.run_id, u.step_id, u.attempt, u.status) for u in updates] == [
        (RUN_ID, None, None, "RUNNING"),
        (RUN_ID, "s1", 1, "RUNNING"),
    ]


# -------------------------------------------------------------------- results


async def test_result_completes_the_step_and_dispatches_the_next(rig: Rig) -> None:
    state = await submit(rig)

    await rig.shell.handle(result(state, at(5)))

    new = rig.state()
    assert new.version == 2
    assert new.steps["s1"].status is StepStatus.COMPLETED
    assert new.output_of("s1") == {"summary": "out-s1"}
    assert current_step(new) == "s2"
    tasks = rig.tasks_sent()
    assert [t.correlation_id for t in tasks] == [f"{RUN_ID}/s1/1", f"{RUN_ID}/s2/1"]
    assert rig.tasks.sent[1][0] == KEY
    assert tasks[1].input == {"previous": "out-s1", "topic": INPUT["text"]}
    assert tkey("timeout", "s2", 1) in rig.timers.pending
    assert rig.timers.pending[tkey("timeout", "s2", 1)][0] == at(5) + DEFAULT_TIMEOUT
    assert rig.checkpoints.put_states[-1] == new
    assert rig.checkpoints.put_changed[-1] == frozenset({"s1@1", "s2@1"})  # the executions it touched
    assert ("s1", "COMPLETED") in [(u.step_id, u.status) for u in rig.updates()]


async def test_last_result_completes_the_run_without_sending_a_task(rig: Rig) -> None:
    state = await submit(rig, n_steps=1)

    await rig.shell.handle(result(state, at(5)))

    new = rig.state()
    assert new.status is RunStatus.COMPLETED
    assert new.output == {"summary": "out-s1"}
    assert len(rig.tasks.sent) == 1
    assert rig.updates()[-1].status == "COMPLETED"
    assert rig.checkpoints.put_states[-1] == new


async def test_duplicate_result_changes_nothing_and_sends_nothing(rig: Rig) -> None:
    state = await submit(rig)
    event = result(state, at(5))
    await rig.shell.handle(event)
    table_before = dict(rig.runs)
    outbound_before = rig.outbound()
    ignored_before = rig.shell.ignored

    effects = rig.shell.apply(event)
    await rig.shell.carry_out(effects)
    await rig.shell.handle(event)

    assert effects == []
    assert rig.runs == table_before
    assert rig.outbound() == outbound_before
    assert rig.shell.ignored == ignored_before + 2
    assert rig.shell.applied == 2  # the submission and the first copy of the result


async def test_result_for_an_unknown_run_is_a_dead_letter_and_stores_nothing(rig: Rig) -> None:
    state = await submit(rig)
    stray = result(state, at(5)).result.model_copy(update={"run_id": "other-run"})
    outbound_before = rig.outbound()

    await rig.shell.handle(AgentResultReceived(result=stray, at=at(5)))

    assert set(rig.runs) == {KEY, b"run-1/plan", b"run-1/input"}  # run-1's records only
    assert len(rig.deadletter.sent) == 1
    key, _ = rig.deadletter.sent[0]
    assert key == b"other-run"
    (record,) = rig.dead_letters()
    assert "other-run" in record.reason
    assert record.app == "test-executor"
    assert record.source_topic == "(executor)"
    outbound_after = rig.outbound()
    assert outbound_after[3] == outbound_before[3] + 1
    assert outbound_after[:3] + outbound_after[4:] == outbound_before[:3] + outbound_before[4:]


async def test_conflicting_resubmission_is_a_dead_letter_and_keeps_the_run(rig: Rig) -> None:
    await submit(rig)
    table_before = dict(rig.runs)

    await rig.shell.handle(submitted(make_plan(2), run_input={"text": "something else"}))

    assert rig.runs == table_before
    (record,) = rig.dead_letters()
    assert "already used" in record.reason
    assert rig.deadletter.sent[0][0] == KEY
    assert len(rig.tasks.sent) == 1


# ------------------------------------------------------ delayed retries, timers


async def test_delayed_retry_sets_a_dispatch_timer_instead_of_sending(rig: Rig) -> None:
    state = await submit(rig, retry=DELAYED)

    await rig.shell.handle(failure(state, at(5)))

    new = rig.state()
    attempt = execution_of(new, "s1").current
    assert attempt is not None
    assert attempt.number == 2
    assert attempt.status is StepStatus.PENDING
    assert len(rig.tasks.sent) == 1  # only the first attempt: nothing sent now
    dispatch_key = tkey("dispatch", "s1", 2)
    assert dispatch_key in rig.timers.pending
    assert rig.timers.pending[dispatch_key][0] == at(15)
    assert rig.timers.pending[tkey("timeout", "s1", 2)][0] == at(15) + DEFAULT_TIMEOUT
    assert [u.status for u in rig.updates() if u.attempt == 2] == ["SCHEDULED"]


async def test_firing_the_dispatch_timer_sends_the_task_with_the_same_correlation_id(rig: Rig) -> None:
    state = await submit(rig, retry=DELAYED)
    await rig.shell.handle(failure(state, at(5)))
    table_before = dict(rig.runs)

    await rig.timers.fire(tkey("dispatch", "s1", 2))

    attempt = execution_of(rig.state(), "s1").current
    assert attempt is not None
    assert len(rig.tasks.sent) == 2
    key, value = rig.tasks.sent[1]
    assert key == KEY
    task = decode(AgentTask, value)
    assert task.correlation_id == attempt.correlation_id == f"{RUN_ID}/s1/2"
    assert task.attempt == 2
    assert task.deadline == attempt.deadline
    assert rig.runs == table_before  # a timer never writes the table (rule 2)


async def test_firing_a_timeout_sends_a_step_timeout_control_message(rig: Rig) -> None:
    await submit(rig)
    table_before = dict(rig.runs)

    await rig.timers.fire(tkey("timeout", "s1", 1))

    assert len(rig.control.sent) == 1
    key, value = rig.control.sent[0]
    assert key == KEY
    message = decode(ControlMessage, value)
    assert message.command is ControlCommand.STEP_TIMEOUT
    assert (message.run_id, message.step_id, message.attempt) == (RUN_ID, "s1", 1)
    assert rig.runs == table_before  # the timer only sends an event (rule 2)
    assert len(rig.tasks.sent) == 1


async def test_a_timeout_fires_again_until_its_attempt_is_seen_to_end(rig: Rig) -> None:
    # If the step_timeout message were lost, nothing else would end the attempt.
    await submit(rig, retry=DELAYED)
    key = tkey("timeout", "s1", 1)

    await rig.timers.fire(key)
    when, _ = rig.timers.pending[key]
    assert when > utcnow() + TIMEOUT_REPEAT - timedelta(seconds=5)
    await rig.timers.fire(key)
    assert len(rig.control.sent) == 2, "the repeat sends the same step timeout again"
    assert {decode(ControlMessage, value).attempt for _, value in rig.control.sent} == {1}

    attempt = execution_of(rig.state(), "s1").current
    assert attempt is not None
    await rig.shell.handle(StepTimedOut(run_id=RUN_ID, step_id="s1", attempt=1, at=attempt.deadline))
    assert key not in rig.timers.pending, "the attempt ended: its deadline is forgotten"


async def test_a_timeout_whose_attempt_already_ended_sends_nothing(rig: Rig) -> None:
    await submit(rig)
    key = tkey("timeout", "s1", 1)
    _, action = rig.timers.pending[key]
    await rig.shell.handle(result(rig.state(), at(5)))
    assert key not in rig.timers.pending

    await action()  # a timer that was already due when the result came

    assert rig.control.sent == []
    assert key not in rig.timers.pending


async def test_applying_the_timeout_retries_the_step(rig: Rig) -> None:
    state = await submit(rig, retry=DELAYED)
    attempt = execution_of(state, "s1").current
    assert attempt is not None

    await rig.shell.handle(StepTimedOut(run_id=RUN_ID, step_id="s1", attempt=1, at=attempt.deadline))

    new = rig.state()
    current = execution_of(new, "s1").current
    assert current is not None
    assert current.number == 2
    error = execution_of(new, "s1").attempts[0].error
    assert error is not None
    assert error.kind == "timeout"
    assert tkey("dispatch", "s1", 2) in rig.timers.pending


# ------------------------------------------------------------------ dead letters


async def test_park_keeps_a_non_utf8_payload_as_base64(rig: Rig) -> None:
    payload = b"\xff\xfe not text \x80"

    await rig.shell.park("orchestrator.plans", b"run-9", payload, "cannot decode: not UTF-8 text")

    assert len(rig.deadletter.sent) == 1
    key, _ = rig.deadletter.sent[0]
    assert key == b"run-9"
    (record,) = rig.dead_letters()
    assert record.payload is None
    assert record.payload_base64 is not None
    assert base64.b64decode(record.payload_base64) == payload
    assert record.reason == "cannot decode: not UTF-8 text"
    assert record.source_topic == "orchestrator.plans"
    assert record.key == "run-9"
    assert record.app == "test-executor"
    assert rig.runs == {}


async def test_park_keeps_a_text_payload_as_text_and_a_missing_key_as_none(rig: Rig) -> None:
    await rig.shell.park("results.topic", None, b'{"not": "a result"}', "bad shape")

    key, _ = rig.deadletter.sent[0]
    assert key == b""
    (record,) = rig.dead_letters()
    assert record.key is None
    assert record.payload == '{"not": "a result"}'
    assert record.payload_base64 is None


# ------------------------------------------------------------------------ resume


async def test_resume_all_redispatches_in_flight_attempts_with_the_same_correlation_id(rig: Rig) -> None:
    state = await submit(rig)
    attempt = execution_of(state, "s1").current
    assert attempt is not None
    restarted = make_rig(runs=rig.runs)  # a new worker over the recovered table
    table_before = dict(rig.runs)

    resumed = await restarted.shell.resume_all(at(30))

    assert resumed == 1
    assert len(restarted.tasks.sent) == 1
    key, value = restarted.tasks.sent[0]
    assert key == KEY
    task = decode(AgentTask, value)
    assert task.correlation_id == attempt.correlation_id == rig.tasks_sent()[0].correlation_id
    assert task.attempt == 1
    assert restarted.timers.pending[tkey("timeout", "s1", 1)][0] == attempt.deadline
    assert restarted.runs == table_before
    assert restarted.checkpoints.put_states == []


async def test_resume_all_rearms_a_delayed_retry_without_sending_it(rig: Rig) -> None:
    state = await submit(rig, retry=DELAYED)
    await rig.shell.handle(failure(state, at(5)))
    restarted = make_rig(runs=rig.runs)

    resumed = await restarted.shell.resume_all(at(10))  # before the retry's time, at(15)

    assert resumed == 1
    assert restarted.tasks.sent == []
    assert restarted.timers.pending[tkey("dispatch", "s1", 2)][0] == at(15)
    assert restarted.timers.pending[tkey("timeout", "s1", 2)][0] == at(15) + DEFAULT_TIMEOUT

    await restarted.timers.fire(tkey("dispatch", "s1", 2))

    assert [t.correlation_id for t in restarted.tasks_sent()] == [f"{RUN_ID}/s1/2"]


async def test_resume_all_sends_a_delayed_retry_whose_time_has_passed(rig: Rig) -> None:
    state = await submit(rig, retry=DELAYED)
    await rig.shell.handle(failure(state, at(5)))
    restarted = make_rig(runs=rig.runs)

    await restarted.shell.resume_all(at(60))

    assert [t.correlation_id for t in restarted.tasks_sent()] == [f"{RUN_ID}/s1/2"]
    assert not any(key.kind == "dispatch" for key in restarted.timers.pending)


async def test_asking_again_sends_only_the_attempts_in_flight(rig: Rig) -> None:
    # The second pass after a restart: tasks again for dispatched attempts,
    # nothing for a delayed retry, and no timer touched.
    state = await submit(rig)
    await rig.shell.handle(submitted(make_plan(2, retry=DELAYED), run_id="run-2"))
    await rig.shell.handle(failure(rig.state("run-2"), at(5)))  # run-2's retry is due at(15)
    restarted = make_rig(runs=rig.runs)

    asked = await restarted.shell.resume_all(at(10), dispatches_only=True)

    assert asked == 1
    attempt = execution_of(state, "s1").current
    assert attempt is not None
    assert [t.correlation_id for t in restarted.tasks_sent()] == [attempt.correlation_id]
    assert restarted.timers.calls == []
    assert restarted.runs == rig.runs


async def test_resume_all_skips_finished_runs(rig: Rig) -> None:
    finished = await submit(rig, n_steps=1)
    await rig.shell.handle(result(finished, at(5)))
    await rig.shell.handle(submitted(make_plan(2), run_id="run-2"))
    restarted = make_rig(runs=rig.runs)

    resumed = await restarted.shell.resume_all(at(30))

    assert resumed == 1
    assert [t.run_id for t in restarted.tasks_sent()] == ["run-2"]
    assert restarted.timers.of_attempts() == {tkey("timeout", "s1", 1, run_id="run-2")}
    assert restarted.monitoring.sent == []


async def test_catching_up_checkpoints_runs_ahead_of_postgresql_and_resends_recent_ends(rig: Rig) -> None:
    # A kill -9 lost the checkpointer's queue and the producer's: PostgreSQL has
    # "done" at an older version (still RUNNING there), "fresh" not at all,
    # "even" as it is; the monitoring topic may not have seen "done" finish.
    done = await submit(rig, n_steps=1)
    await rig.shell.handle(result(done, at(5)))
    for run_id in ("fresh", "even"):
        await rig.shell.handle(submitted(make_plan(2), run_id=run_id))
    restarted = make_rig(runs=rig.runs)
    versions = {run_id: rig.state(run_id).version for run_id in (RUN_ID, "fresh", "even")}
    final = [u for u in rig.updates() if u.step_id is None and u.status == "COMPLETED"]

    behind, resent = await restarted.shell.catch_up(
        [RUN_ID, "fresh", "even", "unknown"], {RUN_ID: versions[RUN_ID] - 1, "even": versions["even"]}
    )

    assert (behind, resent) == (2, 1)
    written = {state.run_id: state for state in restarted.checkpoints.put_states}
    assert set(written) == {RUN_ID, "fresh"}
    assert written[RUN_ID].status is RunStatus.COMPLETED
    assert restarted.updates() == final  # the very same update: a consumer sees a copy
    assert restarted.tasks.sent == []


async def test_catching_up_leaves_ends_older_than_the_crash_window(rig: Rig) -> None:
    done = await submit(rig, n_steps=1)
    await rig.shell.handle(result(done, at(5)))
    await rig.shell.handle(submitted(make_plan(2), run_id="later"))  # moved long after "done" finished
    later = rig.state("later")
    rig.runs[b"later"] = (
        later.model_copy(update={"updated_at": at(5) + timedelta(minutes=5)}).model_dump_json().encode()
    )
    restarted = make_rig(runs=rig.runs)

    assert await restarted.shell.catch_up([RUN_ID, "later"], {RUN_ID: 99, "later": 99}) == (0, 0)
    assert restarted.monitoring.sent == []


# ------------------------------------------------------------- failing sends
#
# docs/architecture.md, "Recovery": every attempt in flight has a deadline, so a lost
# dispatch becomes a timeout and a retry, never a hung run. apply() has stored
# the new state before carry_out() runs; if one send then fails, the rest of
# the effects must still protect that state.


@pytest.mark.parametrize("failing", ["tasks", "monitoring"])
async def test_a_failed_send_still_arms_the_deadline_and_queues_the_checkpoint(rig: Rig, failing: str) -> None:
    setattr(rig.shell, failing, FailingTopic())

    with contextlib.suppress(RuntimeError):  # the agent's guard parks the message either way
        await rig.shell.handle(submitted(make_plan(2)))

    state = rig.state()
    assert state.status is RunStatus.RUNNING  # stored by apply() before the send failed
    assert tkey("timeout", "s1", 1) in rig.timers.pending, "the stored attempt has no deadline: the run hangs"
    assert rig.checkpoints.put_states == [state], "the stored state is never checkpointed"


async def test_resume_all_goes_on_after_one_run_fails_to_resume(rig: Rig) -> None:
    await submit(rig)
    await rig.shell.handle(submitted(make_plan(2), run_id="run-2"))
    restarted = make_rig(runs=rig.runs, tasks=FailingTopic())  # run-1's re-dispatch fails

    with contextlib.suppress(RuntimeError):
        await restarted.shell.resume_all(at(30))

    assert [task.run_id for task in restarted.tasks_sent()] == ["run-2"], "run-2 was never resumed"
    assert {tkey("timeout", "s1", 1, run_id="run-2"), tkey("timeout", "s1", 1)} <= set(restarted.timers.pending)


# ------------------------------------------------------------- apply is atomic


def test_apply_is_a_plain_function_without_await() -> None:
    assert not inspect.iscoroutinefunction(RunShell.apply)
    assert not inspect.isasyncgenfunction(RunShell.apply)
    assert not inspect.isgeneratorfunction(RunShell.apply)
    tree = ast.parse(textwrap.dedent(inspect.getsource(RunShell.apply)))
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Await | ast.AsyncFor | ast.AsyncWith)]


def test_apply_writes_the_table_before_any_effect_is_carried_out(rig: Rig) -> None:
    effects = rig.shell.apply(submitted(make_plan(2)))

    assert isinstance(effects, list)
    assert effects
    assert KEY in rig.runs  # stored by apply itself, synchronously
    assert rig.outbound() == (0, 0, 0, 0, 0, 0)  # nothing carried out yet


class BrokenRecords(NoRecords):
    def exists(self, run_id: str) -> str | None:
        raise ConnectionError("PostgreSQL is down")


async def test_a_submission_still_starts_while_postgresql_is_down() -> None:
    rig = make_rig()
    rig.shell.records = BrokenRecords()
    await rig.shell.submit(WorkflowSubmission(run_id=RUN_ID, plan=make_plan(2), input={"text": "x"}))
    assert rig.state().status is RunStatus.RUNNING
    assert len(rig.tasks_sent()) == 1


class RecordedAs(NoRecords):
    def __init__(self, status: str, state: RunState | None = None, fingerprint: str | None = None) -> None:
        self.status, self.state = status, state
        self._fingerprint = fingerprint or (state.fingerprint if state is not None else None)

    def exists(self, run_id: str) -> str | None:
        return self.status

    def get_state(self, run_id: str) -> RunState | None:
        return self.state

    def fingerprint(self, run_id: str) -> str | None:
        return self._fingerprint


async def test_a_late_copy_of_a_finished_run_is_not_started_again() -> None:
    rig = make_rig()
    late = WorkflowSubmission(run_id=RUN_ID, plan=make_plan(2), input={"text": "x"})
    rig.shell.records = RecordedAs("COMPLETED", fingerprint=late.fingerprint())
    await rig.shell.submit(late)
    assert rig.runs == {}
    assert rig.tasks_sent() == []
    assert rig.dead_letters() == []  # the same submission again: nothing to say


async def test_another_submission_of_a_run_only_postgresql_knows_is_dead_lettered() -> None:
    rig = make_rig()
    first = WorkflowSubmission(run_id=RUN_ID, plan=make_plan(2), input={"text": "alpha"})
    rig.shell.records = RecordedAs("COMPLETED", fingerprint=first.fingerprint())
    await rig.shell.submit(WorkflowSubmission(run_id=RUN_ID, plan=make_plan(2), input={"text": "beta"}))
    assert rig.runs == {}
    assert rig.tasks_sent() == []
    (letter,) = rig.dead_letters()
    assert "already used by a different submission" in letter.reason
    # A refused submission (recorded without a state) has no fingerprint: nothing is "the same" as it.
    rig = make_rig()
    rig.shell.records = RecordedAs("FAILED")
    await rig.shell.submit(first)
    assert rig.runs == {}
    assert len(rig.dead_letters()) == 1


async def test_a_submission_of_a_running_run_the_table_lost_restores_it() -> None:
    donor = make_rig()
    state = await submit(donor)
    rig = make_rig()
    rig.shell.records = RecordedAs("RUNNING", state)
    await rig.shell.submit(WorkflowSubmission(run_id=RUN_ID, plan=make_plan(2), input={"text": "hello"}))
    assert rig.state() == state
    (task,) = rig.tasks_sent()
    assert task.correlation_id == f"{RUN_ID}/s1/1", "the attempt in flight, with its correlation id"


async def test_a_finished_attempt_forgets_its_deadline_and_dispatch_timers(rig: Rig) -> None:
    state = await submit(rig, retry=DELAYED)
    assert tkey("timeout", "s1", 1) in rig.timers.pending
    await rig.shell.handle(failure(state, at(5)))
    assert tkey("timeout", "s1", 1) not in rig.timers.pending, "attempt 1 ended"
    assert tkey("dispatch", "s1", 2) in rig.timers.pending
    state = rig.state()
    await rig.shell.handle(result(state, at(20)))
    assert not any(key.correlation_id == f"{RUN_ID}/s1/2" for key in rig.timers.pending), "attempt 2 ended"
    assert tkey("timeout", "s2", 1) in rig.timers.pending


# ------------------------------------------------------- parsed states kept


async def test_a_run_read_at_its_next_event_is_the_state_its_bytes_hold(rig: Rig) -> None:
    # The shell keeps the states it wrote parsed; they must be what the table's bytes say.
    state = await submit(rig, n_steps=3)
    await rig.shell.handle(result(state, at(5)))
    kept = rig.shell.load(RUN_ID)

    assert kept is not None
    assert kept == read_state(rig.runs, RUN_ID, rig.runs[KEY])
    written = records_of(None, kept).writes
    assert {key: rig.runs.get(key) for key in written} == written


async def test_a_state_replaced_in_the_table_is_read_afresh(rig: Rig) -> None:
    # A recovered changelog record (or another writer) replaces the bytes: the kept parse must not be used.
    state = await submit(rig, n_steps=2)
    older = rig.runs[KEY]
    await rig.shell.handle(result(state, at(5)))
    assert current_step(rig.state()) == "s2"

    rig.runs[KEY] = older
    loaded = rig.shell.load(RUN_ID)

    assert loaded is not None
    assert current_step(loaded) == "s1"
    assert loaded.version == state.version


class OneAgentRegistry:
    """A registry that knows one agent, and counts the names it is asked for."""

    def __init__(self, entry: AgentEntry) -> None:
        self.entry = entry
        self.asked: list[str] = []

    async def get(self, name: str) -> AgentEntry | None:
        self.asked.append(name)
        return self.entry if name == self.entry.name else None


async def test_a_run_takes_the_agents_input_timeout_from_the_registry_and_the_global_default() -> None:
    entry = AgentEntry(name="asker", url="http://127.0.0.1:9/", timeout_s=12, input_timeout_s=3600)
    registry = OneAgentRegistry(entry)
    shell = RunShell(
        runs={},
        tasks=FakeTopic(),
        cancels=FakeTopic(),
        control=FakeTopic(),
        monitoring=FakeTopic(),
        deadletter=FakeTopic(),
        checkpoints=FakeCheckpoints(),
        timers=FakeTimers(),
        records=NoRecords(),
        registry=registry,
        default_input_timeout_s=900,
    )
    plan = WorkflowPlan.model_validate(
        {
            "workflow_id": "wf",
            "name": "wf",
            "version": "1",
            "start_step": "ask",
            "steps": {
                "ask": {"id": "ask", "agent_name": "asker", "next_step": "review"},
                "review": {"id": "review", "approval": {"prompt": "ok?"}},
            },
        }
    )
    defaults = await shell.defaults_for(plan)
    assert defaults.input_timeout_s == 900
    assert defaults.agents["asker"].input_timeout_s == 3600
    assert defaults.agents["asker"].timeout_s == 12
    assert registry.asked == ["asker"], "an approval step calls no agent: nothing to look up"
