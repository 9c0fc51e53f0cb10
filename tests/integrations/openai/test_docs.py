"""Every ```python block of docs/integrations/openai.md runs as written."""

from __future__ import annotations

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
