"""``onceonly demo`` as a user runs it: the installed command, in an empty directory.

It must finish offline with status 0, say that each effect happened once, and leave a
ledger (``./onceonly.db``) that ``onceonly show`` and ``onceonly stats`` then read.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("typer")
pytest.importorskip("rich")

ROOT = Path(__file__).resolve().parents[2]


def onceonly(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the ``onceonly`` console script (or ``python -m onceonly_core.cli`` without it)."""
    script = Path(sys.executable).with_name("onceonly")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "onceonly_core.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCEONLY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def run_demo(cwd: Path) -> str:
    proc = onceonly("demo", "--fast", cwd=cwd)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "charges made: 3 (one per order: A-1001, B-2002, C-3003)" in out
    assert "emails sent: 1 (one receipt)" in out
    assert "nothing ran twice: every effect happened exactly once" in out
    match = re.search(r"namespace: (demo/\S+)", out)
    assert match, out
    return match.group(1)


def show_json(*args: str, cwd: Path) -> Any:
    proc = onceonly("show", "--json", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_demo_then_show_reads_the_ledger_it_left(tmp_path: Path) -> None:
    ns = run_demo(tmp_path)
    assert (tmp_path / "onceonly.db").exists()  # the embedded default, in the working dir

    rows = show_json("--namespace", ns, cwd=tmp_path)
    tools = sorted(r["tool"] for r in rows)
    assert tools == ["shop.charge_card"] * 3 + ["shop.send_receipt"]
    assert {(r["state"], r["executions"]) for r in rows} == {("succeeded", 1)}
    assert all("result" not in r for r in rows)  # results stay hidden by default
    receipt = next(r for r in rows if r["tool"] == "shop.send_receipt")
    assert receipt["attempt"] == 2 and receipt["token"] == 2  # taken over after the crash
    assert receipt["run_id"] == "scene-3"

    # The human view and the stats read the same ledger.
    table = onceonly("show", "--namespace", ns, cwd=tmp_path)
    assert table.returncode == 0 and "shop.send_receipt" in table.stdout
    stats = onceonly("stats", "--namespace", ns, "--json", cwd=tmp_path)
    groups = {g["tool"]: g for g in json.loads(stats.stdout)["groups"]}
    assert groups["shop.charge_card"]["executions"] == 3
    assert groups["shop.charge_card"]["takeovers"] == 1  # the declined card's retry
    assert groups["shop.send_receipt"]["takeovers"] == 1  # the crashed worker's claim

    # Running it again starts a new story in a new namespace of the same ledger.
    ns2 = run_demo(tmp_path)
    assert ns2 != ns
    every = show_json("--namespace", "demo", "--limit", "100", cwd=tmp_path)
    assert {r["namespace"] for r in every} == {ns, ns2}
    assert len(every) == 8


def _demo_on(url: str) -> None:
    import io

    from onceonly_core.demo import run_demo

    out = io.StringIO()
    report = run_demo(url, fast=True, out=out, plain=True)
    assert report.ok, out.getvalue()
    assert (report.charges, report.charge_calls, report.emails, report.send_calls) == (3, 9, 1, 2)


@pytest.mark.slow
def test_demo_on_postgresql(pg_url: str) -> None:
    _demo_on(pg_url)


@pytest.mark.slow
def test_demo_on_mariadb(mysql_url: str) -> None:
    _demo_on(mysql_url)
