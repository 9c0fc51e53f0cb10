"""The store contract suite: subclass :class:`StoreContract` and give it your store.

Each primitive of :class:`~onceonly_core.stores.base.Store` is one atomic conditional write
or one read; the claim protocol above trusts exactly the properties checked here: a claim
is exclusive (across threads and processes), a take-over is a compare-and-set on (token,
state), a completion or heartbeat with a stale token changes nothing, leases are judged by
the store's own clock, a ttl lets a key run again without ever giving a token out twice,
and keys compare byte for byte.

This module imports pytest; :mod:`onceonly_core` never imports it. Fixtures to provide:

``store``          the store under test (required; yield it and close it afterwards).
``store_factory``  a picklable zero-argument callable that opens the same store in another
                   process (e.g. ``functools.partial(open_store, url)``), or None (the
                   default) for a store that lives in one process: the cross-process races
                   are then skipped.
``namespace``      a namespace no other test uses (the default makes a fresh one), so tests
                   can share one database.

Tests that need time to pass sleep for well under a second by the store's clock.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ..protocol import TAKE_OVER, Options, decide
from ..stores.base import NewClaim, Record, Store

__all__ = ["StoreContract"]

LIVE = 60.0  # a lease that will not expire during a test
EXPIRED = -1.0  # a claim whose lease expired a second ago (the owner died)

TRAPS = ["K", "k", "k ", " k", "k\u0301", "\u1e31", "k\t", "K\u0130"]


def new(owner: str = "w1", lease: float = LIVE, **kw: Any) -> NewClaim:
    return NewClaim(tool="mod.tool", owner=owner, lease=lease, **kw)


def get(store: Store, ns: str, key: str) -> Record:
    rec = store.get(ns, key)
    assert rec is not None
    return rec


def stable(rec: Record) -> tuple[Any, ...]:
    """Every stored field (not the clock reading)."""
    return rec.stored()


def wait_for_store_clock(store: Store, moment: float, timeout: float = 10.0) -> None:
    """Sleep until the store's clock has passed ``moment``."""
    deadline = time.monotonic() + timeout
    while store.now() <= moment:
        assert time.monotonic() < deadline, f"the store's clock never passed {moment}"
        time.sleep(0.02)


def _race(
    factory: Callable[[], Store],
    namespace: str,
    keys: list[str],
    owner: str,
    barrier: Any,
    results: Any,
) -> None:
    """One racing process: claim every key, then take over the expired ``dead`` record."""
    won: list[str] = []
    took = False
    try:
        store = factory()
        try:
            seen = get(store, namespace, "dead")
            barrier.wait(60)
            for key in keys:
                if store.claim(namespace, key, new(owner)).mine:
                    won.append(key)
            took = store.take_over(namespace, "dead", seen, new(owner)) is not None
        finally:
            store.close()
    except BaseException as err:
        results.put((owner, None, False, f"{type(err).__name__}: {err}"))
        raise
    results.put((owner, won, took, None))


class StoreContract:
    """The contract every :class:`~onceonly_core.stores.base.Store` keeps. Subclass it in a
    test module (name the subclass ``Test…``) and provide the ``store`` fixture."""

    @pytest.fixture
    def store(self) -> Iterator[Store]:
        raise NotImplementedError("a StoreContract subclass provides the `store` fixture")
        yield  # pragma: no cover

    @pytest.fixture
    def store_factory(self) -> Callable[[], Store] | None:
        return None

    @pytest.fixture
    def namespace(self) -> str:
        return f"t-{uuid.uuid4().hex[:12]}"

    # -- claim -----------------------------------------------------------------------------------

    def test_claim_inserts_once_and_then_returns_the_holder(
        self, store: Store, namespace: str
    ) -> None:
        assert store.get(namespace, "k") is None
        first = store.claim(
            namespace, "k", new("w1", args_digest="d" * 64, run_id="run-1", caller="agent-7")
        )
        assert first.mine
        assert (first.state, first.token, first.attempt, first.executions) == ("running", 1, 1, 0)
        assert first.owner == "w1"
        assert first.lease_live
        stored = get(store, namespace, "k")
        assert not stored.mine
        assert (stored.tool, stored.args_digest, stored.run_id, stored.caller) == (
            "mod.tool",
            "d" * 64,
            "run-1",
            "agent-7",
        )
        assert stored.lease_until is not None
        assert stored.lease_until > stored.now
        assert stored.result is None and stored.error is None and stored.expires_at is None
        second = store.claim(namespace, "k", new("w2"))
        assert not second.mine
        assert (second.owner, second.token, second.state) == ("w1", 1, "running")

    @pytest.mark.parametrize("state", ["succeeded", "failed", "cleared"])
    def test_claim_never_overwrites_a_record_in_any_state(
        self, store: Store, namespace: str, state: str
    ) -> None:
        rec = store.claim(namespace, "k", new("w1", lease=EXPIRED))
        if state == "cleared":
            assert store.clear(namespace, "k") is True
        else:
            assert store.finish(namespace, "k", rec.token, ok=state == "succeeded", result='"r"')
        before = stable(get(store, namespace, "k"))
        again = store.claim(namespace, "k", new("w2"))
        assert not again.mine
        assert again.state == state
        assert stable(get(store, namespace, "k")) == before

    @pytest.mark.parametrize("state", ["running", "succeeded", "cleared"])
    def test_first_sight_is_a_hint_that_changes_no_answer(
        self, store: Store, namespace: str, state: str
    ) -> None:
        # NewClaim.first_sight says the caller has not seen the key completed; a store
        # may skip work on it (SQLite inserts before reading), never answer otherwise.
        fresh = store.claim(namespace, "new", new("w1", first_sight=True))
        assert fresh.mine and (fresh.state, fresh.token) == ("running", 1)
        rec = store.claim(namespace, "k", new("w1"))
        if state != "running":
            assert store.finish(namespace, "k", rec.token, ok=True, result='"r"')
        if state == "cleared":
            assert store.clear(namespace, "k") is True
        before = stable(get(store, namespace, "k"))
        again = store.claim(namespace, "k", new("w2", first_sight=True))
        assert not again.mine and again.state == state
        assert stable(get(store, namespace, "k")) == before

    def test_claim_is_exclusive_under_concurrency(self, store: Store, namespace: str) -> None:
        n = 8
        barrier = threading.Barrier(n)
        wins: list[tuple[str, str]] = []
        lock = threading.Lock()

        def worker(i: int) -> None:
            barrier.wait(10)
            for key in ("a", "b", "c", "d"):
                rec = store.claim(namespace, key, new(f"w{i}"))
                if rec.mine:
                    with lock:
                        wins.append((key, f"w{i}"))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(k for k, _ in wins) == ["a", "b", "c", "d"]
        for key, owner in wins:
            assert get(store, namespace, key).owner == owner

    # -- take_over ---------------------------------------------------------------------------

    def test_take_over_of_an_expired_claim_bumps_the_token(
        self, store: Store, namespace: str
    ) -> None:
        old = store.claim(namespace, "k", new("dead", lease=EXPIRED))
        seen = get(store, namespace, "k")
        assert not seen.lease_live
        taken = store.take_over(
            namespace, "k", seen, new("w2", args_digest="e" * 64, run_id="r2", caller="c2")
        )
        assert taken is not None and taken.mine
        assert (taken.token, taken.attempt, taken.owner, taken.state) == (2, 2, "w2", "running")
        rec = get(store, namespace, "k")
        assert (rec.token, rec.attempt, rec.owner, rec.state) == (2, 2, "w2", "running")
        assert (rec.args_digest, rec.run_id, rec.caller) == ("e" * 64, "r2", "c2")
        assert rec.lease_live
        assert rec.created_at == seen.created_at  # the record's history is kept
        assert old.token == 1
        # The same snapshot cannot be used twice: compare-and-set.
        assert store.take_over(namespace, "k", seen, new("w3")) is None
        assert get(store, namespace, "k").owner == "w2"

    def test_take_over_refuses_a_live_claim(self, store: Store, namespace: str) -> None:
        store.claim(namespace, "k", new("w1"))
        seen = get(store, namespace, "k")
        assert store.take_over(namespace, "k", seen, new("w2")) is None
        rec = get(store, namespace, "k")
        assert (rec.owner, rec.token) == ("w1", 1)

    def test_take_over_refuses_a_stale_token_or_state(self, store: Store, namespace: str) -> None:
        rec = store.claim(namespace, "k", new("w1", lease=EXPIRED))
        seen_running = get(store, namespace, "k")
        assert store.finish(namespace, "k", rec.token, ok=True, result='"done"')
        # Same token, state changed (running -> succeeded): the snapshot is stale.
        assert store.take_over(namespace, "k", seen_running, new("w2")) is None
        seen_done = get(store, namespace, "k")
        assert seen_done.state == "succeeded"
        first = store.take_over(namespace, "k", seen_done, new("w2"))
        assert first is not None and first.token == 2
        # Old token: refused even though the state (succeeded) looked right when read.
        assert store.take_over(namespace, "k", seen_done, new("w3")) is None
        assert get(store, namespace, "k").owner == "w2"

    def test_take_over_of_failed_and_cleared_records(self, store: Store, namespace: str) -> None:
        rec = store.claim(namespace, "f", new("w1"))
        assert store.finish(namespace, "f", rec.token, ok=False, error="boom")
        seen = get(store, namespace, "f")
        taken = store.take_over(namespace, "f", seen, new("w2"))
        assert taken is not None
        after = get(store, namespace, "f")
        assert (after.state, after.token, after.error) == ("running", 2, None)
        rec = store.claim(namespace, "c", new("w1", lease=EXPIRED))
        assert store.clear(namespace, "c") is True
        seen = get(store, namespace, "c")
        assert store.take_over(namespace, "c", seen, new("w2")) is not None
        assert get(store, namespace, "c").token == 2

    def test_forced_take_over_needs_only_the_token(self, store: Store, namespace: str) -> None:
        store.claim(namespace, "k", new("w1"))
        seen = get(store, namespace, "k")
        forced = store.take_over(namespace, "k", seen, new("admin"), force=True)
        assert forced is not None and forced.token == 2
        assert store.take_over(namespace, "k", seen, new("again"), force=True) is None
        assert get(store, namespace, "k").owner == "admin"

    def test_take_over_is_exclusive_under_concurrency(self, store: Store, namespace: str) -> None:
        store.claim(namespace, "k", new("dead", lease=EXPIRED))
        seen = get(store, namespace, "k")
        n = 8
        barrier = threading.Barrier(n)
        won: list[int] = []

        def worker(i: int) -> None:
            barrier.wait(10)
            if store.take_over(namespace, "k", seen, new(f"w{i}")) is not None:
                won.append(i)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(won) == 1
        rec = get(store, namespace, "k")
        assert (rec.token, rec.owner) == (2, f"w{won[0]}")

    def test_take_over_nothing(self, store: Store, namespace: str) -> None:
        ghost = store.claim(namespace, "other", new())
        ghost.key = "absent"
        assert store.take_over(namespace, "absent", ghost, new()) is None
        assert store.get(namespace, "absent") is None

    # -- finish ------------------------------------------------------------------------------

    def test_finish_is_fenced_and_happens_once(self, store: Store, namespace: str) -> None:
        rec = store.claim(namespace, "k", new())
        assert store.finish(namespace, "k", rec.token, ok=True, result='{"v":1}')
        done = get(store, namespace, "k")
        assert (done.state, done.result, done.executions, done.lease_until) == (
            "succeeded",
            '{"v":1}',
            1,
            None,
        )
        assert done.expires_at is None
        assert not done.lease_live
        # A second completion with the same token is refused and changes nothing.
        assert not store.finish(namespace, "k", rec.token, ok=True, result='{"v":2}')
        assert not store.finish(namespace, "k", rec.token, ok=False, error="late failure")
        assert stable(get(store, namespace, "k")) == stable(done)

    def test_a_stale_owner_cannot_finish_or_heartbeat(self, store: Store, namespace: str) -> None:
        zombie = store.claim(namespace, "k", new("zombie", lease=EXPIRED))
        seen = get(store, namespace, "k")
        winner = store.take_over(namespace, "k", seen, new("winner"))
        assert winner is not None
        before = stable(get(store, namespace, "k"))
        assert not store.finish(namespace, "k", zombie.token, ok=True, result='"zombie"')
        assert not store.finish(namespace, "k", zombie.token, ok=False, error="zombie failed")
        assert not store.heartbeat(namespace, "k", zombie.token, 3600.0)
        assert stable(get(store, namespace, "k")) == before
        assert store.finish(namespace, "k", winner.token, ok=True, result='"winner"')
        assert not store.finish(namespace, "k", zombie.token, ok=True, result='"zombie"')
        rec = get(store, namespace, "k")
        assert (rec.result, rec.executions, rec.token, rec.owner) == ('"winner"', 1, 2, "winner")

    def test_finish_failure_and_ttl(self, store: Store, namespace: str) -> None:
        rec = store.claim(namespace, "f", new())
        assert store.finish(namespace, "f", rec.token, ok=False, error="ValueError: no")
        failed = get(store, namespace, "f")
        assert (failed.state, failed.error, failed.executions, failed.result) == (
            "failed",
            "ValueError: no",
            0,
            None,
        )
        rec = store.claim(namespace, "t", new())
        assert store.finish(namespace, "t", rec.token, ok=True, result="1", ttl=3600.0)
        done = get(store, namespace, "t")
        assert done.expires_at is not None
        assert done.expires_at - done.updated_at == pytest.approx(3600.0, abs=1e-3)

    def test_finish_of_an_absent_or_non_running_record(self, store: Store, namespace: str) -> None:
        assert not store.finish(namespace, "absent", 1, ok=True, result="1")
        assert store.get(namespace, "absent") is None
        rec = store.claim(namespace, "k", new(lease=EXPIRED))
        assert store.clear(namespace, "k") is True
        assert not store.finish(namespace, "k", rec.token, ok=True, result="1")
        assert get(store, namespace, "k").state == "cleared"

    def test_executions_count_only_successful_finishes(self, store: Store, namespace: str) -> None:
        rec = store.claim(namespace, "k", new(lease=EXPIRED))
        assert store.finish(namespace, "k", rec.token, ok=False, error="x")
        for i in range(3):
            seen = get(store, namespace, "k")
            taken = store.take_over(namespace, "k", seen, new(f"w{i}"))
            assert taken is not None
            assert store.finish(namespace, "k", taken.token, ok=True, result=str(i))
        rec = get(store, namespace, "k")
        assert (rec.executions, rec.token, rec.attempt, rec.result) == (3, 4, 4, "2")

    def test_large_and_unicode_results_round_trip(self, store: Store, namespace: str) -> None:
        rec = store.claim(namespace, "k", new())
        big = '"' + ("\u00e9\u2603\U0001f600 " * 40_000) + '"'
        error = "note: \u00fcber \U0001f4a5"
        assert store.finish(namespace, "k", rec.token, ok=True, result=big, error=error)
        done = get(store, namespace, "k")
        assert done.result == big
        assert done.error == error

    # -- heartbeat -------------------------------------------------------------------------------

    def test_heartbeat_extends_and_releases(self, store: Store, namespace: str) -> None:
        rec = store.claim(namespace, "k", new(lease=5.0))
        first = get(store, namespace, "k").lease_until
        assert first is not None
        assert store.heartbeat(namespace, "k", rec.token, 3600.0)
        extended = get(store, namespace, "k")
        assert extended.lease_until is not None and extended.lease_until > first + 3000
        assert extended.lease_live
        # lease <= 0 gives the key back at once (cancelled task, interrupted tool).
        assert store.heartbeat(namespace, "k", rec.token, -1.0)
        released = get(store, namespace, "k")
        assert not released.lease_live
        assert (released.state, released.token) == ("running", 1)
        assert store.take_over(namespace, "k", released, new("w2")) is not None

    def test_heartbeat_only_while_running(self, store: Store, namespace: str) -> None:
        assert not store.heartbeat(namespace, "absent", 1, 30.0)
        rec = store.claim(namespace, "k", new())
        assert store.finish(namespace, "k", rec.token, ok=True, result="1")
        before = stable(get(store, namespace, "k"))
        assert not store.heartbeat(namespace, "k", rec.token, 30.0)
        assert stable(get(store, namespace, "k")) == before

    # -- clear -------------------------------------------------------------------------------------

    def test_clear_semantics(self, store: Store, namespace: str) -> None:
        assert store.clear(namespace, "absent") is None
        live = store.claim(namespace, "live", new())
        assert store.clear(namespace, "live") is False  # a concurrent second run otherwise
        assert get(store, namespace, "live").state == "running"
        assert store.finish(namespace, "live", live.token, ok=True, result='"r"')
        assert store.clear(namespace, "live") is True
        cleared = get(store, namespace, "live")
        assert (cleared.state, cleared.token) == ("cleared", live.token)  # the token is kept
        assert cleared.executions == 1
        store.claim(namespace, "dead", new(lease=EXPIRED))
        assert store.clear(namespace, "dead") is True  # an expired claim may be cleared
        assert store.clear(namespace, "dead") is True  # idempotent

    def test_clear_namespace(self, store: Store, namespace: str) -> None:
        sub = f"{namespace}/wf"
        for key in ("a", "b"):
            rec = store.claim(namespace, key, new())
            store.finish(namespace, key, rec.token, ok=True, result="1")
        store.claim(namespace, "dead", new(lease=EXPIRED))
        store.claim(namespace, "live", new())
        rec = store.claim(sub, "a", new())
        store.finish(sub, "a", rec.token, ok=True, result="1")
        assert store.clear_namespace(namespace) == 3
        states = {r.key: r.state for r in store.list(namespace=namespace)}
        assert states == {"a": "cleared", "b": "cleared", "dead": "cleared", "live": "running"}
        assert get(store, sub, "a").state == "succeeded"  # a workflow under it is separate
        assert store.clear_namespace(namespace) == 0  # nothing left to clear
        assert store.clear_namespace(f"{namespace}-nothing") == 0

    # -- list --------------------------------------------------------------------------------------

    def test_list_filters(self, store: Store, namespace: str) -> None:
        names = [namespace, f"{namespace}/wf", f"{namespace}/wf/deeper", f"{namespace}X"]
        for i, ns in enumerate(names):
            rec = store.claim(ns, f"k{i}", NewClaim("mod.a" if i % 2 else "mod.b", "w", LIVE))
            if i < 2:
                store.finish(ns, f"k{i}", rec.token, ok=True, result="1")
        exact = store.list(namespace=namespace)
        assert [r.namespace for r in exact] == [namespace]
        prefixed = store.list(namespace=namespace, prefix=True)
        assert sorted(r.namespace for r in prefixed) == sorted(names[:3])  # not "...X"
        assert {r.key for r in store.list(namespace=namespace, prefix=True, state="running")} == {
            "k2"
        }
        assert {r.key for r in store.list(namespace=namespace, prefix=True, tool="mod.a")} == {"k1"}
        assert len(store.list(namespace=namespace, prefix=True, limit=2)) == 2
        newest = max(prefixed, key=lambda r: r.updated_at)
        assert store.list(namespace=namespace, prefix=True, since=newest.updated_at) == []
        assert len(store.list(namespace=namespace, prefix=True, since=0)) == 3
        every = store.list(namespace=None, limit=1000)
        assert {r.namespace for r in every} >= set(names)
        assert all(r.now > 0 for r in prefixed)

    def test_list_is_newest_first(self, store: Store, namespace: str) -> None:
        recs = [store.claim(namespace, f"k{i}", new()) for i in range(3)]
        store.finish(namespace, "k0", recs[0].token, ok=True, result="1")  # k0 is now the newest
        listed = store.list(namespace=namespace)
        assert [r.updated_at for r in listed] == sorted(
            (r.updated_at for r in listed), reverse=True
        )
        assert listed[0].key == "k0"

    def test_list_prefix_escapes_like_wildcards(self, store: Store, namespace: str) -> None:
        base = f"{namespace}_a%"
        decoy = f"{namespace}Xab/wf"  # would match "base/%" if _ and % were wildcards
        store.claim(f"{base}/wf", "k", new())
        store.claim(decoy, "k", new())
        assert [r.namespace for r in store.list(namespace=base, prefix=True)] == [f"{base}/wf"]

    # -- keys and namespaces compare exactly ----------------------------------------------------

    def test_keys_compare_byte_for_byte(self, store: Store, namespace: str) -> None:
        # MySQL/MariaDB collations say 'k' = 'K' = 'k ' (PAD SPACE) and may fold accents.
        for i, key in enumerate(TRAPS):
            rec = store.claim(namespace, key, new(f"w{i}"))
            assert rec.mine, f"{key!r} collided with an earlier key"
        for i, key in enumerate(TRAPS):
            rec = get(store, namespace, key)
            assert (rec.key, rec.owner) == (key, f"w{i}")
        assert sorted(r.key for r in store.list(namespace=namespace)) == sorted(TRAPS)
        # The same for namespaces.
        for i, suffix in enumerate(["", " ", "A"]):
            assert store.claim(f"{namespace}-ns{suffix}", "k", new(f"n{i}")).mine
        assert get(store, f"{namespace}-ns ", "k").owner == "n1"

    def test_long_and_non_ascii_keys_and_namespaces(self, store: Store, namespace: str) -> None:
        ns = f"{namespace}-t\u00fcnant/\u5de5\u4f5c\u6d41"
        keys = ["x" * 255, "\u00e9" * 255, "\U0001f600" * 255, "\u5de5" * 255]
        for key in keys:
            rec = store.claim(ns, key, new())
            assert rec.mine
            assert store.finish(ns, key, rec.token, ok=True, result='"ok"')
        for key in keys:
            assert get(store, ns, key).key == key
        assert sorted(r.key for r in store.list(namespace=ns)) == sorted(keys)
        longest = store.max_namespace
        long_ns = namespace + "\u00fc" * (longest - len(namespace))
        assert len(long_ns) == longest
        assert store.claim(long_ns, "k", new()).mine
        assert get(store, long_ns, "k").namespace == long_ns
        assert [r.namespace for r in store.list(namespace=long_ns)] == [long_ns]

    # -- the store's clock -----------------------------------------------------------------

    def test_records_carry_the_store_clock(self, store: Store, namespace: str) -> None:
        before = store.now()
        rec = store.claim(namespace, "k", new(lease=30.0))
        after = store.now()
        # One clock: the reading a record carries lies between two readings of now().
        assert before - 0.001 <= rec.now <= after + 0.001
        assert before - 0.001 <= rec.created_at <= after + 0.001
        assert rec.lease_until == pytest.approx(rec.created_at + 30.0, abs=0.01)
        seen = get(store, namespace, "k")
        assert rec.now <= seen.now <= store.now() + 0.001

    def test_a_lease_expires_by_the_store_clock(self, store: Store, namespace: str) -> None:
        rec = store.claim(namespace, "k", new("w1", lease=0.3))
        seen = get(store, namespace, "k")
        assert seen.lease_live
        assert store.take_over(namespace, "k", seen, new("w2")) is None
        assert store.clear(namespace, "k") is False
        assert rec.lease_until is not None
        wait_for_store_clock(store, rec.lease_until)
        seen = get(store, namespace, "k")
        assert not seen.lease_live
        assert seen.now > (seen.lease_until or 0)
        taken = store.take_over(namespace, "k", seen, new("w2", lease=0.3))
        assert taken is not None and taken.token == rec.token + 1
        # A heartbeat moves the lease from the store's now, not from the old lease.
        assert store.heartbeat(namespace, "k", taken.token, 0.3)
        beat = get(store, namespace, "k")
        assert beat.lease_until == pytest.approx(beat.now + 0.3, abs=0.25)

    # -- ttl ---------------------------------------------------------------------------------

    def test_ttl_lets_a_key_run_again_and_tokens_only_grow(
        self, store: Store, namespace: str
    ) -> None:
        """Past its ttl a succeeded record either reads as expired or is gone (a store may
        delete it); the protocol then runs the key again, always with a token above every
        earlier one, so an owner from before can never complete the new run."""
        opts = Options()
        zombie = store.claim(namespace, "k", new("zombie", lease=EXPIRED))
        first = store.take_over(namespace, "k", get(store, namespace, "k"), new("w1"))
        assert first is not None
        assert store.finish(namespace, "k", first.token, ok=True, result='"1"', ttl=0.3)
        done = get(store, namespace, "k")
        assert done.state == "succeeded" and done.expires_at is not None
        assert decide(done, opts, None) != TAKE_OVER  # not before its ttl
        wait_for_store_clock(store, done.expires_at)
        later = store.get(namespace, "k")
        if later is not None:
            assert later.expires_at is not None and later.expires_at <= later.now
            assert decide(later, opts, None) == TAKE_OVER
        again = store.claim(namespace, "k", new("w2"))
        if not again.mine:
            taken = store.take_over(namespace, "k", again, new("w2"))
            assert taken is not None
            again = taken
        assert again.token > first.token > zombie.token
        for stale in (zombie.token, first.token):
            assert not store.finish(namespace, "k", stale, ok=True, result='"stale"')
            assert not store.heartbeat(namespace, "k", stale, 60.0)
        assert store.finish(namespace, "k", again.token, ok=True, result='"2"')
        assert get(store, namespace, "k").result == '"2"'

    def test_a_held_record_outlives_an_earlier_ttl(self, store: Store, namespace: str) -> None:
        """A take-over of a record completed with a ttl holds it until it completes: the
        earlier ttl can no longer end it."""
        rec = store.claim(namespace, "k", new())
        assert store.finish(namespace, "k", rec.token, ok=True, result='"1"', ttl=0.3)
        taken = store.take_over(namespace, "k", get(store, namespace, "k"), new("w2"))
        assert taken is not None
        wait_for_store_clock(store, taken.now + 0.4)
        held = get(store, namespace, "k")
        assert (held.state, held.token, held.owner) == ("running", taken.token, "w2")
        assert held.lease_live
        assert store.finish(namespace, "k", taken.token, ok=True, result='"2"')
        done = get(store, namespace, "k")
        assert (done.state, done.expires_at) == ("succeeded", None)

    def test_purge_expired_deletes_only_expired_never_held_records(
        self, store: Store, namespace: str
    ) -> None:
        """``purge_expired`` deletes records past their ttl in batches of ``limit``; it
        keeps records without a ttl, before their ttl, running, failed, or taken over
        (token > 1: an owner from before must stay fenced out), and other namespaces'.

        Optional: a store that leaves it to the base class (which refuses) is skipped
        here; only ``onceonly retention`` needs it."""
        if type(store).purge_expired is Store.purge_expired:
            pytest.skip(f"{type(store).__name__} does not implement the optional purge_expired")
        for i in range(5):
            rec = store.claim(namespace, f"e{i}", new())
            assert store.finish(namespace, f"e{i}", rec.token, ok=True, result="1", ttl=0.05)
        keep = store.claim(namespace, "forever", new())
        assert store.finish(namespace, "forever", keep.token, ok=True, result="1")
        later = store.claim(namespace, "later", new())
        assert store.finish(namespace, "later", later.token, ok=True, result="1", ttl=3600.0)
        bad = store.claim(namespace, "failed", new())
        assert store.finish(namespace, "failed", bad.token, ok=False, error="E", ttl=0.05)
        store.claim(namespace, "running", new())
        zombie = store.claim(namespace, "taken", new("zombie", lease=EXPIRED))
        taken = store.take_over(namespace, "taken", zombie, new("w2"))
        assert taken is not None
        assert store.finish(namespace, "taken", taken.token, ok=True, result="1", ttl=0.05)
        other = namespace + "-other"
        rec = store.claim(other, "e", new())
        assert store.finish(other, "e", rec.token, ok=True, result="1", ttl=0.05)
        now = get(store, namespace, "forever").now
        wait_for_store_clock(store, now + 0.1)
        before = store.now()

        first = store.purge_expired(namespace, before, 3)
        if first == 0:  # this store lets its backend delete expired records (Redis)
            for i in range(5):
                assert store.get(namespace, f"e{i}") is None
            return
        assert first == 3  # bounded by the limit
        assert store.purge_expired(namespace, before, 3) == 2
        assert store.purge_expired(namespace, before, 3) == 0
        for i in range(5):
            assert store.get(namespace, f"e{i}") is None
        for key in ("forever", "later", "failed", "running", "taken"):
            assert store.get(namespace, key) is not None, key
        assert store.get(other, "e") is not None  # another namespace
        # Every namespace (a shared database may hold other expired records too).
        while store.purge_expired(None, before, 100) == 100:
            pass
        assert store.get(other, "e") is None
        # A deleted key runs again from token 1; the taken-over key kept its token.
        assert store.claim(namespace, "e0", new()).mine
        assert get(store, namespace, "taken").token == taken.token

    # -- processes ---------------------------------------------------------------------------

    def test_claims_and_take_overs_race_across_processes(
        self, store: Store, store_factory: Callable[[], Store] | None, namespace: str
    ) -> None:
        """Four processes claim the same five keys and take over the same expired record
        at one instant: one winner each."""
        if store_factory is None:
            pytest.skip("no store_factory: this store lives in one process")
        store.claim(namespace, "dead", new("dead", lease=EXPIRED))
        keys = [f"p{i}" for i in range(5)]
        ctx = mp.get_context("spawn")  # no fork of a process that has threads
        n = 4
        barrier = ctx.Barrier(n)
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=_race, args=(store_factory, namespace, keys, f"p{i}", barrier, results)
            )
            for i in range(n)
        ]
        for p in procs:
            p.start()
        try:
            got = [results.get(timeout=180) for _ in procs]
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():  # pragma: no cover - a hung racer
                    p.kill()
                    p.join()
            results.close()
            results.join_thread()
        errors = [e for *_, e in got if e]
        assert not errors, errors
        wins = sorted((k, owner) for owner, won, _, _ in got for k in won)
        assert [k for k, _ in wins] == keys
        for key, owner in wins:
            assert get(store, namespace, key).owner == owner
        took = [owner for owner, _, t, _ in got if t]
        assert len(took) == 1
        rec = get(store, namespace, "dead")
        assert (rec.token, rec.owner) == (2, took[0])
