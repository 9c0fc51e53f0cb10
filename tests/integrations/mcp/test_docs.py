"""docs/mcp.md and examples/mcp: the configurations parse, the example runs offline."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from _mcp_rig import ROOT, child_env

DOC = ROOT / "docs" / "mcp.md"


def test_every_json_block_parses_and_the_host_configs_run_the_proxy() -> None:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), flags=re.S)
    configs = [json.loads(b) for b in blocks]
    servers = [c["mcpServers"]["payments"] for c in configs if "mcpServers" in c]
    assert len(servers) == 2  # Claude Desktop and Cursor
    for server in servers:
        assert server["command"] == "onceonly"
        args = server["args"]
        assert args[0] == "mcp-proxy" and "--agent" in args and "--" in args
        url = args[args.index("--url") + 1]
        assert url.startswith("sqlite:////")  # absolute: an MCP host's cwd is not yours


def test_the_example_runs_and_charges_once(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mcp" / "proxy_client.py")],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "charge, attempt 2: 'charged cus_42 999 cents' (replayed)" in done.stdout
    assert "refund_all: error=True" in done.stdout
    assert list(tmp_path.iterdir()) == []  # the example cleans up after itself
