"""OnceOnly for the OpenAI SDK: a guarded tool-call dispatcher.

The adapter arrives with its issue. Until then this package only checks, at import,
that the OpenAI SDK is installed, and says which extra to install when it is not.
"""

from __future__ import annotations

from onceonly_core.errors import MissingExtraError

try:
    import openai  # noqa: F401
except ImportError as err:
    raise MissingExtraError("OnceOnly's OpenAI integration", "openai", "openai") from err

__all__: list[str] = []
