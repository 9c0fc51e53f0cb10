"""The Alembic migrations and the SQLAlchemy metadata describe the same ledger.

The hot path renders its SQL from the metadata's table, and ``onceonly migrate`` creates the
tables from the migration scripts: if the two drift, a fresh database would not match what
the code expects. Checked on a fresh SQLite file, and on PostgreSQL / MariaDB via ``db_url``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

import onceonly_core
from onceonly_core import SchemaError
from onceonly_core.stores import schema
from onceonly_core.stores.sql import SQLStore

MIGRATIONS = Path(onceonly_core.__file__).parent / "migrations"


def script_directory() -> ScriptDirectory:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg)


def test_head_matches_the_code() -> None:
    scripts = script_directory()
    assert scripts.get_heads() == [schema.HEAD]  # one head, the one the code expects
    assert scripts.get_current_head() == schema.HEAD


def diff(store: SQLStore, metadata: sa.MetaData) -> list[Any]:
    ours = set(metadata.tables)

    def include_name(name: str | None, type_: str, parent: Any) -> bool:
        # The server databases are shared: compare our tables only.
        return type_ != "table" or name in ours

    with store.engine().connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "include_name": include_name,
            },
        )
        return list(compare_metadata(ctx, metadata))


@pytest.fixture
def migrated(db_url: str) -> Iterator[SQLStore]:
    store = SQLStore(db_url, auto_migrate=True)
    store.migrate()
    yield store
    store.close()


def test_the_migration_creates_exactly_the_metadata(migrated: SQLStore) -> None:
    assert diff(migrated, schema.metadata) == []
    with migrated.engine().connect() as conn:
        version = conn.execute(sa.text(f"SELECT version_num FROM {schema.VERSION_TABLE}")).all()
    assert [tuple(row) for row in version] == [(schema.HEAD,)]


def test_the_comparison_would_see_a_drift(migrated: SQLStore) -> None:
    drifted = sa.MetaData()
    for table in schema.metadata.tables.values():
        table.to_metadata(drifted)
    sa.Table(
        schema.ledger.name,
        drifted,
        sa.Column("surprise", sa.Integer),
        extend_existing=True,
    )
    changes = diff(migrated, drifted)
    assert any("surprise" in repr(change) for change in changes)


def test_migrating_twice_is_harmless(migrated: SQLStore) -> None:
    migrated.migrate()
    assert diff(migrated, schema.metadata) == []


def test_a_fresh_sqlite_ledger_migrates_itself(tmp_path: Path) -> None:
    store = SQLStore(f"sqlite:///{tmp_path}/fresh.db")  # auto_migrate defaults to True
    assert store.get("ns", "k") is None  # first use creates the schema
    assert diff(store, schema.metadata) == []
    store.close()


def test_without_auto_migrate_a_missing_schema_is_a_clear_error(tmp_path: Path) -> None:
    store = SQLStore(f"sqlite:///{tmp_path}/bare.db", auto_migrate=False)
    with pytest.raises(SchemaError, match="migrate"):
        store.get("ns", "k")
    store.close()
