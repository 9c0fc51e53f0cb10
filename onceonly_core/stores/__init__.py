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
    "check_url",
    "open_store",
]

_EXAMPLES = "sqlite:///ledger.db, postgresql+psycopg://..., mysql+pymysql://... or memory://"


def check_url(url: str) -> None:
    """Refuse a ledger URL that cannot be one, with the URL the caller probably meant.

    An empty string is an error rather than "use the default": ``Guard("")`` usually means
    a configuration value that was not filled in, and silently opening ./onceonly.db would
    hide that. A bare file name (``ledger.db``) gets the ``sqlite:///`` form suggested.
    """
    from ..errors import ConfigError

    if not isinstance(url, str):
        raise ConfigError(f"a ledger URL is a string, not {type(url).__name__}: {_EXAMPLES}")
    if not url.strip():
        raise ConfigError(
            "the ledger URL is empty: pass one (" + _EXAMPLES + "), or pass none at all "
            "to use ONCEONLY_DB_URL (default sqlite:///onceonly.db)"
        )
    if url.startswith("memory:") or "://" in url:
        return
    path = url.strip()
    raise ConfigError(
        f"not a database URL: {url!r}. A SQLite file is written with its scheme: "
        f"'sqlite:///{path}' (relative to the working directory; 'sqlite:////abs/path.db' "
        f"for an absolute path). Other ledgers: {_EXAMPLES}"
    )


def open_store(url: str, **options: Any) -> Store:
    """``memory://``, ``sqlite:///file.db``, ``postgresql+psycopg://…``, ``mysql+pymysql://…``."""
    check_url(url)
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
