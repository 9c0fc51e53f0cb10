"""Redaction of secrets before anything is written: the ledger's error column, the audit
log, timeline events, notifications and webhooks, and log lines.

Two rules, applied to every value of a (possibly nested) structure (CWE-532: secrets must
be removed *before* writing, since redacting after hashing would break the audit chain):

1. **By key name.** A value stored under a secret-looking key is replaced by the mask,
   whatever its type (a dict under ``"card"`` is masked whole). Key names are normalised
   first: case is folded and ``-``, ``_``, ``.`` and spaces are dropped, so ``API-Key``,
   ``api_key`` and ``apiKey`` are the same name. A key matches when its normalised form
   *equals or ends with* a listed name: ``x-api-key``, ``db_password`` and
   ``github_token`` match, while ``max_tokens``, ``author`` and ``token_count`` do not
   (suffix, not substring, so ordinary argument names survive).
2. **By value shape.** In every string (and every dict key) the secret-looking part is
   replaced: Stripe keys (``sk_live_``, ``rk_test_``...), ``whsec_`` secrets, OpenAI-style
   ``sk-`` keys, ``Bearer``/``Basic`` credentials, JWTs, AWS access key ids, GitHub,
   Slack and Google API tokens, PEM private keys, passwords in URLs
   (``scheme://user:pass@host``), ``key=value`` / ``"key": "value"`` pairs whose key is a
   secret name (query strings, embedded JSON, header dumps), card numbers (13-19 digits,
   single spaces or dashes allowed between digits, Luhn-valid), and any extra patterns.
   A pattern with a group named ``secret`` replaces only that group; otherwise the whole
   match is replaced.

Numbers are masked only by key name: a 16-digit *integer* is far more often an id or a
millisecond timestamp than a card.

The output is always JSON-safe (``json.dumps(..., allow_nan=False)`` accepts it):
Decimal, datetime, UUID, paths and other objects become strings, tuples and sets become
lists, dataclasses and pydantic models become dicts (their field names go through rule 1),
pydantic ``SecretStr``/``SecretBytes`` are masked, bytes become ``"<N bytes>"``, non-finite
floats become ``"NaN"``/``"Infinity"``/``"-Infinity"``, NUL characters and lone surrogates
become U+FFFD (PostgreSQL ``jsonb`` rejects both), cycles become ``"<cycle>"`` and anything
nested deeper than ``max_depth`` becomes the mask. :meth:`Redactor.redact` never raises.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

__all__ = [
    "DEFAULT_KEYS",
    "DEFAULT_PATTERNS",
    "LOGGERS",
    "RedactingFilter",
    "Redactor",
    "default_redactor",
    "install_log_redaction",
    "log_filter",
    "normalize_key",
]

#: Secret key names (written readably; matching uses :func:`normalize_key`).
DEFAULT_KEYS: frozenset[str] = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "client_secret",
        "secret_key",
        "secret_access_key",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "session_token",
        "api_key",
        "apikey",
        "private_key",
        "authorization",
        "auth",
        "credential",
        "credentials",
        "cookie",
        "set_cookie",
        "session_id",
        "card_number",
        "card",
        "cvv",
        "cvv2",
        "cvc",
        "ssn",
        "signature",
        "webhook_secret",
        "otp",
    }
)

# Single spaces or dashes between digits, 13-19 digits overall (ISO/IEC 7812 lengths).
_CARD_RUN = re.compile(r"(?<!\d)\d(?:[ -]?\d)+(?!\d)")
_SEPARATOR = re.compile(r"[ -]")

#: Built-in value shapes. The order matters only for readability of the result: every
#: pattern runs over the output of the previous one, and none matches the mask.
DEFAULT_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(
        r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END[A-Z0-9 ]*PRIVATE KEY-----|\Z)"
    ),
    # Distinctive prefixes: matched anywhere, even glued to other text.
    re.compile(r"(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{8,}"),
    re.compile(r"whsec_[A-Za-z0-9+/=]{8,}"),
    re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{16,}"),
    re.compile(r"gh[pousr]_[A-Za-z0-9]{20,}"),
    re.compile(r"github_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"xox[abposr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"AIza[0-9A-Za-z_-]{30,}"),
    re.compile(r"(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}"),
    re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
    # Keep the scheme word, drop the credential. "Basic" must be followed by something
    # base64-looking (a digit, +, /, = or an inner capital) so "basic functionality" stays.
    re.compile(r"(?i)\bbearer\s+(?P<secret>[A-Za-z0-9._~+/-]{8,}=*)"),
    re.compile(
        r"\bBasic\s+(?=[A-Za-z0-9+/]*?(?:[0-9+/=]|[A-Za-z0-9][A-Z]))(?P<secret>[A-Za-z0-9+/]{8,}=*)"
    ),
    # scheme://user:password@host
    re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s:/@]*:(?P<secret>[^\s@/]+)@"),
)


def _any_of(patterns: Iterable[re.Pattern[str]]) -> re.Pattern[str]:
    """One pattern that matches where any of ``patterns`` would: each as a scoped
    alternative (its flags kept, its named groups made non-capturing; none of the
    built-in ones refers back to a group)."""
    parts = []
    for p in patterns:
        src = re.sub(r"\(\?P<\w+>", "(?:", p.pattern)
        src = re.sub(r"^\(\?[imsx]+\)", "", src)  # global flags: kept in p.flags
        flags = "".join(c for f, c in _FLAGS if p.flags & f)
        parts.append(f"(?{flags}:{src})" if flags else f"(?:{src})")
    return re.compile("|".join(parts))


_FLAGS = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"), (re.VERBOSE, "x"))
_ANY_DEFAULT = _any_of(DEFAULT_PATTERNS)

# key=value, key: value, "key": "value", and JSON escaped inside a string (\"key\": \"v\").
# The value is quoted or runs to a delimiter, after an optional auth scheme word (a header
# dump "Authorization: Basic abc"). Whether the key is secret is decided by the same rule
# as dict keys, in _pairs(). Keys and values are matched separately so that a value
# which is not secret ("https" -> "//host/?api_key=...") is not skipped over whole.
_PAIR_KEY = re.compile(r"""(?<![\w-])(?P<key>[\w.-]+)(?P<sep>\\?["']?\s*[:=]\s*)""")
_PAIR_VALUE = re.compile(
    r"""(?P<scheme>(?i:bearer|basic|token|digest|negotiate)\s+)?"""
    r"""(?P<value>\\"(?:(?!\\").)*\\"|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s&,;"'}\]\\]+)"""
)

_NORMALIZE = re.compile(r"[-_. ]")
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
_MAX_INT_BITS = 13_000  # str(int) refuses more than 4,300 digits (~14,284 bits)


def normalize_key(name: str) -> str:
    """``"API-Key"`` -> ``"apikey"``: the form key names are compared in."""
    return _NORMALIZE.sub("", name).casefold()


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


class Redactor:
    """Masks secrets by key name and by value shape; see the module docstring.

    ``keys`` replaces :data:`DEFAULT_KEYS`; ``extra_keys`` adds to them. ``patterns`` adds
    value shapes to :data:`DEFAULT_PATTERNS`. A Redactor is immutable and thread-safe.
    """

    def __init__(
        self,
        *,
        keys: Iterable[str] | None = None,
        extra_keys: Iterable[str] = (),
        patterns: Iterable[str | re.Pattern[str]] = (),
        mask: str = "[REDACTED]",
        max_depth: int = 32,
    ) -> None:
        names = set(DEFAULT_KEYS if keys is None else keys) | set(extra_keys)
        self._keys: frozenset[str] = frozenset(n for n in map(normalize_key, names) if n)
        # Suffix test without scanning every name: group names by length.
        self._lengths: tuple[int, ...] = tuple(sorted({len(n) for n in self._keys}))
        self._extra: tuple[re.Pattern[str], ...] = tuple(
            p if isinstance(p, re.Pattern) else re.compile(p) for p in patterns
        )
        self.mask = mask
        self.max_depth = max_depth

    # -- key names ------------------------------------------------------------------------
    def is_secret_key(self, name: str) -> bool:
        """True when ``name`` (normalised) equals or ends with a secret key name."""
        norm = normalize_key(name)
        if not norm:
            return False
        n = len(norm)
        return any(norm[n - size :] in self._keys for size in self._lengths if size <= n)

    # -- strings --------------------------------------------------------------------------
    def redact_text(self, text: str) -> str:
        """Replace every secret-shaped part of ``text`` by the mask."""
        try:
            return self._text(_clean(text))
        except Exception:  # a pathological user pattern: fail closed
            return self.mask

    def _text(self, text: str) -> str:
        # Most text holds no secret: one search for any built-in shape first (the same
        # answer as each pattern's own search, see _ANY_DEFAULT) instead of a sub each.
        if _ANY_DEFAULT.search(text) is not None:
            text = self._subs(DEFAULT_PATTERNS, text)
        text = self._subs(self._extra, text)
        if ":" in text or "=" in text:  # every key=value / key: value pair has one
            text = self._pairs(text)
        return _CARD_RUN.sub(self._cards, text)

    def _subs(self, patterns: tuple[re.Pattern[str], ...], text: str) -> str:
        for pattern in patterns:
            if "secret" in pattern.groupindex:
                text = pattern.sub(self._group_replacer(), text)
            else:
                text = pattern.sub(self.mask, text)
        return text

    def _group_replacer(self) -> Callable[[re.Match[str]], str]:
        mask = self.mask

        def replace(m: re.Match[str]) -> str:
            whole = m.group(0)
            start, end = m.span("secret")
            if start < 0:
                return mask
            base = m.start(0)
            return whole[: start - base] + mask + whole[end - base :]

        return replace

    def _pairs(self, text: str) -> str:
        out: list[str] = []
        pos = 0
        for m in _PAIR_KEY.finditer(text):
            if m.start() < pos or not self.is_secret_key(m.group("key")):
                continue
            v = _PAIR_VALUE.match(text, m.end())
            if v is None or text.startswith(self.mask, v.start("value")):
                continue  # nothing there, or already masked by a shape pattern
            value = v.group("value")
            quote = ""
            if value.startswith('\\"'):
                quote = '\\"'
            elif value[:1] in ("'", '"'):
                quote = value[0]
            out.append(text[pos : m.end()])
            out.append(f"{v.group('scheme') or ''}{quote}{self.mask}{quote}")
            pos = v.end()
        if not out:
            return text
        out.append(text[pos:])
        return "".join(out)

    def _cards(self, m: re.Match[str]) -> str:
        run = m.group(0)
        if len(run) < 13:
            return run
        # A run like "555-1234 4242 4242 4242 4242" holds a card between separators:
        # test every group-aligned window of 13-19 digits and mask the Luhn-valid ones.
        groups = _SEPARATOR.split(run)
        seps = _SEPARATOR.findall(run)
        masked = [False] * len(groups)
        for i in range(len(groups)):
            digits = ""
            for j in range(i, len(groups)):
                digits += groups[j]
                if len(digits) > 19:
                    break
                # A leading 0 or one repeated digit is a padded id, never a card number.
                if (
                    len(digits) >= 13
                    and digits[0] != "0"
                    and digits.count(digits[0]) != len(digits)
                    and _luhn(digits)
                ):
                    for k in range(i, j + 1):
                        masked[k] = True
        if not any(masked):
            return run
        out: list[str] = []
        for k, group in enumerate(groups):
            if masked[k]:
                if not (k and masked[k - 1]):
                    out.append(self.mask)
            else:
                out.append(group)
            if k < len(seps) and not (masked[k] and masked[k + 1]):
                out.append(seps[k])
        return "".join(out)

    # -- structures -----------------------------------------------------------------------
    def redact(self, value: Any) -> Any:
        """A new JSON-safe copy of ``value`` with secrets masked. Never raises."""
        try:
            return self._walk(value, 0, set())
        except Exception:  # RecursionError with a huge max_depth, a hostile __eq__...
            return self.mask

    def _walk(self, value: Any, depth: int, path: set[int]) -> Any:
        try:
            return self._node(value, depth, path)
        except Exception:  # a hostile __str__/__getattr__/__iter__: fail closed, per node
            return self.mask

    def _node(self, value: Any, depth: int, path: set[int]) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            return self.redact_text(str.__str__(value))
        if isinstance(value, enum.Enum):
            return self._walk(value.value, depth + 1, path)
        if isinstance(value, int):
            if value.bit_length() > _MAX_INT_BITS:
                return f"<int of {value.bit_length()} bits>"
            return int.__int__(value)  # a subclass's __int__/__repr__ is not trusted
        if isinstance(value, float):
            if math.isnan(value):
                return "NaN"
            if math.isinf(value):
                return "Infinity" if value > 0 else "-Infinity"
            return float.__float__(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return f"<{memoryview(value).nbytes} bytes>"
        if isinstance(value, Decimal):
            return str(value)
        if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
            return value.isoformat()
        if isinstance(value, _dt.timedelta):
            return value.total_seconds()
        if callable(getattr(value, "get_secret_value", None)):  # pydantic SecretStr/Bytes
            return self.mask
        if depth >= self.max_depth:
            return self.mask
        ident = id(value)
        if ident in path:
            return "<cycle>"
        path.add(ident)
        try:
            return self._container(value, depth, path)
        finally:
            path.discard(ident)

    def _container(self, value: Any, depth: int, path: set[int]) -> Any:
        if isinstance(value, Mapping):
            return self._mapping(value.items(), depth, path)
        if isinstance(value, (list, tuple)):
            return [self._walk(v, depth + 1, path) for v in value]
        if isinstance(value, (set, frozenset)):
            items = [self._walk(v, depth + 1, path) for v in value]
            # Sets have no order: sort by the JSON text so the output is deterministic.
            return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = [(f.name, getattr(value, f.name, None)) for f in dataclasses.fields(value)]
            return self._mapping(fields, depth, path)
        dump = getattr(value, "model_dump", None)
        if callable(dump) and not isinstance(value, type):  # pydantic v2 model
            try:
                dumped = dump()
            except Exception:
                return self.redact_text(_type_text(value))
            return self._walk(dumped, depth + 1, path)
        return self.redact_text(_safe_str(value))

    def _mapping(self, items: Iterable[tuple[Any, Any]], depth: int, path: set[int]) -> Any:
        out: dict[str, Any] = {}
        for key, val in items:
            name = _key_text(key)
            red_name = self.redact_text(name)
            if red_name in out:  # two keys masked to the same text: keep both
                n = 2
                while f"{red_name}#{n}" in out:
                    n += 1
                red_name = f"{red_name}#{n}"
            if self.is_secret_key(name):
                out[red_name] = self.mask
            else:
                out[red_name] = self._walk(val, depth + 1, path)
        return out


def _clean(text: str) -> str:
    if _BAD_CHARS.search(text):
        return _BAD_CHARS.sub("\ufffd", text)
    return text


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return _clean(str.__str__(key))
    if key is None or isinstance(key, (bool, int, float)):
        try:
            return json.dumps(key)
        except Exception:
            return _type_text(key)
    if isinstance(key, enum.Enum):
        return _key_text(key.value)
    return _clean(_safe_str(key))


def _type_text(value: Any) -> str:
    return f"<{type(value).__name__}>"


def _safe_str(value: Any) -> str:
    try:
        text = str(value)
    except Exception:
        return _type_text(value)
    return text if isinstance(text, str) else _type_text(value)


#: The redactor the audit log and notifications use unless configured otherwise.
default_redactor: Redactor = Redactor()


# -- log lines ------------------------------------------------------------------------------
class RedactingFilter(logging.Filter):
    """Masks secrets in a log record before any handler sees it: the formatted message,
    the exception text (a traceback quotes the failing URL or header) and the stack.

    Installed on every logger OnceOnly writes to (:data:`LOGGERS`) when this module is
    imported; a filter on a logger runs only for records that logger emits, so the list
    names each one (a test fails when a module logs to a logger missing from it).
    """

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or default_redactor

    def filter(self, record: logging.LogRecord) -> bool:
        red = self.redactor
        try:
            message = record.getMessage()
        except Exception:  # a broken %-format: the logging module reports it later
            return True
        record.msg = red.redact_text(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = red.redact_text(_format_exception(record.exc_info))
        if record.stack_info:
            record.stack_info = red.redact_text(record.stack_info)
        return True


def _format_exception(exc_info: Any) -> str:
    return logging.Formatter().formatException(exc_info)


#: Every logger OnceOnly (core, server, governance, dashboard, integrations) logs through.
LOGGERS: tuple[str, ...] = (
    "onceonly",
    "onceonly.server",
    "onceonly.governance",
    "onceonly.governance.remote",
    "onceonly.governance.webhooks",
    "onceonly.governance.outbox",
    "onceonly.dashboard",
    "onceonly.egress",
    "onceonly.keyhealth",
    "onceonly.stores",
    "onceonly.mcp",
    "onceonly.langchain",
    "onceonly.llamaindex",
    "onceonly.openai",
)

log_filter = RedactingFilter()


def install_log_redaction(names: Iterable[str] = LOGGERS) -> None:
    """Add :data:`log_filter` to the named loggers (idempotent)."""
    for name in names:
        logger = logging.getLogger(name)
        if log_filter not in logger.filters:
            logger.addFilter(log_filter)


install_log_redaction()
