"""The servers the SQL ledgers are tested against answer, with the privileges tests need."""

from __future__ import annotations

import sqlalchemy as sa


def _round_trip(url: str, namespace: str) -> None:
    engine = sa.create_engine(url)
    table = f"probe_{namespace.replace('-', '_')}"
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE TABLE {table} (k VARCHAR(40) PRIMARY KEY)"))
            conn.execute(sa.text(f"INSERT INTO {table} (k) VALUES (:k)"), {"k": namespace})
            assert conn.execute(sa.text(f"SELECT k FROM {table}")).scalar_one() == namespace
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


def test_postgresql_round_trip(pg_url: str, namespace: str) -> None:
    _round_trip(pg_url, namespace)


def test_mysql_round_trip(mysql_url: str, namespace: str) -> None:
    _round_trip(mysql_url, namespace)
