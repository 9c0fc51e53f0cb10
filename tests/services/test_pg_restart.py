"""PostgreSQL stopped (immediate shutdown) and started again under a running worker.

A worker process calls the guard in a loop — new keys, and every third call a recent key
again — while the test stops the PostgreSQL cluster with ``pg_ctlcluster ... stop -m
immediate`` (every connection is cut, like a crash), lets the worker fail for a moment, and
starts the cluster again. Needs the local cluster behind ``ONCEONLY_PG_URL`` and the right
to run ``pg_ctlcluster`` (root or the cluster owner); skipped otherwise, or failed under
``ONCEONLY_REQUIRE_SERVICES=1``. PostgreSQL is always started again, even if the test fails.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from _services import require_services
from onceonly_core.stores.sql import SQLStore
from procs.harness import Worker, open_ledger, stored_value, workers

pytestmark = pytest.mark.multiprocess


def _unusable(reason: str) -> None:
    if require_services():
        pytest.fail(f"cannot restart PostgreSQL: {reason} (ONCEONLY_REQUIRE_SERVICES=1)")
    pytest.skip(f"cannot restart PostgreSQL: {reason}")


def local_cluster(url: str) -> tuple[str, str]:
    """(version, name) of the local cluster serving ``url``, from ``pg_lsclusters``."""
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None:
        _unusable("pg_ctlcluster is not installed (Debian/Ubuntu postgresql-common)")
    if os.geteuid() != 0:
        _unusable("pg_ctlcluster needs root here")
    parsed = sa.make_url(url)
    if parsed.host not in (None, "localhost", "127.0.0.1", "::1"):
        _unusable(f"{parsed.host} is not this machine")
    port = str(parsed.port or 5432)
    out = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == port:
            return fields[0], fields[1]
    _unusable(f"no local cluster listens on port {port}")
    raise AssertionError("unreachable")


def pg_ctl(cluster: tuple[str, str], *action: str) -> None:
    cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, *action]
    subprocess.run(cmd, check=True, timeout=90, capture_output=True)


def answers(url: str) -> bool:
    engine = sa.create_engine(url, poolclass=sa.NullPool, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def ensure_running(cluster: tuple[str, str], url: str, timeout: float = 90.0) -> None:
    """Start the cluster if it is down and wait until it answers queries."""
    status = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "status"], capture_output=True
    )
    if status.returncode != 0:  # 3: not running
        pg_ctl(cluster, "start")
    deadline = time.monotonic() + timeout
    while not answers(url):
        assert time.monotonic() < deadline, "PostgreSQL did not come back"
        time.sleep(0.2)


@pytest.fixture
def cluster(pg_url: str) -> Iterator[tuple[str, str]]:
    found = local_cluster(pg_url)
    try:
        yield found
    finally:
        ensure_running(found, pg_url)  # never leave PostgreSQL down for the rest of the suite


def wait_results(
    worker: Worker, enough: Any, what: str, timeout: float = 60.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        got = worker.results()
        if enough(got):
            return got
        code = worker.proc.poll()
        assert code is None, (
            f"the worker exited {code} while waiting for {what}:\n{worker.console()}"
        )
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{worker.console()}"
        time.sleep(0.05)


def ok_count(results: list[dict[str, Any]]) -> int:
    return sum("value" in r for r in results)


@pytest.mark.timeout(180)
def test_postgresql_stopped_mid_run(
    pg_url: str, cluster: tuple[str, str], namespace: str, tmp_path: Path
) -> None:
    open_ledger(pg_url).close()  # the schema exists before the worker starts
    stop = tmp_path / "stop"
    with workers(tmp_path, pg_url, namespace) as w:
        # A short lease and on_unknown="raise": a key whose completion could not be
        # recorded must never run twice here; calling it again has to raise UnknownOutcome.
        loop = w.start(
            "loop",
            "--stop-file",
            str(stop),
            "--lease",
            "2.0",
            "--wait",
            "10",
            "--on-unknown",
            "raise",
            "--tool-sleep",
            "0.01",  # most of the time the worker is inside the tool: the stop cuts a claim
        )
        wait_results(loop, lambda r: ok_count(r) >= 20, "20 calls before the stop")
        try:
            pg_ctl(cluster, "stop", "-m", "immediate")
            stopped = time.monotonic()
            down_since = len(loop.results())
            wait_results(
                loop,
                lambda r: sum("error" in x for x in r[down_since:]) >= 10,
                "10 failed calls while PostgreSQL is down",
            )
            # Stay down longer than the completion retries (~1.75 s), so a call cut between
            # its claim and its completion gives up (CompletionNotRecorded).
            time.sleep(max(0.0, stopped + 2.5 - time.monotonic()))
        finally:
            ensure_running(cluster, pg_url)
        back = len(loop.results())
        wait_results(loop, lambda r: ok_count(r[back:]) >= 20, "20 calls after the restart")
        stop.touch()
        loop.expect_exit(0)
        results = loop.results()
        effects = w.effect_lines()
    store = SQLStore(pg_url)
    try:
        records = {r.key: r for r in store.list(namespace=namespace, limit=10**6)}
    finally:
        store.close()

    # Every failure is one of ours, and the outage was seen as StoreError.
    foreign = [r for r in results if r.get("foreign")]
    assert not foreign, f"a driver error escaped the guard: {foreign[:3]}"
    errors = [r for r in results if "error" in r]
    assert any(r["store_error"] for r in errors), "the outage was never noticed"
    for r in errors:
        if not r["store_error"]:
            # Only a key left running by a cut connection may answer UnknownOutcome.
            assert r["error"] == "UnknownOutcome", r
            assert records[r["item"]].state == "running", r

    # No key ran twice, and no effect happened without a claim in the ledger.
    runs = collections.Counter(e["item"] for e in effects)
    assert [k for k, n in runs.items() if n > 1] == [], "a key ran twice"
    by_seq = {r["seq"]: r for r in results}
    for e in effects:
        rec = records.get(e["item"])
        assert rec is not None, f"{e['item']} ran without a record in the ledger"
        assert rec.token == 1, rec
        call = by_seq[e["seq"]]
        if "value" in call:
            assert call["value"] == e["value"]
            assert (rec.state, rec.executions) == ("succeeded", 1)
            assert stored_value(rec) == e["value"]
        else:
            # The tool ran, then its completion could not be confirmed: either it never
            # reached the ledger (running: outcome unknown) or it committed and only the
            # reply was lost (succeeded, with this execution's result).
            assert call["error"] == "CompletionNotRecorded", call
            assert (rec.state, rec.executions) in {("running", 0), ("succeeded", 1)}, rec
            if rec.state == "succeeded":
                assert stored_value(rec) == e["value"]

    # A call that failed with a plain StoreError ran nothing.
    ran = {e["seq"] for e in effects}
    for r in errors:
        if r["error"] == "StoreError":
            assert r["seq"] not in ran, f"call {r['seq']} ran although its claim failed"

    # Replays agree with the first result, before, across and after the outage.
    first: dict[str, str] = {}
    for r in results:
        if "value" in r:
            assert first.setdefault(r["item"], r["value"]) == r["value"], r

    # The same Guard (same process, same pool) works again after the restart.
    assert ok_count(results[back:]) >= 20

    # The sweep, after the restart, calls every key once more. Each has now run exactly
    # once (a key whose claim failed in the outage runs in the sweep), or its outcome is
    # unknown — claimed, then cut off before completing — and the sweep says so instead
    # of running it again.
    sweep = [r for r in results if r.get("sweep")]
    assert sorted(r["item"] for r in sweep) == sorted({r["item"] for r in results})
    for r in sweep:
        rec = records[r["item"]]
        if "value" in r:
            assert runs[r["item"]] == 1, r
            assert (rec.state, rec.executions) == ("succeeded", 1), rec
        else:
            assert r["error"] == "UnknownOutcome", r
            assert (rec.state, rec.token, rec.executions) == ("running", 1, 0), rec
