"""A real uvicorn server on loopback, driven by the unmodified ``onceonly-sdk`` client."""

from __future__ import annotations

import asyncio
import contextlib
import threading
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

from _live_server import start_live
from onceonly_core.server.control import ControlPlane


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
    live = start_live(cp, **app_options)
    return Running(cp, f"{live.root}/v1", live.server, live.thread)


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
