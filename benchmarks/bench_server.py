"""`/v1/check-lock` and `/v1/ai/run` throughput and latency of `onceonly serve`, next to
the raw single-row INSERT rate from as many connections, in one run.

    python benchmarks/bench_server.py [--seconds 8] [--pg URL] [--workers 2]

Load: `wrk` (Debian's package) with keep-alive connections at 1, 16 and 64 concurrent
clients, every request a new key (a Lua counter), so each one is a real claim. The
server runs as a separate process (`onceonly serve --workers N --job-workers 0`: a
key-mode `/ai/run` queues its job for `onceonly worker`, which is not the request path),
on SQLite (WAL, NORMAL) and on PostgreSQL.

The floor (issue #15): N connections, each doing single-row `INSERT`s in autocommit
(one commit per row) as fast as it can, for as many seconds; N = the number of wrk
clients, spread over as many processes as the server has workers (threads inside each:
the drivers release the GIL while waiting). PostgreSQL: psycopg 3 into a scratch copy of
the ledger table (`LIKE onceonly_ledger INCLUDING ALL`), timestamps from the server's
clock. SQLite: the stdlib driver, WAL + `synchronous=NORMAL` + `busy_timeout` as the
store sets them, into a fresh ledger file. Each client count's floor is measured right
after the server's run at that count. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import floor_row  # noqa: E402

from onceonly_core.server import create_key  # noqa: E402
from onceonly_core.stores.sql import SQLStore  # noqa: E402

# Every request a new key. Each wrk thread runs the script in a Lua state of its own, whose
# math.random is seeded alike: keys from a counter and random() alone repeat across threads,
# and every key after the first thread's is a duplicate (answered without a write: the
# bench ran so before stop 25). setup() gives each thread its own id instead.
LUA = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local n = 0
local t = "%s"
request = function()
  n = n + 1
  local body = '{"key": "' .. t .. '-' .. tid .. '-' .. n .. '", "ttl": 3600}'
  return wrk.format("POST", "%s", {["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer %s"}, body)
end
"""

#: The endpoints measured: (path, label). A key-mode /ai/run is a lease + a queued job.
ENDPOINTS = (("/v1/check-lock", "/v1/check-lock"), ("/v1/ai/run", "/v1/ai/run (key mode)"))
CLIENTS = (1, 16, 64)

# A non-2xx answer makes the run fail; its status codes are then counted by a second
# run with this handler (which slows wrk down, so it is not on in the measured run).
LUA_STATUSES = """
response = function(status, headers, body)
  if status >= 300 then io.write("STATUS ", status, "\\n") end
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"server did not come up: {url}")


def wrk(
    port: int,
    key: str,
    conns: int,
    seconds: int,
    tmp: Path,
    statuses: bool = False,
    path: str = "/v1/check-lock",
) -> dict[str, Any]:
    script = tmp / f"cl-{conns}.lua"
    prefix = uuid.uuid4().hex[:8]
    script.write_text(LUA % (prefix, path, key) + (LUA_STATUSES if statuses else ""))
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(min(conns, 2)),
            "-c",
            str(conns),
            "-d",
            f"{seconds}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if statuses:
        codes = Counter(re.findall(r"STATUS (\d+)", out))
        print(f"non-2xx status codes at {conns} clients: {dict(codes) or 'none'}")
    sent = re.search(r"(\d+) requests in", out)
    return {
        "rps": rps,
        "p50": pct("50"),
        "p99": pct("99"),
        "non2xx": float(errors.group(1)) if errors else 0.0,
        "requests": float(sent.group(1)) if sent else 0.0,
        "prefix": prefix,
    }


def keys_written(url: str, namespace: str, prefix: str) -> int:
    """Ledger rows of one wrk run (its keys start with ``prefix``)."""
    import sqlalchemy as sa

    # SQLite: the query (?synchronous=...) is the store's option, not the driver's.
    engine = sa.create_engine(url.split("?")[0] if url.startswith("sqlite") else url)
    try:
        with engine.connect() as c:
            q = sa.text(
                "SELECT count(*) FROM onceonly_ledger WHERE namespace = :ns AND idem_key LIKE :p"
            )
            return int(c.execute(q, {"ns": namespace, "p": f"{prefix}-%"}).scalar_one())
    finally:
        engine.dispose()


# -- the floor: raw single-row INSERTs from N connections ------------------------------
_PG_FLOOR_TABLE = "oo_bench_insert_floor"
_PG_INSERT = (
    f"INSERT INTO {_PG_FLOOR_TABLE} (namespace, idem_key, tool, state, token, owner, attempt, "
    "executions, expires_at, result, created_at, updated_at) VALUES (%s, %s, 'check-lock', "
    "'succeeded', 1, %s, 1, 1, EXTRACT(EPOCH FROM statement_timestamp())::float8 + 3600, "
    "'null', EXTRACT(EPOCH FROM statement_timestamp())::float8, "
    "EXTRACT(EPOCH FROM statement_timestamp())::float8)"
)
_SQLITE_INSERT = (
    "INSERT INTO onceonly_ledger (namespace, idem_key, tool, state, token, owner, attempt, "
    "executions, expires_at, result, created_at, updated_at) VALUES (?, ?, 'check-lock', "
    "'succeeded', 1, ?, 1, 1, ?, 'null', ?, ?)"
)


def _floor_worker(kind: str, target: str, threads: int, start_at: float, seconds: float) -> int:
    """One process of the floor: ``threads`` connections inserting until the deadline."""
    import threading

    tag = uuid.uuid4().hex[:8]
    counts = [0] * threads

    def connect() -> Any:
        if kind == "postgresql":
            import psycopg

            return psycopg.connect(target, autocommit=True)
        import sqlite3

        c = sqlite3.connect(target, timeout=30, isolation_level=None, check_same_thread=False)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute("PRAGMA busy_timeout=30000")
        return c

    def insert(c: Any, key: str) -> None:
        if kind == "postgresql":
            c.execute(_PG_INSERT, (f"floor/{tag}", key, "floor"))
        else:
            now = time.time()
            c.execute(_SQLITE_INSERT, (f"floor/{tag}", key, "floor", now + 3600, now, now))

    conns = [connect() for _ in range(threads)]

    def loop(i: int) -> None:
        c, n = conns[i], 0
        for w in range(10):  # warm-up (psycopg prepares after 5 executions)
            insert(c, f"w{i}-{w}")
        time.sleep(max(0.0, start_at - time.time()))
        deadline = start_at + seconds
        while time.time() < deadline:
            insert(c, f"{i}-{n}")
            n += 1
        counts[i] = n

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for c in conns:
        c.close()
    return sum(counts)


def insert_floor(kind: str, target: str, conns: int, procs: int, seconds: float) -> float:
    """Rows/s of ``conns`` connections (over ``min(conns, procs)`` processes) doing
    single-row autocommit INSERTs, measured over ``seconds``."""
    import multiprocessing as mp

    procs = max(1, min(conns, procs))
    split = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    start_at = time.time() + 2.0 + conns * 0.02  # every process connected and warm by then
    with mp.get_context("spawn").Pool(procs) as pool:
        jobs = [
            pool.apply_async(_floor_worker, (kind, target, n, start_at, seconds)) for n in split
        ]
        total = sum(j.get(timeout=120 + seconds) for j in jobs)
    return total / seconds


def _floor_target(label: str, url: str, tmp: Path) -> tuple[str, str]:
    """(kind, target) for the floor: a psycopg conninfo with a scratch table, or a fresh
    SQLite ledger file."""
    import sqlalchemy as sa

    if url.startswith("sqlite"):
        path = tmp / f"floor-{uuid.uuid4().hex[:6]}.db"
        floor = SQLStore(f"sqlite:///{path}")
        try:
            floor.ensure_schema()
        finally:
            floor.close()
        return "sqlite", str(path)
    u = sa.make_url(url).set(drivername="postgresql")
    dsn = u.render_as_string(hide_password=False)
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {_PG_FLOOR_TABLE}")
        c.execute(f"CREATE TABLE {_PG_FLOOR_TABLE} (LIKE onceonly_ledger INCLUDING ALL)")
    return "postgresql", dsn


def _connection_budget(kind: str, target: str, want: int) -> int:
    """``want``, or fewer on a PostgreSQL shared with others: never take the server's
    last free connections (their tests would fail with "too many clients")."""
    if kind != "postgresql":
        return want
    import psycopg

    with psycopg.connect(target, autocommit=True) as c:
        row = c.execute(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
            " - (SELECT count(*) FROM pg_stat_activity)"
        ).fetchone()
    free = int(row[0]) if row else want
    return max(1, min(want, free - 12))


def _drop_tenant(url: str, tenant: str) -> None:
    """Delete the run's queued jobs and ledger rows: nothing runs the jobs (the server has
    no job workers here), and a shared database's `onceonly worker`s would take them."""
    import sqlalchemy as sa

    eng = sa.create_engine(url.split("?")[0] if url.startswith("sqlite") else url)
    try:
        with eng.begin() as c:
            c.execute(sa.text("DELETE FROM onceonly_server_jobs WHERE tenant = :t"), {"t": tenant})
            c.execute(
                sa.text("DELETE FROM onceonly_ledger WHERE namespace IN (:a, :b)"),
                {"a": f"{tenant}/make", "b": f"{tenant}/ai"},
            )
    finally:
        eng.dispose()


def _drop_floor(kind: str, target: str) -> None:
    if kind == "postgresql":
        import psycopg

        with psycopg.connect(target, autocommit=True) as c:
            c.execute(f"DROP TABLE IF EXISTS {_PG_FLOOR_TABLE}")


def run(label: str, url: str, args: argparse.Namespace, tmp: Path) -> list[str]:
    if not url.startswith("sqlite"):
        ledger = SQLStore(url)
        try:
            ledger.migrate()
        finally:
            ledger.close()
    tenant = f"bench-{uuid.uuid4().hex[:6]}"
    key = create_key(url, tenant)
    port = free_port()
    env = {**os.environ, "ONCEONLY_DB_URL": url, "PYTHONPATH": args.server_root or str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "onceonly_core.cli",
            "serve",
            "--url",
            url,
            "--port",
            str(port),
            "--workers",
            str(args.workers),
            "--job-workers",
            "0",
            *(["--threads", str(args.threads)] if args.threads else []),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows = []
    results: dict[tuple[str, int], dict[str, Any]] = {}
    floors: dict[int, float] = {}
    used: dict[int, int] = {}
    kind, target = _floor_target(label, url, tmp)
    try:
        wait_up(f"http://127.0.0.1:{port}/healthz")
        for path, _ in ENDPOINTS:
            wrk(port, key, 4, 1 if args.seconds < 2 else 2, tmp, path=path)  # warm-up
        for conns in CLIENTS:
            for path, name in ENDPOINTS:
                r = results[path, conns] = wrk(
                    port, key, conns, args.seconds, tmp, args.statuses, path=path
                )
                # Every request a new key, or the figure is a duplicate's (no write).
                ns = f"{tenant}/{'make' if path == '/v1/check-lock' else 'ai'}"
                written = keys_written(url, ns, str(r["prefix"]))
                if written < r["requests"]:
                    FAILURES.append(
                        f"{label} {path} at {conns} clients: {int(r['requests'])} requests "
                        f"wrote {written} keys (requests repeated keys)"
                    )
                rows.append(
                    f"| {label} | {name} | {conns} | {r['rps']:,.0f} | {r['p50']:.1f} | "
                    f"{r['p99']:.1f} | {int(r['non2xx'])} |"
                )
            # The floor right after the server's runs at this client count, so a loaded
            # moment of the shared machine weighs on both.
            used[conns] = _connection_budget(kind, target, conns)
            floors[conns] = insert_floor(kind, target, used[conns], args.workers, args.seconds)
            rows.append(
                f"| {label} | raw single-row INSERT, {used[conns]} connection"
                f"{'s' if used[conns] > 1 else ''} | {conns} | {floors[conns]:,.0f} | | | |"
            )
    finally:
        proc.terminate()
        proc.wait(30)
        _drop_floor(kind, target)
        _drop_tenant(url, tenant)
    for (path, conns), r in results.items():
        name = dict(ENDPOINTS)[path]
        p99_miss = conns == 64 and r["p99"] > 50
        slow = r["rps"] < 1500
        bound = (
            "per request: uvicorn's HTTP parsing, FastAPI routing and pydantic validation, "
            "the API-key check and JSON encoding in Python, on the same 2 cores as the "
            "database (see the server profile in benchmarks/README.md)"
        )
        if path == "/v1/ai/run":
            bound = (
                "one commit per request, the lease's claim writing its job row, and a "
                "longer answer; " + bound
            )
        if slow:
            bound += f"; {r['rps']:,.0f} req/s < the 1,500 req/s target"
        if p99_miss:
            bound += f"; p99 {r['p99']:,.0f} ms > the 50 ms target at 64 clients"
        floor_row(
            f"`serve` {name}, {label}, {conns} client{'s' if conns > 1 else ''} "
            f"(p99 {r['p99']:.0f} ms)",
            r["rps"],
            f"raw single-row INSERT, autocommit, {used[conns]} connection"
            f"{'s' if used[conns] > 1 else ''}"
            + (" (capped: PostgreSQL's free connections)" if used[conns] < conns else ""),
            floors[conns],
            unit="req/s",
            target=">=",
            limit=0.8,
            bound=bound,
        )
    bad = [(p, c) for (p, c), r in results.items() if r["non2xx"]]
    if bad:
        # Reported (and the run fails) after the table is printed.
        FAILURES.append(
            f"{label}: non-2xx responses at {bad} "
            f"({', '.join(str(int(results[b]['non2xx'])) for b in bad)}); "
            "rerun with --statuses to see their codes"
        )
    return rows


FAILURES: list[str] = []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--threads", type=int, default=0, help="serve --threads (0: not given, serve's default)"
    )
    ap.add_argument(
        "--server-root", default="", help="run `serve` from this source tree (A/B runs)"
    )
    ap.add_argument("--statuses", action="store_true", help="count non-2xx status codes")
    ap.add_argument("--no-sqlite", action="store_true", help="only the PostgreSQL rows")
    ap.add_argument("--no-pg", action="store_true", help="only the SQLite rows")
    ap.add_argument(
        "--pg",
        default=os.environ.get(
            "ONCEONLY_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        # Not an error: the short CI run and a machine without wrk skip the server rows.
        print("bench_server: SKIPPED, wrk is not installed (apt-get install wrk)")
        return
    rows: list[str] = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.no_sqlite:
            url = f"sqlite:///{tmp}/server.db?synchronous=normal"
            rows += run("SQLite (NORMAL)", url, args, tmp)
        if not args.no_pg:
            try:
                rows += run("PostgreSQL", args.pg, args, tmp)
            except Exception as err:  # no server: keep the SQLite rows
                rows.append(f"| PostgreSQL skipped: {err} | | | | | | |")
    print(
        f"uvicorn workers: {args.workers}; load average at the start: "
        f"{', '.join(f'{x:.2f}' for x in load0)}; at the end: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print("| ledger | endpoint / floor | clients | req/s | p50 ms | p99 ms | non-2xx |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if FAILURES:
        raise SystemExit("; ".join(FAILURES))


if __name__ == "__main__":
    main()
