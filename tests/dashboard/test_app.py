"""The dashboard over Client: escaping, CSRF and origin refusal, approvals, the kill
switch, the JSON feed, the access token, record detail without secrets."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import pytest

from onceonly_core import Guard
from onceonly_core.dashboard import create_dashboard, serve_dashboard
from onceonly_core.errors import ConfigError, MissingExtraError

Client = Any  # fastapi.testclient.Client, made by the fixtures in conftest.py
Post = Any
BASE = "http://127.0.0.1:8765"

EVIL_TOOL = "<script>alert('tool')</script>"
EVIL_WF = "x');alert(1);('<img src=x onerror=alert(2)>"
PAGES = ["/", "/agents", "/approvals", "/runs", "/run?id=r1", "/api/feed", "/api/agents"]


def send_email(to: str) -> str:
    return f"sent to {to}"


def test_every_page_loads_on_an_empty_ledger(tmp_path: Any, make_client: Any) -> None:
    # The peer's overview crashed on load; ours renders on a brand-new SQLite file.
    app = create_dashboard(f"sqlite:///{tmp_path}/empty.db", namespace="fresh")
    with make_client(app) as c:
        for path in [*PAGES, "/api/approvals", "/api/run?id=nope", "/record?key=k"]:
            r = c.get(path)
            assert r.status_code == 200, (path, r.text)
        assert "nothing yet" in c.get("/").text


def test_names_with_markup_are_shown_as_text(client: Client, guard: Guard) -> None:
    with guard.workflow(EVIL_WF), guard.run("<b>run</b>"):
        assert guard.call_tool(send_email, {"to": "a"}, tool=EVIL_TOOL, agent_id="bot").ok
    guard.gov.disable_agent("<i>evil-agent</i>", "<script>reason</script>")
    for path in [*PAGES, "/run?id=%3Cb%3Erun%3C%2Fb%3E"]:
        body = client.get(path).text
        for raw in ("<script>alert", "<img src=x", "<b>run</b>", "<i>evil", "<script>reason"):
            assert raw not in body, (path, raw)
    feed = client.get("/").text
    assert "&lt;script&gt;alert(&#x27;tool&#x27;)&lt;/script&gt;" in feed
    assert "&lt;img src=x onerror=alert(2)&gt;" in feed
    assert "&lt;i&gt;evil-agent&lt;/i&gt;" in client.get("/agents").text
    # The JSON feed carries the names as data, with < > & escaped for good measure.
    api = client.get("/api/feed")
    assert "<script" not in api.text and "\\u003cscript" in api.text
    assert any(i["tool"] == EVIL_TOOL and i["workflow"] == EVIL_WF for i in api.json()["items"])


def test_security_headers_and_nonce(client: Client) -> None:
    r = client.get("/")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in r.text
    assert r.text.count("<script") == 1  # the one inline script, nothing from a CDN
    assert "http://" not in r.text and "https://" not in r.text
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-content-type-options"] == "nosniff"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/").headers["content-security-policy"] != csp  # a nonce per response


def test_post_without_csrf_token_is_refused(client: Client, guard: Guard) -> None:
    client.get("/")  # a session cookie, but no token in the form
    r = client.post("/actions/disable_all", data={"next": "/"}, follow_redirects=False)
    assert r.status_code == 403
    r = client.post(
        "/actions/disable_all", data={"csrf": "0" * 64, "next": "/"}, follow_redirects=False
    )
    assert r.status_code == 403
    assert guard.gov.agent_status("bot")["disabled"] is False


def test_cross_site_posts_are_refused_even_with_the_token(
    client: Client, guard: Guard, post: Post, make_client: Any, csrf: Any
) -> None:
    for headers in (
        {"origin": "http://evil.example"},
        {"origin": "null", "sec-fetch-site": "cross-site"},  # a sandboxed frame, data: URL
        {"origin": "null", "sec-fetch-site": "none"},
        {"sec-fetch-site": "cross-site", "origin": BASE},
        {"sec-fetch-site": "same-site", "origin": BASE},
    ):
        r = post(client, "/actions/disable_all", {}, **headers)
        assert r.status_code == 403, headers
    # `Origin: null` without the browser's same-origin mark is refused too.
    r = client.post(
        "/actions/disable_all",
        data={"csrf": csrf(client.get("/").text), "next": "/"},
        headers={"origin": "null"},
        follow_redirects=False,
    )
    assert r.status_code == 403
    # The peer's wipe: a text/plain body from another site.
    r = client.post(
        "/actions/disable_all",
        content=b'{"action":"clear_all"}',
        headers={"content-type": "text/plain", "origin": "http://evil.example"},
    )
    assert r.status_code == 403
    # A fresh browser (no session cookie) cannot post either.
    with make_client(client.app) as stranger:
        r = stranger.post("/actions/disable_all", data={"csrf": "x"}, follow_redirects=False)
        assert r.status_code == 403
    assert guard.gov.agent_status("bot")["global_disabled"] is False


def test_other_host_names_are_refused(client: Client) -> None:
    # DNS rebinding: evil.example resolving to 127.0.0.1 reaches the port, not the app.
    r = client.get("/", headers={"host": "evil.example:8765"})
    assert r.status_code == 421
    assert client.get("/", headers={"host": "localhost:8765"}).status_code == 200


def test_get_never_changes_state(client: Client, guard: Guard) -> None:
    assert client.get("/actions/disable_all").status_code in (404, 405)
    assert client.request("PUT", "/actions/disable_all").status_code == 405
    assert guard.gov.agent_status("bot")["global_disabled"] is False


def test_kill_switch_stops_the_next_call(client: Client, guard: Guard, post: Post) -> None:
    assert guard.call_tool(send_email, {"to": "1"}, agent_id="bot").decision == "executed"
    r = post(client, "/actions/disable", {"agent": "bot"})
    assert r.status_code == 303 and r.headers["location"] == "/agents?done=agent_disabled"
    res = guard.call_tool(send_email, {"to": "2"}, agent_id="bot")
    assert (res.decision, res.policy_reason) == ("blocked", "agent_disabled")
    assert "disabled" in client.get("/agents").text
    post(client, "/actions/enable", {"agent": "bot"})
    assert guard.call_tool(send_email, {"to": "2"}, agent_id="bot").decision == "executed"
    # The global switch stops every agent, even one without a policy.
    post(client, "/actions/disable_all", {})
    assert guard.call_tool(send_email, {"to": "3"}, agent_id="other").policy_reason == (
        "agent_disabled"
    )
    assert "GLOBAL KILL SWITCH ON" in client.get("/").text
    post(client, "/actions/enable_all", {})
    assert guard.call_tool(send_email, {"to": "3"}, agent_id="other").decision == "executed"


def test_approve_runs_the_pending_call_exactly_once(
    client: Client, guard: Guard, post: Post
) -> None:
    runs: list[int] = []

    def refund(amount: int) -> str:
        runs.append(amount)
        return f"refunded {amount}"

    first = guard.call_tool(refund, {"amount": 7}, agent_id="bot")
    assert first.decision == "pending_approval" and first.approval_id
    page = client.get("/approvals").text
    assert first.approval_id in page and "Approve" in page
    r = post(client, "/actions/approve", {"approval": first.approval_id, "next": "/approvals"})
    assert r.status_code == 303 and r.headers["location"] == "/approvals?done=approved"
    # Approving again (a double click, a resubmitted form) changes nothing.
    assert post(client, "/actions/approve", {"approval": first.approval_id}).status_code == 303
    decisions = [guard.call_tool(refund, {"amount": 7}, agent_id="bot").decision for _ in range(4)]
    assert decisions == ["executed", "dedup", "dedup", "dedup"]
    assert runs == [7]
    assert client.get("/api/approvals").json()["pending"] == []


def test_deny_refuses_the_next_ask(client: Client, guard: Guard, post: Post) -> None:
    def refund(amount: int) -> str:
        raise AssertionError("a denied call never runs")

    ap = guard.call_tool(refund, {"amount": 9}, agent_id="bot").approval_id
    assert ap
    assert post(client, "/actions/deny", {"approval": ap}).status_code == 303
    res = guard.call_tool(refund, {"amount": 9}, agent_id="bot")
    assert (res.decision, res.policy_reason) == ("blocked", "approval_denied")


def test_json_feed_has_every_decision_and_filters(client: Client, guard: Guard) -> None:
    def boom() -> None:
        raise RuntimeError("down")

    def plain(x: int) -> int:
        return x

    with guard.run("run-a"):
        guard.call_tool(send_email, {"to": "a"}, agent_id="bot", spend_usd=1.25)
        guard.call_tool(send_email, {"to": "a"}, agent_id="bot")
    guard.call_tool(boom, {}, agent_id="bot")
    guard.call_tool(send_email, {"to": "z"}, agent_id="bot", tool="refund")
    guard.gov.upsert_policy({"agent_id": "ro", "blocked_tools": ["send_*"]})
    guard.call_tool(send_email, {"to": "b"}, agent_id="ro")
    with guard.workflow("nightly"):
        guard(plain, 1)  # ungoverned: only in the ledger
    items = client.get("/api/feed").json()["items"]
    assert {i["decision"] for i in items} == {
        "executed",
        "dedup",
        "failed",
        "pending_approval",
        "blocked",
    }
    ungoverned = [i for i in items if i["reason"] == "ungoverned"]
    assert [(i["workflow"], i["decision"]) for i in ungoverned] == [("nightly", "executed")]

    def only(**q: str) -> list[dict[str, Any]]:
        r = client.get("/api/feed", params=q)
        assert r.status_code == 200
        return list(r.json()["items"])

    assert {i["agent"] for i in only(agent="ro")} == {"ro"}
    assert {i["decision"] for i in only(agent="ro")} == {"blocked"}
    assert [i["decision"] for i in only(run="run-a")] == ["dedup", "executed"]
    assert {i["workflow"] for i in only(workflow="nightly")} == {"nightly"}
    assert {i["tool"] for i in only(tool="refund")} == {"refund"}
    assert only(decision="failed")[0]["reason"] == "tool_error"
    assert only(agent="nobody") == []
    spent = only(run="run-a")[1]
    assert spent["spend_usd"] == 1.25
    # The HTML page filters the same way (and works without the script).
    page = client.get("/", params={"agent": "ro"}).text
    assert 'data-live="/api/feed?agent=ro"' in page and "tool_blocked" in page
    assert "tool_error" not in page


def test_agent_cards_show_spend_and_caps(client: Client, guard: Guard) -> None:
    guard.call_tool(send_email, {"to": "a"}, agent_id="bot", spend_usd=2.5)
    guard.call_tool(send_email, {"to": "b"}, agent_id="bot", spend_usd=1)
    a = client.get("/api/agents").json()["agents"]
    bot = next(c for c in a if c["agent"] == "bot")
    assert bot["spend_today_usd"] == 3.5 and bot["budget_usd"] == 10
    assert bot["actions_this_hour"] == 2 and bot["actions_cap"] == 50
    name = "tests.dashboard.test_app.send_email"
    assert bot["tool_caps"] == [{"tool": name, "used": 2, "cap": 5}]
    page = client.get("/agents").text
    assert "$3.50 of $10.00" in page and "2 of 50" in page and f"{name}: 2 of 5" in page
    assert "Kill switch" in page


def test_run_timeline(client: Client, guard: Guard) -> None:
    guard.gov.post_event("r1", "run_started", agent_id="bot", data={"password": "hunter2"})
    guard.call_tool(send_email, {"to": "a"}, agent_id="bot", run_id="r1")
    guard.call_tool(send_email, {"to": "a"}, agent_id="bot", run_id="r1")
    events = client.get("/api/run", params={"id": "r1"}).json()["events"]
    assert [e["type"] for e in events] == [
        "run_started",
        "tool_call",
        "tool_result",
        "tool_call",
        "dedup",
    ]
    page = client.get("/run", params={"id": "r1"}).text
    assert "hunter2" not in page and "run_started" in page
    assert "r1" in client.get("/runs").text


@dataclass
class Receipt:
    charge_id: str


def test_record_detail_redacts_args_and_result(client: Client, guard: Guard) -> None:
    def charge(card_number: str, amount: int) -> dict[str, Any]:
        return {"charged": amount, "api_key": "sk_live_51Habcdefghijklmnopqrstuv", "ok": (1, 2)}

    res = guard.call_tool(charge, {"card_number": "4242424242424242", "amount": 5}, agent_id="bot")
    assert res.decision == "executed" and res.key
    page = client.get("/record", params={"key": res.key, "ns": "acme"}).text
    assert "4242424242424242" not in page and "sk_live_51H" not in page
    assert "Replay result (what every retry receives" in page
    assert "&quot;charged&quot;: 5" in page and "succeeded" in page
    # Found without the namespace too (the feed links blocked calls by key only).
    assert "&quot;charged&quot;: 5" in client.get("/record", params={"key": res.key}).text
    # Another tenant's namespace is not readable through this dashboard.
    assert "not this dashboard" in client.get("/record", params={"key": res.key, "ns": "x"}).text


def test_record_result_naming_a_class_is_shown_as_stored(client: Client, guard: Guard) -> None:
    def receipt() -> Receipt:
        return Receipt("ch_1")

    with guard.workflow("wf"):
        guard(receipt)
    rec = guard.store.list(namespace="acme/wf")[0]
    assert rec.result is not None and "dataclass" in rec.result
    page = client.get("/record", params={"key": rec.key, "ns": rec.namespace}).text
    assert "as stored" in page and "ch_1" in page


def test_access_token(guard: Guard, make_client: Any, csrf: Any) -> None:
    app = create_dashboard(guard=guard, token="s3cret-token")
    with make_client(app) as c:
        assert c.get("/").status_code == 401
        assert c.get("/api/feed").status_code == 401
        assert c.get("/?token=wrong").status_code == 401
        r = c.get("/agents?token=s3cret-token", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/agents"  # token dropped
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert "s3cret-token" not in cookie  # the cookie holds a MAC, not the token
        page = c.get("/agents")
        assert page.status_code == 200 and "s3cret-token" not in page.text
        token = csrf(page.text)
        r = c.post(
            "/actions/disable",
            data={"csrf": token, "agent": "bot", "next": "/agents"},
            headers={"origin": BASE},
            follow_redirects=False,
        )
        assert r.status_code == 303
    assert guard.gov.agent_status("bot")["disabled"] is True


def test_unknown_action_and_bad_next(client: Client, post: Post) -> None:
    assert post(client, "/actions/clear_all", {}).status_code == 404
    r = post(client, "/actions/enable_all", {"next": "//evil.example/x"})
    assert r.headers["location"] == "/?done=all_enabled"


def test_serve_refuses_a_public_bind_without_a_token() -> None:
    with pytest.raises(ConfigError, match="not loopback"):
        serve_dashboard("memory://", host="0.0.0.0")
    with pytest.raises(ConfigError, match="empty access token"):
        create_dashboard("memory://", token="")


def test_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(MissingExtraError) as err:
        create_dashboard("memory://")
    assert 'pip install "onceonly-core[server]"' in str(err.value)
    assert isinstance(err.value, ImportError)


def test_cli_command_registers() -> None:
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from onceonly_core.cli.dashboard import register

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:  # a second command, so typer keeps `dashboard` as a subcommand
        pass

    out = CliRunner().invoke(app, ["dashboard", "--help"])
    assert out.exit_code == 0, out.output
    for opt in ("--url", "--namespace", "--host", "--port", "--token"):
        assert opt in out.output
    out = CliRunner().invoke(app, ["dashboard", "--url", "memory://", "--host", "0.0.0.0"])
    assert out.exit_code == 2 and "not loopback" in out.output
