"""A real ``onceonly serve`` app on loopback, in a thread of the test process.

Used by the server's tests (``tests/server``) and by remote mode's
(``tests/remote``, ``tests/integrations``): ``start_live(control)`` returns once uvicorn
accepts connections."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from onceonly_core.server import create_app
from onceonly_core.server.control import ControlPlane


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    cp: ControlPlane
    #: The server's root, e.g. ``http://127.0.0.1:8123`` (the SDK's base_url adds ``/v1``).
    root: str
    server: uvicorn.Server
    thread: threading.Thread

    def key(self, tenant: str, **options: Any) -> str:
        return self.cp.keys.create_key(tenant, **options)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def start_live(cp: ControlPlane, **app_options: Any) -> LiveServer:
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
    return LiveServer(cp, f"http://127.0.0.1:{port}", server, thread)
