"""The ledger's tables as SQLAlchemy Core metadata (migrations live in ../migrations)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

__all__ = [
    "HEAD",
    "VERSION_TABLE",
    "agents",
    "approvals",
    "audit",
    "audit_heads",
    "counters",
    "events",
    "ledger",
    "metadata",
    "outbox",
    "reservations",
    "tools",
    "webhooks",
]

#: The Alembic revision this code expects; tests check it equals the scripts' head.
HEAD = "0006"
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
    # Retention's batches walk this (0006); only records with a ttl are in it, except
    # on MySQL/MariaDB (no partial indexes).
    sa.Index(
        "ix_onceonly_ledger_expires_at",
        "expires_at",
        postgresql_where=sa.text("expires_at IS NOT NULL"),
        sqlite_where=sa.text("expires_at IS NOT NULL"),
    ),
)


# -- governance (revision 0002) ---------------------------------------------------------
# Every governance table is scoped by ``tenant``: the Guard's root namespace (a server
# tenant). Spend is integer micro-dollars; times are float epoch seconds from the
# ledger's clock (the database server's where it is shared).


def _serial() -> sa.types.TypeEngine[int]:
    # SQLite autoincrements only an INTEGER PRIMARY KEY (the rowid alias).
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


agents = sa.Table(
    "onceonly_agents",
    metadata,
    sa.Column("tenant", _ident(255), primary_key=True),
    sa.Column("agent_id", _ident(255), primary_key=True),  # "*": the global kill switch
    sa.Column("policy", _text()),
    sa.Column("disabled", sa.Boolean, nullable=False),
    sa.Column("disabled_reason", _text()),
    sa.Column("updated_at", sa.Double, nullable=False),
)

counters = sa.Table(
    "onceonly_counters",
    metadata,
    sa.Column("tenant", _ident(255), primary_key=True),
    sa.Column("agent_id", _ident(255), primary_key=True),
    sa.Column("metric", _ident(128), primary_key=True),  # spend | actions | tool:<name>
    sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("used", sa.BigInteger, nullable=False),
)

reservations = sa.Table(
    "onceonly_reservations",
    metadata,
    # Keyed by agent (0005): every statement of the hot path names the hold's tenant and
    # agent, and an agent's expired holds are found among its own (those in flight), so
    # the key is the only index. A hold is inserted and deleted on every governed call:
    # on SQLite (WITHOUT ROWID: the table is that key's b-tree) each write then dirties
    # one page instead of three (table, key, agent index), and each page is a WAL frame
    # the commit writes (~10 us apiece on the bench machine).
    sa.Column("id", sa.String(32), nullable=False),
    sa.Column("tenant", _ident(255), nullable=False),
    sa.Column("agent_id", _ident(255), nullable=False),
    sa.Column("namespace", _ident(255), nullable=False),
    sa.Column("idem_key", _ident(255), nullable=False),
    sa.Column("amounts", _text(), nullable=False),  # JSON [[metric, window_start, amount]]
    sa.Column("lease_until", sa.Double, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    # JSON audit entry the sweeper appends (decision "unknown") if the hold never settles.
    sa.Column("audit", _text()),
    sa.PrimaryKeyConstraint("tenant", "agent_id", "id", name="pk_onceonly_reservations"),
    sqlite_with_rowid=False,
)

tools = sa.Table(
    "onceonly_tools",
    metadata,
    sa.Column("tenant", _ident(255), primary_key=True),
    sa.Column("scope_id", _ident(128), primary_key=True),
    sa.Column("name", _ident(255), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("url", _text()),
    sa.Column("auth", sa.String(32), nullable=False),
    sa.Column("secret", _text()),
    sa.Column("timeout_ms", sa.Integer, nullable=False),
    sa.Column("max_retries", sa.Integer, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("description", _text()),
    sa.Column("updated_at", sa.Double, nullable=False),
)

approvals = sa.Table(
    "onceonly_approvals",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", _ident(255), nullable=False),
    sa.Column("agent_id", _ident(255), nullable=False),
    sa.Column("tool", sa.String(512), nullable=False),
    sa.Column("namespace", _ident(255), nullable=False),
    sa.Column("idem_key", _ident(255), nullable=False),
    sa.Column("args", _text()),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", _text()),
    sa.Column("decided_by", sa.String(255)),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("decided_at", sa.Double),
    # A request authorises one execution; the next one of the same call opens round + 1.
    sa.Column("round", sa.Integer, nullable=False, server_default="0"),
    sa.Column("consumed_at", sa.Double),
    sa.UniqueConstraint(
        "tenant", "namespace", "idem_key", "round", name="uq_onceonly_approvals_call"
    ),
)

audit = sa.Table(
    "onceonly_audit",
    metadata,
    sa.Column("id", _serial(), primary_key=True, autoincrement=True),
    sa.Column("tenant", _ident(255), nullable=False),
    sa.Column("agent_id", _ident(255), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("tool", sa.String(512), nullable=False),
    sa.Column("args_digest", sa.String(64)),
    sa.Column("args", _text()),
    sa.Column("decision", sa.String(32), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("risk_level", sa.String(16), nullable=False),
    sa.Column("spend_micros", sa.BigInteger, nullable=False),
    sa.Column("run_id", sa.String(255)),
    sa.Column("token", sa.BigInteger),
    sa.Column("idem_key", _ident(255)),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.UniqueConstraint("tenant", "agent_id", "seq", name="uq_onceonly_audit_chain"),
    sa.Index("ix_onceonly_audit_time", "tenant", "created_at"),
)

audit_heads = sa.Table(
    "onceonly_audit_heads",
    metadata,
    sa.Column("tenant", _ident(255), primary_key=True),
    sa.Column("agent_id", _ident(255), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    # Retention: rows up to base_seq were purged; base_hash is the hash of row base_seq.
    sa.Column("base_seq", sa.BigInteger, nullable=False),
    sa.Column("base_hash", sa.String(64), nullable=False),
)

events = sa.Table(
    "onceonly_events",
    metadata,
    sa.Column("id", _serial(), primary_key=True, autoincrement=True),
    sa.Column("tenant", _ident(255), nullable=False),
    sa.Column("run_id", _ident(255), nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("agent_id", _ident(255)),
    sa.Column("tool", sa.String(512)),
    sa.Column("status", sa.String(64)),
    sa.Column("data", _text()),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_onceonly_events_run", "tenant", "run_id", "id"),
)

webhooks = sa.Table(
    "onceonly_webhooks",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", _ident(255), nullable=False),
    sa.Column("url", _text(), nullable=False),
    sa.Column("secret", _text(), nullable=False),
    sa.Column("events", _text(), nullable=False),  # JSON list of event types
    sa.Column("budget_threshold", sa.Double),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

outbox = sa.Table(
    "onceonly_outbox",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", _ident(255), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),  # the webhook-id receivers dedupe on
    sa.Column("event_type", sa.String(64), nullable=False),
    sa.Column("payload", _text(), nullable=False),  # redacted canonical JSON
    sa.Column("destination", sa.String(64), nullable=False),  # webhook:<id> | slack | email
    sa.Column("state", sa.String(16), nullable=False),  # pending | delivered | dead
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", sa.Double, nullable=False),
    sa.Column("lease_token", sa.String(32)),
    sa.Column("last_error", _text()),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("delivered_at", sa.Double),
    sa.Index("ix_onceonly_outbox_due", "state", "next_attempt_at"),
    sa.Index("ix_onceonly_outbox_tenant", "tenant", "state", "created_at"),
)
