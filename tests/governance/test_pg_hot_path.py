"""PostgreSQL's governed hot path in three round trips (issue 15).

Begin: the counters an agent's call of a tool needed last time are locked (created at 0
if new) in the same round trip as the policy snapshot and the claim; their update, the
hold and COMMIT are the second. Complete: the ledger's fenced completion, the hold's
delete, the chain head's lock, the audit row hashed by the server and the head's move,
with BEGIN and COMMIT, are the third.

What must hold: the caps are exact as before; a replay locks nothing (it never waits
behind another call's counters); a guess that is not what the call needs (the policy
changed; a window began between the two clock readings) or expired holds to sweep first
roll back and start again the ordinary way, so every transaction still takes its locks
in one order; the server's hash is the one ``verify_audit`` recomputes, whatever the
arguments hold; a completion that is not ours (a lost lease) or a chain head deleted by
hand writes nothing on the one-trip path and goes the two-trip way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from onceonly_core import Guard, current_call
from onceonly_core.errors import LeaseLost
from onceonly_core.governance import Policy
from onceonly_core.governance.engine import DAY, HOUR
from onceonly_core.stores.governance import Want
from onceonly_core.stores.sql import SQLStore
from onceonly_core.testing.governance_contract import _entry as audit_entry

PRICE = 2.0


@pytest.fixture
def guard(db_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Guard]:
    if not db_url.startswith("postgresql"):
        pytest.skip("the early counter locks are PostgreSQL's hot path")
    monkeypatch.setenv("ONCEONLY_GOV_JOIN", "1")
    with SQLStore(db_url) as store:
        store.migrate()
    g = Guard(db_url, namespace=namespace, quiet=True)
    if not getattr(g.gov.store, "_pipelined", False):
        g.close()
        pytest.skip("libpq without pipeline mode")
    yield g
    g.close()


def policy(g: Guard, *, tool_cap: int | None = None, spend_cap: float = 100.0) -> None:
    g.gov.upsert_policy(
        Policy(
            agent_id="payer",
            max_actions_per_hour=1000,
            max_spend_usd_per_day=spend_cap,
            max_calls_per_tool={} if tool_cap is None else {"pay": tool_cap},
            pricing_rules={"*": PRICE},
        )
    )


def pay(n: int) -> int:
    return n


def call(g: Guard, n: int) -> Any:
    return g.call_tool(pay, {"n": n}, tool="pay", agent_id="payer")


class Queries:
    """The hot path's round trips: one per ``_exec`` on PostgreSQL (BEGIN, the
    statements and COMMIT go in one pipeline)."""

    def __init__(self, g: Guard, monkeypatch: pytest.MonkeyPatch) -> None:
        store = g.gov.store
        self.trips = 0
        real_exec = store._exec

        def exec_(conn: Any, sql: str, params: Any, **kw: Any) -> Any:
            self.trips += 1
            return real_exec(conn, sql, params, **kw)

        monkeypatch.setattr(store, "_exec", exec_)

    def reset(self) -> None:
        self.trips = 0


def spent(g: Guard) -> float:
    today = int(g.gov.store.now() // DAY) * DAY
    return g.gov.store.counter(g.namespace, "payer", "spend", today) / 1e6


def taking_over(g: Guard, engine: sa.Engine) -> Any:
    """A tool during whose run another worker takes its key over (token + 1): its fenced
    completion can no longer match."""

    def taken_over(n: int) -> int:
        ctx = current_call()
        assert ctx is not None
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE onceonly_ledger SET token = token + 1"
                    " WHERE namespace = :ns AND idem_key = :k"
                ),
                {"ns": g.namespace, "k": ctx.key},
            )
        return n

    return taken_over


def decisions(store: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One item per time begin decided on a plan (twice: it started again)."""
    seen: list[int] = []
    real = store._learn

    def learn(*a: Any) -> None:
        seen.append(1)
        real(*a)

    monkeypatch.setattr(store, "_learn", learn)
    return seen


def test_after_the_first_call_a_governed_call_takes_three_round_trips(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy(guard)
    q = Queries(guard, monkeypatch)
    assert call(guard, 0).decision == "executed"
    # nothing known yet: the counters are locked in a trip of their own, and the chain
    # head is read before the audit row is hashed over it
    assert q.trips == 5
    for n in (1, 2):
        q.reset()
        r = call(guard, n)
        assert (r.decision, r.spend_usd) == ("executed", PRICE)
        assert q.trips == 3  # begin: 2 (snapshot + claim + locks; hold + COMMIT); complete: 1
    q.reset()
    assert call(guard, 2).decision == "dedup"
    assert spent(guard) == 3 * PRICE
    assert guard.gov.store.holds(guard.namespace, "payer") == 0
    assert guard.gov.verify_audit() == []


def test_the_caps_are_exact_on_the_early_locks(guard: Guard) -> None:
    policy(guard, spend_cap=5 * PRICE)
    got = [call(guard, n) for n in range(8)]
    assert [r.decision for r in got] == ["executed"] * 5 + ["blocked"] * 3
    assert spent(guard) == 5 * PRICE
    # a refused call left no claim behind: once the cap is raised, it runs
    policy(guard, spend_cap=6 * PRICE)
    assert call(guard, 5).decision == "executed"
    assert spent(guard) == 6 * PRICE


def test_a_new_counter_the_guess_lacks_starts_again_the_ordinary_way(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy(guard)
    call(guard, 0)
    call(guard, 1)  # the guess: actions/hour, spend/day
    policy(guard, tool_cap=2)  # now also a per-tool counter, which the guess lacks
    restarts: list[int] = []
    real = guard.gov.store._tx

    def counting(fn: Any, **kw: Any) -> Any:
        restarts.append(1)
        return real(fn, **kw)

    monkeypatch.setattr(guard.gov.store, "_tx", counting)
    r = call(guard, 2)
    assert r.decision == "executed"
    assert len(restarts) == 3  # begin, begin again without early locks, complete
    restarts.clear()
    assert call(guard, 3).decision == "executed"  # the new guess holds all three
    assert len(restarts) == 2
    r = call(guard, 4)  # the tool's cap (2 since it was set) refuses
    assert (r.decision, r.policy_reason) == ("blocked", "max_calls_per_tool_exceeded")
    assert spent(guard) == 4 * PRICE


def test_a_window_that_began_between_the_clock_readings_starts_again(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The early statement reads the database's clock after the snapshot did: across an
    hour's edge its hour is the next one. Simulated by locking a window an hour on."""
    policy(guard)
    call(guard, 0)
    store = guard.gov.store
    real = store._early

    def an_hour_on(before: Any, *a: Any) -> None:
        real(before, *a)
        if before.then is not None:
            sql, p = before.then
            before.then = (sql.replace("(floor(c.now", f"{HOUR} + (floor(c.now", 1), p)

    monkeypatch.setattr(store, "_early", an_hour_on)
    again = decisions(store, monkeypatch)
    r = call(guard, 1)
    assert (r.decision, r.spend_usd) == ("executed", PRICE)
    assert len(again) == 2  # decided twice: the second time without early locks
    assert spent(guard) == 2 * PRICE
    hour = int(store.now() // HOUR) * HOUR
    assert store.counter(guard.namespace, "payer", "actions", hour) == 2
    assert store.counter(guard.namespace, "payer", "actions", hour + HOUR) == 0
    assert guard.gov.verify_audit() == []


def test_a_replay_does_not_wait_behind_another_call_s_counters(guard: Guard, db_url: str) -> None:
    policy(guard)
    call(guard, 0)
    call(guard, 1)  # the guess is known: the next claims lock early
    engine = sa.create_engine(db_url)
    done: list[str] = []
    try:
        with engine.begin() as conn:
            # another transaction holds the agent's counters
            conn.execute(
                sa.text(
                    "SELECT used FROM onceonly_counters WHERE tenant = :t AND agent_id = 'payer'"
                    " FOR UPDATE"
                ),
                {"t": guard.namespace},
            ).all()
            t = threading.Thread(target=lambda: done.append(call(guard, 1).decision))
            t.start()
            t.join(5)
            assert done == ["dedup"]  # answered while the counters were locked
            blocked = threading.Thread(target=lambda: done.append(call(guard, 7).decision))
            blocked.start()
            time.sleep(0.5)
            assert done == ["dedup"]  # a new call waits for them, as it must
        blocked.join(10)
        assert done == ["dedup", "executed"]
    finally:
        engine.dispose()
    assert spent(guard) == 3 * PRICE


def test_expired_holds_are_swept_before_the_counters_are_locked(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy(guard)
    call(guard, 0)  # the guess is known
    store = guard.gov.store
    # a crashed worker's hold, its lease long gone
    today = int(store.now() // DAY) * DAY
    wants = [Want("spend", today, 1_000_000, None, "daily_spend_exceeded", DAY)]
    res = store.reserve(guard.namespace, "payer", guard.namespace, "crashed", wants, lease=0.001)
    assert res.ok
    time.sleep(0.05)
    decided = decisions(store, monkeypatch)
    r = call(guard, 1)
    assert (r.decision, r.spend_usd) == ("executed", PRICE)
    assert len(decided) == 2  # the early locks rolled back; swept, then locked in order
    assert store.holds(guard.namespace, "payer") == 0  # swept
    assert spent(guard) == 2 * PRICE + 1.0  # the crashed hold's amount stays spent
    assert guard.gov.verify_audit() == []


def test_the_server_s_hash_is_the_one_verify_recomputes(guard: Guard) -> None:
    """Arguments that look like the JSON around the seq the server fills in."""
    policy(guard)

    def note(text: str, n: int) -> str:
        return text

    texts = [
        "plain",
        "é ☃ 𝄞",
        '","seq":0,"spend_micros":1',
        '\\"seq\\":0',
        "\n\t\u0000",
        "x" * 3000,
    ]
    # the first call reads the head (two trips); the rest are hashed by the server;
    # the second round are replays (audited without a hold)
    for text in texts * 2:
        r = guard.call_tool(note, {"text": text, "n": len(text)}, tool="note", agent_id="payer")
        assert r.decision in ("executed", "dedup")
    rows = guard.gov.store.audit_rows(guard.namespace, agent_id="payer")
    assert len(rows) == 2 * len(texts)
    assert guard.gov.verify_audit() == []


def test_a_chain_head_deleted_by_hand_is_made_again_on_the_two_trip_path(
    guard: Guard, db_url: str
) -> None:
    policy(guard)
    call(guard, 0)
    call(guard, 1)  # the head is known to this process
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("DELETE FROM onceonly_audit WHERE tenant = :t"), {"t": guard.namespace}
            )
            conn.execute(
                sa.text("DELETE FROM onceonly_audit_heads WHERE tenant = :t"),
                {"t": guard.namespace},
            )
    finally:
        engine.dispose()
    r = call(guard, 2)
    assert (r.decision, r.spend_usd) == ("executed", PRICE)
    assert [e.decision for e in guard.gov.agent_logs("payer")] == ["executed"]
    assert guard.gov.store.holds(guard.namespace, "payer") == 0
    assert guard.gov.verify_audit() == []
    assert call(guard, 3).decision == "executed"  # and one trip again
    assert guard.gov.verify_audit() == []


def test_a_lease_lost_on_the_one_trip_path_is_settled_the_two_trip_way(
    guard: Guard, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy(guard)
    call(guard, 0)
    call(guard, 1)  # the head is known: completions try one round trip
    engine = sa.create_engine(db_url)
    taken_over = taking_over(guard, engine)

    tried: list[Any] = []
    store = guard.gov.store
    real = store._complete_one

    def one(*a: Any) -> Any:
        tried.append(out := real(*a))
        return out

    monkeypatch.setattr(store, "_complete_one", one)
    try:
        with pytest.raises(LeaseLost):
            guard.call_tool(taken_over, {"n": 2}, tool="pay", agent_id="payer")
    finally:
        engine.dispose()
    assert tried == [None]  # tried, wrote nothing, handed over
    assert spent(guard) == 3 * PRICE  # the tool ran: its spend stays counted
    logs = [(e.decision, e.reason) for e in reversed(guard.gov.agent_logs("payer"))]
    assert logs == [("executed", "ok")] * 2 + [("executed", "lease_lost")]
    assert store.holds(guard.namespace, "payer") == 0
    assert guard.gov.verify_audit() == []


def test_an_agent_without_a_policy_completes_and_audits_in_one_statement(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No hold: the ledger's fenced completion gates the append, in one statement."""
    store = guard.gov.store
    got: list[Any] = []
    real = store._finish_append_one

    def spy(*a: Any) -> Any:
        got.append(out := real(*a))
        return out

    monkeypatch.setattr(store, "_finish_append_one", spy)
    for n in range(4):
        r = guard.call_tool(pay, {"n": n}, tool="pay", agent_id="free")
        assert (r.decision, r.result) == ("executed", n)
    assert got == [True] * 3  # the first completion of the chain went the general way
    logs = [(e.decision, e.reason) for e in reversed(guard.gov.agent_logs("free"))]
    assert logs == [("executed", "ok")] * 4
    assert guard.gov.verify_audit() == []


def test_a_lease_lost_without_a_hold_is_audited_once_the_general_way(
    guard: Guard, db_url: str
) -> None:
    guard.call_tool(pay, {"n": 0}, tool="pay", agent_id="free")  # the chain is known
    engine = sa.create_engine(db_url)
    taken_over = taking_over(guard, engine)

    try:
        with pytest.raises(LeaseLost):
            guard.call_tool(taken_over, {"n": 1}, tool="pay", agent_id="free")
    finally:
        engine.dispose()
    logs = [(e.decision, e.reason) for e in reversed(guard.gov.agent_logs("free"))]
    assert logs == [("executed", "ok"), ("executed", "lease_lost")]
    assert guard.gov.verify_audit() == []


def test_replays_are_audited_in_one_statement(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy(guard)
    call(guard, 0)
    store = guard.gov.store
    ones: list[Any] = []
    real = store._append_one

    def spy(*a: Any, **kw: Any) -> Any:
        ones.append(a[3])
        return real(*a, **kw)

    monkeypatch.setattr(store, "_append_one", spy)
    for _ in range(3):
        assert call(guard, 0).decision == "dedup"
    assert ones == [store._hot["append_one"]] * 3
    logs = [e.decision for e in reversed(guard.gov.agent_logs("payer"))]
    assert logs == ["executed", "dedup", "dedup", "dedup"]
    assert guard.gov.verify_audit() == []


def test_a_standalone_append_remakes_a_head_deleted_by_hand(guard: Guard, db_url: str) -> None:
    policy(guard)
    call(guard, 0)
    assert call(guard, 0).decision == "dedup"  # appended in one statement
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            for table in ("onceonly_audit", "onceonly_audit_heads"):
                conn.execute(
                    sa.text(f"DELETE FROM {table} WHERE tenant = :t"), {"t": guard.namespace}
                )
    finally:
        engine.dispose()
    assert call(guard, 0).decision == "dedup"  # no head: rolled back, the general way
    assert call(guard, 0).decision == "dedup"  # one statement again
    assert [e.decision for e in guard.gov.agent_logs("payer")] == ["dedup", "dedup"]
    # the chain walks (the execution's own row went with the rows deleted by hand, so
    # the ledger cross-check of verify_audit would rightly report it)
    assert guard.gov.store.verify_audit(guard.namespace) == []


def test_concurrent_one_statement_appends_to_one_chain_stay_a_chain(guard: Guard) -> None:
    """Eight threads append to one agent's chain at once, each under the head's lock
    taken by its own statement (READ COMMITTED: a waiter re-reads the head it locked)."""
    store = guard.gov.store
    entry = audit_entry("busy-key", "dedup", agent_id="busy", reason="dedup", idem_key=None)
    store.append_audit(guard.namespace, entry)  # the general way: the head now exists
    assert store._one_append(guard.namespace, "busy")  # the next ones: one statement each
    errors: list[BaseException] = []

    def appender(i: int) -> None:
        try:
            for j in range(25):
                store.append_audit(guard.namespace, {**entry, "args": f'{{"i": {i}, "j": {j}}}'})
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=appender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    rows = store.audit_rows(guard.namespace, agent_id="busy", limit=1000)
    assert sorted(r["seq"] for r in rows) == list(range(1, 202))
    assert guard.gov.verify_audit() == []
