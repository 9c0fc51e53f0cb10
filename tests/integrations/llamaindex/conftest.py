"""Fixtures for the LlamaIndex adapter: a real SQLite ledger and a scripted model.

The model is LlamaIndex's own ``MockFunctionCallingLLM`` driven by a response
generator: no network, real ``FunctionAgent`` / ``AgentWorkflow`` runs.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.llms.mock import MockFunctionCallingLLM

from onceonly_core import Guard

Call = tuple[str, dict[str, Any]]
HERE = Path(__file__).resolve().parent

# Third-party deprecations raised inside llama-index / workflows code, not ours
# (pytest runs with filterwarnings=error). Narrow: by message and category.
THIRD_PARTY_WARNINGS = [
    # workflows' step discovery (inspect.getmembers on an agent, a pydantic model)
    # touches deprecated properties (__fields__, model_computed_fields on instances).
    "ignore::pydantic.warnings.PydanticDeprecationWarning:inspect",
    # ReActAgent.take_step asks ctx.is_running inside a step (llama-index-core 0.14.25).
    "ignore:is_running called from within a step:DeprecationWarning",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            for spec in THIRD_PARTY_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))


@pytest.fixture
def guard(tmp_path: Path) -> Iterator[Guard]:
    """A guard on a fresh SQLite ledger (WAL, synchronous=normal: these tests are not
    about power loss)."""
    g = Guard(f"sqlite:///{tmp_path}/ledger.db?synchronous=normal", quiet=True)
    yield g
    g.close()


def tool_calls(calls: Sequence[Call]) -> ChatMessage:
    ids = itertools.count()
    return ChatMessage(
        role=MessageRole.ASSISTANT,
        blocks=[
            ToolCallBlock(tool_call_id=f"call_{next(ids)}", tool_name=name, tool_kwargs=kw)
            for name, kw in calls
        ],
    )


def answer_from_tools(messages: Sequence[ChatMessage]) -> ChatMessage:
    """The final answer quotes every tool result the model was shown, in order."""
    seen = [m.content or "" for m in messages if m.role == MessageRole.TOOL]
    return ChatMessage(role=MessageRole.ASSISTANT, content=" | ".join(seen))


def one_turn(calls: Sequence[Call]) -> MockFunctionCallingLLM:
    """Asks for ``calls`` (all in one turn: they run concurrently), then answers with
    the tool results. Stateless, so a re-run of the workflow asks for the same calls."""

    def respond(messages: Sequence[ChatMessage], **_: Any) -> ChatMessage:
        if any(m.role == MessageRole.TOOL for m in messages):
            return answer_from_tools(messages)
        return tool_calls(calls)

    return MockFunctionCallingLLM(response_generator=respond)


def turns(script: Sequence[Sequence[Call]]) -> MockFunctionCallingLLM:
    """One turn of tool calls per LLM call, then the answer."""
    steps = iter(script)

    def respond(messages: Sequence[ChatMessage], **_: Any) -> ChatMessage:
        step = next(steps, None)
        return answer_from_tools(messages) if step is None else tool_calls(step)

    return MockFunctionCallingLLM(response_generator=respond)


@pytest.fixture
def scripted() -> Callable[[Sequence[Call]], MockFunctionCallingLLM]:
    return one_turn


@pytest.fixture
def scripted_turns() -> Callable[[Sequence[Sequence[Call]]], MockFunctionCallingLLM]:
    return turns


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests on a fresh event loop (no async plugin in the extra)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    asyncio.run(pyfuncitem.obj(**{n: pyfuncitem.funcargs[n] for n in names}))
    return True
