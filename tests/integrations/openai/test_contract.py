"""The adapter contract suite (tests/integrations/contract_suite.py) through the OpenAI
dispatcher: a model's ``tool_calls`` in a real ``ChatCompletionMessage``, answered by
``ToolDispatcher.dispatch`` / ``adispatch``; the code is read from the structured
``ToolAnswer``, the text is the tool message's ``content``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from contract_suite import ContractSuite, CoreDriver, Rendered
from openai.types.chat import ChatCompletion
from pydantic import BaseModel

from onceonly_core import Guard
from onceonly_openai import Tool, ToolAnswer, ToolDispatcher, chat_calls, tool
from onceonly_openai.testing import chat_tool_calls


class OpenAIDriver:
    name = "openai"

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.tools: list[Tool] = []

    def add_tool(
        self, name: str, fn: Callable[..., Any], schema: type[BaseModel], **options: Any
    ) -> None:
        self.tools.append(tool(fn, name=name, schema=schema, **options))

    def _message(self, name: str, raw_args: str) -> Any:
        # The model's reply as the SDK parses it: raw_args is the call's `arguments` text.
        reply = ChatCompletion.model_validate(chat_tool_calls((name, raw_args, "call_1")))
        return reply.choices[0].message

    def _rendered(self, answer: ToolAnswer) -> Rendered:
        message = answer.chat_message()
        assert message["tool_call_id"] == "call_1"
        content = message["content"]
        assert isinstance(content, str)
        return Rendered(answer.code, content, message)

    def call(self, name: str, raw_args: str, *, scope: str) -> Rendered:
        dispatcher = ToolDispatcher(self.tools, guard=self.guard, scope=scope)
        [answer] = dispatcher.dispatch(chat_calls(self._message(name, raw_args)))
        return self._rendered(answer)

    async def acall(self, name: str, raw_args: str, *, scope: str) -> Rendered:
        dispatcher = ToolDispatcher(self.tools, guard=self.guard, scope=scope)
        [answer] = await dispatcher.adispatch(chat_calls(self._message(name, raw_args)))
        return self._rendered(answer)


class TestOpenAIContract(ContractSuite):
    driver_factory = OpenAIDriver


class TestCoreReference(ContractSuite):
    """The suite's expectations against the core alone (no framework): what every
    adapter's answers are compared with."""

    driver_factory = CoreDriver
