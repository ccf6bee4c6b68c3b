"""Thousands of calls in flight, per-agent limits, and a stop with calls waiting, on the real stack.

* An agent at its registry ``max_concurrency`` never sees more calls at once
  than that, and calls to another agent go through at once meanwhile.
* With the default settings, hundreds of calls to a slow agent are in flight
  together (not waves of 64).
* SIGTERM with calls in flight and calls waiting behind an agent's limit: the
  bridge stops once the calls in flight end, without making the waiting ones;
  the next bridge makes them, and every run completes.

Concurrency is counted two ways, neither from the agent itself: the bridge's
``/health/`` per-agent figures, sampled, and the results' own call times
(``started_at`` is taken when the call starts, after its slots).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from models.messages import AgentResult, MessageDecodeError, decode
from switchyard import topics
from tests.faults.conftest import AgentSpec, FaultStack, StackPlaces, poll

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

SLUGGISH_S = 6.0
"""How long a call to ``sluggish`` takes; its max_concurrency is 2."""
QUICK_S = 5.0
"""Runs on ``quick`` complete within this, whatever ``sluggish`` does."""
STEADY_S = 5.0
MANY = 300
"""Calls to ``steady`` submitted at once in the load test."""
OLD_SLOTS = 64
"""The bridge's call slots before thousands were allowed: 64 actors, so calls went in waves of 64."""

AGENTS = {
    "sluggish": AgentSpec(flags=("--slow", str(SLUGGISH_S)), max_concurrency=2),
    "quick": AgentSpec(),
    "steady": AgentSpec(flags=("--slow", str(STEADY_S))),
}


def one_step(agent: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """A plan of one step on ``agent``."""
    step = {
        "id": "a",
        "agent_name": agent,
        "input_mapping": {"text": "${workflow.input.text}"},
        "next_step": None,
        "timeout_s": timeout_s,
    }
    return {
        "workflow_id": f"limits-{agent}",
        "name": f"one {agent}",
        "version": "1",
        "start_step": "a",
        "steps": {"a": step},
    }


@pytest.fixture(scope="module")
def stack(stack_places: StackPlaces) -> Iterator[FaultStack]:
    with stack_places.stack("faults-bridge-limits", AGENTS) as built:
        # Past the executor's second dispatch of attempts in flight after its start
        # (half its resume grace), which would send every early task twice.
        time.sleep(6)
        yield built


@dataclass
class HealthSampler:
    """Samples the bridge's ``/health/`` in a thread: the most calls in flight per agent, and waiting ones."""

    stack: FaultStack
    interval_s: float = 0.1
    in_flight: dict[str, int] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> HealthSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            health = self.stack.health("bridge") or {}
            for name, usage in (health.get("agents") or {}).items():
                self.in_flight[name] = max(self.in_flight.get(name, 0), int(usage["in_flight"]))
                self.waiting[name] = max(self.waiting.get(name, 0), int(usage["waiting"]))
            self.samples += 1
            time.sleep(self.interval_s)


def results_of(stack: FaultStack, run_ids: Sequence[str]) -> list[AgentResult]:
    """The results the bridge published for these runs (first one per attempt)."""
    wanted = set(run_ids)
    found: dict[str, AgentResult] = {}
    for record in stack.read(topics.RESULTS, timeout=30.0):
        try:
            result = decode(AgentResult, record.value or b"")
        except MessageDecodeError:
            continue
        if result.run_id in wanted:
            found.setdefault(result.correlation_id, result)
    return list(found.values())


def most_at_once(results: Sequence[AgentResult]) -> int:
    """The most calls whose [started_at, finished_at] overlap."""
    edges = sorted([(r.started_at, 1) for r in results] + [(r.finished_at, -1) for r in results])
    now = top = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        now += step
        top = max(top, now)
    return top


def completed(stack: FaultStack, run_ids: Sequence[str], timeout: float) -> float:
    """Wait until every run is COMPLETED; returns when that was seen (time.monotonic)."""
    records = stack.wait_terminal(run_ids, timeout)
    bad = {run_id: (r.status, r.error) for run_id, r in records.items() if r.status != "COMPLETED"}
    assert not bad, f"runs not completed: {list(bad.items())[:5]}\n{stack.logs()}"
    assert len(records) == len(run_ids)
    return time.monotonic()


def test_a_slow_agent_at_its_limit_never_holds_up_another_agent(stack: FaultStack) -> None:
    stack.ensure_serving()
    with HealthSampler(stack) as sampler:
        slow = stack.submit(one_step("sluggish"), 8, "limits slow")
        poll(
            lambda: (stack.health("bridge") or {}).get("agents", {}).get("sluggish", {}).get("waiting") == 6,
            20,
            lambda: f"expected 2 calls in flight and 6 waiting: {stack.health('bridge')}",
        )
        calls_before = stack.stats("sluggish")["calls"]
        started = time.monotonic()
        fast = stack.submit(one_step("quick"), 10, "limits fast")
        took = completed(stack, fast, timeout=30) - started
        waiting_after = (stack.health("bridge") or {}).get("agents", {}).get("sluggish", {}).get("waiting")
        print(f"10 runs on quick completed in {took:.2f}s while sluggish had 2 calls in flight and 6 waiting")
        assert took < QUICK_S, f"the quick runs took {took:.2f}s: they waited for sluggish's calls"
        assert calls_before == 2, f"sluggish received {calls_before} calls at once (max_concurrency 2)"
        assert (waiting_after or 0) >= 4, "the quick runs went by the waiting calls"
        completed(stack, slow, timeout=60)
    results = [r for r in results_of(stack, slow) if r.status == "SUCCESS"]
    assert len(results) == 8
    overlap = most_at_once(results)
    print(
        f"sluggish: most calls at once {overlap} by the results' call times, {sampler.in_flight.get('sluggish')} "
        f"in flight and {sampler.waiting.get('sluggish')} waiting at most by /health/ ({sampler.samples} samples)"
    )
    assert overlap == 2, f"sluggish's calls overlapped {overlap} at once (max_concurrency 2)"
    assert sampler.in_flight.get("sluggish") == 2
    assert stack.stats("sluggish")["calls"] == 8, "each call made once"


def test_hundreds_of_calls_are_in_flight_at_once_with_the_default_settings(stack: FaultStack) -> None:
    stack.ensure_serving()
    health = stack.health("bridge") or {}
    assert health.get("call_slots", 0) >= 4096, f"the default is thousands of call slots: {health}"
    with HealthSampler(stack, interval_s=0.2) as sampler:
        started = time.monotonic()
        run_ids = stack.submit(one_step("steady"), MANY, "limits many")
        took = completed(stack, run_ids, timeout=120) - started
    results = results_of(stack, run_ids)
    overlap = most_at_once(results)
    waves_s = -(-MANY // OLD_SLOTS) * STEADY_S
    print(
        f"{MANY} runs on a {STEADY_S:g}s agent: makespan {took:.2f}s (64 slots: at least {waves_s:g}s of calls), "
        f"most calls at once {overlap} by the results, {sampler.in_flight.get('steady')} by /health/"
    )
    # All of them, when the executor dispatches the runs faster than a call takes (it does on an idle machine).
    assert overlap >= MANY // 2, f"only {overlap} calls at once"
    assert (sampler.in_flight.get("steady") or 0) > OLD_SLOTS
    assert took < 0.8 * waves_s, f"makespan {took:.2f}s is not well under the {waves_s:g}s of 64-call waves"


def test_sigterm_makes_the_calls_in_flight_and_leaves_the_waiting_ones_to_the_next_bridge(stack: FaultStack) -> None:
    stack.ensure_serving()
    calls_before = stack.stats("sluggish")["calls"]
    run_ids = stack.submit(one_step("sluggish"), 6, "limits stop")
    poll(
        lambda: (stack.health("bridge") or {}).get("agents", {}).get("sluggish", {}).get("waiting") == 4,
        20,
        lambda: f"expected 2 calls in flight and 4 waiting: {stack.health('bridge')}",
    )
    stopping = time.monotonic()
    code = stack.process("bridge").stop(timeout=30)
    took = time.monotonic() - stopping
    made = stack.stats("sluggish")["calls"] - calls_before
    print(f"bridge stopped (SIGTERM) in {took:.1f}s, exit code {code}; sluggish received {made} calls")
    assert code == 0, stack.logs("bridge")
    assert took < SLUGGISH_S + 5, f"the stop took {took:.1f}s: it should wait only for the 2 calls in flight"
    assert made == 2, "the waiting calls were not made by the stopping bridge"
    assert stack.log_lines("bridge", "calls waiting for a slot are left for the next bridge")
    stack.restart("bridge")
    completed(stack, run_ids, timeout=90)
    calls = stack.calls(run_ids, ["sluggish"])
    extra = sum(calls.values()) - len(run_ids)
    print(f"after the restart: {sum(calls.values())} calls for {len(run_ids)} runs (extra {extra})")
    assert set(calls) == {f"{run_id}/a/1" for run_id in run_ids}, "one attempt per run"
    # A call in flight at the stop is made again only when an earlier task of
    # its partition was sent away (offsets are committed in order).
    assert 0 <= extra <= 2, calls


def test_a_rebalance_does_not_wait_for_the_calls_waiting_behind_an_agents_limit(stack: FaultStack) -> None:
    stack.ensure_serving()
    calls_before = stack.stats("sluggish")["calls"]
    run_ids = stack.submit(one_step("sluggish"), 8, "limits rebalance")
    poll(
        lambda: (stack.health("bridge") or {}).get("agents", {}).get("sluggish", {}).get("waiting") == 6,
        20,
        lambda: f"expected 2 calls in flight and 6 waiting: {stack.health('bridge')}",
    )
    sent_before = len(stack.log_lines("bridge", "calls waiting for a slot were sent away"))
    joining = time.monotonic()
    try:
        stack.start_worker("bridge-2")
        stack.wait_ready(each=True)
        took = time.monotonic() - joining
        print(f"bridge-2 joined in {took:.1f}s; tasks partitions {stack.bridge_partitions()}")
        sent = stack.log_lines("bridge", "calls waiting for a slot were sent away")[sent_before:]
        assert sent, "the first bridge sent its waiting calls away when the rebalance began"
        # The rebalance waits only for the 2 calls in flight (they end within SLUGGISH_S of the join); 8 s
        # for bridge-2's start, its group join (about 3 s on the embedded broker), the assignment and the
        # ready polls. Waiting for even one call behind the limit would add another SLUGGISH_S.
        assert took < SLUGGISH_S + 8, f"the rebalance took {took:.1f}s"
        completed(stack, run_ids, timeout=90)
    finally:
        if stack.process("bridge-2").alive():
            stack.process("bridge-2").stop()
    calls = stack.calls(run_ids, ["sluggish"])
    extra = sum(calls.values()) - len(run_ids)
    print(f"{sum(calls.values())} calls for {len(run_ids)} runs (extra {extra}); sent away: {sent[-1][-120:]}")
    assert set(calls) == {f"{run_id}/a/1" for run_id in run_ids}, "one attempt per run"
    # The 2 calls in flight when the rebalance began end during it; the broker
    # refuses commits while the group rebalances, so their tasks may be
    # delivered to, and called by, the partition's new owner.
    assert 0 <= extra <= 2, calls
    assert stack.stats("sluggish")["calls"] - calls_before == sum(calls.values())
