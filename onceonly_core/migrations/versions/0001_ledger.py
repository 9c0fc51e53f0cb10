"""The claim ledger.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _ident(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(mysql.VARBINARY(length * 4), "mysql", "mariadb")


def _text() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "onceonly_ledger",
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
    )
    op.create_index("ix_onceonly_ledger_updated_at", "onceonly_ledger", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_onceonly_ledger_updated_at", table_name="onceonly_ledger")
    op.drop_table("onceonly_ledger")
