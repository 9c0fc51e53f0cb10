"""Callback-only: record an agent's tool calls on the OnceOnly timeline without changing
how the agent is built (visibility, not deduplication).

    python examples/langchain_callbacks.py
"""

from __future__ import annotations

import tempfile

from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from onceonly_core import Guard
from onceonly_core.governance.models import Policy
from onceonly_langchain import OnceOnlyCallbackHandler, ToolCallBlocked
from onceonly_langchain.testing import ScriptedChatModel, tool_call


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order."""
    return f"order {order_id}: shipped"


@tool
def delete_order(order_id: str) -> str:
    """Delete an order."""
    raise AssertionError("never runs: the policy blocks it")


def agent(*calls: dict[str, str]) -> object:
    model = ScriptedChatModel(script=[AIMessage("", tool_calls=list(calls))])
    return create_agent(model, [lookup_order, delete_order])


with tempfile.TemporaryDirectory() as tmp:
    guard = Guard(f"sqlite:///{tmp}/ledger.db", quiet=True)
    handler = OnceOnlyCallbackHandler(guard, agent_id="support-bot", run_id="ticket-7")
    agent(tool_call("lookup_order", "c1", order_id="o-1")).invoke(  # type: ignore[attr-defined]
        {"messages": [("user", "Where is o-1?")]}, {"callbacks": [handler]}
    )
    for e in guard.gov.get_run_timeline("ticket-7"):
        print(f"  {e.type:<13} {e.tool or '':<13} {e.status}")
    kinds = [e.type for e in guard.gov.get_run_timeline("ticket-7")]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert "tool_call" in kinds and "tool_result" in kinds

    # enforce=True: a tool the policy blocks is refused before it runs (the run stops).
    guard.gov.upsert_policy(Policy(agent_id="support-bot", blocked_tools=["delete_*"]))
    strict = OnceOnlyCallbackHandler(guard, agent_id="support-bot", run_id="ticket-8", enforce=True)
    try:
        agent(tool_call("delete_order", "c2", order_id="o-1")).invoke(  # type: ignore[attr-defined]
            {"messages": [("user", "Delete o-1")]}, {"callbacks": [strict]}
        )
        raise AssertionError("the blocked tool should have been refused")
    except ToolCallBlocked as err:
        print("refused:", err)
    assert sorted(a.decision for a in guard.gov.agent_logs("support-bot")) == [
        "blocked",
        "executed",
    ]
    guard.close()
