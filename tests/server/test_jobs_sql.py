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
