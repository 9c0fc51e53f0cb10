"""OnceOnly for LangChain and LangGraph: guarded tools, agent middleware, callback handlers.

>>> from langchain.agents import create_agent
>>> from onceonly_langchain import OnceOnlyMiddleware
>>> agent = create_agent(model, tools, middleware=[OnceOnlyMiddleware(guard, agent_id="bot")])

Importing this package without LangChain raises MissingExtraError with the pip command.
"""

from __future__ import annotations

from onceonly_core.errors import MissingExtraError

try:
    import langchain_core  # noqa: F401
    import langgraph  # noqa: F401
    from langchain.agents.middleware import AgentMiddleware  # noqa: F401
except ImportError as err:
    # Name the distribution to install, not the module that failed to import.
    dist = {"langchain_core": "langchain-core"}.get(err.name or "", err.name or "langchain-core")
    raise MissingExtraError("OnceOnly's LangChain integration", "langchain", dist) from err

from ._common import GuardRefused, thread_run_id
from .callbacks import AsyncOnceOnlyCallbackHandler, OnceOnlyCallbackHandler, ToolCallBlocked
from .middleware import OnceOnlyMiddleware
from .tools import guard_tool, wrap_tools

__all__ = [
    "AsyncOnceOnlyCallbackHandler",
    "GuardRefused",
    "OnceOnlyCallbackHandler",
    "OnceOnlyMiddleware",
    "ToolCallBlocked",
    "guard_tool",
    "thread_run_id",
    "wrap_tools",
]
