"""A ledger read on a connection the database cut runs once more on a fresh one.

A restart (or the server cutting idle connections) leaves every pooled and pinned
connection dead, and nothing notices until a statement fails on one (there is no ping
before each statement: issue 15). A read can always run again, so ``get`` (a retry's
replay, a poll, the server's ``/v1/ledger/get``) does, on a fresh connection. A write
never is re-sent: one whose reply was lost may have committed, so the call fails with
StoreError, nothing runs, and the next call works on a fresh connection.
"""

from __future__ import annotations

import pytest

from _services import cut_connections
from onceonly_core import Guard
from onceonly_core.errors import StoreError

RUNS: list[str] = []


def pay(order: str) -> str:
    RUNS.append(order)
    return f"paid {order}"


@pytest.fixture(autouse=True)
def _runs() -> None:
    RUNS.clear()


def test_a_replay_reads_again_after_cut_connections(db_url: str, namespace: str) -> None:
    if not db_url.startswith(("postgresql", "mysql")):
        pytest.skip("a file database has no server connection to lose")
    g = Guard(db_url, namespace=namespace, quiet=True)
    try:
        assert g(pay, "o-1") == "paid o-1"  # this thread's connection is pinned now
        cut_connections(db_url)
        assert g(pay, "o-1") == "paid o-1"  # a retry seen done: read first, read again
        assert RUNS == ["o-1"]
        key = g.key_for(pay, "o-1")
        cut_connections(db_url)
        rec = g.store.get(g.namespace, key)
        assert rec is not None and rec.state == "succeeded"

        cut_connections(db_url)
        with pytest.raises(StoreError, match="claim failed"):
            g(pay, "o-2")  # a claim is a write: not re-sent, and nothing ran
        assert RUNS == ["o-1"]
        assert g(pay, "o-2") == "paid o-2"  # the next call: a fresh connection
        assert RUNS == ["o-1", "o-2"]
    finally:
        g.close()
