"""`onceonly server create-key` / `list-keys` (the sub-app, registered on a bare Typer)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

typer = pytest.importorskip("typer")
from typer.testing import CliRunner  # noqa: E402

from onceonly_core.cli.server import register  # noqa: E402
from onceonly_core.server.control import ControlPlane  # noqa: E402
from onceonly_core.server.db import KEY_PREFIX, hash_key  # noqa: E402


def test_create_key_prints_once_and_stores_hash(tmp_path: Path) -> None:
    app = _cli_app()
    url = f"sqlite:///{tmp_path}/l.db"
    runner = CliRunner()
    res = runner.invoke(app, ["server", "create-key", "--tenant", "acme", "--url", url])
    assert res.exit_code == 0, res.output
    key = res.output.strip()
    assert key.startswith(KEY_PREFIX)
    cp = ControlPlane(url)
    try:
        info = cp.keys.authenticate(key)
        assert info is not None and info.tenant == "acme"
        listed = runner.invoke(app, ["server", "list-keys", "--url", url])
        assert key not in listed.output and hash_key(key) not in listed.output
        assert "acme" in listed.output
        bad = runner.invoke(app, ["server", "create-key", "--tenant", "a/b", "--url", url])
        assert bad.exit_code != 0
        alias = runner.invoke(app, ["keys", "create", "--tenant", "beta", "--url", url])
        assert alias.exit_code == 0 and alias.output.startswith(KEY_PREFIX)
        assert cp.keys.revoke_key(info.key_id)
        assert cp.keys.authenticate(key) is None
    finally:
        cp.close()


def test_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from onceonly_core.errors import MissingExtraError
    from onceonly_core.server import create_app

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(MissingExtraError, match=r'pip install "onceonly-core\[server\]"'):
        create_app("sqlite:///x.db")


@pytest.mark.timeout(60)
def test_serve_command_end_to_end(tmp_path: Path) -> None:
    from onceonly import OnceOnly

    from onceonly_core.server import create_key

    url = f"sqlite:///{tmp_path}/l.db"
    key = create_key(url, "acme")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import typer; from onceonly_core.cli.server import register; "
        "app = typer.Typer(); register(app); app()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--url", url, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
            time.sleep(0.1)
        with OnceOnly(key, base_url=f"http://127.0.0.1:{port}", fail_open=False) as c:
            assert c.check_lock("cli-k", ttl=60).locked
            assert c.check_lock("cli-k", ttl=60).duplicate
            res = c.ai.run_and_wait(key="cli-job", timeout=20, poll_min=0.2)
            assert res.status == "completed"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ok(url: str, proc: subprocess.Popen[bytes]) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        try:
            r = httpx.get(url, timeout=1)
            if r.status_code == 200:
                return r
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, f"{url} did not come up"
        time.sleep(0.1)


@pytest.mark.timeout(60)
def test_serve_also_serves_a_tenant_s_dashboard(tmp_path: Path) -> None:
    """`onceonly serve --dashboard TENANT`: the API and that tenant's dashboard, one process;
    a call made through the API's tenant shows in the dashboard's feed."""
    from onceonly import OnceOnly

    from onceonly_core.server import create_key

    url = f"sqlite:///{tmp_path}/l.db"
    key = create_key(url, "acme")
    api, dash = _free_port(), _free_port()
    script = (
        "import typer; from onceonly_core.cli.server import register; "
        "app = typer.Typer(); register(app); app()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--url", url, "--port", str(api),
         "--dashboard", "acme", "--dashboard-port", str(dash)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_ok(f"http://127.0.0.1:{api}/readyz", proc)
        page = _wait_ok(f"http://127.0.0.1:{dash}/", proc)
        assert "Live feed" in page.text
        with OnceOnly(key, base_url=f"http://127.0.0.1:{api}", fail_open=False) as c:
            c.gov.upsert_policy({"agent_id": "bot", "blocked_tools": ["delete_*"]})
        agents = httpx.get(f"http://127.0.0.1:{dash}/api/agents", timeout=5).json()
        assert "bot" in json.dumps(agents)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


# -- request threads -----------------------------------------------------------------------
def test_request_threads_default_to_twice_the_cpus_from_4_to_16(tmp_path: Path) -> None:
    from onceonly_core.server.control import default_threads

    assert [default_threads(n) for n in (1, 2, 3, 8, 64)] == [4, 4, 6, 16, 16]
    cp = ControlPlane(f"sqlite:///{tmp_path}/l.db")
    try:
        assert cp.threads == default_threads()
    finally:
        cp.close()
    cp = ControlPlane(f"sqlite:///{tmp_path}/l.db", threads=3)
    cp.close()
    assert cp.threads == 3
    res = CliRunner().invoke(_cli_app(), ["serve", "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output


def _cli_app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def version() -> None:  # a second command, so typer keeps the group
        pass

    register(app)
    return app


# -- where the sync routes run ------------------------------------------------------------
def _count_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions sent to the thread pool from now on."""
    import anyio.to_thread

    hops: list[str] = []
    real = anyio.to_thread.run_sync

    async def counting(fn: Any, *args: Any, **kw: Any) -> Any:
        target = getattr(fn, "func", fn)  # run_in_threadpool sends a functools.partial
        hops.append(getattr(target, "__name__", repr(target)))
        return await real(fn, *args, **kw)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    return hops


def test_a_sync_route_takes_one_trip_to_the_thread_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI hops to the thread pool a second time to validate a sync endpoint's value;
    the app's routes take one hop per request (what /v1/ai/run measured: ParsedRoute)."""
    from fastapi.testclient import TestClient

    from onceonly_core.server import create_app

    cp = ControlPlane(f"sqlite:///{tmp_path}/l.db", job_workers=0)
    key = cp.keys.create_key("acme")
    try:
        with TestClient(create_app(control=cp, inline=False)) as http:
            auth = {"Authorization": f"Bearer {key}"}
            assert http.get("/v1/me", headers=auth).status_code == 200  # warms the key cache
            hops = _count_hops(monkeypatch)
            r = http.post("/v1/ai/run", headers=auth, json={"key": "job-1", "ttl": 60})
            assert r.status_code == 200 and r.json()["status"] == "acquired", r.text
            assert hops == ["ai_run"], hops
            hops.clear()
            r = http.post("/v1/ai/run", headers=auth, json={"key": "job-1", "tool": "x"})
            assert r.status_code == 422 and hops == ["ai_run"], (r.text, hops)  # errors too
    finally:
        cp.close()


def test_alone_a_check_lock_or_a_job_lease_runs_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no other request in progress, /v1/check-lock, a key-mode /v1/ai/run and the
    job's /v1/ai/status and /v1/ai/result skip the thread pool; a tool run (any length)
    and the unmarked routes never do."""
    from fastapi.testclient import TestClient

    from onceonly_core.server import create_app

    cp = ControlPlane(f"sqlite:///{tmp_path}/l.db", job_workers=0)
    key = cp.keys.create_key("acme")
    try:
        with TestClient(create_app(control=cp)) as http:
            auth = {"Authorization": f"Bearer {key}"}
            assert http.get("/v1/me", headers=auth).status_code == 200  # warms the key cache
            hops = _count_hops(monkeypatch)
            r = http.post("/v1/check-lock", headers=auth, json={"key": "k1", "ttl": 60})
            assert r.status_code == 200 and r.json()["status"] == "locked", r.text
            r = http.post("/v1/check-lock", headers=auth, json={"key": "k1", "ttl": 60})
            assert r.json()["status"] == "duplicate", r.text
            r = http.post("/v1/ai/run", headers=auth, json={"key": "job-1", "ttl": 60})
            assert r.status_code == 200 and r.json()["status"] == "acquired", r.text
            r = http.get("/v1/ai/status", headers=auth, params={"key": "job-1"})
            assert r.status_code == 200 and r.json()["status"] == "in_progress", r.text
            r = http.get("/v1/ai/result", headers=auth, params={"key": "job-1"})
            assert r.status_code == 200 and r.json()["ok"] is False, r.text
            assert hops == [], hops
            r = http.post("/v1/ai/run", headers=auth, json={"agent_id": "bot", "tool": "nope"})
            assert r.status_code == 200 and hops == ["ai_run"], (r.text, hops)
            hops.clear()
            r = http.post("/v1/ai/lease", headers=auth, json={"key": "job-2", "ttl": 60})
            assert r.status_code == 200 and hops == ["ai_lease"], (r.text, hops)
    finally:
        cp.close()


@pytest.mark.timeout(60)
def test_with_another_request_in_progress_a_check_lock_runs_in_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocking the event loop for one request would stall the others' responses: with
    one in progress (a lease held inside its database call), a check-lock hops."""
    import threading

    from fastapi.testclient import TestClient

    from onceonly_core.server import create_app

    cp = ControlPlane(f"sqlite:///{tmp_path}/l.db", job_workers=0)
    key = cp.keys.create_key("acme")
    entered, release = threading.Event(), threading.Event()
    real_lease = cp.lease

    def held_lease(*args: Any, **kw: Any) -> Any:
        entered.set()
        assert release.wait(30)
        return real_lease(*args, **kw)

    monkeypatch.setattr(cp, "lease", held_lease)
    try:
        with TestClient(create_app(control=cp)) as http:
            auth = {"Authorization": f"Bearer {key}"}
            assert http.get("/v1/me", headers=auth).status_code == 200
            hops = _count_hops(monkeypatch)
            first: list[httpx.Response] = []
            t = threading.Thread(
                target=lambda: first.append(
                    http.post("/v1/ai/lease", headers=auth, json={"key": "j", "ttl": 60})
                )
            )
            t.start()
            assert entered.wait(30)
            r = http.post("/v1/check-lock", headers=auth, json={"key": "k2", "ttl": 60})
            assert r.status_code == 200 and r.json()["status"] == "locked", r.text
            assert hops == ["ai_lease", "check_lock"], hops
            release.set()
            t.join(30)
            assert first and first[0].status_code == 200, first
    finally:
        release.set()
        cp.close()


def test_a_request_waiting_to_start_is_not_alone() -> None:
    """A request is a task from its arrival, before it reaches the app: one that has
    arrived and not started yet counts (the in-progress count alone would miss it)."""
    import asyncio

    from onceonly_core.server.app import InFlight

    async def main() -> list[bool]:
        flight = InFlight()
        assert not (flight.n == 1 and flight.alone())  # no lifespan ran: never alone
        flight.base = len(asyncio.all_tasks())  # the server's own: this task
        flight.n = 1

        async def request() -> bool:
            return flight.alone()

        seen = [await asyncio.create_task(request())]
        waiting = asyncio.create_task(asyncio.sleep(0))  # arrived, not started
        seen.append(await asyncio.create_task(request()))
        await waiting
        seen.append(await asyncio.create_task(request()))
        flight.n = 2
        seen.append(await asyncio.create_task(request()))
        return seen

    assert asyncio.run(main()) == [True, False, True, False]


def test_serve_no_inline_keeps_every_route_in_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve --no-inline` reaches the workers' app (through the environment)."""
    import uvicorn
    from fastapi.testclient import TestClient

    from onceonly_core.cli.server import _factory
    from onceonly_core.server import create_key

    url = f"sqlite:///{tmp_path}/l.db"
    key = create_key(url, "acme")
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: started.append(kw))
    for name in ("ONCEONLY_SERVER_INLINE", "ONCEONLY_SERVER_JOB_WORKERS", "ONCEONLY_DB_URL"):
        monkeypatch.setenv(name, "")  # restored after the test (serve sets them)
    res = CliRunner().invoke(
        _cli_app(), ["serve", "--url", url, "--no-inline", "--job-workers", "0"]
    )
    assert res.exit_code == 0 and started, res.output
    with TestClient(_factory()) as http:
        auth = {"Authorization": f"Bearer {key}"}
        assert http.get("/v1/me", headers=auth).status_code == 200
        hops = _count_hops(monkeypatch)
        r = http.post("/v1/check-lock", headers=auth, json={"key": "k", "ttl": 60})
        assert r.status_code == 200 and hops == ["check_lock"], (r.text, hops)
