"""The store contract (onceonly_core/stores/base.py), the same on every backend.

Each primitive is one atomic conditional write or one read. These tests call the
primitives directly — the protocol above trusts exactly these properties: a claim is
exclusive, a take-over is a compare-and-set on (token, state), a completion or heartbeat
with a stale token changes nothing, and keys compare byte for byte.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from onceonly_core import MemoryStore, open_store
from onceonly_core.stores import NewClaim, Record, Store

LIVE = 60.0  # a lease that will not expire during a test
EXPIRED = -1.0  # a claim whose lease expired a second ago (the owner died)


@pytest.fixture
def store(any_url: str) -> Iterator[Store]:
    s: Store = MemoryStore() if any_url == "memory://" else open_store(any_url, auto_migrate=True)
    yield s
    s.close()


def new(owner: str = "w1", lease: float = LIVE, **kw: Any) -> NewClaim:
    return NewClaim(tool="mod.tool", owner=owner, lease=lease, **kw)


def get(store: Store, ns: str, key: str) -> Record:
    rec = store.get(ns, key)
    assert rec is not None
    return rec


def stable(rec: Record) -> tuple[Any, ...]:
    """Every stored field (not the clock reading)."""
    return (
        rec.namespace,
        rec.key,
        rec.tool,
        rec.state,
        rec.token,
        rec.owner,
        rec.attempt,
        rec.executions,
        rec.lease_until,
        rec.expires_at,
        rec.args_digest,
        rec.result,
        rec.error,
        rec.run_id,
        rec.caller,
        rec.created_at,
        rec.updated_at,
    )


# -- claim -----------------------------------------------------------------------------------


def test_claim_inserts_once_and_then_returns_the_holder(store: Store, namespace: str) -> None:
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
    store: Store, namespace: str, state: str
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


def test_claim_is_exclusive_under_concurrency(store: Store, namespace: str) -> None:
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


def test_take_over_of_an_expired_claim_bumps_the_token(store: Store, namespace: str) -> None:
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


def test_take_over_refuses_a_live_claim(store: Store, namespace: str) -> None:
    store.claim(namespace, "k", new("w1"))
    seen = get(store, namespace, "k")
    assert store.take_over(namespace, "k", seen, new("w2")) is None
    rec = get(store, namespace, "k")
    assert (rec.owner, rec.token) == ("w1", 1)


def test_take_over_refuses_a_stale_token_or_state(store: Store, namespace: str) -> None:
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


def test_take_over_of_failed_and_cleared_records(store: Store, namespace: str) -> None:
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


def test_forced_take_over_needs_only_the_token(store: Store, namespace: str) -> None:
    store.claim(namespace, "k", new("w1"))
    seen = get(store, namespace, "k")
    forced = store.take_over(namespace, "k", seen, new("admin"), force=True)
    assert forced is not None and forced.token == 2
    assert store.take_over(namespace, "k", seen, new("again"), force=True) is None
    assert get(store, namespace, "k").owner == "admin"


def test_take_over_is_exclusive_under_concurrency(store: Store, namespace: str) -> None:
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


def test_take_over_nothing(store: Store, namespace: str) -> None:
    ghost = store.claim(namespace, "other", new())
    ghost.key = "absent"
    assert store.take_over(namespace, "absent", ghost, new()) is None
    assert store.get(namespace, "absent") is None


# -- finish ------------------------------------------------------------------------------


def test_finish_is_fenced_and_happens_once(store: Store, namespace: str) -> None:
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


def test_a_stale_owner_cannot_finish_or_heartbeat(store: Store, namespace: str) -> None:
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


def test_finish_failure_and_ttl(store: Store, namespace: str) -> None:
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


def test_finish_of_an_absent_or_non_running_record(store: Store, namespace: str) -> None:
    assert not store.finish(namespace, "absent", 1, ok=True, result="1")
    assert store.get(namespace, "absent") is None
    rec = store.claim(namespace, "k", new(lease=EXPIRED))
    assert store.clear(namespace, "k") is True
    assert not store.finish(namespace, "k", rec.token, ok=True, result="1")
    assert get(store, namespace, "k").state == "cleared"


def test_executions_count_only_successful_finishes(store: Store, namespace: str) -> None:
    rec = store.claim(namespace, "k", new(lease=EXPIRED))
    assert store.finish(namespace, "k", rec.token, ok=False, error="x")
    for i in range(3):
        seen = get(store, namespace, "k")
        taken = store.take_over(namespace, "k", seen, new(f"w{i}"))
        assert taken is not None
        assert store.finish(namespace, "k", taken.token, ok=True, result=str(i))
    rec = get(store, namespace, "k")
    assert (rec.executions, rec.token, rec.attempt, rec.result) == (3, 4, 4, "2")


def test_large_and_unicode_results_round_trip(store: Store, namespace: str) -> None:
    rec = store.claim(namespace, "k", new())
    big = '"' + ("\u00e9\u2603\U0001f600 " * 40_000) + '"'
    error = "note: \u00fcber \U0001f4a5"
    assert store.finish(namespace, "k", rec.token, ok=True, result=big, error=error)
    done = get(store, namespace, "k")
    assert done.result == big
    assert done.error == error


# -- heartbeat -------------------------------------------------------------------------------


def test_heartbeat_extends_and_releases(store: Store, namespace: str) -> None:
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


def test_heartbeat_only_while_running(store: Store, namespace: str) -> None:
    assert not store.heartbeat(namespace, "absent", 1, 30.0)
    rec = store.claim(namespace, "k", new())
    assert store.finish(namespace, "k", rec.token, ok=True, result="1")
    before = stable(get(store, namespace, "k"))
    assert not store.heartbeat(namespace, "k", rec.token, 30.0)
    assert stable(get(store, namespace, "k")) == before


# -- clear -------------------------------------------------------------------------------------


def test_clear_semantics(store: Store, namespace: str) -> None:
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


def test_clear_namespace(store: Store, namespace: str) -> None:
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


def test_list_filters(store: Store, namespace: str) -> None:
    names = [namespace, f"{namespace}/wf", f"{namespace}/wf/deeper", f"{namespace}X"]
    for i, ns in enumerate(names):
        rec = store.claim(ns, f"k{i}", NewClaim("mod.a" if i % 2 else "mod.b", "w", LIVE))
        if i < 2:
            store.finish(ns, f"k{i}", rec.token, ok=True, result="1")
    exact = store.list(namespace=namespace)
    assert [r.namespace for r in exact] == [namespace]
    prefixed = store.list(namespace=namespace, prefix=True)
    assert sorted(r.namespace for r in prefixed) == sorted(names[:3])  # not "...X"
    assert {r.key for r in store.list(namespace=namespace, prefix=True, state="running")} == {"k2"}
    assert {r.key for r in store.list(namespace=namespace, prefix=True, tool="mod.a")} == {"k1"}
    assert len(store.list(namespace=namespace, prefix=True, limit=2)) == 2
    newest = max(prefixed, key=lambda r: r.updated_at)
    assert store.list(namespace=namespace, prefix=True, since=newest.updated_at) == []
    assert len(store.list(namespace=namespace, prefix=True, since=0)) == 3
    every = store.list(namespace=None, limit=1000)
    assert {r.namespace for r in every} >= set(names)
    assert all(r.now > 0 for r in prefixed)


def test_list_is_newest_first(store: Store, namespace: str) -> None:
    recs = [store.claim(namespace, f"k{i}", new()) for i in range(3)]
    store.finish(namespace, "k0", recs[0].token, ok=True, result="1")  # k0 is now the newest
    listed = store.list(namespace=namespace)
    assert [r.updated_at for r in listed] == sorted((r.updated_at for r in listed), reverse=True)
    assert listed[0].key == "k0"


def test_list_prefix_escapes_like_wildcards(store: Store, namespace: str) -> None:
    base = f"{namespace}_a%"
    decoy = f"{namespace}Xab/wf"  # would match "base/%" if _ and % were wildcards
    store.claim(f"{base}/wf", "k", new())
    store.claim(decoy, "k", new())
    assert [r.namespace for r in store.list(namespace=base, prefix=True)] == [f"{base}/wf"]


# -- keys and namespaces compare exactly ----------------------------------------------------

TRAPS = ["K", "k", "k ", " k", "k\u0301", "\u1e31", "k\t", "K\u0130"]


def test_keys_compare_byte_for_byte(store: Store, namespace: str) -> None:
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


def test_long_and_non_ascii_keys_and_namespaces(store: Store, namespace: str) -> None:
    ns = f"{namespace}-t\u00fcnant/\u5de5\u4f5c\u6d41"
    keys = ["x" * 255, "\u00e9" * 255, "\U0001f600" * 255, "\u5de5" * 255]
    for key in keys:
        rec = store.claim(ns, key, new())
        assert rec.mine
        assert store.finish(ns, key, rec.token, ok=True, result='"ok"')
    for key in keys:
        assert get(store, ns, key).key == key
    assert sorted(r.key for r in store.list(namespace=ns)) == sorted(keys)
    long_ns = namespace + "\u00fc" * (255 - len(namespace))
    assert len(long_ns) == 255
    assert store.claim(long_ns, "k", new()).mine
    assert get(store, long_ns, "k").namespace == long_ns
    assert [r.namespace for r in store.list(namespace=long_ns)] == [long_ns]
