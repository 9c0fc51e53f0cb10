"""Real FunctionAgent / AgentWorkflow runs with a scripted model: one execution per
logical call, concurrent tool calls, sync and async tools, blocked calls as error outputs.

No ``from __future__ import annotations`` here: LlamaIndex finds a ``ctx: Context``
parameter by comparing the evaluated annotation with ``Context``.
"""

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from llama_index.core.agent.workflow import (
    AgentWorkflow,
    FunctionAgent,
    ReActAgent,
    ToolCallResult,
)
from llama_index.core.llms.mock import MockFunctionCallingLLM
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Context

from onceonly_core import Guard, current_call
from onceonly_core.governance.models import Policy
from onceonly_llamaindex import guard_tools

Scripted = Callable[[Sequence[tuple[str, dict[str, Any]]]], MockFunctionCallingLLM]
PAY = ("pay", {"order_id": "o-1", "amount_usd": 5.0})


def payment_tools(kind: str) -> tuple[list[FunctionTool], list[tuple[str, float, str]]]:
    """A payment tool, sync or async, that records each real charge and its key."""
    charges: list[tuple[str, float, str]] = []
    lock = threading.Lock()

    def pay(order_id: str, amount_usd: float) -> dict[str, Any]:
        """Charge the customer for an order."""
        ctx = current_call()
        assert ctx is not None  # the tool runs inside the guarded call
        with lock:
            charges.append((order_id, amount_usd, ctx.idempotency_key))
            return {"charge_id": f"ch_{len(charges)}", "amount": amount_usd}

    async def apay(order_id: str, amount_usd: float) -> dict[str, Any]:
        """Charge the customer for an order."""
        await asyncio.sleep(0.05)  # long enough for the concurrent duplicate to wait
        return pay(order_id, amount_usd)

    if kind == "sync":
        tool = FunctionTool.from_defaults(pay)
    else:
        tool = FunctionTool.from_defaults(async_fn=apay, name="pay")
    return [tool], charges


async def run_agent(agent: Any, msg: str = "pay order o-1") -> tuple[str, list[ToolCallResult]]:
    handler = agent.run(user_msg=msg)
    results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    out = await handler
    return str(out), results


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_two_concurrent_calls_and_a_rerun_pay_once(
    guard: Guard, scripted: Scripted, kind: str
) -> None:
    tools, charges = payment_tools(kind)
    guarded = guard_tools(tools, guard)
    # The model asks for the same payment twice in one turn: the call_tool step runs
    # them concurrently (num_workers=4). Then the whole workflow is re-run.
    for _ in range(2):
        agent = FunctionAgent(tools=guarded, llm=scripted([PAY, PAY]))
        with guard.workflow("order-o-1"):
            answer, results = await run_agent(agent)
        assert len(results) == 2
        assert all(not r.tool_output.is_error for r in results)
        assert [r.tool_output.raw_output for r in results] == [
            {"charge_id": "ch_1", "amount": 5.0}
        ] * 2
        assert answer == " | ".join([str({"charge_id": "ch_1", "amount": 5.0})] * 2)
    assert len(charges) == 1
    # A different workflow is a different scope: it pays again.
    with guard.workflow("order-o-2"):
        await run_agent(FunctionAgent(tools=guarded, llm=scripted([PAY])))
    assert len(charges) == 2
    assert charges[0][2] != charges[1][2]


async def test_different_arguments_are_different_calls(guard: Guard, scripted: Scripted) -> None:
    tools, charges = payment_tools("sync")
    calls = [PAY, ("pay", {"order_id": "o-1", "amount_usd": 5.01}), PAY]
    agent = FunctionAgent(tools=guard_tools(tools, guard), llm=scripted(calls))
    with guard.workflow("wf"):
        _, results = await run_agent(agent)
    assert sorted(c[1] for c in charges) == [5.0, 5.01]
    assert len(results) == 3


async def test_blocked_and_pending_calls_are_error_outputs_the_model_sees(
    guard: Guard, scripted: Scripted
) -> None:
    guard.gov.upsert_policy(
        Policy(agent_id="bot", blocked_tools=["delete_*"], require_approval=["refund"])
    )
    ran: list[str] = []

    def delete_account(user_id: str) -> str:
        """Delete a user's account."""
        ran.append("delete")
        return "deleted"

    def refund(order_id: str) -> str:
        """Refund an order."""
        ran.append("refund")
        return "refunded"

    tools = guard_tools([delete_account, refund, *payment_tools("sync")[0]], guard, agent_id="bot")
    calls = [("delete_account", {"user_id": "u1"}), ("refund", {"order_id": "o-1"}), PAY]
    agent = FunctionAgent(tools=tools, llm=scripted(calls))
    with guard.workflow("wf"):
        answer, results = await run_agent(agent)
    assert ran == []
    by_name = {r.tool_name: r.tool_output for r in results}
    assert by_name["delete_account"].is_error
    assert "was blocked by policy (tool_blocked" in by_name["delete_account"].content
    assert by_name["delete_account"].raw_output["code"] == "blocked"
    assert by_name["refund"].is_error
    assert by_name["refund"].raw_output["code"] == "pending_approval"
    assert by_name["refund"].content.startswith("Waiting for human approval apr")
    assert not by_name["pay"].is_error
    # The model's next turn was shown the reasons (one tool message per call).
    assert "tool_blocked" in answer and "Waiting for human approval" in answer


async def test_disabled_agent_runs_nothing(guard: Guard, scripted: Scripted) -> None:
    tools, charges = payment_tools("async")
    guard.gov.disable_agent("bot", "incident 42")
    agent = FunctionAgent(tools=guard_tools(tools, guard, agent_id="bot"), llm=scripted([PAY]))
    _, results = await run_agent(agent)
    assert charges == []
    assert results[0].tool_output.is_error
    assert results[0].tool_output.raw_output["reason"] == "agent_disabled"
    assert "this agent is disabled: incident 42" in results[0].tool_output.content


async def test_tool_error_is_an_error_output_and_not_cached(
    guard: Guard, scripted: Scripted
) -> None:
    attempts: list[int] = []

    def flaky(order_id: str) -> str:
        """Fails the first time."""
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("card network down")
        return "ok"

    tools = guard_tools([flaky], guard)
    with guard.workflow("wf"):
        _, first = await run_agent(
            FunctionAgent(tools=tools, llm=scripted([("flaky", {"order_id": "o"})]))
        )
        _, second = await run_agent(
            FunctionAgent(tools=tools, llm=scripted([("flaky", {"order_id": "o"})]))
        )
    assert first[0].tool_output.is_error
    assert "card network down" in first[0].tool_output.content
    assert isinstance(first[0].tool_output.exception, RuntimeError)  # the tool's own error
    assert not second[0].tool_output.is_error and second[0].tool_output.content == "ok"
    assert len(attempts) == 2


async def test_context_parameter_is_injected_and_not_in_the_key(
    guard: Guard, scripted: Scripted
) -> None:
    seen: list[Any] = []

    async def remember(ctx: Context, note: str) -> str:
        """Store a note in the workflow state."""
        seen.append(ctx)
        await ctx.store.set("note", note)
        return f"noted {note}"

    tools = guard_tools([FunctionTool.from_defaults(async_fn=remember)], guard)
    assert "ctx" not in tools[0].metadata.get_parameters_dict()["properties"]
    with guard.workflow("wf"):
        for _ in range(2):  # two runs: two different Context objects, one key
            _, results = await run_agent(
                FunctionAgent(tools=tools, llm=scripted([("remember", {"note": "hi"})]))
            )
            assert results[0].tool_output.content == "noted hi"
    assert len(seen) == 1 and isinstance(seen[0], Context)


async def test_agent_workflow_with_handoff_target(guard: Guard, scripted_turns: Any) -> None:
    tools, charges = payment_tools("sync")
    payer = FunctionAgent(
        name="payer",
        description="Takes payments.",
        tools=guard_tools(tools, guard),
        llm=scripted_turns([[PAY, PAY], [PAY]]),  # the duplicate comes back next turn too
    )
    wf = AgentWorkflow(agents=[payer], root_agent="payer")
    with guard.workflow("order-o-1"):
        handler = wf.run(user_msg="pay")
        results = [e async for e in handler.stream_events() if isinstance(e, ToolCallResult)]
        await handler
    assert len(results) == 3 and len(charges) == 1
    assert len({str(r.tool_output.raw_output) for r in results}) == 1


async def test_react_agent_uses_the_guarded_tool(guard: Guard) -> None:
    from llama_index.core.llms import ChatMessage, MessageRole

    tools, charges = payment_tools("sync")
    step = iter(
        [
            'Thought: pay.\nAction: pay\nAction Input: {"order_id": "o-1", "amount_usd": 5.0}',
            'Thought: again.\nAction: pay\nAction Input: {"order_id": "o-1", "amount_usd": 5.0}',
        ]
    )

    def respond(messages: Sequence[ChatMessage], **_: Any) -> ChatMessage:
        text = next(step, "Thought: done.\nAnswer: paid")
        return ChatMessage(role=MessageRole.ASSISTANT, content=text)

    agent = ReActAgent(
        tools=guard_tools(tools, guard),
        llm=MockFunctionCallingLLM(response_generator=respond),
    )
    with guard.workflow("wf"):
        answer, results = await run_agent(agent)
    assert answer == "paid"
    assert len(results) == 2 and len(charges) == 1
