"""The egress guard (docs/security.md, "Outbound requests"): an SSRF table of address forms,
each refused at registration (embedded: ConfigError; server: 422) and again at connect time,
DNS rebinding (public at registration, loopback at connect), and the allowlist as the only
way through. A real HTTP server on 127.0.0.1 stands for the internal service: it must see
no request unless 127.0.0.1 is allowlisted, and then it sees exactly the allowed one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from governance._loopback import Loopback, Reply, loopback
from onceonly_core import Guard, egress
from onceonly_core.egress import Egress, EgressRefused, check_url, refusal
from onceonly_core.errors import ConfigError
from onceonly_core.governance.webhooks import WebhookSink

SECRET = "whsec_ZWdyZXNzLXRlc3Qtc2VjcmV0LWVncmVzcw=="
PUBLIC = "93.184.216.34"  # what the rebinding name answers at registration
REBIND = "tool.rebind.test"

# -- the table ----------------------------------------------------------------------------
# {port} is the loopback server's port: were a form let through, that server would see it.
FORMS: list[tuple[str, str]] = [
    ("loopback", "http://127.0.0.1:{port}/tool"),
    ("loopback-range", "http://127.0.0.2:{port}/tool"),
    ("localhost", "http://localhost:{port}/tool"),
    ("localhost-trailing-dot", "http://localhost.:{port}/tool"),
    ("localhost-subdomain", "http://api.localhost:{port}/tool"),
    ("ip-trailing-dot", "http://127.0.0.1.:{port}/tool"),
    ("decimal", "http://2130706433:{port}/tool"),
    ("hex", "http://0x7f000001:{port}/tool"),
    ("octal", "http://0177.0.0.1:{port}/tool"),
    ("octal-whole", "http://017700000001:{port}/tool"),
    ("hex-short", "http://0x7f.1:{port}/tool"),
    ("short", "http://127.1:{port}/tool"),
    ("userinfo", "http://tools.example.com@127.0.0.1:{port}/tool"),
    ("userinfo-password", "http://user:pw@127.0.0.1:{port}/tool"),
    ("backslash", "http://tools.example.com\\@127.0.0.1:{port}/tool"),
    ("ipv6-loopback", "http://[::1]:{port}/tool"),
    ("ipv4-mapped", "http://[::ffff:127.0.0.1]:{port}/tool"),
    ("ipv4-mapped-hex", "http://[::ffff:7f00:1]:{port}/tool"),
    ("ipv4-compatible", "http://[::127.0.0.1]:{port}/tool"),
    ("6to4-loopback", "http://[2002:7f00:1::]:{port}/tool"),
    ("nat64-loopback", "http://[64:ff9b::127.0.0.1]:{port}/tool"),
    ("teredo", "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]:{port}/tool"),
    ("unspecified", "http://0.0.0.0:{port}/tool"),
    ("unspecified-v6", "http://[::]:{port}/tool"),
    (
        "idn-enclosed-letters",
        "http://\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3:{port}/tool",
    ),
    ("idn-fullwidth-digits", "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:{port}/tool"),
    ("cloud-metadata", "http://169.254.169.254/latest/meta-data/"),
    ("cloud-metadata-mapped", "http://[::ffff:169.254.169.254]/latest/meta-data/"),
    ("link-local-v6", "http://[fe80::1]/tool"),
    ("private-10", "http://10.0.0.1/tool"),
    ("private-172", "http://172.16.0.1/tool"),
    ("private-192", "http://192.168.1.1/tool"),
    ("6to4-private", "http://[2002:a00:1::]/tool"),
    ("cgnat", "http://100.64.0.1/tool"),
    ("cgnat-alibaba-metadata", "http://100.100.100.200/latest/meta-data/"),
    ("unique-local-v6", "http://[fd00::1]/tool"),
    ("site-local-v6", "http://[fec0::1]/tool"),
    ("multicast", "http://224.0.0.1/tool"),
    ("multicast-v6", "http://[ff02::1]/tool"),
    ("broadcast", "http://255.255.255.255/tool"),
    ("reserved", "http://240.0.0.1/tool"),
    ("benchmarking", "http://198.18.0.1/tool"),
    ("documentation", "http://192.0.2.1/tool"),
    ("documentation-v6", "http://[2001:db8::1]/tool"),
    ("scheme-file", "file:///etc/passwd"),
    ("scheme-gopher", "gopher://127.0.0.1:{port}/_GET"),
    ("scheme-ftp", "ftp://tools.example.com/tool"),
    ("scheme-dict", "dict://127.0.0.1:{port}/info"),
    ("scheme-data", "data:application/json,{}"),
]
IDS = [name for name, _ in FORMS]

# Addresses a host name may resolve to at connect time (DNS rebinding).
REBOUND = [
    "127.0.0.1",
    "127.0.0.53",
    "::1",
    "0.0.0.0",
    "169.254.169.254",
    "10.1.2.3",
    "172.31.0.1",
    "192.168.0.10",
    "100.100.100.200",
    "fd00::10",
    "fe80::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "64:ff9b::a9fe:a9fe",
    "2002:a9fe:a9fe::",
    "224.0.0.251",
]


# -- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def internal() -> Iterator[Loopback]:
    """The internal service an attacker aims at: records every request it gets."""
    with loopback(lambda req: Reply(200, b'{"result": "internal data"}')) as srv:
        yield srv


@pytest.fixture
def srv(internal: Loopback) -> Loopback:
    internal.requests.clear()
    internal.handler = lambda req: Reply(200, b'{"result": "internal data"}')
    return internal


def form(url: str, srv: Loopback) -> str:
    return url.replace("{port}", str(srv.server.server_address[1]))


@pytest.fixture(scope="module")
def module_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guard]:
    path = tmp_path_factory.mktemp("egress") / "ledger.db"
    g = Guard(f"sqlite:///{path}", namespace="egress", quiet=True)
    yield g
    g.close()


@pytest.fixture
def own_guard(tmp_path: Path) -> Iterator[Guard]:
    """A guard of its own, for tests whose webhooks must not meet the outbox rows and the
    in-process deliverer the module's shared guard carries from earlier tests."""
    g = Guard(f"sqlite:///{tmp_path / 'own.db'}", namespace="egress-own", quiet=True)
    yield g
    g.close()


@pytest.fixture
def guard(module_guard: Guard) -> Iterator[Guard]:
    gov = module_guard.gov
    gov.egress_allow = None
    yield module_guard
    gov.egress_allow = None
    for t in gov.list_tools():
        gov.delete_tool(t.name, t.scope_id)
    for w in gov.list_webhooks():
        gov.remove_webhook(w["id"])
    for sink in gov.__dict__.pop("_sinks", {}).values():
        sink.close()


class FakeDNS:
    """Answers for *.rebind.test (and counts the lookups); every other name and every
    numeric host goes to the real resolver."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.answers: dict[str, list[str]] = {}
        self.lookups: list[str] = []

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if not name.endswith(".rebind.test"):
            return self.real(host, port, *args, **kwargs)
        self.lookups.append(name)
        answers = self.answers.get(name)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for a in answers:
            if ipaddress.ip_address(a).version == 6:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, int(port), 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, int(port))))
        return out


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    fake = FakeDNS(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


def fresh() -> dict[str, str]:
    """Arguments no earlier call used: every call here must execute, not replay."""
    return {"call": uuid.uuid4().hex}


def rebind_url(srv: Loopback, host: str = REBIND) -> str:
    return f"http://{host}:{srv.server.server_address[1]}/tool"


# -- the table: registration ----------------------------------------------------------------
@pytest.mark.parametrize("url", [u for _, u in FORMS], ids=IDS)
def test_each_form_is_refused_at_registration(guard: Guard, srv: Loopback, url: str) -> None:
    gov = guard.gov
    target = form(url, srv)
    with pytest.raises(ConfigError):
        gov.create_tool("probe", url=target)
    with pytest.raises(ConfigError):
        gov.add_webhook(target, SECRET)
    with pytest.raises(ConfigError):
        WebhookSink(target, SECRET)
    assert gov.list_tools() == [] and gov.list_webhooks() == []
    assert srv.requests == []


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, str]]]:
    from fastapi.testclient import TestClient

    from onceonly_core.server import create_app
    from onceonly_core.server.control import ControlPlane

    path = tmp_path_factory.mktemp("egress-api") / "ledger.db"
    cp = ControlPlane(f"sqlite:///{path}")
    key = cp.keys.create_key("tenant-a")
    with TestClient(create_app(control=cp)) as client:
        yield client, {"Authorization": f"Bearer {key}"}
    cp.close()


@pytest.mark.parametrize("url", [u for _, u in FORMS], ids=IDS)
def test_each_form_is_a_422_at_the_server(
    api: tuple[Any, dict[str, str]], srv: Loopback, url: str
) -> None:
    client, auth = api
    r = client.post("/v1/tools", json={"name": "probe", "url": form(url, srv)}, headers=auth)
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert client.get("/v1/tools", headers=auth).json() == []
    assert srv.requests == []


# -- the table: connect time ----------------------------------------------------------------
def _store_tool(guard: Guard, name: str, url: str) -> None:
    """A row written past registration: stored before the guard existed, or while a wider
    allowlist was in force. The call must be refused all the same."""
    row = {
        "name": name,
        "kind": "http",
        "url": url,
        "scope_id": "global",
        "auth": "none",
        "timeout_ms": 2000,
        "max_retries": 0,
        "enabled": True,
        "description": "",
        "secret": None,
    }
    guard.gov.store.put_tool(guard.gov.tenant, row)


@pytest.mark.parametrize("url", [u for _, u in FORMS], ids=IDS)
def test_each_form_is_refused_at_call_time(guard: Guard, srv: Loopback, url: str) -> None:
    _store_tool(guard, "probe", form(url, srv))
    r = guard.gov.run_tool("agent", "probe", fresh())
    assert r.decision == "failed", r
    assert r.error_type in ("RemoteToolError", "ConfigError")
    assert "internal data" not in str(r.error)
    assert srv.requests == []


@pytest.fixture(scope="module")
def guarded_client() -> Iterator[httpx.Client]:
    with httpx.Client(transport=egress.transport()) as client:
        yield client


@pytest.mark.parametrize("url", [u for _, u in FORMS], ids=IDS)
def test_each_form_is_refused_by_the_transport_itself(
    guarded_client: httpx.Client, srv: Loopback, url: str
) -> None:
    """The guarded transport on its own (as a caller's client would use it) refuses the
    same forms at connect: no check before it is needed."""
    target = form(url, srv)
    expected: type[Exception] = EgressRefused
    try:
        if httpx.URL(target).scheme not in ("http", "https"):
            expected = httpx.UnsupportedProtocol  # httpx refuses it before any connection
    except httpx.InvalidURL:
        expected = httpx.InvalidURL  # httpx cannot even parse it (odd spellings, IDN)
    with pytest.raises(expected):
        guarded_client.post(target, content=b"{}")
    assert srv.requests == []


# -- DNS rebinding ----------------------------------------------------------------------------
@pytest.mark.parametrize("address", REBOUND)
def test_rebinding_is_refused_on_the_resolved_address(
    guard: Guard, srv: Loopback, dns: FakeDNS, address: str
) -> None:
    url = rebind_url(srv)
    dns.answers[REBIND] = [PUBLIC]
    guard.gov.create_tool("rebound", url=url)  # public now: accepted
    dns.answers[REBIND] = [address]  # ...and then the record changes
    r = guard.gov.run_tool("agent", "rebound", fresh())
    assert r.decision == "failed" and r.error_type == "RemoteToolError"
    assert "refused by the egress guard" in str(r.error) and "nothing was sent" in str(r.error)
    assert srv.requests == []


def test_a_name_with_one_bad_address_among_good_ones_is_refused(
    guard: Guard, srv: Loopback, dns: FakeDNS
) -> None:
    dns.answers[REBIND] = [PUBLIC, "127.0.0.1"]
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1"):
        guard.gov.create_tool("mixed", url=rebind_url(srv))
    _store_tool(guard, "mixed", rebind_url(srv))
    r = guard.gov.run_tool("agent", "mixed", fresh())
    assert r.decision == "failed" and "127.0.0.1" in str(r.error)
    assert srv.requests == []


def test_async_calls_are_checked_on_the_resolved_address_too(
    guard: Guard, srv: Loopback, dns: FakeDNS
) -> None:
    dns.answers[REBIND] = [PUBLIC]
    guard.gov.create_tool("rebound", url=rebind_url(srv))
    dns.answers[REBIND] = ["127.0.0.1"]
    r = asyncio.run(guard.gov.arun_tool("agent", "rebound", fresh()))
    assert r.decision == "failed" and "refused by the egress guard" in str(r.error)
    assert srv.requests == []


def test_the_name_is_resolved_once_and_the_checked_address_is_connected(
    guard: Guard, srv: Loopback, dns: FakeDNS
) -> None:
    """Pinning: the connection goes to the address that was checked. A second lookup would
    get 169.254.169.254 here; there is none."""
    guard.gov.egress_allow = ["127.0.0.1"]
    dns.answers[REBIND] = ["127.0.0.1"]
    guard.gov.create_tool("pinned", url=rebind_url(srv))
    dns.lookups.clear()

    def flip(*_: Any) -> None:
        dns.answers[REBIND] = ["169.254.169.254"]

    srv.handler = lambda req: (flip(), Reply(200, b'{"result": "ok"}'))[1]
    r = guard.gov.run_tool("agent", "pinned", fresh())
    assert (r.decision, r.result) == ("executed", "ok")
    assert dns.lookups == [REBIND]  # one lookup for the call
    assert len(srv.requests) == 1 and srv.requests[0].headers["host"].startswith(REBIND)


def test_webhooks_are_checked_at_delivery(guard: Guard, srv: Loopback, dns: FakeDNS) -> None:
    dns.answers[REBIND] = [PUBLIC]
    guard.gov.add_webhook(rebind_url(srv), SECRET)  # public now: accepted
    dns.answers[REBIND] = ["127.0.0.1"]
    guard.gov.notify({"type": "blocked", "agent_id": "a", "tool": "t", "reason": "x"})
    assert guard.gov.flush_notifications(5.0)
    # Refused at connect time: the outbox row is dead at once (retrying cannot help).
    (row,) = guard.gov.deliverer().list()
    assert row["state"] == "dead" and "egress" in (row.get("last_error") or "")
    assert srv.requests == []


def test_a_stored_webhook_refused_today_drops_events_without_failing_the_call(
    guard: Guard, srv: Loopback, caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook row stored before the guard (at 127.0.0.1): notifications must not raise
    into the governed call; the events are dropped with a warning."""
    guard.gov.store.add_webhook(
        guard.gov.tenant,
        {
            "url": srv.url,
            "secret": SECRET,
            "events": "[]",
            "budget_threshold": None,
            "enabled": True,
        },
    )
    guard.gov.create_tool("boom", lambda **_: 1 / 0)
    r = guard.gov.run_tool("agent", "boom", fresh())  # tool_failed -> notification
    assert r.decision == "failed" and r.error_type == "ZeroDivisionError"
    assert guard.gov.flush_notifications(2.0)
    # The event was written to the outbox with the call; its delivery is refused and dead.
    rows = guard.gov.deliverer().list()
    assert rows and all(r["state"] == "dead" for r in rows)
    assert srv.requests == []


# -- the allowlist ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "where"),
    [
        ("127.0.0.1", "gov"),
        ("127.0.0.0/8", "env"),
        ("10.0.0.0/8, 127.0.0.1/32", "env"),
        (["::1", "127.0.0.1"], "gov"),
    ],
)
def test_the_allowlist_lets_the_same_server_be_reached(
    guard: Guard, srv: Loopback, monkeypatch: pytest.MonkeyPatch, setting: Any, where: str
) -> None:
    if where == "env":
        monkeypatch.setenv(egress.ALLOW_ENV, setting)
    else:
        guard.gov.egress_allow = setting
    guard.gov.create_tool("intranet", url=srv.url)
    r = guard.gov.run_tool("agent", "intranet", fresh())
    assert (r.decision, r.result) == ("executed", "internal data")
    assert len(srv.requests) == 1


def test_an_allowlisted_host_name_may_resolve_to_anything(
    guard: Guard, srv: Loopback, dns: FakeDNS
) -> None:
    guard.gov.egress_allow = "*.rebind.test"
    dns.answers["tools.rebind.test"] = ["127.0.0.1"]
    guard.gov.create_tool("named", url=rebind_url(srv, "tools.rebind.test"))
    r = guard.gov.run_tool("agent", "named", fresh())
    assert r.decision == "executed" and len(srv.requests) == 1
    # ...but only the names it covers.
    dns.answers["other.test.rebind.test.example"] = ["127.0.0.1"]
    with pytest.raises(ConfigError):
        guard.gov.create_tool("other", url=rebind_url(srv, "rebind.test.evil.localhost"))


def test_localhost_by_name_through_the_allowlist(guard: Guard, srv: Loopback) -> None:
    """``localhost`` may resolve to ::1 first (nothing listens there): the next checked
    address is tried, never a fresh lookup."""
    guard.gov.egress_allow = "localhost"
    guard.gov.create_tool("local", url=srv.url.replace("127.0.0.1", "localhost"))
    r = guard.gov.run_tool("agent", "local", fresh())
    assert r.decision == "executed" and len(srv.requests) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433:{port}/tool",
        "http://127.1:{port}/tool",
        "http://user:pw@127.0.0.1:{port}/tool",
        "gopher://127.0.0.1:{port}/_GET",
    ],
    ids=["decimal", "short", "userinfo", "gopher"],
)
def test_spellings_credentials_and_schemes_stay_refused_even_when_allowlisted(
    guard: Guard, srv: Loopback, url: str
) -> None:
    guard.gov.egress_allow = "127.0.0.0/8"
    with pytest.raises(ConfigError):
        guard.gov.create_tool("probe", url=form(url, srv))
    assert srv.requests == []


def test_webhooks_go_through_the_allowlist(own_guard: Guard, srv: Loopback) -> None:
    guard = own_guard
    srv.handler = lambda req: Reply(204, b"")
    with pytest.raises(ConfigError):
        guard.gov.add_webhook(srv.url, SECRET)
    guard.gov.egress_allow = "127.0.0.1"
    guard.gov.add_webhook(srv.url, SECRET)
    guard.gov.notify({"type": "blocked", "agent_id": "a", "tool": "t", "reason": "x"})
    assert guard.gov.flush_notifications(5.0)
    assert len(srv.requests) == 1


def test_the_server_allowlist_setting(tmp_path: Path, srv: Loopback) -> None:
    from fastapi.testclient import TestClient

    from onceonly_core.server import create_app
    from onceonly_core.server.control import ControlPlane

    cp = ControlPlane(f"sqlite:///{tmp_path}/ledger.db", egress_allow="127.0.0.1")
    auth = {"Authorization": f"Bearer {cp.keys.create_key('tenant-b')}"}
    with TestClient(create_app(control=cp)) as client:
        r = client.post("/v1/tools", json={"name": "intranet", "url": srv.url}, headers=auth)
        assert r.status_code == 200, r.text
        run = {"agent_id": "bot", "tool": "intranet", "args": {"q": 7}}
        out = client.post("/v1/ai/run", json=run, headers=auth).json()
        assert out["decision"] == "executed" and out["result"] == {"value": "internal data"}
        r = client.post("/v1/tools", json={"name": "meta", "url": "http://169.254.169.254/"})
        assert r.status_code == 401  # (no key) and with one:
        r = client.post(
            "/v1/tools", json={"name": "meta", "url": "http://169.254.169.254/"}, headers=auth
        )
        assert r.status_code == 422 and "link-local" in r.json()["detail"]
    cp.close()
    assert len(srv.requests) == 1


# -- redirects, sizes, bodies ------------------------------------------------------------------
def test_a_redirect_to_a_private_address_is_not_followed(own_guard: Guard, srv: Loopback) -> None:
    guard = own_guard
    # Both servers allowlisted: only "redirects are not followed" stands between them.
    guard.gov.egress_allow = "127.0.0.1"
    srv.handler = lambda req: Reply(302, b"", {"Location": "http://169.254.169.254/latest/"})
    with loopback(lambda req: Reply(307, b"", {"Location": srv.url})) as front:
        guard.gov.create_tool("front", url=front.url)
        r = guard.gov.run_tool("agent", "front", fresh())
        assert r.decision == "failed" and "redirects are not followed" in str(r.error)
        assert len(front.requests) == 1
        guard.gov.add_webhook(front.url, SECRET)
        guard.gov.notify({"type": "blocked", "agent_id": "a", "tool": "t", "reason": "x"})
        assert guard.gov.flush_notifications(5.0)
        assert len(front.requests) == 2  # the event, not re-sent to the Location
    assert srv.requests == []


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
def test_an_oversized_response_is_capped(guard: Guard, srv: Loopback, declared: bool) -> None:
    guard.gov.egress_allow = "127.0.0.1"
    big = b'{"result": "' + b"A" * (2 * 1024 * 1024) + b'"}'
    srv.handler = lambda req: Reply(200, big, {"Content-Type": "application/json"}, 0, declared)
    guard.gov.create_tool("big", url=srv.url)
    r = guard.gov.run_tool("agent", "big", fresh())
    assert r.decision == "failed" and "1048576-byte limit" in str(r.error)
    assert "AAAA" not in str(r.error)


@pytest.mark.parametrize(
    ("status", "ctype"),
    [(500, "text/html"), (404, "application/json"), (401, ""), (200, "text/html")],
)
def test_error_texts_never_carry_the_body(
    guard: Guard,
    srv: Loopback,
    status: int,
    ctype: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard.gov.egress_allow = "127.0.0.1"
    body = b"<h1>internal admin</h1> AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    headers = {"Content-Type": ctype} if ctype else {}
    srv.handler = lambda req: Reply(status, body, headers)
    guard.gov.create_tool("leaky", url=srv.url)
    r = guard.gov.run_tool("agent", "leaky", fresh())
    assert r.decision == "failed" and f"HTTP {status}" in str(r.error)
    for fragment in ("internal admin", "wJalrXUtnFEMI", "AWS_SECRET"):
        assert fragment not in str(r.error)
        assert fragment not in caplog.text
    if status != 200:
        assert f"{len(body)}-byte body" in str(r.error)
    audit = json.dumps([e.model_dump(mode="json") for e in guard.gov.audit_log(limit=5)])
    assert "internal admin" not in audit


# -- the address rules themselves -------------------------------------------------------------
@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None
    host = f"[{address}]" if ":" in address else address
    assert check_url(f"https://{host}/tool").address == ipaddress.ip_address(address)


@pytest.mark.parametrize("address", [*REBOUND, "255.255.255.255", "2001:db8::1", "ff02::1"])
def test_non_public_addresses_have_a_named_reason(address: str) -> None:
    reason = refusal(ipaddress.ip_address(address))
    assert reason and "public" not in reason


def test_allowlist_entries_are_validated() -> None:
    assert not Egress("")
    allow = Egress("10.0.0.0/8, tools.intranet *.corp.example [::1]")
    assert allow.allows_host("tools.intranet") and allow.allows_host("a.b.corp.example")
    assert not allow.allows_host("corp.example.evil") and not allow.allows_host("intranet")
    assert allow.judge(ipaddress.ip_address("10.9.8.7")) is None
    assert allow.judge(ipaddress.ip_address("::ffff:10.9.8.7")) is None
    assert allow.judge(ipaddress.ip_address("11.0.0.1")) is None  # public anyway
    assert allow.judge(ipaddress.ip_address("192.168.1.1"))
    for bad in ("not a host!", "127.1", "http://x", "0x7f.1/8"):
        with pytest.raises(ConfigError):
            Egress(bad)


def test_a_bad_environment_allowlist_is_a_config_error(
    guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(egress.ALLOW_ENV, "10.0.0.0/8, not a host!")
    with pytest.raises(ConfigError, match=egress.ALLOW_ENV):
        guard.gov.create_tool("t", url="https://93.184.216.34/tool")


def test_a_bad_server_allowlist_stops_the_server_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onceonly_core.server.control import ControlPlane

    with pytest.raises(ConfigError, match="not a host name"):
        ControlPlane(f"sqlite:///{tmp_path}/a.db", egress_allow=["10.0.0.0/8", "bad name!"])
    monkeypatch.setenv(egress.ALLOW_ENV, "10.0.0.0/33")
    with pytest.raises(ConfigError, match=egress.ALLOW_ENV):
        ControlPlane(f"sqlite:///{tmp_path}/b.db")


def test_an_unresolvable_name_is_accepted_at_registration_and_checked_at_connect(
    guard: Guard, srv: Loopback, dns: FakeDNS, caplog: pytest.LogCaptureFixture
) -> None:
    guard.gov.create_tool("later", url=rebind_url(srv, "later.rebind.test"))
    assert "does not resolve now" in caplog.text
    dns.answers["later.rebind.test"] = ["127.0.0.1"]
    started = time.monotonic()
    r = guard.gov.run_tool("agent", "later", fresh())
    assert r.decision == "failed" and "refused" in str(r.error)
    assert time.monotonic() - started < 5
    assert srv.requests == []


# -- TLS: pinned to the address, verified for the name ------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA and a server certificate for tool.rebind.test (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=egress test CA",
        cwd=d,
    )
    _openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", f"/CN={REBIND}", cwd=d)
    (d / "leaf.ext").write_text(
        f"subjectAltName=DNS:{REBIND}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
        cwd=d,
    )
    return d


@pytest.fixture
def tls_server(tls_files: Path) -> Iterator[tuple[int, list[str | None]]]:
    """An HTTPS server on 127.0.0.1 presenting the tool.rebind.test certificate; records
    the SNI name of every handshake."""
    names: list[str | None] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_files / "leaf.pem", tls_files / "leaf.key")

    def record_sni(sock: Any, name: str | None, _: Any) -> None:
        names.append(name)

    ctx.sni_callback = record_sni

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class S(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # the failed handshakes below are on purpose

    httpd = S(("127.0.0.1", 0), H)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    yield httpd.server_address[1], names
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def test_tls_is_verified_for_the_name_while_connecting_to_the_checked_address(
    tls_files: Path, tls_server: tuple[int, list[str | None]], dns: FakeDNS
) -> None:
    port, sni = tls_server
    dns.answers[REBIND] = ["127.0.0.1"]
    dns.answers["other.rebind.test"] = ["127.0.0.1"]
    trust = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
    with httpx.Client(transport=egress.transport("127.0.0.1", verify=trust)) as client:
        assert client.get(f"https://{REBIND}:{port}/").text == "ok"
        assert sni == [REBIND]  # SNI is the name, though the socket went to 127.0.0.1
        # Verification is still on: the same server under a name its certificate lacks.
        with pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|mismatch"):
            client.get(f"https://other.rebind.test:{port}/")


def test_the_address_checks_need_no_httpx() -> None:
    """httpx is the optional ``http`` extra: the checks import without it, and the
    transport names the extra."""
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "from onceonly_core import egress\n"
        "from onceonly_core.errors import MissingExtraError\n"
        "assert egress.check_url('https://93.184.216.34/x').port == 443\n"
        "try:\n"
        "    egress.check_url('http://169.254.169.254/')\n"
        "except egress.EgressRefused as e:\n"
        "    print('refused:', e)\n"
        "try:\n"
        "    egress.transport()\n"
        "except MissingExtraError as e:\n"
        "    print('missing:', e)\n"
        "import onceonly_core.governance.engine\n"
        "assert 'httpx' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "refused: destination 169.254.169.254" in out
    assert "missing:" in out and "onceonly-core[http]" in out
