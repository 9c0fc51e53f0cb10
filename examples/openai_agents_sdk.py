"""An Agents SDK agent (scripted model, no network) with guarded, governed tools.

The model asks for ``charge_card`` twice (a re-planned step, a new ``tool_call_id``)
and for a tool its policy blocks; the card is charged once and the blocked call
answers the model with the policy reason.

    python examples/openai_agents_sdk.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from agents import Agent, Runner, function_tool, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message, function_call

from onceonly_core import Guard
from onceonly_core.governance.models import Policy
from onceonly_openai.agents import guard_agent

charges: list[float] = []


@function_tool
def charge_card(customer: str, amount_usd: float) -> str:
    """Charge the customer's card."""
    charges.append(amount_usd)
    return f"charged {customer} ${amount_usd} (ch_{len(charges)})"


@function_tool
def delete_customer(customer: str) -> str:
    """Delete the customer."""
    raise AssertionError("a blocked tool must not run")


async def main() -> None:
    set_tracing_disabled(True)
    args = {"customer": "cus_42", "amount_usd": 99.99}
    model = ScriptedModel(
        [
            [function_call("charge_card", args, call_id="call_1")],
            [
                function_call("charge_card", args, call_id="call_2"),  # re-planned: same call
                function_call("delete_customer", {"customer": "cus_42"}, call_id="call_3"),
            ],
            [assistant_message("Charged once; deleting is not allowed.")],
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        guard = Guard(f"sqlite:///{Path(tmp) / 'ledger.db'}", quiet=True)
        guard.gov.upsert_policy(Policy(agent_id="billing-bot", blocked_tools=["delete_*"]))
        agent = guard_agent(
            Agent(name="billing", model=model, tools=[charge_card, delete_customer]),
            guard=guard,
            agent_id="billing-bot",
            scope="order-42",
            input_guardrail=True,
        )
        result = await Runner.run(agent, "Charge cus_42 $99.99, then delete them.")
        outputs = {
            item.raw_item["call_id"]: item.raw_item["output"]
            for item in result.new_items
            if item.type == "tool_call_output_item"
        }
        assert outputs["call_1"] == outputs["call_2"] == "charged cus_42 $99.99 (ch_1)"
        assert "tool_blocked" in outputs["call_3"], outputs["call_3"]
        assert charges == [99.99]
        guard.close()
        print(f"charged once, delete blocked; agent says: {result.final_output}")


if __name__ == "__main__":
    asyncio.run(main())
