"""Agents SDK tools guarded through ``on_invoke_tool``, run by a real ``Runner``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from agents import Agent, FunctionTool, Runner, function_tool, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message, function_call

from onceonly_core import Guard
from onceonly_core.errors import ConfigError
from onceonly_core.governance.models import Policy
from onceonly_openai.agents import guard_agent, guard_function_tool, policy_guardrail

set_tracing_disabled(True)


def outputs(result: Any) -> dict[str, Any]:
    return {
        i.raw_item["call_id"]: i.raw_item["output"]
        for i in result.new_items
        if i.type == "tool_call_output_item"
    }


def run(agent: Agent[Any], steps: list[Any]) -> Any:
    agent = agent.clone(model=ScriptedModel(steps))
    return asyncio.run(Runner.run(agent, "go"))


@pytest.fixture
def ledger() -> dict[str, list[Any]]:
    return {"charges": [], "flaky": []}


def make_tools(ledger: dict[str, list[Any]]) -> list[FunctionTool]:
    @function_tool
    def charge_card(customer: str, amount_usd: float) -> str:
        """Charge a card."""
        ledger["charges"].append(amount_usd)
        return f"ch_{len(ledger['charges'])}"

    @function_tool
    async def flaky(x: int) -> str:
        """Fails the first time."""
        ledger["flaky"].append(x)
        if len(ledger["flaky"]) == 1:
            raise RuntimeError("transient")
        return "ok"

    @function_tool
    def delete_user(uid: str) -> str:
        """Delete a user."""
        raise AssertionError("blocked tools never run")

    return [charge_card, flaky, delete_user]


def test_replay_across_call_ids_failure_not_cached_blocked(guard: Guard, ledger: Any) -> None:
    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["delete_*"]))
    agent = guard_agent(
        Agent(name="a", tools=make_tools(ledger)), guard=guard, agent_id="bot", scope="s"
    )
    charge = {"customer": "c", "amount_usd": 5}
    res = run(
        agent,
        [
            [
                function_call("charge_card", charge, call_id="a1"),
                function_call("flaky", {"x": 1}, call_id="a2"),
                function_call("delete_user", {"uid": "u"}, call_id="a3"),
                function_call("charge_card", "{not json", call_id="a4"),
            ],
            [
                function_call("charge_card", charge, call_id="b1"),
                function_call("flaky", {"x": 1}, call_id="b2"),
            ],
            [assistant_message("done")],
        ],
    )
    out = outputs(res)
    assert res.final_output == "done"
    assert out["a1"] == out["b1"] == "ch_1" and ledger["charges"] == [5.0]
    # The contract's sentences (docs/integrations/contract.md), not the SDK's wording.
    assert out["a2"].startswith("Failed: flaky raised RuntimeError: transient;")
    assert out["b2"] == "ok" and ledger["flaky"] == [1, 1]  # a failure is not stored
    assert out["a3"] == (
        "Not allowed: delete_user was blocked by policy (tool_blocked); do not retry this "
        "call; tell the user or do something else."
    )
    assert out["a4"].startswith("Invalid arguments: charge_card was not run because its ")
    assert set(out) == {"a1", "a2", "a3", "a4", "b1", "b2"}  # one output per call id


def test_input_guardrail_rejects_with_policy_reason(guard: Guard, ledger: Any) -> None:
    guard.gov.upsert_policy(Policy(agent_id="bot", allowed_tools=["charge_card"]))
    tools = make_tools(ledger)
    guarded = [
        guard_function_tool(t, guard=guard, agent_id="bot", input_guardrail=True) for t in tools
    ]
    assert guarded[0] is not tools[0] and not tools[0].tool_input_guardrails  # a copy
    res = run(
        Agent(name="a", tools=guarded),
        [[function_call("flaky", {"x": 1}, call_id="g1")], [assistant_message("ok")]],
    )
    assert "tool_not_in_allowed_list" in outputs(res)["g1"] and ledger["flaky"] == []
    gr = policy_guardrail(guard=guard, agent_id="bot")
    assert gr.get_name() == "onceonly_policy"


def test_key_args_see_the_tool_parameters(guard: Guard, ledger: Any) -> None:
    charge_card = make_tools(ledger)[0]
    guarded = guard_function_tool(charge_card, guard=guard, scope="k", key_args=["customer"])
    res = run(
        Agent(name="a", tools=[guarded]),
        [
            [function_call("charge_card", {"customer": "c", "amount_usd": 1}, call_id="1")],
            [function_call("charge_card", {"customer": "c", "amount_usd": 2}, call_id="2")],
            [assistant_message("ok")],
        ],
    )
    assert outputs(res) == {"1": "ch_1", "2": "ch_1"} and ledger["charges"] == [1.0]


def test_raising_tool_without_failure_handler_fails_the_run(guard: Guard) -> None:
    tries: list[int] = []

    @function_tool(failure_error_function=None)
    def boom() -> str:
        """Always fails."""
        tries.append(1)
        raise ValueError("nope")

    agent = Agent(name="a", tools=[guard_function_tool(boom, guard=guard, scope="b")])
    for _ in range(2):
        with pytest.raises(Exception, match="nope"):  # the SDK wraps it in UserError
            run(agent, [[function_call("boom", {}, call_id="x")], [assistant_message("-")]])
    assert tries == [1, 1]  # the SDK's semantics, and the failure was not stored


def test_rejects_non_function_tools(guard: Guard) -> None:
    with pytest.raises(TypeError):
        guard_function_tool(lambda: None, guard=guard)  # type: ignore[arg-type]


def test_a_guarded_tool_is_not_guarded_twice(guard: Guard, ledger: Any) -> None:
    # Guarded twice, a call would wait on its own claim of its key (30 s, then in_progress).
    once = guard_function_tool(make_tools(ledger)[0], guard=guard, scope="s")
    with pytest.raises(ConfigError, match="already guarded"):
        guard_function_tool(once, guard=guard)
    agent = guard_agent(Agent(name="a", tools=[once]), guard=guard, scope="s")
    assert agent.tools[0] is once


def test_unknown_options_are_refused_when_guarding(guard: Guard, ledger: Any) -> None:
    tools = make_tools(ledger)
    with pytest.raises(ConfigError, match="retries"):
        guard_function_tool(tools[0], guard=guard, retries=3)
    with pytest.raises(ConfigError, match="retries"):
        guard_agent(Agent(name="a", tools=tools), guard=guard, retries=3)
    with pytest.raises(ConfigError, match="readonly"):
        guard_agent(Agent(name="a", tools=tools), tool_options={"flaky": {"readonly": True}})
