"""The example agents: deterministic skills, valid cards, the SDK's own client, counts, the CLI, the registry."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from a2a.client import ClientConfig, create_client
from a2a.compat.v0_3 import types as types_v03
from a2a.helpers import get_data_parts, new_data_part
from a2a.types import a2a_pb2
from a2a.utils.proto_utils import validate_proto_required_fields
from google.protobuf.json_format import ParseDict  # type: ignore[import-untyped,unused-ignore]

from examples.agents.researcher import SPEC as RESEARCHER
from examples.agents.reviewer import SPEC as REVIEWER
from examples.agents.server import AgentConfig, AgentSpec, running_agent
from examples.agents.skills import SkillInputError, research, review, summarize
from examples.agents.summarizer import SPEC as SUMMARIZER
from models.agents import AgentEntry
from switchyard.agent_cards import parse_agent_card

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SPECS = [RESEARCHER, SUMMARIZER, REVIEWER]
INPUTS: dict[str, dict[str, Any]] = {
    "researcher": {"topic": "Kafka streams", "depth": 1},
    "summarizer": {"text": "one two three four five", "max_words": 3, "title": "Short"},
    "reviewer": {"summary": "A summary of four words", "sources": ["https://example.org/a"]},
}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


async def rpc(
    session: aiohttp.ClientSession, url: str, method: str, params: dict[str, Any], *, version: str | None = "1.0"
) -> dict[str, Any]:
    headers = {"A2A-Version": version} if version else {}
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    async with session.post(url, json=body, headers=headers) as response:
        assert response.status == 200
        answer: dict[str, Any] = await response.json()
        return answer


async def post(session: aiohttp.ClientSession, url: str, method: str, params: dict[str, Any]) -> int:
    """A 1.0 JSON-RPC request whose HTTP status is all that matters."""
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    async with session.post(url, json=body, headers={"A2A-Version": "1.0"}) as response:
        await response.read()
        return response.status


def send_params(message_id: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"message": {"messageId": message_id, "role": "ROLE_USER", "parts": [{"data": data}]}}


# --- skills ----------------------------------------------------------------------------------------------------------


def test_research_is_deterministic() -> None:
    first = research({"topic": "Kafka streams", "depth": 2})
    assert first == research({"topic": "Kafka streams", "depth": 2.0})  # 1.0 carries numbers as doubles
    assert first["topic"] == "Kafka streams"
    assert first["notes"].startswith("Kafka streams has been studied")
    assert first["sources"] == [f"https://example.org/kafka-streams/source-{n}" for n in (1, 2, 3)]
    assert len(research({"topic": "x", "depth": 4})["sources"]) == 5
    assert research({"topic": " x "})["topic"] == "x"


def test_summarize() -> None:
    text = "one two three four five"
    assert summarize({"text": text, "max_words": 3}) == {"summary": "one two three ...", "words": 5}
    assert summarize({"text": text, "title": "T"}) == {"summary": "T: one two three four five", "words": 5}


def test_review() -> None:
    assert review(INPUTS["reviewer"]) == {"approved": True, "comments": "Approved: 5 words backed by 1 source(s)."}
    rejected = review({"summary": "too short", "sources": ["ftp://x", "notes.txt"]})
    assert rejected == {
        "approved": False,
        "comments": "The summary is too short (2 words, at least 3 wanted); 2 source(s) are not http(s) urls.",
    }
    assert review({"summary": "long enough summary", "sources": []})["approved"] is False


def test_review_with_min_words_and_a_writer_that_revises_until_approved() -> None:
    text = " ".join(f"w{i}" for i in range(40))
    drafts = []
    previous = None
    for _ in range(3):
        draft = summarize({"text": text, "max_words": 10, "title": "T", **({"previous": previous} if previous else {})})
        drafts.append(len(draft["summary"].removesuffix(" ...").split()) - 1)
        verdict = review({"summary": draft["summary"], "sources": ["https://x"], "min_words": 25})
        previous = draft["summary"]
        if verdict["approved"]:
            break
        assert "at least 25 wanted" in verdict["comments"]
    assert drafts == [10, 20, 30]
    assert verdict["approved"] is True


@pytest.mark.parametrize(
    ("skill", "data", "reason"),
    [
        (research, {}, "non-empty string 'topic'"),
        (research, {"topic": "x", "depth": 9}, "'depth' must be a whole number"),
        (research, {"topic": "x", "depth": True}, "'depth' must be a whole number"),
        (summarize, {"text": 3}, "non-empty string 'text'"),
        (summarize, {"text": "x", "max_words": 1.5}, "'max_words'"),
        (review, {"summary": "s"}, "'sources', a list of strings"),
        (review, {"sources": []}, "non-empty string 'summary'"),
    ],
)
def test_skills_refuse_bad_input(skill: Any, data: dict[str, Any], reason: str) -> None:
    with pytest.raises(SkillInputError, match=reason):
        skill(data)


# --- served agents ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["1.0", "0.3", "both"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
async def test_agent_cards_are_valid(session: aiohttp.ClientSession, spec: AgentSpec, protocol: str) -> None:
    async with running_agent(spec, AgentConfig(protocol=protocol)) as agent:  # type: ignore[arg-type]
        response = await session.get(agent.url + ".well-known/agent-card.json")
        assert response.status == 200
        raw = await response.read()
    card = json.loads(raw)
    proto = ParseDict(card, a2a_pb2.AgentCard(), ignore_unknown_fields=True)
    validate_proto_required_fields(proto)
    assert proto.name == spec.name
    assert [s.id for s in proto.skills] == [spec.skill_id]
    if protocol != "1.0":
        legacy = types_v03.AgentCard.model_validate(card)  # what a 0.3 client reads
        assert (legacy.url, legacy.protocol_version) == (agent.url, "0.3")
    else:
        assert "url" not in card  # a 1.0-only card has no 0.3 fields
    info = parse_agent_card(raw, agent.url)
    assert (info.name, info.url) == (spec.name, agent.url)
    assert info.protocol_version == ("0.3" if protocol == "0.3" else "1.0")


@pytest.mark.parametrize("protocol", ["1.0", "0.3"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
async def test_the_official_sdk_client_gets_deterministic_outputs(spec: AgentSpec, protocol: str) -> None:
    data = INPUTS[spec.name]
    async with running_agent(spec, AgentConfig(protocol=protocol)) as agent:  # type: ignore[arg-type]
        client = await create_client(agent.url, ClientConfig(streaming=False))
        outputs = []
        try:
            for n in range(2):
                message = a2a_pb2.Message(message_id=f"m-{n}", role=a2a_pb2.Role.ROLE_USER, parts=[new_data_part(data)])
                async for event in client.send_message(a2a_pb2.SendMessageRequest(message=message)):
                    assert event.task.status.state == a2a_pb2.TaskState.TASK_STATE_COMPLETED
                    [artifact] = event.task.artifacts
                    assert artifact.name == "result"
                    outputs.extend(get_data_parts(artifact.parts))
        finally:
            await client.close()
        assert agent.stats.calls == 2
    expected = spec.skill(data)
    assert outputs == [expected, expected]  # whole numbers come back as equal floats (5.0 == 5)


async def test_stats_count_every_invocation(session: aiohttp.ClientSession) -> None:
    async with running_agent(RESEARCHER, AgentConfig(fail_times=1)) as agent:
        keyed = send_params("m-a", {"topic": "x"})
        keyed["metadata"] = {"idempotency_key": "run/step/1"}
        assert await post(session, agent.url, "SendMessage", keyed) == 503
        answer = await rpc(session, agent.url, "SendMessage", keyed)
        await rpc(session, agent.url, "GetTask", {"id": answer["result"]["task"]["id"]})
        assert await post(session, agent.url, "SendMessage", send_params("m-b", {"topic": "y"})) == 503
        async with session.get(agent.url + "stats") as response:
            stats = await response.json()
    assert stats == {
        "calls": 3,
        "by_message_id": {"m-a": 2, "m-b": 1},
        "by_idempotency_key": {"run/step/1": 2},
        "continuations": {},
        "continued_tasks": {},
        "cancelled_task_ids": [],
        "methods": {"SendMessage": 3, "GetTask": 1},
        "injected_failures": 2,
        "auth_rejected": 0,
        "in_flight": 0,
        "peak_in_flight": 1,
    }
    assert stats == agent.stats.snapshot()


@pytest.mark.parametrize(("scope", "statuses"), [("message", [503, 200, 503, 200]), ("global", [503, 200, 200, 200])])
async def test_fail_times_per_message_or_global(
    session: aiohttp.ClientSession, scope: str, statuses: list[int]
) -> None:
    async with running_agent(RESEARCHER, AgentConfig(fail_times=1, fail_scope=scope)) as agent:  # type: ignore[arg-type]
        seen = [
            await post(session, agent.url, "SendMessage", send_params(message_id, {"topic": "x"}))
            for message_id in ("m-1", "m-1", "m-2", "m-2")
        ]
    assert seen == statuses


async def test_sdk_facts_the_bridge_relies_on(session: aiohttp.ClientSession) -> None:
    """Pinned: a 1.0 call needs A2A-Version; no dedup by messageId; a second CancelTask is refused."""
    async with running_agent(RESEARCHER, AgentConfig(working=True, slow_s=5)) as agent:
        unversioned = await rpc(session, agent.url, "SendMessage", send_params("m", {"topic": "x"}), version=None)
        assert unversioned["error"]["code"] == -32009
        first = await rpc(session, agent.url, "SendMessage", send_params("same", {"topic": "x"}))
        second = await rpc(session, agent.url, "SendMessage", send_params("same", {"topic": "x"}))
        assert first["result"]["task"]["id"] != second["result"]["task"]["id"]  # the SDK does not deduplicate
        task_id = first["result"]["task"]["id"]
        cancelled = await rpc(session, agent.url, "CancelTask", {"id": task_id})
        assert cancelled["result"]["status"]["state"] == "TASK_STATE_CANCELED"
        again = await rpc(session, agent.url, "CancelTask", {"id": task_id})
        assert again["error"]["code"] == -32002  # TaskNotCancelable: CancelTask is not idempotent in a2a-sdk 1.3


async def test_a_0_3_agent_refuses_1_0_methods(session: aiohttp.ClientSession) -> None:
    async with running_agent(RESEARCHER, AgentConfig(protocol="0.3")) as agent:
        answer = await rpc(session, agent.url, "SendMessage", send_params("m", {"topic": "x"}))
        assert answer["error"]["code"] == -32601
        legacy = {
            "message": {
                "kind": "message",
                "messageId": "m",
                "role": "user",
                "parts": [{"kind": "data", "data": {"topic": "x"}}],
            }
        }
        ok = await rpc(session, agent.url, "message/send", legacy, version=None)
        assert ok["result"]["status"]["state"] == "completed"


# --- the command line ------------------------------------------------------------------------------------------------


def start_cli(*args: str, env: dict[str, str] | None = None, agent: str = "summarizer") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", f"examples.agents.{agent}", "--log-level", "WARNING", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def ready_url(process: subprocess.Popen[str], name: str) -> str:
    """The URL of an agent started with :func:`start_cli`, once it says it is ready."""
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
    assert line.startswith(f"{name} ready at http://127.0.0.1:"), line
    return line.split()[3]


async def stop_cli(process: subprocess.Popen[str]) -> None:
    """SIGTERM, and the process must be gone within 10 s (else it is killed and the test fails)."""
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(process.communicate, None, 10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise


async def test_cli_serves_with_env_configuration_and_stops_on_sigterm(session: aiohttp.ClientSession) -> None:
    process = start_cli("--port", "0", env={"EXAMPLE_AGENT_FAIL_TIMES": "1"})
    try:
        url = await ready_url(process, "summarizer")
        body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": send_params("m", {"text": "a b c"})}
        statuses = []
        for _ in range(2):
            async with session.post(url, json=body, headers={"A2A-Version": "1.0"}) as response:
                statuses.append(response.status)
                if response.status == 200:
                    answer = await response.json()
        assert statuses == [503, 200]
        assert answer["result"]["task"]["artifacts"][0]["parts"][0]["data"] == {"summary": "a b c", "words": 3.0}
    finally:
        await stop_cli(process)
    assert process.returncode == 0


async def test_cli_reports_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = start_cli("--port", str(taken.getsockname()[1]))
        try:
            _, err = await asyncio.to_thread(process.communicate, None, 20)
        finally:
            if process.returncode is None:
                process.kill()
                process.communicate()
    assert process.returncode == 1
    assert "cannot serve on 127.0.0.1" in err


# --- the registry file -----------------------------------------------------------------------------------------------


def test_registry_lists_the_example_agents() -> None:
    data = json.loads((ROOT / "examples" / "agents" / "registry.json").read_text())
    entries = [AgentEntry.model_validate(item) for item in data["agents"]]
    assert [e.name for e in entries] == [s.name for s in SPECS]
    for entry, spec in zip(entries, SPECS, strict=True):
        assert entry.url == f"http://127.0.0.1:{spec.default_port}/"
        assert entry.protocol_version == "1.0"
