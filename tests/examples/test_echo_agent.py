"""The echo agent (the benchmark's agent): its skill, its answers, and the calls-in-flight counter of every agent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from agents_bridge.a2a import Completed, parse_response, request_headers, send_message_request
from examples.agents.echo import SPEC as ECHO
from examples.agents.front import Stats
from examples.agents.server import AgentConfig, running_agent
from examples.agents.skills import echo
from models.messages import AgentTask, utcnow
from tests.examples.test_agents import ready_url, start_cli, stop_cli

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def task(run_id: str, data: Any) -> AgentTask:
    return AgentTask(
        correlation_id=f"{run_id}/a/1",
        run_id=run_id,
        step_id="a",
        attempt=1,
        agent_name="echo",
        input=data,
        deadline=utcnow(),
    )


async def call(session: aiohttp.ClientSession, url: str, run_id: str, data: Any) -> Any:
    """What the bridge sends, and what it reads from the answer."""
    body = send_message_request(task(run_id, data), "1.0", request_id=run_id)
    async with session.post(url, json=body, headers=request_headers("1.0")) as response:
        assert response.status == 200
        return parse_response(await response.read(), "1.0", request_id=run_id)


def test_echo_returns_its_input_unchanged() -> None:
    data = {"text": "run-1|1", "n": 3, "nested": {"list": [1, "two"]}}
    assert echo(data) == data
    assert echo(data) is not data  # a copy: the caller's object is not shared
    assert echo({}) == {}


async def test_the_served_echo_agent_answers_what_it_was_sent(session: aiohttp.ClientSession) -> None:
    data = {"text": "run-7|1|2", "count": 12, "flags": [True, None]}
    async with running_agent(ECHO) as agent:
        outcome = await call(session, agent.url, "run-7", data)
        stats = agent.stats.snapshot()
    assert isinstance(outcome, Completed)
    assert outcome.output == data  # the text part the bridge adds does not change the output
    assert stats["calls"] == 1
    assert stats["by_idempotency_key"] == {"run-7/a/1": 1}


def test_stats_count_calls_in_flight_and_their_peak() -> None:
    stats = Stats()
    for _ in range(3):
        stats.call_started()
    stats.call_finished()
    stats.call_started()
    stats.call_finished()
    assert (stats.in_flight, stats.peak_in_flight) == (2, 3)
    stats.reset_peak()
    assert (stats.in_flight, stats.peak_in_flight) == (2, 2)
    stats.call_finished()
    stats.call_finished()
    assert (stats.snapshot()["in_flight"], stats.snapshot()["peak_in_flight"]) == (0, 2)


async def test_a_slow_agent_reports_the_peak_of_calls_in_flight(session: aiohttp.ClientSession) -> None:
    async with running_agent(ECHO, AgentConfig(slow_s=2.0)) as agent:
        calls = [asyncio.create_task(call(session, agent.url, f"r{n}", {"text": f"r{n}"})) for n in range(5)]
        for _ in range(150):  # until all five are in (a loaded machine may take a while), well within the 2 s
            if agent.stats.in_flight == 5:
                break
            await asyncio.sleep(0.01)
        async with session.get(agent.url + "stats") as response:
            during = await response.json()
        outcomes = await asyncio.gather(*calls)
        async with session.post(agent.url + "stats/reset-peak") as response:
            assert response.status == 200
            before_reset = await response.json()
        after_reset = agent.stats.snapshot()
        await call(session, agent.url, "single", {"text": "single"})
        single = agent.stats.snapshot()
    assert [o.output for o in outcomes] == [{"text": f"r{n}"} for n in range(5)]
    assert (during["in_flight"], during["peak_in_flight"]) == (5, 5)
    assert (before_reset["in_flight"], before_reset["peak_in_flight"]) == (0, 5)
    assert (after_reset["in_flight"], after_reset["peak_in_flight"]) == (0, 0)
    assert (single["in_flight"], single["peak_in_flight"], single["calls"]) == (0, 1, 6)


async def test_get_task_and_refused_calls_are_not_calls_in_flight(session: aiohttp.ClientSession) -> None:
    async with running_agent(ECHO, AgentConfig(fail_times=1)) as agent:
        body = send_message_request(task("r", {"text": "x"}), "1.0", request_id="r")
        async with session.post(agent.url, json=body, headers=request_headers("1.0")) as response:
            assert response.status == 503  # an injected failure still counts as a call that was in flight
        get = {"jsonrpc": "2.0", "id": 2, "method": "GetTask", "params": {"id": "nope"}}
        async with session.post(agent.url, json=get, headers=request_headers("1.0")) as response:
            await response.read()
        stats = agent.stats.snapshot()
    assert (stats["calls"], stats["in_flight"], stats["peak_in_flight"]) == (1, 0, 1)


async def test_the_echo_command_serves_until_sigterm(session: aiohttp.ClientSession) -> None:
    process = start_cli("--port", "0", agent="echo")
    try:
        url = await ready_url(process, "echo")
        outcome = await call(session, url, "cli", {"text": "from the command line"})
        assert isinstance(outcome, Completed)
        assert outcome.output == {"text": "from the command line"}
    finally:
        await stop_cli(process)
    assert process.returncode == 0
