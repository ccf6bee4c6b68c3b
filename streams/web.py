"""The executor's HTTP API, on Faust's web server (127.0.0.1 by default).

* ``POST /runs/`` ``{plan, input, run_id?}``: validate and submit, 202 ``{run_id, status_url}``.
  A run_id already used by the same plan and input is the same request again
  (202 pointing to that run, nothing sent); by another plan or input, 409.
* ``GET /runs/?status=&workflow_id=&limit=&offset=``: recent runs (from PostgreSQL);
  ``status=WAITING``: the running runs that wait for a person.
* ``GET /runs/{run_id}/``: one run with every step and attempt; answered by
  the worker that owns the run (``table_route``), from its live state, or from
  PostgreSQL when the run is not in the table.
* ``POST /runs/{run_id}/cancel|retry|resume``: a control command, 202.
* ``POST /runs/{run_id}/steps/{step_id}/input`` ``{text?, data?, decision?, item?, iteration?}``:
  a person's answer to the question the step waits on (``decision``:
  ``approve`` or ``reject`` for an approval step), 202; checked first
  (:mod:`streams.answers`) on the worker that owns the run.
* ``GET /agents/``, ``GET/PUT/DELETE /agents/{name}``: the built-in registry.
* ``GET /health/``: answers once the worker has recovered its tables, with counters.

:mod:`switchyard.http_guard` guards every request before a view runs (the
token, cross-site requests, content type, body size, text PostgreSQL cannot
store) and makes every error JSON ``{"error": ..., ...}``, never a traceback.
Views here only read the checked body (:func:`~switchyard.http_guard.json_body`).

Each endpoint is a function of the app and the request's parts (its path
parameters, query or body) that returns an :data:`Answer`, a status and a JSON
body: :func:`submit_run`, :func:`list_runs`, :func:`show_run`,
:func:`run_command`, :func:`give_input`, :func:`list_agents`, :func:`show_agent`,
:func:`put_agent`, :func:`delete_agent`, :func:`health`. The views only pass
those parts on; :func:`register` adds them to the app as :data:`PAGES`. A run
is shown as :mod:`streams.views` builds it, as ``status --json`` shows it too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
from faust import web
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from models.agents import AgentEntry
from models.messages import RUN_ID_PATTERN, ControlCommand, ControlMessage, WorkflowSubmission, encode, new_run_id
from models.plan import PlanValidationError, load_plan
from models.run import RunState, RunStatus, retry_refusal
from streams.answers import ANSWER_FIELDS, AnswerRefused, answer_from, answer_record
from streams.submissions import Refusal, SubmissionRefused, encode_submission, is_repeat
from streams.views import record_view, state_view
from switchyard import http_guard, topics
from switchyard.db import RunRecord, WorkflowRepository
from switchyard.registry import RegistrySecretError, RegistryStore

if TYPE_CHECKING:
    from streams.app import ExecutorApp

__all__ = [
    "MAX_OFFSET",
    "PAGES",
    "USER_COMMANDS",
    "AgentView",
    "AgentsView",
    "Answer",
    "ExecutorView",
    "FORWARDED_HEADER",
    "HealthView",
    "StepInputView",
    "RunActionView",
    "RunView",
    "RunsView",
    "delete_agent",
    "give_input",
    "health",
    "list_agents",
    "list_query",
    "list_runs",
    "put_agent",
    "recorded_status",
    "refuse_command",
    "register",
    "run_command",
    "show_agent",
    "show_run",
    "submit_run",
    "valid_run_id",
]

log = logging.getLogger(__name__)

USER_COMMANDS = (ControlCommand.CANCEL, ControlCommand.RETRY, ControlCommand.RESUME)


def refuse_command(
    command: ControlCommand, status: str | None, run_id: str, error_kind: str | None = None
) -> str | None:
    """Why a user's command cannot apply to a run with this status (and error kind), or None if it can."""
    if status is None:
        return f"no run {run_id!r}"
    if command is ControlCommand.RETRY and (refusal := retry_refusal(run_id, error_kind)) is not None:
        return refusal
    if command is ControlCommand.CANCEL and RunStatus(status).finished:
        return f"run {run_id!r} is already {status}"
    if command is ControlCommand.RETRY and status != RunStatus.FAILED:
        return f"run {run_id!r} is {status}; only a FAILED run can be retried"
    if command is ControlCommand.RESUME and status != RunStatus.RUNNING:
        return f"run {run_id!r} is {status}; only a RUNNING run can be resumed"
    return None


def recorded_status(repo: WorkflowRepository, run_id: str) -> tuple[str | None, str | None]:
    """A run's recorded status and error kind (None, None for an unknown run); blocking."""
    record = repo.get_run(run_id, with_steps=False)
    if record is None:
        return None, None
    kind = record.error.get("kind") if isinstance(record.error, dict) else None
    return record.status, kind if isinstance(kind, str) else None


_RUN_ID = re.compile(RUN_ID_PATTERN)

WAITING = "WAITING"
"""``GET /runs/?status=WAITING``: the runs that wait for a person (RUNNING, with a question open)."""

MAX_OFFSET = 1_000_000_000
"""Largest ``offset`` of ``GET /runs/`` (PostgreSQL's OFFSET is a bigint: a bigger one would be a 500)."""

Answer = tuple[int, dict[str, Any]]
"""An HTTP status and its JSON body."""


def valid_run_id(run_id: object) -> bool:
    """Whether ``run_id`` is a run id (letters, digits, '.', '_', ':', '-', at most 128)."""
    # fullmatch: the pattern's "$" alone would let a trailing newline through.
    return isinstance(run_id, str) and _RUN_ID.fullmatch(run_id) is not None


def _summary(record: RunRecord) -> dict[str, Any]:
    data = record.model_dump(mode="json", exclude={"steps", "plan", "input"})
    return data


def _repo(app: ExecutorApp) -> WorkflowRepository:
    return WorkflowRepository(app.database.engine)


def _store(app: ExecutorApp) -> RegistryStore:
    return RegistryStore(app.database.engine, app.settings)


def _error(code: int, error: str, /, **extra: Any) -> Answer:
    # Positional-only: a refusal's details may hold a "status" (the run's).
    return code, {"error": error, **extra}


def list_query(query: Mapping[str, str]) -> dict[str, Any]:
    """The arguments of ``list_runs`` from ``GET /runs/``'s query.

    Raises:
        http_guard.Problem: 400, an unknown status or a bad number.
    """
    statuses: list[RunStatus] | None = None
    waiting = False
    if query.get("status"):
        wanted = [s.strip().upper() for s in query["status"].split(",")]
        # WAITING is not a status of its own: the RUNNING runs that wait for a person.
        waiting = WAITING in wanted
        try:
            statuses = [RunStatus(s) for s in wanted if s != WAITING] or None
        except ValueError:
            allowed = ", ".join([*(s.value for s in RunStatus), WAITING])
            raise http_guard.Problem(
                400, f"unknown status {query['status']!r}; use one of {allowed}", parameter="status"
            ) from None
    try:
        limit = int(query.get("limit", "50"))
        offset = int(query.get("offset", "0"))
    except ValueError:
        raise http_guard.Problem(400, "limit and offset must be integers") from None
    if not 0 <= offset <= MAX_OFFSET:
        raise http_guard.Problem(400, f"offset must be between 0 and {MAX_OFFSET}", parameter="offset")
    return {
        "status": statuses,
        "waiting": waiting,
        "workflow_id": query.get("workflow_id") or None,
        "limit": limit,
        "offset": offset,
    }


async def submit_run(app: ExecutorApp, body: Any) -> Answer:
    """``POST /runs/``: check a submission; send it unless its run_id is an existing run's.

    The checks, in order: the shape, the plan (400 with every problem), the
    size of the record that would be sent (413, ``size`` and ``limit``), and,
    for a run_id the client chose, whether a run has it (this worker's table,
    else PostgreSQL): with the same plan and input the answer is 202 pointing
    to that run (``"existing": true``) and nothing is sent; with another, 409
    naming the run. A run_id the API makes up is new by construction.
    """
    if not isinstance(body, dict) or "plan" not in body:
        return _error(400, 'expected a JSON object {"plan": {...}, "input": {...}}')
    unknown = sorted(set(body) - {"plan", "input", "run_id"})
    if unknown:
        return _error(400, f"unknown field(s): {', '.join(unknown)}")
    given = body.get("run_id")
    if given is not None and given != "" and not valid_run_id(given):
        return _error(400, "run_id: letters, digits, '.', '_', ':' and '-', at most 128", path="$.run_id")
    try:
        plan = load_plan(body["plan"])
    except PlanValidationError as error:
        return _error(400, "invalid workflow plan", problems=[p.to_dict() for p in error.problems])
    run_input = body.get("input", {})
    if not isinstance(run_input, dict):
        return _error(400, "input must be a JSON object", path="$.input")
    run_id = str(given) if given else new_run_id()
    try:
        submission = WorkflowSubmission(run_id=run_id, plan=plan, input=run_input)
    except ValidationError as error:
        return _error(400, "invalid submission", problems=_problems(error.errors(include_url=False)))
    try:
        value = encode_submission(submission, app.settings.max_message_bytes)
    except SubmissionRefused as refused:
        return _error(413 if refused.refusal is Refusal.TOO_LARGE else 400, str(refused), **refused.details)
    answer = {"run_id": run_id, "status_url": f"/runs/{run_id}/"}
    if given:
        try:
            live, record = await _existing(app, run_id)
        except (SQLAlchemyError, OSError, RuntimeError) as error:
            log.warning("cannot look run %s up before submitting it: %s", run_id, type(error).__name__)
            return _error(
                503,
                f"cannot check whether run_id {run_id!r} is in use (PostgreSQL did not answer);"
                " try again, or submit without a run_id",
                run_id=run_id,
            )
        try:
            if is_repeat(submission, live, record):
                status = str(live.status) if live is not None else record.status if record is not None else None
                return 202, {**answer, "existing": True, "status": status}
        except SubmissionRefused as refused:
            return _error(409, str(refused), **refused.details)
    await app.plans_topic.send(key=run_id.encode(), value=value)
    return 202, answer


async def _existing(
    app: ExecutorApp, run_id: str, *, ask_postgresql: bool = True
) -> tuple[RunState | None, RunRecord | None]:
    """A run's live state on this worker, else (when asked) its record in PostgreSQL; either may be None."""
    live = app.shell.load(run_id)  # None also for a state it cannot read: the record decides
    if live is not None or not ask_postgresql:
        return live, None  # the live state decides; no need to ask PostgreSQL
    record = await asyncio.to_thread(_repo(app).get_run, run_id, with_steps=False)
    return None, record


async def run_command(app: ExecutorApp, run_id: str, action: str) -> Answer:
    """``POST /runs/{run_id}/{action}``: send a user's command when the run's status allows it.

    The status is the live state's when this worker owns the run, else PostgreSQL's.
    """
    try:
        command: ControlCommand | None = ControlCommand(action)
    except ValueError:
        command = None
    if command not in USER_COMMANDS or command is None:
        return _error(404, f"no action {action!r}; use cancel, retry or resume")
    if not valid_run_id(run_id):
        return _error(404, f"no run {run_id!r}")
    live, _ = await _existing(app, run_id, ask_postgresql=False)
    # The live state when this worker has it: PostgreSQL lags by a checkpoint.
    status: str | None
    error_kind: str | None
    if live is not None:
        status, error_kind = str(live.status), live.error.kind if live.error is not None else None
    else:
        status, error_kind = await asyncio.to_thread(recorded_status, _repo(app), run_id)
    refusal = refuse_command(command, status, run_id, error_kind)
    if refusal is not None:
        return _error(404 if status is None else 409, refusal)
    message = ControlMessage(run_id=run_id, command=command, reason=f"{command} requested over HTTP")
    await app.control_topic.send(key=run_id.encode(), value=encode(message))
    return 202, {"run_id": run_id, "requested": str(command)}


_INPUT_FIELDS = frozenset({*ANSWER_FIELDS, "item", "iteration"})


async def give_input(app: ExecutorApp, run_id: str, step_id: str, body: Any) -> Answer:
    """``POST /runs/{run_id}/steps/{step_id}/input``: send a person's answer when the step waits for one.

    The run is read live when this worker has it (the view forwards the
    request to the worker that owns the run), else from PostgreSQL. The
    checks and their statuses are :mod:`streams.answers`'s: 404 no such run
    or step, 409 not waiting (or waiting on several map items, none named),
    400 a wrong answer, 413 too large.
    """
    if not valid_run_id(run_id):
        return _error(404, f"no run {run_id!r}")
    if not isinstance(body, dict):
        return _error(400, 'expected a JSON object {"text": ..., "data": ..., "decision": "approve"|"reject"}')
    unknown = sorted(set(body) - _INPUT_FIELDS)
    if unknown:
        return _error(400, f"unknown field(s): {', '.join(unknown)}; use {', '.join(sorted(_INPUT_FIELDS))}")
    where: dict[str, int | None] = {}
    for name, least in (("item", 0), ("iteration", 1)):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            return _error(400, f"{name} must be a whole number, at least {least}", path=f"$.{name}")
        where[name] = value
    try:
        answer = answer_from(body, "http")
        state = app.shell.load(run_id)
        if state is None:
            state = await asyncio.to_thread(_repo(app).get_state, run_id)
        message, value = answer_record(state, run_id, step_id, answer, limit=app.settings.max_message_bytes, **where)
    except AnswerRefused as refused:
        return _error(refused.status, str(refused), **refused.details)
    await app.control_topic.send(key=run_id.encode(), value=value)
    return 202, {
        "run_id": run_id,
        "step_id": step_id,
        "iteration": message.iteration,
        "item": message.item,
        "turn": message.turn,
        "answer_id": answer.answer_id,
        "status_url": f"/runs/{run_id}/",
    }


async def put_agent(app: ExecutorApp, name: str, body: Any) -> Answer:
    """``PUT /agents/{name}``: validate an entry and store it (201 when new)."""
    if not isinstance(body, dict):
        return _error(400, "expected an agent entry as a JSON object")
    if body.get("name", name) != name:
        return _error(400, f"the body's name {body.get('name')!r} differs from the URL's {name!r}", path="$.name")
    try:
        entry = AgentEntry.model_validate({**body, "name": name})
    except ValidationError as error:
        return _error(400, "invalid agent entry", problems=_problems(error.errors(include_url=False)))
    try:
        created = await asyncio.to_thread(_store(app).put, entry)
    except RegistrySecretError as error:  # a literal secret and no SWITCHYARD_SECRETS_KEY
        return _error(400, str(error), path="$.auth.secret")
    return (201 if created else 200), entry.redacted()


async def health(app: ExecutorApp) -> Answer:
    """``GET /health/``: the worker's counters, with 503 until it is ready.

    Ready means it owns its partitions and has recovered them, so that a
    readiness probe does not pass too early.
    """
    checkpointer = app.checkpointer
    actives = app.assignor.assigned_actives()
    return (200 if app.ready else 503), {
        "app": app.conf.id,
        "ready": app.ready,
        "runs_applied": app.shell.applied,
        "events_ignored": app.shell.ignored,
        "timers": len(app.timers),
        "checkpoint_backlog": checkpointer.backlog,
        "checkpoints_written": checkpointer.written,
        "checkpoint_error": checkpointer.last_error,
        "assigned_partitions": len(actives),
        "run_partitions": sorted(tp.partition for tp in actives if tp.topic == topics.PLANS),
    }


async def list_runs(app: ExecutorApp, query: Mapping[str, str]) -> Answer:
    """``GET /runs/?status=&workflow_id=&limit=&offset=``: recent runs, as PostgreSQL has them.

    Raises:
        http_guard.Problem: 400, from :func:`list_query`.
    """
    records = await asyncio.to_thread(_repo(app).list_runs, **list_query(query))
    return 200, {"runs": [_summary(r) for r in records]}


async def show_run(app: ExecutorApp, run_id: str) -> Answer:
    """``GET /runs/{run_id}/`` on the worker that owns the run: its live state, else its record, else 404.

    The view checks the run id and routes the request to the owner first (:class:`RunView`).
    """
    state = app.shell.load(run_id)  # None also for a state it cannot read: the record is shown
    if state is not None:
        return 200, state_view(state)
    record = await asyncio.to_thread(_repo(app).get_run, run_id)
    if record is None:
        return _error(404, f"no run {run_id!r}")
    return 200, record_view(record)


async def list_agents(app: ExecutorApp) -> Answer:
    """``GET /agents/``: every registered agent, secrets redacted."""
    entries = await asyncio.to_thread(_store(app).list)
    return 200, {"agents": [e.redacted() for e in entries]}


async def show_agent(app: ExecutorApp, name: str) -> Answer:
    """``GET /agents/{name}``: one agent's entry, secrets redacted; 404 if it is not registered."""
    entry = await asyncio.to_thread(_store(app).get, name)
    if entry is None:
        return _no_agent(name)
    return 200, entry.redacted()


async def delete_agent(app: ExecutorApp, name: str) -> Answer:
    """``DELETE /agents/{name}``: remove an agent from the registry; 404 if it is not registered."""
    existed = await asyncio.to_thread(_store(app).delete, name)
    if not existed:
        return _no_agent(name)
    return 200, {"deleted": name}


def _no_agent(name: str) -> Answer:
    return _error(404, f"no agent {name!r} in the registry")


# ------------------------------------------------------------------- views


class ExecutorView(web.View):
    """A page of the executor's API: each handler answers what one of the functions above returns."""

    app: ExecutorApp  # set by faust's View.__init__: the app the page was added to

    def answer(self, result: Answer) -> web.Response:
        """The JSON response of an :data:`Answer`."""
        status, body = result
        return self.json(body, status=status)

    async def body(self, request: web.Request) -> Any:
        """The request's JSON body, as :mod:`switchyard.http_guard` checked it."""
        return await http_guard.json_body(request, self.app.settings.max_message_bytes)


class HealthView(ExecutorView):
    """``/health/``."""

    async def get(self, request: web.Request) -> web.Response:
        """See :func:`health`."""
        return self.answer(await health(self.app))


class RunsView(ExecutorView):
    """``/runs/``."""

    async def get(self, request: web.Request) -> web.Response:
        """See :func:`list_runs`."""
        return self.answer(await list_runs(self.app, request.query))

    async def post(self, request: web.Request) -> web.Response:
        """See :func:`submit_run`."""
        return self.answer(await submit_run(self.app, await self.body(request)))


class RunView(ExecutorView):
    """``/runs/{run_id}/``: answered by the worker that owns the run (``table_route``)."""

    def __post_init__(self) -> None:
        """Route to the run's owner: ``table_route`` needs the app's table, so it wraps the handler here."""
        # Faust makes one instance per app, when the page is added: the table is this app's.
        route = self.app.table_route(table=self.app.runs, match_info="run_id")
        # table_route types the handler as (view, request) only; it passes the run_id on.
        self._owned: _RunHandler = route(_owned_run)  # type: ignore[arg-type]

    async def get(self, request: web.Request, run_id: str) -> web.Response:
        """See :func:`show_run`; a run id that cannot be a run's is 404 at once, an owner that does not answer 503."""
        if not valid_run_id(run_id):
            return self.answer(_error(404, f"no run {run_id!r}"))  # without asking PostgreSQL or another worker
        try:
            return await self._owned(self, request, run_id=run_id)
        except aiohttp.ClientError:
            return self.answer(_error(503, f"the worker that owns run {run_id!r} did not answer; try again"))


_RunHandler = Callable[..., Awaitable[web.Response]]


async def _owned_run(view: RunView, request: web.Request, run_id: str) -> web.Response:
    """``GET /runs/{run_id}/`` on the worker that owns the run."""
    return view.answer(await show_run(view.app, run_id))


class RunActionView(ExecutorView):
    """``/runs/{run_id}/{action}``."""

    async def post(self, request: web.Request, run_id: str, action: str) -> web.Response:
        """See :func:`run_command`."""
        return self.answer(await run_command(self.app, run_id, action))


FORWARDED_HEADER = "X-Switchyard-Forwarded"
"""Marks a request one worker forwarded to the run's owner, which answers it itself."""


class StepInputView(ExecutorView):
    """``/runs/{run_id}/steps/{step_id}/input``: answered by the worker that owns the run.

    Faust's ``table_route`` forwards neither a request's body nor its
    answer's headers, so this view forwards the answer itself: to the
    owner's web server, once (the owner does not forward again).
    """

    async def post(self, request: web.Request, run_id: str, step_id: str) -> web.Response:
        """See :func:`give_input`."""
        body = await self.body(request)
        if valid_run_id(run_id) and body is not http_guard.NO_BODY and FORWARDED_HEADER not in request.headers:
            owner = _owner(self.app, run_id)
            if owner is not None:
                try:
                    status, text, content_type = await _forward(self.app, request, owner, body)
                    return self.text(text, content_type=content_type, status=status)
                except aiohttp.ClientError:
                    return self.answer(_error(503, f"the worker that owns run {run_id!r} did not answer; try again"))
        return self.answer(await give_input(self.app, run_id, step_id, body))


def _owner(app: ExecutorApp, run_id: str) -> Any:
    """The web address of the worker that owns the run, when it is another worker (None: this one, or unknown)."""
    try:
        owner = app.router.key_store(app.runs.name, run_id)
    except KeyError:
        return None
    mine = app.conf.canonical_url
    return None if (owner.host, owner.port) == (mine.host, mine.port) else owner


async def _forward(app: ExecutorApp, request: web.Request, owner: Any, body: Any) -> tuple[int, str, str]:
    """Send the request on to the run's owner; its status, body and content type."""
    headers = {"Content-Type": "application/json", FORWARDED_HEADER: "1"}
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    url = request.url.with_host(owner.host).with_port(int(owner.port))
    async with app.http_client.post(url, data=json.dumps(body), headers=headers) as response:
        return response.status, await response.text(), response.content_type


class AgentsView(ExecutorView):
    """``/agents/``."""

    async def get(self, request: web.Request) -> web.Response:
        """See :func:`list_agents`."""
        return self.answer(await list_agents(self.app))


class AgentView(ExecutorView):
    """``/agents/{name}``."""

    async def get(self, request: web.Request, name: str) -> web.Response:
        """See :func:`show_agent`."""
        return self.answer(await show_agent(self.app, name))

    async def put(self, request: web.Request, name: str) -> web.Response:
        """See :func:`put_agent`."""
        return self.answer(await put_agent(self.app, name, await self.body(request)))

    async def delete(self, request: web.Request, name: str) -> web.Response:
        """See :func:`delete_agent`."""
        return self.answer(await delete_agent(self.app, name))


PAGES: tuple[tuple[str, type[ExecutorView]], ...] = (
    ("/health/", HealthView),
    ("/runs/", RunsView),
    ("/runs/{run_id}/", RunView),
    ("/runs/{run_id}/{action}", RunActionView),
    ("/runs/{run_id}/steps/{step_id}/input", StepInputView),
    ("/agents/", AgentsView),
    ("/agents/{name}", AgentView),
)
"""Each page's path and view."""


def register(app: ExecutorApp) -> None:
    """Add the pages to the executor app, behind :mod:`switchyard.http_guard`."""
    http_guard.install(app, app.settings)
    for path, view in PAGES:
        app.page(path)(view)


def _problems(errors: Iterable[Any]) -> list[dict[str, str]]:
    return [{"path": "$." + ".".join(str(p) for p in e["loc"]), "reason": e["msg"]} for e in errors]
