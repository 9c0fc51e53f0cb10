"""``SQLStore.claim_done``: /check-lock's one-statement claim, on every SQL backend.

The row it leaves is the row claim + finish(ok, ttl) leave; a held key returns the
holder's record, as claim does; one winner among racing callers."""

from __future__ import annotations

import threading
import uuid

from onceonly_core.stores import SUCCEEDED, NewClaim
from onceonly_core.stores.sql import SQLStore


def _ns() -> str:
    return f"cd-{uuid.uuid4().hex[:10]}"


def test_claim_done_equals_claim_then_finish(db_url: str) -> None:
    store = SQLStore(db_url, auto_migrate=True)
    try:
        ns, new = _ns(), NewClaim("check-lock", "owner-a", 30.0, caller="rid-1")
        rec = store.claim_done(ns, "k", new, result="null", ttl=60.0)
        assert rec.mine and rec.state == SUCCEEDED and rec.token == 1
        assert rec.executions == 1 and rec.lease_until is None and rec.result == "null"
        two = store.claim(ns, "k2", new)
        assert store.finish(ns, "k2", two.token, ok=True, result="null", ttl=60.0)
        a, b = store.get(ns, "k"), store.get(ns, "k2")
        assert a is not None and b is not None
        for field in ("tool", "state", "token", "owner", "attempt", "executions", "result"):
            assert getattr(a, field) == getattr(b, field), field
        assert a.lease_until is None and b.lease_until is None
        assert a.error is None and a.caller == "rid-1"
        assert a.expires_at is not None and abs(a.expires_at - a.created_at - 60.0) < 1.0
        # A held key: the holder's record, not mine; nothing written.
        again = store.claim_done(
            ns, "k", NewClaim("check-lock", "owner-b", 30.0), result="x", ttl=5
        )
        assert not again.mine and again.owner == "owner-a" and again.result == "null"
        # An expired one is taken over by the ordinary claim path (not by claim_done).
        store.claim_done(ns, "gone", new, result="null", ttl=0.0)
        held = store.claim_done(ns, "gone", new, result="null", ttl=60.0)
        assert not held.mine and held.expires_at is not None and held.expires_at <= held.now
    finally:
        store.close()


def test_claim_done_one_winner(db_url: str) -> None:
    store = SQLStore(db_url, auto_migrate=True)
    ns = _ns()
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def one(i: int) -> None:
        barrier.wait()
        rec = store.claim_done(ns, "hot", NewClaim("t", f"o{i}", 30.0), result="null", ttl=60)
        wins.append(rec.mine)

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(wins) == [False] * 7 + [True]
    finally:
        store.close()
