"""The governance commands of ``onceonly``: policy, agent, tools, approvals, audit,
timeline.

They run in-process through typer's CliRunner on a SQLite ledger in ``tmp_path`` (one real
``python -m onceonly_core.cli`` process too), and every ``--json`` output is checked against
what the Python API (``guard.gov``) sees in the same ledger. Secrets (a tool's signing
secret, API keys in call arguments) must never appear in any output.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("typer")
pytest.importorskip("rich")

from typer.testing import CliRunner, Result

from onceonly_core import Guard
from onceonly_core.cli import build_app
from onceonly_core.governance import TEMPLATES, Policy

ROOT = Path(__file__).resolve().parents[2]
TOOL_SECRET = "whsec_TOPSECRET_9f8e7d6c5b4a"
ARG_SECRET = "sk_live_51HxARGSECRETabcdefghijklmnop"
AGENT = "bot-1"

app = build_app()
runner = CliRunner()
CLEAN_ENV: dict[str, str | None] = {
    "ONCEONLY_DB_URL": None,
    "ONCEONLY_NAMESPACE": None,
    "COLUMNS": "250",
}


@dataclass
class Env:
    url: str
    ns: str
    path: Path
    guard: Guard
    outputs: list[str]

    def run(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> Result:
        result = runner.invoke(
            app,
            [*args, "--url", self.url, "--namespace", self.ns],
            input=input,
            env={**CLEAN_ENV, **(env or {})},
        )
        self.outputs.append(result.output)
        assert "Traceback" not in result.output
        return result

    def json(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
        result = self.run(*args, "--json", input=input, env=env)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def fails(self, *args: str, input: str | None = None) -> str:
        result = self.run(*args, input=input)
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit), repr(result.exception)
        return result.output

    @property
    def gov(self) -> Any:
        return self.guard.gov


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    ns = f"t-{uuid.uuid4().hex[:6]}"
    guard = Guard(url, namespace=ns, quiet=True)
    e = Env(url, ns, path, guard, [])
    yield e
    guard.close()
    for out in e.outputs:  # no command ever printed a secret
        assert TOOL_SECRET not in out
        assert ARG_SECRET not in out


def charge(customer: str, api_key: str, cents: int) -> dict[str, Any]:
    return {"customer": customer, "cents": cents}


def delete_user(user: str) -> str:
    raise AssertionError("a blocked tool never runs")


def refund(order: str) -> dict[str, str]:
    return {"refunded": order}


def run_some_calls(e: Env, run_id: str = "run-1") -> None:
    """A policy, then calls that execute, dedup, get blocked and wait for approval."""
    e.gov.upsert_policy(
        {
            "agent_id": AGENT,
            "blocked_tools": ["delete_*"],
            "require_approval": ["refund"],
            "max_spend_usd_per_day": 10.0,
        }
    )
    g = e.guard
    for cents in (100, 200):
        r = g.call_tool(
            charge,
            {"customer": "cus_1", "api_key": ARG_SECRET, "cents": cents},
            tool="shop.charge",
            agent_id=AGENT,
            spend_usd=4.0,
            run_id=run_id,
        )
        assert r.decision == "executed"
    args = {"customer": "cus_1", "api_key": ARG_SECRET, "cents": 100}
    assert g.call_tool(charge, args, tool="shop.charge", agent_id=AGENT).decision == "dedup"
    r = g.call_tool(
        charge,
        {"customer": "cus_1", "api_key": ARG_SECRET, "cents": 300},
        tool="shop.charge",
        agent_id=AGENT,
        spend_usd=4.0,
        run_id=run_id,
    )
    assert (r.decision, r.policy_reason) == ("blocked", "daily_spend_exceeded")
    r = g.call_tool(delete_user, {"user": "u1"}, tool="delete_user", agent_id=AGENT, run_id=run_id)
    assert r.policy_reason == "tool_blocked"


# -- policy ------------------------------------------------------------------------------
def test_policy_set_from_flags_get_and_list(env: Env) -> None:
    got = env.json(
        "policy",
        "set",
        AGENT,
        "--set",
        "max_spend_usd_per_day=50",
        "--set",
        'blocked_tools=["delete_*"]',
        "--set",
        "pricing_rules.shop.charge=0.25",
        "--set",
        "default_risk=high",
    )
    assert got["max_spend_usd_per_day"] == 50.0
    assert got["blocked_tools"] == ["delete_*"]
    assert got["pricing_rules"] == {"shop.charge": 0.25}
    api = env.gov.get_policy(AGENT)
    assert api is not None and got == api.model_dump(mode="json")

    # --set alone changes the current policy field by field; null removes.
    env.json("policy", "set", AGENT, "--set", "max_actions_per_hour=5")
    env.json("policy", "set", AGENT, "--set", "pricing_rules.shop.charge=null")
    api = env.gov.get_policy(AGENT)
    assert api.max_actions_per_hour == 5 and api.max_spend_usd_per_day == 50.0
    assert api.pricing_rules == {}

    assert env.json("policy", "get", AGENT) == api.model_dump(mode="json")
    listed = env.json("policy", "list")
    assert listed == [p.model_dump(mode="json") for p in env.gov.list_policies()]
    assert [p["agent_id"] for p in listed] == [AGENT]
    table = env.run("policy", "list")
    assert table.exit_code == 0 and AGENT in table.stdout and "$50.00" in table.stdout
    shown = env.run("policy", "get", AGENT)
    assert shown.exit_code == 0 and "max_actions_per_hour" in shown.stdout


def test_policy_set_from_a_template_with_overrides(env: Env) -> None:
    got = env.json(
        "policy",
        "set",
        AGENT,
        "--template",
        "support_bot",
        "--set",
        "max_spend_usd_per_day=5",
        "--set",
        "max_calls_per_tool.send_email=3",
    )
    expected = env.gov.get_policy(AGENT).model_dump(mode="json")
    assert got == expected
    assert got["template"] == "support_bot"
    assert got["max_spend_usd_per_day"] == 5.0
    # A table override changes one entry and keeps the template's others.
    assert got["max_calls_per_tool"] == {"send_email": 3, "refund*": 5}
    assert got["require_approval"] == TEMPLATES["support_bot"]["require_approval"]


def test_policy_set_from_a_file_and_stdin(env: Env, tmp_path: Path) -> None:
    f = tmp_path / "policy.json"
    f.write_text(json.dumps({"allowed_tools": ["get_*"], "max_actions_per_hour": 7}))
    got = env.json("policy", "set", AGENT, "--file", str(f), "--set", "max_actions_per_hour=8")
    assert got["allowed_tools"] == ["get_*"] and got["max_actions_per_hour"] == 8
    assert env.gov.get_policy(AGENT).model_dump(mode="json") == got
    # A file replaces the whole policy.
    got = env.json("policy", "set", AGENT, "--file", "-", input='{"blocked_tools": "drop_*"}')
    assert got["allowed_tools"] is None and got["blocked_tools"] == ["drop_*"]
    assert env.gov.get_policy(AGENT) == Policy(agent_id=AGENT, blocked_tools=["drop_*"])


def test_policy_errors_are_one_clear_message(env: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"max_actions_per_hour": 5,,}')
    out = env.fails("policy", "set", AGENT, "--file", str(bad))
    assert "not valid JSON" in out and "line 1" in out
    out = env.fails("policy", "set", AGENT, "--file", str(tmp_path / "missing.json"))
    assert "cannot read" in out
    bad.write_text("[1, 2]")
    assert "JSON object" in env.fails("policy", "set", AGENT, "--file", str(bad))
    bad.write_text('{"agent_id": "other"}')
    assert "'other', not 'bot-1'" in env.fails("policy", "set", AGENT, "--file", str(bad))
    out = env.fails("policy", "set", AGENT, "--template", "nope")
    assert "unknown policy template 'nope'" in out and "strict" in out
    out = env.fails("policy", "set", AGENT, "--set", "max_spend=5")
    assert "unknown policy field 'max_spend'" in out and "max_spend_usd_per_day" in out
    out = env.fails("policy", "set", AGENT, "--set", "max_actions_per_hour=-1")
    assert "max_actions_per_hour" in out and "greater than or equal to 0" in out
    assert "key=value" in env.fails("policy", "set", AGENT, "--set", "oops")
    assert "nothing to set" in env.fails("policy", "set", AGENT)
    out = env.fails("policy", "set", AGENT, "--file", str(bad), "--template", "strict")
    assert "exclusive" in out
    assert "no policy for agent 'ghost'" in env.fails("policy", "get", "ghost")
    assert "no policy for agent 'ghost'" in env.fails("policy", "rm", "ghost")
    assert env.gov.get_policy(AGENT) is None  # nothing was written by a failed command


def test_policy_rm(env: Env) -> None:
    env.gov.policy_from_template(AGENT, "strict")
    assert env.json("policy", "rm", AGENT)["deleted"] is True
    assert env.gov.get_policy(AGENT) is None
    assert env.json("policy", "list") == []


def test_policy_templates(env: Env) -> None:
    every = env.json("policy", "template")
    assert (
        sorted(every)
        == sorted(TEMPLATES)
        == [
            "moderate",
            "permissive",
            "read_only",
            "strict",
            "support_bot",
        ]
    )
    assert every["strict"] == TEMPLATES["strict"]
    assert env.json("policy", "template", "read_only") == TEMPLATES["read_only"]
    table = env.run("policy", "template")
    assert table.exit_code == 0 and "support_bot" in table.stdout
    assert "unknown policy template" in env.fails("policy", "template", "nope")


# -- agent -------------------------------------------------------------------------------
def test_kill_switch_from_the_cli_stops_the_next_call(env: Env) -> None:
    g = env.guard
    ran: list[str] = []

    def ping(n: int) -> int:
        ran.append(str(n))
        return n

    got = env.json("agent", "disable", AGENT, "--reason", "went rogue")
    assert got == {**env.gov.agent_status(AGENT), "namespace": env.ns}
    assert got["disabled"] is True and got["reason"] == "went rogue"
    r = g.call_tool(ping, {"n": 1}, tool="ping", agent_id=AGENT)
    assert (r.decision, r.policy_reason, ran) == ("blocked", "agent_disabled", [])
    status = env.json("agent", "status", AGENT)
    assert status["disabled"] and not status["global_disabled"]
    assert "disabled" in env.run("agent", "status", AGENT).stdout

    assert env.json("agent", "enable", AGENT)["disabled"] is False
    assert g.call_tool(ping, {"n": 1}, tool="ping", agent_id=AGENT).decision == "executed"
    assert ran == ["1"]

    # The global switch stops every agent, including ones never seen before.
    got = env.json("agent", "disable", "--all", "--reason", "incident 42")
    assert got["global_disabled"] is True
    assert env.gov.agent_status("someone-new")["disabled"] is True
    r = g.call_tool(ping, {"n": 2}, tool="ping", agent_id="other")
    assert r.policy_reason == "agent_disabled"
    enabled = env.run("agent", "enable", AGENT)
    assert enabled.exit_code == 0 and "global switch is still on" in enabled.output
    assert env.json("agent", "enable", "--all")["global_disabled"] is False
    assert g.call_tool(ping, {"n": 2}, tool="ping", agent_id="other").decision == "executed"


def test_agent_argument_errors(env: Env) -> None:
    env.gov.upsert_policy({"agent_id": "someone"})  # the ledger exists, "ghost" does not
    assert "not both" in env.fails("agent", "disable", AGENT, "--all")
    assert "which agent" in env.fails("agent", "enable")
    assert "--all" in env.fails("agent", "disable", "*")
    for command in ("status", "logs", "metrics"):
        out = env.fails("agent", command, "ghost")
        assert "no agent 'ghost'" in out, command


def test_agent_logs_and_metrics_match_the_api(env: Env) -> None:
    run_some_calls(env)
    logs = env.json("agent", "logs", AGENT)
    assert logs == [a.model_dump(mode="json") for a in env.gov.agent_logs(AGENT, limit=50)]
    assert [row["decision"] for row in logs] == [
        "blocked",
        "blocked",
        "dedup",
        "executed",
        "executed",
    ]
    assert [row["reason"] for row in logs[:2]] == ["tool_blocked", "daily_spend_exceeded"]
    assert env.json("agent", "logs", AGENT, "--limit", "2") == logs[:2]
    table = env.run("agent", "logs", AGENT)
    assert table.exit_code == 0 and "daily_spend_exceeded" in table.stdout

    for period in ("hour", "day", "week"):
        m = env.json("agent", "metrics", AGENT, "--period", period)
        api = env.gov.agent_metrics(AGENT, period).model_dump(mode="json")
        assert {k: v for k, v in m.items() if k != "since"} == {
            k: v for k, v in api.items() if k != "since"
        }
        assert (m["total_actions"], m["executed"], m["blocked"], m["dedup"]) == (5, 2, 2, 1)
        assert m["spend_usd"] == 8.0 and m["top_tools"] == [["shop.charge", 2]]
    assert "$8.00" in env.run("agent", "metrics", AGENT).stdout
    assert env.run("agent", "metrics", AGENT, "--period", "year").exit_code == 2


# -- tools -------------------------------------------------------------------------------
@pytest.mark.usefixtures("allow_loopback")  # one endpoint is http://127.0.0.1:9
def test_tools_add_list_toggle_rm(env: Env) -> None:
    secret_env = {"MY_TOOL_SECRET": TOOL_SECRET}
    got = env.json(
        "tools",
        "add",
        "crm.lookup",
        "--endpoint",
        "https://tools.example.com/crm",
        "--secret-env",
        "MY_TOOL_SECRET",
        "--timeout-ms",
        "2500",
        "--max-retries",
        "1",
        env=secret_env,
    )
    assert got["auth"] == "hmac_sha256" and got["has_secret"] is True
    assert "secret" not in got
    spec = env.gov.get_tool("crm.lookup")
    assert spec is not None and got == spec.model_dump(mode="json")
    assert (spec.timeout_ms, spec.max_retries, spec.url) == (
        2500,
        1,
        "https://tools.example.com/crm",
    )
    # The secret is stored (the engine signs with it), never shown.
    rows = env.gov.store.get_tools(env.ns, "crm.lookup")
    assert rows[0]["secret"] == TOOL_SECRET

    got = env.json(
        "tools",
        "add",
        "crm.lookup",
        "--endpoint",
        "http://127.0.0.1:9/crm",
        "--scope",
        f"agent:{AGENT}",
        "--auth",
        "hmac_sha256",
        "--secret-stdin",
        input=TOOL_SECRET + "\n",
    )
    assert got["scope_id"] == f"agent:{AGENT}" and got["has_secret"] is True

    listed = env.json("tools", "list")
    assert listed == [t.model_dump(mode="json") for t in env.gov.list_tools()]
    assert sorted((t["name"], t["scope_id"]) for t in listed) == [
        ("crm.lookup", f"agent:{AGENT}"),
        ("crm.lookup", "global"),
    ]
    table = env.run("tools", "list")
    assert table.exit_code == 0 and "crm.lookup" in table.stdout and "set" in table.stdout

    off = env.json("tools", "toggle", "crm.lookup", "--off")
    assert off["enabled"] is False and env.gov.get_tool("crm.lookup", "global").enabled is False
    # Off in the global scope: agents without their own registration are blocked.
    assert env.gov.check("bot-x", "crm.lookup")["reason"] == "tool_disabled"
    assert env.json("tools", "toggle", "crm.lookup", "--on")["enabled"] is True
    assert env.gov.get_tool("crm.lookup", "global").enabled is True

    gone = env.json("tools", "rm", "crm.lookup", "--scope", f"agent:{AGENT}")
    assert gone["deleted"] is True
    assert env.gov.get_tool("crm.lookup", f"agent:{AGENT}") is None
    assert env.gov.get_tool("crm.lookup", "global") is not None


def test_tools_errors(env: Env) -> None:
    base = ("tools", "add", "crm.lookup", "--endpoint", "https://x.example/t")
    assert "needs a secret" in env.fails(*base, "--auth", "hmac_sha256")
    assert "MISSING_VAR is not set" in env.fails(*base, "--secret-env", "MISSING_VAR")
    assert "stdin gave no secret" in env.fails(*base, "--secret-stdin", input="\n")
    assert "url must be http(s)" in env.fails(
        "tools", "add", "crm.lookup", "--endpoint", "ftp://x.example/t"
    )
    out = env.fails("tools", "add", "bad name!", "--endpoint", "https://x.example/t")
    assert "tool name must match" in out
    out = env.fails(*base, "--scope", "team:1")
    assert "scope_id must be 'global' or 'agent:<id>'" in out
    assert env.json(*base)["auth"] == "none"
    assert "already registered" in env.fails(*base)
    assert env.json(*base, "--replace", "--timeout-ms", "5")["timeout_ms"] == 5
    assert "no tool 'nope'" in env.fails("tools", "toggle", "nope", "--on")
    assert "--on or --off" in env.fails("tools", "toggle", "crm.lookup")
    assert "no tool 'nope'" in env.fails("tools", "rm", "nope")
    assert "no tool 'crm.lookup' in scope agent:x" in env.fails(
        "tools", "rm", "crm.lookup", "--scope", "agent:x"
    )


def test_the_secret_prompt_hides_and_confirms(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import onceonly_core.cli.gov as gov_cli

    monkeypatch.setattr(gov_cli, "_interactive", lambda: True)
    result = env.run(
        "tools",
        "add",
        "pay.out",
        "--endpoint",
        "https://x.example/pay",
        "--auth",
        "hmac_sha256",
        input=f"{TOOL_SECRET}\n{TOOL_SECRET}\n",
    )
    assert result.exit_code == 0, result.output
    assert "Signing secret" in result.output and TOOL_SECRET not in result.output
    assert env.gov.store.get_tools(env.ns, "pay.out")[0]["secret"] == TOOL_SECRET


# -- approvals ---------------------------------------------------------------------------
def test_approvals_list_approve_runs_once(env: Env) -> None:
    env.gov.upsert_policy({"agent_id": AGENT, "require_approval": ["refund"]})
    ran: list[str] = []

    def refund(order: str) -> dict[str, str]:
        ran.append(order)
        return {"refunded": order}

    g = env.guard
    first = g.call_tool(refund, {"order": "A-1"}, tool="refund", agent_id=AGENT)
    assert first.decision == "pending_approval" and first.approval_id
    pending = env.json("approvals", "list")
    assert pending == [a.model_dump(mode="json") for a in env.gov.list_approvals("pending")]
    assert [(a["id"], a["state"], a["tool"]) for a in pending] == [
        (first.approval_id, "pending", "refund")
    ]
    table = env.run("approvals", "list")
    assert table.exit_code == 0 and first.approval_id in table.stdout

    done = env.json("approvals", "approve", first.approval_id, "--by", "alice")
    assert done["state"] == "approved" and done["decided_by"] == "alice"
    assert env.gov.get_approval(first.approval_id).state == "approved"
    decisions = [
        g.call_tool(refund, {"order": "A-1"}, tool="refund", agent_id=AGENT).decision
        for _ in range(3)
    ]
    assert decisions == ["executed", "dedup", "dedup"] and ran == ["A-1"]
    assert env.json("approvals", "list") == []
    every = env.json("approvals", "list", "--state", "all")
    assert [a["state"] for a in every] == ["consumed"]
    assert env.json("approvals", "list", "--state", "consumed") == every
    assert "already consumed" in env.fails("approvals", "deny", first.approval_id)


def test_approvals_deny_and_errors(env: Env) -> None:
    env.gov.upsert_policy({"agent_id": AGENT, "require_approval": ["refund"]})
    first = env.guard.call_tool(refund, {"order": "B-2"}, tool="refund", agent_id=AGENT)
    done = env.json("approvals", "deny", first.approval_id, "--reason", "fraud", "--by", "bob")
    assert (done["state"], done["reason"], done["decided_by"]) == ("denied", "fraud", "bob")
    again = env.guard.call_tool(refund, {"order": "B-2"}, tool="refund", agent_id=AGENT)
    assert (again.decision, again.policy_reason) == ("blocked", "approval_denied")
    assert env.json("approvals", "list", "--state", "denied")[0]["id"] == first.approval_id
    assert "already denied" in env.fails("approvals", "approve", first.approval_id)
    assert "no approval request 'apr_nope'" in env.fails("approvals", "approve", "apr_nope")
    assert "no approval request 'apr_nope'" in env.fails("approvals", "deny", "apr_nope")
    assert env.run("approvals", "list", "--state", "weird").exit_code == 2
    # The default decider is the user running the command.
    second = env.guard.call_tool(refund, {"order": "C-3"}, tool="refund", agent_id=AGENT)
    assert env.json("approvals", "approve", second.approval_id)["decided_by"]


# -- audit -------------------------------------------------------------------------------
def _audit_ids(path: Path, agent: str) -> list[tuple[int, int]]:
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT id, seq FROM onceonly_audit WHERE agent_id = ? ORDER BY seq", (agent,)
        ).fetchall()
    return [(int(i), int(s)) for i, s in rows]


def test_audit_verify_finds_the_tampered_row(env: Env) -> None:
    run_some_calls(env)
    env.guard.call_tool(charge, {"customer": "x", "api_key": "k", "cents": 1}, agent_id="bot-2")
    got = env.json("audit", "verify")
    assert got == {
        "ok": True,
        "namespace": env.ns,
        "chains": 2,
        "broken": 0,
        "executions": 3,  # governed executions in the ledger, each with its audit row
        "ungoverned": 0,
        "in_flight": 0,
        "missing": 0,
        "problems": [],
    }
    ok = env.run("audit", "verify")
    assert ok.exit_code == 0 and "2 chains verified" in ok.stdout

    rows = _audit_ids(env.path, AGENT)
    row_id, seq = rows[2]
    with sqlite3.connect(env.path) as db:  # an insider "fixes" a decision
        db.execute("UPDATE onceonly_audit SET decision = 'executed' WHERE id = ?", (row_id,))
    assert env.gov.verify_audit() != []

    result = env.run("audit", "verify", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["broken"] == 1 and report["chains"] == 2
    [problem] = report["problems"]
    assert problem == {**env.gov.verify_audit()[0]}
    assert (problem["agent_id"], problem["seq"], problem["id"]) == (AGENT, seq, row_id)
    human = env.run("audit", "verify")
    assert human.exit_code == 1
    assert f"agent {AGENT}" in human.stdout
    assert f"seq {seq}" in human.stdout and f"row id {row_id}" in human.stdout


def test_audit_verify_finds_a_deleted_row(env: Env) -> None:
    run_some_calls(env)
    rows = _audit_ids(env.path, AGENT)
    with sqlite3.connect(env.path) as db:
        db.execute("DELETE FROM onceonly_audit WHERE id = ?", (rows[1][0],))
    result = env.run("audit", "verify")
    assert result.exit_code == 1
    assert f"agent {AGENT}" in result.stdout and f"seq {rows[1][1]}" in result.stdout
    assert f"row id {rows[2][0]}" in result.stdout  # the first row whose link is broken


def test_audit_verify_every_namespace(env: Env) -> None:
    run_some_calls(env)
    with Guard(env.url, namespace="other-tenant", quiet=True) as other:
        other.call_tool(refund, {"order": "Z"}, agent_id="bot-9")
    assert env.json("audit", "verify")["chains"] == 1
    every = env.json("audit", "verify", "--all-namespaces")
    assert every["chains"] == 2 and every["ok"] and every["namespace"] is None


def test_audit_purge_keeps_verify_green(env: Env) -> None:
    run_some_calls(env)
    before = len(env.gov.agent_logs(AGENT, limit=100))
    assert "needs confirmation" in env.fails("audit", "purge", "--before", "0s")
    # An age: nothing is that old yet.
    assert env.json("audit", "purge", "--before", "30d", "--yes")["purged"] == 0
    assert env.json("audit", "purge", "--before", "2000-01-01", "--yes")["purged"] == 0
    time.sleep(0.05)
    cut = env.gov.store.now()
    time.sleep(0.05)
    for i in range(3):  # more rows after the cut
        r = env.guard.call_tool(refund, {"order": f"O-{i}"}, tool="ship", agent_id=AGENT)
        assert r.decision == "executed"
    after = len(env.gov.agent_logs(AGENT, limit=100))
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(cut)) + f".{int(cut % 1 * 1e6):06d}"
    got = env.json("audit", "purge", "--before", iso + "+00:00", "--yes")
    assert got["purged"] == before
    assert abs(got["before"] - cut) < 1e-3
    assert len(env.gov.agent_logs(AGENT, limit=100)) == after - before
    assert env.json("audit", "verify")["ok"] is True
    assert env.gov.verify_audit() == []
    # A later row is still checked after the cut: tampering with it is found.
    survivor = _audit_ids(env.path, AGENT)[0][0]
    with sqlite3.connect(env.path) as db:
        db.execute("UPDATE onceonly_audit SET decision = 'blocked' WHERE id = ?", (survivor,))
    assert f"row id {survivor}" in env.fails("audit", "verify")


def test_audit_purge_everything_and_bad_cutoffs(env: Env) -> None:
    run_some_calls(env)
    total = len(env.gov.agent_logs(AGENT, limit=100))
    time.sleep(0.02)
    assert env.json("audit", "purge", "--before", "0s", "--yes")["purged"] == total
    assert env.gov.agent_logs(AGENT) == []
    assert env.json("audit", "verify")["ok"] is True
    assert "expected an ISO date" in env.fails("audit", "purge", "--before", "last week", "-y")
    assert "in the future" in env.fails("audit", "purge", "--before", "2999-01-01", "--yes")


def test_audit_purge_asks_and_respects_no(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import onceonly_core.cli.gov as gov_cli

    run_some_calls(env)
    n = len(env.gov.agent_logs(AGENT))
    monkeypatch.setattr(gov_cli, "_interactive", lambda: True)
    result = env.run("audit", "purge", "--before", "0s", input="n\n")
    assert result.exit_code == 1 and "nothing purged" in result.output
    assert len(env.gov.agent_logs(AGENT)) == n
    result = env.run("audit", "purge", "--before", "0s", input="y\n")
    assert result.exit_code == 0 and f"purged {n} audit rows" in result.stdout


# -- timeline ----------------------------------------------------------------------------
def test_timeline_matches_the_api(env: Env) -> None:
    env.gov.post_event("run-1", "run_started", agent_id=AGENT, data={"token": ARG_SECRET})
    run_some_calls(env)
    env.gov.post_event("run-1", "run_finished", agent_id=AGENT, status="ok")
    events = env.json("timeline", "run-1")
    assert events == [e.model_dump(mode="json") for e in env.gov.get_run_timeline("run-1")]
    types = [e["type"] for e in events]
    assert types[0] == "run_started" and types[-1] == "run_finished"
    assert {"tool_call", "tool_result", "blocked"} <= set(types)
    page = env.json("timeline", "run-1", "--limit", "2", "--offset", "1")
    assert page == events[1:3]
    table = env.run("timeline", "run-1")
    assert table.exit_code == 0 and "run_started" in table.stdout and "blocked" in table.stdout
    assert env.json("timeline", "run-1", "--offset", "1000") == []
    assert "no events for run 'nope'" in env.fails("timeline", "nope")


# -- namespaces, ledgers, a real process --------------------------------------------------
def test_namespace_comes_from_the_environment_then_default(env: Env) -> None:
    env.gov.upsert_policy({"agent_id": AGENT})
    args = ["policy", "list", "--url", env.url, "--json"]
    result = runner.invoke(app, args, env={**CLEAN_ENV, "ONCEONLY_NAMESPACE": env.ns})
    assert [p["agent_id"] for p in json.loads(result.stdout)] == [AGENT]
    result = runner.invoke(app, args, env=CLEAN_ENV)
    assert json.loads(result.stdout) == []  # the "default" tenant is another one
    with Guard(env.url, quiet=True) as default:
        assert default.namespace == "default" and default.gov.list_policies() == []


def test_reads_never_create_a_ledger_and_writes_to_sqlite_do(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    result = runner.invoke(app, ["policy", "list", "--url", url], env=CLEAN_ENV)
    assert result.exit_code == 1 and "no ledger at" in result.output
    assert not (tmp_path / "new.db").exists()
    result = runner.invoke(app, ["agent", "disable", "x", "--url", url, "--json"], env=CLEAN_ENV)
    assert result.exit_code == 0, result.output
    with Guard(url, quiet=True) as g:
        assert g.gov.agent_status("x")["disabled"] is True


def test_every_governance_command_has_help() -> None:
    top = runner.invoke(app, ["--help"], env=CLEAN_ENV)
    for group in ("policy", "agent", "tools", "approvals", "audit", "timeline"):
        assert group in top.output
    for group, commands in {
        "policy": ("set", "get", "list", "template", "rm"),
        "agent": ("disable", "enable", "logs", "metrics", "status"),
        "tools": ("list", "add", "toggle", "rm"),
        "approvals": ("list", "approve", "deny"),
        "audit": ("verify", "purge"),
    }.items():
        out = runner.invoke(app, [group, "--help"], env=CLEAN_ENV).output
        for command in commands:
            assert command in out, (group, command)
        for command in commands:
            sub = runner.invoke(app, [group, command, "--help"], env=CLEAN_ENV)
            assert sub.exit_code == 0, (group, command)
            assert "--namespace" in sub.output and "--json" in sub.output, (group, command)
            assert "--url" in sub.output, (group, command)


def test_a_real_process_sets_a_policy_and_verifies(env: Env) -> None:
    cmd = [sys.executable, "-m", "onceonly_core.cli"]
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("ONCEONLY_")}
    proc_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), proc_env.get("PYTHONPATH")]))
    proc_env["ONCEONLY_DB_URL"] = env.url
    proc_env["ONCEONLY_NAMESPACE"] = env.ns
    proc_env["TOOL_KEY"] = TOOL_SECRET

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*cmd, *args],
            env=proc_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert "Traceback" not in proc.stderr
        assert TOOL_SECRET not in proc.stdout + proc.stderr
        return proc

    proc = run("policy", "set", AGENT, "--template", "strict", "--set", "max_actions_per_hour=3")
    assert proc.returncode == 0, proc.stderr
    assert "policy set" in proc.stdout
    proc = run(
        "tools", "add", "t.one", "--endpoint", "https://x.example", "--secret-env", "TOOL_KEY"
    )
    assert proc.returncode == 0, proc.stderr
    assert env.gov.get_policy(AGENT).max_actions_per_hour == 3
    assert env.gov.get_tool("t.one").has_secret
    run_some_calls(env)
    proc = run("audit", "verify", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True
    proc = run("agent", "logs", "ghost")
    assert proc.returncode == 1 and "no agent 'ghost'" in proc.stderr
