"""The database server restarts under governed calls with a daily spend cap.

A thread pays $1 per call (a new key each time) under a $6/day cap while the test
restarts the server once: PostgreSQL with ``pg_ctlcluster ... stop -m immediate`` (every
connection cut, like a crash), MariaDB with ``mysqladmin shutdown``. Calls fail while it is
away; the governance store retries its writes on fresh connections. After it:

- 0 overshoot: the tool ran at most 6 times, and the counter never went past the cap;
- every executed dollar is counted (the counter is at least the number of runs);
- executions == audit rows that record a run (executed, or unknown for a hold swept).

The servers are shared with other test runs: the restart is short, runs once per
backend, and the server is always started again. Skipped where the server cannot be
restarted from here (not local, not root), or failed under ONCEONLY_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from _services import require_services
from onceonly_core import Guard
from onceonly_core.governance import Policy
from onceonly_core.governance.engine import DAY
from onceonly_core.stores.sql import SQLStore

pytestmark = pytest.mark.slow

CAP, PRICE = 6, 1.0


def _unusable(reason: str) -> None:
    if require_services():
        pytest.fail(f"cannot restart the server: {reason} (ONCEONLY_REQUIRE_SERVICES=1)")
    pytest.skip(f"cannot restart the server: {reason}")


def answers(url: str) -> bool:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except sa.exc.DBAPIError:
        return False
    finally:
        engine.dispose()


def wait_until_up(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not answers(url):
        if time.monotonic() > deadline:
            raise AssertionError(f"the server behind {url} did not come back")
        time.sleep(0.2)


Control = tuple[Callable[[], None], Callable[[], None]]  # (stop, start)


def pg_control(url: str) -> Control:
    from services.test_pg_restart import ensure_running, local_cluster, pg_ctl

    cluster = local_cluster(url)
    return (lambda: pg_ctl(cluster, "stop", "-m", "immediate")), (
        lambda: ensure_running(cluster, url)
    )


def mariadb_control(url: str) -> Control:
    if shutil.which("mysqladmin") is None or shutil.which("start-stop-daemon") is None:
        _unusable("mysqladmin / start-stop-daemon not installed")
    if sa.make_url(url).host not in (None, "localhost", "127.0.0.1", "::1"):
        _unusable("the server is not on this machine")
    daemon = shutil.which("mariadbd") or "/usr/sbin/mariadbd"

    def stop() -> None:
        subprocess.run(
            ["mysqladmin", "-h127.0.0.1", "-uroot", "shutdown"], timeout=60, capture_output=True
        )
        deadline = time.monotonic() + 60
        while answers(url) and time.monotonic() < deadline:
            time.sleep(0.1)

    def start() -> None:
        if not answers(url):
            subprocess.run(
                ["start-stop-daemon", "--start", "--oknodo", "--background", "--exec", daemon],
                check=True,
                timeout=60,
                capture_output=True,
            )
        wait_until_up(url)

    return stop, start


@pytest.fixture(params=["postgresql", "mysql"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Control]]:
    url = str(request.getfixturevalue("pg_url" if request.param == "postgresql" else "mysql_url"))
    control = pg_control(url) if request.param == "postgresql" else mariadb_control(url)
    with SQLStore(url) as store:
        store.migrate()
    try:
        yield url, control
    finally:
        control[1]()  # always leave the shared server running


def test_a_server_restart_under_a_spend_cap_overshoots_nothing_and_audits_every_run(
    server: tuple[str, Control], namespace: str
) -> None:
    url, (stop_server, start_server) = server
    guard = Guard(url, namespace=namespace, quiet=True)
    guard.gov.upsert_policy(
        Policy(agent_id="payer", max_spend_usd_per_day=CAP, pricing_rules={"pay": PRICE})
    )
    effects: list[int] = []
    outcomes: list[str] = []
    stop = threading.Event()

    down = threading.Event()

    def pay(n: int) -> int:
        effects.append(n)
        if len(effects) == 2:
            # The server goes away while this tool runs: its ledger completion and its
            # settle meet a dead connection, and the next calls a server that is down.
            stop_server()
            down.set()
        return n

    def loop() -> None:
        n, blocked = 0, 0
        deadline = time.monotonic() + 120
        while not stop.is_set() and blocked < 3 and time.monotonic() < deadline:
            n += 1
            try:
                r = guard.call_tool(pay, {"n": n}, tool="pay", agent_id="payer", lease=2.0)
                outcomes.append(r.policy_reason)
                blocked = blocked + 1 if r.policy_reason == "daily_spend_exceeded" else 0
            except Exception as err:  # the database is away: the caller sees an error
                outcomes.append(type(err).__name__)
                time.sleep(0.05)

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        assert down.wait(90), outcomes
        time.sleep(1.0)  # down for a moment: calls fail or wait on their retries
        start_server()
        worker.join(150)
    finally:
        stop.set()
        start_server()
        worker.join(30)
    assert not worker.is_alive()
    assert any(o == "daily_spend_exceeded" for o in outcomes), outcomes
    assert len(effects) <= CAP, (effects, outcomes)  # 0 overshoot
    store = guard.gov.store
    today = int(store.now() // DAY) * DAY
    counted = store.counter(namespace, "payer", "spend", today)
    assert len(effects) * 1_000_000 <= counted <= CAP * 1_000_000, (effects, counted)
    time.sleep(2.2)  # any hold left by a call cut off mid-way runs out its lease
    report = guard.gov.audit_report()
    assert report["problems"] == []
    runs = [
        e
        for e in guard.gov.agent_logs("payer", limit=1000)
        if e.decision in ("executed", "unknown")
    ]
    assert len(runs) == len(effects), ([(e.decision, e.reason) for e in runs], effects, outcomes)
    assert store.holds(namespace, "payer") == 0
    with contextlib.suppress(Exception):
        guard.close()
