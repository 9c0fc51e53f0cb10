"""LangChain's own MCP client (``langchain-mcp-adapters``) through ``onceonly mcp-proxy``.

Two environments, as a user runs it. ``langchain-mcp-adapters`` requires the MCP SDK 1.x,
the proxy (extra ``mcp``) the SDK 2.x, so they cannot share one install. MCP is a wire
protocol and the proxy is a command, so they do not need to: this environment (the nox
``integration(langchain)`` session) has LangChain, LangGraph and the adapters; the proxy
and the test's upstream server (tests/integrations/mcp/upstream_server.py, one line in an
effects file per tool run) run from a second virtualenv with ``onceonly-core[mcp]``,
built once and kept next to this environment (see :func:`proxy_env`).

A real LangChain agent (``create_agent``, a scripted model) calls the proxied ``charge``
tool on two turns with the same arguments: one effect, and the model reads the first
answer twice. A tool blocked by the agent's policy (set on the same ledger with the
embedded API) comes back as a failed ``ToolMessage`` carrying the adapter contract's
sentence, the same sentence the embedded API gives. Every decision has its audit row.
The same holds with a proxy started per call (the adapters' ``get_tools()`` without a
session) and over streamable HTTP (``mcp-proxy --http``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# nox's integration(langchain) session installs it (dependency group langchain-mcp-test):
# there its absence fails the run. Elsewhere (an environment with the `mcp` extra, which
# cannot have it) the module is skipped.
if "NOX_CURRENT_SESSION" not in os.environ:
    pytest.importorskip("langchain_mcp_adapters", reason="langchain-mcp-adapters is not installed")

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_mcp_adapters.client import MultiServerMCPClient
from langchain_mcp_adapters.tools import load_mcp_tools

from _listening import free_port, listening
from onceonly_core import Guard
from onceonly_core.governance.models import Policy
from onceonly_langchain.testing import ScriptedChatModel, tool_call

ROOT = Path(__file__).resolve().parents[3]
UPSTREAM = ROOT / "tests" / "integrations" / "mcp" / "upstream_server.py"
BIN = "bin"  # POSIX virtualenv layout (the suite runs on Linux)

# Building the proxy's environment installs the checkout and its `mcp` extra from PyPI:
# 25-45 s here (2 cores, busy), once; the tests then take 15-30 s.
pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True)
class ProxyEnv:
    """The second virtualenv: ``onceonly-core[mcp]`` (MCP SDK 2.x), this checkout editable."""

    path: Path

    @property
    def python(self) -> Path:
        return self.path / BIN / "python"

    @property
    def onceonly(self) -> Path:
        return self.path / BIN / "onceonly"

    def argv(self, ledger: str, effects: Path, *options: str) -> list[str]:
        """``onceonly mcp-proxy`` in front of the upstream server, both from this env."""
        upstream = [str(self.python), str(UPSTREAM), str(effects)]
        return [str(self.onceonly), "mcp-proxy", "--url", ledger, *options, "--", *upstream]

    def connection(self, ledger: str, effects: Path, *options: str) -> dict[str, Any]:
        """A langchain-mcp-adapters stdio connection to the proxy."""
        command, *args = self.argv(ledger, effects, *options)
        return {"transport": "stdio", "command": command, "args": args, "env": _child_env()}


def _child_env() -> dict[str, str]:
    """The proxy's environment: nothing of this one's Python path or ledger settings."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "ONCEONLY_DB_URL", "ONCEONLY_NAMESPACE"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _stamp() -> str:
    """What the built environment depends on: this checkout, its dependencies, the Python."""
    digest = hashlib.sha256()
    digest.update(str(ROOT).encode())
    digest.update((ROOT / "pyproject.toml").read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


FAILED = (
    "could not build the MCP proxy's virtualenv (python -m venv, then pip install -e "
    "'<checkout>[mcp]' from PyPI: it needs PyPI or a mirror pip is configured for)"
)


def _run(argv: list[str], what: str, timeout: float) -> str:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=_child_env()
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{FAILED}: {what}: {exc}", pytrace=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        pytest.fail(
            f"{FAILED}: {what} exited {proc.returncode}\n$ {' '.join(argv)}\n{tail}",
            pytrace=False,
        )
    return proc.stdout


def _build(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    # Without pip of its own (ensurepip takes seconds): this environment's pip installs
    # into it (`pip --python`, pip >= 22.3).
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], "python -m venv", 120)
    env = ProxyEnv(path)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(env.python),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--editable",
            f"{ROOT}[mcp]",
        ],
        f"pip install -e '{ROOT}[mcp]'",
        480,
    )
    # The SDK major the proxy needs, and this checkout's code (not an installed copy).
    check = (
        "import importlib.metadata as m, onceonly_core, mcp.server.mcpserver; "
        "print(m.version('mcp')); print(onceonly_core.__file__)"
    )
    version, module = _run([str(env.python), "-c", check], "the import check", 120).split()
    if not version.startswith("2.") or not Path(module).resolve().is_relative_to(ROOT):
        pytest.fail(f"the MCP proxy's virtualenv has mcp {version}, onceonly_core at {module}")


@pytest.fixture(scope="session")
def proxy_env(tmp_path_factory: pytest.TempPathFactory) -> ProxyEnv:
    """The proxy's virtualenv, built once, kept where this environment lives.

    Inside this test environment's own virtualenv (nox's session venv) it lives and dies
    with it: ``nox -r`` reuses it, a new nox venv builds it anew. It is rebuilt when the
    checkout, pyproject.toml or the Python changes (a stamp file). Outside a virtualenv it
    is built per test run in pytest's temporary directory. It cannot be built (no network
    to PyPI, a broken extra): the tests fail, saying why; they do not skip.
    """
    if sys.prefix != sys.base_prefix:
        path = Path(sys.prefix) / "onceonly-mcp-proxy-env"
    else:
        path = tmp_path_factory.mktemp("mcp-proxy") / "venv"
    stamp, env = path / "onceonly-stamp", ProxyEnv(path)
    if not (stamp.exists() and stamp.read_text() == _stamp() and env.onceonly.exists()):
        started = time.monotonic()
        _build(path)
        # Written last: a build cut off half-way has no stamp and is redone.
        stamp.write_text(_stamp())
        (path / "onceonly-build-seconds").write_text(f"{time.monotonic() - started:.1f}\n")
    return env


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[tuple[str, Guard]]:
    """A SQLite ledger the proxy uses and the test opens as an operator (policies, audit)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    guard = Guard(url, quiet=True)
    yield url, guard
    guard.close()


def _effects(path: Path, tool: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [e for e in lines if e["tool"] == tool and e["phase"] == "done"]


def _text(message: ToolMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    return " ".join(b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text")


def test_a_langchain_agent_runs_mcp_tools_through_the_proxy(
    proxy_env: ProxyEnv, ledger: tuple[str, Guard], tmp_path: Path
) -> None:
    url, guard = ledger
    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["refuse"]))
    effects = tmp_path / "effects.jsonl"
    charge = {"customer": "agent", "cents": 42}
    client = MultiServerMCPClient(
        {"payments": proxy_env.connection(url, effects, "--agent", "bot", "--scope", "conv-1")}
    )
    model = ScriptedChatModel(
        script=[
            AIMessage("", tool_calls=[tool_call("charge", "t1", **charge)]),
            # The model re-plans and charges again, and calls a tool its policy blocks.
            AIMessage(
                "",
                tool_calls=[
                    tool_call("charge", "t2", **charge),
                    tool_call("refuse", "t3", reason="x"),
                ],
            ),
        ]
    )

    async def scenario() -> dict[str, Any]:
        # One session: one proxy process for the whole run, as an agent keeps it open.
        async with client.session("payments") as session:
            tools = await load_mcp_tools(session)
            agent = create_agent(model, tools)
            return await asyncio.wait_for(
                agent.ainvoke({"messages": [HumanMessage("charge the customer")]}), 120
            )

    result = asyncio.run(scenario())
    answers = {m.tool_call_id: m for m in result["messages"] if isinstance(m, ToolMessage)}
    assert sorted(answers) == ["t1", "t2", "t3"]
    # The second charge is answered from the ledger: what the first call returned.
    # (The adapter gives each content block a fresh id; the text is what the model reads.)
    assert _text(answers["t1"]) == _text(answers["t2"]) == "charged agent 42 cents"
    assert answers["t1"].status == answers["t2"].status == "success"
    assert len(_effects(effects, "charge")) == 1

    # The blocked tool never ran; the model reads the contract's sentence as a tool error,
    # word for word what the embedded API answers for the same policy.
    guard.gov.upsert_policy(Policy(agent_id="bot-embedded", blocked_tools=["refuse"]))
    embedded = guard.run_call_classified(
        "refuse", {"reason": "x"}, lambda: "ran", agent_id="bot-embedded"
    )
    assert embedded.code == "blocked" and embedded.reason == "tool_blocked"
    assert answers["t3"].status == "error"
    assert _text(answers["t3"]) == embedded.text
    assert "was blocked by policy (tool_blocked); do not retry this call" in embedded.text
    assert _effects(effects, "refuse") == []

    # One audit row per decision, in the same ledger. t2 and t3 run concurrently (the
    # ToolNode gathers them): their rows may come in either order.
    rows = sorted((r.tool, r.decision, r.reason or "") for r in guard.gov.agent_logs("bot"))
    assert [row[:2] for row in rows] == [
        ("charge", "dedup"),
        ("charge", "executed"),
        ("refuse", "blocked"),
    ]
    assert rows[2][2] == "tool_blocked"


def test_every_call_in_its_own_proxy_process_is_still_run_once(
    proxy_env: ProxyEnv, ledger: tuple[str, Guard], tmp_path: Path
) -> None:
    """``client.get_tools()`` without a session (the adapters' usual setup) starts a new
    proxy, and a new upstream, for every tool call: the replay comes from the ledger."""
    url, guard = ledger
    effects = tmp_path / "effects.jsonl"
    client = MultiServerMCPClient(
        {"payments": proxy_env.connection(url, effects, "--agent", "bot", "--scope", "order-7")}
    )
    args = {"customer": "c1", "cents": 500}

    async def scenario() -> list[ToolMessage]:
        tools = {t.name: t for t in await client.get_tools()}
        calls = [{"type": "tool_call", "name": "charge", "args": args, "id": i} for i in "ab"]
        return [await asyncio.wait_for(tools["charge"].ainvoke(c), 60) for c in calls]

    first, again = asyncio.run(scenario())
    assert _text(first) == _text(again) == "charged c1 500 cents"
    assert first.status == again.status == "success"
    assert len(_effects(effects, "charge")) == 1
    decisions = [(r.tool, r.decision) for r in guard.gov.agent_logs("bot")]
    assert sorted(decisions) == [("charge", "dedup"), ("charge", "executed")]


def test_over_streamable_http(
    proxy_env: ProxyEnv, ledger: tuple[str, Guard], tmp_path: Path
) -> None:
    """The adapters' streamable-HTTP client against ``mcp-proxy --http``: one proxy
    process serves every call; no MCP SDK is shared, only the wire."""
    url, guard = ledger
    effects = tmp_path / "effects.jsonl"
    args = {"customer": "http", "cents": 7}
    port = free_port()
    argv = proxy_env.argv(url, effects, "--http", f"127.0.0.1:{port}", "--agent", "bot")

    async def scenario(endpoint: str) -> list[ToolMessage]:
        client = MultiServerMCPClient(
            {"payments": {"transport": "streamable_http", "url": endpoint}}
        )
        tools = {t.name: t for t in await client.get_tools()}
        calls = [{"type": "tool_call", "name": "charge", "args": args, "id": i} for i in "ab"]
        return [await asyncio.wait_for(tools["charge"].ainvoke(c), 60) for c in calls]

    with listening(argv, port, _child_env(), tmp_path / "proxy.log"):
        first, again = asyncio.run(scenario(f"http://127.0.0.1:{port}/mcp"))
    assert _text(first) == _text(again) == "charged http 7 cents"
    assert len(_effects(effects, "charge")) == 1
    decisions = [(r.tool, r.decision) for r in guard.gov.agent_logs("bot")]
    assert sorted(decisions) == [("charge", "dedup"), ("charge", "executed")]
