"""``onceonly mcp-proxy`` in remote mode: the proxy keeps its ledger and governance on a
``onceonly serve`` control plane (PostgreSQL), holding only an API key.

The proxy process gets ``--url http://…`` and ``ONCEONLY_API_KEY`` in its environment, as
an agent host is configured (docs/remote.md); the operator sets policies and reads the
audit log through a remote guard with the same key.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from _mcp_rig import Rig
from onceonly_core.governance.models import Policy

pytestmark = pytest.mark.timeout(180)


def run(fn: Any) -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(120):
            return await fn()

    return anyio.run(bounded)


def test_the_proxy_runs_each_call_once_and_is_governed_by_the_server(
    tmp_path: Path, remote: Any
) -> None:
    rig = Rig(tmp_path, remote.root, "mcp", api_key=remote.key)
    try:
        rig.guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["refuse"]))

        async def first_proxy() -> list[Any]:
            async with rig.session("--agent", "bot", "--scope", "order-9") as s:
                return [
                    await s.call_tool("charge", {"customer": "r1", "cents": 700}),
                    await s.call_tool("charge", {"cents": 700, "customer": "r1"}),
                    await s.call_tool("refuse", {"reason": "x"}),
                ]

        async def second_proxy() -> Any:
            # Another proxy process (another host, say) sharing the control plane.
            async with rig.session("--agent", "bot", "--scope", "order-9") as s:
                return await s.call_tool("charge", {"customer": "r1", "cents": 700})

        results = run(first_proxy)
        later = run(second_proxy)
        outcomes = [rig.outcome(r) for r in (*results, later)]
        assert outcomes == ["executed", "replayed", "blocked", "replayed"], [
            rig.text(r) for r in results
        ]
        assert later.content == results[0].content
        charges = rig.lines("charge")
        assert [e["args"]["cents"] for e in charges] == [700]
        # The upstream (someone else's code) never saw the proxy's API key.
        assert charges[0]["onceonly_env"] == []
        assert rig.lines("refuse") == []
        # The audit rows are the server's, in the key's tenant.
        decisions = [(e.tool, e.decision) for e in reversed(rig.guard.gov.agent_logs("bot"))]
        assert decisions == [
            ("charge", "executed"),
            ("charge", "dedup"),
            ("refuse", "blocked"),
            ("charge", "dedup"),
        ]
    finally:
        rig.close()


def test_a_proxy_without_the_key_is_one_clear_error(tmp_path: Path, remote: Any) -> None:
    rig = Rig(tmp_path, remote.root, "mcp")  # no api_key: ONCEONLY_API_KEY unset
    argv = [sys.executable, *rig.proxy_argv("--agent", "bot")]
    done = subprocess.run(
        argv,
        env=rig.env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "ONCEONLY_API_KEY" in done.stderr and "onceonly keys create" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert rig.lines("charge") == []
