"""The echo agent: returns its input unchanged (``{"text": "x"}`` gives ``{"text": "x"}``).

It does no work, so a benchmark of its callers measures them, not the agent
(``bench/throughput.py``); ``--slow S`` makes every call take S seconds.
Run it with ``python -m examples.agents.echo --port 8104`` (``--help`` lists
the fault-injection flags, see :mod:`examples.agents.cli`).
"""

from __future__ import annotations

from examples.agents.cli import main
from examples.agents.config import AgentSpec
from examples.agents.skills import echo

SPEC = AgentSpec(
    name="echo",
    description="Returns its input unchanged, at once (or after --slow seconds).",
    skill=echo,
    skill_id="echo",
    skill_description="Given any object, returns the same object.",
    tags=("echo", "benchmark", "example"),
    examples=('{"text": "hello"}',),
    default_port=8104,
)

if __name__ == "__main__":
    raise SystemExit(main(SPEC))
