"""Tool spans on the run timeline: governed and ungoverned tools, observe only."""

import asyncio
import logging
from typing import Any

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.tools import FunctionTool

from onceonly_core import Guard
from onceonly_core.governance.models import Policy
from onceonly_llamaindex import EVENT_TYPE, OnceOnlySpanHandler, guard_tool, instrument


def pay(order_id: str) -> str:
    """Take a payment."""
    return f"paid {order_id}"


def weather(city: str) -> str:
    """Read-only: not guarded."""
    return f"sunny in {city}"


def wipe(disk: str) -> str:
    """Never allowed."""
    raise AssertionError("a blocked tool must not run")


def explode(x: int) -> str:
    raise ValueError("boom")


def spans(guard: Guard, run_id: str) -> list[Any]:
    return [e for e in guard.gov.get_run_timeline(run_id) if e.type == EVENT_TYPE]


def test_agent_run_puts_every_tool_on_one_timeline(guard: Guard, scripted: Any) -> None:
    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["wipe"]))
    tools = [
        guard_tool(pay, guard, agent_id="bot"),
        guard_tool(wipe, guard, agent_id="bot"),
        FunctionTool.from_defaults(weather),  # ungoverned
    ]
    calls = [
        ("pay", {"order_id": "o1"}),
        ("pay", {"order_id": "o1"}),
        ("wipe", {"disk": "/"}),
        ("weather", {"city": "Oslo"}),
    ]

    async def main() -> None:
        await FunctionAgent(tools=tools, llm=scripted(calls)).run(user_msg="go")

    with guard.run("run-1"), guard.workflow("wf"), instrument(guard, run_id="run-1") as handler:
        asyncio.run(main())
        handler.flush()
        recorded = spans(guard, "run-1")
    assert handler not in get_dispatcher().span_handlers  # removed on exit
    # One span per logical call: the agent's acall (no nested __call__/call spans).
    assert sorted((e.tool, e.status) for e in recorded) == [
        ("pay", "ok"),
        ("pay", "ok"),
        ("weather", "ok"),
        ("wipe", "error"),
    ]
    by_tool = {e.tool: e.data for e in recorded}
    assert by_tool["weather"]["governed"] is False
    assert by_tool["pay"]["governed"] is True and by_tool["pay"]["method"] == "acall"
    assert by_tool["wipe"]["code"] == "blocked"
    assert all(e.data["framework"] == "llamaindex" for e in recorded)
    # The guard's own decisions are on the same timeline.
    types = [e.type for e in guard.gov.get_run_timeline("run-1")]
    assert "blocked" in types and "dedup" in types and "tool_result" in types


def test_sync_calls_exceptions_and_nesting(guard: Guard) -> None:
    bare = FunctionTool.from_defaults(weather)
    boom = guard_tool(explode, guard)
    with instrument(guard, run_id=lambda: "run-2") as handler:
        bare("Rome")  # __call__ -> call: one span
        bare.call(city="Rome")
        assert boom.call(x=1).is_error  # the tool's failure is an answer, not a raise
        with pytest.raises(TypeError):
            bare.call(city="Rome", country="IT")  # an exception out of a tool: "exception"
        handler.flush()
    recorded = spans(guard, "run-2")
    assert [(e.tool, e.status, e.data["method"]) for e in recorded] == [
        ("weather", "ok", "__call__"),
        ("weather", "ok", "call"),
        ("explode", "error", "call"),
        ("weather", "exception", "call"),
    ]
    assert recorded[2].data["code"] == "failed"
    assert recorded[3].data["error_type"] == "TypeError"


def test_no_run_id_records_nothing(guard: Guard) -> None:
    with instrument(guard, run_id=lambda: None) as handler:
        FunctionTool.from_defaults(weather).call(city="x")
        handler.flush()
    assert handler.open_spans == {}


def test_a_failing_timeline_never_breaks_the_tool(
    guard: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    def no_run() -> str:
        raise RuntimeError("no run scope")

    tool = FunctionTool.from_defaults(weather)
    with (
        instrument(guard, run_id=no_run),
        caplog.at_level(logging.ERROR, logger="onceonly.llamaindex"),
    ):
        assert tool.call(city="x").content == "sunny in x"
    assert "run_id callable failed" in caplog.text

    # A write that fails (the ledger is gone) is logged by the writer, not raised.
    broken = Guard("sqlite:////nonexistent-dir/ledger.db", quiet=True)
    handler = OnceOnlySpanHandler(broken, run_id="r")
    get_dispatcher().add_span_handler(handler)
    try:
        with caplog.at_level(logging.ERROR, logger="onceonly.llamaindex"):
            assert tool.call(city="y").content == "sunny in y"
            handler.flush()
    finally:
        get_dispatcher().span_handlers.remove(handler)
        handler.close()
    assert "could not record a LlamaIndex tool span" in caplog.text
