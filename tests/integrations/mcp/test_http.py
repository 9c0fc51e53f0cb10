"""``onceonly mcp-proxy --http``: the same proxy over MCP streamable HTTP."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import anyio
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from _mcp_rig import Rig, child_env, http_proxy

pytestmark = pytest.mark.timeout(120)


async def _calls(url: str, headers: dict[str, str] | None = None) -> list[Any]:
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as s,
    ):
        await s.initialize()
        names = {t.name for t in (await s.list_tools()).tools}
        assert {"charge", "balance"} <= names
        return [await s.call_tool("charge", {"customer": "h", "cents": 7}) for _ in range(2)]


def test_streamable_http_runs_each_call_once(rig: Rig) -> None:
    with http_proxy(rig, "--agent", "bot") as url:
        first = anyio.run(_calls, url)
        # A second client session (another agent process) gets the replay too.
        second = anyio.run(_calls, url)
    outcomes = [rig.outcome(r) for r in (*first, *second)]
    assert outcomes == ["executed", "replayed", "replayed", "replayed"]
    assert len(rig.lines("charge")) == 1
    assert [r.decision for r in rig.guard.gov.agent_logs("bot")][::-1] == [
        "executed",
        "dedup",
        "dedup",
        "dedup",
    ]


def test_a_token_is_required_when_set(rig: Rig) -> None:
    with http_proxy(rig, "--token", "s3cret") as url:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        refused = httpx2.post(url, json=body, headers={"Accept": "application/json"})
        assert refused.status_code == 401
        wrong = httpx2.post(url, json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        results = anyio.run(_calls, url, {"Authorization": "Bearer s3cret"})
    assert [rig.outcome(r) for r in results] == ["executed", "replayed"]


def test_a_public_bind_needs_a_token(rig: Rig) -> None:
    argv = rig.proxy_argv("--http", "0.0.0.0:1")
    done = subprocess.run(
        [sys.executable, *argv], env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "pass --token" in done.stderr
