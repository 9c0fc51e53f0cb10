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
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

import onceonly_core
from _services import fresh_database
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


# -- revision 0005: budget holds keyed by (tenant, agent, id) ------------------------------
# Alembic's comparison does not look at primary keys or SQLite's WITHOUT ROWID: checked here.
HOLDS = schema.reservations.name


def holds_shape(url: str) -> tuple[list[str], list[str], bool | None]:
    """The holds table's key columns, its index names and (SQLite) whether it has a rowid."""
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        inspector = sa.inspect(engine)
        key = inspector.get_pk_constraint(HOLDS)["constrained_columns"]
        indexes = sorted(str(i["name"]) for i in inspector.get_indexes(HOLDS))
        rowid = None
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                sql = conn.execute(
                    sa.text("SELECT sql FROM sqlite_master WHERE name = :n"), {"n": HOLDS}
                ).scalar_one()
            rowid = "WITHOUT ROWID" not in sql.upper()
        return list(key), indexes, rowid
    finally:
        engine.dispose()


def test_holds_are_keyed_by_tenant_agent_and_id(migrated: SQLStore) -> None:
    key, indexes, rowid = holds_shape(migrated.url.render_as_string(hide_password=False))
    assert key == ["tenant", "agent_id", "id"]
    assert indexes == []  # the key is the only index
    assert rowid in (None, False)  # SQLite: the table is the key's b-tree


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a new SQLite file, or a new database on the test server (the
    server params are marked ``services`` by conftest, as ``db_url``'s are)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/holds.db"
        return
    server = request.getfixturevalue("pg_url" if request.param == "postgresql" else "mysql_url")
    with fresh_database(str(server)) as url:
        yield url


def test_revision_0005_keeps_the_holds_in_flight_both_ways(empty_url: str) -> None:
    store = SQLStore(empty_url, auto_migrate=False)
    try:
        store.migrate("0004")
        assert holds_shape(empty_url) == (
            ["id"],
            ["ix_onceonly_reservations_agent"],
            None if "sqlite" not in empty_url else True,
        )
        cols = ("id", "tenant", "agent_id", "namespace", "idem_key", "amounts", "lease_until")
        rows = [
            (f"h{i}", "t", f"agent-{i % 2}", "ns", f"k{i}", '[["spend", 0, 5]]', 100.0 + i)
            for i in range(3)
        ]
        insert = sa.text(
            f"INSERT INTO {HOLDS} ({', '.join(cols)}, created_at, audit)"
            f" VALUES ({', '.join(':' + c for c in cols)}, 1.0, '{{}}')"
        )
        with store.engine().begin() as conn:
            conn.execute(insert, [dict(zip(cols, r, strict=True)) for r in rows])

        def held() -> list[tuple[Any, ...]]:
            q = f"SELECT {', '.join(cols)} FROM {HOLDS} ORDER BY id"
            with store.engine().connect() as conn:
                found = conn.execute(sa.text(q))
                return [tuple(v.decode() if isinstance(v, bytes) else v for v in r) for r in found]

        store.migrate()  # up to 0005: every hold in flight is still there
        assert holds_shape(empty_url)[:2] == (["tenant", "agent_id", "id"], [])
        assert held() == rows
        assert diff(store, schema.metadata) == []

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with store.engine().begin() as conn:  # and back down: the holds survive that too
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0004")
        assert holds_shape(empty_url)[:2] == (["id"], ["ix_onceonly_reservations_agent"])
        assert held() == rows
    finally:
        store.close()


def test_revision_0005_finishes_a_run_interrupted_half_way(empty_url: str) -> None:
    # MariaDB's DDL is not transactional: a run stopped after its first statement (the
    # key changed, the agent index still there) is finished by running it again.
    if empty_url.startswith("sqlite"):
        pytest.skip("SQLite's migration is one transaction")
    store = SQLStore(empty_url, auto_migrate=False)
    try:
        store.migrate("0004")
        with store.engine().begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(
                    sa.text(
                        f"ALTER TABLE {HOLDS} DROP CONSTRAINT onceonly_reservations_pkey,"
                        " ADD CONSTRAINT pk_onceonly_reservations"
                        " PRIMARY KEY (tenant, agent_id, id)"
                    )
                )
            else:
                conn.execute(
                    sa.text(
                        f"ALTER TABLE {HOLDS} DROP PRIMARY KEY,"
                        " ADD PRIMARY KEY (tenant, agent_id, id)"
                    )
                )
        assert holds_shape(empty_url)[:2] == (
            ["tenant", "agent_id", "id"],
            ["ix_onceonly_reservations_agent"],
        )
        store.migrate()
        assert holds_shape(empty_url)[:2] == (["tenant", "agent_id", "id"], [])
        assert diff(store, schema.metadata) == []
    finally:
        store.close()


# -- revision 0006: the ledger's expiry index ----------------------------------------------
EXPIRY = "ix_onceonly_ledger_expires_at"


def ledger_indexes(url: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        return {str(i["name"]) for i in sa.inspect(engine).get_indexes(schema.ledger.name)}
    finally:
        engine.dispose()


def test_revision_0006_both_ways_and_again_over_its_own_index(empty_url: str) -> None:
    # Up, down, and up again over the index a run stopped half-way left behind (MariaDB's
    # DDL is not transactional: the index made, the revision not recorded).
    store = SQLStore(empty_url, auto_migrate=False)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        store.migrate("0005")
        assert EXPIRY not in ledger_indexes(empty_url)
        store.migrate()
        assert EXPIRY in ledger_indexes(empty_url)
        with store.engine().begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0005")
        assert EXPIRY not in ledger_indexes(empty_url)
        with store.engine().begin() as conn:
            conn.execute(sa.text(f"CREATE INDEX {EXPIRY} ON onceonly_ledger (expires_at)"))
        store.migrate()
        assert diff(store, schema.metadata) == []
    finally:
        store.close()
