"""Governance under real concurrency: processes racing caps, a worker killed while it
holds a reservation, the kill switch flipped from another process, and an approval
re-asked by eight processes at once — on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _services import subprocess_env
from onceonly_core import Guard
from onceonly_core.governance import Policy
from onceonly_core.governance.engine import DAY, HOUR
from onceonly_core.stores.sql import SQLStore

WORKER = Path(__file__).resolve().parent / "gov_worker.py"
PROCS = 8
CALLS = 50  # per process: 400 distinct paid calls in all

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]


@pytest.fixture
def guard(db_url: str, namespace: str) -> Iterator[Guard]:
    if db_url.startswith(("postgresql", "mysql")):  # (tests/services/ runs these on Redis)
        with SQLStore(db_url) as store:
            store.migrate()
    g = Guard(db_url, namespace=namespace, quiet=True)
    yield g
    g.close()


def start(work: Path, url: str, ns: str, mode: str, *args: str) -> subprocess.Popen[bytes]:
    with open(work / f"console-{mode}-{time.monotonic_ns()}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(WORKER), mode, url, ns, str(work), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
        )


def effects(work: Path) -> list[dict[str, Any]]:
    path = work / "effects.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def results(work: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(work.glob("results-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


def finish(procs: list[subprocess.Popen[bytes]], work: Path) -> None:
    for p in procs:
        code = p.wait(180)
        logs = "\n".join(f.read_text()[-2000:] for f in work.glob("console-*.log"))
        assert code == 0, f"worker exited {code}:\n{logs}"


CAPS = {
    "spend": ({"max_spend_usd_per_day": 37.5, "pricing_rules": {"paid_call": 0.25}}, 150),
    "actions": ({"max_actions_per_hour": 123}, 123),
    "per_tool": ({"max_calls_per_tool": {"paid_call": 77}}, 77),
}
#: The window each cap counts in: a round that crossed its edge would count in two.
WINDOW = {"spend": DAY, "actions": HOUR, "per_tool": DAY}


def clear_of_the_window_edge(window: int, margin: float = 90.0) -> None:
    """Start a round only if it ends in the window it starts in (a round takes well
    under ``margin`` seconds): near the edge, wait for the next window."""
    left = window - time.time() % window
    if left < margin:
        time.sleep(left + 1.0)


@pytest.mark.parametrize("cap", sorted(CAPS))
def test_racing_processes_never_exceed_a_cap(
    guard: Guard, db_url: str, namespace: str, tmp_path: Path, cap: str
) -> None:
    """8 processes race 400 distinct paid calls: exactly the cap executes (0 overshoot,
    0 undershoot), twice in a row, and the counters equal what the audit log says ran."""
    policy, limit = CAPS[cap]
    for round_ in range(2):
        work = tmp_path / f"round{round_}"
        work.mkdir()
        ns = f"{namespace}-{round_}"
        g = Guard(db_url, namespace=ns, quiet=True)
        g.gov.upsert_policy(Policy(agent_id="racer", **policy))
        clear_of_the_window_edge(WINDOW[cap])
        procs = [start(work, db_url, ns, "race", str(i), str(CALLS)) for i in range(PROCS)]
        time.sleep(1.0)  # let every interpreter start, so they really race
        (work / "go").touch()
        finish(procs, work)
        ran = effects(work)
        decisions = collections.Counter(r["decision"] for r in results(work))
        assert len(ran) == limit, (cap, round_, decisions)
        assert len({e["item"] for e in ran}) == limit  # distinct calls, each once
        assert decisions["executed"] == limit
        assert decisions["blocked"] == PROCS * CALLS - limit
        reasons = {r["reason"] for r in results(work) if r["decision"] == "blocked"}
        assert len(reasons) == 1
        now = g.gov.store.now()
        day, hour = int(now // DAY) * DAY, int(now // HOUR) * HOUR
        logs = g.gov.audit_log(limit=10_000)
        executed = [e for e in logs if e.decision == "executed"]
        assert len(executed) == limit
        if cap == "spend":
            spent = g.gov.store.counter(ns, "racer", "spend", day)
            assert spent == 250_000 * limit  # micro-dollars, exact
            assert sum(e.spend_usd for e in executed) == pytest.approx(spent / 1e6)
        elif cap == "actions":
            assert g.gov.store.counter(ns, "racer", "actions", hour) == limit
        else:
            assert g.gov.store.counter(ns, "racer", "tool:paid_call", day) == limit
        assert g.gov.store.holds(ns, "racer") == 0  # every hold settled or released
        assert g.gov.verify_audit() == []
        g.close()


def test_a_killed_worker_reservation_is_swept_as_spent_and_audited(
    guard: Guard, db_url: str, namespace: str, tmp_path: Path
) -> None:
    """The worker was killed inside its tool: the tool may have run, so when its lease
    expires the hold is settled *as spent* (never given back) and the sweeper writes the
    call's audit row (decision unknown)."""
    guard.gov.upsert_policy(
        Policy(agent_id="holder", max_spend_usd_per_day=1.0, pricing_rules={"hold": 1.0})
    )
    proc = start(tmp_path, db_url, namespace, "hold", "1.0")
    deadline = time.monotonic() + 60
    while not (tmp_path / "holding").exists():
        assert proc.poll() is None, "the holder died before holding"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Heartbeats keep the claim and its hold alive well past the 1 s lease.
    time.sleep(2.5)

    def other(item: str) -> str:
        return item

    r = guard.call_tool(other, {"item": "a"}, tool="hold", agent_id="holder")
    assert (r.decision, r.policy_reason) == ("blocked", "daily_spend_exceeded")
    assert guard.gov.store.holds(namespace, "holder") == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    time.sleep(1.5)  # past the lease: the hold expired with it
    r = guard.call_tool(other, {"item": "b"}, tool="hold", agent_id="holder")
    assert (r.decision, r.policy_reason) == ("blocked", "daily_spend_exceeded"), r
    day = int(guard.gov.store.now() // DAY) * DAY
    assert guard.gov.store.counter(namespace, "holder", "spend", day) == 1_000_000
    assert guard.gov.store.holds(namespace, "holder") == 0
    swept = [e for e in guard.gov.agent_logs("holder") if e.decision == "unknown"]
    assert [(e.tool, e.reason, e.spend_usd) for e in swept] == [("hold", "lease_expired", 1.0)]
    assert guard.gov.verify_audit() == []


def test_disable_agent_from_another_process_stops_the_very_next_call(
    guard: Guard, db_url: str, namespace: str, tmp_path: Path
) -> None:
    proc = start(tmp_path, db_url, namespace, "loop")
    for i in range(3):  # a running agent loop: three calls go through
        deadline = time.monotonic() + 60
        while not (tmp_path / f"in-{i}").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        if i == 2:
            guard.gov.disable_agent("looper", "went rogue")  # while call 2 runs
        (tmp_path / f"release-{i}").touch()
    assert proc.wait(60) == 0
    got = [(r["i"], r["decision"], r["reason"]) for r in results(tmp_path)]
    assert got == [
        (0, "executed", "ok"),
        (1, "executed", "ok"),
        (2, "executed", "ok"),  # already running when the switch flipped
        (3, "blocked", "agent_disabled"),  # the very next call
    ]
    assert not (tmp_path / "in-3").exists()  # and its tool never ran
    guard.gov.enable_agent("looper")

    def step(i: int) -> str:
        return f"step {i}"

    assert guard.call_tool(step, {"i": 99}, tool="step", agent_id="looper").ok


def test_an_approval_is_consumed_once_when_eight_processes_reask(
    guard: Guard, db_url: str, namespace: str, tmp_path: Path
) -> None:
    guard.gov.upsert_policy(Policy(agent_id="support", require_approval=["refund"]))

    def refund(order: str) -> str:
        raise AssertionError("must not run before approval")

    first = guard.call_tool(refund, {"order": "o-7"}, tool="refund", agent_id="support")
    assert first.decision == "pending_approval" and first.approval_id
    again = guard.call_tool(refund, {"order": "o-7"}, tool="refund", agent_id="support")
    assert again.approval_id == first.approval_id  # one request per call
    guard.gov.approve(first.approval_id, by="ops@example.com")
    procs = [start(tmp_path, db_url, namespace, "approve", "o-7") for _ in range(PROCS)]
    time.sleep(1.0)
    (tmp_path / "go").touch()
    finish(procs, tmp_path)
    assert [e["item"] for e in effects(tmp_path)] == ["o-7"]  # executed exactly once
    decisions = collections.Counter(r["decision"] for r in results(tmp_path))
    assert decisions == {"executed": 1, "dedup": PROCS - 1}
    assert {r["value"] for r in results(tmp_path)} == {"refunded o-7"}
    approval = guard.gov.get_approval(first.approval_id)
    assert approval is not None and approval.state == "consumed"
    assert os.environ.get("PYTHONHASHSEED") != "x"  # (the workers ran in fresh interpreters)
