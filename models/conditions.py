"""Conditions: CEL expressions over a run's values, written with the mapping's ``${...}`` placeholders.

A condition is a `CEL <https://cel.dev>`_ expression (Common Expression
Language, the one Kubernetes and Envoy use) in which values are named exactly
as in an input mapping::

    ${review.output.approved} == false
    ${classify.output.label} in ["bug", "crash"] && ${classify.output.score} >= 0.8
    has(${workflow.input.priority}) || size(${research.output.items}) > 10
    ${review.output.comments ?? ""} != ""

Each placeholder is resolved by :mod:`models.mapping` (so a missing key names
what was there instead) and handed to CEL as a variable. ``has(${...})`` is
true when the placeholder resolves. CEL does the rest: ``==``, ``!=``, ``<``,
``<=``, ``>``, ``>=``, ``in``, ``&&``, ``||``, ``!``, ``size()``, string
functions. It never coerces types: comparing a string with a number is an
error, not false. A condition must evaluate to true or false.

Nothing is ever passed to Python's ``eval``; CEL is a separate, side-effect
free language evaluated by the ``common-expression-language`` library.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Final

import cel

from models.mapping import Expression, MappingContext, MappingError, resolve_expression, scan_template

__all__ = ["Condition", "ConditionError", "evaluate", "parse_condition"]

_HAS_OPEN: Final = re.compile(r"\bhas\(\s*$")
_HAS_CLOSE: Final = re.compile(r"^\s*\)")
_MAX_TEXT: Final = 4000


class ConditionError(ValueError):
    """A condition does not parse, or cannot be evaluated on the values at hand."""

    def __init__(self, reason: str, *, condition: str) -> None:
        self.reason = reason
        self.condition = condition
        super().__init__(f"condition {condition!r}: {reason}")


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed condition.

    Attributes:
        text: The condition as written.
        source: The CEL program's text, with each placeholder replaced by a variable.
        expressions: The placeholders, in order; variable ``_vN`` is the N-th.
        presence: For each placeholder, whether it stands inside ``has(...)``.
    """

    text: str
    source: str
    expressions: tuple[Expression, ...]
    presence: tuple[bool, ...]


def parse_condition(text: str) -> Condition:
    """Parse a condition; raises :class:`ConditionError` naming what is wrong."""
    if len(text) > _MAX_TEXT:
        raise ConditionError(f"longer than {_MAX_TEXT} characters", condition=text[:80] + "...")
    if not text.strip():
        raise ConditionError("is empty", condition=text)
    try:
        parts: list[str | Expression] = list(scan_template(text))
    except MappingError as error:
        where = f"{error.expression}: " if error.expression else ""
        raise ConditionError(f"{where}{error.reason}", condition=text) from None
    pieces: list[str] = []
    expressions: list[Expression] = []
    presence: list[bool] = []
    for index, part in enumerate(parts):
        if isinstance(part, str):
            pieces.append(part)
            continue
        before = pieces[-1] if pieces and isinstance(parts[index - 1], str) else ""
        after = parts[index + 1] if index + 1 < len(parts) and isinstance(parts[index + 1], str) else ""
        assert isinstance(after, str)
        wrapped = _HAS_OPEN.search(before) is not None and _HAS_CLOSE.match(after) is not None
        if wrapped:
            # has(${x}) becomes a boolean variable: true when the placeholder resolves.
            pieces[-1] = _HAS_OPEN.sub("", before)
            parts[index + 1] = _HAS_CLOSE.sub("", after, count=1)
        pieces.append(f"_v{len(expressions)}")
        expressions.append(part)
        presence.append(wrapped)
    source = "".join(pieces)
    try:
        program = _compiled(source)
    except ValueError as error:
        raise ConditionError(f"does not parse: {_first_line(error)}", condition=text) from None
    unknown = sorted(set(program.variables()) - {f"_v{i}" for i in range(len(expressions))})
    if unknown:
        raise ConditionError(
            f"unknown name {unknown[0]!r}: name values as ${{workflow.input...}} or ${{step-id.output...}}",
            condition=text,
        )
    return Condition(text=text, source=source, expressions=tuple(expressions), presence=tuple(presence))


def evaluate(condition: Condition, context: MappingContext) -> bool:
    """Evaluate a condition on a run's values.

    Raises:
        ConditionError: A value is missing, the types do not fit (``"a" < 1``),
            or the result is not a boolean.
    """
    variables: dict[str, Any] = {}
    for index, (expression, present) in enumerate(zip(condition.expressions, condition.presence, strict=True)):
        try:
            value = resolve_expression(expression, context)
        except MappingError as error:
            if present:
                variables[f"_v{index}"] = False
                continue
            raise ConditionError(f"{expression.text}: {error.reason}", condition=condition.text) from None
        variables[f"_v{index}"] = (value is not None) if present else value
    try:
        result = _compiled(condition.source).execute(variables)
    except Exception as error:  # the library raises KeyError, TypeError, RuntimeError, ValueError
        raise ConditionError(f"cannot be evaluated: {_first_line(error)}", condition=condition.text) from None
    if not isinstance(result, bool):
        raise ConditionError(
            f"evaluates to {type(result).__name__} {result!r:.80}, not true or false", condition=condition.text
        )
    return result


@functools.lru_cache(maxsize=1024)
def _compiled(source: str) -> Any:
    return cel.compile(source)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError):
        text = f"no key {text}"
    return text.splitlines()[0][:300]
