"""A worker process for the crash and race tests: one real OS process per instance.

Started by ``tests/services/test_crash_and_races.py``, ``tests/services/test_pg_restart.py``
and ``tests/services/test_redis.py``
with ``subprocess.Popen([sys.executable, __file__, MODE, ...])``. Every execution of the
guarded tool appends one JSON line to the *effects* log (``O_APPEND``, a single ``write``
per line, so lines from concurrent processes never interleave): that log is the side
effect the tests count. What the caller got back goes to the worker's own *out* file.

Modes:

``storm``  call a set of items (derived keys) in rounds, released together by a file
           barrier; ``--tool ok|fail|interrupt`` chooses whether the tool succeeds,
           raises RuntimeError, or raises KeyboardInterrupt (an interrupted call: outcome
           unknown) after its effect.
``one``    call one explicit key once, optionally killing itself with SIGKILL at a chosen
           point (``--crash``), optionally pausing inside the tool until a file appears.
``loop``   call distinct and repeated keys until a stop file appears (database restart).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from onceonly_core import NOT_DONE, Guard, OnceOnlyError, StoreError, current_call
from onceonly_core.stores.sql import SQLStore

ARGS: argparse.Namespace
SEQ = 0  # the loop mode's call number, so an effect line can be tied to its call


# -- the side effect --------------------------------------------------------------------
def append_effect(path: str, entry: dict[str, Any]) -> None:
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of a small line with O_APPEND: atomic on Linux
    finally:
        os.close(fd)


def effect(item: str) -> str:
    """The guarded tool: record one execution, return a value unique to it."""
    ctx = current_call()
    assert ctx is not None, "the tool ran outside a guarded call"
    if ARGS.crash == "before_effect":
        kill_self()
    value = f"{os.getpid()}-{uuid.uuid4().hex}"
    append_effect(
        ARGS.effects,
        {
            "item": item,
            "key": ctx.key,
            "token": ctx.token,
            "attempt": ctx.attempt,
            "idem": ctx.idempotency_key,
            "pid": os.getpid(),
            "value": value,
            "kind": ARGS.tool,
            "seq": SEQ,
        },
    )
    if ARGS.crash == "after_effect":
        kill_self()
    if ARGS.tool_sleep:
        time.sleep(ARGS.tool_sleep)  # a tool that takes a while: crashes land inside it
    if ARGS.running_file:
        Path(ARGS.running_file).touch()
    if ARGS.release_file:
        wait_for(ARGS.release_file, timeout=120.0)
    if ARGS.tool == "fail":
        raise RuntimeError(f"downstream refused {item}")
    if ARGS.tool == "interrupt":
        raise KeyboardInterrupt  # interrupted mid-call: the outcome is unknown
    return value


def kill_self() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached: the process is gone before kill() returns


def wait_for(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.005)


class CrashBeforeClaim:
    """Mixed into the ledger's store class: a SIGKILL just before the claim statement (or
    script) is sent (crash point a).

    ``claim`` is the first thing a guarded call does to the ledger, so dying here is a crash
    before the claim commits: nothing about this call has reached the database.
    """

    def claim(self, namespace: str, key: str, new: Any) -> Any:
        if ARGS.crash == "before_claim":
            kill_self()
        return super().claim(namespace, key, new)  # type: ignore[misc]


def crash_store(url: str) -> Any:
    base: type
    if url.startswith(("redis://", "rediss://")):
        from onceonly_core.stores.redis import RedisStore

        base = RedisStore
    else:
        # SQLStore(url) returns its dialect's class (SQLiteStore, PostgresStore, MySQLStore):
        # the crash mixin goes on top of that one.
        probe = SQLStore(url, auto_migrate=True)
        base = type(probe)
        probe.close()
    return type("CrashStore", (CrashBeforeClaim, base), {})(url, auto_migrate=True)


def reconcile(ctx: Any) -> Any:
    """Ask "downstream" (the effects log) whether this idempotency key already happened."""
    seen = []
    if os.path.exists(ARGS.effects):
        with open(ARGS.effects) as f:
            seen = [json.loads(line) for line in f]
    done = [e["value"] for e in seen if e["idem"] == ctx.idempotency_key]
    write_out({"reconciled": True, "attempt": ctx.attempt, "found": len(done)})
    return done[-1] if done else NOT_DONE


# -- output -----------------------------------------------------------------------------
def write_out(entry: dict[str, Any]) -> None:
    with open(ARGS.out, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


def make_guard(**options: Any) -> Guard:
    if ARGS.on_unknown == "reconcile":
        options["on_unknown"] = reconcile
    elif ARGS.on_unknown:
        options["on_unknown"] = ARGS.on_unknown
    if ARGS.lease:
        options["lease"] = ARGS.lease
    if ARGS.wait is not None:
        options["wait"] = ARGS.wait
    if ARGS.crash == "before_claim":
        store = crash_store(ARGS.url)
        return Guard(store=store, namespace=ARGS.namespace, quiet=True, **options)
    if ARGS.url.startswith(("http://", "https://")):  # remote mode: ONCEONLY_API_KEY
        return Guard(ARGS.url, namespace=ARGS.namespace, quiet=True, **options)
    return Guard(
        ARGS.url,
        namespace=ARGS.namespace,
        quiet=True,
        store_options={"auto_migrate": True},
        **options,
    )


# -- modes ------------------------------------------------------------------------------
def barrier(directory: str, name: str, parties: int) -> None:
    """Wait until ``parties`` processes reach ``name``, then start at one shared instant.

    Each arrival writes its clock reading to a file (renamed into place, so it is never
    read half-written); once all are there, everyone sleeps until the latest arrival + 20 ms,
    so all processes enter the round within scheduling jitter of each other.
    """
    d = Path(directory)
    tmp = d / f".{name}.{os.getpid()}"
    tmp.write_text(repr(time.time()))
    os.rename(tmp, d / f"{name}.{os.getpid()}")
    deadline = time.monotonic() + 120.0
    while True:
        arrived = list(d.glob(f"{name}.*"))
        if len(arrived) >= parties:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"barrier {name}: only {len(arrived)} of {parties} arrived")
        time.sleep(0.001)
    start = max(float(p.read_text()) for p in arrived) + 0.02
    pause = start - time.time()
    if pause > 0:
        time.sleep(pause)


def run_storm() -> int:
    g = make_guard()
    rng = random.Random(f"{ARGS.seed}-{os.getpid()}")
    results: list[dict[str, Any]] = []
    g.key_for(effect, "warm-up")  # import and prepare before the first barrier
    for rnd in range(ARGS.rounds):
        items = [f"r{rnd}-k{i}" for i in range(ARGS.keys)]
        rng.shuffle(items)
        barrier(ARGS.barrier, f"round{rnd}", ARGS.procs)
        for item in items:
            try:
                value = g(effect, item)
            except RuntimeError as err:  # the tool's own failure (--tool fail)
                results.append({"item": item, "error": type(err).__name__})
            except KeyboardInterrupt:  # --tool interrupt
                results.append({"item": item, "error": "KeyboardInterrupt"})
            else:
                results.append({"item": item, "value": value})
    with open(ARGS.out, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in results)
    return 0


def run_one() -> int:
    g = make_guard()
    try:
        value = g.using(key=ARGS.key)(effect, ARGS.key)
    except OnceOnlyError as err:
        rec = g.store.get(g.namespace, ARGS.key)
        write_out(
            {
                "error": type(err).__name__,
                "token": getattr(err, "token", None),
                "result": getattr(err, "result", None),
                "record_token": None if rec is None else rec.token,
            }
        )
        return 3
    if ARGS.crash == "after_complete":
        kill_self()
    write_out({"value": value})
    return 0


def run_loop() -> int:
    """Call new keys, and every third call a recent key again, until the stop file exists;
    then call every key used once more (the sweep: replay, run now, or unknown outcome).

    Every call's outcome is one line in the out file, flushed at once: the test reads it
    while this process runs.
    """
    g = make_guard()
    with open(ARGS.out, "a", buffering=1) as out:
        fresh = 0
        while not os.path.exists(ARGS.stop_file):
            if SEQ % 3 == 2 and fresh > 2:
                item = f"k{fresh - 2}"  # a key called two calls ago: replay (or unknown)
            else:
                fresh += 1
                item = f"k{fresh}"
            entry = loop_call(g, item)
            out.write(json.dumps(entry, sort_keys=True) + "\n")
            time.sleep(0.02 if "error" in entry else 0.002)
        for n in range(1, fresh + 1):
            entry = loop_call(g, f"k{n}")
            entry["sweep"] = True
            out.write(json.dumps(entry, sort_keys=True) + "\n")
    return 0


def loop_call(g: Guard, item: str) -> dict[str, Any]:
    global SEQ
    SEQ += 1
    entry: dict[str, Any] = {"seq": SEQ, "item": item, "t": time.time()}
    try:
        entry["value"] = g.using(key=item)(effect, item)
    except OnceOnlyError as err:
        entry["error"] = type(err).__name__
        entry["store_error"] = isinstance(err, StoreError)
        entry["message"] = str(err)[:300]
    except Exception as err:  # anything else escaping the guard is a bug: record it
        entry["error"] = f"{type(err).__module__}.{type(err).__qualname__}"
        entry["foreign"] = True
        entry["message"] = str(err)[:300]
    return entry


def main() -> int:
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["storm", "one", "loop"])
    p.add_argument("--url", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--effects", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tool", choices=["ok", "fail", "interrupt"], default="ok")
    p.add_argument("--lease", type=float, default=None)
    p.add_argument("--wait", type=float, default=None)
    p.add_argument("--on-unknown", choices=["retry", "raise", "reconcile"], default=None)
    p.add_argument(
        "--crash",
        choices=["before_claim", "before_effect", "after_effect", "after_complete"],
        default=None,
    )
    p.add_argument("--tool-sleep", type=float, default=0.0)
    p.add_argument("--running-file", default=None)
    p.add_argument("--release-file", default=None)
    # storm
    p.add_argument("--barrier", default=None)
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--keys", type=int, default=50)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", default="0")
    # one
    p.add_argument("--key", default=None)
    # loop
    p.add_argument("--stop-file", default=None)
    ARGS = p.parse_args()
    return {"storm": run_storm, "one": run_one, "loop": run_loop}[ARGS.mode]()


if __name__ == "__main__":
    sys.exit(main())
