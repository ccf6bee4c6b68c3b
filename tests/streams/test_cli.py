"""The command line's decisions (streams/cli.py), without a stack.

Size refusal, the run_id reuse decision, the report of a run the executor
refused or another submission started, exit codes of ``status``, broker
failures told apart, and registry files that are not files. Records are built
as PostgreSQL would return them; the few commands run here as processes need
neither a broker nor a database (they stop before either is asked).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
)
from pydantic import SecretStr

from models.agents import AgentEntry
from models.messages import WorkflowSubmission
from models.plan import load_plan
from streams.cli import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    CliError,
    broker_failure,
    check_same_run,
    encode_or_refuse,
    executor_refusal,
    final_report,
    load_agents_file,
    put_agents,
    read_submission,
    repeats_existing,
    send,
    status_code,
    watch_run,
)
from switchyard.db import RunRecord
from switchyard.settings import Settings
from tests.e2e.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PLAN_FILE = ROOT / "examples" / "workflows" / "research-summarize.json"
REGISTRY_FILE = ROOT / "examples" / "agents" / "registry.json"
T0 = datetime(2025, 1, 1, tzinfo=UTC)
RUN_ID = "cli-run-1"


def submission(run_input: dict[str, Any] | None = None, run_id: str = RUN_ID) -> WorkflowSubmission:
    plan = load_plan(PLAN_FILE.read_bytes())
    return WorkflowSubmission(run_id=run_id, plan=plan, input=run_input or {"topic": "alpha"})


def record_of(sent: WorkflowSubmission, status: str = "COMPLETED", *, with_state: bool = True) -> RunRecord:
    """The run that ``sent`` started, as PostgreSQL has it (with or without its snapshot)."""
    return RunRecord(
        run_id=sent.run_id,
        workflow_id=sent.plan.workflow_id,
        workflow_version=sent.plan.version,
        status=status,
        input=sent.input,
        output={"summary": "alpha notes"} if status == "COMPLETED" else None,
        plan=sent.plan.model_dump(mode="json"),
        state={"fingerprint": sent.fingerprint()} if with_state else None,
        version=3,
        created_at=T0,
        updated_at=T0,
    )


def rejected(
    run_id: str = RUN_ID, message: str = "the submission could not be read: plan: Field required"
) -> RunRecord:
    """What WorkflowRepository.record_rejected writes for a submission the executor could not read."""
    return RunRecord(
        run_id=run_id,
        workflow_id="",
        workflow_version="",
        status="FAILED",
        input={},
        plan={},
        error={"kind": "invalid_submission", "message": message, "details": None},
        version=0,
        created_at=T0,
        completed_at=T0,
        updated_at=T0,
    )


def settings(**values: Any) -> Settings:
    return Settings(database_url=SecretStr("postgresql://nobody@127.0.0.1:9/none"), **values)


# ------------------------------------------------------------------ size


def test_a_submission_over_the_limit_is_refused_naming_its_size_and_the_limit() -> None:
    big = submission({"topic": "alpha", "pad": "x" * 20_000})
    with pytest.raises(CliError) as caught:
        encode_or_refuse(big, 16_384)
    assert caught.value.code == EXIT_BAD_INPUT
    message = str(caught.value)
    assert "16384" in message
    size = int(message.split(" bytes")[0].rsplit(" ", 1)[1])
    assert size > 20_000
    assert "\n" not in message


def test_a_submission_within_the_limit_is_its_record() -> None:
    small = submission()
    assert json.loads(encode_or_refuse(small, 16_384))["run_id"] == RUN_ID


# ---------------------------------------------------------- run_id reuse


def test_an_unknown_run_id_is_sent() -> None:
    assert repeats_existing(submission(), None) is False


def test_the_same_submission_again_repeats_the_existing_run() -> None:
    sent = submission()
    assert repeats_existing(submission(), record_of(sent, with_state=True)) is True


def test_a_record_without_a_snapshot_is_a_refused_submission_not_the_same_run() -> None:
    # Only a refused submission is recorded without a state (a run's record is its snapshot).
    with pytest.raises(CliError) as caught:
        repeats_existing(submission(), record_of(submission(), with_state=False))
    assert caught.value.code == EXIT_BAD_INPUT


def test_another_input_under_a_used_run_id_is_refused_with_the_reason() -> None:
    with pytest.raises(CliError) as caught:
        repeats_existing(submission({"topic": "beta"}), record_of(submission({"topic": "alpha"})))
    assert caught.value.code == EXIT_BAD_INPUT
    assert RUN_ID in str(caught.value)
    assert "different plan or input" in str(caught.value)


def test_a_run_id_taken_by_a_refused_submission_is_refused_with_the_executors_reason() -> None:
    with pytest.raises(CliError) as caught:
        repeats_existing(submission(), rejected())
    assert caught.value.code == EXIT_BAD_INPUT
    assert "refused" in str(caught.value)
    assert "plan: Field required" in str(caught.value)


def test_a_refused_submission_is_recognised_and_its_reason_kept_on_one_line() -> None:
    assert executor_refusal(rejected(message="could not be read:\n  plan\n  Field required")) == (
        "could not be read: plan Field required"
    )
    assert executor_refusal(record_of(submission(), "FAILED")) is None
    assert executor_refusal(record_of(submission())) is None


def test_the_check_while_waiting_passes_the_same_run_and_a_refused_one() -> None:
    check_same_run(submission(), record_of(submission(), "RUNNING"))
    check_same_run(submission(), rejected())
    with pytest.raises(CliError, match="different plan or input"):
        check_same_run(submission({"topic": "beta"}), record_of(submission(), "RUNNING"))


# ---------------------------------------------------------------- waiting


def records(*answers: RunRecord | None) -> Iterator[RunRecord | None]:
    yield from answers
    while True:
        yield answers[-1]


def follow(answers: Iterator[RunRecord | None], **options: Any) -> tuple[RunRecord | None, list[str]]:
    lines: list[str] = []
    options = {"timeout_s": 5.0, "poll_s": 0.01, **options}
    found = asyncio.run(watch_run(lambda run_id: next(answers), RUN_ID, echo=lines.append, **options))
    return found, lines


def test_waiting_on_a_run_another_submission_started_reports_the_conflict_not_its_output() -> None:
    other = record_of(submission({"topic": "alpha"}))
    with pytest.raises(CliError) as caught:
        follow(records(None, other), submission=submission({"topic": "beta"}))
    assert caught.value.code == EXIT_BAD_INPUT
    assert "different plan or input" in str(caught.value)


def test_waiting_on_a_refused_submission_prints_why_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    found, lines = follow(records(None, rejected()), submission=submission())
    assert found is not None
    assert not any("running" in line for line in lines)
    assert final_report(found) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "refused by the executor" in err
    assert "plan: Field required" in err
    assert err.count("\n") == 1


def test_waiting_says_once_that_nothing_is_recorded_without_claiming_the_worker_is_down() -> None:
    found, lines = follow(records(None), timeout_s=0.2, hint_after_s=0.05)
    assert found is None
    assert len(lines) == 1
    assert "nothing recorded" in lines[0]
    assert "may still be starting" in lines[0]
    assert "is the worker running" not in lines[0]


def test_waiting_prints_nothing_about_pickup_when_the_run_is_recorded_at_once() -> None:
    found, lines = follow(records(record_of(submission())), hint_after_s=0.0, submission=submission())
    assert found is not None
    assert found.status == "COMPLETED"
    assert lines == []


# ------------------------------------------------------------ exit codes


@pytest.mark.parametrize(
    ("status", "code"),
    [("COMPLETED", 0), ("RUNNING", 0), ("PENDING", 0), ("FAILED", EXIT_FAILED), ("CANCELLED", EXIT_FAILED)],
)
def test_status_exits_1_for_a_failed_or_cancelled_run(status: str, code: int) -> None:
    assert status_code(record_of(submission(), status)) == code


def test_status_of_a_refused_submission_is_a_failed_run() -> None:
    assert status_code(rejected()) == EXIT_FAILED


@pytest.mark.parametrize(("status", "code"), [("COMPLETED", 0), ("FAILED", EXIT_FAILED), ("CANCELLED", EXIT_FAILED)])
def test_the_final_report_of_submit_wait(status: str, code: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert final_report(record_of(submission(), status)) == code
    out, err = capsys.readouterr()
    assert (f"run {RUN_ID} COMPLETED" in out) == (status == "COMPLETED")
    assert (status in err) == (status != "COMPLETED")


# ---------------------------------------------------------------- broker


@pytest.mark.parametrize(
    ("error", "words", "code"),
    [
        (KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9, 2)]"), "cannot reach the broker", 1),
        (ConnectionRefusedError(111, "Connection refused"), "cannot reach the broker", 1),
        (KafkaTimeoutError(), "did not acknowledge the submission in time", 1),
        (RequestTimedOutError(), "did not acknowledge the submission in time", 1),
        (MessageSizeTooLargeError("The message is 5000000 bytes"), "too large for the broker", 2),
        (TopicAuthorizationFailedError(), "refused the submission", 1),
        (NotLeaderForPartitionError(), "refused the submission", 1),
        (ValueError("a record of 20000 bytes is over the limit"), "was not sent", 2),
        (RuntimeError("something else"), "could not send the submission", 1),
    ],
)
def test_broker_failures_say_which_it_was(error: Exception, words: str, code: int) -> None:
    failure = broker_failure(error, settings(broker_port=19999), doing="the submission")
    assert words in str(failure)
    if not isinstance(error, ValueError):  # refused here, before the broker was asked
        assert "127.0.0.1:19999" in str(failure)
    assert "\n" not in str(failure)
    assert failure.code == code


def test_an_unreachable_broker_is_named_as_such() -> None:
    closed = settings(broker_port=free_port())
    with pytest.raises(CliError) as caught:
        asyncio.run(send(closed, "orchestrator.plans", key=b"k", value=b"{}"))
    assert caught.value.code == EXIT_FAILED
    assert f"cannot reach the broker at {closed.bootstrap_servers}" in str(caught.value)


# --------------------------------------------------------------- agents


def test_importing_a_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(CliError) as caught:
        load_agents_file(tmp_path)
    assert caught.value.code == EXIT_BAD_INPUT
    assert str(caught.value) == f"{tmp_path} is a directory; give a registry file (JSON)"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ("[" * 100_000, "not valid JSON"),
        ('{"a": 1}', "expected"),
    ],
    ids=["missing", "not-json", "nested-too-deep", "wrong-shape"],
)
def test_an_unusable_registry_file_is_one_line(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "agents.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CliError) as caught:
        load_agents_file(path)
    assert caught.value.code == EXIT_BAD_INPUT
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_unreadable_registry_file_is_one_line(tmp_path: Path) -> None:
    # Under a regular file, a path cannot be read by anyone (root too: CI runs as root).
    (tmp_path / "not-a-folder").write_text("[]")
    path = tmp_path / "not-a-folder" / "agents.json"
    with pytest.raises(CliError, match="cannot read") as caught:
        load_agents_file(path)
    assert caught.value.code == EXIT_BAD_INPUT
    assert "\n" not in str(caught.value)


def test_the_example_registry_loads() -> None:
    assert [e.name for e in load_agents_file(REGISTRY_FILE)] == ["researcher", "summarizer", "reviewer"]


class RefusingStore:
    """A registry store that refuses one agent (as RegistryStore refuses a literal secret without a key)."""

    def __init__(self, refused: str) -> None:
        self.refused = refused
        self.stored: list[str] = []

    def put(self, entry: AgentEntry) -> bool:
        if entry.name == self.refused:
            raise ValueError("a literal secret needs SWITCHYARD_SECRETS_KEY\n(make one with: ...)")
        self.stored.append(entry.name)
        return True


def test_an_agent_the_registry_refuses_is_named_on_one_line_with_what_was_registered() -> None:
    store = RefusingStore("summarizer")
    entries = load_agents_file(REGISTRY_FILE)
    with pytest.raises(CliError) as caught:
        put_agents(store, entries)  # type: ignore[arg-type]
    message = str(caught.value)
    assert caught.value.code == EXIT_BAD_INPUT
    assert message.startswith("agent 'summarizer' not registered: a literal secret needs SWITCHYARD_SECRETS_KEY")
    assert "registered before it: researcher" in message
    assert "\n" not in message
    assert store.stored == ["researcher"]


# ------------------------------------------------------------ submissions


def test_reading_a_submission_checks_the_plan_the_input_and_the_run_id(tmp_path: Path) -> None:
    made = read_submission(str(PLAN_FILE), '{"topic": "alpha"}', None, "given-id")
    assert (made.run_id, made.input) == ("given-id", {"topic": "alpha"})
    assert read_submission(str(PLAN_FILE), None, None, None).run_id
    with pytest.raises(CliError, match="run-id"):
        read_submission(str(PLAN_FILE), None, None, "has space")
    with pytest.raises(CliError, match="JSON object"):
        read_submission(str(PLAN_FILE), "[1]", None, None)
    with pytest.raises(CliError, match="cannot read"):
        read_submission(str(tmp_path), None, None, None)


# --------------------------------------------- the commands, as processes


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``faust -A streams.app ARGS`` with a broker and a database nobody serves."""
    environment = {
        **os.environ,
        "SWITCHYARD_DATA_DIR": str(tmp_path / "data"),
        "SWITCHYARD_BROKER_PORT": str(free_port()),
        "SWITCHYARD_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
        "SWITCHYARD_WAIT_FOR_SERVICES_S": "1",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "faust", "-A", "streams.app", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_submit_of_an_oversize_submission_sends_nothing_and_prints_no_run_id(tmp_path: Path) -> None:
    big_input = tmp_path / "input.json"
    big_input.write_text(json.dumps({"topic": "x" * 1_100_000}))
    done = run_cli(tmp_path, "submit", str(PLAN_FILE), "--input-file", str(big_input), "--wait")
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "over the limit of 1000000" in lines[0]
    assert "broker" not in lines[0]


def test_submit_to_an_unreachable_broker_says_so_in_one_line(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "submit", str(PLAN_FILE), "--input", '{"topic": "x"}')
    assert done.returncode == EXIT_FAILED
    assert done.stdout == "", "no run id for a submission that was not sent"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot reach the broker at 127.0.0.1:")


def test_agents_import_of_a_directory_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "agents", "import", str(tmp_path))
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.strip() == f"error: {tmp_path} is a directory; give a registry file (JSON)"
