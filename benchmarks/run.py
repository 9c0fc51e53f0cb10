"""OnceOnly benchmarks: the guard next to the raw SQL floor and the peer libraries.

    python benchmarks/run.py                 # everything (< 10 minutes on 2 cores)
    python benchmarks/run.py --quick         # fewer iterations, same cases
    python benchmarks/run.py --only sqlite.normal --only peers
    nox -s bench                             # in a fresh venv with .[all] + the peers

Prints a plain-text table and writes benchmarks/results.json. PostgreSQL comes from
ONCEONLY_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test); if it is
unreachable the PostgreSQL rows are skipped and the reason is printed.

Benchmarks measure; they never assert a timing. Targets are printed as met or missed.
See benchmarks/README.md for the method and this machine's numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import Result, Settings, Skipped, Target, loadavg, machine_info  # noqa: E402

TARGETS = [
    # 1. SQLite first call vs the raw floor, at equal durability.
    Target(
        "sqlite.full.ratio",
        "SQLite FULL: guarded first call / raw INSERT+UPDATE",
        "sqlite.full.first",
        "sqlite.full.raw",
        "<=",
        1.5,
    ),
    Target(
        "sqlite.normal.ratio",
        "SQLite NORMAL: guarded first call / raw INSERT+UPDATE",
        "sqlite.normal.first",
        "sqlite.normal.raw",
        "<=",
        1.5,
    ),
    # 2. A replayed duplicate.
    Target(
        "sqlite.normal.dup.abs",
        "SQLite NORMAL: replayed duplicate",
        "sqlite.normal.dup",
        None,
        "<=",
        10.0,
        "us",
    ),
    Target(
        "sqlite.full.dup.abs",
        "SQLite FULL: replayed duplicate",
        "sqlite.full.dup",
        None,
        "<=",
        10.0,
        "us",
    ),
    # 4. PostgreSQL throughput vs raw psycopg at the same concurrency.
    *[
        Target(
            f"pg.p{p}.ratio",
            f"PostgreSQL {p} process{'es' if p > 1 else ''}: guard / raw claims per second",
            f"pg.p{p}.guard",
            f"pg.p{p}.raw",
            ">=",
            0.7,
        )
        for p in (1, 4, 8)
    ],
    Target(
        "pg.shared.duplicates",
        "PostgreSQL 8 processes on shared keys: duplicate executions",
        "pg.shared.p8",
        None,
        "<=",
        0,
        "executions",
        extra_key="duplicates_total",
    ),
    # 5. Flat per-call cost with ledger size.
    *[
        Target(
            f"{db}.size.{kind}.ratio",
            f"{title}: {'first call' if kind == 'first' else 'duplicate'}, 1M / 1k records",
            f"{db}.size.1m.{kind}",
            f"{db}.size.1k.{kind}",
            "<=",
            1.2,
        )
        for db, title in (("sqlite", "SQLite NORMAL"), ("pg", "PostgreSQL"))
        for kind in ("first", "dup")
    ],
    *[
        Target(
            f"{db}.size.raw.ratio",
            f"{title}: raw floor, 1M / 1k records (what the storage allows)",
            f"{db}.size.1m.raw",
            f"{db}.size.1k.raw",
        )
        for db, title in (("sqlite", "SQLite NORMAL"), ("pg", "PostgreSQL"))
    ],
    # 3. Peers, at equal durability (information: no target was set).
    Target(
        "peers.ledger.first",
        "first call, ours / ledger-once (both NORMAL)",
        "peers.normal.ours.first",
        "peers.normal.ledger.first",
    ),
    Target(
        "peers.ledger.dup",
        "duplicate, ours / ledger-once (both NORMAL)",
        "peers.normal.ours.dup",
        "peers.normal.ledger.dup",
    ),
    Target(
        "peers.safeagent-store.first",
        "first call, ours / safeagent store (both FULL)",
        "peers.full.ours.first",
        "peers.full.safeagent-store.first",
    ),
    Target(
        "peers.safeagent-registry.first",
        "first call, ours / safeagent registry (both FULL)",
        "peers.full.ours.first",
        "peers.full.safeagent-registry.first",
    ),
    Target(
        "peers.safeagent-store.dup",
        "duplicate, ours / safeagent store claim+get (both FULL)",
        "peers.full.ours.dup",
        "peers.full.safeagent-store.dup",
    ),
    Target(
        "peers.safeagent-registry.dup",
        "duplicate, ours / safeagent registry (both FULL)",
        "peers.full.ours.dup",
        "peers.full.safeagent-registry.dup",
    ),
    # 6. Extras (information).
    Target(
        "async.first",
        "async first call / sync first call (SQLite NORMAL)",
        "sqlite.normal.async.first",
        "sqlite.normal.first",
    ),
    Target(
        "async.dup",
        "async duplicate / sync duplicate (SQLite NORMAL)",
        "sqlite.normal.async.dup",
        "sqlite.normal.dup",
    ),
]


#: The issue's targets over this script's own cases, as rows of the one floor table:
#: (figure, case, floor, floor case, op, limit, what bounds a miss).
FLOORS = [
    (
        "replay, SQLite NORMAL",
        "sqlite.normal.dup",
        "raw indexed SELECT of the row",
        "sqlite.normal.raw-read",
        "<=",
        2.0,
        "Python per replay, ~8 us here over the SELECT (which the store's read runs "
        "within ~0.5 us of): the call's binding and key (canonical text + sha256, ~2 us), "
        "its claim and Call objects, the record as a Record, the decision, decoding, the "
        "stats and the hooks' and log's checks; since stop 27 a replay is answered from "
        "the claim's record with no generator, thunk or closure (2.9x -> 2.06x)",
    ),
    (
        "replay, PostgreSQL",
        "pg.size.1k.dup",
        "raw primary-key SELECT round trip",
        "pg.size.1k.read",
        "<=",
        1.2,
        "a retry's replay (the key seen done by this Guard) is one read since stop 27: "
        "the store's read (~1.05-1.2x the raw SELECT: SQLAlchemy's pooled connection, "
        "the Record) plus the guard's Python (binding, key, decision, decode; ~10 us)",
    ),
    (
        "replay, PostgreSQL, a key seen for the first time",
        "pg.size.1k.cold",
        "raw primary-key SELECT round trip",
        "pg.size.1k.read",
        "",
        0.0,
        "a key this Guard has not seen done is claimed first (the servers' claim CTE, "
        "INSERT … ON CONFLICT DO NOTHING + SELECT, ~1.5x the raw SELECT sent raw by "
        "psycopg: 104 vs 71 us in stop 26), plus the guard's Python",
    ),
    (
        "first call, SQLite FULL",
        "sqlite.full.first",
        "raw INSERT + UPDATE, FULL",
        "sqlite.full.raw",
        "<=",
        1.5,
        "the two fsyncs are the floor's too; the rest is the guard's Python",
    ),
    (
        "first call, SQLite NORMAL",
        "sqlite.normal.first",
        "raw INSERT + UPDATE, NORMAL",
        "sqlite.normal.raw",
        "<=",
        1.5,
        "without fsync the floor is ~100 us, so the guard's ~60-90 us of Python "
        "(key, claim decision, encode, finish, log) weighs more",
    ),
    (
        "async first call / sync first call, SQLite NORMAL",
        "sqlite.normal.async.first",
        "sync first call",
        "sqlite.normal.first",
        "<=",
        1.3,
        "SQLite NORMAL's claim and finish run on the event loop (Store.run_nowait) unless "
        "another connection holds the write lock; then that primitive runs in a worker "
        "thread, a hop of `sqlite.normal.async.hop` (~60-70 us); what is left is the async "
        "shell's own Python (coroutines, the awaited tool: ~10-35 us)",
    ),
    *[
        (
            f"growth: {'first call' if kind == 'first' else 'replay'}, {title}, 1M records",
            f"{db}.size.1m.{kind}",
            "the same at 1k records",
            f"{db}.size.1k.{kind}",
            "<=",
            1.2,
            (
                "the raw floor's own growth (`"
                + f"{db}.size.1m.raw / {db}.size.1k.raw"
                + "`): a B-tree insert at a random place in a 1M-row index misses the page "
                "cache and writes more pages per commit"
            )
            if kind == "first"
            else (
                "the read of a 1M-row index: one more B-tree level and pages that miss "
                "the page cache, a few us per replay whatever the replay's own cost (+6 us "
                "on a 48 us replay in stop 26, +5 on a 19 us one in stop 27): the ratio "
                "grows as the replay gets faster"
            ),
        )
        for db, title in (("sqlite", "SQLite NORMAL"), ("pg", "PostgreSQL"))
        for kind in ("first", "dup")
    ],
    *[
        (
            f"PostgreSQL {p} process{'es' if p > 1 else ''}: guarded calls/s",
            f"pg.p{p}.guard",
            "raw psycopg INSERT + UPDATE calls/s",
            f"pg.p{p}.raw",
            ">=",
            0.7,
            "client CPU: SQLAlchemy pool checkout + the guard's Python per call compete "
            "with PostgreSQL for the 2 cores",
        )
        for p in (1, 4, 8)
    ],
]

#: The standalone scripts that also feed the floor table: (script, full args, short args).
SCRIPTS = [
    ("bench_governance.py", [], ["--calls", "40"]),
    ("bench_redis.py", [], ["--calls", "100"]),
    ("bench_server.py", [], ["--seconds", "1"]),
    ("bench_langchain.py", [], []),
    ("bench_openai.py", [], []),
    ("bench_llamaindex.py", [], []),
    ("bench_retention.py", [], ["--rows", "5000"]),
]

_T0 = time.perf_counter()


def progress(msg: str) -> None:
    """Progress goes to stderr with the elapsed time; the table goes to stdout."""
    secs = int(time.perf_counter() - _T0)
    print(f"[{secs // 60:02d}:{secs % 60:02d}] {msg}", file=sys.stderr, flush=True)


def _fmt(v: float) -> str:
    if v >= 10_000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) else f"{v:.1f}"


def table(results: list[Result]) -> str:
    head = f"{'case':<38} {'median':>10} {'unit':<8} {'min..max':>19}  {'durability':<21} what"
    lines = [head, "-" * len(head)]
    for r in results:
        span = f"{_fmt(r.lo)}..{_fmt(r.hi)}"
        lines.append(
            f"{r.name:<38} {_fmt(r.median):>10} {r.unit:<8} {span:>19}  "
            f"{r.durability[:21]:<21} {r.label}"
        )
    return "\n".join(lines)


def targets_table(evals: list[dict[str, Any]]) -> str:
    head = f"{'comparison':<66} {'value':>9}  {'target':<10} result"
    lines = [head, "-" * len(head)]
    for e in evals:
        unit = "x" if e["unit"] == "x" else f" {e['unit']}"
        value = f"{e['value']:.2f}{unit}" if e["unit"] == "x" else f"{_num(e['value'])}{unit}"
        verdict = "-" if e["met"] is None else ("met" if e["met"] else "MISSED")
        lines.append(f"{e['what']:<66} {value:>9}  {e['target']:<10} {verdict}")
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    """The results of a run as Markdown tables (for benchmarks/README.md)."""
    out = ["| case | median | unit | min..max | durability | what |", "|---|---:|---|---:|---|---|"]
    for r in doc["results"]:
        out.append(
            f"| `{r['name']}` | {_fmt(r['median'])} | {r['unit']} | "
            f"{_fmt(r['min'])}..{_fmt(r['max'])} | {r['durability']} | {r['label']} |"
        )
    out += ["", "| comparison | value | target | result |", "|---|---:|---|---|"]
    for e in doc["targets"]:
        value = f"{e['value']:.2f}x" if e["unit"] == "x" else f"{_num(e['value'])} {e['unit']}"
        verdict = "" if e["met"] is None else ("met" if e["met"] else "**missed**")
        target = e["target"].replace("<=", "≤").replace(">=", "≥")
        out.append(f"| {e['what']} | {value} | {target} | {verdict} |")
    for sk in doc["skipped"]:
        out.append(f"\nSkipped {sk['name']}: {sk['reason']}")
    return "\n".join(out)


def core_floor_rows(results: list[Result]) -> list[dict[str, Any]]:
    """The FLOORS rows measured by this script's cases (a pair not measured is left out)."""
    by_name = {r.name: r for r in results}
    rows = []
    for figure, num, floor_name, den, op, limit, bound in FLOORS:
        e = Target(num, figure, num, den, op, limit).evaluate(by_name)
        if e is None:
            continue
        a, b = by_name[num], by_name[den]
        raw_1m, raw_1k = by_name.get(num.split(".size.")[0] + ".size.1m.raw"), None
        if ".size." in num and num.endswith(".first") and raw_1m is not None:
            raw_1k = by_name.get(num.split(".size.")[0] + ".size.1k.raw")
        if raw_1m is not None and raw_1k is not None:
            bound += f"; here the raw floor itself grew {raw_1m.median / raw_1k.median:.2f}x"
        rows.append(
            {
                "figure": figure,
                "value": round(a.median, 3),
                "unit": a.unit,
                "floor_name": floor_name,
                "floor": round(b.median, 3),
                "ratio": e["value"],
                "target": f"{op} {limit:g}x" if op else "",
                "met": e["met"],
                "bound": bound,
            }
        )
    return rows


def run_scripts(short: bool, rows_path: Path) -> list[str]:
    """Run each standalone script with ONCEONLY_BENCH_ROWS set; return the failures."""
    import os
    import subprocess

    failed = []
    root = HERE.parent
    path = os.pathsep.join(
        [str(root), str(root / "integrations"), os.environ.get("PYTHONPATH", "")]
    )
    env = {**os.environ, "ONCEONLY_BENCH_ROWS": str(rows_path), "PYTHONPATH": path}
    if short:
        env["ONCEONLY_BENCH_SHORT"] = "1"
    for script, full_args, short_args in SCRIPTS:
        args = short_args if short else full_args
        progress(f"{script} {' '.join(args)}".rstrip())
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / script), *args], env=env)
        progress(f"  {script}: exit {proc.returncode} after {time.perf_counter() - t0:.0f} s")
        if proc.returncode != 0:
            failed.append(f"{script} exited {proc.returncode}")
    return failed


def _ratio(v: float) -> str:
    return f"{v:.2f}x"


def floor_markdown(rows: list[dict[str, Any]], load: float | None = None) -> str:
    """The one table: figure, floor, ratio, target, met/missed, the load average when it
    was measured (``load`` for rows that carry none), and what bounds a miss."""
    out = [
        "| figure | value | floor | floor value | ratio | target | result | load | "
        "what bounds it |",
        "|---|---:|---|---:|---:|---|---|---:|---|",
    ]
    for r in rows:
        unit = r["unit"]
        verdict = "" if r["met"] is None else ("met" if r["met"] else "**missed**")
        target = r["target"].replace("<=", "≤").replace(">=", "≥")
        bound = "" if r["met"] else r.get("bound", "")
        out.append(
            f"| {r['figure']} | {_fmt(r['value'])} {unit} | {r['floor_name']} | "
            f"{_fmt(r['floor'])} {unit} | {_ratio(r['ratio'])} | {target} | {verdict} | "
            f"{r.get('load', load) or ''} | {bound} |"
        )
    return "\n".join(out)


def _stamp(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    return (
        f"`nox -s bench`, finished {doc['generated']} in {doc['seconds']:.0f} s; load average "
        f"{m['loadavg_at_start']} at the start, {m['loadavg_at_end']} at the end "
        f"(2 cores, shared: see the load next to each reading)."
    )


README_START = "<!-- floor-table: start (written by benchmarks/run.py) -->"
README_END = "<!-- floor-table: end -->"


def write_readme_table(table_md: str, stamp: str) -> None:
    readme = HERE / "README.md"
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = f"{README_START}\n{stamp}\n\n{table_md}\n{README_END}"
    readme.write_text(head + body + tail, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations and repetitions")
    ap.add_argument(
        "--short",
        action="store_true",
        help="every benchmark for a few iterations (CI): fails on errors only, writes "
        "nothing to benchmarks/; the figures mean nothing",
    )
    ap.add_argument(
        "--core-only",
        action="store_true",
        help="only this script's cases, not the standalone scripts (governance, Redis, "
        "server, adapters, retention)",
    )
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PREFIX",
        help="run cases whose name starts with PREFIX (repeatable); a case runs together "
        "with the cases it is compared against",
    )
    ap.add_argument(
        "--json",
        default=str(HERE / "results.json"),
        metavar="PATH",
        help="where to write the results (default: benchmarks/results.json)",
    )
    ap.add_argument(
        "--floor-table",
        metavar="JSON",
        help="print the floor table of a run (its results.json) as Markdown; with "
        "--write-readme also put it into benchmarks/README.md",
    )
    ap.add_argument("--write-readme", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--markdown",
        metavar="JSON",
        help="print the results in JSON (from an earlier run) as Markdown tables and exit",
    )
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.floor_table:
        doc = json.loads(Path(args.floor_table).read_text())
        table_md = floor_markdown(
            doc["floor_table"], (doc["machine"]["loadavg_at_end"] or [None])[0]
        )
        print(table_md)
        if args.write_readme:
            write_readme_table(table_md, _stamp(doc))
        return 0
    settings = Settings(quick=args.quick or args.short, only=args.only, short=args.short)
    if args.short and args.json == str(HERE / "results.json"):
        args.json = str(Path(tempfile.gettempdir()) / "onceonly-bench-short.json")

    import bench_peers
    import bench_pg
    import bench_sqlite

    info = machine_info()
    progress(
        f"python {info['python']}, sqlite {info['sqlite']}, nproc {info['nproc']}, "
        f"{info['cpu']}{', QUICK' if args.quick else ''}"
    )
    started = time.perf_counter()
    results: list[Result] = []
    skipped: list[Skipped] = []
    results += bench_sqlite.run(settings, progress)
    peer_results, peer_skips = bench_peers.run(settings, progress)
    results += peer_results
    skipped += peer_skips
    pg_results, pg_skips = bench_pg.run(settings, progress)
    results += pg_results
    skipped += pg_skips
    seconds = time.perf_counter() - started
    info["loadavg_at_end"] = loadavg()

    by_name = {r.name: r for r in results}
    evals = [e for t in TARGETS if (e := t.evaluate(by_name)) is not None]
    pg_server = next((r.extra.get("server") for r in pg_results if "server" in r.extra), None)
    if pg_server:
        info["postgresql"] = pg_server

    print()
    print(
        f"OnceOnly benchmarks: python {info['python']}, sqlite {info['sqlite']}"
        f"{', ' + pg_server if pg_server else ''}, nproc {info['nproc']} ({info['cpu']})"
    )
    print(
        "median of R repetitions (each on a fresh database); us/call: lower is better, "
        "calls/s: higher is better"
    )
    print()
    print(table(results))
    if evals:
        print()
        print(targets_table(evals))
    for sk in skipped:
        print(f"\nSKIPPED {sk.name}: {sk.reason}")
    print(
        f"\n{len(results)} cases in {seconds:.0f} s; load average at start "
        f"{info['loadavg_at_start']}, at end {info['loadavg_at_end']}"
    )

    floor_rows = core_floor_rows(results)
    failed: list[str] = []
    if not args.core_only and not args.only:
        with tempfile.TemporaryDirectory() as d:
            rows_path = Path(d) / "rows.jsonl"
            rows_path.touch()
            failed = run_scripts(args.short, rows_path)
            for line in rows_path.read_text(encoding="utf-8").splitlines():
                floor_rows.append(json.loads(line))
    table_md = floor_markdown(floor_rows, (loadavg() or [None])[0])
    print("\nThe floor table (each figure / a floor measured in the same run):\n")
    if args.short:
        print("SHORT run: a few iterations per case, to prove each runs; no figure means anything.")
    print(table_md)
    for f in failed:
        print(f"\nFAILED {f}")

    doc = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "quick": args.quick,
        "only": args.only,
        "machine": info,
        "results": [r.as_dict() for r in results],
        "targets": evals,
        "skipped": [{"name": s.name, "reason": s.reason} for s in skipped],
        "floor_table": floor_rows,
        "failed": failed,
    }
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")
    if not (args.short or args.quick or args.only or args.core_only):
        write_readme_table(table_md, _stamp(doc))
        print("wrote the floor table into benchmarks/README.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
