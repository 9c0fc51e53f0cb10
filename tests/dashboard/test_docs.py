"""Every ```python block of docs/dashboard.md runs as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from _docblocks import ROOT, blocks, run_block

BLOCKS = blocks(ROOT / "docs" / "dashboard.md")


@pytest.mark.parametrize(("name", "code"), BLOCKS, ids=[n for n, _ in BLOCKS])
def test_doc_block_runs(name: str, code: str, tmp_path: Path) -> None:
    run_block(name, code, tmp_path)
