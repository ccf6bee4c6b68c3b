"""The a2a-sdk ``AgentExecutor`` that runs one skill.

The input is the message's data parts that are objects, merged, with the text
parts joined as ``text`` when no data part sets it. The output goes back as
one data artifact named ``result``, and the task completes without a status
message, so a caller's output is exactly the skill's object. A skill that
refuses its input fails the task with the reason as the status message.

Asking a person (:attr:`Behaviour.ask` N, ``--ask N``): the agent asks N
questions, one at a time, on the same task, before it does its work.

* Each question is the task's status message (role agent) in state
  INPUT_REQUIRED, with two parts: the text ``"Question k of N: what should I
  know before I go on? Reply with text or data."`` (k from 1) and the data
  ``{"question": k, "of": N}``.
* The first message of a task gets question 1. Each message that continues
  the task (same ``taskId`` and ``contextId``) is one answer; while fewer than
  N answers came, the next question is asked.
* After the N-th answer the skill runs on the input of the task's first user
  message (as above: the answers are not part of it), and the task completes
  with the ``result`` artifact ``{**skill_output, "answers": [a1, ..., aN]}``,
  the answers in the order they came. An answer is its text parts joined with
  ``"\\n"`` (a string) when it has text parts and no object data parts;
  otherwise an object: its object data parts merged, with ``"text"`` (the
  joined text) added when it has text and no data part sets ``text``,
  exactly like a skill's input (``{}`` for an answer with neither).
* The answers are counted from the task's history (the user messages after
  the first, plus the message being answered when the SDK has not stored it
  yet, one per message id), not kept by the executor, so the count is right
  whichever executor instance or process state continues the task.

``input_required`` (``--input-required``) differs: every message of every
task, continuations included, is answered with INPUT_REQUIRED and a text
question, so such a task never completes. It wins over ``ask``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from a2a.helpers import get_data_parts, get_text_parts, new_data_part, new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types.a2a_pb2 import Message, Role

from examples.agents.skills import Skill, SkillInputError

__all__ = ["Behaviour", "SkillExecutor", "answer_value", "message_data", "message_input", "user_messages"]

QUESTION_TEXT = "Question {k} of {n}: what should I know before I go on? Reply with text or data."


@dataclass(frozen=True)
class Behaviour:
    """How the executor misbehaves, for fault tests.

    Attributes:
        work_s: Seconds the work takes (``--slow``).
        input_required: Ask for more input instead of working, forever (``--input-required``).
        pad_bytes: Add a ``padding`` string of this many bytes to the output (``--pad-output``).
        ask: Questions asked, one per turn of the task, before the work (``--ask``); see the module docstring.
    """

    work_s: float = 0.0
    input_required: bool = False
    pad_bytes: int = 0
    ask: int = 0


def message_data(message: Message | None) -> dict[str, Any]:
    """A message's object data parts merged, with its text parts joined as ``text`` unless a data part sets it."""
    if message is None:
        return {}
    data: dict[str, Any] = {}
    for value in get_data_parts(message.parts):
        if isinstance(value, dict):
            data.update(value)
    texts = get_text_parts(message.parts)
    if texts and "text" not in data:
        data["text"] = "\n".join(texts)
    return data


def message_input(context: RequestContext) -> dict[str, Any]:
    """The skill's input, read from the request's message."""
    return message_data(context.message)


def answer_value(message: Message) -> str | dict[str, Any]:
    """What one answer contributes to ``answers``: its text alone, else an object (see the module docstring)."""
    has_data = any(isinstance(value, dict) for value in get_data_parts(message.parts))
    texts = get_text_parts(message.parts)
    if texts and not has_data:
        return "\n".join(texts)
    return message_data(message)


def user_messages(context: RequestContext) -> list[Message]:
    """The task's user messages in order, the request's own message last, each message id once."""
    messages: list[Message] = []
    seen: set[str] = set()
    history = list(context.current_task.history) if context.current_task is not None else []
    if context.message is not None:
        history.append(context.message)
    for message in history:
        if message.role != Role.ROLE_USER or (message.message_id and message.message_id in seen):
            continue
        seen.add(message.message_id)
        messages.append(message)
    return messages


class SkillExecutor(AgentExecutor):
    """Runs a skill for each message: a task that works, then completes or fails.

    Args:
        skill: The deterministic work.
        behaviour: Injected delays and interruptions.
    """

    def __init__(self, skill: Skill, behaviour: Behaviour) -> None:
        self.skill = skill
        self.behaviour = behaviour

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Do the skill's work for the request; see the module docstring."""
        if context.current_task is None and context.message is not None:
            # The SDK wants the Task before any status update.
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        await updater.start_work()
        if self.behaviour.input_required:
            question = "Which aspect should I focus on? Reply with more detail."
            await updater.requires_input(updater.new_agent_message([new_text_part(question)]))
            return
        answers: list[str | dict[str, Any]] = []
        data = message_input(context)
        if self.behaviour.ask > 0:
            first, *later = user_messages(context) or [Message()]
            if len(later) < self.behaviour.ask:
                await self._ask(updater, len(later) + 1)
                return
            data = message_data(first)
            answers = [answer_value(message) for message in later]
        if self.behaviour.work_s > 0:
            await asyncio.sleep(self.behaviour.work_s)
        try:
            output = self.skill(data)
        except SkillInputError as error:
            await updater.failed(updater.new_agent_message([new_text_part(str(error))]))
            return
        if self.behaviour.ask > 0:
            output = {**output, "answers": answers}
        if self.behaviour.pad_bytes > 0:
            output = {**output, "padding": "x" * self.behaviour.pad_bytes}
        await updater.add_artifact([new_data_part(output)], name="result")
        await updater.complete()

    async def _ask(self, updater: TaskUpdater, k: int) -> None:
        """Ask question ``k`` of :attr:`Behaviour.ask`: the task waits in INPUT_REQUIRED."""
        n = self.behaviour.ask
        parts = [new_text_part(QUESTION_TEXT.format(k=k, n=n)), new_data_part({"question": k, "of": n})]
        await updater.requires_input(updater.new_agent_message(parts))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Mark the task canceled (the SDK has already stopped :meth:`execute`)."""
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        await updater.cancel()
