"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright
with the system browser: no ``playwright install``, no network), against a real uvicorn
server on 127.0.0.1 over a SQLite file, while an agent loop calls tools through its own
Guard on the same file.

Skipped when /usr/bin/chromium or Playwright is missing; under ONCEONLY_REQUIRE_SERVICES=1
a missing browser fails instead (CI installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _services import require_services

CHROMIUM = os.environ.get("ONCEONLY_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright)"
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return "the dashboard needs the 'server' extra"
    return None


_why = _missing()
if _why is not None:
    if require_services():
        pytest.fail(f"browser tests required (ONCEONLY_REQUIRE_SERVICES=1): {_why}")
    pytest.skip(_why, allow_module_level=True)

import uvicorn  # noqa: E402
from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

from onceonly_core import Guard  # noqa: E402
from onceonly_core.dashboard import create_dashboard  # noqa: E402
from onceonly_core.governance import Policy  # noqa: E402

pytestmark = pytest.mark.timeout(120)
TENANT = "acme"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Server:
    def __init__(self, url: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        app = create_dashboard(url, namespace=TENANT)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="dashboard", daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the dashboard server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def ledger(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/ledger.db"


@pytest.fixture
def agent(ledger: str) -> Iterator[Guard]:
    """The agents' side: its own Guard on the same SQLite file as the dashboard."""
    g = Guard(ledger, namespace=TENANT, quiet=True)
    g.gov.upsert_policy(
        Policy(
            agent_id="bot",
            max_spend_usd_per_day=20,
            max_actions_per_hour=500,
            max_calls_per_tool={"send_email": 100},
            require_approval=["refund"],
        )
    )
    yield g
    g.close()


@pytest.fixture
def server(ledger: str, agent: Guard) -> Iterator[Server]:
    with Server(ledger) as s:
        yield s


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = ctx.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    pg.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    pg.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
    )
    pg.set_default_timeout(10_000)
    yield pg
    ctx.close()
    assert problems == [], problems  # no script error, no alert(), no CSP violation


def _wait_live(page: Page) -> None:
    """The inline script ran and completed a refresh (it reports in #live-status)."""
    # Locator waits, not wait_for_function: the page's CSP forbids eval, and rightly so.
    page.locator("#live-status", has_text=re.compile(r"^live")).wait_for(timeout=5000)


def send_email(to: str) -> str:
    return f"sent to {to}"


def _shot(page: Page, tmp_path: Path, name: str) -> Path:
    out = tmp_path / f"dashboard-{name}.png"
    page.screenshot(path=str(out), full_page=True)
    shutil.copy(out, f"/tmp/dashboard-{name}.png")
    return out


class Loop:
    """An agent loop in a thread: calls ``fn`` every ``every`` s, records each decision
    with the time the call started."""

    def __init__(self, step: Callable[[int], Any], every: float = 0.1) -> None:
        self.step, self.every = step, every
        self.calls: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            started = time.time()
            try:
                res = self.step(i)
            except BaseException as err:  # reported by the test
                self.errors.append(err)
                return
            self.calls.append((started, res.decision))
            i += 1
            self.stop.wait(self.every)

    def __enter__(self) -> Loop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        assert self.errors == []

    def wait_for(self, decision: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(d == decision for _, d in self.calls):
            assert time.monotonic() < deadline, f"no {decision} call: {self.calls[-5:]}"
            time.sleep(0.02)


def test_live_feed_shows_a_new_call_within_2s(page: Page, server: Server, agent: Guard) -> None:
    page.goto(server.base + "/")
    _wait_live(page)
    tool = f"fresh_tool_{uuid.uuid4().hex[:8]}"
    res = agent.call_tool(send_email, {"to": "a@example.com"}, tool=tool, agent_id="bot")
    assert res.decision == "executed"
    t0 = time.monotonic()
    page.locator("#live td", has_text=tool).first.wait_for(state="visible", timeout=2000)
    assert time.monotonic() - t0 < 2.0
    row = page.locator("#live tr", has_text=tool).first
    assert "executed" in row.inner_text()
    # A replay of the same call shows up as dedup.
    agent.call_tool(send_email, {"to": "a@example.com"}, tool=tool, agent_id="bot")
    page.locator("#live tr.d-dedup", has_text=tool).first.wait_for(timeout=2000)


def test_live_updates_come_over_the_event_stream_not_by_polling(
    page: Page, server: Server, agent: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page opens one EventSource and never polls; when the server ends a stream
    (after STREAM_SECONDS) the browser reconnects and keeps showing new calls."""
    from onceonly_core.dashboard import app as dashboard_app

    monkeypatch.setattr(dashboard_app, "STREAM_SECONDS", 1.0)  # the server runs in-process
    paths: list[str] = []
    page.on("request", lambda r: paths.append(r.url.removeprefix(server.base)))
    page.goto(server.base + "/?agent=bot")
    _wait_live(page)
    time.sleep(2.5)  # at least two streams ended and were re-opened
    tool = f"pushed_{uuid.uuid4().hex[:8]}"
    agent.call_tool(send_email, {"to": "s@example.com"}, tool=tool, agent_id="bot")
    t0 = time.monotonic()
    page.locator("#live td", has_text=tool).first.wait_for(state="visible", timeout=2000)
    assert time.monotonic() - t0 < 2.0
    expect(page.locator("#live-status")).to_have_text(re.compile(r"^live"))
    streams = [p for p in paths if p.startswith("/api/stream/")]
    assert len(streams) >= 3 and set(streams) == {"/api/stream/feed?agent=bot"}
    assert not [p for p in paths if p.startswith("/api/feed")]  # no polling


def test_filters_work(page: Page, server: Server, agent: Guard, tmp_path: Path) -> None:
    agent.gov.upsert_policy({"agent_id": "helper"})
    for who, wf in (("bot", "billing"), ("helper", "support"), ("bot", "support")):
        with agent.workflow(wf):
            agent.call_tool(send_email, {"to": f"{who}-{wf}"}, agent_id=who)
    page.goto(server.base + "/")
    page.fill("#f-agent", "helper")
    page.click("#apply")
    page.wait_for_url("**/?agent=helper**")
    _wait_live(page)  # the live refresh keeps the filter

    def column(n: int) -> list[str]:
        return page.locator(f"#live tr td:nth-child({n})").all_inner_texts()

    assert column(4) == ["helper"]
    with agent.workflow("support"):  # new calls: only the matching one appears
        agent.call_tool(send_email, {"to": "late-bot"}, agent_id="bot")
        agent.call_tool(send_email, {"to": "late-helper"}, agent_id="helper")
    expect(page.locator("#live tr")).to_have_count(2, timeout=3000)
    assert set(column(4)) == {"helper"}
    # Following a workflow link filters by workflow.
    page.goto(server.base + "/")
    page.locator("#live a", has_text="billing").first.click()
    page.wait_for_url("**workflow=billing**")
    assert set(column(6)) == {"billing"} and set(column(4)) == {"bot"}
    page.select_option("#f-decision", "dedup")
    page.click("#apply")
    page.wait_for_url("**decision=dedup**")
    expect(page.locator("#live")).to_contain_text("nothing yet")
    _shot(page, tmp_path, "feed-filtered")


def test_kill_switch_button_stops_the_next_call_of_an_agent_loop(
    page: Page, server: Server, agent: Guard, tmp_path: Path
) -> None:
    def step(i: int) -> Any:
        return agent.call_tool(send_email, {"to": f"user{i}"}, agent_id="bot", spend_usd=0.01)

    with Loop(step) as loop:
        loop.wait_for("executed")
        page.goto(server.base + "/agents")
        card = page.locator(".card", has=page.locator("h3", has_text="bot"))
        card.get_by_role("button", name="Kill switch").click()
        page.wait_for_url("**/agents?done=agent_disabled")
        switched = time.time()  # the disable was committed before this redirect
        page.locator(".card.disabled", has=page.locator("h3", has_text="bot")).wait_for()
        _shot(page, tmp_path, "agents-killed")
        time.sleep(0.6)
        after = [d for started, d in loop.calls if started > switched]
    assert after and set(after) == {"blocked"}, loop.calls[-10:]
    assert agent.gov.agent_status("bot")["disabled"] is True
    # And back: Enable resumes the agent; the global switch stops everyone.
    page.locator(".card", has=page.locator("h3", has_text="bot")).get_by_role(
        "button", name="Enable"
    ).click()
    page.wait_for_url("**done=agent_enabled")
    assert agent.call_tool(send_email, {"to": "again"}, agent_id="bot").decision == "executed"
    page.get_by_role("button", name="Stop all agents").click()
    page.wait_for_url("**done=all_disabled")
    assert page.locator("#global .killed").inner_text().startswith("GLOBAL KILL SWITCH ON")
    res = agent.call_tool(send_email, {"to": "x"}, agent_id="someone-else")
    assert res.policy_reason == "agent_disabled"
    page.get_by_role("button", name="Resume all agents").click()
    page.wait_for_url("**done=all_enabled")
    assert agent.call_tool(send_email, {"to": "x"}, agent_id="someone-else").ok


def test_approve_button_executes_the_pending_call_once(
    page: Page, server: Server, agent: Guard, tmp_path: Path
) -> None:
    runs: list[int] = []

    def refund(amount: int) -> str:
        runs.append(amount)
        return f"refunded {amount}"

    def step(i: int) -> Any:  # the agent re-asks the same call until it runs
        return agent.call_tool(refund, {"amount": 42}, agent_id="bot")

    with Loop(step, every=0.15) as loop:
        loop.wait_for("pending_approval")
        page.goto(server.base + "/approvals")
        approve = page.locator("#live").get_by_role("button", name="Approve")
        approve.wait_for()
        _shot(page, tmp_path, "approvals")
        approve.click()
        page.wait_for_url("**/approvals?done=approved")
        loop.wait_for("executed")
        n = len(loop.calls)
        while len(loop.calls) < n + 4:  # it keeps re-asking: replayed, never re-run
            time.sleep(0.05)
    decisions = [d for _, d in loop.calls]
    first = decisions.index("executed")
    assert set(decisions[:first]) == {"pending_approval"}
    assert set(decisions[first + 1 :]) == {"dedup"}
    assert runs == [42]
    page.goto(server.base + "/approvals")
    assert page.locator("#live").get_by_role("button", name="Approve").count() == 0
    assert "consumed" in page.locator("main").inner_text()


MARKUP_TOOL = '<img src=x onerror="window.__pwned=1">'
MARKUP_WF = "x');window.__pwned=2;('<script>window.__pwned=3</script>"
MARKUP_AGENT = "<b onmouseover=alert(4)>agent</b>"
MARKUP_RUN = "<svg onload=alert(5)>"


def test_markup_in_names_is_text_and_no_script_runs(
    page: Page, server: Server, agent: Guard, tmp_path: Path
) -> None:
    agent.gov.upsert_policy({"agent_id": MARKUP_AGENT})
    with agent.workflow(MARKUP_WF), agent.run(MARKUP_RUN):
        res = agent.call_tool(send_email, {"to": "a"}, tool=MARKUP_TOOL, agent_id=MARKUP_AGENT)
    assert res.decision == "executed" and res.key
    agent.gov.disable_agent(MARKUP_AGENT, "<script>window.__pwned=6</script>")

    def check(path: str, *texts: str) -> None:
        page.goto(server.base + path)
        if page.locator("#live").count():
            _wait_live(page)  # also the script-rendered rows
            time.sleep(1.2)  # and one more refresh
        main = page.locator("main")
        body = main.inner_text()
        for t in texts:
            assert t in body, (path, t)
        assert main.locator("img, svg, b, script").count() == 0, path
        assert page.evaluate("window.__pwned") is None, path

    check("/", MARKUP_TOOL, MARKUP_WF, MARKUP_AGENT, MARKUP_RUN)
    _shot(page, tmp_path, "feed-markup")
    check("/agents", MARKUP_AGENT, "<script>window.__pwned=6</script>")
    check("/run?id=" + MARKUP_RUN.replace("<", "%3C").replace(">", "%3E").replace(" ", "+"))
    page.locator("#live td", has_text=MARKUP_TOOL).first.wait_for()
    check("/runs", MARKUP_RUN)
    page.goto(server.base + "/")
    page.locator("#live tr", has_text=MARKUP_TOOL).locator("td:last-child a").click()
    page.wait_for_url("**/record?**")
    assert MARKUP_WF in page.locator("#record").inner_text()
    assert page.evaluate("window.__pwned") is None


def test_cross_site_post_is_refused(browser: Browser, server: Server, agent: Guard) -> None:
    """A page on another origin auto-submits a form to the dashboard (the peer's wipe):
    the browser sends it, the dashboard refuses it with 403 and nothing changes."""
    ctx = browser.new_context()
    pg = ctx.new_page()
    target = server.base + "/actions/disable_all"
    evil = (
        "<!doctype html><form id=f method=post action='" + target + "'>"
        "<input name=reason value=pwned><input name=csrf value=guess></form>"
        "<script>document.getElementById('f').submit()</script>"
    )
    pg.goto(server.base + "/")  # the operator has a session cookie
    pg.route("http://evil.example/**", lambda r: r.fulfill(body=evil, content_type="text/html"))
    with pg.expect_response(target) as resp:
        pg.goto("http://evil.example/")
    assert resp.value.status == 403
    assert agent.gov.agent_status("bot")["global_disabled"] is False
    ctx.close()


def test_screenshots_of_the_main_views(
    page: Page, server: Server, agent: Guard, tmp_path: Path
) -> None:
    def boom(order: str) -> None:
        raise RuntimeError("payment gateway timeout")

    def refund(amount: int) -> str:
        return "ok"

    agent.gov.upsert_policy(
        {"agent_id": "support-bot", "blocked_tools": ["delete_*"], "max_spend_usd_per_day": 5}
    )
    with agent.run("run-7f3a"):
        agent.gov.post_event("run-7f3a", "run_started", agent_id="bot")
        for i in range(3):
            agent.call_tool(send_email, {"to": f"c{i}@example.com"}, agent_id="bot", spend_usd=1.5)
        agent.call_tool(send_email, {"to": "c0@example.com"}, agent_id="bot", spend_usd=1.5)
        agent.call_tool(boom, {"order": "o-1"}, agent_id="bot")
        agent.call_tool(refund, {"amount": 30}, agent_id="bot")
        agent.gov.post_event("run-7f3a", "run_finished", agent_id="bot", status="ok")
    agent.call_tool(send_email, {"to": "x"}, tool="delete_user", agent_id="support-bot")
    with agent.workflow("nightly"):
        agent(send_email, "report@example.com")
    shots = []
    for name, path in (
        ("feed", "/"),
        ("agents", "/agents"),
        ("approvals", "/approvals"),
        ("runs", "/runs"),
        ("run-timeline", "/run?id=run-7f3a"),
    ):
        page.goto(server.base + path)
        if page.locator("#live").count():
            _wait_live(page)
        shots.append(_shot(page, tmp_path, name))
    page.goto(server.base + "/")
    page.locator("#live tr.d-executed td:last-child a").first.click()
    page.wait_for_url("**/record?**")
    shots.append(_shot(page, tmp_path, "record"))
    assert all(p.stat().st_size > 10_000 for p in shots)
