"""The governed hot path's PostgreSQL pipeline (``stores/pgpipe.py``), against a real server.

What must hold: a pipeline's results are what psycopg's own cursors return for the same
statements (values, types, row counts); each statement is parsed once per connection; a
failing statement raises psycopg's own error class after the ones before it ran in the same
(implicit or explicit) transaction, leaves nothing of the implicit one behind, and leaves
the connection usable; a connection broken mid-pipeline is closed, never reused; and the
whole transaction goes to the server in one write.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from _services import POSTGRES, service_url

psycopg = pytest.importorskip("psycopg")

from onceonly_core.stores import pgpipe  # noqa: E402

BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED"


@pytest.fixture
def dbc() -> Iterator[Any]:
    url = service_url(POSTGRES)
    import sqlalchemy as sa

    dsn = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = psycopg.connect(dsn, autocommit=True)
    if not psycopg.Pipeline.is_supported():
        conn.close()
        pytest.skip("libpq without pipeline mode")
    yield conn
    conn.close()


@pytest.fixture
def table(dbc: Any) -> str:
    name = f"pipe_{uuid.uuid4().hex[:10]}"
    dbc.execute(
        f"CREATE TEMP TABLE {name} (k TEXT PRIMARY KEY, n BIGINT, f FLOAT8, b BOOLEAN, j TEXT)"
    )
    return name


def prepared(dbc: Any) -> list[str]:
    rows = dbc.execute("SELECT name FROM pg_prepared_statements ORDER BY name").fetchall()
    return [r[0] for r in rows if r[0].startswith("_oo_")]


VALUES = [
    {"k": "a", "n": 1, "f": 1.5, "b": True, "j": '{"x": "é ☃"}'},
    {"k": "b", "n": 2**40, "f": 1733548800.123456, "b": False, "j": None},
    {"k": "c", "n": -7, "f": 0.0, "b": None, "j": "100%"},
]
INSERT = "INSERT INTO {t} (k, n, f, b, j) VALUES (%(k)s, %(n)s, %(f)s, %(b)s, %(j)s)"
SELECT = "SELECT k, n, f, b, j FROM {t} WHERE k = %(k)s OR n = %(n)s ORDER BY k"


def test_results_are_what_psycopg_s_cursors_return(dbc: Any, table: str) -> None:
    statements = [(INSERT.format(t=table), v) for v in VALUES]
    statements.append((f"UPDATE {table} SET n = n + 1 WHERE n < %(cap)s", {"cap": 100}))
    statements += [(SELECT.format(t=table), {"k": v["k"], "n": 0}) for v in VALUES]
    statements.append((f"SELECT count(*) FROM {table} WHERE j LIKE '100%%'", {}))
    out = pgpipe.run(dbc, statements, begin=BEGIN, commit=True)
    assert dbc.info.transaction_status == 0  # committed
    assert out.rowcount == 1
    for _ in range(2):
        out.nextset()
        assert out.rowcount == 1
    out.nextset()
    assert out.rowcount == 2  # the UPDATE: a and c
    got = []
    for _ in VALUES:
        out.nextset()
        got.append(out.fetchall())
    out.nextset()
    assert out.fetchone() == (1,)
    assert out.fetchone() is None
    assert out.nextset() is None
    want = [dbc.execute(SELECT.format(t=table), {"k": v["k"], "n": 0}).fetchall() for v in VALUES]
    assert got == want
    assert got[0] == [("a", 2, 1.5, True, '{"x": "é ☃"}')]
    assert got[1] == [("b", 2**40, 1733548800.123456, False, None)]


def test_each_statement_is_parsed_once_per_connection(dbc: Any, table: str) -> None:
    insert = INSERT.format(t=table)
    for i in range(5):
        v = {**VALUES[0], "k": f"k{i}"}
        pgpipe.run(dbc, [(insert, v), (SELECT.format(t=table), {"k": v["k"], "n": -1})])
    names = prepared(dbc)
    assert len(names) == 2, names
    # other parameter types (None where an int was): prepared apart, still right
    out = pgpipe.run(dbc, [(insert, {**VALUES[0], "k": "none", "n": None})])
    assert out.rowcount == 1
    assert len(prepared(dbc)) == 3
    assert dbc.execute(f"SELECT n FROM {table} WHERE k = 'none'").fetchone() == (None,)


def test_a_failing_statement_raises_its_own_class_and_rolls_back_the_implicit_transaction(
    dbc: Any, table: str
) -> None:
    insert = INSERT.format(t=table)
    pgpipe.run(dbc, [(insert, VALUES[0])])
    after = f"INSERT INTO {table} (k) VALUES ('after')"
    with pytest.raises(psycopg.errors.UniqueViolation):
        pgpipe.run(dbc, [(insert, VALUES[1]), (insert, VALUES[0]), (after, {})])
    # the statement before the failure was rolled back with it; the one after never ran
    keys = [r[0] for r in dbc.execute(f"SELECT k FROM {table} ORDER BY k").fetchall()]
    assert keys == ["a"]
    assert not dbc.closed and dbc.info.transaction_status == 0
    assert pgpipe.run(dbc, [(insert, VALUES[2])]).rowcount == 1  # usable after


def test_a_failure_in_an_explicit_transaction_leaves_it_failed_for_the_caller(
    dbc: Any, table: str
) -> None:
    insert = INSERT.format(t=table)
    with pytest.raises(psycopg.errors.UniqueViolation):
        pgpipe.run(dbc, [(insert, VALUES[0]), (insert, VALUES[0])], begin=BEGIN, commit=True)
    assert dbc.info.transaction_status == 3  # INERROR: the caller rolls back
    dbc.rollback()
    assert dbc.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


def test_a_statement_that_does_not_parse_is_not_remembered(dbc: Any, table: str) -> None:
    with pytest.raises(psycopg.errors.SyntaxError):
        pgpipe.run(dbc, [(f"SELEC k FROM {table} WHERE k = %(k)s", {"k": "a"})])
    assert prepared(dbc) == []
    out = pgpipe.run(dbc, [(f"SELECT %(k)s::text FROM {table}", {"k": "a"})])
    assert out.fetchall() == []
    assert len(prepared(dbc)) == 1


def test_past_the_prepared_cap_statements_go_unnamed(
    dbc: Any, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pgpipe, "MAX_PREPARED", 1)
    pgpipe.run(dbc, [(f"SELECT %(x)s::int + 1 FROM {table}", {"x": 1})])
    out = pgpipe.run(
        dbc, [(INSERT.format(t=table), VALUES[0]), (SELECT.format(t=table), VALUES[0])]
    )
    out.nextset()
    assert out.fetchall() == [("a", 1, 1.5, True, '{"x": "é ☃"}')]
    assert len(prepared(dbc)) == 1


def test_a_connection_broken_mid_pipeline_is_closed(dbc: Any, table: str) -> None:
    pid = dbc.info.backend_pid
    other = psycopg.connect(dbc.info.dsn, autocommit=True)
    try:
        sleep = "SELECT pg_sleep(0.5), %(k)s::text"
        killer = __import__("threading").Timer(
            0.15, lambda: other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        )
        killer.start()
        with pytest.raises(psycopg.OperationalError):
            pgpipe.run(dbc, [(sleep, {"k": "a"}), (INSERT.format(t=table), VALUES[0])])
        killer.join()
    finally:
        other.close()
    assert dbc.closed


def test_the_transaction_goes_to_the_server_in_one_write(
    dbc: Any, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq writes to the socket only when flushed: every flush pgpipe asks for is one
    call of psycopg's send generator; psycopg's own pipeline sends per statement."""
    sends: list[int] = []
    real = pgpipe.generators.send

    def counted(pgconn: Any) -> Any:
        sends.append(1)
        return real(pgconn)

    monkeypatch.setattr(pgpipe.generators, "send", counted)
    statements = [(INSERT.format(t=table), v) for v in VALUES]
    statements.append((SELECT.format(t=table), {"k": "a", "n": 0}))
    out = pgpipe.run(dbc, statements, begin=BEGIN, commit=True)
    assert sends == [1]
    for _ in VALUES:
        out.nextset()
    assert out.fetchall() == [("a", 1, 1.5, True, '{"x": "é ☃"}')]


def test_a_pipeline_interrupted_before_its_results_are_read_closes_the_connection(
    dbc: Any, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while waiting: the results are still on the wire, so the connection is not
    handed back half-read (the pool discards a closed one)."""

    def interrupted(pgconn: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(pgpipe.generators, "fetch_many", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pgpipe.run(dbc, [(INSERT.format(t=table), VALUES[0])])
    assert dbc.closed
