"""Input mapping: resolve ``${...}`` placeholders in a step's ``input_mapping``.

Syntax (see README, "Input mapping"):

* ``${workflow.input}`` / ``${workflow.input.a.b}``: the run's input.
* ``${step-id.output}`` / ``${step-id.output.x[0].y}``: a finished step's output.
* Path segments are ``.name`` (letters, digits, ``_`` and ``-``), ``[N]`` for a
  list index, or ``["any key"]`` for a key with other characters.
* A string that is exactly one placeholder keeps the value's JSON type; a
  placeholder inside a longer string is interpolated (strings as they are,
  anything else as compact JSON).
* ``${map.item}`` / ``${map.item.title}`` / ``${map.index}``: in a map step, the
  item of the list this call is for, and its position (from 0).
* ``${expression ?? default}``: ``default`` ('text', or any JSON value) when the step has
  no output (it was skipped, or has not run yet in this loop iteration), a key
  or index on the path is missing, or the value is null.
* ``$${`` writes a literal ``${``.

Everything here is pure. The only exception that leaves this module is
:class:`MappingError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

__all__ = [
    "MAP_ROOT",
    "WORKFLOW_ROOT",
    "Expression",
    "MappingContext",
    "MappingError",
    "Segment",
    "find_expressions",
    "parse_expression",
    "resolve_expression",
    "resolve_mapping",
    "scan_template",
]

JSON: TypeAlias = Any
Segment: TypeAlias = str | int
"""One step of a path: a key (``str``) or a list index (``int``)."""

WORKFLOW_ROOT: Final = "workflow"
MAP_ROOT: Final = "map"
"""``${map.item}`` and ``${map.index}`` name a map step's current item (a step named ``map`` is ``${map.output}``)."""
_DEFAULT_MARK: Final = "??"
_ID = r"[A-Za-z0-9_][A-Za-z0-9_-]*"
_ROOT_RE: Final = re.compile(rf"({_ID})\.({_ID})")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_INDEX_RE: Final = re.compile(r"\[(\d+)\]")
_QUOTED_RE: Final = re.compile(r'\["((?:[^"\\]|\\.)*)"\]')
_MAX_DEPTH: Final = 64


class MappingError(ValueError):
    """A mapping could not be parsed or resolved.

    Attributes:
        reason: What went wrong, in plain words.
        expression: The ``${...}`` text involved, when there is one.
        path: Where in the mapping it happened, as a JSON path (``$.query``).
        missing: The segment that was not found, for a missing variable.
        available: The keys (or index range) that were there instead.
    """

    def __init__(
        self,
        reason: str,
        *,
        expression: str | None = None,
        path: str = "$",
        missing: Segment | None = None,
        available: tuple[str, ...] = (),
    ) -> None:
        self.reason = reason
        self.expression = expression
        self.path = path
        self.missing = missing
        self.available = available
        where = f"{path}: " if path != "$" else ""
        expr = f"{expression}: " if expression else ""
        super().__init__(f"{where}{expr}{reason}")


@dataclass(frozen=True, slots=True)
class Expression:
    """A parsed placeholder such as ``${research.output.items[0]}``.

    Attributes:
        text: The placeholder as written, ``${`` and ``}`` included.
        root: ``"workflow"``, ``"map"`` (with ``item`` or ``index``) or a step id.
        kind: ``"input"`` for the workflow root, ``"output"`` for a step,
            ``"item"`` or ``"index"`` for a map step's item.
        path: Keys and indexes below the root value.
        has_default: Whether ``?? default`` was given.
        default: The value used when the one named is not there.
    """

    text: str
    root: str
    kind: str
    path: tuple[Segment, ...]
    has_default: bool = False
    default: JSON = None

    @property
    def step_id(self) -> str | None:
        """The step this expression reads from, or None for the run's input or a map item."""
        return self.root if self.kind == "output" else None

    @property
    def reads_item(self) -> bool:
        """Whether it reads a map step's item (``${map.item...}`` or ``${map.index}``)."""
        return self.root == MAP_ROOT and self.kind in {"item", "index"}


_NO_ITEM: Final = object()


@dataclass(frozen=True, slots=True)
class MappingContext:
    """What placeholders can read: the run's input, finished steps' outputs and, in a map step, the item."""

    workflow_input: JSON
    step_outputs: Mapping[str, JSON]
    item: JSON = _NO_ITEM
    index: int | None = None


def parse_expression(body: str, text: str | None = None) -> Expression:
    """Parse the inside of a placeholder (what stands between ``${`` and ``}``).

    Args:
        body: For example ``"research-step.output.items[0]"``.
        text: The placeholder as written, for error messages.

    Returns:
        The parsed expression.

    Raises:
        MappingError: The expression is malformed.
    """
    text = text if text is not None else "${" + body + "}"
    has_default, default = False, None
    mark = _default_mark(body)
    if mark != -1:
        default_text = body[mark + len(_DEFAULT_MARK) :].strip()
        try:
            if len(default_text) >= 2 and default_text[0] == default_text[-1] == "'":
                # 'text': a JSON string without the escaped double quotes a JSON plan would need.
                default = default_text[1:-1]
            else:
                default = json.loads(default_text, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise MappingError(
                f"the default after '??' must be 'text' or a JSON value (0, true, null, [], {{}}), "
                f"not {default_text[:40]!r}",
                expression=text,
            ) from None
        has_default = True
        body = body[:mark].rstrip()
    match = _ROOT_RE.match(body)
    if match is None:
        raise MappingError(
            "malformed expression: expected ${workflow.input...}, ${step-id.output...} or ${map.item...}",
            expression=text,
        )
    root, kind = match.group(1), match.group(2)
    if root == WORKFLOW_ROOT and kind != "input":
        raise MappingError(
            f"malformed expression: 'workflow' is followed by 'input', not {kind!r}",
            expression=text,
        )
    if root == MAP_ROOT and kind in {"item", "index"}:
        pass
    elif root != WORKFLOW_ROOT and kind != "output":
        hint = " (or 'map.item' / 'map.index' in a map step)" if root == MAP_ROOT else ""
        raise MappingError(
            f"malformed expression: step {root!r} is followed by 'output', not {kind!r}{hint}",
            expression=text,
        )
    path: list[Segment] = []
    pos = match.end()
    while pos < len(body):
        if body[pos] == ".":
            name = _NAME_RE.match(body, pos + 1)
            if name is None:
                raise MappingError(
                    f"malformed expression: expected a key after '.' at position {pos + 1}",
                    expression=text,
                )
            path.append(name.group(0))
            pos = name.end()
            continue
        index = _INDEX_RE.match(body, pos)
        if index is not None:
            digits = index.group(1)
            if len(digits) > 18:
                raise MappingError(f"malformed expression: index {digits[:20]}... is too large", expression=text)
            path.append(int(digits))
            pos = index.end()
            continue
        quoted = _QUOTED_RE.match(body, pos)
        if quoted is not None:
            try:
                path.append(json.loads('"' + quoted.group(1) + '"'))
            except ValueError as error:
                raise MappingError(f"malformed expression: bad quoted key ({error})", expression=text) from None
            pos = quoted.end()
            continue
        raise MappingError(
            f"malformed expression: unexpected {body[pos]!r} at position {pos}",
            expression=text,
        )
    if kind == "index" and path:
        raise MappingError("malformed expression: ${map.index} is a number, it has no keys", expression=text)
    return Expression(text=text, root=root, kind=kind, path=tuple(path), has_default=has_default, default=default)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _default_mark(body: str) -> int:
    """Where ``??`` starts in a placeholder's body, outside quoted keys; -1 if nowhere."""
    in_quotes = False
    pos = 0
    while pos < len(body) - 1:
        char = body[pos]
        if in_quotes:
            if char == "\\":
                pos += 1
            elif char == '"':
                in_quotes = False
        elif char == '"':
            in_quotes = True
        elif body.startswith(_DEFAULT_MARK, pos):
            return pos
        pos += 1
    return -1


def _closing_brace(template: str, pos: int) -> int:
    """The index of the ``}`` that closes a placeholder, skipping quoted text and a default's braces; -1 if none."""
    in_quotes = False
    depth = 0
    while pos < len(template):
        char = template[pos]
        if in_quotes:
            if char == "\\":
                pos += 1
            elif char == '"':
                in_quotes = False
        elif char == '"':
            in_quotes = True
        elif char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                return pos
            depth -= 1
        pos += 1
    return -1


def scan_template(template: str, json_path: str = "$") -> Iterator[str | Expression]:
    """Split a string into literal text and expressions, handling ``$${``."""
    literal: list[str] = []
    pos = 0
    while True:
        start = template.find("${", pos)
        if start == -1:
            literal.append(template[pos:])
            break
        if start > 0 and template[start - 1] == "$":
            # ``$${`` is an escaped ``${``: keep one ``$`` and the brace.
            literal.append(template[pos : start - 1] + "${")
            pos = start + 2
            continue
        literal.append(template[pos:start])
        end = _closing_brace(template, start + 2)
        if end == -1:
            raise MappingError(
                "malformed expression: '${' is never closed with '}'",
                expression=template[start:],
                path=json_path,
            )
        text = template[start : end + 1]
        try:
            expression = parse_expression(template[start + 2 : end], text)
        except MappingError as error:
            raise MappingError(error.reason, expression=text, path=json_path) from None
        text_before = "".join(literal)
        if text_before:
            yield text_before
        literal = []
        yield expression
        pos = end + 1
    joined = "".join(literal)
    if joined:
        yield joined


def _child_path(json_path: str, key: Segment) -> str:
    if isinstance(key, int):
        return f"{json_path}[{key}]"
    if _NAME_RE.fullmatch(key):
        return f"{json_path}.{key}"
    return f"{json_path}[{json.dumps(key)}]"


def find_expressions(mapping: JSON, json_path: str = "$") -> Iterator[tuple[str, Expression | MappingError]]:
    """List every placeholder in a mapping, with where it is.

    Malformed placeholders are yielded as :class:`MappingError` values rather
    than raised, so a validator can report all of them at once.

    Args:
        mapping: A JSON value (typically a step's ``input_mapping``).
        json_path: The JSON path of ``mapping`` itself.

    Yields:
        ``(json_path, expression_or_error)`` pairs, depth first.
    """
    if isinstance(mapping, str):
        try:
            for part in scan_template(mapping, json_path):
                if isinstance(part, Expression):
                    yield json_path, part
        except MappingError as error:
            yield json_path, error
    elif isinstance(mapping, Mapping):
        for key, value in mapping.items():
            yield from find_expressions(value, _child_path(json_path, str(key)))
    elif isinstance(mapping, list | tuple):
        for index, value in enumerate(mapping):
            yield from find_expressions(value, _child_path(json_path, index))


def _describe(value: JSON) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def resolve_expression(expression: Expression, context: MappingContext, json_path: str = "$") -> JSON:
    """The value one placeholder names, or its default when that is not there.

    Raises:
        MappingError: The value is not there and no default was given.
    """
    if not expression.has_default:
        return _lookup(expression, context, json_path)
    try:
        value = _lookup(expression, context, json_path)
    except MappingError:
        return expression.default
    return expression.default if value is None else value


def _lookup(expression: Expression, context: MappingContext, json_path: str) -> JSON:
    if expression.reads_item:
        if context.item is _NO_ITEM:
            raise MappingError(
                f"{expression.text} is only known in a map step", expression=expression.text, path=json_path
            )
        if expression.kind == "index":
            return context.index
        value = context.item
        trail = "map.item"
    elif expression.step_id is None:
        value = context.workflow_input
        trail = "workflow.input"
    else:
        if expression.step_id not in context.step_outputs:
            raise MappingError(
                f"step {expression.step_id!r} has no output (it has not finished)",
                expression=expression.text,
                path=json_path,
                missing=expression.step_id,
                available=tuple(sorted(context.step_outputs)),
            )
        value = context.step_outputs[expression.step_id]
        trail = f"{expression.step_id}.output"
    for segment in expression.path:
        if isinstance(segment, int):
            if not isinstance(value, list | tuple):
                raise MappingError(
                    f"cannot take index [{segment}] of {trail}: it is {_describe(value)}",
                    expression=expression.text,
                    path=json_path,
                    missing=segment,
                )
            if segment >= len(value):
                raise MappingError(
                    f"index [{segment}] is out of range: {trail} has {len(value)} item(s)",
                    expression=expression.text,
                    path=json_path,
                    missing=segment,
                    available=tuple(f"[{i}]" for i in range(min(len(value), 10))),
                )
            value = value[segment]
            trail = f"{trail}[{segment}]"
        else:
            if not isinstance(value, Mapping):
                raise MappingError(
                    f"cannot take key {segment!r} of {trail}: it is {_describe(value)}",
                    expression=expression.text,
                    path=json_path,
                    missing=segment,
                )
            if segment not in value:
                keys = tuple(sorted(str(k) for k in value))
                shown = ", ".join(keys) if keys else "none"
                raise MappingError(
                    f"no key {segment!r} in {trail} (available: {shown})",
                    expression=expression.text,
                    path=json_path,
                    missing=segment,
                    available=keys,
                )
            value = value[segment]
            trail = _child_path(trail, segment)
    return value


def _to_text(value: JSON, expression: Expression, json_path: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise MappingError(
            f"value is not JSON and cannot be interpolated: {error}",
            expression=expression.text,
            path=json_path,
        ) from None


def _resolve(node: JSON, context: MappingContext, json_path: str, depth: int) -> JSON:
    if depth > _MAX_DEPTH:
        raise MappingError(f"mapping is nested deeper than {_MAX_DEPTH} levels", path=json_path)
    if isinstance(node, str):
        parts = list(scan_template(node, json_path))
        if len(parts) == 1 and isinstance(parts[0], Expression):
            return resolve_expression(parts[0], context, json_path)
        out: list[str] = []
        for part in parts:
            if isinstance(part, Expression):
                out.append(_to_text(resolve_expression(part, context, json_path), part, json_path))
            else:
                out.append(part)
        return "".join(out)
    if isinstance(node, Mapping):
        resolved: dict[str, JSON] = {}
        for key, value in node.items():
            if not isinstance(key, str):
                raise MappingError(f"object keys must be strings, not {type(key).__name__}", path=json_path)
            resolved[key] = _resolve(value, context, _child_path(json_path, key), depth + 1)
        return resolved
    if isinstance(node, list | tuple):
        return [_resolve(value, context, _child_path(json_path, i), depth + 1) for i, value in enumerate(node)]
    if node is None or isinstance(node, bool | int | float):
        return node
    raise MappingError(f"unsupported value of type {type(node).__name__} (mappings are JSON)", path=json_path)


def resolve_mapping(mapping: JSON, context: MappingContext) -> JSON:
    """Resolve every placeholder in ``mapping`` against ``context``.

    Args:
        mapping: A JSON value: objects and lists are resolved recursively.
        context: The run's input and the outputs of finished steps.

    Returns:
        A new JSON value; ``mapping`` is not changed.

    Raises:
        MappingError: A placeholder is malformed or names something missing.
    """
    try:
        return _resolve(mapping, context, "$", 0)
    except RecursionError:  # pragma: no cover - guarded by _MAX_DEPTH
        raise MappingError("mapping is nested too deeply") from None
