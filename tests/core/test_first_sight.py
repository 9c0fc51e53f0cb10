"""SQLite's claim and ``NewClaim.first_sight`` (a guard's first call of a key).

SQLite's claim reads before it inserts, so that a key already there (a replay, a
duplicate at the server) is answered off the write lock. A guard's first call of a key
it has not seen completed says so, and the claim inserts first: the read a new key would
miss is saved (one statement fewer per first call). A retry the guard has seen done is
read first by the guard itself (Store.read_before_claim), so it stays one read.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from _sqlite import count_thread_hops
from onceonly_core import Guard
from onceonly_core.errors import StoreError
from onceonly_core.stores import NewClaim
from onceonly_core.stores.sql import SQLStore

RAN: list[int] = []


def tool(x: int) -> int:
    RAN.append(x)
    return x


async def atool(x: int) -> int:
    RAN.append(x)
    return x


@pytest.fixture(autouse=True)
def _ran() -> None:
    RAN.clear()


def _statements(g: Guard) -> list[str]:
    """The first word of every statement this thread's ledger connection runs from now."""
    seen: list[str] = []
    store: Any = g.store
    store._sqlite_conn().set_trace_callback(lambda sql: seen.append(sql.split()[0].upper()))
    return seen


def test_a_first_call_inserts_without_reading_and_a_retry_only_reads(tmp_path: Path) -> None:
    g = Guard(f"sqlite:///{tmp_path / 'l.db'}", quiet=True)
    try:
        assert g(tool, 0) == 0  # opens the ledger (schema, pragmas)
        seen = _statements(g)
        assert g(tool, 1) == 1
        assert seen == ["INSERT", "UPDATE"]  # the claim and the completion: no read
        seen.clear()
        assert g(tool, 1) == 1  # a retry this guard has seen done: one read
        assert seen == ["SELECT"]
        assert RAN == [0, 1]
    finally:
        g.close()


def test_a_key_done_by_another_guard_is_found_by_the_insert_and_replayed(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    g, other = Guard(url, quiet=True), Guard(url, quiet=True)
    try:
        assert g(tool, 1) == 1
        assert other(tool, 2) == 2  # opens its ledger (the schema check reads)
        seen = _statements(other)
        assert other(tool, 1) == 1  # not seen by this guard: the insert, then the read
        assert seen == ["INSERT", "SELECT"]
        assert RAN == [1, 2]
        assert other.stats()["replayed"] == 1
        seen.clear()
        assert other(tool, 1) == 1  # seen now: one read
        assert seen == ["SELECT"]
    finally:
        g.close()
        other.close()


def test_without_the_hint_a_claim_of_a_done_key_stays_off_the_write_lock(
    tmp_path: Path,
) -> None:
    # The server's claims (check-lock, ai/run) give no hint: a duplicate is answered by
    # the read while another connection holds the write lock; the hinted claim needs
    # the lock for its insert attempt, and here waits for it until its busy timeout.
    db = tmp_path / "l.db"
    store = SQLStore(f"sqlite:///{db}", busy_timeout=0.2)
    try:
        rec = store.claim("ns", "k", NewClaim("t", "w1", 30.0))
        assert store.finish("ns", "k", rec.token, ok=True, result="1")
        other = sqlite3.connect(str(db), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
        try:
            again = store.claim("ns", "k", NewClaim("t", "w2", 30.0))
            assert not again.mine and again.state == "succeeded"
            with pytest.raises(StoreError, match="locked"):
                store.claim("ns", "k", NewClaim("t", "w2", 30.0, first_sight=True))
        finally:
            other.execute("COMMIT")
            other.close()
        hinted = store.claim("ns", "k", NewClaim("t", "w2", 30.0, first_sight=True))
        assert not hinted.mine and hinted.result == "1"  # the same answer, lock free
    finally:
        store.close()


def test_an_async_retry_on_normal_reads_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # WAL NORMAL runs the ledger's primitives on the loop (Store.nowait); the guard's
    # own read of a key it has seen done does too: no worker-thread hop for a replay.
    g = Guard(f"sqlite:///{tmp_path / 'l.db'}?synchronous=normal", quiet=True)
    try:
        assert asyncio.run(g(atool, 0)) == 0  # the first use checks the schema
        hops = count_thread_hops(monkeypatch)
        assert asyncio.run(g(atool, 1)) == 1
        seen = _statements(g)
        assert asyncio.run(g(atool, 1)) == 1
        assert hops == [] and RAN == [0, 1]
        assert seen == []  # not on this thread's connection: the loop's own (nowait)
    finally:
        g.close()


def test_an_observed_guard_remembers_what_it_saw_done(tmp_path: Path) -> None:
    # With telemetry on (here its structured logging), every call goes through the
    # observer; its completions are remembered too, so a retry's claim reads first
    # instead of trying an insert under the write lock: one read.
    from onceonly_core.telemetry import instrument_logging

    g = Guard(f"sqlite:///{tmp_path / 'l.db'}", quiet=True)
    try:
        instrument_logging(g)
        assert g(tool, 0) == 0  # opens the ledger
        seen = _statements(g)
        assert g(tool, 1) == 1
        assert seen == ["INSERT", "UPDATE"]
        seen.clear()
        assert g(tool, 1) == 1
        assert seen == ["SELECT"]
        assert asyncio.run(g(atool, 2)) == 2
        store: Any = g.store
        claims: list[Any] = []
        real = store.claim
        store.claim = lambda *a, **k: claims.append(a) or real(*a, **k)
        # Async, observed: the whole call goes through the flow (inside its span), whose
        # claim, told the key is not new, reads it first.
        assert asyncio.run(g(atool, 2)) == 2
        assert [a[2].first_sight for a in claims] == [False]
        assert RAN == [0, 1, 2]
    finally:
        g.close()
