"""The demo tells the truth about its stack (switchyard/demo.py, Stack.dead in switchyard/stack.py).

Real short-lived processes stand in for the stack's: a process that exits is
named, with how it ended and the end of its log, whether it dies while the
stack starts, during the run or while ``--keep`` holds the stack up; the
shutdown message says what was stopped and what had exited already.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from models.messages import WorkflowSubmission
from models.plan import load_plan
from switchyard.demo import (
    KEEPING,
    RUNNING,
    STARTING,
    StackDied,
    check_alive,
    death_report,
    follow_run,
    hold,
    shutdown,
    wait_ready,
)
from switchyard.settings import Settings
from switchyard.stack import Process, Stack, StackError
from tests.e2e.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DIES = "import sys, time; print('starting up'); print('fatal: the executor lost its table', flush=True); sys.exit(3)"
LIVES = "import time; print('serving', flush=True); time.sleep(120)"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    settings = Settings(
        data_dir=tmp_path / "stack",
        database_url=SecretStr("postgresql://nobody@127.0.0.1:9/none"),
        broker_port=free_port(),
        wait_for_services_s=0.5,
    )
    stack = Stack(settings, ROOT)
    try:
        yield stack
    finally:
        stack.stop()


def spawn(stack: Stack, name: str, code: str) -> Process:
    return stack.spawn(name, [sys.executable, "-c", code])


def wait_exit(process: Process, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while process.alive():
        assert time.monotonic() < deadline, f"{process.name} did not exit"
        time.sleep(0.05)


def test_a_process_that_exits_is_dead_and_reported_with_its_log(stack: Stack) -> None:
    executor = spawn(stack, "executor", DIES)
    spawn(stack, "bridge", LIVES)
    wait_exit(executor)
    assert [p.name for p in stack.dead()] == ["executor"]
    report = death_report(stack.dead(), RUNNING)
    first, *tail = report.splitlines()
    assert first == (
        f"error: the executor (pid {executor.pid}) exited with code 3 during the run;"
        f" the last lines of {executor.log_path}:"
    )
    assert tail == ["    starting up", "    fatal: the executor lost its table"]


def test_a_killed_process_is_reported_as_killed(stack: Stack) -> None:
    agent = spawn(stack, "researcher", LIVES)
    agent.kill()
    assert agent.exit_reason() == "was killed by SIGKILL"
    assert "researcher" in death_report([agent], KEEPING)
    assert KEEPING in death_report([agent], KEEPING)


def test_the_check_raises_only_when_something_died(stack: Stack) -> None:
    spawn(stack, "bridge", LIVES)
    check_alive(stack, RUNNING)
    executor = spawn(stack, "executor", DIES)
    wait_exit(executor)
    with pytest.raises(StackDied) as died:
        check_alive(stack, RUNNING)
    assert [p.name for p in died.value.processes] == ["executor"]
    assert "fatal: the executor lost its table" in str(died.value)


def test_waiting_for_readiness_names_whichever_process_died(stack: Stack) -> None:
    spawn(stack, "executor", LIVES)
    spawn(stack, "bridge", DIES)
    started = time.monotonic()
    with pytest.raises(StackDied) as died:
        # Waiting on the executor: the bridge dying still ends the wait, at once.
        wait_ready(stack, {"executor": lambda: False}, timeout=60)
    assert time.monotonic() - started < 20
    assert [p.name for p in died.value.processes] == ["bridge"]
    assert STARTING in str(died.value)


def test_waiting_for_readiness_in_vain_names_what_was_late(stack: Stack) -> None:
    spawn(stack, "executor", LIVES)
    with pytest.raises(StackError) as late:
        wait_ready(stack, {"executor": lambda: False, "bridge": lambda: True}, timeout=0.3, poll_s=0.05)
    assert not isinstance(late.value, StackDied)
    assert "executor was not ready within 0.3s" in str(late.value)
    assert "bridge" not in str(late.value)


def test_following_the_run_stops_when_a_process_dies(stack: Stack) -> None:
    executor = spawn(stack, "executor", DIES)
    wait_exit(executor)
    plan = load_plan((ROOT / "examples/workflows/research-summarize-review.json").read_bytes())
    submission = WorkflowSubmission(run_id="demo-death", plan=plan, input={"topic": "x"})
    with pytest.raises(StackDied) as died:
        asyncio.run(follow_run(stack, stack.settings, submission, timeout_s=30, echo=print, poll_s=0.05))
    assert RUNNING in str(died.value)
    assert "executor" in str(died.value)


def test_keep_returns_when_a_process_dies(stack: Stack) -> None:
    spawn(stack, "bridge", LIVES)
    spawn(stack, "executor", "import time; time.sleep(0.5)")
    started = time.monotonic()
    dead = hold(stack, poll_s=0.05)
    assert [p.name for p in dead] == ["executor"]
    assert time.monotonic() - started < 20


def test_the_shutdown_says_what_it_stopped_and_what_had_exited(stack: Stack) -> None:
    executor = spawn(stack, "executor", DIES)
    bridge = spawn(stack, "bridge", LIVES)
    wait_exit(executor)
    said, clean = shutdown(stack)
    assert clean
    assert said == "stopped bridge (executor had exited already); nothing the demo started is left running"
    assert not bridge.alive()
    assert stack.processes == {}


def test_the_shutdown_of_a_stack_that_never_started(stack: Stack) -> None:
    said, clean = shutdown(stack)
    assert (said, clean) == ("nothing was running; nothing the demo started is left running", True)
