"""The SQL ledger: SQLite (embedded default), PostgreSQL (psycopg 3), MySQL/MariaDB (PyMySQL).

SQLAlchemy does what it is best at here — URLs, dialects, pooling, the schema and its
Alembic migrations, operator queries. The hot path does not go through its execution
layer (DESIGN §10: ~3x the raw driver per statement): each primitive is **one
pre-rendered statement** on a pooled DBAPI connection in autocommit mode, one round
trip, no BEGIN/COMMIT around it. Each statement is atomic on its own, which is all
the claim protocol needs.

Statements per guarded call (``docs/statements.md`` has the full text):

=====================  ==========================  ==========================
path                   SQLite                      PostgreSQL / MySQL
=====================  ==========================  ==========================
new key                SELECT, INSERT, UPDATE      INSERT(+SELECT), UPDATE
replay                 SELECT                      INSERT(+SELECT)
retry after failure    SELECT, UPDATE, UPDATE      INSERT(+SELECT), UPDATE, UPDATE
=====================  ==========================  ==========================

SQLite reads first because a local read costs microseconds and keeps replays off the
write lock; the server databases claim first because every statement is a network
round trip and most calls are new keys. On PostgreSQL the claim and the read of a
conflicting row are a single statement (a CTE); MySQL needs a second SELECT on
conflict.

Clocks: leases and TTLs use the database server's clock on PostgreSQL and MySQL, so
workers on different machines agree; SQLite runs on one host, so the host clock is the
database clock there.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from time import monotonic as _monotonic
from time import sleep as _sleep
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa

from ..errors import ConfigError, MissingExtraError, SchemaError, StoreError
from .base import CLEARED, RUNNING, SUCCEEDED, NewClaim, Record, Store, WouldBlock
from .pins import PID, ThreadPins, dispose
from .schema import HEAD, VERSION_TABLE, ledger

if TYPE_CHECKING:
    from .governance import GovernanceStore

__all__ = ["MySQLStore", "PostgresStore", "SQLStore", "SQLiteStore"]

_R = TypeVar("_R")


def _is_busy(err: sqlite3.Error) -> bool:
    """SQLITE_BUSY (or SQLITE_LOCKED): another connection holds the lock we need."""
    code = getattr(err, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (any extended code)
    text = str(err)
    return "locked" in text or "busy" in text


_COLS = (
    "namespace, idem_key, tool, state, token, owner, attempt, executions, lease_until, "
    "expires_at, args_digest, result, error, run_id, caller, created_at, updated_at"
)
_T = "onceonly_ledger"
_LIVE = f"(state <> '{RUNNING}' OR lease_until < {{now}})"

_SQL = {
    "get": f"SELECT {_COLS}, {{now}} FROM {_T} WHERE namespace = %(ns)s AND idem_key = %(k)s",
    "insert": (
        f"INSERT INTO {_T} ({_COLS}) VALUES (%(ns)s, %(k)s, %(tool)s, '{RUNNING}', 1, "
        "%(owner)s, 1, 0, {now} + %(lease)s, NULL, %(digest)s, NULL, NULL, %(run)s, "
        "%(caller)s, {now}, {now})"
    ),
    # A claim that is its own completion (the server's /check-lock): the row is born
    # succeeded, token 1, one execution, expiring after the TTL: exactly what claim +
    # finish(ok, ttl) leave behind, in one statement and one commit.
    "insert_done": (
        f"INSERT INTO {_T} ({_COLS}) VALUES (%(ns)s, %(k)s, %(tool)s, '{SUCCEEDED}', 1, "
        "%(owner)s, 1, 1, NULL, {now} + %(ttl)s, %(digest)s, %(result)s, NULL, %(run)s, "
        "%(caller)s, {now}, {now})"
    ),
    # Compare-and-set on (token, state): if anyone else took over, finished or cleared
    # the record since we read it, the WHERE no longer matches and we lose cleanly.
    # A running record may only be taken once its lease has expired (by the DB clock).
    "take_over": (
        f"UPDATE {_T} SET state = '{RUNNING}', token = token + 1, owner = %(owner)s, "
        "attempt = attempt + 1, lease_until = {now} + %(lease)s, tool = %(tool)s, "
        "args_digest = %(digest)s, run_id = %(run)s, caller = %(caller)s, error = NULL, "
        "updated_at = {now} WHERE namespace = %(ns)s AND idem_key = %(k)s "
        f"AND token = %(token)s AND state = %(state)s AND {_LIVE}"
    ),
    "force": (
        f"UPDATE {_T} SET state = '{RUNNING}', token = token + 1, owner = %(owner)s, "
        "attempt = attempt + 1, lease_until = {now} + %(lease)s, tool = %(tool)s, "
        "args_digest = %(digest)s, run_id = %(run)s, caller = %(caller)s, error = NULL, "
        "updated_at = {now} WHERE namespace = %(ns)s AND idem_key = %(k)s "
        "AND token = %(token)s"
    ),
    # Fenced completion: only the holder of the current token, while the record is
    # still running, may write the outcome. A stale owner matches no row (LeaseLost).
    "finish": (
        f"UPDATE {_T} SET state = %(state)s, result = %(result)s, error = %(error)s, "
        "executions = executions + %(inc)s, lease_until = NULL, expires_at = NULL, "
        "updated_at = {now} WHERE namespace = %(ns)s AND idem_key = %(k)s "
        f"AND token = %(token)s AND state = '{RUNNING}'"
    ),
    "finish_ttl": (
        f"UPDATE {_T} SET state = %(state)s, result = %(result)s, error = %(error)s, "
        "executions = executions + %(inc)s, lease_until = NULL, "
        "expires_at = {now} + %(ttl)s, updated_at = {now} "
        "WHERE namespace = %(ns)s AND idem_key = %(k)s "
        f"AND token = %(token)s AND state = '{RUNNING}'"
    ),
    # A claim inserted in the caller's own transaction, taken back in it (unclaim_on):
    # only a first claim (token 1, running) is ever deleted.
    "unclaim": (
        f"DELETE FROM {_T} WHERE namespace = %(ns)s AND idem_key = %(k)s "
        f"AND token = 1 AND state = '{RUNNING}'"
    ),
    # Same fence as finish: a stale owner cannot extend a lease it no longer holds.
    "heartbeat": (
        f"UPDATE {_T} SET lease_until = {{now}} + %(lease)s "
        "WHERE namespace = %(ns)s AND idem_key = %(k)s "
        f"AND token = %(token)s AND state = '{RUNNING}'"
    ),
    # The token is kept: a cleared record is taken over (token + 1) by the next call,
    # so a stale owner from before the clear can never complete the new run.
    "clear": (
        f"UPDATE {_T} SET state = '{CLEARED}', updated_at = {{now}} "
        f"WHERE namespace = %(ns)s AND idem_key = %(k)s AND {_LIVE}"
    ),
    "clear_ns": (
        f"UPDATE {_T} SET state = '{CLEARED}', updated_at = {{now}} "
        f"WHERE namespace = %(ns)s AND state <> '{CLEARED}' AND {_LIVE}"
    ),
}

# PostgreSQL: claim and read-on-conflict in one round trip. If a concurrent inserter
# commits after this statement's snapshot, both halves return nothing; the caller then
# reads again (a new snapshot sees the row).
_PG_CLAIM = (
    f"WITH ins AS ({_SQL['insert']} ON CONFLICT (namespace, idem_key) DO NOTHING "
    f"RETURNING {_COLS}) "
    f"SELECT TRUE, {_COLS}, {{now}} FROM ins UNION ALL "
    f"SELECT FALSE, {_COLS}, {{now}} FROM {_T} WHERE namespace = %(ns)s AND idem_key = %(k)s "
    "AND NOT EXISTS (SELECT 1 FROM ins)"
)
_SQLITE_INSERT = _SQL["insert"] + " ON CONFLICT (namespace, idem_key) DO NOTHING"


@functools.lru_cache(maxsize=16)
def _pg_claim_with(also: str) -> str:
    """The claim CTE with one more data-modifying CTE, ``also``, which reads the row the
    claim inserted as ``ins`` (no row when the key was taken: then it writes nothing)."""
    head = f"RETURNING {_COLS}) "
    assert _PG_CLAIM.count(head) == 1
    return _render(_PG_CLAIM.replace(head, f"RETURNING {_COLS}), also AS ({also}) "), "postgresql")


@functools.lru_cache(maxsize=16)
def _also_reading_ins(also: str, kind: str) -> str:
    """``also`` where no data-modifying CTE hands it the claimed row (SQLite, MySQL):
    ``ins`` read back from the ledger, which the claim just wrote in the same transaction.
    The CTE goes before the INSERT's ``SELECT``, where both SQLite and MariaDB/MySQL
    take it."""
    at = also.index("SELECT ")
    ins = f"WITH ins AS (SELECT {_COLS} FROM {_T} WHERE namespace = %(ns)s AND idem_key = %(k)s) "
    return _render(also[:at] + ins + also[at:], kind)


# The same claim-or-read CTE for a row born finished (claim_done).
_PG_CLAIM_DONE = _PG_CLAIM.replace(_SQL["insert"], _SQL["insert_done"])
_SQLITE_INSERT_DONE = _SQL["insert_done"] + " ON CONFLICT (namespace, idem_key) DO NOTHING"

_NOW = {
    "postgresql": "EXTRACT(EPOCH FROM statement_timestamp())::float8",
    "mysql": "UNIX_TIMESTAMP(NOW(6))",
    "sqlite": "%(now)s",
}

_BACKENDS = {"sqlite": "sqlite", "postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql"}


def _render(sql: str, kind: str) -> str:
    sql = sql.replace("{now}", _NOW[kind])
    if kind == "sqlite":
        return re.sub(r"%\((\w+)\)s", r":\1", sql)
    return sql


def _to_str(v: Any) -> Any:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else v


def _record(row: Sequence[Any], mine: bool = False) -> Record:
    # row = the 17 ledger columns, then the clock reading
    return Record(
        _to_str(row[0]),
        _to_str(row[1]),
        row[2],
        row[3],
        int(row[4]),
        row[5],
        int(row[6]),
        int(row[7]),
        None if row[8] is None else float(row[8]),
        None if row[9] is None else float(row[9]),
        row[10],
        row[11],
        row[12],
        row[13],
        row[14],
        float(row[15]),
        float(row[16]),
        float(row[17]),
        mine,
    )


def _exact_record(row: Sequence[Any], mine: bool = False) -> Record:
    """``_record`` for a driver that already returns the column types (SQLite, whose
    column affinities make REAL/INTEGER/TEXT exact, and psycopg): no conversions."""
    rec = Record(*row)
    if mine:
        rec.mine = True
    return rec


class _Conn(sqlite3.Connection):
    """sqlite3.Connection, weak-referenceable (so close() can reach every thread's)."""


class _Disconnected(StoreError):
    """A statement failed because its connection was dead (see SQLStore._on_cursor)."""


class SQLStore(Store):
    """A ledger in one SQL database, selected by URL.

    ``sqlite:///path.db`` (``?synchronous=normal`` trades power-loss durability for
    speed), ``postgresql+psycopg://…``, ``mysql+pymysql://…`` / ``mariadb+pymysql://…``.

    ``SQLStore(url)`` returns the dialect's subclass — :class:`SQLiteStore`,
    :class:`PostgresStore` or :class:`MySQLStore` — each holding what its dialect does
    differently (connections, the claim, the clock); the statements are shared (``_SQL``,
    rendered per dialect) and everything else is here.

    ``auto_migrate``: create or upgrade the schema on first use. Defaults to True for
    SQLite (the embedded default creates itself) and False for servers, where
    ``onceonly migrate`` owns the schema.
    """

    #: The claim statement before rendering.
    _CLAIM: str = _SQL["insert"]
    #: A fetched row (17 columns, then the clock) to a Record: converting (MySQL's
    #: binary collations return bytes) or as is (drivers that return the column types).
    _to_record = staticmethod(_record)
    #: The claim of a row born finished (claim_done) before rendering.
    _CLAIM_DONE: str = _SQL["insert_done"]
    #: Whether the schema is created on first use unless ``auto_migrate`` says otherwise.
    _MIGRATES_ITSELF = False

    # Set by one dialect only.
    path: Path  # SQLite: the database file
    synchronous: str  # SQLite: FULL, NORMAL or EXTRA
    connect_args: dict[str, Any]  # servers: what each new connection is given

    def __new__(cls, url: str | sa.URL, **options: Any) -> SQLStore:
        if cls is SQLStore:  # SQLStore(url): the dialect's class
            cls = _DIALECTS[_backend(_parse(url))]
        return super().__new__(cls)

    def __init__(
        self,
        url: str | sa.URL,
        *,
        auto_migrate: bool | None = None,
        pool_size: int = 10,
        busy_timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.url = _parse(url)
        backend = _backend(self.url)
        if backend != self.kind:
            raise ConfigError(
                f"{type(self).__name__} is the {self.kind} ledger, not {backend}: "
                "SQLStore(url) picks the class from the URL"
            )
        self.auto_migrate = self._MIGRATES_ITSELF if auto_migrate is None else auto_migrate
        self._busy = busy_timeout
        self._pid = os.getpid()
        self._ready = False
        self._ready_lock = threading.Lock()
        self._sql = {name: _render(text, self.kind) for name, text in _SQL.items()}
        self._claim_sql = _render(self._CLAIM, self.kind)
        self._claim_done_sql = _render(self._CLAIM_DONE, self.kind)
        self._engine: sa.Engine | None = None
        # Up to pool_size threads keep a connection pinned; others check one out per
        # statement, so a large thread pool never waits for a pinned connection.
        self._pins: ThreadPins[Any] = ThreadPins(pool_size)
        self._cursors = threading.local()  # .conn, .cursor: a pinned connection's cursor
        self._open(pool_size, connect_timeout)

    # -- connections (a database server; SQLiteStore overrides) -------------------------
    #: (module, extra, distribution) of the DBAPI driver.
    _DRIVER: tuple[str, str, str] = ("", "", "")

    def _open(self, pool_size: int, connect_timeout: float) -> None:
        module, extra, dist = self._DRIVER
        try:
            __import__(module)
        except ImportError:
            raise MissingExtraError(f"the {self.kind} store", extra, dist) from None
        self.url = self._with_driver(self.url)
        self.connect_args = self._connect_args(connect_timeout)
        self._engine = sa.create_engine(
            self.url,
            isolation_level="AUTOCOMMIT",
            pool_size=pool_size,
            max_overflow=pool_size * 2,
            pool_reset_on_return=None,  # autocommit: there is never a transaction to end
            connect_args=self.connect_args,
        )
        self._dbapi_error: type[BaseException] = self._engine.dialect.loaded_dbapi.Error
        self._integrity: type[BaseException] = self._engine.dialect.loaded_dbapi.IntegrityError
        #: (error, DBAPI connection, cursor) -> whether the connection is dead
        self._disconnect: Callable[[Any, Any, Any], bool] = self._engine.dialect.is_disconnect

    def _with_driver(self, url: sa.URL) -> sa.URL:
        """The URL with our driver when it names none."""
        return url

    def _connect_args(self, connect_timeout: float) -> dict[str, Any]:
        return {"connect_timeout": int(connect_timeout)}

    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine for operator queries and migrations."""
        assert self._engine is not None
        if self._pid != os.getpid():
            self._forked()
        return self._engine

    def _forked(self) -> None:
        """In a forked child: never reuse a parent's sockets (the pool's or the pinned
        ones, which stay the parent's)."""
        assert self._engine is not None
        self._engine.dispose(close=False)
        self._pid = os.getpid()
        self._pins.forget()

    def _run(
        self, name: str, sql: str, params: dict[str, Any], fetch: bool, *, read: bool = False
    ) -> Any:
        """Execute one statement; return the first row (fetch) or the rowcount. ``read``:
        the statement only reads (see :meth:`_on_cursor`)."""

        def one(cur: Any) -> Any:
            cur.execute(sql, params)
            return cur.fetchone() if fetch else cur.rowcount

        return self._on_cursor(name, one, read=read)

    def _on_cursor(self, name: str, work: Callable[[Any], _R], *, read: bool = False) -> _R:
        """``work(cursor)`` on this thread's pinned connection (or a checked-out one); a
        driver error other than an integrity error discards the connection. ``read``:
        ``work`` only reads, so when the connection turns out dead (a database restart,
        a connection cut by the server) it runs once more on a fresh one; a write never
        does here, since one whose reply was lost may have committed."""
        if not read:
            return self._on_cursor_once(name, work, last=True)
        try:
            return self._on_cursor_once(name, work, last=False)
        except _Disconnected:
            return self._on_cursor_once(name, work, last=True)

    def _on_cursor_once(self, name: str, work: Callable[[Any], _R], *, last: bool) -> _R:
        if not self._ready:
            self._ensure_schema()
        if self._pid != PID[0]:
            self._forked()
        pinned = self._pins.get(self._checkout)
        conn = pinned if pinned is not None else self._checkout()
        try:
            if pinned is None:
                cur = conn.cursor()
                out = work(cur)
                cur.close()
                return out
            # A pinned connection keeps one cursor for its thread: psycopg builds its
            # adapters' Transformer per cursor, ~14 us per statement measured. Cached by
            # connection: after a driver error the thread pins a new one, and a new cursor.
            held = self._cursors
            cur = getattr(held, "cursor", None)
            if cur is None or held.conn is not conn:
                cur = held.cursor = conn.cursor()
                held.conn = conn
            return work(cur)
        except self._integrity:
            raise
        except self._dbapi_error as err:
            # A dead connection (server restarted) must not go back to the pool; a pinned
            # one is unpinned, so the thread's next statement runs on a fresh connection.
            gone = self._disconnect(err, conn.dbapi_connection, None)
            conn.invalidate()
            if pinned is not None:
                self._pins.drop()  # its finalizer checks the invalidated one in
            text = f"{self.kind} ledger: {name} failed: {err}"
            if gone and not last:
                raise _Disconnected(text) from err
            raise StoreError(text) from err
        finally:
            if pinned is None:
                conn.close()

    def _checkout(self) -> Any:
        if self._pid != PID[0]:
            self._forked()
        assert self._engine is not None
        try:
            return self._engine.raw_connection()
        except (sa.exc.SQLAlchemyError, self._dbapi_error) as err:
            raise StoreError(
                f"cannot connect to the {self.kind} ledger at "
                f"{self.url.render_as_string(hide_password=True)}: {err}"
            ) from err

    # -- schema -------------------------------------------------------------------------
    @property
    def busy_timeout(self) -> float:
        return self._busy

    def ensure_schema(self) -> None:
        """Check (and with ``auto_migrate``, create or upgrade) the schema once."""
        if not self._ready:
            self._ensure_schema()

    def _ensure_schema(self) -> None:
        with self._ready_lock:
            if self._ready:
                return
            self._check_schema()
            self._ready = True

    def _check_schema(self) -> None:
        version = self._schema_version()
        if version != HEAD:
            if not self.auto_migrate:
                shown = self.url.render_as_string(hide_password=True)
                raise SchemaError(
                    f"the ledger schema in {shown} is "
                    f"{'missing' if version is None else 'at revision ' + version}; "
                    f"run: onceonly migrate --url '{shown}'"
                )
            self.migrate()

    def _schema_version(self) -> str | None:
        def read(conn: sa.Connection) -> str | None:
            if not sa.inspect(conn).has_table(VERSION_TABLE):
                return None
            row = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).first()
            return None if row is None else str(row[0])

        shown = self.url.render_as_string(hide_password=True)
        return self._read_once_more(
            read, lambda err: f"cannot reach the ledger at {shown}: {err.__cause__ or err}"
        )

    def _read_once_more(
        self, read: Callable[[sa.Connection], _R], failed: Callable[[BaseException], str]
    ) -> _R:
        """A read on the operator engine. A pooled connection cut by a restart (a governed
        call's claims run on the governance store's connections, so nothing else may have
        noticed) fails it and is invalidated with the pool: the read runs once more on a
        fresh connection, which a read can always do. Anything else is a StoreError
        (``failed`` words it)."""
        for again in (True, False):
            try:
                with self.engine().connect() as conn:
                    return read(conn)
            except sa.exc.DBAPIError as err:
                if again and err.connection_invalidated:
                    continue
                raise StoreError(failed(err)) from err
            except sa.exc.SQLAlchemyError as err:
                raise StoreError(failed(err)) from err
        raise AssertionError("unreachable")  # pragma: no cover

    def migrate(self, revision: str = "head") -> None:
        """Create or upgrade the ledger schema with Alembic (``onceonly migrate``)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent.parent / "migrations"))
        try:
            with self.engine().begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"migration failed: {err}") from err

    # -- primitives ---------------------------------------------------------------------
    def get(self, namespace: str, key: str) -> Record | None:
        row = self._run("get", self._sql["get"], {"ns": namespace, "k": key}, True, read=True)
        return None if row is None else self._to_record(row)

    def claim(self, namespace: str, key: str, new: NewClaim) -> Record:
        """The portable claim (MySQL's): insert; a duplicate key means someone holds it,
        read theirs. The other dialects do better in their own way."""
        params = self._claim_params(namespace, key, new)
        try:
            self._run("claim", self._claim_sql, params, False)
            return self._mine(namespace, key, new, time.time())
        except self._integrity:
            pass  # duplicate key: someone holds it; read it below
        return self._held(namespace, key)

    def claim_done(
        self, namespace: str, key: str, new: NewClaim, *, result: str, ttl: float
    ) -> Record:
        """Claim ``key`` as already succeeded with ``result``, expiring after ``ttl``
        seconds: one statement, one commit, where a claim + finish takes two. For work
        that is complete the moment it is claimed (the server's ``/check-lock``: the
        lock *is* the work). A held key returns the holder's record (``mine`` False),
        exactly as :meth:`claim` does; the caller decides on it the same way."""
        params = self._claim_params(namespace, key, new)
        params["result"] = result
        params["ttl"] = float(ttl)
        try:
            self._run("claim", self._claim_done_sql, params, False)
            return self._mine_done(namespace, key, new, time.time(), result, float(ttl))
        except self._integrity:
            pass  # duplicate key: someone holds it; read it below
        return self._held(namespace, key)

    @classmethod
    def _mine_done(
        cls, namespace: str, key: str, new: NewClaim, now: float, result: str, ttl: float
    ) -> Record:
        """The row insert_done wrote: the claim's, finished (as finish leaves it)."""
        rec = cls._mine(namespace, key, new, now)
        rec.state, rec.executions, rec.lease_until = SUCCEEDED, 1, None
        rec.expires_at, rec.result = now + ttl, result
        return rec

    @staticmethod
    def _claim_params(namespace: str, key: str, new: NewClaim) -> dict[str, Any]:
        return {
            "ns": namespace,
            "k": key,
            "tool": new.tool[:512],
            "owner": new.owner,
            "lease": new.lease,
            "digest": new.args_digest,
            "run": new.run_id,
            "caller": new.caller,
        }

    def _with_params(
        self, namespace: str, key: str, new: NewClaim, params: dict[str, Any]
    ) -> dict[str, Any]:
        """``claim_with``'s parameters: the claim's and ``also``'s, which must not clash."""
        claim = self._claim_params(namespace, key, new)
        clash = sorted(claim.keys() & params.keys() | {"now"} & params.keys())
        if clash:
            raise ConfigError(f"claim_with: parameter names {clash} are the claim's own")
        return {**claim, **params}

    def _held(self, namespace: str, key: str) -> Record:
        """The record a claim lost to (read after the insert found the key taken)."""
        found = self.get(namespace, key)
        if found is None:  # cleared rows are kept, so a vanished row means a purge
            raise StoreError(f"record {key!r} disappeared during the claim; call again")
        return found

    @staticmethod
    def _mine(namespace: str, key: str, new: NewClaim, now: float) -> Record:
        return Record(
            namespace,
            key,
            new.tool,
            RUNNING,
            1,
            new.owner,
            1,
            0,
            now + new.lease,
            None,
            new.args_digest,
            None,
            None,
            new.run_id,
            new.caller,
            now,
            now,
            now,
            True,
        )

    def take_over(
        self, namespace: str, key: str, seen: Record, new: NewClaim, *, force: bool = False
    ) -> Record | None:
        params: dict[str, Any] = {
            "ns": namespace,
            "k": key,
            "tool": new.tool[:512],
            "owner": new.owner,
            "lease": new.lease,
            "digest": new.args_digest,
            "run": new.run_id,
            "caller": new.caller,
            "token": seen.token,
            "state": seen.state,
        }
        sql = self._sql["force" if force else "take_over"]
        if self._run("take_over", sql, params, False) != 1:
            return None
        now = float(params.get("now", seen.now))
        return Record(
            namespace,
            key,
            new.tool,
            RUNNING,
            seen.token + 1,
            new.owner,
            seen.attempt + 1,
            seen.executions,
            now + new.lease,
            seen.expires_at,
            new.args_digest,
            seen.result,
            None,
            new.run_id,
            new.caller,
            seen.created_at,
            now,
            now,
            True,
        )

    def finish(
        self,
        namespace: str,
        key: str,
        token: int,
        *,
        ok: bool,
        result: str | None = None,
        error: str | None = None,
        ttl: float | None = None,
    ) -> bool:
        sql, params = self._finish(namespace, key, token, ok, result, error, ttl)
        return bool(self._run("finish", sql, params, False) == 1)

    def _finish(
        self,
        namespace: str,
        key: str,
        token: int,
        ok: bool,
        result: str | None,
        error: str | None,
        ttl: float | None,
    ) -> tuple[str, dict[str, Any]]:
        params: dict[str, Any] = {
            "ns": namespace,
            "k": key,
            "token": token,
            "state": "succeeded" if ok else "failed",
            "result": result,
            "error": error,
            "inc": 1 if ok else 0,
        }
        if ttl is not None:
            params["ttl"] = float(ttl)
        return self._sql["finish" if ttl is None else "finish_ttl"], params

    # -- on a caller's transaction (a governed call: stores/govsql.py) -------------------
    #: ``execute(sql, params)`` runs one of this ledger's statements on the caller's
    #: connection, inside the caller's transaction, and returns the DBAPI cursor.
    def claim_on(
        self,
        execute: Callable[[str, dict[str, Any]], Any],
        namespace: str,
        key: str,
        new: NewClaim,
        now: float,
    ) -> Record:
        """:meth:`claim`'s conditional insert (and the read of a held key) run by
        ``execute`` inside the caller's transaction: the governance store's ``begin``,
        so that the claim commits with the reservation or not at all. ``now``: the
        caller's clock reading (used where the ledger's clock is the host's)."""
        params = self._claim_params(namespace, key, new)
        params["now"] = now
        if self.kind == "postgresql":
            row = execute(self._claim_sql, params).fetchone()
            if row is not None:
                return _exact_record(row[1:], mine=bool(row[0]))
        else:
            try:
                if execute(self._claim_sql, params).rowcount == 1:
                    return self._mine(namespace, key, new, now)
            except (self._integrity, sa.exc.IntegrityError):
                pass  # MySQL: duplicate key (only the statement is rolled back)
        found = self.get_on(execute, namespace, key, now)
        if found is None:  # cleared rows are kept, so a vanished row means a purge
            raise StoreError(f"record {key!r} disappeared during the claim; call again")
        return found

    def unclaim_on(
        self, execute: Callable[[str, dict[str, Any]], Any], namespace: str, key: str
    ) -> None:
        """Delete the record :meth:`claim_on` inserted in the caller's transaction (the
        caller's reservation was refused, and what else the transaction did — expired
        holds swept as spent — must commit): a refused call leaves no claim behind."""
        execute(self._sql["unclaim"], {"ns": namespace, "k": key})

    def get_on(
        self,
        execute: Callable[[str, dict[str, Any]], Any],
        namespace: str,
        key: str,
        now: float,
    ) -> Record | None:
        """:meth:`get` run by ``execute`` inside the caller's transaction."""
        row = execute(self._sql["get"], {"ns": namespace, "k": key, "now": now}).fetchone()
        return None if row is None else self._to_record(row)

    def finish_on(
        self,
        execute: Callable[[str, dict[str, Any]], Any],
        namespace: str,
        key: str,
        token: int,
        *,
        result: str | None,
        error: str | None,
        ttl: float | None,
        now: float,
    ) -> bool:
        """:meth:`finish` (``ok=True``: the same fenced UPDATE) run by ``execute``
        inside the caller's transaction: the governance store's settle."""
        sql, params = self._finish(namespace, key, token, True, result, error, ttl)
        params["now"] = now
        return bool(execute(sql, params).rowcount == 1)

    def heartbeat(self, namespace: str, key: str, token: int, lease: float) -> bool:
        params = {"ns": namespace, "k": key, "token": token, "lease": float(lease)}
        return bool(self._run("heartbeat", self._sql["heartbeat"], params, False) == 1)

    def clear(self, namespace: str, key: str) -> bool | None:
        if self._run("clear", self._sql["clear"], {"ns": namespace, "k": key}, False) == 1:
            return True
        return None if self.get(namespace, key) is None else False

    def clear_namespace(self, namespace: str) -> int:
        return int(self._run("clear", self._sql["clear_ns"], {"ns": namespace}, False))

    def now(self) -> float:
        sql = sa.text("SELECT " + _NOW[self.kind])
        return self._read_once_more(
            lambda conn: float(conn.execute(sql).scalar_one()),
            lambda err: f"reading the {self.kind} ledger's clock failed: {err}",
        )

    # -- operator queries ---------------------------------------------------------------
    def list(
        self,
        *,
        namespace: str | None = None,
        prefix: bool = False,
        state: str | None = None,
        tool: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Record]:
        if not self._ready:
            self._ensure_schema()
        t = ledger
        q = sa.select(*t.c, sa.literal(0.0)).order_by(t.c.updated_at.desc(), t.c.idem_key)
        if namespace is not None:
            cond = t.c.namespace == namespace
            if prefix:
                cond = sa.or_(cond, t.c.namespace.startswith(namespace + "/", autoescape=True))
            q = q.where(cond)
        if state is not None:
            q = q.where(t.c.state == state)
        if tool is not None:
            q = q.where(t.c.tool == tool)
        if since is not None:
            q = q.where(t.c.updated_at > since)
        q = q.limit(limit)
        now = self.now()
        try:
            with self.engine().connect() as conn:
                rows = conn.execute(q).all()
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"listing the ledger failed: {err}") from err
        out = [_record(r) for r in rows]
        for r in out:
            r.now = now
        return out

    # -- retention (purge_expired; see Store.purge_expired) ---------------------------
    def purge_expired(self, namespace: str | None, before: float, limit: int = 1000) -> int:
        if not self._ready:
            self._ensure_schema()
        try:
            with self.engine().begin() as conn:
                return int(conn.execute(self._expired_batch(namespace, before, limit)).rowcount)
        except sa.exc.SQLAlchemyError as err:
            raise StoreError(f"deleting expired records failed: {err}") from err

    def _expired_batch(self, namespace: str | None, before: float, limit: int) -> sa.Delete:
        """The DELETE of at most ``limit`` expired records (see :meth:`purge_expired`)."""
        t = ledger
        expired = sa.and_(
            t.c.state == SUCCEEDED,
            t.c.token == 1,
            t.c.expires_at.is_not(None),
            t.c.expires_at <= before,
        )
        if namespace is not None:
            expired = sa.and_(t.c.namespace == namespace, expired)
        if self.kind == "mysql":
            # MySQL/MariaDB refuse LIMIT in an IN subquery but take DELETE … LIMIT.
            return sa.delete(t).where(expired).with_dialect_options(mysql_limit=limit)
        # One statement bounded to ``limit`` rows, found oldest first along the expiry
        # index (0006): each batch starts where the index does, past only what earlier
        # batches deleted, never through the whole table. The outer WHERE re-checks the
        # state and the token, so a record taken over meanwhile (PostgreSQL re-checks it
        # on the row's newest version) is kept; it names no expiry, so the rows are found
        # by their key from the batch, not by a second walk of the expiry index.
        batch = (
            sa.select(t.c.namespace, t.c.idem_key)
            .where(expired)
            .order_by(t.c.expires_at)
            .limit(limit)
        )
        return sa.delete(t).where(
            sa.tuple_(t.c.namespace, t.c.idem_key).in_(batch),
            t.c.state == SUCCEEDED,
            t.c.token == 1,
        )

    def governance_store(self) -> GovernanceStore:
        from .govsql import GovStore

        return GovStore(self)

    def close(self) -> None:
        # Pinned connections are checked out for good: close them here (dispose() leaves
        # checked-out connections open); a thread that runs another statement pins afresh.
        if self._pid == os.getpid():
            self._pins.close_all()
        else:
            self._pins.forget()
        if self._engine is not None:
            dispose(self._engine)


class _Local(threading.local):
    """Per thread: its connection, and the one :meth:`SQLiteStore.run_nowait` uses."""

    conn: sqlite3.Connection | None = None
    pid = 0
    nowait_conn: sqlite3.Connection | None = None
    nowait_pid = 0


class SQLiteStore(SQLStore):
    """The embedded ledger: one file, one connection per thread, the host's clock.

    A claim reads first (a local read costs microseconds and keeps replays off the write
    lock), unless its caller says it has not seen the key completed
    (``NewClaim.first_sight``, a guard's first call of a key): then it inserts first, the
    read a new key would miss saved. A guard reads first itself for the keys it has seen
    completed (``read_before_claim``), so a retry's replay stays one read."""

    kind = "sqlite"
    read_before_claim = True
    _CLAIM = _SQLITE_INSERT
    _CLAIM_DONE = _SQLITE_INSERT_DONE
    # The column affinities (REAL, INTEGER, TEXT) return exactly the types we wrote.
    _to_record = staticmethod(_exact_record)
    #: The hot read (every replay), with positional parameters: the clock, then the key.
    _GET = _SQL["get"].replace("{now}", "?").replace("%(ns)s", "?").replace("%(k)s", "?")

    def get(self, namespace: str, key: str) -> Record | None:
        # The replay path: the thread's connection, one execute, the row as a Record;
        # no parameter dict, no name lookup beyond these.
        if not self._ready:
            self._ensure_schema()
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != PID[0]:
            conn = self._sqlite_conn()
        try:
            row = conn.execute(self._GET, (time.time(), namespace, key)).fetchone()
        except sqlite3.Error as err:
            raise StoreError(f"SQLite ledger {self.path}: get failed: {err}") from err
        return None if row is None else Record(*row)

    _MIGRATES_ITSELF = True

    def _open(self, pool_size: int, connect_timeout: float) -> None:
        db = self.url.database
        if not db or db == ":memory:" or db.startswith("file:"):
            raise ConfigError(
                "an in-memory SQLite database is private to one connection; "
                "use memory:// for an in-process ledger or a file path"
            )
        self.path = Path(db)
        query = {k.lower(): str(v).lower() for k, v in self.url.query.items()}
        sync = query.pop("synchronous", "full")
        if sync not in ("full", "normal", "extra"):
            raise ConfigError(f"synchronous must be full, normal or extra, not {sync!r}")
        if query:
            raise ConfigError(f"unknown SQLite URL options: {', '.join(sorted(query))}")
        self.synchronous = sync.upper()
        self.nowait = self.synchronous == "NORMAL"
        self._local = _Local()
        self._conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self._dbapi_error = sqlite3.Error
        self._integrity = sqlite3.IntegrityError

    def _sqlite_conn(self) -> sqlite3.Connection:
        local = self._local
        conn = local.conn
        if conn is None or local.pid != PID[0]:
            # One connection per thread (sqlite3 connections are not thread-safe), in
            # autocommit mode: each statement is its own transaction.
            conn = local.conn = self._connect(self._busy)
            local.pid = os.getpid()
        return conn

    def _connect(self, busy: float) -> sqlite3.Connection:
        if not self.path.parent.exists():
            raise ConfigError(f"the directory of the SQLite ledger does not exist: {self.path}")
        try:
            conn = sqlite3.connect(
                str(self.path),
                timeout=busy,
                isolation_level=None,
                check_same_thread=True,
                factory=_Conn,
            )
        except sqlite3.Error as err:
            raise StoreError(f"cannot open the SQLite ledger {self.path}: {err}") from err
        try:
            self._enable_wal(conn, busy)
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute(f"PRAGMA busy_timeout={int(busy * 1000)}")
        except sqlite3.Error as err:  # e.g. "file is not a database"
            conn.close()
            raise StoreError(f"cannot open the SQLite ledger {self.path}: {err}") from err
        self._conns.add(conn)
        return conn

    def run_nowait(self, fn: Callable[[Store], _R]) -> _R:
        """``fn(self)`` on this thread's second connection, whose busy timeout is 0: a
        statement that would wait for the write lock fails at once with SQLITE_BUSY,
        before it wrote anything (an autocommit statement that did not get the lock
        committed nothing), and :meth:`_run` turns that into :class:`WouldBlock`.

        Only for WAL NORMAL (no fsync per commit; FULL and EXTRA fsync every commit,
        which is a wait too), once the schema is checked (a first use may migrate under
        a file lock). What can still take a while is a WAL checkpoint, which SQLite runs
        in the committing connection every ~1,000 WAL pages, with an fsync."""
        if not self.nowait or not self._ready:
            raise WouldBlock
        local = self._local
        conn = local.nowait_conn
        pid = os.getpid()
        if conn is None or local.nowait_pid != pid:
            try:
                conn = local.nowait_conn = self._connect(0.0)
            except StoreError as err:  # locked while opening: the worker thread will wait
                raise WouldBlock from err
            local.nowait_pid = pid
        usual, usual_pid = local.conn, local.pid
        local.conn, local.pid = conn, pid
        try:
            return fn(self)
        finally:
            local.conn, local.pid = usual, usual_pid

    def _enable_wal(self, conn: sqlite3.Connection, busy: float) -> None:
        # Switching a new file to WAL takes an exclusive lock, and SQLite answers a
        # concurrent switch with SQLITE_BUSY without calling the busy handler; several
        # processes opening a fresh ledger at once would fail. Retry within busy_timeout.
        deadline = _monotonic() + busy
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err):
                    raise
                if _monotonic() >= deadline:
                    raise
                _sleep(0.005)

    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine for operator queries and migrations (created lazily)."""
        if self._engine is None:
            # The URL options (synchronous=) are ours, applied per connection in
            # _sqlite_conn; pysqlite would warn about them and ignore them.
            eng = sa.create_engine(self.url.set(query={}), poolclass=sa.NullPool)

            @sa.event.listens_for(eng, "connect")
            def _pragmas(dbapi_conn: Any, _rec: Any) -> None:
                dbapi_conn.execute(f"PRAGMA busy_timeout={int(self._busy * 1000)}")

            self._engine = eng
        return super().engine()

    def _run(
        self, name: str, sql: str, params: dict[str, Any], fetch: bool, *, read: bool = False
    ) -> Any:
        # ``read`` changes nothing here: a file has no connection to lose.
        if not self._ready:
            self._ensure_schema()
        params["now"] = time.time()
        try:
            cur = self._sqlite_conn().execute(sql, params)
            return cur.fetchone() if fetch else cur.rowcount
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as err:
            if _is_busy(err) and self._local.conn is self._local.nowait_conn:
                raise WouldBlock from err  # run_nowait's attempt: nothing was written
            raise StoreError(f"SQLite ledger {self.path}: {name} failed: {err}") from err

    def _check_schema(self) -> None:
        conn = self._sqlite_conn()
        if self._sqlite_version(conn) == HEAD:
            return
        if not self.auto_migrate:
            raise SchemaError(f"the ledger schema in {self.path} is missing; run onceonly migrate")
        # Several processes may open a new ledger at once: serialise creation with an
        # flock on a *separate* lock file. Never open and close the database file itself
        # outside SQLite: closing any descriptor of a file drops every POSIX lock the
        # process holds on it, including the shared lock by which SQLite's WAL mode knows
        # a connection is still open — the last other process to close would then
        # checkpoint and delete the WAL under us (lost commits, "disk image is malformed").
        lock = self.path.with_name(self.path.name + ".migrate.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._sqlite_version(conn) != HEAD:
                self.migrate()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _sqlite_version(conn: sqlite3.Connection) -> str | None:
        try:
            row = conn.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchone()
        except sqlite3.OperationalError:
            return None
        return None if row is None else str(row[0])

    def claim(self, namespace: str, key: str, new: NewClaim) -> Record:
        if not new.first_sight:  # off the write lock when the key may well be there
            found = self.get(namespace, key)
            if found is not None:
                return found
        params = self._claim_params(namespace, key, new)
        try:
            inserted = self._run("claim", self._claim_sql, params, False)
        except sqlite3.IntegrityError as err:  # pragma: no cover - ON CONFLICT handles it
            raise StoreError(str(err)) from err
        if inserted == 1:
            return self._mine(namespace, key, new, float(params["now"]))
        return self._held(namespace, key)

    def claim_done(
        self, namespace: str, key: str, new: NewClaim, *, result: str, ttl: float
    ) -> Record:
        found = self.get(namespace, key)  # read first, as claim does: off the write lock
        if found is not None:
            return found
        params = self._claim_params(namespace, key, new)
        params["result"] = result
        params["ttl"] = float(ttl)
        try:
            inserted = self._run("claim", self._claim_done_sql, params, False)
        except sqlite3.IntegrityError as err:  # pragma: no cover - ON CONFLICT handles it
            raise StoreError(str(err)) from err
        if inserted == 1:
            return self._mine_done(namespace, key, new, float(params["now"]), result, float(ttl))
        return self._held(namespace, key)

    def claim_with(
        self, namespace: str, key: str, new: NewClaim, also: str, params: dict[str, Any]
    ) -> Record:
        """:meth:`claim`, and in the same transaction, only when the claim inserts the row,
        ``also``: an ``INSERT … SELECT … FROM ins WHERE …`` of a row that belongs with the
        new claim, where ``ins`` is the claimed row (``ins.token``, ...). Both commit
        together or neither does: one commit where a claim and then a write took two (the
        server's key-mode ``/ai/run`` writes its job row so). ``also`` takes ``%(name)s``
        parameters from ``params``, named apart from the claim's own, and ``{now}``. On
        PostgreSQL ``ins`` is the claim CTE's ``RETURNING``; here and on MySQL it is a CTE
        reading the row back (``_also_reading_ins``); only the upsert clause differs per
        dialect (``server.db.JOB_WITH_CLAIM``). (Its SELECT needs a WHERE clause, ``WHERE
        TRUE`` at least, for SQLite to parse an ``ON CONFLICT`` after it.)"""
        found = self.get(namespace, key)  # read first, as claim does: off the write lock
        if found is not None:
            return found
        p = self._with_params(namespace, key, new, params)
        p["now"] = time.time()
        sql = _also_reading_ins(also, "sqlite")
        conn = self._sqlite_conn()
        try:
            # One write transaction for both rows: taken at BEGIN (IMMEDIATE), so the
            # busy timeout applies there and not between the two INSERTs.
            conn.execute("BEGIN IMMEDIATE")
            try:
                inserted = conn.execute(self._claim_sql, p).rowcount
                if inserted == 1:
                    conn.execute(sql, p)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            raise StoreError(f"SQLite ledger {self.path}: claim failed: {err}") from err
        if inserted == 1:
            return self._mine(namespace, key, new, float(p["now"]))
        return self._held(namespace, key)

    def now(self) -> float:
        return time.time()

    def close(self) -> None:
        for conn in list(self._conns):
            # A connection owned by another thread refuses; it closes with its thread.
            with contextlib.suppress(sqlite3.ProgrammingError):
                conn.close()
        self._local = _Local()
        super().close()


class PostgresStore(SQLStore):
    """PostgreSQL (psycopg 3): the claim and the read of a conflicting row are one
    statement (a CTE), one round trip; the server's clock."""

    kind = "postgresql"
    read_before_claim = True
    _CLAIM = _PG_CLAIM
    _CLAIM_DONE = _PG_CLAIM_DONE
    _to_record = staticmethod(_exact_record)  # psycopg: float8, bigint, text as typed
    _DRIVER = ("psycopg", "postgres", "psycopg")

    def _with_driver(self, url: sa.URL) -> sa.URL:
        if url.drivername in ("postgresql", "postgres"):
            return url.set(drivername="postgresql+psycopg")
        return url

    def claim(self, namespace: str, key: str, new: NewClaim) -> Record:
        return self._claim_cte(
            namespace, key, self._claim_sql, self._claim_params(namespace, key, new)
        )

    def claim_done(
        self, namespace: str, key: str, new: NewClaim, *, result: str, ttl: float
    ) -> Record:
        params = self._claim_params(namespace, key, new)
        params["result"] = result
        params["ttl"] = float(ttl)
        return self._claim_cte(namespace, key, self._claim_done_sql, params)

    def claim_with(
        self, namespace: str, key: str, new: NewClaim, also: str, params: dict[str, Any]
    ) -> Record:
        """:meth:`claim`, and in the same statement, only when the claim inserts the row,
        ``also`` (see :meth:`SQLiteStore.claim_with`): one round trip and one commit where
        a claim and then a write took two."""
        return self._claim_cte(
            namespace, key, _pg_claim_with(also), self._with_params(namespace, key, new, params)
        )

    def _claim_cte(self, namespace: str, key: str, sql: str, params: dict[str, Any]) -> Record:
        for _ in range(3):
            try:
                row = self._run("claim", sql, params, True)
            except self._integrity as err:
                # Never a taken key (the claim's ON CONFLICT DO NOTHING): a constraint
                # of claim_with's second write. A store failure, like any other.
                raise StoreError(f"{self.kind} ledger: claim failed: {err}") from err
            if row is not None:
                return _exact_record(row[1:], mine=bool(row[0]))
        # Fell between a concurrent insert and our snapshot three times in a row:
        # the row exists now, so a plain read finds it.
        found = self.get(namespace, key)
        if found is None:
            raise StoreError(f"claim of {key!r} neither inserted nor found a record")
        return found


class MySQLStore(SQLStore):
    """MySQL and MariaDB (PyMySQL): insert first; a duplicate key costs a second SELECT.
    The server's clock, read in UTC."""

    kind = "mysql"
    read_before_claim = True
    _DRIVER = ("pymysql", "mysql", "PyMySQL")

    def claim_with(
        self, namespace: str, key: str, new: NewClaim, also: str, params: dict[str, Any]
    ) -> Record:
        """:meth:`claim`, and in the same transaction, only when the claim inserts the row,
        ``also`` (see :meth:`SQLiteStore.claim_with`; ``ins`` read back from the ledger,
        as there): one commit where a claim and then a write took two."""
        p = self._with_params(namespace, key, new, params)
        sql = _also_reading_ins(also, "mysql")

        def both(cur: Any) -> bool:
            # An explicit transaction on the autocommit connection: the claim's INSERT
            # and ``also`` commit together or not at all.
            cur.execute("START TRANSACTION")
            try:
                try:
                    cur.execute(self._claim_sql, p)
                except self._integrity:  # the key is taken (insert first, as claim does)
                    cur.execute("ROLLBACK")
                    return False
                try:
                    cur.execute(sql, p)
                except self._integrity as err:  # not a taken key: ``also``'s own failure
                    raise StoreError(f"{self.kind} ledger: claim failed: {err}") from err
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            return True

        if self._on_cursor("claim", both):
            return self._mine(namespace, key, new, time.time())
        return self._held(namespace, key)

    def _with_driver(self, url: sa.URL) -> sa.URL:
        if url.drivername in ("mysql", "mariadb"):
            return url.set(drivername=f"{url.drivername}+pymysql")
        return url

    def _connect_args(self, connect_timeout: float) -> dict[str, Any]:
        args = super()._connect_args(connect_timeout)
        # NOW(6) is read in the session time zone: pin it to UTC, so
        # UNIX_TIMESTAMP(NOW(6)) never meets a daylight-saving gap or overlap.
        args["init_command"] = "SET time_zone = '+00:00'"
        return args


_DIALECTS: dict[str, type[SQLStore]] = {
    "sqlite": SQLiteStore,
    "postgresql": PostgresStore,
    "mysql": MySQLStore,
}


def _parse(url: str | sa.URL) -> sa.URL:
    try:
        return sa.make_url(url)
    except sa.exc.ArgumentError as err:
        raise ConfigError(f"not a database URL: {url!r} ({err})") from None


def _backend(url: sa.URL) -> str:
    backend = url.get_backend_name()
    if backend not in _BACKENDS:
        raise ConfigError(
            f"unsupported database {backend!r} in {url.render_as_string()}: use "
            "sqlite:///file.db, postgresql+psycopg://..., mysql+pymysql://... or memory://"
        )
    return _BACKENDS[backend]
