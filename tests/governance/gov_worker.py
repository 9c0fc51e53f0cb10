"""A worker process for the governance race tests.

python gov_worker.py MODE URL NAMESPACE WORKDIR [ARGS...]

Every execution of a tool appends one JSON line to WORKDIR/effects.jsonl (O_APPEND, so
lines of different processes never interleave); every decision appends one line to
WORKDIR/results-<pid>.jsonl. Workers start together when WORKDIR/go exists.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from onceonly_core import Guard

MODE, URL, NS, WORK = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
ARGS = sys.argv[5:]


def effect(**data: object) -> None:
    line = json.dumps({"pid": os.getpid(), **data}) + "\n"
    fd = os.open(WORK / "effects.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def result(**data: object) -> None:
    with open(WORK / f"results-{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(data) + "\n")


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.005)


def paid_call(item: str) -> str:
    effect(item=item)
    return f"done {item}"


def refund(order: str) -> str:
    effect(item=order)
    return f"refunded {order}"


def hold(item: str) -> str:
    effect(item=item)
    (WORK / "holding").write_text(str(os.getpid()))
    time.sleep(3600)  # killed here, holding its reservation
    return "never"


def step(i: int) -> str:
    (WORK / f"in-{i}").touch()
    wait_for(WORK / f"release-{i}")
    effect(item=f"step-{i}")
    return f"step {i}"


def main() -> None:
    guard = Guard(URL, namespace=NS, quiet=True)
    if MODE == "race":  # ARGS: worker index, calls per worker
        index, calls = int(ARGS[0]), int(ARGS[1])
        wait_for(WORK / "go")
        for n in range(calls):
            item = f"w{index}-c{n}"
            r = guard.call_tool(paid_call, {"item": item}, tool="paid_call", agent_id="racer")
            result(item=item, decision=r.decision, reason=r.policy_reason)
    elif MODE == "hold":  # ARGS: lease seconds
        guard.call_tool(
            hold, {"item": "held"}, tool="hold", agent_id="holder", lease=float(ARGS[0])
        )
    elif MODE == "loop":  # call until blocked; each call waits for the test's release
        for i in range(1000):
            r = guard.call_tool(step, {"i": i}, tool="step", agent_id="looper")
            result(i=i, decision=r.decision, reason=r.policy_reason)
            if r.decision == "blocked":
                return
    elif MODE == "approve":  # ARGS: order
        wait_for(WORK / "go")
        r = guard.call_tool(refund, {"order": ARGS[0]}, tool="refund", agent_id="support")
        result(decision=r.decision, reason=r.policy_reason, value=r.result)
    else:
        raise SystemExit(f"unknown mode {MODE}")


if __name__ == "__main__":
    main()
