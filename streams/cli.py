"""The executor's commands: ``faust -A streams.app <command>``.

* ``agents add URL [--name NAME]``: read the agent card and register the agent.
* ``agents list`` / ``agents import FILE`` / ``agents remove NAME``.
* ``submit PLAN.json [--input JSON | --input-file F] [--run-id ID] [--wait]``.
* ``status RUN_ID [--json]``.
* ``cancel RUN_ID`` / ``retry RUN_ID`` / ``resume RUN_ID``.
* ``input RUN_ID STEP_ID [--text T] [--data JSON] [--approve | --reject] [--item N]``:
  answer the question a step waits on, or decide its approval.

They work against the running stack with the default settings: they talk to
the same PostgreSQL (the embedded one in ``.switchyard/`` by default) and put
submissions on the plans topic like any producer. A problem is one line on
stderr and a non-zero exit: 1 for a run that failed or was cancelled (and for
a broker or database that cannot be used), 2 for bad input (a submission the
CLI or the executor refuses), 3 when ``--wait`` gives up while the run goes on.

Each command is a handler here that passes its arguments on to a function
taking the :class:`~switchyard.settings.Settings` (:func:`manage_agents`,
:func:`submit_run`, :func:`control_run`, :func:`give_input`, :func:`show_status`), which tests call
directly; :func:`register` adds the handlers to the app.

``submit`` makes the checks of :mod:`streams.submissions` before it sends
anything: a submission over ``SWITCHYARD_MAX_MESSAGE_BYTES`` is refused, and
a ``--run-id`` that PostgreSQL already has is either the same submission again
(nothing is sent; the existing run is the answer) or refused. ``input`` makes
the checks of :mod:`streams.answers` against the run's checkpoint: it works
while the executor is down, and the answer is applied once it is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import aiohttp
import click
from aiokafka.errors import (
    BrokerResponseError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NoBrokersAvailable,
    NodeNotReadyError,
    RecordListTooLargeError,
    RecordTooLargeError,
    RequestTimedOutError,
)
from faust.cli import AppCommand, argument, option
from sqlalchemy import Engine

from models.agents import AgentEntry
from models.messages import (
    RUN_ID_PATTERN,
    ControlCommand,
    ControlMessage,
    ErrorKind,
    WorkflowSubmission,
    encode,
    new_run_id,
)
from models.plan import PlanValidationError, load_plan
from models.run import RunStatus, StepStatus
from streams.answers import AnswerRefused, answer_from, answer_record
from streams.submissions import SubmissionRefused, encode_submission, is_repeat
from streams.views import record_view
from streams.web import recorded_status, refuse_command
from switchyard.agent_cards import AgentCardError, fetch_card
from switchyard.database import connect
from switchyard.db import RunRecord, StepRecord, WorkflowRepository
from switchyard.kafka import ensure_topics, produce
from switchyard.registry import RegistryFileError, RegistryStore, load_registry_file
from switchyard.settings import Settings

if TYPE_CHECKING:
    from streams.app import ExecutorApp

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_STILL_RUNNING",
    "CliError",
    "SwitchyardCommand",
    "add_agent",
    "agents",
    "broker_failure",
    "cancel",
    "check_same_run",
    "control_run",
    "encode_or_refuse",
    "executor_refusal",
    "final_report",
    "give_input",
    "input_",
    "load_agents_file",
    "manage_agents",
    "put_agents",
    "read_submission",
    "register",
    "repeats_existing",
    "resume",
    "retry",
    "send",
    "show_status",
    "status",
    "status_code",
    "submit",
    "submit_run",
    "wait_for_run",
    "watch_run",
]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STILL_RUNNING = 3

HINT_AFTER_S = 5.0
"""How long ``--wait`` sees nothing recorded before it says what it waits for."""


class CliError(Exception):
    """A problem to report in one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


class SwitchyardCommand(AppCommand):
    """A plain asyncio command: no worker banner, one-line errors, exit codes."""

    abstract = True
    app: ExecutorApp  # the app of ``-A streams.app``

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Run the command in an event loop of its own, then exit with its code (a :class:`CliError`'s too)."""
        # The Kafka client logs each failed connection; the one line below says what happened.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        try:
            code = asyncio.run(self.run(*args, **{**self.kwargs, **kwargs}))
        except CliError as error:
            click.echo(f"error: {error}", err=True)
            code = error.code
        except KeyboardInterrupt:
            code = 130
        sys.exit(code or 0)


def _one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line (reasons recorded by others may span several), cut at ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _engine(settings: Settings) -> Engine:
    try:
        engine, _ = connect(settings, wait_s=min(settings.wait_for_services_s, 15.0))
    except Exception as error:
        raise CliError(f"cannot reach PostgreSQL: {error}", code=EXIT_FAILED) from None
    return engine


def _read_json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise CliError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise CliError(f"{what} must be a JSON object")
    return value


# ------------------------------------------------------------------- Kafka

_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)
# Checked before _UNREACHABLE: TimeoutError is an OSError.
_TIMED_OUT = (KafkaTimeoutError, RequestTimedOutError, TimeoutError)
_UNREACHABLE = (KafkaConnectionError, NoBrokersAvailable, NodeNotReadyError, OSError)


def broker_failure(error: BaseException, settings: Settings, *, doing: str = "the record") -> CliError:
    """What went wrong with the broker, as a :class:`CliError` that says which of the cases it was.

    Args:
        error: What the Kafka client (or the socket under it) raised.
        settings: For the broker's address.
        doing: What was sent, for the message ("the submission", "the command").

    Returns:
        Exit 2 when the record is too large (for the broker, the producer or
        ``SWITCHYARD_MAX_MESSAGE_BYTES``), 1 otherwise: unreachable, no
        acknowledgement in time (the record may or may not be stored), or
        another refusal.
    """
    where = settings.bootstrap_servers
    detail = _one_line(str(error) or type(error).__name__)
    if isinstance(error, _TOO_LARGE):
        return CliError(f"{doing} is too large for the broker at {where} ({detail})", code=EXIT_BAD_INPUT)
    if isinstance(error, _TIMED_OUT):
        return CliError(
            f"the broker at {where} did not acknowledge {doing} in time ({detail}); it may or may not have it",
            code=EXIT_FAILED,
        )
    if isinstance(error, _UNREACHABLE):
        detail = re.sub(r" from \[.*\]$", "", detail)  # the address list repeats ``where``, less readably
        return CliError(f"cannot reach the broker at {where} ({detail})", code=EXIT_FAILED)
    if isinstance(error, BrokerResponseError):
        return CliError(f"the broker at {where} refused {doing} ({detail})", code=EXIT_FAILED)
    if isinstance(error, ValueError):  # refused before sending (``produce`` checks the size too)
        return CliError(f"{doing} was not sent: {detail}", code=EXIT_BAD_INPUT)
    if isinstance(error, KafkaError):
        return CliError(f"the Kafka client failed with the broker at {where} ({detail})", code=EXIT_FAILED)
    return CliError(
        f"could not send {doing} to the broker at {where} ({type(error).__name__}: {detail})", code=EXIT_FAILED
    )


async def send(
    settings: Settings, topic: str, *, key: bytes, value: bytes, doing: str = "the record", create_topics: bool = True
) -> None:
    """Produce one record and wait for its acknowledgement (creating the topics first, unless told not to).

    Raises:
        CliError: From :func:`broker_failure`.
    """
    try:
        if create_topics:
            await ensure_topics(settings)
        await produce(settings, topic, key=key, value=value)
    except Exception as error:
        raise broker_failure(error, settings, doing=doing) from None


# ------------------------------------------------------------- submissions


def read_submission(
    plan_file: str, input_json: str | None, input_file: str | None, run_id: str | None
) -> WorkflowSubmission:
    """The submission that ``submit`` arguments describe (a fresh run id when none is given).

    Raises:
        CliError: Unreadable or invalid plan, input or run id (exit 2).
    """
    try:
        raw = Path(plan_file).read_bytes()
    except OSError as error:
        raise CliError(f"cannot read {plan_file}: {error.strerror or error}") from None
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
            raise CliError(f"cannot read {input_file}: {error.strerror or error}") from None
    run_id = run_id or new_run_id()
    if not re.match(RUN_ID_PATTERN, run_id):
        raise CliError("--run-id: letters, digits, '.', '_', ':' and '-', at most 128")
    try:
        return WorkflowSubmission(run_id=run_id, plan=plan, input=run_input)
    except ValueError as error:  # e.g. an input that is not JSON data
        raise CliError(f"the submission is invalid: {_one_line(str(error))}") from None


def encode_or_refuse(submission: WorkflowSubmission, limit: int) -> bytes:
    """The submission's record, or exit 2 naming its size and the limit (nothing is sent).

    Raises:
        CliError: The record would be over ``limit`` bytes.
    """
    try:
        return encode_submission(submission, limit)
    except SubmissionRefused as refusal:
        raise CliError(str(refusal)) from None


def executor_refusal(record: RunRecord) -> str | None:
    """The executor's reason when ``record`` is a submission it refused (``invalid_submission``), else None."""
    error = record.error if isinstance(record.error, dict) else None
    if record.status != RunStatus.FAILED or error is None or error.get("kind") != ErrorKind.INVALID_SUBMISSION:
        return None
    return _one_line(str(error.get("message") or "no reason recorded"))


def repeats_existing(submission: WorkflowSubmission, record: RunRecord | None) -> bool:
    """Whether ``submission`` is the same request as the recorded run with its id (then send nothing).

    Returns:
        False when no run has the id (send it), True when the run was started
        by the same plan and input.

    Raises:
        CliError: The id belongs to a run with another plan or input, or to a
            submission the executor refused (exit 2, with the reason).
    """
    if record is None:
        return False
    try:
        return is_repeat(submission, None, record)
    except SubmissionRefused as refusal:
        reason = executor_refusal(record)
        if reason is not None:
            raise CliError(
                f"run_id {submission.run_id!r} is taken by a submission the executor refused ({reason}); "
                "submit with another run_id, or without one"
            ) from None
        raise CliError(str(refusal)) from None


def check_same_run(submission: WorkflowSubmission, record: RunRecord) -> None:
    """Make sure the run recorded under the submission's id is that submission's, not another's.

    Two different submissions with one run_id can be in flight at once (the
    check before sending only sees what PostgreSQL has): only the first one
    starts, and its output is not the answer to the other. A record of a
    refused submission passes: :func:`final_report` says why it was refused.

    Raises:
        CliError: The run was started by another plan or input (exit 2).
    """
    if executor_refusal(record) is None:
        repeats_existing(submission, record)


async def watch_run(
    get_run: Callable[[str], RunRecord | None],
    run_id: str,
    *,
    timeout_s: float,
    echo: Callable[[str], Any] = click.echo,
    poll_s: float = 0.2,
    submission: WorkflowSubmission | None = None,
    hint_after_s: float = HINT_AFTER_S,
) -> RunRecord | None:
    """Follow a run through ``get_run`` (blocking; run in a thread), printing step progress.

    Args:
        get_run: Reads the run as recorded, with its steps, or None.
        run_id: The run.
        timeout_s: How long to follow it.
        echo: Where progress lines go.
        poll_s: How often to read it.
        submission: What was sent: the run that appears must be this one.
        hint_after_s: When nothing is recorded after this long, say so once.

    Returns:
        The last record read: finished, or not (the time was up), or None
        when nothing was ever recorded.

    Raises:
        CliError: The run recorded under ``run_id`` is another submission's.
    """
    seen: dict[str, str] = {}
    started = time.monotonic()
    deadline = started + timeout_s
    hinted = checked = False
    record: RunRecord | None = None
    while True:
        record = await asyncio.to_thread(get_run, run_id)
        if record is None:
            if not hinted and time.monotonic() - started >= hint_after_s:
                echo(
                    f"  nothing recorded for {run_id} yet; waiting for an executor to pick it up"
                    " (one may still be starting)"
                )
                hinted = True
        else:
            if submission is not None and not checked:
                check_same_run(submission, record)
                checked = True
            for line in _step_lines(record, seen):
                echo(line)
            if RunStatus(record.status).finished:
                return record
        if time.monotonic() >= deadline:
            return record
        await asyncio.sleep(poll_s)


async def wait_for_run(
    settings: Settings,
    run_id: str,
    *,
    timeout_s: float,
    echo: Callable[[str], Any] = click.echo,
    poll_s: float = 0.2,
    submission: WorkflowSubmission | None = None,
) -> RunRecord | None:
    """Follow a run in PostgreSQL, printing step progress, until it ends or the time is up (see :func:`watch_run`)."""
    repo = WorkflowRepository(await asyncio.to_thread(_engine, settings))
    return await watch_run(repo.get_run, run_id, timeout_s=timeout_s, echo=echo, poll_s=poll_s, submission=submission)


def _step_lines(record: RunRecord, seen: dict[str, str]) -> list[str]:
    lines = []
    for attempt in record.steps:
        key = attempt.correlation_id
        if seen.get(key) == attempt.status:
            continue
        seen[key] = attempt.status
        took = ""
        if attempt.completed_at and attempt.started_at:
            took = f" in {(attempt.completed_at - attempt.started_at).total_seconds():.2f}s"
        error = ""
        if isinstance(attempt.error, dict) and attempt.error.get("message"):
            error = f": {attempt.error['message']}"
        where = attempt.step_id
        if attempt.iteration > 1:
            where += f" (iteration {attempt.iteration})"
        if attempt.item is not None:
            where += f" [item {attempt.item}]"
        agent = attempt.agent_name or "approval"
        lines.append(f"  {where} #{attempt.attempt} [{agent}] {attempt.status}{took}{error}")
        question = _open_question(attempt)
        if question is not None:
            how = "--approve | --reject" if not attempt.agent_name else "--text TEXT | --data JSON"
            item = f" --item {attempt.item}" if attempt.item is not None else ""
            lines.append(f"    asks: {_one_line(question)}")
            lines.append(f"    answer with: faust -A streams.app input {record.run_id} {attempt.step_id}{item} {how}")
    return lines


def _open_question(attempt: StepRecord) -> str | None:
    """The text of the question a waiting attempt asks (its data as JSON when it has no text), or None."""
    if attempt.status != StepStatus.WAITING or not isinstance(attempt.exchanges, list) or not attempt.exchanges:
        return None
    last = attempt.exchanges[-1]
    if not isinstance(last, dict) or last.get("answer") is not None:
        return None
    question = last.get("question") if isinstance(last.get("question"), dict) else {}
    assert isinstance(question, dict)
    text = question.get("text")
    if isinstance(text, str) and text:
        return text
    return json.dumps(question.get("data"), ensure_ascii=False)


def final_report(record: RunRecord) -> int:
    """Print how a finished run ended (output on stdout, a failure on stderr); returns the exit code.

    Returns:
        0 COMPLETED, 2 a submission the executor refused, 1 otherwise
        (FAILED or CANCELLED).
    """
    if record.status == RunStatus.COMPLETED:
        click.echo(f"run {record.run_id} COMPLETED")
        click.echo(json.dumps(record.output, indent=2, ensure_ascii=False))
        return 0
    refused = executor_refusal(record)
    if refused is not None:
        click.echo(f"run {record.run_id} was refused by the executor: {refused}", err=True)
        return EXIT_BAD_INPUT
    error = record.error if isinstance(record.error, dict) else {}
    step = error.get("step_id")
    where = f" at step {step!r}" if step else ""
    click.echo(f"run {record.run_id} {record.status}{where}: {error.get('message', 'no reason recorded')}", err=True)
    return EXIT_FAILED


def status_code(record: RunRecord) -> int:
    """The exit code of ``status``: 1 for a FAILED or CANCELLED run, 0 otherwise (COMPLETED, RUNNING, PENDING)."""
    return EXIT_FAILED if record.status in {RunStatus.FAILED, RunStatus.CANCELLED} else 0


async def submit_run(
    settings: Settings,
    topic: str,
    submission: WorkflowSubmission,
    *,
    given_run_id: bool,
    wait: bool,
    timeout: float,
) -> int:
    """``submit`` once the submission is built: check its size and its run_id, send it, follow it.

    Args:
        settings: The stack's settings.
        topic: The plans topic.
        submission: What to submit.
        given_run_id: The user chose the run id (then PostgreSQL is asked
            whether a run has it; a fresh random id cannot be taken).
        wait: Follow the run and print its outcome.
        timeout: How long to follow it.

    Returns:
        The exit code (see the module's docstring).
    """
    run_id = submission.run_id
    value = encode_or_refuse(submission, settings.max_message_bytes)
    repo: WorkflowRepository | None = None
    repeat = False
    if given_run_id:
        repo = WorkflowRepository(await asyncio.to_thread(_engine, settings))
        repeat = repeats_existing(submission, await asyncio.to_thread(repo.get_run, run_id, with_steps=False))
    if repeat:
        click.echo(f"run {run_id} exists already with this plan and input; nothing sent", err=True)
    else:
        await send(settings, topic, key=run_id.encode(), value=value, doing="the submission")
    click.echo(run_id)
    if not wait:
        return 0
    if repo is None:
        repo = WorkflowRepository(await asyncio.to_thread(_engine, settings))
    record = await watch_run(repo.get_run, run_id, timeout_s=timeout, submission=submission)
    if record is None:
        raise CliError(
            f"nothing recorded for run {run_id} after {timeout:g}s: no executor has picked it up"
            f" (none running, or one still starting); look again with: faust -A streams.app status {run_id}",
            code=EXIT_STILL_RUNNING,
        )
    if not RunStatus(record.status).finished:
        raise CliError(
            f"run {run_id} still {record.status} after {timeout:g}s; "
            f"follow it with: faust -A streams.app status {run_id}",
            code=EXIT_STILL_RUNNING,
        )
    return final_report(record)


# ------------------------------------------------------------------ agents


async def add_agent(settings: Settings, url: str, name: str | None) -> AgentEntry:
    """Read an agent card and register the agent (see ``agents add``)."""
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
    await asyncio.to_thread(put_agents, RegistryStore(_engine(settings), settings), [entry])
    return entry


def load_agents_file(path: Path) -> list[AgentEntry]:
    """The agents of a registry file, or one line naming what is wrong with it (exit 2).

    Raises:
        CliError: A directory, an unreadable file, invalid JSON or an invalid entry.
    """
    if path.is_dir():
        raise CliError(f"{path} is a directory; give a registry file (JSON)")
    try:
        return load_registry_file(path)
    except RegistryFileError as error:
        raise CliError(_one_line(str(error))) from None
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror or error}") from None
    except RecursionError:
        raise CliError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as error:  # a secret the registry will not store, among others
        raise CliError(f"{path}: {_one_line(str(error))}") from None


def put_agents(store: RegistryStore, entries: Iterable[AgentEntry]) -> list[str]:
    """Register agents in order; returns their names.

    Raises:
        CliError: The registry refused an entry (``RegistrySecretError``: a
            literal secret without ``SWITCHYARD_SECRETS_KEY``, or any other
            ValueError); the message names it and what was registered before it.
    """
    done: list[str] = []
    for entry in entries:
        try:
            store.put(entry)
        except ValueError as error:
            before = f"registered before it: {', '.join(done)}" if done else "nothing registered"
            raise CliError(f"agent {entry.name!r} not registered: {_one_line(str(error))} ({before})") from None
        done.append(entry.name)
    return done


_TARGETS = {"add": "URL", "import": "FILE", "remove": "NAME"}


async def manage_agents(settings: Settings, action: str, target: str | None, name: str | None) -> int:
    """``agents add URL [--name NAME]``, ``agents list``, ``agents import FILE``, ``agents remove NAME``.

    Args:
        settings: The stack's settings (for PostgreSQL).
        action: ``add``, ``list``, ``import`` or ``remove``.
        target: The URL, file or name the action needs (``list`` needs none).
        name: For ``add``: register under this name instead of the card's.

    Returns:
        0 once done.

    Raises:
        CliError: No target for an action that needs one (exit 2), an agent
            card that cannot be read or an agent to remove that is not
            registered (exit 1), or what :func:`load_agents_file` and
            :func:`put_agents` refuse.
    """
    if action == "list":
        entries = await asyncio.to_thread(RegistryStore(_engine(settings), settings).list)
        for entry in entries:
            click.echo(f"{entry.name}\t{entry.url}\tA2A {entry.protocol_version}")
        if not entries:
            click.echo("no agents registered (add one with: agents add URL)")
        return 0
    if target is None:
        raise CliError(f"agents {action} needs a {_TARGETS.get(action, 'NAME')}")
    if action == "add":
        entry = await add_agent(settings, target, name)
        click.echo(f"registered {entry.name} -> {entry.url} (A2A {entry.protocol_version})")
        return 0
    if action == "import":
        entries = load_agents_file(Path(target))
        names = await asyncio.to_thread(put_agents, RegistryStore(_engine(settings), settings), entries)
        click.echo(f"imported {len(names)} agent(s): {', '.join(names)}")
        return 0
    removed = await asyncio.to_thread(RegistryStore(_engine(settings), settings).delete, target)
    if not removed:
        raise CliError(f"no agent {target!r} in the registry", code=EXIT_FAILED)
    click.echo(f"removed {target}")
    return 0


# -------------------------------------------------------------------- runs


async def control_run(settings: Settings, control_topic: str, run_id: str, command: ControlCommand) -> int:
    """``cancel``, ``retry`` or ``resume``: send the command when the run's recorded status allows it.

    Args:
        settings: The stack's settings.
        control_topic: The control topic.
        run_id: The run.
        command: One of :data:`streams.web.USER_COMMANDS`.

    Returns:
        0 once the broker has the command.

    Raises:
        CliError: No such run, or a status the command does not apply to
            (exit 1, the reason of :func:`streams.web.refuse_command`), or the
            broker did not take it (:func:`broker_failure`).
    """
    status, error_kind = await asyncio.to_thread(recorded_status, WorkflowRepository(_engine(settings)), run_id)
    refusal = refuse_command(command, status, run_id, error_kind)
    if refusal is not None:
        raise CliError(refusal, code=EXIT_FAILED)
    message = ControlMessage(run_id=run_id, command=command, reason=f"{command} requested from the command line")
    await send(
        settings,
        control_topic,
        key=run_id.encode(),
        value=encode(message),
        doing=f"the {command} command",
        create_topics=False,  # the run exists, so do its topics
    )
    click.echo(f"{command} requested for run {run_id}")
    return 0


async def give_input(
    settings: Settings,
    control_topic: str,
    run_id: str,
    step_id: str,
    *,
    text: str | None = None,
    data_json: str | None = None,
    decision: str | None = None,
    item: int | None = None,
    iteration: int | None = None,
) -> int:
    """``input``: send a person's answer when the run's checkpoint shows the step waiting for one.

    Args:
        settings: The stack's settings.
        control_topic: The control topic.
        run_id: The run.
        step_id: The step answered.
        text: The answer's text.
        data_json: The answer's data, as JSON (any JSON value).
        decision: ``approve`` or ``reject``, for an approval step.
        item: The map item answered (needed when several wait).
        iteration: The loop iteration answered (the one waiting, by default).

    Returns:
        0 once the broker has the answer.

    Raises:
        CliError: Data that is not JSON, or an answer of the wrong form or
            too large (exit 2); no such run or step, or a step that does
            not wait (exit 1); or the broker did not take it.
    """
    fields: dict[str, Any] = {"text": text, "decision": decision}
    if data_json is not None:
        try:
            fields["data"] = json.loads(data_json, parse_constant=_no_constant)
        except (ValueError, RecursionError) as error:
            raise CliError(f"--data is not JSON: {_one_line(str(error) or type(error).__name__)}") from None
    try:
        answer = answer_from(fields, "cli")
        state = await asyncio.to_thread(WorkflowRepository(_engine(settings)).get_state, run_id)
        message, value = answer_record(
            state, run_id, step_id, answer, limit=settings.max_message_bytes, item=item, iteration=iteration
        )
    except AnswerRefused as refused:
        code = EXIT_BAD_INPUT if refused.status in {400, 413} else EXIT_FAILED
        raise CliError(str(refused), code=code) from None
    await send(
        settings,
        control_topic,
        key=run_id.encode(),
        value=value,
        doing="the answer",
        create_topics=False,  # the run exists, so do its topics
    )
    where = step_id if message.item is None else f"{step_id} item {message.item}"
    click.echo(f"answer {answer.answer_id} sent to {where} of run {run_id} (question {(message.turn or 0) + 1})")
    return 0


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def show_status(settings: Settings, run_id: str, as_json: bool) -> int:
    """``status RUN_ID [--json]``: print a run as PostgreSQL has it.

    Args:
        settings: The stack's settings.
        run_id: The run.
        as_json: Print :func:`streams.views.record_view` (what ``GET /runs/{run_id}/``
            answers from PostgreSQL) instead of lines.

    Returns:
        :func:`status_code`: 1 for a FAILED or CANCELLED run, 0 otherwise.

    Raises:
        CliError: No such run recorded (exit 1).
    """
    record = await asyncio.to_thread(WorkflowRepository(_engine(settings)).get_run, run_id)
    if record is None:
        raise CliError(f"no run {run_id!r} (it may not be checkpointed yet)", code=EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(record_view(record), indent=2, ensure_ascii=False))
        return status_code(record)
    click.echo(f"run {record.run_id}  {record.status}  workflow {record.workflow_id} v{record.workflow_version}")
    for line in _step_lines(record, {}):
        click.echo(line)
    if record.status == RunStatus.COMPLETED:
        click.echo("output: " + json.dumps(record.output, ensure_ascii=False))
    elif record.error:
        error = record.error if isinstance(record.error, dict) else {"message": str(record.error)}
        refused = executor_refusal(record)
        click.echo(f"refused by the executor: {refused}" if refused else f"error: {error.get('message')}")
    return status_code(record)


# ---------------------------------------------------------------- commands

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[int]])

_COMMANDS: dict[Callable[..., Awaitable[int]], tuple[Any, ...]] = {}
"""Each command's handler and its click arguments and options, in the order :func:`register` adds them."""


def _command(*options: Any) -> Callable[[Handler], Handler]:
    """Mark a handler as a command taking these arguments and options; the handler's name is the command's."""

    def mark(handler: Handler) -> Handler:
        _COMMANDS[handler] = options
        return handler

    return mark


# The handlers' docstrings are the commands' --help.


@_command(
    argument("action", type=click.Choice(["add", "list", "import", "remove"])),
    argument("target", required=False),
    option("--name", default=None, help="Register under this name instead of the card's."),
)
async def agents(self: SwitchyardCommand, action: str, target: str | None, name: str | None) -> int:
    """Manage the agent registry: add URL, list, import FILE, remove NAME."""
    return await manage_agents(self.app.settings, action, target, name)


@_command(
    argument("plan_file"),
    option("--input", "input_json", default=None, help="The run's input, a JSON object."),
    option("--input-file", default=None, help="Read the run's input from this JSON file."),
    option(
        "--run-id",
        default=None,
        help="Use this run id: the same plan and input again starts nothing new, another is refused.",
    ),
    option("--wait/--no-wait", default=False, help="Follow the run and print its output."),
    option("--timeout", default=600.0, type=float, help="How long --wait waits, in seconds."),
)
async def submit(
    self: SwitchyardCommand,
    plan_file: str,
    input_json: str | None,
    input_file: str | None,
    run_id: str | None,
    wait: bool,
    timeout: float,
) -> int:
    """Submit a workflow plan; prints the run id."""
    return await submit_run(
        self.app.settings,
        self.app.plans_topic.get_topic_name(),
        read_submission(plan_file, input_json, input_file, run_id),
        given_run_id=run_id is not None,
        wait=wait,
        timeout=timeout,
    )


@_command(argument("run_id"))
async def cancel(self: SwitchyardCommand, run_id: str) -> int:
    """Cancel a run: it ends CANCELLED, the agent is asked to cancel its task."""
    return await control_run(self.app.settings, self.app.control_topic.get_topic_name(), run_id, ControlCommand.CANCEL)


@_command(argument("run_id"))
async def retry(self: SwitchyardCommand, run_id: str) -> int:
    """Run a FAILED run again from its failed step (earlier outputs and history kept)."""
    return await control_run(self.app.settings, self.app.control_topic.get_topic_name(), run_id, ControlCommand.RETRY)


@_command(argument("run_id"))
async def resume(self: SwitchyardCommand, run_id: str) -> int:
    """Rebuild a RUNNING run from its checkpoint if the executor lost it, and re-dispatch what is in flight."""
    return await control_run(self.app.settings, self.app.control_topic.get_topic_name(), run_id, ControlCommand.RESUME)


@_command(
    argument("run_id"),
    argument("step_id"),
    option("--text", default=None, help="The answer, in words."),
    option("--data", "data_json", default=None, help="The answer's data, as JSON."),
    option("--approve", "decision", flag_value="approve", default=None, help="Approve (an approval step)."),
    option("--reject", "decision", flag_value="reject", help="Reject (an approval step)."),
    option("--item", default=None, type=click.IntRange(min=0), help="The map item answered, when several wait."),
    option("--iteration", default=None, type=click.IntRange(min=1), help="The loop iteration answered."),
)
async def input_(
    self: SwitchyardCommand,
    run_id: str,
    step_id: str,
    text: str | None,
    data_json: str | None,
    decision: str | None,
    item: int | None,
    iteration: int | None,
) -> int:
    """Answer the question a step waits on (--text, --data), or decide its approval (--approve, --reject)."""
    return await give_input(
        self.app.settings,
        self.app.control_topic.get_topic_name(),
        run_id,
        step_id,
        text=text,
        data_json=data_json,
        decision=decision,
        item=item,
        iteration=iteration,
    )


input_.__name__ = input_.__qualname__ = "input"  # the command's name; ``input`` would hide the builtin here


@_command(
    argument("run_id"),
    option("--json", "as_json", is_flag=True, default=False, help="Print the run as JSON."),
)
async def status(self: SwitchyardCommand, run_id: str, as_json: bool) -> int:
    """Show a run: its status, every step and attempt, and its output or error. Exit 1 if FAILED or CANCELLED."""
    return await show_status(self.app.settings, run_id, as_json)


def register(app: ExecutorApp) -> None:
    """Add the commands to the executor app."""
    for handler, options in _COMMANDS.items():
        app.command(*options, base=SwitchyardCommand)(handler)
