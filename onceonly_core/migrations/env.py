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
    # Several `onceonly migrate` (or auto_migrate) at once, e.g. replicas starting, run one
    # at a time; the later ones then find the schema current. A session lock: the store's
    # connection is in autocommit mode, where a transaction-scoped lock would be released
    # as soon as the statement taking it ends.
    _lock(connection, take=True)
    try:
        with context.begin_transaction():
            context.run_migrations()
    finally:
        _lock(connection, take=False)


def _lock(connection: sa.Connection, *, take: bool) -> None:
    dialect = connection.dialect.name
    began = not connection.in_transaction()
    if dialect == "postgresql":
        fn = "pg_advisory_lock" if take else "pg_advisory_unlock"
        connection.execute(sa.text(f"SELECT {fn}(7262696, 1)"))
    elif dialect in ("mysql", "mariadb"):
        if not take:
            connection.execute(sa.text("SELECT RELEASE_LOCK('onceonly_migrate')"))
        elif connection.execute(sa.text("SELECT GET_LOCK('onceonly_migrate', 300)")).scalar() != 1:
            raise sa.exc.OperationalError(
                "GET_LOCK(onceonly_migrate)", None, TimeoutError("another process is migrating")
            )
    if began and connection.in_transaction():
        connection.commit()  # end the transaction the lock statement began; the lock stays


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=sa.NullPool)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()
