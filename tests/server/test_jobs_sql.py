"""A key-mode ``/v1/ai/run``'s job row, on every SQL backend (``ServerDB.enqueue``).

The row is written from one prepared text per dialect, stamped with the ledger's clock
(the database's own on PostgreSQL and MariaDB); what a worker reads back is what the
lease wrote."""

from __future__ import annotations

import json
import uuid

import pytest

pytest.importorskip("fastapi")

import sqlalchemy as sa

from onceonly_core.server.control import ControlPlane
from onceonly_core.server.db import jobs


def test_a_key_mode_run_queues_its_job_row_on_the_ledger_clock(db_url: str) -> None:
    cp = ControlPlane(db_url, job_workers=0, migrate=True)
    tenant, key = f"jq{uuid.uuid4().hex[:10]}", "report-1"
    try:
        before = cp.ledger.now()
        out = cp.lease(tenant, key, 120, {"run_id": "r1", "text": "naïve 'quoted'"}, job=True)
        after = cp.ledger.now()
        assert out["status"] == "acquired"
        with cp.keys.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).where(jobs.c.tenant == tenant)).all()
        (row,) = [r._asdict() for r in rows]
        assert row["job_key"] == key and row["token"] == out["version"]
        assert row["lease_id"] == out["lease_id"] and row["state"] == "queued"
        assert json.loads(row["meta"]) == {"run_id": "r1", "text": "naïve 'quoted'"}
        assert row["attempts"] == 0 and row["worker"] is None and row["taken_until"] is None
        assert row["ttl"] == 120
        assert before - 0.01 <= row["created_at"] <= after + 0.01  # the ledger's clock
        if cp.keys.kind == "postgresql":  # a retry after a lost reply: a no-op, not an error
            cp.keys.enqueue(tenant, key, row["token"], "lease_other", "{}", 5)
            with cp.keys.engine.connect() as conn:
                again = conn.execute(sa.select(jobs).where(jobs.c.tenant == tenant)).all()
            assert [r.lease_id for r in again] == [out["lease_id"]]
    finally:
        with cp.keys.engine.begin() as conn:
            conn.execute(sa.delete(jobs).where(jobs.c.tenant == tenant))
        cp.close()


def test_a_key_run_again_after_retention_purged_it_queues_a_new_job(db_url: str) -> None:
    """Retention deletes a finished lease's ledger row, so the key's next lease starts again
    at token 1, while the first run's job row (tenant, key, token 1) is kept as done. The
    new run must be queued, not dropped as a duplicate of the old row (PostgreSQL's DO
    NOTHING) nor refused as a conflict (a 503 from an IntegrityError elsewhere)."""
    cp = ControlPlane(db_url, job_workers=0, migrate=True)
    tenant, key = f"jq{uuid.uuid4().hex[:10]}", "nightly"

    def job_rows() -> list[dict[str, object]]:
        with cp.keys.engine.connect() as conn:
            q = sa.select(jobs).where(jobs.c.tenant == tenant)
            return [r._asdict() for r in conn.execute(q)]

    try:
        first = cp.lease(tenant, key, 60, {"n": 1}, job=True)
        (row,) = job_rows()
        cp.keys.job_done(row)
        cp.complete(tenant, key, first["lease_id"], {"ok": 1}, None)
        purged = cp.ledger.purge_expired(f"{tenant}/ai", before=cp.ledger.now() + 10**9)
        assert purged == 1 and cp.ledger.get(f"{tenant}/ai", key) is None
        again = cp.lease(tenant, key, 60, {"n": 2}, job=True)
        assert again["status"] == "acquired" and again["version"] == first["version"] == 1
        (row,) = job_rows()
        assert row["state"] == "queued" and row["lease_id"] == again["lease_id"]
        assert json.loads(str(row["meta"])) == {"n": 2} and row["attempts"] == 0
        # ... and a retried enqueue of the live row changes nothing (a lost reply).
        cp.keys.enqueue(tenant, key, 1, again["lease_id"], '{"n": 3}', 60)
        (same,) = job_rows()
        assert same == row
    finally:
        with cp.keys.engine.begin() as conn:
            conn.execute(sa.delete(jobs).where(jobs.c.tenant == tenant))
        cp.close()


def test_the_claim_writes_the_job_row_with_it(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new key's lease and job row: one statement on PostgreSQL, one transaction on
    SQLite (no separate enqueue), so both commit or neither does."""
    if db_url.startswith("mysql"):
        pytest.skip("MariaDB writes the job row after the claim")
    from onceonly_core.errors import StoreError
    from onceonly_core.server import control

    cp = ControlPlane(db_url, job_workers=0, migrate=True)
    tenant = f"jq{uuid.uuid4().hex[:10]}"

    def no_enqueue(*args: object) -> None:
        raise AssertionError("a new key's job row is written by its claim")

    try:
        monkeypatch.setattr(cp.keys, "enqueue", no_enqueue)
        out = cp.lease(tenant, "k1", 60, {"a": 1}, job=True)
        assert out["status"] == "acquired"
        # A job row that cannot be written fails the claim with it: no lease is left.
        broken = control.JOB_WITH_CLAIM.replace("ins.token", "ins.no_such_column")
        monkeypatch.setattr(control, "JOB_WITH_CLAIM", broken)
        with pytest.raises(StoreError):
            cp.lease(tenant, "k2", 60, {}, job=True)
        assert cp.ledger.get(f"{tenant}/ai", "k2") is None
        with cp.keys.engine.connect() as conn:
            keys = conn.execute(sa.select(jobs.c.job_key).where(jobs.c.tenant == tenant))
            assert [k for (k,) in keys] == ["k1"]
    finally:
        with cp.keys.engine.begin() as conn:
            conn.execute(sa.delete(jobs).where(jobs.c.tenant == tenant))
        cp.close()
