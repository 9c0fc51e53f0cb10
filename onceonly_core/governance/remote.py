"""Calling a registered remote HTTP tool (``ToolSpec(kind="http")``), sync and async.

Protocol (also in ``docs/governance-signing.md``):

* **Request.** ``POST spec.url`` with the payload as canonical JSON (sorted keys, no
  spaces, UTF-8, NaN/Infinity refused) and the headers ``Content-Type: application/json``,
  ``Accept: application/json``, ``Idempotency-Key: <key>`` and, when
  ``spec.auth == "hmac_sha256"``, the Standard Webhooks headers from
  :func:`~onceonly_core.governance.signing.sign`. Redirects are never followed (a signed
  body must not be forwarded to another host).
* **Message id and timestamps.** ``webhook-id`` is derived from the idempotency key
  (``msg_`` + 32 hex digits of its SHA-256), so it names the logical call and is the same
  on every retry, and even when the engine re-runs the call after a crash, as the Standard
  Webhooks spec asks. Each attempt is signed afresh with its own ``webhook-timestamp``,
  strictly increasing within one call (bumped by a second when a retry comes within the
  same second). A receiver's :class:`~onceonly_core.governance.signing.ReplayCache`
  keys on ``(id, timestamp)``: it rejects a captured request sent again verbatim and
  accepts a legitimate retry, which only a holder of the secret can sign. Receivers dedupe
  *effects* on ``Idempotency-Key`` (or on ``webhook-id``, which is equivalent).
* **Timeout.** ``spec.timeout_ms`` bounds each attempt: connecting, sending, waiting for
  the response and reading it. Each network wait is bounded by it and the whole attempt is
  checked against it between reads, so a server that drips bytes is cut off too.
* **Retries** (at most ``spec.max_retries``, exponential backoff with full jitter, a
  ``Retry-After`` of up to :data:`RETRY_AFTER_CAP` seconds honoured; a longer one ends the
  call): only when the request did not reach the tool (connect error, refused, connect or
  pool timeout) or the server says to retry (429, 502, 503, 504). Every attempt carries
  the same ``Idempotency-Key``: a 502/504 from a gateway may hide a tool that did run, and
  the key is what makes re-sending it safe on a receiver that honours it.
  **A read timeout is not retried**: the request was delivered and the tool is most likely
  still running, so a retry would double the wait the caller agreed to and, on a receiver
  without the key, run the effect twice. It fails with ``retryable=False``; the engine's
  unknown-outcome policy decides, and a later call with the same key is deduplicated by
  the receiver. Other transport errors after sending (reset, protocol error) are not
  retried for the same reason.
* **Response** (untrusted input, OWASP API10). A 2xx must be ``application/json`` (or
  ``application/*+json``), at most ``max_response_bytes`` once decompressed (enforced
  while streaming), valid UTF-8 JSON without NaN/Infinity, duplicate keys or nesting
  deeper than :data:`MAX_RESULT_DEPTH`. A body that is exactly ``{"result": X}`` returns
  ``X``; any other JSON value is returned as it is. 204 returns ``None``. Anything else
  raises :class:`~onceonly_core.errors.RemoteToolError` (parser exceptions never leak).
* **Errors.** 3xx/4xx/5xx raise ``RemoteToolError(status=..., retryable=...)`` naming the
  status, the content type and the size of the body, never the body itself: an error
  text travels back to the caller (``/v1/ai/run``), and echoing bodies would turn a
  request to an internal service into a way of reading it. At most
  :data:`ERROR_BODY_BYTES` of an error body are read, and 200 characters of it,
  whitespace-collapsed and redacted, go to the DEBUG log only. ``retryable`` is true for
  429/502/503/504 and connection failures. The secret never appears in a message or a
  log line; URLs are shown without userinfo and query.
* **Egress** (``docs/security.md``). The URL is checked by :func:`~onceonly_core.egress.check_url`
  and every connection by the guarded transport (:func:`~onceonly_core.egress.transport`):
  the host is resolved once, every address must be public or allowlisted
  (``egress_allow`` plus ``ONCEONLY_EGRESS_ALLOW``), and the socket goes to a checked
  address. A refused destination raises ``RemoteToolError(retryable=False)``; nothing was
  sent. A ``client`` you pass keeps its own transport: the URL and the addresses its host
  resolves to are checked before each call, but the connection is not pinned, so give it
  ``transport=egress.transport(...)`` when the URL is not yours.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from .. import egress
from ..errors import CodecError, ConfigError, MissingExtraError, RemoteToolError
from .models import ToolSpec
from .redact import default_redactor
from .signing import secret_key, sign

if TYPE_CHECKING:
    import httpx

__all__ = [
    "ERROR_BODY_BYTES",
    "MAX_RESULT_DEPTH",
    "RETRY_AFTER_CAP",
    "RETRY_STATUSES",
    "acall_http_tool",
    "call_http_tool",
]

log = logging.getLogger("onceonly.governance.remote")

#: Statuses that ask for a retry (the tool did not run, or the key makes re-sending safe).
RETRY_STATUSES: frozenset[int] = frozenset({429, 502, 503, 504})
#: Longest ``Retry-After`` we wait for, in seconds; a longer one fails the call (retryable).
RETRY_AFTER_CAP = 10.0
#: First backoff step and its ceiling, in seconds (full jitter: uniform in [0, step]).
BACKOFF_BASE = 0.1
BACKOFF_MAX = 2.0
#: Deepest JSON nesting accepted in a response.
MAX_RESULT_DEPTH = 100
#: Most bytes of an error body read (for the DEBUG log; the rest is discarded unread).
ERROR_BODY_BYTES = 4096
_MESSAGE_CHARS = 200
_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
_SPACE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise MissingExtraError("remote HTTP tools", "http", "httpx") from None
    return httpx


# -- preparing a call -----------------------------------------------------------------------
class _Call:
    """Everything about one logical call that does not depend on the transport."""

    def __init__(
        self,
        spec: ToolSpec,
        secret: str | None,
        payload: Any,
        idempotency_key: str,
        max_response_bytes: int,
        allow: egress.AllowSpec = None,
        *,
        pinned: bool = True,
    ) -> None:
        if spec.kind != "http" or not spec.url:
            raise ConfigError(f"tool {spec.name!r} is not a remote HTTP tool (no url)")
        self.name = spec.name
        self.url = spec.url
        self.shown_url = _safe_url(spec.url)
        if not self.shown_url:
            raise ConfigError(f"tool {spec.name!r}: url must be http:// or https:// with a host")
        self.allow = egress.Egress.of(allow)
        try:
            # The form and, for a literal host, the address; a name is judged on the address
            # the guarded transport connects to (or here, when the caller's client is used).
            egress.check_url(spec.url, self.allow, resolve_names=not pinned)
        except egress.EgressRefused as exc:
            self.fail(f"refused by the egress guard: {exc}; nothing was sent")
        if not isinstance(idempotency_key, str) or not _KEY.match(idempotency_key):
            raise ConfigError("idempotency_key must be 1-255 printable ASCII characters")
        self.secret = secret
        self.key: bytes | None = None
        if spec.auth == "hmac_sha256":
            if not secret:
                raise ConfigError(f"tool {spec.name!r} uses hmac_sha256 but has no secret")
            self.key = secret_key(secret)
        try:
            text = json.dumps(
                payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
            )
            self.body = text.encode("utf-8")
        except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as exc:
            raise CodecError(
                f"payload for tool {spec.name!r} is not JSON: {type(exc).__name__}"
            ) from None
        self.idempotency_key = idempotency_key
        self.msg_id = "msg_" + hashlib.sha256(idempotency_key.encode("ascii")).hexdigest()[:32]
        self.timeout = spec.timeout_ms / 1000.0
        self.retries = spec.max_retries
        self.max_bytes = max(0, int(max_response_bytes))
        self._last_ts = 0

    def headers(self) -> dict[str, str]:
        out = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Idempotency-Key": self.idempotency_key,
            "User-Agent": "onceonly-core",
        }
        if self.key is not None:
            # A fresh timestamp per attempt, strictly increasing, so (id, ts) is never reused.
            ts = max(int(time.time()), self._last_ts + 1)
            self._last_ts = ts
            out.update(sign(self.key, self.body, msg_id=self.msg_id, timestamp=ts))
        return out

    def timeouts(self) -> Any:
        return _httpx().Timeout(self.timeout)

    # -- errors -------------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        """Printable, redacted, secret-free, at most 200 characters."""
        text = _SPACE.sub(" ", _CONTROL.sub(" ", text)).strip()
        if self.secret:
            text = text.replace(self.secret, "[REDACTED]")
        text = default_redactor.redact_text(text)
        if self.secret:
            text = text.replace(self.secret, "[REDACTED]")
        if len(text) > _MESSAGE_CHARS:
            text = text[: _MESSAGE_CHARS - 3] + "..."
        return text

    def fail(self, what: str, *, status: int | None = None, retryable: bool = False) -> NoReturn:
        raise RemoteToolError(
            f"remote tool {self.name!r} ({self.shown_url}): {what}",
            status=status,
            retryable=retryable,
        )

    def transport_error(self, exc: Exception, hx: Any) -> RemoteToolError:
        """Map an httpx exception; ``retryable`` only when the request was not sent."""
        kind = type(exc).__name__
        detail = self.scrub(str(exc))
        reason = f"{kind}: {detail}" if detail else kind
        if isinstance(exc, (hx.ConnectError, hx.ConnectTimeout, hx.PoolTimeout)):
            return RemoteToolError(
                f"remote tool {self.name!r} ({self.shown_url}): could not connect ({reason})",
                retryable=True,
            )
        if isinstance(exc, hx.TimeoutException):
            return self.timed_out()
        return RemoteToolError(
            f"remote tool {self.name!r} ({self.shown_url}): transport error after the request "
            f"was sent ({reason}); the tool may have run"
        )

    def timed_out(self) -> RemoteToolError:
        return RemoteToolError(
            f"remote tool {self.name!r} ({self.shown_url}): timed out after "
            f"{self.timeout * 1000:.0f} ms; the tool may have run"
        )

    # -- responses ----------------------------------------------------------------------
    def check_head(self, status: int, headers: Any) -> bool:
        """Validate a 2xx's headers; True when a body is to be read and parsed."""
        if status == 204:
            return False
        ctype = str(headers.get("content-type", "")).split(";", 1)[0].strip().lower()
        if not (
            ctype == "application/json"
            or (ctype.startswith("application/") and ctype.endswith("+json"))
        ):
            self.fail(
                f"answered HTTP {status} with content-type {self.scrub(ctype)!r}, "
                "not application/json",
                status=status,
            )
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            self.fail(
                f"response of {int(length)} bytes exceeds the {self.max_bytes}-byte limit",
                status=status,
            )
        return True

    def too_big(self, status: int) -> NoReturn:
        self.fail(f"response exceeds the {self.max_bytes}-byte limit", status=status)

    def parse(self, status: int, data: bytes) -> Any:
        try:
            value = json.loads(
                data.decode("utf-8"),
                parse_constant=_reject_constant,
                object_pairs_hook=_no_duplicates,
            )
            _check_depth(value)
        except (ValueError, RecursionError, TypeError):
            # UnicodeDecodeError and JSONDecodeError are ValueErrors; none is chained, so no
            # fragment of the body reaches logs through __cause__.
            value = _INVALID
        if value is _INVALID:
            self.fail(f"answered HTTP {status} with a body that is not valid JSON", status=status)
        if isinstance(value, dict) and len(value) == 1 and "result" in value:
            return value["result"]
        return value

    def error_for(self, status: int, headers: Any, snippet: bytes) -> _Failed:
        """The failure for a non-2xx status, with the server's Retry-After. The message
        names the status, type and size of the body, never its text (docstring, Errors)."""
        retryable = status in RETRY_STATUSES
        if snippet and log.isEnabledFor(logging.DEBUG):
            text = self.scrub(snippet.decode("utf-8", "replace"))
            log.debug("remote tool %r: HTTP %d body starts %r", self.name, status, text)
        ctype = self.scrub(str(headers.get("content-type", "")).split(";", 1)[0].strip())
        size = _body_size(headers, snippet)
        body = f"{size} body" + (f", {ctype}" if ctype and size != "empty" else "")
        if 300 <= status < 400:
            what = f"answered HTTP {status} (redirects are not followed)"
        else:
            what = f"answered HTTP {status} ({body})"
        err = RemoteToolError(
            f"remote tool {self.name!r} ({self.shown_url}): {what}",
            status=status,
            retryable=retryable,
        )
        return _Failed(err, _retry_after(headers.get("retry-after")) if retryable else None)

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return random.uniform(0.0, min(BACKOFF_MAX, BACKOFF_BASE * (2**attempt)))

    def give_up_on(self, err: RemoteToolError, attempt: int, retry_after: float | None) -> bool:
        if attempt >= self.retries or not err.retryable:
            return True
        if retry_after is not None and retry_after > RETRY_AFTER_CAP:
            log.warning(
                "remote tool %r: server asked to retry after %.0fs (cap %.0fs); giving up",
                self.name,
                retry_after,
                RETRY_AFTER_CAP,
            )
            return True
        return False

    def final(self, err: RemoteToolError, attempts: int) -> RemoteToolError:
        if attempts <= 1:
            return err
        return RemoteToolError(
            f"{err} (after {attempts} attempts)", status=err.status, retryable=err.retryable
        )


_INVALID: Any = object()


class _Done:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _Failed:
    """A failed attempt: ``error`` and the server's Retry-After (None: use backoff)."""

    __slots__ = ("error", "retry_after")

    def __init__(self, error: RemoteToolError, retry_after: float | None = None) -> None:
        self.error = error
        self.retry_after = retry_after


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _check_depth(value: Any) -> None:
    # Iterative, so a deep (but parseable) result cannot exhaust the stack later on.
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth >= MAX_RESULT_DEPTH:
                raise ValueError("nested too deeply")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    delay = when.timestamp() - time.time()
    return max(0.0, delay) if math.isfinite(delay) else None


def _safe_url(url: str) -> str:
    """scheme://host[:port]/path, without userinfo, query or fragment; '' if unusable."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return ""
    if parts.scheme not in ("http", "https") or not host:
        return ""
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _body_size(headers: Any, snippet: bytes) -> str:
    length = str(headers.get("content-length", "")).strip()
    if length.isdigit():
        n = int(length)
    elif len(snippet) < ERROR_BODY_BYTES:
        n = len(snippet)
    else:
        return f"over {ERROR_BODY_BYTES}-byte"
    return f"{n}-byte" if n else "empty"


def _refused(call: _Call, exc: egress.EgressRefused) -> RemoteToolError:
    # Raised from the guarded transport's connect: no byte of the request left this host.
    return RemoteToolError(
        f"remote tool {call.name!r} ({call.shown_url}): refused by the egress guard: {exc}; "
        "nothing was sent",
        retryable=False,
    )


def _collect(chunks: Iterator[bytes], call: _Call, status: int, deadline: float) -> bytes:
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        if len(buf) > call.max_bytes:
            call.too_big(status)
        if time.monotonic() > deadline:
            raise call.timed_out()
    return bytes(buf)


def _snippet_sync(resp: Any) -> bytes:
    buf = bytearray()
    try:
        for chunk in resp.iter_bytes():
            buf += chunk
            if len(buf) >= ERROR_BODY_BYTES:
                break
    except Exception:  # the error body is a courtesy: a broken one must not mask the status
        pass
    return bytes(buf[:ERROR_BODY_BYTES])


async def _snippet_async(resp: Any) -> bytes:
    buf = bytearray()
    try:
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) >= ERROR_BODY_BYTES:
                break
    except Exception:
        pass
    return bytes(buf[:ERROR_BODY_BYTES])


def _transport_failure(call: _Call, exc: Exception, hx: Any) -> _Failed:
    err = call.transport_error(exc, hx)
    if not err.retryable:
        raise err from None
    return _Failed(err)


# -- sync ---------------------------------------------------------------------------------
def call_http_tool(
    spec: ToolSpec,
    secret: str | None,
    payload: dict[str, Any],
    *,
    idempotency_key: str,
    client: httpx.Client | None = None,
    max_response_bytes: int = 1_048_576,
    egress_allow: egress.AllowSpec = None,
) -> Any:
    """POST ``payload`` to the remote tool and return its (validated) JSON result.

    ``client`` is used as given (and not closed); by default a client is made for the call
    over the egress-guarded transport. ``egress_allow``: allowlist entries added to
    ``ONCEONLY_EGRESS_ALLOW`` (see :mod:`onceonly_core.egress`).
    Raises :class:`RemoteToolError`; :class:`ConfigError`/:class:`CodecError` for a spec,
    key or payload that cannot be sent; :class:`MissingExtraError` without httpx.
    """
    hx = _httpx()
    own = client is None
    call = _Call(
        spec, secret, payload, idempotency_key, max_response_bytes, egress_allow, pinned=own
    )
    http: httpx.Client = (
        hx.Client(follow_redirects=False, transport=egress.transport(call.allow))
        if client is None
        else client
    )
    try:
        attempt = 0
        while True:
            outcome = _attempt_sync(call, http, hx)
            if isinstance(outcome, _Done):
                return outcome.value
            err, retry_after = outcome.error, outcome.retry_after
            if call.give_up_on(err, attempt, retry_after):
                raise call.final(err, attempt + 1)
            delay = call.backoff(attempt, retry_after)
            log.info(
                "remote tool %r: attempt %d failed (%s); retrying in %.2fs",
                call.name,
                attempt + 1,
                err,
                delay,
            )
            time.sleep(delay)
            attempt += 1
    finally:
        if own:
            http.close()


def _attempt_sync(call: _Call, http: Any, hx: Any) -> _Done | _Failed:
    deadline = time.monotonic() + call.timeout
    try:
        with http.stream(
            "POST",
            call.url,
            content=call.body,
            headers=call.headers(),
            timeout=call.timeouts(),
            follow_redirects=False,
        ) as resp:
            status = resp.status_code
            if 200 <= status < 300:
                if not call.check_head(status, resp.headers):
                    return _Done(None)
                data = _collect(resp.iter_bytes(), call, status, deadline)
                return _Done(call.parse(status, data))
            return call.error_for(status, resp.headers, _snippet_sync(resp))
    except RemoteToolError:
        raise
    except egress.EgressRefused as exc:
        raise _refused(call, exc) from None
    except hx.HTTPError as exc:
        return _transport_failure(call, exc, hx)
    except Exception as exc:  # anything else from the transport stays inside our error type
        raise RemoteToolError(
            f"remote tool {call.name!r} ({call.shown_url}): unexpected {type(exc).__name__}"
        ) from None


# -- async --------------------------------------------------------------------------------
async def acall_http_tool(
    spec: ToolSpec,
    secret: str | None,
    payload: dict[str, Any],
    *,
    idempotency_key: str,
    client: httpx.AsyncClient | None = None,
    max_response_bytes: int = 1_048_576,
    egress_allow: egress.AllowSpec = None,
) -> Any:
    """The async twin of :func:`call_http_tool` (same protocol, retries and errors)."""
    hx = _httpx()
    own = client is None
    call = _Call(
        spec, secret, payload, idempotency_key, max_response_bytes, egress_allow, pinned=own
    )
    http: httpx.AsyncClient = (
        hx.AsyncClient(follow_redirects=False, transport=egress.async_transport(call.allow))
        if client is None
        else client
    )
    try:
        attempt = 0
        while True:
            outcome = await _attempt_async(call, http, hx)
            if isinstance(outcome, _Done):
                return outcome.value
            err, retry_after = outcome.error, outcome.retry_after
            if call.give_up_on(err, attempt, retry_after):
                raise call.final(err, attempt + 1)
            delay = call.backoff(attempt, retry_after)
            log.info(
                "remote tool %r: attempt %d failed (%s); retrying in %.2fs",
                call.name,
                attempt + 1,
                err,
                delay,
            )
            await asyncio.sleep(delay)
            attempt += 1
    finally:
        if own:
            await http.aclose()


async def _attempt_async(call: _Call, http: Any, hx: Any) -> _Done | _Failed:
    deadline = time.monotonic() + call.timeout
    try:
        async with http.stream(
            "POST",
            call.url,
            content=call.body,
            headers=call.headers(),
            timeout=call.timeouts(),
            follow_redirects=False,
        ) as resp:
            status = resp.status_code
            if 200 <= status < 300:
                if not call.check_head(status, resp.headers):
                    return _Done(None)
                buf = bytearray()
                async for chunk in resp.aiter_bytes():
                    buf += chunk
                    if len(buf) > call.max_bytes:
                        call.too_big(status)
                    if time.monotonic() > deadline:
                        raise call.timed_out()
                return _Done(call.parse(status, bytes(buf)))
            return call.error_for(status, resp.headers, await _snippet_async(resp))
    except RemoteToolError:
        raise
    except egress.EgressRefused as exc:
        raise _refused(call, exc) from None
    except hx.HTTPError as exc:
        return _transport_failure(call, exc, hx)
    except Exception as exc:  # anything else from the transport stays inside our error type
        raise RemoteToolError(
            f"remote tool {call.name!r} ({call.shown_url}): unexpected {type(exc).__name__}"
        ) from None
