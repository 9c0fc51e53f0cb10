"""OnceOnly for LlamaIndex: guarded tool specs.

The adapter arrives with its issue. Until then this package only checks, at import,
that LlamaIndex is installed, and says which extra to install when it is not.
"""

from __future__ import annotations

from onceonly_core.errors import MissingExtraError

try:
    import llama_index.core  # noqa: F401
except ImportError as err:
    raise MissingExtraError(
        "OnceOnly's LlamaIndex integration", "llamaindex", "llama-index-core"
    ) from err

__all__: list[str] = []
