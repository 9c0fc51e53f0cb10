"""The peer libraries, each next to our guard at its own durability setting.

* ledger-once 0.1.5 (module ``ledger``): WAL + synchronous=NORMAL, set by the library.
  Compared with ``sqlite:///x.db?synchronous=normal``.
* safeagent-exec-guard 0.1.25: WAL and SQLite's default synchronous, FULL here. Compared
  with our default ``sqlite:///x.db`` (FULL). Two entry points: the store's
  ``claim``/``settle`` pair and ``SettlementRequestRegistry(sqlite_path=...).execute``.

Each repetition gives every library a fresh database file in a fresh temp dir. The
durability column is read back from each library's own connection, not assumed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_sqlite as ours
from bench_common import (
    Bench,
    BenchError,
    Result,
    Settings,
    Skipped,
    State,
    hex_key,
    run_interleaved,
    sqlite_pragmas,
    tempdir,
)

_IMPORT_DIR: list[Any] = []  # keeps ledger's import-time database out of the work tree


def _ledger_module() -> Any:
    """Import ``ledger`` with its import-time database pointed at a scratch dir.

    ledger-once reads LEDGER_DB when it is imported and creates that file at once (for
    its module-level ``guard``); every repetition then builds its own ``_SQLite`` store.
    """
    if "ledger" not in sys.modules:
        scratch = tempdir("oo-bench-ledger-import-")
        path = scratch.__enter__()
        _IMPORT_DIR.append(scratch)
        os.environ["LEDGER_DB"] = str(path / "import.db")
        os.environ["LEDGER_QUIET"] = "1"
    import ledger

    return ledger


def ledger_first(warmup: int) -> Callable[[Path], State]:
    def setup(tmp: Path) -> State:
        ledger = _ledger_module()
        store = ledger._SQLite(str(tmp / "ledger.db"))
        lg = ledger.Guard(store=store).quiet()
        lg(ours.tool, -10_000)

        def check(n: int, ran: int) -> None:
            ours._expect_runs(ran, warmup + n, "ledger-once first call")

        def close() -> None:
            store._conn().close()

        return State(
            lambda i: lg(ours.tool, i), check, close, durability=sqlite_pragmas(store._conn())
        )

    return setup


def ledger_dup(tmp: Path) -> State:
    ledger = _ledger_module()
    store = ledger._SQLite(str(tmp / "ledger.db"))
    lg = ledger.Guard(store=store).quiet()
    lg.policy(ours.tool, replay=True)  # hand back the stored result, as ours does
    lg(ours.tool, 7)

    def check(n: int, ran: int) -> None:
        ours._expect_runs(ran, 0, "ledger-once duplicate")
        if lg(ours.tool, 7) != 7:
            raise BenchError("ledger-once did not replay the result")

    def close() -> None:
        store._conn().close()

    return State(lambda i: lg(ours.tool, 7), check, close, durability=sqlite_pragmas(store._conn()))


def _safeagent_store(tmp: Path) -> Any:
    from safeagent_exec_guard.sqlite_store import SQLiteExecutionStore

    return SQLiteExecutionStore(str(tmp / "safeagent.db"))


def safeagent_store_first(warmup: int, n: int) -> Callable[[Path], State]:
    keys = {i: hex_key("sa", i) for i in range(-warmup, n)}

    def setup(tmp: Path) -> State:
        st = _safeagent_store(tmp)

        def call(i: int) -> None:
            k = keys[i]
            if st.claim(k, "tool"):
                st.settle(k, {"result": ours.tool(i)})

        def check(n_: int, ran: int) -> None:
            ours._expect_runs(ran, warmup + n_, "safeagent store first call")

        return State(call, check, st._conn.close, durability=sqlite_pragmas(st._conn))

    return setup


def safeagent_store_dup(tmp: Path) -> State:
    st = _safeagent_store(tmp)
    k = hex_key("sa", 7)
    st.claim(k, "tool")
    st.settle(k, {"result": ours.tool(7)})

    def call(i: int) -> Any:
        # The claim is refused (IntegrityError, rollback); the caller then reads the result.
        if st.claim(k, "tool"):
            raise BenchError("safeagent granted a second claim")
        return st.get(k)["result"]["result"]

    def check(n: int, ran: int) -> None:
        ours._expect_runs(ran, 0, "safeagent store duplicate")
        if call(0) != 7:
            raise BenchError("safeagent store did not return the stored result")

    return State(call, check, st._conn.close, durability=sqlite_pragmas(st._conn))


def _registry(tmp: Path) -> Any:
    from settlement.settlement_requests import SettlementRequestRegistry

    return SettlementRequestRegistry(sqlite_path=str(tmp / "safeagent.db"))


def _execute_fn(payload: dict[str, Any]) -> Any:
    return ours.tool(payload["i"])


def safeagent_registry_first(warmup: int, n: int) -> Callable[[Path], State]:
    keys = {i: hex_key("sa", i) for i in range(-warmup, n)}

    def setup(tmp: Path) -> State:
        reg = _registry(tmp)

        def call(i: int) -> Any:
            return reg.execute(
                request_id=keys[i], action="tool", payload={"i": i}, execute_fn=_execute_fn
            )

        def check(n_: int, ran: int) -> None:
            ours._expect_runs(ran, warmup + n_, "safeagent registry first call")

        return State(
            call, check, reg.sqlite._conn.close, durability=sqlite_pragmas(reg.sqlite._conn)
        )

    return setup


def safeagent_registry_dup(tmp: Path) -> State:
    reg = _registry(tmp)
    k = hex_key("sa", 7)
    reg.execute(request_id=k, action="tool", payload={"i": 7}, execute_fn=_execute_fn)

    def call(i: int) -> Any:
        return reg.execute(request_id=k, action="tool", payload={"i": 7}, execute_fn=_execute_fn)

    def check(n: int, ran: int) -> None:
        ours._expect_runs(ran, 0, "safeagent registry duplicate")
        if call(0)["reason"] != "dedup_same_request_id":
            raise BenchError("safeagent registry did not dedup")

    return State(call, check, reg.sqlite._conn.close, durability=sqlite_pragmas(reg.sqlite._conn))


def run(settings: Settings, progress: Callable[[str], None]) -> tuple[list[Result], list[Skipped]]:
    s = settings
    out: list[Result] = []
    skipped: list[Skipped] = []
    reps = s.scale(7, 3)
    warm = 50
    try:
        _ledger_module()
    except ImportError as err:
        skipped.append(Skipped("peers.ledger", f"ledger-once is not installed ({err})"))
    try:
        import safeagent_exec_guard.sqlite_store  # noqa: F401
        import settlement.settlement_requests  # noqa: F401
    except ImportError as err:
        skipped.append(Skipped("peers.safeagent", f"safeagent-exec-guard is not installed ({err})"))
    missing = {sk.name for sk in skipped}

    # ledger-once at NORMAL, next to ours at NORMAL.
    if "peers.ledger" not in missing:
        n = s.scale(3_000, 500)
        first = [
            Bench(
                "peers.normal.ours.first",
                "onceonly guard, sqlite NORMAL, first call",
                ours.guard_first("NORMAL", warm),
            ),
            Bench(
                "peers.normal.ledger.first",
                "ledger-once guard, first call",
                ledger_first(warm),
                note="key derived from args, like ours",
            ),
        ]
        dup = [
            Bench(
                "peers.normal.ours.dup",
                "onceonly guard, sqlite NORMAL, duplicate (replay)",
                ours.guard_dup("NORMAL"),
            ),
            Bench(
                "peers.normal.ledger.dup",
                "ledger-once guard, duplicate (replay=True)",
                ledger_dup,
                note="each duplicate commits an UPDATE of its counters",
            ),
        ]
        if any(s.wants(b.name) for b in first):
            progress(f"peers: ledger-once vs ours at NORMAL, first call ({n} x {reps})")
            out += run_interleaved(first, n=n, reps=reps, warmup=warm, progress=progress)
        if any(s.wants(b.name) for b in dup):
            progress("peers: ledger-once vs ours at NORMAL, duplicate")
            out += run_interleaved(
                dup, n=s.scale(5_000, 1_000), reps=reps, warmup=warm, progress=progress
            )

    # safeagent at FULL, next to ours at FULL (our default URL).
    if "peers.safeagent" not in missing:
        n = s.scale(400, 100)
        first = [
            Bench(
                "peers.full.ours.first",
                "onceonly guard, sqlite FULL (default), first call",
                ours.guard_first("FULL", warm),
            ),
            Bench(
                "peers.full.safeagent-store.first",
                "safeagent SQLiteExecutionStore claim + settle",
                safeagent_store_first(warm, n),
                note="caller supplies the request id",
            ),
            Bench(
                "peers.full.safeagent-registry.first",
                "safeagent SettlementRequestRegistry.execute, first",
                safeagent_registry_first(warm, n),
                note="caller supplies the request id",
            ),
        ]
        dup = [
            Bench(
                "peers.full.ours.dup",
                "onceonly guard, sqlite FULL (default), duplicate",
                ours.guard_dup("FULL"),
            ),
            Bench(
                "peers.full.safeagent-store.dup",
                "safeagent store: claim refused, then get()",
                safeagent_store_dup,
            ),
            Bench(
                "peers.full.safeagent-registry.dup",
                "safeagent SettlementRequestRegistry.execute, duplicate",
                safeagent_registry_dup,
            ),
        ]
        if any(s.wants(b.name) for b in first):
            progress(f"peers: safeagent vs ours at FULL, first call ({n} x {reps})")
            out += run_interleaved(first, n=n, reps=reps, warmup=warm, progress=progress)
        if any(s.wants(b.name) for b in dup):
            progress("peers: safeagent vs ours at FULL, duplicate")
            out += run_interleaved(
                dup, n=s.scale(5_000, 1_000), reps=reps, warmup=warm, progress=progress
            )
    return out, skipped
