"""The ledger's tables as SQLAlchemy Core metadata (migrations live in ../migrations)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

__all__ = ["HEAD", "VERSION_TABLE", "ledger", "metadata"]

#: The Alembic revision this code expects; tests check it equals the scripts' head.
HEAD = "0001"
#: Our own version table, so a user's Alembic setup in the same database is untouched.
VERSION_TABLE = "onceonly_alembic_version"

metadata = sa.MetaData()


class _Ident(sa.types.TypeDecorator[str]):
    """A string compared byte for byte on every backend.

    MySQL/MariaDB collations are case-insensitive and PAD SPACE ('a' = 'A' = 'a '):
    keys must compare exactly, so they are VARBINARY (UTF-8) there.
    """

    impl = sa.String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.VARBINARY(self.length * 4))
        return dialect.type_descriptor(sa.String(self.length))

    def process_bind_param(self, value: str | None, dialect: sa.Dialect) -> object:
        if value is not None and dialect.name in ("mysql", "mariadb"):
            return value.encode("utf-8")
        return value

    def process_result_value(self, value: object, dialect: sa.Dialect) -> str | None:
        if isinstance(value, (bytes, bytearray)):
            return value.decode("utf-8")
        return value  # type: ignore[return-value]


def _ident(length: int) -> _Ident:
    return _Ident(length)


def _text() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


ledger = sa.Table(
    "onceonly_ledger",
    metadata,
    sa.Column("namespace", _ident(255), primary_key=True),
    sa.Column("idem_key", _ident(255), primary_key=True),
    sa.Column("tool", sa.String(512), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("owner", sa.String(255)),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("executions", sa.Integer, nullable=False),
    sa.Column("lease_until", sa.Double),
    sa.Column("expires_at", sa.Double),
    sa.Column("args_digest", sa.String(64)),
    sa.Column("result", _text()),
    sa.Column("error", _text()),
    sa.Column("run_id", sa.String(255)),
    sa.Column("caller", sa.String(255)),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Index("ix_onceonly_ledger_updated_at", "updated_at"),
)
