"""A key-mode ``/v1/ai/run``'s job row, on every SQL backend (``ServerDB.enqueue``).

The row is written from one prepared text per dialect, stamped with the ledger's clock
(the database's own on PostgreSQL and MariaDB); what a worker reads back is what the
lease wrote."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

import sqlalchemy as sa

from onceonly_core.server import db as control_db
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
    SQLite and MariaDB (no separate enqueue), so both commit or neither does."""
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
        broken = {
            k: v.replace("ins.token", "ins.no_such_column")
            for k, v in control.JOB_WITH_CLAIM.items()
        }
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


def test_a_held_key_s_second_run_writes_no_job_row(db_url: str) -> None:
    """``claim_with``'s INSERT writes only for the claim that inserted the ledger row: a
    second run of a live key is answered ``polling`` and queues nothing."""
    cp = ControlPlane(db_url, job_workers=0, migrate=True)
    tenant = f"jq{uuid.uuid4().hex[:10]}"
    try:
        first = cp.lease(tenant, "k", 60, {"n": 1}, job=True)
        second = cp.lease(tenant, "k", 60, {"n": 2}, job=True)
        assert first["status"] == "acquired" and second["status"] == "polling"
        q = sa.select(jobs).where(jobs.c.tenant == tenant)
        with cp.keys.engine.connect() as conn:
            (row,) = [r._asdict() for r in conn.execute(q)]
        assert (row["lease_id"], row["meta"]) == (first["lease_id"], '{"n": 1}')
        # Finished: the run is answered completed, and its done job row is not run again
        # (a job INSERT for a claim that inserted nothing would queue it anew).
        cp.keys.job_done(row)
        cp.complete(tenant, "k", first["lease_id"], {"ok": 1}, None)
        assert cp.lease(tenant, "k", 60, {"n": 3}, job=True)["status"] == "completed"
        with cp.keys.engine.connect() as conn:
            (after,) = [r._asdict() for r in conn.execute(q)]
        assert after["state"] == "done" and after["lease_id"] == first["lease_id"]
    finally:
        with cp.keys.engine.begin() as conn:
            conn.execute(sa.delete(jobs).where(jobs.c.tenant == tenant))
        cp.close()


def test_claim_with_refuses_parameter_names_of_the_claim_s_own(db_url: str) -> None:
    from onceonly_core.errors import ConfigError
    from onceonly_core.stores import NewClaim
    from onceonly_core.stores.sql import SQLStore

    store = SQLStore(db_url, auto_migrate=True)
    try:
        new = NewClaim("t", "owner", 30.0)
        for clash in ({"k": "x"}, {"now": 1.0}):
            with pytest.raises(ConfigError, match="the claim's own"):
                store.claim_with(f"cw-{uuid.uuid4().hex[:8]}", "k", new, "SELECT 1", clash)
    finally:
        store.close()


def test_a_constraint_the_second_write_breaks_fails_the_claim_as_a_store_error(
    db_url: str,
) -> None:
    """``also`` refused by a constraint (here NOT NULL) is not a taken key: the claim fails
    with StoreError (a 503, like any store failure), not a raw driver error (a 500), and
    leaves no ledger row."""
    from onceonly_core.errors import StoreError
    from onceonly_core.stores import NewClaim

    cp = ControlPlane(db_url, job_workers=0, migrate=True)
    ns = f"cw-{uuid.uuid4().hex[:8]}"
    null_tenant = control_db.JOB_WITH_CLAIM[cp.ledger.kind].replace("%(j_tenant)s", "NULL", 1)
    params = control_db.job_params("acme", "k", "lease_x", "{}", 60)
    try:
        cp.keys.ensure()
        with pytest.raises(StoreError, match="claim failed"):
            cp.ledger.claim_with(ns, "k", NewClaim("t", "o", 30.0), null_tenant, params)
        assert cp.ledger.get(ns, "k") is None
    finally:
        cp.close()


def test_on_sqlite_a_claim_that_lost_the_race_writes_no_job_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite reads first; a run that read nothing and then lost the INSERT to another
    (the race between the two) must not write its job row over the winner's finished
    one."""
    cp = ControlPlane(f"sqlite:///{tmp_path}/l.db", job_workers=0)
    tenant = "acme"
    try:
        first = cp.lease(tenant, "k", 60, {"n": 1}, job=True)
        with cp.keys.engine.connect() as conn:
            (row,) = [r._asdict() for r in conn.execute(sa.select(jobs))]
        cp.keys.job_done(row)
        cp.complete(tenant, "k", first["lease_id"], {"ok": 1}, None)
        real, calls = cp.ledger.get, []

        def raced(namespace: str, key: str) -> object:  # the read before the winner's write
            calls.append(key)
            return None if len(calls) == 1 else real(namespace, key)

        monkeypatch.setattr(cp.ledger, "get", raced)
        assert cp.lease(tenant, "k", 60, {"n": 2}, job=True)["status"] == "completed"
        with cp.keys.engine.connect() as conn:
            (after,) = [r._asdict() for r in conn.execute(sa.select(jobs))]
        assert after["state"] == "done" and after["lease_id"] == first["lease_id"]
    finally:
        cp.close()


@pytest.mark.timeout(120)
def test_racing_runs_of_one_key_queue_one_job(db_url: str) -> None:
    """Eight threads run each key at once: one lease is acquired per key, and its job row
    (written with the claim) is the only one, the winner's."""
    import threading

    cp = ControlPlane(db_url, job_workers=0, migrate=True)
    tenant, keys, n = f"jq{uuid.uuid4().hex[:10]}", [f"k{i}" for i in range(12)], 8
    answers: dict[str, list[dict[str, object]]] = {k: [] for k in keys}
    errors: list[BaseException] = []
    try:
        for key in keys:
            start = threading.Barrier(n)

            def run(key: str = key, start: threading.Barrier = start) -> None:
                start.wait()
                try:
                    answers[key].append(cp.lease(tenant, key, 60, {"k": key}, job=True))
                except BaseException as err:  # reported below, with the thread's answer
                    errors.append(err)

            threads = [threading.Thread(target=run) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert not errors, errors
        with cp.keys.engine.connect() as conn:
            rows = [
                r._asdict() for r in conn.execute(sa.select(jobs).where(jobs.c.tenant == tenant))
            ]
        for key in keys:
            won = [a for a in answers[key] if a["status"] == "acquired"]
            assert len(answers[key]) == n and len(won) == 1, answers[key]
            (row,) = [r for r in rows if r["job_key"] == key]
            assert row["lease_id"] == won[0]["lease_id"] and row["state"] == "queued"
        assert len(rows) == len(keys)
    finally:
        with cp.keys.engine.begin() as conn:
            conn.execute(sa.delete(jobs).where(jobs.c.tenant == tenant))
        cp.close()
