"""Property tests of the run state machine over generated graph plans and any order of events.

A generated plan chains two to four *blocks*, in any order:

* ``par``: a fork leading to two or three branches (one or two steps each)
  that meet at a join (``all``, ``any`` or the default);
* ``route``: a step with one or two conditional routes on an output field
  (its own, an earlier step's, or the run's input), maybe an ``otherwise``,
  and a merge step;
* ``loop``: a loop of one step, of two, or with two branches and a join as
  its loop step, with ``max_iterations`` of 1 to 3; its first step may be a
  map over a literal list;
* ``map``: a map over the run's input (which may be empty, or not a list) or
  a literal list, with a small ``max_concurrency``.

Events are built from *actions* against the state reached so far: answer or
fail an attempt in flight, let it time out (at its deadline, or too early),
deliver a result again, deliver a stale one, ask for a retry, cancel. After
the actions, every attempt in flight is answered (and a failed run retried
once) until the run ends.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import JsonValue

from models.messages import AgentError, AgentResult, ResultStatus
from models.plan import WorkflowPlan, load_plan
from models.run import (
    AgentResultReceived,
    Attempt,
    CancelRequested,
    Checkpoint,
    DeadLetter,
    Effect,
    Event,
    Execution,
    RetryRequested,
    RunFinished,
    RunState,
    RunStatus,
    RunSubmitted,
    StepStatus,
    StepTimedOut,
    transition,
)
from tests.models.run_builders import assert_checkpoint

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
RUN_ID = "run-p"
TIMEOUT_S = 10
RETRIES: list[dict[str, Any]] = [
    {"max_attempts": 2, "initial_delay_s": 0, "jitter": 0},
    {"max_attempts": 2, "initial_delay_s": 5, "jitter": 0},
    {"max_attempts": 1},
]
OUTPUTS: list[JsonValue] = [
    {"v": 0, "ok": True},
    {"v": 1, "ok": False},
    {"v": 2, "ok": True},
    {"v": 1, "ok": True},
    {"v": 0, "ok": False},
    {"ok": False},  # no 'v': a route reading it fails with condition_error
]
DRAIN_OUTPUT: JsonValue = {"v": 0, "ok": True}
ITEMS: list[JsonValue] = [[], [1], [1, 2, 3], [0, 1, 2, 3], "oops"]


# ------------------------------------------------------------------- plans


@dataclass
class Generated:
    data: dict[str, Any]
    run_input: dict[str, JsonValue]
    loops: dict[str, tuple[tuple[str, ...], int]] = field(default_factory=dict)
    """Loop step -> (its body, max_iterations)."""


@st.composite
def generated_plans(draw: st.DrawFn) -> Generated:
    kinds = draw(st.permutations(["par", "route", "loop", "map"]))
    kinds = kinds[: draw(st.integers(2, 4))]
    steps: dict[str, dict[str, Any]] = {}
    loops: dict[str, tuple[tuple[str, ...], int]] = {}

    def add(step_id: str, **fields: Any) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": step_id,
            "agent_name": f"agent-{step_id}",
            "timeout_s": TIMEOUT_S,
            "retry": draw(st.sampled_from(RETRIES)),
        }
        data.update(fields)
        steps[step_id] = data
        return data

    def join_field(n_preds: int) -> dict[str, Any]:
        if n_preds < 2:
            return {}
        join = draw(st.sampled_from(["all", "any", None]))
        return {} if join is None else {"join": join}

    previous: dict[str, Any] | None = None
    for n, kind in enumerate(kinds):
        p = f"{kind[0]}{n}"
        reads = (
            {"prev": "${" + previous["id"] + ".output.v ?? 0}"}
            if previous is not None
            else {"n": "${workflow.input.n}"}
        )
        if kind == "par":
            fork = add(f"{p}f", input_mapping=reads)
            join_id = f"{p}j"
            heads: list[str] = []
            for b in range(draw(st.integers(2, 3))):
                ids = [f"{p}b{b}x{i}" for i in range(draw(st.integers(1, 2)))]
                for i, step_id in enumerate(ids):
                    add(
                        step_id,
                        next_step=ids[i + 1] if i + 1 < len(ids) else join_id,
                        input_mapping={"fork": "${" + fork["id"] + ".output.v ?? 0}"},
                    )
                heads.append(ids[0])
            fork["next_step"] = heads
            entry, end = fork, add(join_id, **join_field(len(heads)))
        elif kind == "route":
            router = add(f"{p}r", input_mapping=reads)
            merge_id = f"{p}m"
            targets = [f"{p}t{i}" for i in range(draw(st.integers(1, 2)))]
            sources = ["${" + router["id"] + ".output.v}", "${workflow.input.n}"]
            if previous is not None:
                sources.append("${" + previous["id"] + ".output.v ?? 0}")
            router["routes"] = [
                {"when": f"{draw(st.sampled_from(sources))} == {draw(st.integers(0, 2))}", "to": target}
                for target in targets
            ]
            if draw(st.booleans()):
                router["otherwise"] = f"{p}o"
                targets.append(f"{p}o")
            for target in targets:
                add(target, next_step=merge_id, input_mapping={"r": "${" + router["id"] + ".output.v ?? 0}"})
            entry, end = router, add(merge_id, **join_field(len(targets)))
        elif kind == "loop":
            shape = draw(st.sampled_from(["one", "two", "fork"]))
            max_iterations = draw(st.integers(1, 3))
            exhausted = draw(st.sampled_from(["fail", "continue"]))
            first_id = f"{p}a"
            last_id = first_id if shape == "one" else f"{p}z"
            first_fields: dict[str, Any] = {"input_mapping": {**reads, "fb": "${" + last_id + ".output.v ?? 0}"}}
            if shape != "one" and draw(st.booleans()):
                first_fields["map"] = {
                    "over": [1, 2],
                    "max_concurrency": draw(st.integers(1, 2)),
                    "on_item_failure": draw(st.sampled_from(["fail", "collect"])),
                }
                first_fields["input_mapping"]["item"] = "${map.item}"
            first = add(first_id, **first_fields)
            body = [first_id]
            if shape == "two":
                first["next_step"] = last_id
            elif shape == "fork":
                first["next_step"] = [f"{p}l", f"{p}r"]
                for side in ("l", "r"):
                    add(f"{p}{side}", next_step=last_id)
                    body.append(f"{p}{side}")
            loop = {
                "back_to": first_id,
                "while": "${" + last_id + ".output.ok} == false",
                "max_iterations": max_iterations,
                "when_exhausted": exhausted,
            }
            if shape == "one":
                first["loop"] = loop
                end = first
            else:
                end = add(last_id, loop=loop, **(join_field(2) if shape == "fork" else {}))
                body.append(last_id)
            loops[end["id"]] = (tuple(body), max_iterations)
            entry = first
        else:
            entry = end = add(
                f"{p}m",
                map={
                    "over": draw(st.sampled_from(["${workflow.input.items}", [0, 1, 2]])),
                    "max_concurrency": draw(st.integers(1, 3)),
                    "on_item_failure": draw(st.sampled_from(["fail", "collect"])),
                },
                input_mapping={"item": "${map.item}", "index": "${map.index}", **reads},
            )
        if previous is not None:
            previous["next_step"] = entry["id"]
        previous = end
    first_step = next(iter(steps))
    data = {"workflow_id": "gen", "name": "generated", "version": "1", "start_step": first_step, "steps": steps}
    run_input: dict[str, JsonValue] = {"n": draw(st.integers(0, 2)), "items": draw(st.sampled_from(ITEMS))}
    return Generated(data=data, run_input=run_input, loops=loops)


# ------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Answer:
    pick: int
    output: int


@dataclass(frozen=True)
class Fail:
    pick: int
    retriable: bool


@dataclass(frozen=True)
class Timeout:
    pick: int
    early: bool


@dataclass(frozen=True)
class Replay:
    pick: int


@dataclass(frozen=True)
class Stale:
    pick: int
    variant: str


@dataclass(frozen=True)
class Retry:
    pass


@dataclass(frozen=True)
class Cancel:
    pass


Action = Answer | Fail | Timeout | Replay | Stale | Retry | Cancel

PICK = st.integers(0, 50)
STALE_VARIANTS = ("finished_attempt", "wrong_correlation", "no_such_execution")


def _action(roll: int, pick: int, output: int, flag: bool, variant: int) -> Action:
    # Weights out of 100 (shrinking goes towards answers): answers 55, failures 10, timeouts 10,
    # replays 7, stale results 8, retry requests 8, cancel 2.
    if roll < 55:
        return Answer(pick, output)
    if roll < 65:
        return Fail(pick, flag)
    if roll < 75:
        return Timeout(pick, flag)
    if roll < 82:
        return Replay(pick)
    if roll < 90:
        return Stale(pick, STALE_VARIANTS[variant])
    if roll < 98:
        return Retry()
    return Cancel()


ACTIONS = st.builds(
    _action,
    st.integers(0, 99),
    PICK,
    st.integers(0, len(OUTPUTS) - 1),
    st.booleans(),
    st.integers(0, len(STALE_VARIANTS) - 1),
)
ANSWERS = st.builds(Answer, PICK, st.integers(0, len(OUTPUTS) - 1))


# ------------------------------------------------------------------- the checker


def live(state: RunState) -> list[tuple[Execution, Attempt]]:
    """The attempts the run waits for, in the order their executions started."""
    out = []
    for execution in state.open_executions():
        attempt = execution.current
        if attempt is not None and not attempt.status.finished:
            out.append((execution, attempt))
    return out


def result_event(
    execution: Execution,
    attempt: Attempt,
    at: datetime,
    *,
    output: JsonValue = None,
    error: AgentError | None = None,
    correlation: str | None = None,
    iteration: int | None = None,
    item: int | None = None,
) -> AgentResultReceived:
    return AgentResultReceived(
        result=AgentResult(
            correlation_id=correlation or attempt.correlation_id,
            run_id=RUN_ID,
            step_id=execution.step_id,
            attempt=attempt.number,
            iteration=iteration if iteration is not None else execution.iteration,
            item=item if item is not None else execution.item,
            status=ResultStatus.FAILURE if error is not None else ResultStatus.SUCCESS,
            output=None if error is not None else output,
            error=error,
            started_at=at,
            finished_at=at,
        ),
        at=at,
    )


class Checker:
    """Drives one run and checks every transition."""

    def __init__(self, generated: Generated) -> None:
        self.generated = generated
        self.plan: WorkflowPlan = load_plan(generated.data)
        graph = self.plan.graph()
        self.joins = {s for s in graph.reachable if len([p for p in graph.predecessors[s] if p in graph.reachable]) > 1}
        self.clock = 0.0
        self.delivered: list[AgentResultReceived] = []
        self.succeeded: dict[str, JsonValue] = {}
        self.starts: Counter[tuple[str, int]] = Counter()
        self.finished_since_retry = 0
        self.retries = 0
        submitted = RunSubmitted(run_id=RUN_ID, plan=self.plan, input=generated.run_input, at=self.now())
        state, effects = transition(None, submitted)
        assert state is not None
        assert state.version == 1
        assert_checkpoint(None, state, effects[-1])
        self.state: RunState = state
        self._check_state(None, state, effects, submitted)

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.clock)

    def tick(self) -> datetime:
        self.clock += 1
        return self.now()

    # --- one transition

    def send(self, event: Event, *, must_change: bool = False, must_not_change: bool = False) -> list[Effect]:
        old = self.state
        new, effects = transition(old, event)
        assert new is not None
        if new is old:
            # Nothing changed: no effects (a refused retry says why in a dead letter, and nothing else).
            refused = isinstance(event, RetryRequested) and len(effects) == 1 and isinstance(effects[0], DeadLetter)
            assert effects == [] or refused, (event, effects)
            assert not must_change, f"{event!r} should have changed the run"
        else:
            assert not must_not_change, f"{event!r} should have changed nothing, gave {effects!r}"
            assert new.version == old.version + 1
            assert effects, "a change has effects"
            assert_checkpoint(old, new, effects[-1])
            assert sum(isinstance(e, Checkpoint) for e in effects) == 1
            assert not any(isinstance(e, DeadLetter) for e in effects)
            self._check_state(old, new, effects, event)
        if isinstance(event, AgentResultReceived):
            self.delivered.append(event)
        self.state = new
        return effects

    def _check_state(self, old: RunState | None, new: RunState, effects: list[Effect], event: Event) -> None:
        # The state round-trips through JSON.
        assert RunState.model_validate_json(new.model_dump_json()) == new

        # Each execution succeeds at most once, and stays done.
        for key, execution in new.executions.items():
            done = [a for a in execution.attempts if a.status is StepStatus.COMPLETED]
            assert len(done) <= 1, key
            if execution.status is StepStatus.COMPLETED:
                assert len(done) == 1, key
                if key in self.succeeded:
                    assert execution.output == self.succeeded[key], key
                self.succeeded.setdefault(key, execution.output)
        for key in self.succeeded:
            assert new.executions[key].status is StepStatus.COMPLETED, key

        # A join starts at most once per iteration (a retry reopens it; it does not start it again).
        for join in self.joins:
            after = new.steps.get(join)
            if after is None or after.status in {StepStatus.PENDING, StepStatus.SKIPPED}:
                continue
            before = old.steps.get(join) if old is not None else None
            if before is None or before.status is StepStatus.PENDING or before.iteration != after.iteration:
                self.starts[(join, after.iteration)] += 1
                assert self.starts[(join, after.iteration)] == 1, (join, after.iteration)

        # A loop never runs more than max_iterations.
        for loop_step, (body, max_iterations) in self.generated.loops.items():
            for execution in new.executions.values():
                if execution.step_id in body:
                    assert execution.iteration <= max_iterations, (loop_step, execution.key)
            for member in body:
                if member in new.steps:
                    assert new.steps[member].iteration <= max_iterations, (loop_step, member)

        # The run finishes at most once until a retry reopens it.
        finished = [e for e in effects if isinstance(e, RunFinished)]
        assert len(finished) <= 1
        if isinstance(event, RetryRequested):
            self.finished_since_retry = 0
            assert new.status is RunStatus.RUNNING or finished
        # (A retry reopens the run: it may end again in the same transition, when the failure repeats at once.)
        was_finished = old is not None and old.status.finished and not isinstance(event, RetryRequested)
        assert bool(finished) == (new.status.finished and not was_finished)
        if finished:
            assert finished[0].status is new.status
        self.finished_since_retry += len(finished)
        assert self.finished_since_retry <= 1

        # A running run is never stuck: it waits for at least one open execution.
        if new.status is RunStatus.RUNNING:
            assert new.open_executions(), "a RUNNING run waits for nothing"
        else:
            assert not new.open_executions()

    # --- actions

    def act(self, action: Action) -> None:
        waiting = live(self.state)
        running = self.state.status is RunStatus.RUNNING
        if isinstance(action, Answer | Fail | Timeout) and not waiting:
            return
        if isinstance(action, Answer):
            execution, attempt = waiting[action.pick % len(waiting)]
            event: Event = result_event(execution, attempt, self.tick(), output=OUTPUTS[action.output])
            self.send(event, must_change=running)
        elif isinstance(action, Fail):
            execution, attempt = waiting[action.pick % len(waiting)]
            error = AgentError(kind="agent_failed", message="generated failure", retriable=action.retriable)
            self.send(result_event(execution, attempt, self.tick(), error=error), must_change=running)
        elif isinstance(action, Timeout):
            execution, attempt = waiting[action.pick % len(waiting)]
            if action.early:
                at = attempt.deadline - timedelta(seconds=1)
            else:
                self.clock = max(self.clock + 1, (attempt.deadline - T0).total_seconds())
                at = self.now()
            event = StepTimedOut(
                run_id=RUN_ID,
                step_id=execution.step_id,
                attempt=attempt.number,
                iteration=execution.iteration,
                item=execution.item,
                at=at,
            )
            self.send(event, must_change=running and not action.early, must_not_change=action.early)
        elif isinstance(action, Replay):
            if self.delivered:
                self.send(self.delivered[action.pick % len(self.delivered)], must_not_change=True)
        elif isinstance(action, Stale):
            self._stale(action)
        elif isinstance(action, Retry):
            self.tick()
            effects = self.send(RetryRequested(run_id=RUN_ID, at=self.now()))
            if effects and not isinstance(effects[0], DeadLetter):
                self.retries += 1
        else:
            self.send(CancelRequested(run_id=RUN_ID, at=self.tick()), must_change=not self.state.status.finished)

    def _stale(self, action: Stale) -> None:
        at = self.tick()
        if action.variant == "finished_attempt":
            ended = [(e, a) for e in self.state.executions.values() for a in e.attempts if a.status.finished]
            if ended:
                execution, attempt = ended[action.pick % len(ended)]
                self.send(result_event(execution, attempt, at, output=DRAIN_OUTPUT), must_not_change=True)
            return
        waiting = live(self.state)
        if not waiting:
            return
        execution, attempt = waiting[action.pick % len(waiting)]
        if action.variant == "wrong_correlation":
            event = result_event(execution, attempt, at, output=DRAIN_OUTPUT, correlation="someone/else/1")
        elif execution.item is not None:
            event = result_event(execution, attempt, at, output=DRAIN_OUTPUT, item=execution.item + 100)
        else:
            event = result_event(execution, attempt, at, output=DRAIN_OUTPUT, iteration=execution.iteration + 100)
        self.send(event, must_not_change=True)

    def drain(self, limit: int = 500) -> None:
        """Answer every attempt in flight (retrying a failed run once) until the run ends."""
        retried = False
        for _ in range(limit):
            if self.state.status is RunStatus.FAILED and not retried:
                retried = True
                self.send(RetryRequested(run_id=RUN_ID, at=self.tick()))
                continue
            waiting = live(self.state)
            if self.state.status is not RunStatus.RUNNING or not waiting:
                break
            execution, attempt = waiting[0]
            self.send(result_event(execution, attempt, self.tick(), output=DRAIN_OUTPUT), must_change=True)
        assert self.state.status.finished, f"the run did not end: {self.state.status}"


# ------------------------------------------------------------------- properties


@SETTINGS
@given(generated_plans())
def test_generated_plans_are_valid(generated: Generated) -> None:
    plan = load_plan(generated.data)

    assert set(plan.order()) == set(generated.data["steps"])
    for loop_step, (body, _) in generated.loops.items():
        assert plan.graph().bodies[loop_step] == body


@SETTINGS
@given(generated_plans(), st.lists(ACTIONS, min_size=10, max_size=60))
def test_any_order_of_events_keeps_the_run_rules(generated: Generated, actions: list[Action]) -> None:
    checker = Checker(generated)

    for action in actions:
        checker.act(action)
    checker.drain()


@SETTINGS
@given(generated_plans(), st.lists(ANSWERS, min_size=5, max_size=40))
def test_answering_everything_ends_the_run(generated: Generated, actions: list[Answer]) -> None:
    checker = Checker(generated)

    for action in actions:
        checker.act(action)
    checker.drain()

    if checker.state.status is RunStatus.COMPLETED:
        assert checker.state.error is None
        assert all(s.status.finished for s in checker.state.steps.values())
