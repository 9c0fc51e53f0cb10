"""Governance: budget holds keyed by (tenant, agent, id), their only index.

A governed call inserts one hold and deletes it; every statement of that path names the
hold's tenant and agent, and an agent's expired holds are found among its own (the ones
in flight). Keyed that way, the agent index (tenant, agent_id, lease_until) goes, and on
SQLite the table is WITHOUT ROWID: each write of a hold dirties one b-tree page instead of
three (table, primary key, agent index), each of which the commit writes as a WAL frame.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_T = "onceonly_reservations"
_COLS = "id, tenant, agent_id, namespace, idem_key, amounts, lease_until, created_at, audit"


def _ident(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(mysql.VARBINARY(length * 4), "mysql", "mariadb")


def _text() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def _columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant", _ident(255), nullable=False),
        sa.Column("agent_id", _ident(255), nullable=False),
        sa.Column("namespace", _ident(255), nullable=False),
        sa.Column("idem_key", _ident(255), nullable=False),
        sa.Column("amounts", _text(), nullable=False),
        sa.Column("lease_until", sa.Double, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("audit", _text()),
    ]


def _sqlite_rebuild(key: sa.PrimaryKeyConstraint, rowid: bool) -> None:
    # SQLite cannot change a table's key or its rowid in place: a new table, the rows
    # copied over, the old one dropped (its index with it), the new one renamed.
    op.create_table(f"{_T}_new", *_columns(), key, sqlite_with_rowid=rowid)
    op.execute(f"INSERT INTO {_T}_new ({_COLS}) SELECT {_COLS} FROM {_T}")
    op.drop_table(_T)
    op.rename_table(f"{_T}_new", _T)


def _shape() -> tuple[list[str], set[str]]:
    """The holds table's key columns and index names, as the database has them now."""
    inspector = sa.inspect(op.get_bind())
    key = list(inspector.get_pk_constraint(_T)["constrained_columns"])
    return key, {str(i["name"]) for i in inspector.get_indexes(_T)}


def upgrade() -> None:
    name = op.get_bind().dialect.name
    if name == "sqlite":
        op.drop_index("ix_onceonly_reservations_agent", table_name=_T)
        _sqlite_rebuild(
            sa.PrimaryKeyConstraint("tenant", "agent_id", "id", name="pk_onceonly_reservations"),
            rowid=False,
        )
        return
    # Each step checks first: MariaDB's DDL is not transactional, so a run interrupted
    # half-way is finished by running it again.
    key, indexes = _shape()
    if key == ["id"]:
        if name == "postgresql":
            op.execute(
                f"ALTER TABLE {_T} DROP CONSTRAINT onceonly_reservations_pkey,"
                " ADD CONSTRAINT pk_onceonly_reservations PRIMARY KEY (tenant, agent_id, id)"
            )
        else:  # MySQL / MariaDB: one rebuild of the clustered index
            op.execute(f"ALTER TABLE {_T} DROP PRIMARY KEY, ADD PRIMARY KEY (tenant, agent_id, id)")
    if "ix_onceonly_reservations_agent" in indexes:
        op.drop_index("ix_onceonly_reservations_agent", table_name=_T)


def downgrade() -> None:
    name = op.get_bind().dialect.name
    if name == "sqlite":
        _sqlite_rebuild(sa.PrimaryKeyConstraint("id"), rowid=True)
        op.create_index("ix_onceonly_reservations_agent", _T, ["tenant", "agent_id", "lease_until"])
        return
    key, indexes = _shape()
    if "ix_onceonly_reservations_agent" not in indexes:
        op.create_index("ix_onceonly_reservations_agent", _T, ["tenant", "agent_id", "lease_until"])
    if key != ["id"]:
        if name == "postgresql":
            op.execute(
                f"ALTER TABLE {_T} DROP CONSTRAINT pk_onceonly_reservations,"
                " ADD CONSTRAINT onceonly_reservations_pkey PRIMARY KEY (id)"
            )
        else:
            op.execute(f"ALTER TABLE {_T} DROP PRIMARY KEY, ADD PRIMARY KEY (id)")
