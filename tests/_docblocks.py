"""Run the ```python blocks of a Markdown file, each as written, in a fresh directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def blocks(path: Path) -> list[tuple[str, str]]:
    found = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    return [(f"{path.relative_to(ROOT)}#{i}", code) for i, code in enumerate(found)]


def run_block(name: str, code: str, cwd: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "ONCEONLY_QUIET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "integrations")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
