"""The tool loop with the real ``openai`` client against a scripted server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.responses import ResponseInputParam
from pydantic import TypeAdapter

from onceonly_core import Guard
from onceonly_openai import (
    MaxTurnsExceeded,
    ToolDispatcher,
    arun_chat,
    run_chat,
    run_responses,
    tool,
)
from onceonly_openai.testing import (
    ScriptedOpenAI,
    chat_text,
    chat_tool_calls,
    response_text,
    response_tool_calls,
)


def force(value: Any) -> Any:
    """Consume the lazy iterators pydantic builds for ``Iterable[...]`` TypedDict fields,
    so every nested item is actually validated."""
    if isinstance(value, dict):
        return {k: force(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [force(v) for v in value]
    if hasattr(value, "__next__"):
        return [force(v) for v in value]
    return value


CHAT = TypeAdapter(list[ChatCompletionMessageParam])
RESPONSES = TypeAdapter(ResponseInputParam)


def one_output_per_call(transcript: list[dict[str, Any]], *, api: str) -> None:
    if api == "chat":
        calls = [
            c["id"] for m in transcript if m["role"] == "assistant" for c in m.get("tool_calls", [])
        ]
        outs = [m["tool_call_id"] for m in transcript if m["role"] == "tool"]
    else:
        calls = [
            i["call_id"]
            for i in transcript
            if i.get("type") in ("function_call", "custom_tool_call")
        ]
        outs = [i["call_id"] for i in transcript if i.get("type", "").endswith("_call_output")]
    assert calls and sorted(calls) == sorted(outs) and len(set(outs)) == len(outs)


def make_tools() -> tuple[dict[str, Any], list[Any]]:
    charges: list[Any] = []

    def charge_card(customer: str, amount_usd: float) -> dict[str, Any]:
        """Charge a card."""
        charges.append((customer, amount_usd))
        return {"charge_id": f"ch_{len(charges)}"}

    def lookup(q: str) -> str:
        """Free-text lookup."""
        return q.upper()

    return {"charge_card": charge_card, "lookup": lookup}, charges


def test_chat_loop_transcript_round_trips(guard: Guard) -> None:
    tools, charges = make_tools()
    d = ToolDispatcher(tools, guard=guard, scope="c1")
    server = ScriptedOpenAI(
        [
            chat_tool_calls(
                ("charge_card", {"customer": "c", "amount_usd": 1}, "a"),
                ("charge_card", "{oops", "b"),
                ("missing_tool", {}, "c"),
            ),
            chat_tool_calls(("charge_card", {"customer": "c", "amount_usd": 1}, "d")),
            chat_text("done"),
        ]
    )
    res = run_chat(server.client(), d, [{"role": "user", "content": "go"}], model="m")
    assert res.text == "done" and res.turns == 3 and len(charges) == 1
    force(CHAT.validate_python(res.transcript))  # accepted by the SDK's request types
    one_output_per_call(res.transcript, api="chat")
    # The server received the same transcript, and the tool schemas.
    assert server.requests[-1]["messages"] == json.loads(json.dumps(res.transcript[:-1]))
    assert server.requests[0]["tools"] == d.chat_tools()


def test_async_chat_loop(guard: Guard) -> None:
    tools, charges = make_tools()
    d = ToolDispatcher(tools, guard=guard, scope="c2")
    server = ScriptedOpenAI(
        [chat_tool_calls(("charge_card", {"customer": "c", "amount_usd": 1}, "a")), chat_text("ok")]
    )
    res = asyncio.run(
        arun_chat(server.async_client(), d, [{"role": "user", "content": "x"}], model="m")
    )
    assert res.text == "ok" and len(charges) == 1
    force(CHAT.validate_python(res.transcript))


def test_responses_loop_round_trips(guard: Guard) -> None:
    tools, charges = make_tools()
    d = ToolDispatcher(
        {"charge_card": tools["charge_card"], "lookup": tool(tools["lookup"], custom=True)},
        guard=guard,
        scope="r1",
    )
    server = ScriptedOpenAI(
        [
            response_tool_calls(
                ("charge_card", {"customer": "c", "amount_usd": 1}, "a"),
                ("custom:lookup", "order 42", "b"),
            ),
            response_tool_calls(("charge_card", {"customer": "c", "amount_usd": 1.0}, "c")),
            response_text("finished"),
        ]
    )
    res = run_responses(server.client(), d, "go", model="m")
    assert res.text == "finished" and res.turns == 3 and len(charges) == 1
    force(RESPONSES.validate_python(res.transcript))
    one_output_per_call(res.transcript, api="responses")
    custom = [i for i in res.transcript if i.get("type") == "custom_tool_call_output"]
    assert custom == [{"type": "custom_tool_call_output", "call_id": "b", "output": "ORDER 42"}]
    assert server.requests[0]["tools"][1] == {
        "type": "custom",
        "name": "lookup",
        "description": "Free-text lookup.",
    }


def test_max_turns_bound(guard: Guard) -> None:
    tools, charges = make_tools()
    d = ToolDispatcher(tools, guard=guard, scope="loop")
    call = ("charge_card", {"customer": "c", "amount_usd": 1}, "x")
    server = ScriptedOpenAI([chat_tool_calls((*call[:2], f"id{i}")) for i in range(5)])
    with pytest.raises(MaxTurnsExceeded) as info:
        run_chat(server.client(), d, [{"role": "user", "content": "x"}], max_turns=3, model="m")
    assert len(server.requests) == 3 and len(charges) == 1
    one_output_per_call(info.value.transcript, api="chat")  # resumable: every call answered
    server = ScriptedOpenAI([response_tool_calls(call)] * 3)
    with pytest.raises(MaxTurnsExceeded):
        run_responses(server.client(), d, "x", max_turns=2, model="m")
    assert len(server.requests) == 2


def test_loop_retry_after_crash_charges_once(guard: Guard, tmp_path: Any) -> None:
    tools, charges = make_tools()
    call = {"customer": "c", "amount_usd": 7}
    import httpx2
    import openai

    for attempt, reply in ((1, httpx2.ConnectError("down")), (2, chat_text("ok"))):
        g = Guard(f"sqlite:///{tmp_path / 'crash.db'}", quiet=True)  # a fresh process's guard
        d = ToolDispatcher(tools, guard=g, scope="order-7")
        server = ScriptedOpenAI([chat_tool_calls(("charge_card", call, f"call_{attempt}")), reply])
        if attempt == 1:
            with pytest.raises(openai.APIConnectionError):
                run_chat(server.client(), d, [{"role": "user", "content": "x"}], model="m")
        else:
            res = run_chat(server.client(), d, [{"role": "user", "content": "x"}], model="m")
            tool_msg = [m for m in res.transcript if m["role"] == "tool"]
            assert tool_msg == [
                {"role": "tool", "tool_call_id": "call_2", "content": '{"charge_id":"ch_1"}'}
            ]
        g.close()
    assert charges == [("c", 7.0)]
