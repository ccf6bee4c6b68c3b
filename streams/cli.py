"""The executor's commands: ``faust -A streams.app <command>``.

* ``agents add URL [--name NAME]``: read the agent card and register the agent.
* ``agents list`` / ``agents import FILE`` / ``agents remove NAME``.
* ``submit PLAN.json [--input JSON | --input-file F] [--run-id ID] [--wait]``.
* ``status RUN_ID [--json]``.
* ``cancel RUN_ID`` / ``retry RUN_ID`` / ``resume RUN_ID``.

They work against the running stack with the default settings: they talk to
the same PostgreSQL (the embedded one in ``.switchyard/`` by default) and put
submissions on the plans topic like any producer. A problem is one line on
stderr and a non-zero exit: 1 for a run that failed or was cancelled, 2 for
bad input, 3 when ``--wait`` gives up while the run goes on.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import aiohttp
import click
from faust.cli import AppCommand, argument, option
from sqlalchemy import Engine

from models.agents import AgentEntry
from models.messages import RUN_ID_PATTERN, ControlCommand, ControlMessage, WorkflowSubmission, encode, new_run_id
from models.plan import PlanValidationError, load_plan
from models.run import RunStatus
from switchyard.database import connect
from switchyard.db import RunRecord, WorkflowRepository
from switchyard.kafka import ensure_topics, produce
from switchyard.registry import RegistryFileError, RegistryStore, load_registry_file
from switchyard.settings import Settings

if TYPE_CHECKING:
    from streams.app import ExecutorApp

__all__ = ["CliError", "register", "wait_for_run"]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STILL_RUNNING = 3


class CliError(Exception):
    """A problem to report in one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


class SwitchyardCommand(AppCommand):
    """A plain asyncio command: no worker banner, one-line errors, exit codes."""

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        try:
            code = asyncio.run(self.run(*args, **{**self.kwargs, **kwargs}))
        except CliError as error:
            click.echo(f"error: {error}", err=True)
            code = error.code
        except KeyboardInterrupt:
            code = 130
        sys.exit(code or 0)


def _engine(settings: Settings) -> Engine:
    try:
        engine, _ = connect(settings, wait_s=min(settings.wait_for_services_s, 15.0))
    except Exception as error:
        raise CliError(f"cannot reach PostgreSQL: {error}", code=EXIT_FAILED) from None
    return engine


def _read_json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise CliError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise CliError(f"{what} must be a JSON object")
    return value


async def add_agent(settings: Settings, url: str, name: str | None) -> AgentEntry:
    """Read an agent card and register the agent (see ``agents add``)."""
    from agents_bridge.a2a import AgentCardError
    from agents_bridge.calls import fetch_card

    async with aiohttp.ClientSession() as session:
        try:
            card = await fetch_card(session, url)
        except AgentCardError as error:
            raise CliError(f"{url}: {error}", code=EXIT_FAILED) from None
    try:
        entry = AgentEntry(
            name=name or card.name,
            url=card.url,
            protocol_version=card.protocol_version,
            description=card.description,
        )
    except ValueError as error:
        raise CliError(f"{url}: the card does not make a valid registry entry: {error}") from None
    await asyncio.to_thread(RegistryStore(_engine(settings)).put, entry)
    return entry


def _step_lines(record: RunRecord, seen: dict[tuple[str, int], str]) -> list[str]:
    lines = []
    for attempt in record.steps:
        key = (attempt.step_id, attempt.attempt)
        if seen.get(key) == attempt.status:
            continue
        seen[key] = attempt.status
        took = ""
        if attempt.completed_at and attempt.started_at:
            took = f" in {(attempt.completed_at - attempt.started_at).total_seconds():.2f}s"
        error = ""
        if isinstance(attempt.error, dict) and attempt.error.get("message"):
            error = f": {attempt.error['message']}"
        lines.append(f"  {attempt.step_id} #{attempt.attempt} [{attempt.agent_name}] {attempt.status}{took}{error}")
    return lines


async def wait_for_run(
    settings: Settings, run_id: str, *, timeout_s: float, echo: Any = click.echo, poll_s: float = 0.2
) -> RunRecord | None:
    """Follow a run in PostgreSQL, printing step progress, until it ends or the time is up."""
    repo = WorkflowRepository(await asyncio.to_thread(_engine, settings))
    seen: dict[tuple[str, int], str] = {}
    deadline = time.monotonic() + timeout_s
    announced = False
    started = time.monotonic()
    record: RunRecord | None = None
    while time.monotonic() < deadline:
        record = await asyncio.to_thread(repo.get_run, run_id)
        if record is None:
            if not announced and time.monotonic() - started > 5:
                echo(f"  waiting for the executor to pick up {run_id} (is `faust -A streams.app worker` running?)")
                announced = True
        else:
            for line in _step_lines(record, seen):
                echo(line)
            if RunStatus(record.status).finished:
                return record
        await asyncio.sleep(poll_s)
    return record


def _final_report(record: RunRecord) -> int:
    if record.status == RunStatus.COMPLETED:
        click.echo(f"run {record.run_id} COMPLETED")
        click.echo(json.dumps(record.output, indent=2, ensure_ascii=False))
        return 0
    error = record.error if isinstance(record.error, dict) else {}
    step = error.get("step_id")
    where = f" at step {step!r}" if step else ""
    click.echo(f"run {record.run_id} {record.status}{where}: {error.get('message', 'no reason recorded')}", err=True)
    return EXIT_FAILED


def register(app: ExecutorApp) -> None:
    """Add the commands to the executor app."""
    settings = app.settings

    @app.command(
        argument("action", type=click.Choice(["add", "list", "import", "remove"])),
        argument("target", required=False),
        option("--name", default=None, help="Register under this name instead of the card's."),
        base=SwitchyardCommand,
    )
    async def agents(self: AppCommand, action: str, target: str | None, name: str | None) -> int:
        """Manage the agent registry: add URL, list, import FILE, remove NAME."""
        if action == "list":
            entries = await asyncio.to_thread(RegistryStore(_engine(settings)).list)
            for entry in entries:
                click.echo(f"{entry.name}\t{entry.url}\tA2A {entry.protocol_version}")
            if not entries:
                click.echo("no agents registered (add one with: agents add URL)")
            return 0
        if target is None:
            raise CliError(
                f"agents {action} needs a {'URL' if action == 'add' else 'FILE' if action == 'import' else 'NAME'}"
            )
        if action == "add":
            entry = await add_agent(settings, target, name)
            click.echo(f"registered {entry.name} -> {entry.url} (A2A {entry.protocol_version})")
            return 0
        if action == "import":
            try:
                entries = load_registry_file(Path(target))
            except RegistryFileError as error:
                raise CliError(str(error)) from None
            store = RegistryStore(_engine(settings))
            for entry in entries:
                await asyncio.to_thread(store.put, entry)
            click.echo(f"imported {len(entries)} agent(s): {', '.join(e.name for e in entries)}")
            return 0
        removed = await asyncio.to_thread(RegistryStore(_engine(settings)).delete, target)
        if not removed:
            raise CliError(f"no agent {target!r} in the registry", code=EXIT_FAILED)
        click.echo(f"removed {target}")
        return 0

    @app.command(
        argument("plan_file"),
        option("--input", "input_json", default=None, help="The run's input, a JSON object."),
        option("--input-file", default=None, help="Read the run's input from this JSON file."),
        option("--run-id", default=None, help="Use this run id (submitting it again starts nothing new)."),
        option("--wait/--no-wait", default=False, help="Follow the run and print its output."),
        option("--timeout", default=600.0, type=float, help="How long --wait waits, in seconds."),
        base=SwitchyardCommand,
    )
    async def submit(
        self: AppCommand,
        plan_file: str,
        input_json: str | None,
        input_file: str | None,
        run_id: str | None,
        wait: bool,
        timeout: float,
    ) -> int:
        """Submit a workflow plan; prints the run id."""
        try:
            raw = Path(plan_file).read_bytes()
        except OSError as error:
            raise CliError(f"cannot read {plan_file}: {error.strerror}") from None
        try:
            plan = load_plan(raw)
        except PlanValidationError as error:
            raise CliError(f"{plan_file}: {error}") from None
        if input_json is not None and input_file is not None:
            raise CliError("give --input or --input-file, not both")
        run_input: dict[str, Any] = {}
        if input_json is not None:
            run_input = _read_json_object(input_json, "--input")
        elif input_file is not None:
            try:
                run_input = _read_json_object(Path(input_file).read_text(), input_file)
            except OSError as error:
                raise CliError(f"cannot read {input_file}: {error.strerror}") from None
        run_id = run_id or new_run_id()
        if not re.match(RUN_ID_PATTERN, run_id):
            raise CliError("--run-id: letters, digits, '.', '_', ':' and '-', at most 128")
        submission = WorkflowSubmission(run_id=run_id, plan=plan, input=run_input)
        try:
            await ensure_topics(settings)
            await produce(settings, app.plans_topic.get_topic_name(), key=run_id.encode(), value=encode(submission))
        except Exception as error:
            raise CliError(
                f"cannot reach the broker at {settings.bootstrap_servers}: {error}", code=EXIT_FAILED
            ) from None
        click.echo(run_id)
        if not wait:
            return 0
        record = await wait_for_run(settings, run_id, timeout_s=timeout)
        if record is None or not RunStatus(record.status).finished:
            raise CliError(
                f"run {run_id} still {record.status if record else 'not started'} after {timeout:g}s; "
                f"follow it with: faust -A streams.app status {run_id}",
                code=EXIT_STILL_RUNNING,
            )
        return _final_report(record)

    async def control(run_id: str, command: ControlCommand) -> int:
        from streams.web import refuse_command

        status = await asyncio.to_thread(WorkflowRepository(_engine(settings)).exists, run_id)
        refusal = refuse_command(command, status, run_id)
        if refusal is not None:
            raise CliError(refusal, code=EXIT_FAILED)
        message = ControlMessage(run_id=run_id, command=command, reason=f"{command} requested from the command line")
        try:
            await produce(settings, app.control_topic.get_topic_name(), key=run_id.encode(), value=encode(message))
        except Exception as error:
            raise CliError(
                f"cannot reach the broker at {settings.bootstrap_servers}: {error}", code=EXIT_FAILED
            ) from None
        click.echo(f"{command} requested for run {run_id}")
        return 0

    @app.command(argument("run_id"), base=SwitchyardCommand)
    async def cancel(self: AppCommand, run_id: str) -> int:
        """Cancel a run: it ends CANCELLED, the agent is asked to cancel its task."""
        return await control(run_id, ControlCommand.CANCEL)

    @app.command(argument("run_id"), base=SwitchyardCommand)
    async def retry(self: AppCommand, run_id: str) -> int:
        """Run a FAILED run again from its failed step (earlier outputs and history kept)."""
        return await control(run_id, ControlCommand.RETRY)

    @app.command(argument("run_id"), base=SwitchyardCommand)
    async def resume(self: AppCommand, run_id: str) -> int:
        """Rebuild a RUNNING run from its checkpoint if the executor lost it, and re-dispatch what is in flight."""
        return await control(run_id, ControlCommand.RESUME)

    @app.command(
        argument("run_id"),
        option("--json", "as_json", is_flag=True, default=False, help="Print the run as JSON."),
        base=SwitchyardCommand,
    )
    async def status(self: AppCommand, run_id: str, as_json: bool) -> int:
        """Show a run: its status, every step and attempt, and its output or error."""
        from streams.web import record_view

        record = await asyncio.to_thread(WorkflowRepository(_engine(settings)).get_run, run_id)
        if record is None:
            raise CliError(f"no run {run_id!r} (it may not be checkpointed yet)", code=EXIT_FAILED)
        if as_json:
            click.echo(json.dumps(record_view(record), indent=2, ensure_ascii=False))
            return 0
        click.echo(f"run {record.run_id}  {record.status}  workflow {record.workflow_id} v{record.workflow_version}")
        for line in _step_lines(record, {}):
            click.echo(line)
        if record.status == RunStatus.COMPLETED:
            click.echo("output: " + json.dumps(record.output, ensure_ascii=False))
        elif record.error:
            error = record.error if isinstance(record.error, dict) else {"message": str(record.error)}
            click.echo(f"error: {error.get('message')}")
        return 0
