"""Every executed dollar counted, every execution audited once, every approval used once
(issue 13, items 3-5), on every ledger (memory, SQLite, PostgreSQL, MariaDB, Redis).

The rule under test: spend of a call that may have executed stays counted until it is
shown not to have executed. Faults are injected deterministically here (an interrupt or a
cancellation inside the tool, a ledger that cannot record a completion, a governance store
whose settle fails, connections cut under the pool); test_db_restart.py restarts the real
servers.

The three fault tests run on both governed paths of a SQL ledger: the joined one (the
default: the ledger's claim and completion inside the governance store's two
transactions, so a fault lands in the joined transaction) and the separate one
(``ONCEONLY_GOV_JOIN=0``: the ledger's primitives and the governance store's apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from _services import cut_connections
from onceonly_core import Guard
from onceonly_core.errors import CompletionNotRecorded, ConfigError, StoreError
from onceonly_core.governance import Policy
from onceonly_core.governance.engine import DAY
from onceonly_core.stores import schema as S
from onceonly_core.stores.govsql import GovStore
from onceonly_core.stores.sql import SQLStore

PRICE = 4.0


@pytest.fixture
def guard(store_url: str, namespace: str) -> Iterator[Guard]:
    if store_url.startswith(("postgresql", "mysql")):
        with SQLStore(store_url) as store:
            store.migrate()
    g = Guard(store_url, namespace=namespace, quiet=True)
    yield g
    g.close()


def capped(g: Guard, agent: str = "payer", cap: float = 10.0, **extra: Any) -> None:
    g.gov.upsert_policy(
        Policy(agent_id=agent, max_spend_usd_per_day=cap, pricing_rules={"*": PRICE}, **extra)
    )


def spent(g: Guard, agent: str = "payer") -> float:
    today = int(g.gov.store.now() // DAY) * DAY
    return g.gov.store.counter(g.namespace, agent, "spend", today) / 1e6


def rows(g: Guard, agent: str = "payer") -> list[tuple[str, str]]:
    return [(e.decision, e.reason) for e in reversed(g.gov.agent_logs(agent))]


@pytest.fixture(params=["joined", "separate"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The governed path (read when the governance store opens, after this fixture)."""
    monkeypatch.setenv("ONCEONLY_GOV_JOIN", "1" if request.param == "joined" else "0")
    return str(request.param)


def joined_hooks(g: Guard) -> list[tuple[Any, str]]:
    """Where the ledger's completion enters a joined transaction: its statement on the
    governance store's connection (the ledger's ``finish_on``), or, on PostgreSQL, the
    governance store's ``_complete_pg`` (the statement sent in one query with the
    settle's first)."""
    return [(g.store, "finish_on"), (g.gov.store, "_complete_pg")]


def joined_calls(g: Guard, path: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the completions that ran in the joined transaction; skips the joined
    variant where the ledger cannot join (memory, Redis)."""
    if path == "joined" and not g.gov.store.joins(g.store):
        pytest.skip(f"{type(g.store).__name__} has no joined path")
    calls: list[int] = []
    for obj, name in joined_hooks(g):
        real = getattr(obj, name, None)
        if real is not None:

            def counted(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                calls.append(1)
                return _real(*args, **kwargs)

            monkeypatch.setattr(obj, name, counted)
    return calls


# -- 1d. spend bounds --------------------------------------------------------------------
@pytest.mark.parametrize("bad", [1e13, float("nan"), float("inf"), -1.0, 1_000_000.01])
def test_an_impossible_spend_is_refused_before_anything_is_claimed(
    guard: Guard, bad: float
) -> None:
    guard.gov.upsert_policy(Policy(agent_id="payer"))
    ran: list[str] = []

    def pay(to: str) -> str:
        ran.append(to)
        return to

    with pytest.raises(ConfigError, match="spend_usd"):
        guard.call_tool(pay, {"to": "x"}, agent_id="payer", spend_usd=bad)
    assert ran == []
    assert guard.store.list(namespace=guard.namespace) == []  # nothing claimed
    assert guard.gov.agent_logs("payer") == []
    assert guard.gov.verify_audit() == []


def test_the_largest_spend_per_call_still_runs_and_is_audited(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="payer"))
    r = guard.call_tool(lambda to: to, {"to": "x"}, tool="pay", agent_id="payer", spend_usd=1e6)
    assert r.decision == "executed"
    assert [e.spend_usd for e in guard.gov.agent_logs("payer")] == [1e6]


def test_a_price_past_the_bound_is_refused_in_the_policy() -> None:
    with pytest.raises(ValueError, match="spend_usd"):
        Policy(agent_id="a", pricing_rules={"pay": 1e13})
    with pytest.raises(ValueError):
        Policy(agent_id="a", max_spend_usd_per_day=float("inf"))


# -- 1a. interrupts ----------------------------------------------------------------------
def test_keyboard_interrupt_inside_a_tool_settles_its_hold_at_once_as_spent(
    guard: Guard,
) -> None:
    capped(guard)

    def pay(to: str) -> str:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        guard.call_tool(pay, {"to": "x"}, agent_id="payer")
    # Not held for the whole lease: settled now, counted (the tool may have run).
    assert guard.gov.store.holds(guard.namespace, "payer") == 0
    assert spent(guard) == PRICE
    assert rows(guard) == [("unknown", "interrupted")]
    assert guard.gov.verify_audit() == []


def test_a_cancelled_task_settles_its_hold_at_once_as_spent(guard: Guard) -> None:
    capped(guard)

    async def scenario() -> None:
        started = asyncio.Event()

        async def pay(to: str) -> str:
            started.set()
            await asyncio.sleep(60)
            return to

        task = asyncio.create_task(guard.acall_tool(pay, {"to": "x"}, agent_id="payer"))
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert guard.gov.store.holds(guard.namespace, "payer") == 0
    assert spent(guard) == PRICE
    assert rows(guard) == [("unknown", "interrupted")]
    # The ledger's lease was expired at once: the next call applies on_unknown (retry)
    # now, runs, and is counted again (two runs may have happened: both are paid).
    r = guard.call_tool(lambda to: to, {"to": "x"}, tool="pay", agent_id="payer")
    assert r.decision == "executed"
    assert spent(guard) == 2 * PRICE


def test_an_interrupt_in_an_unpriced_governed_call_is_audited(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="free"))

    def look(q: str) -> str:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        guard.call_tool(look, {"q": "x"}, agent_id="free")
    assert rows(guard, "free") == [("unknown", "interrupted")]


# -- 1c. a completion the ledger could not record ----------------------------------------
def test_completion_not_recorded_keeps_the_spend_and_audits_the_run(
    path: str, guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    capped(guard)
    joined = joined_calls(guard, path, monkeypatch)
    ran: list[str] = []
    refused: list[int] = []

    def refuse(*args: Any, **kwargs: Any) -> bool:
        refused.append(1)
        raise StoreError("the ledger is gone")

    def pay(to: str) -> str:
        ran.append(to)
        return to

    monkeypatch.setattr("onceonly_core.protocol.FINISH_RETRIES", (0.0,))
    monkeypatch.setattr(guard.store, "finish", refuse)
    if path == "joined":  # the ledger's write inside the joined transaction fails too
        for obj, name in joined_hooks(guard):

            def refuse_on(*args: Any, **kwargs: Any) -> Any:
                joined.append(1)
                raise StoreError("the ledger is gone")

            monkeypatch.setattr(obj, name, refuse_on)
    with pytest.raises(CompletionNotRecorded):
        guard.call_tool(pay, {"to": "x"}, agent_id="payer")
    assert ran == ["x"]
    # Joined: each of the flow's two attempts tried the joined transaction, then the
    # completion alone (finish); separate: finish alone, twice.
    assert (len(joined) >= 2) == (path == "joined") and len(refused) == 2
    assert guard.gov.store.holds(guard.namespace, "payer") == 0
    assert spent(guard) == PRICE  # the tool ran: its spend is not given back
    assert rows(guard) == [("executed", "completion_not_recorded")]


# -- 1b. a settle that fails -------------------------------------------------------------
def failing_settle(store: Any, *, drop_audit: bool = False) -> list[int]:
    """Make ``store.settle`` fail (the database stayed away longer than the store's own
    reconnect window), or drop its audit entry. Returns the call counter."""
    calls: list[int] = []
    real = store.settle

    def settle(tenant: str, agent_id: str, rid: str, amounts: Any, audit: Any = None) -> bool:
        calls.append(1)
        if drop_audit:
            return bool(real(tenant, agent_id, rid, amounts, None))
        raise StoreError("governance store: server closed the connection unexpectedly")

    store.settle = settle
    return calls


def test_an_unresolved_settle_stays_counted_and_its_sweeper_audits_it(
    path: str, guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joined: the settle inside the joined transaction fails, so nothing of it commits;
    the completion is then recorded alone and the separate settle fails too."""
    capped(guard)
    store = guard.gov.store
    joined = joined_calls(guard, path, monkeypatch)
    calls = failing_settle(store)
    if path == "joined":

        def settle_in(*args: Any, **kwargs: Any) -> bool:
            raise StoreError("governance store: server closed the connection unexpectedly")

        monkeypatch.setattr(store, "_settle_in", settle_in)
        monkeypatch.setattr(store, "_chain_hot", settle_in)  # PostgreSQL: its audit row
    ran: list[str] = []

    def pay(to: str) -> str:
        ran.append(to)
        return to

    r = guard.call_tool(pay, {"to": "a"}, agent_id="payer", lease=1.0)
    assert r.decision == "executed" and len(calls) == 1  # the caller gets its result
    assert (len(joined) >= 1) == (path == "joined")
    rec = guard.store.get(guard.namespace, r.key or "")
    assert rec is not None and rec.state == "succeeded"  # the completion is recorded
    assert spent(guard) == PRICE  # the hold counts as spent while unresolved
    assert store.holds(guard.namespace, "payer") == 1
    time.sleep(1.2)  # the hold's lease runs out
    # The next call sweeps it as spent (never released): $4 + $4 fit, a third does not.
    assert guard.call_tool(pay, {"to": "b"}, agent_id="payer", lease=1.0).decision == "executed"
    third = guard.call_tool(pay, {"to": "c"}, agent_id="payer", lease=1.0)
    assert (third.decision, third.policy_reason) == ("blocked", "daily_spend_exceeded")
    assert ran == ["a", "b"] and spent(guard) == 2 * PRICE
    del store.settle  # the database is back
    monkeypatch.undo()
    time.sleep(1.2)
    assert guard.gov.verify_audit() == []  # sweeps b's hold too, then checks
    runs = [d for d, _ in rows(guard) if d in ("executed", "unknown")]
    assert len(runs) == len(ran) == 2  # executions == audit rows
    assert spent(guard) == 2 * PRICE


def test_a_settle_retried_after_cut_connections_counts_and_audits_once(
    path: str, guard: Guard, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection of the governance pool is cut (server side) while the tool runs:
    the settle fails on its dead connection, runs again on a fresh one, and commits
    once. (SQLite has no connection to cut: the file is always there.)"""
    if not store_url.startswith(("postgresql", "mysql")):
        pytest.skip("a file database has no server connection to lose")
    capped(guard)
    store = guard.gov.store
    assert isinstance(store, GovStore)
    guard.call_tool(lambda q: q, {"q": "warm"}, tool="warm", agent_id="payer")  # pool in use

    def pay(to: str) -> str:
        cut_connections(store_url)
        return to

    joined = joined_calls(guard, path, monkeypatch)
    r = guard.call_tool(pay, {"to": "x"}, agent_id="payer")
    assert r.decision == "executed"
    assert (len(joined) >= 1) == (path == "joined")
    assert store.holds(guard.namespace, "payer") == 0
    assert spent(guard) == PRICE * 2  # warm-up + pay, each once
    assert rows(guard) == [("executed", "ok"), ("executed", "ok")]
    assert guard.gov.verify_audit() == []


def test_the_ledger_clock_is_read_again_after_cut_connections(db_url: str, namespace: str) -> None:
    """A governed call's claims run on the governance store's connections, so the
    ledger's own pool may hold only connections a restart has cut: ``now()`` (and so
    ``list``, ``audit_report``, and a first use's schema check) reads once more on a
    fresh one instead of failing."""
    if not db_url.startswith(("postgresql", "mysql")):
        pytest.skip("a file database has no server connection to lose")
    with SQLStore(db_url) as store:
        store.migrate()
        assert store.list(namespace=namespace) == []  # in use: schema checked, pool filled
        before = store.now()
        cut_connections(db_url)
        after = store.now()
        assert before <= after < before + 60
        cut_connections(db_url)
        assert store.list(namespace=namespace) == []
    # A store whose first use (the schema check) comes after the cut: the same.
    with SQLStore(db_url) as store:
        assert store.now() > 0  # pooled, schema not checked yet
        cut_connections(db_url)
        assert store.list(namespace=namespace) == []


# -- 2. audit completeness ---------------------------------------------------------------
def test_verify_reports_an_execution_without_its_audit_row(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The separate path, whose settle this drops the audit entry of (read when the
    # governance store opens, in capped()).
    monkeypatch.setenv("ONCEONLY_GOV_JOIN", "0")
    capped(guard, cap=100.0)
    guard.call_tool(lambda to: to, {"to": "a"}, tool="pay", agent_id="payer")
    report = guard.gov.audit_report()
    assert report["problems"] == [] and report["executions"] == 1
    # An execution whose audit row was never written (the chain itself stays whole):
    store = guard.gov.store
    failing_settle(store, drop_audit=True)
    guard.call_tool(lambda to: to, {"to": "b"}, tool="pay", agent_id="payer")
    del store.settle
    guard.call_tool(lambda to: to, {"to": "b"}, tool="pay", agent_id="payer")  # a replay
    report = guard.gov.audit_report()
    assert report["executions"] == 2
    (missing,) = report["problems"]
    assert missing["problem"].startswith("execution without an audit row: pay")
    assert missing["key"] is not None and missing["namespace"] == guard.namespace
    assert missing["token"] == 1


def test_verify_reports_a_deleted_audit_row_of_an_execution(guard: Guard) -> None:
    capped(guard, cap=100.0)
    for to in ("a", "b", "c"):
        guard.call_tool(lambda to: to, {"to": to}, tool="pay", agent_id="payer")
    assert guard.gov.verify_audit() == []
    store = guard.gov.store
    if store.kind == "redis":
        rows = store._k(guard.namespace, "au")
        store.client.hdel(rows, min(int(i) for i in store.client.hkeys(rows)))
        problems = guard.gov.verify_audit()
        assert problems and "missing" in problems[0]["problem"]
        return
    assert isinstance(store, GovStore)
    with store.engine.begin() as conn:
        victim = conn.execute(
            sa.select(sa.func.min(S.audit.c.id)).where(S.audit.c.tenant == guard.namespace)
        ).scalar_one()
        conn.execute(sa.delete(S.audit).where(S.audit.c.id == victim))
    problems = guard.gov.verify_audit()
    assert problems and "missing" in problems[0]["problem"]


def test_every_path_writes_exactly_one_audit_row(guard: Guard, monkeypatch: Any) -> None:
    """executed, replayed, failed, blocked by a cap, pending approval, interrupted,
    unpriced and unlimited calls: one row each, and verify agrees."""
    capped(guard, cap=8.0, require_approval=["ask"])

    def boom(n: int) -> int:
        raise RuntimeError("no")

    def stop(n: int) -> int:
        raise KeyboardInterrupt

    guard.call_tool(lambda n: n, {"n": 1}, tool="ok", agent_id="payer")
    guard.call_tool(lambda n: n, {"n": 1}, tool="ok", agent_id="payer")
    guard.call_tool(boom, {"n": 1}, agent_id="payer")
    guard.call_tool(lambda n: n, {"n": 2}, tool="ok", agent_id="payer")
    guard.call_tool(lambda n: n, {"n": 3}, tool="ok", agent_id="payer")  # over the cap
    guard.call_tool(lambda n: n, {"n": 4}, tool="ask", agent_id="payer")
    guard.call_tool(
        lambda n: n, {"n": 5}, tool="free", agent_id="payer", unlimited=True, spend_usd=0
    )
    guard.gov.upsert_policy(Policy(agent_id="payer", max_spend_usd_per_day=100.0))
    with pytest.raises(KeyboardInterrupt):
        guard.call_tool(stop, {"n": 6}, agent_id="payer")
    assert rows(guard) == [
        ("executed", "ok"),
        ("dedup", "dedup"),
        ("failed", "tool_error"),
        ("executed", "ok"),
        ("blocked", "daily_spend_exceeded"),
        ("pending_approval", "approval_required"),
        ("executed", "ok"),
        ("unknown", "interrupted"),
    ]
    assert guard.gov.store.holds(guard.namespace, "payer") == 0
    assert guard.gov.verify_audit() == []


# -- 3. approvals ------------------------------------------------------------------------
def _approved(guard: Guard, ran: list[str]) -> tuple[Any, str]:
    guard.gov.upsert_policy(Policy(agent_id="ops", require_approval=["refund"]))

    def refund(order: str) -> str:
        ran.append(order)
        return f"refunded {order}"

    first = guard.call_tool(refund, {"order": "o1"}, agent_id="ops", ttl=0.5)
    assert first.decision == "pending_approval" and first.approval_id
    guard.gov.approve(first.approval_id, by="ops@example.com")
    r = guard.call_tool(refund, {"order": "o1"}, agent_id="ops", ttl=0.5)
    assert r.decision == "executed" and ran == ["o1"]
    assert guard.gov.get_approval(first.approval_id).state == "consumed"  # type: ignore[union-attr]
    return refund, first.approval_id


@pytest.mark.parametrize("how", ["ttl", "retry", "clear"])
def test_a_consumed_approval_never_authorises_again(guard: Guard, how: str) -> None:
    ran: list[str] = []
    refund, used = _approved(guard, ran)
    # A replay while the result stands needs no approval and runs nothing.
    assert guard.call_tool(refund, {"order": "o1"}, agent_id="ops", ttl=0.5).decision == "dedup"
    if how == "ttl":
        time.sleep(0.6)
    elif how == "retry":
        assert guard.retry(refund, order="o1")
    else:
        rec = guard.store.list(namespace=guard.namespace)[0]
        assert guard.clear(rec.key)
    again = guard.call_tool(refund, {"order": "o1"}, agent_id="ops", ttl=0.5)
    assert again.decision == "pending_approval"
    assert again.approval_id != used  # a new request for the new execution
    assert ran == ["o1"]  # 0 extra executions
    guard.gov.approve(again.approval_id or "", by="ops@example.com")
    done = guard.call_tool(refund, {"order": "o1"}, agent_id="ops", ttl=0.5)
    assert done.decision == "executed" and ran == ["o1", "o1"]


def test_an_approval_consumed_by_an_interrupted_run_does_not_authorise_its_resume(
    guard: Guard,
) -> None:
    guard.gov.upsert_policy(Policy(agent_id="ops", require_approval=["refund"]))
    ran: list[str] = []

    def refund(order: str) -> str:
        ran.append(order)
        if len(ran) == 1:
            raise KeyboardInterrupt  # the worker dies mid-call
        return order

    first = guard.call_tool(refund, {"order": "o1"}, agent_id="ops")
    guard.gov.approve(first.approval_id or "")
    with pytest.raises(KeyboardInterrupt):
        guard.call_tool(refund, {"order": "o1"}, agent_id="ops")
    # Resumed from a checkpoint: the same call again (its record's lease is over).
    resumed = guard.call_tool(refund, {"order": "o1"}, agent_id="ops")
    assert resumed.decision == "pending_approval" and resumed.approval_id != first.approval_id
    assert ran == ["o1"]


def test_a_denied_request_stays_denied_and_deciding_twice_fails(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="ops", require_approval=["refund"]))
    ran: list[str] = []

    def refund(order: str) -> str:
        ran.append(order)
        return order

    first = guard.call_tool(refund, {"order": "o1"}, agent_id="ops")
    aid = first.approval_id or ""
    guard.gov.deny(aid, reason="no")
    with pytest.raises(ConfigError, match="already denied"):
        guard.gov.approve(aid)
    with pytest.raises(ConfigError, match="already denied"):
        guard.gov.deny(aid)
    r = guard.call_tool(refund, {"order": "o1"}, agent_id="ops")
    assert (r.decision, r.policy_reason) == ("blocked", "approval_denied")
    assert ran == []


def test_approving_a_consumed_request_fails(guard: Guard) -> None:
    ran: list[str] = []
    _, used = _approved(guard, ran)
    with pytest.raises(ConfigError, match="already consumed"):
        guard.gov.approve(used)
    with pytest.raises(ConfigError, match="already consumed"):
        guard.gov.deny(used)


def test_a_failed_execution_gives_its_approval_back(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="ops", require_approval=["refund"]))
    ran: list[str] = []

    def refund(order: str) -> str:
        ran.append(order)
        if len(ran) == 1:
            raise RuntimeError("bank said no")
        return order

    first = guard.call_tool(refund, {"order": "o1"}, agent_id="ops")
    guard.gov.approve(first.approval_id or "")
    assert guard.call_tool(refund, {"order": "o1"}, agent_id="ops").decision == "failed"
    # The failure is not a result: the corrected retry runs on the same approval, once.
    assert guard.call_tool(refund, {"order": "o1"}, agent_id="ops").decision == "executed"
    assert guard.call_tool(refund, {"order": "o1"}, agent_id="ops").decision == "dedup"
    assert ran == ["o1", "o1"]


# -- 5. the store seam -------------------------------------------------------------------
def test_a_custom_store_without_governance_fails_at_construction() -> None:
    from onceonly_core import MemoryStore

    class Plain(MemoryStore):
        governance_store = __import__("onceonly_core").stores.base.Store.governance_store

    with pytest.raises(ConfigError, match="governance_store"):
        Guard(store=Plain(), agent_id="a", quiet=True)  # at construction
    g = Guard(store=Plain(), quiet=True)
    with pytest.raises(ConfigError, match="governance_store"):
        g.gov  # noqa: B018
    assert g.call_tool(lambda q: q, {"q": 1}, tool="t").decision == "executed"  # ungoverned
    g.close()


def test_audit_entries_of_holds_are_json(guard: Guard) -> None:
    """The hold carries the audit entry its sweeper writes (redacted arguments)."""
    capped(guard)
    store = guard.gov.store

    def held_audit() -> str:
        if store.kind == "redis":  # the hold's hash carries it
            (hold,) = store.pending_holds(guard.namespace)
            key = store._hold_key(guard.namespace, hold["id"])
            return str(store.client.hget(key, "audit").decode())
        assert isinstance(store, GovStore)
        with store.engine.connect() as conn:
            r = S.reservations  # this test's hold (the server databases are shared)
            held = sa.select(r.c.audit).where(r.c.tenant == guard.namespace)
            return str(conn.execute(held).scalar_one())

    def pay(api_key: str) -> str:
        held = held_audit()
        entry = json.loads(held)
        assert entry["decision"] == "unknown" and entry["tool"] == "pay"
        assert "sk_live" not in held
        return "ok"

    r = guard.call_tool(pay, {"api_key": "sk_live_abcdef0123456789"}, tool="pay", agent_id="payer")
    assert r.ok, r.error


def test_the_cli_refuses_to_decide_a_consumed_or_denied_request_again(
    db_url: str, namespace: str
) -> None:
    from typer.testing import CliRunner

    from onceonly_core.cli import build_app

    if db_url.startswith(("postgresql", "mysql")):
        with SQLStore(db_url) as store:
            store.migrate()
    app, runner = build_app(), CliRunner()

    def cli(*args: str) -> Any:
        return runner.invoke(
            app,
            [*args, "--url", db_url, "--namespace", namespace],
            env={"ONCEONLY_DB_URL": None, "ONCEONLY_NAMESPACE": None, "COLUMNS": "250"},
        )

    with Guard(db_url, namespace=namespace, quiet=True) as guard:
        ran: list[str] = []
        _, used = _approved(guard, ran)
        for verb in ("approve", "deny"):
            out = cli("approvals", verb, used)
            assert out.exit_code == 1, out.output
            assert "already consumed" in out.output and "asks anew" in out.output
        first = guard.call_tool(lambda order: order, {"order": "o2"}, tool="refund", agent_id="ops")
        assert cli("approvals", "deny", first.approval_id or "").exit_code == 0
        out = cli("approvals", "approve", first.approval_id or "")
        assert out.exit_code == 1 and "already denied" in out.output
        assert ran == ["o1"]


class LostReply:
    """The governance store's engine, but the named primitives' first commit succeeds
    and its reply is lost (the connection drops right after COMMIT): the store must run
    the primitive again on a fresh connection without applying it twice."""

    def __init__(self, engine: Any, lose: int) -> None:
        self._engine, self.lose = engine, lose

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    @contextlib.contextmanager
    def begin(self) -> Iterator[Any]:
        with self._engine.begin() as conn:
            yield conn
        if self.lose > 0:
            self.lose -= 1
            raise sa.exc.OperationalError(
                "COMMIT", {}, Exception("server closed the connection"), connection_invalidated=True
            )


def test_a_commit_whose_reply_was_lost_is_applied_once(db_url: str, namespace: str) -> None:
    if db_url.startswith(("postgresql", "mysql")):
        with SQLStore(db_url) as store:
            store.migrate()
    with Guard(db_url, namespace=namespace, quiet=True) as guard:
        capped(guard, require_approval=["ask"])
        store = guard.gov.store
        assert isinstance(store, GovStore)
        real = store.engine
        ran: list[int] = []

        def pay(n: int) -> int:
            store.engine = LostReply(real, 1)  # settle loses its reply once
            ran.append(n)
            return n

        store.engine = LostReply(real, 1)  # the snapshot is a read; reserve loses its reply
        r = guard.call_tool(pay, {"n": 1}, tool="pay", agent_id="payer")
        store.engine = real
        assert r.decision == "executed" and ran == [1]
        assert spent(guard) == PRICE  # reserved once, settled once
        assert store.holds(guard.namespace, "payer") == 0
        assert rows(guard) == [("executed", "ok")]  # one audit row
        first = guard.call_tool(pay, {"n": 2}, tool="ask", agent_id="payer")
        store.engine = LostReply(real, 1)
        assert guard.gov.approve(first.approval_id or "").state == "approved"
        store.engine = real
        assert guard.gov.verify_audit() == []


def test_a_run_reconciled_as_done_is_counted_once(guard: Guard) -> None:
    """The first run was interrupted (counted, audited unknown); the next call's
    on_unknown reconciler says it did happen: nothing runs, nothing more is spent."""
    capped(guard)
    ran: list[str] = []

    def pay(to: str) -> str:
        ran.append(to)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        guard.call_tool(pay, {"to": "x"}, agent_id="payer")
    r = guard.call_tool(pay, {"to": "x"}, agent_id="payer", on_unknown=lambda ctx: "receipt-1")
    assert (r.decision, r.policy_reason, r.result, r.spend_usd) == (
        "executed",
        "reconciled",
        "receipt-1",
        0.0,
    )
    assert ran == ["x"] and spent(guard) == PRICE
    assert guard.gov.store.holds(guard.namespace, "payer") == 0
    assert rows(guard) == [("unknown", "interrupted"), ("executed", "reconciled")]
    assert guard.gov.verify_audit() == []


# -- control-flow interrupts (a graph interrupt) -------------------------------------------
class PauseForHuman(Exception):
    """A framework's interrupt: raised on purpose at a pause point, before any effect; the
    resumed run calls the tool again from the start (LangGraph's interrupt())."""


def test_a_registered_interrupt_gives_the_hold_back_and_the_resume_runs_once(
    guard: Guard,
) -> None:
    """Core, no framework: the interrupt is re-raised; the call is shown not to have run,
    so its hold is given back and no execution is audited; with cache_errors=True the
    resume is not answered with a cached failure: it runs, once. A real failure under
    cache_errors=True is still replayed (the marker is the interrupt's alone)."""
    from onceonly_core.contract import register_interrupt

    register_interrupt(PauseForHuman)
    capped(guard)
    effects: list[str] = []
    pause = [True]

    def refund() -> str:
        if pause[0]:
            raise PauseForHuman("waiting for a human")
        effects.append("refund")
        return "refunded"

    def call() -> Any:
        return guard.run_call_classified(
            "refund", {"order": 7}, refund, scope="s", agent_id="payer", cache_errors=True
        )

    with pytest.raises(PauseForHuman):
        call()
    assert spent(guard) == 0.0  # shown not to have run: given back
    assert ("executed", "ok") not in rows(guard) and effects == []
    pause[0] = False
    assert call().code == "executed"
    assert call().code == "replayed"
    assert effects == ["refund"] and spent(guard) == PRICE

    def broken() -> str:
        raise RuntimeError("card declined")

    def failing() -> Any:
        return guard.run_call_classified(
            "charge", {"n": 1}, broken, scope="s", agent_id="payer", cache_errors=True
        )

    assert failing().reason != "cached_failure"
    again = failing()
    assert (again.code, again.reason) == ("failed", "cached_failure")
