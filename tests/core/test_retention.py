"""Retention on every SQL ledger: expired records go in bounded batches, old audit rows
are archived to JSON lines before they are purged, and the chains keep verifying."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from onceonly_core import Guard, retention
from onceonly_core.governance import Policy
from onceonly_core.stores import schema
from onceonly_core.stores.sql import SQLStore


@pytest.fixture
def guard(db_url: str, namespace: str) -> Iterator[Guard]:
    g = Guard(db_url, namespace=namespace, quiet=True)
    yield g
    g.close()


def lookup(q: str) -> str:
    return q.upper()


def test_expired_records_are_deleted_in_batches(guard: Guard, namespace: str) -> None:
    store = guard.store
    for i in range(7):
        assert guard.using(key=f"short-{i}", ttl=0.05)(lookup, f"x{i}") == f"X{i}"
    guard.using(key="forever")(lookup, "y")
    guard.using(key="long", ttl=3600)(lookup, "z")
    time.sleep(0.3)  # the server databases' clocks: a margin past the ttl
    assert retention.purge_expired(store, namespace=namespace, batch=3) == 7
    left = {r.key for r in store.list(namespace=namespace, limit=100)}
    assert left == {"forever", "long"}
    # A deleted key runs again, as its elapsed ttl already allowed.
    runs: list[str] = []

    def counted(q: str) -> str:
        runs.append(q)
        return q

    guard.using(key="short-0", ttl=60)(counted, "again")
    assert runs == ["again"]


def test_audit_rows_are_archived_then_purged_and_the_chain_verifies(
    guard: Guard, namespace: str, tmp_path: Path
) -> None:
    guard.gov.upsert_policy(Policy(agent_id="a1"))
    guard.gov.upsert_policy(Policy(agent_id="a2"))
    for i in range(7):
        assert guard.call_tool(lookup, {"q": f"old{i}"}, agent_id="a1" if i % 2 else "a2").ok
    time.sleep(0.05)
    cut = guard.gov.store.now()
    time.sleep(0.05)
    assert guard.call_tool(lookup, {"q": "new"}, agent_id="a1").ok
    archive = tmp_path / "audit.jsonl"

    gov = guard.store.governance_store()
    try:
        done = retention.archive_audit(gov, cut, archive, tenants=[namespace], batch=3)
    finally:
        gov.close()

    rows = [json.loads(line) for line in archive.read_text().splitlines()]
    assert done.archived == done.purged == len(rows) == 7
    assert done.batches >= 3  # 7 rows, about 3 per transaction
    assert {r["tenant"] for r in rows} == {namespace}
    assert sorted((r["agent_id"], r["seq"]) for r in rows) == sorted(
        [("a1", s) for s in (1, 2, 3)] + [("a2", s) for s in (1, 2, 3, 4)]
    )
    assert all("hash" in r and "prev_hash" in r for r in rows)
    assert guard.gov.verify_audit() == []
    assert [e.seq for e in guard.gov.agent_logs("a1")] == [4]
    assert guard.call_tool(lookup, {"q": "after"}, agent_id="a2").ok
    assert guard.gov.verify_audit() == []


def test_the_command_applies_retention(db_url: str, namespace: str, tmp_path: Path) -> None:
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from onceonly_core.cli import build_app

    with Guard(db_url, namespace=namespace, quiet=True) as g:
        g.gov.upsert_policy(Policy(agent_id="a"))
        for i in range(3):
            assert g.call_tool(lookup, {"q": f"q{i}"}, agent_id="a", ttl=0.05).ok
    if db_url.startswith("sqlite"):
        SQLStore(db_url).close()
    time.sleep(0.3)
    archive = tmp_path / "a.jsonl"
    args = ["retention", "--url", db_url, "-n", namespace, "--audit-before", "0s"]
    out = CliRunner().invoke(build_app(), [*args, "--archive", str(archive), "--yes", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert (report["records_deleted"], report["audit_purged"], report["audit_archived"]) == (
        3,
        3,
        3,
    )
    assert len(archive.read_text().splitlines()) == 3
    refused = CliRunner().invoke(build_app(), [*args, "--yes"])
    assert refused.exit_code == 1 and "--archive" in refused.output


# -- at scale: each batch costs its own rows (issue 15; benchmarks/bench_retention.py) ----
def test_a_batch_of_expired_records_is_found_along_the_expiry_index(db_url: str) -> None:
    # Without an index (before revision 0006) each batch scanned the table, or on
    # PostgreSQL the namespace's rows, dead ones of earlier batches included: N records
    # took time in N². The plan of a batch over every namespace (the command's default)
    # reads the expiry index; MySQL/MariaDB's DELETE ... LIMIT has it to use.
    with SQLStore(db_url, auto_migrate=True) as store:
        store.ensure_schema()
        engine = store.engine()
        with engine.connect() as conn:
            names = {i["name"] for i in sa.inspect(conn).get_indexes(schema.ledger.name)}
            assert "ix_onceonly_ledger_expires_at" in names
            if store.kind == "mysql":
                return
            stmt = store._expired_batch(None, 1e12, 1000)
            sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
            explain = "EXPLAIN QUERY PLAN " if store.kind == "sqlite" else "EXPLAIN "
            plan = " ".join(str(r) for r in conn.execute(sa.text(explain + sql)))
            conn.rollback()
    assert "ix_onceonly_ledger_expires_at" in plan, plan


def test_an_earlier_cut_never_moves_a_chain_s_base_back(guard: Guard, namespace: str) -> None:
    # Two purges at once (two operators, or the command and the server's own): the one
    # with the earlier cut read its rows, then waited for the chain head's lock while
    # the one with the later cut deleted further and moved the base. It must leave the
    # base where it is, or the chain would start at a row long gone and verify broken.
    # (SQLite: one writer, which takes the lock before it reads; no such interleaving.)
    if guard.store.kind == "sqlite":
        pytest.skip("SQLite's purge holds the database's write lock from its first read")
    guard.gov.upsert_policy(Policy(agent_id="a1"))
    for i in range(3):
        assert guard.call_tool(lookup, {"q": f"early{i}"}, agent_id="a1").ok
    time.sleep(0.05)
    early = guard.gov.store.now()
    time.sleep(0.05)
    for i in range(3):
        assert guard.call_tool(lookup, {"q": f"late{i}"}, agent_id="a1").ok
    assert guard.call_tool(lookup, {"q": "kept"}, agent_id="a1").ok
    store = guard.gov.store
    au, h = schema.audit, schema.audit_heads
    head = sa.and_(h.c.tenant == namespace, h.c.agent_id == "a1")
    got: list[int] = []
    with store.engine.connect() as other:
        other.execute(sa.select(h.c.seq).where(head).with_for_update())  # the later purge
        purge = threading.Thread(target=lambda: got.append(store.purge_audit(namespace, early)))
        purge.start()
        time.sleep(0.5)  # it has read its rows and waits for the head
        assert purge.is_alive()
        mine = sa.and_(au.c.tenant == namespace, au.c.agent_id == "a1")
        top = other.execute(sa.select(au.c.hash).where(mine, au.c.seq == 6)).scalar_one()
        other.execute(sa.delete(au).where(mine, au.c.seq <= 6))
        other.execute(sa.update(h).where(head).values(base_seq=6, base_hash=top))
        other.commit()
    purge.join(30)
    assert got == [0]
    assert guard.gov.verify_audit() == []
    assert [e.seq for e in guard.gov.agent_logs("a1")] == [7]
