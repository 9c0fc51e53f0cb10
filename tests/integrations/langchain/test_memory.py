"""Per-request tools die with their request: nothing the adapter or the core keeps for a
tool (prepared options, the model-facing schema, the guarded tool's class) holds it."""

from __future__ import annotations

import gc
import weakref
from typing import Annotated, Any

from langchain_core.messages import AIMessage
from langchain_core.tools import BaseTool, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import InjectedState, ToolNode

from onceonly_core import Guard
from onceonly_langchain import guard_tool
from onceonly_langchain._common import validated_arguments
from onceonly_langchain.testing import tool_call


def per_request_tool(request: int) -> BaseTool:
    """A tool built for one request, closing over its data (its own schema class too)."""
    data = {"request": request, "payload": bytearray(10_000)}

    @tool
    def lookup(order: str, state: Annotated[dict[str, Any], InjectedState]) -> str:
        """Look an order up for this request."""
        return f"{order} for request {data['request']}"

    return lookup


def test_a_thousand_per_request_tools_are_freed(guard: Guard) -> None:
    refs: list[weakref.ref[Any]] = []
    for i in range(1000):
        t = per_request_tool(i)
        # What the middleware does with a call of it (the model-facing schema is built)...
        assert validated_arguments(t, {"order": "o1"}, "c1") == {"order": "o1"}
        guarded = guard_tool(t, guard, scope=f"req-{i}")
        if i % 100 == 0:  # ...and a real run through a ToolNode, now and then (it is slow)
            b = StateGraph(MessagesState)
            b.add_node("tools", ToolNode([guarded]))
            b.add_edge(START, "tools")
            b.add_edge("tools", END)
            call = tool_call("lookup", f"c{i}", order="o1")
            out = b.compile().invoke({"messages": [AIMessage("", tool_calls=[call])]})
            assert out["messages"][-1].content == f"o1 for request {i}"
            del b, out
        refs += [weakref.ref(t), weakref.ref(guarded), weakref.ref(t.args_schema)]  # type: ignore[arg-type]
        del t, guarded
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of {len(refs)} per-request objects are still alive"


def test_per_request_tool_classes_are_freed(guard: Guard) -> None:
    refs: list[weakref.ref[Any]] = []
    for i in range(200):

        class Lookup(BaseTool):  # a class per request (a factory of tools, say)
            name: str = "lookup"
            description: str = "Look a record up."

            def _run(self, query: str) -> str:
                return f"found {query}"

        guarded = guard_tool(Lookup(), guard, scope=f"req-{i}")
        assert guarded.invoke({"query": "a"}) == "found a"
        refs += [weakref.ref(Lookup), weakref.ref(type(guarded))]
        del Lookup, guarded
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
