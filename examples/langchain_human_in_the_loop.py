"""A refund that waits for a person (LangGraph interrupt()), then the kill switch.

interrupt() inside a guarded tool is control flow, not a failure: the graph pauses, nothing
is audited as failed, and the resumed run refunds once. Then an operator disables the agent:
the middleware ends the run before the model is asked again.

Offline: a scripted chat model, a SQLite ledger in a temporary directory.
    python examples/langchain_human_in_the_loop.py
"""

from __future__ import annotations

import tempfile

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command, interrupt

from onceonly_core import Guard
from onceonly_core.governance.models import Policy
from onceonly_langchain import OnceOnlyMiddleware
from onceonly_langchain.testing import ScriptedChatModel, tool_call

refunds: list[str] = []


@tool
def refund(order_id: str, amount_usd: float) -> str:
    """Refund an order once a person approves it."""
    answer = interrupt(f"Refund ${amount_usd} on order {order_id}?")  # pauses the graph
    if answer != "approved":
        return f"refund of order {order_id} declined by a person"
    refunds.append(order_id)  # the side effect comes after the answer
    return f"refunded ${amount_usd} on order {order_id}"


model = ScriptedChatModel(
    script=[
        AIMessage("", tool_calls=[tool_call("refund", "call_1", order_id="42", amount_usd=30)]),
        # The model checks by asking again: the same call, answered from the ledger.
        AIMessage("", tool_calls=[tool_call("refund", "call_2", order_id="42", amount_usd="30")]),
    ],
    final="Refunded.",
)

with tempfile.TemporaryDirectory() as tmp:
    guard = Guard(f"sqlite:///{tmp}/ledger.db", quiet=True)
    guard.gov.upsert_policy(Policy(agent_id="support-bot"))
    agent = create_agent(
        model,
        [refund],
        middleware=[OnceOnlyMiddleware(guard, agent_id="support-bot")],
        checkpointer=InMemorySaver(),
    )
    config = {"configurable": {"thread_id": "ticket-7"}}

    paused = agent.invoke({"messages": [("user", "Refund order 42")]}, config)
    print("paused:", paused["__interrupt__"][0].value)
    assert refunds == [] and guard.gov.agent_logs("support-bot") == []  # not a failure

    out = agent.invoke(Command(resume="approved"), config)  # a person approves
    for m in out["messages"]:
        if isinstance(m, ToolMessage):
            print(f"  {m.tool_call_id}: {m.content}  [{m.response_metadata['onceonly']['code']}]")
    assert refunds == ["42"], refunds  # once
    audit = [a.decision for a in guard.gov.agent_logs("support-bot")]
    assert sorted(audit) == ["dedup", "executed"], audit

    # An operator stops the agent: the next run ends before the model is asked.
    guard.gov.disable_agent("support-bot", "refund fraud under review")
    asked = model.calls
    out = agent.invoke(
        {"messages": [("user", "Refund order 43")]}, {"configurable": {"thread_id": "ticket-8"}}
    )
    print(out["messages"][-1].content)
    assert model.calls == asked and refunds == ["42"]
    guard.close()
