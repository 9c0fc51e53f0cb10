"""OnceOnlyMiddleware on real create_agent graphs, sync and async, on a SQLite ledger."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Annotated, Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import StructuredTool, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.prebuilt import InjectedState
from pydantic import BaseModel, Field, field_validator

from onceonly_core import Guard
from onceonly_core.governance.models import Policy
from onceonly_langchain import OnceOnlyMiddleware
from onceonly_langchain.testing import ScriptedChatModel, tool_call


class SimulatedCrash(BaseException):
    """The process dying mid-step (a BaseException, like KeyboardInterrupt, but one asyncio
    lets a task carry instead of tearing down the loop)."""


class World:
    """The side effects, counted."""

    def __init__(self) -> None:
        self.charges: list[tuple[str, float]] = []
        self.emails: list[str] = []
        self.deleted: list[str] = []

    def tools(self) -> list[Any]:
        world = self

        @tool
        def charge_card(customer: str, amount_usd: float) -> dict[str, Any]:
            """Charge a customer's card."""
            world.charges.append((customer, amount_usd))
            return {"charge_id": f"ch_{len(world.charges)}", "amount": amount_usd}

        @tool
        def send_email(to: str, subject: str, body: str = "") -> str:
            """Send an email."""
            world.emails.append(to)
            return f"sent #{len(world.emails)} to {to}"

        @tool
        def delete_user(user: str) -> str:
            """Delete a user."""
            world.deleted.append(user)
            return "deleted"

        return [charge_card, send_email, delete_user]


def tool_messages(out: dict[str, Any]) -> dict[str, ToolMessage]:
    return {m.tool_call_id: m for m in out["messages"] if isinstance(m, ToolMessage)}


def agent_for(guard: Guard, world: World, script: list[Any], **mw: Any) -> Any:
    model = ScriptedChatModel(script=script)
    return create_agent(
        model,
        world.tools(),
        middleware=[OnceOnlyMiddleware(guard, **mw)],
        checkpointer=InMemorySaver(),
    )


CFG = {"configurable": {"thread_id": "order-42"}}


def test_a_retried_call_runs_once_and_the_replay_answers_the_current_call_id(
    guard: Guard, invoke: Any, transcript_ok: Any
) -> None:
    world = World()
    script = [
        AIMessage(
            "", tool_calls=[tool_call("charge_card", "c1", customer="cus_42", amount_usd=99.99)]
        ),
        # The model re-plans and charges again (a new call id, same call).
        AIMessage(
            "", tool_calls=[tool_call("charge_card", "c2", customer="cus_42", amount_usd=99.99)]
        ),
        # A different amount is a different call.
        AIMessage(
            "", tool_calls=[tool_call("charge_card", "c3", customer="cus_42", amount_usd=99.98)]
        ),
    ]
    out = invoke(agent_for(guard, world, script), {"messages": [("user", "charge")]}, CFG)
    assert world.charges == [("cus_42", 99.99), ("cus_42", 99.98)]
    msgs = tool_messages(out)
    assert msgs["c1"].content == msgs["c2"].content  # the stored result, replayed
    assert msgs["c2"].tool_call_id == "c2" and msgs["c2"].name == "charge_card"
    assert msgs["c1"].response_metadata["onceonly"]["decision"] == "executed"
    assert msgs["c2"].response_metadata["onceonly"]["decision"] == "dedup"
    assert msgs["c3"].response_metadata["onceonly"]["decision"] == "executed"
    assert msgs["c2"].status == "success"
    transcript_ok(out["messages"])


def test_parallel_calls_get_one_message_each(guard: Guard, invoke: Any, transcript_ok: Any) -> None:
    world = World()
    calls = [
        tool_call("charge_card", "p1", customer="a", amount_usd=1.0),
        tool_call("charge_card", "p2", customer="a", amount_usd=1.0),  # a duplicate in the batch
        tool_call("send_email", "p3", to="a@x", subject="hi"),
        tool_call("delete_user", "p4", user="a"),
        tool_call("charge_card", "p5", customer="b", amount_usd=1.0),
    ]
    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["delete_*"]))
    out = invoke(
        agent_for(guard, world, [AIMessage("", tool_calls=calls)], agent_id="bot"),
        {"messages": [("user", "go")]},
        CFG,
    )
    transcript_ok(out["messages"])
    assert sorted(world.charges) == [("a", 1.0), ("b", 1.0)]
    assert world.emails == ["a@x"] and world.deleted == []
    msgs = tool_messages(out)
    assert msgs["p1"].content == msgs["p2"].content
    assert {
        msgs["p1"].response_metadata["onceonly"]["decision"],
        msgs["p2"].response_metadata["onceonly"]["decision"],
    } == {"executed", "dedup"}
    assert msgs["p4"].status == "error" and "tool_blocked" in str(msgs["p4"].content)


def test_blocked_and_pending_calls_never_run_and_tell_the_model_why(
    guard: Guard, invoke: Any, transcript_ok: Any
) -> None:
    world = World()
    guard.gov.upsert_policy(
        Policy(agent_id="bot", blocked_tools=["delete_*"], require_approval=["charge_card"])
    )
    script = [
        AIMessage(
            "",
            tool_calls=[
                tool_call("delete_user", "d1", user="u1"),
                tool_call("charge_card", "a1", customer="c", amount_usd=5.0),
            ],
        ),
    ]
    out = invoke(
        agent_for(guard, world, script, agent_id="bot"), {"messages": [("user", "x")]}, CFG
    )
    msgs = tool_messages(out)
    assert world.deleted == [] and world.charges == []
    assert msgs["d1"].status == "error"
    assert msgs["d1"].content == (
        "Not allowed: delete_user was blocked by policy (tool_blocked); do not retry this "
        "call; tell the user or do something else."
    )
    assert msgs["d1"].artifact == msgs["d1"].response_metadata["onceonly"]
    assert msgs["d1"].artifact["code"] == "blocked"
    assert msgs["a1"].status == "error" and "approval" in str(msgs["a1"].content)
    assert msgs["a1"].response_metadata["onceonly"]["code"] == "pending_approval"
    assert msgs["a1"].response_metadata["onceonly"]["approval_id"] in str(msgs["a1"].content)
    transcript_ok(out["messages"])
    # Approved, the same call (same thread, same arguments, a new call id) runs once.
    (approval,) = guard.gov.list_approvals()
    guard.gov.approve(approval.id)
    world2_script = [
        AIMessage("", tool_calls=[tool_call("charge_card", "a2", customer="c", amount_usd=5.0)])
    ]
    out = invoke(
        agent_for(guard, world, world2_script, agent_id="bot"), {"messages": [("user", "x")]}, CFG
    )
    assert world.charges == [("c", 5.0)]
    assert tool_messages(out)["a2"].status == "success"


def test_a_disabled_agent_stops_before_asking_the_model(guard: Guard, invoke: Any) -> None:
    world = World()
    guard.gov.disable_agent("bot", "incident 7")
    script = [
        AIMessage("", tool_calls=[tool_call("charge_card", "k1", customer="c", amount_usd=5.0)])
    ]
    model = ScriptedChatModel(script=script)
    agent = create_agent(
        model, world.tools(), middleware=[OnceOnlyMiddleware(guard, agent_id="bot")]
    )
    out = invoke(agent, {"messages": [("user", "x")]}, CFG)
    assert model.calls == 0 and world.charges == []  # no tokens spent, no tool run
    last = out["messages"][-1]
    assert (
        isinstance(last, AIMessage)
        and last.content == "Stopped: agent bot is disabled (incident 7)."
    )
    assert last.response_metadata["onceonly"]["reason"] == "agent_disabled"
    guard.gov.enable_agent("bot")
    out = invoke(agent, {"messages": [("user", "x")]}, {"configurable": {"thread_id": "t-2"}})
    assert model.calls == 2 and len(world.charges) == 1


def test_the_kill_switch_mid_run_blocks_the_call_and_ends_the_loop(
    guard: Guard, invoke: Any, transcript_ok: Any
) -> None:
    """Disabled while the model's turn is in flight: its tool call is refused, and the model
    is not asked again (without the before_model stop it would be, for as long as it tried)."""
    world = World()

    def disable_then_call(messages: list[Any]) -> AIMessage:
        guard.gov.disable_all("ops: stop everything")  # the operator hits the switch now
        return AIMessage(
            "", tool_calls=[tool_call("charge_card", "k1", customer="c", amount_usd=5.0)]
        )

    model = ScriptedChatModel(script=[disable_then_call, disable_then_call])
    agent = create_agent(
        model, world.tools(), middleware=[OnceOnlyMiddleware(guard, agent_id="bot")]
    )
    out = invoke(agent, {"messages": [("user", "x")]}, CFG)
    msg = tool_messages(out)["k1"]
    assert world.charges == [] and msg.status == "error"
    assert msg.response_metadata["onceonly"]["reason"] == "agent_disabled"
    assert "stop calling tools" in str(msg.content)
    assert model.calls == 1  # the loop ended instead of asking the model again
    assert "disabled" in str(out["messages"][-1].content)
    transcript_ok(out["messages"])


class CrashAfterTool(AgentMiddleware):  # type: ignore[type-arg]
    """Outermost: the tool ran and was recorded, then the process 'dies' before LangGraph
    writes the checkpoint (first time only)."""

    def __init__(self) -> None:
        super().__init__()
        self.crashed = False

    def wrap_tool_call(self, request: Any, handler: Any) -> Any:
        out = handler(request)
        if not self.crashed:
            self.crashed = True
            raise SimulatedCrash("after the side effect")
        return out

    async def awrap_tool_call(self, request: Any, handler: Any) -> Any:
        out = await handler(request)
        if not self.crashed:
            self.crashed = True
            raise SimulatedCrash("after the side effect")
        return out


def test_checkpoint_resume_does_not_rerun_a_completed_side_effect(
    guard: Guard, invoke: Any, transcript_ok: Any
) -> None:
    world = World()
    model = ScriptedChatModel(
        script=[
            AIMessage("", tool_calls=[tool_call("charge_card", "r1", customer="c", amount_usd=7.5)])
        ]
    )
    saver = InMemorySaver()
    agent = create_agent(
        model,
        world.tools(),
        middleware=[CrashAfterTool(), OnceOnlyMiddleware(guard)],
        checkpointer=saver,
    )
    with pytest.raises(SimulatedCrash):
        invoke(agent, {"messages": [("user", "charge")]}, CFG)
    assert world.charges == [("c", 7.5)]
    # The checkpoint has the model's call but no result: resuming re-runs the tool node.
    state = agent.get_state(CFG)
    assert not any(isinstance(m, ToolMessage) for m in state.values["messages"])
    out = invoke(agent, None, CFG)
    assert world.charges == [("c", 7.5)]  # replayed, not charged again
    msg = tool_messages(out)["r1"]
    assert msg.response_metadata["onceonly"]["decision"] == "dedup"
    assert msg.content == tool_messages(out)["r1"].content and "ch_1" in str(msg.content)
    transcript_ok(out["messages"])


def test_without_the_guard_the_resume_charges_twice(invoke: Any) -> None:
    """The control: the same crash and resume, no middleware — proves the test above can fail."""
    world = World()
    model = ScriptedChatModel(
        script=[
            AIMessage("", tool_calls=[tool_call("charge_card", "r1", customer="c", amount_usd=7.5)])
        ]
    )
    agent = create_agent(
        model, world.tools(), middleware=[CrashAfterTool()], checkpointer=InMemorySaver()
    )
    with pytest.raises(SimulatedCrash):
        invoke(agent, {"messages": [("user", "charge")]}, CFG)
    invoke(agent, None, CFG)
    assert len(world.charges) == 2


def test_threads_are_separate_scopes_and_key_args_absorb_rewording(
    guard: Guard, invoke: Any
) -> None:
    world = World()

    def script() -> list[Any]:
        return [
            AIMessage(
                "", tool_calls=[tool_call("send_email", "e1", to="a@x", subject="Your order")]
            ),
            AIMessage(
                "", tool_calls=[tool_call("send_email", "e2", to="a@x", subject="Re: your order!")]
            ),
        ]

    mw = {"tool_options": {"send_email": {"key_args": ["to"]}}}
    invoke(agent_for(guard, world, script(), **mw), {"messages": [("user", "x")]}, CFG)
    assert world.emails == ["a@x"]  # the re-worded retry was the same call
    other = {"configurable": {"thread_id": "order-43"}}
    invoke(agent_for(guard, world, script(), **mw), {"messages": [("user", "x")]}, other)
    assert world.emails == ["a@x", "a@x"]  # another conversation is another call


def test_a_failing_tool_is_answered_and_not_replayed(
    guard: Guard, invoke: Any, transcript_ok: Any
) -> None:
    attempts: list[int] = []

    @tool
    def flaky(n: int) -> str:
        """Fails the first time."""
        attempts.append(n)
        if len(attempts) == 1:
            raise ValueError("gateway timeout")
        return "ok"

    model = ScriptedChatModel(
        script=[
            AIMessage("", tool_calls=[tool_call("flaky", "f1", n=1)]),
            AIMessage("", tool_calls=[tool_call("flaky", "f2", n=1)]),
            AIMessage("", tool_calls=[tool_call("flaky", "f3", n=1)]),
        ]
    )
    agent = create_agent(
        model, [flaky], middleware=[OnceOnlyMiddleware(guard)], checkpointer=InMemorySaver()
    )
    out = invoke(agent, {"messages": [("user", "x")]}, CFG)
    msgs = tool_messages(out)
    # The failure is the model's to read (not a crash of the run), and is not a result:
    # the same call runs again, then it is done.
    assert msgs["f1"].status == "error"
    assert msgs["f1"].content == (
        "Failed: flaky raised ValueError: gateway timeout; no result was recorded, so you "
        "may correct the arguments and call it again, or tell the user."
    )
    assert msgs["f1"].response_metadata["onceonly"]["code"] == "failed"
    assert (msgs["f2"].content, msgs["f2"].response_metadata["onceonly"]["code"]) == (
        "ok",
        "executed",
    )
    assert (msgs["f3"].content, msgs["f3"].response_metadata["onceonly"]["code"]) == (
        "ok",
        "replayed",
    )
    assert attempts == [1, 1]
    transcript_ok(out["messages"])


def test_the_frameworks_own_error_message_is_kept_and_not_replayed(
    guard: Guard, invoke: Any
) -> None:
    """A ToolNode that handles the tool's error answers with its own message: that message
    is the answer (the framework's rendering of the tool's output), and it is a failure."""
    attempts: list[int] = []

    @tool
    def strict(n: int) -> str:
        """Raises a ToolException, which the tool itself turns into a message."""
        from langchain_core.tools import ToolException

        attempts.append(n)
        raise ToolException(f"no such record {n}")

    strict.handle_tool_error = True
    model = ScriptedChatModel(
        script=[
            AIMessage("", tool_calls=[tool_call("strict", "s1", n=4)]),
            AIMessage("", tool_calls=[tool_call("strict", "s2", n=4)]),
        ]
    )
    agent = create_agent(model, [strict], middleware=[OnceOnlyMiddleware(guard)])
    out = invoke(agent, {"messages": [("user", "x")]}, CFG)
    msgs = tool_messages(out)
    assert msgs["s1"].content == msgs["s2"].content == "no such record 4"
    assert msgs["s1"].status == "error"
    assert msgs["s1"].response_metadata["onceonly"]["code"] == "failed"
    assert attempts == [4, 4]  # a failure is not replayed


def test_an_unavailable_ledger_is_an_error_message_not_a_missing_one(
    tmp_path: Any, invoke: Any, transcript_ok: Any
) -> None:
    world = World()
    (tmp_path / "broken.db").write_bytes(b"not a database" * 100)  # StoreError on every use
    bad = Guard(f"sqlite:///{tmp_path}/broken.db", quiet=True)
    script = [
        AIMessage("", tool_calls=[tool_call("charge_card", "s1", customer="c", amount_usd=1.0)])
    ]
    out = invoke(agent_for(bad, world, script), {"messages": [("user", "x")]}, CFG)
    msg = tool_messages(out)["s1"]
    assert world.charges == [] and msg.status == "error" and "did not run" in str(msg.content)
    transcript_ok(out["messages"])


# -- validated arguments -------------------------------------------------------------------
class Payment(BaseModel):
    customer: str
    amount: float
    currency: str = "usd"
    tags: list[str] = Field(default_factory=list)


def payments(effects: list[dict[str, Any]]) -> Any:
    @tool(args_schema=Payment)
    def pay(customer: str, amount: float, currency: str, tags: list[str]) -> str:
        """Charge a customer."""
        effects.append({"customer": customer, "amount": amount, "currency": currency})
        return f"paid {amount} {currency} for {customer}"

    return pay


def test_coerced_equal_arguments_run_the_tool_once(
    guard: Guard, invoke: Any, transcript_ok: Any
) -> None:
    """The model sends 1.5, then "1.5", then leaves out the defaults it gave before: after
    the schema (coercion, default, default_factory) these are one call, one charge."""
    effects: list[dict[str, Any]] = []
    script = [
        AIMessage("", tool_calls=[tool_call("pay", "p1", customer="c1", amount=1.5)]),
        AIMessage("", tool_calls=[tool_call("pay", "p2", customer="c1", amount="1.5")]),
        AIMessage(
            "",
            tool_calls=[tool_call("pay", "p3", customer="c1", amount=1.5, currency="usd", tags=[])],
        ),
    ]
    agent = create_agent(
        ScriptedChatModel(script=script),
        [payments(effects)],
        middleware=[OnceOnlyMiddleware(guard)],
    )
    out = invoke(agent, {"messages": [("user", "pay")]}, CFG)
    msgs = tool_messages(out)
    codes = [msgs[i].response_metadata["onceonly"]["code"] for i in ("p1", "p2", "p3")]
    assert codes == ["executed", "replayed", "replayed"]
    assert {m.content for m in msgs.values()} == {"paid 1.5 usd for c1"}
    assert effects == [{"customer": "c1", "amount": 1.5, "currency": "usd"}]
    transcript_ok(out["messages"])


def test_arguments_the_schema_rejects_never_reach_the_tool(guard: Guard, invoke: Any) -> None:
    effects: list[dict[str, Any]] = []
    script = [AIMessage("", tool_calls=[tool_call("pay", "v1", customer="c1")])]
    agent = create_agent(
        ScriptedChatModel(script=script),
        [payments(effects)],
        middleware=[OnceOnlyMiddleware(guard)],
    )
    msg = tool_messages(invoke(agent, {"messages": [("user", "pay")]}, CFG))["v1"]
    assert effects == [] and msg.status == "error"
    assert msg.content == (
        "Invalid arguments: pay was not run because amount: Field required; correct the "
        "arguments and call it again."
    )
    assert msg.artifact["reason"] == "validation"


def test_a_tool_the_agent_does_not_have_is_answered(guard: Guard, invoke: Any) -> None:
    script = [AIMessage("", tool_calls=[tool_call("launch_rocket", "u1", when="now")])]
    agent = create_agent(
        ScriptedChatModel(script=script), World().tools(), middleware=[OnceOnlyMiddleware(guard)]
    )
    msg = tool_messages(invoke(agent, {"messages": [("user", "go")]}, CFG))["u1"]
    assert msg.status == "error" and msg.artifact["reason"] == "tool_not_found"
    assert msg.content.startswith("Not allowed: there is no tool named launch_rocket")


def test_a_malformed_tool_call_is_answered_in_the_contracts_words(
    guard: Guard, invoke: Any, transcript_ok: Any
) -> None:
    """Arguments that are not JSON: LangChain keeps them as an invalid tool call, which the
    model's API still needs answered; the middleware answers it."""
    bad = {"name": "pay", "args": '{"customer": "c1", "amount": ', "id": "j1", "error": "x"}
    script = [AIMessage("", invalid_tool_calls=[{**bad, "type": "invalid_tool_call"}])]
    agent = create_agent(
        ScriptedChatModel(script=script), [payments([])], middleware=[OnceOnlyMiddleware(guard)]
    )
    out = invoke(agent, {"messages": [("user", "pay")]}, CFG)
    msg = tool_messages(out)["j1"]
    assert msg.status == "error" and msg.artifact["reason"] == "invalid_json"
    assert msg.content == (
        "Invalid arguments: pay was not run because its arguments are not valid JSON "
        "(Expecting value at line 1 column 30); correct the arguments and call it again."
    )


def test_read_only_tools_run_every_time_and_are_still_governed(guard: Guard, invoke: Any) -> None:
    lookups: list[str] = []

    @tool
    def lookup(q: str) -> str:
        """Read something."""
        lookups.append(q)
        return f"{q}: {len(lookups)}"

    guard.gov.upsert_policy(Policy(agent_id="bot"))
    script = [AIMessage("", tool_calls=[tool_call("lookup", f"r{i}", q="x")]) for i in range(2)]
    agent = create_agent(
        ScriptedChatModel(script=script),
        [lookup],
        middleware=[
            OnceOnlyMiddleware(guard, agent_id="bot", tool_options={"lookup": {"read_only": True}})
        ],
    )
    out = invoke(agent, {"messages": [("user", "x")]}, CFG)
    msgs = tool_messages(out)
    assert lookups == ["x", "x"] and (msgs["r0"].content, msgs["r1"].content) == ("x: 1", "x: 2")
    assert [a.decision for a in guard.gov.agent_logs("bot")] == ["executed", "executed"]


# -- scope ---------------------------------------------------------------------------------
def test_the_thread_is_the_scope_and_without_one_the_core_warns_once(
    guard: Guard, invoke: Any, caplog: pytest.LogCaptureFixture
) -> None:
    world = World()
    call = tool_call("send_email", "e1", to="a@x", subject="hi")
    agent = create_agent(
        ScriptedChatModel(script=[AIMessage("", tool_calls=[call])]),
        world.tools(),
        middleware=[OnceOnlyMiddleware(guard)],
    )
    with caplog.at_level(logging.WARNING, logger="onceonly"):
        invoke(agent, {"messages": [("user", "x")]}, CFG)
        invoke(agent, {"messages": [("user", "x")]}, {"configurable": {"thread_id": "t-9"}})
        assert world.emails == ["a@x", "a@x"]  # two threads, two conversations
        assert not caplog.records
        invoke(agent, {"messages": [("user", "x")]})  # no thread, no scope=
        invoke(agent, {"messages": [("user", "x")]})
    assert world.emails == ["a@x"] * 3  # unscoped: one call forever, and said so, once
    (record,) = caplog.records
    assert "without a scope" in record.getMessage()


def test_an_explicit_scope_wins_over_the_thread(guard: Guard, invoke: Any) -> None:
    world = World()
    call = tool_call("send_email", "e1", to="a@x", subject="hi")
    agent = create_agent(
        ScriptedChatModel(script=[AIMessage("", tool_calls=[call])]),
        world.tools(),
        middleware=[OnceOnlyMiddleware(guard, scope=lambda cfg: "customer-7")],
    )
    invoke(agent, {"messages": [("user", "x")]}, CFG)
    invoke(agent, {"messages": [("user", "x")]}, {"configurable": {"thread_id": "t-9"}})
    assert world.emails == ["a@x"]


# -- two instances, BaseTools in tools= ------------------------------------------------------
def test_two_middleware_instances_govern_their_own_tools(
    guard: Guard, invoke: Any, transcript_ok: Any
) -> None:
    """One agent, two policies: billing tools under one agent id, the rest under another.
    tools= takes the BaseTools themselves; the names differ, so create_agent takes both."""
    world = World()
    charge_card, send_email, delete_user = world.tools()
    guard.gov.upsert_policy(Policy(agent_id="billing", max_spend_usd_per_day=100.0))
    guard.gov.upsert_policy(Policy(agent_id="support", blocked_tools=["delete_*"]))
    billing = OnceOnlyMiddleware(guard, agent_id="billing", tools=[charge_card])
    support = OnceOnlyMiddleware(guard, agent_id="support", tools=[send_email, delete_user])
    assert billing.name != support.name and "billing" in billing.name
    calls = [
        tool_call("charge_card", "t1", customer="c", amount_usd=2.0),
        tool_call("send_email", "t2", to="a@x", subject="receipt"),
        tool_call("delete_user", "t3", user="u"),
    ]
    agent = create_agent(
        ScriptedChatModel(script=[AIMessage("", tool_calls=calls)]),
        [charge_card, send_email, delete_user],
        middleware=[billing, support],
    )
    out = invoke(agent, {"messages": [("user", "x")]}, CFG)
    msgs = tool_messages(out)
    assert world.charges == [("c", 2.0)] and world.emails == ["a@x"] and world.deleted == []
    assert msgs["t3"].response_metadata["onceonly"]["agent_id"] == "support"
    assert [(a.tool, a.decision) for a in guard.gov.agent_logs("billing")] == [
        ("charge_card", "executed")
    ]
    assert sorted((a.tool, a.decision) for a in guard.gov.agent_logs("support")) == [
        ("delete_user", "blocked"),
        ("send_email", "executed"),
    ]
    transcript_ok(out["messages"])


def test_one_default_name_is_refused_twice_and_name_tells_them_apart(guard: Guard) -> None:
    with pytest.raises(AssertionError, match="duplicate middleware"):
        create_agent(
            ScriptedChatModel(script=[]),
            [],
            middleware=[OnceOnlyMiddleware(guard), OnceOnlyMiddleware(guard)],
        )
    create_agent(
        ScriptedChatModel(script=[]),
        [],
        middleware=[OnceOnlyMiddleware(guard), OnceOnlyMiddleware(guard, name="audit-only")],
    )
    odd = OnceOnlyMiddleware(guard, agent_id="team:a|b")
    assert ":" not in odd.name and "|" not in odd.name  # LangGraph reserves them


def test_the_tools_own_validators_run_before_the_key_even_with_injected_state(
    guard: Guard, invoke: Any
) -> None:
    """The middleware sees the model's arguments before LangGraph injects the state: the
    tool's schema still decides (its field validator lower-cases the address)."""
    sent: list[str] = []

    class Email(BaseModel):
        to: str
        state: Annotated[dict[str, Any], InjectedState]

        @field_validator("to")
        @classmethod
        def lower(cls, v: str) -> str:
            return v.lower()

    @tool(args_schema=Email)
    def send(to: str, state: dict[str, Any]) -> str:
        """Send an email."""
        sent.append(to)
        return f"sent to {to} after {len(state['messages'])} messages"

    script = [
        AIMessage("", tool_calls=[tool_call("send", "s1", to="Ann@Example.com")]),
        AIMessage("", tool_calls=[tool_call("send", "s2", to="ann@example.com")]),
    ]
    agent = create_agent(
        ScriptedChatModel(script=script), [send], middleware=[OnceOnlyMiddleware(guard)]
    )
    msgs = tool_messages(invoke(agent, {"messages": [("user", "x")]}, CFG))
    assert sent == ["ann@example.com"]
    assert msgs["s2"].response_metadata["onceonly"]["code"] == "replayed"
    assert msgs["s2"].content == "sent to ann@example.com after 2 messages"


def test_a_tool_with_a_json_schema_is_guarded_like_any(guard: Guard) -> None:
    """The shape langchain-mcp-adapters gives an MCP server's tool: a JSON-schema
    args_schema, async only, content and artifact. Keyed on its arguments as given (what
    the tool receives: LangChain does not validate a JSON schema)."""
    calls: list[dict[str, Any]] = []

    async def call_server(**arguments: Any) -> tuple[str, dict[str, Any]]:
        calls.append(arguments)
        return f"ticket {arguments['title']} opened", {"id": len(calls)}

    open_ticket = StructuredTool(
        name="open_ticket",
        description="Open a ticket (an MCP tool).",
        args_schema={
            "type": "object",
            "properties": {"title": {"type": "string"}, "urgent": {"type": "boolean"}},
            "required": ["title"],
        },
        coroutine=call_server,
        response_format="content_and_artifact",
    )
    script = [
        AIMessage("", tool_calls=[tool_call("open_ticket", f"m{i}", title="disk full")])
        for i in range(2)
    ]
    agent = create_agent(
        ScriptedChatModel(script=script),
        [open_ticket],
        middleware=[OnceOnlyMiddleware(guard, tools=[open_ticket])],
    )
    out = asyncio.run(agent.ainvoke({"messages": [("user", "x")]}, CFG))
    msgs = tool_messages(out)
    assert calls == [{"title": "disk full"}]
    assert msgs["m1"].content == "ticket disk full opened" and msgs["m1"].artifact == {"id": 1}
    assert msgs["m1"].response_metadata["onceonly"]["code"] == "replayed"


def test_the_call_path_on_every_sql_ledger(db_url: str, invoke: Any, transcript_ok: Any) -> None:
    """Parallel calls in one batch (one coerced), governance, and an interrupt resumed, on
    SQLite, PostgreSQL and MariaDB (the server ledgers are shared: a namespace of its own)."""
    from langgraph.types import Command, interrupt

    server = {} if db_url.startswith("sqlite") else {"store_options": {"auto_migrate": True}}
    namespace = f"lc-{uuid.uuid4().hex[:10]}"
    guard = Guard(db_url, namespace=namespace, quiet=True, wait=10.0, **server)
    effects: list[dict[str, Any]] = []
    pay = payments(effects)
    approved: list[str] = []

    @tool
    def wire(to: str) -> str:
        """Wire money once a person approves."""
        answer = interrupt(f"wire to {to}?")
        approved.append(to)
        return f"wired to {to}: {answer}"

    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["delete_*"]))
    batch = [
        tool_call("pay", "p1", customer="c1", amount=1.5),
        tool_call("pay", "p2", customer="c1", amount="1.5"),  # the same call, coerced
        tool_call("delete_user", "p3", user="u"),
        tool_call("wire", "p4", to="acct-9"),
    ]
    world = World()
    agent = create_agent(
        ScriptedChatModel(script=[AIMessage("", tool_calls=batch)]),
        [pay, wire, world.tools()[2]],
        middleware=[OnceOnlyMiddleware(guard, agent_id="bot")],
        checkpointer=InMemorySaver(),
    )
    try:
        paused = invoke(agent, {"messages": [("user", "go")]}, CFG)
        assert paused["__interrupt__"] and approved == []
        out = invoke(agent, Command(resume="ok"), CFG)
        msgs = tool_messages(out)
        codes = {i: msgs[i].response_metadata["onceonly"]["code"] for i in ("p1", "p2", "p3")}
        assert sorted([codes["p1"], codes["p2"]]) == ["executed", "replayed"]
        assert codes["p3"] == "blocked" and world.deleted == []
        assert effects == [{"customer": "c1", "amount": 1.5, "currency": "usd"}]
        assert approved == ["acct-9"] and msgs["p4"].content == "wired to acct-9: ok"
        decisions = sorted(a.decision for a in guard.gov.agent_logs("bot"))
        assert decisions == ["blocked", "dedup", "executed", "executed"]  # no "failed"
        transcript_ok(out["messages"])
    finally:
        guard.close()
