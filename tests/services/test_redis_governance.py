"""Governance under real concurrency on the Redis ledger: the same multi-process tests as
on SQL (tests/governance/test_races.py) — 8 processes racing a cap with 0 overshoot, a
worker killed while holding a reservation, the kill switch flipped from another process,
one approval re-asked by eight processes — with ``db_url`` a Redis URL."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import uuid4

import pytest
import redis

from _services import redis_drop_prefix
from governance.test_db_restart import (
    test_a_server_restart_under_a_spend_cap_overshoots_nothing_and_audits_every_run,
)
from governance.test_races import (  # the same tests, on Redis (db_url below)
    guard,
    test_a_killed_worker_reservation_is_swept_as_spent_and_audited,
    test_an_approval_is_consumed_once_when_eight_processes_reask,
    test_disable_agent_from_another_process_stops_the_very_next_call,
    test_racing_processes_never_exceed_a_cap,
)
from onceonly_core import Guard
from onceonly_core.governance import Policy
from onceonly_core.governance.base import Want
from onceonly_core.governance.engine import DAY
from onceonly_core.stores.redis import RedisStore
from onceonly_core.stores.redisgov import RedisGovernanceStore
from onceonly_core.testing import GovernanceContract
from services.test_redis import _free_port, cluster_url

__all__ = [
    "cluster_url",
    "guard",
    "test_a_killed_worker_reservation_is_swept_as_spent_and_audited",
    "test_a_server_restart_under_a_spend_cap_overshoots_nothing_and_audits_every_run",
    "test_an_approval_is_consumed_once_when_eight_processes_reask",
    "test_disable_agent_from_another_process_stops_the_very_next_call",
    "test_racing_processes_never_exceed_a_cap",
]

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]


@pytest.fixture
def db_url(redis_url: str) -> Iterator[str]:
    """A Redis ledger URL with a key prefix of its own, deleted afterwards."""
    prefix = f"oo-test-{uuid4().hex[:12]}"
    yield f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"
    with contextlib.suppress(redis.ConnectionError):
        redis_drop_prefix(redis_url, prefix)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, tuple[Callable[[], None], Callable[[], None]]]]:
    """A Redis server of our own (``appendonly yes``, ``appendfsync always``, in tmp_path)
    that the imported restart test kills (SIGKILL: a crash) and starts again: the shared
    server is never touched."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes"]
    args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    args += ["--dir", str(tmp_path), "--logfile", str(tmp_path / "redis.log")]
    args += ["--pidfile", str(tmp_path / "redis.pid")]
    client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def start() -> None:
        if up():
            return
        subprocess.run(args, check=True, timeout=30, capture_output=True)
        deadline = time.monotonic() + 30
        while not up():
            assert time.monotonic() < deadline, "Redis did not start"
            time.sleep(0.05)

    def stop() -> None:
        pid = int((tmp_path / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # a crash: no shutdown, no save
        deadline = time.monotonic() + 30
        while up():
            assert time.monotonic() < deadline, "Redis survived SIGKILL"
            time.sleep(0.02)

    start()
    try:
        yield f"redis://127.0.0.1:{port}/0", (stop, start)
    finally:
        with contextlib.suppress(redis.RedisError):
            client.shutdown(nosave=True)
        client.close()


# -- the store's primitives, directly --------------------------------------------------
ENTRY = {
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


@pytest.fixture
def gov(db_url: str) -> Iterator[RedisGovernanceStore]:
    ledger = RedisStore(db_url, durability_check=False)
    store = ledger.governance_store()
    assert isinstance(store, RedisGovernanceStore)
    yield store
    ledger.close()


def _day(store: RedisGovernanceStore) -> int:
    return int(store.now() // DAY) * DAY


def test_a_swept_hold_stays_counted_and_is_audited_once(gov: RedisGovernanceStore) -> None:
    """A holder that outlived its lease: the next reservation's sweep keeps the spend
    counted and writes the call's audit row; the late settle and release change nothing."""
    day = _day(gov)
    wants = [Want("spend", day, 600_000, 1_000_000, "daily_spend_exceeded")]
    held = gov.reserve("t", "a", "ns", "k1", wants, lease=0.2, audit=ENTRY)
    assert held.ok and held.id is not None
    assert gov.holds("t", "a") == 1
    time.sleep(0.4)
    other = gov.reserve("t", "a", "ns", "k2", wants, lease=5.0)
    assert not other.ok and other.failed == wants[0] and other.used == 600_000
    assert gov.counter("t", "a", "spend", day) == 600_000
    assert gov.holds("t", "a") == 0
    rows = gov.audit_rows("t", agent_id="a")
    assert [(r["decision"], r["reason"], r["idem_key"]) for r in rows] == [
        ("unknown", "lease_expired", "k1")
    ]
    late = {**ENTRY, "decision": "executed", "reason": "ok", "token": 1}
    assert gov.settle("t", "a", held.id, [["spend", day, 600_000]], late) is False
    assert gov.release("t", "a", held.id) is False  # it may have run: nothing given back
    assert gov.extend(held.id, 10.0) is False  # and a deleted hold is not brought back
    assert gov.pending_holds("t") == []
    assert gov.counter("t", "a", "spend", day) == 600_000
    assert len(gov.audit_rows("t", agent_id="a")) == 1
    assert gov.verify_audit("t") == []


def test_release_gives_back_at_most_once_and_a_failed_cap_writes_nothing(
    gov: RedisGovernanceStore,
) -> None:
    day = _day(gov)
    wants = [
        Want("actions", day, 1, 5, "max_actions_per_hour_exceeded"),
        Want("spend", day, 400_000, 1_000_000, "daily_spend_exceeded"),
    ]
    one = gov.reserve("t", "a", "ns", "k1", wants, lease=30)
    two = gov.reserve("t", "a", "ns", "k2", wants, lease=30)
    three = gov.reserve("t", "a", "ns", "k3", wants, lease=30)
    assert one.ok and two.ok and one.id and two.id
    assert not three.ok and three.failed == wants[1]  # 1.2 > 1.0
    # The failed reservation wrote nothing: not even the action count that did fit.
    assert gov.counter("t", "a", "actions", day) == 2
    assert gov.holds("t", "a") == 2
    audit = {**ENTRY, "decision": "failed", "reason": "tool_error", "idem_key": "k1"}
    assert gov.release("t", "a", one.id, audit) is True
    assert gov.release("t", "a", one.id, audit) is False
    assert gov.counter("t", "a", "spend", day) == 400_000
    assert gov.counter("t", "a", "actions", day) == 1
    assert gov.settle("t", "a", two.id, [], {**ENTRY, "decision": "executed"}) is True
    assert gov.settle("t", "a", two.id, [], {**ENTRY, "decision": "executed"}) is False
    assert [r["decision"] for r in gov.audit_rows("t", newest_first=False)] == [
        "failed",
        "executed",
    ]
    key = gov._counter_key("t", "a", "spend", day)
    assert DAY < gov.client.ttl(key) <= day + 2 * DAY + 31 - int(gov.now())  # expires, later


def test_extend_moves_the_lease_of_a_live_hold(gov: RedisGovernanceStore) -> None:
    wants = [Want("actions", _day(gov), 1, None, "")]
    held = gov.reserve("t", "a", "ns", "k", wants, lease=0.3, audit=ENTRY)
    assert held.id is not None
    assert gov.extend(held.id, 30.0) is True
    time.sleep(0.5)
    assert gov.sweep("t") == 0  # not expired any more
    (pending,) = gov.pending_holds("t")
    assert pending["id"] == held.id and not pending["expired"]


def test_an_approval_authorises_one_execution(gov: RedisGovernanceStore) -> None:
    ask = functools.partial(gov.approval_for, "t", "a", "refund", "ns", "k", '{"o": 1}')
    first = ask()
    assert first["state"] == "pending" and ask()["id"] == first["id"]
    denied = gov.decide_approval("t", first["id"], "denied", "ops", "no")
    assert denied is not None and denied["changed"] and denied["state"] == "denied"
    again = gov.decide_approval("t", first["id"], "approved", "ops", None)
    assert again is not None and not again["changed"] and again["state"] == "denied"
    assert gov.decide_approval("t", "apr_missing", "approved", None, None) is None
    # Another call: approved, taken once, restored once, taken again, then closed.
    other = functools.partial(gov.approval_for, "t", "a", "refund", "ns", "k2", "{}")
    req = other()
    gov.decide_approval("t", req["id"], "approved", "ops", None)
    taken = other()
    assert (taken["id"], taken["state"]) == (req["id"], "approved")
    assert other(in_flight_for=60)["state"] == "consumed"  # in flight: wait for it
    assert gov.restore_approval("t", req["id"]) is True
    assert gov.restore_approval("t", req["id"]) is False
    assert other()["state"] == "approved"
    nxt = other()  # consumed: never authorises again, a new round opens
    assert nxt["state"] == "pending" and nxt["id"] != req["id"] and nxt["round"] == 1
    states = [(r["id"], r["state"]) for r in gov.list_approvals("t")]
    assert states == [(first["id"], "denied"), (req["id"], "consumed"), (nxt["id"], "pending")]


def test_concurrent_appends_keep_one_verifying_chain(gov: RedisGovernanceStore) -> None:
    """Threads append to one agent's chain at once: the head compare-and-set makes the
    losers hash again, so the chain has every row once, in order."""
    errors: list[BaseException] = []

    def append(i: int) -> None:
        try:
            for j in range(20):
                gov.append_audit("t", {**ENTRY, "decision": "executed", "idem_key": f"{i}-{j}"})
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    rows = gov.audit_rows("t", agent_id="a", limit=1000, newest_first=False)
    assert [r["seq"] for r in rows] == list(range(1, 161))
    assert len({r["idem_key"] for r in rows}) == 160
    assert gov.verify_audit() == [] and gov.chain_count() == 1
    cut = rows[99]["created_at"] + 1e-6
    assert gov.purge_audit("t", cut) >= 100
    assert gov.verify_audit() == []
    gov.append_audit("t", {**ENTRY, "decision": "executed"})
    assert gov.verify_audit() == []


def test_a_release_after_the_counter_expired_creates_no_immortal_key(
    gov: RedisGovernanceStore,
) -> None:
    day = _day(gov)
    held = gov.reserve("t", "a", "ns", "k", [Want("spend", day, 5, 10, "")], lease=30)
    assert held.id is not None
    key = gov._counter_key("t", "a", "spend", day)
    gov.client.delete(key)  # what Redis does two days after the window
    assert gov.release("t", "a", held.id) is True
    assert gov.client.exists(key) == 0


def test_governance_on_a_redis_cluster(cluster_url: str) -> None:
    """Every governance script on a real three-node cluster: its keys (declared or built
    in the script) are in the tenant's slot, or the cluster refuses it (CROSSSLOT)."""
    ran: list[str] = []

    def refund(order: str) -> str:
        ran.append(order)
        return order

    for tenant in ("tenant-a", "tenant-{b}"):  # two tenants, two slots
        g = Guard(cluster_url, namespace=tenant, quiet=True)
        try:
            gov = g.gov
            gov.upsert_policy(
                Policy(agent_id="s", require_approval=["refund"], max_actions_per_hour=2)
            )
            with g.run("run-1"):
                first = g.call_tool(refund, {"order": "o1"}, agent_id="s")
                assert first.decision == "pending_approval" and first.approval_id
                gov.approve(first.approval_id, by="ops")
                assert g.call_tool(refund, {"order": "o1"}, agent_id="s").decision == "executed"
                assert g.call_tool(refund, {"order": "o1"}, agent_id="s").decision == "dedup"
            gov.disable_agent("s", "stop")
            assert g.call_tool(refund, {"order": "o2"}, agent_id="s").policy_reason == (
                "agent_disabled"
            )
            assert [a.state for a in gov.list_approvals(state=None)] == ["consumed"]
            assert gov.get_run_timeline("run-1")
            assert gov.verify_audit() == []
            assert gov.purge_audit(before=gov.store.now() + 1) >= 3
            assert gov.verify_audit() == []
        finally:
            g.close()
    assert ran == ["o1", "o1"]


def test_the_dashboard_reads_governance_from_redis(db_url: str) -> None:
    """The dashboard's agents, approvals and run pages over a Redis ledger."""
    from fastapi.testclient import TestClient

    from onceonly_core.dashboard import create_dashboard

    g = Guard(db_url, namespace="acme", quiet=True)
    try:
        g.gov.upsert_policy(
            Policy(agent_id="bot", max_spend_usd_per_day=10, require_approval=["refund"])
        )

        def refund(order: str) -> str:
            return order

        def pay(order: str) -> str:
            return order

        with g.run("run-9"):
            g.call_tool(pay, {"order": "o1"}, agent_id="bot", spend_usd=2.5)
            g.call_tool(refund, {"order": "o2"}, agent_id="bot")
        with TestClient(create_dashboard(guard=g), base_url="http://127.0.0.1") as c:
            agents = c.get("/agents")
            assert agents.status_code == 200 and "bot" in agents.text
            assert "2.5" in c.get("/api/agents").text
            approvals = c.get("/api/approvals")
            assert approvals.status_code == 200 and "refund" in approvals.text
            run = c.get("/api/run", params={"id": "run-9"})
            assert run.status_code == 200 and "tool_result" in run.text
    finally:
        g.close()


class TestRedisClusterGovernanceContract(GovernanceContract):
    """The governance contract kit on a real three-node Redis Cluster."""

    @pytest.fixture
    def ledger(self, cluster_url: str) -> Iterator[RedisStore]:
        s = RedisStore(cluster_url, durability_check=False)
        yield s
        s.close()
