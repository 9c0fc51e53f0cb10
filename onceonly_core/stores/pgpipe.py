"""A transaction's statements sent to PostgreSQL in one write, read back in one pass.

psycopg's pipeline mode sends each statement as it is executed (one ``send`` and two
``poll`` calls per statement) and runs its cursor machinery per statement; measured on
a two-core machine, BEGIN + three statements + COMMIT cost ~145 µs of client CPU that
way against ~40 µs here, where libpq queues every message and the socket is written
once, at the Sync. What is reused from psycopg: its libpq binding, its Transformer (the
parameters are dumped, and the rows loaded, exactly as a psycopg cursor does), its
wait loop (interruptible, GIL released) and its error classes (so a deadlock, a
serialization failure or a lost connection is recognised by the caller as before).

Each statement is prepared once per connection, on its first use, under a name of
ours (psycopg's own prepared statements are named ``_pg3_*``); the prepared names of a
connection are kept beside it and go with it.

Only the governance store's hot path uses this (``govsql.GovStore._exec``); anything
unusual on the connection (an error mid-pipeline, an interrupted wait) closes it, so
that the pool never hands out a connection in a half-read pipeline.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from psycopg import errors, generators, pq
from psycopg.adapt import PyFormat, Transformer

__all__ = ["Results", "run"]

#: Statements prepared per connection at most; past it, statements go unnamed.
MAX_PREPARED = 64

_OK = pq.ExecStatus.COMMAND_OK
_SYNC = pq.ExecStatus.PIPELINE_SYNC
_ABORTED = pq.ExecStatus.PIPELINE_ABORTED
_FAILED = pq.ExecStatus.FATAL_ERROR
_AUTO = PyFormat.AUTO

_PARAM = re.compile(r"%\((\w+)\)s|%%")


class _Conn:
    """What a connection carries for us: its prepared names and its Transformer."""

    __slots__ = ("names", "serial", "tx")

    def __init__(self, dbc: Any) -> None:
        #: (query, parameter types) -> the name it is prepared under on this connection
        self.names: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
        self.serial = 0
        self.tx: Any = Transformer(dbc)


_CONNS: weakref.WeakKeyDictionary[Any, _Conn] = weakref.WeakKeyDictionary()
#: ``%(name)s`` SQL -> (``$n`` SQL as bytes, the names in ``$n`` order)
_QUERIES: dict[str, tuple[bytes, tuple[str, ...]]] = {}


def _convert(sql: str) -> tuple[bytes, tuple[str, ...]]:
    got = _QUERIES.get(sql)
    if got is not None:
        return got
    names: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None:
            return "%"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    got = (_PARAM.sub(sub, sql).encode(), tuple(names))
    if len(_QUERIES) < 1024:  # the hot path's statements are few; anything else is not kept
        _QUERIES[sql] = got
    return got


class Results:
    """The statements' results, read as one multi-statement cursor: the first
    statement's first, ``nextset()`` moves to the next one."""

    __slots__ = ("_at", "_counts", "_rows", "_taken")

    def __init__(self, counts: list[int], rows: list[list[Any]]) -> None:
        self._counts = counts
        self._rows = rows
        self._at = 0
        self._taken = 0

    @property
    def rowcount(self) -> int:
        return self._counts[self._at]

    def nextset(self) -> bool | None:
        self._at += 1
        self._taken = 0
        return True if self._at < len(self._rows) else None

    def fetchone(self) -> Any:
        rows = self._rows[self._at]
        if self._taken >= len(rows):
            return None
        self._taken += 1
        return rows[self._taken - 1]

    def rows_at(self, index: int) -> list[Any]:
        """The rows of the statement at ``index``, wherever the cursor is."""
        return self._rows[index]

    def fetchall(self) -> list[Any]:
        rows = self._rows[self._at][self._taken :]
        self._taken = len(self._rows[self._at])
        return rows


def run(
    dbc: Any,
    statements: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    begin: str | None = None,
    commit: bool = False,
) -> Results:
    """Send ``begin`` (a BEGIN statement, if given), the statements (``%(name)s``
    placeholders) and COMMIT (if ``commit``) with one Sync, in one write; wait for
    every result. A failing statement raises its psycopg error after the Sync's result
    is read (the ones after it were not run; an explicit transaction is left failed,
    for the caller to roll back; without one, the statements up to the Sync were one
    implicit transaction, rolled back)."""

    pgconn = dbc.pgconn
    state = _CONNS.get(dbc)
    if state is None:
        state = _CONNS[dbc] = _Conn(dbc)
    tx = state.tx
    #: per message sent: None for one whose result is not wanted (BEGIN, COMMIT, a
    #: Parse), else the statement's index; and the Parse's key, to remember on success
    expect: list[tuple[int | None, tuple[bytes, tuple[int, ...]] | None]] = []
    parsing: dict[tuple[bytes, tuple[int, ...]], bytes] = {}  # Parse sent, result not read
    with dbc.lock:
        pgconn.enter_pipeline_mode()
        done = False
        try:
            if begin is not None:
                pgconn.send_query_params(begin.encode(), None)
                expect.append((None, None))
            for i, (sql, params) in enumerate(statements):
                query, names = _convert(sql)
                if not names:
                    pgconn.send_query_params(query, None)
                    expect.append((i, None))
                    continue
                auto = [_AUTO] * len(names)
                values = tx.dump_sequence([params[n] for n in names], auto)
                key = (query, tuple(tx.types))
                name = state.names.get(key) or parsing.get(key)
                if name is None and state.serial < MAX_PREPARED:
                    name = parsing[key] = b"_oo_%d" % state.serial
                    state.serial += 1
                    pgconn.send_prepare(name, query, param_types=tx.types)
                    expect.append((None, key))
                if name is None:  # past the cap: an unnamed statement
                    pgconn.send_query_params(
                        query, values, param_types=tx.types, param_formats=tx.formats
                    )
                else:
                    pgconn.send_query_prepared(name, values, param_formats=tx.formats)
                expect.append((i, None))
            if commit:
                pgconn.send_query_params(b"COMMIT", None)
                expect.append((None, None))
            pgconn.pipeline_sync()
            dbc.wait(generators.send(pgconn))
            counts = [0] * len(statements)
            rows: list[list[Any]] = [[] for _ in statements]
            failed: Any = None
            for index, parsed in expect:
                got = dbc.wait(generators.fetch_many(pgconn))
                res = got[0] if got else None
                if res is None or res.status == _ABORTED:
                    continue
                if res.status == _FAILED:
                    failed = failed or res
                    continue
                if parsed is not None and res.status == _OK:
                    # the Parse succeeded: the name is prepared on this connection
                    state.names[parsed] = parsing[parsed]
                if index is None:
                    continue
                counts[index] = res.command_tuples or 0
                if res.ntuples:
                    tx.set_pgresult(res)
                    rows[index] = tx.load_rows(0, res.ntuples, tuple)
            last = dbc.wait(generators.fetch_many(pgconn))
            if not last or last[0].status != _SYNC:  # pragma: no cover - libpq's contract
                raise errors.InternalError("pipeline: no Sync result where one was due")
            pgconn.exit_pipeline_mode()
            done = True
        finally:
            if not done:
                # Interrupted or broken mid-pipeline: results may be unread, so the
                # connection cannot be used again; closed, the pool discards it.
                dbc.close()
    if failed is not None:
        raise errors.error_from_result(failed, encoding=dbc.info.encoding)
    return Results(counts, rows)
