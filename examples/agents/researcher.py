"""The researcher: given ``topic`` (and optionally ``depth``), returns ``{topic, notes, sources}``.

Run it with ``python -m examples.agents.researcher --port 8101`` (``--help`` lists
the fault-injection flags, see :mod:`examples.agents.cli`).
"""

from __future__ import annotations

from examples.agents.cli import main
from examples.agents.config import AgentSpec
from examples.agents.skills import research

SPEC = AgentSpec(
    name="researcher",
    description="Gathers deterministic notes and sources on a topic.",
    skill=research,
    skill_id="research",
    skill_description="Given {topic, depth?}, returns {topic, notes, sources: [url, ...]}.",
    tags=("research", "notes", "example"),
    examples=('{"topic": "stream processing"}',),
    default_port=8101,
)

if __name__ == "__main__":
    raise SystemExit(main(SPEC))
