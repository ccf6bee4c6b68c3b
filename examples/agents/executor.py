"""The a2a-sdk ``AgentExecutor`` that runs one skill.

The input is the message's data parts that are objects, merged, with the text
parts joined as ``text`` when no data part sets it. The output goes back as
one data artifact named ``result``, and the task completes without a status
message, so a caller's output is exactly the skill's object. A skill that
refuses its input fails the task with the reason as the status message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from a2a.helpers import get_data_parts, get_text_parts, new_data_part, new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater

from examples.agents.skills import Skill, SkillInputError

__all__ = ["Behaviour", "SkillExecutor", "message_input"]


@dataclass(frozen=True)
class Behaviour:
    """How the executor misbehaves, for fault tests.

    Attributes:
        work_s: Seconds the work takes (``--slow``).
        input_required: Ask for more input instead of working (``--input-required``).
        pad_bytes: Add a ``padding`` string of this many bytes to the output (``--pad-output``).
    """

    work_s: float = 0.0
    input_required: bool = False
    pad_bytes: int = 0


def message_input(context: RequestContext) -> dict[str, Any]:
    """The skill's input, read from the request's message."""
    if context.message is None:
        return {}
    data: dict[str, Any] = {}
    for value in get_data_parts(context.message.parts):
        if isinstance(value, dict):
            data.update(value)
    texts = get_text_parts(context.message.parts)
    if texts and "text" not in data:
        data["text"] = "\n".join(texts)
    return data


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
        if self.behaviour.work_s > 0:
            await asyncio.sleep(self.behaviour.work_s)
        try:
            output = self.skill(message_input(context))
        except SkillInputError as error:
            await updater.failed(updater.new_agent_message([new_text_part(str(error))]))
            return
        if self.behaviour.pad_bytes > 0:
            output = {**output, "padding": "x" * self.behaviour.pad_bytes}
        await updater.add_artifact([new_data_part(output)], name="result")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Mark the task canceled (the SDK has already stopped :meth:`execute`)."""
        updater = TaskUpdater(event_queue, str(context.task_id), str(context.context_id))
        await updater.cancel()
