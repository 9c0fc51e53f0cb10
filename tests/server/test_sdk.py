"""Conformance: the unmodified onceonly-sdk 3.0.5 against `onceonly_core.server`."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from onceonly import OnceOnly
from onceonly.ai_models import AiResult
from onceonly.decorators import idempotent, idempotent_ai
from onceonly.exceptions import (
    ApiError,
    OverLimitError,
    RateLimitError,
    UnauthorizedError,
    ValidationError,
)

from onceonly_core.errors import SignatureError
from onceonly_core.governance.signing import verify

Running = Any  # tests/server/conftest.py: Running


@pytest.fixture
def client(srv: Running) -> Iterator[OnceOnly]:
    c = srv.client(srv.key("acme"))
    yield c
    c.close()


# -- check-lock ------------------------------------------------------------------------------
def test_check_lock_locked_then_duplicate(client: OnceOnly) -> None:
    first = client.check_lock("order:1", ttl=60, meta={"a": 1})
    assert first.should_proceed() and first.status_code == 200 and first.ttl == 60
    second = client.check_lock("order:1", ttl=60)
    assert second.is_duplicate() and not second.locked
    assert second.first_seen_at is not None


def test_check_lock_ttl_expiry(client: OnceOnly) -> None:
    assert client.check_lock("exp", ttl=1).locked
    assert client.check_lock("exp", ttl=1).duplicate
    time.sleep(1.2)
    assert client.check_lock("exp", ttl=1).locked


def test_check_lock_request_id_replay(client: OnceOnly) -> None:
    a = client.check_lock("rid", ttl=60, request_id="r-1")
    b = client.check_lock("rid", ttl=60, request_id="r-1")  # a retry of the same call
    c = client.check_lock("rid", ttl=60, request_id="r-2")
    assert a.locked and b.locked and c.duplicate
    assert a.request_id == "r-1"


def test_check_lock_async_and_decorators(client: OnceOnly) -> None:
    async def go() -> tuple[bool, bool]:
        r1 = await client.check_lock_async("async-k", ttl=60)
        r2 = await client.check_lock_async("async-k", ttl=60)
        await client.aclose()
        return r1.locked, r2.duplicate

    assert asyncio.run(go()) == (True, True)
    calls: list[int] = []

    @idempotent(client, key_prefix="pay", ttl=60, return_value_on_duplicate="dup")
    def pay(n: int) -> str:
        calls.append(n)
        return "paid"

    assert pay(5) == "paid" and pay(5) == "dup" and pay(6) == "paid"
    assert calls == [5, 6]


def test_check_lock_race_sqlite(srv: Running) -> None:
    key = srv.key("race")
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def one() -> None:
        c = srv.client(key)
        barrier.wait()
        wins.append(c.check_lock("hot", ttl=60).locked)
        c.close()

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


# -- leases --------------------------------------------------------------------------------
def test_lease_conflict_extend_complete_result(client: OnceOnly) -> None:
    lease = client.ai.lease("job-1", ttl=30)
    assert lease["status"] == "acquired" and lease["lease_id"] and lease["version"] == 1
    other = client.ai.lease("job-1", ttl=30)
    assert other["status"] == "polling" and other["charged"] == 0
    assert other["lease_id"] is None and isinstance(other["retry_after_sec"], int)
    st = client.ai.status("job-1")
    assert st.status == "in_progress" and st.ttl_left is not None
    ext = client.ai.extend("job-1", lease["lease_id"], ttl=60)
    assert ext["status"] == "extended"
    with pytest.raises(ApiError) as err:
        client.ai.complete("job-1", "lease_wrong", result={"x": 1})
    assert err.value.status_code == 409 and err.value.detail["error"] == "lease_mismatch"
    done = client.ai.complete("job-1", lease["lease_id"], result={"x": 1}, result_hash="h")
    assert done["status"] == "completed"
    again = client.ai.complete("job-1", lease["lease_id"], result={"x": 1})  # a retried POST
    assert again["status"] == "completed"
    late = client.ai.extend("job-1", lease["lease_id"], ttl=60)  # heartbeat after complete
    assert late["status"] == "completed"
    res = client.ai.result("job-1")
    assert res.ok and res.status == "completed" and res.result == {"x": 1}
    assert res.result_hash == "h"
    assert client.ai.lease("job-1")["status"] == "completed"
    with pytest.raises(ApiError) as err:
        client.ai.fail("job-1", lease["lease_id"], error_code="late")
    assert err.value.status_code == 409


def test_lease_fail_and_cancel(client: OnceOnly) -> None:
    lease = client.ai.lease("f-1", ttl=30)
    client.ai.fail("f-1", lease["lease_id"], error_code="boom")
    res = client.ai.result("f-1")
    assert not res.ok and res.status == "failed" and res.error_code == "boom"
    assert client.ai.lease("f-1")["status"] == "failed"
    lease = client.ai.lease("c-1", ttl=30)
    out = client.ai.cancel("c-1", lease["lease_id"], reason="user")
    assert out["status"] == "failed" and out["error_code"] == "canceled"


def test_lease_expiry_reacquires_and_fences(client: OnceOnly) -> None:
    old = client.ai.lease("e-1", ttl=1)
    time.sleep(1.3)
    assert client.ai.status("e-1").status == "expired"
    new = client.ai.lease("e-1", ttl=30)
    assert new["status"] == "acquired" and new["version"] == 2
    with pytest.raises(ApiError) as err:  # the expired holder is fenced out
        client.ai.complete("e-1", old["lease_id"], result={"stale": True})
    assert err.value.status_code == 409
    client.ai.complete("e-1", new["lease_id"], result={"fresh": True})
    assert client.ai.result("e-1").result == {"fresh": True}


def test_status_unknown_key(client: OnceOnly) -> None:
    st = client.ai.status("nope")
    assert st.status == "not_found" and not st.ok
    assert client.ai.result("nope").result is None


def test_run_fn_paths(client: OnceOnly) -> None:
    calls: list[int] = []

    def fn() -> dict[str, Any]:
        calls.append(1)
        return {"sum": 3}

    r = client.ai.run_fn("fn-1", fn, ttl=30, extend_every=1)
    assert r.ok and r.result == {"sum": 3}
    r2 = client.ai.run_fn("fn-1", fn, ttl=30)
    assert r2.result == {"sum": 3} and calls == [1]
    assert client.ai.run_fn("fn-str", lambda: "hello").result == {"value": "hello"}

    def boom() -> None:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        client.ai.run_fn("fn-err", boom, error_code="bad")
    assert client.ai.result("fn-err").error_code == "bad"


def test_run_fn_waits_on_conflict(client: OnceOnly) -> None:
    lease = client.ai.lease("w-1", ttl=30)
    r = client.ai.run_fn("w-1", lambda: {"never": 1}, wait_on_conflict=False)
    assert r.error_code == "not_acquired" and r.status == "polling"

    def finish_later() -> None:
        time.sleep(0.7)
        client.ai.complete("w-1", lease["lease_id"], result={"by": "holder"})

    t = threading.Thread(target=finish_later)
    t.start()
    got = client.ai.run_fn("w-1", lambda: {"never": 1}, timeout=10, poll_min=0.2)
    t.join()
    assert got.result == {"by": "holder"}


def test_run_fn_async_and_idempotent_ai(client: OnceOnly) -> None:
    async def work() -> dict[str, int]:
        await asyncio.sleep(0.01)
        return {"v": 7}

    async def go() -> AiResult:
        try:
            return await client.ai.run_fn_async("afn", work, ttl=30)
        finally:
            await client.aclose()

    # onceonly-sdk 3.0.5 bug: run_fn_async cancels its heartbeat task and then awaits it
    # catching only Exception, so CancelledError escapes after a successful complete.
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(go())
    assert client.ai.result("afn").result == {"v": 7}

    @idempotent_ai(client, key_fn=lambda n: f"deco:{n}", ttl=30)
    def compute(n: int) -> dict[str, int]:
        return {"n": n * 2}

    out = compute(4)
    assert isinstance(out, AiResult) and out.result == {"n": 8}


# -- key-mode jobs -------------------------------------------------------------------------
def test_run_and_wait_worker_actions(srv: Running) -> None:
    srv.cp.keys.ensure_tenant("acme")
    seen: list[dict[str, Any]] = []

    def send_email(to: str) -> dict[str, str]:
        seen.append({"to": to})
        return {"sent": to}

    srv.cp.register_tool("acme", "send_email", send_email)
    c = srv.client(srv.key("acme"))
    meta = {
        "agent_id": "mailer",
        "actions": [{"tool": "send_email", "args": {"to": "a@x"}}, {"tool": "missing_tool"}],
    }
    res = c.ai.run_and_wait(key="job:mail:1", metadata=meta, timeout=20, poll_min=0.2)
    assert res.status == "completed", res
    assert res.result is not None
    actions = res.result["actions"]
    assert actions[0]["decision"] == "executed" and actions[0]["result"] == {"sent": "a@x"}
    assert actions[1]["decision"] == "blocked"
    assert actions[1]["policy_reason"] == "tool_not_found"
    again = c.ai.run_and_wait(key="job:mail:1", metadata=meta, timeout=5)
    assert again.status == "completed" and len(seen) == 1
    dry = c.ai.run_and_wait(
        key="job:mail:dry", metadata={**meta, "dry_run": True}, timeout=20, poll_min=0.2
    )
    assert dry.result is not None and dry.result["dry_run"] is True and len(seen) == 1
    timeline = c.get_run_timeline("job:mail:1")
    types = [e["type"] for e in timeline["events"]]
    assert types[0] == "run_started" and types[-1] == "run_finished"
    c.close()


def test_run_and_wait_handler_and_failure(srv: Running) -> None:
    srv.cp.jobs.register("report:*", lambda ctx: {"report": ctx.key, "attempt": ctx.attempt})

    def explode(ctx: Any) -> None:
        raise ValueError("bad input")

    srv.cp.jobs.register("explode:*", explode)
    c = srv.client(srv.key("acme"))
    run = c.ai.run(key="report:42", metadata={"x": 1})
    assert run.status == "acquired" and run.lease_id
    res = c.ai.wait("report:42", timeout=20, poll_min=0.2, lease_id=run.lease_id)
    assert res.result == {"report": "report:42", "attempt": 1}
    bad = c.ai.run_and_wait(key="explode:1", timeout=20, poll_min=0.2)
    assert bad.status == "failed" and bad.error_code == "job_error"

    async def go() -> AiResult:
        try:
            return await c.ai.run_and_wait_async(key="report:async", timeout=20, poll_min=0.2)
        finally:
            await c.aclose()

    assert asyncio.run(go()).result == {"report": "report:async", "attempt": 1}
    c.close()


# -- governance ------------------------------------------------------------------------------
class _ToolHandler(BaseHTTPRequestHandler):
    secret = "s3cret-key-123"
    calls: list[dict[str, Any]] = []  # noqa: RUF012

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        payload = json.loads(body)
        try:
            verify(self.secret, dict(self.headers.items()), body)
            ok = True
        except SignatureError:
            ok = False
        sig = self.headers.get("webhook-signature", "")
        key = self.headers.get("Idempotency-Key", "")
        _ToolHandler.calls.append({"payload": payload, "signed": ok, "sig": sig, "key": key})
        out = json.dumps({"charged": payload["args"].get("amount")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def tool_server(allow_loopback: None) -> Iterator[str]:
    # Registering and calling it needs 127.0.0.1 allowlisted (the egress guard's default refuses).
    _ToolHandler.calls = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ToolHandler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/charge"
    httpd.shutdown()
    httpd.server_close()


def test_tools_crud_and_remote_run(client: OnceOnly, tool_server: str) -> None:
    tool = {
        "name": "stripe.charge",
        "url": tool_server,
        "scope_id": "global",
        "auth": {"type": "hmac_sha256", "secret": "s3cret-key-123"},
        "timeout_ms": 3000,
        "max_retries": 0,
        "description": "charge",
    }
    created = client.gov.create_tool(tool)
    assert created["name"] == "stripe.charge" and created["has_secret"] is True
    assert "s3cret" not in json.dumps(created)
    assert [t["name"] for t in client.gov.list_tools()] == ["stripe.charge"]
    assert client.gov.get_tool("stripe.charge")["url"] == tool_server

    r = client.ai.run_tool(
        agent_id="billing", tool="stripe.charge", args={"amount": 5}, spend_usd=1.0, run_id="run-a"
    )
    assert r.ok and r.allowed and r.decision == "executed" and r.result == {"charged": 5}
    dup = client.ai.run_tool(agent_id="billing", tool="stripe.charge", args={"amount": 5})
    assert dup.decision == "dedup" and dup.result == {"charged": 5}
    assert len(_ToolHandler.calls) == 1 and _ToolHandler.calls[0]["signed"]
    assert _ToolHandler.calls[0]["key"]  # the downstream idempotency key

    assert client.gov.toggle_tool("stripe.charge", enabled=False)["enabled"] is False
    off = client.ai.run_tool(agent_id="billing", tool="stripe.charge", args={"amount": 6})
    assert not off.allowed and off.policy_reason == "tool_disabled"
    assert client.gov.delete_tool("stripe.charge") == {
        "ok": True,
        "deleted": "stripe.charge",
        "scope_id": "global",
    }
    with pytest.raises(ApiError) as err:
        client.gov.get_tool("stripe.charge")
    assert err.value.status_code == 404
    nf = client.ai.run_tool(agent_id="billing", tool="stripe.charge", args={"amount": 7})
    assert nf.decision == "blocked" and nf.policy_reason == "tool_not_found"

    logs = client.gov.agent_logs("billing", limit=10)
    assert {entry.decision for entry in logs} >= {"executed", "dedup", "blocked"}
    m = client.gov.agent_metrics("billing", period="day")
    assert m.total_actions >= 3 and m.total_spend_usd == pytest.approx(1.0)
    assert m.top_tools[0]["tool"] == "stripe.charge"
    tl = client.get_run_timeline("run-a")
    assert tl["total"] >= 1


def test_policies_blocks_and_kill_switch(srv: Running) -> None:
    srv.cp.register_tool("acme", "charge", lambda amount: {"ok": amount})
    srv.cp.register_tool("acme", "delete_user", lambda id: {"deleted": id})
    c = srv.client(srv.key("acme"))
    p = c.gov.upsert_policy(
        {
            "agent_id": "bot",
            "allowed_tools": ["charge"],
            "max_actions_per_hour": 100,
            "max_spend_usd_per_day": 2.0,
            "max_calls_per_tool": {"charge": 2},
            "pricing_rules": [{"tool": "charge", "price_usd": 1.0}],
        }
    )
    assert p.agent_id == "bot" and p.max_spend_usd_per_day == 2.0
    assert p.pricing_rules == {"charge": 1.0}
    assert c.gov.get_policy("bot").allowed_tools == ["charge"]
    assert [x.agent_id for x in c.gov.list_policies()] == ["bot"]

    blocked = c.ai.run_tool(agent_id="bot", tool="delete_user", args={"id": 1})
    assert not blocked.allowed and blocked.policy_reason == "tool_not_in_allowed_list"
    assert c.ai.run_tool(agent_id="bot", tool="charge", args={"amount": 1}).allowed
    assert c.ai.run_tool(agent_id="bot", tool="charge", args={"amount": 2}).allowed
    capped = c.ai.run_tool(agent_id="bot", tool="charge", args={"amount": 3})
    assert capped.policy_reason in ("max_calls_per_tool_exceeded", "daily_spend_exceeded")

    t = c.gov.policy_from_template("ro", "read_only", {"max_actions_per_hour": 5})
    assert t.policy["template"] == "read_only" and t.max_actions_per_hour == 5
    with pytest.raises(ApiError) as err:
        c.gov.policy_from_template("ro", "no-such-template")
    assert err.value.status_code == 404
    with pytest.raises(ApiError) as err:
        c.gov.get_policy("nobody")
    assert err.value.status_code == 404

    st = c.gov.disable_agent("bot", reason="rogue")
    assert not st.is_enabled and st.disabled_reason == "rogue" and st.disabled_at
    off = c.ai.run_tool(agent_id="bot", tool="charge", args={"amount": 9})
    assert off.decision == "blocked" and off.policy_reason == "agent_disabled"
    assert c.gov.enable_agent("bot").is_enabled
    c.close()


# -- events, usage, account -----------------------------------------------------------------
def test_events_timeline_pagination(client: OnceOnly) -> None:
    for i in range(5):
        client.post_event(run_id="run x/y?z", type="step", step=f"s{i}", data={"i": i}, extra=i)
    page = client.get_run_timeline("run x/y?z", limit=2, offset=2)
    assert page["total"] == 5 and [e["step"] for e in page["events"]] == ["s2", "s3"]
    assert page["events"][0]["data"] == {"i": 2} and page["events"][0]["extra"] == 2
    assert client.get_run_timeline("unknown-run") == {
        "run_id": "unknown-run",
        "total": 0,
        "limit": 200,
        "offset": 0,
        "events": [],
    }
    feed = client.events(limit=3)
    assert len(feed["data"]) == 3 and feed["total"] == 5


def test_usage_me_metrics_notifications(client: OnceOnly) -> None:
    client.check_lock("u1", ttl=60)
    client.check_lock("u1", ttl=60)
    client.ai.lease("u-ai")
    u = client.usage("make")
    assert (u["usage"], u["requests_total_month"], u["blocked_total_month"]) == (1, 2, 1)
    assert client.usage_all()["ai"]["usage"] == 1
    assert client.me()["plan"] == "self-hosted"
    out = client.update_notifications(email_notifications_enabled=True)
    assert out["email_notifications_enabled"] is True
    assert out["tool_error_notifications_enabled"] is False
    day = time.strftime("%Y-%m-%d", time.gmtime())
    m = client.metrics(day, day)
    assert m["days"][0]["make"]["requests"] == 2


# -- typed errors ----------------------------------------------------------------------------
def test_unauthorized(srv: Running) -> None:
    c = srv.client("oo_sk_wrong")
    with pytest.raises(UnauthorizedError):
        c.check_lock("x")
    with pytest.raises(UnauthorizedError):
        c.ai.status("x")
    r = httpx.get(srv.base_url + "/me")
    assert r.status_code == 401 and isinstance(r.json()["detail"], str)


def test_validation_errors(client: OnceOnly) -> None:
    with pytest.raises(ValidationError):
        client.check_lock("")
    with pytest.raises(ValidationError):
        client.check_lock("k" * 300)
    with pytest.raises(ValidationError):
        client.check_lock("k", meta={"blob": "x" * 5000})
    with pytest.raises(ValidationError):
        client.gov.upsert_policy({"agent_id": "a", "max_actions_per_hour": -1})
    with pytest.raises(ValidationError):
        client.gov.agent_metrics("a", period="year")


def test_quota_402(srv: Running) -> None:
    c = srv.client(srv.key("small", make_limit=2))
    assert c.check_lock("q1").locked and c.check_lock("q2").locked
    with pytest.raises(OverLimitError) as err:
        c.check_lock("q3")
    assert err.value.detail["error"] == "usage_limit" and err.value.detail["limit"] == 2


def test_rate_limit_429_and_retry(srv: Running) -> None:
    key = srv.key("rl", rate_limit=2.0)
    c = srv.client(key)
    with pytest.raises(RateLimitError) as err:
        for i in range(10):
            c.check_lock(f"r{i}")
    assert err.value.retry_after_sec is not None and 0 < err.value.retry_after_sec <= 1
    patient = srv.client(key, max_retries_429=5)
    assert all(patient.check_lock(f"p{i}").locked for i in range(4))


def test_body_limit_413(srv: Running) -> None:
    key = srv.key("big")
    r = httpx.post(
        srv.base_url + "/events",
        content=b'{"run_id":"r","type":"t","data":{"x":"' + b"x" * 1_100_000 + b'"}}',
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert r.status_code == 413


def test_openapi_and_health(srv: Running) -> None:
    spec = httpx.get(srv.base_url + "/openapi.json").json()
    assert "/v1/check-lock" in spec["paths"] and "/v1/ai/run" in spec["paths"]
    root = srv.base_url.removesuffix("/v1")
    assert httpx.get(root + "/healthz").json() == {"ok": True}
    assert httpx.get(root + "/readyz").status_code == 200


def test_fail_open_when_server_stopped(srv: Running) -> None:
    key = srv.key("fo")
    srv.stop()
    c = srv.client(key, timeout=1.0, fail_open=True)
    r = c.check_lock("anything", ttl=5)
    assert r.locked and r.request_id == "fail-open" and r.raw["reason"] == "request_error"
    strict = srv.client(key, timeout=1.0)
    with pytest.raises(httpx.ConnectError):
        strict.check_lock("anything")


# -- tenant isolation ------------------------------------------------------------------------
def test_tenant_isolation(srv: Running, tool_server: str) -> None:
    a = srv.client(srv.key("tenant-a"))
    b = srv.client(srv.key("tenant-b"))
    lease = a.ai.lease("secret-job", ttl=30)
    a.ai.complete("secret-job", lease["lease_id"], result={"secret": 1})
    a.gov.upsert_policy({"agent_id": "agent-a", "blocked_tools": ["x"]})
    a.gov.create_tool({"name": "t.a", "url": tool_server})
    a.post_event(run_id="run-a", type="note")
    a.gov.disable_agent("agent-a", reason="a only")
    a.check_lock("lock-a", ttl=60)

    # B sees nothing of A's, exactly as if it did not exist ...
    assert b.ai.status("secret-job").status == "not_found"
    assert b.ai.result("secret-job").result is None
    assert b.ai.lease("secret-job")["status"] == "acquired"  # B's own, separate key
    for call in (
        lambda: b.ai.complete("secret-job", lease["lease_id"], result={"evil": 1}),
        lambda: b.ai.extend("secret-job", lease["lease_id"]),
        lambda: b.ai.fail("secret-job", lease["lease_id"], error_code="x"),
    ):
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.status_code == 409
    for call in (
        lambda: b.gov.get_policy("agent-a"),
        lambda: b.gov.get_tool("t.a"),
        lambda: b.gov.toggle_tool("t.a", enabled=False),
        lambda: b.gov.delete_tool("t.a"),
    ):
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.status_code == 404
    assert b.gov.list_policies() == [] and b.gov.list_tools() == []
    assert b.get_run_timeline("run-a")["total"] == 0 and b.events()["total"] == 0
    assert b.gov.agent_logs("agent-a") == []
    assert b.gov.enable_agent("agent-a").is_enabled
    assert b.check_lock("lock-a", ttl=60).locked
    assert b.usage("make")["requests_total_month"] == 1

    # ... and A's objects are unchanged.
    assert a.ai.result("secret-job").result == {"secret": 1}
    assert a.gov.get_tool("t.a")["enabled"] is True
    assert not a.gov.disable_agent("agent-a", reason="a only").is_enabled
    assert a.check_lock("lock-a", ttl=60).duplicate
    a.close()
    b.close()


# -- more: async mirrors, job recovery, canceled jobs, ai quota -------------------------------
def test_async_mirrors(srv: Running, tool_server: str) -> None:
    c = srv.client(srv.key("async-t"))

    async def go() -> None:
        assert (await c.me_async())["plan"] == "self-hosted"
        lease = await c.ai.lease_async("as-1", ttl=30)
        assert (await c.ai.extend_async("as-1", lease["lease_id"]))["status"] == "extended"
        await c.ai.complete_async("as-1", lease["lease_id"], result={"a": 1})
        assert (await c.ai.status_async("as-1")).status == "completed"
        assert (await c.ai.result_async("as-1")).result == {"a": 1}
        lease = await c.ai.lease_async("as-2", ttl=30)
        await c.ai.fail_async("as-2", lease["lease_id"], error_code="x")
        lease = await c.ai.lease_async("as-3", ttl=30)
        await c.ai.cancel_async("as-3", lease["lease_id"])
        assert (await c.ai.result_async("as-3")).error_code == "canceled"
        run = await c.ai.run_async(key="as-job")
        assert run.status == "acquired"
        assert (await c.ai.wait_async("as-job", timeout=20, poll_min=0.2)).status == "completed"
        pol = await c.gov.upsert_policy_async({"agent_id": "aa", "blocked_tools": ["x"]})
        assert pol.policy["blocked_tools"] == ["x"]
        assert (await c.gov.get_policy_async("aa")).agent_id == "aa"
        assert len(await c.gov.list_policies_async()) == 1
        tpl = await c.gov.policy_from_template_async("ab", "permissive")
        assert tpl.policy["template"] == "permissive"
        await c.gov.create_tool_async({"name": "as.tool", "url": tool_server})
        assert [t["name"] for t in await c.gov.list_tools_async()] == ["as.tool"]
        assert (await c.gov.get_tool_async("as.tool"))["enabled"] is True
        assert (await c.gov.toggle_tool_async("as.tool", enabled=False))["enabled"] is False
        assert (await c.gov.toggle_tool_async("as.tool", enabled=True))["enabled"] is True
        tr = await c.ai.run_tool_async(agent_id="ab", tool="as.tool", args={"amount": 2})
        assert tr.decision == "executed" and tr.result == {"charged": 2}
        assert (await c.gov.delete_tool_async("as.tool"))["deleted"] == "as.tool"
        assert not (await c.gov.disable_agent_async("ab", reason="r")).is_enabled
        assert (await c.gov.enable_agent_async("ab")).is_enabled
        assert len(await c.gov.agent_logs_async("ab")) >= 1
        assert (await c.gov.agent_metrics_async("ab")).total_actions >= 1
        await c.post_event_async(run_id="as-run", type="note", message="m")
        assert (await c.get_run_timeline_async("as-run"))["total"] == 1
        assert (await c.events_async(limit=5))["total"] >= 1
        assert (await c.usage_async("ai"))["usage"] >= 4
        assert "make" in await c.usage_all_async()
        day = time.strftime("%Y-%m-%d", time.gmtime())
        assert len((await c.metrics_async(day, day))["days"]) == 1
        out = await c.update_notifications_async(run_failure_notifications_enabled=True)
        assert out["run_failure_notifications_enabled"] is True
        res = await c.ai_run_and_wait_async(key="as-job-2", timeout=20, poll_min=0.2)
        assert res.status == "completed"
        await c.aclose()

    asyncio.run(go())


def test_job_of_a_dead_worker_is_run_again(make_server: Any) -> None:
    srv = make_server(job_workers=0, job_lease=0.5)
    attempts: list[int] = []
    srv.cp.jobs.register("crash:*", lambda ctx: attempts.append(ctx.attempt) or {"ok": 1})
    c = srv.client(srv.key("acme"))
    run = c.ai.run(key="crash:1")
    assert run.status == "acquired"
    taken = srv.cp.keys.take_jobs("dead-worker", 0.5)  # a worker that then dies
    assert len(taken) == 1
    assert srv.cp.jobs.run_once() == 0  # its job lease is still live: nobody else runs it
    time.sleep(0.7)
    assert srv.cp.jobs.run_once() == 1
    assert attempts == [2]
    assert c.ai.result("crash:1").result == {"ok": 1}


def test_canceled_job_never_runs(make_server: Any) -> None:
    srv = make_server(job_workers=0)
    ran: list[str] = []
    srv.cp.jobs.register("cx:*", lambda ctx: ran.append(ctx.key))
    c = srv.client(srv.key("acme"))
    run = c.ai.run(key="cx:1")
    assert run.lease_id
    c.ai.cancel("cx:1", run.lease_id, reason="changed my mind")
    assert srv.cp.jobs.run_once() == 1 and ran == []
    assert c.ai.result("cx:1").error_code == "canceled"
    assert srv.cp.keys.job_count("done") == 1


def test_ai_quota_402(srv: Running) -> None:
    c = srv.client(srv.key("ai-small", ai_limit=1))
    assert c.ai.lease("q-1")["status"] == "acquired"
    with pytest.raises(OverLimitError) as err:
        c.ai.lease("q-2")
    assert err.value.detail["kind"] == "ai"
