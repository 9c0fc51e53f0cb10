"""What crosses the boundary: text every backend can hold, and the documented limits.

PostgreSQL refuses a NUL character in any text value, and no backend can store a lone
surrogate (it is not encodable as UTF-8). So that a call behaves the same on memory,
SQLite, PostgreSQL and MariaDB, and fails *before* anything is claimed:

* **Names** (namespace, key, tool name, agent id, run id, caller) with a NUL or a lone
  surrogate are refused with :class:`~onceonly_core.errors.ConfigError`.
* **Data** (argument and result strings) may contain NUL: it is stored JSON-escaped
  (``\\u0000``) and replays exactly. A lone surrogate in an argument cannot be
  fingerprinted (:class:`~onceonly_core.errors.FingerprintError`); in a result it is
  stored escaped (``\\ud800``) and replays exactly.
* **Error text** is free text: NUL and lone surrogates become U+FFFD (with secrets masked,
  see :mod:`onceonly_core.redact`).

The numbers below are documented in ``docs/configuration.md`` (limits) and
``docs/server.md`` (the server's body checks).
"""

from __future__ import annotations

import re

from .errors import ConfigError

__all__ = [
    "DEFAULT_MAX_RESULT_BYTES",
    "INT_MAX",
    "INT_MIN",
    "MAX_BODY_BYTES",
    "MAX_CAP_USD",
    "MAX_JSON_DEPTH",
    "MAX_SPEND_USD",
    "bad_text",
    "check_text",
]

#: The largest encoded result the ledger stores by default (``max_result_bytes``): half
#: of MariaDB's default ``max_allowed_packet`` (16 MiB), which bounds one statement.
DEFAULT_MAX_RESULT_BYTES = 8 * 1024 * 1024
#: The server's default request body limit (``create_app(max_body_bytes=...)``).
MAX_BODY_BYTES = 1_048_576
#: The deepest JSON nesting the server accepts in a request body.
MAX_JSON_DEPTH = 64
#: Integers in a request body must fit a signed 64-bit column (``BIGINT``).
INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
#: The most one call may spend, in USD. A larger amount is refused (ConfigError, 422) before
#: anything is claimed or executed: micro-dollar sums must fit the 64-bit counters and
#: audit rows with room for millions of calls a day, and a price past a million dollars
#: per tool call is a bug (cents for dollars, a unit mix-up), not a purchase.
MAX_SPEND_USD = 1_000_000
#: The largest daily spend cap a policy may set (64-bit micro-dollar counters).
MAX_CAP_USD = 1_000_000_000_000

_SURROGATE = re.compile("[\ud800-\udfff]")


def bad_text(value: str) -> str | None:
    """Why ``value`` cannot be stored as a name on every backend, or None."""
    if "\x00" in value:
        return "contains a NUL character"
    if not value.isascii() and _SURROGATE.search(value):
        return "contains a lone surrogate (not valid Unicode text)"
    return None


def check_text(value: str | None, what: str) -> None:
    """Refuse a name that some backend cannot store, with a :class:`ConfigError`."""
    if value is None:
        return
    why = bad_text(value)
    if why is not None:
        raise ConfigError(f"{what} {why}: {value[:80]!r}")
