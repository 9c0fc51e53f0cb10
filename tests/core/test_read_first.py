"""A retry's replay is one read, a first call one claim (Store.read_before_claim).

PostgreSQL's claim is an insert attempt and a read, MySQL's an insert that fails and a
read, SQLite's a read and then an insert (off the write lock for a key that is there);
for a key the Guard has itself seen completed, the replay reads first, and any other
key is claimed with ``NewClaim.first_sight``, which spares SQLite's read. What must
hold: a record that is not one to replay (cleared, expired, running) still goes through
the claim, so the rules of docs/guarantees.md are unchanged; a key the Guard has not
seen is claimed first, and replays if it was done elsewhere.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from typing import Any

import pytest

from onceonly_core import Guard


def pay(order: str) -> dict[str, str]:
    RUNS.append(order)
    return {"paid": order}


RUNS: list[str] = []


def _spy(g: Guard) -> list[str]:
    """Record the ledger primitives the guard calls (the store's own inner calls too)."""
    store: Any = g.store
    ops: list[str] = []
    for name in ("get", "claim", "finish", "take_over"):
        real = getattr(store, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            ops.append(_name)
            return _real(*args, **kwargs)

        setattr(store, name, spy)
    return ops


@pytest.fixture(autouse=True)
def _runs() -> None:
    RUNS.clear()


def test_a_retry_s_replay_reads_instead_of_claiming(db_url: str, namespace: str) -> None:
    g = Guard(db_url, namespace=namespace, quiet=True)
    try:
        assert g.store.read_before_claim
        ops = _spy(g)
        assert g(pay, "o-1") == {"paid": "o-1"}
        # A first call: the claim and the completion, no read (SQLite's claim inserts
        # first when told the key is new here).
        assert ops == ["claim", "finish"]
        ops.clear()
        assert g(pay, "o-1") == {"paid": "o-1"}  # a retry in the same process
        assert ops == ["get"]
        assert RUNS == ["o-1"]
        assert g.stats()["replayed"] == 1

        # Another Guard (another worker) has not seen the key: it claims first, finds
        # the record (a read after the insert attempt) and replays it.
        other = Guard(db_url, namespace=namespace, quiet=True)
        try:
            other_ops = _spy(other)
            assert other(pay, "o-1") == {"paid": "o-1"}
            assert other_ops[0] == "claim" and "finish" not in other_ops
            other_ops.clear()
            assert other(pay, "o-1") == {"paid": "o-1"}  # now it has
            assert other_ops == ["get"]
        finally:
            other.close()
        assert RUNS == ["o-1"]
    finally:
        g.close()


def test_a_seen_key_cleared_elsewhere_runs_again(db_url: str, namespace: str) -> None:
    # The read finds a cleared record: not one to replay, so the claim runs, takes the
    # key over and the tool runs, exactly as without the read.
    g = Guard(db_url, namespace=namespace, quiet=True)
    other = Guard(db_url, namespace=namespace, quiet=True)
    try:
        assert g(pay, "o-2") == {"paid": "o-2"}
        assert other.clear(g.key_for(pay, "o-2"))
        ops = _spy(g)
        assert g(pay, "o-2") == {"paid": "o-2"}
        assert RUNS == ["o-2", "o-2"]
        assert ops[:2] == ["get", "claim"] and "take_over" in ops
        assert g(pay, "o-2") == {"paid": "o-2"}  # and replays again
        assert RUNS == ["o-2", "o-2"]
    finally:
        g.close()
        other.close()


def test_an_expired_seen_key_is_taken_over(db_url: str, namespace: str) -> None:
    g = Guard(db_url, namespace=namespace, quiet=True)
    try:
        once = g.using(ttl=0.05)
        assert once(pay, "o-3") == {"paid": "o-3"}
        time.sleep(0.3)  # the result expires (on the ledger's clock)
        ops = _spy(g)
        assert once(pay, "o-3") == {"paid": "o-3"}  # read, not replayable: claimed, runs
        assert RUNS == ["o-3", "o-3"]
        assert ops[:2] == ["get", "claim"] and "take_over" in ops
    finally:
        g.close()


def test_forced_calls_never_read_first(db_url: str, namespace: str) -> None:
    g = Guard(db_url, namespace=namespace, quiet=True)
    try:
        assert g(pay, "o-4") == {"paid": "o-4"}
        ops = _spy(g)
        assert g.force(pay, "o-4") == {"paid": "o-4"}
        assert RUNS == ["o-4", "o-4"]
        assert ops[0] == "claim"
    finally:
        g.close()


def test_the_keys_remembered_are_bounded(namespace: str) -> None:
    # The read-first memory is per Guard and bounded (guard._DONE_KEYS): a long-lived
    # worker does not grow it without end.
    guard_module = importlib.import_module("onceonly_core.guard")

    g = Guard("memory://", namespace=namespace, quiet=True)
    g.store.read_before_claim = True  # type: ignore[misc]  # as a server store
    for i in range(guard_module._DONE_KEYS + 10):
        g(pay, f"k{i}")
    assert 0 < len(g._done) <= guard_module._DONE_KEYS
    assert g(pay, f"k{guard_module._DONE_KEYS + 9}") == {"paid": f"k{guard_module._DONE_KEYS + 9}"}
    assert len(RUNS) == guard_module._DONE_KEYS + 10  # the replay ran nothing


# -- async calls: the same read first (on the loop where the store allows it) ------------
async def apay(order: str) -> dict[str, str]:
    RUNS.append(order)
    return {"paid": order}


def test_an_async_retry_s_replay_reads_instead_of_claiming(db_url: str, namespace: str) -> None:
    async def main() -> None:
        g = Guard(db_url, namespace=namespace, quiet=True)
        other = Guard(db_url, namespace=namespace, quiet=True)
        try:
            ops = _spy(g)
            assert await g(apay, "a-1") == {"paid": "a-1"}
            assert ops == ["claim", "finish"]  # not seen yet: claimed first, no read
            ops.clear()
            assert await g(apay, "a-1") == {"paid": "a-1"}  # a retry in the same process
            assert ops == ["get"]
            other_ops = _spy(other)
            assert await other(apay, "a-1") == {"paid": "a-1"}  # another worker claims
            assert other_ops[0] == "claim"
            assert RUNS == ["a-1"]
            assert g.stats()["replayed"] == 1
        finally:
            g.close()
            other.close()

    asyncio.run(main())


def test_an_async_retry_of_a_key_cleared_elsewhere_runs_again(db_url: str, namespace: str) -> None:
    async def main() -> None:
        g = Guard(db_url, namespace=namespace, quiet=True)
        other = Guard(db_url, namespace=namespace, quiet=True)
        try:
            assert await g(apay, "a-2") == {"paid": "a-2"}
            assert other.clear(g.key_for(apay, "a-2"))
            ops = _spy(g)
            assert await g(apay, "a-2") == {"paid": "a-2"}  # read: cleared, so claimed
            assert RUNS == ["a-2", "a-2"]
            assert ops[:2] == ["get", "claim"] and "take_over" in ops
            ops.clear()
            assert await g.force(apay, "a-2") == {"paid": "a-2"}  # forced: never a read
            assert ops[0] == "claim"
            assert RUNS == ["a-2", "a-2", "a-2"]
        finally:
            g.close()
            other.close()

    asyncio.run(main())
