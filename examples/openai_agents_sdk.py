"""An Agents SDK agent graph (scripted models, no network) with guarded, governed tools.

A triage agent hands off to a billing agent. ``guard_agent`` guards the whole graph, so
the billing agent's tools are guarded too. The model asks for ``charge_card`` twice (a
re-planned step, a new ``tool_call_id``, the amount now a string) and for a tool its
policy blocks; the card is charged once and the blocked call answers the model with the
contract's sentence, which names the policy reason.

    python examples/openai_agents_sdk.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from agents import Agent, Runner, ToolCallOutputItem, function_tool, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message, function_call

from onceonly_core import Guard
from onceonly_core.governance.models import Policy
from onceonly_openai.agents import guard_agent, outcome_of

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
    billing_model = ScriptedModel(
        [
            [function_call("charge_card", args, call_id="call_1")],
            [
                # re-planned: the same call, the amount as a string ("99.99" == 99.99)
                function_call("charge_card", {**args, "amount_usd": "99.99"}, call_id="call_2"),
                function_call("delete_customer", {"customer": "cus_42"}, call_id="call_3"),
            ],
            [assistant_message("Charged once; deleting is not allowed.")],
        ]
    )
    triage_model = ScriptedModel([[function_call("transfer_to_billing", {}, call_id="h_1")]])
    billing = Agent(name="billing", model=billing_model, tools=[charge_card, delete_customer])
    triage = Agent(name="triage", model=triage_model, handoffs=[billing])
    with tempfile.TemporaryDirectory() as tmp:
        guard = Guard(f"sqlite:///{Path(tmp) / 'ledger.db'}", quiet=True)
        guard.gov.upsert_policy(Policy(agent_id="billing-bot", blocked_tools=["delete_*"]))
        agent = guard_agent(
            triage, guard=guard, agent_id="billing-bot", scope="order-42", input_guardrail=True
        )
        result = await Runner.run(agent, "Charge cus_42 $99.99, then delete them.")
        outputs = {
            dict(item.raw_item)["call_id"]: str(item.output)
            for item in result.new_items
            if isinstance(item, ToolCallOutputItem)
        }
        # Beside each output, the core's classification (call_3 was refused by the input
        # guardrail before the tool was invoked: it has the text, not an outcome item).
        codes = [o["code"] for o in map(outcome_of, result.new_items) if o is not None]
        assert codes == ["executed", "replayed"], codes
        assert outputs["call_1"] == outputs["call_2"] == "charged cus_42 $99.99 (ch_1)"
        assert outputs["call_3"].startswith("Not allowed: delete_customer was blocked by policy")
        assert "(tool_blocked)" in outputs["call_3"], outputs["call_3"]
        assert charges == [99.99]
        guard.close()
        print(f"handed off, charged once, delete blocked; agent says: {result.final_output}")


if __name__ == "__main__":
    asyncio.run(main())
