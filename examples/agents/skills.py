"""What the example agents do: deterministic text work, no I/O, no model.

Each skill takes the step input (a JSON object) and returns the output (a JSON
object), or raises :class:`SkillInputError` for an input it cannot use; the
agent then reports the task FAILED with that message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Skill", "SkillInputError", "echo", "research", "review", "summarize"]

Skill = Callable[[Mapping[str, Any]], dict[str, Any]]


class SkillInputError(ValueError):
    """The input is not what the skill needs; the message says what is wrong."""


def _text(data: Mapping[str, Any], key: str, agent: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SkillInputError(f"the {agent} needs a non-empty string {key!r}")
    return value.strip()


def _whole(data: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    """An integer field; A2A 1.0 carries numbers as doubles, so 3.0 counts as 3."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SkillInputError(f"{key!r} must be a whole number from {low} to {high}")
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "topic"


_FINDINGS = (
    "{Topic} has been studied from several angles.",
    "Early work on {topic} focused on definitions and scope.",
    "Recent work on {topic} measures costs and benefits in practice.",
    "Open questions about {topic} concern scale and reliability.",
    "Practitioners of {topic} recommend small, repeatable experiments.",
    "Surveys of {topic} agree that careful measurement matters most.",
)


def research(data: Mapping[str, Any]) -> dict[str, Any]:
    """Notes and sources on ``topic``; ``depth`` (1-4, default 2) adds sentences and sources."""
    topic = _text(data, "topic", "researcher")
    depth = _whole(data, "depth", 2, 1, 4)
    notes = " ".join(line.format(topic=topic, Topic=topic[:1].upper() + topic[1:]) for line in _FINDINGS[: depth + 2])
    sources = [f"https://example.org/{_slug(topic)}/source-{n}" for n in range(1, depth + 2)]
    return {"topic": topic, "notes": notes, "sources": sources}


def summarize(data: Mapping[str, Any]) -> dict[str, Any]:
    """The first ``max_words`` (default 25) words of ``text``, after ``title`` if given, and the word count.

    With ``previous`` (an earlier summary of the same text, as a writer revises
    a draft), the summary goes ``max_words`` words further than it did.
    """
    text = _text(data, "text", "summarizer")
    max_words = _whole(data, "max_words", 25, 1, 1000)
    title = data.get("title")
    previous = data.get("previous")
    words = text.split()
    if isinstance(previous, str) and previous.strip():
        already = len(previous.removesuffix(" ...").split())
        if isinstance(title, str) and title.strip():
            already -= len(f"{title.strip()}:".split())
        max_words += max(0, already)
    summary = " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")
    if isinstance(title, str) and title.strip():
        summary = f"{title.strip()}: {summary}"
    return {"summary": summary, "words": len(words)}


def review(data: Mapping[str, Any]) -> dict[str, Any]:
    """Approve a ``summary`` of ``min_words`` words or more (default 3) backed by an http(s) source in ``sources``."""
    summary = _text(data, "summary", "reviewer")
    min_words = _whole(data, "min_words", 3, 1, 10_000)
    sources = data.get("sources")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise SkillInputError("the reviewer needs 'sources', a list of strings")
    problems = []
    if len(summary.split()) < min_words:
        problems.append(f"the summary is too short ({len(summary.split())} words, at least {min_words} wanted)")
    if not sources:
        problems.append("no sources are given")
    not_web = [s for s in sources if not s.startswith(("http://", "https://"))]
    if not_web:
        problems.append(f"{len(not_web)} source(s) are not http(s) URLs")
    if problems:
        return {"approved": False, "comments": "; ".join(problems).capitalize() + "."}
    return {"approved": True, "comments": f"Approved: {len(summary.split())} words backed by {len(sources)} source(s)."}


def echo(data: Mapping[str, Any]) -> dict[str, Any]:
    """The input, unchanged: a zero-work agent, so that a benchmark measures the caller, not the agent."""
    return dict(data)
