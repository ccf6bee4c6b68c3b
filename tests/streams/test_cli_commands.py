"""The commands' functions (streams/cli.py) called directly: PostgreSQL, the registry and the broker faked.

``manage_agents``, ``control_run`` and ``show_status`` take the settings and
print what the command prints; PostgreSQL is faked at ``_engine`` and
``WorkflowRepository`` (:class:`FakeRepository`), the registry at
``RegistryStore`` (:class:`FakeStore`), the broker at ``send``. Agent cards are
read from a real example agent. Then the handlers: each passes its arguments
on, and ``register`` adds them all to the app.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, cast
from unittest.mock import AsyncMock

import pytest

from examples.agents.researcher import SPEC as RESEARCHER
from examples.agents.server import running_agent
from models.agents import AgentEntry
from models.messages import ControlCommand, ControlMessage, decode
from streams import cli
from streams.cli import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    CliError,
    SwitchyardCommand,
    control_run,
    give_input,
    manage_agents,
    register,
    show_status,
)
from streams.views import record_view
from switchyard.agent_cards import AgentCardError, CardInfo
from switchyard.db import RunRecord, StepRecord
from switchyard.settings import Settings
from tests.streams.test_answers import StateRepository, approval, asked_twice, looped, mapped, waiting
from tests.streams.test_cli import PLAN_FILE, REGISTRY_FILE, T0, record_of, rejected, submission
from tests.streams.test_web import FakeRepository, FakeStore

CONTROL = "orchestrator.control"


@dataclass
class Fakes:
    settings: Settings
    repo: FakeRepository
    store: FakeStore
    send: AsyncMock

    def sent(self) -> list[ControlMessage]:
        return [decode(ControlMessage, call.kwargs["value"]) for call in self.send.await_args_list]


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Fakes:
    repo, store, send = FakeRepository(), FakeStore(), AsyncMock(return_value=None)
    monkeypatch.setattr(cli, "_engine", lambda settings: object())
    monkeypatch.setattr(cli, "WorkflowRepository", lambda engine: repo)
    monkeypatch.setattr(cli, "RegistryStore", lambda engine, settings=None: store)
    monkeypatch.setattr(cli, "send", send)
    return Fakes(Settings(database_url=None), repo, store, send)


def agent(name: str, url: str = "http://127.0.0.1:9/") -> AgentEntry:
    return AgentEntry.model_validate({"name": name, "url": url})


# --------------------------------------------------------------- agents


async def test_agents_list(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    assert await manage_agents(fakes.settings, "list", None, None) == 0
    assert capsys.readouterr().out == "no agents registered (add one with: agents add URL)\n"
    fakes.store.entries = {"a": agent("a"), "b": agent("b", "http://127.0.0.1:8/a2a")}
    assert await manage_agents(fakes.settings, "list", None, None) == 0
    assert capsys.readouterr().out == "a\thttp://127.0.0.1:9/\tA2A 1.0\nb\thttp://127.0.0.1:8/a2a\tA2A 1.0\n"


@pytest.mark.parametrize(("action", "what"), [("add", "URL"), ("import", "FILE"), ("remove", "NAME")])
async def test_agents_actions_need_their_target(fakes: Fakes, action: str, what: str) -> None:
    with pytest.raises(CliError) as raised:
        await manage_agents(fakes.settings, action, None, None)
    assert (str(raised.value), raised.value.code) == (f"agents {action} needs a {what}", EXIT_BAD_INPUT)


async def test_agents_add_reads_the_card_and_registers_the_agent(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_agent(RESEARCHER) as served:
        assert await manage_agents(fakes.settings, "add", served.url, None) == 0
        assert await manage_agents(fakes.settings, "add", served.url, "other-name") == 0
    entry = fakes.store.entries["researcher"]
    assert (entry.url, entry.protocol_version) == (served.url, "1.0")
    assert (entry.description or "").startswith("Gathers")
    assert fakes.store.entries["other-name"].url == served.url
    assert capsys.readouterr().out.splitlines()[0] == f"registered researcher -> {served.url} (A2A 1.0)"


async def test_agents_add_of_an_unreadable_card_is_exit_1_naming_the_url(
    fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "fetch_card", AsyncMock(side_effect=AgentCardError("http://h/ answered HTTP 404")))
    with pytest.raises(CliError) as raised:
        await manage_agents(fakes.settings, "add", "http://h/", None)
    assert (str(raised.value), raised.value.code) == ("http://h/: http://h/ answered HTTP 404", EXIT_FAILED)
    assert fakes.store.entries == {}


async def test_agents_add_of_a_card_that_makes_no_entry_is_exit_2(
    fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = CardInfo(name="has space", url="http://127.0.0.1:9/", protocol_version="1.0")
    monkeypatch.setattr(cli, "fetch_card", AsyncMock(return_value=card))
    with pytest.raises(CliError, match="does not make a valid registry entry") as raised:
        await manage_agents(fakes.settings, "add", "http://h/", None)
    assert raised.value.code == EXIT_BAD_INPUT


async def test_agents_import(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    assert await manage_agents(fakes.settings, "import", str(REGISTRY_FILE), None) == 0
    assert list(fakes.store.entries) == ["researcher", "summarizer", "reviewer"]
    assert capsys.readouterr().out == "imported 3 agent(s): researcher, summarizer, reviewer\n"


async def test_agents_remove(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    fakes.store.entries["a"] = agent("a")
    assert await manage_agents(fakes.settings, "remove", "a", None) == 0
    assert capsys.readouterr().out == "removed a\n"
    with pytest.raises(CliError) as raised:
        await manage_agents(fakes.settings, "remove", "a", None)
    assert (str(raised.value), raised.value.code) == ("no agent 'a' in the registry", EXIT_FAILED)


# --------------------------------------------------------------- control


async def test_a_command_the_status_allows_is_sent_keyed_by_the_run(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.repo.records["cli-run-1"] = record_of(submission(), "RUNNING")
    assert await control_run(fakes.settings, CONTROL, "cli-run-1", ControlCommand.CANCEL) == 0
    ((settings, topic),) = [call.args for call in fakes.send.await_args_list]
    assert (settings, topic) == (fakes.settings, CONTROL)
    call = fakes.send.await_args
    assert call is not None
    assert call.kwargs["key"] == b"cli-run-1"
    assert call.kwargs["create_topics"] is False
    (message,) = fakes.sent()
    assert (message.run_id, message.command) == ("cli-run-1", ControlCommand.CANCEL)
    assert message.reason == "cancel requested from the command line"
    assert capsys.readouterr().out == "cancel requested for run cli-run-1\n"
    assert fakes.repo.calls == ["get_run cli-run-1"]


@pytest.mark.parametrize(
    ("status", "command", "reason"),
    [
        (None, ControlCommand.CANCEL, "no run 'cli-run-1'"),
        ("COMPLETED", ControlCommand.CANCEL, "is already COMPLETED"),
        ("RUNNING", ControlCommand.RETRY, "only a FAILED run can be retried"),
        ("FAILED", ControlCommand.RESUME, "only a RUNNING run can be resumed"),
    ],
)
async def test_a_command_the_status_refuses_is_exit_1_and_sends_nothing(
    fakes: Fakes, status: str | None, command: ControlCommand, reason: str
) -> None:
    if status is not None:
        fakes.repo.records["cli-run-1"] = record_of(submission(), status)
    with pytest.raises(CliError) as raised:
        await control_run(fakes.settings, CONTROL, "cli-run-1", command)
    assert raised.value.code == EXIT_FAILED
    assert reason in str(raised.value)
    assert fakes.send.await_count == 0


async def test_a_run_stored_without_its_data_cannot_be_retried(fakes: Fakes) -> None:
    stored = record_of(submission(), "FAILED").model_copy(update={"error": {"kind": "state_too_large"}})
    fakes.repo.records["cli-run-1"] = stored
    with pytest.raises(CliError, match="cannot be retried"):
        await control_run(fakes.settings, CONTROL, "cli-run-1", ControlCommand.RETRY)
    assert fakes.send.await_count == 0


# --------------------------------------------------------------- input


@pytest.fixture
def checkpoints(fakes: Fakes, monkeypatch: pytest.MonkeyPatch) -> StateRepository:
    """PostgreSQL's checkpoints, which ``input`` reads the run from."""
    repo = StateRepository()
    monkeypatch.setattr(cli, "WorkflowRepository", lambda engine: repo)
    return repo


async def test_an_answer_is_sent_keyed_by_the_run_and_printed(
    fakes: Fakes, checkpoints: StateRepository, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints.states["run-1"] = waiting()
    assert await give_input(fakes.settings, CONTROL, "run-1", "s1", text="1999") == 0
    ((settings, topic),) = [call.args for call in fakes.send.await_args_list]
    assert (settings, topic) == (fakes.settings, CONTROL)
    call = fakes.send.await_args
    assert call is not None
    assert (call.kwargs["key"], call.kwargs["doing"], call.kwargs["create_topics"]) == (b"run-1", "the answer", False)
    (message,) = fakes.sent()
    assert (message.command, message.step_id, message.attempt, message.turn) == (ControlCommand.INPUT, "s1", 1, 0)
    assert message.answer is not None
    assert (message.answer.text, message.answer.data, message.answer.source) == ("1999", None, "cli")
    answer_id = message.answer.answer_id
    assert capsys.readouterr().out == f"answer {answer_id} sent to s1 of run run-1 (question 1)\n"
    assert checkpoints.calls == ["get_state run-1"]


async def test_the_agents_second_question_is_question_2(
    fakes: Fakes, checkpoints: StateRepository, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints.states["run-1"] = asked_twice()
    assert await give_input(fakes.settings, CONTROL, "run-1", "s1", text="May") == 0
    (message,) = fakes.sent()
    assert message.turn == 1
    assert capsys.readouterr().out.endswith(" sent to s1 of run run-1 (question 2)\n")


async def test_a_map_item_is_named_in_the_output(
    fakes: Fakes, checkpoints: StateRepository, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints.states["run-1"] = mapped()
    assert await give_input(fakes.settings, CONTROL, "run-1", "s1", text="b", item=1, iteration=1) == 0
    (message,) = fakes.sent()
    assert (message.item, message.iteration) == (1, 1)
    assert capsys.readouterr().out.endswith(" sent to s1 item 1 of run run-1 (question 1)\n")


@pytest.mark.parametrize("decision", ["approve", "reject"])
async def test_an_approval_is_decided(fakes: Fakes, checkpoints: StateRepository, decision: str) -> None:
    checkpoints.states["run-1"] = approval()
    assert await give_input(fakes.settings, CONTROL, "run-1", "review", decision=decision, data_json='{"n": 1}') == 0
    (message,) = fakes.sent()
    assert message.answer is not None
    assert (message.answer.decision, message.answer.data) == (decision, {"n": 1})


@pytest.mark.parametrize(
    "data_json", ['"words"', "42", "-4.5e3", "true", "false", "0", '""', "[]", '[1, "a", null]', '{"k": {"n": null}}']
)
async def test_data_is_any_json_value(fakes: Fakes, checkpoints: StateRepository, data_json: str) -> None:
    checkpoints.states["run-1"] = waiting()
    assert await give_input(fakes.settings, CONTROL, "run-1", "s1", data_json=data_json) == 0
    (message,) = fakes.sent()
    assert message.answer is not None
    assert message.answer.data == json.loads(data_json)
    assert message.answer.text is None


async def test_text_and_data_go_together(fakes: Fakes, checkpoints: StateRepository) -> None:
    checkpoints.states["run-1"] = waiting()
    assert await give_input(fakes.settings, CONTROL, "run-1", "s1", text="see data", data_json="[1999]") == 0
    (message,) = fakes.sent()
    assert message.answer is not None
    assert (message.answer.text, message.answer.data) == ("see data", [1999])


@pytest.mark.parametrize(
    ("data_json", "why"),
    [
        ("NaN", "NaN is not JSON"),
        ("Infinity", "Infinity is not JSON"),
        ("-Infinity", "-Infinity is not JSON"),
        ('{"a": [NaN]}', "NaN is not JSON"),
        ("{", "Expecting property name enclosed in double quotes"),
        ("'single'", "Expecting value"),
        ("", "Expecting value"),
        ("1 2", "Extra data"),
        ("[" * 100_000 + "]" * 100_000, ""),
    ],
)
async def test_data_that_is_not_json_is_exit_2_before_anything_is_read(
    fakes: Fakes, checkpoints: StateRepository, data_json: str, why: str
) -> None:
    checkpoints.states["run-1"] = waiting()
    with pytest.raises(CliError) as raised:
        await give_input(fakes.settings, CONTROL, "run-1", "s1", data_json=data_json)
    assert raised.value.code == EXIT_BAD_INPUT
    assert str(raised.value).startswith("--data is not JSON: ")
    assert why in str(raised.value)
    assert "\n" not in str(raised.value)
    assert (fakes.send.await_count, checkpoints.calls) == (0, [])


@pytest.mark.parametrize(
    ("make", "step_id", "options", "reason"),
    [
        (None, "s1", {"text": "x"}, "no run 'run-1'"),
        (waiting, "s9", {"text": "x"}, "run 'run-1' has no step 's9'"),
        (waiting, "s2", {"text": "x"}, "step 's2' of run 'run-1' is not waiting for input (it has not started)"),
        (mapped, "s1", {"text": "x"}, "2 items of step 's1' of run 'run-1' wait for input (items 0, 1); name one"),
        (
            looped,
            "s1",
            {"text": "x", "iteration": 1},
            "step 's1' of run 'run-1' is not waiting for input (it is RUNNING)",
        ),
    ],
)
async def test_a_run_that_does_not_wait_there_is_exit_1_and_sends_nothing(
    fakes: Fakes, checkpoints: StateRepository, make: Any, step_id: str, options: dict[str, Any], reason: str
) -> None:
    if make is not None:
        checkpoints.states["run-1"] = make()
    with pytest.raises(CliError) as raised:
        await give_input(fakes.settings, CONTROL, "run-1", step_id, **options)
    assert (str(raised.value), raised.value.code) == (reason, EXIT_FAILED)
    assert fakes.send.await_count == 0


@pytest.mark.parametrize(
    ("make", "step_id", "options", "reason"),
    [
        (
            approval,
            "review",
            {"text": "yes"},
            "step 'review' is an approval: decide with approve or reject (and optional data)",
        ),
        (
            waiting,
            "s1",
            {"decision": "approve"},
            "step 's1' waits for an answer to its agent's question, not a decision: give text or data",
        ),
        (waiting, "s1", {}, "an answer to step 's1' needs text or data"),
        (waiting, "s1", {"text": ""}, "an answer to step 's1' needs text or data"),
        (waiting, "s1", {"data_json": "null"}, "an answer to step 's1' needs text or data"),
        (waiting, "s1", {"text": "x" * 10_001}, "invalid answer: text: String should have at most 10000 characters"),
        (waiting, "s1", {"text": "caf\udce9"}, "invalid answer: text: Input should be a valid string"),
    ],
)
async def test_an_answer_of_the_wrong_form_is_exit_2_and_sends_nothing(
    fakes: Fakes, checkpoints: StateRepository, make: Any, step_id: str, options: dict[str, Any], reason: str
) -> None:
    checkpoints.states["run-1"] = make()
    with pytest.raises(CliError) as raised:
        await give_input(fakes.settings, CONTROL, "run-1", step_id, **options)
    assert raised.value.code == EXIT_BAD_INPUT
    assert str(raised.value).startswith(reason)
    assert fakes.send.await_count == 0


async def test_an_answer_too_large_is_exit_2_and_sends_nothing(fakes: Fakes, checkpoints: StateRepository) -> None:
    checkpoints.states["run-1"] = waiting()
    small = Settings(database_url=None, max_message_bytes=16_384)
    with pytest.raises(CliError) as raised:
        await give_input(small, CONTROL, "run-1", "s1", data_json=json.dumps("x" * 20_000))
    assert raised.value.code == EXIT_BAD_INPUT
    assert "over the limit of 16384 (SWITCHYARD_MAX_MESSAGE_BYTES)" in str(raised.value)
    assert fakes.send.await_count == 0


async def test_a_broker_that_refuses_the_answer_prints_nothing(
    fakes: Fakes, checkpoints: StateRepository, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints.states["run-1"] = waiting()
    fakes.send.side_effect = CliError("cannot reach the broker at x", code=EXIT_FAILED)
    with pytest.raises(CliError, match="cannot reach the broker"):
        await give_input(fakes.settings, CONTROL, "run-1", "s1", text="x")
    assert capsys.readouterr().out == ""


async def test_data_with_a_number_out_of_range_is_exit_2(fakes: Fakes, checkpoints: StateRepository) -> None:
    checkpoints.states["run-1"] = waiting()
    with pytest.raises(CliError) as raised:
        await give_input(fakes.settings, CONTROL, "run-1", "s1", data_json="1e400")
    assert raised.value.code == EXIT_BAD_INPUT
    assert fakes.send.await_count == 0


async def test_data_that_is_not_unicode_is_exit_2(fakes: Fakes, checkpoints: StateRepository) -> None:
    checkpoints.states["run-1"] = waiting()
    with pytest.raises(CliError) as raised:
        await give_input(fakes.settings, CONTROL, "run-1", "s1", data_json='"caf\\udce9"')
    assert raised.value.code == EXIT_BAD_INPUT


async def test_the_input_handler_passes_its_arguments_on(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(database_url=None)
    given = AsyncMock(return_value=0)
    monkeypatch.setattr(cli, "give_input", given)
    handler = cli.input_
    assert handler.__name__ == "input"
    assert await handler(command_of(settings), "r1", "s1", "t", "[1]", "approve", 2, 3) == 0
    given.assert_awaited_once_with(
        settings, CONTROL, "r1", "s1", text="t", data_json="[1]", decision="approve", item=2, iteration=3
    )


# --------------------------------------------------------------- status


def with_an_attempt(record: RunRecord) -> RunRecord:
    attempt = StepRecord(
        run_id=record.run_id,
        step_id="research",
        attempt=1,
        agent_name="researcher",
        status="SUCCEEDED",
        correlation_id=f"{record.run_id}/research/1",
        started_at=T0,
        completed_at=T0 + timedelta(seconds=1.5),
    )
    return record.model_copy(update={"steps": (attempt,)})


async def test_status_of_a_completed_run(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    fakes.repo.records["cli-run-1"] = with_an_attempt(record_of(submission()))
    assert await show_status(fakes.settings, "cli-run-1", False) == 0
    assert capsys.readouterr().out.splitlines() == [
        "run cli-run-1  COMPLETED  workflow research-summarize v1.0",
        "  research #1 [researcher] SUCCEEDED in 1.50s",
        'output: {"summary": "alpha notes"}',
    ]


async def test_status_of_a_failed_run_and_of_a_refused_submission(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = record_of(submission(), "FAILED").model_copy(update={"error": {"message": "the agent said no"}})
    fakes.repo.records["cli-run-1"] = failed
    assert await show_status(fakes.settings, "cli-run-1", False) == EXIT_FAILED
    assert capsys.readouterr().out.splitlines()[-1] == "error: the agent said no"
    fakes.repo.records["cli-run-1"] = rejected()
    assert await show_status(fakes.settings, "cli-run-1", False) == EXIT_FAILED
    assert capsys.readouterr().out.splitlines()[-1] == (
        "refused by the executor: the submission could not be read: plan: Field required"
    )


async def test_status_as_json_is_the_record_view(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    record = with_an_attempt(record_of(submission(), "CANCELLED", with_state=False))  # shown from its rows
    fakes.repo.records["cli-run-1"] = record
    assert await show_status(fakes.settings, "cli-run-1", True) == EXIT_FAILED
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(record_view(record)))


async def test_status_of_an_unknown_run_is_exit_1(fakes: Fakes) -> None:
    with pytest.raises(CliError) as raised:
        await show_status(fakes.settings, "nope", False)
    assert (str(raised.value), raised.value.code) == ("no run 'nope' (it may not be checkpointed yet)", EXIT_FAILED)


# --------------------------------------------------------------- handlers


def command_of(settings: Settings) -> SwitchyardCommand:
    """What a handler gets as ``self``: a command whose ``app`` has the settings and the topics."""
    control = SimpleNamespace(get_topic_name=lambda: CONTROL)
    plans = SimpleNamespace(get_topic_name=lambda: "orchestrator.plans")
    app = SimpleNamespace(settings=settings, control_topic=control, plans_topic=plans)
    return cast(SwitchyardCommand, SimpleNamespace(app=app))


@pytest.mark.parametrize(
    ("handler", "command"),
    [(cli.cancel, ControlCommand.CANCEL), (cli.retry, ControlCommand.RETRY), (cli.resume, ControlCommand.RESUME)],
)
async def test_the_control_handlers_pass_their_command_on(
    monkeypatch: pytest.MonkeyPatch, handler: Any, command: ControlCommand
) -> None:
    settings = Settings(database_url=None)
    control = AsyncMock(return_value=0)
    monkeypatch.setattr(cli, "control_run", control)
    assert await handler(command_of(settings), "r1") == 0
    control.assert_awaited_once_with(settings, CONTROL, "r1", command)


async def test_the_other_handlers_pass_their_arguments_on(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(database_url=None)
    self = command_of(settings)
    calls = {name: AsyncMock(return_value=0) for name in ("manage_agents", "show_status", "submit_run")}
    for name, mock in calls.items():
        monkeypatch.setattr(cli, name, mock)
    assert await cli.agents(self, "add", "http://h/", "n") == 0
    calls["manage_agents"].assert_awaited_once_with(settings, "add", "http://h/", "n")
    assert await cli.status(self, "r1", True) == 0
    calls["show_status"].assert_awaited_once_with(settings, "r1", True)
    assert await cli.submit(self, str(PLAN_FILE), '{"topic": "x"}', None, "given", True, 5.0) == 0
    call = calls["submit_run"].await_args
    assert call is not None
    (_, topic, made), options = call
    assert (topic, made.run_id, made.input) == ("orchestrator.plans", "given", {"topic": "x"})
    assert options == {"given_run_id": True, "wait": True, "timeout": 5.0}


def test_register_adds_every_command_on_the_switchyard_base() -> None:
    added: dict[str, type] = {}

    class RecordingApp:
        def command(self, *options: Any, base: type) -> Any:
            def add(handler: Any) -> Any:
                added[handler.__name__] = base
                assert options, f"{handler.__name__} takes arguments"
                return handler

            return add

    register(cast(Any, RecordingApp()))
    assert added == dict.fromkeys(
        ["agents", "submit", "cancel", "retry", "resume", "input", "status"], SwitchyardCommand
    )
