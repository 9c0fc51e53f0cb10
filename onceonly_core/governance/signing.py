"""Signing and verifying HTTP bodies with the Standard Webhooks scheme (standardwebhooks.com).

Used for calls to remote HTTP tools (``auth="hmac_sha256"``) and for the webhook sink, so
any Standard Webhooks library (svix, ``standardwebhooks``) can verify what we send::

    webhook-id:        msg_...                      (no "." allowed)
    webhook-timestamp: 1714000000                   (unix seconds, of this attempt)
    webhook-signature: v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>

The key is the base64-decoded part of a ``whsec_<base64>`` secret, or the UTF-8 bytes of
any other string (bytes are used as they are). The reference libraries base64-decode
un-prefixed strings too: give them (and us) the ``whsec_`` form to interoperate.
Several space-separated signatures are accepted (secret rotation); ``v1a`` (ed25519) and
unknown versions are ignored.

Replays. The ``webhook-id`` names the logical message and stays the same on every retry
(as the standard says), while each attempt is signed afresh with its own timestamp. A
:class:`ReplayCache` therefore remembers ``(id, timestamp)`` pairs: a captured request
re-sent verbatim is rejected, while a legitimate re-signed retry (which only a holder of
the secret can produce) passes. Effects are deduplicated by the receiver on the
``webhook-id`` / ``Idempotency-Key``, not by the replay cache. The replay check runs
*after* the signature check, so forged requests cannot fill the cache or burn ids.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import re
import threading
import time
import uuid
from collections.abc import Mapping

from ..errors import ConfigError, SignatureError

__all__ = ["DEFAULT_TOLERANCE", "ReplayCache", "secret_key", "sign", "verify"]

#: Seconds a timestamp may be off in either direction (Stripe and Standard Webhooks: 5 min).
DEFAULT_TOLERANCE = 300.0

# Header values we accept; bounds keep a hostile header from costing much work.
_ID = re.compile(r"^[A-Za-z0-9_:\-]{1,256}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,15}$")
_MAX_SIGNATURE_HEADER = 4096
_MAX_SIGNATURES = 16
_PREFIX = "whsec_"


def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key for ``secret``: ``whsec_<base64>`` decoded, other strings as UTF-8."""
    if isinstance(secret, (bytes, bytearray)):
        key = bytes(secret)
    elif isinstance(secret, str):
        if secret.startswith(_PREFIX):
            try:
                key = base64.b64decode(secret[len(_PREFIX) :], validate=True)
            except (binascii.Error, ValueError):
                # Never echo the secret: name only what is wrong with it.
                raise ConfigError("a 'whsec_' secret must be followed by valid base64") from None
        else:
            key = secret.encode("utf-8")
    else:
        raise ConfigError(f"a signing secret must be str or bytes, got {type(secret).__name__}")
    if not key:
        raise ConfigError("the signing secret is empty")
    return key


def _signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    content = f"{msg_id}.{timestamp}.".encode() + body
    return hmac.new(key, content, hashlib.sha256).digest()


def new_msg_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def sign(
    secret: str | bytes,
    body: bytes,
    *,
    msg_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The three ``webhook-*`` headers for ``body`` (a fresh id and the current time by default)."""
    key = secret_key(secret)
    msg_id = new_msg_id() if msg_id is None else msg_id
    if not _ID.match(msg_id):
        raise ConfigError("webhook id must be 1-256 characters of [A-Za-z0-9_:-] (no '.')")
    ts = int(time.time()) if timestamp is None else int(timestamp)
    if ts < 0:
        raise ConfigError("webhook timestamp must be >= 0")
    digest = _signature(key, msg_id, str(ts), bytes(body))
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": "v1," + base64.b64encode(digest).decode("ascii"),
    }


class ReplayCache:
    """Remembers verified ``(webhook-id, timestamp)`` pairs until they would be stale anyway.

    An entry lives until ``timestamp + tolerance``, after which :func:`verify` rejects the
    message as too old (use the same tolerance for both). Memory is bounded: expired
    entries are dropped on every call, and when ``max_entries`` live ones are held, the one
    closest to expiry is forgotten first (the least useful to an attacker). Thread-safe.
    """

    def __init__(self, tolerance: float = DEFAULT_TOLERANCE, max_entries: int = 100_000) -> None:
        if tolerance < 0 or max_entries < 1:
            raise ConfigError("ReplayCache needs tolerance >= 0 and max_entries >= 1")
        self.tolerance = float(tolerance)
        self.max_entries = int(max_entries)
        self._expiry: dict[tuple[str, float], float] = {}
        self._heap: list[tuple[float, tuple[str, float]]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)

    def seen(self, msg_id: str, timestamp: float, now: float) -> bool:
        """True if ``(msg_id, timestamp)`` was seen and has not expired; records it otherwise."""
        entry = (msg_id, float(timestamp))
        expires = float(timestamp) + self.tolerance
        with self._lock:
            self._evict(now)
            known = self._expiry.get(entry)
            if known is not None and known >= now:
                return True
            if expires < now:
                return False  # already stale: verify() rejects it before asking us
            while len(self._expiry) >= self.max_entries and self._heap:
                _, oldest = heapq.heappop(self._heap)
                self._expiry.pop(oldest, None)
            self._expiry[entry] = expires
            heapq.heappush(self._heap, (expires, entry))
            return False

    def _evict(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] < now:
            expires, entry = heapq.heappop(heap)
            if self._expiry.get(entry) == expires:
                del self._expiry[entry]


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:
        # Case-insensitive lookup for plain dicts (httpx.Headers and email.message.Message,
        # which http.server uses, already ignore case).
        for key, val in headers.items():
            if isinstance(key, str) and key.lower() == name:
                value = val
                break
    if value is None:
        raise SignatureError(f"missing {name} header")
    if not isinstance(value, str):
        raise SignatureError(f"malformed {name} header")
    return value.strip()


def verify(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
    replay: ReplayCache | None = None,
) -> str:
    """Check the Standard Webhooks signature of ``body``; return the ``webhook-id``.

    Raises :class:`SignatureError` for a missing or malformed header, a timestamp more than
    ``tolerance`` seconds in the past or future, no matching ``v1`` signature (compared in
    constant time), or an ``(id, timestamp)`` already recorded in ``replay``.
    """
    key = secret_key(secret)
    msg_id = _header(headers, "webhook-id")
    ts_text = _header(headers, "webhook-timestamp")
    sig_text = _header(headers, "webhook-signature")
    if not _ID.match(msg_id):
        raise SignatureError("malformed webhook-id header")
    if not _TIMESTAMP.match(ts_text):
        raise SignatureError("malformed webhook-timestamp header (unix seconds expected)")
    if len(sig_text) > _MAX_SIGNATURE_HEADER:
        raise SignatureError("malformed webhook-signature header (too long)")
    now = time.time() if now is None else now
    ts = int(ts_text)
    if ts < now - tolerance:
        raise SignatureError(f"webhook-timestamp too old ({now - ts:.0f}s > {tolerance:.0f}s)")
    if ts > now + tolerance:
        raise SignatureError(f"webhook-timestamp too far in the future ({ts - now:.0f}s)")

    candidates: list[bytes] = []
    for part in sig_text.split()[:_MAX_SIGNATURES]:
        version, sep, encoded = part.partition(",")
        if version != "v1" or not sep:
            continue  # v1a (ed25519) or a future scheme: not ours to check
        try:
            candidates.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    if not candidates:
        raise SignatureError("malformed webhook-signature header (no v1 signature)")
    expected = _signature(key, msg_id, ts_text, bytes(body))
    # Compare against every candidate (no early exit) in constant time each.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("no matching signature (wrong secret or altered body)")
    if replay is not None and replay.seen(msg_id, ts, now):
        raise SignatureError(f"replayed message {msg_id!r}")
    return msg_id
