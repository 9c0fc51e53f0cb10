"""``onceonly demo`` as a user runs it: the installed command, in an empty directory.

It must finish offline with status 0, say that each effect happened once, and leave a
ledger (``./onceonly.db``) that ``onceonly show`` and ``onceonly stats`` then read. Its
governance scenes (a blocked tool, a budget stop, the kill switch, an approval) must say
what happened, and the ledger's audit log, approvals and timelines must agree.
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
    for claim in GOVERNANCE_CLAIMS:
        assert claim in out, claim
    match = re.search(r"namespace: (demo/\S+)", out)
    assert match, out
    return match.group(1)


GOVERNANCE_CLAIMS = (
    "delete_customer blocked → tool_blocked; nothing was deleted",
    "buy_label P-3 blocked → daily_spend_exceeded: $18.00 spent today",
    "send_sms B-2002 blocked → agent_disabled (texting customers at 3 a.m.)",
    "refund C-3003 pending_approval → request apr_",
    "the request is now 'consumed': approved once, used once",
    "blocked by policy: 0 customers deleted",
    "budget held: 2 labels bought, $18.00 spent of the $20.00 daily cap",
    "kill switch: the call made while disabled did not run; after enable it ran once",
    "approval: 1 refund for 5 asks",
    "audit log: 11 decisions of shop-agent, hash chain verified",
)


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
    assert tools == sorted(
        ["shop.charge_card"] * 3
        + ["shop.send_receipt", "shop.buy_label", "shop.buy_label", "shop.send_sms"]
        + ["shop.refund"]  # blocked and waiting calls claim nothing: no record
    )
    assert {(r["state"], r["executions"]) for r in rows} == {("succeeded", 1)}
    assert all("result" not in r for r in rows)  # results stay hidden by default
    receipt = next(r for r in rows if r["tool"] == "shop.send_receipt")
    # The governance commands read the same ledger, in the demo's namespace.
    gov = onceonly("audit", "verify", "--namespace", ns, "--json", cwd=tmp_path)
    assert gov.returncode == 0, gov.stderr
    assert (
        json.loads(gov.stdout).items()
        >= {
            "ok": True,
            "namespace": ns,
            "chains": 1,
            "broken": 0,
            "problems": [],
        }.items()
    )
    logs = onceonly("agent", "logs", "shop-agent", "--namespace", ns, "--json", cwd=tmp_path)
    assert [(e["tool"], e["decision"]) for e in json.loads(logs.stdout)][-2:] == [
        ("shop.buy_label", "executed"),
        ("shop.delete_customer", "blocked"),
    ]
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
    assert len(every) == 16


def test_demo_governance_scenes_agree_with_the_ledger(tmp_path: Path) -> None:
    """Scenes 6-9 in-process, then the claims checked in the ledger they left."""
    import io

    from onceonly_core import Guard
    from onceonly_core.cli.demo import AGENT, SCENES, run_demo

    url = f"sqlite:///{tmp_path / 'demo.db'}"
    out = io.StringIO()
    report = run_demo(url, fast=True, out=out, plain=True, scenes=SCENES[5:])
    text = out.getvalue()
    assert report.ok, text
    for claim in GOVERNANCE_CLAIMS:
        assert claim in text, claim
    assert [r.stopped for r in report.rows] == [
        "1 by policy",
        "1 budget",
        "1 disabled",
        "2 waiting",
    ]

    with Guard(url, namespace=report.namespace, quiet=True) as g:
        gov = g.gov
        rows = list(reversed(gov.agent_logs(AGENT, limit=100)))  # oldest first
        assert [(r.tool, r.decision, r.reason) for r in rows] == [
            ("shop.delete_customer", "blocked", "tool_blocked"),
            ("shop.buy_label", "executed", "ok"),
            ("shop.buy_label", "executed", "ok"),
            ("shop.buy_label", "blocked", "daily_spend_exceeded"),
            ("shop.send_sms", "blocked", "agent_disabled"),
            ("shop.send_sms", "executed", "ok"),
            ("shop.refund", "pending_approval", "approval_required"),
            ("shop.refund", "pending_approval", "approval_required"),
            ("shop.refund", "executed", "ok"),
            ("shop.refund", "dedup", "dedup"),
            ("shop.refund", "dedup", "dedup"),
        ]
        assert [r.seq for r in rows] == list(range(1, 12))
        assert gov.verify_audit() == []
        assert [r.spend_usd for r in rows if r.tool == "shop.buy_label"] == [9.0, 9.0, 0.0]
        m = gov.agent_metrics(AGENT, "day")
        assert (m.spend_usd, m.executed, m.blocked, m.dedup) == (18.0, 4, 3, 2)
        [approval] = gov.list_approvals(None)
        assert (approval.state, approval.decided_by, approval.tool) == (
            "consumed",
            "operator",
            "shop.refund",
        )
        assert gov.agent_status(AGENT)["disabled"] is False  # the kill switch was lifted
        policy = gov.get_policy(AGENT)
        assert policy is not None and policy.template == "moderate"
        assert policy.max_spend_usd_per_day == 20.0
        # Each scene is an agent run with its own timeline.
        budget = [e.type for e in gov.get_run_timeline("scene-2")]
        assert budget == ["tool_call", "tool_result"] * 2 + ["tool_call", "blocked"]
        kill = [(e.type, e.status) for e in gov.get_run_timeline("scene-3")]
        assert kill[1] == ("blocked", "blocked") and kill[-1] == ("tool_result", "executed")
        # The world never saw a deletion; it saw 2 labels, 1 text and 1 refund.
        ledger = g.store.list(namespace=report.namespace, limit=100)
        assert sorted(r.tool for r in ledger) == [
            "shop.buy_label",
            "shop.buy_label",
            "shop.refund",
            "shop.send_sms",
        ]
        assert {r.executions for r in ledger} == {1}


def _demo_on(url: str) -> None:
    import io

    from onceonly_core.cli.demo import run_demo
    from onceonly_core.stores.sql import SQLStore

    store = SQLStore(url)  # the demo never migrates a server database: its operator does
    try:
        store.migrate()
    finally:
        store.close()
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
