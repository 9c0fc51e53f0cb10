"""A small MCP server with a side effect: each ``charge`` appends a line to a file.

    python examples/mcp/payments_server.py CHARGES_FILE

Run behind ``onceonly mcp-proxy`` by ``proxy_client.py``. It speaks MCP on stdio, so it
prints nothing to stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

CHARGES = Path(sys.argv[1])
server = MCPServer("payments")


@server.tool()
def charge(customer: str, cents: int) -> str:
    """Charge a customer's card."""
    with CHARGES.open("a") as f:
        f.write(f"{customer} {cents}\n")
    return f"charged {customer} {cents} cents"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def balance(customer: str) -> str:
    """A customer's balance (read-only: runs every time)."""
    return f"{customer}: {100 - 5 * len(CHARGES.read_text().splitlines())} USD"


@server.tool()
def refund_all(reason: str) -> str:
    """Refund every customer (the policy blocks it)."""
    raise AssertionError("a blocked tool must not run")


if __name__ == "__main__":
    server.run()
