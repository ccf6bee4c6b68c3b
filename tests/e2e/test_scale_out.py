"""Two executor workers share the runs; any worker's web server answers for any run (table_route)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from models.agents import AgentEntry
from models.messages import WorkflowSubmission, encode, new_run_id
from models.plan import load_plan
from switchyard import topics
from switchyard.database import connect
from switchyard.kafka import produce
from switchyard.registry import RegistryStore
from switchyard.settings import Settings
from switchyard.stack import Stack, http_json
from tests.e2e.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PLAN = {
    "workflow_id": "scale",
    "name": "scale out",
    "version": "1",
    "start_step": "a",
    "steps": {
        "a": {
            "id": "a",
            "agent_name": "summarizer",
            "input_mapping": {"text": "${workflow.input.text}"},
            "next_step": "b",
        },
        "b": {
            "id": "b",
            "agent_name": "summarizer",
            "input_mapping": {"text": "${a.output.summary} again"},
            "next_step": None,
        },
    },
}


def test_two_executors_split_the_runs_and_route_reads(server_dir: Path) -> None:
    settings = Settings(
        broker_port=free_port(),
        executor_web_port=free_port(),
        bridge_web_port=free_port(),
        data_dir=server_dir,
        topic_partitions=4,
    )
    second_port = free_port()
    agent_port = free_port()
    stack = Stack(settings, Path(__file__).resolve().parents[2])
    try:
        stack.start_services()
        engine, _ = connect(settings)
        agent = stack.start_agent("summarizer", port=agent_port)
        first = stack.start_worker("streams.app", name="executor-1")
        second = stack.start_worker("streams.app", name="executor-2", SWITCHYARD_EXECUTOR_WEB_PORT=str(second_port))
        bridge = stack.start_worker("agents_bridge.app")
        stack.wait_port(agent_port, agent)
        RegistryStore(engine).put(AgentEntry(name="summarizer", url=f"http://127.0.0.1:{agent_port}/"))
        urls = [stack.executor_url(), f"http://127.0.0.1:{second_port}"]
        stack.wait_http(urls[0] + "/health/", first, timeout=120)
        stack.wait_http(urls[1] + "/health/", second, timeout=120)
        stack.wait_http(stack.bridge_url("/health/"), bridge, timeout=120)
        # Both workers own partitions once the group has settled.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            owned = [http_json("GET", url + "/health/")[1]["run_partitions"] for url in urls]
            if all(owned) and sorted(owned[0] + owned[1]) == [0, 1, 2, 3]:
                break
            time.sleep(0.5)
        assert all(owned), f"run partitions per worker: {owned}"
        assert sorted(owned[0] + owned[1]) == [0, 1, 2, 3]

        plan = load_plan(PLAN)
        run_ids = [new_run_id() for _ in range(12)]

        async def submit_all() -> None:
            for run_id in run_ids:
                submission = WorkflowSubmission(run_id=run_id, plan=plan, input={"text": f"run {run_id[:8]}"})
                await produce(settings, topics.PLANS, key=run_id.encode(), value=encode(submission))

        asyncio.run(submit_all())
        deadline = time.monotonic() + 90
        pending = set(run_ids)
        while pending and time.monotonic() < deadline:
            for run_id in list(pending):
                status, view = http_json("GET", f"{urls[0]}/runs/{run_id}/")
                if status == 200 and view["status"] == "COMPLETED":
                    pending.discard(run_id)
            time.sleep(0.3)
        assert not pending, f"{len(pending)} run(s) did not complete"
        for run_id in run_ids:
            for url in urls:
                status, view = http_json("GET", f"{url}/runs/{run_id}/")
                assert status == 200
                # "live" means the owner answered from its table (routed when it is the other worker);
                # a worker answering for a run it does not own would fall back to the record.
                assert view["source"] == "live", (url, run_id)
                assert view["output"]["summary"].endswith("again")
        applied = [http_json("GET", url + "/health/")[1]["runs_applied"] for url in urls]
        assert all(applied), f"both workers should have run some of the runs: {applied}"
        engine.dispose()
    finally:
        stack.stop()
