"""How a run's state is laid out in the ``runs`` table: a small head, and what never changes again apart.

A run whose whole state was one record cost, at every event, work and bytes
in proportion to everything it had done: a 50-step run's last step wrote all
50 steps again, and a map of 1,000 items wrote the list and every item's
output at each of its 1,000 results. So a state is stored as:

* ``<run_id>``: the **head**: the run's fields, the keys of its steps and
  executions, and, whole, those its last event changed;
* ``<run_id>/plan`` and ``<run_id>/input``: the plan and the run's input, written once;
* ``<run_id>/s/<step>`` and ``<run_id>/x/<execution key>``: each step and
  execution that has settled, written at the first event after its last
  change (so a part never holds a value the stored head does not hold too;
  see :func:`records_of`);
* ``<run_id>/items/<step>@<iteration>``: a map step's list, written once per iteration.

An event then writes the head and what the event before it changed: usually
an execution or two and a step.

A **small run** keeps what settled in its head instead: while it has at most
:data:`SMALL_RUN_PARTS` steps and executions together and its stored head is
at most :data:`SMALL_RUN_HEAD_BYTES`, an event writes its head alone. Most
runs are a few steps long, and a record costs the table, its changelog and
the broker about the same whatever its size up to a few kilobytes (the
embedded broker spends about 55 µs of CPU per record, and 20 µs more per
kilobyte): a 3-step run wrote 10 records, and now writes 6. Past either
bound, the run moves what settled to its parts at its next event and goes on
as above, so what an event writes stays bounded by these two constants.
``/`` is in no run id, so a head's key is a run id and nothing else is.
All records of a run are written by the event that changes them, on the
partition of that event, so they are co-partitioned like the run (rule 1).

States written before this layout (the whole state in one record at
``<run_id>``) are read as they are and written in this layout at their next
change.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from models.run import RunState, RunStatus
from models.run_state import map_item_counts, map_item_keys

__all__ = [
    "SMALL_RUN_HEAD_BYTES",
    "SMALL_RUN_PARTS",
    "Layout",
    "MissingPart",
    "StoredHead",
    "StoredRecords",
    "ended_at",
    "inline_of",
    "is_head_key",
    "is_split",
    "part_keys",
    "parts_named_by",
    "read_state",
    "records_of",
]

_LAYOUT: Final = 2
_SEP: Final = "/"

SMALL_RUN_PARTS: Final = 8
"""The most steps and executions (together) of a run whose head holds them all: a chain of 4 steps, say."""

SMALL_RUN_HEAD_BYTES: Final = 8192
"""The largest stored head of a small run: past it, what settled moves to its own records."""


def is_head_key(key: bytes) -> bool:
    """Whether a table key is a run's head (its run id), not one of its parts."""
    return b"/" not in key


def is_split(raw: bytes) -> bool:
    """Whether a head is of this layout (its parts are stored apart), not a whole state in one record."""
    return raw.endswith(b',"layout":2}')


@dataclass(frozen=True)
class StoredRecords:
    """What one change writes: records by key, keys to delete, and what the new head holds itself."""

    writes: dict[bytes, bytes]
    deletes: tuple[bytes, ...]
    head: StoredHead | None = None

    def biggest(self) -> int:
        """The size of the largest record written (key and value, as the limit counts)."""
        return max((len(k) + len(v) for k, v in self.writes.items()), default=0)


class Layout:
    """The keys of one run's records."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    @property
    def head(self) -> bytes:
        """The head's key: the run id."""
        return self.run_id.encode()

    @property
    def plan(self) -> bytes:
        """The plan's key."""
        return f"{self.run_id}{_SEP}plan".encode()

    @property
    def input(self) -> bytes:
        """The run input's key."""
        return f"{self.run_id}{_SEP}input".encode()

    def execution(self, key: str) -> bytes:
        """An execution's key."""
        return f"{self.run_id}{_SEP}x{_SEP}{key}".encode()

    def step(self, step_id: str) -> bytes:
        """A step's key."""
        return f"{self.run_id}{_SEP}s{_SEP}{step_id}".encode()

    def items(self, step_id: str, iteration: int = 1) -> bytes:
        """A map step's list's key, in one iteration."""
        return f"{self.run_id}{_SEP}items{_SEP}{step_id}@{iteration}".encode()


def _head(
    state: RunState, inline_executions: Iterable[str], inline_steps: Iterable[str], plain_keys: list[str]
) -> dict[str, Any]:
    # Fields at their defaults are left out (reading fills them in): a third fewer bytes to write and parse.
    data = state.model_dump(mode="json", exclude={"plan", "input", "executions", "steps"}, exclude_defaults=True)
    data["steps"] = list(state.steps)
    data["inline_steps"] = {
        k: state.steps[k].model_dump(mode="json", exclude={"items"}, exclude_defaults=True)
        for k in sorted(inline_steps)
    }
    # A map's item executions are named by their counts (one per iteration), not one by one.
    data["executions"] = plain_keys
    data["map_items"] = map_item_counts(state)
    data["inline"] = {
        k: state.executions[k].model_dump(mode="json", exclude_defaults=True) for k in sorted(inline_executions)
    }
    data["items"] = {k: s.iteration for k, s in state.steps.items() if s.items is not None}
    data["layout"] = _LAYOUT
    return data


@dataclass(frozen=True)
class StoredHead:
    """What :func:`records_of` needs of the stored head: what it holds itself, and its executions' keys."""

    inline: frozenset[str]
    inline_steps: frozenset[str]
    plain_keys: tuple[str, ...]
    size: int = 0
    """The head's length in bytes."""


def inline_of(raw: bytes) -> StoredHead | None:
    """What a stored head holds itself (None: not a head of this layout)."""
    if not is_split(raw):
        return None
    head = json.loads(raw)
    return StoredHead(
        frozenset(head.get("inline", ())),
        frozenset(head.get("inline_steps", ())),
        tuple(head.get("executions", ())),
        len(raw),
    )


def _encode(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def records_of(
    old: RunState | None,
    new: RunState,
    changed: frozenset[str] | None = None,
    old_inline: StoredHead | None = None,
) -> StoredRecords:
    """The records that store ``new`` where ``old`` was stored (None: nothing of this run was).

    **Crash safety.** One event writes several records, and a crash may send
    some of them and not the head. So a part is only ever written with the
    value it already had in the stored head: what an event changes stays in
    the head (``inline``), and moves to its own record at the next event that
    leaves it alone. Parts and the head then always agree: a part sent
    without its head holds what the old head holds too. Parts are deleted
    only after the head is written.

    Args:
        old: The stored state.
        new: The state to store.
        changed: The executions the transition changed (its checkpoint says);
            None: every one is compared with ``old``.
        old_inline: What the stored head holds itself (:func:`inline_of`);
            None: ``old`` was stored whole (or not at all), and every other
            record is written now.
    """
    layout = Layout(new.run_id)
    writes: dict[bytes, bytes] = {}
    if old is None or old.plan is not new.plan:
        writes[layout.plan] = new.plan.model_dump_json().encode()
    if old is None or old.input is not new.input:
        writes[layout.input] = _encode(new.input)
    previous = old.executions if old is not None else {}
    if changed is None or old is None:
        touched = {k for k, e in new.executions.items() if previous.get(k) is not e}
    else:
        touched = {k for k in changed if k in new.executions}
    steps_touched = {k for k, s in new.steps.items() if old is None or old.steps.get(k) is not s}
    inline_x, inline_s = touched, steps_touched
    if old_inline is None or old is None or len(new.executions) < len(old.executions):
        # Nothing of this layout yet (or a reduction dropped some): all but what this event changed is
        # written now, as it is.
        settled_x = [k for k in new.executions if k not in inline_x]
        settled_s = [k for k in new.steps if k not in inline_s]
        plain = [k for k, e in new.executions.items() if e.item is None]
    else:
        # What the stored head held and this event left alone: to its own record, unchanged.
        settled_x = sorted(k for k in old_inline.inline if k in new.executions and k not in inline_x)
        settled_s = sorted(k for k in old_inline.inline_steps if k in new.steps and k not in inline_s)
        if _small(new, old_inline):
            # Unchanged, so the same in the new head as in the stored one: they stay there.
            inline_x, inline_s = inline_x | set(settled_x), inline_s | set(settled_s)
            settled_x, settled_s = [], []
        # The keys grow by the executions this event opened (not by scanning them all).
        # (A transition adds executions at the end of the map, in the order it opens them.)
        count = len(new.executions) - len(previous)
        opened = list(itertools.islice(reversed(new.executions), count))[::-1] if count > 0 else []
        plain = [*old_inline.plain_keys, *(k for k in opened if new.executions[k].item is None)]
    for key in settled_x:
        writes[layout.execution(key)] = new.executions[key].model_dump_json(exclude_defaults=True).encode()
    for step_id in settled_s:
        writes[layout.step(step_id)] = (
            new.steps[step_id].model_dump_json(exclude={"items"}, exclude_defaults=True).encode()
        )
    for step_id, step in new.steps.items():
        before = old.steps.get(step_id) if old is not None else None
        if step.items is not None and (before is None or before.items is not step.items):
            # A key per iteration: a list the stored head names is never overwritten.
            writes[layout.items(step_id, step.iteration)] = _encode(list(step.items))
    head = _encode(_head(new, inline_x, inline_s, plain))
    writes[layout.head] = head
    deletes: list[bytes] = []
    if old is not None:
        if changed is None or len(new.executions) < len(old.executions):
            deletes.extend(layout.execution(k) for k in old.executions if k not in new.executions)
        for step_id, step in old.steps.items():
            kept = new.steps.get(step_id)
            if kept is step:
                continue
            if kept is None:
                deletes.append(layout.step(step_id))
            if step.items is not None and (kept is None or kept.items is not step.items):
                deletes.append(layout.items(step_id, step.iteration))
    stored = StoredHead(frozenset(inline_x), frozenset(inline_s), tuple(plain), len(head))
    return StoredRecords(writes, tuple(deletes), stored)


def _small(state: RunState, stored: StoredHead) -> bool:
    """Whether a run is small enough for its head to keep what settled (see the module's docstring)."""
    return len(state.executions) + len(state.steps) <= SMALL_RUN_PARTS and stored.size <= SMALL_RUN_HEAD_BYTES


def part_keys(state: RunState) -> Iterator[bytes]:
    """Every key of ``state`` but its head (to delete a run)."""
    layout = Layout(state.run_id)
    yield layout.plan
    yield layout.input
    for key in state.executions:
        yield layout.execution(key)
    for step_id, step in state.steps.items():
        yield layout.step(step_id)
        if step.items is not None:
            yield layout.items(step_id, step.iteration)


def parts_named_by(run_id: str, raw: bytes) -> list[bytes]:
    """The parts a stored head names, read from the head alone (to clean up after a run that cannot be read)."""
    try:
        head = json.loads(raw)
    except (ValueError, RecursionError):
        return []
    if not isinstance(head, dict) or head.get("layout") != _LAYOUT:
        return []
    layout = Layout(run_id)
    named = [layout.plan, layout.input]
    for field, key_of in (("executions", layout.execution), ("steps", layout.step)):
        keys = head.get(field)
        if isinstance(keys, list):
            named.extend(key_of(str(k)) for k in keys)
    items = head.get("items")
    if isinstance(items, dict):
        named.extend(layout.items(str(k), i) for k, i in items.items() if isinstance(i, int))
    maps = head.get("map_items")
    if isinstance(maps, dict):
        for step_id, counts in maps.items():
            if isinstance(counts, list) and all(isinstance(c, int) for c in counts):
                named.extend(layout.execution(k) for k in map_item_keys({str(step_id): counts}))
    return named


def ended_at(raw: bytes) -> datetime | None:
    """When a stored run finished, read from its head alone (None: it has not, or the head cannot say)."""
    try:
        head = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(head, dict) or head.get("status") not in _FINISHED:
        return None
    try:
        return datetime.fromisoformat(str(head.get("completed_at") or head.get("updated_at")))
    except ValueError:
        return None


_FINISHED: Final = frozenset(s.value for s in RunStatus if s.finished)


class MissingPart(ValueError):
    """A head names a record the table does not have."""


def _gathered(
    table: MutableMapping[bytes, bytes],
    keys: list[str],
    inline: dict[str, Any],
    key_of: Callable[[str], bytes],
    run: str,
    what: str,
) -> dict[str, Any]:
    """The head's steps or executions, in order: the open ones from the head, the others from their records."""
    found: dict[str, Any] = {}
    for key in keys:
        if key in inline:
            found[key] = inline[key]
            continue
        part = table.get(key_of(key))
        if part is None:
            raise MissingPart(f"the head of {run} names {what} {key!r}, which is not stored")
        found[key] = json.loads(part)
    return found


def read_state(table: MutableMapping[bytes, bytes], run_id: str, raw: bytes) -> RunState:
    """The state whose head is ``raw``, with its parts read from ``table``.

    Raises:
        ValueError: The head or a part cannot be read (pydantic's ValidationError
            is one), or a part is missing.
    """
    head = json.loads(raw)
    if not isinstance(head, dict) or head.get("layout") != _LAYOUT:
        return RunState.model_validate_json(raw)  # the whole state in one record (before this layout)
    layout = Layout(run_id)
    plan_raw, input_raw = table.get(layout.plan), table.get(layout.input)
    if plan_raw is None or input_raw is None:
        raise MissingPart(f"the head of run {run_id!r} has no {'plan' if plan_raw is None else 'input'} record")
    run = f"run {run_id!r}"
    head["steps"] = _gathered(table, head.pop("steps"), head.pop("inline_steps"), layout.step, run, "step")
    keys = [*head.pop("executions"), *map_item_keys(head.pop("map_items"))]
    executions = _gathered(table, keys, head.pop("inline"), layout.execution, run, "execution")
    for step_id, iteration in head.pop("items").items():
        part = table.get(layout.items(step_id, iteration))
        if part is None:
            raise MissingPart(f"the head of run {run_id!r} names the list of {step_id!r}, which is not stored")
        head["steps"][step_id]["items"] = json.loads(part)
    head.pop("layout")
    head["plan"] = json.loads(plan_raw)
    head["input"] = json.loads(input_raw)
    head["executions"] = executions
    return RunState.model_validate(head)
