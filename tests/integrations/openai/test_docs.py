"""Every ```python block of docs/integrations/openai.md runs as written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from _docblocks import ROOT, blocks, run_block

BLOCKS = blocks(ROOT / "docs" / "integrations" / "openai.md") + [
    # README blocks for this framework (the core session skips them: no framework there)
    (name, code)
    for name, code in blocks(ROOT / "README.md")
    if code.startswith("# requires: openai\n")
]


def test_the_page_has_examples() -> None:
    assert BLOCKS


@pytest.mark.parametrize(("name", "code"), BLOCKS, ids=[n for n, _ in BLOCKS])
def test_block_runs(name: str, code: str, tmp_path: Path) -> None:
    run_block(name, code, tmp_path)


@pytest.mark.timeout(600)
def test_the_page_and_examples_type_check_under_mypy_strict(tmp_path: Path) -> None:
    # The documented usage is what users copy: it must type-check with the SDK's types
    # (the dispatcher once returned list[dict], which gave 6 errors in these very blocks).
    pytest.importorskip("mypy", reason="mypy is in the typecheck dependency group")
    import subprocess
    import sys

    page = blocks(ROOT / "docs" / "integrations" / "openai.md")
    files = []
    for i, (_, code) in enumerate(page):
        path = tmp_path / f"openai_block_{i}.py"
        path.write_text(code)
        files.append(str(path))
    files += sorted(str(p) for p in (ROOT / "examples").glob("openai_*.py"))  # examples too
    out = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
            "--config-file", str(ROOT / "pyproject.toml"),
            "--cache-dir", str(ROOT / ".mypy_cache"), *files,
        ],
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT / "integrations")},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
