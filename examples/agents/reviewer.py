"""The reviewer: given ``summary`` and ``sources``, returns ``{approved, comments}``.

Run it with ``python -m examples.agents.reviewer --port 8103`` (``--help`` lists
the fault-injection flags, see :mod:`examples.agents.cli`).
"""

from __future__ import annotations

from examples.agents.cli import main
from examples.agents.config import AgentSpec
from examples.agents.skills import review

SPEC = AgentSpec(
    name="reviewer",
    description="Approves a summary that is long enough and backed by web sources.",
    skill=review,
    skill_id="review",
    skill_description="Given {summary, sources: [url, ...]}, returns {approved, comments}.",
    tags=("review", "quality", "example"),
    examples=('{"summary": "Three words here", "sources": ["https://example.org/a"]}',),
    default_port=8103,
)

if __name__ == "__main__":
    raise SystemExit(main(SPEC))
