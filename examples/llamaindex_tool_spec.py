"""A guarded LlamaIndex tool spec with governance, and every tool on one run timeline.

    pip install "onceonly-core[llamaindex]"
    python examples/llamaindex_tool_spec.py

``BillingSpec`` subclasses ``GuardedToolSpec``: ``to_tool_list()`` hands the agent guarded
tools. The agent's policy blocks ``delete_*`` and requires approval for refunds; the
blocked and waiting calls reach the model as error outputs and never run. An existing
spec (``WeatherSpec``) is guarded with ``guard_spec``. ``instrument`` records each tool
span on the run timeline, next to the guard's own decisions.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.llms.mock import MockFunctionCallingLLM
from llama_index.core.tools.tool_spec.base import BaseToolSpec

from onceonly_core import Guard
from onceonly_core.governance.models import Policy
from onceonly_llamaindex import GuardedToolSpec, guard_spec, instrument

effects: list[str] = []  # what really happened in the world


class BillingSpec(GuardedToolSpec):
    """The billing tools an agent may use."""

    spec_functions: ClassVar[list[Any]] = ["charge", "refund", "delete_customer"]
    onceonly_options: ClassVar[dict[str, Any]] = {"agent_id": "billing-bot"}
    # What one call costs, counted against the agent's daily budget.
    onceonly_tool_options: ClassVar[dict[str, Any]] = {"charge": {"spend_usd": 0.02}}

    def charge(self, customer: str, amount_usd: float) -> str:
        """Charge a customer."""
        effects.append(f"charged {customer} ${amount_usd}")
        return f"charged {customer} ${amount_usd}"

    def refund(self, customer: str, amount_usd: float) -> str:
        """Refund a customer."""
        effects.append(f"refunded {customer} ${amount_usd}")
        return "refunded"

    def delete_customer(self, customer: str) -> str:
        """Delete a customer and their data."""
        effects.append(f"deleted {customer}")
        return "deleted"


class WeatherSpec(BaseToolSpec):
    """Someone else's spec, guarded from outside."""

    spec_functions: ClassVar[list[Any]] = ["forecast"]

    async def forecast(self, city: str) -> str:
        """Tomorrow's weather."""
        effects.append(f"forecast {city}")
        return f"sunny in {city}"


def scripted_model(calls: list[tuple[str, dict[str, Any]]]) -> MockFunctionCallingLLM:
    def respond(messages: Sequence[ChatMessage], **_: Any) -> ChatMessage:
        results = [m.content or "" for m in messages if m.role == MessageRole.TOOL]
        if results:
            return ChatMessage(role=MessageRole.ASSISTANT, content="\n".join(results))
        return ChatMessage(
            role=MessageRole.ASSISTANT,
            blocks=[
                ToolCallBlock(tool_call_id=f"call_{i}", tool_name=name, tool_kwargs=kw)
                for i, (name, kw) in enumerate(calls)
            ],
        )

    return MockFunctionCallingLLM(response_generator=respond)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        guard = Guard(f"sqlite:///{Path(tmp) / 'ledger.db'}", namespace="shop", quiet=True)
        guard.gov.upsert_policy(
            Policy(agent_id="billing-bot", blocked_tools=["delete_*"], require_approval=["refund"])
        )
        BillingSpec.onceonly_guard = guard
        tools = [
            *BillingSpec().to_tool_list(),
            *guard_spec(WeatherSpec(), guard, agent_id="billing-bot").to_tool_list(),
        ]
        calls = [
            ("charge", {"customer": "cus_1", "amount_usd": 20.0}),
            ("charge", {"customer": "cus_1", "amount_usd": 20.0}),  # a duplicate
            ("refund", {"customer": "cus_2", "amount_usd": 5.0}),  # needs approval
            ("delete_customer", {"customer": "cus_3"}),  # blocked by policy
            ("forecast", {"city": "Oslo"}),
        ]
        agent = FunctionAgent(tools=tools, llm=scripted_model(calls))
        with guard.run("run-1"), guard.workflow("invoice-7"), instrument(guard, run_id="run-1"):
            handler = agent.run(user_msg="Bill cus_1, refund cus_2, delete cus_3")
            results = [e async for e in handler.stream_events() if isinstance(e, ToolCallResult)]
            await handler

        for r in results:
            mark = "error" if r.tool_output.is_error else "ok"
            print(f"{r.tool_name:<16} {mark:<6} {r.tool_output.content}")
        print("timeline:")
        timeline = guard.gov.get_run_timeline("run-1")
        for ev in timeline:
            print(f"  {ev.type:<12} {ev.tool or '':<16} {ev.status or ''}")
        guard.close()

    outputs = {r.tool_name: r.tool_output for r in results}
    assert effects.count("charged cus_1 $20.0") == 1, effects  # the duplicate was replayed
    assert not any(e.startswith(("refunded", "deleted")) for e in effects), effects
    assert outputs["refund"].is_error and "approval" in outputs["refund"].content
    assert (
        outputs["delete_customer"].is_error and "tool_blocked" in outputs["delete_customer"].content
    )
    assert outputs["forecast"].content == "sunny in Oslo"
    spans = [ev for ev in timeline if ev.type == "tool_span"]
    assert sorted(ev.tool or "" for ev in spans) == sorted(name for name, _ in calls)
    assert {ev.type for ev in timeline} >= {"tool_call", "tool_result", "dedup", "blocked"}
    print(f"effects: {effects}")


if __name__ == "__main__":
    asyncio.run(main())
