"""The server's profile by layer, from a py-spy recording of one uvicorn worker.

    onceonly serve --url URL --workers 1 --job-workers 0 --port 8000 &
    py-spy record --gil --rate 200 --format raw -o prof.txt -d 10 -p <serve pid> &
    wrk -t2 -c16 -d8s -s check-lock.lua http://127.0.0.1:8000   # bench_server.py's script
    python benchmarks/profile_server.py prof.txt

``--gil`` keeps only samples taken while the worker holds the GIL (its Python CPU time).
Each stack goes to the layer of its deepest frame that belongs to one (within a frame,
the first layer listed); prints a Markdown table of shares.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

LAYERS = [
    ("event loop (asyncio / uvloop)", r"asyncio/|uvloop|uvicorn/server|Runner\.run"),
    ("uvicorn's HTTP protocol (parse, response write)", r"uvicorn/protocols/http"),
    (
        "ASGI middleware stack",
        r"starlette/middleware|fastapi/middleware|fastapi/_body_limit|fastapi/telemetry|"
        r"proxy_headers|fastapi/applications|starlette/applications|_exception_handler|"
        r"BodyLimit\.|replay \(onceonly_core/server/app",
    ),
    ("hostile-input check (check_json_body)", r"check_json_body|_url_refusal"),
    ("routing", r"starlette/routing"),
    ("FastAPI request handling", r"fastapi/routing|fastapi/dependencies|starlette/requests"),
    ("pydantic validation", r"pydantic"),
    (
        "API-key check + rate limiter",
        r"\bauth \(onceonly_core/server/app|server/db\.py|RateLimiter",
    ),
    ("thread hop (anyio worker threads)", r"anyio/|starlette/concurrency|threading\.py"),
    ("check-lock, usage, quota", r"onceonly_core/server/|protocol\.py"),
    ("store: SQLStore + pool", r"onceonly_core/stores/|sqlalchemy/"),
    ("store: driver", r"psycopg|sqlite3|pymysql"),
    ("JSON response encoding", r"starlette/responses|SafeJSONResponse|json/encoder"),
]
_COMPILED = [(name, re.compile(rx)) for name, rx in LAYERS]


def layer(frames: list[str]) -> str:
    best = "other"
    for frame in frames:
        for name, rx in _COMPILED:
            if rx.search(frame):
                best = name
                break
    return best


def main(path: str) -> None:
    counts: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            total += int(n)
            counts[layer(stack.split(";"))] += int(n)
    print(f"{total} samples\n\n| layer | share |\n|---|---:|")
    for name, n in counts.most_common():
        print(f"| {name} | {100 * n / max(total, 1):.1f} % |")


if __name__ == "__main__":
    main(sys.argv[1])
