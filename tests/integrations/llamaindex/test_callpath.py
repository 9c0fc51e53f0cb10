"""The one call path, as a LlamaIndex user meets it: fn_schema validation before keying,
run ids and scopes from the active run, one instrumentation event per decision,
unrecorded completions, read tools, human-in-the-loop pauses, and per-request tools that
die with their request.

No ``from __future__ import annotations`` here: LlamaIndex finds a ``ctx: Context``
parameter by comparing the evaluated annotation with ``Context``.
"""

import asyncio
import gc
import logging
import tracemalloc
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.llms.mock import MockFunctionCallingLLM
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Context, HumanResponseEvent, InputRequiredEvent
from pydantic import BaseModel, Field

from onceonly_core import ConfigError, Guard, StoreError, current_call
from onceonly_core.governance.models import Policy
from onceonly_llamaindex import (
    EVENT_TYPE,
    GuardDecisionEvent,
    GuardedToolOutput,
    active_run_id,
    guard_tool,
    guard_tools,
    instrument,
)

Call = tuple[str, dict[str, Any]]
Turns = Callable[[Sequence[Sequence[Call]]], MockFunctionCallingLLM]
Scripted = Callable[[Sequence[Call]], MockFunctionCallingLLM]


async def run_agent(agent: Any, msg: str = "go") -> tuple[Any, list[ToolCallResult]]:
    handler = agent.run(user_msg=msg)
    results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    await handler
    return handler, results


def codes(results: Sequence[ToolCallResult]) -> list[str | None]:
    outs = [r.tool_output for r in results]
    assert all(isinstance(o, GuardedToolOutput) for o in outs)
    return [o.code for o in outs if isinstance(o, GuardedToolOutput)]


# -- validation before keying --------------------------------------------------------------
async def test_coerced_equal_arguments_run_once_in_an_agent_loop(
    guard: Guard, scripted_turns: Turns
) -> None:
    charges: list[tuple[str, Any, list[str]]] = []

    def charge(
        order_id: str,
        amount: float,
        tags: list[str] = Field(default_factory=list),  # noqa: B008 - LlamaIndex's FieldInfo default
    ) -> str:
        """Charge an order."""
        charges.append((order_id, amount, tags))
        return f"charged {amount!r}"

    # The model sends the amount as a string, then as a number, then with the defaulted
    # list spelled out: one call after fn_schema validation, so one charge.
    llm = scripted_turns(
        [
            [("charge", {"order_id": "o-1", "amount": "25.00"})],
            [("charge", {"order_id": "o-1", "amount": 25.0})],
            [("charge", {"order_id": "o-1", "amount": 25, "tags": []})],
        ]
    )
    handler, results = await run_agent(FunctionAgent(tools=guard_tools([charge], guard), llm=llm))
    assert charges == [("o-1", 25.0, [])]
    assert type(charges[0][1]) is float  # the tool gets the validated value, not "25.00"
    assert codes(results) == ["executed", "replayed", "replayed"]
    assert [r.tool_output.content for r in results] == ["charged 25.0"] * 3
    assert str(await handler) == " | ".join(["charged 25.0"] * 3)


async def test_schema_violation_is_invalid_arguments_and_runs_nothing(
    guard: Guard, scripted: Scripted
) -> None:
    ran: list[str] = []

    class Refund(BaseModel):
        order_id: str
        amount: float = Field(gt=0)

    def refund(order_id: str, amount: float) -> str:
        """Refund an order."""
        ran.append(order_id)
        return "refunded"

    tool = FunctionTool.from_defaults(refund, fn_schema=Refund)
    calls = [("refund", {"order_id": "o-1"}), ("refund", {"order_id": "o-1", "amount": -5})]
    agent = FunctionAgent(tools=guard_tools([tool], guard), llm=scripted(calls))
    _, results = await run_agent(agent)
    assert ran == [] and codes(results) == ["invalid_arguments"] * 2
    missing, negative = (r.tool_output for r in results)
    assert missing.is_error and missing.raw_output["reason"] == "validation"
    assert missing.content == (
        "Invalid arguments: refund was not run because amount: Field required; correct the "
        "arguments and call it again."
    )
    assert "greater than 0" in negative.content


# -- the active run ------------------------------------------------------------------------
async def test_concurrent_runs_each_carry_their_own_run_id(
    guard: Guard, scripted: Scripted
) -> None:
    seen: list[tuple[str | None, str | None]] = []

    async def pay(order_id: str) -> str:
        """Take a payment."""
        await asyncio.sleep(0.05)  # both runs are inside their tool calls at once
        ctx = current_call()
        assert ctx is not None
        seen.append((ctx.run_id, active_run_id()))
        return f"paid {order_id}"

    tools = guard_tools([pay], guard)
    same = ("pay", {"order_id": "o-1"})

    async def one() -> tuple[str, list[ToolCallResult]]:
        # No guard.workflow, no guard.run: the scope and the run id are this run's own.
        handler, results = await run_agent(FunctionAgent(tools=tools, llm=scripted([same, same])))
        return handler.run_id, results

    (a, ra), (b, rb) = await asyncio.gather(one(), one())
    assert a != b
    # One execution per run (the run is the default scope), each tagged with its run.
    assert sorted(seen) == sorted([(a, a), (b, b)])
    for rid, results in ((a, ra), (b, rb)):
        assert sorted(codes(results)) == ["executed", "replayed"]
        assert {r.tool_output.classification["run_id"] for r in results} == {rid}
        timeline = guard.gov.get_run_timeline(rid)
        assert {e.run_id for e in timeline} == {rid}
        kinds = [e.type for e in timeline if e.tool == "pay"]
        assert (kinds.count("tool_result"), kinds.count("dedup")) == (1, 1)


class NoGovernance(Guard):
    """A ledger without governance (as Redis is): ``guard.gov`` refuses."""

    @property
    def gov(self) -> Any:
        raise ConfigError("governance is not available on this ledger")


async def test_a_ledger_without_timelines_still_runs_inside_a_run(scripted: Scripted) -> None:
    guard = NoGovernance("memory://", quiet=True)

    def pay(order_id: str) -> str:
        """Take a payment."""
        return f"paid {order_id}"

    call = ("pay", {"order_id": "o-1"})
    _, results = await run_agent(
        FunctionAgent(tools=guard_tools([pay], guard), llm=scripted([call, call]))
    )
    assert sorted(codes(results)) == ["executed", "replayed"]  # deduplicated in the run's scope
    assert {r.tool_output.classification["run_id"] for r in results} == {None}


async def test_concurrent_instrument_blocks_never_mix_their_spans(
    guard: Guard, scripted: Scripted
) -> None:
    async def weather(city: str) -> str:
        """Read the weather."""
        await asyncio.sleep(0.05)
        return f"sunny in {city}"

    async def one(run: str | None) -> str:
        agent = FunctionAgent(
            tools=[FunctionTool.from_defaults(async_fn=weather)],
            llm=scripted([("weather", {"city": "Oslo"})]),
        )
        with instrument(guard, run_id=run) as spans:
            handler, _ = await run_agent(agent)
            spans.flush()
        return run or handler.run_id

    # Two explicit timelines, and two taken from each span's own LlamaIndex run.
    runs = await asyncio.gather(one("run-a"), one("run-b"), one(None), one(None))
    assert len(set(runs)) == 4
    for rid in runs:
        recorded = [e for e in guard.gov.get_run_timeline(rid) if e.type == EVENT_TYPE]
        assert [(e.tool, e.status) for e in recorded] == [("weather", "ok")], rid


class Collect(BaseEventHandler):
    events: list[BaseEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "Collect"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, GuardDecisionEvent):
            self.events.append(event)


async def test_one_instrumentation_event_per_decision(guard: Guard, scripted_turns: Turns) -> None:
    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["wipe"]))

    def pay(order_id: str) -> str:
        """Take a payment."""
        return f"paid {order_id}"

    def wipe(disk: str) -> str:
        """Never allowed."""
        raise AssertionError("a blocked tool must not run")

    llm = scripted_turns(
        [
            [("pay", {"order_id": "o-1"})],
            [("pay", {"order_id": "o-1"}), ("wipe", {"disk": "/"}), ("pay", {})],
        ]
    )
    agent = FunctionAgent(tools=guard_tools([pay, wipe], guard, agent_id="bot"), llm=llm)
    collect = Collect()
    root = get_dispatcher()
    root.add_event_handler(collect)
    try:
        handler, results = await run_agent(agent)
    finally:
        root.event_handlers.remove(collect)
    events = [e for e in collect.events if isinstance(e, GuardDecisionEvent)]
    assert sorted(e.code for e in events) == sorted(codes(results))
    assert sorted(e.code for e in events) == [
        "blocked",
        "executed",
        "invalid_arguments",
        "replayed",
    ]
    for e in events:
        # On the guarded tool's own span, tagged with its run, in LlamaIndex's format.
        assert e.span_id is not None and e.span_id.startswith("GuardedFunctionTool.acall-")
        assert e.tags["llamaindex.run_id"] == handler.run_id
        assert e.classification["code"] == e.code and e.agent_id in ("bot", None)
        assert e.model_dump()["class_name"] == "OnceOnlyGuardDecision"
    blocked = next(e for e in events if e.code == "blocked")
    assert (blocked.tool, blocked.reason, blocked.ran) == ("wipe", "tool_blocked", False)


# -- scopes --------------------------------------------------------------------------------
def test_explicit_scope_wins_and_an_unscoped_call_warns_once(
    guard: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    def send(to: str) -> str:
        ran.append(to)
        return f"sent to {to}"

    conv = {"id": "conv-1"}
    scoped = guard_tool(send, guard, scope=lambda: conv["id"])
    with guard.workflow("a"):
        assert scoped.call(to="x").code == "executed"
    with guard.workflow("b"):
        assert scoped.call(to="x").code == "replayed"
    conv["id"] = "conv-2"
    assert scoped.call(to="x").code == "executed"
    assert ran == ["x", "x"]

    bare = guard_tool(send, guard)
    with caplog.at_level(logging.WARNING, logger="onceonly"):
        bare.call(to="y")
        bare.call(to="z")
    warnings = [r for r in caplog.records if "ran without a scope" in r.getMessage()]
    assert len(warnings) == 1


async def test_inside_a_run_the_run_is_the_default_scope(guard: Guard, scripted: Scripted) -> None:
    ran: list[str] = []

    def send(to: str) -> str:
        """Send a message."""
        ran.append(to)
        return "sent"

    tools = guard_tools([send], guard)
    msg = ("send", {"to": "ann"})
    for _ in range(2):  # two runs: two scopes
        await run_agent(FunctionAgent(tools=tools, llm=scripted([msg, msg])))
    assert ran == ["ann", "ann"]
    with guard.workflow("conversation-7"):  # the user's scope wins over the run
        for _ in range(2):
            await run_agent(FunctionAgent(tools=tools, llm=scripted([msg])))
    assert ran == ["ann", "ann", "ann"]


async def test_read_only_tools_run_every_time(guard: Guard, scripted_turns: Turns) -> None:
    reads: list[str] = []

    def balance(account: str) -> str:
        """Read a balance."""
        reads.append(account)
        return f"{len(reads)} EUR"

    tools = guard_tools([balance], guard, tool_options={"balance": {"read_only": True}})
    call = ("balance", {"account": "acc-1"})
    _, results = await run_agent(FunctionAgent(tools=tools, llm=scripted_turns([[call], [call]])))
    assert reads == ["acc-1", "acc-1"]
    assert codes(results) == ["executed", "executed"]
    assert [r.tool_output.content for r in results] == ["1 EUR", "2 EUR"]


# -- outcomes LlamaIndex used to get wrong -------------------------------------------------
async def test_unrecorded_completion_is_executed_not_an_error(
    guard: Guard, scripted: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    charges: list[str] = []

    def charge(order_id: str) -> dict[str, str]:
        """Charge an order."""
        charges.append(order_id)
        return {"charge_id": "ch_1"}

    def lost(*a: Any, **k: Any) -> Any:
        raise StoreError("server closed the connection")

    monkeypatch.setattr("onceonly_core.protocol.FINISH_RETRIES", (0.01,))
    monkeypatch.setattr(guard.store, "finish", lost)
    tools = guard_tools([charge], guard)
    _, results = await run_agent(
        FunctionAgent(tools=tools, llm=scripted([("charge", {"order_id": "o-1"})]))
    )
    out = results[0].tool_output
    assert charges == ["o-1"]
    assert isinstance(out, GuardedToolOutput) and not out.is_error
    assert (out.code, out.classification["reason"]) == ("executed", "completion_not_recorded")
    assert out.raw_output == {"charge_id": "ch_1"}  # the tool's value: it ran
    assert out.content == (
        "Done: charge ran, but its record may not have been saved; do not call it again with "
        'these arguments; its result: {"charge_id": "ch_1"}'
    )


async def test_a_human_in_the_loop_pause_passes_through(guard: Guard, scripted: Scripted) -> None:
    charges: list[float] = []

    async def charge(ctx: Context, amount: float) -> str:
        """Charge after a human confirms."""
        answer = await ctx.wait_for_event(
            HumanResponseEvent,
            waiter_id="confirm",
            waiter_event=InputRequiredEvent(prefix=f"charge {amount}?"),
        )
        if answer.response != "yes":
            return "cancelled"
        charges.append(amount)
        return f"charged {amount}"

    tools = guard_tools([FunctionTool.from_defaults(async_fn=charge)], guard)
    agent = FunctionAgent(tools=tools, llm=scripted([("charge", {"amount": 5})]))
    with guard.workflow("order-1"):
        handler = agent.run(user_msg="charge 5")
        results = []
        async for ev in handler.stream_events():
            if isinstance(ev, InputRequiredEvent):
                handler.ctx.send_event(HumanResponseEvent(response="yes"))
            elif isinstance(ev, ToolCallResult):
                results.append(ev)
        await handler
    # The pause (WaitingForEvent) was not answered as a failure: the step resumed and
    # the tool ran once, with the human's answer.
    assert charges == [5.0]
    assert codes(results) == ["executed"] and results[0].tool_output.content == "charged 5.0"


def test_a_pydantic_model_class_is_not_a_tool(guard: Guard) -> None:
    class Order(BaseModel):
        order_id: str

    with pytest.raises(ConfigError, match="pydantic model class"):
        guard_tool(Order, guard)


# -- per-request tools ---------------------------------------------------------------------
class Blob:
    def __init__(self) -> None:
        self.data = bytes(100_000)


def test_per_request_tools_are_not_kept_alive() -> None:
    """3,000 per-request tools, each holding 100 kB (a client, a session): after their
    requests, memory is back near where it started and every tool is gone."""
    guard = Guard("memory://", quiet=True)
    meta = FunctionTool.from_defaults(lambda order_id: "", name="lookup").metadata

    def request(i: int) -> tuple[weakref.ref[Any], weakref.ref[Blob]]:
        blob = Blob()

        def lookup(order_id: str) -> str:
            return f"{order_id}:{len(blob.data)}"

        tool = guard_tool(FunctionTool(lookup, metadata=meta), guard, scope=f"req-{i}")
        assert tool.call(order_id="o").content == "o:100000"
        return weakref.ref(tool), weakref.ref(blob)

    for i in range(20):  # warm caches (option specs, the codec, the store)
        request(-i - 1)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        refs = [request(i) for i in range(3000)]
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert all(t() is None and b() is None for t, b in refs)
    # Kept alive, the blobs alone would be 300 MB; what stays is the ledger's records.
    assert grown < 30_000_000, grown
    guard.close()
