"""Stores: where claims live. ``open_store(url)`` picks one by URL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import CLEARED, FAILED, RUNNING, STATES, SUCCEEDED, NewClaim, Record, Store
from .memory import MemoryStore

if TYPE_CHECKING:
    from .sql import SQLStore

__all__ = [
    "CLEARED",
    "FAILED",
    "RUNNING",
    "STATES",
    "SUCCEEDED",
    "MemoryStore",
    "NewClaim",
    "Record",
    "SQLStore",
    "Store",
    "open_store",
]


def open_store(url: str, **options: Any) -> Store:
    """``memory://``, ``sqlite:///file.db``, ``postgresql+psycopg://…``, ``mysql+pymysql://…``."""
    if url.startswith("memory:"):
        if options:
            from ..errors import ConfigError

            raise ConfigError(f"memory:// takes no options, got {sorted(options)}")
        return MemoryStore()
    from .sql import SQLStore

    return SQLStore(url, **options)


def __getattr__(name: str) -> Any:
    if name == "SQLStore":  # imports SQLAlchemy only when used
        from .sql import SQLStore

        return SQLStore
    raise AttributeError(name)
