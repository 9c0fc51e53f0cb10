"""``guard_agent`` over a whole Agents SDK graph, run by a real ``Runner``: function tools
keyed by their validated arguments, handoffs (cycles included), agents used ``as_tool``,
and the tools of a real stdio MCP server (written with the ``mcp`` 2.x SDK, run by the
Agents SDK's ``MCPServerStdio``)."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, Runner, function_tool, handoff, set_tracing_disabled
from agents.mcp import MCPServerStdio
from agents.testing import ScriptedModel, assistant_message, function_call

from onceonly_core import Guard
from onceonly_core.errors import ConfigError
from onceonly_core.governance.models import Policy
from onceonly_openai.agents import guard_agent

set_tracing_disabled(True)


def outputs(result: Any) -> dict[str, Any]:
    return {
        i.raw_item["call_id"]: i.raw_item["output"]
        for i in result.new_items
        if i.type == "tool_call_output_item"
    }


def all_outputs(result: Any) -> list[Any]:
    return [i.raw_item["output"] for i in result.new_items if i.type == "tool_call_output_item"]


@pytest.fixture
def charges() -> list[float]:
    return []


def charge_tool(charges: list[float]) -> Any:
    @function_tool
    def charge_card(customer: str, amount_usd: float, currency: str = "usd") -> str:
        """Charge a card."""
        charges.append(amount_usd)
        return f"charged {customer} {amount_usd} {currency}"

    return charge_card


def test_validated_arguments_are_the_key(guard: Guard, charges: list[float]) -> None:
    # "25.00" and 25.0 (and the default given or omitted) are one call for a float field:
    # the key uses the arguments the function receives, not the model's JSON text.
    agent = guard_agent(Agent(name="a", tools=[charge_tool(charges)]), guard=guard, scope="s1")
    model = ScriptedModel(
        [
            [function_call("charge_card", {"customer": "c", "amount_usd": 25.0}, call_id="1")],
            [function_call("charge_card", {"customer": "c", "amount_usd": "25.00"}, call_id="2")],
            [
                function_call(
                    "charge_card",
                    {"customer": "c", "amount_usd": 25, "currency": "usd"},
                    call_id="3",
                )
            ],
            [function_call("charge_card", {"customer": "c", "amount_usd": NAN}, call_id="4")],
            [assistant_message("done")],
        ]
    )
    res = asyncio.run(Runner.run(agent.clone(model=model), "go"))
    out = outputs(res)
    assert out["1"] == out["2"] == out["3"] == "charged c 25.0 usd"
    assert charges == [25.0]
    assert out["4"].startswith("Invalid arguments: charge_card was not run because argument")


NAN = float("nan")


def test_handoffs_are_guarded_recursively_with_cycles(guard: Guard, charges: list[float]) -> None:
    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["refund"]))

    @function_tool
    def refund(customer: str) -> str:
        """Refund."""
        raise AssertionError("blocked: never runs")

    billing = Agent(name="billing", tools=[charge_tool(charges), refund])
    triage = Agent(name="triage", handoffs=[billing])
    billing.handoffs = [handoff(triage)]  # a cycle: billing can hand back to triage
    guarded = guard_agent(triage, guard=guard, agent_id="bot", scope="order-9")

    # Originals untouched; the guarded graph keeps its cycle, made of guarded clones.
    assert triage.handoffs == [billing] and billing.tools[0] is not guarded.handoffs[0]
    g_billing = guarded.handoffs[0]
    assert isinstance(g_billing, Agent) and g_billing is not billing
    args = {"customer": "c", "amount_usd": 9.5}
    g_billing.model = ScriptedModel(
        [
            [function_call("charge_card", args, call_id="b1")],
            [function_call("charge_card", args, call_id="b2")],
            [function_call("refund", {"customer": "c"}, call_id="b3")],
            [function_call("transfer_to_triage", {}, call_id="h2")],
        ]
    )
    guarded.model = ScriptedModel(
        [
            [function_call("transfer_to_billing", {}, call_id="h1")],
            [assistant_message("back in triage")],
        ]
    )
    res = asyncio.run(Runner.run(guarded, "charge me"))
    out = outputs(res)
    assert res.final_output == "back in triage"
    assert out["b1"] == out["b2"] == "charged c 9.5 usd" and charges == [9.5]
    assert "(tool_blocked)" in out["b3"]
    # The handoff back (a Handoff object, not an Agent) returned the guarded triage.
    assert res.last_agent is guarded


def test_agents_used_as_tools_run_their_tools_guarded(guard: Guard, charges: list[float]) -> None:
    payments = Agent(name="payments", tools=[charge_tool(charges)])
    boss = Agent(
        name="boss",
        tools=[payments.as_tool(tool_name="payments", tool_description="Takes payments.")],
    )
    guarded = guard_agent(boss, guard=guard, scope="order-7")
    agent_tool = guarded.tools[0]
    inner = agent_tool._agent_instance  # type: ignore[attr-defined]
    assert inner is not payments and inner.tools[0] is not payments.tools[0]
    args = {"customer": "c", "amount_usd": 3.0}
    # The nested agent charges in each of two sub-runs; the card is charged once.
    inner.model = ScriptedModel(
        [
            [function_call("charge_card", args, call_id="n1")],
            [assistant_message("paid")],
            [function_call("charge_card", args, call_id="n2")],
            [assistant_message("paid again?")],
        ]
    )
    guarded.model = ScriptedModel(
        [
            [function_call("payments", {"input": "charge c 3"}, call_id="t1")],
            [function_call("payments", {"input": "charge c 3"}, call_id="t2")],
            [assistant_message("done")],
        ]
    )
    res = asyncio.run(Runner.run(guarded, "pay"))
    out = outputs(res)
    assert out == {"t1": "paid", "t2": "paid again?"}  # the sub-agent ran twice (read_only)
    assert charges == [3.0]
    # A sub-agent guarded before as_tool is used as it is.
    pre = guard_agent(payments, guard=guard, scope="order-7")
    tool = pre.as_tool(tool_name="pre", tool_description="")
    again = guard_agent(Agent(name="b", tools=[tool]), guard=guard, scope="order-7")
    assert again.tools[0]._agent_instance is pre  # type: ignore[attr-defined]


def test_an_unknown_as_tool_shape_is_refused(guard: Guard) -> None:
    tool = Agent(name="x").as_tool(tool_name="x", tool_description="")
    tool.on_invoke_tool = lambda ctx, text: asyncio.sleep(0)  # type: ignore[assignment,return-value]
    with pytest.raises(ConfigError, match=r"guard_agent\(agent\)\.as_tool"):
        guard_agent(Agent(name="y", tools=[tool]), guard=guard)


SERVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from mcp.server.mcpserver import MCPServer

    server = MCPServer("shop")
    LEDGER = Path(sys.argv[1])


    @server.tool()
    def charge(customer: str, amount_usd: float) -> str:
        \"\"\"Charge a customer.\"\"\"
        with LEDGER.open("a") as f:
            f.write(f"{customer} {amount_usd}\\n")
        return f"charged {customer} {amount_usd}"


    @server.tool()
    def broken(customer: str) -> str:
        \"\"\"Always fails.\"\"\"
        with LEDGER.open("a") as f:
            f.write(f"broken {customer}\\n")
        raise RuntimeError("card network down")


    server.run("stdio")
    """
)


def text(output: Any) -> str:
    # An MCP tool's output item: a list of content parts (here, one text part).
    if isinstance(output, str):
        return output
    return "".join(part["text"] for part in output)


@pytest.mark.timeout(120)
def test_mcp_server_tools_go_through_the_guard(guard: Guard, tmp_path: Path) -> None:
    script, ledger = tmp_path / "shop_server.py", tmp_path / "ledger.txt"
    script.write_text(SERVER)
    ledger.touch()
    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["charge"]))

    async def scenario(agent_id: str | None) -> dict[str, Any]:
        params = {"command": sys.executable, "args": [str(script), str(ledger)]}
        async with MCPServerStdio(params=params, name="shop") as server:
            agent = Agent(name="mcp", mcp_servers=[server])
            guarded = guard_agent(agent, guard=guard, agent_id=agent_id, scope="order-1")
            assert agent.mcp_servers == [server]  # the original is unchanged
            charge = {"customer": "c", "amount_usd": 4.5}
            guarded.model = ScriptedModel(
                [
                    [function_call("charge", charge, call_id="m1")],
                    [function_call("charge", charge, call_id="m2")],
                    [function_call("broken", {"customer": "c"}, call_id="m3")],
                    [assistant_message("ok")],
                ]
            )
            return outputs(await Runner.run(guarded, "charge"))

    out = {k: text(v) for k, v in asyncio.run(scenario(None)).items()}
    assert out["m1"] == out["m2"] == "charged c 4.5"  # replayed under the new call id
    # The server's error result is a failure (not stored), answered with the contract's text.
    assert out["m3"].startswith("Failed: broken raised MCPToolError: Error executing tool")
    assert ledger.read_text().splitlines() == ["c 4.5", "broken c"]  # charged once
    # Governed by the agent's policy, like any other tool.
    blocked = text(asyncio.run(scenario("bot"))["m1"])
    assert blocked.startswith("Not allowed: charge was blocked by policy (tool_blocked)")
    assert ledger.read_text().splitlines().count("c 4.5") == 1


def test_tool_options_per_tool_name(guard: Guard, charges: list[float]) -> None:
    quotes: list[str] = []

    @function_tool
    def quote(sku: str) -> str:
        """A price: reads only."""
        quotes.append(sku)
        return "9.90"

    guard.gov.upsert_policy(Policy(agent_id="strict-bot", blocked_tools=["charge_card"]))
    agent = guard_agent(
        Agent(name="a", tools=[quote, charge_tool(charges)]),
        guard=guard,
        scope="s",
        tool_options={"quote": {"read_only": True}, "charge_card": {"agent_id": "strict-bot"}},
    )
    agent.model = ScriptedModel(
        [
            [function_call("quote", {"sku": "x"}, call_id="1")],
            [function_call("quote", {"sku": "x"}, call_id="2")],
            [function_call("charge_card", {"customer": "c", "amount_usd": 1}, call_id="3")],
            [assistant_message("done")],
        ]
    )
    out = outputs(asyncio.run(Runner.run(agent, "go")))
    assert quotes == ["x", "x"]  # read_only: never replayed
    assert "(tool_blocked)" in out["3"] and charges == []  # its own agent's policy
