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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations and repetitions")
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
        "--markdown",
        metavar="JSON",
        help="print the results in JSON (from an earlier run) as Markdown tables and exit",
    )
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    settings = Settings(quick=args.quick, only=args.only)

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

    doc = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "quick": args.quick,
        "only": args.only,
        "machine": info,
        "results": [r.as_dict() for r in results],
        "targets": evals,
        "skipped": [{"name": s.name, "reason": s.reason} for s in skipped],
    }
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
