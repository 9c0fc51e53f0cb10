"""Governance behaviour on every ledger (memory, SQLite, PostgreSQL, MariaDB, Redis): the §5
order and reason codes, templates, spend accounting, the registry and its secrets,
remote tools, approvals, the hash-chained audit log and tampering, redaction, metrics,
timelines and notifications."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from governance._loopback import Reply, loopback, verifying
from onceonly_core import ApprovalPending, Guard, PolicyBlocked
from onceonly_core.errors import ConfigError
from onceonly_core.governance import TEMPLATES, Policy
from onceonly_core.governance.engine import DAY
from onceonly_core.governance.signing import ReplayCache
from onceonly_core.stores import schema as S
from onceonly_core.stores.sql import SQLStore

SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLWxvb3BiYWNr"


@pytest.fixture
def guard(store_url: str, namespace: str) -> Iterator[Guard]:
    if store_url.startswith(("postgresql", "mysql")):
        with SQLStore(store_url) as store:
            store.migrate()
    g = Guard(store_url, namespace=namespace, quiet=True)
    yield g
    g.close()


charges: list[tuple[str, float]] = []


def charge_card(customer: str, amount: float) -> dict[str, Any]:
    charges.append((customer, amount))
    return {"charge": len(charges), "amount": amount}


def delete_user(user: str) -> str:
    return f"deleted {user}"


def refund(order: str) -> str:
    return f"refunded {order}"


def lookup(q: str) -> str:
    return q.upper()


def flaky(n: int) -> int:
    raise RuntimeError(f"downstream said no to {n}")


def day(g: Guard) -> int:
    return int(g.gov.store.now() // DAY) * DAY


# -- the §5 order ------------------------------------------------------------------------
def test_reason_codes_follow_the_design_order(guard: Guard) -> None:
    gov = guard.gov
    gov.upsert_policy(
        Policy(
            agent_id="bot",
            blocked_tools=["delete_*"],
            allowed_tools=["charge_card", "refund", "delete_user", "flaky"],
            require_approval=["refund", "delete_user"],
        )
    )

    def reason(fn: Any, **args: Any) -> tuple[str, str]:
        r = guard.call_tool(fn, args, agent_id="bot")
        return r.decision, r.policy_reason

    # blocked list before allowed list before approval
    assert reason(delete_user, user="u1") == ("blocked", "tool_blocked")
    assert reason(lookup, q="x") == ("blocked", "tool_not_in_allowed_list")
    assert reason(refund, order="o1") == ("pending_approval", "approval_required")
    assert reason(charge_card, customer="c", amount=1.0) == ("executed", "ok")
    # the kill switch before everything
    gov.disable_agent("bot", "rogue")
    assert reason(delete_user, user="u1") == ("blocked", "agent_disabled")
    assert reason(charge_card, customer="c", amount=1.0) == ("blocked", "agent_disabled")
    gov.enable_agent("bot")
    gov.disable_all("incident 42")
    r = guard.call_tool(lookup, {"q": "x"}, agent_id="someone-else")
    assert (r.decision, r.policy_reason, r.error) == ("blocked", "agent_disabled", "incident 42")
    gov.enable_all()
    # registered but disabled: tool_disabled, before the lists
    gov.create_tool("shop.delete_user", delete_user, enabled=False)
    r = guard.call_tool(delete_user, {"user": "u"}, tool="shop.delete_user", agent_id="bot")
    assert r.policy_reason == "tool_disabled"
    # run_tool of a name nobody registered
    r = gov.run_tool("bot", "nope", {"x": 1})
    assert (r.decision, r.policy_reason) == ("blocked", "tool_not_found")


def test_caps_in_order_per_tool_then_actions_then_spend(guard: Guard) -> None:
    guard.gov.upsert_policy(
        Policy(
            agent_id="capped",
            max_calls_per_tool={"lookup": 2},
            max_actions_per_hour=4,
            max_spend_usd_per_day=2.5,
            pricing_rules={"charge_card": 1.0},
        )
    )
    got = [guard.call_tool(lookup, {"q": f"q{i}"}, agent_id="capped") for i in range(3)]
    assert [r.policy_reason for r in got] == ["ok", "ok", "max_calls_per_tool_exceeded"]
    spent = [
        guard.call_tool(charge_card, {"customer": f"c{i}", "amount": 1.0}, agent_id="capped")
        for i in range(3)
    ]
    # 2 lookups + 2 charges = 4 actions this hour; the third charge meets the hourly cap
    # first, even though the day's spend (2.0 of 2.5) could not take it either.
    assert [r.policy_reason for r in spent] == ["ok", "ok", "max_actions_per_hour_exceeded"]
    assert guard.gov.store.counter(guard.namespace, "capped", "spend", day(guard)) == 2_000_000


def test_replays_and_blocked_calls_spend_nothing_and_failures_release(guard: Guard) -> None:
    guard.gov.upsert_policy(
        Policy(agent_id="payer", max_spend_usd_per_day=10, pricing_rules={"*": 3.0})
    )
    first = guard.call_tool(charge_card, {"customer": "c", "amount": 3.0}, agent_id="payer")
    again = guard.call_tool(charge_card, {"customer": "c", "amount": 3.0}, agent_id="payer")
    assert (first.decision, first.spend_usd) == ("executed", 3.0)
    assert (again.decision, again.spend_usd, again.result) == ("dedup", 0.0, first.result)
    failed = guard.call_tool(flaky, {"n": 1}, agent_id="payer")
    assert failed.decision == "failed" and failed.error_type == "RuntimeError"
    assert isinstance(failed.exception, RuntimeError)
    explicit = guard.call_tool(
        charge_card, {"customer": "d", "amount": 4.0}, agent_id="payer", spend_usd=4.0
    )
    assert explicit.spend_usd == 4.0
    assert guard.gov.store.counter(guard.namespace, "payer", "spend", day(guard)) == 7_000_000
    full = guard.call_tool(charge_card, {"customer": "e", "amount": 3.5}, agent_id="payer")
    assert full.policy_reason == "ok"  # 7 + 3 (the price) = 10: a cap is inclusive
    over = guard.call_tool(charge_card, {"customer": "f", "amount": 0.5}, agent_id="payer")
    assert over.policy_reason == "daily_spend_exceeded"  # 10 + 3 > 10
    assert guard.gov.store.counter(guard.namespace, "payer", "spend", day(guard)) == 10_000_000
    assert guard.gov.store.holds(guard.namespace, "payer") == 0
    with pytest.raises(ConfigError):
        guard.call_tool(lookup, {"q": "x"}, agent_id="payer", spend_usd=-1)


def test_a_replay_is_not_refused_by_an_exhausted_budget(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="b", max_spend_usd_per_day=1.0))
    r = guard.call_tool(charge_card, {"customer": "x", "amount": 1.0}, agent_id="b", spend_usd=1)
    assert r.decision == "executed"
    again = guard.call_tool(
        charge_card, {"customer": "x", "amount": 1.0}, agent_id="b", spend_usd=1
    )
    assert again.decision == "dedup"  # the budget is full, but a replay costs nothing


def test_templates_and_overrides(guard: Guard) -> None:
    for name in TEMPLATES:
        p = guard.gov.policy_from_template(f"agent-{name}", name)
        assert p.template == name
    p = guard.gov.policy_from_template("sb", "support_bot", {"max_spend_usd_per_day": 7})
    assert p.max_spend_usd_per_day == 7 and "refund*" in p.require_approval
    assert guard.gov.get_policy("sb") == p
    assert TEMPLATES["support_bot"]["max_spend_usd_per_day"] == 50.0  # not mutated
    assert {q.agent_id for q in guard.gov.list_policies()} >= {"sb", "agent-strict"}
    with pytest.raises(ConfigError, match="unknown policy template"):
        guard.gov.policy_from_template("x", "yolo")
    ro = guard.call_tool(charge_card, {"customer": "c", "amount": 1.0}, agent_id="agent-read_only")
    assert ro.policy_reason == "tool_not_in_allowed_list"
    assert guard.call_tool(lookup, {"q": "a"}, agent_id="agent-read_only").ok is False

    # read_only allows get_*/list_*/...: `lookup` is not one of them, a getter is
    def get_order(order: str) -> str:
        return order

    assert guard.call_tool(get_order, {"order": "o"}, agent_id="agent-read_only").ok


def test_policies_are_validated() -> None:
    with pytest.raises(ValueError):
        Policy(agent_id="x", max_spend_usd_per_day=-1)
    with pytest.raises(ValueError):
        Policy(agent_id="x", pricing_rules={"a": float("nan")})
    with pytest.raises(ValueError):
        Policy(agent_id="x", unknown_field=1)  # type: ignore[call-arg]


# -- the facade --------------------------------------------------------------------------
def test_the_facade_governs_when_an_agent_is_set(guard: Guard, namespace: str) -> None:
    guard.gov.upsert_policy(
        Policy(agent_id="bot", blocked_tools=["delete_*"], require_approval=["refund"])
    )
    with guard.agent("bot"):
        with pytest.raises(PolicyBlocked) as blocked:
            guard(delete_user, "u1")
        assert blocked.value.reason == "tool_blocked"
        with pytest.raises(ApprovalPending) as pending:
            guard(refund, "o-1")
        guard.gov.approve(pending.value.approval_id)
        assert guard(refund, "o-1") == "refunded o-1"
        with pytest.raises(RuntimeError, match="downstream said no"):
            guard(flaky, 3)  # the tool's own exception, unchanged
    assert guard(delete_user, "u1") == "deleted u1"  # outside the scope: not governed


def test_async_calls_are_governed_the_same(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="a", max_calls_per_tool={"ping": 3}))

    async def ping(n: int) -> int:
        await asyncio.sleep(0)
        return n

    async def main() -> list[str]:
        rs = await asyncio.gather(
            *[guard.acall_tool(ping, {"n": i}, tool="ping", agent_id="a") for i in range(5)]
        )
        sync_tool = await guard.acall_tool(lookup, {"q": "z"}, agent_id="a")
        assert sync_tool.result == "Z"
        return sorted(r.policy_reason for r in rs)

    assert asyncio.run(main()) == ["max_calls_per_tool_exceeded"] * 2 + ["ok"] * 3


# -- tools registry and remote tools -----------------------------------------------------
def test_registry_never_returns_secrets(guard: Guard) -> None:
    gov = guard.gov
    spec = gov.create_tool(
        "crm.update", url="https://crm.example/tool", auth="hmac_sha256", secret=SECRET
    )
    assert spec.has_secret and "secret" not in spec.model_dump()
    got = gov.get_tool("crm.update")
    assert got is not None and got.has_secret and SECRET not in got.model_dump_json()
    assert all(SECRET not in t.model_dump_json() for t in gov.list_tools())
    assert gov.toggle_tool("crm.update", False) and gov.get_tool("crm.update").enabled is False  # type: ignore[union-attr]
    assert gov.delete_tool("crm.update") and gov.get_tool("crm.update") is None
    with pytest.raises(ValueError):
        gov.create_tool("bad name!", lookup)
    with pytest.raises(ConfigError):
        gov.create_tool("x", url="https://x", auth="hmac_sha256")  # no secret
    with pytest.raises(ConfigError):
        gov.create_tool("x", lookup, url="https://x")  # both


@pytest.mark.usefixtures("allow_loopback")  # the tool server is on 127.0.0.1
def test_run_tool_calls_a_signed_remote_tool_once(guard: Guard) -> None:
    cache = ReplayCache()
    body = json.dumps({"result": {"ticket": "T-1"}}).encode()
    with loopback(verifying(SECRET, cache, Reply(200, body))) as srv:
        guard.gov.create_tool("crm.open_ticket", url=srv.url, auth="hmac_sha256", secret=SECRET)
        first = guard.gov.run_tool("support", "crm.open_ticket", {"subject": "hi"})
        again = guard.gov.run_tool("support", "crm.open_ticket", {"subject": "hi"})
    assert (first.decision, first.result) == ("executed", {"ticket": "T-1"})
    assert (again.decision, again.result) == ("dedup", {"ticket": "T-1"})
    (req,) = srv.requests  # the replay never reached the tool
    assert req.verified is not None  # the receiver verified the signature
    assert req.headers["idempotency-key"].startswith(f"{guard.namespace}:")
    sent = json.loads(req.body)
    assert sent["args"] == {"subject": "hi"} and sent["agent_id"] == "support"


@pytest.mark.usefixtures("allow_loopback")  # the tool server is on 127.0.0.1
def test_a_remote_tool_failure_is_a_failed_decision(guard: Guard) -> None:
    with loopback(lambda req: Reply(400, b'{"error": "bad subject"}')) as srv:
        guard.gov.create_tool("crm.bad", url=srv.url)
        r = guard.gov.run_tool("support", "crm.bad", {"subject": ""})
    assert r.decision == "failed" and r.error_type == "RemoteToolError"


def test_local_registered_tools_and_agent_scopes(guard: Guard) -> None:
    gov = guard.gov
    gov.create_tool("lookup", lookup)
    assert gov.run_tool("a1", "lookup", {"q": "hi"}).result == "HI"
    gov.create_tool("lookup", lookup, scope_id="agent:a2", enabled=False)
    assert gov.run_tool("a2", "lookup", {"q": "x"}).policy_reason == "tool_disabled"
    assert gov.run_tool("a1", "lookup", {"q": "y"}).ok  # a1 still sees the global one


# -- approvals ---------------------------------------------------------------------------
def test_approvals_deny_is_final(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="s", require_approval=["refund"]))
    r = guard.call_tool(refund, {"order": "o9"}, agent_id="s")
    assert r.decision == "pending_approval" and r.approval_id
    (pending,) = guard.gov.list_approvals()
    assert pending.id == r.approval_id and pending.args == {"order": "o9"}
    denied = guard.gov.deny(r.approval_id, by="ops", reason="fraud")
    assert denied.state == "denied"
    again = guard.call_tool(refund, {"order": "o9"}, agent_id="s")
    assert (again.decision, again.policy_reason) == ("blocked", "approval_denied")
    with pytest.raises(ConfigError, match="already denied"):
        guard.gov.approve(r.approval_id)
    with pytest.raises(ConfigError, match="no approval"):
        guard.gov.approve("apr_missing")


# -- audit -------------------------------------------------------------------------------
def _audit_sql(guard: Guard, sql: str, **params: Any) -> None:
    with guard.gov.store.engine.begin() as conn:
        conn.execute(sa.text(sql), params)


def _fill(guard: Guard, n: int = 6) -> list[int]:
    guard.gov.upsert_policy(Policy(agent_id="aud", blocked_tools=["delete_*"]))
    for i in range(n):
        fn = delete_user if i % 2 else lookup
        guard.call_tool(fn, {"user": f"u{i}"} if i % 2 else {"q": f"q{i}"}, agent_id="aud")
    rows = guard.gov.store.audit_rows(guard.namespace, agent_id="aud", newest_first=False)
    assert [r["seq"] for r in rows] == list(range(1, n + 1))
    assert guard.gov.verify_audit() == []
    return [r["id"] for r in rows]


class _RedisAudit:
    """The Redis store's audit rows (id -> JSON), edited behind the store's back."""

    def __init__(self, guard: Guard) -> None:
        store = guard.gov.store
        self.client = store.client
        self.key = store._k(guard.namespace, "au")

    def edit(self, rid: int, **values: Any) -> None:
        row = json.loads(self.client.hget(self.key, rid))
        self.client.hset(self.key, rid, json.dumps({**row, **values}))

    def delete(self, rid: int) -> None:
        self.client.hdel(self.key, rid)


def _tamper(guard: Guard, tamper: str, ids: list[int]) -> None:
    if guard.gov.store.kind == "redis":
        rows = _RedisAudit(guard)
        if tamper == "value":
            rows.edit(ids[3], decision="executed")
        elif tamper == "order":  # swap the contents of rows 2 and 3 (hashes and all)
            rows.edit(ids[1], seq=3)
            rows.edit(ids[2], seq=2)
        else:
            rows.delete(ids[2] if tamper == "delete_middle" else ids[5])
        return
    t = S.audit.name
    if tamper == "value":
        _audit_sql(guard, f"UPDATE {t} SET decision = 'executed' WHERE id = :id", id=ids[3])
    elif tamper == "order":
        _audit_sql(guard, f"UPDATE {t} SET seq = -1 WHERE id = :id", id=ids[1])
        _audit_sql(guard, f"UPDATE {t} SET seq = 2 WHERE id = :id", id=ids[2])
        _audit_sql(guard, f"UPDATE {t} SET seq = 3 WHERE id = :id", id=ids[1])
    else:
        _audit_sql(
            guard,
            f"DELETE FROM {t} WHERE id = :id",
            id=ids[2] if tamper == "delete_middle" else ids[5],
        )


@pytest.mark.parametrize("tamper", ["value", "order", "delete_middle", "delete_last"])
def test_tampering_is_detected_and_located(guard: Guard, tamper: str) -> None:
    ids = _fill(guard)
    _tamper(guard, tamper, ids)
    expect = {
        "value": (4, ids[3]),
        "order": (2, ids[2]),
        "delete_middle": (3, ids[3]),
        "delete_last": (6, None),
    }[tamper]
    (problem,) = guard.gov.verify_audit()
    assert (problem["agent_id"], problem["seq"], problem["id"]) == ("aud", *expect)


def test_purge_keeps_the_chain_verifiable(guard: Guard) -> None:
    _fill(guard, 4)
    cut = guard.gov.store.now() + 1
    _fill_more = [guard.call_tool(lookup, {"q": "later"}, agent_id="aud")]
    assert _fill_more[0].ok
    removed = guard.gov.purge_audit(before=cut)
    assert removed == 5  # everything so far is older than `cut`
    assert guard.gov.verify_audit() == []
    guard.call_tool(lookup, {"q": "after purge"}, agent_id="aud")
    assert guard.gov.verify_audit() == []
    assert [e.seq for e in guard.gov.agent_logs("aud")] == [6]


def test_seeded_secrets_never_reach_any_table(guard: Guard, capsys: Any) -> None:
    guard.gov.upsert_policy(Policy(agent_id="leaky", require_approval=["refund_with"]))
    secrets = {
        "api_key": "sk_live_51HxSecretValue0123456789",
        "auth": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLXZhbHVl",
        "card": "4242 4242 4242 4242",
    }

    def pay(customer: str, card_number: str, note: str, headers: dict[str, str]) -> str:
        return "paid"

    def refund_with(token: str) -> str:
        return "ok"

    r = guard.call_tool(
        pay,
        {
            "customer": "cus_1",
            "card_number": secrets["card"],
            "note": f"use {secrets['api_key']} please",
            "headers": {"Authorization": secrets["auth"]},
        },
        agent_id="leaky",
        run_id="run-secret",
    )
    assert r.ok
    guard.call_tool(refund_with, {"token": secrets["api_key"]}, agent_id="leaky", run_id="r2")
    guard.gov.post_event("run-secret", "custom", data={"password": "hunter2-hunter2"})
    dump = []
    if guard.gov.store.kind == "redis":
        client = guard.gov.store.client
        for key in client.scan_iter(f"{guard.gov.store.prefix}:*"):
            kind = client.type(key)
            if kind == b"hash":
                dump.append(repr(client.hgetall(key)))
            elif kind == b"list":
                dump.append(repr(client.lrange(key, 0, -1)))
            elif kind == b"string":
                dump.append(repr(client.get(key)))
    else:
        with guard.gov.store.engine.connect() as conn:
            for table in S.metadata.tables.values():
                if table.name == "onceonly_ledger" and guard.gov.store.kind == "memory":
                    continue  # the memory ledger is a dict, not a table (it stores no arguments)
                dump.append(repr(conn.execute(sa.select(table)).all()))
    text = "\n".join(dump) + capsys.readouterr().err
    for value in [*secrets.values(), "hunter2-hunter2", "4242424242424242"]:
        assert value not in text
    assert "cus_1" in text  # the rest of the arguments is kept


# -- metrics, timelines, notifications ---------------------------------------------------
def test_metrics_and_timeline(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="m", blocked_tools=["delete_*"]))
    with guard.run("run-1"):
        guard.gov.post_event("run-1", "run_started", agent_id="m")
        guard.call_tool(lookup, {"q": "a"}, agent_id="m")
        guard.call_tool(lookup, {"q": "a"}, agent_id="m")
        guard.call_tool(delete_user, {"user": "u"}, agent_id="m")
        guard.call_tool(charge_card, {"customer": "c", "amount": 2.0}, agent_id="m", spend_usd=2.0)
        guard.gov.post_event("run-1", "run_finished", agent_id="m", status="ok")
    m = guard.gov.agent_metrics("m", "hour")
    assert (m.total_actions, m.executed, m.dedup, m.blocked, m.spend_usd) == (4, 2, 1, 1, 2.0)
    assert {t for t, _ in m.top_tools} == {
        "test_governance.lookup",
        "test_governance.charge_card",
    } or len(m.top_tools) == 2
    events = guard.gov.get_run_timeline("run-1")
    kinds = [e.type for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("tool_call") == 4
    assert [e.type for e in events if e.type != "tool_call"][1:-1] == [
        "tool_result",
        "dedup",
        "blocked",
        "tool_result",
    ]
    page = guard.gov.get_run_timeline("run-1", limit=3, offset=2)
    assert [e.id for e in page] == [e.id for e in events[2:5]]
    with pytest.raises(ConfigError):
        guard.gov.agent_metrics("m", "year")


@pytest.mark.usefixtures("allow_loopback")  # the tool server is on 127.0.0.1
def test_notifications_hooks_and_signed_webhooks(guard: Guard) -> None:
    got: list[dict[str, Any]] = []
    guard.gov.on_notify(got.append)
    guard.gov.upsert_policy(
        Policy(agent_id="n", blocked_tools=["delete_*"], max_spend_usd_per_day=10)
    )
    cache = ReplayCache()
    with loopback(verifying(SECRET, cache, Reply(204, b""))) as srv:
        guard.gov.add_webhook(srv.url, SECRET, events=["budget_threshold", "blocked"])
        guard.call_tool(delete_user, {"user": "u"}, agent_id="n")
        guard.call_tool(flaky, {"n": 1}, agent_id="n")
        for i in range(5):  # 2 + 2 + 2 + 2 (= 80 %) + 2
            guard.call_tool(
                charge_card, {"customer": f"c{i}", "amount": 2.0}, agent_id="n", spend_usd=2.0
            )
        assert guard.gov.flush_notifications(10)
    kinds = [e["type"] for e in got]
    assert kinds == ["blocked", "tool_failed", "budget_threshold"]
    assert got[2]["data"]["threshold"] == 0.8
    delivered = sorted(json.loads(r.body)["type"] for r in srv.requests)
    assert delivered == ["blocked", "budget_threshold"]
    assert all(r.verified for r in srv.requests)


def test_our_own_errors_give_the_reservation_back(guard: Guard) -> None:
    """A governed call that cannot run because the key is held elsewhere (InProgress)
    raises, and its reservation is released at once instead of waiting for its lease."""
    import threading

    from onceonly_core import InProgress

    guard.gov.upsert_policy(Policy(agent_id="r", max_actions_per_hour=10))
    started, release = threading.Event(), threading.Event()

    def slow(order: str) -> str:
        started.set()
        release.wait(30)
        return order

    holder = threading.Thread(
        target=guard.call_tool, args=(slow, {"order": "o1"}), kwargs={"agent_id": "r"}
    )
    holder.start()
    assert started.wait(30)
    with pytest.raises(InProgress):
        guard.call_tool(slow, {"order": "o1"}, agent_id="r", wait=0)
    assert guard.gov.store.holds(guard.namespace, "r") == 1  # only the running call's
    release.set()
    holder.join(30)
    assert guard.gov.store.holds(guard.namespace, "r") == 0
    hour = int(guard.gov.store.now() // 3600) * 3600
    assert guard.gov.store.counter(guard.namespace, "r", "actions", hour) == 1


def test_a_hold_swept_while_its_tool_still_ran_stays_counted_and_is_audited_once() -> None:
    """A worker that outlives its lease (paused, not dead) had its hold swept by another
    caller: the tool may have run, so the sweep keeps the spend counted and writes the
    call's audit row; the late settle then counts nothing twice and writes no second row."""
    from onceonly_core import MemoryStore
    from onceonly_core.stores.govsql import GovStore, Want

    clock = [1_000_000.0]
    store = GovStore(MemoryStore(clock=lambda: clock[0]))
    day = int(clock[0] // DAY) * DAY
    wants = [Want("spend", day, 600_000, 1_000_000, "daily_spend_exceeded")]
    entry = {
        "agent_id": "a",
        "tool": "pay",
        "args_digest": None,
        "args": "{}",
        "decision": "unknown",
        "reason": "lease_expired",
        "risk_level": "low",
        "spend_micros": 600_000,
        "run_id": None,
        "token": None,
        "idem_key": "k1",
    }
    held = store.reserve("t", "a", "ns", "k1", wants, lease=1.0, audit=entry)
    assert held.ok and held.id is not None
    clock[0] += 5  # the holder stalls past its lease
    other = store.reserve("t", "a", "ns", "k2", wants, lease=1.0)
    assert not other.ok  # the stalled hold was swept as spent: 0.6 + 0.6 does not fit
    assert store.counter("t", "a", "spend", day) == 600_000
    assert store.holds("t", "a") == 0
    rows = store.audit_rows("t", agent_id="a")
    assert [(r["decision"], r["reason"], r["idem_key"]) for r in rows] == [
        ("unknown", "lease_expired", "k1")
    ]
    late = {**entry, "decision": "executed", "reason": "ok", "token": 1}
    assert store.settle("t", "a", held.id, [["spend", day, 600_000]], late) is False
    assert store.counter("t", "a", "spend", day) == 600_000  # counted once
    assert store.release("t", "a", held.id) is False  # nothing to give back: it may have run
    assert store.counter("t", "a", "spend", day) == 600_000
    assert len(store.audit_rows("t", agent_id="a")) == 1  # one row for one call


def test_arguments_excluded_from_the_key_are_not_audited(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="ex"))

    def send(to: str, client: Any) -> str:
        return to

    r = guard.call_tool(
        send, {"to": "a@example.com", "client": object()}, agent_id="ex", exclude=["client"]
    )
    assert r.ok
    (entry,) = guard.gov.agent_logs("ex")
    assert entry.args == {"to": "a@example.com"}


class _NoOutbox:
    """A custom governance store's view of a real one: every primitive but the outbox's."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name in ("outbox", "enqueue_notification") or name.startswith("outbox_"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_a_store_without_an_outbox_says_so_once_instead_of_dropping_in_silence(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from onceonly_core.governance import engine

    monkeypatch.setattr(engine, "_WARNED_NO_OUTBOX", set())
    g = Guard("memory://", quiet=True)
    try:
        g.gov.share_store(_NoOutbox(g.gov.store))  # type: ignore[arg-type]
        got: list[dict[str, Any]] = []
        g.gov.on_notify(got.append)
        with caplog.at_level(logging.WARNING, "onceonly.governance"):
            for run in ("r1", "r2"):
                g.gov.notify({"type": "run_failed", "reason": "failed", "data": {"run_id": run}})
    finally:
        g.close()
    assert [e["type"] for e in got] == ["run_failed", "run_failed"]  # hooks still run
    warned = [r.getMessage() for r in caplog.records if "no notification outbox" in r.getMessage()]
    assert len(warned) == 1 and "_NoOutbox" in warned[0] and "not delivered" in warned[0]


def test_the_hot_path_snapshot_keeps_the_agent_and_global_rows_apart(guard: Guard) -> None:
    """A capped agent's calls take the one-transaction snapshot (GovernanceStore.begin,
    the raw-SQL fast path). With a global switch row present, the agent's own row (its
    kill switch, its caps) stays the agent's on every store."""
    gov = guard.gov
    gov.upsert_policy(Policy(agent_id="bot", max_calls_per_tool={"charge_card": 2}))
    gov.disable_all("drill")
    gov.enable_all()  # the global row stays, enabled
    args = {"customer": "c", "amount": 1.0}
    first = guard.call_tool(charge_card, args, agent_id="bot")
    assert first.decision == "executed"  # the agent/tool pair is capped from now on
    gov.disable_agent("bot", "rogue")
    stopped = guard.call_tool(charge_card, {**args, "amount": 2.0}, agent_id="bot")
    assert (stopped.decision, stopped.policy_reason) == ("blocked", "agent_disabled")
    gov.enable_agent("bot")
    second = guard.call_tool(charge_card, {**args, "amount": 3.0}, agent_id="bot")
    capped = guard.call_tool(charge_card, {**args, "amount": 4.0}, agent_id="bot")
    assert second.decision == "executed"
    assert (capped.decision, capped.policy_reason) == (
        "blocked",
        "max_calls_per_tool_exceeded",
    )
    # The global switch, flipped: read as the global row, not lost under the agent's
    # (MariaDB hands the snapshot's ids back as bytes; "*" sorts before "bot").
    gov.disable_all("drill")
    killed = guard.call_tool(charge_card, {**args, "amount": 5.0}, agent_id="bot")
    assert (killed.decision, killed.policy_reason) == ("blocked", "agent_disabled")
    assert killed.error == "drill"  # the global row's reason, not the agent's
