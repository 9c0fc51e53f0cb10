"""Alembic environment for OnceOnly's own tables (version table: onceonly_alembic_version)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from onceonly_core.stores.schema import VERSION_TABLE, metadata

config = context.config


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Several `onceonly migrate` at once (e.g. replicas starting) run one at a time.
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(7262696, 1)"))
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=sa.NullPool)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()
