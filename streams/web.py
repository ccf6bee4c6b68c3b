"""The executor's HTTP API, on Faust's web server (127.0.0.1 by default).

* ``POST /runs/`` ``{plan, input, run_id?}``: validate and submit, 202 ``{run_id}``.
* ``GET /runs/?status=&workflow_id=&limit=&offset=``: recent runs (from PostgreSQL).
* ``GET /runs/{run_id}/``: one run with every step and attempt; answered by
  the worker that owns the run (``table_route``), from its live state, or from
  PostgreSQL when the run is not in the table.
* ``GET /agents/``, ``GET/PUT/DELETE /agents/{name}``: the built-in registry.
* ``GET /health/``: answers once the worker has recovered its tables, with counters.

Mutating endpoints need ``Authorization: Bearer <SWITCHYARD_API_TOKEN>`` when
a token is configured. Errors are JSON ``{"error": ..., ...}`` with a 4xx
status, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from faust import web
from pydantic import ValidationError

from models.agents import AgentEntry
from models.messages import RUN_ID_PATTERN, ControlCommand, ControlMessage, WorkflowSubmission, encode, new_run_id
from models.plan import PlanValidationError, load_plan
from models.run import RunState, RunStatus
from switchyard import topics
from switchyard.db import RunRecord, WorkflowRepository
from switchyard.registry import RegistryStore

if TYPE_CHECKING:
    from streams.app import ExecutorApp

__all__ = ["USER_COMMANDS", "record_view", "refuse_command", "register", "state_view"]

USER_COMMANDS = (ControlCommand.CANCEL, ControlCommand.RETRY, ControlCommand.RESUME)


def refuse_command(command: ControlCommand, status: str | None, run_id: str) -> str | None:
    """Why a user's command cannot apply to a run with this recorded status, or None if it can."""
    if status is None:
        return f"no run {run_id!r}"
    if command is ControlCommand.CANCEL and RunStatus(status).finished:
        return f"run {run_id!r} is already {status}"
    if command is ControlCommand.RETRY and status != RunStatus.FAILED:
        return f"run {run_id!r} is {status}; only a FAILED run can be retried"
    if command is ControlCommand.RESUME and status != RunStatus.RUNNING:
        return f"run {run_id!r} is {status}; only a RUNNING run can be resumed"
    return None


_RUN_ID = re.compile(RUN_ID_PATTERN)


def state_view(state: RunState) -> dict[str, Any]:
    """A run's live state as the API shows it."""
    data = state.model_dump(mode="json")
    steps = []
    for step_id in state.plan.order():
        step = data["steps"].get(step_id)
        if step is None:
            continue
        steps.append(
            {
                "step_id": step_id,
                "agent_name": step["agent_name"],
                "status": step["status"],
                "output": step["output"],
                "error": step["error"],
                "started_at": step["started_at"],
                "completed_at": step["completed_at"],
                "next_attempt_at": step["next_attempt_at"],
                "attempts": [
                    {
                        "attempt": a["number"],
                        "correlation_id": a["correlation_id"],
                        "agent_name": a["agent_name"],
                        "status": a["status"],
                        "input": a["input"],
                        "output": a["output"],
                        "error": a["error"],
                        "started_at": a["dispatch_at"],
                        "deadline": a["deadline"],
                        "completed_at": a["finished_at"],
                    }
                    for a in step["attempts"]
                ],
            }
        )
    return {
        "run_id": state.run_id,
        "status": data["status"],
        "workflow_id": state.plan.workflow_id,
        "workflow_version": state.plan.version,
        "input": data["input"],
        "output": data["output"],
        "error": data["error"],
        "created_at": data["created_at"],
        "started_at": data["started_at"],
        "completed_at": data["completed_at"],
        "updated_at": data["updated_at"],
        "version": state.version,
        "steps": steps,
        "source": "live",
    }


def record_view(record: RunRecord) -> dict[str, Any]:
    """A run from PostgreSQL, in the same shape as :func:`state_view`.

    From the run's last snapshot when it has one; otherwise (a submission
    rejected before it ran) from the rows.
    """
    if record.state is not None:
        return {**state_view(RunState.model_validate(record.state)), "source": "record"}
    return _rows_view(record)


def _rows_view(record: RunRecord) -> dict[str, Any]:
    data = record.model_dump(mode="json")
    by_step: dict[str, list[dict[str, Any]]] = {}
    for attempt in data["steps"]:
        by_step.setdefault(attempt["step_id"], []).append(attempt)
    steps = []
    for step_id, attempts in by_step.items():
        last = attempts[-1]
        steps.append(
            {
                "step_id": step_id,
                "agent_name": last["agent_name"],
                "status": last["status"],
                "output": last["output_data"],
                "error": last["error"],
                "started_at": attempts[0]["started_at"],
                "completed_at": last["completed_at"],
                "next_attempt_at": None,
                "attempts": [
                    {
                        "attempt": a["attempt"],
                        "correlation_id": a["correlation_id"],
                        "agent_name": a["agent_name"],
                        "status": a["status"],
                        "input": a["input_data"],
                        "output": a["output_data"],
                        "error": a["error"],
                        "started_at": a["started_at"],
                        "deadline": a["deadline"],
                        "completed_at": a["completed_at"],
                    }
                    for a in attempts
                ],
            }
        )
    return {
        "run_id": record.run_id,
        "status": record.status,
        "workflow_id": record.workflow_id,
        "workflow_version": record.workflow_version,
        "input": data["input"],
        "output": data["output"],
        "error": data["error"],
        "created_at": data["created_at"],
        "started_at": data["started_at"],
        "completed_at": data["completed_at"],
        "updated_at": data["updated_at"],
        "version": record.version,
        "steps": steps,
        "source": "record",
    }


def _summary(record: RunRecord) -> dict[str, Any]:
    data = record.model_dump(mode="json", exclude={"steps", "plan", "input"})
    return data


def register(app: ExecutorApp) -> None:
    """Add the views to the executor app."""
    settings = app.settings
    token = settings.api_token.get_secret_value() if settings.api_token else None

    def problem(view: web.View, status: int, error: str, **extra: Any) -> web.Response:
        return view.json({"error": error, **extra}, status=status)

    def forbidden(view: web.View, request: web.Request) -> web.Response | None:
        if token is None:
            return None
        given = request.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode()):
            return None
        return problem(view, 401, "this endpoint needs 'Authorization: Bearer <token>' (SWITCHYARD_API_TOKEN)")

    async def body_of(request: web.Request) -> Any:
        raw = await request.read()
        if len(raw) > settings.max_message_bytes:
            raise _BadRequest(f"body of {len(raw)} bytes is over the limit of {settings.max_message_bytes}")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as error:
            raise _BadRequest(f"body is not valid JSON: {error}") from None

    def repo() -> WorkflowRepository:
        return WorkflowRepository(app.database.engine)

    def store() -> RegistryStore:
        return RegistryStore(app.database.engine)

    @app.page("/health/")
    class Health(web.View):
        async def get(self, request: web.Request) -> web.Response:
            checkpointer = app.checkpointer
            # 503 until the worker owns its partitions and has recovered them,
            # so that a readiness probe does not pass too early.
            return self.json(
                {
                    "app": app.conf.id,
                    "ready": app.ready,
                    "runs_applied": app.shell.applied,
                    "events_ignored": app.shell.ignored,
                    "timers": len(app.timers),
                    "checkpoint_backlog": checkpointer.backlog,
                    "checkpoints_written": checkpointer.written,
                    "checkpoint_error": checkpointer.last_error,
                    "assigned_partitions": len(app.assignor.assigned_actives()),
                    "run_partitions": sorted(
                        tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topics.PLANS
                    ),
                },
                status=200 if app.ready else 503,
            )

    @app.page("/runs/")
    class Runs(web.View):
        async def get(self, request: web.Request) -> web.Response:
            query = request.query
            statuses: list[RunStatus] | None = None
            if query.get("status"):
                try:
                    statuses = [RunStatus(s.strip().upper()) for s in query["status"].split(",")]
                except ValueError:
                    allowed = ", ".join(s.value for s in RunStatus)
                    return problem(self, 400, f"unknown status {query['status']!r}; use one of {allowed}")
            try:
                limit = int(query.get("limit", "50"))
                offset = int(query.get("offset", "0"))
            except ValueError:
                return problem(self, 400, "limit and offset must be integers")
            records = await asyncio.to_thread(
                repo().list_runs,
                status=statuses,
                workflow_id=query.get("workflow_id") or None,
                limit=limit,
                offset=offset,
            )
            return self.json({"runs": [_summary(r) for r in records]})

        async def post(self, request: web.Request) -> web.Response:
            denied = forbidden(self, request)
            if denied is not None:
                return denied
            try:
                body = await body_of(request)
            except _BadRequest as error:
                return problem(self, 400, str(error))
            if not isinstance(body, dict) or "plan" not in body:
                return problem(self, 400, 'expected a JSON object {"plan": {...}, "input": {...}}')
            unknown = sorted(set(body) - {"plan", "input", "run_id"})
            if unknown:
                return problem(self, 400, f"unknown field(s): {', '.join(unknown)}")
            try:
                plan = load_plan(body["plan"])
            except PlanValidationError as error:
                return problem(self, 400, "invalid workflow plan", problems=[p.to_dict() for p in error.problems])
            run_input = body.get("input", {})
            if not isinstance(run_input, dict):
                return problem(self, 400, "input must be a JSON object")
            run_id = body.get("run_id") or new_run_id()
            if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
                return problem(self, 400, "run_id: letters, digits, '.', '_', ':' and '-', at most 128")
            submission = WorkflowSubmission(run_id=run_id, plan=plan, input=run_input)
            await app.plans_topic.send(key=run_id.encode(), value=encode(submission))
            return self.json({"run_id": run_id, "status_url": f"/runs/{run_id}/"}, status=202)

    @app.page("/runs/{run_id}/")
    class Run(web.View):
        @app.table_route(table=app.runs, match_info="run_id")  # type: ignore[arg-type]
        async def get(self, request: web.Request, run_id: str) -> web.Response:
            state = app.shell.load(run_id)
            if state is not None:
                return self.json(state_view(state))
            record = await asyncio.to_thread(repo().get_run, run_id)
            if record is None:
                return problem(self, 404, f"no run {run_id!r}")
            return self.json(record_view(record))

    @app.page("/runs/{run_id}/{action}")
    class RunAction(web.View):
        async def post(self, request: web.Request, run_id: str, action: str) -> web.Response:
            denied = forbidden(self, request)
            if denied is not None:
                return denied
            try:
                command = ControlCommand(action.strip("/"))
            except ValueError:
                return problem(self, 404, f"no action {action!r}; use cancel, retry or resume")
            if command not in USER_COMMANDS:
                return problem(self, 404, f"no action {action!r}; use cancel, retry or resume")
            status = await asyncio.to_thread(repo().exists, run_id)
            refusal = refuse_command(command, status, run_id)
            if refusal is not None:
                return problem(self, 404 if status is None else 409, refusal)
            message = ControlMessage(run_id=run_id, command=command, reason=f"{command} requested over HTTP")
            await app.control_topic.send(key=run_id.encode(), value=encode(message))
            return self.json({"run_id": run_id, "requested": str(command)}, status=202)

    @app.page("/agents/")
    class Agents(web.View):
        async def get(self, request: web.Request) -> web.Response:
            entries = await asyncio.to_thread(store().list)
            return self.json({"agents": [e.redacted() for e in entries]})

    @app.page("/agents/{name}")
    class Agent(web.View):
        async def get(self, request: web.Request, name: str) -> web.Response:
            entry = await asyncio.to_thread(store().get, name)
            if entry is None:
                return problem(self, 404, f"no agent {name!r} in the registry")
            return self.json(entry.redacted())

        async def put(self, request: web.Request, name: str) -> web.Response:
            denied = forbidden(self, request)
            if denied is not None:
                return denied
            try:
                body = await body_of(request)
            except _BadRequest as error:
                return problem(self, 400, str(error))
            if not isinstance(body, dict):
                return problem(self, 400, "expected an agent entry as a JSON object")
            if body.get("name", name) != name:
                return problem(self, 400, f"the body's name {body.get('name')!r} differs from the URL's {name!r}")
            try:
                entry = AgentEntry.model_validate({**body, "name": name})
            except ValidationError as error:
                return problem(self, 400, "invalid agent entry", problems=_problems(error.errors(include_url=False)))
            created = await asyncio.to_thread(store().put, entry)
            return self.json(entry.redacted(), status=201 if created else 200)

        async def delete(self, request: web.Request, name: str) -> web.Response:
            denied = forbidden(self, request)
            if denied is not None:
                return denied
            existed = await asyncio.to_thread(store().delete, name)
            if not existed:
                return problem(self, 404, f"no agent {name!r} in the registry")
            return self.json({"deleted": name})


class _BadRequest(ValueError):
    pass


def _problems(errors: Iterable[Any]) -> list[dict[str, str]]:
    return [{"path": "$." + ".".join(str(p) for p in e["loc"]), "reason": e["msg"]} for e in errors]
