"""OnceOnly for the OpenAI SDK: guarded tool dispatch for Chat Completions, the
Responses API and the Agents SDK.

    dispatcher = ToolDispatcher({"charge_card": charge_card}, guard=guard, scope="order-42")
    messages += dispatcher.chat(completion.choices[0].message)   # one tool message per call

Every call goes through ``guard.run_call_classified`` with the tool's name and its
validated arguments; every outcome is rendered from the core's classification
(docs/integrations/contract.md).

The Agents SDK parts live in :mod:`onceonly_openai.agents` (imported on first use).
"""

from __future__ import annotations

from typing import Any

from onceonly_core.errors import MissingExtraError

try:
    import openai  # noqa: F401
except ImportError as err:
    raise MissingExtraError("OnceOnly's OpenAI integration", "openai", "openai") from err

from ._dispatch import ToolAnswer, ToolCall, ToolDispatcher, chat_calls, render, response_calls
from ._loop import (
    LoopResult,
    MaxTurnsExceeded,
    arun_chat,
    arun_responses,
    assistant_param,
    output_params,
    run_chat,
    run_responses,
)
from ._serialize import to_text
from ._stream import ToolCallStream
from ._tools import Tool, tool

__all__ = [
    "LoopResult",
    "MaxTurnsExceeded",
    "Tool",
    "ToolAnswer",
    "ToolCall",
    "ToolCallStream",
    "ToolDispatcher",
    "arun_chat",
    "arun_responses",
    "assistant_param",
    "chat_calls",
    "guard_agent",
    "guard_function_tool",
    "guard_mcp_server",
    "output_params",
    "policy_guardrail",
    "render",
    "response_calls",
    "run_chat",
    "run_responses",
    "to_text",
    "tool",
]

_AGENTS = frozenset({"guard_agent", "guard_function_tool", "guard_mcp_server", "policy_guardrail"})


def __getattr__(name: str) -> Any:
    # The Agents SDK is a heavy import: load it only when its wrappers are used.
    if name in _AGENTS:
        from . import agents

        return getattr(agents, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
