"""An MCP client talks to ``payments_server.py`` through ``onceonly mcp-proxy`` (offline).

The client asks for the same charge twice, as an agent that lost the first answer does:
the card is charged once and the second call gets the first call's result. A tool the
agent's policy blocks answers with an error the model can read; nothing runs.

    python examples/mcp/proxy_client.py      # needs: pip install "onceonly-core[mcp]"

Claude Desktop, Cursor or any MCP host runs the same command line (docs/mcp.md).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client

from onceonly_core import Guard
from onceonly_core.governance.models import Policy

HERE = Path(__file__).resolve().parent


def text(result: object) -> str:
    return " ".join(getattr(c, "text", "") for c in getattr(result, "content", []))


async def main(tmp: Path) -> None:
    ledger, charges = f"sqlite:///{tmp / 'ledger.db'}", tmp / "charges.txt"
    charges.touch()
    with Guard(ledger, quiet=True) as operator:  # the operator sets the agent's policy
        operator.gov.upsert_policy(Policy(agent_id="claude", blocked_tools=["refund_*"]))

    proxy = StdioServerParameters(
        command=sys.executable,
        args=["-m", "onceonly_core.cli", "mcp-proxy", "--agent", "claude", "--url", ledger,
              "--", sys.executable, str(HERE / "payments_server.py"), str(charges)],
        env=dict(os.environ),  # the SDK passes only HOME, PATH, ... by default
    )  # fmt: skip
    async with stdio_client(proxy) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        names = [t.name for t in (await session.list_tools()).tools]
        print("tools:", ", ".join(names))
        for attempt in (1, 2):
            result = await session.call_tool("charge", {"customer": "cus_42", "cents": 999})
            outcome = (result.meta or {}).get("onceonly/outcome")
            print(f"charge, attempt {attempt}: {text(result)!r} ({outcome})")
        refund = await session.call_tool("refund_all", {"reason": "oops"})
        print(f"refund_all: error={refund.is_error}: {text(refund)}")
        print("balance:", text(await session.call_tool("balance", {"customer": "cus_42"})))

    assert charges.read_text().splitlines() == ["cus_42 999"], "charged exactly once"
    assert refund.is_error
    with Guard(ledger, quiet=True) as operator:
        decisions = [(r.tool, r.decision) for r in reversed(operator.gov.agent_logs("claude"))]
    print("audit:", decisions)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(main, Path(tmp))
