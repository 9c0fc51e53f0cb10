"""SQLite, memory and async cases: the guard next to the raw stdlib-sqlite3 floor."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_common import (
    RUNS,
    SQLITE_RAW_CLAIM,
    SQLITE_RAW_FINISH,
    SQLITE_RAW_GET,
    Bench,
    BenchError,
    Result,
    Settings,
    State,
    hex_key,
    run_interleaved,
    sqlite_pragmas,
    sqlite_raw_conn,
    tempdir,
)

from onceonly_core import Guard
from onceonly_core.fingerprint import tool_identity
from onceonly_core.stores.sql import SQLStore

NS = "bench"
LEASE = 30.0
URL_SUFFIX = {"FULL": "", "NORMAL": "?synchronous=normal"}


def tool(i: int) -> int:
    """The guarded tool: trivial, so the figures are the guard's own cost."""
    RUNS[0] += 1
    return i


async def atool(i: int) -> int:
    RUNS[0] += 1
    return i


TOOL = tool_identity(tool)
OWNER = "bench-host:12345:0123abcd"  # the length of a real owner id


def _ledger_file(path: Path) -> None:
    """Create the ledger schema in ``path`` with the project's own migration."""
    store = SQLStore(f"sqlite:///{path}")
    store.migrate()
    store.close()


def _expect_runs(ran: int, expected: int, what: str) -> None:
    if ran != expected:
        raise BenchError(f"{what}: the tool ran {ran} times, expected {expected}")


def _guard(path: Path, sync: str) -> Guard:
    return Guard(f"sqlite:///{path}{URL_SUFFIX[sync]}", namespace=NS, quiet=True)


def _guard_pragmas(g: Guard) -> str:
    store = g.store
    assert isinstance(store, SQLStore)
    return sqlite_pragmas(store._sqlite_conn())


# -- first call (new key) ------------------------------------------------------------------


def guard_first(sync: str, warmup: int) -> Callable[[Path], State]:
    def setup(tmp: Path) -> State:
        g = _guard(tmp / "x.db", sync)
        g(tool, -10_000)  # opens the ledger and creates the schema: setup, not timed

        def check(n: int, ran: int) -> None:
            _expect_runs(ran, warmup + n, "first call")

        return State(lambda i: g(tool, i), check, g.close, durability=_guard_pragmas(g))

    return setup


def raw_first(sync: str, warmup: int, n: int) -> Callable[[Path], State]:
    keys = {i: hex_key("raw", i) for i in range(-warmup, n)}

    def setup(tmp: Path) -> State:
        path = tmp / "raw.db"
        _ledger_file(path)
        conn = sqlite_raw_conn(path, sync)
        ex = conn.execute

        def call(i: int) -> None:
            k = keys[i]
            now = time.time()
            ex(
                SQLITE_RAW_CLAIM,
                {"ns": NS, "k": k, "tool": TOOL, "owner": OWNER, "lease": LEASE, "now": now},
            )
            ex(SQLITE_RAW_FINISH, {"ns": NS, "k": k, "result": str(i), "now": time.time()})

        def check(n_: int, ran: int) -> None:
            done = conn.execute(
                "SELECT count(*) FROM onceonly_ledger WHERE state = 'succeeded'"
            ).fetchone()[0]
            if done != warmup + n_:
                raise BenchError(f"raw floor completed {done} rows, expected {warmup + n_}")

        return State(call, check, conn.close, durability=sqlite_pragmas(conn))

    return setup


# -- duplicate (same key again) ------------------------------------------------------------


def guard_dup(sync: str) -> Callable[[Path], State]:
    def setup(tmp: Path) -> State:
        g = _guard(tmp / "x.db", sync)
        g(tool, 7)  # the one execution; every timed call replays it

        def call(i: int) -> Any:
            return g(tool, 7)

        def check(n: int, ran: int) -> None:
            _expect_runs(ran, 0, "duplicate")
            if g(tool, 7) != 7:
                raise BenchError("the duplicate did not replay the stored result")

        return State(call, check, g.close, durability=_guard_pragmas(g))

    return setup


def raw_read(sync: str) -> Callable[[Path], State]:
    """The floor of a replay: one indexed SELECT of the stored row, nothing else."""

    def setup(tmp: Path) -> State:
        path = tmp / "raw.db"
        _ledger_file(path)
        conn = sqlite_raw_conn(path, sync)
        k = hex_key("raw", 7)
        now = time.time()
        conn.execute(
            SQLITE_RAW_CLAIM,
            {"ns": NS, "k": k, "tool": TOOL, "owner": OWNER, "lease": LEASE, "now": now},
        )
        conn.execute(SQLITE_RAW_FINISH, {"ns": NS, "k": k, "result": "7", "now": now})
        ex = conn.execute
        params = {"ns": NS, "k": k, "now": now}

        def call(i: int) -> Any:
            params["now"] = time.time()
            return ex(SQLITE_RAW_GET, params).fetchone()

        def check(n: int, ran: int) -> None:
            if call(0)[3] != "succeeded":
                raise BenchError("raw read did not find the completed row")

        return State(call, check, conn.close, durability=sqlite_pragmas(conn))

    return setup


# -- async and memory ----------------------------------------------------------------------


def guard_async(sync: str, dup: bool, warmup: int) -> Callable[[Path], State]:
    def setup(tmp: Path) -> State:
        import asyncio

        g = _guard(tmp / "x.db", sync)
        asyncio.run(g(atool, 7 if dup else -10_000))  # opens the ledger (setup)

        def call(i: int) -> Any:
            return g(atool, 7 if dup else i)

        def check(n: int, ran: int) -> None:
            _expect_runs(ran, 0 if dup else warmup + n, "async")

        return State(call, check, g.close, is_async=True, durability=_guard_pragmas(g))

    return setup


def _noop() -> None:
    return None


def to_thread_hop(tmp: Path) -> State:
    """The floor of the async path: one ``asyncio.to_thread`` round trip doing nothing."""
    import asyncio

    return State(lambda i: asyncio.to_thread(_noop), is_async=True, durability="-")


def memory(dup: bool, warmup: int) -> Callable[[Path], State]:
    def setup(tmp: Path) -> State:
        g = Guard("memory://", namespace=NS, quiet=True)
        g(tool, 7 if dup else -10_000)

        def call(i: int) -> Any:
            return g(tool, 7 if dup else i)

        def check(n: int, ran: int) -> None:
            _expect_runs(ran, 0 if dup else warmup + n, "memory")

        return State(call, check, g.close, durability="none (process memory)")

    return setup


def bare(tmp: Path) -> State:
    return State(tool)


# -- ledger size: 1k vs 1M records -----------------------------------------------------------

DUP_TARGETS = 500  # completed records (real derived keys) the duplicate case replays
DUP_BASE = 10**9  # their tool arguments
NEW_BASE = 2 * 10**9  # first calls use fresh arguments from here


def build_sqlite_template(path: Path, size: int, progress: Callable[[str], None]) -> float:
    """A ledger with ``size`` records shaped like real ones; return the fill seconds.

    ``size - DUP_TARGETS`` filler rows have random 64-hex keys (completed calls of another
    tool); DUP_TARGETS rows are genuine completed records of ``tool(DUP_BASE + j)`` with
    their derived keys, so the guard can replay them. All in one namespace: the new keys
    of the timed calls land at random places in the same primary-key index.
    """
    t0 = time.perf_counter()
    _ledger_file(path)
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")  # setup only: the template is copied per repetition
    conn.execute("PRAGMA cache_size=-262144")
    now = time.time()
    g = Guard("memory://", namespace=NS, quiet=True)
    sql = (
        SQLITE_RAW_CLAIM.replace("'running'", "'succeeded'")
        .replace("0, :now + :lease,", "1, NULL,")
        .replace("NULL, NULL, NULL, NULL, NULL, :now", "NULL, :result, NULL, NULL, NULL, :now")
    )

    def rows() -> Any:
        for j in range(size - DUP_TARGETS):
            yield {
                "ns": NS,
                "k": hex_key("fill", j),
                "tool": "fill.tool",
                "owner": OWNER,
                "lease": LEASE,
                "now": now - (size - j) * 0.01,
                "result": str(j),
            }
        for j in range(DUP_TARGETS):
            yield {
                "ns": NS,
                "k": g.key_for(tool, DUP_BASE + j),
                "tool": TOOL,
                "owner": OWNER,
                "lease": LEASE,
                "now": now,
                "result": str(DUP_BASE + j),
            }

    conn.execute("BEGIN")
    conn.executemany(sql, rows())
    conn.execute("COMMIT")
    count = conn.execute("SELECT count(*) FROM onceonly_ledger").fetchone()[0]
    if count != size:
        raise BenchError(f"prefill wrote {count} rows, expected {size}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    secs = time.perf_counter() - t0
    progress(f"  prefilled {size:,} records in {secs:.1f} s ({path.stat().st_size >> 20} MiB)")
    return secs


def raw_sized(template: Path, warmup: int, n: int) -> Callable[[Path], State]:
    """The raw floor (INSERT + UPDATE, same random-looking keys) on a prefilled ledger."""
    keys = {i: hex_key("raw-sized", i) for i in range(-warmup, n)}

    def setup(tmp: Path) -> State:
        path = tmp / "raw.db"
        shutil.copyfile(template, path)
        conn = sqlite_raw_conn(path, "NORMAL")
        ex = conn.execute
        before = conn.execute("SELECT count(*) FROM onceonly_ledger").fetchone()[0]

        def call(i: int) -> None:
            k = keys[i]
            now = time.time()
            ex(
                SQLITE_RAW_CLAIM,
                {"ns": NS, "k": k, "tool": TOOL, "owner": OWNER, "lease": LEASE, "now": now},
            )
            ex(SQLITE_RAW_FINISH, {"ns": NS, "k": k, "result": str(i), "now": time.time()})

        def check(n_: int, ran: int) -> None:
            rows = conn.execute("SELECT count(*) FROM onceonly_ledger").fetchone()[0]
            if rows != before + warmup + n_:
                raise BenchError(f"raw floor wrote {rows - before} rows, expected {warmup + n_}")

        return State(call, check, conn.close, durability=sqlite_pragmas(conn))

    return setup


def sized(template: Path, dup: bool, warmup: int) -> Callable[[Path], State]:
    def setup(tmp: Path) -> State:
        path = tmp / "x.db"
        shutil.copyfile(template, path)
        g = _guard(path, "NORMAL")
        g(tool, NEW_BASE - 10**6)  # opens the ledger: setup

        if dup:
            # Spread over the replayable records: different index pages on each call.
            def call(i: int) -> Any:
                return g(tool, DUP_BASE + (i * 7919) % DUP_TARGETS)
        else:

            def call(i: int) -> Any:
                return g(tool, NEW_BASE + i)

        def check(n: int, ran: int) -> None:
            _expect_runs(ran, 0 if dup else warmup + n, "ledger size")
            if dup and g(tool, DUP_BASE + 3) != DUP_BASE + 3:
                raise BenchError("the duplicate did not replay the stored result")

        return State(call, check, g.close, durability=_guard_pragmas(g))

    return setup


# -- the cases --------------------------------------------------------------------------------


def run(settings: Settings, progress: Callable[[str], None]) -> list[Result]:
    out: list[Result] = []
    s = settings
    reps = s.scale(7, 3)
    warm = 50

    if s.wants("bare.call"):
        out += run_interleaved(
            [Bench("bare.call", "plain Python call of the tool (reference)", bare)],
            n=s.scale(200_000, 20_000),
            reps=reps,
            warmup=100,
            progress=progress,
        )
    if s.wants_any("memory.first", "memory.dup"):
        progress("memory:// store")
        out += run_interleaved(
            [
                Bench("memory.first", "guard, memory:// store, first call", memory(False, warm)),
                Bench(
                    "memory.dup", "guard, memory:// store, duplicate (replay)", memory(True, warm)
                ),
            ],
            n=s.scale(20_000, 3_000),
            reps=reps,
            warmup=warm,
            progress=progress,
        )
    for sync in ("FULL", "NORMAL"):
        low = sync.lower()
        n = s.scale(400, 100) if sync == "FULL" else s.scale(3_000, 500)
        first = [
            Bench(
                f"sqlite.{low}.raw",
                f"raw sqlite3 INSERT + UPDATE, autocommit, {sync}",
                raw_first(sync, warm, n),
            ),
            Bench(
                f"sqlite.{low}.first",
                f"guard, sqlite {sync}, first call (new key)",
                guard_first(sync, warm),
            ),
        ]
        if any(s.wants(b.name) for b in first):
            progress(f"sqlite {sync}: first call vs raw floor ({n} calls x {reps})")
            out += run_interleaved(first, n=n, reps=reps, warmup=warm, progress=progress)
        dup = [
            Bench(
                f"sqlite.{low}.raw-read",
                f"raw sqlite3 SELECT of the stored row, {sync}",
                raw_read(sync),
            ),
            Bench(
                f"sqlite.{low}.dup",
                f"guard, sqlite {sync}, duplicate (replay)",
                guard_dup(sync),
            ),
        ]
        if any(s.wants(b.name) for b in dup):
            progress(f"sqlite {sync}: duplicate vs raw read")
            out += run_interleaved(
                dup, n=s.scale(10_000, 2_000), reps=reps, warmup=warm, progress=progress
            )

    asyncs = [
        Bench(
            "sqlite.normal.async.hop",
            "await asyncio.to_thread(no-op): one thread hop (reference)",
            to_thread_hop,
        ),
        Bench(
            "sqlite.normal.async.first",
            "await guard(async tool), sqlite NORMAL, first call",
            guard_async("NORMAL", False, warm),
        ),
        Bench(
            "sqlite.normal.async.dup",
            "await guard(async tool), sqlite NORMAL, duplicate",
            guard_async("NORMAL", True, warm),
        ),
    ]
    if any(s.wants(b.name) for b in asyncs):
        progress("sqlite NORMAL: async (to_thread hop)")
        out += run_interleaved(
            asyncs, n=s.scale(2_000, 400), reps=reps, warmup=warm, progress=progress
        )

    if s.wants_group("sqlite.size"):
        sizes = {"1k": 1_000, "1m": s.size(1_000_000)}
        n_size = s.scale(2_000, 400)
        with tempdir("oo-bench-fill-") as fill_dir:
            benches = []
            for tag, size in sizes.items():
                template = fill_dir / f"ledger-{tag}.db"
                progress(f"sqlite: prefilling {size:,} records")
                build_sqlite_template(template, size, progress)
                label = "1,000 records" if tag == "1k" else "1M records"
                benches += [
                    Bench(
                        f"sqlite.size.{tag}.raw",
                        f"raw sqlite3 INSERT + UPDATE, NORMAL, {label} in ledger",
                        raw_sized(template, warm, n_size),
                    ),
                    Bench(
                        f"sqlite.size.{tag}.first",
                        f"guard, sqlite NORMAL, first call, {label} in ledger",
                        sized(template, False, warm),
                    ),
                    Bench(
                        f"sqlite.size.{tag}.dup",
                        f"guard, sqlite NORMAL, duplicate, {label} in ledger",
                        sized(template, True, warm),
                    ),
                ]
            progress("sqlite: per-call cost vs ledger size")
            out += run_interleaved(
                benches, n=n_size, reps=s.scale(5, 3), warmup=warm, progress=progress
            )
    return out
