"""Stores: where claims live. ``open_store(url)`` picks one by URL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import CLEARED, FAILED, RUNNING, STATES, SUCCEEDED, NewClaim, Record, Store
from .memory import MemoryStore

if TYPE_CHECKING:
    from .redis import RedisStore
    from .remote import RemoteStore
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
    "RedisStore",
    "RemoteStore",
    "SQLStore",
    "Store",
    "check_url",
    "governance_unsupported",
    "open_store",
]

#: URL schemes of the Redis store (``onceonly_core.stores.redis``, extra ``redis``).
REDIS_SCHEMES = (
    "redis://",
    "rediss://",
    "redis+sentinel://",
    "redis+cluster://",
    "rediss+cluster://",
)

#: URL schemes of remote mode: a ``onceonly serve`` control plane (``stores.remote``).
REMOTE_SCHEMES = ("https://", "http://")

_EXAMPLES = (
    "sqlite:///ledger.db, postgresql+psycopg://..., mysql+pymysql://..., redis://... or memory://"
)


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
    """``memory://``, ``sqlite:///file.db``, ``postgresql+psycopg://…``, ``mysql+pymysql://…``,
    ``redis://…`` / ``rediss://…`` / ``redis+sentinel://…`` / ``redis+cluster://…``, or a
    ``onceonly serve`` control plane at ``https://…`` (remote mode; option ``api_key``)."""
    check_url(url)
    if url.startswith("memory:"):
        if options:
            from ..errors import ConfigError

            raise ConfigError(f"memory:// takes no options, got {sorted(options)}")
        return MemoryStore()
    if "api_key" in options and not url.startswith(REMOTE_SCHEMES):
        from ..errors import ConfigError

        raise ConfigError(
            "api_key is for remote mode (an https:// URL of a onceonly serve server), "
            f"not for {url.split(':', 1)[0]}:"
        )
    if url.startswith(REMOTE_SCHEMES):
        from .remote import RemoteStore  # raises MissingExtraError without httpx

        return RemoteStore(url, **options)
    if url.startswith(REDIS_SCHEMES):
        from .redis import RedisStore  # raises MissingExtraError without redis-py

        return RedisStore(url, **options)
    from .sql import SQLStore

    return SQLStore(url, **options)


def governance_unsupported(ledger: str | Store | None) -> str | None:
    """Why governance cannot run on this ledger (a URL or a store), or None if it can.

    Every ledger this package opens by URL (memory, SQL, Redis) offers governance through
    ``Store.governance_store()``; a custom store given to the Guard that leaves the hook
    alone is refused here, at construction, with what to implement."""
    if ledger is None or isinstance(ledger, str):
        return None
    hook = getattr(type(ledger), "governance_store", None)
    if hook is not None and hook is not Store.governance_store:
        return None
    return (
        f"{type(ledger).__name__} provides no governance: policies, caps, approvals and the "
        "audit log need its governance_store() to return a "
        "onceonly_core.governance.base.GovernanceStore (docs/custom-store.md)"
    )


def __getattr__(name: str) -> Any:
    if name == "SQLStore":  # imports SQLAlchemy only when used
        from .sql import SQLStore

        return SQLStore
    if name == "RemoteStore":  # imports httpx only when used
        from .remote import RemoteStore

        return RemoteStore
    if name == "RedisStore":  # imports redis-py only when used
        from .redis import RedisStore

        return RedisStore
    raise AttributeError(name)
