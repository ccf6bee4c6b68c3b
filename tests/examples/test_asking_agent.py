"""An example agent that asks a person (``ask`` N): questions on one task, the answers, the counts, cancelling."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from a2a.helpers import new_data_part, new_text_part
from a2a.types.a2a_pb2 import Message, Role

from examples.agents.cli import parse_args
from examples.agents.executor import answer_value
from examples.agents.researcher import SPEC as RESEARCHER
from examples.agents.server import AgentConfig, running_agent
from examples.agents.skills import research
from tests.examples.test_agents import rpc

pytestmark = pytest.mark.timeout(60)

TOPIC = {"topic": "Kafka streams", "depth": 1}


@dataclass(frozen=True)
class Dialect:
    """How one A2A protocol version spells the same requests and states."""

    protocol: str
    version: str | None
    send_method: str
    get_method: str
    cancel_method: str
    input_required: str
    completed: str
    canceled: str

    def message(
        self,
        message_id: str,
        *,
        text: str | None = None,
        data: dict[str, Any] | None = None,
        task: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """SendMessage params: a user message, continuing ``task`` when given."""
        parts: list[dict[str, Any]] = []
        if text is not None:
            parts.append({"text": text, **({"kind": "text"} if self.version is None else {})})
        if data is not None:
            parts.append({"data": data, **({"kind": "data"} if self.version is None else {})})
        message: dict[str, Any] = {"messageId": message_id, "role": self.role, "parts": parts}
        if self.version is None:
            message["kind"] = "message"
        if task is not None:
            message |= {"taskId": task["id"], "contextId": task["contextId"]}
        return {"message": message}

    @property
    def role(self) -> str:
        return "ROLE_USER" if self.version else "user"

    async def send(self, session: aiohttp.ClientSession, url: str, params: dict[str, Any]) -> dict[str, Any]:
        """The task a SendMessage answers with."""
        answer = await rpc(session, url, self.send_method, params, version=self.version)
        assert "result" in answer, answer
        task: dict[str, Any] = answer["result"]["task"] if self.version else answer["result"]
        return task


V10 = Dialect(
    protocol="1.0",
    version="1.0",
    send_method="SendMessage",
    get_method="GetTask",
    cancel_method="CancelTask",
    input_required="TASK_STATE_INPUT_REQUIRED",
    completed="TASK_STATE_COMPLETED",
    canceled="TASK_STATE_CANCELED",
)
V03 = Dialect(
    protocol="0.3",
    version=None,
    send_method="message/send",
    get_method="tasks/get",
    cancel_method="tasks/cancel",
    input_required="input-required",
    completed="completed",
    canceled="canceled",
)
DIALECTS = [V10, V03]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def question(task: dict[str, Any]) -> tuple[list[str], list[Any]]:
    """The texts and data of the task's status message (a question)."""
    parts = task["status"]["message"]["parts"]
    assert task["status"]["message"]["role"] in ("ROLE_AGENT", "agent")
    return [p["text"] for p in parts if "text" in p], [p["data"] for p in parts if "data" in p]


def asked(k: int, n: int) -> tuple[list[str], list[Any]]:
    return [f"Question {k} of {n}: what should I know before I go on? Reply with text or data."], [
        {"question": k, "of": n}
    ]


# --- what an answer is -----------------------------------------------------------------------------------------------


def test_an_answer_is_its_text_or_its_data() -> None:
    def message(*parts: Any) -> Message:
        return Message(message_id="m", role=Role.ROLE_USER, parts=list(parts))

    assert answer_value(message(new_text_part("yes"))) == "yes"
    assert answer_value(message(new_text_part("a"), new_text_part("b"))) == "a\nb"
    assert answer_value(message(new_data_part({"x": 1}), new_data_part({"y": 2}))) == {"x": 1, "y": 2}
    assert answer_value(message(new_text_part("why"), new_data_part({"x": 1}))) == {"text": "why", "x": 1}
    assert answer_value(message(new_text_part("why"), new_data_part({"text": "t"}))) == {"text": "t"}
    assert answer_value(message(new_text_part("only"), new_data_part([1, 2]))) == "only"  # not an object: ignored
    assert answer_value(message()) == {}


def test_the_ask_flag_and_its_environment_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_args(RESEARCHER, []).ask == 0
    assert parse_args(RESEARCHER, ["--ask", "2"]).ask == 2
    monkeypatch.setenv("EXAMPLE_AGENT_ASK", "3")
    assert parse_args(RESEARCHER, []).ask == 3
    with pytest.raises(SystemExit):
        parse_args(RESEARCHER, ["--ask", "-1"])


# --- served ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.protocol)
async def test_two_questions_then_the_output_with_the_answers(session: aiohttp.ClientSession, dialect: Dialect) -> None:
    async with running_agent(RESEARCHER, AgentConfig(ask=2, protocol=dialect.protocol)) as agent:  # type: ignore[arg-type]
        first = await dialect.send(session, agent.url, dialect.message("m-start", data=TOPIC))
        assert first["status"]["state"] == dialect.input_required
        assert question(first) == asked(1, 2)
        assert "artifacts" not in first

        second = await dialect.send(session, agent.url, dialect.message("m-answer-1", text="costs", task=first))
        assert (second["id"], second["contextId"]) == (first["id"], first["contextId"])
        assert second["status"]["state"] == dialect.input_required
        assert question(second) == asked(2, 2)

        answer = {"focus": "benefits", "depth": 3}  # an answer does not change the skill's input
        done = await dialect.send(session, agent.url, dialect.message("m-answer-2", data=answer, task=first))
        assert done["id"] == first["id"]
        assert done["status"]["state"] == dialect.completed
        [artifact] = done["artifacts"]
        assert artifact["name"] == "result"
        [output] = [p["data"] for p in artifact["parts"] if "data" in p]

        fetched = await rpc(session, agent.url, dialect.get_method, {"id": first["id"]}, version=dialect.version)
        stats = agent.stats.snapshot()
    assert output == {**research(TOPIC), "answers": ["costs", answer]}  # 1.0 numbers come back as equal floats
    assert fetched["result"]["status"]["state"] == dialect.completed
    assert stats["calls"] == 3
    assert stats["by_message_id"] == {"m-start": 1, "m-answer-1": 1, "m-answer-2": 1}
    assert stats["continuations"] == {"m-answer-1": 1, "m-answer-2": 1}
    assert stats["continued_tasks"] == {first["id"]: 2}
    assert stats["methods"] == {dialect.send_method: 3, dialect.get_method: 1}
    assert stats["cancelled_task_ids"] == []


async def test_an_answer_sent_again_is_one_answer(session: aiohttp.ClientSession) -> None:
    """A retried answer (same message id) is asked the same question again, not counted twice."""
    async with running_agent(RESEARCHER, AgentConfig(ask=2)) as agent:
        first = await V10.send(session, agent.url, V10.message("m-start", data=TOPIC))
        again = [
            await V10.send(session, agent.url, V10.message("m-answer-1", text="costs", task=first)) for _ in range(2)
        ]
        assert [question(task) for task in again] == [asked(2, 2), asked(2, 2)]
        done = await V10.send(session, agent.url, V10.message("m-answer-2", text="and why", data={"n": 1}, task=first))
        stats = agent.stats.snapshot()
    [artifact] = done["artifacts"]
    assert artifact["parts"][0]["data"]["answers"] == ["costs", {"text": "and why", "n": 1}]
    assert stats["continuations"] == {"m-answer-1": 2, "m-answer-2": 1}
    assert stats["calls"] == 4


async def test_one_question_and_the_first_message_as_text(session: aiohttp.ClientSession) -> None:
    async with running_agent(RESEARCHER, AgentConfig(ask=1)) as agent:
        first = await V10.send(session, agent.url, V10.message("m", text="ignored", data={"topic": "tides"}))
        assert question(first) == asked(1, 1)
        done = await V10.send(session, agent.url, V10.message("a", text="ok", task=first))
    assert done["status"]["state"] == V10.completed
    assert done["artifacts"][0]["parts"][0]["data"] == {**research({"topic": "tides"}), "answers": ["ok"]}


async def test_a_skill_that_refuses_the_first_input_fails_after_the_answers(session: aiohttp.ClientSession) -> None:
    async with running_agent(RESEARCHER, AgentConfig(ask=1)) as agent:
        first = await V10.send(session, agent.url, V10.message("m", data={"depth": 1}))
        assert first["status"]["state"] == V10.input_required
        failed = await V10.send(session, agent.url, V10.message("a", data={"topic": "too late"}, task=first))
    assert failed["status"]["state"] == "TASK_STATE_FAILED"
    assert "non-empty string 'topic'" in failed["status"]["message"]["parts"][0]["text"]


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.protocol)
async def test_cancelling_a_waiting_task(session: aiohttp.ClientSession, dialect: Dialect) -> None:
    async with running_agent(RESEARCHER, AgentConfig(ask=2, protocol=dialect.protocol)) as agent:  # type: ignore[arg-type]
        first = await dialect.send(session, agent.url, dialect.message("m-start", data=TOPIC))
        assert first["status"]["state"] == dialect.input_required
        cancelled = await rpc(session, agent.url, dialect.cancel_method, {"id": first["id"]}, version=dialect.version)
        late = await rpc(
            session,
            agent.url,
            dialect.send_method,
            dialect.message("m-late", text="x", task=first),
            version=dialect.version,
        )
        stats = agent.stats.snapshot()
    assert cancelled["result"]["status"]["state"] == dialect.canceled
    assert "error" in late  # a canceled task takes no more answers
    assert stats["cancelled_task_ids"] == [first["id"]]
    assert stats["methods"] == {dialect.send_method: 2, dialect.cancel_method: 1}
    assert stats["continuations"] == {"m-late": 1}


async def test_input_required_still_asks_forever(session: aiohttp.ClientSession) -> None:
    async with running_agent(RESEARCHER, AgentConfig(input_required=True, ask=1)) as agent:
        first = await V10.send(session, agent.url, V10.message("m", data=TOPIC))
        later = await V10.send(session, agent.url, V10.message("a", text="more", task=first))
    for task in (first, later):
        assert task["status"]["state"] == V10.input_required
        assert question(task) == (["Which aspect should I focus on? Reply with more detail."], [])
