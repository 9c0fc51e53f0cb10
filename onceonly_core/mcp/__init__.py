"""The MCP guard: ``onceonly mcp-proxy``, an MCP server in front of any MCP server.

It starts the upstream server as a stdio subprocess, lists its tools unchanged and runs
every ``tools/call`` through the guard's call path — exactly once per (tool, canonical
arguments, scope), with the agent's policies, caps, spend, approvals and audit — then
renders each outcome as an MCP ``CallToolResult`` (refusals, pending approvals and
unknown outcomes are tool errors whose text tells the model what to do). See docs/mcp.md.

It lives in the core, next to the other operator surfaces (``server/``, ``dashboard/``),
rather than in ``integrations/``: it is a program an operator runs, registered as a CLI
command, and the core never imports ``integrations/``. It renders the same ToolResult the
framework adapters render; the MCP SDK (extra ``mcp``, SDK major 2) is imported only here.
"""

from __future__ import annotations

from ..errors import MissingExtraError

__all__ = ["require"]

FEATURE = "the MCP proxy (onceonly mcp-proxy)"


def require() -> None:
    """Raise MissingExtraError with the pip command when the ``mcp`` SDK is missing."""
    try:
        import mcp  # noqa: F401
    except ImportError:
        raise MissingExtraError(FEATURE, "mcp", "mcp") from None
