"""Retention at scale: `onceonly_core.retention` on a ledger of N expired records and N
audit rows, next to the raw floor (one unbounded ``DELETE`` per table, one transaction).

    python benchmarks/bench_retention.py [--rows 1000000] [--pg URL] [--pg-rows 1000000]

Rows per second (higher is better). The fill is untimed: N succeeded records with an
elapsed ttl (token 1, so all of them may go) and N audit rows in 10 hash chains, built
with the project's own ``chain_hash`` so ``verify_audit`` must pass after the purge. The
ledger is a new one (a new SQLite file; a scratch database on the PostgreSQL server,
dropped afterwards), and the records are purged as ``onceonly retention`` does by
default, in every namespace. On PostgreSQL the fill is followed by ``VACUUM ANALYZE``:
records expire long after they were written, by when autovacuum has set their hint bits
and the planner's statistics (the first reader of a bulk load pays for the hint bits,
which would be the fill's cost, not retention's). The timed runs use batches of 1,000
rows per transaction; the audit run also writes every row to a JSON-lines archive and
fsyncs it per batch. Checks, not assertions about time: every record and audit row is
gone, the archive holds N lines, the chains verify.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sqlalchemy as sa  # noqa: E402
from bench_common import SHORT, floor_row  # noqa: E402

from onceonly_core import retention  # noqa: E402
from onceonly_core.governance.base import GENESIS, audit_fields, chain_hash  # noqa: E402
from onceonly_core.stores import schema as S  # noqa: E402
from onceonly_core.stores.sql import SQLStore  # noqa: E402
from onceonly_core.testing.databases import scratch_database  # noqa: E402

AGENTS = 10


class _Row:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def fill(store: SQLStore, tenant: str, n: int) -> None:
    """N expired ledger records and N audit rows (valid chains), in big transactions."""
    now = time.time()
    eng = store.engine() if store.kind == "sqlite" else store._engine
    assert eng is not None
    led, au, heads = S.ledger, S.audit, S.audit_heads
    chunk = 20_000
    with eng.begin() as conn:
        for start in range(0, n, chunk):
            conn.execute(
                sa.insert(led),
                [
                    {
                        "namespace": tenant,
                        "idem_key": f"{i:064x}",
                        "tool": "bench.tool",
                        "state": "succeeded",
                        "token": 1,
                        "owner": "bench",
                        "attempt": 1,
                        "executions": 1,
                        "lease_until": None,
                        "expires_at": now - 60,
                        "args_digest": None,
                        "result": '{"v": 1}',
                        "error": None,
                        "run_id": None,
                        "caller": None,
                        "created_at": now - 3600,
                        "updated_at": now - 3600,
                    }
                    for i in range(start, min(n, start + chunk))
                ],
            )
    prev = dict.fromkeys(range(AGENTS), GENESIS)
    seqs = dict.fromkeys(range(AGENTS), 0)
    with eng.begin() as conn:
        for start in range(0, n, chunk):
            rows = []
            for i in range(start, min(n, start + chunk)):
                a = i % AGENTS
                seqs[a] += 1
                fields = {
                    "tenant": tenant,
                    "agent_id": f"agent-{a}",
                    "seq": seqs[a],
                    "tool": "bench.tool",
                    "args_digest": None,
                    "args": '{"q": 1}',
                    "decision": "executed",
                    "reason": "ok",
                    "risk_level": "low",
                    "spend_micros": 10,
                    "run_id": None,
                    "token": 1,
                    "idem_key": f"{i:064x}",
                    "created_at": now - 7200 + i * 1e-3,
                }
                digest = chain_hash(prev[a], audit_fields(_Row(**fields)))
                rows.append({**fields, "prev_hash": prev[a], "hash": digest})
                prev[a] = digest
            conn.execute(sa.insert(au), rows)
        conn.execute(
            sa.insert(heads),
            [
                {
                    "tenant": tenant,
                    "agent_id": f"agent-{a}",
                    "seq": seqs[a],
                    "hash": prev[a],
                    "base_seq": 0,
                    "base_hash": GENESIS,
                }
                for a in range(AGENTS)
            ],
        )


def settle(store: SQLStore) -> None:
    """PostgreSQL: what autovacuum does to rows long before they expire (hint bits, the
    planner's statistics), done now."""
    if store.kind != "postgresql":
        return
    eng = sa.create_engine(store.url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with eng.connect() as conn:
            conn.execute(sa.text("VACUUM ANALYZE onceonly_ledger"))
            conn.execute(sa.text("VACUUM ANALYZE onceonly_audit"))
    finally:
        eng.dispose()


def raw_floor(store: SQLStore, tenant: str) -> tuple[float, float]:
    """Seconds for one unbounded DELETE of the records, and of the audit rows."""
    eng = store.engine() if store.kind == "sqlite" else store._engine
    assert eng is not None
    t0 = time.perf_counter()
    with eng.begin() as conn:
        conn.execute(sa.delete(S.ledger).where(S.ledger.c.namespace == tenant))
    t1 = time.perf_counter()
    with eng.begin() as conn:
        conn.execute(sa.delete(S.audit).where(S.audit.c.tenant == tenant))
        conn.execute(sa.delete(S.audit_heads).where(S.audit_heads.c.tenant == tenant))
    return t1 - t0, time.perf_counter() - t1


def bench(label: str, url: str, n: int, tmp: Path) -> None:
    store = SQLStore(url, auto_migrate=True)
    store.ensure_schema()
    tenant = f"oo-bench-ret-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    fill(store, tenant, n)
    settle(store)
    print(f"{label}: filled {n:,} records + {n:,} audit rows in {time.perf_counter() - t0:.0f} s")

    t0 = time.perf_counter()
    deleted = retention.purge_expired(store, batch=1000)  # every namespace: the default
    t_records = time.perf_counter() - t0
    if deleted != n:
        raise SystemExit(f"{label}: deleted {deleted} records, expected {n}")

    gov = store.governance_store()
    archive = tmp / f"{tenant}.jsonl"
    t0 = time.perf_counter()
    done = retention.archive_audit(gov, time.time(), archive, tenants=[tenant], batch=1000)
    t_audit = time.perf_counter() - t0
    lines = sum(1 for _ in archive.open())
    if (done.archived, done.purged, lines) != (n, n, n):
        raise SystemExit(f"{label}: archived {done.archived}, purged {done.purged}, {lines} lines")
    problems = [p for p in gov.verify_audit(tenant)]
    if problems:
        raise SystemExit(f"{label}: the chains no longer verify: {problems[:3]}")
    gov.close()

    # The floor: the same rows again, deleted by one unbounded statement per table.
    tenant2 = tenant + "-raw"
    fill(store, tenant2, n)
    settle(store)
    raw_records, raw_audit = raw_floor(store, tenant2)
    store.close()
    load = os.getloadavg()[0]
    print(
        f"{label}: {n:,} rows; load {load:.1f}\n"
        f"  expired records: {n / t_records:>10,.0f} rows/s ({t_records:.1f} s, batches of 1,000)"
        f"   raw DELETE: {n / raw_records:,.0f} rows/s\n"
        f"  audit archive+purge: {n / t_audit:>6,.0f} rows/s ({t_audit:.1f} s, {done.batches} "
        f"batches)   raw DELETE: {n / raw_audit:,.0f} rows/s"
    )
    bound = (
        "one transaction (and on SQLite one WAL commit) per 1,000 rows instead of one for "
        "all; the audit run also serialises every row to JSON and fsyncs the archive per batch"
    )
    floor_row(
        f"retention: expired records deleted, {label}, {n:,} rows",
        n / t_records,
        "one unbounded DELETE",
        n / raw_records,
        unit="rows/s",
        bound=bound,
    )
    floor_row(
        f"retention: audit rows archived + purged, {label}, {n:,} rows",
        n / t_audit,
        "one unbounded DELETE",
        n / raw_audit,
        unit="rows/s",
        bound=bound,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5_000 if SHORT else 1_000_000)
    ap.add_argument("--pg-rows", type=int, default=None, help="default: --rows")
    ap.add_argument(
        "--pg",
        default=os.environ.get(
            "ONCEONLY_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    ap.add_argument("--no-pg", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="oo-bench-ret-") as d:
        tmp = Path(d)
        bench("SQLite NORMAL", f"sqlite:///{tmp}/ret.db?synchronous=normal", args.rows, tmp)
        if not args.no_pg:
            try:
                SQLStore(args.pg).now()
            except Exception as err:  # no server: say so, keep the SQLite rows
                print(f"PostgreSQL skipped: {err}")
                return
            # Every namespace is purged: a database of its own touches only the bench's rows.
            with scratch_database(args.pg, prefix="oo_bench_ret") as url:
                bench("PostgreSQL", url, args.pg_rows or args.rows, tmp)


if __name__ == "__main__":
    main()
