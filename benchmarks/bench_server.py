"""`/v1/check-lock` throughput and latency of `onceonly serve`, next to the embedded
engine's own claims/s, in one run.

    python benchmarks/bench_server.py [--seconds 8] [--pg URL] [--workers 2]

Load: `wrk` (Debian's package) with keep-alive connections at 1, 16 and 64 concurrent
clients, every request a new key (a Lua counter), so each one is a real claim. The
server runs as a separate process (`onceonly serve --workers N`), on SQLite (WAL, NORMAL)
and on PostgreSQL. `embedded` is `Guard.store.claim` + `finish` in one process, the work a
check-lock does without HTTP. Prints a Markdown table; numbers are medians of one run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import floor_row  # noqa: E402

from onceonly_core.server import create_key  # noqa: E402
from onceonly_core.stores import NewClaim, open_store  # noqa: E402
from onceonly_core.stores.sql import SQLStore  # noqa: E402

LUA = """
local n = 0
local t = "%s"
request = function()
  n = n + 1
  local body = '{"key": "' .. t .. '-' .. n .. '-' .. math.random(1e9) .. '", "ttl": 3600}'
  return wrk.format("POST", "/v1/check-lock", {["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer %s"}, body)
end
"""

# A non-2xx answer makes the run fail; its status codes are then counted by a second
# run with this handler (which slows wrk down, so it is not on in the measured run).
LUA_STATUSES = """
response = function(status, headers, body)
  if status >= 300 then io.write("STATUS ", status, "\\n") end
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"server did not come up: {url}")


def wrk(
    port: int, key: str, conns: int, seconds: int, tmp: Path, statuses: bool = False
) -> dict[str, float]:
    script = tmp / f"cl-{conns}.lua"
    script.write_text(LUA % (uuid.uuid4().hex[:8], key) + (LUA_STATUSES if statuses else ""))
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(min(conns, 2)),
            "-c",
            str(conns),
            "-d",
            f"{seconds}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if statuses:
        codes = Counter(re.findall(r"STATUS (\d+)", out))
        print(f"non-2xx status codes at {conns} clients: {dict(codes) or 'none'}")
    return {
        "rps": rps,
        "p50": pct("50"),
        "p99": pct("99"),
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


def embedded(url: str, seconds: float) -> float:
    store = open_store(url)
    new = NewClaim("bench", "bench-owner", 30.0)
    ns, n = f"bench-emb-{uuid.uuid4().hex[:6]}", 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        k = f"k{n}"
        rec = store.claim(ns, k, new)
        store.finish(ns, k, rec.token, ok=True, result="null", ttl=3600)
        n += 1
    store.close()
    return n / seconds


def run(label: str, url: str, args: argparse.Namespace, tmp: Path) -> list[str]:
    if not url.startswith("sqlite"):
        with SQLStore(url) as s:
            s.migrate()
    key = create_key(url, f"bench-{uuid.uuid4().hex[:6]}")
    port = free_port()
    env = {**os.environ, "ONCEONLY_DB_URL": url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "onceonly_core.cli",
            "serve",
            "--url",
            url,
            "--port",
            str(port),
            "--workers",
            str(args.workers),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows = []
    results = {}
    try:
        wait_up(f"http://127.0.0.1:{port}/healthz")
        wrk(port, key, 4, 1 if args.seconds < 2 else 2, tmp)  # warm-up
        for conns in (1, 16, 64):
            r = results[conns] = wrk(port, key, conns, args.seconds, tmp, args.statuses)
            rows.append(
                f"| {label} | {conns} | {r['rps']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                f"{int(r['non2xx'])} |"
            )
    finally:
        proc.terminate()
        proc.wait(30)
    floor = embedded(url, min(3, args.seconds))
    rows.append(f"| {label} embedded (claim + finish, 1 thread) | — | {floor:,.0f} | | | |")
    for conns, r in results.items():
        floor_row(
            f"`serve` /v1/check-lock, {label}, {conns} client{'s' if conns > 1 else ''} "
            f"(p99 {r['p99']:.0f} ms)",
            r["rps"],
            "the store's own claim + finish, in process, 1 thread",
            floor,
            unit="req/s",
            target=">=",
            limit=0.8,
            bound="per request: HTTP parsing, FastAPI/pydantic validation, API-key check "
            "and JSON encoding in uvicorn's Python, on the same 2 cores as the database",
        )
    bad = [conns for conns, r in results.items() if r["non2xx"]]
    if bad:
        raise SystemExit(
            f"{label}: non-2xx responses at {bad} clients "
            f"({', '.join(str(int(results[c]['non2xx'])) for c in bad)}); "
            "rerun with --statuses to see their codes"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--statuses", action="store_true", help="count non-2xx status codes")
    ap.add_argument("--no-sqlite", action="store_true", help="only the PostgreSQL rows")
    ap.add_argument(
        "--pg",
        default=os.environ.get(
            "ONCEONLY_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        # Not an error: the short CI run and a machine without wrk skip the server rows.
        print("bench_server: SKIPPED, wrk is not installed (apt-get install wrk)")
        return
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.no_sqlite:
            url = f"sqlite:///{tmp}/server.db?synchronous=normal"
            rows += run("SQLite (NORMAL)", url, args, tmp)
        try:
            rows += run("PostgreSQL", args.pg, args, tmp)
        except Exception as err:  # no server: keep the SQLite rows
            rows.append(f"| PostgreSQL skipped: {err} | | | | | |")
    print(f"uvicorn workers: {args.workers}; load average at the end: {os.getloadavg()[0]:.1f}")
    print("| ledger | clients | req/s | p50 ms | p99 ms | non-2xx |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
