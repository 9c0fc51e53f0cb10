"""Governance: an approval request is used once (a new round per execution), and a
budget hold carries the audit entry its sweeper writes if the call never settles.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _text() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    # SQLite cannot drop a constraint in place: batch mode copies the table.
    with op.batch_alter_table("onceonly_approvals") as batch:
        batch.add_column(sa.Column("round", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("consumed_at", sa.Double))
        batch.drop_constraint("uq_onceonly_approvals_call", type_="unique")
        batch.create_unique_constraint(
            "uq_onceonly_approvals_call", ["tenant", "namespace", "idem_key", "round"]
        )
    with op.batch_alter_table("onceonly_reservations") as batch:
        batch.add_column(sa.Column("audit", _text()))


def downgrade() -> None:
    with op.batch_alter_table("onceonly_reservations") as batch:
        batch.drop_column("audit")
    # Only the latest round of each call survives the way back.
    op.execute("DELETE FROM onceonly_approvals WHERE round <> 0")
    with op.batch_alter_table("onceonly_approvals") as batch:
        batch.drop_constraint("uq_onceonly_approvals_call", type_="unique")
        batch.create_unique_constraint(
            "uq_onceonly_approvals_call", ["tenant", "namespace", "idem_key"]
        )
        batch.drop_column("consumed_at")
        batch.drop_column("round")
