"""docs/custom-store.md as a user follows it: its store, saved as ``dictstore.py``, runs its
own example, and its test module runs the conformance kit against it in a fresh pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _docblocks import ROOT, blocks

DOC = ROOT / "docs" / "custom-store.md"


@pytest.mark.timeout(240)
def test_the_documented_store_passes_the_kit(tmp_path: Path) -> None:
    (_, store), (_, tests), *_ = blocks(DOC)
    (tmp_path / "dictstore.py").write_text(store)
    (tmp_path / "test_dictstore.py").write_text(tests)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }
    example = subprocess.run(
        [sys.executable, "dictstore.py"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert example.returncode == 0, example.stderr
    kit = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_dictstore.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    summary = kit.stdout.strip().splitlines()[-1] if kit.stdout.strip() else ""
    assert kit.returncode == 0, kit.stdout[-3000:] + kit.stderr[-2000:]
    # Every test ran but the cross-process race (no store_factory for a one-process store)
    # and the optional purge_expired (the documented store leaves it out).
    assert " passed" in summary and "2 skipped" in summary and "failed" not in summary, summary


def test_the_kit_names_pytest_when_it_is_missing() -> None:
    """``import onceonly_core`` never imports pytest; using the kit without it says why."""
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "import onceonly_core, onceonly_core.testing as t\n"
        "try:\n    t.StoreContract\nexcept ImportError as e:\n    print(e)\n"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "StoreContract is a pytest class: pip install pytest" in out.stdout
