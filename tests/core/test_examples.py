"""The runnable entry points of the core install: every ``examples/*.py`` and the demo.

Each example asserts its own claims (one charge, one SMS, ...), so a broken engine makes it
exit non-zero here. The demo runs as ``python -m onceonly_core.cli.demo`` — no typer, and once
without rich — and its ledger is checked record by record afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from onceonly_core import Guard, MemoryStore
from onceonly_core.errors import ConfigError
from onceonly_core.stores.sql import SQLStore

ROOT = Path(__file__).resolve().parents[2]
# Framework examples (langchain_*.py, openai_*.py, llamaindex_*.py) need their extra: they
# are run by tests/integrations/<framework>, in the session that installs it.
FRAMEWORK_PREFIXES = ("langchain_", "openai_", "llamaindex_")
EXAMPLES = sorted(
    p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith(FRAMEWORK_PREFIXES)
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCEONLY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120, check=False
    )


def test_the_documented_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "quickstart.py",
        "async_tools.py",
        "downstream_idempotency.py",
        "workflow_scopes.py",
    } <= names


#: Examples that start a server (``onceonly serve``): they need the server extra.
SERVER_PREFIXES = ("remote_",)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_proves_its_claims(example: Path, tmp_path: Path) -> None:
    if example.name.startswith(SERVER_PREFIXES):
        pytest.importorskip("uvicorn", reason=f"{example.name} needs the 'server' extra")
    proc = _run([sys.executable, str(example)], tmp_path)
    assert proc.returncode == 0, f"{example.name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), "an example tells the reader what happened"
    # Examples keep their ledger in a temporary directory: nothing is left behind.
    assert list(tmp_path.iterdir()) == []


def _ledger_namespace(stdout: str) -> str:
    match = re.search(r"namespace: (demo/\S+)", stdout)
    assert match, stdout
    return match.group(1)


def test_demo_module_proves_every_effect_happened_once(tmp_path: Path) -> None:
    proc = _run([sys.executable, "-m", "onceonly_core.cli.demo", "--fast"], tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    assert "charges made: 3 (one per order: A-1001, B-2002, C-3003)" in out
    assert "charge calls by the agent: 9" in out
    assert "emails sent: 1 (one receipt) — send calls: 2" in out
    assert "nothing ran twice" in out
    assert "✗ " not in out.split("What ran once")[-1]  # no failed proof line
    assert "onceonly show --namespace demo/" in out

    # The ledger it left in the working directory tells the same story.
    ns = _ledger_namespace(out)
    store = SQLStore(f"sqlite:///{tmp_path / 'onceonly.db'}", auto_migrate=False)
    try:
        records = store.list(namespace=ns, limit=100)
    finally:
        store.close()
    by_tool: dict[str, list[int]] = {}
    for r in records:
        assert r.state == "succeeded", r
        assert r.executions == 1, r
        by_tool.setdefault(r.tool, []).append(r.attempt)
    # One record per order; the declined charge and the crashed email took a second attempt.
    assert sorted(by_tool["shop.charge_card"]) == [1, 1, 2]
    assert by_tool["shop.send_receipt"] == [2]
    assert {r.caller for r in records} >= {"agent"}
    assert any((r.caller or "").startswith("worker-") for r in records)


def test_demo_without_rich_prints_plain_text(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['rich'] = None\n"
        "from onceonly_core.cli.demo import main\n"
        "sys.exit(main(['--fast', '--url', 'sqlite:///plain.db']))\n"
    )
    proc = _run([sys.executable, "-c", code], tmp_path)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert re.search(r"^scene\s+tool\s+calls\s+ran\s+replayed\s+stopped\s+world", proc.stdout, re.M)
    assert "charges made: 3" in proc.stdout
    assert (tmp_path / "plain.db").exists() and not (tmp_path / "onceonly.db").exists()


def test_each_demo_run_tells_a_new_story(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    runs = [
        _run([sys.executable, "-m", "onceonly_core.cli.demo", "--fast", "--url", url], tmp_path)
    ]
    runs.append(
        _run([sys.executable, "-m", "onceonly_core.cli.demo", "--fast", "--url", url], tmp_path)
    )
    assert [p.returncode for p in runs] == [0, 0], runs[-1].stdout + runs[-1].stderr
    first, second = (_ledger_namespace(p.stdout) for p in runs)
    assert first != second
    # The second run executed its charges again (a new namespace), it did not replay the first's.
    assert "charges made: 3" in runs[1].stdout


def test_demo_needs_a_ledger_shared_between_processes() -> None:
    from onceonly_core.cli.demo import run_demo

    with pytest.raises(ConfigError, match="memory://"):
        run_demo("memory://")


def test_cli_without_its_extra_names_the_pip_command(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['typer'] = None\n"
        "import onceonly_core.cli, onceonly_core.cli.demo\n"
        "assert sys.modules.get('rich') is None, 'importing the CLI module imported rich'\n"
        "onceonly_core.cli.main(['show'])\n"
    )
    proc = _run([sys.executable, "-c", code], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert (
        "error: the onceonly CLI needs the 'cli' extra (typer is not installed): "
        'pip install "onceonly-core[cli]"' in proc.stderr
    )
    assert "Traceback" not in proc.stderr


# -- regression: found while writing the examples ---------------------------------------
def test_retry_of_a_decorated_tool_clears_its_record() -> None:
    guard = Guard(store=MemoryStore(), quiet=True)
    calls: list[str] = []

    @guard.once(key_args=["order_id"])
    def send(order_id: str, body: str) -> int:
        calls.append(body)
        return len(calls)

    send("o-1", "Shipped!")
    assert guard.retry(send, "o-1", "Shipped!") is True
    send("o-1", "Shipped!")
    assert calls == ["Shipped!", "Shipped!"]


def test_the_demo_proof_catches_a_double_effect(tmp_path: Path) -> None:
    """A scene that bypasses the guard and charges twice must turn the proof red."""
    import io

    from onceonly_core.cli.demo import ALICE, SCENES, Demo, Row, Scene, run_demo

    def unguarded_double_charge(demo: Demo) -> Row:
        for _ in range(2):
            demo.shop.charge_card(ALICE.id, ALICE.customer, ALICE.amount_cents)
        return Row("double charge", "charge_card", 2, "2", "0")

    out = io.StringIO()
    report = run_demo(
        f"sqlite:///{tmp_path / 'ledger.db'}",
        fast=True,
        out=out,
        plain=True,
        scenes=[*SCENES, Scene("A bug", unguarded_double_charge)],
    )
    assert not report.ok
    assert report.charges == 5  # 3 orders, A-1001 charged three times in all
    assert "✗ charges made: 5" in out.getvalue()
    assert re.search(r"^double charge .* 2 charges\s*$", out.getvalue(), re.M)
    assert "a side effect ran more than once" in out.getvalue()
