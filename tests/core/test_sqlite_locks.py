"""The embedded ledger never drops SQLite's own file locks.

POSIX record locks belong to the process, and closing *any* descriptor of a file drops
them all. SQLite in WAL mode keeps a shared lock on the database file for as long as a
connection is open; if we opened and closed the database file ourselves (e.g. to flock it
while creating the schema), that lock would vanish, and the last *other* process to close
its connection would checkpoint and delete the WAL under our open connection — lost
commits, then "database disk image is malformed". Seen once in a retry storm before the
schema lock moved to a separate file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from _sqlite import count_thread_hops, holder_lock_state
from onceonly_core.stores import NewClaim
from onceonly_core.stores.sql import SQLStore


def test_creating_the_schema_keeps_sqlite_s_shared_lock(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    store = SQLStore(f"sqlite:///{db}")
    rec = store.claim("ns", "k", NewClaim("tool", "me", 30.0))  # creates and migrates
    assert rec.mine
    # Our connection is open in WAL mode, so another process must see SQLite's shared lock.
    assert holder_lock_state(db) == "held"
    store.close()
    assert holder_lock_state(db) == "free"  # the probe itself can tell the difference


def test_async_calls_on_normal_wait_for_a_held_write_lock_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite WAL NORMAL runs an async call's primitives on the event loop (no thread
    hop) only while nobody else holds the write lock: a claim that would wait is not
    written, runs again in a worker thread, and the loop keeps running meanwhile."""
    import asyncio
    import sqlite3

    from onceonly_core import Guard

    g = Guard(f"sqlite:///{tmp_path / 'l.db'}?synchronous=normal", quiet=True)
    assert g.store.nowait
    ran: list[int] = []

    async def tool(x: int) -> int:
        ran.append(x)
        return x

    hops = count_thread_hops(monkeypatch)
    assert asyncio.run(g(tool, 0)) == 0  # the first use checks the schema, in a thread
    hops.clear()
    assert asyncio.run(g(tool, 1)) == 1  # nobody holds the lock: no worker thread
    assert hops == []

    other = sqlite3.connect(str(tmp_path / "l.db"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another connection holds the write lock

    async def locked() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        tick = asyncio.create_task(ticker())
        call = asyncio.create_task(g(tool, 2))
        await asyncio.sleep(0.2)
        assert not call.done() and ran == [0, 1]  # waiting for the lock, in a thread
        assert len(hops) == 1
        before = ticks
        other.execute("COMMIT")
        assert await call == 2
        assert before >= 5  # the loop ran while the claim waited
        tick.cancel()

    asyncio.run(locked())
    assert ran == [0, 1, 2]
    assert asyncio.run(g(tool, 2)) == 2 and ran == [0, 1, 2]  # recorded once: a replay
    other.close()
    g.close()


@pytest.mark.parametrize("sync", ["full", "extra", "normal"])
def test_only_normal_runs_primitives_without_waiting(tmp_path: Path, sync: str) -> None:
    from onceonly_core.stores.base import Store, WouldBlock

    store = SQLStore(f"sqlite:///{tmp_path / 'l.db'}?synchronous={sync}")
    assert store.nowait is (sync == "normal")

    def claim(s: Store) -> bool:
        return s.claim("ns", "k", NewClaim("tool", "me", 30.0)).mine

    with pytest.raises(WouldBlock):  # unchecked schema: a first use may migrate, under a lock
        store.run_nowait(claim)
    store.ensure_schema()
    if sync == "normal":
        assert store.run_nowait(claim)
    else:
        with pytest.raises(WouldBlock):  # FULL and EXTRA fsync each commit: a wait
            store.run_nowait(claim)
    store.close()


def test_async_on_normal_keeps_the_async_outcomes(tmp_path: Path) -> None:
    """The primitives that run on the loop give what the worker thread gave: a result
    recorded and replayed, a failure that releases the key, a cancelled task whose lease
    expires at once (docs/guarantees.md)."""
    import asyncio

    from onceonly_core import Guard, UnknownOutcome

    g = Guard(f"sqlite:///{tmp_path / 'l.db'}?synchronous=normal", quiet=True)
    runs: list[str] = []

    async def ok(x: int) -> int:
        runs.append(f"ok{x}")
        return x * 2

    async def boom(x: int) -> int:
        runs.append(f"boom{x}")
        raise ValueError("no")

    async def slow(x: int) -> int:
        runs.append(f"slow{x}")
        await asyncio.sleep(30)
        return x

    async def main() -> None:
        assert await g(ok, 1) == 2
        assert await g(ok, 1) == 2  # replayed
        for _ in range(2):
            with pytest.raises(ValueError):
                await g(boom, 1)  # a failure is not cached: it runs again
        task = asyncio.create_task(g(slow, 1))
        while "slow1" not in runs:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert runs == ["ok1", "boom1", "boom1", "slow1"]
    rec = g.store.list(namespace=g.namespace, state="running")
    assert len(rec) == 1 and not rec[0].lease_live  # expired at once, no lease wait

    async def late(x: int) -> int:
        return x

    with pytest.raises(UnknownOutcome):
        asyncio.run(g.using(on_unknown="raise", wait=0, name=rec[0].tool)(late, 1))
    g.close()


def test_a_governed_call_behind_a_held_write_lock_fails_as_a_store_error(tmp_path: Path) -> None:
    """The governance store's BEGIN IMMEDIATE waits out busy_timeout, and a database
    still locked after _tx's retries is our StoreError, never the driver's own error;
    nothing ran. Released, the same call runs."""
    import sqlite3

    from onceonly_core import Guard
    from onceonly_core.errors import StoreError

    db = tmp_path / "g.db"
    g = Guard(store=SQLStore(f"sqlite:///{db}", busy_timeout=0.05), quiet=True)
    ran: list[int] = []

    def pay(n: int) -> int:
        ran.append(n)
        return n

    assert g.call_tool(pay, {"n": 0}, agent_id="a").decision == "executed"  # schema, pools
    pins = g.gov.store._pins
    assert pins is not None
    first = pins.get(g.gov.store.engine.connect)  # this thread's governance connection
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
    with pytest.raises(StoreError, match="locked"):
        g.call_tool(pay, {"n": 1}, agent_id="a")
    assert ran == [0]
    other.execute("COMMIT")
    assert g.call_tool(pay, {"n": 1}, agent_id="a").decision == "executed"
    # The driver's error unpinned the thread's connection: the call ran on a fresh one.
    assert pins.get(g.gov.store.engine.connect) is not first
    assert ran == [0, 1]
    other.close()
    g.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_opens_its_own_sqlite_connection(tmp_path: Path) -> None:
    # The store notices a fork by comparing its connection's pid with stores.pins.PID,
    # which os.register_at_fork keeps current: a child that used its parent's sqlite3
    # connection would share its locks and its transaction state.
    store = SQLStore(f"sqlite:///{tmp_path / 'f.db'}")
    assert store.claim("ns", "k", NewClaim("tool", "me", 30.0)).mine
    parent = store._sqlite_conn()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        code = 1
        try:
            rec = store.get("ns", "k")
            code = 0 if rec is not None and store._sqlite_conn() is not parent else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store._sqlite_conn() is parent  # the parent keeps its own
    store.close()
