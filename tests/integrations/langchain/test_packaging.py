"""The extra is required and says so; the examples run offline and check themselves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "integrations")])}

HIDE = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {hidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Hide())
try:
    import onceonly_langchain
except ImportError as err:
    from onceonly_core.errors import MissingExtraError
    assert isinstance(err, MissingExtraError), type(err)
    print(err)
else:
    raise SystemExit("imported without the framework")
"""


@pytest.mark.parametrize("hidden", [("langchain_core",), ("langgraph",), ("langchain",)])
def test_importing_without_the_extra_names_the_pip_command(hidden: tuple[str, ...]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", HIDE.format(hidden=set(hidden))],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert 'pip install "onceonly-core[langchain]"' in out.stdout


def test_the_core_imports_no_langchain() -> None:
    code = (
        "import sys, onceonly_core, onceonly_core.guard;"
        "fw = ('langchain', 'langchain_core', 'langgraph');"
        "bad = [m for m in sys.modules if m.split('.')[0] in fw];"
        "assert not bad, bad"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "example", sorted(p.name for p in (ROOT / "examples").glob("langchain_*.py"))
)
def test_example_runs_offline(example: str) -> None:
    out = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "examples" / example)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_adapter_forges_no_signatures() -> None:
    """Calls are keyed by tool name and validated arguments (Guard.run_call): no runner with
    a made-up ``__signature__`` stands in for the tool."""
    package = ROOT / "integrations" / "onceonly_langchain"
    assert not [p.name for p in package.glob("*.py") if "__signature__ =" in p.read_text()]
