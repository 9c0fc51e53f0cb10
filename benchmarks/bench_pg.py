"""PostgreSQL cases: throughput with 1, 4 and 8 worker processes, a shared-keys storm,
and the per-call cost with 1k vs 1M records in the ledger.

Everything runs in a scratch database, ``onceonly_bench``, created next to the one in
ONCEONLY_PG_URL and dropped at the end. If it cannot be created, the cases run in the
given database under ``oo-bench-*`` namespaces and a scratch table, and delete both
afterwards.

Workers are separate OS processes (``spawn``), each with its own Guard or its own
psycopg connection. They start, warm up, wait on a barrier, then run for a fixed time;
the figure is the sum of the workers' calls per second.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import statistics
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_sqlite as ours
from bench_common import LEDGER_COLUMNS, BenchError, Result, Settings, Skipped, time_block

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BENCH_DB = "onceonly_bench"
BENCH_DB_2 = "onceonly_bench_1m"  # the 1M-record ledger, next to the 1k one
RAW_TABLE = "onceonly_bench_raw"
OWNER = ours.OWNER
LEASE = 30.0
NOW = "EXTRACT(EPOCH FROM statement_timestamp())::float8"

# The replay floor: the store's own read of one record by primary key (its columns and
# the server clock), on a held connection.
PG_RAW_READ = (
    f"SELECT {LEDGER_COLUMNS}, {NOW} FROM onceonly_ledger "
    "WHERE namespace = %(ns)s AND idem_key = %(k)s"
)

PG_RAW_CLAIM = (
    f"INSERT INTO {RAW_TABLE} ({LEDGER_COLUMNS}) VALUES (%(ns)s, %(k)s, %(tool)s, 'running', "
    f"1, %(owner)s, 1, 0, {NOW} + %(lease)s, NULL, NULL, NULL, NULL, NULL, NULL, {NOW}, {NOW}) "
    "ON CONFLICT (namespace, idem_key) DO NOTHING"
)
PG_RAW_FINISH = (
    f"UPDATE {RAW_TABLE} SET state = 'succeeded', result = %(result)s, error = NULL, "
    "executions = executions + 1, lease_until = NULL, expires_at = NULL, "
    f"updated_at = {NOW} WHERE namespace = %(ns)s AND idem_key = %(k)s AND token = 1 "
    "AND state = 'running'"
)

WORKER_WARMUP = 30


def pg_tool(w: int, i: int) -> int:
    """The tool of the throughput workers (distinct keys: worker id and counter)."""
    ours.RUNS[0] += 1
    return i


EXECUTED: list[int] = []


def shared_tool(i: int) -> int:
    """The tool of the shared-keys storm: records every execution in this process."""
    EXECUTED.append(i)
    return i


# -- connection handling ------------------------------------------------------------------


@dataclass
class Target:
    """Where the cases run: a scratch database (``own_db``) or namespaces in the given one."""

    admin_url: str  # the user's URL (SQLAlchemy form)
    url: str  # the URL the guards use
    conninfo: str  # the same, for plain psycopg
    own_db: bool
    server_version: str
    prefix: str = "oo-bench-"

    def ns(self, name: str) -> str:
        return self.prefix + name


def _conninfo(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _with_db(url: str, db: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).set(database=db).render_as_string(hide_password=False)


def connect(conninfo: str) -> Any:
    import psycopg

    return psycopg.connect(conninfo, autocommit=True, connect_timeout=5)


@contextlib.contextmanager
def target(progress: Callable[[str], None]) -> Iterator[Target | Skipped]:
    url = os.environ.get("ONCEONLY_PG_URL") or DEFAULT_URL
    try:
        import psycopg  # noqa: F401
    except ImportError as err:
        yield Skipped(
            "pg (all PostgreSQL rows)", f"psycopg is not installed ({err}); install .[postgres]"
        )
        return
    try:
        admin = connect(_conninfo(url))
    except Exception as err:
        yield Skipped("pg (all PostgreSQL rows)", f"{_safe(url)} is unreachable: {err}".strip())
        return
    version = admin.execute("SHOW server_version").fetchone()[0]
    own = True
    try:
        admin.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {BENCH_DB}")
        bench_url = _with_db(url, BENCH_DB)
        progress(f"pg: scratch database {BENCH_DB} created (server {version})")
    except Exception as err:
        own = False
        bench_url = url
        progress(f"pg: cannot create {BENCH_DB} ({err}); using namespaces in {_safe(url)}")
    t = Target(url, bench_url, _conninfo(bench_url), own, version)
    try:
        _prepare(t)
        yield t
    finally:
        admin.close()
        _cleanup(t, progress)


def _prepare(t: Target) -> None:
    """The ledger schema (the project's migration) and the raw floor's scratch table."""
    from onceonly_core.stores.sql import SQLStore

    store = SQLStore(t.url, auto_migrate=True)
    store.migrate()
    store.close()
    with connect(t.conninfo) as c:
        c.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
        c.execute(f"CREATE TABLE {RAW_TABLE} (LIKE onceonly_ledger INCLUDING ALL)")


def _second_db(t: Target, progress: Callable[[str], None]) -> Target:
    """Another scratch database next to the first, so two ledger sizes run side by side."""
    with connect(_conninfo(t.admin_url)) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {BENCH_DB_2} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {BENCH_DB_2}")
    url = _with_db(t.admin_url, BENCH_DB_2)
    t2 = Target(t.admin_url, url, _conninfo(url), True, t.server_version)
    _prepare(t2)
    progress(f"pg: scratch database {BENCH_DB_2} created")
    return t2


def _cleanup(t: Target, progress: Callable[[str], None]) -> None:
    """Drop the scratch database (or our namespaces); retried, as a server may be
    restarting under us (other test suites share it)."""
    for attempt in range(10):
        try:
            if t.own_db:
                with connect(_conninfo(t.admin_url)) as c:
                    for db in (BENCH_DB, BENCH_DB_2):
                        c.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
                progress(f"pg: scratch databases {BENCH_DB}, {BENCH_DB_2} dropped")
            else:
                with connect(t.conninfo) as c:
                    c.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
                    c.execute(
                        "DELETE FROM onceonly_ledger WHERE namespace LIKE %s", (t.prefix + "%",)
                    )
                progress("pg: bench namespaces and scratch table removed")
            return
        except Exception as err:
            if attempt == 9:
                progress(f"pg: cleanup failed, remove {BENCH_DB} by hand: {err}")
            time.sleep(1.0)


def _safe(url: str) -> str:
    import sqlalchemy as sa

    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<ONCEONLY_PG_URL>"


def _reset(t: Target, table: str, ns: str | None = None) -> None:
    """Fresh state before a run (setup, untimed)."""
    with connect(t.conninfo) as c:
        if t.own_db:
            c.execute(f"TRUNCATE {table}")
        elif ns is not None:
            c.execute(f"DELETE FROM {table} WHERE namespace = %s", (ns,))


# -- worker processes -------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process from /proc (Linux), or NaN."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class _Cpu:
    """CPU seconds spent by this worker and by its PostgreSQL backend over the timed run
    (the server runs on this machine; a remote one reads as NaN)."""

    def __init__(self, backend_pid: int | None) -> None:
        self.backend_pid = backend_pid
        self.client0 = time.process_time()
        self.server0 = _proc_cpu(backend_pid) if backend_pid else float("nan")

    def done(self) -> dict[str, float]:
        server = _proc_cpu(self.backend_pid) if self.backend_pid else float("nan")
        return {"client": time.process_time() - self.client0, "server": server - self.server0}


def _guard_backend_pid(g: Any) -> int | None:
    """The backend of the guard's one pooled connection (a single-threaded worker)."""
    engine = g.store.engine()
    with engine.connect() as c:
        pid = int(c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
    return pid if engine.pool.checkedin() == 1 else None


def _guard_worker(url: str, ns: str, wid: int, duration: float, barrier: Any, q: Any) -> None:
    try:
        from onceonly_core import Guard

        g = Guard(url, namespace=ns, quiet=True)
        for j in range(WORKER_WARMUP):
            g(pg_tool, wid, -1 - j)
        backend = _guard_backend_pid(g)
        start = ours.RUNS[0]
        barrier.wait()
        cpu = _Cpu(backend)
        t0 = time.perf_counter_ns()
        end = t0 + int(duration * 1e9)
        i = 0
        while True:
            g(pg_tool, wid, i)
            i += 1
            if time.perf_counter_ns() >= end:
                break
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        used = cpu.done()
        g.close()
        err = None if ours.RUNS[0] - start == i else f"ran {ours.RUNS[0] - start}, called {i}"
        q.put((wid, i, elapsed, err, used))
    except BaseException:
        with contextlib.suppress(Exception):
            barrier.abort()
        q.put((wid, 0, 0.0, traceback.format_exc(), None))


def _raw_worker(conninfo: str, ns: str, wid: int, duration: float, barrier: Any, q: Any) -> None:
    try:
        conn = connect(conninfo)
        cur = conn.cursor()
        params: dict[str, Any] = {"ns": ns, "tool": "bench_pg.pg_tool", "owner": OWNER}
        params["lease"] = LEASE

        def call(i: int) -> None:
            params["k"] = hashlib.sha256(f"{ns}:{wid}:{i}".encode()).hexdigest()
            params["result"] = str(i)
            cur.execute(PG_RAW_CLAIM, params)
            cur.execute(PG_RAW_FINISH, params)

        for j in range(WORKER_WARMUP):
            call(-1 - j)
        backend = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        barrier.wait()
        cpu = _Cpu(backend)
        t0 = time.perf_counter_ns()
        end = t0 + int(duration * 1e9)
        i = 0
        while True:
            call(i)
            i += 1
            if time.perf_counter_ns() >= end:
                break
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        used = cpu.done()
        conn.close()
        q.put((wid, i, elapsed, None, used))
    except BaseException:
        with contextlib.suppress(Exception):
            barrier.abort()
        q.put((wid, 0, 0.0, traceback.format_exc(), None))


def _shared_worker(url: str, ns: str, wid: int, keys: int, barrier: Any, q: Any) -> None:
    try:
        from onceonly_core import Guard

        g = Guard(url, namespace=ns, quiet=True, wait=60.0)
        g(shared_tool, -1 - wid)  # connect and warm up on a key of its own
        EXECUTED.clear()
        errors: Counter[str] = Counter()
        barrier.wait()
        t0 = time.perf_counter_ns()
        for i in range(keys):
            try:
                if g(shared_tool, i) != i:
                    errors["wrong result"] += 1
            except Exception as err:
                errors[type(err).__name__] += 1
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        g.close()
        q.put((wid, list(EXECUTED), elapsed, dict(errors) or None, None))
    except BaseException:
        with contextlib.suppress(Exception):
            barrier.abort()
        q.put((wid, [], 0.0, traceback.format_exc(), None))


def _spawn(fn: Callable[..., None], n: int, args: Callable[[int], tuple[Any, ...]]) -> list[Any]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n + 1)
    q = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(*args(w), barrier, q), daemon=True) for w in range(n)]
    for p in procs:
        p.start()
    with contextlib.suppress(Exception):  # a worker failed before the start: it says why
        barrier.wait(timeout=120)
    out = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    failed = [r for r in out if r[3] and not isinstance(r[3], dict)]
    if failed:
        raise RuntimeError(f"worker failed: {failed[0][3]}")
    return out


# -- cases ------------------------------------------------------------------------------------


def throughput(t: Target, settings: Settings, progress: Callable[[str], None]) -> list[Result]:
    s = settings
    duration = s.scale(3, 1)
    reps = s.scale(3, 2)
    levels = tuple(p for p in (1, 4, 8) if s.wants_any(f"pg.p{p}.guard", f"pg.p{p}.raw"))
    if not levels:
        return []
    rates: dict[str, list[float]] = {}
    totals: dict[str, list[int]] = {}
    cpu_us: dict[tuple[str, str], list[float]] = {}
    progress(f"pg: throughput, {duration} s per run, {reps} repetitions, workers {levels}")
    for r in range(reps):
        line = []
        for p in levels:
            for kind in ("guard", "raw"):
                name = f"pg.p{p}.{kind}"
                ns = t.ns(f"tp-{kind}-{p}-{r}")
                if kind == "guard":
                    _reset(t, "onceonly_ledger", ns)
                    out = _spawn(_guard_worker, p, lambda w, ns=ns: (t.url, ns, w, duration))
                else:
                    _reset(t, RAW_TABLE, ns)
                    out = _spawn(_raw_worker, p, lambda w, ns=ns: (t.conninfo, ns, w, duration))
                rate = sum(count / elapsed for _, count, elapsed, _, _ in out)
                calls = sum(count for _, count, _, _, _ in out)
                rates.setdefault(name, []).append(rate)
                totals.setdefault(name, []).append(calls)
                for side in ("client", "server"):
                    used = sum(cpu[side] for *_, cpu in out)
                    cpu_us.setdefault((name, side), []).append(used / calls * 1e6)
                client, server = cpu_us[name, "client"][-1], cpu_us[name, "server"][-1]
                line.append(f"{name} {rate:,.0f}/s (cpu/call {client:.0f} + {server:.0f} us)")
        progress(f"  rep {r + 1}/{reps}: " + ", ".join(line))
    results = []
    for name, values in rates.items():
        p = int(name.split(".")[1][1:])
        kind = name.split(".")[2]
        label = (
            f"guard, {p} worker process{'es' if p > 1 else ''}, distinct keys"
            if kind == "guard"
            else f"raw psycopg INSERT ON CONFLICT + UPDATE, {p} process{'es' if p > 1 else ''}"
        )
        results.append(
            Result(
                name,
                label,
                "calls/s",
                values,
                n=min(totals[name]),
                reps=len(values),
                durability="synchronous_commit=on",
                note=f"{duration} s per run",
                group="pg.throughput",  # guard and raw runs alternate: repetitions pair up
                extra={
                    "workers": p,
                    "calls_per_rep": totals[name],
                    # CPU per call on this machine (workers and their backends share it)
                    "client_cpu_us_per_call": _median(cpu_us[name, "client"]),
                    "server_cpu_us_per_call": _median(cpu_us[name, "server"]),
                },
            )
        )
    return results


def _median(values: list[float]) -> float | None:
    finite = [v for v in values if v == v]
    return round(statistics.median(finite), 1) if finite else None


def shared_keys(t: Target, settings: Settings, progress: Callable[[str], None]) -> list[Result]:
    s = settings
    workers = 8
    keys = s.scale(1_000, 200)
    reps = s.scale(3, 1)
    rates, dups, runs_total = [], [], []
    ledger_execs = []
    progress(f"pg: shared keys, {workers} processes x the same {keys} keys, {reps} reps")
    for r in range(reps):
        ns = t.ns(f"shared-{r}")
        _reset(t, "onceonly_ledger", ns)
        t0 = time.perf_counter()
        out = _spawn(_shared_worker, workers, lambda w, ns=ns: (t.url, ns, w, keys))
        wall = time.perf_counter() - t0
        executed: Counter[int] = Counter()
        errors: Counter[str] = Counter()
        for _, ran, _, errs, _ in out:
            executed.update(ran)
            errors.update(errs or {})
        longest = max(elapsed for _, _, elapsed, _, _ in out)
        duplicates = sum(c - 1 for c in executed.values())
        missing = keys - len(executed)
        with connect(t.conninfo) as c:
            row = c.execute(
                "SELECT count(*), coalesce(sum(executions), 0), coalesce(max(executions), 0) "
                "FROM onceonly_ledger WHERE namespace = %s AND idem_key IS NOT NULL "
                "AND state = 'succeeded'",
                (ns,),
            ).fetchone()
        # Each worker's own warm-up key is in the namespace too: one execution each.
        ledger_execs.append(int(row[1]) - workers)
        rates.append(workers * keys / longest)
        dups.append(duplicates)
        runs_total.append(sum(executed.values()))
        progress(
            f"  rep {r + 1}/{reps}: {workers * keys} calls in {longest:.2f} s "
            f"(wall {wall:.1f} s incl. start), executions {sum(executed.values())} for "
            f"{keys} keys, duplicates {duplicates}, missing {missing}, ledger executions "
            f"{int(row[1]) - workers}, errors {dict(errors) or 0}"
        )
        if errors:
            raise BenchError(f"shared-keys workers raised: {dict(errors)}")
    return [
        Result(
            "pg.shared.p8",
            f"guard, {workers} processes calling the same {keys} keys",
            "calls/s",
            rates,
            n=workers * keys,
            reps=reps,
            durability="synchronous_commit=on",
            note="mostly waits and replays; counts executions",
            extra={
                "keys": keys,
                "workers": workers,
                "executions": runs_total,
                "duplicates": dups,
                "duplicates_total": sum(dups),
                "ledger_executions": ledger_execs,
            },
        )
    ]


DUP_TARGETS = ours.DUP_TARGETS
DUP_BASE = ours.DUP_BASE
NEW_BASE = ours.NEW_BASE


def _fill(t: Target, ns: str, size: int, progress: Callable[[str], None]) -> None:
    """``size`` records in ``ns``: random filler plus DUP_TARGETS replayable records."""
    from onceonly_core import Guard

    t0 = time.perf_counter()
    g = Guard("memory://", namespace=ns, quiet=True)
    with connect(t.conninfo) as c:
        if t.own_db:
            c.execute("TRUNCATE onceonly_ledger")
        else:
            c.execute("DELETE FROM onceonly_ledger WHERE namespace = %s", (ns,))
        c.execute(
            f"INSERT INTO onceonly_ledger ({LEDGER_COLUMNS}) "
            "SELECT %(ns)s, md5(g::text) || md5((-g)::text), 'fill.tool', 'succeeded', 1, "
            "%(owner)s, 1, 1, NULL, NULL, NULL, g::text, NULL, NULL, NULL, "
            f"{NOW} - g * 0.01, {NOW} - g * 0.01 "
            "FROM generate_series(1, %(count)s) AS g",
            {"ns": ns, "owner": OWNER, "count": size - DUP_TARGETS},
        )
        with c.cursor() as cur:
            cur.executemany(
                f"INSERT INTO onceonly_ledger ({LEDGER_COLUMNS}) VALUES (%(ns)s, %(k)s, "
                "%(tool)s, 'succeeded', 1, %(owner)s, 1, 1, NULL, NULL, NULL, %(result)s, NULL, "
                f"NULL, NULL, {NOW} - 1, {NOW} - 1)",
                [
                    {
                        "ns": ns,
                        "k": g.key_for(ours.tool, DUP_BASE + j),
                        "tool": ours.TOOL,
                        "owner": OWNER,
                        "result": str(DUP_BASE + j),
                    }
                    for j in range(DUP_TARGETS)
                ],
            )
        # The raw floor gets the same records in its scratch table.
        c.execute(f"TRUNCATE {RAW_TABLE}")
        c.execute(
            f"INSERT INTO {RAW_TABLE} SELECT * FROM onceonly_ledger WHERE namespace = %s", (ns,)
        )
        c.execute("VACUUM ANALYZE onceonly_ledger")
        c.execute(f"VACUUM ANALYZE {RAW_TABLE}")
        # Flush the fill's dirty pages now, or a background checkpoint competes with the
        # timed calls' commits (needs superuser or pg_checkpoint; skipped otherwise).
        with contextlib.suppress(Exception):
            c.execute("CHECKPOINT")
        count = c.execute(
            "SELECT count(*) FROM onceonly_ledger WHERE namespace = %s", (ns,)
        ).fetchone()[0]
    if count != size:
        raise BenchError(f"prefill wrote {count} rows, expected {size}")
    progress(f"  prefilled {size:,} records in {time.perf_counter() - t0:.1f} s")


def sizes(t: Target, settings: Settings, progress: Callable[[str], None]) -> list[Result]:
    """Per-call cost with 1k and with 1M records in the ledger (one client, this process).

    With scratch databases, the 1k ledger (onceonly_bench) and the 1M one
    (onceonly_bench_1m) are measured side by side, in interleaved blocks. Without them
    (namespaces in the user's database) the sizes run one after the other.
    """
    s = settings
    if not s.wants_group("pg.size"):
        return []
    sizes = {"1k": 1_000, "1m": s.size(1_000_000)}
    figures: dict[str, list[float]] = {}
    if t.own_db:
        live = {"1k": t, "1m": _second_db(t, progress)}
        for tag, size in sizes.items():
            progress(f"pg: prefilling {size:,} records ({live[tag].conninfo.rsplit('/', 1)[1]})")
            _fill(live[tag], t.ns("size"), size, progress)
        figures = _measure_sizes(live, s, progress)
    else:
        for tag, size in sizes.items():
            progress(f"pg: prefilling {size:,} records")
            _fill(t, t.ns("size"), size, progress)
            figures.update(_measure_sizes({tag: t}, s, progress))
    n_first, n_dup = s.scale(1_000, 200), s.scale(2_000, 400)
    results = []
    group = "pg.size" if t.own_db else ""
    for name, values in figures.items():
        _, _, tag, kind = name.split(".")
        label = "1,000 records" if tag == "1k" else "1M records"
        what = {
            "raw": f"raw psycopg INSERT + UPDATE, 1 client, {label} in table",
            "first": f"guard, pg 1 client, first call, {label} in ledger",
            "dup": f"guard, pg 1 client, duplicate seen done before (a retry), {label} in ledger",
            "cold": f"guard, pg 1 client, duplicate seen for the first time, {label} in ledger",
            "read": f"raw psycopg SELECT of the stored row by primary key, {label} in ledger",
        }[kind]
        results.append(
            Result(
                name,
                what,
                "us/call",
                values,
                n_dup if kind in ("dup", "cold", "read") else n_first,
                len(values),
                "synchronous_commit=on",
                group=group,
            )
        )
    return results


def _measure_sizes(
    live: dict[str, Target], s: Settings, progress: Callable[[str], None]
) -> dict[str, list[float]]:
    from onceonly_core import Guard

    reps = s.scale(5, 3)
    n_first = s.scale(1_000, 200)
    n_dup = s.scale(2_000, 400)
    chunks = 10
    warm = 50
    out: dict[str, list[float]] = {
        f"pg.size.{tag}.{kind}": []
        for tag in live
        for kind in ("raw", "first", "dup", "cold", "read")
    }
    for r in range(reps):
        with contextlib.ExitStack() as stack:
            calls: dict[str, Callable[[int], Any]] = {}
            starts: dict[str, float] = {}
            guards: dict[str, Any] = {}
            for tag, t in live.items():
                ns = t.ns("size")
                c = stack.enter_context(connect(t.conninfo))
                starts[tag] = c.execute(f"SELECT {NOW}").fetchone()[0]
                cur = c.cursor()
                params: dict[str, Any] = {"ns": ns, "tool": ours.TOOL, "owner": OWNER}
                params["lease"] = LEASE

                def raw(i: int, cur: Any = cur, p: dict[str, Any] = params, r: int = r) -> None:
                    p["k"] = hashlib.sha256(f"raw-size:{r}:{i}".encode()).hexdigest()
                    p["result"] = str(i)
                    cur.execute(PG_RAW_CLAIM, p)
                    cur.execute(PG_RAW_FINISH, p)

                g = Guard(t.url, namespace=ns, quiet=True)
                stack.callback(g.close)
                g(ours.tool, NEW_BASE - 10**6)  # connect: setup
                guards[tag] = g
                base = NEW_BASE + r * 10**6
                calls[f"pg.size.{tag}.raw"] = raw
                calls[f"pg.size.{tag}.first"] = lambda i, g=g, b=base: g(ours.tool, b + i)
                calls[f"pg.size.{tag}.dup"] = lambda i, g=g: g(
                    ours.tool, DUP_BASE + (i * 7919) % DUP_TARGETS
                )
                # A replay is a retry in the same process (the key seen done: one read)
                # or the first sight of a done key (the claim): `dup` times the former
                # (every target replayed once before the timing), `cold` the latter, on
                # a second Guard that forgets what it has seen before each call.
                for j in range(DUP_TARGETS):
                    g(ours.tool, DUP_BASE + j)
                cold = Guard(t.url, namespace=ns, quiet=True)
                stack.callback(cold.close)
                cold(ours.tool, NEW_BASE - 10**6)  # connect: setup

                def first_sight(i: int, g: Any = cold) -> Any:
                    g._done.clear()
                    return g(ours.tool, DUP_BASE + (i * 7919) % DUP_TARGETS)

                calls[f"pg.size.{tag}.cold"] = first_sight
                dup_keys = [g.key_for(ours.tool, DUP_BASE + j) for j in range(DUP_TARGETS)]

                def read(i: int, cur: Any = cur, ns: str = ns, keys: list[str] = dup_keys) -> None:
                    cur.execute(PG_RAW_READ, {"ns": ns, "k": keys[(i * 7919) % DUP_TARGETS]})
                    if cur.fetchone() is None:
                        raise BenchError("the raw read found no record")

                calls[f"pg.size.{tag}.read"] = read
            ran = ours.RUNS[0]
            for name, call in calls.items():
                if not name.endswith((".dup", ".cold", ".read")):
                    for i in range(-warm, 0):
                        call(i)
            total = dict.fromkeys(calls, 0.0)
            for kind, n in (("first", n_first), ("dup", n_dup)):
                order = [
                    k
                    for k in calls
                    if k.endswith(f".{kind}")
                    or (kind == "first" and k.endswith(".raw"))
                    or (kind == "dup" and k.endswith((".read", ".cold")))
                ]
                size = -(-n // chunks)
                done = 0
                while done < n:
                    m = min(size, n - done)
                    for name in order:
                        total[name] += time_block(calls[name], done, m) * m
                    done += m
                    order = order[::-1]
            expected = len(live) * (warm + n_first)
            ours._expect_runs(ours.RUNS[0] - ran, expected, "pg ledger size")
            for g in guards.values():
                if g(ours.tool, DUP_BASE + 3) != DUP_BASE + 3:
                    raise BenchError("the duplicate did not replay the stored result")
            for name, t_us in total.items():
                n_name = n_dup if name.endswith((".dup", ".cold", ".read")) else n_first
                out[name].append(t_us / n_name)
        # The next repetition starts from the same ledgers: drop this one's new rows.
        for tag, t in live.items():
            with connect(t.conninfo) as c:
                for table in ("onceonly_ledger", RAW_TABLE):
                    c.execute(
                        f"DELETE FROM {table} WHERE namespace = %s AND created_at >= %s",
                        (t.ns("size"), starts[tag]),
                    )
        progress(f"  rep {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in out.items()))
    return out


def run(settings: Settings, progress: Callable[[str], None]) -> tuple[list[Result], list[Skipped]]:
    s = settings
    if not s.wants_group("pg"):
        return [], []
    results: list[Result] = []
    skipped: list[Skipped] = []
    with target(progress) as t:
        if isinstance(t, Skipped):
            progress(f"pg: SKIPPED: {t.reason}")
            return [], [t]
        stages: list[tuple[str, Callable[[], list[Result]]]] = [
            ("pg.p", lambda: throughput(t, s, progress)),
            ("pg.shared", lambda: shared_keys(t, s, progress) if s.wants("pg.shared.p8") else []),
            ("pg.size", lambda: sizes(t, s, progress)),
        ]
        for stage, fn in stages:
            try:
                results += fn()
            except BenchError:
                raise
            except Exception as err:  # the server went away (restarted, stopped) mid-run
                reason = f"aborted: {type(err).__name__}: {str(err).strip().splitlines()[0]}"
                progress(f"pg: {stage}* {reason}")
                skipped.append(Skipped(stage + "*", reason))
        for r in results:
            r.extra["server"] = f"PostgreSQL {t.server_version}"
    return results, skipped
