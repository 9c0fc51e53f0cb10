"""The governance store contract suite: subclass :class:`GovernanceContract` and give it
a ledger whose ``governance_store()`` returns your
:class:`~onceonly_core.governance.base.GovernanceStore`.

What it checks is what the governance engine trusts, primitive by primitive (each
method's docstring in ``governance/base.py`` says what must be atomic): a reservation
checks every cap in order and holds every amount or nothing, and concurrent reservations
never both pass a cap only one fits; settle, release and the sweep of an expired hold each
win a hold at most once (an expired hold stays counted: its tool may have run); an
approval request is shared by concurrent askers, authorises one execution, and a decision
is final; each agent's audit rows form one hash chain that ``verify_audit`` accepts, even
under concurrent appends and after a purge; the snapshot, the registry, timelines and
webhooks read back what was written.

This module imports pytest; :mod:`onceonly_core` never imports it. Fixtures to provide:

``ledger``   the ledger :class:`~onceonly_core.stores.base.Store` (required; yield it and
             close it afterwards). Its ``governance_store()`` is what is tested.
``tenant``   a tenant no other test uses (the default makes a fresh one), so tests can
             share one database.

Tampering detection is not checked here (how to alter a row behind the store's back is the
backend's business): test it against your backend as ``tests/governance`` does for ours.
"""

from __future__ import annotations

import threading
import time
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ..errors import ConfigError
from ..governance.base import GovernanceStore, Want, audit_fields, chain_hash
from ..stores.base import NewClaim, Store

__all__ = ["GovernanceContract"]

DAY = 86_400


def _entry(key: str, decision: str = "executed", **kw: Any) -> dict[str, Any]:
    return {
        "agent_id": "a",
        "tool": "pay",
        "args_digest": None,
        "args": "{}",
        "decision": decision,
        "reason": "ok",
        "risk_level": "low",
        "spend_micros": 0,
        "run_id": None,
        "token": None,
        "idem_key": key,
        **kw,
    }


def _complete(
    gov: GovernanceStore,
    tenant: str,
    ledger: Store,
    ns: str,
    rec: Any,
    rid: str | None,
    amounts: list[Any],
) -> bool:
    """gov.complete of claim ``rec`` (its result ``"ok"``), for hold ``rid``."""
    return gov.complete(
        tenant,
        "a",
        rid,
        amounts,
        ledger,
        ns,
        rec.key,
        rec.token,
        result='"ok"',
        error=None,
        ttl=None,
        audit=_entry(rec.key, token=rec.token),
        lost=_entry(rec.key, token=rec.token, reason="lease_lost"),
    )


def _day(gov: GovernanceStore) -> int:
    return int(gov.now() // DAY) * DAY


def _threads(n: int, fn: Any) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            start.wait(30)
            fn(i)
        except BaseException as err:  # reported by the caller
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


class GovernanceContract:
    """The contract every governance store keeps. Subclass it in a test module (name the
    subclass ``Test…``) and provide the ``ledger`` fixture."""

    #: False for a store that refuses :meth:`GovernanceStore.purge_audit` with
    #: ConfigError because audit retention is an operator's job elsewhere (remote mode:
    #: on the server). The kit then checks the refusal instead of the purge.
    purges_audit: bool = True

    #: True for a store bound to one tenant (remote mode: the API key's), which puts every
    #: call in it whatever tenant the call names; the cross-tenant checks are then skipped
    #: (the binding is the store's own test to prove).
    one_tenant: bool = False

    @pytest.fixture
    def ledger(self) -> Iterator[Store]:
        raise NotImplementedError("a GovernanceContract subclass provides the `ledger` fixture")
        yield  # pragma: no cover

    @pytest.fixture
    def gov(self, ledger: Store) -> Iterator[GovernanceStore]:
        store = ledger.governance_store()
        yield store
        store.close()

    @pytest.fixture
    def tenant(self) -> str:
        return f"t-{uuid.uuid4().hex[:12]}"

    # -- budgets ------------------------------------------------------------------------
    def test_reserve_checks_every_cap_in_order_and_holds_all_or_nothing(
        self, gov: GovernanceStore, tenant: str
    ) -> None:
        day = _day(gov)
        wants = [
            Want("actions", day, 1, 5, "actions"),
            Want("spend", day, 400_000, 1_000_000, "spend"),
        ]
        one = gov.reserve(tenant, "a", "ns", "k1", wants, lease=60)
        two = gov.reserve(tenant, "a", "ns", "k2", wants, lease=60)
        assert one.ok and two.ok and one.id and two.id and one.id != two.id
        assert two.after[("spend", day)] == 800_000
        three = gov.reserve(tenant, "a", "ns", "k3", wants, lease=60)
        assert not three.ok and three.id is None
        assert three.failed == wants[1] and three.used == 800_000
        # Nothing of the failed reservation was written, not even the count that fitted.
        assert gov.counter(tenant, "a", "actions", day) == 2
        assert gov.counter(tenant, "a", "spend", day) == 800_000
        assert gov.holds(tenant, "a") == 2
        assert gov.holds(tenant, "b") == 0  # per agent
        assert {h["id"] for h in gov.pending_holds(tenant)} == {one.id, two.id}

    def test_concurrent_reservations_never_pass_a_cap_together(
        self, gov: GovernanceStore, tenant: str
    ) -> None:
        day = _day(gov)
        wants = [Want("spend", day, 3, 100, "spend")]
        for agent in ("r1", "r2", "r3"):  # three races: a lost update shows in one of them
            won: list[str] = []

            def reserve(i: int, agent: str = agent, won: list[str] = won) -> None:
                for j in range(8):
                    r = gov.reserve(tenant, agent, "ns", f"{i}-{j}", wants, lease=60)
                    if r.ok and r.id:
                        won.append(r.id)

            assert _threads(8, reserve) == []
            # 33 * 3 = 99 <= 100 < 34 * 3: no overshoot, no undershoot.
            assert len(won) == 33, (agent, len(won))
            assert gov.counter(tenant, agent, "spend", day) == 99

    def test_another_tenants_hold_is_neither_settled_nor_released(
        self, gov: GovernanceStore, tenant: str
    ) -> None:
        if self.one_tenant:
            pytest.skip("this store serves one tenant whatever the call names")
        day = _day(gov)
        hold = gov.reserve(tenant, "a", "ns", "k", [Want("spend", day, 5, 10, "s")], lease=60)
        assert hold.id
        other = f"{tenant}-other"
        assert gov.settle(other, "a", hold.id, [["spend", day, 5]], _entry("k")) is False
        assert gov.release(other, "a", hold.id, _entry("k", "failed")) is False
        assert [h["id"] for h in gov.pending_holds(tenant)] == [hold.id]
        assert gov.counter(tenant, "a", "spend", day) == 5
        assert gov.audit_rows(other) == []
        assert gov.release(tenant, "a", hold.id) is True

    def test_settle_and_release_win_a_hold_at_most_once(
        self, gov: GovernanceStore, tenant: str
    ) -> None:
        day = _day(gov)
        wants = [Want("spend", day, 250, None, "spend")]
        ran = gov.reserve(tenant, "a", "ns", "k1", wants, lease=60)
        not_run = gov.reserve(tenant, "a", "ns", "k2", wants, lease=60)
        assert ran.id and not_run.id
        amounts = [["spend", day, 250]]
        assert gov.settle(tenant, "a", ran.id, amounts, _entry("k1")) is True
        assert gov.settle(tenant, "a", ran.id, amounts, _entry("k1")) is False
        assert gov.release(tenant, "a", ran.id) is False  # it ran: nothing given back
        assert gov.counter(tenant, "a", "spend", day) == 500
        failed = _entry("k2", "failed")
        assert gov.release(tenant, "a", not_run.id, failed) is True
        assert gov.release(tenant, "a", not_run.id, failed) is False
        assert gov.counter(tenant, "a", "spend", day) == 250
        rows = gov.audit_rows(tenant, agent_id="a", newest_first=False)
        assert [(r["idem_key"], r["decision"]) for r in rows] == [
            ("k1", "executed"),
            ("k2", "failed"),
        ]
        assert gov.holds(tenant, "a") == 0

    def test_an_expired_hold_is_swept_as_spent_and_audited_once(
        self, gov: GovernanceStore, tenant: str
    ) -> None:
        day = _day(gov)
        wants = [Want("spend", day, 600, 1000, "spend")]
        entry = _entry("k1", "unknown", reason="lease_expired", spend_micros=600)
        held = gov.reserve(tenant, "a", "ns", "k1", wants, lease=0.2, audit=entry)
        assert held.ok and held.id
        kept = gov.reserve(tenant, "b", "ns", "k9", wants, lease=60, audit=entry)
        assert kept.id
        assert gov.extend(kept.id, 60) is True
        assert gov.extend_hold(tenant, "b", kept.id, 60) is True  # by its key, as the heartbeat
        deadline = time.monotonic() + 10
        while not any(h["expired"] for h in gov.pending_holds(tenant)):
            assert time.monotonic() < deadline, "the hold never expired by the store's clock"
            time.sleep(0.05)
        # The next reservation of the agent sweeps it, as spent: 600 + 600 does not fit.
        other = gov.reserve(tenant, "a", "ns", "k2", wants, lease=60)
        assert not other.ok and other.used == 600
        assert gov.holds(tenant, "a") == 0 and gov.holds(tenant, "b") == 1
        rows = gov.audit_rows(tenant, agent_id="a")
        assert [(r["decision"], r["reason"], r["idem_key"]) for r in rows] == [
            ("unknown", "lease_expired", "k1")
        ]
        late = _entry("k1", token=1)
        assert gov.settle(tenant, "a", held.id, [["spend", day, 600]], late) is False
        assert gov.release(tenant, "a", held.id) is False
        assert gov.extend(held.id, 60) is False
        assert gov.counter(tenant, "a", "spend", day) == 600
        assert len(gov.audit_rows(tenant, agent_id="a")) == 1
        assert gov.sweep(tenant) == 0  # b's hold was extended: not expired
        assert gov.verify_audit(tenant) == []

    # -- approvals ----------------------------------------------------------------------
    def test_an_approval_is_shared_taken_once_and_final(
        self, gov: GovernanceStore, tenant: str
    ) -> None:
        asks: list[dict[str, Any]] = []

        def ask(i: int) -> None:
            asks.append(gov.approval_for(tenant, "a", "refund", "ns", "k", "{}"))

        assert _threads(8, ask) == []
        assert len({a["id"] for a in asks}) == 1  # concurrent askers share one request
        rid = asks[0]["id"]
        assert {a["state"] for a in asks} == {"pending"}
        decided = gov.decide_approval(tenant, rid, "approved", "ops", None)
        assert decided is not None and decided["changed"] and decided["state"] == "approved"
        again = gov.decide_approval(tenant, rid, "denied", "ops", "late")
        assert again is not None and not again["changed"] and again["state"] == "approved"
        assert gov.decide_approval(tenant, "apr_missing", "approved", None, None) is None
        took: list[dict[str, Any]] = []

        def take(i: int) -> None:
            took.append(gov.approval_for(tenant, "a", "refund", "ns", "k", "{}", 60.0))

        assert _threads(8, take) == []
        assert [t["state"] for t in took].count("approved") == 1  # one execution
        assert {t["id"] for t in took} == {rid}  # the rest wait for it (in flight)
        assert gov.restore_approval(tenant, rid) is True  # it did not run after all
        assert gov.restore_approval(tenant, rid) is False
        assert gov.approval_for(tenant, "a", "refund", "ns", "k", "{}")["state"] == "approved"
        nxt = gov.approval_for(tenant, "a", "refund", "ns", "k", "{}")
        assert nxt["state"] == "pending" and nxt["id"] != rid  # consumed: a new round
        denied = gov.approval_for(tenant, "a", "refund", "ns", "k2", "{}")
        gov.decide_approval(tenant, denied["id"], "denied", "ops", "no")
        gov.consume_approval(tenant, denied["id"])  # no-op: not approved
        assert gov.approval_for(tenant, "a", "refund", "ns", "k2", "{}")["state"] == "denied"
        states = {r["id"]: r["state"] for r in gov.list_approvals(tenant)}
        assert states == {rid: "consumed", nxt["id"]: "pending", denied["id"]: "denied"}
        assert [r["id"] for r in gov.list_approvals(tenant, "pending")] == [nxt["id"]]

    # -- audit --------------------------------------------------------------------------
    def test_concurrent_appends_make_one_verifying_chain_per_agent(
        self, gov: GovernanceStore, tenant: str
    ) -> None:
        def append(i: int) -> None:
            for j in range(10):
                entry = _entry(f"{i}-{j}", agent_id="a" if i % 2 else "b")
                gov.append_audit(tenant, entry)

        assert _threads(6, append) == []
        for agent in ("a", "b"):
            rows = gov.audit_rows(tenant, agent_id=agent, limit=1000, newest_first=False)
            assert [r["seq"] for r in rows] == list(range(1, 31))
            prev = rows[0]["prev_hash"]
            for r in rows:
                assert r["prev_hash"] == prev
                prev = r["hash"]
        first = gov.audit_rows(tenant, agent_id="a", limit=1, newest_first=False)[0]
        fields = audit_fields(types.SimpleNamespace(**first))  # the hashed part of a row
        assert chain_hash(first["prev_hash"], fields) == first["hash"]
        assert gov.chain_count(tenant) == 2
        assert gov.verify_audit(tenant) == []
        calls = gov.audited_calls(tenant)
        assert len(calls) == 60 and calls["1-0"] == {None}
        cut = gov.audit_rows(tenant, agent_id="a", limit=1000, newest_first=False)[14]
        if self.purges_audit:
            assert gov.purge_audit(tenant, cut["created_at"] + 1e-6) >= 15
        else:  # retention belongs to an operator elsewhere: refused, and nothing is gone
            with pytest.raises(ConfigError):
                gov.purge_audit(tenant, cut["created_at"] + 1e-6)
            assert len(gov.audit_rows(tenant, agent_id="a", limit=1000)) == 30
        assert gov.verify_audit(tenant) == []
        assert gov.append_audit(tenant, _entry("late"))[0] == 31
        assert gov.verify_audit(tenant) == []
        m = gov.metrics(tenant, "a", 0.0)
        assert m["by_decision"]["executed"] >= 1 and m["top_tools"][0][0] == "pay"

    # -- agents, tools, timeline, webhooks ---------------------------------------------
    def test_snapshot_reads_the_agent_the_switch_and_the_tool(
        self, gov: GovernanceStore, tenant: str
    ) -> None:
        empty = gov.snapshot(tenant, "a", "lookup")
        assert (empty["agent"], empty["global"], empty["tool"]) == (None, None, None)
        gov.put_agent(tenant, "a", policy='{"agent_id": "a"}')
        gov.put_agent(tenant, "a", disabled=True, reason="rogue")
        gov.put_agent(tenant, "*", disabled=True, reason="all stop")
        tool: dict[str, Any] = {
            "scope_id": "global",
            "name": "lookup",
            "kind": "local",
            "auth": "none",
        }
        tool |= {"url": None, "secret": None, "timeout_ms": 1000, "max_retries": 0}
        tool |= {"enabled": True, "description": None}
        gov.put_tool(tenant, tool)
        gov.put_tool(tenant, {**tool, "scope_id": "agent:a", "enabled": False})
        snap = gov.snapshot(tenant, "a", "lookup")
        assert snap["now"] == pytest.approx(gov.now(), abs=5)
        agent = snap["agent"]
        assert agent["policy"] == '{"agent_id": "a"}'  # not lost by the second write
        assert agent["disabled"] and agent["disabled_reason"] == "rogue"
        assert snap["global"]["disabled"] and snap["global"]["disabled_reason"] == "all stop"
        assert snap["tool"]["scope_id"] == "agent:a" and not snap["tool"]["enabled"]
        assert gov.snapshot(tenant, "b", "lookup")["tool"]["scope_id"] == "global"
        gov.put_agent(tenant, "a", disabled=False)
        row = gov.get_agent(tenant, "a")
        assert row is not None and not row["disabled"] and row["disabled_reason"] is None
        assert [r["agent_id"] for r in gov.list_agents(tenant)] == ["a"]  # not the switch
        assert gov.set_tool_enabled(tenant, "lookup", "agent:a", True) is True
        assert gov.set_tool_enabled(tenant, "nope", "global", True) is False
        assert [t["scope_id"] for t in gov.get_tools(tenant, name="lookup")] == [
            "agent:a",
            "global",
        ]
        assert gov.delete_tool(tenant, "lookup", "agent:a") is True
        assert gov.delete_tool(tenant, "lookup", "agent:a") is False
        assert [t["scope_id"] for t in gov.get_tools(tenant)] == ["global"]

    def test_begin_reads_the_snapshot_then_reserves_what_decide_asks(
        self, gov: GovernanceStore, tenant: str
    ) -> None:
        """begin = snapshot + decide + reserve (one transaction where the store can):
        the snapshot decide sees is the one returned; None reserves nothing; the
        reservation checks its caps as reserve does; an expired hold is swept first."""
        day = _day(gov)
        gov.put_agent(tenant, "a", policy='{"agent_id": "a"}')
        seen: list[dict[str, Any]] = []

        def nothing(snap: dict[str, Any]) -> None:
            seen.append(snap)
            return None

        snap, res = gov.begin(tenant, "a", "pay", "ns", "k0", nothing, 60)
        assert res is None and seen and seen[-1]["agent"] == snap["agent"]
        assert snap["agent"]["policy"] == '{"agent_id": "a"}' and snap["tool"] is None
        assert snap["now"] == pytest.approx(gov.now(), abs=5)
        assert gov.holds(tenant, "a") == 0
        wants = [Want("actions", day, 1, 2, "actions"), Want("spend", day, 7, None, "spend")]
        entry = _entry("k1", decision="pending")

        def some(snap: dict[str, Any]) -> tuple[list[Want], dict[str, Any]]:
            assert snap["agent"] is not None
            return wants, entry

        _, one = gov.begin(tenant, "a", "pay", "ns", "k1", some, 0.2)
        assert one is not None and one.ok and one.id
        assert one.after[("actions", day)] == 1 and one.after[("spend", day)] == 7
        _, two = gov.begin(tenant, "a", "pay", "ns", "k2", some, 60)
        assert two is not None and two.ok
        _, three = gov.begin(tenant, "a", "pay", "ns", "k3", some, 60)
        assert three is not None and not three.ok and three.failed == wants[0]
        assert gov.counter(tenant, "a", "spend", day) == 14  # nothing of the refusal
        time.sleep(0.5)  # k1's lease runs out: the next begin sweeps it as spent
        _, four = gov.begin(tenant, "a", "pay", "ns", "k4", some, 60)
        assert four is not None and not four.ok  # the swept hold stays counted
        assert gov.holds(tenant, "a") == 1
        rows = gov.audit_rows(tenant, agent_id="a")
        assert [(r["idem_key"], r["decision"]) for r in rows] == [("k1", "unknown")]
        assert two.id is not None and gov.settle(tenant, "a", two.id, [], _entry("k2")) is True
        assert gov.verify_audit(tenant) == []

    def test_begin_claim_and_complete_join_the_ledger_or_leave_it_alone(
        self, ledger: Store, gov: GovernanceStore, tenant: str
    ) -> None:
        """begin_claim = begin with the ledger's claim in its transaction; a store that
        cannot join the ledger claims nothing (returns no record) and the caller claims.
        A refusal (decide's, or a cap's) leaves no claim. complete = the fenced
        completion and the settle: ``audit`` when it matched, ``lost`` when the token
        was stale; retried after it committed, it writes nothing more."""
        day = _day(gov)
        gov.put_agent(tenant, "a", policy='{"agent_id": "a"}')
        ns = f"ns-{tenant}"
        new = NewClaim("pay", "me", 60.0)
        wants = [Want("spend", day, 5, 10, "spend")]

        def go(snap: dict[str, Any], rec: Any) -> Any:
            assert snap["agent"] is not None and (rec is None or rec.mine)
            return True, (wants, _entry("k", decision="unknown", reason="lease_expired"))

        def claimed(key: str, decide: Any = go) -> tuple[Any, Any]:
            _, res, rec = gov.begin_claim(tenant, "a", "pay", ledger, ns, key, new, decide, 60)
            if res is not None and res.ok and rec is None:
                rec = ledger.claim(ns, key, new)  # not joined: the caller claims
            return res, rec

        res, rec = claimed("k1")
        assert res is not None and res.ok and res.id and rec is not None and rec.mine
        assert ledger.get(ns, "k1") is not None
        too_much = [Want("spend", day, 50, 10, "spend")]
        no, rec2 = claimed("k2", lambda snap, rec: (True, (too_much, None)))
        assert no is not None and not no.ok and rec2 is None
        assert ledger.get(ns, "k2") is None  # the cap refused it: no claim survives
        none, rec3 = claimed("k3", lambda snap, rec: (False, None))
        assert none is None and rec3 is None and ledger.get(ns, "k3") is None

        def complete(res: Any, rec: Any) -> bool:
            return _complete(gov, tenant, ledger, ns, rec, res.id, [["spend", day, 5]])

        assert complete(res, rec) is True
        got = ledger.get(ns, "k1")
        assert got is not None and (got.state, got.result) == ("succeeded", '"ok"')
        assert complete(res, rec) is True  # a retry: completed already, nothing written
        res4, rec4 = claimed("k4")
        assert res4 is not None and res4.ok and rec4 is not None
        assert ledger.take_over(ns, "k4", rec4, new, force=True) is not None  # lease lost
        assert complete(res4, rec4) is False
        assert gov.holds(tenant, "a") == 0
        assert gov.counter(tenant, "a", "spend", day) == 10  # both ran: both counted
        rows = gov.audit_rows(tenant, agent_id="a", newest_first=False)
        assert [(r["idem_key"], r["decision"], r["reason"]) for r in rows] == [
            ("k1", "executed", "ok"),
            ("k4", "executed", "lease_lost"),
        ]
        assert gov.verify_audit(tenant) == []

    def test_a_completion_without_a_hold_audits_once_however_often_it_is_retried(
        self, ledger: Store, gov: GovernanceStore, tenant: str
    ) -> None:
        """complete with ``rid=None`` (the call reserved nothing): the completion and
        its audit row. Retried after it committed (its reply lost) — even behind more
        of the agent's rows than one page of ``audit_rows`` — it appends nothing more;
        a lost lease's row is appended once too."""
        ns = f"ns-{tenant}"
        new = NewClaim("pay", "me", 60.0)
        rec = ledger.claim(ns, "k1", new)

        def complete(rec: Any) -> bool:
            return _complete(gov, tenant, ledger, ns, rec, None, [])

        assert complete(rec) is True
        for i in range(120):  # other calls of the same agent, after it
            gov.append_audit(tenant, _entry(f"other-{i}", token=1))
        assert complete(rec) is True  # the retry: completed already
        lost = ledger.claim(ns, "k2", new)
        assert ledger.take_over(ns, "k2", lost, new, force=True) is not None
        assert complete(lost) is False
        assert complete(lost) is False  # the lease-lost row, retried
        rows = gov.audit_rows(tenant, agent_id="a", limit=1000, newest_first=False)
        mine = [(r["idem_key"], r["reason"]) for r in rows if not r["idem_key"].startswith("o")]
        assert mine == [("k1", "ok"), ("k2", "lease_lost")]
        assert gov.verify_audit(tenant) == []

    def test_timelines_and_webhooks_read_back(self, gov: GovernanceStore, tenant: str) -> None:
        ids = [
            gov.post_event(
                tenant,
                {"run_id": "r1", "type": f"e{i}", "agent_id": "a", "tool": None}
                | {"status": None, "data": None},
            )
            for i in range(5)
        ]
        assert ids == sorted(ids) and len(set(ids)) == 5
        page = gov.timeline(tenant, "r1", 2, 1)
        assert [e["type"] for e in page] == ["e1", "e2"] and page[0]["id"] == ids[1]
        assert gov.timeline(tenant, "r2", 10, 0) == []
        wid = gov.add_webhook(
            tenant,
            {"url": "https://example.com/h", "secret": "whsec_x", "events": "[]"}
            | {"budget_threshold": None, "enabled": True},
        )
        assert [w["id"] for w in gov.list_webhooks(tenant)] == [wid]
        assert gov.delete_webhook(tenant, wid) is True
        assert gov.delete_webhook(tenant, wid) is False
        assert gov.list_webhooks(tenant) == []
