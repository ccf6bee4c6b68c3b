"""The summarizer: given ``text`` (and optionally ``max_words``, ``title``), returns ``{summary, words}``.

Run it with ``python -m examples.agents.summarizer --port 8102`` (``--help`` lists
the fault-injection flags, see :mod:`examples.agents.cli`).
"""

from __future__ import annotations

from examples.agents.cli import main
from examples.agents.config import AgentSpec
from examples.agents.skills import summarize

SPEC = AgentSpec(
    name="summarizer",
    description="Condenses a text to its first words and counts them.",
    skill=summarize,
    skill_id="summarize",
    skill_description="Given {text, max_words?, title?}, returns {summary, words}.",
    tags=("summary", "text", "example"),
    examples=('{"text": "A long text to condense.", "max_words": 5}',),
    default_port=8102,
)

if __name__ == "__main__":
    raise SystemExit(main(SPEC))
