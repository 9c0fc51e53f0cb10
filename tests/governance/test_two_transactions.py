"""A governed call in two transactions (issue 15): reserve + claim, then settle +
complete + audit, on every SQL ledger (SQLite, PostgreSQL, MariaDB).

Counted at the seams where a transaction starts: each ledger statement outside the
governance store is one (autocommitted), each governance-store primitive is one
(``GovStore._tx``; SQLite's plain reads, ``_read``). Also here: a call a cap refuses
leaves no ledger record behind, and a lease lost at completion still counts the spend
and audits ``lease_lost`` once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from onceonly_core import Guard, current_call
from onceonly_core.errors import LeaseLost
from onceonly_core.governance import Policy
from onceonly_core.governance.engine import DAY
from onceonly_core.stores.base import NewClaim
from onceonly_core.stores.sql import SQLStore
from onceonly_core.testing.governance_contract import _entry as audit_entry

PRICE = 4.0


@pytest.fixture
def guard(db_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Guard]:
    monkeypatch.setenv(
        "ONCEONLY_GOV_JOIN", "1"
    )  # the joined path (the default; set in case the env says 0)
    if db_url.startswith(("postgresql", "mysql")):
        with SQLStore(db_url) as store:
            store.migrate()
    g = Guard(db_url, namespace=namespace, quiet=True)
    yield g
    g.close()


def capped(g: Guard, cap: float = 100.0) -> None:
    g.gov.upsert_policy(
        Policy(
            agent_id="payer",
            max_actions_per_hour=1000,
            max_spend_usd_per_day=cap,
            pricing_rules={"*": PRICE},
        )
    )


def spent(g: Guard) -> float:
    today = int(g.gov.store.now() // DAY) * DAY
    return g.gov.store.counter(g.namespace, "payer", "spend", today) / 1e6


def rows(g: Guard) -> list[tuple[str, str]]:
    return [(e.decision, e.reason) for e in reversed(g.gov.agent_logs("payer"))]


class Transactions:
    """Counts the transactions a block of calls starts, by where they start."""

    def __init__(self, g: Guard, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ledger = 0
        self.governance = 0
        ledger, gov = g.store, g.gov.store
        for obj, name, side in (
            (ledger, "_run", "ledger"),
            (ledger, "get", "ledger"),  # SQLite's read skips _run
            (gov, "_tx", "governance"),
            (gov, "_read", "governance"),
        ):
            monkeypatch.setattr(obj, name, self._counting(getattr(obj, name), side))
        self.on = False

    def _counting(self, fn: Callable[..., Any], side: str) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.on and not getattr(self, "_inside", False):
                setattr(self, side, getattr(self, side) + 1)
                self._inside = True  # get() may run _run: one transaction, counted once
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._inside = False
            return fn(*args, **kwargs)

        return counted

    @property
    def total(self) -> int:
        return self.ledger + self.governance


def pay(n: int) -> int:
    return n


def three_calls_commit_twice(
    guard: Guard, monkeypatch: pytest.MonkeyPatch, price: float
) -> Transactions:
    """A warm-up call, then three new keys, each in exactly the two governance
    transactions (begin_claim, complete) and no ledger transaction of its own."""
    guard.call_tool(pay, {"n": 0}, tool="pay", agent_id="payer")  # warm: schema, pools
    tx = Transactions(guard, monkeypatch)
    for n in range(1, 4):
        tx.on = True
        r = guard.call_tool(pay, {"n": n}, tool="pay", agent_id="payer")
        tx.on = False
        assert (r.decision, r.result, r.spend_usd) == ("executed", n, price)
        assert (tx.ledger, tx.governance) == (0, 2), n
        tx.ledger = tx.governance = 0
    return tx


def test_a_governed_call_commits_twice(guard: Guard, monkeypatch: pytest.MonkeyPatch) -> None:
    capped(guard)
    tx = three_calls_commit_twice(guard, monkeypatch, PRICE)
    assert spent(guard) == 4 * PRICE
    assert rows(guard) == [("executed", "ok")] * 4
    assert guard.gov.verify_audit() == []
    assert guard.gov.store.holds(guard.namespace, "payer") == 0
    # A replay: the claim finds the record, nothing is reserved; its audit row follows.
    tx.on = True
    r = guard.call_tool(pay, {"n": 1}, tool="pay", agent_id="payer")
    tx.on = False
    assert (r.decision, r.spend_usd) == ("dedup", 0.0)
    assert tx.total <= 2
    assert spent(guard) == 4 * PRICE


@pytest.mark.parametrize("policy", ["a policy without caps", "no policy"])
def test_a_governed_call_without_caps_commits_twice(
    guard: Guard, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """A policy without caps still counts actions and spend (a hold, settled at
    completion); an agent without a policy reserves nothing: its claim joins the
    snapshot's transaction and its audit row the completion's. One row per execution,
    a retried completion included."""
    if policy != "no policy":
        guard.gov.upsert_policy(Policy(agent_id="payer", allowed_tools=["pay"]))
    three_calls_commit_twice(guard, monkeypatch, 0.0)
    assert rows(guard) == [("executed", "ok")] * 4
    assert guard.gov.store.holds(guard.namespace, "payer") == 0
    # The completion retried after it committed (its reply lost): no second row.
    store, ledger = guard.gov.store, guard.store
    rec = ledger.claim(guard.namespace, "retried", NewClaim("pay", "me", 60.0))
    entry = audit_entry("retried", agent_id="payer", token=rec.token)
    for _ in range(2):
        done = store.complete(
            guard.namespace,
            "payer",
            None,
            [],
            ledger,
            guard.namespace,
            "retried",
            rec.token,
            result="1",
            error=None,
            ttl=None,
            audit=entry,
            lost={**entry, "reason": "lease_lost"},
        )
        assert done is True
    assert rows(guard)[-1] == ("executed", "ok") and len(rows(guard)) == 5
    assert guard.gov.verify_audit() == []


def test_an_async_governed_call_commits_twice(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    capped(guard)

    async def apay(n: int) -> int:
        await asyncio.sleep(0)
        return n

    async def main() -> None:
        await guard.acall_tool(apay, {"n": 0}, tool="apay", agent_id="payer")
        tx = Transactions(guard, monkeypatch)
        tx.on = True
        r = await guard.acall_tool(apay, {"n": 1}, tool="apay", agent_id="payer")
        tx.on = False
        assert (r.decision, r.result, r.spend_usd) == ("executed", 1, PRICE)
        assert (tx.ledger, tx.governance) == (0, 2)

    asyncio.run(main())
    assert spent(guard) == 2 * PRICE
    assert rows(guard) == [("executed", "ok")] * 2


def test_a_call_a_cap_refuses_leaves_no_ledger_record(guard: Guard) -> None:
    capped(guard, cap=PRICE)
    ran: list[int] = []

    def charge(n: int) -> int:
        ran.append(n)
        return n

    assert guard.call_tool(charge, {"n": 1}, tool="charge", agent_id="payer").ok
    refused = guard.call_tool(charge, {"n": 2}, tool="charge", agent_id="payer")
    assert (refused.decision, refused.policy_reason) == ("blocked", "daily_spend_exceeded")
    assert refused.key is not None
    # The claim made in the refused call's transaction was rolled back with it.
    assert guard.store.get(guard.namespace, refused.key) is None
    assert guard.gov.store.holds(guard.namespace, "payer") == 0
    # Under a raised cap the same call runs as a new key: not an unknown outcome, not
    # "in progress" behind a claim nobody holds.
    capped(guard, cap=2 * PRICE)
    again = guard.call_tool(charge, {"n": 2}, tool="charge", agent_id="payer", lease=30.0)
    assert (again.decision, again.result, again.token) == ("executed", 2, 1)
    assert ran == [1, 2]
    assert spent(guard) == 2 * PRICE
    assert rows(guard) == [
        ("executed", "ok"),
        ("blocked", "daily_spend_exceeded"),
        ("executed", "ok"),
    ]


def test_a_blocked_call_leaves_no_ledger_record(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="payer", blocked_tools=["charge"]))
    r = guard.call_tool(pay, {"n": 1}, tool="charge", agent_id="payer")
    assert (r.decision, r.policy_reason) == ("blocked", "tool_blocked")
    assert r.key is not None and guard.store.get(guard.namespace, r.key) is None


def test_a_lease_lost_at_completion_counts_the_spend_and_audits_once(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    capped(guard)
    ns = guard.namespace
    ledger = guard.store
    assert isinstance(ledger, SQLStore)
    tx = Transactions(guard, monkeypatch)
    ran: list[int] = []

    def taken_over(n: int) -> int:
        # Another worker takes the key over while the tool runs (token + 1): this
        # execution's fenced completion can no longer match.
        ctx = current_call()
        assert ctx is not None
        ran.append(ctx.token)
        with ledger.engine().begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE onceonly_ledger SET token = token + 1"
                    " WHERE namespace = :ns AND idem_key = :k"
                ),
                {"ns": ns, "k": ctx.key},
            )
        return n

    tx.on = True
    with pytest.raises(LeaseLost):
        guard.call_tool(taken_over, {"n": 1}, tool="pay", agent_id="payer")
    tx.on = False
    assert (tx.ledger, tx.governance) == (0, 2)  # the lost completion settled in its own
    assert spent(guard) == PRICE  # the tool ran: its spend stays counted
    assert rows(guard) == [("executed", "lease_lost")]  # audited once
    # with the run's token: a retried completion would find its row by it
    assert [r["token"] for r in guard.gov.store.audit_rows(ns, agent_id="payer")] == ran
    assert guard.gov.store.holds(ns, "payer") == 0
    assert guard.gov.verify_audit() == []


def test_a_governed_call_on_postgresql_takes_three_round_trips(
    guard: Guard, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each query of the hot path is one round trip (BEGIN, its statements and COMMIT
    pipelined): BEGIN + snapshot + claim + the counters' locks (known from the agent's
    last call of the tool; the first call locks them in a trip of their own); their
    update + the hold + COMMIT; BEGIN + the ledger's completion + the settle (the hold's
    delete, the chain head's lock, the audit row hashed by the server, the head's move)
    + COMMIT (the first completion of a chain in this process reads the head first)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("the pipelined hot path is PostgreSQL's")
    capped(guard)
    guard.call_tool(pay, {"n": 0}, tool="pay", agent_id="payer")  # warm: schema, pools
    store = guard.gov.store
    if not getattr(store, "_pipelined", False):
        pytest.skip("libpq without pipeline mode: one simple query per round trip instead")
    queries: list[str] = []
    real = store._exec

    def counted(conn: Any, sql: str, params: Any, **kw: Any) -> Any:
        queries.append(sql)
        return real(conn, sql, params, **kw)

    monkeypatch.setattr(store, "_exec", counted)
    r = guard.call_tool(pay, {"n": 1}, tool="pay", agent_id="payer")
    assert (r.decision, r.spend_usd) == ("executed", PRICE)
    assert len(queries) == 3, queries
    assert rows(guard) == [("executed", "ok")] * 2
    assert guard.gov.verify_audit() == []


def test_without_pipeline_mode_the_same_groups_go_as_simple_queries(
    guard: Guard, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq before 14 has no pipeline mode: each group (BEGIN, its statements, COMMIT)
    goes as one simple query instead, with the same outcome."""
    if not db_url.startswith("postgresql"):
        pytest.skip("the pipelined hot path is PostgreSQL's")
    capped(guard)
    monkeypatch.setattr(guard.gov.store, "_pipelined", False)
    tx = three_calls_commit_twice(guard, monkeypatch, PRICE)
    assert tx.total == 0
    r = guard.call_tool(pay, {"n": 1}, tool="pay", agent_id="payer")  # a replay
    assert (r.decision, r.result, r.spend_usd) == ("dedup", 1, 0.0)
    assert spent(guard) == 4 * PRICE
    assert rows(guard) == [("executed", "ok")] * 4 + [("dedup", "dedup")]
    assert guard.gov.verify_audit() == []
    assert guard.gov.store.holds(guard.namespace, "payer") == 0


def test_a_long_call_keeps_its_hold_by_its_key(guard: Guard) -> None:
    # The heartbeat that keeps the claim alive extends the hold too, found by its key
    # (tenant, agent, id: extend_hold), so a call running past its lease is not swept
    # as expired while it runs.
    import threading
    import time

    capped(guard)
    store = guard.gov.store
    calls: list[tuple[str, str, str]] = []
    real = store.extend_hold

    def spy(tenant: str, agent_id: str, rid: str, lease: float) -> bool:
        calls.append((tenant, agent_id, rid))
        return real(tenant, agent_id, rid, lease)

    store.extend_hold = spy  # type: ignore[method-assign]
    running, done = threading.Event(), threading.Event()

    def slow(order: str) -> str:
        running.set()
        assert done.wait(20)
        return order

    results: list[Any] = []
    t = threading.Thread(
        target=lambda: results.append(
            guard.call_tool(slow, {"order": "o-long"}, agent_id="payer", lease=0.6, scope="s")
        )
    )
    t.start()
    try:
        assert running.wait(20)
        time.sleep(1.5)  # well past the lease: held only by the heartbeat
        holds = store.pending_holds(guard.namespace)
        assert [h["agent_id"] for h in holds] == ["payer"]
        assert not holds[0]["expired"], holds
        assert calls and set(calls) == {(guard.namespace, "payer", holds[0]["id"])}, calls
    finally:
        done.set()
        t.join(20)
    assert results and results[0].decision == "executed", results
    assert store.holds(guard.namespace, "payer") == 0
    assert spent(guard) == PRICE


def test_extend_hold_extends_only_the_hold_of_that_tenant_and_agent(guard: Guard) -> None:
    store = guard.gov.store
    wants = [store_want(guard)]
    held = store.reserve(guard.namespace, "payer", "ns", "k-x", wants, lease=60)
    assert held.ok and held.id
    assert store.extend_hold(guard.namespace, "payer", held.id, 60) is True
    assert store.extend_hold(guard.namespace, "other", held.id, 60) is False
    assert store.extend_hold("another-tenant", "payer", held.id, 60) is False
    assert store.extend_hold(guard.namespace, "payer", "no-such-hold", 60) is False


def store_want(g: Guard) -> Any:
    from onceonly_core.stores.governance import Want

    today = int(g.gov.store.now() // DAY) * DAY
    return Want("spend", today, 1, 10**12, "spend")
