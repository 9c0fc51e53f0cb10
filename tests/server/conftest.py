"""A real uvicorn server on loopback, driven by the unmodified ``onceonly-sdk`` client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("onceonly")

import uvicorn
from onceonly import OnceOnly

from onceonly_core.server import create_app
from onceonly_core.server.control import ControlPlane


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    cp: ControlPlane
    base_url: str
    server: uvicorn.Server
    thread: threading.Thread
    clients: list[OnceOnly] = field(default_factory=list)

    def key(self, tenant: str, **options: Any) -> str:
        return self.cp.keys.create_key(tenant, **options)

    def client(self, key: str, **options: Any) -> OnceOnly:
        options.setdefault("fail_open", False)
        c = OnceOnly(key, base_url=self.base_url, **options)
        self.clients.append(c)
        return c

    def close_clients(self) -> None:
        for c in self.clients:
            c.close()
            with contextlib.suppress(Exception):
                asyncio.run(c.aclose())
        self.clients.clear()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def start_server(cp: ControlPlane, **app_options: Any) -> Running:
    app = create_app(control=cp, **app_options)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return Running(cp, f"http://127.0.0.1:{port}/v1", server, thread)


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def make(
        url: str | None = None, *, app_options: dict[str, Any] | None = None, **cp_options: Any
    ) -> Running:
        cp_options.setdefault("job_workers", 1)
        cp_options.setdefault("job_poll", 0.05)
        cp = ControlPlane(url or f"sqlite:///{tmp_path}/ledger.db", **cp_options)
        running = start_server(cp, **(app_options or {}))
        started.append(running)
        return running

    yield make
    for r in started:
        r.close_clients()
        r.stop()
        r.cp.close()


@pytest.fixture
def srv(make_server: Callable[..., Running]) -> Running:
    return make_server()
