"""The facade over the claim protocol (DESIGN §4, docs/guarantees.md, docs/configuration.md).

Behaviour that touches the ledger runs on every backend (``any_url``: memory, SQLite, and
PostgreSQL / MariaDB in the full session). Time-dependent behaviour (TTL, leases) uses a
``MemoryStore`` with a fake clock, or claims made directly with an already-expired lease.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from onceonly_core import (
    BLOCKED,
    GLOBAL,
    NOT_DONE,
    CachedFailure,
    CallContext,
    CodecError,
    ConfigError,
    Guard,
    InProgress,
    KeyReuseError,
    LeaseLost,
    MemoryStore,
    Outcome,
    UnknownOutcome,
    current_call,
)
from onceonly_core.fingerprint import tool_identity
from onceonly_core.stores import NewClaim, Store

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    """A fake clock for MemoryStore: time moves only when a test says so."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def guard_for(url: str, namespace: str, **options: Any) -> Guard:
    extra: dict[str, Any] = {}
    if url.startswith("sqlite"):
        url += "?synchronous=normal"
    elif not url.startswith("memory"):
        extra["store_options"] = {"auto_migrate": True}
    return Guard(url, namespace=namespace, quiet=True, **extra, **options)


@pytest.fixture
def make(any_url: str, namespace: str) -> Iterator[Callable[..., Guard]]:
    made: list[Guard] = []

    def factory(**options: Any) -> Guard:
        g = guard_for(any_url, namespace, **options)
        made.append(g)
        return g

    yield factory
    for g in made:
        g.close()


@pytest.fixture
def g(make: Callable[..., Guard]) -> Guard:
    return make()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fg(clock: Clock) -> Guard:
    """A guard on a MemoryStore with a fake clock."""
    return Guard(store=MemoryStore(clock=clock), namespace="fake", quiet=True)


class Counter:
    """A tool that counts its executions and returns a fresh value each time."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()

    def __call__(self, *args: Any) -> dict[str, Any]:
        with self.lock:
            self.calls.append(args)
            return {"args": list(args), "run": len(self.calls)}


def record(g: Guard, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    rec = g.store.get(g.current_namespace(), g.key_for(fn, *args, **kwargs))
    assert rec is not None
    return rec


def dead_claim(g: Guard, fn: Callable[..., Any], *args: Any, owner: str = "dead-owner") -> Any:
    """Claim a call's key as an owner that died: its lease has already expired."""
    rec = g.store.claim(
        g.current_namespace(), g.key_for(fn, *args), NewClaim(tool_identity(fn), owner, -1.0)
    )
    assert rec.mine
    return rec


def watch_waits(store: Store) -> threading.Event:
    """An event set when a caller whose claim found the key taken reads it again (waits)."""
    waiting = threading.Event()
    local = threading.local()
    claim, get = store.claim, store.get

    def watched_claim(*args: Any, **kwargs: Any) -> Any:
        rec = claim(*args, **kwargs)
        local.lost = not rec.mine
        return rec

    def watched_get(*args: Any, **kwargs: Any) -> Any:
        if getattr(local, "lost", False):
            waiting.set()
        return get(*args, **kwargs)

    store.claim = watched_claim  # type: ignore[method-assign]
    store.get = watched_get  # type: ignore[method-assign]
    return waiting


class Blocker:
    """A tool that blocks until released, so a test can act while it is running."""

    def __init__(self, value: Any = "done") -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.value = value
        self.runs = 0

    def __call__(self, x: int) -> Any:
        self.runs += 1
        self.started.set()
        assert self.release.wait(20), "the test never released the tool"
        return self.value


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as err:
            out.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# -- exactly once, replay ------------------------------------------------------------------


def test_exactly_once_then_replay(g: Guard) -> None:
    tool = Counter()
    first = g(tool, "c1", 500)
    assert first == {"args": ["c1", 500], "run": 1}
    assert g(tool, "c1", 500) == first
    assert g(tool, "c1", 500) == first
    assert g(tool, "c2", 500) == {"args": ["c2", 500], "run": 2}
    assert len(tool.calls) == 2
    rec = record(g, tool, "c1", 500)
    assert (rec.state, rec.executions, rec.token, rec.attempt) == ("succeeded", 1, 1, 1)
    assert rec.tool == tool_identity(tool)


class CountingStore(MemoryStore):
    """A MemoryStore that records which primitive each call of the guard used."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def claim(self, namespace: str, key: str, new: NewClaim) -> Any:
        self.ops.append("claim")
        return super().claim(namespace, key, new)

    def get(self, namespace: str, key: str) -> Any:
        self.ops.append("get")
        return super().get(namespace, key)

    def finish(self, *args: Any, **kwargs: Any) -> Any:
        self.ops.append("finish")
        return super().finish(*args, **kwargs)


@pytest.mark.parametrize("way", ["guard", "run_call"])
def test_a_replay_is_one_claim_with_its_hooks_and_stats(way: str) -> None:
    # The replay hot path (protocol.replayed) answers from the claim's record alone:
    # no second read, no write; the on_replay hook and the stats see it as before.
    store = CountingStore()
    g = Guard(store=store, quiet=True)
    seen: list[Outcome] = []
    g.on_replay(seen.append)

    def pay(order: str) -> dict[str, str]:
        return {"paid": order}

    def call() -> Any:
        if way == "guard":
            return g(pay, "o-1")
        return g.run_call("pay", {"order": "o-1"}, lambda: pay("o-1"), scope=GLOBAL).result

    assert call() == {"paid": "o-1"}
    assert store.ops == ["claim", "finish"]
    store.ops.clear()
    assert call() == {"paid": "o-1"}
    assert store.ops == ["claim"]
    assert [(o.decision, o.value) for o in seen] == [("replayed", {"paid": "o-1"})]
    assert g.stats()["replayed"] == 1 and g.stats()["executed"] == 1


def test_exactly_once_then_replay_async(g: Guard) -> None:
    runs: list[int] = []

    async def send(to: int) -> dict[str, int]:
        runs.append(to)
        await asyncio.sleep(0)
        return {"sent": to}

    async def main() -> list[Any]:
        return [await g(send, 1), await g(send, 1), await g(send, 2), await g(send, 1)]

    assert asyncio.run(main()) == [{"sent": 1}, {"sent": 1}, {"sent": 2}, {"sent": 1}]
    assert runs == [1, 2]


def test_once_decorator_sync_and_async(g: Guard) -> None:
    runs: list[str] = []

    @g.once
    def send(to: str) -> str:
        runs.append(to)
        return f"sent {to}"

    @g.once(key_args=["order"])
    async def refund(order: int, reason: str) -> str:
        runs.append(f"refund {order}")
        return reason

    assert send("a") == send("a") == "sent a"
    assert send.__name__ == "send"

    async def main() -> list[str]:
        return [await refund(1, "first"), await refund(1, "second")]

    assert asyncio.run(main()) == ["first", "first"]
    assert runs == ["a", "refund 1"]


def test_a_tool_guarded_twice_runs_instead_of_waiting_on_itself(g: Guard) -> None:
    # Regression: guard(fn) of a @guard.once function claimed the key, then the inner
    # call found its own claim running and waited `wait` seconds for InProgress.
    runs: list[str] = []

    @g.once
    def send(to: str) -> str:
        runs.append(to)
        return f"sent {to}"

    fast = g.using(wait=0)
    assert fast(send, "a") == "sent a"
    assert fast(send, "a") == "sent a"
    wrapped = g.wrap_tools({"send": send}, wait=0)
    assert wrapped["send"]("a") == "sent a"
    assert wrapped["send"]("b") == "sent b"
    assert runs == ["a", "b"]

    @g.once
    async def asend(to: str) -> str:
        runs.append(to)
        return to

    async def main() -> list[str]:
        return [await g.using(wait=0)(asend, "c"), await g.using(wait=0)(asend, "c")]

    assert asyncio.run(main()) == ["c", "c"]
    assert runs == ["a", "b", "c"]


def test_a_tool_returning_none_replays_none(g: Guard) -> None:
    runs: list[int] = []

    def notify(x: int) -> None:
        runs.append(x)

    assert g(notify, 1) is None
    assert g(notify, 1) is None  # not BLOCKED
    assert runs == [1]


# -- payload check ---------------------------------------------------------------------------


def test_key_reuse_with_different_arguments_is_an_error(g: Guard) -> None:
    tool = Counter()
    by_key = g.using(key="order-42")
    first = by_key(tool, "c1", 500)
    assert by_key(tool, "c1", 500) == first
    with pytest.raises(KeyReuseError) as info:
        by_key(tool, "c1", 501)
    assert info.value.key == "order-42"
    assert info.value.namespace == g.current_namespace()
    assert isinstance(info.value, ValueError)
    assert len(tool.calls) == 1
    # Opt-out: replay whatever ran first.
    assert g.using(key="order-42", check_payload=False)(tool, "c1", 999) == first
    # exclude= keeps volatile arguments out of the check too.
    stamp = g.using(key="order-43", exclude=["at"])

    def timed(order: int, at: float) -> int:
        return order

    assert stamp(timed, 1, 1.0) == 1
    assert stamp(timed, 1, 2.0) == 1
    with pytest.raises(KeyReuseError):
        stamp(timed, 2, 2.0)
    assert len(tool.calls) == 1


# -- failures --------------------------------------------------------------------------------


class Declined(Exception):
    pass


def test_a_failure_is_not_cached_and_the_error_propagates_unchanged(g: Guard) -> None:
    attempts: list[int] = []
    error = Declined("card declined: insufficient funds")

    def charge(amount: int) -> str:
        attempts.append(amount)
        if len(attempts) == 1:
            raise error
        return "charged"

    with pytest.raises(Declined) as info:
        g(charge, 5)
    assert info.value is error  # the tool's own exception object, not wrapped
    rec = record(g, charge, 5)
    assert rec.state == "failed"
    assert rec.executions == 0
    assert "Declined: card declined: insufficient funds" in (rec.error or "")
    assert g(charge, 5) == "charged"
    assert g(charge, 5) == "charged"
    assert attempts == [5, 5]
    rec = record(g, charge, 5)
    assert (rec.state, rec.executions, rec.attempt, rec.token) == ("succeeded", 1, 2, 2)
    assert rec.error is None


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken too")


@pytest.mark.parametrize("quiet", [True, False])
def test_an_exception_whose_str_raises_is_still_the_error_and_releases_the_key(
    make: Callable[..., Guard], quiet: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: formatting the error text raised inside the protocol, so the caller got
    # RuntimeError instead of the tool's error and the record stayed running (live lease).
    caplog.set_level(logging.INFO, "onceonly")  # not quiet: the decision log formats it too
    g = make().configure(quiet=quiet)
    calls: list[int] = []

    def tool(x: int) -> str:
        calls.append(x)
        if len(calls) == 1:
            raise Unprintable()
        return "ok"

    with pytest.raises(Unprintable):
        g(tool, 1)
    rec = record(g, tool, 1)
    assert (rec.state, rec.lease_live) == ("failed", False)
    assert "Unprintable" in (rec.error or "")
    assert g.using(wait=0)(tool, 1) == "ok"


def test_cache_errors_replays_the_failure(g: Guard) -> None:
    attempts: list[int] = []

    def charge(amount: int) -> str:
        attempts.append(amount)
        raise ValueError("declined")

    cached = g.using(cache_errors=True)
    with pytest.raises(ValueError, match="declined") as first:
        cached(charge, 5)
    assert type(first.value) is ValueError
    with pytest.raises(CachedFailure) as info:
        cached(charge, 5)
    assert info.value.error_type == "builtins.ValueError"
    assert info.value.message == "declined"
    assert attempts == [5]
    with pytest.raises(ValueError):  # without the option the failure is retried
        g(charge, 5)
    assert attempts == [5, 5]


# -- ttl, max, unlimited, replay=False -----------------------------------------------------


def test_ttl_counts_from_completion_and_replays_do_not_extend_it(fg: Guard, clock: Clock) -> None:
    runs: list[float] = []

    def report(x: int) -> int:
        runs.append(clock.t)
        clock.advance(3)  # the tool takes 3 s: the window starts when it completes
        return len(runs)

    daily = fg.using(ttl=10)
    assert daily(report, 1) == 1  # runs at t0, completes at t0+3, expires at t0+13
    start = runs[0]
    for _ in range(9):  # a duplicate every second must not push the expiry back
        clock.advance(1)
        assert daily(report, 1) == 1
    assert clock.t == start + 12
    clock.advance(0.5)
    assert daily(report, 1) == 1  # t0+12.5: still inside the window
    clock.advance(0.5)
    assert daily(report, 1) == 2  # t0+13: expired, runs again
    assert daily(report, 1) == 2
    assert len(runs) == 2
    rec = record(fg, report, 1)
    assert rec.expires_at == clock.t + 10  # completion (now) + ttl
    assert rec.executions == 2


def test_ttl_via_policy_and_the_peer_case(fg: Guard, clock: Clock) -> None:
    # ledger-once: ttl=2 and a call every second ran once in 6 s (duplicates refreshed it).
    runs: list[float] = []

    def sync(x: int) -> None:
        runs.append(clock.t)

    fg.policy(sync, ttl=2)
    for _ in range(7):
        fg(sync, 1)
        clock.advance(1)
    assert len(runs) == 4  # t = 0, 2, 4, 6


def test_max_allows_n_executions_then_replays_the_last(g: Guard) -> None:
    tool = Counter()
    thrice = g.using(max=3)
    results = [thrice(tool, "x")["run"] for _ in range(5)]
    assert results == [1, 2, 3, 3, 3]
    rec = record(g, tool, "x")
    assert (rec.executions, rec.token) == (3, 3)
    with pytest.raises(ConfigError):
        g.using(max=0)(tool, "y")


def test_unlimited_runs_every_time_and_writes_nothing(g: Guard) -> None:
    tool = Counter()
    free = g.using(unlimited=True)
    assert [free(tool, "q")["run"] for _ in range(3)] == [1, 2, 3]
    g.policy(tool, unlimited=True)
    assert g(tool, "q")["run"] == 4
    assert g.store.list(namespace=g.namespace, prefix=True) == []
    assert g.stats()["attempts"] == 4


def test_replay_false_returns_blocked(g: Guard) -> None:
    tool = Counter()
    strict = g.using(replay=False)
    assert strict(tool, 1) == {"args": [1], "run": 1}
    again = strict(tool, 1)
    assert again is BLOCKED
    assert not again
    assert repr(again) == "BLOCKED"
    assert len(tool.calls) == 1
    assert g(tool, 1) == {"args": [1], "run": 1}  # replay is per call: the result is stored


def test_wrap_tools_blocked_return(g: Guard) -> None:
    sent: list[str] = []

    def notify(to: str) -> None:
        sent.append(to)
        return None

    def lookup(q: str) -> str:
        return f"found {q}"

    tools = g.wrap_tools({"notify": notify, "lookup": lookup}, blocked_return="duplicate")
    assert set(tools) == {"notify", "lookup"}
    assert tools["notify"]("a") is None  # the real first run returns the real None
    assert tools["notify"]("a") == "duplicate"
    assert tools["lookup"]("x") == "found x"
    assert tools["lookup"]("x") == "duplicate"
    as_list = g.wrap_tools([notify, lookup])
    assert isinstance(as_list, list)
    assert as_list[0]("b") is None
    assert as_list[0]("b") is None  # default: replay
    assert as_list[1]("x") == "found x"  # replay of the dict-wrapped run
    assert sent == ["a", "b"]
    with pytest.raises(ConfigError):
        g.wrap_tools(notify)


# -- force, retry, clear ---------------------------------------------------------------------


def test_force_runs_again_and_becomes_the_result(g: Guard) -> None:
    tool = Counter()
    assert g(tool, 1)["run"] == 1
    assert g.force(tool, 1)["run"] == 2
    assert g(tool, 1)["run"] == 2
    rec = record(g, tool, 1)
    assert (rec.executions, rec.token, rec.attempt) == (2, 2, 2)
    assert g.force(tool, 2)["run"] == 3  # force on a new key just runs


def test_retry_clears_so_the_next_call_runs(g: Guard) -> None:
    tool = Counter()
    assert g.retry(tool, 1) is False  # nothing to clear
    g(tool, 1)
    assert g.retry(tool, 1) is True
    rec = record(g, tool, 1)
    assert (rec.state, rec.token) == ("cleared", 1)  # the token is kept
    assert g(tool, 1)["run"] == 2
    assert record(g, tool, 1).token == 2  # the next run took it over: token + 1
    assert g(tool, 1)["run"] == 2
    assert g.clear(g.key_for(tool, 1)) is True
    assert g(tool, 1)["run"] == 3


def test_retry_refuses_a_live_running_record(g: Guard) -> None:
    tool = Blocker()
    t, out = in_thread(lambda: g(tool, 1))
    assert tool.started.wait(10)
    with pytest.raises(InProgress):
        g.retry(tool, 1)
    with pytest.raises(InProgress):
        g.clear(g.key_for(tool, 1))
    tool.release.set()
    t.join(10)
    assert out == ["done"]
    assert tool.runs == 1


def test_a_stale_owner_from_before_a_clear_cannot_complete(g: Guard) -> None:
    tool = Counter()
    ns, key = g.current_namespace(), g.key_for(tool, 1)
    zombie = dead_claim(g, tool, 1)  # owner froze; its lease expired
    assert g.retry(tool, 1) is True  # clearing an expired claim is allowed
    rec = g.store.get(ns, key)
    assert rec is not None
    assert (rec.state, rec.token) == ("cleared", zombie.token)
    assert not g.store.finish(ns, key, zombie.token, ok=True, result='"zombie"')
    assert not g.store.heartbeat(ns, key, zombie.token, 30.0)
    assert g(tool, 1)["run"] == 1
    rec = g.store.get(ns, key)
    assert rec is not None
    assert rec.token == zombie.token + 1
    assert not g.store.finish(ns, key, zombie.token, ok=True, result='"zombie"')
    assert g(tool, 1) == {"args": [1], "run": 1}


# -- policies and options ----------------------------------------------------------------------


def test_policy_per_tool(g: Guard) -> None:
    runs: list[str] = []

    def a(x: int) -> int:
        runs.append("a")
        return runs.count("a")

    def b(x: int) -> int:
        runs.append("b")
        return runs.count("b")

    def named(x: int) -> int:
        return x

    g.policy(a, max=2)
    assert [g(a, 1) for _ in range(3)] == [1, 2, 2]
    assert [g(b, 1) for _ in range(3)] == [1, 1, 1]
    g.policy(tool_identity(named), replay=False)  # by name
    assert g(named, 1) == 1
    assert g(named, 1) is BLOCKED
    g.policy(a, max=3)  # merged with what was set before, and picked up at once
    assert g(a, 1) == 3
    with pytest.raises(ConfigError):
        g.policy(a, no_such_option=1)
    with pytest.raises(ConfigError):
        g.policy(a, lease=0)


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError):
        Guard(store=MemoryStore(), bogus=1)
    with pytest.raises(ConfigError):
        Guard(store=MemoryStore(), lease=-1)
    with pytest.raises(ConfigError):
        Guard(store=MemoryStore(), on_unknown="ignore")
    with pytest.raises(ConfigError):
        Guard(store=MemoryStore(), namespace="")
    with pytest.raises(ConfigError):
        Guard(store=MemoryStore(), namespace="bad\nname")
    g = Guard(store=MemoryStore(), quiet=True)
    with pytest.raises(ConfigError):
        g.using(bogus=1)
    with pytest.raises(ConfigError):
        g(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError), g.workflow(""):
        pass


# -- in progress -----------------------------------------------------------------------------


def test_a_concurrent_caller_waits_and_gets_the_same_result(make: Callable[..., Guard]) -> None:
    g = make()
    other = Guard(store=g.store, namespace=g.namespace, quiet=True)  # another worker
    waiting = watch_waits(g.store)
    tool = Blocker(value={"charged": 500})
    t1, out1 = in_thread(lambda: g(tool, 1))
    assert tool.started.wait(10)
    t2, out2 = in_thread(lambda: other(tool, 1))
    assert waiting.wait(10), "the second caller never started waiting"
    tool.release.set()
    t1.join(10)
    t2.join(10)
    assert out1 == out2 == [{"charged": 500}]
    assert tool.runs == 1
    assert other.stats()["replayed"] == 1


def test_wait_zero_raises_in_progress_at_once(g: Guard) -> None:
    tool = Blocker()
    t, out = in_thread(lambda: g(tool, 1))
    assert tool.started.wait(10)
    with pytest.raises(InProgress) as info:
        g.using(wait=0)(tool, 1)
    assert info.value.key == g.key_for(tool, 1)
    assert info.value.owner is not None
    rec = record(g, tool, 1)
    assert (rec.state, rec.token) == ("running", 1)  # untouched by the refused caller
    tool.release.set()
    t.join(10)
    assert out == ["done"]
    assert tool.runs == 1


def test_wait_is_bounded_by_in_progress(fg: Guard, clock: Clock) -> None:
    # A live claim by another process (fake clock: its lease never expires here).
    tool = Counter()
    fg.store.claim(
        fg.current_namespace(), fg.key_for(tool, 1), NewClaim(tool_identity(tool), "other", 60)
    )
    with pytest.raises(InProgress):
        fg.using(wait=0.05)(tool, 1)
    assert tool.calls == []


def test_sixteen_threads_on_one_key_execute_once(g: Guard) -> None:
    tool = Counter()
    barrier = threading.Barrier(16)
    results: list[Any] = []

    def worker() -> None:
        barrier.wait(10)
        results.append(g(tool, "same-key"))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(tool.calls) == 1
    assert results == [{"args": ["same-key"], "run": 1}] * 16
    stats = g.stats()
    assert (stats["executed"], stats["replayed"], stats["failed"]) == (1, 15, 0)


def test_max_is_exact_under_concurrency(g: Guard) -> None:
    tool = Counter()
    barrier = threading.Barrier(8)
    results: list[int] = []

    def worker() -> None:
        barrier.wait(10)
        results.append(g.using(max=3)(tool, "k")["run"])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(tool.calls) == 3
    assert sorted(results)[:3] == [1, 2, 3]
    assert sorted(results)[3:] == [3] * 5  # everyone else replays the last run
    assert record(g, tool, "k").executions == 3


def test_async_gather_of_identical_calls_runs_once(g: Guard) -> None:
    runs: list[int] = []

    async def send(x: int) -> str:
        runs.append(x)
        await asyncio.sleep(0.05)
        return "sent"

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(g(send, 1) for _ in range(4))))

    assert asyncio.run(main()) == ["sent"] * 4
    assert runs == [1]


# -- unknown outcomes (expired leases) ------------------------------------------------------


def test_expired_lease_retry_runs_again_with_the_same_idempotency_key(g: Guard) -> None:
    seen: list[CallContext] = []

    def charge(x: int) -> str:
        ctx = current_call()
        assert ctx is not None
        seen.append(ctx)
        return "charged"

    zombie = dead_claim(g, charge, 1)
    assert g.using(wait=0)(charge, 1) == "charged"  # no waiting for an expired lease
    ctx = seen[0]
    assert (ctx.attempt, ctx.token) == (2, zombie.token + 1)
    assert ctx.idempotency_key == f"{g.current_namespace()}:{g.key_for(charge, 1)}"
    rec = record(g, charge, 1)
    assert (rec.state, rec.executions, rec.attempt) == ("succeeded", 1, 2)
    assert not g.store.finish(g.current_namespace(), rec.key, zombie.token, ok=True, result="1")


def test_expired_lease_raise_leaves_it_for_reconciliation(g: Guard) -> None:
    tool = Counter()
    zombie = dead_claim(g, tool, 1, owner="host:42:abc")
    with pytest.raises(UnknownOutcome) as info:
        g.using(on_unknown="raise")(tool, 1)
    assert (info.value.owner, info.value.token) == ("host:42:abc", zombie.token)
    assert tool.calls == []
    rec = record(g, tool, 1)
    assert (rec.state, rec.token, rec.owner) == ("running", zombie.token, "host:42:abc")
    assert g.force(tool, 1)["run"] == 1  # the documented way out after reconciling


def test_expired_lease_reconcile_records_the_downstream_answer(g: Guard) -> None:
    tool = Counter()
    asked: list[CallContext] = []

    def reconcile(ctx: CallContext) -> Any:
        asked.append(ctx)
        return {"found": ctx.idempotency_key}

    dead_claim(g, tool, 1)
    outcomes: list[Outcome] = []
    g.on_success(outcomes.append)
    value = g.using(on_unknown=reconcile)(tool, 1)
    assert value == {"found": asked[0].idempotency_key}
    assert tool.calls == []  # the effect had happened: not run again
    assert outcomes[0].decision == "reconciled"
    assert g(tool, 1) == value  # replayed from now on
    rec = record(g, tool, 1)
    assert (rec.state, rec.executions, rec.attempt) == ("succeeded", 1, 2)


def test_expired_lease_reconcile_not_done_runs_the_tool(g: Guard) -> None:
    tool = Counter()
    dead_claim(g, tool, 1)
    assert g.using(on_unknown=lambda ctx: NOT_DONE)(tool, 1)["run"] == 1
    assert len(tool.calls) == 1


def test_a_failing_reconciler_gives_the_key_back(g: Guard) -> None:
    tool = Counter()
    dead_claim(g, tool, 1)

    def broken(ctx: CallContext) -> Any:
        raise ConnectionError("downstream unreachable")

    with pytest.raises(ConnectionError):
        g.using(on_unknown=broken)(tool, 1)
    rec = record(g, tool, 1)
    assert rec.state == "running"
    assert not rec.lease_live  # released at once
    with pytest.raises(UnknownOutcome):  # still unknown: nothing was decided
        g.using(on_unknown="raise", wait=0)(tool, 1)
    assert g.using(wait=0)(tool, 1)["run"] == 1


def test_lease_expiry_with_a_fake_clock_and_a_zombie_owner(fg: Guard, clock: Clock) -> None:
    tool = Counter()
    ns, key = fg.current_namespace(), fg.key_for(tool, 1)
    fg.store.claim(ns, key, NewClaim(tool_identity(tool), "frozen", 30))
    clock.advance(29)
    with pytest.raises(InProgress):
        fg.using(wait=0)(tool, 1)
    clock.advance(1)  # lease_until == now: still live (take_over needs lease_until < now)
    with pytest.raises(InProgress):
        fg.using(wait=0)(tool, 1)
    clock.advance(0.001)
    with pytest.raises(UnknownOutcome):
        fg.using(on_unknown="raise")(tool, 1)
    assert fg(tool, 1)["run"] == 1
    assert not fg.store.finish(ns, key, 1, ok=True, result='"frozen"')
    rec = fg.store.get(ns, key)
    assert rec is not None
    assert (rec.token, rec.executions, rec.result) == (2, 1, '{"args":[1],"run":1}')


def test_a_paused_owner_gets_lease_lost_and_the_record_shows_one_winner(
    fg: Guard, clock: Clock
) -> None:
    other = Guard(store=fg.store, namespace=fg.namespace, quiet=True)
    a = Blocker(value="A")

    def b_tool(x: int) -> str:
        return "B"

    t, out = in_thread(lambda: fg.using(name="shared.tool")(a, 1))
    assert a.started.wait(10)
    clock.advance(100)  # A is frozen past its 30 s lease (no heartbeat in fake time)
    assert other.using(name="shared.tool")(b_tool, 1) == "B"
    a.release.set()
    t.join(10)
    (err,) = out
    assert isinstance(err, LeaseLost)
    assert err.result == "A"  # what the stale execution computed
    recs = fg.store.list(namespace=fg.namespace)
    assert len(recs) == 1
    assert (recs[0].result, recs[0].executions, recs[0].token) == ('"B"', 1, 2)


# -- call context and scopes ---------------------------------------------------------------


def test_current_call_inside_the_tool(g: Guard) -> None:
    seen: list[CallContext | None] = []

    def charge(x: int) -> int:
        seen.append(current_call())
        return x

    assert current_call() is None
    with g.run("run-7"), g.as_caller("worker-3"):
        g(charge, 1)
    assert current_call() is None
    ctx = seen[0]
    assert ctx is not None
    key = g.key_for(charge, 1)
    assert (ctx.namespace, ctx.key, ctx.tool) == (g.namespace, key, tool_identity(charge))
    assert (ctx.token, ctx.attempt, ctx.run_id, ctx.caller) == (1, 1, "run-7", "worker-3")
    assert ctx.idempotency_key == f"{g.namespace}:{key}"
    rec = record(g, charge, 1)
    assert (rec.run_id, rec.caller) == ("run-7", "worker-3")
    assert rec.owner is not None


def test_caller_default_and_idempotency_key_length() -> None:
    g = Guard(store=MemoryStore(), namespace="n" * 250, quiet=True, caller="svc-1")
    seen: list[CallContext | None] = []
    g(lambda x: seen.append(current_call()), 1)
    ctx = seen[0]
    assert ctx is not None
    assert ctx.caller == "svc-1"
    # Downstream APIs cap key length: long namespace:key pairs are hashed.
    assert len(ctx.idempotency_key) <= 255
    assert ctx.idempotency_key.startswith("oo-")


def test_workflow_scope_is_per_thread(g: Guard) -> None:
    seen: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def tool(x: int) -> str:
        ctx = current_call()
        assert ctx is not None
        return ctx.namespace

    def worker(wf: str) -> None:
        with g.workflow(wf):
            barrier.wait(10)  # both threads are inside their workflow at once
            seen[wf] = g(tool, 1)
            barrier.wait(10)
            seen[wf + "-after"] = g.current_namespace()

    threads = [threading.Thread(target=worker, args=(wf,)) for wf in ("wf-a", "wf-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    ns = g.namespace
    assert seen == {
        "wf-a": f"{ns}/wf-a",
        "wf-b": f"{ns}/wf-b",
        "wf-a-after": f"{ns}/wf-a",
        "wf-b-after": f"{ns}/wf-b",
    }
    assert g.current_namespace() == ns
    namespaces = {r.namespace for r in g.store.list(namespace=ns, prefix=True)}
    assert namespaces == {f"{ns}/wf-a", f"{ns}/wf-b"}


def test_workflow_scope_is_per_asyncio_task(g: Guard) -> None:
    async def tool(x: int) -> str:
        await asyncio.sleep(0.01)
        ctx = current_call()
        assert ctx is not None
        return ctx.namespace

    async def main() -> dict[str, Any]:
        gate = asyncio.Event()

        async def worker(wf: str) -> tuple[str, str]:
            with g.workflow(wf), g.as_caller(wf):
                await gate.wait()
                got = await g(tool, 1)
                await asyncio.sleep(0.01)
                return got, g.current_namespace()

        tasks = [asyncio.create_task(worker(wf)) for wf in ("a", "b")]
        await asyncio.sleep(0.01)
        gate.set()
        done = await asyncio.gather(*tasks)
        return {"a": done[0], "b": done[1], "outside": g.current_namespace()}

    ns = g.namespace
    assert asyncio.run(main()) == {
        "a": (f"{ns}/a", f"{ns}/a"),
        "b": (f"{ns}/b", f"{ns}/b"),
        "outside": ns,
    }
    callers = {r.namespace: r.caller for r in g.store.list(namespace=ns, prefix=True)}
    assert callers == {f"{ns}/a": "a", f"{ns}/b": "b"}


# -- hooks and stats -----------------------------------------------------------------------


def test_hooks_get_outcomes_and_a_raising_hook_breaks_nothing(
    g: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[tuple[str, Any]] = []
    g.on_success(lambda o: events.append((o.decision, o.value)))
    g.on_replay(lambda o: events.append((o.decision, o.value)))
    g.on_block(lambda o: events.append((o.decision, o.value)))
    g.on_failure(lambda o: events.append((o.decision, type(o.error).__name__)))

    def broken_hook(o: Outcome) -> None:
        raise RuntimeError("hook broke")

    for register in (g.on_success, g.on_replay, g.on_block, g.on_failure):
        register(broken_hook)

    def tool(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x * 10

    with caplog.at_level(logging.ERROR, logger="onceonly"):
        assert g(tool, 1) == 10
        assert g(tool, 1) == 10
        assert g.using(replay=False)(tool, 1) is BLOCKED
        with pytest.raises(ValueError):
            g(tool, -1)
    assert events == [
        ("executed", 10),
        ("replayed", 10),
        ("blocked", BLOCKED),  # the value the caller got
        ("failed", "ValueError"),
    ]
    logged = [r for r in caplog.records if "broken_hook" in r.getMessage()]
    assert len(logged) == 4  # one per kind, each with its traceback
    assert all(r.exc_info is not None for r in logged)
    assert g.stats() == {"attempts": 4, "executed": 1, "replayed": 1, "blocked": 1, "failed": 1}


def test_outcome_fields(g: Guard) -> None:
    got: list[Outcome] = []
    g.on_success(got.append)
    g.on_replay(got.append)

    def tool(x: int) -> int:
        return x

    g(tool, 3)
    g(tool, 3)
    key = g.key_for(tool, 3)
    for o in got:
        assert (o.tool, o.namespace, o.key, o.value, o.token) == (
            tool_identity(tool),
            g.namespace,
            key,
            3,
            1,
        )
    assert [o.decision for o in got] == ["executed", "replayed"]


def test_decisions_are_logged_never_printed(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    monkeypatch.delenv("ONCEONLY_QUIET", raising=False)
    loud = Guard(store=MemoryStore())

    def tool(x: int) -> int:
        return x

    loud(tool, 1)  # no handler wants INFO: nothing is formatted, nothing printed
    assert capsys.readouterr() == ("", "")
    assert caplog.records == []
    caplog.set_level(logging.INFO, "onceonly")
    loud(tool, 1)
    loud(tool, 2)
    assert capsys.readouterr() == ("", "")  # the library prints nothing, ever
    got = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [
        ("onceonly", logging.INFO, f"↺ {tool_identity(tool)} replayed"),
        ("onceonly", logging.INFO, f"✓ {tool_identity(tool)} executed"),
    ]
    assert [r.onceonly_decision for r in caplog.records] == ["replayed", "executed"]  # type: ignore[attr-defined]
    caplog.clear()
    monkeypatch.setenv("ONCEONLY_QUIET", "1")
    quiet = Guard(store=MemoryStore())  # read at first use: no decision records at all
    quiet(tool, 1)
    quiet(tool, 1)
    assert caplog.records == []
    assert capsys.readouterr() == ("", "")


def test_check_and_reading(g: Guard) -> None:
    assert g.check() is True
    tool = Counter()
    g(tool, 1)
    g(tool, 2)
    hist = g.history(tool)
    assert {r.key for r in hist} == {g.key_for(tool, 1), g.key_for(tool, 2)}
    assert all(r.tool == tool_identity(tool) for r in hist)
    assert len(g.history(limit=1)) == 1
    out = io.StringIO()
    g.log(file=out)  # a requested listing, written to the file it is given
    lines = out.getvalue().splitlines()  # the two calls and check()'s own record
    assert len(lines) == 3
    assert all("succeeded" in line and "runs=1" in line for line in lines)


# -- interruptions and odd tools ----------------------------------------------------------


def test_a_sync_def_returning_a_coroutine_is_a_clear_type_error(g: Guard) -> None:
    ran: list[int] = []

    async def send(x: int) -> str:
        ran.append(x)
        return "sent"

    def looks_sync(x: int) -> Any:
        return send(x)  # a coroutine nobody awaits

    with pytest.raises(TypeError, match="await guard"):
        g(looks_sync, 1)
    assert ran == []  # and no "never awaited" warning (the coroutine was closed)
    rec = record(g, looks_sync, 1)
    assert rec.state == "failed"  # not left running
    assert not rec.lease_live


def test_an_async_tool_passed_to_the_sync_call_is_awaitable_not_run(g: Guard) -> None:
    ran: list[int] = []

    async def send(x: int) -> str:
        ran.append(x)
        return "sent"

    pending = g(send, 1)
    assert asyncio.iscoroutine(pending)
    assert ran == []
    assert g.store.list(namespace=g.namespace) == []  # nothing claimed until awaited
    assert asyncio.run(pending) == "sent"
    assert ran == [1]


def test_a_cancelled_task_leaves_an_expired_lease(g: Guard) -> None:
    ran: list[int] = []

    async def slow(x: int) -> str:
        ran.append(x)
        await asyncio.sleep(30)
        return "late"

    async def main() -> None:
        task = asyncio.create_task(g(slow, 1))
        while not ran:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    rec = record(g, slow, 1)
    assert rec.state == "running"
    assert not rec.lease_live  # expired at once: no 30 s wait for the next caller

    async def fast(x: int) -> str:
        return "now"

    with pytest.raises(UnknownOutcome):
        asyncio.run(g.using(on_unknown="raise", wait=0, name=tool_identity(slow))(fast, 1))
    assert asyncio.run(g.using(wait=0, name=tool_identity(slow))(fast, 1)) == "now"
    assert record(g, slow, 1).attempt == 2


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_leave_an_expired_lease(
    g: Guard, interrupt: type[BaseException]
) -> None:
    calls: list[int] = []

    def tool(x: int) -> str:
        calls.append(x)
        if len(calls) == 1:
            raise interrupt()
        return "ok"

    with pytest.raises(interrupt):
        g(tool, 1)
    rec = record(g, tool, 1)
    assert (rec.state, rec.lease_live) == ("running", False)
    assert g.using(wait=0)(tool, 1) == "ok"  # on_unknown="retry", immediately
    assert calls == [1, 1]


def test_a_result_that_cannot_be_stored(g: Guard) -> None:
    runs: list[int] = []

    class Handle:
        pass

    handle = Handle()

    def open_ticket(x: int) -> Handle:
        runs.append(x)
        return handle

    assert g(open_ticket, 1) is handle  # the first caller gets the value
    rec = record(g, open_ticket, 1)
    assert (rec.state, rec.executions, rec.result) == ("succeeded", 1, None)
    assert "result not stored" in (rec.error or "")
    with pytest.raises(CodecError, match="ran once"):
        g(open_ticket, 1)
    with pytest.raises(CodecError):
        g(open_ticket, 1)
    assert runs == [1]  # never re-run


@dataclasses.dataclass
class HalfBuilt:
    a: int
    b: int = dataclasses.field(init=False)  # never assigned: reading it raises


class ExplodingCodec:
    def encode(self, value: Any) -> str:
        raise KeyError("codec bug")

    def decode(self, text: str) -> Any:
        return text


@pytest.mark.parametrize("case", ["field getter raises", "custom codec raises"])
def test_any_error_while_encoding_the_result_still_records_the_success(
    make: Callable[..., Guard], case: str
) -> None:
    # Regression: only CodecError was handled; an AttributeError from a dataclass field or
    # any error of a custom codec escaped after the effect and left the record running
    # with a live lease (so it ran again once the lease expired).
    g = make() if case == "field getter raises" else make(codec=ExplodingCodec())
    runs: list[int] = []

    def create(x: int) -> Any:
        runs.append(x)
        return HalfBuilt(1) if case == "field getter raises" else {"id": x}

    value = g(create, 1)
    assert runs == [1]  # the caller of the effect gets the value
    assert isinstance(value, HalfBuilt) or value == {"id": 1}
    rec = record(g, create, 1)
    assert (rec.state, rec.executions, rec.result) == ("succeeded", 1, None)
    assert "result not stored" in (rec.error or "")
    with pytest.raises(CodecError):
        g(create, 1)
    assert runs == [1]


# -- the default guard -----------------------------------------------------------------------

LAZY_SCRIPT = r"""
import os, sys
import onceonly_core
from onceonly_core import guard
assert os.listdir(".") == [], os.listdir(".")
os.environ["ONCEONLY_DB_URL"] = "sqlite:///" + sys.argv[1]
os.environ["ONCEONLY_NAMESPACE"] = "late-ns"
def tool(x):
    return x * 2
assert guard(tool, 21) == 42
assert guard(tool, 21) == 42
assert os.listdir(".") == [], os.listdir(".")
print([r.namespace for r in guard.history()], guard.stats()["replayed"])
"""

DEFAULT_SCRIPT = r"""
import os
from onceonly_core import guard
assert os.listdir(".") == []
guard(lambda: 1)
print(sorted(os.listdir(".")))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCEONLY_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(ROOT), **extra)
    return env


def test_importing_creates_nothing_and_the_environment_is_read_at_first_use(
    tmp_path: Path,
) -> None:
    cwd = tmp_path / "empty"
    cwd.mkdir()
    db = tmp_path / "elsewhere" / "late.db"
    db.parent.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", LAZY_SCRIPT, str(db)],
        cwd=cwd,
        env=_clean_env(ONCEONLY_QUIET="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "['late-ns'] 1"
    assert proc.stderr == ""  # ONCEONLY_QUIET=1
    assert db.exists()
    assert list(cwd.iterdir()) == []


def test_the_default_ledger_is_created_at_first_use_only(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", DEFAULT_SCRIPT],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "onceonly.db" in proc.stdout
    assert proc.stderr == ""  # not quiet, but the library prints nothing: decisions are logged


# -- decisions made after review -----------------------------------------------------------
def test_wrap_tools_blocked_return_none_is_returned_for_duplicates() -> None:
    g = Guard(store=MemoryStore(), quiet=True)
    ran: list[str] = []

    def send(to: str) -> str:
        ran.append(to)
        return f"sent {to}"

    tools = g.wrap_tools({"send": send}, blocked_return=None)
    assert tools["send"]("a@x") == "sent a@x"
    assert tools["send"]("a@x") is None  # not BLOCKED, not the stored result
    assert ran == ["a@x"]


def test_a_failed_key_may_be_retried_with_corrected_arguments() -> None:
    # A failure is not a result: the key has nothing to protect yet, so the corrected call
    # runs (a succeeded key with different arguments still raises KeyReuseError).
    g = Guard(store=MemoryStore(), quiet=True)

    def charge(card: str) -> str:
        if card == "expired":
            raise ValueError("card expired")
        return f"charged {card}"

    with pytest.raises(ValueError):
        g.using(key="order-7")(charge, "expired")
    assert g.using(key="order-7")(charge, "new-card") == "charged new-card"
    with pytest.raises(KeyReuseError):
        g.using(key="order-7")(charge, "third-card")


def test_check_reuses_one_record() -> None:
    store = MemoryStore()
    g = Guard(store=store, quiet=True)
    for _ in range(3):
        assert g.check() is True
    records = store.list(namespace=g.namespace, prefix=True, limit=100)
    assert [r.key for r in records] == ["self-test"]
    assert records[0].state == "succeeded" and records[0].token == 3


def test_equal_option_values_share_one_prepared_tool() -> None:
    """Adapters pass a fresh ``key_args`` list (or name string) on every call: equal values
    reuse the prepared options instead of growing the cache; different values never share;
    option objects (a key= callable) are not cached, so the cache never keeps them alive."""
    g = Guard(store=MemoryStore(), quiet=True)
    name = "shop.refund"
    first = g._spec(name, {"key_args": ["order_id"], "name": name})
    again = g._spec("".join(["shop.", "refund"]), {"key_args": ["order_id"], "name": name})
    other = g._spec(name, {"key_args": ["reason"], "name": name})
    assert first is again
    assert other is not first and other.opts.key_args == ("reason",)
    assert g._spec(name, {"max": True}) is not g._spec(name, {"max": 1})
    assert len(g._specs) == 4
    keyed = g._spec(name, {"key": lambda order_id, reason: order_id})
    assert keyed is not g._spec(name, {"key": lambda order_id, reason: order_id})
    assert len(g._specs) == 4
    g.policy(name, ttl=5.0)  # a policy change makes prepared options stale
    assert g._specs == {} and g._spec(name, {}).opts.ttl == 5.0


# -- the one call path: run_call / arun_call (issue 14) ------------------------------------
def test_run_call_keys_by_tool_name_and_canonical_arguments(g: Guard) -> None:
    runs: list[dict[str, Any]] = []

    def thunk_for(args: dict[str, Any]) -> Callable[[], Any]:
        return lambda: runs.append(args) or {"charged": len(runs)}

    first = g.run_call("charge", {"amount": 1.5, "to": "cus_1"}, thunk_for({}), scope="t-1")
    assert (first.decision, first.result) == ("executed", {"charged": 1})
    # The same values after validation: key order, int vs float vs Decimal are one call.
    args: dict[str, Any] = {"to": "cus_1", "amount": Decimal("1.50")}
    again = g.run_call("charge", args, thunk_for(args), scope="t-1")
    assert (again.decision, again.result, again.key) == ("dedup", {"charged": 1}, first.key)
    assert g.run_call("charge", {"amount": 2, "to": "cus_1"}, thunk_for({}), scope="t-1").ok
    assert g.run_call("refund", {"amount": 1.5, "to": "cus_1"}, thunk_for({}), scope="t-1").ok
    assert len(runs) == 3

    # No signature involved, yet a callable keyed by call_tool under the same name and
    # arguments is the same call (adapters can move to run_call without new keys).
    def charge(amount: float, to: str) -> str:
        return "never runs"

    via_fn = g.call_tool(charge, {"to": "cus_1", "amount": 1.5}, tool="charge", scope="t-1")
    assert (via_fn.decision, via_fn.key) == ("dedup", first.key)
    assert g.key_for_call("charge", {"amount": 1.5, "to": "cus_1"}, scope="t-1") == first.key
    assert g.key_for_call("charge", {"amount": 1.5, "to": "cus_1"}, key_args=["to"]) != first.key


def test_run_call_scope_is_the_workflow(g: Guard) -> None:
    runs: list[str] = []

    def thunk() -> str:
        runs.append("x")
        return "sent"

    a = g.run_call("send", {"to": "ann"}, thunk, scope="conv-1")
    b = g.run_call("send", {"to": "ann"}, thunk, scope="conv-2")
    assert a.decision == b.decision == "executed" and a.key != b.key
    assert (a.namespace, b.namespace) == (f"{g.namespace}/conv-1", f"{g.namespace}/conv-2")
    with g.workflow("conv-1"):  # scope= and guard.workflow(...) are one thing
        assert g.run_call("send", {"to": "ann"}, thunk).decision == "dedup"
        # An explicit scope wins over the surrounding workflow, for this call only.
        assert g.run_call("send", {"to": "ann"}, thunk, scope="conv-3").decision == "executed"
        assert g.current_namespace() == f"{g.namespace}/conv-1"
    assert runs == ["x"] * 3
    assert g.current_namespace() == g.namespace
    with pytest.raises(ConfigError, match="scope"):
        g.run_call("send", {"to": "ann"}, thunk, scope="bad\nscope")


def test_run_call_thunk_sees_its_call_and_args_are_copied(g: Guard) -> None:
    seen: list[CallContext | None] = []
    args = {"items": [1, 2]}

    def thunk() -> int:
        seen.append(current_call())
        args["items"].append(3)  # the tool mutates its input: the key was taken before
        return 1

    res = g.run_call("tool", args, thunk, scope="s")
    assert seen[0] is not None and seen[0].key == res.key and seen[0].tool == "tool"
    with pytest.raises(ConfigError, match="mapping"):
        g.run_call("tool", [1, 2], thunk)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="strings"):
        g.run_call("tool", {1: "x"}, thunk)

    async def athunk() -> int:
        return 1

    with pytest.raises(ConfigError, match="arun_call"):
        g.run_call("tool", {}, athunk)


def test_arun_call_awaits_async_thunks_and_runs_sync_ones_off_the_loop(g: Guard) -> None:
    threads: list[int] = []

    async def afetch(n: int) -> int:
        threads.append(threading.get_ident())
        return n * 2

    def fetch(n: int) -> int:
        threads.append(threading.get_ident())
        return n * 3

    async def main() -> list[Any]:
        loop_thread = threading.get_ident()
        a = await g.arun_call("afetch", {"n": 1}, functools.partial(afetch, 1), scope="s")
        b = await g.arun_call("fetch", {"n": 1}, functools.partial(fetch, 1), scope="s")
        c = await g.arun_call("lam", {"n": 1}, lambda: afetch(5), scope="s")
        d = await g.arun_call("afetch", {"n": 1}, functools.partial(afetch, 1), scope="s")
        assert threads[0] == loop_thread and threads[1] != loop_thread
        return [(r.decision, r.result) for r in (a, b, c, d)]

    assert asyncio.run(main()) == [
        ("executed", 2),
        ("executed", 3),
        ("executed", 10),
        ("dedup", 2),
    ]


def test_an_unscoped_call_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    def warnings_of(g: Guard) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "onceonly" and r.levelno == logging.WARNING
        ]

    g = Guard(store=MemoryStore(), quiet=True)
    g.run_call("send_email", {"to": "a"}, lambda: 1)
    g.run_call("send_email", {"to": "b"}, lambda: 1)
    g.call_tool(lambda to: 1, {"to": "c"}, tool="other")
    assert len(warnings_of(g)) == 1
    assert "'send_email' ran without a scope" in warnings_of(g)[0]
    assert "deduplicated forever" in warnings_of(g)[0]
    caplog.clear()
    quiet = Guard(store=MemoryStore(), quiet=True)  # none of these is an unscoped dedup
    quiet.run_call("send_email", {"to": "a"}, lambda: 1, scope="conv-1")
    with quiet.workflow("conv-2"):
        quiet.run_call("send_email", {"to": "a"}, lambda: 1)
    quiet.run_call("search", {"q": "a"}, lambda: 1, read_only=True)
    quiet.run_call("search", {"q": "a"}, lambda: 1, unlimited=True)
    quiet.run_call("send_email", {"to": "a"}, lambda: 1, key="email-1")
    quiet.run_call("send_email", {"to": "a"}, lambda: 1, scope=GLOBAL)
    quiet(lambda to: 1, "a")  # the decorator family keys business calls: forever is the point
    assert warnings_of(quiet) == []
    assert quiet.history()[0].namespace == quiet.namespace  # GLOBAL: no workflow


def test_read_only_tools_are_never_deduplicated_but_are_governed_and_audited(
    g: Guard,
) -> None:
    from onceonly_core.governance.models import Policy

    runs: list[int] = []

    def search() -> list[int]:
        runs.append(1)
        return [len(runs)]

    first = g.run_call("search", {"q": "x"}, search, scope="s", read_only=True)
    second = g.run_call("search", {"q": "x"}, search, scope="s", read_only=True)
    assert [first.result, second.result] == [[1], [2]]  # fresh every time
    assert g.history() == []  # no ledger claim at all (this namespace and its scopes)
    g.policy("lookup", read_only=True)  # per tool, by policy, for every way in

    @g.once(name="lookup")
    def lookup(q: str) -> int:
        runs.append(1)
        return len(runs)

    assert [lookup("x"), lookup("x")] == [3, 4]
    g.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["search"]))
    with g.agent("bot"):
        blocked = g.run_call("search", {"q": "x"}, search, scope="s", read_only=True)
        ran = g.run_call("lookup", {"q": "x"}, lambda: lookup.__wrapped__("x"), scope="s")
    assert (blocked.decision, blocked.policy_reason) == ("blocked", "tool_blocked")
    assert (ran.decision, len(runs)) == ("executed", 5)
    logs = sorted((e.tool, e.decision) for e in g.gov.agent_logs("bot"))
    assert logs == [("lookup", "executed"), ("search", "blocked")]


# -- per-request tools are held weakly (issue 14: +310 MB for 3,000) ---------------------
class _Client:
    """A per-request tool object holding a large buffer."""

    def __init__(self) -> None:
        self.blob = bytearray(50_000)

    def charge(self, amount: int) -> int:
        return amount

    def __call__(self, amount: int) -> int:
        return amount


def _charge(blob: bytearray, amount: int) -> int:
    return amount


def _closure(blob: bytearray) -> Callable[[int], int]:
    def closure(amount: int) -> int:
        return amount + len(blob) * 0

    return closure


def test_per_request_tools_are_not_kept_alive() -> None:
    import gc
    import tracemalloc
    import weakref

    g = Guard(store=MemoryStore(), quiet=True)
    refs: list[weakref.ref[Any]] = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3_000):
            blob = bytearray(50_000)
            kind = i % 6
            if kind == 0:  # a closure over request state
                tool: Any = _closure(blob)
                refs.append(weakref.ref(tool))
            elif kind == 1:  # a partial binding a request object
                tool = functools.partial(_charge, blob)
                refs.append(weakref.ref(tool))
            else:  # a per-request object: called, or a bound method of it
                client = _Client()
                refs.append(weakref.ref(client))
                tool = client if kind == 2 else client.charge
                del client
            how = i % 5
            if how == 0:
                assert g(tool, i) == i
            elif how == 1:
                assert g.call_tool(tool, {"amount": i}).result == i
            elif how == 2:
                assert g.once(tool)(i) == i
            elif how == 3:
                assert g.wrap_tools([tool])[0](i) == i
            else:
                thunk = functools.partial(tool, i)
                assert g.run_call("pay", {"amount": i}, thunk, scope=GLOBAL).result == i
                del thunk
            del tool, blob
        gc.collect()
        alive = sum(r() is not None for r in refs)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert alive == 0, f"{alive} of 3000 per-request tools kept alive"
    assert len(g._fns) + len(g._methods) <= 3  # _charge (via partials), _Client.charge...
    assert len(g._specs) <= 10
    # 3,000 x 50 kB would be 150 MB: what remains is the ledger's records.
    assert grown < 20_000_000, grown
