"""A signed webhook sink for governance notifications (tool and run failures, blocks,
budget thresholds), in memory: a standalone building block. ``guard.gov`` no longer uses
it: its notifications go through the durable outbox (:mod:`.outbox`).

:meth:`WebhookSink.deliver` never blocks the governed call and never raises: it redacts
the event (:data:`~onceonly_core.governance.redact.default_redactor`), encodes it as
canonical JSON and queues it; one daemon thread per sink POSTs it, signed with the
Standard Webhooks scheme (:func:`~onceonly_core.governance.signing.sign`).

Delivery is at least once, best effort:

* Every event gets an ``id`` (``evt_...``, kept if the event has one) that is both in the
  signed body and the ``webhook-id`` header, the same on every retry, as the Standard
  Webhooks spec asks; receivers dedupe on it. Each attempt is re-signed with its own,
  strictly increasing timestamp, so a :class:`~onceonly_core.governance.signing.ReplayCache`
  (keyed on id and timestamp) accepts a retry and rejects a verbatim replay.
* Retried: connection errors, timeouts, 408, 429 and 5xx, up to ``max_retries`` times with
  exponential backoff and jitter (a ``Retry-After`` of up to 30 s is honoured). Other
  statuses drop the event with a warning.
* A full queue drops the new event with a warning (a governed call must not wait on a
  slow receiver). Events still queued when the process exits are lost: call
  :meth:`flush` or :meth:`close` at shutdown.

Log lines name the event type and id, never the body or the secret.

Egress (``docs/security.md``): the url is checked when the sink is made (form and literal
address, :func:`~onceonly_core.egress.check_url`) and every connection goes through the
guarded transport (the host resolved once, every address public or allowlisted, the
socket opened to a checked address). A refused destination drops the event with a
warning; it is not retried. Redirects are not followed, and the receiver's response body
is never read (only its status matters), so a receiver cannot make the sink buffer it.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from .. import egress
from ..errors import ConfigError, MissingExtraError
from .redact import default_redactor
from .remote import _retry_after, _safe_url
from .signing import _ID, secret_key, sign

__all__ = ["EVENT_TYPES", "WebhookSink"]

log = logging.getLogger("onceonly.governance.webhooks")

#: The notification types governance emits.
EVENT_TYPES: tuple[str, ...] = ("tool_failed", "run_failed", "blocked", "budget_threshold")

BACKOFF_BASE = 0.5
BACKOFF_MAX = 10.0
RETRY_AFTER_CAP = 30.0
_RETRY_STATUSES = frozenset({408, 429})


class _Item:
    __slots__ = ("body", "event_id", "event_type")

    def __init__(self, event_id: str, event_type: str, body: bytes) -> None:
        self.event_id = event_id
        self.event_type = event_type
        self.body = body


class WebhookSink:
    """POSTs signed notification events to ``url`` from a background thread.

    ``events``: the event types (exact names or globs) this sink wants; ``None`` = all.
    ``timeout``: seconds per HTTP attempt. ``max_retries``: retries after the first try.
    ``egress_allow``: allowlist entries added to ``ONCEONLY_EGRESS_ALLOW``
    (:mod:`onceonly_core.egress`). A url the egress guard refuses raises
    :class:`~onceonly_core.egress.EgressRefused` (a ``ConfigError``).
    """

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        events: Iterable[str] | None = None,
        timeout: float = 5.0,
        max_retries: int = 3,
        queue_size: int = 1000,
        egress_allow: egress.AllowSpec = None,
    ) -> None:
        try:
            import httpx  # noqa: F401  (fail at configuration, not in the worker thread)
        except ImportError:
            raise MissingExtraError("the webhook sink", "http", "httpx") from None
        self.shown_url = _safe_url(url)
        if not self.shown_url:
            raise ConfigError("webhook url must be http:// or https:// with a host")
        self._allow = egress.Egress.of(egress_allow)
        # The form and a literal address now; names are judged at every connection.
        egress.check_url(url, self._allow, resolve_names=False)
        self._key = secret_key(secret)  # validates it; the str itself is not kept
        self.url = url
        self.events: frozenset[str] | None = None if events is None else frozenset(events)
        if timeout <= 0 or max_retries < 0 or queue_size < 1:
            raise ConfigError("WebhookSink needs timeout > 0, max_retries >= 0, queue_size >= 1")
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.queue_size = int(queue_size)
        self.dropped = 0
        """Events dropped so far (queue full, refused by the receiver, retries exhausted)."""
        self.delivered = 0
        self._queue: collections.deque[_Item] = collections.deque()
        self._pending = 0  # queued + in flight
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = 0

    @classmethod
    def stored(
        cls, url: str, secret: str, *, egress_allow: egress.AllowSpec = None
    ) -> WebhookSink | _Refused:
        """The sink for a webhook stored in the ledger. A row that cannot be used any more
        (its url refused by today's egress settings, a malformed secret) gives a sink that
        drops every event with a warning: a notification must never fail the governed
        call that raised it."""
        try:
            return cls(url, secret, egress_allow=egress_allow)
        except ConfigError as exc:
            shown = _safe_url(url) or "(invalid url)"
            log.warning("webhook %s is not usable (%s); its events are dropped", shown, exc)
            return _Refused(shown)

    # -- producer side ------------------------------------------------------------------
    def wants(self, event_type: str) -> bool:
        """True when this sink is subscribed to ``event_type``."""
        if self.events is None:
            return True
        return any(event_type == p or fnmatch.fnmatchcase(event_type, p) for p in self.events)

    def deliver(self, event: dict[str, Any]) -> None:
        """Queue ``event`` for delivery; returns at once and never raises."""
        try:
            self._enqueue(event)
        except Exception:  # a notification must never break the governed call
            log.exception("webhook sink: could not queue an event")

    def _enqueue(self, event: Any) -> None:
        if self._closed:
            log.warning("webhook sink %s is closed; event dropped", self.shown_url)
            return
        data = default_redactor.redact(event)
        if not isinstance(data, dict):
            data = {"type": "unknown", "data": data}
        event_type = str(data.get("type", "unknown"))
        if not self.wants(event_type):
            return
        event_id = data.get("id")
        if not (isinstance(event_id, str) and _ID.match(event_id)):  # must be a valid webhook-id
            event_id = f"evt_{uuid.uuid4().hex}"
        data["id"] = event_id
        body = json.dumps(
            data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
        with self._cond:
            if len(self._queue) >= self.queue_size:
                self.dropped += 1
                log.warning(
                    "webhook sink %s: queue full (%d); dropped %s event %s",
                    self.shown_url,
                    self.queue_size,
                    event_type,
                    event_id,
                )
                return
            self._queue.append(_Item(event_id, event_type, body))
            self._pending += 1
            self._ensure_worker()
            self._cond.notify_all()

    def _ensure_worker(self) -> None:
        # Started lazily, and again in a forked child (threads do not survive fork).
        if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = threading.Thread(
                target=self._run, name="onceonly-webhook-sink", daemon=True
            )
            self._thread.start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event is delivered or dropped; False on timeout."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        """Stop accepting events, give queued ones ``timeout`` seconds, stop the worker."""
        if self._closed:
            return
        self._closed = True
        self.flush(self.timeout)
        self._stop.set()
        with self._cond:
            left = len(self._queue)
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.timeout + 1.0)
        if left:
            log.warning("webhook sink %s closed with %d undelivered events", self.shown_url, left)

    # -- worker side --------------------------------------------------------------------
    def _run(self) -> None:
        import httpx

        client = httpx.Client(
            timeout=httpx.Timeout(self.timeout),
            follow_redirects=False,
            transport=egress.transport(self._allow),
        )
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stop.is_set():
                        self._cond.wait()
                    if self._stop.is_set():
                        dropped = len(self._queue)
                        self._queue.clear()
                        self._pending -= dropped
                        self.dropped += dropped
                        self._cond.notify_all()
                        return
                    item = self._queue.popleft()
                try:
                    ok = self._send(client, item, httpx)
                except Exception:  # the worker must survive anything
                    log.exception("webhook sink %s: delivery crashed", self.shown_url)
                    ok = False
                with self._cond:
                    if ok:
                        self.delivered += 1
                    else:
                        self.dropped += 1
                    self._pending -= 1
                    self._cond.notify_all()
        finally:
            client.close()

    def _send(self, client: Any, item: _Item, httpx: Any) -> bool:
        last_ts = 0
        reason = ""
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                reason = "sink closed"
                break
            ts = max(int(time.time()), last_ts + 1)
            last_ts = ts
            headers = sign(self._key, item.body, msg_id=item.event_id, timestamp=ts)
            headers["Content-Type"] = "application/json"
            headers["User-Agent"] = "onceonly-core"
            retry_after: float | None = None
            try:
                # Streamed and closed unread: only the status matters, and a receiver must
                # not be able to make the sink buffer a large body.
                with client.stream("POST", self.url, content=item.body, headers=headers) as resp:
                    status = resp.status_code
                    retry_header = resp.headers.get("retry-after")
            except egress.EgressRefused as exc:
                reason = f"refused by the egress guard: {exc}"
                break
            except httpx.HTTPError as exc:
                reason = type(exc).__name__
            else:
                if 200 <= status < 300:
                    return True
                reason = f"HTTP {status}"
                if not (status >= 500 or status in _RETRY_STATUSES):
                    break
                retry_after = _retry_after(retry_header)
            if attempt == self.max_retries:
                break
            if retry_after is not None and retry_after <= RETRY_AFTER_CAP:
                delay = retry_after
            else:
                delay = random.uniform(0.0, min(BACKOFF_MAX, BACKOFF_BASE * (2**attempt)))
            log.info(
                "webhook sink %s: %s event %s attempt %d failed (%s); retrying in %.2fs",
                self.shown_url,
                item.event_type,
                item.event_id,
                attempt + 1,
                reason,
                delay,
            )
            if self._stop.wait(delay):
                reason = "sink closed"
                break
        log.warning(
            "webhook sink %s: dropped %s event %s (%s)",
            self.shown_url,
            item.event_type,
            item.event_id,
            reason,
        )
        return False


class _Refused:
    """Stands in for a stored webhook that can no longer be used: drops every event."""

    def __init__(self, shown_url: str) -> None:
        self.shown_url = shown_url
        self.dropped = 0
        self.delivered = 0

    def wants(self, event_type: str) -> bool:
        return True

    def deliver(self, event: dict[str, Any]) -> None:
        self.dropped += 1
        log.warning("webhook %s is not usable; event dropped", self.shown_url)

    def flush(self, timeout: float = 5.0) -> bool:
        return True

    def close(self) -> None:
        pass
