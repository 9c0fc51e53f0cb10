"""The dispatcher against real ``openai`` response types, on a real SQLite ledger."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Annotated, Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessage
from openai.types.responses import Response
from pydantic import BaseModel, Field

from onceonly_core import GLOBAL, Guard
from onceonly_core.errors import ConfigError
from onceonly_core.governance.models import Policy
from onceonly_openai import ToolDispatcher, chat_calls, to_text, tool
from onceonly_openai.testing import chat_tool_calls, response_tool_calls


def message(*calls: tuple[str, Any, str]) -> ChatCompletionMessage:
    """A ChatCompletionMessage parsed from JSON, as the SDK parses the API's reply."""
    return ChatCompletion.model_validate(chat_tool_calls(*calls)).choices[0].message


def response(*calls: tuple[str, Any, str]) -> Response:
    return Response.model_validate(response_tool_calls(*calls))


class Shop:
    def __init__(self) -> None:
        self.charges: list[tuple[str, float]] = []
        self.sql: list[str] = []

    def charge_card(
        self, customer: str, amount_usd: Annotated[float, Field(gt=0, description="USD")]
    ) -> dict[str, Any]:
        """Charge a customer's card."""
        self.charges.append((customer, amount_usd))
        return {"charge_id": f"ch_{len(self.charges)}", "amount": amount_usd}

    def run_sql(self, query: str) -> str:
        """Run a read-only query."""
        self.sql.append(query)
        return f"{len(self.sql)} rows"

    def tools(self) -> list[Any]:
        return [tool(self.charge_card), tool(self.run_sql, custom=True)]


@pytest.fixture
def shop() -> Shop:
    return Shop()


def charge(amount: float, call_id: str) -> tuple[str, Any, str]:
    return ("charge_card", {"customer": "cus_42", "amount_usd": amount}, call_id)


def test_chat_message_tool_calls_and_dicts(guard: Guard, shop: Shop) -> None:
    d = ToolDispatcher(shop.tools(), guard=guard, scope="order-42")
    msg = message(charge(9.99, "call_1"), ("custom:run_sql", "select 1", "call_2"))
    out = d.chat(msg)
    assert out == [
        {"role": "tool", "tool_call_id": "call_1", "content": '{"amount":9.99,"charge_id":"ch_1"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "1 rows"},
    ]
    assert shop.sql == ["select 1"]
    # The same calls as msg.tool_calls, and as plain dicts, under new ids: replayed.
    again = d.chat(message(charge(9.99, "call_3")).tool_calls)
    raw = chat_tool_calls(charge(9.99, "call_4"))["choices"][0]["message"]
    assert again[0]["tool_call_id"] == "call_3" and again[0]["content"] == out[0]["content"]
    assert d.chat(raw)[0] == {**out[0], "tool_call_id": "call_4"}
    assert shop.charges == [("cus_42", 9.99)]


def test_responses_items(guard: Guard, shop: Shop) -> None:
    d = ToolDispatcher(shop.tools(), guard=guard, scope="order-42")
    resp = response(charge(5, "fc_1"), ("custom:run_sql", "select 2", "ct_1"))
    out = d.responses(resp)
    assert out == [
        {"type": "function_call_output", "call_id": "fc_1", "output": out[0]["output"]},
        {"type": "custom_tool_call_output", "call_id": "ct_1", "output": "1 rows"},
    ]
    assert json.loads(out[0]["output"]) == {"amount": 5.0, "charge_id": "ch_1"}
    replay = d.responses(response(charge(5.0, "fc_2")).output)  # 5 == 5.0: the same call
    assert replay == [
        {"type": "function_call_output", "call_id": "fc_2", "output": out[0]["output"]}
    ]
    assert len(shop.charges) == 1


def test_bad_calls_get_error_outputs_and_nothing_runs(guard: Guard, shop: Shop) -> None:
    d = ToolDispatcher(shop.tools(), guard=guard, scope="s")
    msg = message(
        ("charge_card", '{"customer": "c", "amount_usd": 5', "bad_json"),
        ("charge_card", "[1, 2]", "not_object"),
        ("refund_everything", {}, "unknown"),
        ("charge_card", {"customer": "c", "amount_usd": -1}, "invalid"),
        ("charge_card", {"customer": "c", "amount_usd": 1, "tip": 5}, "hallucinated"),
        ("charge_card", {"customer": "c"}, "missing"),
        ("custom:charge_card", "five dollars", "custom_for_function"),
        ("charge_card", '{"customer": "c", "amount_usd": NaN}', "nan"),
        ("charge_card", '{"customer": "c", "amount_usd": Infinity}', "inf"),
    )
    answers = d.dispatch(chat_calls(msg))
    assert [a.call.call_id for a in answers] == [
        "bad_json", "not_object", "unknown", "invalid", "hallucinated", "missing",
        "custom_for_function", "nan", "inf",
    ]  # fmt: skip
    assert [(a.code, a.outcome.reason) for a in answers] == [
        ("invalid_arguments", "invalid_json"),
        ("invalid_arguments", "invalid_json"),
        ("blocked", "tool_not_found"),
        ("invalid_arguments", "validation"),
        ("invalid_arguments", "validation"),
        ("invalid_arguments", "validation"),
        ("invalid_arguments", "validation"),
        # NaN fails amount_usd's gt=0; Infinity passes it, and cannot be keyed (it was a
        # guard_error before the contract)
        ("invalid_arguments", "validation"),
        ("invalid_arguments", "invalid_value"),
    ]
    out = [a.output for a in answers]
    assert all(o == a.outcome.text for o, a in zip(out, answers, strict=True))  # no wording
    assert "not valid JSON (Expecting ',' delimiter" in out[0]
    assert "charge_card, run_sql" in out[2]  # tells the model what exists
    assert "amount_usd" in out[3] and "greater than 0" in out[3]
    assert "tip" in out[4]
    assert "amount_usd" in out[5]
    assert "inf is not a finite number" in out[8]
    assert shop.charges == []


def test_tool_failure_is_an_output_and_is_not_cached(guard: Guard) -> None:
    attempts: list[int] = []

    def send_email(to: str) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("smtp down")
        return "sent"

    d = ToolDispatcher({"send_email": send_email}, guard=guard, scope="s")
    [first] = d.dispatch(chat_calls(message(("send_email", {"to": "a@b"}, "c1"))))
    assert (first.code, first.outcome.error_type) == ("failed", "ConnectionError")
    assert first.output.startswith("Failed: send_email raised ConnectionError: smtp down;")
    assert d.chat(message(("send_email", {"to": "a@b"}, "c2")))[0]["content"] == "sent"
    assert len(attempts) == 2


def test_blocked_and_pending_approval(guard: Guard) -> None:
    ran: list[str] = []

    def delete_user(user_id: str) -> str:
        ran.append("delete")
        return "deleted"

    def refund(order_id: str) -> str:
        ran.append("refund")
        return "refunded"

    def lookup(order_id: str) -> str:
        ran.append("lookup")
        return "shipped"

    guard.gov.upsert_policy(
        Policy(agent_id="bot", blocked_tools=["delete_*"], require_approval=["refund"])
    )
    d = ToolDispatcher([delete_user, refund, lookup], guard=guard, agent_id="bot", scope="t1")
    msg = message(
        ("delete_user", {"user_id": "u1"}, "c1"),
        ("refund", {"order_id": "o1"}, "c2"),
        ("lookup", {"order_id": "o1"}, "c3"),
    )
    blocked, pending, looked = d.dispatch(chat_calls(msg))
    assert (blocked.code, blocked.outcome.reason) == ("blocked", "tool_blocked")
    assert pending.code == "pending_approval" and pending.outcome.approval_id
    assert pending.output.startswith(f"Waiting for human approval {pending.outcome.approval_id}")
    assert looked.output == "shipped"
    assert ran == ["lookup"]
    guard.gov.disable_agent("bot", "incident")
    [killed] = d.dispatch(chat_calls(message(("lookup", {"order_id": "o2"}, "c4"))))
    assert killed.outcome.reason == "agent_disabled" and ran == ["lookup"]
    assert killed.output.startswith("Not allowed: this agent is disabled")


def test_an_unrecorded_completion_says_the_tool_ran(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ledger fails the write that records the charge: it happened, and the model must
    # hear so (the old dispatcher answered guard_error, inviting a second charge).
    from onceonly_core.errors import StoreError

    def lost(*a: Any, **k: Any) -> Any:
        raise StoreError("server closed the connection")

    monkeypatch.setattr("onceonly_core.protocol.FINISH_RETRIES", (0.01,))
    monkeypatch.setattr(guard.store, "finish", lost)
    charges: list[float] = []

    def charge_card(amount_usd: float) -> str:
        charges.append(amount_usd)
        return "ch_1"

    d = ToolDispatcher([charge_card], guard=guard, scope="cnr")
    [a] = d.dispatch(chat_calls(message(("charge_card", {"amount_usd": 5}, "c1"))))
    assert (a.code, a.outcome.reason) == ("executed", "completion_not_recorded")
    assert "do not call it again" in a.output and a.output.endswith("ch_1")
    assert charges == [5.0]


def test_exactly_one_output_per_call_id(guard: Guard, shop: Shop) -> None:
    d = ToolDispatcher(shop.tools(), guard=guard)
    raw = [
        {"id": "dup", "type": "function", "function": {"name": "charge_card", "arguments": "{}"}},
        {"id": "dup", "type": "function", "function": {"name": "nope", "arguments": "{}"}},
        {"id": "other", "type": "function", "function": {"name": "nope", "arguments": "{}"}},
    ]
    assert [o["tool_call_id"] for o in d.chat(raw)] == ["dup", "other"]


def test_two_identical_calls_in_one_turn_run_once(guard: Guard, shop: Shop) -> None:
    d = ToolDispatcher(shop.tools(), guard=guard, scope="o")
    out = d.chat(message(charge(3, "a"), charge(3, "b")))
    assert out[0]["content"] == out[1]["content"] and len(shop.charges) == 1


def test_scopes_separate_keys(guard: Guard, shop: Shop) -> None:
    for scope in ("order-1", "order-2", "order-1"):
        ToolDispatcher(shop.tools(), guard=guard, scope=scope).chat(message(charge(1, "x")))
    with guard.workflow("order-3"):  # scope=None: the caller's workflow
        ToolDispatcher(shop.tools(), guard=guard).chat(message(charge(1, "x")))
    assert len(shop.charges) == 3


def test_guard_options_per_tool(guard: Guard) -> None:
    seen: list[str] = []

    def weather(city: str) -> str:
        seen.append(city)
        return "sunny"

    def ship(order_id: str, note: str = "") -> str:
        seen.append(order_id)
        return "shipped"

    d = ToolDispatcher(
        [tool(weather, unlimited=True), tool(ship, key_args=["order_id"])], guard=guard
    )
    d.chat(message(("weather", {"city": "Oslo"}, "1"), ("weather", {"city": "Oslo"}, "2")))
    d.chat(message(("ship", {"order_id": "o1", "note": "a"}, "3")))
    d.chat(message(("ship", {"order_id": "o1", "note": "b"}, "4")))
    assert seen == ["Oslo", "Oslo", "o1"]


def test_async_parallel_calls_run_concurrently_in_order(guard: Guard) -> None:
    asyncio.run(_parallel(guard))


async def _parallel(guard: Guard) -> None:
    started: dict[str, asyncio.Event] = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def step(name: str, waits_for: str) -> str:
        started[name].set()
        # Each call waits until the other one has started: sequential dispatch deadlocks.
        await asyncio.wait_for(started[waits_for].wait(), timeout=5)
        return f"{name} done"

    d = ToolDispatcher({"step": step}, guard=guard, scope="p")
    msg = message(
        ("step", {"name": "b", "waits_for": "a"}, "c1"),
        ("step", {"name": "a", "waits_for": "b"}, "c2"),
    )
    out = await d.achat(msg)
    assert [(o["tool_call_id"], o["content"]) for o in out] == [("c1", "b done"), ("c2", "a done")]
    # Replays under new ids, in async, for the Responses API too.
    resp = response(
        ("step", {"name": "a", "waits_for": "b"}, "r1"),
        ("step", {"name": "b", "waits_for": "a"}, "r2"),
    )
    assert [o["output"] for o in await d.aresponses(resp)] == ["a done", "b done"]


def test_async_mixed_sync_tools_and_errors(guard: Guard, shop: Shop) -> None:
    asyncio.run(_mixed(guard, shop))


async def _mixed(guard: Guard, shop: Shop) -> None:
    d = ToolDispatcher(shop.tools(), guard=guard, scope="m")
    out = await d.achat(message(charge(2, "a"), ("nope", {}, "b"), ("custom:run_sql", "q", "c")))
    assert [o["tool_call_id"] for o in out] == ["a", "b", "c"]
    assert str(out[1]["content"]).startswith("Not allowed: there is no tool named nope")
    assert shop.charges == [("cus_42", 2.0)] and shop.sql == ["q"]


def test_sync_dispatch_runs_async_tools(guard: Guard) -> None:
    async def ping(n: int) -> int:
        await asyncio.sleep(0)
        return n + 1

    d = ToolDispatcher({"ping": ping}, guard=guard)
    assert d.chat(message(("ping", {"n": 1}, "a")))[0]["content"] == "2"


def test_in_progress_is_an_output(guard: Guard) -> None:
    # Another worker holds a live claim on this key (it is charging right now).
    import threading

    release = threading.Event()
    running = threading.Event()

    def slow(x: int) -> str:
        running.set()
        release.wait(5)
        return "done"

    d = ToolDispatcher([tool(slow, wait=0)], guard=guard, scope="ip")
    t = threading.Thread(target=lambda: d.chat(message(("slow", {"x": 1}, "a"))))
    t.start()
    assert running.wait(5)
    [out] = d.dispatch(chat_calls(message(("slow", {"x": 1}, "b"))))
    release.set()
    t.join()
    assert out.code == "in_progress" and out.output.startswith("Already running: the same slow")


class Receipt(BaseModel):
    total: Decimal
    tags: set[str]


def test_serialisation_is_deterministic() -> None:
    value = {"b": 1, "a": [Receipt(total=Decimal("1.10"), tags={"z", "y", "x"})], 3: None}
    text = to_text(value)
    assert text == '{"3":null,"a":[{"tags":["x","y","z"],"total":"1.10"}],"b":1}'
    assert to_text({"a": 1, "b": 2}) == to_text({"b": 2, "a": 1})
    assert to_text("plain") == "plain" and to_text(None) == "null"


def test_replay_of_structured_result_is_byte_identical(guard: Guard) -> None:
    def quote(sku: str) -> Receipt:
        return Receipt(total=Decimal("9.90"), tags={"b", "a"})

    d = ToolDispatcher({"quote": quote}, guard=guard, scope="q")
    first = d.chat(message(("quote", {"sku": "s"}, "1")))[0]["content"]
    assert d.chat(message(("quote", {"sku": "s"}, "2")))[0]["content"] == first
    assert first == '{"tags":["a","b"],"total":"9.90"}'


def test_responses_takes_a_single_item(guard: Guard, shop: Shop) -> None:
    # One function_call item (a model object or a dict) is answered, not ignored ([] before).
    d = ToolDispatcher(shop.tools(), guard=guard, scope="one")
    item = response(charge(4, "fc_1")).output[0]
    [out] = d.responses(item)
    assert out["call_id"] == "fc_1"  # type: ignore[typeddict-item]
    [again] = d.responses(item.model_dump())
    assert again == out and len(shop.charges) == 1
    # A whole Response as a dict (stored, or from raw JSON) is read by its output.
    assert d.responses(response_tool_calls(charge(4, "fc_2")))[0]["output"] == out["output"]


def test_a_call_without_scope_warns_once(guard: Guard, caplog: pytest.LogCaptureFixture) -> None:
    def ship(order_id: str) -> str:
        return "shipped"

    def quote(sku: str) -> str:
        return "9.90"

    d = ToolDispatcher([ship, tool(quote, read_only=True)], guard=guard)
    with caplog.at_level("WARNING", logger="onceonly"):
        d.chat(message(("quote", {"sku": "a"}, "1")))  # a read tool: no dedup, no warning
        assert not caplog.records
        d.chat(message(("ship", {"order_id": "o1"}, "2"), ("ship", {"order_id": "o2"}, "3")))
    [warning] = caplog.records
    assert "without a scope" in warning.getMessage()
    scoped = ToolDispatcher([ship], guard=Guard("memory://", quiet=True), scope="conv-1")
    with caplog.at_level("WARNING", logger="onceonly"):
        scoped.chat(message(("ship", {"order_id": "o1"}, "4")))
    assert len(caplog.records) == 1  # nothing new


def test_scope_per_call_overrides_the_dispatcher(guard: Guard, shop: Shop) -> None:
    d = ToolDispatcher(shop.tools(), guard=guard, scope="conv-1")
    d.chat(message(charge(1, "a")))
    d.chat(message(charge(1, "b")), scope="conv-2")
    d.chat(message(charge(1, "c")), scope="conv-2")
    assert len(shop.charges) == 2


def test_a_tools_own_scope_wins(guard: Guard) -> None:
    sent: list[str] = []

    def send_welcome(customer: str) -> str:
        sent.append(customer)
        return "sent"

    welcome = tool(send_welcome, scope=GLOBAL)  # once per customer, whatever the conversation
    for conversation in ("conv-1", "conv-2"):
        ToolDispatcher([welcome], guard=guard, scope=conversation).chat(
            message(("send_welcome", {"customer": "c"}, "x"))
        )
    assert sent == ["c"]
    with pytest.raises(ConfigError, match="unknown tool options: retries"):
        tool(send_welcome, retries=3)
