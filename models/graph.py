"""The shape of a plan as a graph: which step leads where, what always runs before what.

Steps and their forward links (``next_step``, ``routes``, ``otherwise``) form
a directed graph that must be acyclic; a ``loop`` is the one way back, and is
kept apart from the forward links. Everything here is computed once per plan
(``WorkflowPlan.graph()`` keeps it) and is pure.

The facts the validator and the run state machine need:

* ``targets`` and ``predecessors`` of each step, and ``order``, a
  topological order (ties in the order steps are written);
* the ``body`` of each loop: the steps from its ``back_to`` step to the loop step;
* ``surely_done(step)``: the steps that have an output whenever ``step``
  starts, whatever the conditions chose. A mapping may read those without a
  default.
* ``won_by(join)``: for a ``"join": "any"`` step, the steps whose only use is
  to lead to it (they are cancelled or skipped once it starts).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.plan import WorkflowPlan, WorkflowStep

__all__ = ["PlanGraph", "find_cycle", "build_graph", "step_targets"]


def _as_list(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def step_targets(step: WorkflowStep) -> tuple[str, ...]:
    """Every step ``step`` may lead to (not its loop's way back), each once, in the order written."""
    out: list[str] = []
    for target in _as_list(step.next_step):
        out.append(target)
    for route in step.routes or ():
        out.extend(_as_list(route.to))
    out.extend(_as_list(step.otherwise))
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class PlanGraph:
    """The graph of one plan; built by :func:`plan_graph`.

    Attributes:
        start: The start step.
        targets: For each step, the steps it may lead to (only steps of the plan).
        predecessors: For each step, the steps that may lead to it.
        order: The steps in an order where each comes after all its predecessors
            (only the steps reachable from the start, and only when there is no cycle).
        reachable: The steps the start leads to, the start included.
        cycles: Each cycle of forward links, as ``(a, b, ..., a)``; the link that
            closes a cycle is left out of everything else, so the rest of the
            graph (and the validator's other checks) still has a meaning.
        bodies: For each loop step, the steps its iterations run (``back_to`` to itself).
    """

    start: str
    targets: Mapping[str, tuple[str, ...]]
    predecessors: Mapping[str, tuple[str, ...]]
    order: tuple[str, ...]
    reachable: frozenset[str]
    cycles: tuple[tuple[str, ...], ...]
    bodies: Mapping[str, tuple[str, ...]]
    _ancestors: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    _surely: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    dominators: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    """For each step, the steps on every path from the start to it."""
    always: set[str] = field(default_factory=set, repr=False)
    """The steps that run in every run that completes."""

    def ancestors(self, step_id: str) -> frozenset[str]:
        """The steps from which forward links lead to ``step_id``."""
        return self._ancestors.get(step_id, frozenset())

    def surely_done(self, step_id: str) -> frozenset[str]:
        """The steps that have an output whenever ``step_id`` starts."""
        return self._surely.get(step_id, frozenset())

    def loop_of(self, step_id: str) -> str | None:
        """The loop step whose body holds ``step_id``, if any."""
        for loop_step, body in self.bodies.items():
            if step_id in body:
                return loop_step
        return None

    def is_terminal(self, step_id: str) -> bool:
        """Whether ``step_id`` leads nowhere (a path of the run ends there)."""
        return not self.targets.get(step_id)

    @functools.cached_property
    def _descendants(self) -> dict[str, frozenset[str]]:
        out: dict[str, frozenset[str]] = {}
        for step_id in reversed(self.order):
            below: set[str] = set()
            for target in self.targets.get(step_id, ()):
                below.add(target)
                below |= out.get(target, frozenset())
            out[step_id] = frozenset(below)
        return out

    def won_by(self, join_id: str) -> frozenset[str]:
        """The steps that lead only to ``join_id``: every path from them passes through it, before any end."""
        only: dict[str, bool] = {}
        for step_id in reversed(self.order):
            targets = self.targets.get(step_id, ())
            only[step_id] = bool(targets) and all(t == join_id or only.get(t, False) for t in targets)
        # Its dominators finish before any branch into it starts: they never race.
        before = self.dominators.get(join_id, frozenset())
        return frozenset(
            s for s, yes in only.items() if yes and s != join_id and s in self.ancestors(join_id) and s not in before
        )


def find_cycle(steps: Iterable[str], targets: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """A cycle of links as ``(a, b, ..., a)``, or ``()`` when there is none."""
    colour: dict[str, int] = {}
    for root in steps:
        if colour.get(root):
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        trail: list[str] = []
        while stack:
            node, index = stack.pop()
            if index == 0:
                colour[node] = 1
                trail.append(node)
            nexts = targets.get(node, ())
            if index < len(nexts):
                stack.append((node, index + 1))
                child = nexts[index]
                if colour.get(child) == 1:
                    return (*trail[trail.index(child) :], child)
                if not colour.get(child):
                    stack.append((child, 0))
            else:
                colour[node] = 2
                trail.pop()
    return ()


def _topological(
    steps: list[str], reachable: frozenset[str], predecessors: Mapping[str, tuple[str, ...]]
) -> tuple[str, ...]:
    written = {s: i for i, s in enumerate(steps)}
    waiting = {s: sum(1 for p in predecessors[s] if p in reachable) for s in steps if s in reachable}
    ready = sorted((s for s, n in waiting.items() if n == 0), key=written.__getitem__)
    out: list[str] = []
    targets: dict[str, list[str]] = {s: [] for s in steps}
    for step_id in steps:
        for pred in predecessors[step_id]:
            targets[pred].append(step_id)
    while ready:
        step_id = ready.pop(0)
        out.append(step_id)
        for target in targets[step_id]:
            if target in waiting:
                waiting[target] -= 1
                if waiting[target] == 0:
                    ready.append(target)
                    ready.sort(key=written.__getitem__)
    return tuple(out)


def _dominators(
    order: tuple[str, ...], start: str, predecessors: Mapping[str, tuple[str, ...]]
) -> dict[str, frozenset[str]]:
    """For each step, the steps on every path from the start to it (itself excluded)."""
    dom: dict[str, frozenset[str]] = {}
    for step_id in order:
        preds = [p for p in predecessors[step_id] if p in dom]
        if step_id == start or not preds:
            dom[step_id] = frozenset()
            continue
        common = frozenset.intersection(*(dom[p] | {p} for p in preds))
        dom[step_id] = common
    return dom


def build_graph(plan: WorkflowPlan) -> PlanGraph:
    """The graph of ``plan`` (links to steps that do not exist are left out; the validator reports them).

    Use ``plan.graph()``, which builds it once per plan.
    """
    steps = list(plan.steps)
    known = set(steps)
    targets = {s: tuple(t for t in step_targets(plan.steps[s]) if t in known) for s in steps}
    cycles: list[tuple[str, ...]] = []
    while cycle := find_cycle(steps, targets):
        closing, closed = cycle[-2], cycle[-1]
        targets[closing] = tuple(t for t in targets[closing] if t != closed)
        if frozenset(cycle) not in {frozenset(c) for c in cycles}:
            cycles.append(cycle)
    predecessors: dict[str, list[str]] = {s: [] for s in steps}
    for step_id in steps:
        for target in targets[step_id]:
            predecessors[target].append(step_id)
    preds = {s: tuple(p) for s, p in predecessors.items()}

    reach: set[str] = set()
    if plan.start_step in known:
        todo = [plan.start_step]
        while todo:
            node = todo.pop()
            if node not in reach:
                reach.add(node)
                todo.extend(targets[node])
    reachable = frozenset(reach)
    order = _topological(steps, reachable, preds)

    ancestors: dict[str, frozenset[str]] = {}
    for step_id in order:
        above: set[str] = set()
        for pred in preds[step_id]:
            if pred in reachable:
                above.add(pred)
                above |= ancestors.get(pred, frozenset())
        ancestors[step_id] = frozenset(above)

    bodies: dict[str, tuple[str, ...]] = {}
    for step_id in order:
        loop = plan.steps[step_id].loop
        if loop is None or loop.back_to not in known:
            continue
        if loop.back_to == step_id:
            bodies[step_id] = (step_id,)
        elif loop.back_to in ancestors[step_id]:
            upstream = ancestors[step_id] | {step_id}
            bodies[step_id] = tuple(
                s for s in order if s in upstream and (s == loop.back_to or loop.back_to in ancestors[s])
            )

    graph = PlanGraph(plan.start_step, targets, preds, order, reachable, tuple(cycles), bodies, ancestors)
    graph.dominators.update(_dominators(order, plan.start_step, preds))
    graph._surely.update(_surely_done(plan, graph))
    return graph


def _surely_done(plan: WorkflowPlan, graph: PlanGraph) -> dict[str, frozenset[str]]:
    """What has an output whenever a step starts.

    Two kinds of steps qualify:

    * its dominators: every path to it passes through them, and a step only
      starts when a path of finished steps reached it;
    * the steps that always run (:func:`_always_run`) and that have finished
      when it starts: a step waiting for ``"all"`` of its predecessors starts
      after every one of them, and so after all they waited for.
    """
    order, preds, reachable = graph.order, graph.predecessors, graph.reachable
    dominators = graph.dominators
    finished_before: dict[str, frozenset[str]] = {}
    for step_id in order:
        done: set[str] = set()
        for pred in preds[step_id]:
            if pred not in reachable:
                continue
            done.add(pred)
            if plan.steps[pred].join == "any":
                done |= dominators[pred]
            else:
                done |= finished_before[pred]
        if plan.steps[step_id].join == "any":
            done = set(dominators[step_id])
        finished_before[step_id] = frozenset(done)
    graph.always.update(_always_run(plan, graph))
    return {s: dominators[s] | (finished_before[s] & graph.always) for s in order}


def _always_run(plan: WorkflowPlan, graph: PlanGraph) -> set[str]:
    """The steps that run in every run that completes.

    ``next_step`` leads to all its steps; routes with an ``otherwise`` lead to
    one of their groups, so a step every group leads to surely runs; routes
    without one may lead nowhere. Steps racing into an any-join may be
    stopped by the winner, so they never count (what they lead to may).
    """
    sure: dict[str, set[str]] = {}
    for step_id in reversed(graph.order):
        step = plan.steps[step_id]
        reach = {step_id}
        for target in _as_list(step.next_step):
            reach |= sure.get(target, set())
        if step.routes is not None and step.otherwise is not None:
            groups = [_as_list(route.to) for route in step.routes] + [_as_list(step.otherwise)]
            common: set[str] | None = None
            for group in groups:
                led: set[str] = set()
                for target in group:
                    led |= sure.get(target, set())
                common = led if common is None else common & led
            reach |= common or set()
        sure[step_id] = reach
    racing: set[str] = set()
    for step_id in graph.order:
        if plan.steps[step_id].join == "any":
            racing |= graph.won_by(step_id)
    return sure.get(plan.start_step, set()) - racing
