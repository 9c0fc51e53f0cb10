"""The callback handlers: timeline and audit, sync and async; enforce=True refuses."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool

from onceonly_core import Guard
from onceonly_core.errors import ConfigError
from onceonly_core.governance.models import Policy
from onceonly_langchain import (
    AsyncOnceOnlyCallbackHandler,
    OnceOnlyCallbackHandler,
    ToolCallBlocked,
)
from onceonly_langchain.testing import ScriptedChatModel, tool_call

RUNS: list[str] = []


@tool
def lookup(q: str) -> str:
    """Look something up."""
    RUNS.append(q)
    return f"answer to {q}"


@tool
def delete_user(user: str) -> str:
    """Delete a user."""
    RUNS.append(f"delete {user}")
    return "deleted"


@tool
async def adelete_user(user: str) -> str:
    """Delete a user (async)."""
    RUNS.append(f"delete {user}")
    return "deleted"


@tool
def broken(x: int) -> str:
    """Always fails."""
    raise ValueError("bad input")


def make_agent(*calls: dict[str, Any]) -> Any:
    model = ScriptedChatModel(script=[AIMessage("", tool_calls=list(calls))])
    return create_agent(model, [lookup, delete_user, adelete_user, broken])


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_tool_calls_land_on_the_timeline_and_audit_log(guard: Guard, kind: str) -> None:
    RUNS.clear()
    handler: Any
    if kind == "sync":
        handler = OnceOnlyCallbackHandler(guard, agent_id="bot", run_id="run-1")
        make_agent(tool_call("lookup", "l1", q="x")).invoke(
            {"messages": [("user", "q")]}, {"callbacks": [handler]}
        )
    else:
        handler = AsyncOnceOnlyCallbackHandler(guard, agent_id="bot", run_id="run-1")
        asyncio.run(
            make_agent(tool_call("lookup", "l1", q="x")).ainvoke(
                {"messages": [("user", "q")]}, {"callbacks": [handler]}
            )
        )
    events = guard.gov.get_run_timeline("run-1")
    kinds = [(e.type, e.tool, e.status) for e in events]
    assert kinds[0] == ("run_started", None, "running")
    assert ("tool_call", "lookup", "started") in kinds
    assert ("tool_result", "lookup", "executed") in kinds
    assert kinds[-1] == ("run_finished", None, "ok")
    call = next(e for e in events if e.type == "tool_call")
    assert call.data["tool_call_id"] == "l1" and call.data["args"] == {"q": "x"}
    result = next(e for e in events if e.type == "tool_result")
    assert result.data["lc_run_id"] == call.data["lc_run_id"]
    assert "answer to x" in result.data["output"]
    audit = guard.gov.agent_logs("bot")
    assert [(a.tool, a.decision) for a in audit] == [("lookup", "executed")]
    assert RUNS == ["x"]


def test_the_root_run_id_keys_the_timeline_and_errors_are_recorded(guard: Guard) -> None:
    handler = OnceOnlyCallbackHandler(guard)
    with pytest.raises(ValueError, match="bad input"):
        make_agent(tool_call("broken", "b1", x=1)).invoke(
            {"messages": [("user", "q")]}, {"callbacks": [handler], "run_id": None}
        )
    assert handler.last_run_id is not None
    events = guard.gov.get_run_timeline(handler.last_run_id)
    kinds = [(e.type, e.status) for e in events]
    assert ("tool_result", "failed") in kinds and kinds[-1] == ("run_finished", "failed")
    assert (
        "ValueError: bad input" in next(e for e in events if e.type == "tool_result").data["error"]
    )
    assert handler.recorder.runs == {}  # nothing left behind


@pytest.mark.parametrize("kind", ["sync", "sync-handler-ainvoke", "async"])
def test_enforce_refuses_a_blocked_tool_before_it_runs(guard: Guard, kind: str) -> None:
    RUNS.clear()
    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["*delete_*"]))
    # The async handler only enforces on async tools (see its docstring).
    name = "adelete_user" if kind == "async" else "delete_user"
    agent = make_agent(tool_call(name, "d1", user="u"))
    if kind == "sync":
        handler: Any = OnceOnlyCallbackHandler(guard, agent_id="bot", run_id="r", enforce=True)
        with pytest.raises(ToolCallBlocked, match="tool_blocked"):
            agent.invoke({"messages": [("user", "q")]}, {"callbacks": [handler]})
    elif kind == "sync-handler-ainvoke":
        handler = OnceOnlyCallbackHandler(guard, agent_id="bot", run_id="r", enforce=True)
        with pytest.raises(ToolCallBlocked, match="tool_blocked"):
            asyncio.run(agent.ainvoke({"messages": [("user", "q")]}, {"callbacks": [handler]}))
    else:
        handler = AsyncOnceOnlyCallbackHandler(guard, agent_id="bot", run_id="r", enforce=True)
        with pytest.raises(ToolCallBlocked, match="tool_blocked"):
            asyncio.run(agent.ainvoke({"messages": [("user", "q")]}, {"callbacks": [handler]}))
    assert RUNS == []
    assert ("blocked", "blocked") in [(e.type, e.status) for e in guard.gov.get_run_timeline("r")]
    assert [a.decision for a in guard.gov.agent_logs("bot")] == ["blocked"]


def test_enforce_lets_allowed_tools_run(guard: Guard) -> None:
    RUNS.clear()
    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["delete_*"]))
    handler = OnceOnlyCallbackHandler(guard, agent_id="bot", enforce=True)
    out = make_agent(tool_call("lookup", "l1", q="y")).invoke(
        {"messages": [("user", "q")]}, {"callbacks": [handler]}
    )
    assert RUNS == ["y"]
    assert [m.content for m in out["messages"] if isinstance(m, ToolMessage)] == ["answer to y"]


def test_enforce_needs_an_agent(guard: Guard) -> None:
    with pytest.raises(ConfigError):
        OnceOnlyCallbackHandler(guard, enforce=True)


def test_the_async_handler_names_its_last_run_too(guard: Guard) -> None:
    handler = AsyncOnceOnlyCallbackHandler(guard, agent_id="bot")
    assert handler.last_run_id is None
    asyncio.run(
        make_agent(tool_call("lookup", "l1", q="z")).ainvoke(
            {"messages": [("user", "q")]}, {"callbacks": [handler]}
        )
    )
    assert handler.last_run_id is not None
    kinds = [e.type for e in guard.gov.get_run_timeline(handler.last_run_id)]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished" and "tool_call" in kinds


def test_a_refusal_says_it_in_the_contracts_words(guard: Guard) -> None:
    guard.gov.disable_agent("bot", "incident 7")
    handler = OnceOnlyCallbackHandler(guard, agent_id="bot", enforce=True)
    with pytest.raises(ToolCallBlocked) as refused:
        make_agent(tool_call("lookup", "l1", q="y")).invoke(
            {"messages": [("user", "q")]}, {"callbacks": [handler]}
        )
    c = refused.value.classification
    assert (c.code, c.reason) == ("blocked", "agent_disabled")
    assert (
        str(refused.value)
        == c.text
        == (
            "Not allowed: this agent is disabled: incident 7; stop calling tools and tell the user."
        )
    )
