"""Shared pieces of the benchmark suite: timing, results, the raw-SQL floor, machine facts.

Timing rules (every case follows them):

* ``time.perf_counter_ns`` around a block of N calls; the figure of one repetition is
  the block's time divided by N;
* each repetition gets fresh state (a new database file in a new temp dir, or a new
  namespace on a server) built by an untimed ``setup``, then W untimed warm-up calls;
* R repetitions; we report the median and the min..max of the R figures;
* cases that are compared run interleaved (A, B, A, B, ...) in one process, so a slow
  moment of the machine hits both sides.

Nothing here asserts a timing. A benchmark does check that it measured what it claims
(a first call really executed the tool, a duplicate really did not); a failed check
aborts the case, because a fast wrong number is worse than none.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- results ----------------------------------------------------------------------------


@dataclass
class Result:
    """One measured case: per-repetition figures and what they mean."""

    name: str
    label: str
    unit: str  # "us/call" (lower is better) or "calls/s" (higher is better)
    values: list[float]
    n: int
    reps: int
    durability: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    group: str = ""  # results of one interleaved run: their repetitions are paired

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "unit": self.unit,
            "median": round(self.median, 3),
            "min": round(self.lo, 3),
            "max": round(self.hi, 3),
            "values": [round(v, 3) for v in self.values],
            "n": self.n,
            "reps": self.reps,
            "durability": self.durability,
            "note": self.note,
            **({"extra": self.extra} if self.extra else {}),
        }


@dataclass
class Skipped:
    name: str
    reason: str


@dataclass
class Target:
    """A ratio (or an absolute figure) read against a stated target; never asserted.

    Without ``op`` it is information only (e.g. ours / a peer's). ``extra_key`` reads a
    field of the result's ``extra`` instead of its median.
    """

    name: str
    what: str
    num: str  # case name
    den: str | None  # case name, or None for an absolute figure
    op: str = ""  # "<=", ">=" or "" (information)
    limit: float = 0.0
    unit: str = "x"
    extra_key: str | None = None

    def evaluate(self, results: dict[str, Result]) -> dict[str, Any] | None:
        a = results.get(self.num)
        b = results.get(self.den) if self.den else None
        if a is None or (self.den and b is None):
            return None
        value = float(a.extra[self.extra_key]) if self.extra_key else a.median
        paired = False
        if b is not None:
            if a.group and a.group == b.group and len(a.values) == len(b.values):
                # Measured side by side: the median of the per-repetition ratios.
                value = statistics.median(x / y for x, y in zip(a.values, b.values, strict=True))
                paired = True
            else:
                value /= b.median
        met: bool | None = None
        if self.op == "<=":
            met = value <= self.limit
        elif self.op == ">=":
            met = value >= self.limit
        suffix = "x" if self.unit == "x" else f" {self.unit}"
        return {
            "name": self.name,
            "what": self.what,
            "value": round(value, 3),
            "unit": self.unit,
            "target": f"{self.op} {self.limit:g}{suffix}" if self.op else "",
            "met": met,
            "num": self.num,
            "den": self.den,
            "paired": paired,
        }


#: Executions of the benchmark tools in this process. The harness counts, per bench,
#: the executions during that bench's own blocks and hands the count to its check.
RUNS = [0]


class BenchError(RuntimeError):
    """A case measured something other than what it claims (not a timing failure)."""


# -- the floor table -----------------------------------------------------------------------

#: ``ONCEONLY_BENCH_SHORT=1``: the standalone scripts run a few iterations (CI smoke run).
SHORT = os.environ.get("ONCEONLY_BENCH_SHORT") == "1"


def short_or(n: int, short_n: int) -> int:
    """``n``, or ``short_n`` in a short run."""
    return short_n if SHORT else n


#: What bounds the adapter rows (each adds its own part): measured 2026-12-06 in CPU time
#: per call (time.thread_time, so a loaded machine inflates it less), at load 4-12.
CORE_BOUND = (
    "the core's guarded call on memory:// alone is ~50-55 us of Python (it was ~85 us: "
    "dataclasses.replace per primitive, function-level imports and inspect calls per call "
    "are gone): key (canonical JSON + sha256) ~3 us, request and claim ~5 us, the "
    "protocol's claim, execute, encode and finish ~21 us, ToolResult ~3 us, the "
    "classification and its model text ~9 us, the rest the call chain itself; and a floor "
    "timed alone in a tight loop is optimistic: the framework's call and a guarded no-op "
    "run alternately cost 30-60 us more than the sum of each alone (LangChain: 342 vs "
    "279 us), the two hot paths evicting each other from the CPU's caches"
)


def adapter_bound(own: str) -> str:
    """The "what bounds it" text of an adapter row: the core's part and the adapter's own."""
    return f"{CORE_BOUND}; the adapter's own part: {own}"


def floor_row(
    figure: str,
    value: float,
    floor_name: str,
    floor: float,
    *,
    unit: str,
    target: str = "",
    limit: float | None = None,
    over: float | None = None,
    bound: str = "",
) -> dict[str, Any]:
    """One row of the floor table: a figure, the floor measured in the same run, their
    ratio and the target ("<=" or ">=" ``limit``; or ``over``: at most that many units
    above the floor). ``bound`` says what limits the figure if the target is missed.

    The row is appended to the JSON-lines file named by ``ONCEONLY_BENCH_ROWS`` (set by
    run.py), so every script of the suite feeds the one table."""
    ratio = value / floor if floor else float("inf")
    met: bool | None = None
    if target == "<=" and limit is not None:
        met = ratio <= limit
    elif target == ">=" and limit is not None:
        met = ratio >= limit
    if over is not None:
        met = value - floor <= over
    row = {
        "figure": figure,
        "value": round(value, 3),
        "unit": unit,
        "floor_name": floor_name,
        "floor": round(floor, 3),
        "ratio": round(ratio, 3),
        "target": (
            f"<= +{over:g} {unit.split('/')[0]}"
            if over is not None
            else f"{target} {limit:g}x"
            if target and limit is not None
            else ""
        ),
        "met": met,
        "bound": bound,
        "load": round(os.getloadavg()[0], 2),
    }
    out = os.environ.get("ONCEONLY_BENCH_ROWS")
    if out:
        import json

        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return row


# -- settings ---------------------------------------------------------------------------


@dataclass
class Settings:
    quick: bool
    only: list[str]
    #: ``--short`` (CI): every case runs a few iterations, to prove it runs; no figure of
    #: a short run means anything.
    short: bool = False

    def scale(self, n: int, quick_n: int) -> int:
        if self.short:
            # Small figures are repetitions or seconds: one of each; counts: a handful.
            return 1 if quick_n <= 5 else max(20, quick_n // 20)
        return quick_n if self.quick else n

    def size(self, n: int) -> int:
        """A ledger-size case's record count (1M in a real run, 20k in a short one)."""
        return min(n, 20_000) if self.short else n

    def wants(self, name: str) -> bool:
        return not self.only or any(name.startswith(p) for p in self.only)

    def wants_any(self, *names: str) -> bool:
        return any(self.wants(n) for n in names)

    def wants_group(self, group: str) -> bool:
        """Could any case under ``group`` (a name prefix) be selected?"""
        return not self.only or any(p.startswith(group) or group.startswith(p) for p in self.only)


# -- timing -----------------------------------------------------------------------------


@contextmanager
def tempdir(prefix: str = "oo-bench-") -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield Path(d)


def time_block(fn: Callable[[int], Any], start: int, n: int) -> float:
    """Call ``fn(start) .. fn(start + n - 1)``; return microseconds per call."""
    gc.collect()
    t0 = time.perf_counter_ns()
    for i in range(start, start + n):
        fn(i)
    return (time.perf_counter_ns() - t0) / n / 1000.0


@dataclass
class State:
    """What a bench's ``setup`` returns: the timed ``call(i)`` and untimed helpers.

    ``check(n, ran)`` runs after the timed calls, with ``ran`` the tool executions
    counted (RUNS) during this bench's warm-up and timed calls, and raises BenchError
    if they did not do what the case says; ``close()`` releases the state. ``is_async``: ``call(i)``
    returns an awaitable and the block is timed inside one event loop.
    """

    call: Callable[[int], Any]
    check: Callable[[int, int], None] | None = None
    close: Callable[[], None] | None = None
    is_async: bool = False
    durability: str | None = None  # as read back from the live connection


@dataclass
class Bench:
    """One side of a comparison: ``setup(tmp)`` builds fresh state in ``tmp`` (untimed)."""

    name: str
    label: str
    setup: Callable[[Path], State]
    durability: str = ""
    note: str = ""


class _Runner:
    """Times blocks of calls on one state; async states keep one event loop throughout
    (so the worker threads of ``asyncio.to_thread`` and their connections persist)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.ran = 0  # tool executions during this runner's blocks
        self.loop: Any = None
        if state.is_async:
            import asyncio

            self.loop = asyncio.new_event_loop()

    def block(self, start: int, n: int) -> int:
        """Run calls ``start .. start + n - 1``; return the nanoseconds they took."""
        before = RUNS[0]
        try:
            return self._block(start, n)
        finally:
            self.ran += RUNS[0] - before

    def _block(self, start: int, n: int) -> int:
        call = self.state.call
        gc.collect()
        if self.loop is None:
            t0 = time.perf_counter_ns()
            for i in range(start, start + n):
                call(i)
            return time.perf_counter_ns() - t0

        async def ablock() -> int:
            t0 = time.perf_counter_ns()
            for i in range(start, start + n):
                await call(i)
            return time.perf_counter_ns() - t0

        return int(self.loop.run_until_complete(ablock()))

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()


def run_interleaved(
    benches: list[Bench],
    *,
    n: int,
    reps: int,
    warmup: int,
    progress: Callable[[str], None],
    chunks: int = 10,
) -> list[Result]:
    """Time the benches side by side.

    Each repetition sets up every bench afresh (untimed: a new temp dir each), warms each
    up, then runs the N timed calls of each in ``chunks`` interleaved blocks (A B, B A,
    A B, ...), so drift of the machine (disk flushes, neighbours) hits all of them
    alike. The figure of a repetition is its total time over N.
    """
    values: dict[str, list[float]] = {b.name: [] for b in benches}
    durability: dict[str, str] = {b.name: b.durability for b in benches}
    group = "+".join(b.name for b in benches)
    size = max(1, -(-n // chunks))
    for r in range(reps):
        with contextlib.ExitStack() as stack:
            runners: list[tuple[Bench, _Runner]] = []
            for b in benches:
                tmp = stack.enter_context(tempdir())
                state = b.setup(tmp)
                if state.close is not None:
                    stack.callback(state.close)
                if state.durability:
                    durability[b.name] = state.durability
                runner = _Runner(state)
                stack.callback(runner.close)
                runner.block(-warmup, warmup)
                runners.append((b, runner))
            total = dict.fromkeys(values, 0)
            done = 0
            order = runners
            while done < n:
                m = min(size, n - done)
                for b, runner in order:
                    total[b.name] += runner.block(done, m)
                done += m
                order = order[::-1]
            for b, runner in runners:
                if runner.state.check is not None:
                    runner.state.check(n, runner.ran)
                values[b.name].append(total[b.name] / n / 1000.0)
        progress(
            f"  rep {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in values.items())
        )
    return [
        Result(
            b.name,
            b.label,
            "us/call",
            values[b.name],
            n,
            reps,
            durability[b.name],
            b.note,
            group=group,
        )
        for b in benches
    ]


# -- keys and the raw SQL floor -----------------------------------------------------------


def hex_key(tag: str, i: int) -> str:
    """A 64-hex key shaped like a derived key (random order in the index)."""
    return hashlib.sha256(f"{tag}:{i}".encode()).hexdigest()


LEDGER_COLUMNS = (
    "namespace, idem_key, tool, state, token, owner, attempt, executions, lease_until, "
    "expires_at, args_digest, result, error, run_id, caller, created_at, updated_at"
)

# The raw floor issues the same two committed statements the guard's new-key path
# needs (claim, then fenced completion), with the same columns and parameters, on the
# same table, and nothing else.
SQLITE_RAW_CLAIM = (
    f"INSERT INTO onceonly_ledger ({LEDGER_COLUMNS}) VALUES (:ns, :k, :tool, 'running', 1, "
    ":owner, 1, 0, :now + :lease, NULL, NULL, NULL, NULL, NULL, NULL, :now, :now) "
    "ON CONFLICT (namespace, idem_key) DO NOTHING"
)
SQLITE_RAW_FINISH = (
    "UPDATE onceonly_ledger SET state = 'succeeded', result = :result, error = NULL, "
    "executions = executions + 1, lease_until = NULL, expires_at = NULL, updated_at = :now "
    "WHERE namespace = :ns AND idem_key = :k AND token = 1 AND state = 'running'"
)
SQLITE_RAW_GET = (
    f"SELECT {LEDGER_COLUMNS}, :now FROM onceonly_ledger WHERE namespace = :ns AND idem_key = :k"
)


def sqlite_raw_conn(path: Path, synchronous: str) -> sqlite3.Connection:
    """A stdlib connection in autocommit with the pragmas the SQLite store sets."""
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def sqlite_pragmas(conn: sqlite3.Connection) -> str:
    journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    sync = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[
        conn.execute("PRAGMA synchronous").fetchone()[0]
    ]
    return f"{journal.upper()}/{sync}"


# -- machine facts ----------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024 // 1024} GiB"
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "packages": {
            d: _version(d)
            for d in (
                "onceonly-core",
                "SQLAlchemy",
                "psycopg",
                "ledger-once",
                "safeagent-exec-guard",
            )
        },
        "argv": sys.argv[1:],
        "loadavg_at_start": loadavg(),
    }


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: a busy machine explains noisy figures."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
