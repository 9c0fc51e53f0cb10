"""The Responses API with ``AsyncOpenAI``: parallel tool calls, a dropped connection
mid-loop, a retried loop that charges nobody twice, and a streamed retry whose calls are
accumulated with ``ToolCallStream`` before they run.

    python examples/openai_responses_retry.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import httpx2
import openai

from onceonly_core import Guard
from onceonly_openai import ToolCallStream, ToolDispatcher, arun_responses
from onceonly_openai.testing import (
    ScriptedOpenAI,
    response_text,
    response_tool_call_events,
    response_tool_calls,
)

charges: list[tuple[str, float]] = []
emails: list[str] = []


async def charge_card(customer: str, amount_usd: float) -> dict[str, Any]:
    """Charge the customer's card."""
    await asyncio.sleep(0.05)  # the payment API
    charges.append((customer, amount_usd))
    return {"charge_id": f"ch_{len(charges)}", "amount_usd": amount_usd}


async def send_receipt(customer: str) -> str:
    """Email the receipt."""
    await asyncio.sleep(0.05)
    emails.append(customer)
    return f"receipt sent to {customer}"


def turn(suffix: str) -> dict[str, Any]:
    # Both calls in one response: the dispatcher runs them concurrently.
    return response_tool_calls(
        ("charge_card", {"customer": "cus_42", "amount_usd": 99.99}, f"call_charge_{suffix}"),
        ("send_receipt", {"customer": "cus_42"}, f"call_receipt_{suffix}"),
    )


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        guard = Guard(f"sqlite:///{Path(tmp) / 'ledger.db'}", quiet=True)
        tools = ToolDispatcher([charge_card, send_receipt], guard=guard, scope="order-42")

        dropped = httpx2.ConnectError("connection reset after the tools ran")
        server = ScriptedOpenAI([turn("1"), dropped])
        try:
            await arun_responses(server.async_client(), tools, "Charge order 42", model="gpt-4.1")
            raise AssertionError("the scripted connection drop did not happen")
        except openai.APIConnectionError:
            pass  # the loop died after the tools ran
        assert len(charges) == 1 and len(emails) == 1

        server = ScriptedOpenAI([turn("2"), response_text("Charged and receipted.")])
        result = await arun_responses(
            server.async_client(), tools, "Charge order 42", model="gpt-4.1"
        )
        items = [dict(i) for i in result.transcript]
        outputs = [i for i in items if i.get("type") == "function_call_output"]
        assert [o["call_id"] for o in outputs] == ["call_charge_2", "call_receipt_2"]
        assert '"charge_id":"ch_1"' in str(outputs[0]["output"])
        assert charges == [("cus_42", 99.99)] and emails == ["cus_42"], (charges, emails)
        # What the model saw on the retry: its calls and their (replayed) outputs.
        assert server.requests[1]["input"][-1]["call_id"] == "call_receipt_2"

        # A third try, streamed: each call runs only once its arguments are complete.
        calls = turn("3")["output"]
        stream = ScriptedOpenAI(
            [response_tool_call_events(*((c["name"], c["arguments"], c["call_id"]) for c in calls))]
        )
        pending = ToolCallStream()
        events = await stream.async_client().responses.create(
            model="gpt-4.1", input="Charge order 42", stream=True
        )
        async for event in events:
            pending.add(event)
        answers = await tools.adispatch(pending.calls)
        assert [a.code for a in answers] == ["replayed", "replayed"]
        assert len(charges) == 1 and len(emails) == 1
        guard.close()
        print(f"dropped connection, retry -> charged once, one receipt; {result.text!r}")


if __name__ == "__main__":
    asyncio.run(main())
