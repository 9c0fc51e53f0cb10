"""LangGraph interrupt() inside a guarded tool: control flow, neither a failure nor a
notification. The graph pauses, nothing is audited as failed, no tool_failed fires; resumed
with Command(resume=...), the side effect happens once, and a retry replays it."""

from __future__ import annotations

from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Command, interrupt

from onceonly_core import Guard
from onceonly_core.governance.models import Policy
from onceonly_langchain import OnceOnlyCallbackHandler, OnceOnlyMiddleware, wrap_tools
from onceonly_langchain.testing import ScriptedChatModel, tool_call

CFG = {"configurable": {"thread_id": "refund-9"}}


class Watch:
    """Everything that would betray an interrupt taken for a failure."""

    def __init__(self, guard: Guard) -> None:
        self.refunds: list[tuple[str, str]] = []
        self.notes: list[dict[str, Any]] = []
        self.failures: list[Any] = []
        guard.gov.upsert_policy(Policy(agent_id="bot"))
        guard.gov.on_notify(self.notes.append)
        guard.on_failure(self.failures.append)
        self.guard = guard

    def tool(self) -> BaseTool:
        refunds = self.refunds

        @tool
        def refund(order: str) -> str:
            """Refund an order once a person says yes."""
            answer = interrupt({"question": f"refund {order}?"})
            refunds.append((order, answer))
            return f"refunded {order} ({answer})"

        return refund

    def audit(self) -> list[tuple[str, str]]:
        return [(a.tool, a.decision) for a in reversed(self.guard.gov.agent_logs("bot"))]


def script() -> list[Any]:
    return [
        AIMessage("", tool_calls=[tool_call("refund", "r1", order="o-9")]),
        AIMessage("", tool_calls=[tool_call("refund", "r2", order="o-9")]),  # asked again
    ]


def check(watch: Watch, invoke: Any, app: Any) -> None:
    paused = invoke(app, {"messages": [("user", "refund o-9")]}, CFG)
    (intr,) = paused["__interrupt__"]
    assert intr.value == {"question": "refund o-9?"}
    assert watch.refunds == [] and watch.audit() == []  # paused: nothing audited
    assert watch.notes == [] and watch.failures == []  # and nobody told of a failure
    out = invoke(app, Command(resume="yes"), CFG)
    assert watch.refunds == [("o-9", "yes")]  # resumed: once
    msgs = {m.tool_call_id: m for m in out["messages"] if isinstance(m, ToolMessage)}
    assert msgs["r1"].content == msgs["r2"].content == "refunded o-9 (yes)"
    assert msgs["r1"].response_metadata["onceonly"]["code"] == "executed"
    assert msgs["r2"].response_metadata["onceonly"]["code"] == "replayed"
    assert watch.audit() == [("refund", "executed"), ("refund", "dedup")]
    assert watch.notes == [] and watch.failures == []


def test_an_interrupt_passes_through_the_middleware(guard: Guard, invoke: Any) -> None:
    watch = Watch(guard)
    app = create_agent(
        ScriptedChatModel(script=script()),
        [watch.tool()],
        middleware=[OnceOnlyMiddleware(guard, agent_id="bot")],
        checkpointer=InMemorySaver(),
    )
    check(watch, invoke, app)


def test_an_interrupt_passes_through_a_guarded_tool(guard: Guard, invoke: Any) -> None:
    watch = Watch(guard)
    model = ScriptedChatModel(script=script())

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    b = StateGraph(MessagesState)
    b.add_node("agent", agent)
    b.add_node("tools", ToolNode(wrap_tools([watch.tool()], guard, agent_id="bot")))
    b.add_edge(START, "agent")
    b.add_conditional_edges("agent", tools_condition, ["tools", END])
    b.add_edge("tools", "agent")
    check(watch, invoke, b.compile(checkpointer=InMemorySaver()))


def test_the_callback_handler_records_an_interrupt_as_one(guard: Guard) -> None:
    watch = Watch(guard)
    handler = OnceOnlyCallbackHandler(guard, agent_id="bot", run_id="run-9")
    app = create_agent(
        ScriptedChatModel(script=script()[:1]), [watch.tool()], checkpointer=InMemorySaver()
    )
    app.invoke({"messages": [("user", "refund o-9")]}, {**CFG, "callbacks": [handler]})
    events = [(e.type, e.status) for e in guard.gov.get_run_timeline("run-9")]
    assert ("tool_result", "interrupted") in events
    assert ("tool_result", "failed") not in events
    assert watch.audit() == [] and watch.notes == []
    app.invoke(Command(resume="no"), {**CFG, "callbacks": [handler]})
    assert watch.refunds == [("o-9", "no")]
    assert watch.audit() == [("refund", "executed")]


def test_the_core_re_raises_a_graph_interrupt_without_auditing_it(guard: Guard) -> None:
    """The core itself: a graph interrupt raised through a governed call is re-raised, and
    leaves no failed audit row and no tool_failed notification (issue 14)."""
    from langgraph.errors import GraphInterrupt

    watch = Watch(guard)

    def pause() -> str:
        raise GraphInterrupt(())

    with pytest.raises(GraphInterrupt):
        guard.run_call_classified("ask", {"n": 1}, pause, scope="s", agent_id="bot")
    assert watch.audit() == [] and watch.notes == [] and watch.failures == []
    c = guard.run_call_classified("ask", {"n": 1}, lambda: "ok", scope="s", agent_id="bot")
    assert c.code == "executed"  # the key was given back: the resumed call runs
