"""A server process of the tests' own (``mcp-proxy --http``...), up until it listens.

No optional import: the MCP rig (MCP SDK 2.x) and the LangChain session (which has the
SDK 1.x) both start the proxy with it."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def listening(argv: list[str], port: int, env: dict[str, str], log: Path) -> Iterator[None]:
    """Run ``argv`` until it accepts connections on 127.0.0.1:``port``; stop it after."""
    with log.open("w") as out:  # a file, not a pipe nobody drains
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{argv[0]} exited: {log.read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv[0]} did not start listening on {port}")
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
