"""Fixtures for the LangChain integration: a real SQLite ledger per test, a scripted model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain")

from onceonly_core import Guard


@pytest.fixture
def guard(tmp_path: Path) -> Iterator[Guard]:
    g = Guard(f"sqlite:///{tmp_path}/ledger.db", quiet=True, wait=5.0)
    yield g
    g.close()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def invoke(mode: str) -> Callable[..., Any]:
    """``invoke(runnable, input, config)``: ``invoke`` or ``ainvoke``, per ``mode``."""

    def run(runnable: Any, inp: Any, config: Any = None) -> Any:
        if mode == "sync":
            return runnable.invoke(inp, config)
        return asyncio.run(runnable.ainvoke(inp, config))

    return run


def _transcript_ok(messages: list[Any]) -> None:
    from langchain_core.messages import AIMessage, ToolMessage

    calls = [c["id"] for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    answers = [m.tool_call_id for m in messages if isinstance(m, ToolMessage)]
    assert len(calls) == len(set(calls)), calls
    assert sorted(answers) == sorted(calls), (calls, answers)


@pytest.fixture
def transcript_ok() -> Callable[[list[Any]], None]:
    """Check: every tool call has exactly one ToolMessage, and every ToolMessage answers one."""
    return _transcript_ok
