"""guard_tool / wrap_tools: real tools, real ToolNodes (parallel calls), checkpoint resume."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool, InjectedToolCallId, StructuredTool, ToolException, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import InjectedState, ToolNode, tools_condition
from pydantic import BaseModel

from onceonly_core import Guard
from onceonly_core.governance.models import Policy
from onceonly_langchain import GuardRefused, guard_tool, wrap_tools
from onceonly_langchain.testing import ScriptedChatModel, tool_call


class SimulatedCrash(BaseException):
    """The process dying mid-step (a BaseException, like KeyboardInterrupt, but one asyncio
    lets a task carry instead of tearing down the loop)."""


def ai(*calls: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [AIMessage("", tool_calls=list(calls))]}


def by_id(out: Any) -> dict[str, ToolMessage]:
    msgs = out["messages"] if isinstance(out, dict) else out
    return {m.tool_call_id: m for m in msgs if isinstance(m, ToolMessage)}


def test_the_guarded_tool_keeps_its_interface(guard: Guard) -> None:
    class Args(BaseModel):
        order_id: str
        note: str = ""

    def refund(order_id: str, note: str = "") -> tuple[str, dict[str, Any]]:
        return f"refunded {order_id}", {"order": order_id}

    async def arefund(order_id: str, note: str = "") -> tuple[str, dict[str, Any]]:
        return f"refunded {order_id}", {"order": order_id}

    original = StructuredTool.from_function(
        func=refund,
        coroutine=arefund,
        name="refund",
        description="Refund an order.",
        args_schema=Args,
        return_direct=True,
        response_format="content_and_artifact",
    )
    g = guard_tool(original, guard)
    assert isinstance(g, StructuredTool)
    assert (g.name, g.description, g.args_schema, g.return_direct, g.response_format) == (
        "refund",
        "Refund an order.",
        Args,
        True,
        "content_and_artifact",
    )
    assert g.tool_call_schema.model_json_schema() == original.tool_call_schema.model_json_schema()
    first = g.invoke(tool_call("refund", "t1", order_id="o1"))
    again = asyncio.run(g.ainvoke(tool_call("refund", "t2", order_id="o1")))
    assert isinstance(first, ToolMessage) and isinstance(again, ToolMessage)
    assert (first.content, first.artifact) == ("refunded o1", {"order": "o1"})
    assert (again.content, again.artifact, again.tool_call_id) == (
        "refunded o1",
        {"order": "o1"},
        "t2",
    )


def test_injected_call_id_is_not_part_of_the_call(guard: Guard) -> None:
    seen: list[str] = []

    @tool
    def ship(order_id: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> str:
        """Ship an order."""
        seen.append(tool_call_id)
        return f"shipped {order_id}"

    g = guard_tool(ship, guard)
    assert "tool_call_id" not in g.tool_call_schema.model_json_schema()["properties"]
    a = g.invoke(tool_call("ship", "x1", order_id="o1"))
    b = g.invoke(tool_call("ship", "x2", order_id="o1"))  # a new call id: the same call
    assert seen == ["x1"] and (a.content, b.content, b.tool_call_id) == ("shipped o1",) * 2 + (
        "x2",
    )


def test_a_base_tool_subclass_is_guarded(guard: Guard) -> None:
    runs: list[str] = []

    class Lookup(BaseTool):
        name: str = "lookup"
        description: str = "Look up a record."

        def _run(self, query: str, run_manager: Any = None) -> str:
            runs.append(query)
            return f"found {query}"

    g = guard_tool(Lookup(), guard)
    assert g.invoke("abc") == "found abc" and g.invoke("abc") == "found abc"
    assert asyncio.run(g.ainvoke("abc")) == "found abc"
    assert runs == ["abc"]


def tools_only(tools: list[BaseTool], **node: Any) -> Any:
    """A ToolNode inside a one-node graph (a ToolNode needs LangGraph's runtime)."""
    b = StateGraph(MessagesState)
    b.add_node("tools", ToolNode(tools, **node))
    b.add_edge(START, "tools")
    b.add_edge("tools", END)
    return b.compile()


def graph(tools: list[BaseTool], script: list[Any], **node: Any) -> Any:
    model = ScriptedChatModel(script=script)

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    async def aagent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    from langchain_core.runnables import RunnableLambda

    b = StateGraph(MessagesState)
    b.add_node("agent", RunnableLambda(agent, afunc=aagent))
    b.add_node("tools", ToolNode(tools, **node))
    b.add_edge(START, "agent")
    b.add_conditional_edges("agent", tools_condition, ["tools", END])
    b.add_edge("tools", "agent")
    return b.compile(checkpointer=InMemorySaver())


def test_toolnode_parallel_calls_and_a_crash_mid_node(
    guard: Guard, invoke: Any, transcript_ok: Any
) -> None:
    sent: list[str] = []
    boom = {"armed": True}

    @tool
    def send_email(to: str) -> str:
        """Send an email."""
        sent.append(to)
        return f"sent to {to}"

    @tool
    def slow_report(name: str) -> str:
        """Crashes the worker the first time (the whole tools node is lost)."""
        if boom["armed"]:
            boom["armed"] = False
            raise SimulatedCrash("worker killed")
        return f"report {name}"

    tools = wrap_tools([send_email, slow_report], guard)
    script = [
        AIMessage(
            "",
            tool_calls=[
                tool_call("send_email", "m1", to="a@x"),
                tool_call("send_email", "m2", to="b@x"),
                tool_call("send_email", "m3", to="a@x"),  # a duplicate within the batch
                tool_call("slow_report", "m4", name="q3"),
            ],
        )
    ]
    app = graph(tools, script)
    cfg = {"configurable": {"thread_id": "t-1"}}
    with pytest.raises(SimulatedCrash):
        invoke(app, {"messages": [("user", "go")]}, cfg)
    before = sorted(sent)
    out = invoke(app, None, cfg)  # resume: LangGraph re-runs the whole tools node
    assert sorted(sent) == before == ["a@x", "b@x"]
    msgs = by_id(out)
    assert msgs["m1"].content == msgs["m3"].content == "sent to a@x"
    assert msgs["m4"].content == "report q3"
    transcript_ok(out["messages"])


def test_toolnode_without_the_guard_sends_again_on_resume(invoke: Any) -> None:
    sent: list[str] = []
    boom = {"armed": True}

    @tool
    def send_email(to: str) -> str:
        """Send an email."""
        sent.append(to)
        return "sent"

    @tool
    def crash(x: int) -> str:
        """Crash once."""
        if boom["armed"]:
            boom["armed"] = False
            raise SimulatedCrash
        return "ok"

    app = graph(
        [send_email, crash],
        [
            AIMessage(
                "",
                tool_calls=[tool_call("send_email", "m1", to="a@x"), tool_call("crash", "m2", x=1)],
            )
        ],
    )
    cfg = {"configurable": {"thread_id": "t-1"}}
    with pytest.raises(SimulatedCrash):
        invoke(app, {"messages": [("user", "go")]}, cfg)
    invoke(app, None, cfg)
    assert sent == ["a@x", "a@x"]


def test_blocked_tool_in_a_toolnode_is_an_error_message(
    guard: Guard, invoke: Any, transcript_ok: Any
) -> None:
    deleted: list[str] = []

    @tool
    def delete_user(user: str) -> str:
        """Delete a user."""
        deleted.append(user)
        return "deleted"

    @tool
    def strict(x: int) -> str:
        """Raises a ToolException the original tool does not handle."""
        raise ToolException("nope")

    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["delete_*"]))
    tools = wrap_tools([delete_user, strict], guard, agent_id="bot")
    node = tools_only(tools)
    out = invoke(node, ai(tool_call("delete_user", "b1", user="u")))
    msg = by_id(out)["b1"]
    assert deleted == [] and msg.status == "error" and "tool_blocked" in str(msg.content)
    assert msg.response_metadata["onceonly"]["code"] == "blocked"
    # The tool's own exception is the model's to read, in the contract's words.
    out = invoke(node, ai(tool_call("strict", "b2", x=1)))
    failed = by_id(out)["b2"]
    assert failed.status == "error" and failed.response_metadata["onceonly"]["code"] == "failed"
    assert failed.content.startswith("Failed: strict raised ToolException: nope;")
    # Called directly (no tool call id: no message to answer with), a refusal raises.
    with pytest.raises(GuardRefused, match="tool_blocked") as refused:
        tools[0].invoke({"user": "u"})
    assert refused.value.classification.code == "blocked" and deleted == []
    with pytest.raises(ToolException, match="nope"):
        tools[1].invoke({"x": 1})  # and the tool's own exception propagates


def test_async_tool_in_a_toolnode(guard: Guard, transcript_ok: Any) -> None:
    runs: list[int] = []

    @tool
    async def notify(n: int) -> str:
        """Notify."""
        runs.append(n)
        await asyncio.sleep(0)
        return f"notified {n}"

    node = tools_only(wrap_tools([notify], guard))
    calls = [tool_call("notify", f"n{i}", n=i % 2) for i in range(6)]
    out = asyncio.run(node.ainvoke(ai(*calls)))
    assert sorted(runs) == [0, 1]
    transcript_ok(out["messages"])


def test_injected_state_is_left_out_and_the_rest_is_validated(
    guard: Guard, invoke: Any, transcript_ok: Any
) -> None:
    """The state LangGraph injects grows every turn; the model's amount comes as 1.5 then
    "1.5": one call, validated as the tool validates it."""
    charges: list[float] = []

    @tool
    def charge(
        customer: str, amount: float, state: Annotated[dict[str, Any], InjectedState]
    ) -> str:
        """Charge a customer."""
        charges.append(amount)
        return f"charged {amount} ({len(state['messages'])} messages so far)"

    script = [
        AIMessage("", tool_calls=[tool_call("charge", "c1", customer="a", amount=1.5)]),
        AIMessage("", tool_calls=[tool_call("charge", "c2", customer="a", amount="1.5")]),
    ]
    app = graph(wrap_tools([charge], guard), script)
    out = invoke(app, {"messages": [("user", "go")]}, {"configurable": {"thread_id": "t-1"}})
    msgs = by_id(out)
    assert charges == [1.5]
    assert msgs["c2"].content == msgs["c1"].content == "charged 1.5 (2 messages so far)"
    assert msgs["c2"].response_metadata["onceonly"]["code"] == "replayed"
    transcript_ok(out["messages"])


def test_a_guarded_tool_is_not_guarded_twice(guard: Guard) -> None:
    @tool
    def ping(x: int) -> str:
        """Ping."""
        return "pong"

    with pytest.raises(TypeError, match="already guarded"):
        guard_tool(guard_tool(ping, guard), guard)


def test_called_directly_a_guarded_tool_answers_as_the_tool_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No tool call id, no ToolMessage: the value (also replayed, also when its completion
    was not recorded), the tool's own exception, or GuardRefused."""
    from contract_suite import FlakyStore

    import onceonly_core.protocol

    monkeypatch.setattr(onceonly_core.protocol, "FINISH_RETRIES", (0.01,))
    store = FlakyStore()
    g = Guard(store=store, quiet=True)
    runs: list[float] = []

    @tool
    def charge(amount: float) -> str:
        """Charge."""
        if amount < 0:
            raise ValueError("negative amount")
        runs.append(amount)
        return f"charged {amount}"

    t = guard_tool(charge, g, scope="order-1")
    assert t.invoke({"amount": 1}) == "charged 1.0"
    assert t.invoke({"amount": "1"}) == "charged 1.0"  # replayed: the stored value
    store.fail_finish = 2
    assert t.invoke({"amount": 2}) == "charged 2.0"  # ran, not recorded: still its value
    with pytest.raises(ValueError, match="negative amount"):
        t.invoke({"amount": -1})
    assert runs == [1.0, 2.0]
    g.close()
