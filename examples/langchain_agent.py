"""A create_agent agent that charges a card once across a crash, a resume and a retry.

Offline: a scripted chat model, a SQLite ledger in a temporary directory.
    python examples/langchain_agent.py
"""

from __future__ import annotations

import tempfile
from typing import Any

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

from onceonly_core import Guard, current_call
from onceonly_langchain import OnceOnlyMiddleware
from onceonly_langchain.testing import ScriptedChatModel, tool_call

charges: list[str] = []
emails: list[str] = []


@tool
def charge_card(customer: str, amount_usd: float) -> str:
    """Charge the customer's card."""
    ctx = current_call()
    key = ctx.idempotency_key if ctx else None  # pass it to Stripe as Idempotency-Key
    charges.append(f"{customer} ${amount_usd} key=…{key and key[-8:]}")
    return f"charged {customer} ${amount_usd} (ch_{len(charges)})"


@tool
def send_email(to: str, subject: str) -> str:
    """Email the customer."""
    emails.append(to)
    return f"emailed {to}: {subject}"


class CrashOnce(AgentMiddleware):  # type: ignore[type-arg]
    """Simulates the worker dying after the charge, before LangGraph saved the checkpoint."""

    crashed = False

    def wrap_tool_call(self, request: Any, handler: Any) -> Any:
        out = handler(request)
        if not CrashOnce.crashed:
            CrashOnce.crashed = True
            raise RuntimeError("worker died")
        return out


model = ScriptedChatModel(
    script=[
        AIMessage(
            "", tool_calls=[tool_call("charge_card", "call_1", customer="cus_42", amount_usd=99.99)]
        ),
        # The model is unsure the charge went through and retries it (a new call id, and
        # the amount as a string this time: the tool's schema makes it 99.99 again).
        AIMessage(
            "",
            tool_calls=[
                tool_call("charge_card", "call_2", customer="cus_42", amount_usd="99.99"),
                tool_call("send_email", "call_3", to="cus_42@example.com", subject="Receipt"),
            ],
        ),
    ],
    final="Charged and emailed.",
)

with tempfile.TemporaryDirectory() as tmp:
    guard = Guard(f"sqlite:///{tmp}/ledger.db", quiet=True)
    agent = create_agent(
        model,
        [charge_card, send_email],
        middleware=[CrashOnce(), OnceOnlyMiddleware(guard)],  # first = outermost
        checkpointer=InMemorySaver(),
    )
    config = {"configurable": {"thread_id": "order-42"}}
    try:
        agent.invoke({"messages": [("user", "Charge cus_42 $99.99 and email a receipt")]}, config)
    except RuntimeError as err:
        print(f"run 1 crashed: {err}; charges so far: {len(charges)}")
    out = agent.invoke(None, config)  # resume the thread from its checkpoint
    guard.close()

for m in out["messages"]:
    if isinstance(m, ToolMessage):
        print(f"  {m.tool_call_id}: {m.content}  [{m.response_metadata['onceonly']['code']}]")
print(out["messages"][-1].content)
print("charges:", charges)

assert len(charges) == 1, charges  # once, across the crash, the resume and the retry
assert emails == ["cus_42@example.com"]
answers = {m.tool_call_id: m for m in out["messages"] if isinstance(m, ToolMessage)}
assert list(answers) == ["call_1", "call_2", "call_3"]  # one result per call id
codes = [m.response_metadata["onceonly"]["code"] for m in answers.values()]
assert codes == ["replayed", "replayed", "executed"], codes  # call_1 replayed on resume
