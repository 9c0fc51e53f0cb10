"""OnceOnly for LangChain and LangGraph: guarded tools, middleware and a callback handler.

The adapter arrives with its issue. Until then this package only checks, at import,
that LangChain is installed, and says which extra to install when it is not.
"""

from __future__ import annotations

from onceonly_core.errors import MissingExtraError

try:
    import langchain_core  # noqa: F401
except ImportError as err:
    raise MissingExtraError(
        "OnceOnly's LangChain integration", "langchain", "langchain-core"
    ) from err

__all__: list[str] = []
