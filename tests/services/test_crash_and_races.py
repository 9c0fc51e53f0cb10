"""Exactly-once under real concurrency and real crashes: separate OS processes, real databases.

Every test starts ``tests/procs/worker.py`` in subprocesses. Each execution of the guarded
tool appends one line to an effects log (``O_APPEND``); that log is the side effect these
tests count, next to the ledger's own records and what every caller got back.

* Storms: many processes call the same keys at the same instant (fresh start, and retries
  after a failed or interrupted first execution): exactly one execution per key, and every
  caller gets that execution's result.
* Crash points (DESIGN §4, docs "crash matrix"): SIGKILL (a) before the claim commits,
  (b) after the claim but before the effect, (c) after the effect but before completion,
  (d) after completion; then another process calls the same key.
* Pause past the lease: a SIGSTOPped owner loses its claim to a second process; when it
  resumes, its completion is refused (fencing), and the ledger keeps the one winner.
* A completion that committed but whose reply was lost (in-process, a store that fails
  after the commit): success, not LeaseLost.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from onceonly_core import Guard, StoreError
from onceonly_core.stores.sql import SQLStore
from procs.harness import Worker, Workers, ledger, open_ledger, stored_value, wait_for_file, workers

PROCS = 8
KEYS = 50
ROUNDS = 20
SHORT_LEASE = "1.0"  # the crashed first owner's lease: a second caller waits ~1 s, not 30 s


@pytest.fixture
def store(db_url: str) -> Iterator[SQLStore]:
    """The test's own view of the ledger (the schema is created here, before any worker)."""
    s = open_ledger(db_url)
    yield s
    s.close()


# -- storms -----------------------------------------------------------------------------
def start_storm(w: Workers, tmp: Path, procs: int, *args: str) -> list[Worker]:
    barrier = tmp / f"barrier-{len(w.started)}"
    barrier.mkdir()
    return [
        w.start("storm", "--barrier", str(barrier), "--procs", str(procs), *args)
        for _ in range(procs)
    ]


def check_callers_agree(callers: list[Worker], value_of: dict[str, str], rounds: int) -> None:
    """Every caller got, for every item, the value of the one execution of that item."""
    for worker in callers:
        got = worker.results()
        assert len(got) == KEYS * rounds, worker.console()
        assert collections.Counter(r["item"] for r in got) == dict.fromkeys(value_of, 1)
        wrong = [r for r in got if r.get("value") != value_of[r["item"]]]
        assert not wrong, f"a caller got another execution's result or an error: {wrong[:3]}"


@pytest.mark.timeout(240)
@pytest.mark.multiprocess
def test_storm_every_key_runs_once_and_every_caller_gets_its_result(
    db_url: str, store: SQLStore, namespace: str, tmp_path: Path
) -> None:
    """8 processes x 50 keys x 20 rounds, each round released at one instant.

    Each round uses 50 new keys, so all 20 rounds are races (with the same keys every round,
    rounds 2-20 would only replay); the 8 processes take them in different shuffled orders.
    The default SQLite durability (synchronous=FULL) is used: it is fast enough here.
    """
    with workers(tmp_path, db_url, namespace) as w:
        callers = start_storm(w, tmp_path, PROCS, "--keys", str(KEYS), "--rounds", str(ROUNDS))
        for worker in callers:
            worker.expect_exit(0, timeout=200)
        effects = w.effect_lines()

    items = {f"r{r}-k{i}" for r in range(ROUNDS) for i in range(KEYS)}
    runs = collections.Counter(e["item"] for e in effects)
    assert set(runs) == items
    assert [item for item, n in runs.items() if n != 1] == [], "a key ran more than once"
    assert {(e["token"], e["attempt"]) for e in effects} == {(1, 1)}

    records = ledger(store, namespace)
    assert len(records) == len(items)
    value_of = {}
    for e in effects:
        rec = records[e["key"]]
        assert (rec.state, rec.executions, rec.token, rec.attempt) == ("succeeded", 1, 1, 1)
        assert stored_value(rec) == e["value"]
        value_of[e["item"]] = e["value"]
    check_callers_agree(callers, value_of, ROUNDS)


@pytest.mark.parametrize("first", ["fail", "interrupt"])
@pytest.mark.multiprocess
def test_retry_storm_after_a_failed_or_interrupted_first_run(
    db_url: str, store: SQLStore, namespace: str, tmp_path: Path, first: str
) -> None:
    """50 keys whose first execution raised (``fail``: recorded failed) or was interrupted
    (``interrupt``: KeyboardInterrupt, left running with its lease released: outcome
    unknown); then 8 processes retry all 50 at once: exactly one re-execution per key."""
    with workers(tmp_path, db_url, namespace) as w:
        (setup,) = start_storm(w, tmp_path, 1, "--tool", first)
        setup.expect_exit(0)
        firsts = {e["item"]: e for e in w.effect_lines()}
        assert len(firsts) == KEYS
        expected = "KeyboardInterrupt" if first == "interrupt" else "RuntimeError"
        assert {r["error"] for r in setup.results()} == {expected}
        before = ledger(store, namespace)
        for rec in before.values():
            if first == "fail":
                assert (rec.state, rec.executions, rec.token) == ("failed", 0, 1)
            else:
                assert (rec.state, rec.executions, rec.token) == ("running", 0, 1)
                assert not rec.lease_live, "an interrupted call must release its lease"

        retriers = start_storm(w, tmp_path, PROCS)
        for worker in retriers:
            worker.expect_exit(0)
        effects = w.effect_lines()

    reruns = [e for e in effects if e["kind"] == "ok"]
    assert collections.Counter(e["item"] for e in reruns) == dict.fromkeys(firsts, 1)
    records = ledger(store, namespace)
    assert len(records) == KEYS
    value_of = {}
    for e in reruns:
        assert (e["token"], e["attempt"]) == (2, 2)
        assert e["idem"] == firsts[e["item"]]["idem"], "a retry must reuse the idempotency key"
        rec = records[e["key"]]
        assert (rec.state, rec.executions, rec.token, rec.attempt) == ("succeeded", 1, 2, 2)
        assert rec.error is None
        assert stored_value(rec) == e["value"]
        value_of[e["item"]] = e["value"]
    check_callers_agree(retriers, value_of, 1)


@contextlib.contextmanager
def fresh_database(db_url: str, namespace: str, tmp_path: Path) -> Iterator[str]:
    """A database with no ledger schema yet: a new SQLite file, or a new server database."""
    url = sa.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        yield f"sqlite:///{tmp_path}/fresh.db"
        return
    name = "oo_" + namespace.replace("-", "_")
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except sa.exc.DBAPIError as err:
        admin.dispose()
        pytest.skip(f"cannot create a scratch database: {err.orig}")
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.mark.multiprocess
def test_workers_creating_a_fresh_schema_at_once(
    db_url: str, namespace: str, tmp_path: Path
) -> None:
    """8 workers with auto_migrate=True start on a database without the ledger schema and
    make their first call at the same instant: one creates the schema, the others wait for
    it and find it current; no worker fails. (Before the fix, PostgreSQL and MariaDB
    workers failed with "relation/table already exists".)"""
    with fresh_database(db_url, namespace, tmp_path) as url, workers(tmp_path, url, namespace) as w:
        callers = start_storm(w, tmp_path, PROCS, "--keys", "5")
        for worker in callers:
            worker.expect_exit(0)
        runs = collections.Counter(e["item"] for e in w.effect_lines())
    assert runs == {f"r0-k{i}": 1 for i in range(5)}


# -- kill -9 at each crash point --------------------------------------------------------
KEY = "order-42"


def crash_first(w: Workers, point: str) -> None:
    """The first owner claims with a 1 s lease and SIGKILLs itself at ``point``."""
    first = w.start("one", "--key", KEY, "--lease", SHORT_LEASE, "--crash", point)
    first.expect_killed()


def call_again(w: Workers, *args: str) -> Worker:
    return w.start("one", "--key", KEY, *args)


def only_value(worker: Worker) -> str:
    got = [r for r in worker.results() if "value" in r]
    assert len(got) == 1, worker.results()
    return str(got[0]["value"])


@pytest.mark.multiprocess
def test_kill_before_the_claim_commits(
    db_url: str, store: SQLStore, namespace: str, tmp_path: Path
) -> None:
    """(a) Killed inside the store's ``claim``, before its statement is sent: the ledger has
    nothing, no effect happened, and the next caller runs the tool exactly once."""
    with workers(tmp_path, db_url, namespace) as w:
        crash_first(w, "before_claim")
        assert store.get(namespace, KEY) is None
        assert w.effect_lines() == []

        second = call_again(w)
        second.expect_exit(0)
        effects = w.effect_lines()
    assert [(e["token"], e["attempt"]) for e in effects] == [(1, 1)]
    rec = store.get(namespace, KEY)
    assert rec is not None
    assert (rec.state, rec.executions, rec.token) == ("succeeded", 1, 1)
    assert stored_value(rec) == effects[0]["value"] == only_value(second)


@pytest.mark.parametrize("on_unknown", ["retry", "reconcile"])
@pytest.mark.multiprocess
def test_kill_after_the_claim_before_the_effect(
    db_url: str, store: SQLStore, namespace: str, tmp_path: Path, on_unknown: str
) -> None:
    """(b) Killed on the tool's first line: the claim is durable (running, token 1) and no
    effect happened. Once the lease expires, the next caller runs exactly once — directly
    (``retry``) or after a reconcile callback finds no trace downstream (NOT_DONE)."""
    with workers(tmp_path, db_url, namespace) as w:
        crash_first(w, "before_effect")
        rec = store.get(namespace, KEY)
        assert rec is not None
        assert (rec.state, rec.token, rec.executions) == ("running", 1, 0)
        assert w.effect_lines() == []

        second = call_again(w, "--on-unknown", on_unknown)
        second.expect_exit(0)
        effects = w.effect_lines()
        if on_unknown == "reconcile":
            assert {"reconciled": True, "attempt": 2, "found": 0} in second.results()
    assert [(e["token"], e["attempt"]) for e in effects] == [(2, 2)]
    rec = store.get(namespace, KEY)
    assert rec is not None
    assert (rec.state, rec.executions, rec.token, rec.attempt) == ("succeeded", 1, 2, 2)
    assert stored_value(rec) == effects[0]["value"] == only_value(second)


@pytest.mark.multiprocess
def test_kill_after_the_effect_retry_runs_again_with_the_same_idempotency_key(
    db_url: str, store: SQLStore, namespace: str, tmp_path: Path
) -> None:
    """(c) Killed after the effect, before completion: the outcome is unknown. With
    ``on_unknown="retry"`` the next caller runs again — attempt 2 with the SAME
    idempotency key, so a downstream that dedups on it applies the effect once."""
    with workers(tmp_path, db_url, namespace) as w:
        crash_first(w, "after_effect")
        second = call_again(w, "--on-unknown", "retry")
        second.expect_exit(0)
        first_run, second_run = w.effect_lines()
    assert (first_run["token"], first_run["attempt"]) == (1, 1)
    assert (second_run["token"], second_run["attempt"]) == (2, 2)
    assert second_run["idem"] == first_run["idem"] == f"{namespace}:{KEY}"
    rec = store.get(namespace, KEY)
    assert rec is not None
    assert (rec.state, rec.executions, rec.token, rec.attempt) == ("succeeded", 1, 2, 2)
    assert stored_value(rec) == second_run["value"] == only_value(second)


@pytest.mark.multiprocess
def test_kill_after_the_effect_raise_runs_nothing(
    db_url: str, store: SQLStore, namespace: str, tmp_path: Path
) -> None:
    """(c) With ``on_unknown="raise"`` the next caller gets UnknownOutcome (naming the dead
    claim's token), runs nothing, and leaves the record for manual reconciliation."""
    with workers(tmp_path, db_url, namespace) as w:
        crash_first(w, "after_effect")
        second = call_again(w, "--on-unknown", "raise")
        second.expect_exit(3)
        (answer,) = second.results()
        effects = w.effect_lines()
    assert (answer["error"], answer["token"], answer["record_token"]) == ("UnknownOutcome", 1, 1)
    assert len(effects) == 1
    rec = store.get(namespace, KEY)
    assert rec is not None
    assert (rec.state, rec.token, rec.executions) == ("running", 1, 0)
    assert not rec.lease_live


@pytest.mark.multiprocess
def test_kill_after_the_effect_reconcile_records_the_downstream_answer(
    db_url: str, store: SQLStore, namespace: str, tmp_path: Path
) -> None:
    """(c) With a reconcile callback that finds the effect downstream (by idempotency key)
    and returns its value: the tool is not run again, that value is recorded, and later
    callers replay it."""
    with workers(tmp_path, db_url, namespace) as w:
        crash_first(w, "after_effect")
        (first_run,) = w.effect_lines()

        second = call_again(w, "--on-unknown", "reconcile")
        second.expect_exit(0)
        assert {"reconciled": True, "attempt": 2, "found": 1} in second.results()
        assert only_value(second) == first_run["value"]
        rec = store.get(namespace, KEY)
        assert rec is not None
        assert (rec.state, rec.executions, rec.token) == ("succeeded", 1, 2)
        assert stored_value(rec) == first_run["value"]

        third = call_again(w, "--on-unknown", "reconcile")
        third.expect_exit(0)
        assert only_value(third) == first_run["value"]
        assert not any("reconciled" in r for r in third.results())
        assert w.effect_lines() == [first_run]


@pytest.mark.multiprocess
def test_kill_after_completion_replays(
    db_url: str, store: SQLStore, namespace: str, tmp_path: Path
) -> None:
    """(d) Killed right after the guard returned: the outcome is recorded, so the next
    caller replays the stored result and nothing runs again."""
    with workers(tmp_path, db_url, namespace) as w:
        crash_first(w, "after_complete")
        second = call_again(w)
        second.expect_exit(0)
        effects = w.effect_lines()
    assert len(effects) == 1
    assert only_value(second) == effects[0]["value"]
    rec = store.get(namespace, KEY)
    assert rec is not None
    assert (rec.state, rec.executions, rec.token) == ("succeeded", 1, 1)


# -- pause past the lease (SIGSTOP) and fencing -----------------------------------------
def wait_until_lease_expired(store: SQLStore, namespace: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rec = store.get(namespace, KEY)
        assert rec is not None and rec.token == 1 and rec.state == "running", rec
        if not rec.lease_live:  # judged by the ledger's clock
            return
        assert time.monotonic() < deadline, "a stopped owner's lease never expired"
        time.sleep(0.05)


@pytest.mark.parametrize("resume", ["after_b_finished", "while_b_runs"])
@pytest.mark.multiprocess
def test_paused_owner_is_fenced_out(
    db_url: str, store: SQLStore, namespace: str, tmp_path: Path, resume: str
) -> None:
    """A claims with a 1 s lease, performs its effect and is SIGSTOPped inside the tool
    (its heartbeat thread stops with it). Past the lease, B takes over (token 2) and runs.
    When A resumes — after B finished, or while B still holds the claim — A's completion is
    refused with LeaseLost and the ledger keeps B's result: one winner. Both effects did
    happen (the honest hazard), under the same idempotency key."""
    run_a, release_a = tmp_path / "a-running", tmp_path / "a-release"
    run_b, release_b = tmp_path / "b-running", tmp_path / "b-release"
    with workers(tmp_path, db_url, namespace) as w:
        a = w.start(
            "one",
            "--key",
            KEY,
            "--lease",
            SHORT_LEASE,
            "--running-file",
            str(run_a),
            "--release-file",
            str(release_a),
        )
        wait_for_file(run_a, a)
        os.kill(a.proc.pid, signal.SIGSTOP)
        wait_until_lease_expired(store, namespace)

        if resume == "after_b_finished":
            b = call_again(w)
            b.expect_exit(0)
            release_a.touch()
            os.kill(a.proc.pid, signal.SIGCONT)
            a.expect_exit(3)
        else:
            b = call_again(w, "--running-file", str(run_b), "--release-file", str(release_b))
            wait_for_file(run_b, b)
            release_a.touch()
            os.kill(a.proc.pid, signal.SIGCONT)
            a.expect_exit(3)
            rec = store.get(namespace, KEY)
            assert rec is not None
            assert (rec.state, rec.token) == ("running", 2)
            assert rec.lease_live, "A's refused completion must leave B's claim alone"
            release_b.touch()
            b.expect_exit(0)

        (a_answer,) = a.results()
        effects = w.effect_lines()
    a_run, b_run = sorted(effects, key=lambda e: e["token"])
    assert (a_run["token"], a_run["attempt"], b_run["token"], b_run["attempt"]) == (1, 1, 2, 2)
    assert a_run["idem"] == b_run["idem"]
    assert a_answer == {
        "error": "LeaseLost",
        "token": 1,
        "record_token": 2,
        "result": a_run["value"],
    }
    rec = store.get(namespace, KEY)
    assert rec is not None
    assert (rec.state, rec.token, rec.attempt, rec.executions) == ("succeeded", 2, 2, 1)
    assert stored_value(rec) == b_run["value"] == only_value(b) != a_run["value"]


# -- a completion whose reply was lost --------------------------------------------------
class LostReply:
    """Commits the first completion, then fails as if the connection dropped before the
    reply arrived (what a database restart does to a statement in flight). A mixin over
    the URL's dialect class (SQLStore(url) returns SQLiteStore, PostgresStore, ...)."""

    lost = 1

    def finish(self, *args: Any, **kwargs: Any) -> bool:
        done: bool = super().finish(*args, **kwargs)  # type: ignore[misc]
        if self.lost:
            self.lost -= 1
            raise StoreError("server closed the connection unexpectedly")
        return done


def test_a_completion_whose_reply_was_lost_is_not_reported_as_lost_lease(
    db_url: str, store: SQLStore, namespace: str
) -> None:
    """The guard retries a completion that raised StoreError; the retry finds the record
    already succeeded under its own token. That is success, not LeaseLost (no one else
    ever held the key), and the tool ran once. Before the fix the caller got LeaseLost
    ("another owner took over and this outcome was not recorded") for a recorded result."""
    probe = SQLStore(db_url)
    lossy = type("LostReplyStore", (LostReply, type(probe)), {})(db_url)
    probe.close()
    g = Guard(store=lossy, namespace=namespace, quiet=True)
    calls: list[str] = []

    def charge(order: str) -> str:
        calls.append(order)
        return f"receipt-{order}"

    try:
        assert g(charge, "o-1") == "receipt-o-1"
        assert g(charge, "o-1") == "receipt-o-1"
    finally:
        lossy.close()
    assert calls == ["o-1"]
    rec = store.get(namespace, g.key_for(charge, "o-1"))
    assert rec is not None
    assert (rec.state, rec.token, rec.executions) == ("succeeded", 1, 1)
