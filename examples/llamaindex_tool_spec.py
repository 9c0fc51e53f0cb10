"""A guarded LlamaIndex tool spec with governance, and every tool on one run timeline.

    pip install "onceonly-core[llamaindex]"
    python examples/llamaindex_tool_spec.py

``BillingSpec`` subclasses ``GuardedToolSpec``: ``to_tool_list()`` hands the agent guarded
tools. The agent's policy blocks ``delete_*`` and requires approval for refunds; the
blocked and waiting calls reach the model as error outputs and never run. An existing
spec (``WeatherSpec``) is guarded with ``guard_spec``, its forecast as a read tool
(``read_only=True``: never deduplicated, still governed). ``instrument`` records each tool
span on the timeline of the LlamaIndex run it belongs to (``handler.run_id``), next to
the guard's own decisions for that run.
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
            *guard_spec(
                WeatherSpec(),
                guard,
                agent_id="billing-bot",
                tool_options={"forecast": {"read_only": True}},
            ).to_tool_list(),
        ]
        calls = [
            ("charge", {"customer": "cus_1", "amount_usd": 20.0}),
            ("charge", {"customer": "cus_1", "amount_usd": 20.0}),  # a duplicate
            ("refund", {"customer": "cus_2", "amount_usd": 5.0}),  # needs approval
            ("delete_customer", {"customer": "cus_3"}),  # blocked by policy
            ("forecast", {"city": "Oslo"}),
            ("forecast", {"city": "Oslo"}),  # a read: asked again, it runs again
        ]
        agent = FunctionAgent(tools=tools, llm=scripted_model(calls))
        # The dedup scope is the invoice; the timeline is this LlamaIndex run's own.
        with guard.workflow("invoice-7"), instrument(guard):
            handler = agent.run(user_msg="Bill cus_1, refund cus_2, delete cus_3")
            results = [e async for e in handler.stream_events() if isinstance(e, ToolCallResult)]
            await handler

        for r in results:
            code = getattr(r.tool_output, "code", None)
            print(f"{r.tool_name:<16} {code:<17} {r.tool_output.content}")
        print(f"timeline of run {handler.run_id}:")
        timeline = guard.gov.get_run_timeline(handler.run_id)
        for ev in timeline:
            print(f"  {ev.type:<12} {ev.tool or '':<16} {ev.status or ''}")
        guard.close()

    outputs = {r.tool_name: r.tool_output for r in results}
    assert effects.count("charged cus_1 $20.0") == 1, effects  # the duplicate was replayed
    assert not any(e.startswith(("refunded", "deleted")) for e in effects), effects
    assert effects.count("forecast Oslo") == 2, effects  # a read runs every time
    assert outputs["refund"].is_error and "approval" in outputs["refund"].content
    assert (
        outputs["delete_customer"].is_error and "tool_blocked" in outputs["delete_customer"].content
    )
    assert getattr(outputs["delete_customer"], "code", None) == "blocked"
    assert outputs["forecast"].content == "sunny in Oslo"
    spans = [ev for ev in timeline if ev.type == "tool_span"]
    assert sorted(ev.tool or "" for ev in spans) == sorted(name for name, _ in calls)
    assert {ev.type for ev in timeline} >= {"tool_call", "tool_result", "dedup", "blocked"}
    print(f"effects: {effects}")


if __name__ == "__main__":
    asyncio.run(main())
