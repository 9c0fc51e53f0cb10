"""A scripted chat model for offline tests and examples (no network, no API key).

``ScriptedChatModel(script=[...])`` answers turn *n* of a conversation with the *n*-th
entry of ``script``, where *n* is the number of ``AIMessage``\\ s already in the
conversation. A resumed or retried conversation therefore gets the same answer for the
same turn, as a deterministic model would. An entry may be an ``AIMessage`` or a
callable ``(messages) -> AIMessage``; past the end it answers ``final``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable

__all__ = ["ScriptedChatModel", "tool_call"]

Turn = AIMessage | Callable[[list[BaseMessage]], AIMessage]


def tool_call(tool_name: str, call_id: str, /, **args: Any) -> dict[str, Any]:
    """A model tool call: ``{"name", "args", "id", "type": "tool_call"}``."""
    return {"name": tool_name, "args": args, "id": call_id, "type": "tool_call"}


class ScriptedChatModel(BaseChatModel):
    """A chat model that plays a script; ``bind_tools`` accepts any tools."""

    script: list[Any]
    final: str = "done"
    calls: int = 0
    """How many times the model was asked (across runs, resumes and retries)."""

    @property
    def _llm_type(self) -> str:
        return "onceonly-scripted"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.calls += 1
        turn = sum(isinstance(m, AIMessage) for m in messages)
        entry: Turn = self.script[turn] if turn < len(self.script) else AIMessage(self.final)
        msg = entry(messages) if callable(entry) else entry
        # A copy: the graph keeps the message in its state and may add to it.
        return ChatResult(generations=[ChatGeneration(message=msg.model_copy(deep=True))])

    def bind_tools(
        self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any
    ) -> Runnable[Any, AIMessage]:
        return self  # the script already knows its tools
