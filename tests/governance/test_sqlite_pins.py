"""SQLite: each thread keeps one governance connection between its transactions.

Checking a connection out of the pool and back in cost more than the transaction it
ran (twice per governed call), so up to ``PINNED`` threads keep one. What must hold:
a thread's connection goes back when the thread ends; more threads than that still
run (checking one out per transaction) with caps exact; closing the guard closes them
all, so SQLite's file lock is released; a forked child never uses its parent's.
"""

from __future__ import annotations

import gc
import multiprocessing
import threading
from pathlib import Path

import pytest

from _sqlite import holder_lock_state
from onceonly_core import Guard
from onceonly_core.governance import Policy
from onceonly_core.stores import govsql


def item(n: int) -> int:
    return n


@pytest.fixture
def guard(tmp_path: Path) -> Guard:
    g = Guard(f"sqlite:///{tmp_path / 'pins.db'}", namespace="pins", quiet=True)
    g.gov.upsert_policy(Policy(agent_id="a", max_actions_per_hour=200))
    return g


def call(g: Guard, n: int) -> str:
    return g.call_tool(item, {"n": n}, tool="item", agent_id="a", scope="s").decision


def in_threads(n: int, fn: object) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)  # type: ignore[operator]
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_thread_s_connection_goes_back_when_the_thread_ends(guard: Guard) -> None:
    pins = guard.gov.store._pins
    assert call(guard, 0) == "executed"
    assert pins.count == 1  # this thread's
    in_threads(3, lambda i: call(guard, 100 + i))
    gc.collect()
    assert pins.count == 1  # the three threads' went back to the pool
    guard.close()


def test_more_threads_than_pinned_connections_keep_the_cap_exact(guard: Guard) -> None:
    """16 threads race 300 distinct calls under a cap of 200: exactly 200 run."""
    ran: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for k in range(i, 300, 16):
            if call(guard, k) == "executed":
                with lock:
                    ran.append(k)

    in_threads(16, worker)
    assert len(ran) == len(set(ran)) == 200
    assert guard.gov.store._pins.count <= govsql.PINNED
    assert guard.gov.verify_audit() == []
    guard.close()


def test_closing_the_guard_closes_every_thread_s_connection(guard: Guard, tmp_path: Path) -> None:
    """A thread that is still alive keeps its connection until the guard closes: then
    nothing of ours holds SQLite's shared lock on the file."""
    go, done = threading.Event(), threading.Event()

    def idle_after_a_call() -> None:
        call(guard, 1)
        go.set()
        done.wait(30)

    t = threading.Thread(target=idle_after_a_call)
    t.start()
    go.wait(30)
    call(guard, 2)
    guard.close()
    assert holder_lock_state(tmp_path / "pins.db") == "free"
    done.set()
    t.join()


def _child(g: Guard, parent: object, out: multiprocessing.Queue[str]) -> None:
    got = ",".join(call(g, 1000 + i) for i in range(3))
    mine = g.gov.store._pins.get(g.gov.store.engine.connect)
    out.put(f"{got} {'parent' if mine is parent else 'own'}")


def test_a_forked_child_never_uses_its_parent_s_connection(guard: Guard) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    assert call(guard, 0) == "executed"  # the parent's thread has pinned one
    parent = guard.gov.store._pins.get(guard.gov.store.engine.connect)
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[str] = ctx.Queue()
    child = ctx.Process(target=_child, args=(guard, parent, out))
    child.start()
    got = out.get(timeout=60)
    child.join(60)
    assert (child.exitcode, got) == (0, "executed,executed,executed own")
    # The parent's connection is the same one, still open and usable.
    assert guard.gov.store._pins.get(guard.gov.store.engine.connect) is parent
    assert [call(guard, i) for i in (1, 2)] == ["executed", "executed"]
    assert guard.gov.verify_audit() == []
    guard.close()
