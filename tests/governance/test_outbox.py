"""Notifications delivered through the outbox (issue 16 item 3), on SQLite, PostgreSQL,
MariaDB and Redis (issue 18), against real receivers: a webhook and a Slack-compatible
receiver on 127.0.0.1 (http.server) and an SMTP server (aiosmtpd).

What is proven: the outbox rows commit with the decision's audit row or not at all;
every event reaches every receiver *at least once* with one stable id, so receivers that
dedupe on it (``webhook-id`` / ``Message-ID``) see *exactly one* event each, even when the
deliverer process is killed after a send and before its mark; signatures verify; 500s
are retried with growing backoff, then the row is dead and ``notify retry`` revives it;
two deliverers never claim one row.
"""

from __future__ import annotations

import email
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from governance._loopback import Reply, Request, loopback, verifying
from onceonly_core import Guard
from onceonly_core.governance import Policy
from onceonly_core.governance.outbox import Deliverer, Settings
from onceonly_core.governance.signing import ReplayCache
from onceonly_core.stores import schema as S
from onceonly_core.stores.govsql import GovStore
from onceonly_core.stores.sql import SQLStore

aiosmtpd = pytest.importorskip("aiosmtpd.controller")

SECRET = "whsec_b3V0Ym94LXNlY3JldC1mb3ItbG9vcGJhY2s="
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("allow_loopback")


@pytest.fixture
def db_url(gov_url: str) -> str:
    """Every backend with an outbox: the SQL databases and Redis."""
    return gov_url


def sql_only(url: str, what: str) -> None:
    if url.startswith("redis"):
        pytest.skip(f"{what} runs on a SQL database only (onceonly serve)")


@pytest.fixture
def guard(db_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Guard]:
    # The deliverer under test runs where each test says, not in this process's thread.
    monkeypatch.setenv("ONCEONLY_NOTIFY_IN_PROCESS", "0")
    if db_url.startswith(("postgresql", "mysql")):
        with SQLStore(db_url) as store:
            store.migrate()
    g = Guard(db_url, namespace=namespace, quiet=True)
    g.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["delete_*"]))
    yield g
    if db_url.startswith(("postgresql", "mysql")):
        # The shared databases: no pending row is left for a later test's server, whose
        # deliverer serves every tenant, to work through first.
        import sqlalchemy as sa

        from onceonly_core.stores.schema import outbox

        with g.gov.store.engine.begin() as conn:  # type: ignore[attr-defined]
            conn.execute(sa.delete(outbox).where(outbox.c.tenant == namespace))
    g.close()


#: A decision's audit entry that notifies (what the engine hands the store).
BLOCKED = {
    "agent_id": "bot",
    "tool": "t",
    "decision": "blocked",
    "reason": "tool_blocked",
    "risk_level": "low",
    "spend_micros": 0,
    "notify": {"type": "blocked", "agent_id": "bot", "tool": "t"},
}


def delete_user(user: str) -> str:
    return f"deleted {user}"


def flaky(token: str) -> str:
    raise RuntimeError(f"downstream refused token={token}")


def raise_two_events(g: Guard) -> None:
    g.call_tool(delete_user, {"user": "u1"}, agent_id="bot")  # blocked
    g.call_tool(flaky, {"token": "sk_live_abcdefghijklmnop1234"}, agent_id="bot")  # tool_failed


def rows(g: Guard) -> list[dict[str, Any]]:
    return g.gov.deliverer().list()  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mailbox:
    """aiosmtpd handler: keeps every message; ``on_message`` runs first (the kill)."""

    def __init__(self) -> None:
        self.messages: list[email.message.Message] = []
        self.on_message: Any = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.on_message is not None:
            self.on_message()
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    ctl = aiosmtpd.Controller(box, hostname="127.0.0.1", port=port)
    ctl.start()
    yield box, port
    ctl.stop()


# -- the outbox is written with the decision --------------------------------------------
def test_the_notification_commits_with_its_audit_row_or_not_at_all(guard: Guard) -> None:
    guard.gov.add_webhook("https://hooks.example.com/x", SECRET)
    raise_two_events(guard)
    got = rows(guard)
    assert sorted(r["event_type"] for r in got) == ["blocked", "tool_failed"]
    assert all(r["state"] == "pending" and r["attempts"] == 0 for r in got)
    failed = next(r for r in got if r["event_type"] == "tool_failed")
    assert "sk_live_abcdefghijklmnop1234" not in json.dumps(failed)  # redacted before stored
    assert failed["payload"]["id"] == failed["event_id"]

    store: Any = guard.gov.store
    if not isinstance(store, GovStore):
        return redis_decision_and_notification_are_one_script(guard, store)
    # A decision's transaction that rolls back leaves neither its audit row nor its
    # notification behind.
    entry = dict(BLOCKED)

    def boom(conn: sa.Connection, now: float) -> None:
        store._append(conn, now, guard.namespace, entry)
        mine = sa.select(sa.func.count()).where(S.outbox.c.tenant == guard.namespace)
        assert conn.execute(mine).scalar() == 3
        raise RuntimeError("the decision's transaction fails")

    with pytest.raises(RuntimeError):
        store._tx(boom)
    assert len(rows(guard)) == 2
    store._tx(lambda conn, now: store._append(conn, now, guard.namespace, entry))
    assert len(rows(guard)) == 3


def redis_decision_and_notification_are_one_script(guard: Guard, store: Any) -> None:
    """Redis: the rows are written by the script that appends the audit row. A try the
    script refuses (the chain head moved under it: hash again) writes neither, and a
    release whose hold is gone (a sweep audited it) writes no notification either."""
    entry = dict(BLOCKED)
    heads = 0
    read = store._read

    def racing_read(name: str, keys: Any, args: Any) -> Any:
        nonlocal heads
        got = read(name, keys, args)
        if name == "head" and heads == 0:
            heads += 1
            # Another append of this agent lands between our head read and our script.
            store._append(guard.namespace, "bot", {**entry, "notify": None})
        return got

    store._read = racing_read
    try:
        store.append_audit(guard.namespace, entry)
    finally:
        del store._read
    assert heads == 1  # the first script was refused, the second wrote
    assert len(rows(guard)) == 3  # one row for the decision, not one per try
    assert not guard.gov.store.verify_audit(guard.namespace)
    assert not store.release(guard.namespace, "bot", f"gone@{guard.namespace}", entry)
    assert len(rows(guard)) == 3


# -- every event, exactly once per receiver, across deliverer kills -----------------------
def test_every_receiver_gets_every_event_once_across_deliverer_kills(
    guard: Guard,
    db_url: str,
    smtp: tuple[Mailbox, int],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    box, smtp_port = smtp
    current: dict[str, subprocess.Popen[bytes]] = {}
    killed: list[str] = []

    def kill_once(receiver: str) -> None:
        # The receiver has the event; the deliverer dies before it can mark the row.
        if receiver not in killed:
            killed.append(receiver)
            proc = current["proc"]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def webhook(req: Request) -> Reply:
        kill_once("webhook")
        return Reply(204, b"")

    def slack(req: Request) -> Reply:
        kill_once("slack")
        return Reply(200, b"ok")

    box.on_message = lambda: kill_once("email")
    cache = ReplayCache()
    with loopback(verifying(SECRET, cache, webhook)) as hook, loopback(slack) as chat:
        env = {
            "ONCEONLY_NOTIFY_SLACK_URL": chat.url,
            "ONCEONLY_NOTIFY_EMAIL_TO": "ops@example.com",
            "ONCEONLY_SMTP_HOST": "127.0.0.1",
            "ONCEONLY_SMTP_PORT": str(smtp_port),
            "ONCEONLY_NOTIFY_LEASE": "1",
            "ONCEONLY_NOTIFY_BACKOFF": "0.1",
        }
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        guard.gov.add_webhook(hook.url, SECRET)
        raise_two_events(guard)
        assert len(rows(guard)) == 6  # 2 events x (webhook, slack, email)

        child = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'integrations'}"}
        command = [sys.executable, "-m", "onceonly_core.cli", "notify", "deliver"]
        command += ["--url", db_url, "--namespace", guard.namespace, "--timeout", "20"]
        for _ in range(6):  # each receiver kills one deliverer: 3 kills, then it finishes
            proc = current["proc"] = subprocess.Popen(command, env=child, cwd=tmp_path)
            proc.wait(60)
            if proc.returncode == 0:
                break
        assert proc.returncode == 0
        assert sorted(killed) == ["email", "slack", "webhook"]

    got = rows(guard)
    assert [r["state"] for r in got] == ["delivered"] * 6, got
    events = {r["event_id"] for r in got}
    assert len(events) == 2

    # Webhook: signed (verifying() answered 401 otherwise), each event at least once and
    # the one it was killed on twice, always under the same webhook-id.
    assert all(r.verified for r in hook.requests)
    ids = [r.headers["webhook-id"] for r in hook.requests]
    assert set(ids) == events and len(ids) == 3
    assert {json.loads(r.body)["id"] for r in hook.requests} == events

    # Slack: {"text": ...} naming the event id; the resend is the same text.
    texts = [json.loads(r.body)["text"] for r in chat.requests]
    assert len(texts) == 3 and {t.rsplit("[", 1)[1].rstrip("]") for t in texts} == events
    assert all(t.startswith("[onceonly] ") for t in texts)

    # Email: one Message-ID per event, the resend under the same one.
    mids = [m["Message-ID"] for m in box.messages]
    assert len(mids) == 3 and {m.strip("<>").split("@")[0] for m in mids} == events
    assert all(m["To"] == "ops@example.com" for m in box.messages)
    assert not any("sk_live_abcdefghijklmnop1234" in m.as_string() for m in box.messages)


# -- retries, backoff, dead letters, retry --------------------------------------------------
def test_500s_are_retried_with_backoff_then_dead_then_retried_by_the_cli(
    guard: Guard, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onceonly_core.governance import outbox

    jitter: list[tuple[float, float]] = []

    def top(a: float, b: float) -> float:  # the jitter's range, recorded; its top, used
        jitter.append((a, b))
        return b

    monkeypatch.setattr(outbox.random, "uniform", top)
    failing = {"on": True}

    def receiver(req: Request) -> Reply:
        if failing["on"]:
            return Reply(500, b'{"error": "internal: SECRET-RECEIVER-DETAIL"}')
        return Reply(200, b"")

    with loopback(verifying(SECRET, ReplayCache(), receiver)) as hook:
        guard.gov.add_webhook(hook.url, SECRET, events=["blocked"])
        guard.call_tool(delete_user, {"user": "u1"}, agent_id="bot")
        d = Deliverer(
            guard.gov.store,  # type: ignore[arg-type]
            Settings.from_env(max_attempts=3, backoff_base=2.0),
            tenant=guard.namespace,
        )
        schedule = []
        for _ in range(3):
            deadline = time.monotonic() + 10
            while not d.deliver_due():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            (row,) = d.list()
            schedule.append((row["attempts"], row["next_attempt_at"] - time.time()))
        (row,) = d.list()
        assert row["state"] == "dead" and row["attempts"] == 3
        assert row["last_error"].endswith("HTTP 500")
        assert "SECRET-RECEIVER-DETAIL" not in json.dumps(row)  # the body is never kept
        # Backoff: steps of 2 s then 4 s (base 2, doubling), each jittered over its upper half.
        assert jitter == [(0, 1.0), (0, 2.0), (0, 4.0)]
        assert 1.5 < schedule[0][1] <= 2.0 and 3.5 < schedule[1][1] <= 4.0
        assert len(hook.requests) == 3
        assert len({r.headers["webhook-id"] for r in hook.requests}) == 1
        assert d.deliver_due() == 0  # dead rows are never claimed

        from typer.testing import CliRunner

        from onceonly_core.cli import build_app

        runner = CliRunner()
        args = ["--url", db_url, "--namespace", guard.namespace]
        dead = runner.invoke(build_app(), ["notify", "list", "--state", "dead", "--json", *args])
        assert dead.exit_code == 0, dead.output
        assert [r["id"] for r in json.loads(dead.output)] == [row["id"]]
        failing["on"] = False
        out = runner.invoke(build_app(), ["notify", "retry", row["id"], *args])
        assert out.exit_code == 0, out.output
        assert d.drain(10)
        d.close()
    (row,) = rows(guard)
    assert row["state"] == "delivered" and row["last_error"] is None
    assert len(hook.requests) == 4 and hook.requests[-1].verified == row["event_id"]
    missing = runner.invoke(build_app(), ["notify", "retry", "ntf_nope", *args])
    assert missing.exit_code == 1


def test_a_resend_refused_as_a_replay_is_retried_but_a_first_401_is_dead(guard: Guard) -> None:
    """A deliverer that died after its send leaves a row whose resend may land in the same
    second (same id, timestamp, signature): the receiver's replay cache answers 401. That
    resend is retried, not dead; a 401 to a first attempt (a wrong secret) is dead at once."""
    answers = [401, 401, 200]  # the lost attempt's echo, refused twice, then accepted

    def receiver(req: Request) -> Reply:
        return Reply(answers.pop(0), b"")

    with loopback(receiver) as hook:
        guard.gov.add_webhook(hook.url, SECRET, events=["blocked"])
        guard.call_tool(delete_user, {"user": "u1"}, agent_id="bot")
        guard.call_tool(delete_user, {"user": "u2"}, agent_id="bot")
        d = Deliverer(
            guard.gov.store,  # type: ignore[arg-type]
            Settings.from_env(max_attempts=5, backoff_base=0.0, lease=1.0),
            tenant=guard.namespace,
        )
        store: Any = guard.gov.store
        # Attempt 1 of the first event is claimed and lost (its deliverer "died").
        lost = store.outbox_claim(guard.namespace, 1, 1.0)
        assert len(lost) == 1
        deadline = time.monotonic() + 20
        while answers:
            assert time.monotonic() < deadline, d.list()
            d.deliver_due()
            time.sleep(0.05)
        got = {r["id"]: r for r in d.list()}
        first = got[lost[0]["id"]]
        other = next(r for k, r in got.items() if k != lost[0]["id"])
        d.close()
    # The first event's resends: refused once as a replay, retried, delivered.
    assert first["state"] == "delivered" and first["attempts"] == 3, first
    # The second event's first attempt got a 401 (a wrong secret): dead, never retried.
    assert other["state"] == "dead" and other["attempts"] == 1, other
    assert other["last_error"].endswith("HTTP 401")


# -- two deliverers, one send per row ---------------------------------------------------------
def test_two_deliverers_never_claim_the_same_row(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONCEONLY_NOTIFY_EMAIL_TO", "ops@example.com")
    store: Any = guard.gov.store
    for i in range(40):
        store.enqueue_notification(guard.namespace, {"type": "run_failed", "data": {"i": i}})
    claimed: list[list[str]] = [[], []]
    go = threading.Barrier(2)

    def take(n: int) -> None:
        d = Deliverer(store, Settings.from_env(), tenant=guard.namespace)
        go.wait()
        while batch := d.claim(limit=5):
            claimed[n] += [c.id for c in batch]

    threads = [threading.Thread(target=take, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    both = claimed[0] + claimed[1]
    assert len(both) == 40 and len(set(both)) == 40


def two_deliverers_send(
    guard: Guard, events: int, lease: float, delay: float = 0.0, after_send: float = 0.0
) -> list[str]:
    """``events`` notifications to one webhook (answering after ``delay``), drained by two
    deliverers at once (``lease``, a 1 s timeout; ``after_send``: the time each send takes
    beyond it); the webhook-ids received, once all are delivered."""
    got: list[str] = []
    lock = threading.Lock()

    def receiver(req: Request) -> Reply:
        with lock:
            got.append(req.headers["webhook-id"])
        return Reply(204, b"", delay=delay)

    with loopback(receiver) as hook:
        guard.gov.add_webhook(hook.url, SECRET)
        store: Any = guard.gov.store
        for i in range(events):
            store.enqueue_notification(guard.namespace, {"type": "run_failed", "data": {"i": i}})
        assert len(rows(guard)) == events
        settings = Settings.from_env(lease=lease, timeout=1.0, backoff_base=0.0)
        slow = (lambda c: time.sleep(after_send)) if after_send else None
        ds = [Deliverer(store, settings, tenant=guard.namespace, on_sent=slow) for _ in range(2)]
        threads = [threading.Thread(target=d.drain, args=(40,)) for d in ds]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for d in ds:
            d.close()
    states = [r["state"] for r in rows(guard)]
    assert states == ["delivered"] * events, states
    return got


def test_a_pass_sends_nothing_its_lease_cannot_cover(guard: Guard) -> None:
    """Two deliverers, a slow receiver (0.6 s a send) and a 2 s lease at a 1 s timeout: a
    pass that claimed every due row at once would still be sending after its lease ended,
    and the other deliverer would claim and send those rows a second time."""
    got = two_deliverers_send(guard, 6, lease=2.0, delay=0.6)
    assert len(got) == 6 and len(set(got)) == 6, sorted(got)  # each event sent once


def test_a_pass_starts_no_send_its_lease_cannot_cover(guard: Guard) -> None:
    """A send can outlast the timeout, which bounds each step of it (connect, write, read;
    each SMTP command), not the whole: here every send takes 2.2 s (the deliverer's test
    hook waits after it). After one, a 3 s lease has less than a 1 s timeout left, so the
    pass leaves its other claimed rows to lapse instead of sending them while another
    deliverer may claim them."""
    got = two_deliverers_send(guard, 3, lease=3.0, after_send=2.2)
    assert len(got) == 3 and len(set(got)) == 3, sorted(got)  # each event sent once


# -- the server delivers, across its own restart ---------------------------------------------
def test_the_server_delivers_across_a_restart_mid_delivery(
    guard: Guard, db_url: str, tmp_path: Path
) -> None:
    sql_only(db_url, "the server")
    pytest.importorskip("fastapi")
    procs: list[subprocess.Popen[bytes]] = []
    killed: list[str] = []

    def receiver(req: Request) -> Reply:
        if not killed:  # the first delivery: the server dies before it can mark the row
            killed.append(req.headers["webhook-id"])
            os.kill(procs[-1].pid, signal.SIGKILL)
            procs[-1].wait()
        return Reply(204, b"")

    child = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'integrations'}",
        "ONCEONLY_NOTIFY_LEASE": "1",
    }

    def serve() -> None:
        command = [sys.executable, "-m", "onceonly_core.cli", "serve", "--url", db_url]
        command += ["--port", str(free_port())]
        procs.append(subprocess.Popen(command, env=child, cwd=tmp_path))

    with loopback(verifying(SECRET, ReplayCache(), receiver)) as hook:
        guard.gov.add_webhook(hook.url, SECRET, events=["tool_failed"])
        guard.call_tool(flaky, {"token": "t1"}, agent_id="bot")  # written; nobody delivers yet
        try:
            serve()
            deadline = time.monotonic() + 60
            while not killed:
                assert time.monotonic() < deadline, "the server never delivered"
                time.sleep(0.05)
            assert rows(guard)[0]["state"] == "pending"  # sent, never marked
            serve()
            while rows(guard)[0]["state"] != "delivered":
                assert time.monotonic() < deadline, "the restarted server never delivered"
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                p.wait(30)
    # Sent again after the kill under the same id (receivers dedupe on it): accepted by the
    # receiver exactly twice, the send the server died on and the restarted server's resend.
    ids = [r.headers["webhook-id"] for r in hook.requests]
    assert set(ids) == {killed[0]}, ids
    accepted = [r for r in hook.requests if r.verified]
    assert len(accepted) == 2, [(r.headers["webhook-timestamp"], r.verified) for r in hook.requests]
    # A resend may be signed in the same whole second as the lost send (the restarted server
    # can come up and claim within it): the receiver's replay cache refuses that echo (401)
    # and the deliverer retries it a second later (docs/notifications.md). Anything refused
    # here is such an echo of an accepted request, never a bad signature.
    stamps = {r.headers["webhook-timestamp"] for r in accepted}
    assert all(r.headers["webhook-timestamp"] in stamps for r in hook.requests), ids
    (row,) = rows(guard)
    assert row["state"] == "delivered" and row["attempts"] == len(hook.requests), row


# -- the server's stored preferences choose the e-mails ----------------------------------------
def test_stored_preferences_choose_which_events_are_mailed(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql_only(db_url, "stored preferences")
    pytest.importorskip("fastapi")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*httpx2.*")
        from fastapi.testclient import TestClient

    from onceonly_core.server import create_app
    from onceonly_core.server.control import ControlPlane

    monkeypatch.setenv("ONCEONLY_NOTIFY_IN_PROCESS", "0")
    monkeypatch.setenv("ONCEONLY_NOTIFY_EMAIL_TO", "ops@example.com")
    tenant = f"t{time.time_ns()}"
    cp = ControlPlane(db_url, job_workers=0, migrate=True)
    key = cp.keys.create_key(tenant)
    try:
        with TestClient(create_app(control=cp)) as http:
            auth = {"Authorization": f"Bearer {key}"}
            gov = cp.guard(tenant).gov

            def mailed() -> list[str]:
                return sorted(
                    r["event_type"]
                    for r in gov.deliverer().list()
                    if r["destination"] == "email:ops@example.com"
                )

            gov.post_event("r1", "run_finished", status="failed")
            assert mailed() == []  # e-mail off by default (the stored preference)
            r = http.post(
                "/v1/me/notifications",
                json={
                    "email_notifications_enabled": True,
                    "tool_error_notifications_enabled": True,
                },
                headers=auth,
            )
            assert r.status_code == 200, r.text
            gov.post_event("r2", "run_finished", status="failed")  # run failures stay off
            gov.upsert_policy(Policy(agent_id="bot"))
            cp.guard(tenant).call_tool(flaky, {"token": "t"}, agent_id="bot")
            assert mailed() == ["tool_failed"]
        from onceonly_core.governance import outbox

        assert outbox.preferences is None  # the server's hook ends with the server
    finally:
        # The shared database keeps no row of this tenant's: its e-mail would stay
        # pending (no mail relay here) for every other test's deliverer to try again.
        with sa.create_engine(db_url, poolclass=sa.NullPool).begin() as conn:
            conn.execute(sa.text("DELETE FROM onceonly_outbox WHERE tenant = :t"), {"t": tenant})
        cp.close()


# -- in-process delivery (the default for an embedded guard) ---------------------------------
def test_an_embedded_guard_delivers_by_itself_and_retries_without_a_flush(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONCEONLY_NOTIFY_IN_PROCESS", "1")
    monkeypatch.setenv("ONCEONLY_NOTIFY_BACKOFF", "0.1")
    replies = iter([Reply(503, b""), Reply(204, b"")])

    with loopback(verifying(SECRET, ReplayCache(), lambda req: next(replies))) as hook:
        guard.gov.add_webhook(hook.url, SECRET, events=["blocked"])
        guard.call_tool(delete_user, {"user": "u1"}, agent_id="bot")
        deadline = time.monotonic() + 20
        while not (rows(guard) and rows(guard)[0]["state"] == "delivered"):
            assert time.monotonic() < deadline, rows(guard)
            time.sleep(0.05)
    assert [r.verified for r in hook.requests] == [rows(guard)[0]["event_id"]] * 2
