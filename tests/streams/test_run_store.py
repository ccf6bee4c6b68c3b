"""How a run is laid out in the ``runs`` table (streams/run_store.py): a small head, and its parts apart.

States are built by the pure state machine (:func:`models.run.transition`),
through the shell of tests/streams/test_shell.py over a dict that counts what
is written, or by :func:`tests.streams.test_views.drive`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from pydantic import JsonValue

from models.messages import AgentResult, AgentTask, ErrorKind, ResultStatus, decode
from models.plan import WorkflowPlan
from models.run import AgentResultReceived, RetryRequested, RunState, RunStatus, StepStatus, execution_key
from streams.run_store import (
    SMALL_RUN_HEAD_BYTES,
    SMALL_RUN_PARTS,
    Layout,
    inline_of,
    is_split,
    parts_named_by,
    read_state,
    records_of,
)
from tests.models.run_builders import INPUT, RUN_ID, at, failure, make_plan, result, start, step, submitted
from tests.streams.test_shell import Rig, make_rig
from tests.streams.test_views import chain_answer, chain_plan, drive, loop_answer, loop_plan, map_answer, map_plan
from tests.streams.test_views import make_plan as plan_of

KEY = RUN_ID.encode()
LAYOUT = Layout(RUN_ID)
PLAN_KEY = LAYOUT.plan
INPUT_KEY = LAYOUT.input
LIMIT = 16_384  # the least SWITCHYARD_MAX_MESSAGE_BYTES allows


class CountingTable(dict[bytes, bytes]):
    """A dict as the ``runs`` table that notes every key written and deleted, in order."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.written: list[bytes] = []
        self.deleted: list[bytes] = []

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.written.append(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: bytes) -> None:
        self.deleted.append(key)
        super().__delitem__(key)

    def forget(self) -> None:
        """Start counting again."""
        self.written.clear()
        self.deleted.clear()


def counting_rig(table: CountingTable | None = None, max_message_bytes: int = 1_000_000) -> tuple[Rig, CountingTable]:
    runs = CountingTable() if table is None else table
    return make_rig(runs=runs, max_message_bytes=max_message_bytes), runs


def records_in(table: dict[bytes, bytes], run_id: str = RUN_ID) -> dict[bytes, bytes]:
    """The records of one run in the table: its head and every part (a key under ``<run_id>/``)."""
    head = run_id.encode()
    return {k: v for k, v in table.items() if k == head or k.startswith(head + b"/")}


def assert_stored_exactly(table: dict[bytes, bytes], state: RunState) -> None:
    """The table reads back as ``state``, and holds nothing of its run that its head does not name (no orphan)."""
    head = table[state.run_id.encode()]
    named = {state.run_id.encode(), *parts_named_by(state.run_id, head)}
    present = set(records_in(table, state.run_id))
    assert present <= named, sorted(present - named)
    assert read_state(table, state.run_id, head) == state


def store(table: dict[bytes, bytes], old: RunState | None, new: RunState) -> None:
    """Write ``new`` where ``old`` was stored, as the shell does: parts, the head, then deletes."""
    head = Layout(new.run_id).head
    records = records_of(old, new, None, inline_of(table[head]) if old is not None and head in table else None)
    for key, value in records.writes.items():
        if key != head:
            table[key] = value
    table[head] = records.writes[head]
    for key in records.deletes:
        table.pop(key, None)


async def answer_all(
    rig: Rig,
    runs: CountingTable,
    answer: Callable[[AgentTask], JsonValue],
    after_each: Callable[[], None] | None = None,
) -> list[list[bytes]]:
    """Answer every task the shell sends, in the order sent, the n-th at at(n), until none is left.

    Args:
        rig: The shell.
        runs: Its table.
        answer: The output of each task.
        after_each: Called after each result is applied.

    Returns:
        The keys each result wrote, in order.
    """
    written: list[list[bytes]] = []
    answered = 0
    while answered < len(rig.tasks.sent):
        task = decode(AgentTask, rig.tasks.sent[answered][1])
        answered += 1
        when = at(answered)
        reply = AgentResult(
            correlation_id=task.correlation_id,
            run_id=task.run_id,
            step_id=task.step_id,
            attempt=task.attempt,
            iteration=task.iteration,
            item=task.item,
            status=ResultStatus.SUCCESS,
            output=answer(task),
            started_at=when,
            finished_at=when,
        )
        runs.forget()
        await rig.shell.handle(AgentResultReceived(result=reply, at=when))
        written.append(list(runs.written))
        if after_each is not None:
            after_each()
    return written


def assert_written(written: list[bytes], executions: Iterable[str], steps: Iterable[bytes] = ()) -> None:
    """An event of a stored run wrote a few parts, then its head, last.

    The event changed ``executions`` and ``steps``: those stay in the head, and
    what the event before changed moves to its parts now (tests/streams/
    test_run_store_crash.py checks that a part only ever gets the value the
    stored head had). So the parts are bounded by what two events change, never
    by the run's length.
    """
    assert written[-1] == KEY, written
    parts = written[:-1]
    assert all(b"/x/" in p or b"/s/" in p or b"/items/" in p for p in parts), parts
    assert len(parts) <= 2 * (len(list(executions)) + len(list(steps))) + 2, parts


# ------------------------------------------------------------ what is written


def execution_cost(key: str) -> int:
    """What one more execution key costs in the head's list of keys: the key, its quotes and a comma."""
    return len(json.dumps(key)) + 1


DIGIT_SLACK = 160
"""Bytes a head may gain as its numbers grow a digit (step numbers, the version), whatever the run's length."""


async def test_a_chain_runs_head_stays_about_the_same_size_across_its_steps() -> None:
    rig, runs = counting_rig()
    await rig.shell.handle(submitted(make_plan(50)))
    heads: list[int] = []
    for index in range(50):
        await rig.shell.handle(result(rig.state(), at(index + 1)))
        heads.append(len(runs[KEY]))
    final = rig.state()
    assert final.status is RunStatus.COMPLETED
    keys = list(final.executions)
    assert keys == [execution_key(f"s{i}") for i in range(1, 51)]

    # While the run is small its head holds its steps and executions. From the step after it stops being
    # small (step `first`: the run holds first + 1 steps and executions), the head after step n holds the
    # executions and steps of step `first`'s head and the keys of the n - first executions and steps added since.
    first = SMALL_RUN_PARTS // 2 + 1
    base = heads[first - 1]
    for n, size in enumerate(heads[first:], start=first + 1):
        added = keys[first + 1 : n + 1]
        steps_added = [f"s{i}" for i in range(first + 2, n + 2)]
        allowed = base + sum(execution_cost(k) for k in added) + sum(execution_cost(s) for s in steps_added)
        assert size <= allowed + DIGIT_SLACK, f"after step {n} the head is {size} bytes, {size - base} more"
    assert heads[-1] < 2 * base
    assert max(heads[:first]) < 2 * base  # a small run's head: a few steps, never more than about twice that


async def test_a_small_run_writes_its_head_alone_at_each_event() -> None:
    # A chain of 3: its plan, its input and its head at the start, then one record (the head) per result.
    rig, runs = counting_rig()
    await rig.shell.handle(submitted(make_plan(3)))
    assert runs.written == [PLAN_KEY, INPUT_KEY, KEY]
    for index in range(1, 4):
        runs.forget()
        await rig.shell.handle(result(rig.state(), at(index)))
        assert runs.written == [KEY]
    final = rig.state()
    assert final.status is RunStatus.COMPLETED
    assert sorted(json.loads(runs[KEY])["inline"]) == ["s1@1", "s2@1", "s3@1"]
    assert set(records_in(runs)) == {KEY, PLAN_KEY, INPUT_KEY}
    assert_stored_exactly(runs, final)


async def test_a_run_that_grows_past_small_moves_what_settled_to_its_parts_once() -> None:
    rig, runs = counting_rig()
    steps = SMALL_RUN_PARTS
    await rig.shell.handle(submitted(make_plan(steps)))
    written: list[list[bytes]] = []
    for index in range(1, steps + 1):
        runs.forget()
        await rig.shell.handle(result(rig.state(), at(index)))
        written.append(list(runs.written))
    small = SMALL_RUN_PARTS // 2  # the results after which the run still holds at most SMALL_RUN_PARTS
    assert all(w == [KEY] for w in written[: small - 1]), written
    # The first result past it moves every step and execution the stored head held and this one left alone.
    moved = written[small - 1]
    assert moved[-1] == KEY
    assert sorted(moved[:-1]) == sorted(
        [*(LAYOUT.execution(f"s{i}@1") for i in range(1, small)), *(LAYOUT.step(f"s{i}") for i in range(1, small))]
    )
    # Then as for any run: what the event before changed, and the head.
    for index, keys in enumerate(written[small:], start=small + 1):
        assert_written(keys, [f"s{index}@1"], [LAYOUT.step(f"s{index - 1}")])
    assert_stored_exactly(runs, rig.state())


async def test_a_small_run_with_a_large_head_moves_what_settled_to_its_parts() -> None:
    # Two steps only, but s1's output alone is larger than a small run's head may be.
    rig, runs = counting_rig()
    await rig.shell.handle(submitted(make_plan(3)))
    await rig.shell.handle(result(rig.state(), at(1), output={"summary": "x" * SMALL_RUN_HEAD_BYTES}))
    assert len(runs[KEY]) > SMALL_RUN_HEAD_BYTES  # s1's execution changed: in the head
    runs.forget()
    await rig.shell.handle(result(rig.state(), at(2)))
    assert LAYOUT.execution("s1@1") in runs.written
    assert "s1@1" not in json.loads(runs[KEY])["inline"]
    assert_stored_exactly(runs, rig.state())


async def test_each_result_writes_the_head_and_only_the_executions_and_the_step_it_changed() -> None:
    rig, runs = counting_rig()
    await rig.shell.handle(submitted(make_plan(5)))
    # A new run: its plan, its input, then its head, which holds s1's step and execution (the event changed them).
    assert runs.written == [PLAN_KEY, INPUT_KEY, KEY]
    assert list(json.loads(runs[KEY])["inline_steps"]) == ["s1"]
    assert list(json.loads(runs[KEY])["inline"]) == ["s1@1"]
    for index in range(1, 6):
        runs.forget()
        await rig.shell.handle(result(rig.state(), at(index)))
        # The execution that finished and the next one (started), then the step that finished, then the head
        # (last: it names its parts); the next step is inline in the head.
        started = [f"s{index + 1}@1"] if index < 5 else []
        assert_written(runs.written, [f"s{index}@1", *started], [LAYOUT.step(f"s{index}")])
        assert rig.checkpoints.put_changed[-1] == frozenset({f"s{index}@1", *started})
        assert runs.deleted == []
    assert rig.state().status is RunStatus.COMPLETED
    assert_stored_exactly(runs, rig.state())


async def test_each_item_of_a_map_writes_its_own_execution_and_the_list_is_written_once() -> None:
    rig, runs = counting_rig()
    await rig.shell.handle(submitted(map_plan(), run_input={"n": 4}))
    written = await answer_all(rig, runs, map_answer)
    final = rig.state()
    assert final.status is RunStatus.COMPLETED
    assert final.output_of("each") == ["DOC-0!", "DOC-1!", "DOC-2!", "DOC-3!"]

    split, *items, merge = written
    # split's execution and the first two items (at most 2 at a time), split's step, the list once, as the map
    # step starts (open: in the head), then the head.
    assert_written(split, ["split@1", "each@1[0]", "each@1[1]"], [LAYOUT.step("split"), LAYOUT.items("each")])
    # Each item's result: its execution and the next item's (started), then the head.
    assert_written(items[0], ["each@1[0]", "each@1[2]"])
    assert_written(items[1], ["each@1[1]", "each@1[3]"])
    assert_written(items[2], ["each@1[2]"])
    assert_written(items[3], ["each@1[3]", "merge@1"], [LAYOUT.step("each")])  # the last item ends the step
    assert_written(merge, ["merge@1"], [LAYOUT.step("merge")])
    assert json.loads(runs[LAYOUT.items("each")]) == [f"doc-{i}" for i in range(4)]
    # The items' executions are not named one by one in the head: by their count.
    head = json.loads(runs[KEY])
    assert head["executions"] == ["split@1", "merge@1"]
    assert head["map_items"] == {"each": [4]}
    assert_stored_exactly(runs, final)


def big_map_plan(n: int) -> WorkflowPlan:
    """split -> each (a map over split's ``n`` documents, 10 at a time) -> merge."""
    return plan_of(
        "split",
        {"id": "split", "input_mapping": {"n": n}, "next_step": "each"},
        {
            "id": "each",
            "map": {"over": "${split.output.docs}", "max_concurrency": 10},
            "input_mapping": {"doc": "${map.item}"},
            "next_step": "merge",
        },
        {"id": "merge", "input_mapping": {"count": "${each.output}"}},
    )


async def test_a_map_of_1000_items_keeps_its_head_about_the_same_size_from_its_first_result_to_its_last() -> None:
    n = 1000

    def answer(task: AgentTask) -> JsonValue:
        if task.step_id == "split":
            return {"docs": [f"doc-{i}" for i in range(n)]}
        assert isinstance(task.input, dict)
        return task.input["doc"] if task.step_id == "each" else "merged"

    rig, runs = counting_rig()
    await rig.shell.handle(submitted(big_map_plan(n), run_input={}))
    heads: list[bytes] = []
    written = await answer_all(rig, runs, answer, after_each=lambda: heads.append(runs[KEY]))
    final = rig.state()
    assert final.status is RunStatus.COMPLETED
    assert final.output_of("each") == [f"doc-{i}" for i in range(n)]

    # heads[0]: after split's result (the map has started); heads[1..n]: after each item's result.
    item_heads = heads[1 : n + 1]
    sizes = [len(h) for h in item_heads]
    # No item key is listed among the head's executions: only how many items the map started.
    assert not any("[" in key for h in heads for key in json.loads(h)["executions"])
    assert json.loads(item_heads[0])["map_items"] == {"each": [11]}  # 10 started, then one more
    assert json.loads(item_heads[-1])["map_items"] == {"each": [n]}
    # While items are in flight the head changes only by its numbers' digits; the last item's result closes the
    # map step (out of the head) and opens merge (into it): about the same again, where 1000 listed keys would
    # have cost more than ten times the whole head.
    assert max(sizes[:-1]) <= sizes[0] + DIGIT_SLACK  # the last one holds the run's output: it has ended
    listed = sum(execution_cost(execution_key("each", 1, i)) for i in range(n))
    assert listed > 5 * max(sizes[:-1])
    # Each item's result writes a few records, however many items came before it (the first also settles the
    # items the map opened at once).
    assert len(written[1]) <= 10 + 3
    assert max(len(w) for w in written[2 : n + 1]) <= 5
    assert_stored_exactly(runs, final)


async def test_the_plan_is_written_once() -> None:
    rig, runs = counting_rig()
    await rig.shell.handle(submitted(make_plan(3)))
    state = rig.state()
    await rig.shell.handle(failure(state, at(1)))  # s1 is tried again (after a delay)
    state = rig.state()
    await rig.shell.handle(result(state, at(20)))
    for index in range(2, 4):
        await rig.shell.handle(result(rig.state(), at(20 + index)))
    assert rig.state().status is RunStatus.COMPLETED
    assert runs.written.count(PLAN_KEY) == 1
    assert json.loads(runs[PLAN_KEY]) == make_plan(3).model_dump(mode="json")
    assert runs.written.count(INPUT_KEY) == 1  # the input too
    assert json.loads(runs[INPUT_KEY]) == INPUT


# -------------------------------------------------------------- reading back


def every_state() -> list[RunState]:
    """The states of a chain with a retry, a loop, a map, and a run failed then retried."""
    states = [
        *drive(chain_plan(), chain_answer(), {"topic": "kafka"}),
        *drive(loop_plan(), loop_answer()),
        *drive(map_plan(), map_answer, {"n": 4}),
    ]
    failed = start(make_plan(3))
    failed, _ = step(failed, result(failed, at(1)))
    failed, _ = step(failed, failure(failed, at(2), retriable=False))
    retried, _ = step(failed, RetryRequested(run_id=RUN_ID, at=at(3)))
    return [*states, failed, retried]


def test_a_state_read_back_from_its_records_is_the_state() -> None:
    for state in every_state():
        table = dict(records_of(None, state).writes)
        assert read_state(table, state.run_id, table[state.run_id.encode()]) == state


def map_in_loop_plan() -> WorkflowPlan:
    """split -> each (a map over split's documents) -> review, which loops back to split until it approves."""
    return plan_of(
        "split",
        {"id": "split", "input_mapping": {"round": "${review.output.round ?? 0}"}, "next_step": "each"},
        {
            "id": "each",
            "map": {"over": "${split.output.docs}", "max_concurrency": 2},
            "input_mapping": {"doc": "${map.item}"},
            "next_step": "review",
        },
        {
            "id": "review",
            "input_mapping": {"all": "${each.output}"},
            "loop": {"back_to": "split", "while": "${review.output.approved} == false", "max_iterations": 3},
        },
    )


def head_of(state: RunState) -> dict[str, Any]:
    """The head that stores ``state``, parsed."""
    head: dict[str, Any] = json.loads(records_of(None, state).writes[Layout(state.run_id).head])
    return head


def map_in_loop_answer(task: AgentTask) -> JsonValue:
    """Three documents in the first iteration, two in the second, which review approves."""
    if task.step_id == "split":
        return {"docs": [f"doc-{task.iteration}-{i}" for i in range({1: 3, 2: 2}[task.iteration])]}
    if task.step_id == "each":
        assert isinstance(task.input, dict)
        return f"{task.input['doc']}!"
    return {"approved": task.iteration >= 2, "round": task.iteration}


def test_a_map_step_inside_a_loop_reads_back_from_its_records_in_both_iterations() -> None:
    states = drive(map_in_loop_plan(), map_in_loop_answer)
    final = states[-1]
    assert final.status is RunStatus.COMPLETED
    each = final.steps["each"]
    assert (each.iteration, each.past_items, each.next_item) == (2, (3,), 2)
    assert final.output_of("each") == ["doc-2-0!", "doc-2-1!"]
    items = [k for k, e in final.executions.items() if e.item is not None]
    assert items == [*(execution_key("each", 1, i) for i in range(3)), *(execution_key("each", 2, i) for i in range(2))]
    # The second iteration, before its map starts: the first one's items are named by their count alone.
    reopened = next(s for s in states if "each" in s.steps and s.steps["each"].iteration == 2)
    assert (reopened.steps["each"].past_items, reopened.steps["each"].next_item) == ((3,), 0)
    assert head_of(reopened)["map_items"] == {"each": [3, 0]}

    for state in states:
        table = dict(records_of(None, state).writes)
        assert read_state(table, state.run_id, table[state.run_id.encode()]) == state
    head = head_of(final)
    assert head["map_items"] == {"each": [3, 2]}
    assert not any("[" in key for key in head["executions"])


async def test_a_map_step_inside_a_loop_stored_by_the_shell_reads_back_after_each_result() -> None:
    rig, runs = counting_rig()
    await rig.shell.handle(submitted(map_in_loop_plan(), run_input={}))
    seen: list[RunState] = []
    deleted: list[list[bytes]] = []

    def check() -> None:
        state = rig.state()
        assert_stored_exactly(runs, state)
        seen.append(state)
        deleted.append(list(runs.deleted))

    written = await answer_all(rig, runs, map_in_loop_answer, after_each=check)
    assert seen[-1].status is RunStatus.COMPLETED
    assert seen[-1].steps["each"].past_items == (3,)
    # review's first result starts the second iteration: the body's finished steps are reopened (into the head),
    # their records and the first list go (review never finished apart: it is reopened by the result that ends
    # it); split@2's execution is written. No other result deletes anything.
    reopening = next(i for i, state in enumerate(seen) if state.steps["split"].iteration == 2)
    assert deleted[reopening] == [LAYOUT.items("each")]  # the first iteration's list; the steps are rewritten
    assert_written(written[reopening], ["review@1", "split@2"])
    assert [d for i, d in enumerate(deleted) if i != reopening] == [[]] * (len(deleted) - 1)
    assert json.loads(runs[LAYOUT.items("each", 2)]) == ["doc-2-0", "doc-2-1"]


@pytest.mark.parametrize("plan", ["chain", "loop", "map", "map-in-loop"])
def test_a_state_stored_change_by_change_reads_back_as_each_state(plan: str) -> None:
    states = {
        "chain": lambda: drive(chain_plan(), chain_answer(), {"topic": "kafka"}),
        "loop": lambda: drive(loop_plan(), loop_answer()),
        "map": lambda: drive(map_plan(), map_answer, {"n": 4}),
        "map-in-loop": lambda: drive(map_in_loop_plan(), map_in_loop_answer),
    }[plan]()
    table: dict[bytes, bytes] = {}
    old: RunState | None = None
    for state in states:
        store(table, old, state)
        assert_stored_exactly(table, state)
        old = state


# ------------------------------------------------------------------ legacy


async def test_a_state_stored_whole_is_read_then_rewritten_in_this_layout() -> None:
    state = start(make_plan(3))
    state, _ = step(state, result(state, at(1)))
    legacy = state.model_dump_json().encode()
    rig, runs = counting_rig(CountingTable({KEY: legacy}))

    assert not is_split(legacy)
    assert rig.shell.load(RUN_ID) == state
    assert rig.state() == state

    await rig.shell.handle(result(state, at(2)))

    new = rig.state()
    assert new.version == state.version + 1
    assert is_split(runs[KEY])
    assert "plan" not in json.loads(runs[KEY])
    # Every record of the new layout is written, as for a new run (nothing of it was stored apart): the plan, the
    # input, every execution in order (s3's, just started, too), both finished steps, then the head; no legacy
    # bytes stay.
    assert runs.written == [PLAN_KEY, INPUT_KEY, KEY]  # the head holds all the rest, until it settles
    assert runs.deleted == []
    assert_stored_exactly(runs, new)
    assert legacy not in runs.values()


# ------------------------------------------------------------------ retries


async def test_a_retry_that_reopens_a_failed_execution_rewrites_its_record_and_brings_its_step_into_the_head() -> None:
    rig, runs = counting_rig()
    await rig.shell.handle(submitted(make_plan(3)))
    await rig.shell.handle(result(rig.state(), at(1)))
    runs.forget()
    await rig.shell.handle(failure(rig.state(), at(2), retriable=False))
    failed = rig.state()
    assert failed.status is RunStatus.FAILED
    part, step_part = LAYOUT.execution("s2@1"), LAYOUT.step("s2")
    assert_written(runs.written, ["s2@1"], [step_part])  # the failed execution and step, then the head
    assert failed.executions["s2@1"].status is StepStatus.FAILED
    assert "s2@1" in json.loads(runs[KEY])["inline"]

    runs.forget()
    await rig.shell.handle(RetryRequested(run_id=RUN_ID, at=at(3)))

    retried = rig.state()
    assert retried.status is RunStatus.RUNNING
    assert retried.executions["s2@1"].status is StepStatus.RUNNING
    # The reopened execution and step are in the head; nothing is deleted.
    assert runs.written[-1] == KEY
    assert runs.deleted == []
    assert json.loads(runs[KEY])["inline"][part.decode().split("/x/", 1)[1]]["status"] == "RUNNING"
    head = json.loads(runs[KEY])
    assert head["steps"] == ["s1", "s2"]
    assert "s2" in head["inline_steps"]
    assert head["executions"] == ["s1@1", "s2@1"]
    assert_stored_exactly(runs, retried)

    # Finished again: its step stored apart again, s3 started.
    runs.forget()
    await rig.shell.handle(result(retried, at(4)))
    assert_written(runs.written, ["s2@1", "s3@1"], [step_part])
    assert runs.deleted == []
    assert_stored_exactly(runs, rig.state())


# --------------------------------------------------------------- reductions


async def run_long_history(rig: Rig, n_steps: int = 30, run_input: dict[str, JsonValue] | None = None) -> None:
    """A chain of ``n_steps`` whose first ``n_steps - 1`` steps have succeeded: its last one is in flight."""
    await rig.shell.handle(submitted(make_plan(n_steps), run_input=run_input))
    for index in range(1, n_steps):
        await rig.shell.handle(result(rig.state(), at(index)))
    assert rig.state().status is RunStatus.RUNNING
    # The head, the plan, the input, the finished steps, and every execution (the last one, in flight, too).
    assert_stored_exactly(rig.runs, rig.state())


async def test_a_run_failed_too_large_leaves_no_orphan_part() -> None:
    # Its last result is over the limit: the run fails, reduced (here, its history given up: its parts must go).
    rig, runs = counting_rig(max_message_bytes=LIMIT)
    await run_long_history(rig)
    await rig.shell.handle(result(rig.state(), at(40), output={"summary": "x" * 30_000}))

    state = rig.state()
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.kind == ErrorKind.STATE_TOO_LARGE
    assert_stored_exactly(runs, state)
    assert all(len(k) + len(v) <= LIMIT for k, v in records_in(runs).items())


async def test_a_stored_run_over_a_lowered_limit_failed_too_large_leaves_no_orphan_part() -> None:
    # Stored under a larger limit (its input, and each execution's attempt that read it, hold 20 kB), read under
    # the least one: the head is small, so it is read and goes on, but the result rewrites s30's execution, over
    # the limit: the run fails, reduced (its history given up: its parts must go).
    big, runs = counting_rig()
    await run_long_history(big, run_input={"text": "y" * 20_000})
    assert len(runs[INPUT_KEY]) > LIMIT
    rig, _ = counting_rig(runs, max_message_bytes=LIMIT)

    await rig.shell.handle(result(big.state(), at(40)))

    state = rig.state()
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.kind == ErrorKind.STATE_TOO_LARGE
    # Failed by what it would write, or by its stored head, over the lowered limit: either way, reduced.
    assert_stored_exactly(runs, state)
    assert all(len(k) + len(v) <= LIMIT for k, v in records_in(runs).items())


async def test_a_run_whose_stored_part_is_missing_is_failed_and_leaves_no_orphan_part() -> None:
    # A head that names a part the table lost: the run cannot be read, and fails (unreadable_state).
    donor, runs = counting_rig()
    await run_long_history(donor, n_steps=SMALL_RUN_PARTS)  # not small any more: s1@1 has its own record
    del runs[Layout(RUN_ID).execution("s1@1")]
    rig, _ = counting_rig(runs)  # a restarted worker: nothing parsed yet

    assert rig.shell.load(RUN_ID) is None
    await rig.shell.handle(result(start(make_plan(SMALL_RUN_PARTS)), at(10)))

    state = rig.state()
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert state.error.kind == ErrorKind.UNREADABLE_STATE
    assert "s1@1" in state.error.message
    assert_stored_exactly(runs, state)
