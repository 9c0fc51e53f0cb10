"""The adapter contract suite (tests/integrations/contract_suite.py), driven through
LlamaIndex: a ``FunctionTool`` built from the scenario's function and ``fn_schema``,
guarded with ``guard_tool``, called as an agent calls it (``call`` / ``acall`` with the
model's arguments), read back from the ``GuardedToolOutput`` it answers with. The suite
runs a second time through the other wrapper, ``GuardedTool``, around a hand-written
``AsyncBaseTool`` (what a custom or third-party tool is)."""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

pytest.importorskip("llama_index.core")

from contract_suite import ContractSuite, Harness, Rendered
from llama_index.core.tools import FunctionTool
from llama_index.core.tools.types import AsyncBaseTool, ToolMetadata, ToolOutput

from onceonly_core import Guard
from onceonly_llamaindex import GuardedFunctionTool, GuardedTool, GuardedToolOutput, guard_tool

# The conversation the model is in: the tools' scope, set per call by the driver.
_thread: contextvars.ContextVar[str | None] = contextvars.ContextVar("thread", default=None)


def _rendered(out: ToolOutput) -> Rendered:
    # The code comes from the structured classification, never from the text.
    assert isinstance(out, GuardedToolOutput), out
    code = out.code
    assert code is not None
    assert out.is_error is (code not in ("executed", "replayed"))
    if out.is_error:
        assert out.raw_output == out.classification  # machine readable where LlamaIndex looks
    return Rendered(code, out.content, out)


class FnTool(AsyncBaseTool):
    """A custom tool: its own call / acall, answering ToolOutputs (not a FunctionTool)."""

    def __init__(self, name: str, fn: Callable[..., Any], schema: type[BaseModel]) -> None:
        self.fn = fn
        self._metadata = ToolMetadata(name=name, description=f"{name}.", fn_schema=schema)

    @property
    def metadata(self) -> ToolMetadata:
        return self._metadata

    def _out(self, result: Any, kwargs: dict[str, Any]) -> ToolOutput:
        return ToolOutput(content=str(result), tool_name=self.metadata.get_name(), raw_input=kwargs)

    def call(self, **kwargs: Any) -> ToolOutput:
        return self._out(self.fn(**kwargs), kwargs)

    async def acall(self, **kwargs: Any) -> ToolOutput:
        result = self.fn(**kwargs)
        return self._out(await result if inspect.isawaitable(result) else result, kwargs)


class LlamaIndexDriver:
    name = "llamaindex"
    base_tool = False

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.tools: dict[str, GuardedFunctionTool | GuardedTool] = {}

    def add_tool(
        self, name: str, fn: Callable[..., Any], schema: type[BaseModel], **options: Any
    ) -> None:
        tool: AsyncBaseTool
        if self.base_tool:
            tool = FnTool(name, fn, schema)
        elif inspect.iscoroutinefunction(fn):
            tool = FunctionTool.from_defaults(async_fn=fn, name=name, fn_schema=schema)
        else:
            tool = FunctionTool.from_defaults(fn=fn, name=name, fn_schema=schema)
        guarded = guard_tool(tool, self.guard, scope=_thread.get, **options)
        assert isinstance(guarded, GuardedTool if self.base_tool else GuardedFunctionTool)
        self.tools[name] = guarded

    def call(self, name: str, raw_args: str, *, scope: str) -> Rendered:
        token = _thread.set(scope)
        try:
            return _rendered(self.tools[name].call_json(raw_args))
        finally:
            _thread.reset(token)

    async def acall(self, name: str, raw_args: str, *, scope: str) -> Rendered:
        token = _thread.set(scope)
        try:
            out = await self.tools[name].acall_json(raw_args)
        finally:
            _thread.reset(token)
        return _rendered(out)


class BaseToolDriver(LlamaIndexDriver):
    base_tool = True


class TestLlamaIndexContract(ContractSuite):
    driver_factory = LlamaIndexDriver


class TestLlamaIndexBaseToolContract(ContractSuite):
    driver_factory = BaseToolDriver

    # A GuardedTool stores its tool's whole ToolOutput (a replay returns it as it was),
    # which the suite's reference, made for tools returning strings, cannot render. The
    # two replay scenarios are asserted here without it: the same codes, texts, effects.
    def test_coerced_equal_arguments_are_one_call(self, h: Harness) -> None:
        h.tool("pay")
        first = h.call("pay", '{"customer": "c1", "amount": 1.5}')
        again = h.call("pay", '{"customer": "c1", "amount": "1.5"}')
        assert (first.code, again.code) == ("executed", "replayed")
        assert first.text == again.text == "paid 1.5 usd for c1"
        assert len(h.effects) == 1

    def test_defaults_omitted_or_given_are_one_call(self, h: Harness) -> None:
        h.tool("pay")
        first = h.call("pay", '{"customer": "c2", "amount": 3}')
        again = h.call("pay", '{"customer": "c2", "amount": 3.0, "currency": "usd", "tags": []}')
        assert (first.code, again.code) == ("executed", "replayed")
        assert h.effects == [{"customer": "c2", "amount": 3.0, "currency": "usd", "tags": []}]
