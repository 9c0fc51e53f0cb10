"""Durable notifications: an outbox table and its deliverer (issue 16 item 3).

A governance decision that notifies (a call blocked, a tool failed) writes its outbox rows
in the *same transaction* as its audit row (:meth:`GovStore._append
<onceonly_core.stores.govsql.GovStore>`): the decision and its notification commit
together or not at all. ``run_failed`` and ``budget_threshold`` are written in their own
transaction right after the event that raised them. One row per destination:

* ``webhook:<id>``: a stored webhook (``gov.add_webhook``), POSTed with the Standard
  Webhooks headers (:func:`~onceonly_core.governance.signing.sign`);
* ``slack``: a Slack-compatible incoming webhook (``{"text": ...}``), at
  ``ONCEONLY_NOTIFY_SLACK_URL``;
* ``email:<address>``: a mail over SMTP (stdlib :mod:`smtplib`) to each address in
  ``ONCEONLY_NOTIFY_EMAIL_TO``, through ``ONCEONLY_SMTP_HOST`` / ``_PORT`` /
  ``_STARTTLS`` / ``_USER`` / ``_PASSWORD`` / ``_FROM``.

The :class:`Deliverer` claims due rows with a conditional ``UPDATE`` that takes a lease
(``state='pending' AND next_attempt_at <= now`` → a fresh ``lease_token`` and
``next_attempt_at = now + lease``): of two replicas racing for a row, exactly one update
matches, and a deliverer that dies mid-send leaves a row that becomes due again when its
lease ends. It sends, then marks the row delivered *if it still holds the lease*.
Failures are retried with exponential backoff and jitter up to ``max_attempts``, then the
row is ``dead`` (``onceonly notify list --state dead``, ``onceonly notify retry ID``).

Delivery is **at least once**, never exactly once: a deliverer killed after the receiver
got the event and before the row was marked sends it again. Every resend carries the same
event id (``webhook-id`` header and ``id`` in the body; the mail's ``Message-ID``), so a
receiver that dedupes on it has exactly one effect.

Payloads are redacted (:mod:`onceonly_core.redact`) before they are stored; a failure's
``last_error`` is redacted and never holds the receiver's response body (it is not read).
Every URL goes through the egress guard (:mod:`onceonly_core.egress`) at each connection,
and so does the SMTP host.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import random
import smtplib
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .. import egress
from ..errors import ConfigError
from ..protocol import safe_str
from ..stores import governance as _gov
from ..stores import govsql as _govsql
from ..stores import schema as S
from .redact import default_redactor
from .remote import _safe_url
from .signing import _ID, sign

if TYPE_CHECKING:
    from ..stores.governance import OutboxStore

__all__ = ["STATES", "Deliverer", "Settings", "add", "make_event"]

log = logging.getLogger("onceonly.governance.outbox")

STATES = ("pending", "delivered", "dead")

#: Set by ``onceonly serve``: a tenant's stored notification preferences (``POST
#: /v1/me/notifications``), read on the decision's own connection; ``None`` (embedded
#: use, or a tenant the server does not know): no preferences, every channel is used.
#: They choose the e-mails: ``email_notifications_enabled``, and per event
#: ``tool_error_notifications_enabled`` (tool_failed) and
#: ``run_failure_notifications_enabled`` (run_failed). Webhooks and Slack are chosen
#: by configuring them.
preferences: Callable[[sa.Connection, str], Mapping[str, Any] | None] | None = None
_PREF_OF = {
    "tool_failed": "tool_error_notifications_enabled",
    "run_failed": "run_failure_notifications_enabled",
}
_RETRY_STATUSES = frozenset({408, 429})
_O = S.outbox


@dataclass
class Settings:
    """Channels and delivery knobs; :meth:`from_env` reads ``ONCEONLY_NOTIFY_*`` and
    ``ONCEONLY_SMTP_*``. The process that governs calls decides which channels an event
    goes to (when it writes the rows); the deliverer needs the same settings to send."""

    slack_url: str | None = None
    email_to: tuple[str, ...] = ()
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_from: str = "onceonly@localhost"
    max_attempts: int = 8
    backoff_base: float = 5.0
    backoff_max: float = 3600.0
    lease: float = 60.0
    timeout: float = 10.0
    in_process: bool = True
    egress_allow: egress.AllowSpec = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        e = os.environ if env is None else env

        def num(name: str, default: float) -> float:
            raw = e.get(name)
            if not raw:
                return default
            try:
                return float(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {raw!r}") from None

        to = tuple(a.strip() for a in e.get("ONCEONLY_NOTIFY_EMAIL_TO", "").split(",") if a.strip())
        values: dict[str, Any] = {
            "slack_url": e.get("ONCEONLY_NOTIFY_SLACK_URL") or None,
            "email_to": to,
            "smtp_host": e.get("ONCEONLY_SMTP_HOST") or None,
            "smtp_port": int(num("ONCEONLY_SMTP_PORT", 25)),
            "smtp_starttls": e.get("ONCEONLY_SMTP_STARTTLS", "").lower() in ("1", "true", "yes"),
            "smtp_user": e.get("ONCEONLY_SMTP_USER") or None,
            "smtp_password": e.get("ONCEONLY_SMTP_PASSWORD") or None,
            "smtp_from": e.get("ONCEONLY_SMTP_FROM") or "onceonly@localhost",
            "max_attempts": int(num("ONCEONLY_NOTIFY_MAX_ATTEMPTS", 8)),
            "backoff_base": num("ONCEONLY_NOTIFY_BACKOFF", 5.0),
            "lease": num("ONCEONLY_NOTIFY_LEASE", 60.0),
            "in_process": e.get("ONCEONLY_NOTIFY_IN_PROCESS", "1").lower()
            not in ("0", "false", "no", "off"),
        }
        values.update(overrides)
        s = cls(**values)
        if s.max_attempts < 1 or s.backoff_base < 0 or s.lease < 1 or s.timeout <= 0:
            raise ConfigError("notify settings need max_attempts >= 1, backoff >= 0, lease >= 1")
        return s

    def destinations(self) -> list[str]:
        """The channels configured here (stored webhooks are added per tenant)."""
        out = ["slack"] if self.slack_url else []
        return out + [f"email:{a}" for a in self.email_to]


def make_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event as stored and sent: redacted, with a stable ``id`` and a ``ts``."""
    data = default_redactor.redact({**event})
    if not isinstance(data, dict):
        data = {"type": "unknown", "data": data}
    eid = data.get("id")
    if not (isinstance(eid, str) and _ID.match(eid) and len(eid) <= 64):
        data["id"] = f"evt_{uuid.uuid4().hex}"
    data.setdefault("ts", time.time())
    return data


def _wants(row: Mapping[str, Any], event: Mapping[str, Any]) -> bool:
    if not row["enabled"]:
        return False
    kinds = json.loads(row["events"] or "[]")
    etype = str(event.get("type"))
    if kinds and not any(etype == k or fnmatch.fnmatchcase(etype, k) for k in kinds):
        return False
    if etype == "budget_threshold":
        # A webhook hears the crossing of its own threshold (0.8 unless it set one).
        data = event.get("data") or {}
        return bool((row["budget_threshold"] or 0.8) == (data.get("threshold") or 0.8))
    return True


def _mails_wanted(prefs: Mapping[str, Any], event_type: str) -> bool:
    if not prefs.get("email_notifications_enabled"):
        return False
    name = _PREF_OF.get(event_type)
    return name is None or bool(prefs.get(name))


def plan(
    tenant: str,
    event: Mapping[str, Any],
    webhooks: Sequence[Mapping[str, Any]],
    prefs: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> list[dict[str, Any]]:
    """``event``'s outbox rows, one per destination that wants it (``webhooks``: the
    tenant's stored rows; ``prefs``: its stored preferences, if any), without the state
    columns, which the store sets on its own clock when it writes them."""
    settings = settings or Settings.from_env()
    ev = make_event(event)
    dests = [f"webhook:{r['id']}" for r in webhooks if _wants(r, ev)]
    threshold = (
        (ev.get("data") or {}).get("threshold") if ev.get("type") == "budget_threshold" else None
    )
    if threshold in (None, 0.8):  # Slack and e-mail hear the default 80 % crossing only
        dests += settings.destinations()
    if prefs is not None and not _mails_wanted(prefs, str(ev.get("type"))):
        dests = [d for d in dests if not d.startswith("email:")]
    body = json.dumps(ev, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Ids in creation order (the clock, the row's place, then randomness): rows due at one
    # time are claimed oldest first on every store, Redis's sorted sets included, which
    # order equal due times by id.
    stamp, salt = f"{time.time_ns():016x}", uuid.uuid4().hex[:6]
    return [
        {
            "id": f"ntf_{stamp}{i:02x}{salt}",
            "event_id": ev["id"],
            "event_type": str(ev.get("type", "unknown"))[:64],
            "payload": body,
            "destination": d[:64],
        }
        for i, d in enumerate(dests)
    ]


def add(
    conn: sa.Connection,
    now: float,
    tenant: str,
    event: Mapping[str, Any],
    settings: Settings | None = None,
) -> int:
    """Write ``event``'s outbox rows on ``conn`` (inside the caller's transaction): one
    per destination that wants it. Returns how many."""
    w = S.webhooks
    hooks = [r._asdict() for r in conn.execute(sa.select(w).where(w.c.tenant == tenant)).all()]
    prefs = preferences(conn, tenant) if preferences is not None else None
    rows = plan(tenant, event, hooks, prefs, settings)
    if not rows:
        return 0
    state = {"state": "pending", "attempts": 0, "next_attempt_at": now, "created_at": now}
    conn.execute(sa.insert(_O), [{**r, "tenant": tenant, **state} for r in rows])
    return len(rows)


class _Fail(Exception):
    """A failed attempt; ``final``: retrying cannot help (dead at once)."""

    def __init__(self, reason: str, *, final: bool = False) -> None:
        super().__init__(reason)
        self.final = final


@dataclass
class _Claim:
    id: str
    tenant: str
    event_id: str
    event_type: str
    payload: str
    destination: str
    attempts: int
    token: str


class Deliverer:
    """Drains the outbox of ``store`` (one ``tenant``, or all when ``None``).

    :meth:`deliver_due` is one pass (claim, send, mark) and returns how many rows it
    handled; :meth:`drain` repeats until nothing is pending or the timeout; :meth:`run`
    loops until :meth:`stop` (``onceonly serve``, ``onceonly notify deliver --follow``).
    Safe to run in any number of processes at once: a row is claimed by one of them."""

    def __init__(
        self,
        store: OutboxStore,
        settings: Settings | None = None,
        *,
        tenant: str | None = None,
        on_sent: Callable[[_Claim], None] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings or Settings.from_env()
        self.tenant = tenant
        self._allow = egress.Egress.of(self.settings.egress_allow)
        self._stop = threading.Event()
        self._wake = threading.Event()  # a row was written here: look again now
        self._kick_lock = threading.Lock()
        self._on_sent = on_sent  # tests: a hook between send and mark
        self._client: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- claims ---------------------------------------------------------------------------
    def set_egress_allow(self, allow: egress.AllowSpec) -> None:
        """Use this outbound allowlist from the next connection on (``gov.egress_allow``
        changed after the deliverer was built)."""
        self.settings.egress_allow = allow
        self._allow = egress.Egress.of(allow)

    def claim(self, limit: int = 50) -> list[_Claim]:
        # The store claims atomically per row (a conditional UPDATE, a Lua script): of
        # two deliverers racing for a row exactly one gets it, with a lease that makes it
        # due again if we die before marking it.
        got = self.store.outbox_claim(self.tenant, limit, self.settings.lease)
        return [
            _Claim(
                r["id"],
                r["tenant"],
                r["event_id"],
                r["event_type"],
                r["payload"],
                r["destination"],
                int(r["attempts"]),
                r["lease_token"],
            )
            for r in got
        ]

    def _mark(self, c: _Claim, *, error: _Fail | None) -> None:
        s = self.settings
        if error is None:
            done = self.store.outbox_mark(c.tenant, c.id, c.token, "delivered", 0.0, None)
        else:
            dead = error.final or c.attempts >= s.max_attempts
            # Exponential backoff with "equal jitter": at least half the step, so the
            # schedule grows, and spread so replicas' retries do not line up.
            # At least a second apart: every attempt is signed with a new (whole
            # second) timestamp, so a receiver's replay cache accepts the resend.
            step = min(s.backoff_max, s.backoff_base * 2 ** (c.attempts - 1))
            delay = max(1.0, step / 2 + random.uniform(0, step / 2))
            state = "dead" if dead else "pending"
            done = self.store.outbox_mark(
                c.tenant, c.id, c.token, state, delay, safe_str(error)[:500]
            )
        # Only while we held the lease: if it ran out and another deliverer took the
        # row, its outcome is the one that counts.
        if not done:
            log.warning("outbox row %s: lease lost before it was marked", c.id)

    # -- passes ---------------------------------------------------------------------------
    def deliver_due(self, limit: int = 50) -> int:
        """One pass: claim due rows, send each, mark it. Never raises for a send.

        A claim is a lease: once it ends, another deliverer may claim the row and send it
        too (a second Slack message or e-mail, which no receiver dedupes). So a pass
        claims only as many rows as it can send inside one lease at the send timeout
        each, and starts no send after the first with less than a timeout of its lease
        left: those rows are due again when their lease ends (their claim counts as an
        attempt, as a crash's does)."""
        s = self.settings
        with self._lock:
            started = time.monotonic()
            claims = self.claim(min(limit, max(1, int(s.lease // s.timeout))))
            for i, c in enumerate(claims):
                if i and time.monotonic() - started + s.timeout > s.lease:
                    log.info("outbox: %d claimed rows left for their lease to end", len(claims) - i)
                    return i
                try:
                    self._send(c)
                except _Fail as err:
                    log.info(
                        "notification %s (%s %s to %s) attempt %d failed: %s",
                        c.id,
                        c.event_type,
                        c.event_id,
                        c.destination,
                        c.attempts,
                        err,
                    )
                    self._mark(c, error=err)
                    continue
                except Exception as err:  # a bug in a channel must not stop the others
                    log.exception("notification %s: send crashed", c.id)
                    self._mark(c, error=_Fail(type(err).__name__))
                    continue
                if self._on_sent is not None:
                    self._on_sent(c)
                self._mark(c, error=None)
            return len(claims)

    def pending(self) -> tuple[int, float | None]:
        """(rows pending, the earliest next_attempt_at) in this deliverer's scope."""

        return self.store.outbox_pending(self.tenant)

    def drain(self, timeout: float = 10.0) -> bool:
        """Deliver until nothing is pending (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._stop.is_set():
            self._wake.clear()
            if self.deliver_due():
                continue
            count, wait = self.pending()
            if not count:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # Asleep until the next row is due, or a new one is written here (kick), or
            # stop; rows written by other processes are seen within 5 s.
            self._wake.wait(min(left, max(0.01, wait or 0.0), 5.0))
        return False

    def run(self, poll: float = 1.0) -> None:
        """Deliver until :meth:`stop`; a store error is logged and retried next poll."""
        while not self._stop.is_set():
            try:
                busy = self.deliver_due()
            except Exception:
                log.exception("notification deliverer: pass failed")
                busy = 0
            if not busy:
                self._stop.wait(poll)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def kick(self) -> None:
        """Drain in a daemon thread (started if none runs): in-process delivery for an
        embedded guard. Rows left at exit stay pending for the next deliverer."""
        with self._kick_lock:
            self._wake.set()
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(
                target=self._drain_quietly, name="onceonly-notify", daemon=True
            )
            self._thread.start()

    def _drain_quietly(self) -> None:
        while True:
            try:
                self.drain(timeout=self.settings.backoff_max)
            except Exception:
                log.exception("notification deliverer: drain failed")
            with self._kick_lock:
                # A kick that came while we were deciding to stop: drain again, or the
                # row it announced would wait for the next process.
                if self._stop.is_set() or not self._wake.is_set():
                    return

    def close(self, timeout: float = 5.0) -> None:
        """Stop, and wait for the current send (up to ``timeout``) before the store goes."""
        self.stop()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- channels ---------------------------------------------------------------------------
    def _send(self, c: _Claim) -> None:
        kind, _, target = c.destination.partition(":")
        if kind == "webhook":
            self._webhook(c, target)
        elif kind == "slack":
            if not self.settings.slack_url:
                raise _Fail("ONCEONLY_NOTIFY_SLACK_URL is not set here")
            self._post(self.settings.slack_url, _slack(c), {})
        elif kind == "email":
            self._email(c, target)
        else:
            raise _Fail(f"unknown destination {c.destination!r}", final=True)

    def _webhook(self, c: _Claim, wid: str) -> None:
        row = self.store.outbox_webhook(c.tenant, wid)
        if row is None or not row["enabled"]:
            raise _Fail(f"webhook {wid} was removed or disabled", final=True)
        body = c.payload.encode("utf-8")
        # Signed afresh per attempt (its own timestamp) under the event's stable id: a
        # receiver's replay cache accepts a resend, and dedupes its effect on the id.
        headers = sign(row["secret"], body, msg_id=c.event_id, timestamp=int(time.time()))
        # A resend may land in the same second as an attempt whose deliverer died after
        # sending it: the same id, timestamp and signature, which a replay cache refuses
        # (401/409). Retried with backoff, then, not dead at once: the next attempt is
        # signed in a later second.
        self._post(row["url"], body, headers, resend=c.attempts > 1)

    def _http(self) -> Any:
        if self._client is None:
            import httpx

            self._client = httpx.Client(
                timeout=httpx.Timeout(self.settings.timeout),
                follow_redirects=False,
                transport=egress.transport(self._allow),
            )
        return self._client

    def _post(
        self, url: str, body: bytes, headers: dict[str, str], *, resend: bool = False
    ) -> None:
        import httpx

        shown = _safe_url(url) or "(invalid url)"
        try:
            egress.check_url(url, self._allow, resolve_names=False)
        except ConfigError as exc:
            raise _Fail(f"{shown} refused: {exc}", final=True) from None
        headers = {**headers, "Content-Type": "application/json", "User-Agent": "onceonly-core"}
        try:
            # Streamed and closed unread: only the status matters, and the receiver's
            # body is never stored (last_error names the status only).
            with self._http().stream("POST", url, content=body, headers=headers) as resp:
                status = resp.status_code
        except egress.EgressRefused as exc:
            raise _Fail(f"{shown} refused by the egress guard: {exc}", final=True) from None
        except httpx.HTTPError as exc:
            raise _Fail(f"{shown}: {type(exc).__name__}") from None
        if 200 <= status < 300:
            return
        retry = status >= 500 or status in _RETRY_STATUSES or (resend and status in (401, 409))
        raise _Fail(f"{shown}: HTTP {status}", final=not retry)

    def _email(self, c: _Claim, to: str) -> None:
        s = self.settings
        if not s.smtp_host:
            raise _Fail("ONCEONLY_SMTP_HOST is not set here")
        try:
            addrs = egress.connect_addresses(s.smtp_host, s.smtp_port, self._allow)
        except egress.EgressRefused as exc:
            raise _Fail(f"smtp host refused by the egress guard: {exc}", final=True) from None
        except OSError as exc:
            raise _Fail(f"smtp host: {type(exc).__name__}") from None
        msg = _mail(c, s.smtp_from, to)
        try:
            smtp = smtplib.SMTP(timeout=s.timeout)
            try:
                # Connect to the address the egress guard judged, not to a second lookup.
                smtp.connect(addrs[0], s.smtp_port)
                # STARTTLS checks the certificate against the name we were given.
                smtp._host = s.smtp_host  # type: ignore[attr-defined]
                if s.smtp_starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if s.smtp_user:
                    smtp.login(s.smtp_user, s.smtp_password or "")
                smtp.send_message(msg)
            finally:
                try:
                    smtp.quit()
                except (smtplib.SMTPException, OSError):
                    smtp.close()
        except smtplib.SMTPResponseException as exc:
            # 5xx: the server refuses for good (bad recipient, auth); 4xx: try later.
            raise _Fail(f"smtp: {exc.smtp_code}", final=exc.smtp_code >= 500) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise _Fail(f"smtp: {type(exc).__name__}") from None

    # -- the dead-letter view -----------------------------------------------------------------
    def list(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if state is not None and state not in STATES:
            raise ConfigError(f"state must be one of {', '.join(STATES)}")
        rows = self.store.outbox_list(self.tenant, state, limit)
        return [_public(dict(r)) for r in rows]

    def retry(self, row_id: str) -> bool:
        """A dead (or pending) row: due again with a fresh attempt budget. False if
        unknown or delivered."""
        return self.store.outbox_retry(self.tenant, row_id)

    def start(self, poll: float = 1.0) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(poll,), name="onceonly-notify", daemon=True)
        t.start()
        self._thread = t
        return t


def _public(r: dict[str, Any]) -> dict[str, Any]:
    r.pop("lease_token", None)
    r["payload"] = json.loads(r["payload"])
    return r


def _summary(c: _Claim) -> tuple[str, dict[str, Any]]:
    ev = json.loads(c.payload)
    bits = [f"[onceonly] {c.event_type}"]
    if ev.get("tool"):
        bits.append(f"tool {ev['tool']}")
    if ev.get("agent_id"):
        bits.append(f"agent {ev['agent_id']}")
    if ev.get("reason"):
        bits.append(f"({ev['reason']})")
    return " ".join(bits), ev


def _slack(c: _Claim) -> bytes:
    text, _ = _summary(c)
    return json.dumps({"text": f"{text} [{c.event_id}]"}, ensure_ascii=False).encode("utf-8")


def _mail(c: _Claim, sender: str, to: str) -> EmailMessage:
    text, ev = _summary(c)
    msg = EmailMessage()
    msg["Subject"] = text
    msg["From"] = sender
    msg["To"] = to
    # Stable across resends: a mail client (or the receiving pipeline) dedupes on it.
    msg["Message-ID"] = f"<{c.event_id}@onceonly>"
    msg.set_content(text + "\n\n" + json.dumps(ev, indent=2, sort_keys=True) + "\n")
    return msg


# The SQL governance store writes a decision's notification in the decision's transaction
# through the first hook; a store that plans its rows before one atomic write (Redis)
# through the second (the stores layer never imports governance).
_govsql.notification_writer = add
_gov.notification_planner = plan
