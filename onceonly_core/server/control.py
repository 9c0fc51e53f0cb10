"""The control plane behind the HTTP layer: tenants → Guards, and the wire semantics of
check-lock, the AI lease keyspace and key-mode jobs, mapped onto the ledger primitives.

Ledger namespaces per tenant ``T`` (a tenant name never contains ``/``):

* ``T``       governed tool-mode runs (the tenant's Guard namespace; governance tenant ``T``)
* ``T/make``  ``/check-lock`` keys
* ``T/ai``    ``/ai/lease`` and key-mode ``/ai/run`` keys (one keyspace, as the client assumes)

Every state change is one ledger primitive with its fencing token: a lease is a claim
(``owner`` = the lease id), extend is a fenced heartbeat, complete / fail / cancel are a
fenced finish. Nothing here re-implements the claim protocol; check-lock reuses its pure
:func:`~onceonly_core.protocol.decide`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..egress import Egress
from ..errors import ConfigError, StoreError
from ..guard import Guard
from ..limits import DEFAULT_MAX_RESULT_BYTES, check_text
from ..protocol import NOT_STORED, REPLAY, WAIT, Options, decide, safe_str
from ..redact import default_redactor
from ..stores import FAILED, REDIS_SCHEMES, RUNNING, SUCCEEDED, NewClaim, Record, open_store
from ..stores.pins import dispose
from ..stores.sql import MySQLStore, PostgresStore, SQLiteStore, SQLStore
from .db import JOB_WITH_CLAIM, ServerDB, job_params

__all__ = ["ControlPlane", "JobContext", "LeaseError", "iso"]

log = logging.getLogger("onceonly.server")

MAX_ACTIONS = 50


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")


class LeaseError(Exception):
    """A lease operation with a lease id that is not (or no longer) the holder's: 409."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class QuotaExceeded(Exception):
    def __init__(self, kind: str, used: int, limit: int) -> None:
        super().__init__(f"{kind} usage limit reached ({used}/{limit} this month)")
        self.kind, self.used, self.limit = kind, used, limit


@dataclass(slots=True)
class JobContext:
    """What a key-mode job handler gets: ``handler(ctx) -> dict | None``."""

    tenant: str
    key: str
    token: int
    attempt: int
    metadata: dict[str, Any]
    guard: Guard
    run_id: str

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts of this job: pass it downstream."""
        return f"{self.tenant}/ai:{self.key}"


class Usage:
    """Per-replica usage counters, flushed to the database every ``interval`` seconds
    (and before every usage read in this replica)."""

    def __init__(self, db: ServerDB, interval: float = 1.0) -> None:
        self.db = db
        self.interval = interval
        self._counts: dict[tuple[str, str, str, str], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cache: dict[tuple[str, str], tuple[int, float]] = {}
        self._today: tuple[float, str] = (-1.0, "")

    def add(self, tenant: str, kind: str, **metrics: int) -> None:
        now = time.time()
        n, day = self._today
        if n != now // 86400:  # formatting a date costs more than the rest of add()
            day = _day(now)
            self._today = (now // 86400, day)
        with self._lock:
            for metric, n in metrics.items():
                if n:
                    k = (tenant, day, kind, metric)
                    self._counts[k] = self._counts.get(k, 0) + n
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="onceonly-usage", daemon=True
                )
                self._thread.start()

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
        try:
            self.db.add_usage(counts)
        except Exception:
            log.exception("flushing usage counters failed; keeping them for the next flush")
            with self._lock:
                for k, n in counts.items():
                    self._counts[k] = self._counts.get(k, 0) + n

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()

    def month(self, tenant: str, kind: str, cached: bool = False) -> dict[str, int]:
        """This month's totals for ``tenant``/``kind``: requests, charged, blocked."""
        if not cached:
            self.flush()
        now = time.time()
        month = _day(now)[:7]
        rows = self.db.usage_rows(tenant, f"{month}-01", f"{month}-31")
        out = {"requests": 0, "charged": 0, "blocked": 0}
        for r in rows:
            if r["kind"] == kind:
                out[r["metric"]] = out.get(r["metric"], 0) + int(r["n"])
        if cached:
            with self._lock:
                for (t, day, k, metric), n in self._counts.items():
                    if t == tenant and k == kind and day.startswith(month):
                        out[metric] = out.get(metric, 0) + n
        return out

    def charged(self, tenant: str, kind: str) -> int:
        """This month's charged count, read at most once a second per tenant and kind."""
        key = (tenant, kind)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is None or hit[1] <= now:
            hit = (self.month(tenant, kind, cached=True)["charged"], now + 1.0)
            self._cache[key] = hit
        with self._lock:
            local = sum(
                n
                for (t, _, k, metric), n in self._counts.items()
                if t == tenant and k == kind and metric == "charged"
            )
        return hit[0] + local


Handler = Callable[[JobContext], Any]


def default_threads(cpus: int | None = None) -> int:
    """Request threads per server process when none are given: twice the CPUs, from 4 to 16.

    Measured with 64 clients on 2 cores (benchmarks/README.md): 8 threads per worker gave a
    p99 of 130 ms to 1 s and fewer requests per second than 2 to 4 threads (p99 40 to 75
    ms); threads beyond what the CPUs can run only wait for the GIL and for each other in
    the database. The floor of 4 keeps a few slow tool-mode runs (up to
    ``max_tool_timeout_ms`` each) from holding every thread; raise ``--threads`` where
    tools are slow."""
    n = cpus if cpus is not None else (os.cpu_count() or 2)
    return min(16, max(4, 2 * n))


class ControlPlane:
    """Tenants, keys, usage, the lease keyspace and job workers over one ledger."""

    def __init__(
        self,
        url: str | None = None,
        *,
        migrate: bool = False,
        job_workers: int = 0,
        default_lock_ttl: int = 3600,
        max_lock_ttl: int = 30 * 86400,
        ai_default_ttl: int = 300,
        max_ai_ttl: int = 7 * 86400,
        retention: float = 7 * 86400,
        max_tool_timeout_ms: int = 4000,
        job_lease: float = 30.0,
        job_poll: float = 0.2,
        egress_allow: str | list[str] | None = None,
        threads: int | None = None,
    ) -> None:
        url = url or os.environ.get("ONCEONLY_DB_URL") or "sqlite:///onceonly.db"
        if url.startswith(("memory:", *REDIS_SCHEMES)):
            # Tenants, API keys and jobs live in SQL tables beside the ledger.
            raise ConfigError(
                "the server needs a SQL ledger (sqlite:///file.db, PostgreSQL or MariaDB), "
                f"not {url.split(':', 1)[0]}://"
            )
        #: Request threads of this process (the app sets the thread pool to it). The ledger
        #: pool holds as many connections: with fewer, SQLAlchemy opens and closes an
        #: overflow connection per request under load (a PostgreSQL connect costs
        #: milliseconds of CPU on both sides), which is what sank 64 clients.
        self.threads = default_threads() if threads is None else max(1, int(threads))
        store = open_store(url, pool_size=self.threads)
        if not isinstance(store, SQLStore):
            store.close()
            raise ConfigError(f"the server needs a SQL ledger, not {type(store).__name__}")
        self.ledger: SQLStore = store
        if migrate:
            self.ledger.migrate()
        self._guards: dict[str, Guard] = {}
        self._guards_lock = threading.Lock()
        self._gov_store: Any = None
        self.default_lock_ttl = default_lock_ttl
        self.max_lock_ttl = max_lock_ttl
        self.ai_default_ttl = ai_default_ttl
        self.max_ai_ttl = max_ai_ttl
        self.retention = retention
        self.max_tool_timeout_ms = max_tool_timeout_ms
        # Outbound allowlist for every tenant's remote tools, on top of ONCEONLY_EGRESS_ALLOW;
        # parsed now so a malformed one stops the server at start, not a tenant's request.
        Egress.of(egress_allow)
        self.egress_allow = egress_allow
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._keys: ServerDB | None = None
        self._server_db_engine: Any = None
        self._engine_lock = threading.Lock()
        self._usage: Usage | None = None
        self.jobs = Jobs(self, workers=job_workers, lease=job_lease, poll=job_poll)

    # -- wiring -------------------------------------------------------------------------
    @property
    def gov_store(self) -> Any:
        """One governance store (one pool) shared by every tenant's Governance."""
        if self._gov_store is None:
            from ..stores.govsql import GovStore

            with self._guards_lock:
                if self._gov_store is None:
                    self._gov_store = GovStore(self.ledger)
        return self._gov_store

    @property
    def keys(self) -> ServerDB:
        if self._keys is None:
            self._keys = ServerDB(self._server_engine(), self.ledger.now)
            self._keys.ensure()
        return self._keys

    def _server_engine(self) -> Any:
        """The engine of the server's own tables. SQLite: the governance store's (its
        ``BEGIN IMMEDIATE`` transactions, one writer). A database server: an engine of
        their own with a pool as large as the request threads, since a key-mode
        ``/ai/run`` writes its job row on every request (the governance pool is sized for
        governed calls, and an overflow connection is a connect per request)."""
        if self.ledger.kind == "sqlite":
            return self.gov_store.engine
        import sqlalchemy as sa

        with self._engine_lock:
            if self._server_db_engine is None:
                self._server_db_engine = sa.create_engine(
                    self.ledger.url,
                    pool_size=self.threads,
                    max_overflow=self.threads,
                    connect_args=self.ledger.connect_args,
                )
        return self._server_db_engine

    @property
    def usage(self) -> Usage:
        if self._usage is None:
            self._usage = Usage(self.keys)
        return self._usage

    def guard(self, tenant: str) -> Guard:
        g = self._guards.get(tenant)
        if g is None:
            gov_store = self.gov_store  # outside the lock: gov_store takes it when new
            with self._guards_lock:
                g = self._guards.get(tenant)
                if g is None:
                    g = Guard(store=self.ledger, namespace=tenant, quiet=True)
                    # One governance store across tenants: one connection pool, not one each.
                    g.gov.share_store(gov_store)
                    g.gov.egress_allow = self.egress_allow
                    self._guards[tenant] = g
        return g

    def register_tool(self, tenant: str, name: str, fn: Callable[..., Any], **spec: Any) -> None:
        """Register a local Python tool for ``tenant`` (run by ``/ai/run`` tool mode and
        job actions in this process)."""
        self.keys.ensure_tenant(tenant)
        self.guard(tenant).gov.create_tool(name, fn, **spec)

    def close(self) -> None:
        self.jobs.stop()
        if self._usage is not None:
            self._usage.close()
        if self._gov_store is not None:
            self._gov_store.close()
        if self._server_db_engine is not None:
            dispose(self._server_db_engine)
        self.ledger.close()

    # -- check-lock ---------------------------------------------------------------------
    def check_lock(
        self, tenant: str, key: str, ttl: int | None, request_id: str | None
    ) -> dict[str, Any]:
        eff = self.default_lock_ttl if not ttl or ttl <= 0 else min(int(ttl), self.max_lock_ttl)
        ns = f"{tenant}/make"
        caller = request_id[:255] if request_id else None
        new = NewClaim(tool="check-lock", owner=self.owner, lease=30.0, caller=caller)
        opts = Options(ttl=float(eff))
        # A new key is locked in one statement (one commit): the row is born succeeded
        # with its TTL, which is what claim + finish leave behind. A held key comes back
        # as the holder's record and is decided as before.
        first = self.ledger.claim_done(ns, key, new, result="null", ttl=float(eff))
        if first.mine:
            self.usage.add(tenant, "make", requests=1, charged=1)
            return self._lock_answer(first, key, eff, locked=True)
        rec: Record | None = first
        for _ in range(10):
            if rec is None:
                rec = self.ledger.claim(ns, key, new)
                continue
            if not rec.mine:
                d = decide(rec, opts, None)
                if d in (REPLAY, WAIT):
                    if (
                        caller is not None
                        and rec.caller == caller
                        and (rec.state == SUCCEEDED or rec.lease_live)
                    ):
                        # The same X-Request-Id again: a retry whose "locked" answer was
                        # lost. Replay that answer rather than calling it a duplicate.
                        return self._lock_answer(rec, key, eff, locked=True)
                    self.usage.add(tenant, "make", requests=1, blocked=1)
                    return self._lock_answer(rec, key, eff, locked=False)
                taken = self.ledger.take_over(ns, key, rec, new)
                if taken is None:
                    rec = self.ledger.get(ns, key)
                    continue
                rec = taken
            if not self.ledger.finish(ns, key, rec.token, ok=True, result="null", ttl=float(eff)):
                rec = self.ledger.get(ns, key)
                continue
            self.usage.add(tenant, "make", requests=1, charged=1)
            return self._lock_answer(rec, key, eff, locked=True)
        raise StoreError(f"check-lock on {key!r} did not settle")

    @staticmethod
    def _lock_answer(rec: Record, key: str, ttl: int, *, locked: bool) -> dict[str, Any]:
        return {
            "success": locked,
            "status": "locked" if locked else "duplicate",
            "key": key,
            "ttl": ttl,
            "first_seen_at": None if locked and rec.mine else iso(rec.created_at),
        }

    # -- the AI lease keyspace ----------------------------------------------------------
    def _ai_ttl(self, ttl: int | None) -> int:
        if not ttl or ttl <= 0:
            return self.ai_default_ttl
        return min(int(ttl), self.max_ai_ttl)

    @staticmethod
    def _final(rec: Record) -> bool:
        return rec.state in (SUCCEEDED, FAILED) and not (
            rec.expires_at is not None and rec.expires_at <= rec.now
        )

    def lease(
        self,
        tenant: str,
        key: str,
        ttl: int | None,
        metadata: dict[str, Any] | None,
        *,
        job: bool = False,
    ) -> dict[str, Any]:
        """Acquire ``key`` (status ``acquired``) or report who has it: ``polling`` while
        another lease is live, ``completed``/``failed`` once finished (retention)."""
        eff = self._ai_ttl(ttl)
        ns = f"{tenant}/ai"
        run_id = (metadata or {}).get("run_id")
        check_text(str(run_id) if run_id else None, "metadata.run_id")  # a name: no NUL
        lease_id = "lease_" + secrets.token_hex(12)
        new = NewClaim(
            tool="ai.run" if job else "ai.lease",
            owner=lease_id,
            lease=float(eff),
            run_id=str(run_id)[:255] if run_id else None,
        )
        rec: Record | None
        meta_json = json.dumps(metadata or {})
        if job and isinstance(self.ledger, (PostgresStore, SQLiteStore, MySQLStore)):
            # The job row is written with the claim (one statement on PostgreSQL, one
            # transaction on SQLite and MariaDB) when the claim is new: one commit for
            # both. A take-over below enqueues apart.
            params = job_params(tenant, key, lease_id, meta_json, eff)
            self.keys.ensure()
            also = JOB_WITH_CLAIM[self.ledger.kind]
            rec = self.ledger.claim_with(ns, key, new, also, params)
            queued = rec.mine
        else:
            rec, queued = self.ledger.claim(ns, key, new), False
        for _ in range(10):
            if rec is None:
                rec = self.ledger.claim(ns, key, new)
                continue
            if rec.mine:
                break
            if rec.lease_live or self._final(rec):
                self.usage.add(tenant, "ai", requests=1)
                return self._ai_view(rec, key, eff, charged=0)
            taken = self.ledger.take_over(ns, key, rec, new)  # expired, cleared or purged
            if taken is None:
                rec = self.ledger.get(ns, key)
                continue
            rec = taken
            break
        else:
            raise StoreError(f"lease on {key!r} did not settle")
        assert rec is not None
        if job and not queued:
            try:
                self.keys.enqueue(tenant, key, rec.token, lease_id, meta_json, eff)
            except Exception:
                err = json.dumps({"error_code": "enqueue_failed"})
                self.ledger.finish(ns, key, rec.token, ok=False, error=err, ttl=60.0)
                raise
        self.usage.add(tenant, "ai", requests=1, charged=1)
        out = self._ai_view(rec, key, eff, charged=1)
        out["lease_id"] = lease_id
        return out

    def _ai_view(self, rec: Record, key: str, ttl: int | None, *, charged: int) -> dict[str, Any]:
        now = rec.now or time.time()
        if rec.mine:
            status = "acquired"
        elif rec.state == RUNNING:
            status = "polling" if rec.lease_live else "expired"
        elif self._final(rec):
            status = "completed" if rec.state == SUCCEEDED else "failed"
        else:
            status = "expired"
        res = self._decode_result(rec) if rec.state == SUCCEEDED else {}
        err = self._decode_error(rec) if rec.state == FAILED else {}
        ttl_left = None
        if rec.state == RUNNING and rec.lease_until is not None and not rec.mine:
            ttl_left = max(0, int(rec.lease_until - now))
        return {
            "ok": True,
            "status": status,
            "key": key,
            "ttl": ttl,
            "ttl_left": ttl_left,
            "lease_id": None,
            "version": rec.token,
            "first_seen_at": iso(rec.created_at),
            "done_at": iso(rec.updated_at) if status in ("completed", "failed") else None,
            "result_hash": res.get("result_hash"),
            "error_code": err.get("error_code"),
            "retry_after_sec": 1 if status == "polling" else None,
            "charged": charged,
        }

    def _decode_result(self, rec: Record) -> dict[str, Any]:
        if not rec.result:
            return {}
        try:
            val = self.ledger_codec.decode(rec.result)
        except Exception:
            return {}
        return val if isinstance(val, dict) else {}

    @staticmethod
    def _decode_error(rec: Record) -> dict[str, Any]:
        try:
            val = json.loads(rec.error or "{}")
        except ValueError:
            return {"error_code": "error", "message": rec.error}
        return val if isinstance(val, dict) else {}

    @property
    def ledger_codec(self) -> Any:
        from ..codec import default_codec

        return default_codec

    def _holder(self, tenant: str, key: str, lease_id: str) -> Record:
        rec = self.ledger.get(f"{tenant}/ai", key)
        if rec is None or rec.owner != lease_id or not lease_id:
            raise LeaseError("lease_mismatch", "this lease id does not hold the key")
        return rec

    def extend(self, tenant: str, key: str, lease_id: str, ttl: int | None) -> dict[str, Any]:
        eff = self._ai_ttl(ttl)
        rec = self._holder(tenant, key, lease_id)
        if rec.state == RUNNING and self.ledger.heartbeat(
            f"{tenant}/ai", key, rec.token, float(eff)
        ):
            return {
                "ok": True,
                "status": "extended",
                "key": key,
                "lease_id": lease_id,
                "ttl": eff,
                "ttl_left": eff,
                "version": rec.token,
            }
        rec = self._holder(tenant, key, lease_id)
        # A late heartbeat after complete/fail (run_fn's thread can race): harmless.
        return {**self._ai_view(rec, key, eff, charged=0), "ok": rec.state == RUNNING}

    def _finish(
        self, tenant: str, key: str, lease_id: str, *, ok: bool, payload: dict[str, Any]
    ) -> dict[str, Any]:
        ns = f"{tenant}/ai"
        want = SUCCEEDED if ok else FAILED
        rec = self._holder(tenant, key, lease_id)
        if rec.state == RUNNING:
            text = self.ledger_codec.encode(payload) if ok else None
            # The caller's error code / cancel reason is free text: masked like any error.
            err = None if ok else json.dumps(default_redactor.redact(payload))
            if self.ledger.finish(
                ns, key, rec.token, ok=ok, result=text, error=err, ttl=self.retention
            ):
                rec = self._holder(tenant, key, lease_id)
            else:
                rec = self._holder(tenant, key, lease_id)
        if rec.state != want:
            raise LeaseError(
                f"already_{'completed' if rec.state == SUCCEEDED else rec.state}",
                f"the lease is {rec.state}, it cannot become {want}",
            )
        # Finished by this lease (now, or a retried request earlier): idempotent.
        view = self._ai_view(rec, key, None, charged=0)
        return {
            "ok": True,
            "status": view["status"],
            "key": key,
            "lease_id": lease_id,
            "version": rec.token,
            "done_at": view["done_at"],
            "result_hash": view["result_hash"],
            "error_code": view["error_code"],
        }

    def complete(
        self,
        tenant: str,
        key: str,
        lease_id: str,
        result: dict[str, Any] | None,
        result_hash: str | None,
    ) -> dict[str, Any]:
        payload = {"result": result, "result_hash": result_hash}
        return self._finish(tenant, key, lease_id, ok=True, payload=payload)

    def fail(
        self, tenant: str, key: str, lease_id: str, error_code: str, error_hash: str | None
    ) -> dict[str, Any]:
        payload = {"error_code": error_code, "error_hash": error_hash}
        return self._finish(tenant, key, lease_id, ok=False, payload=payload)

    def cancel(self, tenant: str, key: str, lease_id: str, reason: str | None) -> dict[str, Any]:
        payload = {"error_code": "canceled", "reason": reason}
        out = self._finish(tenant, key, lease_id, ok=False, payload=payload)
        out["canceled"] = True
        return out

    def status(self, tenant: str, key: str) -> dict[str, Any]:
        rec = self.ledger.get(f"{tenant}/ai", key)
        if rec is None:
            return {
                "ok": False,
                "status": "not_found",
                "key": key,
                "lease_id": None,
                "version": 0,
                "ttl_left": None,
                "first_seen_at": None,
                "done_at": None,
                "result_hash": None,
                "error_code": None,
                "retry_after_sec": 1,
            }
        view = self._ai_view(rec, key, None, charged=0)
        if view["status"] == "polling":
            view["status"] = "in_progress"
        view.pop("charged")
        view.pop("ttl")
        return view

    def result(self, tenant: str, key: str) -> dict[str, Any]:
        st = self.status(tenant, key)
        out: dict[str, Any] = {
            "ok": st["status"] == "completed",
            "status": st["status"],
            "key": key,
            "result": None,
            "result_hash": st.get("result_hash"),
            "error_code": st.get("error_code"),
            "done_at": st.get("done_at"),
        }
        if st["status"] == "completed":
            rec = self.ledger.get(f"{tenant}/ai", key)
            if rec is not None:
                res = self._decode_result(rec).get("result")
                out["result"] = res if isinstance(res, dict) else None
        return out


class Jobs:
    """Key-mode ``/ai/run`` jobs: a queue row per acquired run, claimed by workers with
    a conditional update, executed under the run's fencing token, finished fenced."""

    def __init__(self, cp: ControlPlane, *, workers: int, lease: float, poll: float) -> None:
        self.cp = cp
        self.workers = workers
        self.lease = lease
        self.poll = poll
        self.handlers: list[tuple[str, Handler]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"

    def register(self, pattern: str, handler: Handler) -> None:
        """Run ``handler(ctx)`` for job keys matching ``pattern`` (a shell glob); the
        first registered match wins, before ``metadata.actions``."""
        self.handlers.append((pattern, handler))

    def start(self) -> None:
        self._stop.clear()
        for i in range(self.workers):
            t = threading.Thread(target=self._loop, name=f"onceonly-job-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._threads.clear()

    def run_forever(self) -> None:
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception:
                log.exception("job worker loop failed")
                ran = 0
            if not ran:
                self._stop.wait(self.poll)

    def run_once(self, limit: int = 1) -> int:
        """Take and run up to ``limit`` jobs; returns how many ran."""
        rows = self.cp.keys.take_jobs(self.worker_id, self.lease, limit)
        for row in rows:
            self._run(row)
        return len(rows)

    def _run(self, row: dict[str, Any]) -> None:
        cp = self.cp
        tenant, key, token = row["tenant"], row["job_key"], int(row["token"])
        ns = f"{tenant}/ai"
        rec = cp.ledger.get(ns, key)
        if rec is None or rec.token != token or rec.state != RUNNING:
            cp.keys.job_done(row)  # finished, canceled or taken over: nothing to run
            return
        ttl = float(row["ttl"])
        if not cp.ledger.heartbeat(ns, key, token, max(ttl, self.lease)):
            cp.keys.job_done(row)
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease / 3):
                with contextlib.suppress(Exception):
                    cp.ledger.heartbeat(ns, key, token, max(ttl, self.lease))
                    cp.keys.job_heartbeat(row, self.worker_id, self.lease)

        hb = threading.Thread(target=beat, name="onceonly-job-heartbeat", daemon=True)
        hb.start()
        meta: dict[str, Any] = json.loads(row["meta"] or "{}")
        run_id = str(meta.get("run_id") or key)[:255]
        guard = cp.guard(tenant)
        ok = True
        payload: dict[str, Any] = {}
        try:
            with contextlib.suppress(Exception):
                guard.gov.post_event(run_id, "run_started", status="started", data={"key": key})
            ctx = JobContext(tenant, key, token, int(row["attempts"]), meta, guard, run_id)
            payload = {"result": self._execute(ctx), "result_hash": None}
        except Exception as err:
            log.warning("job %s/%s failed: %s", tenant, key, err)  # redacted by the log filter
            ok = False
            payload = {
                "error_code": "job_error",
                "message": f"{type(err).__name__}: {safe_str(err)}",
            }
        finally:
            stop.set()
            hb.join(timeout=5)
        if ok:
            text: str | None = cp.ledger_codec.encode(payload)
            note = None
            if text is not None and len(text.encode()) > DEFAULT_MAX_RESULT_BYTES:
                # Over the backend's statement limit the write would fail and the job
                # would run again: succeeded without a result instead (protocol's marker).
                text, note = None, f"{NOT_STORED}over {DEFAULT_MAX_RESULT_BYTES} bytes"
            done = cp.ledger.finish(
                ns, key, token, ok=True, result=text, error=note, ttl=cp.retention
            )
        else:
            err_text = json.dumps(payload)[:4000]
            done = cp.ledger.finish(ns, key, token, ok=False, error=err_text, ttl=cp.retention)
        if not done:
            log.warning("job %s/%s: lease lost before completion (token %s)", tenant, key, token)
        with contextlib.suppress(Exception):
            guard.gov.post_event(
                run_id,
                "run_finished",
                status="completed" if ok else "failed",
                data={"key": key},
            )
        cp.keys.job_done(row)

    def _execute(self, ctx: JobContext) -> dict[str, Any]:
        for pattern, handler in self.handlers:
            if fnmatch.fnmatchcase(ctx.key, pattern):
                out = handler(ctx)
                if out is None:
                    return {}
                return out if isinstance(out, dict) else {"value": out}
        actions = ctx.metadata.get("actions")
        if not actions:
            return {}
        agent_id = ctx.metadata.get("agent_id")
        if not isinstance(agent_id, str) or not agent_id:
            raise ConfigError("metadata.actions needs metadata.agent_id")
        if not isinstance(actions, list):
            raise ConfigError("metadata.actions must be a list")
        dry = bool(ctx.metadata.get("dry_run"))
        results: list[dict[str, Any]] = []
        for action in actions[:MAX_ACTIONS]:
            if not isinstance(action, dict) or not isinstance(action.get("tool"), str):
                results.append({"ok": False, "decision": "failed", "error": "bad action"})
                continue
            tool = action["tool"]
            args = action.get("args") or {}
            spend = action.get("spend_usd")
            if dry:
                chk = ctx.guard.gov.check(agent_id, tool, spend_usd=spend)
                results.append(
                    {
                        "tool": tool,
                        "ok": bool(chk["allowed"]),
                        "allowed": bool(chk["allowed"]),
                        "decision": "dry_run",
                        "policy_reason": chk["reason"],
                        "risk_level": chk["risk_level"],
                    }
                )
                continue
            res = ctx.guard.gov.run_tool(agent_id, tool, args, spend_usd=spend, run_id=ctx.run_id)
            results.append({"tool": tool, **tool_result_json(res)})
        return {
            "ok": all(r.get("ok") for r in results),
            "dry_run": dry,
            "agent_id": agent_id,
            "actions": results,
        }


def tool_result_json(res: Any) -> dict[str, Any]:
    """A governance ToolResult as the client's AiToolResult reads it (result: object)."""
    value = res.result
    if res.decision == "failed":
        value = {"error": res.error, "error_type": res.error_type}
    elif value is not None and not isinstance(value, dict):
        value = {"value": value}
    out: dict[str, Any] = {
        "ok": bool(res.ok),
        "allowed": bool(res.allowed),
        "decision": res.decision,
        "policy_reason": res.policy_reason,
        "risk_level": res.risk_level,
        "result": _jsonable(value),
        "spend_usd": res.spend_usd,
    }
    if res.error and res.decision != "failed":
        out["error"] = res.error
    if res.approval_id:
        out["approval_id"] = res.approval_id
    return out


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))
