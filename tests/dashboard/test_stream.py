"""Live updates as server-sent events: ``GET /api/stream/<view>``.

The streams are shortened (module constants) so that each response ends by itself; the
TestClient then hands over the whole event stream, which the tests parse.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from onceonly_core import Guard
from onceonly_core.dashboard import app as dashboard_app
from onceonly_core.dashboard import create_dashboard, data
from onceonly_core.errors import StoreError

Client = Any
BASE = "http://127.0.0.1:8765"


def send_email(to: str) -> str:
    return f"sent to {to}"


@pytest.fixture(autouse=True)
def short_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard_app, "STREAM_SECONDS", 1.5)
    monkeypatch.setattr(dashboard_app, "STREAM_TICK", 0.05)
    monkeypatch.setattr(dashboard_app, "STREAM_PING", 0.4)


def events(body: str) -> list[tuple[str, Any]]:
    """(event name, parsed data) for every event of an event-stream body."""
    out = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_a_stream_sends_the_view_then_each_change(
    client: Client, guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard_app, "STREAM_SECONDS", 4.0)  # room for the later call
    guard.call_tool(send_email, {"to": "first"}, tool="first_tool", agent_id="bot")
    later = threading.Timer(
        0.5, lambda: guard.call_tool(send_email, {"to": "b"}, tool="later_tool", agent_id="bot")
    )
    later.start()
    r = client.get("/api/stream/feed")
    later.join()
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.text.startswith("retry: ")
    updates = [d for name, d in events(r.text) if name == "update"]
    # The whole view at once, then exactly one more when a call changed it.
    assert len(updates) == 2
    assert [i["tool"] for i in updates[0]["items"]] == ["first_tool"]
    assert [i["tool"] for i in updates[1]["items"]] == ["later_tool", "first_tool"]
    # The same JSON as the polling endpoint, rows and header included.
    polled = client.get("/api/feed").json()
    assert updates[1]["rows"] == polled["rows"] and updates[1]["header"] == polled["header"]


def test_nothing_changed_sends_pings_not_the_view_again(client: Client) -> None:
    names = [name for name, _ in events(client.get("/api/stream/agents").text)]
    assert names[0] == "update" and names.count("update") == 1
    assert names.count("ping") >= 2


def test_filters_and_every_view(client: Client, guard: Guard) -> None:
    for agent in ("bot", "helper"):
        guard.call_tool(send_email, {"to": agent}, tool=f"t_{agent}", agent_id=agent)
    _, first = events(client.get("/api/stream/feed?agent=helper").text)[0]
    assert [i["agent"] for i in first["items"]] == ["helper"]
    for view in ("agents", "approvals", "run?id=r1"):
        name, payload = events(client.get(f"/api/stream/{view}").text)[0]
        assert name == "update" and "rows" in payload and "header" in payload
    r = client.get("/api/stream/record")
    assert r.status_code == 404 and "text/event-stream" not in r.headers["content-type"]


def test_names_with_markup_stay_data(client: Client, guard: Guard) -> None:
    evil = "<script>alert('x')</script>"
    guard.call_tool(send_email, {"to": "a"}, tool=evil, agent_id="bot")
    body = client.get("/api/stream/feed").text
    assert "<script" not in body and "\\u003cscript" in body
    [(_, payload), *_] = events(body)
    assert payload["items"][0]["tool"] == evil


def test_a_ledger_error_is_a_stale_event_then_the_view_again(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = data.feed, []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise StoreError("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "feed", flaky)
    evs = events(client.get("/api/stream/feed").text)
    assert evs[0] == ("stale", {"error": "database is locked"})
    assert evs[1][0] == "update"


def test_streams_keep_the_dashboards_protections(guard: Guard, make_client: Any) -> None:
    app = create_dashboard(guard=guard, token="s3cret-token")
    with make_client(app) as c:
        r = c.get("/api/stream/feed")
        assert r.status_code == 401 and "text/event-stream" not in r.headers["content-type"]
        c.get("/?token=s3cret-token")  # the cookie, as a browser gets it
        assert c.get("/api/stream/feed").status_code == 200
        # A DNS-rebinding page reaches us under its own name: refused before streaming.
        r = c.get("/api/stream/feed", headers={"host": "evil.example:8765"})
        assert r.status_code == 421


def test_pages_point_their_script_at_the_stream(client: Client) -> None:
    assert 'data-stream="/api/stream/feed?agent=bot"' in client.get("/?agent=bot").text
    assert 'data-stream="/api/stream/agents"' in client.get("/agents").text
    assert 'data-stream="/api/stream/approvals"' in client.get("/approvals").text
    assert 'data-stream="/api/stream/run?id=r1"' in client.get("/run?id=r1").text


def test_ctrl_c_ends_open_streams_at_once(tmp_path: Any) -> None:
    """`onceonly dashboard` with a tab open: Ctrl+C stops the server within seconds (the
    open stream ends at its next tick), not after the stream's 30 s, and cleanly."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from _services import subprocess_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "onceonly_core.cli", "dashboard", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--url", f"sqlite:///{tmp_path}/ledger.db"],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/api/stream/feed"
        deadline = time.monotonic() + 30
        while True:
            try:
                with httpx.stream("GET", url, timeout=10) as r:
                    assert r.headers["content-type"].startswith("text/event-stream")
                    lines = r.iter_lines()
                    assert next(lines).startswith("retry:")
                    proc.send_signal(signal.SIGINT)
                    t0 = time.monotonic()
                    for _ in lines:  # until the server ends the stream
                        pass
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.2)
        _, err = proc.communicate(timeout=20)
        assert time.monotonic() - t0 < 10
        # uvicorn re-raises the SIGINT after its graceful shutdown: the shell's 130.
        assert proc.returncode in (0, 130, -signal.SIGINT) and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
