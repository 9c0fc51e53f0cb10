"""OnceOnly for LlamaIndex: guarded tools and tool specs, tool spans on the run timeline.

>>> from onceonly_llamaindex import guard_tools
>>> tools = guard_tools([FunctionTool.from_defaults(charge_card)], guard, agent_id="bot")
>>> agent = FunctionAgent(tools=tools, llm=llm)

Every call an agent makes runs at most once per key (the tool's name and the model's
arguments, inside ``with guard.workflow(...)``); a replay returns the stored result as
a ``ToolOutput``; a blocked or pending-approval call returns
``ToolOutput(is_error=True)`` with the reason, and the tool never runs.
"""

from __future__ import annotations

from onceonly_core.errors import MissingExtraError

try:
    import llama_index.core  # noqa: F401
except ImportError as err:
    raise MissingExtraError(
        "OnceOnly's LlamaIndex integration", "llamaindex", "llama-index-core"
    ) from err

from ._instrumentation import EVENT_TYPE, OnceOnlySpanHandler, instrument
from ._spec import GuardedSpec, GuardedToolSpec, guard_spec
from ._tools import GuardedFunctionTool, GuardedTool, SpendUSD, guard_tool, guard_tools

__all__ = [
    "EVENT_TYPE",
    "GuardedFunctionTool",
    "GuardedSpec",
    "GuardedTool",
    "GuardedToolSpec",
    "OnceOnlySpanHandler",
    "SpendUSD",
    "guard_spec",
    "guard_tool",
    "guard_tools",
    "instrument",
]
