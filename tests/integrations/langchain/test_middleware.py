"""OnceOnlyMiddleware on real create_agent graphs, sync and async, on a SQLite ledger."""

from __future__ import annotations

from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

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
    assert msgs["d1"].content == "Tool 'delete_user' was blocked by policy: tool_blocked."
    assert msgs["a1"].status == "error" and "approval" in str(msgs["a1"].content)
    assert msgs["a1"].response_metadata["onceonly"]["decision"] == "pending_approval"
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


def test_disabled_agent_is_refused(guard: Guard, invoke: Any) -> None:
    world = World()
    guard.gov.disable_agent("bot", "incident 7")
    script = [
        AIMessage("", tool_calls=[tool_call("charge_card", "k1", customer="c", amount_usd=5.0)])
    ]
    out = invoke(
        agent_for(guard, world, script, agent_id="bot"), {"messages": [("user", "x")]}, CFG
    )
    msg = tool_messages(out)["k1"]
    assert world.charges == [] and msg.status == "error" and "agent_disabled" in str(msg.content)


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


def test_a_failed_tool_is_not_replayed(guard: Guard, invoke: Any, transcript_ok: Any) -> None:
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
        ]
    )
    from langchain.agents.middleware import ToolRetryMiddleware  # noqa: F401 - exists in 1.x

    agent = create_agent(
        model, [flaky], middleware=[OnceOnlyMiddleware(guard)], checkpointer=InMemorySaver()
    )
    with pytest.raises(ValueError, match="gateway timeout"):
        invoke(agent, {"messages": [("user", "x")]}, CFG)  # the tool's own error, unchanged
    out = invoke(agent, None, CFG)  # resume: the call runs again (failures are not cached)
    assert attempts == [1, 1]
    msgs = tool_messages(out)
    assert msgs["f1"].content == "ok" and msgs["f2"].content == "ok"
    assert msgs["f2"].response_metadata["onceonly"]["decision"] == "dedup"
    transcript_ok(out["messages"])


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
