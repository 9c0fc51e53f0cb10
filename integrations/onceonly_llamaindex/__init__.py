"""OnceOnly for LlamaIndex: guarded tools and tool specs, tool spans on the run timeline.

>>> from onceonly_llamaindex import guard_tools
>>> tools = guard_tools([FunctionTool.from_defaults(charge_card)], guard, agent_id="bot")
>>> agent = FunctionAgent(tools=tools, llm=llm)

Every call an agent makes runs at most once per key: the tool's name and the model's
arguments as the tool's ``fn_schema`` validates them, in the call's scope (``scope=``,
else ``with guard.workflow(...)``, else the active LlamaIndex run). Every outcome comes
back as a :class:`GuardedToolOutput` rendered from the adapter contract's
classification (docs/integrations/contract.md): the tool's own output for a call that
ran or a replay, else ``is_error=True`` with the contract's sentence for the model; one
:class:`GuardDecisionEvent` per decision goes to LlamaIndex's instrumentation.
"""

from __future__ import annotations

from onceonly_core.errors import MissingExtraError

try:
    import llama_index.core  # noqa: F401
except ImportError as err:
    raise MissingExtraError(
        "OnceOnly's LlamaIndex integration", "llamaindex", "llama-index-core"
    ) from err

from ._events import DISPATCHER_NAME, GuardDecisionEvent
from ._instrumentation import EVENT_TYPE, OnceOnlySpanHandler, instrument
from ._spec import GuardedSpec, GuardedToolSpec, guard_spec
from ._tools import (
    AgentTools,
    GuardedFunctionTool,
    GuardedTool,
    GuardedToolOutput,
    RunId,
    Scope,
    SpendUSD,
    ToolError,
    active_run_id,
    guard_tool,
    guard_tools,
)

__all__ = [
    "DISPATCHER_NAME",
    "EVENT_TYPE",
    "AgentTools",
    "GuardDecisionEvent",
    "GuardedFunctionTool",
    "GuardedSpec",
    "GuardedTool",
    "GuardedToolOutput",
    "GuardedToolSpec",
    "OnceOnlySpanHandler",
    "RunId",
    "Scope",
    "SpendUSD",
    "ToolError",
    "active_run_id",
    "guard_spec",
    "guard_tool",
    "guard_tools",
    "instrument",
]
