"""Every ```python block of docs/integrations/llamaindex.md runs as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _docblocks import ROOT, blocks, run_block

BLOCKS = blocks(ROOT / "docs" / "integrations" / "llamaindex.md") + [
    # README blocks for this framework (the core session skips them: no framework there)
    (name, code)
    for name, code in blocks(ROOT / "README.md")
    if code.startswith("# requires: llama_index.core\n")
]


def test_the_page_has_examples() -> None:
    assert BLOCKS


@pytest.mark.parametrize(("name", "code"), BLOCKS, ids=[n for n, _ in BLOCKS])
def test_block_runs(name: str, code: str, tmp_path: Path) -> None:
    run_block(name, code, tmp_path)


def test_the_page_type_checks_under_mypy_strict(tmp_path: Path) -> None:
    # The documented usage is what users copy: it must type-check with LlamaIndex's own
    # types (FunctionAgent(tools=guard_tools(...)), .code on what a guarded tool returns).
    pytest.importorskip("mypy", reason="mypy is in the typecheck dependency group")
    page = blocks(ROOT / "docs" / "integrations" / "llamaindex.md")
    files = []
    for i, (_, code) in enumerate(page):
        path = tmp_path / f"llamaindex_block_{i}.py"
        path.write_text(code)
        files.append(str(path))
    out = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
            "--config-file", str(ROOT / "pyproject.toml"),
            "--cache-dir", str(tmp_path / ".mypy_cache"), *files,
        ],
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT / "integrations")},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
