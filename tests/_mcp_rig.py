"""The MCP guard's test rig: a real proxy process in front of a real stdio MCP server.

The proxy runs as ``python -m onceonly_core.cli mcp-proxy ... -- python upstream_server.py
EFFECTS``; every upstream tool run appends a line to EFFECTS, so a test counts effects by
reading the file. The ledger is a SQLite file the test also opens with a Guard, to set
policies, approve calls and read the audit log as an operator would.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from mcp import ClientSession, StdioServerParameters, stdio_client, types

from _listening import free_port, listening
from onceonly_core import Guard

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ROOT / "tests" / "integrations" / "mcp" / "upstream_server.py"


def child_env() -> dict[str, str]:
    """The environment of the proxy: this checkout first on the path."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "integrations"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.pop("ONCEONLY_DB_URL", None)
    env.pop("ONCEONLY_NAMESPACE", None)
    return env


class Rig:
    """One ledger, one effects file, and the commands that start a proxy over them."""

    def __init__(
        self,
        tmp: Path,
        url: str | None = None,
        namespace: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.tmp = tmp
        self.url = url or f"sqlite:///{tmp / 'ledger.db'}"
        self.namespace = namespace  # isolates tests that share a server database
        self.api_key = api_key  # remote mode: the url is a onceonly serve control plane
        self.effects = tmp / "effects.jsonl"
        self._guard: Guard | None = None

    def proxy_argv(self, *options: str) -> list[str]:
        return [
            "-m",
            "onceonly_core.cli",
            "mcp-proxy",
            "--url",
            self.url,
            *(("--namespace", self.namespace) if self.namespace else ()),
            *options,
            "--",
            sys.executable,
            str(UPSTREAM),
            str(self.effects),
        ]

    def params(self, *options: str) -> StdioServerParameters:
        return StdioServerParameters(
            command=sys.executable, args=self.proxy_argv(*options), env=self.env()
        )

    def env(self) -> dict[str, str]:
        env = child_env()
        if self.api_key is not None:
            env["ONCEONLY_API_KEY"] = self.api_key  # as an agent host is configured
        return env

    @contextlib.asynccontextmanager
    async def session(self, *options: str) -> AsyncIterator[ClientSession]:
        """An initialized SDK ClientSession talking to a fresh proxy over stdio."""
        async with (
            stdio_client(self.params(*options)) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session

    def lines(self, tool: str | None = None, phase: str | None = "done") -> list[dict[str, Any]]:
        if not self.effects.exists():
            return []
        out = [json.loads(line) for line in self.effects.read_text().splitlines() if line]
        return [
            e
            for e in out
            if (tool is None or e["tool"] == tool) and (phase is None or e["phase"] == phase)
        ]

    @staticmethod
    def outcome(result: types.CallToolResult) -> str:
        """The proxy's classification of a call (``_meta["onceonly/outcome"]``)."""
        assert result.meta is not None, result
        return str(result.meta["onceonly/outcome"])

    @staticmethod
    def text(result: types.CallToolResult) -> str:
        return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))

    @property
    def guard(self) -> Guard:
        """The operator's view of the same ledger (policies, approvals, audit)."""
        if self._guard is None and self.api_key is not None:
            self._guard = Guard(
                self.url, namespace=self.namespace, api_key=self.api_key, quiet=True
            )
        elif self._guard is None:
            # Server databases are migrated by their operator; here, by the first test.
            opts = {"auto_migrate": True}
            self._guard = Guard(self.url, namespace=self.namespace, quiet=True, store_options=opts)
        return self._guard

    def close(self) -> None:
        if self._guard is not None:
            self._guard.close()


@contextlib.contextmanager
def http_proxy(rig: Rig, *options: str) -> Iterator[str]:
    """A proxy process serving streamable HTTP; yields its endpoint URL."""
    port = free_port()
    argv = [sys.executable, *rig.proxy_argv("--http", f"127.0.0.1:{port}", *options)]
    with listening(argv, port, rig.env(), rig.tmp / f"proxy-http-{port}.log"):
        yield f"http://127.0.0.1:{port}/mcp"
