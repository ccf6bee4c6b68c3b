"""``make demo``: the whole stack on the embedded default, one workflow, then a clean shutdown.

It starts the embedded broker and PostgreSQL (data kept in ``.switchyard/``,
so runs outlive the demo), the executor and bridge workers and the example
agents; registers the agents; submits the three-step example workflow; shows
its progress live; prints the output and where to look; and stops everything
it started, by PID, at the end or on Ctrl-C. ``--keep`` leaves the stack up
until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from models.messages import WorkflowSubmission, encode, new_run_id
from models.plan import load_plan
from switchyard import topics
from switchyard.database import connect
from switchyard.embedded import port_is_open
from switchyard.kafka import ensure_topics, produce
from switchyard.registry import RegistryStore, load_registry_file
from switchyard.settings import Settings
from switchyard.stack import AGENT_PORTS, Stack, StackError

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "examples" / "workflows" / "research-summarize-review.json"
REGISTRY = ROOT / "examples" / "agents" / "registry.json"


def _say(text: str) -> None:
    print(text, flush=True)


def _busy_ports(settings: Settings) -> list[int]:
    ports = [settings.executor_web_port, settings.bridge_web_port, *AGENT_PORTS.values()]
    if settings.embedded_broker:
        ports.append(settings.broker_port)
    return [p for p in ports if port_is_open("127.0.0.1", p, 0.2)]


def run_demo(settings: Settings, *, topic: str, keep: bool) -> int:
    """Run the demo; returns the exit code."""
    busy = _busy_ports(settings)
    if busy:
        _say(f"error: port(s) {', '.join(map(str, busy))} on 127.0.0.1 are in use (another demo running?)")
        return 2
    stack = Stack(settings, ROOT)
    started = time.monotonic()
    engine = None
    try:
        _say("starting the embedded broker and PostgreSQL ...")
        stack.start_services()
        engine, _ = connect(settings)
        _say("starting the example agents, the executor and the bridge ...")
        agents = {name: stack.start_agent(name) for name in AGENT_PORTS}
        executor = stack.start_worker("streams.app")
        bridge = stack.start_worker("agents_bridge.app")
        for name, process in agents.items():
            stack.wait_port(AGENT_PORTS[name], process)
        entries = load_registry_file(REGISTRY)
        store = RegistryStore(engine)
        for entry in entries:
            store.put(entry)
        _say(f"registered agents: {', '.join(e.name for e in entries)}")
        stack.wait_http(stack.executor_url("/health/"), executor, timeout=120)
        stack.wait_http(stack.bridge_url("/health/"), bridge, timeout=120)
        _say(f"stack ready in {time.monotonic() - started:.1f}s")

        plan = load_plan(PLAN.read_bytes())
        run_id = new_run_id()
        submission = WorkflowSubmission(run_id=run_id, plan=plan, input={"topic": topic})
        asyncio.run(ensure_topics(settings))
        asyncio.run(produce(settings, topics.PLANS, key=run_id.encode(), value=encode(submission)))
        _say(f"\nsubmitted {plan.name!r} as run {run_id} with input {{'topic': {topic!r}}}")

        from streams.cli import wait_for_run

        record = asyncio.run(wait_for_run(settings, run_id, timeout_s=120, echo=_say))
        if record is None or record.status != "COMPLETED":
            status = record.status if record else "without a record"
            _say(f"run {run_id} ended {status}: {record.error if record else ''}")
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
        if keep:
            _say("\nthe stack stays up; Ctrl-C stops it")
            while all(p.alive() for p in stack.processes.values()):
                time.sleep(0.5)
        return 0
    except StackError as error:
        _say(f"error: {error}")
        return 1
    except KeyboardInterrupt:
        _say("\ninterrupted")
        return 130
    finally:
        _say("stopping the stack ...")
        if engine is not None:
            engine.dispose()
        stack.stop()
        _say("stopped; nothing left running")


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
