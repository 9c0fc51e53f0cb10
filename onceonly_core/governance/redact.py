"""Moved to :mod:`onceonly_core.redact` (the core redacts error text and log lines too,
and the core never imports governance). Kept so existing imports keep working."""

from ..redact import (
    DEFAULT_KEYS,
    DEFAULT_PATTERNS,
    Redactor,
    default_redactor,
    normalize_key,
)

__all__ = ["DEFAULT_KEYS", "DEFAULT_PATTERNS", "Redactor", "default_redactor", "normalize_key"]
