"""Every ```python block in README.md and docs/*.md runs as written, in a fresh directory.

A block that needs a server or an extra says so with a first line ``# requires: <module>``
and is skipped when that module is missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# docs/custom-store.md is a walk-through over several files (a store module, then its test
# module); tests/core/test_custom_store_doc.py saves and runs them as a user would.
OWN_TEST = {"custom-store.md"}
DOCS = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in OWN_TEST),
]


def _blocks() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S)):
            out.append((f"{path.relative_to(ROOT)}#{i}", block))
    return out


BLOCKS = _blocks()


def test_readme_has_examples() -> None:
    assert any(name.startswith("README.md") for name, _ in BLOCKS)


@pytest.mark.parametrize(("name", "code"), BLOCKS, ids=[n for n, _ in BLOCKS])
def test_block_runs(name: str, code: str, tmp_path: Path) -> None:
    first = code.splitlines()[0] if code else ""
    if first.startswith("# requires:"):
        pytest.importorskip(first.split(":", 1)[1].strip())
    env = {"PATH": "/usr/bin:/bin", "ONCEONLY_QUIET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
