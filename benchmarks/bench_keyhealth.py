"""What the key-health check (docs/keys.md, "Keys that never repeat") costs a call.

    python benchmarks/bench_keyhealth.py [--calls N]

Rows (µs per call, median of interleaved blocks):

* ``observe, not sampled``: a new claim of a tool past its warm-up, not a suspect — what
  15 of every 16 new claims cost;
* ``observe, inspected``: the arguments bound and walked (the warm-up, a sampled call, or
  a suspect), three plain arguments / with a ``datetime`` among them;
* ``guarded new claim, on`` / ``off``: ``guard(fn, ...)`` with a new key on every call on
  the memory ledger and on SQLite (``synchronous=normal``), with the check on and off.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onceonly_core import Guard  # noqa: E402
from onceonly_core import keyhealth as kh  # noqa: E402


def tool(to: str, amount: int, note: str) -> int:
    return amount


def interleave(
    cases: dict[str, Callable[[int], object]], calls: int, blocks: int = 10
) -> dict[str, float]:
    per = calls // blocks
    out: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    n = 0
    for b in range(blocks):
        for name in names if b % 2 == 0 else names[::-1]:
            fn = cases[name]
            t0 = time.perf_counter()
            for _ in range(per):
                fn(n)
                n += 1
            out[name].append((time.perf_counter() - t0) / per * 1e6)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20_000)
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the stamped cases warn once; not what is measured

    plain = {"to": "a@example.com", "amount": 5, "note": "hello"}
    stamped = {"to": "a@example.com", "amount": 5, "at": dt.datetime.now(dt.timezone.utc)}
    skipped = kh.KeyHealth()
    for _ in range(kh.WARMUP + 1):
        skipped.observe("t", "s", plain)
    inspected = kh.KeyHealth()

    def inspect(name: str, a: dict[str, object]) -> Callable[[int], object]:
        def run(n: int) -> None:
            inspected._slots.clear()  # a fresh slot: inside its warm-up, always inspected
            inspected.observe(name, "s", a)

        return run

    rows = interleave(
        {
            "observe, not sampled": lambda n: skipped.observe("t", "s", plain),
            "observe, inspected (3 plain arguments)": inspect("p", plain),
            "observe, inspected (with a datetime)": inspect("d", stamped),
        },
        args.calls,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for label, url in (
            ("memory", "memory://"),
            ("sqlite normal", f"sqlite:///{tmp}/l.db?synchronous=normal"),
        ):
            on = Guard(url, namespace="on", quiet=True, key_health=True)
            off = Guard(url, namespace="off", quiet=True, key_health=False)
            calls = args.calls if label == "memory" else args.calls // 4
            rows |= interleave(
                {
                    f"guarded new claim, {label}, on": lambda n, g=on: g(tool, "a", n, "x"),
                    f"guarded new claim, {label}, off": lambda n, g=off: g(tool, "a", n, "x"),
                },
                calls,
            )
            on.close()
            off.close()
    print("| path | µs/call |")
    print("|---|---:|")
    for name, v in rows.items():
        print(f"| {name} | {v:,.2f} |")


if __name__ == "__main__":
    main()
