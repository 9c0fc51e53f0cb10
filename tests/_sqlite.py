"""Test helpers: whether another process can take SQLite's shared lock on a file, and
the worker-thread hops an async call makes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def count_thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every function ``asyncio.to_thread`` runs from now on (still run), in order."""
    hops: list[Any] = []
    to_thread = asyncio.to_thread

    def counted(fn: Any, /, *args: Any) -> Any:
        hops.append(fn)
        return to_thread(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    return hops


# SQLite's lock bytes (os_unix.c): SHARED_FIRST = PENDING_BYTE + 2, SHARED_SIZE = 510.
SHARED_FIRST = 0x40000000 + 2
SHARED_SIZE = 510

PROBE = f"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, {SHARED_SIZE}, {SHARED_FIRST})
except OSError:
    print("held")
else:
    print("free")
"""


def holder_lock_state(db: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(db)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()
