"""A real stdio MCP server for the proxy's tests: every tool call appends one line to a file.

    python upstream_server.py EFFECTS_FILE

Each line is JSON: the tool, its arguments, the server's pid, the phase (``start`` /
``done``) and the idempotency key the proxy passed in the request's ``_meta``. Counting
``done`` lines counts effects; a ``start`` without its ``done`` is a call that was cut off.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations

EFFECTS = Path(sys.argv[1])

server = MCPServer("effects")


def _write(ctx: Context, tool: str, phase: str, **args: Any) -> None:
    meta = ctx.request_context.meta or {}
    line = {
        "tool": tool,
        "args": args,
        "phase": phase,
        "pid": os.getpid(),
        "ppid": os.getppid(),  # the proxy: a test kills it mid-call
        "key": meta.get("onceonly/idempotency-key"),
        # The proxy keeps its own settings (API key, ledger URL) from the upstream.
        "onceonly_env": sorted(k for k in os.environ if k.startswith("ONCEONLY_")),
    }
    # One write of one line in append mode: lines from concurrent calls never interleave.
    with EFFECTS.open("a") as f:
        f.write(json.dumps(line) + "\n")


@server.tool()
def charge(customer: str, cents: int, ctx: Context, note: str = "", card_token: str = "") -> str:
    """Charge a customer (a side effect: one line per run)."""
    _write(ctx, "charge", "done", customer=customer, cents=cents)
    return f"charged {customer} {cents} cents"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def balance(customer: str, ctx: Context) -> str:
    """Read a customer's balance (read-only: runs every time)."""
    _write(ctx, "balance", "done", customer=customer)
    return f"{customer}: 100"


@server.tool(annotations=ToolAnnotations(idempotent_hint=True))
def set_email(customer: str, email: str, ctx: Context) -> dict[str, str]:
    """Set a customer's email (idempotent); the result is structured."""
    _write(ctx, "set_email", "start", customer=customer, email=email)
    crash_once = EFFECTS.with_suffix(".crash")
    if crash_once.exists() and crash_once.read_text() == email:
        crash_once.unlink()
        os._exit(3)  # dies mid-call, before answering; the next server will not
    _write(ctx, "set_email", "done", customer=customer, email=email)
    return {"customer": customer, "email": email}


@server.tool()
def slow_charge(customer: str, ctx: Context) -> str:
    """Charge, pausing while EFFECTS.hold exists: a call a test can cut off mid-way."""
    _write(ctx, "slow_charge", "start", customer=customer)
    hold, deadline = EFFECTS.with_suffix(".hold"), time.monotonic() + 60
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    _write(ctx, "slow_charge", "done", customer=customer)
    return f"slow-charged {customer}"


@server.tool()
def crash(tag: str, ctx: Context) -> str:
    """Start, then kill this server before answering."""
    _write(ctx, "crash", "start", tag=tag)
    os._exit(3)


@server.tool()
def refuse(reason: str, ctx: Context) -> str:
    """Fail with the given reason (the tool's own error)."""
    _write(ctx, "refuse", "done", reason=reason)
    raise ValueError(f"refused: {reason}")


@server.resource("effects://count", mime_type="text/plain")
def effect_count() -> str:
    """How many lines the effects file has (a resource: read, never run once)."""
    return str(len(EFFECTS.read_text().splitlines())) if EFFECTS.exists() else "0"


@server.prompt()
def refund_policy(customer: str) -> str:
    """A prompt the proxy passes through."""
    return f"Refund {customer} only after checking the charge."


if __name__ == "__main__":
    server.run()
