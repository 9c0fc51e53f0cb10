"""Governance state in the ledger's database: one short transaction per primitive.

Unlike the claim ledger's hot path (one autocommitted statement per primitive), budget
reservations and audit appends read and write several rows that must change together,
so each primitive here is one transaction on SQLAlchemy Core:

=================  ==============================================================
primitive          what is atomic
=================  ==============================================================
``snapshot``       one read: the agent's row, the global switch row, the tool row
``begin``          a governed call's first transaction: the snapshot, the caller's
                   verdict on it, then ``reserve``'s steps, one commit
``reserve``        settle the agent's expired holds as spent (each with its audit
                   row), lock its counters (in sorted order: no deadlock), check
                   every cap, add, insert the hold (carrying the audit entry its
                   sweeper would write)
``settle``         delete the hold (the spend stays counted) and append the audit
                   row; nothing if the hold is gone (swept and audited already)
``release``        delete the hold, append the audit row, give the amounts back,
                   at most once
``append_audit``   lock the agent's chain head, insert the row hashed over the
                   previous hash, move the head: one chain per agent, so appends of
                   different agents never wait for each other
``approval_for``   find the call's latest request, take an approved one
                   (approved → consumed) or open the next round after a consumed one
=================  ==============================================================

Locks are taken in one order everywhere: hold rows, the chain head, the counters.

Isolation: PostgreSQL READ COMMITTED with ``SELECT … FOR UPDATE`` row locks; MySQL and
MariaDB READ COMMITTED (no gap locks, so concurrent holds of one agent do not deadlock
on the holds' key, tenant + agent + id: their only index since revision 0005); SQLite
``BEGIN IMMEDIATE`` (one writer at a time). A deadlock or serialization failure is
retried a few times with backoff. A lost connection (a database restart) is retried on a
fresh connection for up to ``RECONNECT_FOR`` seconds, which is why the primitives are
idempotent (see ``GovStore._tx``; a timeline event may be posted twice after a lost
reply, a webhook is added by an operator and not retried);
there is no ``pool_pre_ping`` round trip on checkout.

A governed call is two transactions, ``begin`` and ``settle``, whose statements are
pre-rendered per dialect and run on the DBAPI cursor (the rest uses SQLAlchemy Core);
on PostgreSQL they are written in libpq's pipeline mode (:mod:`.pgpipe`), three round
trips in all with their BEGIN and COMMIT once the process knows the agent's counters and
chain head (``_early``, ``_complete_one``; see ``_HOT`` and docs/statements.md).

The in-process ``memory://`` store gets the same tables in a private in-memory SQLite
database behind one lock, so tests see exactly the SQL semantics.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard, TypeVar

import sqlalchemy as sa

from ..errors import ConfigError, StoreError
from . import schema as S
from .base import NewClaim, Record, Store
from .governance import (
    GENESIS,
    Decide,
    DecideClaim,
    GovernanceStore,
    Reservation,
    Want,
    audit_fields,
    chain_body,
    chain_hash,
    completed_by,
)
from .pins import ThreadPins, dispose

__all__ = ["GENESIS", "GovStore", "Reservation", "Want", "chain_hash"]

_log = logging.getLogger("onceonly.governance")

T = TypeVar("T")
#: What a decision asks to reserve: the wants and the sweeper's audit entry, or None.
Plan = tuple[Sequence[Want], dict[str, Any] | None] | None

_NOW_SQL = {
    "postgresql": "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8",
    "mysql": "SELECT UNIX_TIMESTAMP(NOW(6))",
}
_GOV_TABLES = (
    S.agents,
    S.counters,
    S.reservations,
    S.tools,
    S.approvals,
    S.audit,
    S.audit_heads,
    S.events,
    S.webhooks,
    S.outbox,
)
#: How long a primitive keeps retrying on a fresh connection when the database is
#: unreachable (a restart, a failover): long enough for a restart, short enough that a
#: caller is not held for good.
RECONNECT_FOR = 15.0
#: The decisions an audit row records a run with (what ``audit verify`` counts).
RAN = ("executed", "unknown")


def _retryable(err: BaseException) -> bool:
    orig = getattr(err, "orig", None)
    code = getattr(orig, "sqlstate", None)
    if code in ("40P01", "40001"):  # PostgreSQL deadlock / serialization failure
        return True
    args = getattr(orig, "args", ())
    if args and args[0] in (1213, 1205):  # MySQL deadlock / lock wait timeout
        return True
    text = str(orig or err).lower()
    return "database is locked" in text or "deadlock" in text


def _disconnected(err: BaseException) -> bool:
    """The database could not be reached or dropped the connection (a restart): the
    statement did not run, or it committed and only its reply was lost. Every primitive
    here is safe to run again (see :meth:`GovStore._tx`), on a fresh connection."""
    if getattr(err, "connection_invalidated", False):
        return True  # SQLAlchemy saw a disconnect and discarded the pool's connections
    return isinstance(err, (sa.exc.OperationalError, sa.exc.InterfaceError)) and not _retryable(err)


# Statements of the governed hot path, built once: constructing a SQLAlchemy expression
# costs more than executing its cached compiled form.
_b = sa.bindparam
_EXPIRED = (
    sa.select(S.reservations.c.id, S.reservations.c.amounts)
    .where(
        S.reservations.c.tenant == _b("t"),
        S.reservations.c.agent_id == _b("a"),
        S.reservations.c.lease_until < _b("now"),
    )
    .order_by(S.reservations.c.id)
    .with_for_update()
)
_COUNTERS = sa.select(S.counters.c.metric, S.counters.c.window_start, S.counters.c.used).where(
    S.counters.c.tenant == _b("t"),
    S.counters.c.agent_id == _b("a"),
    S.counters.c.metric.in_(_b("metrics", expanding=True)),
    S.counters.c.window_start.in_(_b("windows", expanding=True)),
)
_SET_USED = (
    sa.update(S.counters)
    .where(
        S.counters.c.tenant == _b("t"),
        S.counters.c.agent_id == _b("a"),
        S.counters.c.metric == _b("m"),
        S.counters.c.window_start == _b("w"),
    )
    .values(used=_b("used"))
)
_HOLD = sa.insert(S.reservations)
_AGENTS = sa.select(
    S.agents.c.agent_id, S.agents.c.policy, S.agents.c.disabled, S.agents.c.disabled_reason
).where(
    S.agents.c.tenant == _b("t"),
    sa.or_(S.agents.c.agent_id == _b("a"), S.agents.c.agent_id == "*"),
)
_TOOL = sa.select(S.tools.c.scope_id, S.tools.c.kind, S.tools.c.enabled).where(
    S.tools.c.tenant == _b("t"),
    S.tools.c.name == _b("name"),
    sa.or_(S.tools.c.scope_id == "global", S.tools.c.scope_id == _b("scope")),
)
_HEAD = sa.select(S.audit_heads.c.seq, S.audit_heads.c.hash).where(
    S.audit_heads.c.tenant == _b("t"), S.audit_heads.c.agent_id == _b("a")
)
_AUDIT = sa.insert(S.audit)
_MOVE_HEAD = (
    sa.update(S.audit_heads)
    .where(S.audit_heads.c.tenant == _b("t"), S.audit_heads.c.agent_id == _b("a"))
    .values(seq=_b("seq"), hash=_b("hash"))
)


# -- the governed hot path, on the pooled DBAPI connection (DESIGN §10) --------------------
# A governed call runs two transactions: begin (policy snapshot + reservation) and settle
# (+ audit). Their statements are pre-rendered per dialect and sent on the raw DBAPI
# cursor of the SQLAlchemy connection that owns the transaction: SQLAlchemy's execution
# layer costs more per statement than SQLite does. Every other primitive (and every rare
# branch of these two: expired holds, a rerun, a notification, MySQL) stays on Core.
_CLOCK = {
    "postgresql": "EXTRACT(EPOCH FROM clock_timestamp())::float8",
    "mysql": "UNIX_TIMESTAMP(NOW(6))",
}
_HOT_SNAP = """
WITH c AS (SELECT {clock} AS now)
SELECT 0, c.now, NULL, NULL, NULL, NULL FROM c
UNION ALL
SELECT 1, NULL, agent_id, policy, disabled, disabled_reason FROM onceonly_agents
 WHERE tenant = :t AND agent_id IN (:a, '*')
UNION ALL
SELECT 2, NULL, scope_id, kind, enabled, NULL FROM onceonly_tools
 WHERE tenant = :t AND name = :name AND scope_id IN ('global', :scope)
UNION ALL
SELECT 3, NULL, id, NULL, NULL, NULL FROM onceonly_reservations
 WHERE tenant = :t AND agent_id = :a AND lease_until < (SELECT now FROM c)
"""
_HOT_HOLD = (
    "INSERT INTO onceonly_reservations (id, tenant, agent_id, namespace, idem_key, amounts,"
    " lease_until, created_at, audit) VALUES (:id, :t, :a, :ns, :key, :amounts, :until,"
    " :now, :audit)"
)
_AUDIT_COLS = (
    "tenant, agent_id, seq, tool, args_digest, args, decision, reason, risk_level,"
    " spend_micros, run_id, token, idem_key, created_at, prev_hash, hash"
)
_HOT_AUDIT = (
    f"INSERT INTO onceonly_audit ({_AUDIT_COLS}) VALUES (:tenant, :agent_id, :seq, :tool,"
    " :args_digest, :args, :decision, :reason, :risk_level, :spend_micros, :run_id, :token,"
    " :idem_key, :created_at, :prev_hash, :hash)"
)
_HOT_MOVE = (
    "UPDATE onceonly_audit_heads SET seq = :seq, hash = :hash"
    " WHERE tenant = :tenant AND agent_id = :agent_id"
)


# PostgreSQL: an audit row appended in one statement, the server hashing it under the
# chain head's lock (``GovStore._append_one``). ``gate``: a CTE written before it (the
# hold's delete; the ledger's fenced completion) without whose row nothing is appended;
# the head is locked after it, the order every transaction takes its locks in (ledger
# row, hold, head). The row's canonical JSON (``chain_hash``) is sent in two parts around
# its seq, which only the locked head knows. Returns the gate's rows, then the new seq and
# hash (NULL when nothing was appended); a gate passed with no head to follow raises
# division_by_zero, which rolls the whole transaction back.
@functools.lru_cache(maxsize=64)
def _append_one_sql(gate: str = "", gate_name: str = "") -> str:
    passed = f"EXISTS (SELECT 1 FROM {gate_name})" if gate_name else "TRUE"
    return (
        f"WITH {gate + ', ' if gate else ''}"
        "h AS (SELECT seq, hash FROM onceonly_audit_heads WHERE tenant = :t AND agent_id = :a"
        f" AND {passed} FOR UPDATE),"
        " n AS (SELECT seq + 1 AS seq, hash AS prev, encode(sha256(convert_to(hash || chr(10)"
        " || :pre || (seq + 1)::text || :post, 'UTF8')), 'hex') AS hash FROM h),"
        " i AS (INSERT INTO onceonly_audit (" + _AUDIT_COLS + ") SELECT :au_tenant,"
        " :au_agent_id, n.seq, :au_tool, :au_args_digest, :au_args, :au_decision, :au_reason,"
        " :au_risk_level, :au_spend_micros, :au_run_id, :au_token, :au_idem_key,"
        " :au_created_at, n.prev, n.hash FROM n RETURNING seq, hash),"
        " u AS (UPDATE onceonly_audit_heads x SET seq = n.seq, hash = n.hash FROM n"
        " WHERE x.tenant = :t AND x.agent_id = :a RETURNING x.seq)"
        f" SELECT {f'(SELECT count(*) FROM {gate_name})' if gate_name else '1'},"
        f" (SELECT seq FROM i), (SELECT hash FROM i), CASE WHEN {passed}"
        " THEN 1 / (SELECT count(*) FROM i)::int END"
    )


#: The settle's gate: the hold's delete, only if the ledger's completion (sent before it
#: in the same transaction) is ours: the record is final with our token.
_HOLD_GATE = (
    "d AS (DELETE FROM onceonly_reservations"
    " WHERE id = :rid AND tenant = :t AND agent_id = :holder AND EXISTS (SELECT 1 FROM"
    " onceonly_ledger WHERE namespace = :ns AND idem_key = :k AND token = :token"
    " AND state = :state) RETURNING id)"
)
_HOT = {
    # SQLite (and the memory store): BEGIN IMMEDIATE already holds the write lock, so a
    # plain read of a counter or of the chain head is as good as a locked one.
    "sqlite": {
        "snap": _HOT_SNAP.replace("{clock}", ":now"),
        "hold": _HOT_HOLD,
        # Scoped to the tenant and agent: another tenant's hold id settles nothing.
        "delete": "DELETE FROM onceonly_reservations"
        " WHERE id = :rid AND tenant = :t AND agent_id = :holder",
        "head": "SELECT seq, hash FROM onceonly_audit_heads WHERE tenant = :t AND agent_id = :a",
        "new_head": "INSERT INTO onceonly_audit_heads (tenant, agent_id, seq, hash, base_seq,"
        " base_hash) VALUES (:tenant, :agent_id, :seq, :hash, 0, :g)",
        "audit": _HOT_AUDIT,
        "move": _HOT_MOVE,
    },
    # PostgreSQL: the hold's delete takes the chain head's row lock and reads it (and
    # the clock) in one statement; the audit row and the head's move are a second one.
    "postgresql": {
        "snap": _HOT_SNAP.replace("{clock}", _CLOCK["postgresql"]),
        "hold": _HOT_HOLD,
        "settle": "WITH d AS (DELETE FROM onceonly_reservations"
        " WHERE id = :rid AND tenant = :t AND agent_id = :holder RETURNING id)"
        " INSERT INTO onceonly_audit_heads (tenant, agent_id, seq, hash, base_seq, base_hash)"
        " SELECT :t, :a, 0, :g, 0, :g FROM d ON CONFLICT (tenant, agent_id)"
        " DO UPDATE SET seq = onceonly_audit_heads.seq"
        f" RETURNING seq, hash, {_CLOCK['postgresql']}",
        "append": f"WITH i AS ({_HOT_AUDIT}) {_HOT_MOVE}",
        "settle_one": _append_one_sql(_HOLD_GATE, "d"),
        "append_one": _append_one_sql(),
    },
    "mysql": {
        "snap": _HOT_SNAP.replace("{clock}", _CLOCK["mysql"]),
        "hold": _HOT_HOLD,
    },
}


@functools.lru_cache(maxsize=512)
def _paramstyle(sql: str, kind: str) -> str:
    """``:name`` placeholders as the driver wants them (sqlite3 takes them as they are;
    psycopg and PyMySQL take ``%(name)s``). ``::`` casts are left alone."""
    if kind in ("sqlite", "memory"):
        return sql
    return re.sub(r"(?<![:\w]):([a-z_]\w*)", r"%(\1)s", sql)


class SQLLedger(Protocol):
    """A SQL ledger as GovStore sees it (``stores/sql.py``'s SQLStore): an interface, so
    the ledgers' modules import this one and never the other way round."""

    kind: str
    url: sa.URL
    synchronous: str  # SQLite
    connect_args: dict[str, Any]  # PostgreSQL, MySQL

    @property
    def busy_timeout(self) -> float: ...

    def ensure_schema(self) -> None: ...


def _sql_ledger(ledger: Store) -> TypeGuard[SQLLedger]:
    return ledger.kind in ("sqlite", "postgresql", "mysql")


#: Writes a notification's outbox rows on the caller's connection, inside its transaction.
#: Installed by :mod:`onceonly_core.governance.outbox` when it is imported (the engine
#: imports it before it builds a notification): the stores never import governance.
NotificationWriter = Callable[[sa.Connection, float, str, Mapping[str, Any]], int]
notification_writer: NotificationWriter | None = None


def _write_notification(
    conn: sa.Connection, now: float, tenant: str, event: Mapping[str, Any]
) -> int:
    if notification_writer is None:  # pragma: no cover - the engine imports the outbox first
        raise RuntimeError("onceonly_core.governance.outbox was not imported")
    return notification_writer(conn, now, tenant, event)


class GovStore(GovernanceStore):
    """Governance primitives over the ledger's database (see the module docstring)."""

    def __init__(self, ledger: Store) -> None:
        self._lock: threading.RLock | None = None
        self._clock: Callable[[], float] | None = None
        self._local = threading.local()
        self._reader: sa.Engine | None = None
        self._snap: Any = None
        self._head_now: Any = None
        self._url: sa.URL | None = None  # the SQL ledger's database (memory: none)
        # SQLite: a connection per thread. Checking one out of SQLAlchemy's pool and
        # back in cost more than the transaction it ran (~130 us against ~30 for BEGIN
        # IMMEDIATE, a write and COMMIT on the bench machine; two per governed call).
        # Between transactions it holds no lock and no snapshot: our BEGIN starts each.
        self._pins: ThreadPins[sa.Connection] | None = None
        # On unless ONCEONLY_GOV_JOIN says no (0/false/no/off): the way back to the
        # separate path (four commits per governed call) while the joined one is new.
        join = os.environ.get("ONCEONLY_GOV_JOIN", "1").strip().lower()
        self._join = join not in ("0", "false", "no", "off")
        if ledger.kind == "memory":
            self.kind = "memory"
            self.engine = sa.create_engine(
                "sqlite://",
                poolclass=sa.StaticPool,
                connect_args={"check_same_thread": False},
            )
            self._lock = threading.RLock()
            self._clock = ledger.now
            _sqlite_transactions(self.engine)
            S.metadata.create_all(self.engine, tables=list(_GOV_TABLES))
            self._pid = os.getpid()
            self._hot_sql()
            return
        if not _sql_ledger(ledger):
            raise ConfigError(
                f"governance needs a SQL or memory ledger, not {type(ledger).__name__}"
            )
        ledger.ensure_schema()
        self.kind = ledger.kind
        self._url = ledger.url
        if ledger.kind == "sqlite":
            # Our own pooled engine on the same file (the ledger's operator engine is
            # NullPool): BEGIN IMMEDIATE takes the write lock up front, so two
            # reservations never both read a counter and then both write it.
            # Room in the pool beyond the threads' pinned connections (ThreadPins).
            self.engine = sa.create_engine(
                ledger.url.set(query={}), pool_size=PINNED + 4, max_overflow=10
            )
            busy = int(ledger.busy_timeout * 1000)

            @sa.event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn: Any, _rec: Any) -> None:
                dbapi_conn.execute(f"PRAGMA busy_timeout={busy}")
                dbapi_conn.execute(f"PRAGMA synchronous={ledger.synchronous}")

            _sqlite_transactions(self.engine)
            self._clock = time.time
            self._pins = ThreadPins(PINNED)
        else:
            # Our own pool: the ledger's connections are in autocommit mode (one statement
            # per primitive), ours need real transactions.
            # No pool_pre_ping (one round trip per checkout): a connection the server
            # dropped fails its first statement, and _tx runs the primitive again on a
            # fresh one.
            self.engine = sa.create_engine(
                ledger.url,
                isolation_level="READ COMMITTED",
                pool_size=5,
                max_overflow=10,
                connect_args=ledger.connect_args,
            )
            # Reads (the policy snapshot on every call, operator listings) need no
            # transaction: their own autocommit pool saves BEGIN and COMMIT. On
            # PostgreSQL a governed call's begin and settle run here too, sending their
            # BEGIN and COMMIT inside their statements' queries (see _exec).
            self._reader = sa.create_engine(
                ledger.url,
                isolation_level="AUTOCOMMIT",
                pool_size=5,  # PostgreSQL's governed calls run here too (_manual)
                max_overflow=10,
                connect_args=ledger.connect_args,
            )
            clock: Any = sa.literal_column(_NOW_SQL[self.kind].removeprefix("SELECT ")).label("now")
            h = S.audit_heads
            self._head_now = sa.select(h.c.seq, h.c.hash, clock).where(
                h.c.tenant == _b("t"), h.c.agent_id == _b("a")
            )
            one = sa.select(sa.literal(1).label("x")).subquery("one")
            a = S.agents
            self._snap = sa.select(
                clock,
                a.c.agent_id,
                a.c.policy,
                a.c.disabled,
                a.c.disabled_reason,
            ).select_from(
                one.outerjoin(
                    a,
                    sa.and_(
                        a.c.tenant == _b("t"),
                        sa.or_(a.c.agent_id == _b("a"), a.c.agent_id == "*"),
                    ),
                )
            )
        self._pid = os.getpid()
        self._hot_sql()

    # -- plumbing -----------------------------------------------------------------------
    def _now(self, conn: sa.Connection) -> float:
        if self._clock is not None:
            return self._clock()
        return float(conn.execute(sa.text(_NOW_SQL[self.kind])).scalar_one())

    def now(self) -> float:
        return self._tx(lambda conn, now: now)

    def _tx(
        self,
        fn: Callable[[sa.Connection, float], T],
        *,
        again: bool = True,
        read: bool = False,
        clock: bool = True,
    ) -> T:
        """Run ``fn(conn, now)`` in one transaction.

        A deadlock or serialization failure is retried a few times with backoff. A lost
        connection (a database restart) is retried on a fresh connection for up to
        :data:`RECONNECT_FOR` seconds: every primitive is written so that running it
        twice is the same as running it once (conditional writes; a hold's id chosen
        before the first attempt), because a commit whose reply was lost cannot be
        told from one that never happened. ``fn`` sees ``self._rerun`` on a rerun.
        ``again=False``: fail fast. ``read``: on the autocommit reader pool (no
        BEGIN/COMMIT round trips; each statement sees what is committed). ``clock=False``:
        ``fn`` reads the database clock itself (``now`` is passed as NaN)."""
        if self._pid != os.getpid():  # never reuse a parent's connections after fork
            self.engine.dispose(close=False)
            if self._reader is not None:
                self._reader.dispose(close=False)
            if self._pins is not None:
                self._pins.forget()
            self._pid = os.getpid()
        delay = 0.01
        deadline: float | None = None
        attempt = 0
        while True:
            self._local.attempt = attempt
            try:
                if self._lock is not None:
                    with self._lock, self.engine.begin() as conn:
                        return fn(conn, self._now(conn))
                pins = self._pins  # SQLite: this thread's own connection
                pinned = None if pins is None else pins.get(self.engine.connect)
                if pins is not None and pinned is not None and not pinned.in_transaction():
                    try:
                        with pinned.begin():
                            return fn(pinned, self._now(pinned))
                    except sa.exc.DBAPIError:
                        pins.drop()  # the thread's next transaction: a fresh connection
                        raise
                if read and self._reader is not None:
                    with self._reader.connect() as conn:
                        if not self._manual:
                            return fn(conn, self._now(conn) if clock else float("nan"))
                        try:
                            out = fn(conn, self._now(conn) if clock else float("nan"))
                        except BaseException:
                            self._end_manual(conn, commit=False)
                            raise
                        self._end_manual(conn, commit=True)
                        return out
                with self.engine.begin() as conn:
                    return fn(conn, self._now(conn) if clock else float("nan"))
            except sa.exc.DBAPIError as err:
                attempt += 1
                if attempt < 8 and _retryable(err):
                    time.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 0.5)
                    continue
                if again and self._lock is None and _disconnected(err):
                    now = time.monotonic()
                    deadline = deadline or now + RECONNECT_FOR
                    if now < deadline:
                        time.sleep(min(delay * (1 + random.random()), deadline - now))
                        delay = min(delay * 2, 1.0)
                        continue
                raise StoreError(f"governance store ({self.kind}): {err.orig or err}") from err
            except sa.exc.SQLAlchemyError as err:
                raise StoreError(f"governance store ({self.kind}): {err}") from err
            finally:
                self._local.attempt = 0

    def _hot_sql(self) -> None:
        dialect = "sqlite" if self.kind == "memory" else self.kind
        self._dialect = dialect
        #: PostgreSQL: begin and settle run on the autocommit pool and send their own
        #: BEGIN and COMMIT, each in the query of a statement (see _exec).
        self._manual = dialect == "postgresql" and self._reader is not None
        if self._manual:
            import psycopg

            self._client_cursor: Any = psycopg.ClientCursor
            self._pipelined = psycopg.Pipeline.is_supported()
            if self._pipelined:
                from . import pgpipe  # psycopg's: imported only for PostgreSQL

                self._pipe = pgpipe.run
        self._hot = {k: _paramstyle(v, self.kind) for k, v in _HOT[dialect].items()}
        self._counter_sql: dict[int, tuple[str, str]] = {}
        self._early_sql: dict[int, str] = {}
        #: PostgreSQL: the chains whose head this process has seen (their completions
        #: take one round trip) and the database clock's offset from the host's
        self._heads: set[tuple[str, str]] = set()
        self._skew: float | None = None
        #: (tenant, agent, tool) -> the (metric, window length) pairs its last call
        #: needed; the next call's claim locks them early (PostgreSQL; see _early)
        self._guess: dict[tuple[str, str, str], tuple[tuple[str, int], ...]] = {}
        self._dbapi_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error

    def _exec(
        self,
        conn: sa.Connection,
        sql: str,
        params: Mapping[str, Any],
        *,
        begin: bool = False,
        commit: bool = False,
        before: _Before | None = None,
    ) -> Any:
        """One pre-rendered statement (or several joined by :data:`_SEP`, PostgreSQL's
        hand-kept transactions only) on the transaction's DBAPI cursor; a driver error
        comes out as SQLAlchemy's (with a lost connection invalidated), so that
        :meth:`_tx` retries it as it does any other.

        PostgreSQL (``_manual``: the hot path runs on the autocommit pool and keeps its
        transaction itself): ``begin`` sends the transaction's BEGIN and ``commit`` its
        COMMIT with the statements, in one round trip: in libpq's pipeline mode, written
        at once (:mod:`.pgpipe`), every statement a server-side prepared one (planning
        the claim's CTE afresh each time, as the simple query protocol must, costs more
        than the round trip it saves), or, where libpq has no pipeline mode, in one
        simple query with client-side binding. Elsewhere they are ignored: the transaction is
        SQLAlchemy's.

        ``before``: a read to send first, right after BEGIN, in the same round trip
        (pipeline mode only, and only when this statement begins the transaction); its
        rows land in ``before.rows``, which stays None when it was not sent; and
        ``before.then``, a statement to send last, its rows in ``before.then_rows``."""
        raw = conn.connection
        dbc: Any = raw.dbapi_connection
        manual = self._manual and (begin or commit)
        cur: Any = None
        try:
            if not manual:
                cur = raw.cursor()
                cur.execute(sql, params)
                return cur
            if begin and dbc.info.transaction_status != _PG_IDLE:
                begin = False  # already in this primitive's transaction
            if self._pipelined:
                statements = [(one, params) for one in sql.split(_SEP)]
                first = _PG_BEGIN if begin else None
                if before is None or not begin:
                    return self._pipe(dbc, statements, begin=first, commit=commit)
                both = [(before.sql, before.params), *statements]
                if before.then is not None:
                    both.append(before.then)
                out = self._pipe(dbc, both, begin=first, commit=commit)
                if before.then is not None:
                    before.then_rows = out.rows_at(len(both) - 1)
                before.rows = out.fetchall()
                out.nextset()  # to the statements' results
                return out
            if begin:
                sql = f"{_PG_BEGIN}{_SEP}{sql}"
            if commit:
                sql = f"{sql}{_SEP}COMMIT"
            cur = self._client_cursor(dbc)
            cur.execute(sql, params)
            if begin:
                cur.nextset()  # past BEGIN's empty result, to the statement's
            return cur
        except self._dbapi_error as err:
            gone = self.engine.dialect.is_disconnect(err, raw.dbapi_connection, cur)  # type: ignore[arg-type]
            if gone:
                conn.invalidate()
            raise sa.exc.DBAPIError.instance(
                sql, params, err, self._dbapi_error, connection_invalidated=gone
            ) from err

    def _end_manual(self, conn: sa.Connection, *, commit: bool) -> None:
        """A transaction the hot path keeps by hand (PostgreSQL, on the autocommit pool)
        and left open (a refusal, a hold found gone, a rare branch on Core) is committed
        when the primitive returned, rolled back when it raised, before the connection
        goes back to the pool. A failed COMMIT raises as any failed statement does."""
        try:
            dbc: Any = conn.connection.dbapi_connection
            if dbc is None or dbc.closed or dbc.info.transaction_status == _PG_IDLE:
                return
            if commit:
                dbc.commit()
            else:
                dbc.rollback()
        except self._dbapi_error as err:
            conn.invalidate()  # its transaction's fate is the server's: not reused
            if commit:
                raise sa.exc.DBAPIError.instance(
                    "COMMIT", None, err, self._dbapi_error, connection_invalidated=True
                ) from err

    @property
    def _rerun(self) -> bool:
        """True while _tx runs a primitive again after a lost connection."""
        return bool(getattr(self._local, "attempt", 0))

    def _lock_row(self, conn: sa.Connection, table: sa.Table, values: dict[str, Any]) -> None:
        """Insert the row if absent, and hold its row lock until the transaction ends.

        An upsert that "updates" the row to itself takes the exclusive lock directly;
        INSERT IGNORE followed by SELECT … FOR UPDATE would take a shared lock first and
        deadlock two transactions upgrading at once (MySQL).
        """
        pk = [c.name for c in table.primary_key.columns]
        keep = next(c.name for c in table.columns if c.name not in pk)
        if self.kind == "postgresql":
            from sqlalchemy.dialects import postgresql

            pg = postgresql.insert(table).values(**values)
            conn.execute(pg.on_conflict_do_update(index_elements=pk, set_={keep: table.c[keep]}))
        elif self.kind == "mysql":
            from sqlalchemy.dialects import mysql

            my = mysql.insert(table).values(**values)
            conn.execute(my.on_duplicate_key_update({keep: table.c[keep]}))
        else:  # SQLite: BEGIN IMMEDIATE already holds the database's write lock
            from sqlalchemy.dialects import sqlite

            conn.execute(sqlite.insert(table).values(**values).on_conflict_do_nothing())

    # -- agents and policies ------------------------------------------------------------
    def snapshot(self, tenant: str, agent_id: str, tool: str) -> dict[str, Any]:
        """One read of everything the policy decision needs (no cache: a kill switch
        flipped in another process stops the very next call)."""

        def run(conn: sa.Connection, now: float) -> dict[str, Any]:
            if self._clock is None:
                # The server's clock rides on the agents read: one round trip fewer.
                got = conn.execute(self._snap, {"t": tenant, "a": agent_id}).all()
                now = float(got[0].now)
                rows: Sequence[Any] = [r for r in got if r.agent_id is not None]
            else:
                rows = conn.execute(_AGENTS, {"t": tenant, "a": agent_id}).all()
            tool_rows: Sequence[Any] = conn.execute(
                _TOOL, {"t": tenant, "name": tool, "scope": f"agent:{agent_id}"}
            ).all()
            out: dict[str, Any] = {"now": now, "agent": None, "global": None, "tool": None}
            for r in rows:
                agent = {k: getattr(r, k) for k in ("agent_id", "policy", "disabled")}
                agent["disabled_reason"] = r.disabled_reason
                out["global" if r.agent_id == "*" else "agent"] = agent
            # An agent-scoped registration overrides the global one.
            for r in sorted(tool_rows, key=lambda r: r.scope_id != "global"):
                out["tool"] = r._asdict()
            return out

        return self._read(run, clock=self._clock is not None)

    def _read(self, fn: Callable[[sa.Connection, float], T], *, clock: bool = True) -> T:
        if self.kind == "sqlite":
            # Reads need no write lock: a plain connection, deferred transaction.
            try:
                with self.engine.connect().execution_options(onceonly_deferred=True) as conn:
                    return fn(conn, self._now(conn))
            except sa.exc.SQLAlchemyError as err:
                raise StoreError(f"governance store (sqlite): {err}") from err
        return self._tx(fn, read=True, clock=clock)

    def put_agent(
        self,
        tenant: str,
        agent_id: str,
        *,
        policy: Any = ...,
        disabled: bool | None = None,
        reason: str | None = None,
    ) -> None:
        def run(conn: sa.Connection, now: float) -> None:
            a = S.agents
            self._lock_row(
                conn,
                a,
                {
                    "tenant": tenant,
                    "agent_id": agent_id,
                    "policy": None,
                    "disabled": False,
                    "disabled_reason": None,
                    "updated_at": now,
                },
            )
            values: dict[str, Any] = {"updated_at": now}
            if policy is not ...:
                values["policy"] = policy
            if disabled is not None:
                values["disabled"] = disabled
                values["disabled_reason"] = reason if disabled else None
            conn.execute(
                sa.update(a).where(a.c.tenant == tenant, a.c.agent_id == agent_id).values(values)
            )

        self._tx(run)

    def get_agent(self, tenant: str, agent_id: str) -> dict[str, Any] | None:
        def run(conn: sa.Connection, now: float) -> dict[str, Any] | None:
            a = S.agents
            row = conn.execute(
                sa.select(a).where(a.c.tenant == tenant, a.c.agent_id == agent_id)
            ).first()
            return None if row is None else row._asdict()

        return self._read(run)

    def list_agents(self, tenant: str) -> list[dict[str, Any]]:
        def run(conn: sa.Connection, now: float) -> list[dict[str, Any]]:
            a = S.agents
            rows = conn.execute(
                sa.select(a).where(a.c.tenant == tenant, a.c.agent_id != "*").order_by(a.c.agent_id)
            ).all()
            return [r._asdict() for r in rows]

        return self._read(run)

    # -- budgets --------------------------------------------------------------------------
    def reserve(
        self,
        tenant: str,
        agent_id: str,
        namespace: str,
        key: str,
        wants: Sequence[Want],
        lease: float,
        audit: dict[str, Any] | None = None,
    ) -> Reservation:
        r = S.reservations
        rid = uuid.uuid4().hex  # chosen once: a rerun after a lost reply finds its own hold

        def run(conn: sa.Connection, now: float) -> Reservation:
            who = {"t": tenant, "a": agent_id}
            keys = sorted({(w.metric, w.window) for w in wants})
            mine = sa.and_(r.c.tenant == tenant, r.c.agent_id == agent_id, r.c.id == rid)
            if self._rerun and conn.execute(sa.select(r.c.id).where(mine)).first() is not None:
                # The first attempt committed and only its reply was lost.
                used = self._lock_counters(conn, tenant, agent_id, keys)
                return Reservation(True, rid, None, 0, now, used)
            # 1. Holds whose lease expired belong to crashed or stalled workers whose
            #    tool may have run: settle them as spent, each with its audit row.
            self._sweep(conn, now, tenant, agent_id)
            # 2. Lock every counter involved, in one global (sorted) order, then read them.
            used = self._lock_counters(conn, tenant, agent_id, keys)
            # 3. Check every cap against counted + held amounts, in evaluation order.
            for w in wants:
                k = (w.metric, w.window)
                if w.cap is not None and used[k] + w.amount > w.cap:
                    return Reservation(False, None, w, used[k], now, used)
            for w in wants:
                if w.amount:
                    used[(w.metric, w.window)] += w.amount
                    k = (w.metric, w.window)
                    conn.execute(_SET_USED, {**who, "m": k[0], "w": k[1], "used": used[k]})
            conn.execute(
                _HOLD,
                {
                    "id": rid,
                    "tenant": tenant,
                    "agent_id": agent_id,
                    "namespace": namespace,
                    "idem_key": key,
                    "amounts": json.dumps([[w.metric, w.window, w.amount] for w in wants]),
                    "lease_until": now + lease,
                    "created_at": now,
                    "audit": None if audit is None else json.dumps(audit),
                },
            )
            return Reservation(True, rid, None, 0, now, used)

        return self._tx(run)

    def begin(
        self,
        tenant: str,
        agent_id: str,
        tool: str,
        namespace: str,
        key: str,
        decide: Decide,
        lease: float,
    ) -> tuple[dict[str, Any], Reservation | None]:
        """Snapshot and reservation in one transaction (see the ABC): the snapshot is
        read under the same lock the reservation takes (SQLite: BEGIN IMMEDIATE; the
        server databases: the counters' row locks, after the read), so the verdict and
        the caps it is checked against are one consistent step, and one commit."""
        snap, res, _ = self._begin(
            tenant, agent_id, tool, namespace, key, lambda snap, _: (True, decide(snap)), lease
        )
        return snap, res

    # -- a governed call in two transactions: the ledger's claim and completion join ----
    def joins(self, ledger: Store) -> bool:
        # ONCEONLY_GOV_JOIN=0 (read when the store opens) keeps them apart.
        return (
            self._join and self._url is not None and _sql_ledger(ledger) and ledger.url == self._url
        )

    def begin_claim(
        self,
        tenant: str,
        agent_id: str,
        tool: str,
        ledger: Store,
        namespace: str,
        key: str,
        new: NewClaim,
        decide: DecideClaim,
        lease: float,
    ) -> tuple[dict[str, Any], Reservation | None, Record | None]:
        """begin() with the ledger's claim after the snapshot, in its transaction: the
        claim commits with the reservation, or (a refusal) is rolled back with it."""
        if not self.joins(ledger):
            return super().begin_claim(
                tenant, agent_id, tool, ledger, namespace, key, new, decide, lease
            )
        led: Any = ledger  # a SQLStore (claim_on, get_on, finish_on)

        def claim(conn: sa.Connection, now: float, before: _Before | None) -> Record:
            if before is not None:
                ours = {"ns": namespace, "k": key, "owner": new.owner}
                self._early(before, now, tenant, agent_id, tool, ours)
            return led.claim_on(  # type: ignore[no-any-return]
                self._runner(conn, begin=True, before=before), namespace, key, new, now
            )

        def unclaim(conn: sa.Connection) -> None:
            led.unclaim_on(self._runner(conn), namespace, key)

        try:
            return self._begin(
                tenant, agent_id, tool, namespace, key, decide, lease, claim, unclaim
            )
        except _Refused as no:
            return no.snap, no.res, None

    def _runner(
        self, conn: sa.Connection, *, begin: bool = False, before: _Before | None = None
    ) -> Callable[[str, dict[str, Any]], Any]:
        """The ledger's statements on this transaction's cursor (``begin``: PostgreSQL's
        hand-kept transaction starts with the first of them, and ``before`` is sent
        ahead of that one; see :meth:`_exec`)."""
        return lambda sql, params: self._exec(conn, sql, params, begin=begin, before=before)

    def complete(
        self,
        tenant: str,
        agent_id: str,
        rid: str | None,
        amounts: list[Any],
        ledger: Store,
        namespace: str,
        key: str,
        token: int,
        *,
        result: str | None,
        error: str | None,
        ttl: float | None,
        audit: dict[str, Any],
        lost: dict[str, Any],
    ) -> bool:
        """The ledger's fenced completion, then settle()'s steps with the audit entry
        its answer picks: one transaction. The ledger row is locked first (then the
        hold, then the chain head), the order a concurrent claim's begin takes them.

        If that transaction fails for good (after :meth:`_tx`'s retries), the completion
        is recorded alone and the hold settled after it, as on the separate path: the
        tool ran, and a governance write that keeps failing (the audit chain, the
        hold) must not leave its ledger record running, whose next caller would see an
        unknown outcome and, by default, run the tool again. If the ledger cannot be
        written either, that raises StoreError and the flow retries, as for any
        completion."""

        def separate() -> bool:
            return GovernanceStore.complete(
                self,
                tenant,
                agent_id,
                rid,
                amounts,
                ledger,
                namespace,
                key,
                token,
                result=result,
                error=error,
                ttl=ttl,
                audit=audit,
                lost=lost,
            )

        if not self.joins(ledger):
            return separate()
        led: Any = ledger

        def run(conn: sa.Connection, now: float) -> bool:
            execute = self._runner(conn, begin=True)
            clock = time.time() if now != now else now  # SQLite's ledger clock is the host's
            hot = self._manual and self._hot_audit(audit, lost)
            chain = (tenant, audit["agent_id"])
            if hot and rid is None and self._one_append(*chain):
                finish = led._finish(namespace, key, token, True, result, error, ttl)
                if self._finish_append_one(conn, finish, tenant, audit):
                    return True  # completed and audited in one statement
            if hot and rid is not None:
                finish = led._finish(namespace, key, token, True, result, error, ttl)
                if self._one_append(*chain):
                    one = self._complete_one(conn, finish, tenant, agent_id, rid, audit)
                    if one is not None:
                        return one
                out = self._complete_pg(
                    conn,
                    finish,
                    lambda: completed_by(led.get_on(execute, namespace, key, clock), token),
                    tenant,
                    agent_id,
                    rid,
                    audit,
                    lost,
                )
                self._heads.add(chain)
                return out
            fresh = bool(
                led.finish_on(
                    execute,
                    namespace,
                    key,
                    token,
                    result=result,
                    error=error,
                    ttl=ttl,
                    now=clock,
                )
            )
            done = fresh or completed_by(led.get_on(execute, namespace, key, clock), token)
            entry = audit if done else lost
            if rid is None:
                # Nothing reserved: only the audit row. A completion that matched no row
                # may be a retry whose row is in already (one row per execution).
                self._append(conn, now, tenant, entry, check=not fresh)
            else:
                self._settle_in(conn, now, tenant, agent_id, rid, entry)
            return done

        try:
            return self._tx(run, read=self._manual, clock=self._clock is not None)
        except StoreError as err:
            # Nothing of it committed, or it committed and only its reply was lost: the
            # separate path finds that out (a record succeeded with our token counts as
            # completed; a hold already gone settles nothing), so it is safe either way.
            _log.warning(
                "completing %r and settling hold %s in one transaction failed (%s): "
                "recording the completion on its own",
                key,
                rid,
                err,
            )
            return separate()

    def _complete_one(
        self,
        conn: sa.Connection,
        finish: tuple[str, dict[str, Any]],
        tenant: str,
        holder: str,
        rid: str,
        audit: dict[str, Any],
    ) -> bool | None:
        """PostgreSQL's joined completion in one round trip: BEGIN, the ledger's fenced
        UPDATE, the settle (the hold's delete gating :meth:`_append_one`) and COMMIT; the
        rest is as :meth:`_complete_pg` writes it.

        None when it wrote nothing and :meth:`_complete_pg` must run instead: the
        completion matched no record of ours (a lost lease: its entry depends on what
        the record says), or the agent's chain head is gone (deleted by hand: the
        transaction was rolled back)."""
        sql, params = finish
        p = {**params, "rid": rid, "holder": holder}
        cur = self._append_one(
            conn, tenant, audit, self._hot["settle_one"], p, first=sql, begin=True, commit=True
        )
        if cur is None or cur.rowcount != 1:
            return None  # not our completion: nothing was written (the delete waits on it)
        return True

    def _finish_append_one(
        self,
        conn: sa.Connection,
        finish: tuple[str, dict[str, Any]],
        tenant: str,
        entry: dict[str, Any],
    ) -> bool | None:
        """A joined completion without a hold (an agent without a policy), in one
        statement: the ledger's fenced UPDATE gating :meth:`_append_one`. True: completed
        and audited; None: nothing written (not our completion, or no chain head), the
        general steps must run."""
        sql, params = finish
        one = _paramstyle(_append_one_sql(f"f AS ({sql} RETURNING 1)", "f"), self.kind)
        cur = self._append_one(conn, tenant, entry, one, params)
        if cur is None:
            return None
        row = cur.fetchone()
        return True if row is not None and int(row[0]) == 1 else None

    def _one_append(self, tenant: str, agent_id: str) -> bool:
        """Whether this chain's next append can be one statement: PostgreSQL, its head
        seen by this process, and a clock offset known for its ``created_at``."""
        return (
            self._manual
            and (tenant, agent_id) in self._heads
            and (self._skew is not None or self._clock is not None)
        )

    def _append_one(
        self,
        conn: sa.Connection,
        tenant: str,
        entry: dict[str, Any],
        sql: str,
        params: dict[str, Any],
        *,
        first: str | None = None,
        begin: bool = False,
        commit: bool = False,
    ) -> Any:
        """PostgreSQL: ``entry`` appended to its chain by one statement (``sql``, built
        by :func:`_append_one_sql`; ``first``: a statement sent before it, in the same
        transaction), the server hashing the row under the head's lock. Its
        ``created_at`` is the host's clock corrected by the database clock's offset
        last seen (:attr:`_skew`); the general path reads the database's clock under the
        head's lock. Returns the results (``first``'s, then the append's row: the gate's
        rows, seq, hash), or None when the chain head was missing: nothing of the
        transaction committed (the caller runs the general steps, which create it)."""
        created = self._clock() if self._clock is not None else time.time() + (self._skew or 0.0)
        fields = audit_fields(_Row({**entry, "tenant": tenant, "seq": 0, "created_at": created}))
        body = chain_body(fields)
        # Quotes inside a JSON string are escaped, so the marker is the key itself.
        cut = body.index(_SEQ_MARK)
        p = {f"au_{k}": v for k, v in fields.items()}
        p.update(params)
        p.update(
            t=tenant,
            a=entry["agent_id"],
            pre=body[:cut] + ',"seq":',
            post=body[cut + len(_SEQ_MARK) :],
        )
        statement = sql if first is None else f"{first}{_SEP}{sql}"
        try:
            return self._exec(conn, statement, p, begin=begin, commit=commit)
        except sa.exc.DBAPIError as err:
            if getattr(err.orig, "sqlstate", None) != _DIVISION_BY_ZERO:
                raise
            # A gate passed with no chain head to follow: nothing of it committed.
            self._heads.discard((tenant, entry["agent_id"]))
            conn.connection.dbapi_connection.rollback()  # type: ignore[union-attr]
            return None

    def _complete_pg(
        self,
        conn: sa.Connection,
        finish: tuple[str, dict[str, Any]],
        completed: Callable[[], bool],
        tenant: str,
        holder: str,
        rid: str,
        audit: dict[str, Any],
        lost: dict[str, Any],
    ) -> bool:
        """PostgreSQL's joined completion in two round trips: the ledger's fenced UPDATE
        (``finish``: its statement and parameters) and the settle's first statement (the
        hold's delete, the chain head's lock and read) in one query after BEGIN, then the
        audit row, the head's move and COMMIT. The same statements, in the same order and
        under the same locks, as finish_on + _settle_hot; their parameter names are apart
        (the ledger's: ns, k, token, state, result, error, inc, ttl; the settle's: rid,
        t, a, holder, g). ``completed``: whether a completion that matched no row was
        ours after all (an earlier attempt's)."""
        sql, params = finish
        p = {**params, "rid": rid, "t": tenant, "a": audit["agent_id"], "holder": holder}
        p["g"] = GENESIS
        cur = self._exec(conn, f"{sql}{_SEP}{self._hot['settle']}", p, begin=True)
        fresh = cur.rowcount == 1
        cur.nextset()  # past the UPDATE's count, to the settle's row
        got = cur.fetchone()
        done = fresh or completed()
        if got is None:
            return done  # the hold was gone: a sweep (or our earlier attempt) audited it
        entry = audit if done else lost
        self._chain_hot(conn, float(got[2]), tenant, entry, int(got[0]), str(got[1]))
        return done

    def _begin(
        self,
        tenant: str,
        agent_id: str,
        tool: str,
        namespace: str,
        key: str,
        decide: Callable[[dict[str, Any], Any], tuple[bool, Plan]],
        lease: float,
        claim: Callable[[sa.Connection, float, _Before | None], Record] | None = None,
        unclaim: Callable[[sa.Connection], None] = lambda conn: None,
    ) -> tuple[dict[str, Any], Reservation | None, Record | None]:
        rid = uuid.uuid4().hex  # chosen once: a rerun after a lost reply finds its own hold
        hot = self._hot
        first: list[Record] = []  # the record the first attempt claimed

        def run(
            conn: sa.Connection, now: float
        ) -> tuple[dict[str, Any], Reservation | None, Record | None]:
            p: dict[str, Any] = {
                "t": tenant,
                "a": agent_id,
                "name": tool,
                "scope": f"agent:{agent_id}",
            }
            if self._clock is not None:
                p["now"] = now
            snap: dict[str, Any] = {"now": now, "agent": None, "global": None, "tool": None}
            tools: list[dict[str, Any]] = []
            expired = False
            rec = None
            got = None
            locked: list[Any] | None = None
            if claim is not None and self._manual and self._pipelined:
                # PostgreSQL, joined: the snapshot goes in the claim's round trip, after
                # its BEGIN (READ COMMITTED: each statement reads what is committed, as
                # the autocommit read below does).
                snapshot = _Before(hot["snap"], p)
                rec = claim(conn, now, snapshot)
                got = snapshot.rows
                locked = snapshot.then_rows
            if got is None:
                # PostgreSQL: an autocommit read (READ COMMITTED reads each statement's
                # own snapshot anyway); the transaction begins with the claim or the
                # counters' locks.
                got = self._exec(conn, hot["snap"], p).fetchall()
            for kind, clock, ident, text, flag, reason in got:
                if isinstance(ident, bytes):  # MySQL: the UNION's id column comes as binary
                    ident = ident.decode()
                if kind == 0:
                    now = snap["now"] = float(clock)
                    if self._manual and self._clock is None:
                        self._skew = now - time.time()
                elif kind == 1:
                    snap["global" if ident == "*" else "agent"] = {
                        "agent_id": ident,
                        "policy": text,
                        "disabled": bool(flag),
                        "disabled_reason": reason,
                    }
                elif kind == 2:
                    tools.append({"scope_id": ident, "kind": text, "enabled": bool(flag)})
                else:
                    expired = True
            # An agent-scoped registration overrides the global one.
            for t in sorted(tools, key=lambda r: r["scope_id"] != "global"):
                snap["tool"] = t
            if claim is not None:
                # The ledger's claim, in this transaction (a rerun after a lost reply
                # finds the record its first attempt claimed: not ``mine`` then, which
                # the caller's decision treats as any held key). On PostgreSQL it ran
                # above, with the snapshot.
                if rec is None:
                    rec = claim(conn, now, None)
                if rec.mine and not first:
                    first.append(rec)
            go, plan = decide(snap, rec)
            if not go:
                raise _Refused(snap, None)  # the claim is rolled back
            if plan is None:
                return snap, None, rec  # nothing reserved: the commit ends a read (or a claim)
            wants, audit = plan
            keys = sorted({(w.metric, w.window) for w in wants})
            if self._manual:
                self._learn(tenant, agent_id, tool, wants)
            if locked is not None:
                found = {(m, int(w)): int(u) for m, w, u in locked}
                if expired or any(k not in found for k in keys):
                    # The counters locked early are not all this call needs (a window
                    # began between the two clock readings, the policy changed), or
                    # expired holds must be swept first (whose locks come before the
                    # counters'): start again without locking early, so that every
                    # transaction takes its locks in the one order.
                    raise _Again
                locked = [found[k] for k in keys]
            if self._rerun:
                r = S.reservations
                mine = sa.and_(r.c.tenant == tenant, r.c.agent_id == agent_id, r.c.id == rid)
                if conn.execute(sa.select(r.c.id).where(mine)).first() is not None:
                    # The first attempt committed and only its reply was lost (its
                    # claim with it: the record it claimed is ours).
                    used = self._lock_counters(conn, tenant, agent_id, keys)
                    if first:
                        rec = first[0]
                    return snap, Reservation(True, rid, None, 0, now, used), rec
            if expired:
                # Holds whose lease expired belong to crashed or stalled workers whose
                # tool may have run: settled as spent, each with its audit row, before
                # the caps are read (rare: the Core path).
                if self._manual:
                    self._exec(conn, "SELECT 1", {}, begin=True)
                self._sweep(conn, now, tenant, agent_id)
            res = self._hold(
                conn,
                now,
                tenant,
                agent_id,
                namespace,
                key,
                wants,
                keys,
                lease,
                audit,
                rid,
                locked,
            )
            if not res.ok and rec is not None:
                # A cap refused: the claim is taken back, in this transaction (the
                # expired holds it swept stay swept); one that found a record wrote none.
                if rec.mine:
                    unclaim(conn)
                return snap, res, None
            return snap, res, rec

        try:
            return self._tx(run, read=self._manual, clock=self._clock is not None)
        except _Again:  # rolled back: nothing of it committed
            self._local.early = False
            try:
                return self._tx(run, read=self._manual, clock=self._clock is not None)
            finally:
                self._local.early = True

    def _learn(self, tenant: str, agent_id: str, tool: str, wants: Sequence[Want]) -> None:
        """Remember which counters (metric, window length) this agent's call of this
        tool locked, for the next call to lock in its first round trip (PostgreSQL)."""
        shape = tuple(sorted({(w.metric, w.span) for w in wants}))
        where = (tenant, agent_id, tool)
        if self._guess.get(where) == shape:
            return
        if len(self._guess) >= 4096:
            self._guess.clear()
        self._guess[where] = shape if all(span > 0 for _, span in shape) else ()

    def _early(
        self,
        before: _Before,
        now: float,
        tenant: str,
        agent_id: str,
        tool: str,
        ledger_params: dict[str, Any],
    ) -> None:
        """PostgreSQL: have the claim's round trip also lock (creating them at 0) the
        counters this agent's last call of this tool needed, in the windows of the
        database's clock, if the claim is ours (a replay locks nothing). The caps are
        still checked in Python, on the values those locks return (see ``_hold``)."""
        shape = self._guess.get((tenant, agent_id, tool))
        if not shape or not getattr(self._local, "early", True):
            return
        n = len(shape)
        sql = self._early_sql.get(n)
        if sql is None:
            values = ", ".join(f"(:gm{i}, :gs{i})" for i in range(n))
            clock = _CLOCK["postgresql"] if self._clock is None else ":now"
            sql = self._early_sql[n] = _paramstyle(
                f"WITH c AS (SELECT {clock}::float8 AS now)"
                " INSERT INTO onceonly_counters (tenant, agent_id, metric, window_start, used)"
                " SELECT :t, :a, v.m, (floor(c.now / v.s) * v.s)::bigint, 0"
                f" FROM c, (VALUES {values}) AS v(m, s)"
                " WHERE EXISTS (SELECT 1 FROM onceonly_ledger WHERE namespace = :ns"
                " AND idem_key = :k AND owner = :owner AND state = 'running')"
                " ORDER BY 3, 4 ON CONFLICT (tenant, agent_id, metric, window_start)"
                " DO UPDATE SET used = onceonly_counters.used"
                " RETURNING metric, window_start, used",
                self.kind,
            )
        p: dict[str, Any] = {
            "t": tenant,
            "a": agent_id,
            "ns": ledger_params["ns"],
            "k": ledger_params["k"],
            "owner": ledger_params["owner"],
        }
        if self._clock is not None:  # a clock of the caller's (tests): the snapshot's
            p["now"] = now
        for i, (metric, span) in enumerate(shape):
            p[f"gm{i}"], p[f"gs{i}"] = metric, span
        before.then = (sql, p)

    def _hold(
        self,
        conn: sa.Connection,
        now: float,
        tenant: str,
        agent_id: str,
        namespace: str,
        key: str,
        wants: Sequence[Want],
        keys: list[tuple[str, int]],
        lease: float,
        audit: dict[str, Any] | None,
        rid: str,
        locked: list[int] | None = None,
    ) -> Reservation:
        """reserve()'s steps 2-4 on the DBAPI cursor: lock and read the counters, check
        every cap in order, add every amount and insert the hold, or write nothing.
        ``locked``: the counters' values, in ``keys``' order, if this transaction has
        locked them already (PostgreSQL's early lock)."""
        if locked is None:
            used = self._hot_counters(conn, tenant, agent_id, keys)
        else:
            used = dict(zip(keys, locked, strict=True))
        for w in wants:
            k = (w.metric, w.window)
            if w.cap is not None and used[k] + w.amount > w.cap:
                return Reservation(False, None, w, used[k], now, used)
        add: dict[tuple[str, int], int] = {}
        p: dict[str, Any] = {"t": tenant, "a": agent_id}
        sql = ""
        for w in wants:
            if w.amount:
                add[(w.metric, w.window)] = add.get((w.metric, w.window), 0) + w.amount
        if add:
            # One UPDATE for every counter: the rows are locked (or, on SQLite, the
            # whole database is), so adding is the same as writing the values read.
            cases, where = [], []
            for i, ((m, win), amount) in enumerate(sorted(add.items())):
                p[f"m{i}"], p[f"w{i}"], p[f"d{i}"] = m, win, amount
                cases.append(f"WHEN metric = :m{i} AND window_start = :w{i} THEN :d{i}")
                where.append(f"(metric = :m{i} AND window_start = :w{i})")
                used[(m, win)] += amount
            sql = (
                f"UPDATE onceonly_counters SET used = used + CASE {' '.join(cases)} ELSE 0 END"
                f" WHERE tenant = :t AND agent_id = :a AND ({' OR '.join(where)})"
            )
        hold = {
            "id": rid,
            "t": tenant,
            "a": agent_id,
            "ns": namespace,
            "key": key,
            "amounts": json.dumps([[w.metric, w.window, w.amount] for w in wants]),
            "until": now + lease,
            "now": now,
            "audit": None if audit is None else json.dumps(audit),
        }
        if self._manual:
            # The counters' update, the hold and the COMMIT in one query: one round trip
            # (the caps were checked above, on the rows this transaction has locked).
            update = f"{_paramstyle(sql, self.kind)}{_SEP}" if add else ""
            self._exec(
                conn, update + self._hot["hold"], {**hold, **p} if add else hold, commit=True
            )
        else:
            if add:
                self._exec(conn, _paramstyle(sql, self.kind), p)
            self._exec(conn, self._hot["hold"], hold)
        return Reservation(True, rid, None, 0, now, used)

    def _hot_counters(
        self, conn: sa.Connection, tenant: str, agent_id: str, keys: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], int]:
        """Lock and read the counters (missing ones created at 0). PostgreSQL: one
        upsert that locks every row, in sorted order, and returns it. SQLite: the write
        lock is held already; a read, and an insert only for a new window."""
        if not keys:
            return {}
        if self._dialect == "mysql":
            return self._lock_counters(conn, tenant, agent_id, keys)
        p: dict[str, Any] = {"t": tenant, "a": agent_id}
        for i, (m, w) in enumerate(keys):
            p[f"m{i}"], p[f"w{i}"] = m, w
        n = len(keys)
        sql = self._counter_sql.get(n)
        if sql is None:
            values = ", ".join(f"(:t, :a, :m{i}, :w{i}, 0)" for i in range(n))
            pairs = " OR ".join(f"(metric = :m{i} AND window_start = :w{i})" for i in range(n))
            upsert = (
                "INSERT INTO onceonly_counters (tenant, agent_id, metric, window_start, used)"
                f" VALUES {values} ON CONFLICT (tenant, agent_id, metric, window_start)"
            )
            if self._dialect == "postgresql":
                lock = (
                    f"{upsert} DO UPDATE SET used = onceonly_counters.used"
                    " RETURNING metric, window_start, used"
                )
            else:
                lock = f"{upsert} DO NOTHING"
            read = (
                "SELECT metric, window_start, used FROM onceonly_counters"
                f" WHERE tenant = :t AND agent_id = :a AND ({pairs})"
            )
            sql = self._counter_sql[n] = (
                _paramstyle(lock, self.kind),
                _paramstyle(read, self.kind),
            )
        if self._dialect == "postgresql":
            got = self._exec(conn, sql[0], p, begin=True).fetchall()
        else:
            got = self._exec(conn, sql[1], p).fetchall()
            if len(got) < n:  # a new window: create its rows, then read them all
                self._exec(conn, sql[0], p)
                got = self._exec(conn, sql[1], p).fetchall()
        found = {(m, int(w)): int(u) for m, w, u in got}
        return {k: found[k] for k in keys}

    def _sweep(self, conn: sa.Connection, now: float, tenant: str, agent_id: str | None) -> int:
        """Settle expired holds as spent: delete each (under its row lock, so exactly one
        sweeper or settler wins it) and append its audit entry as ``unknown``. The
        amounts were added at reserve time and simply stay."""
        r = S.reservations
        q = (
            sa.select(r.c.id, r.c.agent_id, r.c.audit)
            .where(r.c.tenant == tenant, r.c.lease_until < now)
            .order_by(r.c.agent_id, r.c.id)  # the key's order: the order rows are locked in
            .with_for_update()
        )
        if agent_id is not None:
            q = q.where(r.c.agent_id == agent_id)
        expired = conn.execute(q).all()
        if not expired:
            return 0
        conn.execute(
            sa.delete(r).where(
                r.c.tenant == tenant,
                sa.tuple_(r.c.agent_id, r.c.id).in_([(e.agent_id, e.id) for e in expired]),
            )
        )
        for e in sorted(expired, key=lambda e: (e.agent_id, e.id)):
            if e.audit:
                entry = json.loads(e.audit)
                entry.update(decision="unknown", reason="lease_expired", token=None)
                self._append(conn, now, tenant, entry)
        return len(expired)

    def sweep(self, tenant: str, agent_id: str | None = None) -> int:
        return self._tx(lambda conn, now: self._sweep(conn, now, tenant, agent_id))

    def pending_holds(self, tenant: str | None = None) -> list[dict[str, Any]]:
        r = S.reservations

        def run(conn: sa.Connection, now: float) -> list[dict[str, Any]]:
            q = sa.select(
                r.c.id, r.c.tenant, r.c.agent_id, r.c.namespace, r.c.idem_key, r.c.lease_until
            )
            if tenant is not None:
                q = q.where(r.c.tenant == tenant)
            rows = conn.execute(q.order_by(r.c.created_at)).all()
            return [{**row._asdict(), "expired": row.lease_until < now} for row in rows]

        return self._read(run)

    def _lock_counters(
        self, conn: sa.Connection, tenant: str, agent_id: str, keys: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], int]:
        """Create missing counter rows, lock all of them (one statement, rows in sorted
        order), and read them (one statement)."""
        if not keys:
            return {}
        c = S.counters
        rows = [
            {"tenant": tenant, "agent_id": agent_id, "metric": m, "window_start": w, "used": 0}
            for m, w in keys
        ]
        if self.kind == "postgresql":
            from sqlalchemy.dialects import postgresql

            pg = postgresql.insert(c).values(rows)
            pk = ["tenant", "agent_id", "metric", "window_start"]
            conn.execute(pg.on_conflict_do_update(index_elements=pk, set_={"used": c.c.used}))
        elif self.kind == "mysql":
            from sqlalchemy.dialects import mysql

            conn.execute(mysql.insert(c).values(rows).on_duplicate_key_update({"used": c.c.used}))
        else:  # SQLite: BEGIN IMMEDIATE already holds the write lock
            from sqlalchemy.dialects import sqlite

            conn.execute(sqlite.insert(c).values(rows).on_conflict_do_nothing())
        got = conn.execute(
            _COUNTERS,
            {
                "t": tenant,
                "a": agent_id,
                "metrics": sorted({m for m, _ in keys}),
                "windows": sorted({w for _, w in keys}),
            },
        ).all()
        found = {(row.metric, int(row.window_start)): int(row.used) for row in got}
        return {k: found[k] for k in keys}

    def _apply(
        self, conn: sa.Connection, tenant: str, agent_id: str, amounts: Iterable[Any], sign: int
    ) -> None:
        amounts = sorted((m, int(w), int(a)) for m, w, a in amounts)
        used = self._lock_counters(conn, tenant, agent_id, [(m, w) for m, w, _ in amounts])
        for m, w, a in amounts:
            used[(m, w)] = max(0, used[(m, w)] + sign * a)
        for (m, w), value in used.items():
            conn.execute(_SET_USED, {"t": tenant, "a": agent_id, "m": m, "w": w, "used": value})

    def settle(
        self,
        tenant: str,
        agent_id: str,
        rid: str,
        amounts: list[Any],
        audit: dict[str, Any] | None = None,
    ) -> bool:
        """The tool ran: its amounts stay counted (they were added at reserve time).
        ``audit``: that decision, appended in the same transaction."""

        def run(conn: sa.Connection, now: float) -> bool:
            return self._settle_in(conn, now, tenant, agent_id, rid, audit)

        # The clock rides on the head read. PostgreSQL: on the autocommit pool, with
        # BEGIN and COMMIT sent in the queries of the first and the last statement.
        return self._tx(run, read=self._manual, clock=self._clock is not None)

    def _hot_audit(self, *entries: dict[str, Any]) -> bool:
        """Whether the hot statements can append these audit entries: not with a
        notification (its outbox rows are written by _append), not on a rerun after a
        lost reply (whose row may be in: _append checks), and not on MySQL (no hot settle
        statements: the general path)."""
        if self._rerun or self._dialect == "mysql":
            return False
        return not any(e.get("notify") for e in entries)

    def _settle_in(
        self,
        conn: sa.Connection,
        now: float,
        tenant: str,
        agent_id: str,
        rid: str,
        audit: dict[str, Any] | None,
    ) -> bool:
        """settle()'s steps in the caller's transaction."""
        r = S.reservations
        if audit is not None and self._hot_audit(audit):
            return self._settle_hot(conn, now, tenant, agent_id, rid, audit)
        if self._manual:  # on the autocommit pool (see settle): a transaction of our
            self._exec(conn, "SELECT 1", {}, begin=True)  # own, committed by _tx
        # The DELETE is the decision: if the hold is gone, a sweep (or our own
        # earlier attempt, whose reply was lost) already counted it and wrote its
        # audit row, and one row per execution is the rule.
        # Scoped to the tenant and agent: a hold id from elsewhere (remote mode's
        # callers are other tenants' keys) settles nothing.
        mine = sa.and_(r.c.id == rid, r.c.tenant == tenant, r.c.agent_id == agent_id)
        if conn.execute(sa.delete(r).where(mine)).rowcount == 0:
            return False
        if audit is not None:
            self._append(conn, now, tenant, audit)
        return True

    def _settle_hot(
        self,
        conn: sa.Connection,
        now: float,
        tenant: str,
        holder: str,
        rid: str,
        entry: dict[str, Any],
    ) -> bool:
        """settle() + _append() on the DBAPI cursor, in the same order and under the same
        locks: the hold's delete decides (gone: a sweep or an earlier attempt of ours
        counted and audited it), then the chain head is locked and read, the row hashed
        over it is inserted and the head moved, all in the caller's transaction."""
        hot = self._hot
        agent_id = entry["agent_id"]
        if self._dialect == "postgresql":
            # One statement: delete the hold, then lock (creating it if need be) and read
            # the head and the clock; no row back: the hold was gone.
            got = self._exec(
                conn,
                hot["settle"],
                {"rid": rid, "t": tenant, "a": agent_id, "holder": holder, "g": GENESIS},
                begin=True,
            ).fetchone()
            if got is None:
                return False  # nothing written; the transaction is rolled back
            prev_seq, prev, now = int(got[0]), str(got[1]), float(got[2])
            head: Any = got
        else:
            held = {"rid": rid, "t": tenant, "holder": holder}
            if self._exec(conn, hot["delete"], held).rowcount == 0:
                return False
            head = self._exec(conn, hot["head"], {"t": tenant, "a": agent_id}).fetchone()
            prev_seq, prev = (0, GENESIS) if head is None else (int(head[0]), str(head[1]))
        self._chain_hot(conn, now, tenant, entry, prev_seq, prev, new_head=head is None)
        return True

    def _chain_hot(
        self,
        conn: sa.Connection,
        now: float,
        tenant: str,
        entry: dict[str, Any],
        prev_seq: int,
        prev: str,
        *,
        new_head: bool = False,
    ) -> None:
        """The audit row hashed over the locked head it follows, and the head's move."""
        hot = self._hot
        row = {**entry, "tenant": tenant, "seq": prev_seq + 1, "created_at": now}
        fields = audit_fields(_Row(row))
        digest = chain_hash(prev, fields)
        values = {**fields, "prev_hash": prev, "hash": digest, "g": GENESIS}
        if self._dialect == "postgresql":
            # The row and the head's move, with the COMMIT: one round trip.
            self._exec(conn, hot["append"], values, commit=True)
        else:
            self._exec(conn, hot["audit"], values)
            # SQLite's write lock is held: no one else can have created the head since.
            self._exec(conn, hot["new_head"] if new_head else hot["move"], values)

    def release(
        self, tenant: str, agent_id: str, rid: str, audit: dict[str, Any] | None = None
    ) -> bool:
        """The tool did not run (failed, replayed, refused): give the amounts back."""
        r = S.reservations

        def run(conn: sa.Connection, now: float) -> bool:
            mine = sa.and_(r.c.id == rid, r.c.tenant == tenant, r.c.agent_id == agent_id)
            row = conn.execute(sa.select(r.c.amounts).where(mine).with_for_update()).first()
            if row is None:
                return False  # swept as spent (and audited) meanwhile: that stands
            conn.execute(sa.delete(r).where(mine))
            # Lock order everywhere: hold rows, then the chain head, then the counters
            # (reserve's sweep takes them in that order too): no deadlock between them.
            if audit is not None:
                self._append(conn, now, tenant, audit)
            self._apply(conn, tenant, agent_id, json.loads(row.amounts), -1)
            return True

        return self._tx(run)

    def extend(self, rid: str, lease: float) -> bool:
        r = S.reservations

        def run(conn: sa.Connection, now: float) -> bool:
            # By id alone: a scan of the holds in flight (the key leads with tenant and
            # agent, which this primitive is not given); the call path's heartbeat uses
            # extend_hold, which has them.
            res = conn.execute(sa.update(r).where(r.c.id == rid).values(lease_until=now + lease))
            return bool(res.rowcount)

        return self._tx(run)

    def extend_hold(self, tenant: str, agent_id: str, rid: str, lease: float) -> bool:
        r = S.reservations
        mine = sa.and_(r.c.tenant == tenant, r.c.agent_id == agent_id, r.c.id == rid)

        def run(conn: sa.Connection, now: float) -> bool:
            # One row by its key (tenant, agent_id, id): no scan, whatever is in flight.
            res = conn.execute(sa.update(r).where(mine).values(lease_until=now + lease))
            return bool(res.rowcount)

        return self._tx(run)

    def counter(self, tenant: str, agent_id: str, metric: str, window: int) -> int:
        def run(conn: sa.Connection, now: float) -> int:
            c = S.counters
            v = conn.execute(
                sa.select(c.c.used).where(
                    c.c.tenant == tenant,
                    c.c.agent_id == agent_id,
                    c.c.metric == metric,
                    c.c.window_start == window,
                )
            ).scalar()
            return int(v or 0)

        return self._read(run)

    def holds(self, tenant: str, agent_id: str) -> int:
        def run(conn: sa.Connection, now: float) -> int:
            r = S.reservations
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(r)
                    .where(r.c.tenant == tenant, r.c.agent_id == agent_id)
                ).scalar_one()
            )

        return self._read(run)

    # -- approvals ------------------------------------------------------------------------
    def approval_for(
        self,
        tenant: str,
        agent_id: str,
        tool: str,
        namespace: str,
        key: str,
        args: str,
        in_flight_for: float = 0.0,
    ) -> dict[str, Any]:
        """The open request of this call (its latest round), created pending if there is
        none or the latest was consumed; an approved one is taken (→ consumed) here and
        returned as approved: one approval, one execution, whatever ttl, retry, clear or
        resume do to the ledger record afterwards. A request consumed less than
        ``in_flight_for`` seconds ago is returned as it is (its execution may still be
        on its way to the ledger: the caller waits for it rather than ask anew)."""
        ap = S.approvals

        def run(conn: sa.Connection, now: float) -> dict[str, Any]:
            where = (ap.c.tenant == tenant, ap.c.namespace == namespace, ap.c.idem_key == key)
            latest = sa.select(ap).where(*where).order_by(ap.c.round.desc()).limit(1)
            for _ in range(3):
                row = conn.execute(latest).first()
                if row is not None and row.state == "approved":
                    # Take it: the conditional UPDATE lets exactly one caller through.
                    took = conn.execute(
                        sa.update(ap)
                        .where(ap.c.id == row.id, ap.c.state == "approved")
                        .values(state="consumed", consumed_at=now)
                    ).rowcount
                    if took:
                        return {**row._asdict(), "state": "approved"}
                    continue  # taken by a concurrent caller: read the new state
                if row is not None and row.state != "consumed":
                    return row._asdict()  # pending or denied
                if row is not None and now - float(row.consumed_at or 0) < in_flight_for:
                    return row._asdict()  # consumed a moment ago: its call is in flight
                # None, or consumed: that approval was used; this execution needs its own.
                values = {
                    "id": "apr_" + uuid.uuid4().hex[:24],
                    "tenant": tenant,
                    "agent_id": agent_id,
                    "tool": tool,
                    "namespace": namespace,
                    "idem_key": key,
                    "args": args,
                    "state": "pending",
                    "created_at": now,
                    "round": 0 if row is None else int(row.round) + 1,
                }
                # Insert-if-absent on (tenant, namespace, key, round): concurrent askers
                # share one new request.
                if self.kind == "postgresql":
                    from sqlalchemy.dialects import postgresql

                    conn.execute(postgresql.insert(ap).values(**values).on_conflict_do_nothing())
                elif self.kind == "mysql":
                    conn.execute(sa.insert(ap).values(**values).prefix_with("IGNORE"))
                else:
                    from sqlalchemy.dialects import sqlite

                    conn.execute(sqlite.insert(ap).values(**values).on_conflict_do_nothing())
            raise StoreError(f"the approval request of {key!r} kept changing; ask again")

        return self._tx(run)

    def restore_approval(self, tenant: str, approval_id: str) -> bool:
        ap = S.approvals

        def run(conn: sa.Connection, now: float) -> bool:
            res = conn.execute(
                sa.update(ap)
                .where(ap.c.tenant == tenant, ap.c.id == approval_id, ap.c.state == "consumed")
                .values(state="approved", consumed_at=None)
            )
            return bool(res.rowcount)

        return self._tx(run)

    def decide_approval(
        self, tenant: str, approval_id: str, state: str, by: str | None, reason: str | None
    ) -> dict[str, Any] | None:
        """pending → approved | denied (only from pending: a decision is final)."""
        ap = S.approvals

        def run(conn: sa.Connection, now: float) -> dict[str, Any] | None:
            where = (ap.c.tenant == tenant, ap.c.id == approval_id)
            changed = conn.execute(
                sa.update(ap)
                .where(*where, ap.c.state == "pending")
                .values(state=state, decided_by=by, reason=reason, decided_at=now)
            ).rowcount
            row = conn.execute(sa.select(ap).where(*where)).first()
            if row is None:
                return None
            # On a rerun after a lost reply, our own first attempt made the change.
            mine = bool(changed) or (self._rerun and row.state == state and row.decided_by == by)
            return {**row._asdict(), "changed": mine}

        return self._tx(run)

    def consume_approval(self, tenant: str, approval_id: str) -> None:
        ap = S.approvals

        def run(conn: sa.Connection, now: float) -> None:
            conn.execute(
                sa.update(ap)
                .where(ap.c.tenant == tenant, ap.c.id == approval_id, ap.c.state == "approved")
                .values(state="consumed", consumed_at=now)
            )

        self._tx(run)

    def list_approvals(self, tenant: str, state: str | None = None) -> list[dict[str, Any]]:
        ap = S.approvals

        def run(conn: sa.Connection, now: float) -> list[dict[str, Any]]:
            q = sa.select(ap).where(ap.c.tenant == tenant)
            if state is not None:
                q = q.where(ap.c.state == state)
            return [r._asdict() for r in conn.execute(q.order_by(ap.c.created_at)).all()]

        return self._read(run)

    # -- audit ----------------------------------------------------------------------------
    def append_audit(self, tenant: str, entry: dict[str, Any]) -> tuple[int, str]:
        """Append one decision to the agent's hash chain; returns (seq, hash).

        PostgreSQL, a chain this process has seen: one statement on the autocommit pool
        (:meth:`_append_one`); else the general steps, on SQLAlchemy Core."""
        one = self._one_append(tenant, entry["agent_id"]) and self._hot_audit(entry)

        def run(conn: sa.Connection, now: float) -> tuple[int, str]:
            if not one:
                return self._append(conn, now, tenant, entry)
            if not self._rerun:
                cur = self._append_one(conn, tenant, entry, self._hot["append_one"], {})
                if cur is not None:
                    _, seq, digest, _ = cur.fetchone()
                    return int(seq), str(digest)
            # On the autocommit pool: a transaction of our own, committed by _tx.
            self._exec(conn, "SELECT 1", {}, begin=True)
            return self._append(conn, now, tenant, entry)

        # The database's clock rides on the head read (a clock of the caller's: its own).
        return self._tx(run, read=one, clock=self._clock is not None)

    def append_audit_once(self, tenant: str, entry: dict[str, Any]) -> None:
        # The duplicate check runs under the chain head's lock, in the append's own
        # transaction: a concurrent retry of the same completion waits, then finds it.
        self._tx(
            lambda conn, now: self._append(conn, now, tenant, entry, check=True),
            clock=self._clock is not None,
        )

    def _append(
        self,
        conn: sa.Connection,
        now: float,
        tenant: str,
        entry: dict[str, Any],
        *,
        check: bool = False,
    ) -> tuple[int, str]:
        h = S.audit_heads
        agent_id = entry["agent_id"]
        # The head row is the chain's lock: appends of one agent take turns here,
        # appends of other agents lock other rows.
        self._lock_row(
            conn,
            h,
            {
                "tenant": tenant,
                "agent_id": agent_id,
                "seq": 0,
                "hash": GENESIS,
                "base_seq": 0,
                "base_hash": GENESIS,
            },
        )
        if now != now:  # NaN: the transaction has not read the clock; read it with the head
            head = conn.execute(self._head_now, {"t": tenant, "a": agent_id}).one()
            now = float(head.now)
            if self._manual and self._clock is None:
                self._skew = now - time.time()
        else:
            head = conn.execute(_HEAD, {"t": tenant, "a": agent_id}).one()
        if (self._rerun or check) and entry.get("token") is not None:
            # Rerun after a lost reply (or ``check``: a retried completion): the row may
            # be in already (one row per decision).
            au = S.audit
            dup = conn.execute(
                sa.select(au.c.seq, au.c.hash).where(
                    au.c.tenant == tenant,
                    au.c.agent_id == agent_id,
                    au.c.idem_key == entry.get("idem_key"),
                    au.c.token == entry["token"],
                    au.c.decision == entry["decision"],
                )
            ).first()
            if dup is not None:
                return int(dup.seq), str(dup.hash)
        seq = int(head.seq) + 1
        row = {**entry, "tenant": tenant, "seq": seq, "created_at": now}
        fields = audit_fields(_Row(row))
        digest = chain_hash(head.hash, fields)
        conn.execute(_AUDIT, {**fields, "prev_hash": head.hash, "hash": digest})
        conn.execute(_MOVE_HEAD, {"t": tenant, "a": agent_id, "seq": seq, "hash": digest})
        if self._manual:  # the head exists now: this chain's next appends take one statement
            self._heads.add((tenant, agent_id))
        if entry.get("notify"):
            # The decision's notification, in the decision's transaction: both commit or
            # neither. A rerun after a lost reply returned above if the row is in; an
            # untokened rerun writes rows with the same event id, which receivers dedupe.
            _write_notification(conn, now, tenant, entry["notify"])
        return seq, digest

    def audit_rows(
        self,
        tenant: str,
        *,
        agent_id: str | None = None,
        since: float | None = None,
        limit: int = 100,
        newest_first: bool = True,
    ) -> list[dict[str, Any]]:
        au = S.audit

        def run(conn: sa.Connection, now: float) -> list[dict[str, Any]]:
            q = sa.select(au).where(au.c.tenant == tenant)
            if agent_id is not None:
                q = q.where(au.c.agent_id == agent_id)
            if since is not None:
                q = q.where(au.c.created_at >= since)
            q = q.order_by(au.c.id.desc() if newest_first else au.c.id).limit(limit)
            return [r._asdict() for r in conn.execute(q).all()]

        return self._read(run)

    def audited_calls(self, tenant: str) -> dict[str, set[int | None]]:
        au = S.audit

        def run(conn: sa.Connection, now: float) -> dict[str, set[int | None]]:
            out: dict[str, set[int | None]] = {}
            rows = conn.execute(
                sa.select(au.c.idem_key, au.c.token, au.c.decision)
                .where(au.c.tenant == tenant, au.c.idem_key.is_not(None))
                .distinct()
            ).all()
            for key, token, decision in rows:
                tokens = out.setdefault(key, set())
                if decision in RAN:
                    tokens.add(None if token is None else int(token))
            return out

        return self._read(run)

    def chain_count(self, tenant: str | None = None) -> int:
        h = S.audit_heads

        def run(conn: sa.Connection, now: float) -> int:
            q = sa.select(sa.func.count()).select_from(h)
            if tenant is not None:
                q = q.where(h.c.tenant == tenant)
            return int(conn.execute(q).scalar_one())

        return self._read(run)

    def verify_audit(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Walk every chain; return one problem per broken chain (its first bad row)."""
        au, h = S.audit, S.audit_heads

        def run(conn: sa.Connection, now: float) -> list[dict[str, Any]]:
            hq = sa.select(h)
            if tenant is not None:
                hq = hq.where(h.c.tenant == tenant)
            problems: list[dict[str, Any]] = []
            heads = {(r.tenant, r.agent_id): r for r in conn.execute(hq).all()}
            rq = sa.select(au.c.tenant, au.c.agent_id).distinct()
            if tenant is not None:
                rq = rq.where(au.c.tenant == tenant)
            chains = set(heads) | {(r.tenant, r.agent_id) for r in conn.execute(rq).all()}
            for ten, agent in sorted(chains):
                head = heads.get((ten, agent))
                if head is None:
                    problems.append(
                        {
                            "tenant": ten,
                            "agent_id": agent,
                            "seq": None,
                            "id": None,
                            "problem": "chain head missing",
                        }
                    )
                    continue
                prev, expect = head.base_hash, int(head.base_seq) + 1
                rows = conn.execute(
                    sa.select(au)
                    .where(au.c.tenant == ten, au.c.agent_id == agent)
                    .order_by(au.c.seq, au.c.id)
                ).all()
                bad = None
                for row in rows:
                    if int(row.seq) != expect:
                        what = "row missing" if int(row.seq) > expect else "out of order"
                        bad = (expect, row.id, f"{what}: expected seq {expect}, found {row.seq}")
                        break
                    if row.prev_hash != prev:
                        bad = (row.seq, row.id, "previous-hash link broken (row moved or removed)")
                        break
                    if chain_hash(prev, audit_fields(row)) != row.hash:
                        bad = (row.seq, row.id, "contents altered (hash mismatch)")
                        break
                    prev, expect = row.hash, expect + 1
                if bad is None and (expect - 1 != int(head.seq) or prev != head.hash):
                    what = f"rows after seq {expect - 1} missing (head at {head.seq})"
                    bad = (expect, None, what)
                if bad is not None:
                    problems.append(
                        {
                            "tenant": ten,
                            "agent_id": agent,
                            "seq": bad[0],
                            "id": bad[1],
                            "problem": bad[2],
                        }
                    )
            return problems

        return self._read(run)

    def purge_audit(self, tenant: str, before: float, *, after: float | None = None) -> int:
        """Delete audit rows older than ``before``; chains keep verifying from the cut.

        Per agent, every row up to the last one recorded before ``before`` goes, and the
        chain's base moves to that row. ``after``: no row older than this is left (the
        previous cut of a batched purge, ``retention.archive_audit``), so the time index
        is read from there, past no row an earlier batch deleted. Each range read starts
        where something is left: the rows from the chain's base on, by its key, and the
        time index from ``after``; so a batch costs its own rows, not the table's (on
        PostgreSQL the deleted rows stay in the indexes until a vacuum)."""
        au, h = S.audit, S.audit_heads

        def run(conn: sa.Connection, now: float) -> int:
            total = 0
            old = sa.and_(au.c.tenant == tenant, au.c.created_at < before)
            if after is not None:
                old = sa.and_(old, au.c.created_at >= after)
            tops = conn.execute(
                sa.select(au.c.agent_id, sa.func.max(au.c.seq)).where(old).group_by(au.c.agent_id)
            ).all()
            for agent, top in sorted(tops):
                head = sa.and_(h.c.tenant == tenant, h.c.agent_id == agent)
                base = conn.execute(sa.select(h.c.base_seq).where(head).with_for_update()).scalar()
                if base is None or int(base) >= int(top):
                    continue  # purged already (by a concurrent purge with a later cut)
                mine = sa.and_(au.c.tenant == tenant, au.c.agent_id == agent)
                last = conn.execute(sa.select(au.c.hash).where(mine, au.c.seq == top)).scalar_one()
                total += conn.execute(
                    sa.delete(au).where(mine, au.c.seq > base, au.c.seq <= top)
                ).rowcount
                conn.execute(sa.update(h).where(head).values(base_seq=top, base_hash=last))
            return total

        return self._tx(run)

    def metrics(self, tenant: str, agent_id: str, since: float) -> dict[str, Any]:
        au = S.audit

        def run(conn: sa.Connection, now: float) -> dict[str, Any]:
            where = (au.c.tenant == tenant, au.c.agent_id == agent_id, au.c.created_at >= since)
            by = conn.execute(
                sa.select(au.c.decision, sa.func.count(), sa.func.sum(au.c.spend_micros))
                .where(*where)
                .group_by(au.c.decision)
            ).all()
            n = sa.func.count().label("n")
            top = conn.execute(
                sa.select(au.c.tool, n)
                .where(*where, au.c.decision == "executed")
                .group_by(au.c.tool)
                .order_by(n.desc(), au.c.tool)
                .limit(5)
            ).all()
            return {
                "by_decision": {d: int(k) for d, k, _ in by},
                "spend_micros": sum(int(s or 0) for _, _, s in by),
                "top_tools": [(t, int(k)) for t, k in top],
            }

        return self._read(run)

    # -- timeline -------------------------------------------------------------------------
    def post_event(self, tenant: str, event: dict[str, Any]) -> int:
        ev = S.events

        def run(conn: sa.Connection, now: float) -> int:
            res = conn.execute(sa.insert(ev).values(**event, tenant=tenant, created_at=now))
            pk = res.inserted_primary_key
            return int(pk[0]) if pk else 0

        return self._tx(run)

    def timeline(self, tenant: str, run_id: str, limit: int, offset: int) -> list[dict[str, Any]]:
        ev = S.events

        def run(conn: sa.Connection, now: float) -> list[dict[str, Any]]:
            q = (
                sa.select(ev)
                .where(ev.c.tenant == tenant, ev.c.run_id == run_id)
                .order_by(ev.c.id)
                .limit(limit)
                .offset(offset)
            )
            return [r._asdict() for r in conn.execute(q).all()]

        return self._read(run)

    # -- tools registry -------------------------------------------------------------------
    def put_tool(self, tenant: str, values: dict[str, Any]) -> None:
        t = S.tools

        def run(conn: sa.Connection, now: float) -> None:
            row = {**values, "tenant": tenant, "updated_at": now}
            where = (t.c.tenant == tenant, t.c.scope_id == row["scope_id"], t.c.name == row["name"])
            self._lock_row(conn, t, row)
            conn.execute(sa.update(t).where(*where).values(row))

        self._tx(run)

    def get_tools(
        self, tenant: str, name: str | None = None, scope_id: str | None = None
    ) -> list[dict[str, Any]]:
        t = S.tools

        def run(conn: sa.Connection, now: float) -> list[dict[str, Any]]:
            q = sa.select(t).where(t.c.tenant == tenant)
            if name is not None:
                q = q.where(t.c.name == name)
            if scope_id is not None:
                q = q.where(t.c.scope_id == scope_id)
            return [r._asdict() for r in conn.execute(q.order_by(t.c.name, t.c.scope_id)).all()]

        return self._read(run)

    def set_tool_enabled(self, tenant: str, name: str, scope_id: str, enabled: bool) -> bool:
        t = S.tools

        def run(conn: sa.Connection, now: float) -> bool:
            res = conn.execute(
                sa.update(t)
                .where(t.c.tenant == tenant, t.c.name == name, t.c.scope_id == scope_id)
                .values(enabled=enabled, updated_at=now)
            )
            return bool(res.rowcount)

        return self._tx(run)

    def delete_tool(self, tenant: str, name: str, scope_id: str) -> bool:
        t = S.tools

        def run(conn: sa.Connection, now: float) -> bool:
            res = conn.execute(
                sa.delete(t).where(t.c.tenant == tenant, t.c.name == name, t.c.scope_id == scope_id)
            )
            return bool(res.rowcount)

        return self._tx(run)

    # -- webhooks -------------------------------------------------------------------------
    def add_webhook(self, tenant: str, values: dict[str, Any]) -> str:
        w = S.webhooks

        def run(conn: sa.Connection, now: float) -> str:
            wid = "wh_" + uuid.uuid4().hex[:20]
            conn.execute(sa.insert(w).values(**values, id=wid, tenant=tenant, created_at=now))
            return wid

        return self._tx(run, again=False)  # not idempotent: an operator retries it

    def list_webhooks(self, tenant: str) -> list[dict[str, Any]]:
        w = S.webhooks

        def run(conn: sa.Connection, now: float) -> list[dict[str, Any]]:
            rows = conn.execute(sa.select(w).where(w.c.tenant == tenant).order_by(w.c.created_at))
            return [r._asdict() for r in rows.all()]

        return self._read(run)

    def delete_webhook(self, tenant: str, webhook_id: str) -> bool:
        w = S.webhooks

        def run(conn: sa.Connection, now: float) -> bool:
            res = conn.execute(sa.delete(w).where(w.c.tenant == tenant, w.c.id == webhook_id))
            return bool(res.rowcount)

        return self._tx(run)

    # -- notifications (the outbox; see governance/outbox.py) -----------------------------
    outbox = True  # the engine's notifications are written here, in the decision's transaction

    def enqueue_notification(self, tenant: str, event: dict[str, Any]) -> int:
        """Write ``event``'s outbox rows in their own transaction (events not tied to a
        decision's audit row: run_failed, budget_threshold)."""
        return self._tx(
            lambda conn, now: _write_notification(conn, now, tenant, event), again=False
        )

    def outbox_claim(self, tenant: str | None, limit: int, lease: float) -> list[dict[str, Any]]:
        o = S.outbox

        def run(conn: sa.Connection, now: float) -> list[dict[str, Any]]:
            due = conn.execute(
                sa.select(o)
                .where(o.c.state == "pending", o.c.next_attempt_at <= now, _outbox_scope(tenant))
                .order_by(o.c.next_attempt_at)
                .limit(limit)
            ).all()
            got = []
            for r in due:
                token = uuid.uuid4().hex
                # The claim: conditional on the row still being due, so of two deliverers
                # racing for it exactly one UPDATE matches (the other waits on the row
                # lock, re-reads it and matches nothing). The lease pushes next_attempt_at
                # out: if we die before marking, the row is due again when it ends. The
                # attempt is counted now, before the send, so a crash counts too.
                res = conn.execute(
                    sa.update(o)
                    .where(o.c.id == r.id, o.c.state == "pending", o.c.next_attempt_at <= now)
                    .values(
                        lease_token=token,
                        attempts=o.c.attempts + 1,
                        next_attempt_at=now + lease,
                    )
                )
                if res.rowcount == 1:
                    got.append(
                        {**r._asdict(), "attempts": int(r.attempts) + 1, "lease_token": token}
                    )
            return got

        return self._tx(run, again=False)

    def outbox_mark(
        self, tenant: str, row_id: str, token: str, state: str, delay: float, error: str | None
    ) -> bool:
        o = S.outbox

        def run(conn: sa.Connection, now: float) -> bool:
            mine = sa.and_(o.c.id == row_id, o.c.lease_token == token)
            values: dict[str, Any] = {"state": state, "lease_token": None, "last_error": error}
            if state == "delivered":
                values["delivered_at"] = now
            else:
                values["next_attempt_at"] = now + delay
            # Only while the lease is held: if it ran out and another deliverer took the
            # row, its outcome is the one that counts.
            return bool(conn.execute(sa.update(o).where(mine).values(**values)).rowcount)

        return self._tx(run)

    def outbox_pending(self, tenant: str | None) -> tuple[int, float | None]:
        o = S.outbox

        def run(conn: sa.Connection, now: float) -> tuple[int, float | None]:
            row = conn.execute(
                sa.select(sa.func.count(), sa.func.min(o.c.next_attempt_at)).where(
                    o.c.state == "pending", _outbox_scope(tenant)
                )
            ).one()
            return int(row[0]), (None if row[1] is None else float(row[1]) - now)

        return self._tx(run, read=True)

    def outbox_list(
        self, tenant: str | None, state: str | None, limit: int
    ) -> list[dict[str, Any]]:
        o = S.outbox

        def run(conn: sa.Connection, now: float) -> list[dict[str, Any]]:
            q = sa.select(o).where(_outbox_scope(tenant))
            if state is not None:
                q = q.where(o.c.state == state)
            rows = conn.execute(q.order_by(o.c.created_at.desc()).limit(limit)).all()
            return [r._asdict() for r in rows]

        return self._tx(run, read=True)

    def outbox_retry(self, tenant: str | None, row_id: str) -> bool:
        o = S.outbox

        def run(conn: sa.Connection, now: float) -> bool:
            res = conn.execute(
                sa.update(o)
                .where(o.c.id == row_id, o.c.state.in_(("dead", "pending")), _outbox_scope(tenant))
                # Due in a second, not now: the resend is signed with a newer whole-second
                # timestamp than the last attempt, which a receiver's replay cache accepts.
                .values(state="pending", attempts=0, next_attempt_at=now + 1.0, lease_token=None)
            )
            return bool(res.rowcount)

        return self._tx(run)

    def outbox_webhook(self, tenant: str, webhook_id: str) -> dict[str, Any] | None:
        w = S.webhooks

        def run(conn: sa.Connection, now: float) -> dict[str, Any] | None:
            row = conn.execute(
                sa.select(w.c.url, w.c.secret, w.c.enabled).where(
                    w.c.tenant == tenant, w.c.id == webhook_id
                )
            ).first()
            return None if row is None else row._asdict()

        return self._tx(run, read=True)

    def close(self) -> None:
        if self._pins is not None:
            self._pins.close_all()
        dispose(self.engine)
        if self._reader is not None:
            dispose(self._reader)


def _outbox_scope(tenant: str | None) -> Any:
    return sa.true() if tenant is None else S.outbox.c.tenant == tenant


#: An audit row's canonical JSON (seq 0) around its seq: ``…,"seq":0,"spend_micros"…``.
_SEQ_MARK = ',"seq":0'
_DIVISION_BY_ZERO = "22012"

#: libpq's PQTRANS_IDLE: no transaction open on the connection.
_PG_IDLE = 0
_PG_BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED"
#: Joins the statements of one query the hot path builds (never found inside one).
_SEP = ";\n"


#: SQLite: how many threads keep a governance connection of their own (the rest check
#: one out of the pool per transaction).
PINNED = 8


@dataclass(slots=True)
class _Before:
    """A read sent ahead of a transaction's first statement (:meth:`GovStore._exec`)."""

    sql: str
    params: Mapping[str, Any]
    rows: list[Any] | None = None
    #: a statement to send after the transaction's first statement, in the same round
    #: trip, and its rows (None: not sent)
    then: tuple[str, Mapping[str, Any]] | None = None
    then_rows: list[Any] | None = None


class _Again(Exception):
    """begin's early counter locks were not the right ones: roll back, start again
    without them."""


class _Refused(Exception):
    """begin_claim's decision or a cap said no: raised out of the transaction so that
    it rolls back (the claim with it); carries what begin_claim returns."""

    def __init__(self, snap: dict[str, Any], res: Reservation | None) -> None:
        super().__init__("refused")
        self.snap, self.res = snap, res


class _Row:
    """Attribute access over a dict, for :func:`audit_fields` before the row exists."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        return None


def _sqlite_transactions(engine: sa.Engine) -> None:
    """Let us issue BEGIN ourselves: IMMEDIATE for writes, DEFERRED for reads."""

    @sa.event.listens_for(engine, "connect")
    def _autocommit(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        deferred = conn.get_execution_options().get("onceonly_deferred", False)
        sql = "BEGIN" if deferred else "BEGIN IMMEDIATE"
        # On the driver's connection: SQLAlchemy's execution layer costs ~11 us per
        # transaction here, a fifth of an empty one (two per governed call). Its error
        # comes out as SQLAlchemy's, so _tx retries a busy database as before.
        try:
            conn.connection.dbapi_connection.execute(sql)  # type: ignore[union-attr]
        except sqlite3.Error as err:
            raise sa.exc.DBAPIError.instance(sql, (), err, sqlite3.Error) from err
