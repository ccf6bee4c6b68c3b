"""Serve one example agent in the running event loop: the a2a-sdk app behind the aiohttp front.

The a2a-sdk 1.3 builds the agent (agent card route, JSON-RPC route at ``/``,
``DefaultRequestHandler``, in-memory task store, :class:`SkillExecutor`);
aiohttp serves it (:mod:`examples.agents.asgi`) behind :class:`Front`, which
counts requests and injects faults. Tests use :func:`start_agent` or
:func:`running_agent`; :mod:`examples.agents.cli` runs one as a process.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore
from a2a.types.a2a_pb2 import AgentCapabilities, AgentCard, AgentInterface, AgentSkill
from aiohttp import web
from starlette.applications import Starlette

from examples.agents.config import AgentConfig, AgentSpec
from examples.agents.executor import Behaviour, SkillExecutor
from examples.agents.front import Front, Stats

__all__ = ["AgentConfig", "AgentSpec", "RunningAgent", "Stats", "build_card", "running_agent", "start_agent"]

logger = logging.getLogger(__name__)


def build_card(spec: AgentSpec, config: AgentConfig, url: str) -> AgentCard:
    """The agent card served at ``/.well-known/agent-card.json``: one JSONRPC interface per protocol version."""
    versions = ["1.0", "0.3"] if config.protocol == "both" else [config.protocol]
    return AgentCard(
        name=spec.name,
        description=spec.description,
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version=version) for version in versions
        ],
        capabilities=AgentCapabilities(streaming=False, push_notifications=False),
        default_input_modes=["application/json", "text/plain"],
        default_output_modes=["application/json"],
        skills=[
            AgentSkill(
                id=spec.skill_id,
                name=spec.skill_id.capitalize(),
                description=spec.skill_description,
                tags=list(spec.tags),
                examples=list(spec.examples),
            )
        ],
    )


@dataclass
class RunningAgent:
    """An agent serving in this process; :meth:`stop` ends it."""

    spec: AgentSpec
    config: AgentConfig
    url: str
    port: int
    stats: Stats
    _runner: web.AppRunner = field(repr=False)

    async def stop(self) -> None:
        """Stop serving; tasks still running are cancelled."""
        await self._runner.cleanup()


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start_agent(spec: AgentSpec, config: AgentConfig) -> RunningAgent:
    """Start serving ``spec`` as ``config`` says.

    The socket is bound first, so the card can announce the real port when
    ``config.port`` is 0.

    Returns:
        The running agent, with its URL (the JSON-RPC endpoint) and live stats.

    Raises:
        OSError: The address cannot be bound.
    """
    sock = _listen(config.host, config.port)
    port = int(sock.getsockname()[1])
    host = f"[{config.host}]" if ":" in config.host else config.host
    url = config.public_url or f"http://{host}:{port}/"
    card = build_card(spec, config, url)
    behaviour = Behaviour(
        work_s=config.slow_s,
        input_required=config.input_required,
        pad_bytes=config.pad_output_bytes,
        ask=config.ask,
    )
    handler = DefaultRequestHandler(
        agent_executor=SkillExecutor(spec.skill, behaviour), task_store=InMemoryTaskStore(), agent_card=card
    )
    routes = create_agent_card_routes(card) + create_jsonrpc_routes(
        handler, "/", enable_v0_3_compat=config.protocol != "1.0"
    )
    stats = Stats()
    front = Front(config, Starlette(routes=routes), stats)
    app = web.Application()
    app.router.add_post("/", front.rpc)
    app.router.add_get("/stats", front.stats_view)
    app.router.add_post("/stats/reset-peak", front.reset_peak_view)
    app.router.add_route("*", "/{tail:.*}", front.forward)

    async def drain(_: web.Application) -> None:
        await handler.aclose()

    app.on_shutdown.append(drain)  # ends requests still waiting for a task before the runner waits for them
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    logger.info("%s serving A2A %s at %s", spec.name, config.protocol, url)
    return RunningAgent(spec=spec, config=config, url=url, port=port, stats=stats, _runner=runner)


@contextlib.asynccontextmanager
async def running_agent(spec: AgentSpec, config: AgentConfig | None = None) -> AsyncIterator[RunningAgent]:
    """Serve an agent for the duration of an ``async with`` block."""
    agent = await start_agent(spec, config or AgentConfig())
    try:
        yield agent
    finally:
        await agent.stop()
