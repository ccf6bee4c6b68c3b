"""Bad input through the command line, against the real stack: refused in one line, and the worker goes on.

``faust -A streams.app ...`` runs as a process against a stack of this
module's own (``SWITCHYARD_MAX_MESSAGE_BYTES`` is 16 KiB there): an oversize
submission is refused before anything is sent; a run_id means one run (the
same submission again is the existing run, another is refused and the earlier
run is left as it was); ``status`` exits 1 for a FAILED run; ``agents import``
of a directory is one line; a submission the executor refused is reported
with its reason. After each case the executor still runs submissions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models.messages import WorkflowSubmission, new_run_id
from models.plan import load_plan
from streams.cli import EXIT_BAD_INPUT, CliError, final_report, wait_for_run
from switchyard import topics
from tests.faults.conftest import (
    MAX_MESSAGE_BYTES,
    AgentSpec,
    FaultStack,
    StackPlaces,
    chain,
    expected_output,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def hostile_stack(stack_places: StackPlaces) -> Iterator[FaultStack]:
    with stack_places.stack("hostile-cli", {"summarizer": AgentSpec()}) as stack:
        yield stack


@pytest.fixture
def faults(hostile_stack: FaultStack) -> Iterator[FaultStack]:
    """The module's stack; after the test, a fresh run must still complete (the worker still serves)."""
    yield hostile_stack
    hostile_stack.assert_serving("still serving")


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostile-cli") / "plan.json"
    path.write_text(json.dumps(chain("summarizer")))
    return path


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


def plan_keys(faults: FaultStack) -> set[bytes]:
    return {r.key for r in faults.read(topics.PLANS) if r.key is not None}


def test_an_oversize_submission_is_refused_before_anything_is_sent(faults: FaultStack, plan_file: Path) -> None:
    run_id = f"oversize-{new_run_id()[:8]}"
    text = "word " * (MAX_MESSAGE_BYTES // 4)
    done = faults.cli(
        "submit", str(plan_file), "--input", json.dumps({"text": text}), "--run-id", run_id, "--wait", "--timeout", "20"
    )
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert done.stdout == "", "no run id is printed for a submission that was not sent"
    line = one_line(done.stderr)
    assert f"over the limit of {MAX_MESSAGE_BYTES}" in line
    size = int(line.split(" bytes")[0].rsplit(" ", 1)[1])
    assert size > MAX_MESSAGE_BYTES
    assert faults.run(run_id) is None
    assert run_id.encode() not in plan_keys(faults)


def test_a_run_id_means_one_run(faults: FaultStack, plan_file: Path) -> None:
    run_id = f"reused-{new_run_id()[:8]}"
    first = faults.cli("submit", str(plan_file), "--input", '{"text": "alpha"}', "--run-id", run_id, "--wait")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == run_id
    earlier = faults.run(run_id)
    assert earlier is not None
    assert (earlier.status, earlier.output) == ("COMPLETED", expected_output("alpha"))

    again = faults.cli("submit", str(plan_file), "--input", '{"text": "alpha"}', "--run-id", run_id, "--wait")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == run_id
    assert "nothing sent" in again.stderr
    assert json.dumps(expected_output("alpha")["summary"]) in again.stdout, "--wait follows the existing run"

    other = faults.cli("submit", str(plan_file), "--input", '{"text": "beta"}', "--run-id", run_id, "--wait")
    assert other.returncode == EXIT_BAD_INPUT, other.stderr
    assert other.stdout == "", "neither a run id nor the earlier run's output"
    line = one_line(other.stderr)
    assert run_id in line
    assert "different plan or input" in line

    after = faults.run(run_id)
    assert after is not None
    assert (after.status, after.output, after.version, after.input) == (
        earlier.status,
        earlier.output,
        earlier.version,
        {"text": "alpha"},
    )
    assert [(s.step_id, s.attempt) for s in after.steps] == [(s.step_id, s.attempt) for s in earlier.steps]
    assert [r.key for r in faults.read(topics.PLANS)].count(run_id.encode()) == 1, "only the first was sent"

    # The check while waiting: a record started by another submission is reported, not its output.
    beta = WorkflowSubmission(run_id=run_id, plan=load_plan(chain("summarizer")), input={"text": "beta"})
    with pytest.raises(CliError, match="different plan or input") as conflict:
        asyncio.run(wait_for_run(faults.settings, run_id, timeout_s=10, echo=print, submission=beta))
    assert conflict.value.code == EXIT_BAD_INPUT


def test_status_exits_1_for_a_failed_run_and_0_for_a_completed_one(faults: FaultStack, plan_file: Path) -> None:
    failing = chain("nobody", retry={"max_attempts": 1})
    [run_id] = faults.submit(failing, 1, "unknown agent")
    records = faults.wait_terminal([run_id], timeout=60)
    assert records[run_id].status == "FAILED"
    shown = faults.cli("status", run_id)
    assert shown.returncode == 1, shown.stderr
    assert "FAILED" in shown.stdout
    as_json = faults.cli("status", run_id, "--json")
    assert as_json.returncode == 1, as_json.stderr
    assert json.loads(as_json.stdout)["status"] == "FAILED"

    done = faults.cli("submit", str(plan_file), "--input", '{"text": "fine"}', "--wait")
    assert done.returncode == 0, done.stderr
    completed = faults.cli("status", done.stdout.splitlines()[0], "--json")
    assert completed.returncode == 0, completed.stderr


def test_agents_import_of_a_directory_is_one_line(faults: FaultStack, tmp_path: Path) -> None:
    done = faults.cli("agents", "import", str(tmp_path))
    assert done.returncode == EXIT_BAD_INPUT
    assert "is a directory" in one_line(done.stderr)
    assert "Traceback" not in done.stderr
    listed = faults.cli("agents", "list")
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[0].startswith("summarizer\t")


def test_a_submission_the_executor_refused_is_reported_with_its_reason(
    faults: FaultStack, plan_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = f"refused-{new_run_id()[:8]}"
    unreadable: dict[str, Any] = {"schema_version": 1, "run_id": run_id, "plan": {"workflow_id": "w"}, "input": {}}
    faults.produce([(topics.PLANS, run_id.encode(), json.dumps(unreadable).encode())])
    faults.wait_recorded([run_id])

    shown = faults.cli("status", run_id)
    assert shown.returncode == 1, shown.stderr
    assert "refused by the executor: the submission could not be read" in shown.stdout

    again = faults.cli("submit", str(plan_file), "--input", '{"text": "x"}', "--run-id", run_id, "--wait")
    assert again.returncode == EXIT_BAD_INPUT, again.stderr
    assert again.stdout == ""
    line = one_line(again.stderr)
    assert "taken by a submission the executor refused (the submission could not be read" in line
    assert "is the worker running" not in again.stderr

    # What ``submit --wait`` reports when the record that appears is such a refusal.
    sent = WorkflowSubmission(run_id=run_id, plan=load_plan(chain("summarizer")), input={"text": "x"})
    record = asyncio.run(wait_for_run(faults.settings, run_id, timeout_s=10, echo=print, submission=sent))
    assert record is not None
    capsys.readouterr()
    assert final_report(record) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"run {run_id} was refused by the executor: the submission could not be read")

    # The refused record stays as it was: the CLI sent nothing under its id, so nothing started.
    assert faults.statuses([run_id]) == {run_id: "FAILED"}
    assert not faults.attempts([run_id])
    assert [r.key for r in faults.read(topics.PLANS)].count(run_id.encode()) == 1
