"""Notifications: the outbox, written in the same transaction as the decision it
notifies about and drained by the deliverer (``onceonly_core.governance.outbox``).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _ident(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(mysql.VARBINARY(length * 4), "mysql", "mariadb")


def _text() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "onceonly_outbox",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", _ident(255), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("payload", _text(), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Column("lease_token", sa.String(32)),
        sa.Column("last_error", _text()),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("delivered_at", sa.Double),
    )
    op.create_index("ix_onceonly_outbox_due", "onceonly_outbox", ["state", "next_attempt_at"])
    op.create_index(
        "ix_onceonly_outbox_tenant", "onceonly_outbox", ["tenant", "state", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_onceonly_outbox_tenant", table_name="onceonly_outbox")
    op.drop_index("ix_onceonly_outbox_due", table_name="onceonly_outbox")
    op.drop_table("onceonly_outbox")
