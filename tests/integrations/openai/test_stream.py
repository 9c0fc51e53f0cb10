"""Streamed tool calls: the real ``openai`` client's ``stream=True`` iterators, fed
chunk by chunk / event by event into ``ToolCallStream``, then to the dispatcher."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from onceonly_core import Guard
from onceonly_openai import ToolCall, ToolCallStream, ToolDispatcher
from onceonly_openai.testing import (
    ScriptedOpenAI,
    chat_tool_call_chunks,
    response_tool_call_events,
)

CHARGE = {"customer": "cus_42", "amount_usd": 12.5}


def shop() -> tuple[list[float], Any]:
    charges: list[float] = []

    def charge_card(customer: str, amount_usd: float) -> str:
        charges.append(amount_usd)
        return f"charged {customer} {amount_usd}"

    def lookup(order_id: str) -> str:
        return f"order {order_id} shipped"

    return charges, [charge_card, lookup]


def test_chat_chunks_become_complete_calls(guard: Guard) -> None:
    reply = chat_tool_call_chunks(
        ("charge_card", CHARGE, "call_1"), ("lookup", {"order_id": "o-9"}, "call_2"), pieces=4
    )
    client = ScriptedOpenAI([reply]).client()
    stream = client.chat.completions.create(model="m", messages=[], stream=True)
    calls = ToolCallStream()
    completed: list[list[ToolCall]] = [calls.add(chunk) for chunk in stream]
    # A call is complete when the next one starts, the last one when the choice finishes.
    first_done = next(i for i, c in enumerate(completed) if c)
    assert [c.call_id for c in completed[first_done]] == ["call_1"]
    assert [c.call_id for c in completed[-1]] == ["call_2"]
    assert [c.call_id for c in calls.calls] == ["call_1", "call_2"]
    charges, tools = shop()
    messages = ToolDispatcher(tools, guard=guard, scope="s").chat(calls.calls)
    assert [m["content"] for m in messages] == ["charged cus_42 12.5", "order o-9 shipped"]
    assert charges == [12.5]


def test_fragments_are_only_complete_at_the_end(guard: Guard) -> None:
    calls = ToolCallStream()
    chunks = chat_tool_call_chunks(("charge_card", CHARGE, "call_1"), pieces=5)
    # Nothing runs on a fragment: no call is complete before the finishing chunk.
    assert [calls.add(c) for c in chunks[:-1]] == [[]] * (len(chunks) - 1)
    [done] = calls.add(chunks[-1])
    assert done == ToolCall(
        "call_1", "charge_card", False, '{"customer": "cus_42", "amount_usd": 12.5}'
    )


def test_responses_events_become_complete_calls(guard: Guard) -> None:
    reply = response_tool_call_events(
        ("charge_card", CHARGE, "fc_1"), ("lookup", {"order_id": "o-9"}, "fc_2")
    )
    client = ScriptedOpenAI([reply]).client()
    calls = ToolCallStream()
    kinds = []
    for event in client.responses.create(model="m", input="x", stream=True):
        if calls.add(event):
            kinds.append(event.type)
    # Each call completes at its arguments' done event; the item's done adds nothing.
    assert kinds == ["response.function_call_arguments.done"] * 2
    charges, tools = shop()
    d = ToolDispatcher(tools, guard=guard, scope="s")
    items = d.responses(calls.calls)
    assert [i["call_id"] for i in items] == ["fc_1", "fc_2"]  # type: ignore[typeddict-item]
    # The same calls again (a retried stream): replayed, charged once.
    assert d.responses(calls.calls) == items and charges == [12.5]


def test_responses_output_item_done_alone_completes_a_call() -> None:
    events = response_tool_call_events(("lookup", {"order_id": "o-1"}, "fc_1"))
    calls = ToolCallStream()
    done = [e for e in events if e["type"] == "response.output_item.done"]
    [call] = calls.add(done[0])  # the complete item, without any delta seen
    assert call == ToolCall("fc_1", "lookup", False, '{"order_id": "o-1"}')
    assert calls.add({"type": "response.completed"}) == []


def test_async_stream(guard: Guard) -> None:
    async def main() -> list[str]:
        client = ScriptedOpenAI([chat_tool_call_chunks(("charge_card", CHARGE, "a"))])
        calls = ToolCallStream()
        stream = await client.async_client().chat.completions.create(
            model="m", messages=[], stream=True
        )
        async for chunk in stream:
            calls.add(chunk)
        _, tools = shop()
        messages = await ToolDispatcher(tools, guard=guard, scope="s").achat(calls.calls)
        return [str(m["content"]) for m in messages]

    assert asyncio.run(main()) == ["charged cus_42 12.5"]


@pytest.mark.parametrize("piece", [{"type": "response.output_text.delta", "delta": "hi"}, 42])
def test_other_pieces_are_ignored(piece: Any) -> None:
    assert ToolCallStream().add(piece) == []
