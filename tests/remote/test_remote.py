"""Remote mode (``Guard("https://…", api_key=…)``) against a live ``onceonly serve`` on
PostgreSQL in a process of its own (``tests/_remote.py``).

What is shown here, beside the two store kits (``test_contract.py``) and the adapter
contract suite (``tests/integrations``), which also run in remote mode:

* one execution per key across processes and a killed worker, through the server;
* governance set on the server (``/v1`` policies, the kill switch, approvals) applies to
  remote guards, and their audit rows and timelines land in the server's database;
* tenancy is the key's: another key sees and changes nothing of this tenant's;
* failures: an unreachable server and a lost reply are ``StoreError`` and the tool does
  not run twice; bad requests are 4xx, never 5xx.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onceonly_core import Guard
from onceonly_core.errors import ConfigError, KeyReuseError, StoreError
from onceonly_core.governance.models import Policy
from onceonly_core.stores import NewClaim, open_store
from onceonly_core.stores.governance import Reservation, Want
from onceonly_core.stores.remote import RemoteStore, decode, encode
from onceonly_core.stores.sql import SQLStore
from procs.harness import workers

pytestmark = pytest.mark.timeout(240)

GOV_WORKER = Path(__file__).resolve().parents[1] / "governance" / "gov_worker.py"


def remote_guard(remote: Any, **options: Any) -> Guard:
    return Guard(remote.root, api_key=remote.key, quiet=True, **options)


@pytest.fixture
def server_db(remote_server: Any) -> Iterator[SQLStore]:
    """The server's own database, read directly (what an operator would see)."""
    store = open_store(remote_server.db_url)
    assert isinstance(store, SQLStore)
    yield store
    store.close()


# -- the call path ----------------------------------------------------------------------------
def test_a_call_runs_once_and_its_record_is_the_servers(remote: Any, server_db: SQLStore) -> None:
    g = remote_guard(remote)
    runs: list[float] = []

    def charge(amount: float) -> dict[str, float]:
        runs.append(amount)
        return {"charged": amount}

    answers = [
        g.run_call("charge", {"amount": a}, lambda: charge(1.5), scope="order-1")
        for a in (1.5, 1.5, 1.5)
    ]
    assert [a.decision for a in answers] == ["executed", "dedup", "dedup"]
    assert [a.result for a in answers] == [{"charged": 1.5}] * 3
    assert runs == [1.5]
    # The guard sees its own namespace; the server keeps it under the key's tenant.
    assert answers[0].namespace == "default/order-1"
    (rec,) = server_db.list(namespace=f"{remote.name}/default/order-1")
    assert (rec.state, rec.executions, rec.key) == ("succeeded", 1, answers[0].key)
    g.close()


def test_async_calls_and_argument_reuse_keep_the_embedded_semantics(remote: Any) -> None:
    g = remote_guard(remote)
    runs: list[str] = []

    async def send(to: str) -> str:
        await asyncio.sleep(0)
        runs.append(to)
        return f"sent to {to}"

    async def scenario() -> list[str]:
        out = []
        for _ in range(3):
            r = await g.arun_call("send", {"to": "a@x"}, lambda: send("a@x"), scope="s")
            out.append(r.decision)
        return out

    assert asyncio.run(scenario()) == ["executed", "dedup", "dedup"]
    assert runs == ["a@x"]
    # A key reused with other arguments is refused, as embedded.
    g2 = remote_guard(remote, key="fixed-key")
    g2.run_call("t", {"x": 1}, lambda: 1, scope="s")
    with pytest.raises(KeyReuseError):
        g2.run_call("t", {"x": 2}, lambda: 2, scope="s")
    g.close()
    g2.close()


# -- processes --------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_a_storm_of_processes_runs_each_key_once(
    remote: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 processes x 20 keys x 3 rounds, each round released at one instant, every process
    a remote guard (ONCEONLY_API_KEY): one execution per key, every caller its result."""
    monkeypatch.setenv("ONCEONLY_API_KEY", remote.key)
    procs, keys, rounds = 4, 20, 3
    with workers(tmp_path, remote.root, "storm") as w:
        barrier = tmp_path / "barrier"
        barrier.mkdir()
        callers = [
            w.start(
                "storm",
                "--barrier",
                str(barrier),
                "--procs",
                str(procs),
                "--keys",
                str(keys),
                "--rounds",
                str(rounds),
            )
            for _ in range(procs)
        ]
        for c in callers:
            c.expect_exit(0, timeout=200)
        effects = w.effect_lines()
    runs = collections.Counter(e["item"] for e in effects)
    assert len(runs) == keys * rounds
    assert set(runs.values()) == {1}, "a key ran more than once"
    value_of = {e["item"]: e["value"] for e in effects}
    for c in callers:
        got = c.results()
        assert len(got) == keys * rounds
        assert all(r.get("value") == value_of[r["item"]] for r in got), got[:3]


@pytest.mark.multiprocess
def test_a_worker_killed_after_its_effect_is_an_unknown_outcome_not_a_rerun(
    remote: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash matrix (c), remote: SIGKILL after the effect, before completion. The next
    caller, once the lease is out, gets UnknownOutcome (on_unknown=raise): no second run."""
    monkeypatch.setenv("ONCEONLY_API_KEY", remote.key)
    with workers(tmp_path, remote.root, "crash") as w:
        first = w.start("one", "--key", "k1", "--crash", "after_effect", "--lease", "1.0")
        first.expect_killed()
        second = w.start("one", "--key", "k1", "--on-unknown", "raise", "--lease", "1.0")
        second.expect_exit(3)
        assert second.results()[0]["error"] == "UnknownOutcome"
        assert len(w.effect_lines()) == 1


def _start_gov(work: Path, root: str, key: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**__import__("os").environ, "ONCEONLY_API_KEY": key}
    with open(work / f"console-{time.monotonic_ns()}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(GOV_WORKER), "race", root, "ns", str(work), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


@pytest.mark.multiprocess
def test_racing_remote_processes_never_pass_a_spend_cap(
    remote: Any, tmp_path: Path, server_db: SQLStore
) -> None:
    """4 processes race 80 paid calls through the server against a cap of 25: exactly 25
    run, the counter says 25 x the price, and the server's audit chain verifies."""
    g = remote_guard(remote)
    g.gov.upsert_policy(
        Policy(agent_id="racer", max_spend_usd_per_day=6.25, pricing_rules={"paid_call": 0.25})
    )
    procs = [_start_gov(tmp_path, remote.root, remote.key, str(i), "20") for i in range(4)]
    time.sleep(1.0)
    (tmp_path / "go").touch()
    for p in procs:
        code = p.wait(180)
        logs = "\n".join(f.read_text()[-2000:] for f in tmp_path.glob("console-*.log"))
        assert code == 0, logs
    ran = [json.loads(x) for x in (tmp_path / "effects.jsonl").read_text().splitlines()]
    assert len(ran) == 25
    day = int(g.gov.store.now() // 86400) * 86400
    assert g.gov.store.counter(remote.name, "racer", "spend", day) == 25 * 250_000
    gov = server_db.governance_store()
    try:
        executed = [
            r for r in gov.audit_rows(remote.name, limit=1000) if r["decision"] == "executed"
        ]
        assert len(executed) == 25
        assert gov.verify_audit(remote.name) == []
        assert gov.holds(remote.name, "racer") == 0
    finally:
        gov.close()
    g.close()


# -- governance through the control plane -----------------------------------------------------
@pytest.fixture
def api(remote: Any) -> Iterator[httpx.Client]:
    """The tenant's /v1 API, as the published client or an operator script uses it."""
    headers = {"Authorization": f"Bearer {remote.key}"}
    with httpx.Client(base_url=remote.root + "/v1", headers=headers) as client:
        yield client


def test_the_servers_policies_kill_switch_and_approvals_govern_remote_guards(
    remote: Any, server_db: SQLStore, api: httpx.Client
) -> None:
    # A policy set over the published /v1 API governs the remote guard's next call.
    r = api.post("/policies/bot", json={"max_calls_per_tool": {"email": 1}})
    assert r.status_code == 200, r.text
    g = remote_guard(remote, agent_id="bot")
    sent: list[str] = []
    first = g.run_call("email", {"to": "a"}, lambda: sent.append("a"), scope="s", run_id="run-1")
    second = g.run_call("email", {"to": "b"}, lambda: sent.append("b"), scope="s", run_id="run-1")
    assert (first.decision, second.decision) == ("executed", "blocked")
    assert second.policy_reason == "max_calls_per_tool_exceeded"
    assert sent == ["a"]
    # The kill switch flipped on the server stops the very next call.
    assert api.post("/agents/bot/disable", json={"reason": "incident"}).status_code == 200
    stopped = g.run_call("lookup", {"q": 1}, lambda: sent.append("q"), scope="s")
    assert stopped.decision == "blocked" and sent == ["a"]
    assert api.post("/agents/bot/enable", json={}).status_code == 200
    # Approvals: pending on the first call, decided with the tenant's key, used once.
    g.gov.upsert_policy(Policy(agent_id="bot", require_approval=["refund"]))
    asked = g.run_call("refund", {"order": 7}, lambda: sent.append("r7"), scope="s")
    assert asked.decision == "pending_approval" and asked.approval_id
    assert [a.id for a in g.gov.list_approvals()] == [asked.approval_id]
    g.gov.approve(asked.approval_id, by="ops")
    done = g.run_call("refund", {"order": 7}, lambda: sent.append("r7"), scope="s")
    again = g.run_call("refund", {"order": 7}, lambda: sent.append("r7"), scope="s")
    assert (done.decision, again.decision) == ("executed", "dedup")
    assert sent == ["a", "r7"]
    # Audit rows and the timeline are the server's: read back over /v1.
    timeline = api.get("/runs/run-1").json()
    assert timeline["total"] >= 2
    logs = api.get("/agents/bot/logs").json()
    assert {e["decision"] for e in logs} >= {"executed", "blocked"}
    gov = server_db.governance_store()
    try:
        assert gov.verify_audit(remote.name) == []
    finally:
        gov.close()
    g.close()


# -- tenancy ----------------------------------------------------------------------------------
def test_a_key_reaches_only_its_own_tenant(remote_server: Any) -> None:
    a, b = remote_server.tenant(), remote_server.tenant()
    sa_, sb = RemoteStore(a.root, api_key=a.key), RemoteStore(b.root, api_key=b.key)
    rec = sa_.claim("ns", "k", NewClaim("t", "owner-a", 60))
    assert rec.mine
    assert sb.get("ns", "k") is None  # the same names, another tenant
    assert sb.claim("ns", "k", NewClaim("t", "owner-b", 60)).mine
    assert not sb.finish("ns", "k", rec.token + 5, ok=True, result="1")
    ga, gb = sa_.governance_store(), sb.governance_store()
    day = int(ga.now() // 86400) * 86400
    hold = ga.reserve(a.name, "agent", "ns", "k", [Want("spend", day, 5, 10, "spend")], 60)
    assert hold.ok and hold.id
    # B names A's tenant in the body: the server uses B's, whatever the body says.
    assert gb.counter(a.name, "agent", "spend", day) == 0
    assert gb.pending_holds(a.name) == []
    assert gb.pending_holds(None) == []
    assert not gb.extend(hold.id, 3600)  # A's hold is not B's to extend
    assert not gb.settle(a.name, "agent", hold.id, [["spend", day, 5]])
    assert ga.counter(a.name, "agent", "spend", day) == 5
    assert [h["id"] for h in ga.pending_holds(None)] == [hold.id]
    entry = {
        "agent_id": "agent",
        "tool": "t",
        "args_digest": None,
        "args": "{}",
        "decision": "executed",
        "reason": "ok",
        "risk_level": "low",
        "spend_micros": 0,
        "run_id": None,
        "token": None,
        "idem_key": "k",
    }
    gb.append_audit(a.name, entry)
    assert ga.audit_rows(a.name) == []
    assert len(gb.audit_rows(b.name)) == 1
    for s in (sa_, sb):
        s.close()


def test_namespaces_of_the_servers_own_keyspaces_are_refused(remote: Any) -> None:
    store = RemoteStore(remote.root, api_key=remote.key)
    for ns in ("make", "ai", "ai/x", "make/y"):
        with pytest.raises(ConfigError, match="reserved"):
            store.claim(ns, "k", NewClaim("t", "o", 60))
    too_long = "n" * (store.max_namespace + 1)
    with pytest.raises(ConfigError, match="too long"):
        store.get(too_long, "k")
    assert store.max_namespace == 255 - len(remote.name) - 1
    store.close()


# -- failures ---------------------------------------------------------------------------------
def test_bad_requests_are_4xx_never_5xx(remote: Any, api: httpx.Client) -> None:
    cases: list[tuple[str, Any, int]] = [
        ("/v1/ledger/nope", {"args": {}}, 404),
        ("/v1/governance/nope", {"args": {}}, 404),
        ("/v1/ledger/get", {"args": {"namespace": "n"}}, 422),  # missing key
        ("/v1/ledger/get", {"args": {"namespace": "n", "key": "k", "x": 1}}, 422),
        ("/v1/ledger/heartbeat", {"args": {"namespace": "n", "key": "k", "token": "t"}}, 422),
        ("/v1/ledger/claim", {"args": {"namespace": "n", "key": "k", "new": {"a": 1}}}, 422),
        ("/v1/ledger/get", {"args": {"namespace": {"$float": "x"}, "key": "k"}}, 422),
        ("/v1/ledger/get", {"args": {"namespace": {"$dc": "Nope", "fields": {}}}}, 422),
        ("/v1/ledger/get", {"nope": 1}, 422),
        ("/v1/ledger/get", [1, 2], 422),
        ("/v1/governance/reserve", {"args": {"tenant": "t", "wants": "x"}}, 422),
        ("/v1/governance/purge_audit", {"args": {"tenant": "t", "before": 1.0}}, 403),
        (
            "/v1/governance/put_tool",
            {"args": {"tenant": "t", "values": {"name": "x", "url": "http://169.254.169.254/"}}},
            422,
        ),
    ]
    for path, body, status in cases:
        r = api.post(remote.root + path, json=body)
        assert r.status_code == status, (path, body, r.status_code, r.text)
    assert httpx.post(remote.root + "/v1/ledger/now", json={"args": {}}).status_code == 401


def test_an_unreachable_server_is_a_store_error_and_nothing_runs() -> None:
    from _live_server import free_port

    g = Guard(f"http://127.0.0.1:{free_port()}", api_key="k" * 20, quiet=True)
    ran: list[int] = []
    with pytest.raises(StoreError, match="unreachable"):
        g.run_call("t", {"x": 1}, lambda: ran.append(1), scope="s")
    assert ran == []
    g.close()


class _LoseReply(httpx.BaseTransport):
    """Forwards to the server; the reply of the first request whose path ends with
    ``lose`` is dropped after the server has applied it (a cut connection)."""

    def __init__(self, lose: str) -> None:
        self.inner = httpx.HTTPTransport()
        self.lose: str | None = lose

    def close(self) -> None:
        self.inner.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if self.lose is not None and request.url.path.endswith(self.lose):
            self.lose = None
            response.read()
            raise httpx.ReadError("connection reset by peer", request=request)
        return response


def test_a_lost_claim_reply_is_a_store_error_and_the_tool_runs_once(remote: Any) -> None:
    """The claim committed on the server and its reply was lost. The guard does not re-send
    it blindly: StoreError, the tool not run. The orphan claim's lease runs out, and the
    next call (on_unknown="retry": nothing ran) executes once."""
    client = httpx.Client(base_url=remote.root, transport=_LoseReply("/v1/ledger/claim"))
    store = RemoteStore(remote.root, api_key=remote.key, client=client)
    g = Guard(store=store, quiet=True, lease=1.0, on_unknown="retry", wait=5)
    ran: list[int] = []
    with pytest.raises(StoreError, match="may have been applied"):
        g.run_call("t", {"x": 1}, lambda: ran.append(1), scope="s")
    assert ran == []
    (orphan,) = store.list(namespace="default/s")
    assert (orphan.state, orphan.executions) == ("running", 0)
    time.sleep(1.2)
    done = g.run_call("t", {"x": 1}, lambda: ran.append(1) or "ok", scope="s")
    assert done.decision == "executed" and ran == [1]
    g.close()
    client.close()  # the caller's client: the store does not close it


def test_configuration_errors_say_what_to_do(remote: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONCEONLY_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="needs an API key"):
        Guard(remote.root, quiet=True).run_call("t", {}, lambda: 1)
    with pytest.raises(ConfigError, match="api_key is for remote mode"):
        Guard("sqlite:///x.db", api_key="k", quiet=True).run_call("t", {}, lambda: 1)
    with pytest.raises(ConfigError, match="not in the URL"):
        RemoteStore("http://user:secret@127.0.0.1:1", api_key="k")
    bad = Guard(remote.root, api_key="not-a-key", quiet=True)
    with pytest.raises(ConfigError, match="refused the API key"):
        bad.run_call("t", {}, lambda: 1, scope="s")
    bad.close()
    # The environment, and the published client's base_url (ending in /v1), work too.
    monkeypatch.setenv("ONCEONLY_DB_URL", remote.root + "/v1")
    monkeypatch.setenv("ONCEONLY_API_KEY", remote.key)
    g = Guard(quiet=True)
    assert g.run_call("t", {"y": 1}, lambda: "ok", scope="s").decision == "executed"
    assert isinstance(g.store, RemoteStore)
    g.close()


# -- the wire codec ---------------------------------------------------------------------------
_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_keys = st.text(max_size=6) | st.integers() | st.tuples(st.text(max_size=3), st.integers())
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(_keys, inner, max_size=4)
        | st.tuples(inner, inner)
        | st.frozensets(st.integers() | st.text(max_size=3), max_size=3).map(set)
    ),
    max_leaves=12,
)


@given(_values)
@settings(max_examples=200, deadline=None)
def test_the_wire_codec_round_trips_through_json(value: Any) -> None:
    wire = json.loads(json.dumps(encode(value), allow_nan=False))
    back = decode(wire)
    assert _same(back, value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, float) and b != b:
        return isinstance(a, float) and a != a
    if isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(b, dict):
        return type(a) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    return type(a) is type(b) and a == b


def test_the_codec_carries_the_contracts_dataclasses() -> None:
    r = Reservation(True, "rid", Want("spend", 1, 2, 3, "why"), 4, 5.0, {("spend", 1): 6})
    assert decode(json.loads(json.dumps(encode(r)))) == r
    with pytest.raises(ConfigError):
        encode(object())
    with contextlib.suppress(ConfigError):
        decode({"$dc": "Record", "fields": {"nope": 1}})
        raise AssertionError("a record with unknown fields was accepted")


# -- the operator's CLI -----------------------------------------------------------------------
def _cli(remote: Any, *argv: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ)
    env.pop("ONCEONLY_DB_URL", None)
    env["ONCEONLY_API_KEY"] = remote.key if key is None else key
    return subprocess.run(
        [sys.executable, "-m", "onceonly_core.cli", *argv, "--url", remote.root],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli_reads_and_governs_a_remote_ledger(remote: Any) -> None:
    g = remote_guard(remote, agent_id="ops-bot")
    g.run_call("charge", {"order": 1}, lambda: "ok", scope="cli", run_id="run-cli")
    g.close()
    shown = _cli(remote, "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [r["tool"] for r in json.loads(shown.stdout)] == ["charge"]
    logs = _cli(remote, "agent", "logs", "ops-bot", "--json")
    assert logs.returncode == 0, logs.stderr
    assert [e["decision"] for e in json.loads(logs.stdout)] == ["executed"]
    verified = _cli(remote, "audit", "verify", "--json")
    assert verified.returncode == 0, verified.stderr
    # The kill switch from the shell stops the next remote call.
    assert _cli(remote, "agent", "disable", "ops-bot").returncode == 0
    g = remote_guard(remote, agent_id="ops-bot")
    assert g.run_call("charge", {"order": 2}, lambda: "ok", scope="cli").decision == "blocked"
    g.close()
    # doctor checks the server and the key; migrate says where migrations run.
    doctor = _cli(remote, "doctor", "--json")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["database"]["status"] == "ok"
    bad = _cli(remote, "doctor", "--json", key="oo_sk_not-a-key")
    assert bad.returncode == 1
    checks = {c["name"]: c for c in json.loads(bad.stdout)["checks"]}
    assert "ONCEONLY_API_KEY" in checks["database"]["fix"]
    migrate = _cli(remote, "migrate")
    assert migrate.returncode == 1 and "migrated on the server" in migrate.stderr
    kept = _cli(remote, "retention", "--yes")
    assert kept.returncode == 1 and "retention runs on the control plane" in kept.stderr
    assert "Traceback" not in migrate.stderr + bad.stderr + kept.stderr


def test_the_dead_letter_view_of_the_servers_outbox_works_remotely(
    remote: Any, server_db: SQLStore
) -> None:
    from onceonly_core.governance.outbox import make_event

    g = remote_guard(remote, agent_id="ops-bot")
    # A webhook that can never be reached from the server (a refused egress: dead at once).
    gov = server_db.governance_store()
    try:
        hook = {"url": "http://127.0.0.1:9/hook", "secret": "s" * 32, "events": "[]"}
        gov.add_webhook(remote.name, {**hook, "budget_threshold": None, "enabled": True})
        gov.enqueue_notification(
            remote.name, make_event({"type": "tool_failed", "agent_id": "ops-bot"})
        )
        rows = g.gov.deliverer().list()
        assert len(rows) == 1 and rows[0]["destination"].startswith("webhook:")
        # The server's own deliverer finds the destination refused (loopback) and marks
        # the row dead; if it has not run yet, do what it would.
        deadline = time.monotonic() + 20
        while g.gov.deliverer().list()[0]["state"] != "dead":
            assert time.monotonic() < deadline, g.gov.deliverer().list()
            for c in gov.outbox_claim(remote.name, 10, 60.0):
                gov.outbox_mark(remote.name, c["id"], c["lease_token"], "dead", 0.0, "refused")
            time.sleep(0.1)
        assert g.gov.deliverer().pending()[0] == 0
    finally:
        gov.close()
    shown = _cli(remote, "notify", "list", "--state", "dead", "--json")
    assert shown.returncode == 0, shown.stderr
    (dead,) = json.loads(shown.stdout)
    retried = _cli(remote, "notify", "retry", dead["id"])
    assert retried.returncode == 0, retried.stderr
    assert [r["state"] for r in g.gov.deliverer().list()] == ["pending"]
    deliver = _cli(remote, "notify", "deliver")
    assert deliver.returncode == 1 and "delivers its own outbox" in deliver.stderr
    g.close()
