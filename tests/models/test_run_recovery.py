"""Per-agent policies from the registry, recovery actions (fail, fallback, skip) and restoring a run."""

from __future__ import annotations

from models.agents import RecoveryAction, RecoveryPolicy
from models.plan import RetryPolicy
from models.run import (
    AgentPolicy,
    DispatchTask,
    ExecutionDefaults,
    RunFinished,
    RunRestored,
    RunStatus,
    ScheduleTimeout,
    StepStatus,
    transition,
)
from tests.models.run_builders import (
    NO_DELAY,
    at,
    current_step,
    execution_of,
    failure,
    make_plan,
    of_type,
    result,
    start,
    step,
)

ONE_TRY = RetryPolicy(max_attempts=1)


def defaults(**agents: AgentPolicy) -> ExecutionDefaults:
    return ExecutionDefaults(timeout_s=100, retry=NO_DELAY, agents=agents)


def test_timeout_comes_from_the_plan_then_the_registry_then_the_default() -> None:
    registry = defaults(**{"agent-s1": AgentPolicy(timeout_s=7)})
    plan = make_plan(2)
    state = start(plan, defaults=registry)
    assert (execution_of(state, "s1").attempts[0].deadline - at(0)).total_seconds() == 7
    state = start(make_plan(2, timeout_s=3), defaults=registry)
    assert (execution_of(state, "s1").attempts[0].deadline - at(0)).total_seconds() == 3, "the plan wins"
    state, _ = step(state, result(state, at(1)))
    assert (execution_of(state, "s2").attempts[0].deadline - at(1)).total_seconds() == 3
    state = start(make_plan(2), defaults=defaults())
    assert (execution_of(state, "s1").attempts[0].deadline - at(0)).total_seconds() == 100, "the global default"


def test_retry_policy_comes_from_the_registry_when_the_plan_is_silent() -> None:
    registry = defaults(**{"agent-s1": AgentPolicy(retry=ONE_TRY)})
    state = start(make_plan(1), defaults=registry)
    state, _effects = step(state, failure(state, at(1)))
    assert state.status is RunStatus.FAILED, "one attempt allowed by the registry"
    assert "1 attempt(s) used of 1" in (state.error.message if state.error else "")
    state = start(make_plan(1, retry=NO_DELAY), defaults=registry)
    state, _ = step(state, failure(state, at(1)))
    assert state.status is RunStatus.RUNNING, "the plan's policy wins over the registry's"


def test_fallback_agent_takes_over_when_attempts_run_out() -> None:
    recovery = RecoveryPolicy(action=RecoveryAction.FALLBACK, fallback_agent="backup")
    registry = defaults(
        **{"agent-s1": AgentPolicy(retry=ONE_TRY, recovery=recovery), "backup": AgentPolicy(timeout_s=9)}
    )
    state = start(make_plan(2), defaults=registry)
    state, effects = step(state, failure(state, at(1)))
    assert state.status is RunStatus.RUNNING
    s1 = execution_of(state, "s1")
    assert s1.fallback_agent == "backup"
    assert [a.agent_name for a in s1.attempts] == ["agent-s1", "backup"]
    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.task.agent_name == "backup"
    assert dispatch.task.attempt == 2
    assert (dispatch.task.deadline - at(1)).total_seconds() == 9, "the fallback agent's own timeout"
    state, effects = step(state, result(state, at(2)))
    assert state.steps["s1"].status is StepStatus.COMPLETED
    assert execution_of(state, "s1").status is StepStatus.COMPLETED
    assert current_step(state) == "s2"


def test_fallback_is_used_once_then_the_run_fails() -> None:
    recovery = RecoveryPolicy(action=RecoveryAction.FALLBACK, fallback_agent="backup")
    registry = defaults(
        **{"agent-s1": AgentPolicy(retry=ONE_TRY, recovery=recovery), "backup": AgentPolicy(retry=ONE_TRY)}
    )
    state = start(make_plan(1), defaults=registry)
    state, _ = step(state, failure(state, at(1)))
    state, effects = step(state, failure(state, at(2), message="backup broke too"))
    assert state.status is RunStatus.FAILED
    assert state.error is not None
    assert "backup broke too" in state.error.message
    assert len(of_type(effects, RunFinished)) == 1


def test_skip_goes_on_with_the_default_output() -> None:
    recovery = RecoveryPolicy(action=RecoveryAction.SKIP, default_output={"summary": "n/a"})
    registry = defaults(**{"agent-s1": AgentPolicy(retry=ONE_TRY, recovery=recovery)})
    state = start(make_plan(2), defaults=registry)
    state, effects = step(state, failure(state, at(1), message="no answer"))
    assert state.steps["s1"].status is StepStatus.SKIPPED
    assert state.output_of("s1") == {"summary": "n/a"}
    s1 = execution_of(state, "s1")
    assert s1.status is StepStatus.SKIPPED
    assert s1.output == {"summary": "n/a"}
    assert s1.error is not None
    assert s1.error.message == "no answer"
    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.task.step_id == "s2"
    assert dispatch.task.input == {"previous": "n/a", "topic": "hello"}, "the next step reads the default output"


def test_skip_of_the_last_step_completes_the_run_with_the_default_output() -> None:
    recovery = RecoveryPolicy(action=RecoveryAction.SKIP, default_output={"summary": "fallback text"})
    registry = defaults(**{"agent-s1": AgentPolicy(retry=ONE_TRY, recovery=recovery)})
    state = start(make_plan(1), defaults=registry)
    state, effects = step(state, failure(state, at(1)))
    assert state.status is RunStatus.COMPLETED
    assert state.output == {"summary": "fallback text"}
    (finished,) = of_type(effects, RunFinished)
    assert finished.status is RunStatus.COMPLETED


def test_non_retriable_failure_also_applies_the_recovery_policy() -> None:
    recovery = RecoveryPolicy(action=RecoveryAction.SKIP, default_output=None)
    registry = defaults(**{"agent-s1": AgentPolicy(recovery=recovery)})
    state = start(make_plan(1), defaults=registry)
    state, _ = step(state, failure(state, at(1), retriable=False))
    assert state.steps["s1"].status is StepStatus.SKIPPED
    assert execution_of(state, "s1").status is StepStatus.SKIPPED


def test_retry_request_after_a_fallback_starts_with_the_plans_agent_again() -> None:
    from models.run import RetryRequested

    recovery = RecoveryPolicy(action=RecoveryAction.FALLBACK, fallback_agent="backup")
    registry = defaults(
        **{"agent-s1": AgentPolicy(retry=ONE_TRY, recovery=recovery), "backup": AgentPolicy(retry=ONE_TRY)}
    )
    state = start(make_plan(1), defaults=registry)
    state, _ = step(state, failure(state, at(1)))
    state, _ = step(state, failure(state, at(2)))
    assert state.status is RunStatus.FAILED
    state, effects = step(state, RetryRequested(run_id=state.run_id, at=at(3)))
    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.task.agent_name == "agent-s1"
    assert dispatch.task.attempt == 3


def test_restore_rebuilds_a_lost_run_and_resumes_it() -> None:
    state = start(make_plan(2), defaults=defaults())
    state, _ = step(state, result(state, at(1)))  # s1 done, s2 in flight
    restored, effects = transition(None, RunRestored(state=state, at=at(2)))
    assert restored == state
    (dispatch,) = of_type(effects, DispatchTask)
    assert dispatch.task.correlation_id == execution_of(state, "s2").attempts[0].correlation_id
    assert dispatch.task.input == execution_of(state, "s2").attempts[0].input, "the finished step's output is reused"
    (timeout,) = of_type(effects, ScheduleTimeout)
    assert timeout.at == execution_of(state, "s2").attempts[0].deadline


def test_restore_is_ignored_when_the_table_has_the_run() -> None:
    state = start(make_plan(2), defaults=defaults())
    older = state
    state, _ = step(state, result(state, at(1)))
    same, effects = transition(state, RunRestored(state=older, at=at(2)))
    assert same is state
    assert effects == []


def test_restoring_a_finished_run_dispatches_nothing() -> None:
    state = start(make_plan(1), defaults=defaults())
    state, _ = step(state, result(state, at(1)))
    assert state.status is RunStatus.COMPLETED
    restored, effects = transition(None, RunRestored(state=state, at=at(2)))
    assert restored == state
    assert of_type(effects, DispatchTask) == []


def test_resume_gives_passed_deadlines_a_grace_period() -> None:
    from datetime import timedelta

    from models.run import resume

    state = start(make_plan(1), defaults=defaults())
    deadline = execution_of(state, "s1").attempts[0].deadline
    late = deadline + timedelta(seconds=60)
    (timeout,) = of_type(resume(state, late), ScheduleTimeout)
    assert timeout.at == late, "without grace a passed deadline fires at once (now)"
    (timeout,) = of_type(resume(state, late, grace_s=10), ScheduleTimeout)
    assert timeout.at == late + timedelta(seconds=10)
    (timeout,) = of_type(resume(state, at(0), grace_s=10), ScheduleTimeout)
    assert timeout.at == deadline, "a deadline still far off is kept"
