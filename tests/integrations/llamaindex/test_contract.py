"""The adapter contract suite (tests/integrations/contract_suite.py), driven through
LlamaIndex: a ``FunctionTool`` built from the scenario's function and ``fn_schema``,
guarded with ``guard_tool``, called as an agent calls it (``call`` / ``acall`` with the
model's arguments), read back from the ``GuardedToolOutput`` it answers with."""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

pytest.importorskip("llama_index.core")

from contract_suite import ContractSuite, Rendered
from llama_index.core.tools import FunctionTool
from llama_index.core.tools.types import ToolOutput

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


class LlamaIndexDriver:
    name = "llamaindex"

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.tools: dict[str, GuardedFunctionTool | GuardedTool] = {}

    def add_tool(
        self, name: str, fn: Callable[..., Any], schema: type[BaseModel], **options: Any
    ) -> None:
        if inspect.iscoroutinefunction(fn):
            tool = FunctionTool.from_defaults(async_fn=fn, name=name, fn_schema=schema)
        else:
            tool = FunctionTool.from_defaults(fn=fn, name=name, fn_schema=schema)
        self.tools[name] = guard_tool(tool, self.guard, scope=_thread.get, **options)

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


class TestLlamaIndexContract(ContractSuite):
    driver_factory = LlamaIndexDriver
