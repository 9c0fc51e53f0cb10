"""The Redis ledger next to raw redis-py round trips, side by side in one run.

    python benchmarks/bench_redis.py [--calls N] [--url redis://127.0.0.1:6379/0]

Rows (µs per call, median of interleaved blocks; one process, one client, loopback):

* ``raw first``: ``SET k running NX`` then ``SET k result XX`` — the floor of a first call,
  which needs a claim and a completion (two round trips), as the guard does;
* ``store first``: the store's ``claim`` + ``finish`` on a new key (two scripts);
* ``guard first``: ``guard(tool, i)`` on a new key: the same two scripts, plus the guard;
* ``raw replay``: ``GET k`` — the floor of a replay (one round trip);
* ``store replay``: the store's ``claim`` on a done key: the script finds the record;
* ``guard replay``: ``guard(tool, i)`` on a key already done: the same, plus the guard
  (the key, the decision, the decoded result).

Target (issue 18): the Redis store's own first call and replay ≤ 1.5x their raw rows.
The guarded rows (the store plus the guard's own Python, the same on every backend) are
reported next to them without a target of their own: the guard's Python per call is
what the replay rows of ``run.py`` measure. Keys live under a prefix of their own
(``oo-bench-<hex>``), deleted at the end. The URL comes from ``--url`` or
ONCEONLY_REDIS_URL. Benchmarks measure; they never assert a timing.

Measured in the same interleaved run, to say what bounds the guarded rows (printed):

* ``memory first`` / ``memory replay``: the guard on ``memory://``: its own Python per
  call (key, decision, encoding, outcome), which the raw floor does not pay;
* ``wire GET``: ``GET`` sent the way the store sends its scripts (packed by hiredis on a
  held connection, without redis-py's command layer): the loopback round trip itself;
* the server's time per script (``INFO commandstats``) next to ``GET``'s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

import redis  # noqa: E402
from bench_common import floor_row  # noqa: E402

from onceonly_core import Guard  # noqa: E402
from onceonly_core.stores.base import NewClaim  # noqa: E402
from onceonly_core.stores.redis import RedisStore  # noqa: E402

TARGET = 1.5
FIRST_SCRIPTS = "claim + finish scripts (first call), each"
REPLAY_SCRIPT = "claim script finding a done record (replay)"


def tool(i: int) -> int:
    return i


def interleave(
    cases: dict[str, Callable[[int], None]], calls: int, blocks: int = 10
) -> dict[str, float]:
    """µs per call of each case, median over ``blocks`` blocks run in alternating order."""
    per = calls // blocks
    out: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    n = {k: 0 for k in cases}
    for b in range(blocks):
        for name in names if b % 2 == 0 else names[::-1]:
            fn, start = cases[name], n[name]
            t0 = time.perf_counter()
            for i in range(start, start + per):
                fn(i)
            out[name].append((time.perf_counter() - t0) / per * 1e6)
            n[name] = start + per
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000, help="timed calls per case")
    ap.add_argument(
        "--url", default=os.environ.get("ONCEONLY_REDIS_URL") or "redis://127.0.0.1:6379/0"
    )
    args = ap.parse_args()
    prefix = f"oo-bench-{uuid.uuid4().hex[:8]}"
    raw = redis.Redis.from_url(args.url)
    try:
        raw.ping()
    except redis.RedisError as err:
        print(f"Redis: skipped, not reachable at {args.url}: {err}")
        return
    store = RedisStore(args.url, prefix=prefix, durability_check=False)
    guard = Guard(store=store, namespace="bench", quiet=True)
    memory = Guard("memory://", namespace="bench", quiet=True)
    value = '{"v": 1}'
    claim = NewClaim("tool", "bench", 30.0)

    def raw_first(i: int) -> None:
        k = f"{prefix}:raw:{i}"
        raw.set(k, "running", nx=True)
        raw.set(k, value, xx=True)

    def guard_first(i: int) -> None:
        guard.using(key=f"f{i}")(tool, i)

    def raw_replay(i: int) -> None:
        raw.get(f"{prefix}:raw:{i % 100}")

    def guard_replay(i: int) -> None:
        guard.using(key=f"f{i % 100}")(tool, i % 100)

    def store_first(i: int) -> None:
        rec = store.claim("bench-store", f"s{i}", claim)
        store.finish("bench-store", f"s{i}", rec.token, ok=True, result=value)

    def store_replay(i: int) -> None:
        store.claim("bench-store", f"s{i % 100}", claim)

    def memory_first(i: int) -> None:
        memory.using(key=f"f{i}")(tool, i)

    def memory_replay(i: int) -> None:
        memory.using(key=f"f{i % 100}")(tool, i % 100)

    def wire_get(i: int) -> None:
        store._send(("GET", f"{prefix}:raw:{i % 100}"))

    try:
        for i in range(200):  # warm up: scripts loaded, pools filled, replay keys exist
            raw_first(i)
            guard_first(i)
            store_first(i)
            memory_first(i)
        calls = store.list(namespace="bench", limit=10**6)
        assert len(calls) == 200, len(calls)
        load = os.getloadavg()[0]
        cases: dict[str, Callable[[int], None]] = {
            "raw first": lambda i: raw_first(1000 + i),
            "guard first": lambda i: guard_first(1000 + i),
            "raw replay": raw_replay,
            "guard replay": guard_replay,
            "store first": lambda i: store_first(1000 + i),
            "store replay": store_replay,
            "memory first": lambda i: memory_first(1000 + i),
            "memory replay": memory_replay,
        }
        if store._fast:
            cases["wire GET"] = wire_get
        t = interleave(cases, args.calls)
        server = script_times(raw, store, claim)
        # Checks, not assertions about time: every first call ran, every replay replayed.
        done = store.list(namespace="bench", limit=10**7)
        assert len(done) == 200 + args.calls // 10 * 10, len(done)
        assert all(r.executions == 1 for r in done)
    finally:
        guard.close()
        memory.close()
        keys = list(raw.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            raw.unlink(*keys[i : i + 1000])
        raw.close()

    print(f"Redis ledger at {args.url}: {args.calls} calls per case, load {load:.2f}")
    print(f"{'case':<14}{'µs/call':>10}{'ratio':>9}   target ≤ {TARGET}x (the store's rows)")
    for what in ("first", "replay"):
        floor = f"raw {what}"
        floor_name = f"raw redis-py {'SET NX + SET XX' if what == 'first' else 'GET'}"
        print(f"{floor:<14}{t[floor]:>10.1f}")
        # Issue 18's target: the Redis store's own first call and replay.
        floor_row(
            f"Redis store: {what} call ({'claim + finish' if what == 'first' else 'claim'})",
            t[f"store {what}"],
            floor_name,
            t[floor],
            unit="us/call",
            target="<=",
            limit=TARGET,
            bound=store_bound(server, what),
        )
        # The guarded call on the Redis ledger: the store plus the guard's own Python,
        # which is the same on every backend (its targets are the replay rows'), so no
        # target of its own here.
        floor_row(
            f"Redis ledger, guarded: {what} call",
            t[f"guard {what}"],
            floor_name,
            t[floor],
            unit="us/call",
            bound=bound(t, server, what, floor),
        )
        for name in (f"store {what}", f"guard {what}"):
            ratio = t[name] / t[floor]
            verdict = ("met" if ratio <= TARGET else "missed") if name.startswith("store") else ""
            print(f"{name:<14}{t[name]:>10.1f}{ratio:>8.2f}x   {verdict}")
    print("what bounds it, measured in the same run (µs/call; ratio to the same floor):")
    for name in ("memory first", "memory replay", "wire GET"):
        if name in t:
            floor = "raw first" if "first" in name else "raw replay"
            print(f"  {name:<14}{t[name]:>10.1f}{t[name] / t[floor]:>8.2f}x")
    for name, us in server.items():
        print(f"  server time, {name}: {us:.1f} µs" if us is not None else f"  {name}: n/a")


def script_times(
    raw: redis.Redis, store: RedisStore, claim: NewClaim, n: int = 500
) -> dict[str, float | None]:
    """The server's own time per command (INFO commandstats deltas), or None when another
    client ran the same command meanwhile (the count is off)."""

    def stats(name: str) -> tuple[int, int]:
        s = raw.info("commandstats").get(f"cmdstat_{name}", {"calls": 0, "usec": 0})
        return int(s["calls"]), int(s["usec"])

    def per_call(name: str, fn: Callable[[int], object], each: int) -> float | None:
        c0, u0 = stats(name)
        for i in range(n):
            fn(i)
        c1, u1 = stats(name)
        return (u1 - u0) / (c1 - c0) if c1 - c0 == n * each else None

    key = f"{uuid.uuid4().hex[:8]}"
    return {
        "GET": per_call("get", lambda i: raw.get(f"{store.prefix}:raw:{i % 100}"), 1),
        FIRST_SCRIPTS: per_call(
            "evalsha",
            lambda i: store.finish(
                "bench-srv",
                f"{key}{i}",
                store.claim("bench-srv", f"{key}{i}", claim).token,
                ok=True,
                result="1",
            ),
            2,
        ),
        REPLAY_SCRIPT: per_call(
            "evalsha", lambda i: store.claim("bench-srv", f"{key}{i}", claim), 1
        ),
    }


def store_bound(server: dict[str, float | None], what: str) -> str:
    """What the store's row pays over the raw floor, from this run's measurements."""
    script = server[FIRST_SCRIPTS if what == "first" else REPLAY_SCRIPT]
    get = server["GET"]
    if script is None or get is None:
        return "each redis.call() inside a script costs Redis a few us"
    return (
        f"{'each script' if what == 'first' else 'the script'} takes {script:.0f} us of "
        f"Redis's time against {get:.1f} for a GET (Lua's conversions of HGETALL's fields); "
        "the client side sends it without redis-py's command layer"
    )


def bound(t: dict[str, float], server: dict[str, float | None], what: str, floor: str) -> str:
    """What bounds the figure, from this run's own measurements."""
    ours, store, memory = t[f"guard {what}"], t[f"store {what}"], t[f"memory {what}"]
    first = what == "first"
    script = server[FIRST_SCRIPTS if first else REPLAY_SCRIPT]
    get = server["GET"]
    lua = (
        f"{'each script' if first else 'the script'} takes {script:.0f} us of Redis's time, "
        f"{'a SET' if first else 'a GET'} {get:.1f}"
        if script is not None and get is not None
        else "each redis.call() in a script takes Redis a few us"
    )
    return (
        f"the store alone (no guard) is {store / t[floor]:.2f}x the floor ({lua}); the guard's "
        f"own Python per call comes on top, which the raw floor does not pay: guarded "
        f"{ours:.0f} us = store {store:.0f} + the guard on the memory ledger {memory:.0f} + "
        f"{ours - store - memory:.0f} (its code runs cold after each round trip)"
    )


if __name__ == "__main__":
    main()
