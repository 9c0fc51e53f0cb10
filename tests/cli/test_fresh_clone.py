"""A new user's first minutes, for real: a copy of the checkout (what ``git clone`` gives),
a new virtual environment, the README's install-and-demo line exactly as written, then
``onceonly doctor`` must be all green.

The line is read from the README, so the README cannot drift from what works. Slow (a
pip install into an empty environment; pip's cache makes it about a minute): it runs in
CI's ``tests`` session, and locally ``-m "not fresh_clone"`` leaves it out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _bash_lines(text: str) -> list[str]:
    lines = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        lines += [line.strip() for line in block.splitlines() if line.strip()]
    return lines


def readme_command(pattern: str) -> str:
    """The one command line of the README's bash blocks that matches ``pattern``."""
    found = [
        line for line in _bash_lines(README.read_text(encoding="utf-8")) if re.search(pattern, line)
    ]
    assert len(found) == 1, f"expected one README command matching {pattern!r}, found {found}"
    return found[0]


def test_the_readme_shows_install_demo_and_tests_on_its_first_screen() -> None:
    text = README.read_text(encoding="utf-8")
    first_screen = text[: text.index("## Thirty seconds")]
    install = readme_command(r"pip install .*&& onceonly demo")
    tests = readme_command(r"pip install -q nox && python -m nox$")
    assert install in first_screen and tests in first_screen
    assert "3.10" in first_screen and "3.13" in first_screen  # supported Pythons
    assert "git+" in first_screen  # the git-URL form
    assert re.search(r"\d+ minutes", first_screen) and re.search(r"\d(\.\d)? GB", first_screen)
    # CI runs the README's test command: keep the two in step.
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def _checkout_copy(dest: Path) -> None:
    """The files a fresh clone has: tracked and new files, nothing .gitignore excludes."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        for name in filter(None, listed.split("\0")):
            src = ROOT / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:
        shutil.copytree(
            ROOT,
            dest,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".nox", ".venv", "__pycache__", "*.db*", "site"),
        )


@pytest.mark.fresh_clone
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fresh_clone_install_demo_then_doctor_is_all_green(tmp_path: Path) -> None:
    checkout = tmp_path / "onceonly-core"
    checkout.mkdir()
    _checkout_copy(checkout)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bindir = venv / "bin"
    # The user's shell: the new environment first on PATH, nothing of this test run's
    # own environment (no PYTHONPATH into the source tree, no ledger URL).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ONCEONLY_", "PYTHON", "VIRTUAL_ENV", "NOX", "PYTEST"))
    }
    env.update(
        PATH=os.pathsep.join([str(bindir), env.get("PATH", "/usr/bin:/bin")]),
        VIRTUAL_ENV=str(venv),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    line = readme_command(r"pip install .*&& onceonly demo")
    proc = subprocess.run(
        ["bash", "-c", line], cwd=checkout, env=env, capture_output=True, text=True, timeout=800
    )
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "nothing ran twice: every effect happened exactly once" in proc.stdout
    # The install is the checkout's, not this test run's package.
    where = subprocess.run(
        [str(bindir / "python"), "-c", "import onceonly_core; print(onceonly_core.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    doctor = subprocess.run(
        ["bash", "-c", "onceonly doctor --json"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    report = json.loads(doctor.stdout)
    not_green = [c for c in report["checks"] if c["status"] not in ("ok", "off")]
    assert report["ok"] and not not_green, not_green
    names = {c["name"] for c in report["checks"]}
    assert {"python", "ledger URL", "database", "migrations", "clock", "extra cli"} <= names
    people = subprocess.run(
        ["bash", "-c", "onceonly doctor"], cwd=checkout, env=env, capture_output=True, text=True
    )
    assert "all green" in people.stdout, people.stdout
