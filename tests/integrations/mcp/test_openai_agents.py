"""The OpenAI Agents SDK's own MCP client, pointed at the proxy: its tools run through the guard.

A real ``Runner`` with a scripted model (no network) calls the proxied ``charge`` tool on
two turns with the same arguments, as a re-planning agent does: one effect, and the model
reads the same output both times; a blocked tool comes back as an error the model reads.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import pytest

from _mcp_rig import Rig, child_env, http_proxy

agents = pytest.importorskip("agents", reason="openai-agents (extra openai) is not installed")

from agents import Agent, Runner, set_tracing_disabled  # noqa: E402
from agents.mcp import MCPServerStdio, MCPServerStreamableHttp  # noqa: E402
from agents.testing import ScriptedModel, assistant_message, function_call  # noqa: E402

from onceonly_core.governance.models import Policy  # noqa: E402

set_tracing_disabled(True)
pytestmark = pytest.mark.timeout(120)


def outputs(result: Any) -> dict[str, str]:
    """Each call id's output as text (the SDK hands MCP text content over as input_text)."""
    out = {}
    for item in result.new_items:
        if item.type == "tool_call_output_item":
            raw = item.raw_item["output"]
            texts = [p["text"] for p in raw] if isinstance(raw, list) else [raw]
            out[item.raw_item["call_id"]] = " ".join(texts)
    return out


def test_agents_sdk_tools_go_through_the_proxy(rig: Rig) -> None:
    rig.guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["refuse"]))
    charge = {"customer": "agent", "cents": 42}

    async def scenario() -> Any:
        server = MCPServerStdio(
            params={
                "command": sys.executable,
                "args": rig.proxy_argv("--agent", "bot", "--scope", "conv-1"),
                "env": child_env(),
            },
            client_session_timeout_seconds=60,
        )
        with anyio.fail_after(90):
            async with server:
                agent = Agent(
                    name="payer",
                    mcp_servers=[server],
                    model=ScriptedModel(
                        [
                            [function_call("charge", charge, call_id="t1")],
                            [
                                function_call("charge", charge, call_id="t2"),
                                function_call("refuse", {"reason": "x"}, call_id="t3"),
                            ],
                            [assistant_message("done")],
                        ]
                    ),
                )
                return await Runner.run(agent, "charge the customer")

    result = anyio.run(scenario)
    out = outputs(result)
    assert out["t1"] == out["t2"]
    assert "charged agent 42 cents" in out["t1"]
    assert "tool_blocked" in out["t3"]
    assert len(rig.lines("charge")) == 1 and rig.lines("refuse") == []
    # t2 and t3 run concurrently: their rows may come in either order.
    decisions = sorted((r.tool, r.decision) for r in rig.guard.gov.agent_logs("bot"))
    assert decisions == [("charge", "dedup"), ("charge", "executed"), ("refuse", "blocked")]


def test_agents_sdk_over_streamable_http(rig: Rig) -> None:
    """The Agents SDK's streamable-HTTP MCP client against ``mcp-proxy --http``."""
    charge = {"customer": "http-agent", "cents": 7}

    async def scenario(url: str) -> Any:
        server = MCPServerStreamableHttp(params={"url": url}, client_session_timeout_seconds=60)
        with anyio.fail_after(90):
            async with server:
                agent = Agent(
                    name="payer",
                    mcp_servers=[server],
                    model=ScriptedModel(
                        [
                            [function_call("charge", charge, call_id="h1")],
                            [function_call("charge", charge, call_id="h2")],
                            [assistant_message("done")],
                        ]
                    ),
                )
                return await Runner.run(agent, "charge the customer")

    with http_proxy(rig, "--agent", "bot") as url:
        result = anyio.run(scenario, url)
    out = outputs(result)
    assert out["h1"] == out["h2"] and "charged http-agent 7 cents" in out["h1"]
    assert len(rig.lines("charge")) == 1
