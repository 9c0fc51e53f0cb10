"""A LlamaIndex FunctionAgent that asks to pay twice, and is then re-run: one payment.

    pip install "onceonly-core[llamaindex]"
    python examples/llamaindex_payment_agent.py

The model (LlamaIndex's ``MockFunctionCallingLLM`` with a script: offline) asks for the
same payment twice in one turn; the agent's ``call_tool`` step runs the two calls
concurrently (``num_workers=4``). Then the whole workflow runs again, as it would after
a crash or a retry, and this time the model writes the amount as a string ("99.99"):
the tool's ``fn_schema`` coerces it to 99.99 before the call is keyed, so it is the same
call. The card is charged once; every call sees the same receipt. Each answer carries
the guard's decision (``GuardedToolOutput.code``: executed, replayed...).
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.llms.mock import MockFunctionCallingLLM
from llama_index.core.tools import FunctionTool

from onceonly_core import Guard, current_call
from onceonly_llamaindex import guard_tools

charges: list[tuple[str, float, str]] = []  # what the payment provider actually charged
_lock = threading.Lock()


async def charge_card(order_id: str, amount_usd: float) -> dict[str, Any]:
    """Charge the customer's card for an order."""
    call = current_call()
    assert call is not None
    await asyncio.sleep(0.05)  # the provider's latency: the duplicate arrives meanwhile
    with _lock:
        # A real tool passes call.idempotency_key to the provider (Stripe's
        # Idempotency-Key): the same for every attempt of this logical call.
        charges.append((order_id, amount_usd, call.idempotency_key))
        return {"charge_id": f"ch_{len(charges)}", "amount_usd": amount_usd}


def scripted_model(amount: Any) -> MockFunctionCallingLLM:
    """Asks for the same payment twice in one turn, then reports the tool results."""

    def respond(messages: Sequence[ChatMessage], **_: Any) -> ChatMessage:
        results = [m.content or "" for m in messages if m.role == MessageRole.TOOL]
        if results:
            return ChatMessage(role=MessageRole.ASSISTANT, content="; ".join(results))
        pay = {"order_id": "order-42", "amount_usd": amount}
        return ChatMessage(
            role=MessageRole.ASSISTANT,
            blocks=[
                ToolCallBlock(tool_call_id=f"call_{i}", tool_name="charge_card", tool_kwargs=pay)
                for i in range(2)
            ],
        )

    return MockFunctionCallingLLM(response_generator=respond)


async def run_once(guard: Guard, attempt: int, amount: Any) -> list[ToolCallResult]:
    tools = guard_tools([FunctionTool.from_defaults(async_fn=charge_card)], guard)
    agent = FunctionAgent(tools=tools, llm=scripted_model(amount))
    # The dedup scope: one order's workflow. A re-run uses the same id, so it is the same
    # logical call; LlamaIndex's per-turn tool_call ids play no part in the key.
    with guard.workflow("order-42"):
        handler = agent.run(user_msg="Charge order-42 $99.99")
        results = [e async for e in handler.stream_events() if isinstance(e, ToolCallResult)]
        answer = await handler
    decided = [getattr(r.tool_output, "code", None) for r in results]
    print(f"run {attempt}: the model asked for {len(results)} payments {decided}: {answer}")
    return results


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        guard = Guard(f"sqlite:///{Path(tmp) / 'ledger.db'}", namespace="shop", quiet=True)
        first = await run_once(guard, 1, 99.99)
        # The workflow runs again (a crash, a retry); the model spells the amount as text.
        rerun = await run_once(guard, 2, "99.99")
        guard.close()

    outputs = [r.tool_output for r in first + rerun]
    assert len(outputs) == 4 and not any(o.is_error for o in outputs)
    assert {o.raw_output["charge_id"] for o in outputs} == {"ch_1"}  # everyone sees one receipt
    assert len(charges) == 1, charges  # the card was charged once
    assert type(charges[0][1]) is float  # with the validated amount, not the model's text
    assert sorted(getattr(o, "code", None) for o in outputs) == ["executed"] + ["replayed"] * 3
    print(f"charged {len(charges)} time(s): {charges[0][:2]}")


if __name__ == "__main__":
    asyncio.run(main())
