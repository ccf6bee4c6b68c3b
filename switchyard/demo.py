"""``make demo``: the whole stack on the embedded default, one workflow, then a clean shutdown.

It starts the embedded broker and PostgreSQL (data kept in ``.switchyard/``,
so runs outlive the demo), the executor and bridge workers and the example
agents; registers the agents; submits the three-step example workflow; shows
its progress live; prints the output and where to look; and stops everything
it started, by PID, at the end or on Ctrl-C. ``--keep`` leaves the stack up
until Ctrl-C.

It tells the truth: a process of the stack that dies (while the stack starts,
during the run, or while ``--keep`` holds it up) is named with the last lines
of its log and the demo exits 1; the shutdown message says what was stopped
and whether anything is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import Engine

from models.messages import WorkflowSubmission, new_run_id
from models.plan import load_plan
from switchyard import topics
from switchyard.database import connect
from switchyard.db import RunRecord
from switchyard.embedded import port_is_open
from switchyard.registry import RegistryStore, load_registry_file
from switchyard.settings import Settings
from switchyard.stack import AGENT_PORTS, Process, Stack, StackError, http_json

__all__ = [
    "StackDied",
    "check_alive",
    "death_report",
    "follow_run",
    "hold",
    "main",
    "run_demo",
    "shutdown",
    "wait_ready",
]

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "examples" / "workflows" / "research-write-review.json"
REGISTRY = ROOT / "examples" / "agents" / "registry.json"
LOG_LINES = 20
"""How much of a dead process's log the demo shows."""

STARTING = "while the stack was starting"
RUNNING = "during the run"
KEEPING = "while --keep held the stack up"


def _say(text: str) -> None:
    print(text, flush=True)


class StackDied(StackError):
    """Processes of the stack exited on their own; the message names them with the end of their logs."""

    def __init__(self, processes: Sequence[Process], when: str) -> None:
        super().__init__(death_report(processes, when))
        self.processes = list(processes)
        self.when = when


def death_report(processes: Sequence[Process], when: str, lines: int = LOG_LINES) -> str:
    """Each dead process: its name, pid and how it ended, ``when``, and the last lines of its log."""
    parts = []
    for process in processes:
        head = f"error: the {process.name} (pid {process.pid}) {process.exit_reason()} {when}"
        tail = process.log_tail(lines)
        if tail:
            shown = "\n".join(f"    {line}" for line in tail.splitlines())
            parts.append(f"{head}; the last lines of {process.log_path}:\n{shown}")
        else:
            parts.append(f"{head}; its log {process.log_path} is empty")
    return "\n".join(parts)


def check_alive(stack: Stack, when: str) -> None:
    """Raise :class:`StackDied` when a process of the stack has exited.

    Raises:
        StackDied: Naming every dead process.
    """
    dead = stack.dead()
    if dead:
        raise StackDied(dead, when)


def wait_ready(stack: Stack, checks: Mapping[str, Callable[[], bool]], *, timeout: float, poll_s: float = 0.2) -> None:
    """Wait until every check holds, watching every process of the stack meanwhile.

    Args:
        stack: The stack whose processes must stay up.
        checks: What to wait for, by the name of the process it waits on
            (``executor``: its ``/health/`` answers).
        timeout: How long to wait in all.
        poll_s: How often to look.

    Raises:
        StackDied: A process of the stack exited meanwhile (whichever it was).
        StackError: A check still fails after ``timeout``.
    """
    pending = dict(checks)
    deadline = time.monotonic() + timeout
    while True:
        check_alive(stack, STARTING)
        pending = {name: ready for name, ready in pending.items() if not ready()}
        if not pending:
            return
        if time.monotonic() >= deadline:
            late = []
            for name in pending:
                process = stack.processes.get(name)
                tail = f"; the last lines of {process.log_path}:\n{process.log_tail(LOG_LINES)}" if process else ""
                late.append(f"{name} was not ready within {timeout:g}s{tail}")
            raise StackError("\n".join(late))
        time.sleep(poll_s)


def _answers(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            status, _ = http_json("GET", url, timeout=2.0)
        except OSError:
            return False
        return status == 200

    return ready


def _listens(port: int) -> Callable[[], bool]:
    return lambda: port_is_open("127.0.0.1", port, 0.2)


async def follow_run(
    stack: Stack,
    settings: Settings,
    submission: WorkflowSubmission,
    *,
    timeout_s: float,
    echo: Callable[[str], Any] = _say,
    poll_s: float = 0.5,
) -> RunRecord | None:
    """Follow the run (see :func:`streams.cli.wait_for_run`) while watching the stack's processes.

    Raises:
        StackDied: A process of the stack exited before the run ended.
    """
    from streams.cli import wait_for_run

    waiting = asyncio.ensure_future(
        wait_for_run(settings, submission.run_id, timeout_s=timeout_s, echo=echo, submission=submission)
    )
    try:
        while not waiting.done():
            check_alive(stack, RUNNING)
            await asyncio.wait({waiting}, timeout=poll_s)
    finally:
        if not waiting.done():
            waiting.cancel()
    return waiting.result()


def hold(stack: Stack, poll_s: float = 0.5) -> list[Process]:
    """``--keep``: wait until a process of the stack exits (Ctrl-C ends it sooner); returns the dead."""
    while True:
        dead = stack.dead()
        if dead:
            return dead
        time.sleep(poll_s)


def shutdown(stack: Stack, engine: Engine | None = None) -> tuple[str, bool]:
    """Stop what the demo started.

    Returns:
        What to say (what was stopped, what had exited already, what is
        still running), and whether nothing the demo started is left running.
    """
    exited = [p.name for p in stack.dead()]
    running = [name for name, p in stack.processes.items() if p.alive()]
    if stack.broker is not None and "broker" not in exited:
        running.append("broker")
    if stack.postgres is not None:  # an external database is not the demo's to stop
        running.append("PostgreSQL")
    if engine is not None:
        engine.dispose()
    left = stack.stop()
    left_names = {item.split(" (pid", 1)[0] for item in left}
    stopped = [name for name in running if name not in left_names]
    said = f"stopped {_words(stopped)}" if stopped else "nothing was running"
    if exited:
        said += f" ({_words(exited)} had exited already)"
    if left:
        return f"{said}; STILL RUNNING: {_words(left)}; stop it by hand", False
    return f"{said}; nothing the demo started is left running", True


def _words(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _busy_ports(settings: Settings) -> list[int]:
    ports = [settings.executor_web_port, settings.bridge_web_port, *AGENT_PORTS.values()]
    if settings.embedded_broker:
        ports.append(settings.broker_port)
    return [p for p in ports if port_is_open("127.0.0.1", p, 0.2)]


def run_demo(settings: Settings, *, topic: str, keep: bool) -> int:
    """Run the demo; returns the exit code (0 only if the run completed and no process of the stack died)."""
    busy = _busy_ports(settings)
    if busy:
        _say(f"error: port(s) {', '.join(map(str, busy))} on 127.0.0.1 are in use (another demo running?)")
        return 2
    stack = Stack(settings, ROOT)
    engines: list[Engine] = []
    code = 1
    try:
        code = _demo(stack, settings, engines, topic=topic, keep=keep)
    except KeyboardInterrupt:
        _say("\ninterrupted")
        code = 130
    finally:
        _say("stopping the stack ...")
        said, clean = shutdown(stack, engines[0] if engines else None)
        _say(said)
    return code if clean or code != 0 else 1


def _demo(stack: Stack, settings: Settings, engines: list[Engine], *, topic: str, keep: bool) -> int:
    from streams.cli import CliError, send
    from streams.submissions import SubmissionRefused, encode_submission

    started = time.monotonic()
    phase = STARTING
    try:
        _say("starting the embedded broker and PostgreSQL ...")
        stack.start_services()
        engine, _ = connect(settings)
        engines.append(engine)
        _say("starting the example agents, the executor and the bridge ...")
        for name in AGENT_PORTS:
            stack.start_agent(name)
        stack.start_worker("streams.app")
        stack.start_worker("agents_bridge.app")
        entries = load_registry_file(REGISTRY)
        store = RegistryStore(engine, settings)
        for entry in entries:
            store.put(entry)
        _say(f"registered agents: {', '.join(e.name for e in entries)}")
        checks = {name: _listens(port) for name, port in AGENT_PORTS.items()}
        checks["executor"] = _answers(stack.executor_url("/health/"))
        checks["bridge"] = _answers(stack.bridge_url("/health/"))
        wait_ready(stack, checks, timeout=120)
        _say(f"stack ready in {time.monotonic() - started:.1f}s")

        phase = RUNNING
        plan = load_plan(PLAN.read_bytes())
        submission = WorkflowSubmission(run_id=new_run_id(), plan=plan, input={"topic": topic})
        run_id = submission.run_id
        value = encode_submission(submission, settings.max_message_bytes)
        asyncio.run(send(settings, topics.PLANS, key=run_id.encode(), value=value, doing="the submission"))
        _say(f"\nsubmitted {plan.name!r} as run {run_id} with input {{'topic': {topic!r}}}")

        record = asyncio.run(follow_run(stack, settings, submission, timeout_s=120))
        if record is None:
            _say(f"error: nothing recorded for run {run_id} after 120s: the executor never picked it up")
            return 1
        if record.status != "COMPLETED":
            error = record.error if isinstance(record.error, dict) else {}
            reason = error.get("message", "no reason recorded")
            _say(f"error: run {run_id} {'still ' if record.completed_at is None else ''}{record.status}: {reason}")
            return 1
        took = (record.completed_at - record.created_at).total_seconds() if record.completed_at else 0.0
        _say(f"\nrun {run_id} COMPLETED in {took:.2f}s; output:")
        _say(json.dumps(record.output, indent=2, ensure_ascii=False))
        _say("\nwhere to look:")
        _say(f"  run (live API)  {stack.executor_url(f'/runs/{run_id}/')}")
        _say(f"  recent runs     {stack.executor_url('/runs/')}")
        _say(f"  agents          {stack.executor_url('/agents/')}")
        _say(f"  the record      faust -A streams.app status {run_id}")
        where_db = "SWITCHYARD_DATABASE_URL" if settings.database_dsn() else str(settings.embedded_postgres_dir)
        _say(f"  PostgreSQL      {where_db}")
        _say(f"  logs            {stack.logs}/")
        check_alive(stack, RUNNING)
        if keep:
            phase = KEEPING
            _say("\nthe stack stays up; Ctrl-C stops it")
            raise StackDied(hold(stack), KEEPING)
        return 0
    except StackDied as died:
        _say(str(died))
        return 1
    except (StackError, CliError, SubmissionRefused) as error:
        # A process that died is the likelier cause of what failed, and the one to name.
        dead = stack.dead()
        _say(death_report(dead, phase) if dead else f"error: {error}")
        return 1
    except Exception:
        dead = stack.dead()
        if not dead:
            raise
        _say(death_report(dead, phase))
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m switchyard.demo``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--topic", default="stream processing", help="the workflow's input topic")
    parser.add_argument("--keep", action="store_true", help="keep the stack up after the run, until Ctrl-C")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    return run_demo(Settings(), topic=args.topic, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
