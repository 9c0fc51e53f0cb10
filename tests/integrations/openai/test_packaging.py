"""The extra's contract: a clear error without the SDK, no OpenAI in the core, and the
examples run offline and check their own claims."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "integrations")]),
    "OPENAI_AGENTS_DISABLE_TRACING": "1",
}

HIDE = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name == {mod!r} or name.startswith({mod!r} + "."):
            raise ImportError("hidden: " + name)
sys.meta_path.insert(0, Hide())
"""


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("hidden", "module"), [("openai", "onceonly_openai"), ("agents", "onceonly_openai.agents")]
)
def test_missing_extra_names_the_pip_command(hidden: str, module: str) -> None:
    code = (
        HIDE.format(mod=hidden)
        + f"""
from onceonly_core.errors import MissingExtraError
try:
    import {module}
except MissingExtraError as err:
    assert isinstance(err, ImportError)
    print(err)
else:
    raise SystemExit("imported without the framework")
"""
    )
    out = python(code)
    assert out.returncode == 0, out.stderr
    assert 'pip install "onceonly-core[openai]"' in out.stdout


def test_core_and_dispatcher_import_no_agents_sdk_and_core_no_openai() -> None:
    out = python(
        "import sys, onceonly_core; from onceonly_core import Guard; Guard('memory://').check();"
        "assert 'openai' not in sys.modules, 'core imported openai';"
        "import onceonly_openai; assert 'agents' not in sys.modules, 'agents imported eagerly';"
        "onceonly_openai.guard_function_tool; assert 'agents' in sys.modules"
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "example",
    ["openai_chat_crash_retry.py", "openai_responses_retry.py", "openai_agents_sdk.py"],
)
def test_example_runs(example: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "once" in out.stdout
