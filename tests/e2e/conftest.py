"""A real stack for end-to-end tests: embedded broker, PostgreSQL, both workers and a2a-sdk agents.

Ports are picked free at start, and the data folder is a temporary one, so the
tests never meet a demo that happens to run. Every process is stopped by PID
at the end of the session.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine

from models.agents import AgentEntry, ProtocolVersion
from switchyard.database import connect
from switchyard.registry import RegistryStore
from switchyard.secrets import generate_key
from switchyard.settings import Settings
from switchyard.stack import Stack, http_json

API_TOKEN = "e2e-secret-token"
RETENTION_S = 20
"""How long a finished run stays in the e2e executor's table (short, so that a test sees it leave)."""
SECRETS_KEY = generate_key()
"""The stack's SWITCHYARD_SECRETS_KEY: literal registry secrets are stored encrypted with it."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningStack:
    stack: Stack
    settings: Settings
    engine: Engine
    agent_ports: dict[str, int]

    def agent_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.agent_ports[name]}/"

    def stats(self, name: str) -> dict[str, Any]:
        status, body = http_json("GET", f"{self.agent_url(name)}stats")
        assert status == 200
        return dict(body)

    def register(self, entry: AgentEntry) -> None:
        RegistryStore(self.engine, self.settings).put(entry)

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)


# name -> (example module, flags): several instances of the examples with faults switched on.
AGENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "researcher": ("researcher", ()),
    "summarizer": ("summarizer", ()),
    "reviewer": ("reviewer", ()),
    "flaky": ("summarizer", ("--fail-times", "1")),
    "broken": ("summarizer", ("--always-5xx",)),
    "slow": ("summarizer", ("--slow", "3")),
    "legacy": ("summarizer", ("--protocol", "0.3")),
    "garbled": ("summarizer", ("--malformed",)),
    "polled": ("summarizer", ("--working", "--slow", "0.3")),
    "slow1": ("summarizer", ("--slow", "1")),
    "echo": ("echo", ()),
    "asker": ("researcher", ("--ask", "1")),
    "asker2": ("researcher", ("--ask", "2")),
}


@pytest.fixture(scope="session")
def e2e(server_dirs: Callable[[str], Path]) -> Iterator[RunningStack]:
    root = Path(__file__).resolve().parents[2]
    data = server_dirs("stack")
    settings = Settings(
        broker_port=free_port(),
        executor_web_port=free_port(),
        bridge_web_port=free_port(),
        data_dir=data,
        topic_partitions=4,
        default_step_timeout_s=20,
        call_timeout_s=10,
        secrets_key=SecretStr(SECRETS_KEY),
    )
    stack = Stack(settings, root)
    ports = {name: free_port() for name in AGENTS}
    try:
        stack.start_services()
        engine, _ = connect(settings)
        processes = {
            name: stack.start_agent(module, *flags, port=ports[name], name=f"agent-{name}")
            for name, (module, flags) in AGENTS.items()
        }
        executor = stack.start_worker(
            "streams.app",
            SWITCHYARD_API_TOKEN=API_TOKEN,
            SWITCHYARD_SECRETS_KEY=SECRETS_KEY,
            SWITCHYARD_FINISHED_RUN_RETENTION_S=str(RETENTION_S),
        )
        bridge = stack.start_worker(
            "agents_bridge.app", SWITCHYARD_REGISTRY_CACHE_TTL_S="0", SWITCHYARD_SECRETS_KEY=SECRETS_KEY
        )
        for name, process in processes.items():
            stack.wait_port(ports[name], process)
        running = RunningStack(stack=stack, settings=settings, engine=engine, agent_ports=ports)
        for name in AGENTS:
            version: ProtocolVersion = "0.3" if name == "legacy" else "1.0"
            running.register(AgentEntry(name=name, url=running.agent_url(name), protocol_version=version))
        stack.wait_http(stack.executor_url("/health/"), executor, timeout=120)
        stack.wait_http(stack.bridge_url("/health/"), bridge, timeout=120)
        yield running
        engine.dispose()
    finally:
        stack.stop()
