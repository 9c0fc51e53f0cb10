"""A LangGraph StateGraph with a ToolNode of guarded tools: parallel calls, a crash in
the middle of the node, a resume — every email goes out once.

    python examples/langchain_toolnode.py
"""

from __future__ import annotations

import tempfile
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from onceonly_core import Guard
from onceonly_langchain import wrap_tools
from onceonly_langchain.testing import ScriptedChatModel, tool_call

sent: list[str] = []
crash = {"armed": True}


@tool
def send_email(to: str, subject: str) -> str:
    """Send an email."""
    sent.append(to)
    return f"sent {subject!r} to {to}"


@tool
def build_report(quarter: str) -> str:
    """A long call; the worker dies during the first one."""
    if crash["armed"]:
        crash["armed"] = False
        raise RuntimeError("worker died mid-report")
    return f"report {quarter}"


model = ScriptedChatModel(
    script=[
        AIMessage(
            "",
            tool_calls=[
                tool_call("send_email", "m1", to="a@example.com", subject="Q3"),
                tool_call("send_email", "m2", to="b@example.com", subject="Q3"),
                tool_call("build_report", "m3", quarter="Q3"),
            ],
        )
    ]
)


def agent(state: MessagesState) -> dict[str, Any]:
    return {"messages": [model.invoke(state["messages"])]}


with tempfile.TemporaryDirectory() as tmp:
    guard = Guard(f"sqlite:///{tmp}/ledger.db", quiet=True)
    builder = StateGraph(MessagesState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(wrap_tools([send_email, build_report], guard)))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition, ["tools", END])
    builder.add_edge("tools", "agent")
    app = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "report-q3"}}
    try:
        app.invoke({"messages": [("user", "Send the Q3 mails and the report")]}, config)
    except RuntimeError as err:
        print(f"run 1 crashed: {err}; emails sent: {sent}")
    out = app.invoke(None, config)  # LangGraph re-runs the whole tools node
    guard.close()

for m in out["messages"]:
    if isinstance(m, ToolMessage):
        print(f"  {m.tool_call_id}: {m.content}")
assert sorted(sent) == ["a@example.com", "b@example.com"], sent  # not four
assert [m.tool_call_id for m in out["messages"] if isinstance(m, ToolMessage)] == ["m1", "m2", "m3"]
print("each email sent once:", sorted(sent))
