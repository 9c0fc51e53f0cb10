"""The server's own tables (tenants, API keys, jobs, usage), next to the ledger's.

They live in the ledger's database and use the governance store's engine (real
transactions; SQLite ``BEGIN IMMEDIATE``). Created on first use with ``CREATE … IF NOT
EXISTS`` semantics; several replicas starting at once tolerate each other.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa

from ..errors import ConfigError, StoreError
from ..stores.sql import _render

__all__ = ["KEY_PREFIX", "TENANT_RE", "KeyInfo", "ServerDB", "hash_key"]

T = TypeVar("T")

KEY_PREFIX = "oo_sk_"
TENANT_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")

meta = sa.MetaData()

tenants = sa.Table(
    "onceonly_server_tenants",
    meta,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("make_limit", sa.BigInteger),  # per month; NULL: unlimited
    sa.Column("ai_limit", sa.BigInteger),
    sa.Column("prefs", sa.Text),  # JSON notification preferences
    sa.Column("created_at", sa.Double, nullable=False),
)

api_keys = sa.Table(
    "onceonly_server_keys",
    meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("label", sa.String(255)),
    sa.Column("rate_limit", sa.Double),  # requests/second; NULL: unlimited
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("revoked_at", sa.Double),
)

jobs = sa.Table(
    "onceonly_server_jobs",
    meta,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("job_key", sa.String(255), primary_key=True),
    sa.Column("token", sa.Integer, primary_key=True),
    sa.Column("lease_id", sa.String(64), nullable=False),
    sa.Column("meta", sa.Text),
    sa.Column("state", sa.String(16), nullable=False),  # queued | taken | done
    sa.Column("taken_until", sa.Double),
    sa.Column("worker", sa.String(255)),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("ttl", sa.Double, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_onceonly_server_jobs_state", "state", "created_at"),
)

usage = sa.Table(
    "onceonly_server_usage",
    meta,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("day", sa.String(10), primary_key=True),  # YYYY-MM-DD (UTC)
    sa.Column("kind", sa.String(8), primary_key=True),  # make | ai
    sa.Column("metric", sa.String(16), primary_key=True),  # requests | charged | blocked
    sa.Column("n", sa.BigInteger, nullable=False),
)


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    tenant: str
    prefix: str
    rate_limit: float | None


#: The columns a new run's row renews on a finished row of the same (tenant, key, token).
_RENEW = ("lease_id", "meta", "taken_until", "worker", "attempts", "ttl", "created_at")


def _upsert(kind: str) -> str:
    """What a job row's INSERT does on a row with the same (tenant, key, token): a finished
    one (``done``) is an earlier run of the key whose ledger row retention has since
    deleted, so the key's new lease started again at token 1; it is replaced by the new
    run. A live one is this run's own row (a retry after a lost reply): left as it is."""
    if kind == "mysql":
        # Assignments run left to right and see the ones before: ``state`` goes last.
        # Columns named with their table: the claim's INSERT … SELECT reads a ledger row
        # (``ins``) with a ``state`` of its own.
        t = jobs.name
        sets = [f"{t}.{c} = IF({t}.state = 'done', VALUES({c}), {t}.{c})" for c in _RENEW]
        sets.append(f"{t}.state = IF({t}.state = 'done', VALUES(state), {t}.state)")
        return f" ON DUPLICATE KEY UPDATE {', '.join(sets)}"
    sets = [f"{c} = excluded.{c}" for c in (*_RENEW, "state")]
    return (
        f" ON CONFLICT (tenant, job_key, token) DO UPDATE SET {', '.join(sets)}"
        f" WHERE {jobs.name}.state = 'done'"
    )


_JOB_NAMES = [c.name for c in jobs.columns if c.name != "created_at"]
_JOB_INSERT = f"INSERT INTO {jobs.name} ({', '.join(_JOB_NAMES)}, created_at) "


def _enqueue_sql(kind: str) -> str:
    """A job row's INSERT, as the driver's own SQL text: built once per dialect, not once
    per request (building and cache-keying the Core statement took ~60 % of an enqueue's
    CPU). ``created_at`` is the ledger's clock expression (``stores.sql._NOW``): the
    database's own clock on PostgreSQL and MariaDB (no clock read before it), the host's
    on SQLite."""
    values = ", ".join(f"%({n})s" for n in _JOB_NAMES)
    return _render(f"{_JOB_INSERT}VALUES ({values}, {{now}}){_upsert(kind)}", kind)


def new_job(
    tenant: str, key: str, token: int, lease_id: str, meta_json: str, ttl: float
) -> dict[str, Any]:
    """A queued job row's columns but ``created_at`` (the statement's clock)."""
    return {
        "tenant": tenant,
        "job_key": key,
        "token": token,
        "lease_id": lease_id,
        "meta": meta_json,
        "state": "queued",
        "taken_until": None,
        "worker": None,
        "attempts": 0,
        "ttl": ttl,
    }


def _job_with_claim(kind: str) -> str:
    return (
        _JOB_INSERT
        + "SELECT "
        + ", ".join("ins.token" if n == "token" else f"%(j_{n})s" for n in _JOB_NAMES)
        + f", {{now}} FROM ins WHERE TRUE{_upsert(kind)}"
    )


#: A key-mode run's job row written by its lease's own claim (the ``also`` of
#: ``claim_with``), per ledger kind: in the claim's statement on PostgreSQL, in its
#: transaction on SQLite and MariaDB/MySQL. ``ins`` is the claimed row, whose token the
#: job carries. Parameters: :func:`job_params`.
JOB_WITH_CLAIM = {k: _job_with_claim(k) for k in ("postgresql", "mysql", "sqlite")}


def job_params(tenant: str, key: str, lease_id: str, meta_json: str, ttl: float) -> dict[str, Any]:
    """:data:`JOB_WITH_CLAIM`'s parameters: :func:`new_job`'s row, the token from the claim."""
    row = new_job(tenant, key, 0, lease_id, meta_json, ttl)
    return {f"j_{n}": v for n, v in row.items() if n != "token"}


_ENQUEUE_SQL = {k: _enqueue_sql(k) for k in ("postgresql", "mysql", "sqlite")}


class ServerDB:
    """Tenants, keys, jobs and usage counters, on ``engine``."""

    def __init__(self, engine: sa.Engine, now: Callable[[], float]) -> None:
        self.engine = engine
        self.kind = engine.dialect.name
        self.now = now
        self._ready = False
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[KeyInfo | None, float]] = {}
        self.cache_seconds = 5.0

    # -- plumbing -----------------------------------------------------------------------
    def ensure(self) -> None:
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            for attempt in range(5):
                try:
                    meta.create_all(self.engine, checkfirst=True)
                    break
                except sa.exc.SQLAlchemyError:  # another replica created it meanwhile
                    if attempt == 4:
                        raise
                    time.sleep(0.05 * (attempt + 1))
            self._ready = True

    def tx(self, fn: Callable[[sa.Connection], T], *, autocommit: bool = False) -> T:
        """``fn(conn)`` in one transaction (``autocommit``: each statement its own, for
        ``fn`` of one statement: no BEGIN or COMMIT round trip)."""
        self.ensure()
        delay = 0.01
        for attempt in range(6):
            try:
                if autocommit:
                    with self.engine.connect() as conn:
                        return fn(conn.execution_options(isolation_level="AUTOCOMMIT"))
                with self.engine.begin() as conn:
                    return fn(conn)
            except sa.exc.OperationalError as err:
                if attempt == 5:
                    raise StoreError(f"server tables: {err.orig or err}") from err
                time.sleep(delay)
                delay *= 2
            except sa.exc.SQLAlchemyError as err:
                raise StoreError(f"server tables: {err}") from err
        raise AssertionError("unreachable")

    def _upsert_add(self, table: sa.Table, values: dict[str, Any], col: str) -> Any:
        if self.kind == "postgresql":
            from sqlalchemy.dialects import postgresql

            pg = postgresql.insert(table).values(**values)
            pk = [c.name for c in table.primary_key.columns]
            return pg.on_conflict_do_update(
                index_elements=pk, set_={col: table.c[col] + pg.excluded[col]}
            )
        if self.kind in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            my = mysql.insert(table).values(**values)
            return my.on_duplicate_key_update({col: table.c[col] + my.inserted[col]})
        from sqlalchemy.dialects import sqlite

        lite = sqlite.insert(table).values(**values)
        pk = [c.name for c in table.primary_key.columns]
        return lite.on_conflict_do_update(
            index_elements=pk, set_={col: table.c[col] + lite.excluded[col]}
        )

    # -- tenants and keys ---------------------------------------------------------------
    def ensure_tenant(self, tenant: str) -> None:
        if not TENANT_RE.match(tenant):
            raise ConfigError(f"a tenant name must match {TENANT_RE.pattern}, got {tenant!r}")

        def run(conn: sa.Connection) -> None:
            found = conn.execute(
                sa.select(tenants.c.tenant).where(tenants.c.tenant == tenant)
            ).first()
            if found is None:
                conn.execute(
                    sa.insert(tenants).values(tenant=tenant, prefs="{}", created_at=self.now())
                )

        self.tx(run)

    def create_key(
        self,
        tenant: str,
        *,
        label: str | None = None,
        rate_limit: float | None = None,
        make_limit: int | None = None,
        ai_limit: int | None = None,
    ) -> str:
        """A new key for ``tenant``; returns the key (never stored, only its digest)."""
        self.ensure_tenant(tenant)
        if make_limit is not None or ai_limit is not None:
            self.set_limits(tenant, make_limit=make_limit, ai_limit=ai_limit)
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        row = {
            "id": secrets.token_hex(8),
            "tenant": tenant,
            "key_hash": hash_key(raw),
            "prefix": raw[: len(KEY_PREFIX) + 4],
            "label": label,
            "rate_limit": rate_limit,
            "created_at": self.now(),
            "revoked_at": None,
        }
        self.tx(lambda conn: conn.execute(sa.insert(api_keys).values(**row)))
        return raw

    def revoke_key(self, key_id: str) -> bool:
        def run(conn: sa.Connection) -> bool:
            res = conn.execute(
                sa.update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=self.now())
            )
            return bool(res.rowcount)

        done = self.tx(run)
        self._cache.clear()
        return done

    def list_keys(self, tenant: str | None = None) -> list[dict[str, Any]]:
        def run(conn: sa.Connection) -> list[dict[str, Any]]:
            q = sa.select(
                api_keys.c.id,
                api_keys.c.tenant,
                api_keys.c.prefix,
                api_keys.c.label,
                api_keys.c.rate_limit,
                api_keys.c.created_at,
                api_keys.c.revoked_at,
            ).order_by(api_keys.c.created_at)
            if tenant is not None:
                q = q.where(api_keys.c.tenant == tenant)
            return [dict(r._mapping) for r in conn.execute(q)]

        return self.tx(run)

    def set_limits(
        self, tenant: str, *, make_limit: int | None = None, ai_limit: int | None = None
    ) -> None:
        values = {"make_limit": make_limit, "ai_limit": ai_limit}
        self.tx(
            lambda conn: conn.execute(
                sa.update(tenants).where(tenants.c.tenant == tenant).values(**values)
            )
        )

    def cached(self, raw: str) -> tuple[bool, KeyInfo | None]:
        """(hit, info) from the cache alone: no database call (for the event loop)."""
        hit = self._cache.get(hash_key(raw))
        if hit is not None and hit[1] > time.monotonic():
            return True, hit[0]
        return False, None

    def authenticate(self, raw: str) -> KeyInfo | None:
        """The key's tenant, or None; answers are cached for ``cache_seconds``."""
        digest = hash_key(raw)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]

        def run(conn: sa.Connection) -> KeyInfo | None:
            r = conn.execute(
                sa.select(api_keys).where(
                    api_keys.c.key_hash == digest, api_keys.c.revoked_at.is_(None)
                )
            ).first()
            if r is None:
                return None
            return KeyInfo(r.id, r.tenant, r.prefix, r.rate_limit)

        info = self.tx(run)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (info, now + self.cache_seconds)
        return info

    def tenant_row(self, tenant: str) -> dict[str, Any]:
        def run(conn: sa.Connection) -> dict[str, Any]:
            r = conn.execute(sa.select(tenants).where(tenants.c.tenant == tenant)).first()
            return dict(r._mapping) if r is not None else {"tenant": tenant, "prefs": "{}"}

        return self.tx(run)

    def update_prefs(self, tenant: str, changes: dict[str, bool]) -> dict[str, bool]:
        def run(conn: sa.Connection) -> dict[str, bool]:
            r = conn.execute(sa.select(tenants.c.prefs).where(tenants.c.tenant == tenant)).first()
            prefs: dict[str, bool] = json.loads(r.prefs or "{}") if r is not None else {}
            prefs.update(changes)
            conn.execute(
                sa.update(tenants).where(tenants.c.tenant == tenant).values(prefs=json.dumps(prefs))
            )
            return prefs

        return self.tx(run)

    # -- usage --------------------------------------------------------------------------
    def add_usage(self, counts: dict[tuple[str, str, str, str], int]) -> None:
        if not counts:
            return

        def run(conn: sa.Connection) -> None:
            for (tenant, day, kind, metric), n in sorted(counts.items()):
                values = {"tenant": tenant, "day": day, "kind": kind, "metric": metric, "n": n}
                conn.execute(self._upsert_add(usage, values, "n"))

        self.tx(run)

    def usage_rows(self, tenant: str, first_day: str, last_day: str) -> list[dict[str, Any]]:
        def run(conn: sa.Connection) -> list[dict[str, Any]]:
            q = sa.select(usage.c.day, usage.c.kind, usage.c.metric, usage.c.n).where(
                usage.c.tenant == tenant, usage.c.day >= first_day, usage.c.day <= last_day
            )
            return [dict(r._mapping) for r in conn.execute(q)]

        return self.tx(run)

    # -- jobs ---------------------------------------------------------------------------
    def enqueue(
        self, tenant: str, key: str, token: int, lease_id: str, meta_json: str, ttl: float
    ) -> None:
        row = new_job(tenant, key, token, lease_id, meta_json, ttl)
        kind = "mysql" if self.kind == "mariadb" else self.kind
        sql = _ENQUEUE_SQL[kind]
        if kind == "sqlite":
            row["now"] = self.now()
        # PostgreSQL: one autocommitted statement, no BEGIN or COMMIT round trip. A retry
        # after a lost reply finds its own row and leaves it (see _enqueue_sql).
        self.tx(lambda conn: conn.exec_driver_sql(sql, row), autocommit=kind == "postgresql")

    def take_jobs(self, worker: str, lease: float, limit: int = 4) -> list[dict[str, Any]]:
        """Claim up to ``limit`` runnable jobs for ``worker`` (conditional update each)."""
        now = self.now()
        ready = sa.or_(
            jobs.c.state == "queued", sa.and_(jobs.c.state == "taken", jobs.c.taken_until < now)
        )

        def find(conn: sa.Connection) -> list[dict[str, Any]]:
            q = sa.select(jobs).where(ready).order_by(jobs.c.created_at).limit(limit * 4)
            return [dict(r._mapping) for r in conn.execute(q)]

        taken: list[dict[str, Any]] = []
        for row in self.tx(find):
            if len(taken) >= limit:
                break
            pk = (
                jobs.c.tenant == row["tenant"],
                jobs.c.job_key == row["job_key"],
                jobs.c.token == row["token"],
            )

            def claim(conn: sa.Connection, pk: Any = pk) -> bool:
                res = conn.execute(
                    sa.update(jobs)
                    .where(*pk, ready)
                    .values(
                        state="taken",
                        taken_until=now + lease,
                        worker=worker,
                        attempts=jobs.c.attempts + 1,
                    )
                )
                return bool(res.rowcount == 1)

            if self.tx(claim):
                row["attempts"] += 1
                taken.append(row)
        return taken

    def job_heartbeat(self, row: dict[str, Any], worker: str, lease: float) -> bool:
        def run(conn: sa.Connection) -> bool:
            res = conn.execute(
                sa.update(jobs)
                .where(
                    jobs.c.tenant == row["tenant"],
                    jobs.c.job_key == row["job_key"],
                    jobs.c.token == row["token"],
                    jobs.c.worker == worker,
                    jobs.c.state == "taken",
                )
                .values(taken_until=self.now() + lease)
            )
            return bool(res.rowcount == 1)

        return self.tx(run)

    def job_done(self, row: dict[str, Any]) -> None:
        self.tx(
            lambda conn: conn.execute(
                sa.update(jobs)
                .where(
                    jobs.c.tenant == row["tenant"],
                    jobs.c.job_key == row["job_key"],
                    jobs.c.token == row["token"],
                )
                # The job's input (it may carry credentials) is kept only while needed.
                .values(state="done", taken_until=None, meta=None)
            )
        )

    def job_count(self, state: str | None = None) -> int:
        def run(conn: sa.Connection) -> int:
            q = sa.select(sa.func.count()).select_from(jobs)
            if state is not None:
                q = q.where(jobs.c.state == state)
            return int(conn.execute(q).scalar_one())

        return self.tx(run)
