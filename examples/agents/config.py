"""What an example agent is (:class:`AgentSpec`) and how one runs (:class:`AgentConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from examples.agents.skills import Skill

__all__ = ["AgentConfig", "AgentSpec", "Protocol"]

Protocol = Literal["1.0", "0.3", "both"]


@dataclass(frozen=True)
class AgentSpec:
    """What makes one example agent itself: its name, card text, skill and usual port."""

    name: str
    description: str
    skill: Skill
    skill_id: str
    skill_description: str
    tags: tuple[str, ...]
    examples: tuple[str, ...]
    default_port: int


@dataclass(frozen=True)
class AgentConfig:
    """Where the agent listens and how it misbehaves.

    Attributes:
        host: Address to bind (loopback by default).
        port: Port to bind; 0 picks a free one.
        protocol: ``1.0``, ``0.3`` or ``both`` (see :mod:`examples.agents.front`).
        public_url: The endpoint announced on the card (default ``http://host:port/``).
        slow_s: Seconds the work takes.
        working: Answer SendMessage at once; the task completes ``slow_s`` later.
        input_required: Stop every task in INPUT_REQUIRED, at every turn (it never completes).
        ask: Ask N questions (INPUT_REQUIRED), one per turn of the task, then complete with the answers
            (see :mod:`examples.agents.executor`).
        pad_output_bytes: Add a ``padding`` string of this many bytes to every output (answers too large).
        fail_times: Fail the first N SendMessage requests (per message id, or all of them).
        fail_scope: ``message`` (per message id) or ``global``.
        fail_status: The HTTP status of those failures.
        retry_after: The ``Retry-After`` header sent with them, verbatim.
        always_5xx: Fail every JSON-RPC request with HTTP 500.
        malformed: Answer every JSON-RPC request with something that is not A2A.
        auth_header: The header that must carry the token.
        auth_token: The token required (``Bearer <token>`` in ``Authorization``); None: no auth.
    """

    host: str = "127.0.0.1"
    port: int = 0
    protocol: Protocol = "1.0"
    public_url: str | None = None
    slow_s: float = 0.0
    working: bool = False
    input_required: bool = False
    ask: int = 0
    pad_output_bytes: int = 0
    fail_times: int = 0
    fail_scope: Literal["message", "global"] = "message"
    fail_status: int = 503
    retry_after: str | None = None
    always_5xx: bool = False
    malformed: bool = False
    auth_header: str = "Authorization"
    auth_token: str | None = field(default=None, repr=False)
