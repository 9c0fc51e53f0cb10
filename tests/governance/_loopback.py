"""A real HTTP server on 127.0.0.1:0 for the remote-tool and webhook tests.

Each test gives a handler ``(Request) -> Reply``; the server records every request.
``verifying(secret, cache, reply)`` wraps a reply in Standard Webhooks verification, as a
real receiver would: 401 with the reason when the signature does not verify.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from onceonly_core.errors import SignatureError
from onceonly_core.governance.signing import ReplayCache, verify


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    verified: str | None = None  # the webhook-id, when verifying() accepted it


@dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"result": "ok"}'
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    delay: float = 0.0
    content_length: bool = True
    drip: float = 0.0  # seconds between single body bytes (a server that dribbles)


Handler = Callable[[Request], Reply]


class Loopback:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.stop = threading.Event()  # wakes up slow handlers at teardown
        outer = self

        class _H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                req = Request(
                    "POST",
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                outer.requests.append(req)
                reply = outer.handler(req)
                if reply.delay:
                    outer.stop.wait(reply.delay)
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                if reply.content_length:
                    self.send_header("Content-Length", str(len(reply.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if not reply.drip:
                    self.wfile.write(reply.body)
                    return
                self.wfile.flush()
                for i in range(len(reply.body)):
                    if outer.stop.wait(reply.drip):
                        return
                    self.wfile.write(reply.body[i : i + 1])
                    self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class _Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the client hung up on purpose (timeouts, size limits)

        self.server = _Server(("127.0.0.1", 0), _H)
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}/tool"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@contextmanager
def loopback(handler: Handler) -> Iterator[Loopback]:
    srv = Loopback(handler)
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.close()


def verifying(
    secret: str | bytes, cache: ReplayCache, reply: Handler | Reply, tolerance: float = 300.0
) -> Handler:
    """A handler that verifies the signature first, then answers ``reply``."""

    def handle(req: Request) -> Reply:
        try:
            req.verified = verify(secret, req.headers, req.body, tolerance=tolerance, replay=cache)
        except SignatureError as exc:
            return Reply(401, f'{{"error": "{exc}"}}'.encode())
        return reply(req) if callable(reply) else reply

    return handle


def sequence(*replies: Reply) -> Callable[[Request], Reply]:
    """Answer the given replies in order, then repeat the last one."""
    state = {"n": 0}
    lock = threading.Lock()

    def reply(req: Request) -> Reply:
        with lock:
            n = state["n"]
            state["n"] += 1
        return replies[min(n, len(replies) - 1)]

    return reply
