"""PostgreSQL: racing clients and stateless replicas over one database."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from onceonly import OnceOnly

from onceonly_core.server.control import ControlPlane

Running = Any  # tests/server/conftest.py: Running

_REPLICA = """
import sys
import uvicorn
from onceonly_core.server import create_app
app = create_app(sys.argv[1], job_workers=0)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""

_WORKER = """
import sys
from onceonly_core.server import run_worker
run_worker(sys.argv[1], job_workers=2, job_poll=0.05)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.mark.timeout(120)
def test_check_lock_race_postgres(pg_url: str, make_server: Callable[..., Running]) -> None:
    srv = make_server(pg_url, migrate=True)
    key = srv.key(_tenant())
    wins: list[bool] = []
    barrier = threading.Barrier(16)

    def one() -> None:
        c = OnceOnly(key, base_url=srv.base_url, fail_open=False)
        barrier.wait()
        wins.append(c.check_lock("hot-key", ttl=60).locked)
        c.close()

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 15 + [True]


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[list[str]]:
    ControlPlane(pg_url, migrate=True).close()
    script = tmp_path / "replica.py"
    script.write_text(_REPLICA)
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    for _ in range(2):
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, str(script), pg_url, str(port)]))
        urls.append(f"http://127.0.0.1:{port}")
    for _ in range(2):  # two `onceonly worker` processes; the replicas run no jobs
        procs.append(subprocess.Popen([sys.executable, str(worker), pg_url]))
    try:
        deadline = time.monotonic() + 30
        for url in urls:
            while True:
                try:
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("replica did not start")
                time.sleep(0.1)
        yield [u + "/v1" for u in urls]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=15)


@pytest.mark.timeout(180)
def test_two_replicas_one_winner_per_key(pg_url: str, replicas: list[str]) -> None:
    tenant = _tenant()
    cp = ControlPlane(pg_url)
    try:
        _two_replicas(cp, tenant, replicas)
    finally:
        # Its pools closed here, not by the garbage collector during a later test (an
        # unclosed psycopg connection's ResourceWarning fails whichever test is running).
        cp.close()


def _two_replicas(cp: ControlPlane, tenant: str, replicas: list[str]) -> None:
    key = cp.keys.create_key(tenant)
    clients = [OnceOnly(key, base_url=u, fail_open=False) for u in replicas]
    locked: dict[str, int] = {}
    lock = threading.Lock()

    def worker(i: int) -> None:
        c = clients[i % 2]
        for j in range(125):
            k = f"k{(i * 37 + j) % 100}"
            r = c.check_lock(k, ttl=300)
            if r.locked:
                with lock:
                    locked[k] = locked.get(k, 0) + 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert locked == {f"k{n}": 1 for n in range(100)}  # 1,000 check-locks, one winner each

    # 200 jobs, each posted to both replicas at once; each runs once, by some worker.
    acquired: list[str] = []

    def post(m: int) -> None:
        # threads m and m + 4 post the same keys at once, each to a different replica
        c = clients[m // 4]
        for n in range(m % 4, 200, 4):
            r = c.ai.run(key=f"job-{n}", metadata={"n": n})
            if r.status == "acquired":
                with lock:
                    acquired.append(r.key)

    posters = [threading.Thread(target=post, args=(m,)) for m in range(8)]
    for t in posters:
        t.start()
    for t in posters:
        t.join()
    assert sorted(acquired) == sorted(f"job-{n}" for n in range(200))
    for n in range(200):
        res = clients[n % 2].ai.wait(f"job-{n}", timeout=30, poll_min=0.2)
        assert res.status == "completed", res
    import sqlalchemy as sa

    from onceonly_core.server.db import jobs

    with cp.gov_store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(jobs.c.job_key, jobs.c.state, jobs.c.attempts).where(jobs.c.tenant == tenant)
        ).all()
    assert sorted(r.job_key for r in rows) == sorted(f"job-{n}" for n in range(200))
    assert all(r.state == "done" and r.attempts == 1 for r in rows)
    for c in clients:
        c.close()


def test_a_job_row_is_one_autocommitted_statement_on_the_database_s_clock(pg_url: str) -> None:
    """Key-mode /ai/run's job row on PostgreSQL: one INSERT (no clock read first; sent in
    autocommit, so no BEGIN or COMMIT round trip either), committed when it returns,
    stamped with the database's clock; a retry after a lost reply (the same tenant, key
    and token) is a no-op, not an error."""
    import sqlalchemy as sa

    from onceonly_core.server.db import ServerDB, jobs
    from onceonly_core.stores.sql import SQLStore

    engine = sa.create_engine(pg_url)
    with SQLStore(pg_url) as ledger:
        db = ServerDB(engine, ledger.now)
        db.ensure()
        sent: list[str] = []
        sa.event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
        tenant = _tenant()
        other = sa.create_engine(pg_url)
        try:
            db.enqueue(tenant, "job-1", 1, "lease_x", "{}", 60.0)
            assert len(sent) == 1 and sent[0].startswith("INSERT")  # no clock read first
            with other.connect() as conn:  # committed by the statement itself
                seen = conn.execute(sa.select(jobs.c.token).where(jobs.c.tenant == tenant))
                assert seen.all() == [(1,)]
            db.enqueue(tenant, "job-1", 1, "lease_x", "{}", 60.0)  # the retry
            now = ledger.now()
            with engine.begin() as conn:
                rows = conn.execute(sa.select(jobs).where(jobs.c.tenant == tenant)).all()
                # no ledger record behind it: not left for another test's workers
                conn.execute(sa.delete(jobs).where(jobs.c.tenant == tenant))
        finally:
            engine.dispose()
            other.dispose()
    assert len(rows) == 1
    assert rows[0].state == "queued" and rows[0].token == 1
    assert now - 5 < rows[0].created_at <= now
