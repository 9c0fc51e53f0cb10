"""The extra, the import guard, the core's independence, and the runnable examples."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples").glob("llamaindex_*.py"))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCEONLY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "integrations")])
    return env


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


HIDE_LLAMA_INDEX = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "llama_index" or name.startswith("llama_index."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hide())
"""


def test_missing_extra_names_the_pip_command() -> None:
    proc = _python(
        HIDE_LLAMA_INDEX
        + """
from onceonly_core.errors import MissingExtraError
try:
    import onceonly_llamaindex
except MissingExtraError as err:
    assert isinstance(err, ImportError)
    print(err)
else:
    raise SystemExit("imported without llama_index")
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert 'pip install "onceonly-core[llamaindex]"' in proc.stdout
    assert "llama-index-core" in proc.stdout


def test_the_core_imports_no_llama_index() -> None:
    proc = _python(
        """
import sys
import onceonly_core
from onceonly_core import Guard
Guard("memory://", quiet=True)(len, "abc")
leaked = sorted(m for m in sys.modules if m.startswith(("llama_index", "workflows")))
assert not leaked, leaked
"""
    )
    assert proc.returncode == 0, proc.stderr


def test_exports() -> None:
    import onceonly_llamaindex

    # Ordered as ruff's RUF022 wants (constants, classes, functions); here: no repeats.
    assert len(set(onceonly_llamaindex.__all__)) == len(onceonly_llamaindex.__all__)
    for name in onceonly_llamaindex.__all__:
        assert getattr(onceonly_llamaindex, name) is not None


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_asserts_its_claims(example: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(example)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "charged" in proc.stdout


def test_there_are_two_examples() -> None:
    assert {p.name for p in EXAMPLES} == {
        "llamaindex_payment_agent.py",
        "llamaindex_tool_spec.py",
    }
