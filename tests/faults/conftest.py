"""Fault injection on the real stack: kill -9, SIGSTOP, rebalances, lost topics, poison input.

Everything here runs real processes: the embedded broker, PostgreSQL, the
executor and bridge Faust workers and a2a-sdk example agents, on free loopback
ports, each tracked by PID and stopped by PID (:class:`switchyard.stack.Stack`).

* :class:`FaultStack` starts a stack with chosen agents and settings (short
  step deadlines, a small message size limit, an API token) and has the
  helpers the scenarios share: submit many runs with one producer, wait for
  them, kill / pause / restart workers, read topics from the beginning, and
  :meth:`FaultStack.verify_completed`, the common check of a scenario's end
  (every run COMPLETED, PostgreSQL and the live view agree, one success per
  step, each run finished once) with its figures: attempts recorded and agent
  invocations.
* ``faults`` is one stack shared by the tests that leave its shape as they
  found it (a worker killed is started again). Tests that change the shape
  (rebalances, a broker restart) or may break a worker for good (poison) run
  on a stack of their own: ``make_stack`` for one test,
  ``stack_places.stack(...)`` for a module's fixture. Every stack has its own
  database on the session's test PostgreSQL (``postgres_server``).
* ``SWITCHYARD_FAULTS_KEEP_LOGS=DIR`` keeps every stack's logs in ``DIR``
  (the stacks' folders are deleted at the end of the session).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import SecretStr
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session

from models.agents import AgentEntry, CallRetry
from models.messages import (
    AgentResult,
    DeadLetterRecord,
    MessageDecodeError,
    MonitoringUpdate,
    WorkflowSubmission,
    decode,
    encode,
    new_run_id,
)
from models.plan import load_plan
from models.records import StepExecution, WorkflowRun
from switchyard import topics
from switchyard.database import connect
from switchyard.db import RunRecord, StepRecord, WorkflowRepository
from switchyard.kafka import end_offsets
from switchyard.registry import RegistryStore
from switchyard.settings import Settings
from switchyard.stack import Process, Stack, http_json
from tests.conftest import PostgresServer
from tests.e2e.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
API_TOKEN = "faults-secret-token"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
PARTITIONS = 4
STEP_TIMEOUT_S = 15.0
"""The default deadline of an attempt: a dispatch lost anywhere heals within it."""
MAX_MESSAGE_BYTES = 16_384
"""Small, so that an oversize message is cheap to make."""
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
KEEP_LOGS_ENV = "SWITCHYARD_FAULTS_KEEP_LOGS"
"""Set to a folder to keep every fault stack's logs there after the session."""
RUNS = 20
"""Runs in flight in each crash scenario."""

T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: fault injection on the real stack (kill -9, rebalances, poison)")


# ---------------------------------------------------------------- plans


def chain(
    first: str,
    second: str = "summarizer",
    *,
    retry: dict[str, Any] | None = None,
    timeout_s: float | None = 30.0,
    workflow_id: str = "faults",
) -> dict[str, Any]:
    """A two-step plan: ``a`` on ``first`` (the agent under fault), then ``b`` on ``second``.

    Both agents are summarizers, so a run's output is known from its input
    (:func:`expected_output`). The steps' 30 s deadline is well past a worker's
    restart after kill -9 (about 13 s here: the dead member's session must
    expire first), so a scenario that loses nothing needs no timeout to heal.
    """
    a: dict[str, Any] = {
        "id": "a",
        "agent_name": first,
        "input_mapping": {"text": "${workflow.input.text}"},
        "next_step": "b",
    }
    b: dict[str, Any] = {
        "id": "b",
        "agent_name": second,
        "input_mapping": {"text": "${a.output.summary} done"},
        "next_step": None,
    }
    if retry is not None:
        a["retry"] = retry
    if timeout_s is not None:
        a["timeout_s"] = timeout_s
        b["timeout_s"] = timeout_s
    return {
        "workflow_id": workflow_id,
        "name": f"{first} then {second}",
        "version": "1",
        "start_step": "a",
        "steps": {"a": a, "b": b},
    }


def expected_output(text: str) -> dict[str, Any]:
    """The output of a :func:`chain` run whose input text is ``text`` (at most 24 words)."""
    return {"summary": f"{text} done", "words": len(text.split()) + 1}


# ------------------------------------------------------------- polling


def poll(check: Callable[[], T | None], timeout: float, describe: Callable[[], str], interval: float = 0.2) -> T:
    """Call ``check`` until it returns something other than None or False; fail with ``describe()`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"still waiting after {timeout:g}s: {describe()}")
        time.sleep(interval)


def http_request(
    method: str, url: str, body: Any = None, *, headers: Mapping[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """Like :func:`switchyard.stack.http_json`, with headers (the API token)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = int(response.status)
    except urllib.error.HTTPError as error:
        raw, status = error.read(), error.code
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode("utf-8", "replace")


# --------------------------------------------------------------- Kafka


@dataclass(frozen=True)
class Record:
    """One message read back from a topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


async def produce_all(settings: Settings, messages: Iterable[tuple[str, bytes | None, bytes | None]]) -> None:
    """Send ``(topic, key, value)`` messages with one producer and wait for every acknowledgement."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=10_000, max_request_size=8 * 1024 * 1024
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, value=value, key=key) for topic, key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_topic(
    settings: Settings,
    topic: str,
    *,
    until: Callable[[list[Record]], bool] | None = None,
    within_s: float = 20.0,
) -> list[Record]:
    """Read ``topic`` from the beginning (no consumer group).

    Without ``until``, returns once every partition is read to its end; with
    it, reads (and waits for more) until ``until(records)`` holds. Either way
    it returns what it has at the deadline; callers check.
    """
    deadline = time.monotonic() + within_s
    records: list[Record] = []
    # A consumer knows the partitions of the topics that existed when it
    # started (``topics()`` does not refresh that), so wait for the topic first.
    while not await _topic_exists(settings, topic):
        if time.monotonic() >= deadline:
            return records
        await asyncio.sleep(0.3)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        request_timeout_ms=10_000,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        while time.monotonic() < deadline:
            batches = await consumer.getmany(*assigned, timeout_ms=200)
            got = 0
            for messages in batches.values():
                for m in messages:
                    records.append(Record(m.topic, m.partition, m.offset, m.key, m.value))
                    got += 1
            if until is not None:
                if until(records):
                    return records
            elif got == 0:
                ends = await end_offsets(consumer, assigned, embedded_broker=settings.embedded_broker)
                positions = [await consumer.position(tp) for tp in assigned]
                if all(pos >= ends[tp] for pos, tp in zip(positions, assigned, strict=True)):
                    return records
        return records
    finally:
        await consumer.stop()


async def _topic_exists(settings: Settings, topic: str) -> bool:
    probe = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=10_000)
    await probe.start()
    try:
        return topic in await probe.topics()
    finally:
        await probe.stop()


def result_ids(records: Iterable[Record]) -> set[str]:
    """Correlation ids of the agent results among ``records`` (of the results topic)."""
    found = set()
    for record in records:
        try:
            found.add(decode(AgentResult, record.value or b"").correlation_id)
        except MessageDecodeError:
            continue
    return found


def dead_letters(records: Iterable[Record]) -> list[DeadLetterRecord]:
    """The dead letters among ``records`` (of the dead-letter topic)."""
    letters = []
    for record in records:
        try:
            letters.append(decode(DeadLetterRecord, record.value or b""))
        except MessageDecodeError:
            continue
    return letters


def payload_of(letter: DeadLetterRecord) -> bytes:
    """The original bytes a dead letter keeps."""
    if letter.payload_base64 is not None:
        return base64.b64decode(letter.payload_base64)
    return (letter.payload or "").encode()


# --------------------------------------------------------------- stack


@dataclass(frozen=True)
class AgentSpec:
    """One example agent process of a fault stack.

    Attributes:
        module: The example (``examples.agents.<module>``).
        flags: Its fault switches (``--slow 3``, ``--fail-times 1``, ...).
        call_attempts: The registry's ``call_retry.max_attempts`` (HTTP tries
            inside one attempt); None keeps the default.
        max_concurrency: The registry's ``max_concurrency`` (calls at once per bridge worker).
    """

    module: str = "summarizer"
    flags: tuple[str, ...] = ()
    call_attempts: int | None = None
    max_concurrency: int | None = None


@dataclass
class Figures:
    """What a scenario measured: attempts recorded against calls the agents saw."""

    label: str
    runs: int
    attempts: int
    invocations: int
    calls: Counter[str] = field(repr=False)
    recorded: frozenset[str] = field(repr=False)

    @property
    def extra(self) -> int:
        """Agent invocations beyond the attempts recorded."""
        return self.invocations - self.attempts

    @property
    def repeated_keys(self) -> dict[str, int]:
        """Idempotency keys the agents saw more than once."""
        return {key: n for key, n in self.calls.items() if n > 1}

    @property
    def unknown_keys(self) -> set[str]:
        """Idempotency keys the agents saw that match no recorded attempt."""
        return set(self.calls) - self.recorded

    def line(self) -> str:
        return (
            f"[{self.label}] {self.runs} runs: {self.attempts} attempts recorded, "
            f"{self.invocations} agent invocations (invocations - attempts = {self.extra}; "
            f"keys called more than once: {len(self.repeated_keys)})"
        )


class FaultStack:
    """A stack to break: broker, PostgreSQL, agents, one executor and one bridge to start with.

    Args:
        data_dir: The stack's folder (logs under ``logs/``, worker datadirs).
        agents: The agents to run, by registry name.
        database_url: The stack's own database. Given to every process, so
            that none of them holds a handle on an embedded server: a worker
            killed with -9 never releases one, and the server would outlive
            the test.
        max_message_bytes: ``SWITCHYARD_MAX_MESSAGE_BYTES`` of the workers.
        step_timeout_s: ``SWITCHYARD_DEFAULT_STEP_TIMEOUT_S``.
    """

    def __init__(
        self,
        data_dir: Path,
        agents: Mapping[str, AgentSpec],
        *,
        database_url: str,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        step_timeout_s: float = STEP_TIMEOUT_S,
    ) -> None:
        self.settings = Settings(
            database_url=SecretStr(database_url),
            broker_port=free_port(),
            executor_web_port=free_port(),
            bridge_web_port=free_port(),
            data_dir=data_dir,
            topic_partitions=PARTITIONS,
            default_step_timeout_s=step_timeout_s,
            call_timeout_s=10,
            max_message_bytes=max_message_bytes,
        )
        self.stack = Stack(self.settings, ROOT)
        self.agents = dict(agents)
        self.agent_ports = {name: free_port() for name in self.agents}
        self.worker_env = {
            "SWITCHYARD_API_TOKEN": API_TOKEN,
            "SWITCHYARD_MAX_MESSAGE_BYTES": str(max_message_bytes),
            "SWITCHYARD_CALL_TIMEOUT_S": "10",
        }
        self.web_ports: dict[str, int] = {}
        self.inputs: dict[str, str] = {}
        self._engine: Engine | None = None

    # ------------------------------------------------------------ life

    def start(self) -> None:
        """Start everything and wait until both workers own their partitions."""
        started = time.monotonic()
        self.stack.start_services()  # the broker (the database is given)
        self._engine, _ = connect(self.settings)
        agents = {
            name: self.stack.start_agent(spec.module, *spec.flags, port=self.agent_ports[name], name=f"agent-{name}")
            for name, spec in self.agents.items()
        }
        self.start_worker("executor")
        self.start_worker("bridge")
        for name, process in agents.items():
            self.stack.wait_port(self.agent_ports[name], process)
        store = RegistryStore(self.engine)
        for name, spec in self.agents.items():
            retry = CallRetry(max_attempts=spec.call_attempts) if spec.call_attempts else CallRetry()
            store.put(
                AgentEntry(name=name, url=self.agent_url(name), call_retry=retry, max_concurrency=spec.max_concurrency)
            )
        self.wait_ready()
        print(f"\nfault stack up in {time.monotonic() - started:.1f}s at {self.stack.data_dir}")

    def close(self) -> None:
        """Stop every process by PID (workers first), then the broker.

        With ``SWITCHYARD_FAULTS_KEEP_LOGS=DIR`` the logs are copied there
        first (the stack's folder is deleted at the end of the session).
        """
        try:
            for process in self.stack.processes.values():
                if process.alive():
                    os.kill(process.pid, signal.SIGCONT)  # a paused worker cannot handle SIGTERM
            self.stack.stop()
        finally:
            if self._engine is not None:
                self._engine.dispose()
            keep = os.environ.get(KEEP_LOGS_ENV)
            if keep:
                shutil.copytree(self.stack.logs, Path(keep) / self.stack.data_dir.name, dirs_exist_ok=True)

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "the stack has not started"
        return self._engine

    # --------------------------------------------------------- workers

    def start_worker(self, name: str) -> Process:
        """Start (or start again) the worker ``name``: ``executor*`` or ``bridge*``, its own datadir and web port."""
        kind = "executor" if name.startswith("executor") else "bridge"
        if name not in self.web_ports:
            defaults = {"executor": self.settings.executor_web_port, "bridge": self.settings.bridge_web_port}
            self.web_ports[name] = defaults.get(name) or free_port()
        old = self.stack.processes.get(name)
        if old is not None:
            assert not old.alive(), f"{name} is still running (pid {old.pid})"
            old.stop()  # closes its log file
        variable = "SWITCHYARD_EXECUTOR_WEB_PORT" if kind == "executor" else "SWITCHYARD_BRIDGE_WEB_PORT"
        app = "streams.app" if kind == "executor" else "agents_bridge.app"
        env = {**self.worker_env, variable: str(self.web_ports[name])}
        return self.stack.start_worker(app, name=name, **env)

    def process(self, name: str) -> Process:
        return self.stack.processes[name]

    def workers(self, kind: str) -> list[str]:
        """The names of the live workers of a kind (``executor`` or ``bridge``)."""
        return sorted(n for n, p in self.stack.processes.items() if n.startswith(kind) and p.alive())

    def datadir(self, name: str) -> Path:
        """A worker's ``--datadir`` (as :meth:`Stack.start_worker` names it)."""
        return self.stack.data_dir / f"{name}-data"

    def url(self, name: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.web_ports[name]}{path}"

    def executor_url(self, path: str = "") -> str:
        """A URL on a live executor (any: reads are routed to the owner of the run)."""
        live = self.workers("executor")
        assert live, "no executor is running"
        return self.url(live[0], path)

    def health(self, name: str) -> dict[str, Any] | None:
        try:
            status, body = http_json("GET", self.url(name, "/health/"), timeout=3.0)
        except OSError:
            return None
        return dict(body) if status == 200 and isinstance(body, dict) else None

    def owned_partitions(self) -> dict[str, list[int]]:
        """Run partitions per live executor, as their ``/health/`` says."""
        owned: dict[str, list[int]] = {}
        for name in self.workers("executor"):
            health = self.health(name)
            owned[name] = list(health["run_partitions"]) if health else []
        return owned

    def bridge_partitions(self) -> dict[str, int]:
        """Partitions per live bridge (of every topic it reads: tasks, cancels, ...)."""
        counts: dict[str, int] = {}
        for name in self.workers("bridge"):
            health = self.health(name)
            counts[name] = int(health["assigned_partitions"]) if health else 0
        return counts

    def settled(self, *, each: bool = False) -> bool:
        """Whether the live executors own every run partition between them, and the bridges theirs.

        A bridge's ``/health/`` counts the partitions of every topic it reads,
        so for bridges this only asks for at least the task partitions in all.

        Args:
            each: Also require that every live worker owns at least one partition.
        """
        owned = self.owned_partitions()
        bridges = self.bridge_partitions()
        if not owned or not bridges:
            return False
        if sorted(p for parts in owned.values() for p in parts) != list(range(PARTITIONS)):
            return False
        if sum(bridges.values()) < PARTITIONS:
            return False
        return not each or (all(owned.values()) and all(bridges.values()))

    def wait_ready(self, timeout: float = 90.0, *, each: bool = False) -> None:
        """Wait until every live worker answers ``/health/`` and the partitions are shared out."""
        for name in self.workers("executor") + self.workers("bridge"):
            self.stack.wait_http(self.url(name, "/health/"), self.process(name), timeout=timeout)
        poll(
            lambda: self.settled(each=each),
            timeout,
            lambda: (
                f"partitions not settled: executors {self.owned_partitions()}, bridges {self.bridge_partitions()}"
                f"\n{self.logs()}"
            ),
            interval=0.3,
        )

    def kill(self, name: str) -> None:
        """SIGKILL a worker (it may be paused)."""
        process = self.process(name)
        process.kill()
        process.stop()  # closes its log file; the process is gone already

    def pause(self, name: str) -> None:
        """SIGSTOP a worker: it holds its state but does nothing."""
        os.kill(self.process(name).pid, signal.SIGSTOP)

    def restart(self, name: str, timeout: float = 90.0) -> float:
        """Start a stopped worker again and wait until it serves; returns how long that took."""
        started = time.monotonic()
        self.start_worker(name)
        self.wait_ready(timeout)
        took = time.monotonic() - started
        print(f"{name} serving again {took:.1f}s after its restart")
        return took

    def stop_extras(self) -> None:
        """Wake paused workers, and stop every worker beyond the first executor and bridge."""
        for name, process in list(self.stack.processes.items()):
            if not name.startswith(("executor", "bridge")) or not process.alive():
                continue
            os.kill(process.pid, signal.SIGCONT)
            if name not in {"executor", "bridge"}:
                process.stop()

    def ensure_serving(self) -> None:
        """Bring the stack back to its shape: one live executor and bridge, nothing paused, no extras."""
        self.stop_extras()
        for name in ("executor", "bridge"):
            worker = self.stack.processes.get(name)
            if worker is None or not worker.alive():
                self.start_worker(name)
        self.wait_ready()

    def logs(self, *names: str, lines: int = 25) -> str:
        """The last lines of some workers' logs (all workers by default), for failure messages."""
        chosen = names or tuple(n for n in self.stack.processes if n.startswith(("executor", "bridge")))
        parts = []
        for name in chosen:
            process = self.stack.processes.get(name)
            if process is not None:
                parts.append(f"--- {process.log_path} (last {lines} lines)\n{process.log_tail(lines)}")
        return "\n".join(parts)

    def log_lines(self, name: str, needle: str) -> list[str]:
        """Lines of a worker's log (every start of it) that contain ``needle``."""
        path = self.stack.logs / f"{name}.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if needle in line]

    # ---------------------------------------------------------- agents

    def agent_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.agent_ports[name]}/"

    def stats(self, name: str) -> dict[str, Any]:
        status, body = http_json("GET", f"{self.agent_url(name)}stats")
        assert status == 200, body
        return dict(body)

    def calls(self, run_ids: Iterable[str], agents: Iterable[str] | None = None) -> Counter[str]:
        """SendMessage requests the agents received for these runs, by idempotency key (failed ones included)."""
        wanted = set(run_ids)
        counted: Counter[str] = Counter()
        for name in agents if agents is not None else self.agents:
            for key, n in self.stats(name)["by_idempotency_key"].items():
                if key.split("/", 1)[0] in wanted:
                    counted[key] += int(n)
        return counted

    # ------------------------------------------------------------ runs

    def submit(self, plan: Mapping[str, Any], count: int, label: str = "fault run") -> list[str]:
        """Submit ``count`` runs of ``plan`` through the plans topic (one producer); returns their ids."""
        loaded = load_plan(dict(plan))
        messages: list[tuple[str, bytes | None, bytes | None]] = []
        run_ids = []
        for i in range(count):
            run_id = new_run_id()
            text = f"{label} {i}"
            self.inputs[run_id] = text
            submission = WorkflowSubmission(run_id=run_id, plan=loaded, input={"text": text})
            messages.append((topics.PLANS, run_id.encode(), encode(submission)))
            run_ids.append(run_id)
        asyncio.run(produce_all(self.settings, messages))
        return run_ids

    def produce(self, messages: Iterable[tuple[str, bytes | None, bytes | None]]) -> None:
        asyncio.run(produce_all(self.settings, messages))

    def read(
        self, topic: str, until: Callable[[list[Record]], bool] | None = None, timeout: float = 20.0
    ) -> list[Record]:
        return asyncio.run(read_topic(self.settings, topic, until=until, within_s=timeout))

    def run(self, run_id: str) -> RunRecord | None:
        """A run as PostgreSQL has it, with every attempt."""
        return WorkflowRepository(self.engine).get_run(run_id)

    def statuses(self, run_ids: Iterable[str]) -> dict[str, str]:
        """Run statuses in PostgreSQL (runs not recorded yet are absent)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(WorkflowRun.run_id, WorkflowRun.status).where(WorkflowRun.run_id.in_(list(run_ids)))
            )
            return {str(run_id): str(status) for run_id, status in rows}

    def attempts(self, run_ids: Iterable[str]) -> list[StepRecord]:
        """Every attempt recorded for these runs (``step_executions``)."""
        query = (
            select(StepExecution)
            .where(StepExecution.run_id.in_(list(run_ids)))
            .order_by(StepExecution.run_id, StepExecution.step_id, StepExecution.attempt)
        )
        with Session(self.engine) as session:
            return [StepRecord.model_validate(row) for row in session.scalars(query)]

    def submit_waiting_for_a_retry(self, delay_s: float, label: str) -> list[str]:
        """Submit runs whose step ``a`` (on ``flaky``) failed once and whose second attempt is due ``delay_s`` later.

        Until then that attempt exists only as a timer; returns the run ids once every run has it scheduled.
        """
        assert self.stats("flaky")["calls"] == 0, "the flaky agent fails its first requests: one scenario only"
        plan = chain("flaky", retry={"max_attempts": 3, "initial_delay_s": delay_s, "jitter": 0})
        run_ids = self.submit(plan, RUNS, label)
        self.wait_attempts(
            run_ids,
            lambda rows: any(r.step_id == "a" and r.attempt == 2 and r.status == "PENDING" for r in rows),
            "every run's second attempt of step a scheduled",
        )
        return run_ids

    def wait_attempts(
        self, run_ids: Sequence[str], done: Callable[[list[StepRecord]], bool], what: str, timeout: float = 30.0
    ) -> None:
        """Wait until ``done`` holds for the attempts of every one of ``run_ids``."""

        def check() -> bool:
            by_run: dict[str, list[StepRecord]] = {run_id: [] for run_id in run_ids}
            for row in self.attempts(run_ids):
                by_run[row.run_id].append(row)
            return all(done(rows) for rows in by_run.values())

        def describe() -> str:
            rows = Counter((r.step_id, r.attempt, r.status) for r in self.attempts(run_ids))
            return f"{what}; attempts recorded (step, attempt, status): {dict(rows)}\n{self.logs()}"

        poll(check, timeout, describe, interval=0.2)

    def wait_recorded(self, run_ids: Iterable[str], timeout: float = 30.0) -> None:
        """Wait until every one of ``run_ids`` is a run in PostgreSQL, whatever its status."""
        wanted = set(run_ids)
        poll(
            lambda: wanted <= set(self.statuses(wanted)),
            timeout,
            lambda: f"runs never recorded: {sorted(wanted - set(self.statuses(wanted)))[:10]}\n{self.logs()}",
        )

    def wait_terminal(self, run_ids: Sequence[str], timeout: float = 60.0) -> dict[str, RunRecord]:
        """Wait until every run is finished in PostgreSQL; returns the records."""

        def check() -> bool:
            found = self.statuses(run_ids)
            return len(found) == len(set(run_ids)) and all(s in TERMINAL for s in found.values())

        def describe() -> str:
            found = self.statuses(run_ids)
            counts = Counter(found.get(r, "not recorded") for r in run_ids)
            return f"runs not finished: {dict(counts)}\n{self.logs()}"

        poll(check, timeout, describe, interval=0.25)
        records = {run_id: self.run(run_id) for run_id in run_ids}
        return {run_id: record for run_id, record in records.items() if record is not None}

    def live(self, run_id: str) -> tuple[int, Any]:
        """``GET /runs/{id}/`` on a live executor."""
        return http_json("GET", self.executor_url(f"/runs/{run_id}/"), timeout=5.0)

    def live_disagreement(self, run_id: str, timeout: float = 10.0) -> str | None:
        """None when the executor's live view and PostgreSQL agree on the run, else what differs."""
        deadline = time.monotonic() + timeout
        problem = ""
        while True:
            status, view = self.live(run_id)
            record = self.run(run_id)
            if status != 200 or not isinstance(view, dict):
                problem = f"GET /runs/{run_id}/ answered {status}: {view}"
            elif record is None:
                problem = "not in PostgreSQL"
            else:
                live_completed = _time(view.get("completed_at"))
                mismatches = [
                    f"{name}: live {live!r} != PostgreSQL {stored!r}"
                    for name, live, stored in (
                        ("source", view.get("source"), "live"),
                        ("status", view.get("status"), record.status),
                        ("output", view.get("output"), record.output),
                        ("completed_at", live_completed, record.completed_at),
                        ("version", view.get("version"), record.version),
                    )
                    if live != stored
                ]
                if not mismatches:
                    return None
                problem = "; ".join(mismatches)
            if time.monotonic() >= deadline:
                return f"{run_id}: {problem}"
            time.sleep(0.3)

    def completions(self, run_ids: Iterable[str]) -> dict[str, set[datetime]]:
        """The distinct times at which each run was reported COMPLETED on the monitoring topic.

        A run completed once has one such time (redelivered copies of the same
        update carry the same one); a run whose end was applied twice has two.
        """
        wanted = set(run_ids)
        times: dict[str, set[datetime]] = {run_id: set() for run_id in wanted}
        for record in self.read(topics.MONITORING, timeout=30.0):
            if record.key is None or record.value is None or record.key.decode(errors="replace") not in wanted:
                continue
            try:
                update = decode(MonitoringUpdate, record.value)
            except MessageDecodeError:
                continue
            if update.step_id is None and update.status == "COMPLETED":
                times[update.run_id].add(update.timestamp)
        return times

    def assert_serving(self, label: str) -> None:
        """After a hostile case: both workers are up, neither crashed, and a good run completes with its output."""
        for name in ("executor", "bridge"):
            assert self.process(name).alive(), self.logs(name)
            assert not self.log_lines(name, "We experienced a crash"), self.logs(name)
        (run_id,) = self.submit(chain("summarizer"), 1, label)
        record = self.wait_terminal([run_id], timeout=60)[run_id]
        assert record.status == "COMPLETED", (record.error, self.logs())
        assert record.output == expected_output(self.inputs[run_id])

    def verify_completed(
        self, run_ids: Sequence[str], label: str, *, agents: Iterable[str] | None = None, timeout: float = 60.0
    ) -> Figures:
        """The end of a scenario: every run COMPLETED with the right output, PostgreSQL and the
        live view agree, one COMPLETED attempt per step, each run completed once.

        Returns:
            The figures (attempts recorded, agent invocations), printed too.
        """
        records = self.wait_terminal(run_ids, timeout)
        problems: list[str] = []
        for run_id in run_ids:
            record = records.get(run_id)
            if record is None or record.status != "COMPLETED":
                problems.append(f"{run_id}: {record.status if record else 'missing'} {record.error if record else ''}")
            elif run_id in self.inputs and record.output != expected_output(self.inputs[run_id]):
                problems.append(f"{run_id}: output {record.output!r}")
        rows = self.attempts(run_ids)
        successes = Counter((row.run_id, row.step_id) for row in rows if row.status == "COMPLETED")
        for run_id in run_ids:
            record = records.get(run_id)
            steps = sorted({row.step_id for row in rows if row.run_id == run_id} | {"a", "b"})
            for step_id in steps:
                if successes[(run_id, step_id)] != 1:
                    problems.append(f"{run_id} step {step_id}: {successes[(run_id, step_id)]} COMPLETED attempts")
        for run_id in run_ids:
            disagreement = self.live_disagreement(run_id)
            if disagreement:
                problems.append(f"live view vs PostgreSQL: {disagreement}")
        for run_id, times in self.completions(run_ids).items():
            record = records.get(run_id)
            stored = record.completed_at if record else None
            if len(times) != 1 or stored not in times:
                shown = sorted(t.isoformat() for t in times)
                problems.append(f"{run_id}: reported COMPLETED at {shown}, PostgreSQL completed_at {stored}")
        calls = self.calls(run_ids, agents)
        figures = Figures(
            label=label,
            runs=len(run_ids),
            attempts=len(rows),
            invocations=sum(calls.values()),
            calls=calls,
            recorded=frozenset(row.correlation_id for row in rows),
        )
        print(figures.line())
        assert not problems, "\n".join([figures.line(), f"{len(problems)} problem(s):", *problems[:40]])
        return figures

    # ------------------------------------------------------------- CLI

    def cli(self, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        """``faust -A streams.app ARGS`` against this stack."""
        return subprocess.run(
            [sys.executable, "-m", "faust", "-A", "streams.app", *args],
            cwd=ROOT,
            env=self.stack.env(**self.worker_env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


# -------------------------------------------------------------- fixtures

SHARED_AGENTS: dict[str, AgentSpec] = {
    "summarizer": AgentSpec(),
    # Ask one question (A2A INPUT_REQUIRED) before completing; the second takes 4 s once answered.
    "asker": AgentSpec(module="researcher", flags=("--ask", "1")),
    "slow-asker": AgentSpec(module="researcher", flags=("--ask", "1", "--slow", "4")),
    # Its first RUNS requests fail with 503 and the bridge tries each
    # attempt's request once: the first attempts of one scenario's RUNS runs
    # are retriable FAILUREs, their second attempts succeed. (Counted over the
    # agent's life, so only one scenario may use it.)
    "flaky": AgentSpec(flags=("--fail-times", str(RUNS), "--fail-scope", "global"), call_attempts=1),
    "slow": AgentSpec(flags=("--slow", "3")),
    "very-slow": AgentSpec(flags=("--slow", "8")),
    # The first two requests it ever receives fail with 503: a run with
    # max_attempts 2 fails, and a retry of it succeeds.
    "retrier-cli": AgentSpec(flags=("--fail-times", "2", "--fail-scope", "global"), call_attempts=1),
    "retrier-http": AgentSpec(flags=("--fail-times", "2", "--fail-scope", "global"), call_attempts=1),
}


@contextlib.contextmanager
def running_stack(
    folder: Path, database_url: str, agents: Mapping[str, AgentSpec], **options: Any
) -> Iterator[FaultStack]:
    """A started :class:`FaultStack`, stopped (every process, by PID) on the way out."""
    stack = FaultStack(folder, agents, database_url=database_url, **options)
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


@dataclass
class StackPlaces:
    """Where a new fault stack lives: a folder and a fresh database on the session's PostgreSQL."""

    folder: Callable[[str], Path]
    database: Callable[[str], str]

    def stack(
        self, name: str, agents: Mapping[str, AgentSpec], **options: Any
    ) -> contextlib.AbstractContextManager[FaultStack]:
        """A started stack named ``name`` (``with``: stopped on the way out)."""
        return running_stack(self.folder(name), self.database(name), agents, **options)


@pytest.fixture(scope="session")
def stack_places(server_dirs: Callable[[str], Path], postgres_server: PostgresServer) -> Iterator[StackPlaces]:
    """Folders and fresh databases for fault stacks; the databases are dropped at the end of the session."""
    admin = create_engine(postgres_server.admin_url, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def database(name: str) -> str:
        created = f"faults_{re.sub(r'[^a-z0-9]+', '_', name.lower())}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{created}"'))
        made.append(created)
        return postgres_server.url_for(created)

    try:
        yield StackPlaces(folder=server_dirs, database=database)
    finally:
        with admin.connect() as conn:
            for created in made:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{created}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def shared_fault_stack(stack_places: StackPlaces) -> Iterator[FaultStack]:
    with stack_places.stack("faults-shared", SHARED_AGENTS) as stack:
        yield stack


@pytest.fixture
def faults(shared_fault_stack: FaultStack) -> Iterator[FaultStack]:
    """The shared stack, serving with one executor and one bridge; put back in shape after the test."""
    shared_fault_stack.ensure_serving()
    try:
        yield shared_fault_stack
    finally:
        shared_fault_stack.stop_extras()


@pytest.fixture
def make_stack(stack_places: StackPlaces) -> Iterator[Callable[..., FaultStack]]:
    """Builds a stack of its own for a test that changes the stack's shape; stops it after the test."""
    with contextlib.ExitStack() as stacks:

        def make(agents: Mapping[str, AgentSpec], **options: Any) -> FaultStack:
            return stacks.enter_context(stack_places.stack("faults-own", agents, **options))

        yield make
