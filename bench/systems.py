"""The systems the throughput bench compares, behind one interface: Switchyard, a direct baseline, DBOS.

Each runs the chain of :mod:`bench.workload` on the same echo agents and the
same PostgreSQL server, each on a database of its own:

* :class:`SwitchyardSystem`: the executor and bridge workers of the stack, as
  a user runs them; the bench produces :class:`~models.messages.WorkflowSubmission`
  onto the plans topic and sees each run end on the monitoring topic.
* :class:`DirectSystem`: what one would write without a workflow engine:
  plain asyncio, aiohttp sending the bridge's own A2A request, asyncpg
  writing a run row (autocommit), a step row after each call and the run's
  end, in the bench's process.
* :class:`DbosSystem`: DBOS 3.4 in the bench's process: an async
  ``@DBOS.workflow`` calling one ``@DBOS.step`` per agent call.

The interface (:class:`System`) is async; the bench drives it from one event
loop. Waits that poll PostgreSQL block that loop on purpose: nothing else is
measured meanwhile, and a Ctrl-C or SIGTERM stops them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import aiohttp
from aiokafka import AIOKafkaConsumer
from sqlalchemy import Engine, create_engine, make_url, text

from agents_bridge.a2a import Completed, parse_response, request_headers, send_message_request
from bench.harness import logs_tail, start_producer, wait_progress, wait_serving
from bench.workload import RunRow, StepRow, Workload, chain_plan, step_gap_figures, step_id, step_input
from models.messages import AgentTask, WorkflowSubmission, correlation_id, encode, utcnow
from models.plan import WorkflowPlan
from switchyard import topics
from switchyard.embedded import EmbeddedPostgres
from switchyard.stack import Stack

__all__ = [
    "DBOS_EXTRA_HINT",
    "DbosSystem",
    "DirectSystem",
    "RunFailed",
    "SwitchyardSystem",
    "System",
    "call_agent",
    "dbos_available",
    "destroy_dbos",
    "http_session",
]

DBOS_EXTRA_HINT: Final = (
    "--with-dbos needs DBOS 3.4: pip install -e '.[bench]' && pip install --no-deps dbos==3.4.0 "
    "(--no-deps: dbos 3.4 asks for croniter>=6.2.4, which faust-streaming's mode-streaming refuses)"
)
STEP_TIMEOUT: Final = timedelta(seconds=300)
"""The deadline the direct and DBOS calls announce: Switchyard's default step timeout."""
_TERMINAL: Final = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
_LOOKUP_CONCURRENCY: Final = 16


class RunFailed(Exception):
    """A run did not complete; the message says how it ended."""


def dbos_available() -> bool:
    """Whether DBOS can be imported here."""
    try:
        import dbos  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ the interface


class System:
    """What the bench needs of a system; the defaults suit one that lives in the bench's process.

    Attributes:
        key: Short name, in run ids and the JSON (``direct``, ``dbos``, ``switchyard``).
        label: Name in the tables.
        own_groups: The CPU groups (:data:`bench.harness.CPU_GROUPS`) that are the system itself.
    """

    key = "system"
    label = "system"
    own_groups: tuple[str, ...] = ("bench",)

    def __init__(self, stack: Stack, agents: Mapping[str, str]) -> None:
        self.stack = stack
        self.agents = dict(agents)

    @property
    def postgres(self) -> EmbeddedPostgres:
        """The stack's PostgreSQL server."""
        assert self.stack.postgres is not None, "the stack's services have not started"
        return self.stack.postgres

    async def start(self) -> float:
        """Bring the system up, idle; returns how long that took."""
        return 0.0

    async def connect(self) -> None:
        """After the rest measurement: what the bench needs to submit and to see runs end."""

    async def prepare(self, run_ids: Sequence[str], workload: Workload) -> None:
        """Before a measured batch: whatever can be made ahead of the clock."""

    async def run(self, run_id: str, workload: Workload) -> float:
        """Run one chain to its end; returns its latency in seconds.

        Raises:
            RunFailed: It did not complete.
        """
        raise NotImplementedError

    async def settle(self, run_ids: Sequence[str], workload: Workload) -> None:
        """Wait until the records of these runs are all written (bounded)."""

    async def records(self, run_ids: Sequence[str]) -> tuple[list[RunRow], list[StepRow]]:
        """The system's own records of these runs and of their steps."""
        raise NotImplementedError

    async def totals(self) -> tuple[int, int]:
        """How many runs and step executions the system has recorded in all."""
        raise NotImplementedError

    async def step_gaps(self, run_ids: Sequence[str], steps: int) -> dict[str, float | None]:
        """The median time from a step's start to the next's, over the first and the last five steps (ms).

        Empty when the system does not record when each step started.
        """
        return {}

    def trouble(self) -> str | None:
        """Why the system cannot make progress (a process of the stack died), or None."""
        dead = self.stack.dead()
        if not dead:
            return None
        first = dead[0]
        return f"{first.name} {first.exit_reason()}\n{first.log_tail(20)}"

    def diagnostics(self) -> str:
        """What to show when a workload stalls."""
        return logs_tail(self.stack, *(name for name in self.stack.processes if name.startswith("agent")))

    async def stop(self) -> None:
        """Release what :meth:`start` and :meth:`connect` took (the stack's processes are stopped by the bench)."""


# ------------------------------------------------------------------ one A2A call, as the bridge makes it


async def call_agent(session: aiohttp.ClientSession, url: str, run_id: str, k: int, data: Any) -> dict[str, Any]:
    """Step ``k`` of a run: the bridge's ``SendMessage`` request (A2A 1.0, same body and headers), its output.

    Raises:
        RunFailed: The agent did not answer 200 with a completed task.
    """
    task = AgentTask(
        correlation_id=correlation_id(run_id, step_id(k), 1),
        run_id=run_id,
        step_id=step_id(k),
        attempt=1,
        agent_name="echo",
        input=data,
        deadline=utcnow() + STEP_TIMEOUT,
    )
    request_id = f"{task.correlation_id}#1"
    body = json.dumps(send_message_request(task, "1.0", request_id=request_id)).encode()
    async with session.post(url, data=body, headers=request_headers("1.0"), allow_redirects=False) as response:
        payload = await response.read()
        if response.status != 200:
            raise RunFailed(f"{task.correlation_id}: HTTP {response.status}")
    outcome = parse_response(payload, "1.0", request_id=request_id)
    if not isinstance(outcome, Completed):
        raise RunFailed(f"{task.correlation_id}: {outcome}")
    return dict(outcome.output)


def http_session() -> aiohttp.ClientSession:
    """The baselines' HTTP session: no cap on connections, so "all at once" is all at once."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


def _create_database(postgres: EmbeddedPostgres, name: str) -> str:
    """A fresh database on the stack's server; returns its SQLAlchemy URL."""
    admin = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return postgres.url_for(name)


def _json(value: Any) -> Any:
    """A JSON column as asyncpg hands it (text), decoded."""
    return json.loads(value) if isinstance(value, str) else value


class BaselineSystem(System):
    """A system in the bench's process: a database of its own on the stack's server, one HTTP session.

    Attributes:
        database: The name of its database.
    """

    database = "bench_baseline"

    def __init__(self, stack: Stack, agents: Mapping[str, str]) -> None:
        super().__init__(stack, agents)
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> tuple[str, aiohttp.ClientSession]:
        """Create its database (afresh) and open its HTTP session; returns the database's URL and the session."""
        url = _create_database(self.postgres, self.database)
        self._session = http_session()
        return url, self._session

    @property
    def session(self) -> aiohttp.ClientSession:
        """Its HTTP session."""
        assert self._session is not None, "not started"
        return self._session

    async def stop(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


# ------------------------------------------------------------------ direct


_DIRECT_SCHEMA: Final = """
create table runs (
    run_id text primary key,
    status text not null,
    input jsonb not null,
    output jsonb,
    started_at timestamptz not null default now(),
    completed_at timestamptz
);
create table steps (
    id bigserial primary key,
    run_id text not null references runs (run_id),
    step_id text not null,
    attempt integer not null,
    status text not null,
    input jsonb,
    output jsonb,
    completed_at timestamptz not null default now(),
    unique (run_id, step_id, attempt)
);
"""


class DirectSystem(BaselineSystem):
    """Plain asyncio: aiohttp to the agent, asyncpg (autocommit) to a database of its own."""

    key = "direct"
    label = "direct"
    database = "bench_direct"

    def __init__(self, stack: Stack, agents: Mapping[str, str]) -> None:
        super().__init__(stack, agents)
        self._pool: Any = None

    async def start(self) -> float:
        """Create its database and tables, open the connection pool (asyncpg's defaults) and the HTTP session."""
        import asyncpg  # the bench extra; the test extra has it too

        started = time.monotonic()
        database, _ = self.open()
        url = make_url(database)
        self._pool = await asyncpg.create_pool(
            host=url.query.get("host") or url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password or None,
            database=url.database,
        )
        await self._pool.execute(_DIRECT_SCHEMA)
        return time.monotonic() - started

    async def run(self, run_id: str, workload: Workload) -> float:
        """Insert the run, call each step and insert its row, update the run: the latency of all that."""
        pool, session, url = self._pool, self.session, self.agents[workload.agent]
        assert pool is not None, "not started"
        started = time.perf_counter()
        await pool.execute(
            "insert into runs (run_id, status, input) values ($1, 'RUNNING', $2::jsonb)",
            run_id,
            json.dumps({"text": run_id}),
        )
        text_so_far = run_id
        try:
            for k in range(1, workload.steps + 1):
                data = step_input(text_so_far, k)
                output = await call_agent(session, url, run_id, k, data)
                await pool.execute(
                    "insert into steps (run_id, step_id, attempt, status, input, output)"
                    " values ($1, $2, 1, 'COMPLETED', $3::jsonb, $4::jsonb)",
                    run_id,
                    step_id(k),
                    json.dumps(data),
                    json.dumps(output),
                )
                text_so_far = str(output.get("text"))
        except (RunFailed, aiohttp.ClientError) as error:
            await pool.execute("update runs set status = 'FAILED', completed_at = now() where run_id = $1", run_id)
            raise RunFailed(str(error)) from error
        await pool.execute(
            "update runs set status = 'COMPLETED', output = $2::jsonb, completed_at = now() where run_id = $1",
            run_id,
            json.dumps(output),
        )
        return time.perf_counter() - started

    async def records(self, run_ids: Sequence[str]) -> tuple[list[RunRow], list[StepRow]]:
        """Its ``runs`` and ``steps`` rows."""
        ids = list(run_ids)
        runs = await self._pool.fetch("select run_id, status, output from runs where run_id = any($1)", ids)
        steps = await self._pool.fetch("select run_id, step_id, status, output from steps where run_id = any($1)", ids)
        return (
            [RunRow(r["run_id"], r["status"], _json(r["output"])) for r in runs],
            [StepRow(s["run_id"], s["step_id"], s["status"], _json(s["output"])) for s in steps],
        )

    async def totals(self) -> tuple[int, int]:
        """Rows in ``runs`` and ``steps``."""
        runs = await self._pool.fetchval("select count(*) from runs")
        steps = await self._pool.fetchval("select count(*) from steps")
        return int(runs), int(steps)

    async def stop(self) -> None:
        """Close the HTTP session and the pool."""
        await super().stop()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.wait_for(pool.close(), 10)


# ------------------------------------------------------------------ DBOS


def _define_dbos_chain(dbos: Any, call: Callable[[str, str, int, Any], Awaitable[dict[str, Any]]]) -> Any:
    """Register the chain with DBOS: an async workflow calling one step per agent call.

    Registered by calling DBOS's decorators rather than with ``@``: DBOS is
    optional, and an absent one would make decorated functions untyped.
    """

    async def call_step(url: str, run_id: str, k: int, data: dict[str, Any]) -> dict[str, Any]:
        return await call(url, run_id, k, data)

    step = dbos.step(name="call_agent")(call_step)

    async def echo_chain(run_id: str, steps: int, url: str) -> dict[str, Any]:
        text_so_far = run_id
        output: dict[str, Any] = {}
        for k in range(1, steps + 1):
            output = await step(url, run_id, k, step_input(text_so_far, k))
            text_so_far = str(output.get("text"))
        return output

    return dbos.workflow(name="echo_chain")(echo_chain)


class DbosSystem(BaselineSystem):
    """DBOS 3.4 in the bench's process, its system database on the stack's PostgreSQL server."""

    key = "dbos"
    label = "DBOS 3.4"
    database = "bench_dbos"

    def __init__(self, stack: Stack, agents: Mapping[str, str]) -> None:
        super().__init__(stack, agents)
        self._workflow: Any = None
        self._engine: Engine | None = None
        self._dbos: Any = None

    async def start(self) -> float:
        """Create its database, then configure and launch DBOS (it creates its tables there)."""
        from dbos import DBOS

        started = time.monotonic()
        url, session = self.open()
        self._engine = create_engine(url)

        async def call(agent_url: str, run_id: str, k: int, data: Any) -> dict[str, Any]:
            return await call_agent(session, agent_url, run_id, k, data)

        self._workflow = _define_dbos_chain(DBOS, call)
        DBOS(config={"name": "switchyard-bench", "system_database_url": url, "log_level": "WARNING"})
        self._dbos = DBOS
        DBOS.launch()
        return time.monotonic() - started

    async def run(self, run_id: str, workload: Workload) -> float:
        """Run the workflow under the run's id and wait for its result."""
        from dbos import SetWorkflowID

        started = time.perf_counter()
        try:
            with SetWorkflowID(run_id):
                await self._workflow(run_id, workload.steps, self.agents[workload.agent])
        except Exception as error:
            raise RunFailed(f"{run_id}: {error!r}") from error
        return time.perf_counter() - started

    async def records(self, run_ids: Sequence[str]) -> tuple[list[RunRow], list[StepRow]]:
        """DBOS's own view of its workflows and their steps (through its API: it pickles outputs)."""
        dbos = self._dbos
        statuses = await dbos.list_workflows_async(workflow_ids=list(run_ids), load_input=False)
        runs = [RunRow(s.workflow_id, str(s.status), s.output) for s in statuses]
        limit = asyncio.Semaphore(_LOOKUP_CONCURRENCY)

        async def steps_of(run_id: str) -> list[StepRow]:
            async with limit:
                infos = await dbos.list_workflow_steps_async(run_id)
            return [
                StepRow(run_id, step_id(int(i["function_id"])), "ERROR" if i["error"] else "SUCCESS", i["output"])
                for i in infos
            ]

        found = await asyncio.gather(*(steps_of(r) for r in run_ids))
        return runs, [row for rows in found for row in rows]

    async def totals(self) -> tuple[int, int]:
        """Rows of its ``workflow_status`` and ``operation_outputs`` tables."""
        assert self._engine is not None, "not started"
        with self._engine.connect() as conn:
            runs = conn.execute(text("select count(*) from dbos.workflow_status")).scalar_one()
            steps = conn.execute(text("select count(*) from dbos.operation_outputs")).scalar_one()
        return int(runs), int(steps)

    async def stop(self) -> None:
        """Destroy DBOS (its threads and pool) and close the HTTP session."""
        destroy_dbos()
        await super().stop()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def destroy_dbos() -> None:
    """Shut DBOS down if it was launched in this process (also after a failure: its threads would keep it alive)."""
    if "dbos" not in sys.modules:
        return  # never imported, so never launched
    from dbos import DBOS

    DBOS.destroy(destroy_registry=True)


# ------------------------------------------------------------------ Switchyard


class SwitchyardSystem(System):
    """The executor and bridge workers, with the settings a user gets; runs go in and out through topics.

    Args:
        stack: The stack (broker, PostgreSQL and agents already started).
        agents: Agent URLs by registry name (registered already).
        engine: The bench's connection pool to Switchyard's database.
        timeout_s: Longest wait for the workers to serve, or for records to be written.
        stall_s: Give up a wait that makes no progress for this long.
    """

    key = "switchyard"
    label = "Switchyard"
    own_groups = ("executor", "bridge", "broker")

    def __init__(
        self, stack: Stack, agents: Mapping[str, str], engine: Engine, *, timeout_s: float, stall_s: float
    ) -> None:
        super().__init__(stack, agents)
        self.engine = engine
        self.timeout_s = timeout_s
        self.stall_s = stall_s
        self._producer: Any = None
        self._consumer: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[tuple[str, float]]] = {}
        self._encoded: dict[str, bytes] = {}
        self._plans: dict[tuple[int, str], WorkflowPlan] = {}

    async def start(self) -> float:
        """Start both workers and wait until they own every partition (blocking: nothing else runs yet)."""
        started = time.monotonic()
        self.stack.start_worker("streams.app")
        self.stack.start_worker("agents_bridge.app")
        wait_serving(self.stack, timeout_s=self.timeout_s, stall_s=self.stall_s)
        return time.monotonic() - started

    async def connect(self) -> None:
        """Start the producer, and a consumer of the monitoring topic from its end, listening."""
        settings = self.stack.settings
        self._producer = await start_producer(settings)
        # Its first send would otherwise wait for the topic's metadata: the bench's cost, not the stack's.
        await self._producer.partitions_for(topics.PLANS)
        consumer = AIOKafkaConsumer(
            topics.MONITORING,
            bootstrap_servers=settings.bootstrap_servers,
            group_id=None,
            auto_offset_reset="latest",
            # The workers' busy wait: the bench sees an end as soon as a worker would see a record.
            fetch_max_wait_ms=settings.embedded_fetch_wait_ms if settings.embedded_broker else 500,
        )
        await consumer.start()
        self._consumer = consumer
        await consumer.seek_to_end()
        for partition in consumer.assignment():
            await consumer.position(partition)  # resolved now, before anything is submitted
        self._listener = asyncio.create_task(self._listen(), name="monitoring listener")

    async def _listen(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=1000)
            seen = time.perf_counter()
            for records in batches.values():
                for record in records:
                    self._ended(record.value, seen)

    def _ended(self, raw: bytes, seen: float) -> None:
        """A monitoring update: the end of a run the bench waits for completes its future."""
        try:
            update = json.loads(raw)
        except ValueError:
            return
        if not isinstance(update, dict) or update.get("step_id") is not None or update.get("status") not in _TERMINAL:
            return  # a step's update, or the run's start
        future = self._waiting.get(str(update.get("run_id")))
        if future is not None and not future.done():
            future.set_result((str(update["status"]), seen))

    def plan(self, workload: Workload) -> WorkflowPlan:
        """The chain's plan for this workload's shape."""
        shape = (workload.steps, workload.agent)
        if shape not in self._plans:
            self._plans[shape] = chain_plan(f"bench-chain-{workload.steps}-{workload.agent}", *shape)
        return self._plans[shape]

    async def prepare(self, run_ids: Sequence[str], workload: Workload) -> None:
        """Encode the submissions ahead of the clock (the bench's work, not the system's)."""
        plan = self.plan(workload)
        for run_id in run_ids:
            submission = WorkflowSubmission(run_id=run_id, plan=plan, input={"text": run_id})
            self._encoded[run_id] = encode(submission)

    async def run(self, run_id: str, workload: Workload) -> float:
        """Produce the submission; the latency is until the run's end is seen on the monitoring topic."""
        if run_id not in self._encoded:
            await self.prepare([run_id], workload)
        value = self._encoded.pop(run_id)
        future: asyncio.Future[tuple[str, float]] = asyncio.get_running_loop().create_future()
        self._waiting[run_id] = future
        started = time.perf_counter()
        try:
            delivery = await self._producer.send(topics.PLANS, key=run_id.encode(), value=value)
            delivery.add_done_callback(lambda sent: _fail_if_not_sent(sent, future))
            status, seen = await future
        finally:
            self._waiting.pop(run_id, None)
        if status != "COMPLETED":
            raise RunFailed(f"{run_id} ended {status}")
        return seen - started

    async def settle(self, run_ids: Sequence[str], workload: Workload) -> None:
        """Wait until PostgreSQL has every run COMPLETED and every step: the checkpointer writes behind."""
        ids = list(run_ids)
        query = text(
            "select (select count(*) from workflow_runs where run_id = any(:ids) and status = 'COMPLETED')"
            " + (select count(*) from step_executions where run_id = any(:ids) and status = 'COMPLETED')"
        )

        def written() -> int:
            with self.engine.connect() as conn:
                return int(conn.execute(query, {"ids": ids}).scalar_one())

        goal = len(ids) * (1 + workload.steps)
        wait_progress(
            self.stack, "runs and steps in PostgreSQL", written, goal, timeout_s=self.timeout_s, stall_s=self.stall_s
        )

    async def step_gaps(self, run_ids: Sequence[str], steps: int) -> dict[str, float | None]:
        """From ``step_executions``: when each step's attempt was dispatched, which is when the step before ended."""
        if steps < 12:
            return {}
        ids = {"ids": list(run_ids)}
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("select run_id, step_id, started_at from step_executions where run_id = any(:ids)"), ids
            ).all()
        started: dict[str, dict[str, datetime]] = {}
        for run_id, step, at in rows:
            started.setdefault(str(run_id), {})[str(step)] = at
        return step_gap_figures(started, steps)

    async def records(self, run_ids: Sequence[str]) -> tuple[list[RunRow], list[StepRow]]:
        """Its ``workflow_runs`` and ``step_executions`` rows."""
        ids = {"ids": list(run_ids)}
        with self.engine.connect() as conn:
            runs = conn.execute(text("select run_id, status, output from workflow_runs where run_id = any(:ids)"), ids)
            run_rows = [RunRow(str(r), str(s), o) for r, s, o in runs]
            steps = conn.execute(
                text("select run_id, step_id, status, output_data from step_executions where run_id = any(:ids)"), ids
            )
            step_rows = [StepRow(str(r), str(i), str(s), o) for r, i, s, o in steps]
        return run_rows, step_rows

    async def totals(self) -> tuple[int, int]:
        """Rows in ``workflow_runs`` and ``step_executions``."""
        with self.engine.connect() as conn:
            runs = conn.execute(text("select count(*) from workflow_runs")).scalar_one()
            steps = conn.execute(text("select count(*) from step_executions")).scalar_one()
        return int(runs), int(steps)

    def diagnostics(self) -> str:
        """The workers' and agents' log tails."""
        return "\n".join([logs_tail(self.stack, "executor", "bridge"), super().diagnostics()])

    async def stop(self) -> None:
        """Stop listening and producing (the workers are stopped with the stack)."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):  # the broker may be gone already
                    await asyncio.wait_for(client.stop(), 15)
        self._consumer = self._producer = None


def _fail_if_not_sent(sent: asyncio.Future[Any], future: asyncio.Future[tuple[str, float]]) -> None:
    """A submission the broker did not take fails its run at once instead of waiting for a stall."""
    if sent.cancelled() or future.done():
        return
    error = sent.exception()
    if error is not None:
        future.set_exception(RunFailed(f"the submission was not sent: {error!r}"))
