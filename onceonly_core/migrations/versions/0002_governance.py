"""Governance: agents and policies, budget counters and reservations, tools registry,
approvals, the hash-chained audit log, run timelines and webhooks.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _ident(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(mysql.VARBINARY(length * 4), "mysql", "mariadb")


def _text() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def _serial() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "onceonly_agents",
        sa.Column("tenant", _ident(255), primary_key=True),
        sa.Column("agent_id", _ident(255), primary_key=True),
        sa.Column("policy", _text()),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("disabled_reason", _text()),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_table(
        "onceonly_counters",
        sa.Column("tenant", _ident(255), primary_key=True),
        sa.Column("agent_id", _ident(255), primary_key=True),
        sa.Column("metric", _ident(128), primary_key=True),
        sa.Column("window_start", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("used", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "onceonly_reservations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", _ident(255), nullable=False),
        sa.Column("agent_id", _ident(255), nullable=False),
        sa.Column("namespace", _ident(255), nullable=False),
        sa.Column("idem_key", _ident(255), nullable=False),
        sa.Column("amounts", _text(), nullable=False),
        sa.Column("lease_until", sa.Double, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_index(
        "ix_onceonly_reservations_agent",
        "onceonly_reservations",
        ["tenant", "agent_id", "lease_until"],
    )
    op.create_table(
        "onceonly_tools",
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
    op.create_table(
        "onceonly_approvals",
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
        sa.UniqueConstraint("tenant", "namespace", "idem_key", name="uq_onceonly_approvals_call"),
    )
    op.create_table(
        "onceonly_audit",
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
    )
    op.create_index("ix_onceonly_audit_time", "onceonly_audit", ["tenant", "created_at"])
    op.create_table(
        "onceonly_audit_heads",
        sa.Column("tenant", _ident(255), primary_key=True),
        sa.Column("agent_id", _ident(255), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("base_seq", sa.BigInteger, nullable=False),
        sa.Column("base_hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "onceonly_events",
        sa.Column("id", _serial(), primary_key=True, autoincrement=True),
        sa.Column("tenant", _ident(255), nullable=False),
        sa.Column("run_id", _ident(255), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("agent_id", _ident(255)),
        sa.Column("tool", sa.String(512)),
        sa.Column("status", sa.String(64)),
        sa.Column("data", _text()),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_index("ix_onceonly_events_run", "onceonly_events", ["tenant", "run_id", "id"])
    op.create_table(
        "onceonly_webhooks",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", _ident(255), nullable=False),
        sa.Column("url", _text(), nullable=False),
        sa.Column("secret", _text(), nullable=False),
        sa.Column("events", _text(), nullable=False),
        sa.Column("budget_threshold", sa.Double),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("onceonly_webhooks")
    op.drop_index("ix_onceonly_events_run", table_name="onceonly_events")
    op.drop_table("onceonly_events")
    op.drop_table("onceonly_audit_heads")
    op.drop_index("ix_onceonly_audit_time", table_name="onceonly_audit")
    op.drop_table("onceonly_audit")
    op.drop_table("onceonly_approvals")
    op.drop_table("onceonly_tools")
    op.drop_index("ix_onceonly_reservations_agent", table_name="onceonly_reservations")
    op.drop_table("onceonly_reservations")
    op.drop_table("onceonly_counters")
    op.drop_table("onceonly_agents")
