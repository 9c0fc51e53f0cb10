"""A server ledger's threads each keep one pooled connection (ThreadPins).

What must hold: a thread's connection goes back to the pool when the thread ends; more
threads than the pool still run; a forked child never uses its parent's connection, and
the parent's stays usable.
"""

from __future__ import annotations

import gc
import multiprocessing
import threading
from collections.abc import Iterator

import pytest

from onceonly_core.stores import NewClaim
from onceonly_core.stores.sql import SQLStore

NEW = NewClaim("tool", "me", 30.0)


@pytest.fixture
def store(db_url: str) -> Iterator[SQLStore]:
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite's ledger keeps its own connection per thread (no pool)")
    s = SQLStore(db_url, pool_size=2)
    s.migrate()
    yield s
    s.close()


def test_a_thread_s_connection_goes_back_when_the_thread_ends(
    store: SQLStore, namespace: str
) -> None:
    assert store.claim(namespace, "main", NEW).mine
    assert store._pins.count == 1
    got: list[bool] = []

    def claim(i: int) -> None:
        got.append(store.claim(namespace, f"t{i}", NEW).mine)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
        t.join()  # one after the other: each pins (the pool has room for 2), then ends
    gc.collect()
    assert got == [True] * 5
    assert store._pins.count == 1  # the main thread's; the others went back


def test_more_threads_than_the_pool_still_run(store: SQLStore, namespace: str) -> None:
    go = threading.Barrier(6)
    got: list[bool] = []

    def claim(i: int) -> None:
        go.wait(10)
        got.extend(store.claim(namespace, f"k{i}-{n}", NEW).mine for n in range(5))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [True] * 30
    assert store._pins.count <= 2


def _child(store: SQLStore, parent: object, ns: str, out: multiprocessing.Queue[str]) -> None:
    mine = store.claim(ns, "child", NEW).mine
    own = store._pins.get(store._checkout)
    out.put(f"{mine} {'parent' if own is parent else 'own'}")


def test_a_forked_child_never_uses_its_parent_s_connection(store: SQLStore, namespace: str) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    assert store.claim(namespace, "parent", NEW).mine
    parent = store._pins.get(store._checkout)
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[str] = ctx.Queue()
    child = ctx.Process(target=_child, args=(store, parent, namespace, out))
    child.start()
    got = out.get(timeout=60)
    child.join(60)
    assert (child.exitcode, got) == (0, "True own")
    assert store._pins.get(store._checkout) is parent  # still the parent's, still usable
    assert store.claim(namespace, "parent-again", NEW).mine
    rec = store.get(namespace, "child")
    assert rec is not None and rec.state == "running"


def test_a_connection_checked_in_after_close_is_closed(store: SQLStore, namespace: str) -> None:
    # A statement in flight while its store closes (a server request, a job worker)
    # checks its connection in to the disposed pool afterwards: closed there, not parked
    # open in a pool nothing uses (psycopg warns when one is garbage-collected open, and
    # under filterwarnings=error that fails whichever test is running at the time).
    assert store.claim(namespace, "k", NEW).mine
    late = store._checkout()
    dbapi = late.dbapi_connection
    store.close()
    late.close()  # the check-in, after the pool was disposed
    assert _is_closed(dbapi)
    # A closed store still runs afresh, on the new pool, whose check-ins pool as usual.
    assert store.claim(namespace, "k2", NEW).mine
    again = store._checkout()
    kept = again.dbapi_connection
    again.close()
    assert not _is_closed(kept)
    store.close()


def _is_closed(dbapi: object) -> bool:
    closed = getattr(dbapi, "closed", None)  # psycopg
    if isinstance(closed, bool):
        return closed
    return not dbapi.open  # type: ignore[attr-defined]  # PyMySQL


def test_a_pinned_connection_keeps_one_cursor(store: SQLStore, namespace: str) -> None:
    # psycopg builds a Transformer per cursor (~14 us a statement): a thread's pinned
    # connection keeps one; a new pin (after a driver error, or a new thread) gets its own.
    assert store.claim(namespace, "a", NEW).mine
    first = store._cursors.cursor
    assert store.get(namespace, "a") is not None
    assert store.claim(namespace, "b", NEW).mine
    assert store._cursors.cursor is first
    store._pins.drop()  # what a driver error does (after invalidating the connection)
    gc.collect()
    assert store.get(namespace, "b") is not None
    assert store._cursors.cursor is not first
    got: list[object] = []

    def other() -> None:
        store.get(namespace, "a")
        got.append(store._cursors.cursor)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert got and got[0] is not store._cursors.cursor  # per thread
