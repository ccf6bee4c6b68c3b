"""Run an example agent as a process: ``python -m examples.agents.<name> [flags]``.

Flags (each with an environment default ``EXAMPLE_AGENT_<FLAG>``, e.g.
``EXAMPLE_AGENT_FAIL_TIMES=2``; what they do is described in
:mod:`examples.agents.front` and :class:`~examples.agents.config.AgentConfig`):

``--host`` (127.0.0.1), ``--port`` (the agent's usual port; 0 picks a free
one), ``--protocol 1.0|0.3|both``, ``--public-url``, ``--slow S``,
``--working``, ``--input-required``, ``--ask N``, ``--pad-output N``, ``--fail-times N``, ``--fail-scope
message|global``, ``--fail-status CODE``, ``--retry-after VALUE``,
``--always-5xx``, ``--malformed``, ``--auth-token-env VAR`` (the token is read
from that variable, never from the command line), ``--auth-header NAME``,
``--log-level``.

Once serving, the process prints one line, ``<name> ready at <url> (A2A
<protocol>)``, and runs until SIGINT or SIGTERM (exit status 0). An address
that cannot be bound gives exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from examples.agents.config import AgentConfig, AgentSpec
from examples.agents.server import start_agent

__all__ = ["main", "parse_args"]

_ENV_PREFIX = "EXAMPLE_AGENT_"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(_ENV_PREFIX + name, default)


def _env_flag(name: str) -> bool:
    return (_env(name) or "").strip().lower() in ("1", "true", "yes", "on")


def _parser(spec: AgentSpec) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m examples.agents.{spec.name}", description=spec.description)
    add = parser.add_argument
    add("--host", default=_env("HOST", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    add("--port", type=int, default=int(_env("PORT") or spec.default_port), help="0 picks a free port")
    add("--protocol", choices=["1.0", "0.3", "both"], default=_env("PROTOCOL", "1.0"))
    add("--public-url", default=_env("PUBLIC_URL"), help="the endpoint announced on the agent card")
    add("--slow", type=float, default=float(_env("SLOW") or 0), help="seconds the work takes")
    add("--working", action="store_true", default=_env_flag("WORKING"), help="answer at once, complete later")
    add("--input-required", action="store_true", default=_env_flag("INPUT_REQUIRED"))
    add("--ask", type=int, default=int(_env("ASK") or 0), help="ask N questions, then complete with the answers")
    add("--pad-output", type=int, default=int(_env("PAD_OUTPUT") or 0), help="add N bytes of padding to outputs")
    add("--fail-times", type=int, default=int(_env("FAIL_TIMES") or 0), help="fail the first N SendMessage requests")
    add("--fail-scope", choices=["message", "global"], default=_env("FAIL_SCOPE", "message"))
    add("--fail-status", type=int, default=int(_env("FAIL_STATUS") or 503), help="HTTP status of those failures")
    add("--retry-after", default=_env("RETRY_AFTER"), help="Retry-After header sent with those failures")
    add("--always-5xx", action="store_true", default=_env_flag("ALWAYS_5XX"))
    add("--malformed", action="store_true", default=_env_flag("MALFORMED"))
    add("--auth-header", default=_env("AUTH_HEADER", "Authorization"))
    add("--auth-token-env", default=_env("AUTH_TOKEN_ENV"), help="the variable holding the required token")
    add("--log-level", default=_env("LOG_LEVEL", "INFO"))
    return parser


def parse_args(spec: AgentSpec, argv: Sequence[str] | None = None) -> AgentConfig:
    """The agent's configuration from the command line and ``EXAMPLE_AGENT_*`` variables."""
    parser = _parser(spec)
    args = parser.parse_args(argv)
    token = None
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env)
        if not token:
            parser.error(f"--auth-token-env: the variable {args.auth_token_env} is not set")
    if args.ask < 0:
        parser.error("--ask: the number of questions cannot be negative")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return AgentConfig(
        host=args.host,
        port=args.port,
        protocol=args.protocol,
        public_url=args.public_url,
        slow_s=args.slow,
        working=args.working,
        input_required=args.input_required,
        ask=args.ask,
        pad_output_bytes=args.pad_output,
        fail_times=args.fail_times,
        fail_scope=args.fail_scope,
        fail_status=args.fail_status,
        retry_after=args.retry_after,
        always_5xx=args.always_5xx,
        malformed=args.malformed,
        auth_header=args.auth_header,
        auth_token=token,
    )


async def _serve_until_stopped(spec: AgentSpec, config: AgentConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(signum, stop.set)
    agent = await start_agent(spec, config)
    print(f"{spec.name} ready at {agent.url} (A2A {config.protocol})", flush=True)
    try:
        await stop.wait()
    finally:
        await agent.stop()


def main(spec: AgentSpec, argv: Sequence[str] | None = None) -> int:
    """Run the agent until SIGINT or SIGTERM.

    Returns:
        The process's exit status.
    """
    config = parse_args(spec, argv)
    try:
        asyncio.run(_serve_until_stopped(spec, config))
    except OSError as error:
        print(f"{spec.name}: cannot serve on {config.host}:{config.port}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
