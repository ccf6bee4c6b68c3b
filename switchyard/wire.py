"""Reading JSON that another program sent, strictly, and showing a piece of it in a message.

Python's :mod:`json` reads ``NaN``, ``Infinity`` and ``1e999`` (an infinite
float), none of which is JSON: :func:`strict_loads` refuses them, so that what
it returns can be written back as JSON and stored. :func:`snippet` and
:func:`clip` keep what goes into an error message short. Pure functions, no I/O;
the A2A answers of :mod:`agents_bridge.a2a` and the agent cards of
:mod:`switchyard.agent_cards` are read with them.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final, NoReturn

__all__ = ["SNIPPET_BYTES", "StrictJsonError", "clip", "snippet", "strict_loads"]

SNIPPET_BYTES: Final = 120
"""How much of a body :func:`snippet` shows."""


class StrictJsonError(ValueError):
    """The text is JSON to Python but not to anyone else: ``NaN``, ``Infinity``, or a number out of range."""


def _no_constants(name: str) -> NoReturn:
    raise StrictJsonError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJsonError(f"number {text[:40]} is out of range")
    return value


def strict_loads(body: bytes | str) -> Any:
    """Decode JSON, refusing what only Python reads as JSON.

    Raises:
        StrictJsonError: ``NaN``, ``Infinity``, ``-Infinity`` or a number
            beyond a float's range (the message names which).
        ValueError: Not JSON at all (a :class:`json.JSONDecodeError`, or a
            ``UnicodeDecodeError`` for bytes that are not UTF-8).
        RecursionError: Nested too deeply for the decoder.
    """
    return json.loads(body, parse_constant=_no_constants, parse_float=_finite_float)


def snippet(body: bytes) -> str:
    """The start of ``body`` as a Python bytes literal, with ``...`` when there is more."""
    return repr(body[:SNIPPET_BYTES]) + ("..." if len(body) > SNIPPET_BYTES else "")


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, ending with ``...`` when it was cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
