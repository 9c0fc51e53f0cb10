"""The embedded ledger never drops SQLite's own file locks.

POSIX record locks belong to the process, and closing *any* descriptor of a file drops
them all. SQLite in WAL mode keeps a shared lock on the database file for as long as a
connection is open; if we opened and closed the database file ourselves (e.g. to flock it
while creating the schema), that lock would vanish, and the last *other* process to close
its connection would checkpoint and delete the WAL under our open connection — lost
commits, then "database disk image is malformed". Seen once in a retry storm before the
schema lock moved to a separate file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from onceonly_core.stores import NewClaim
from onceonly_core.stores.sql import SQLStore

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


def test_creating_the_schema_keeps_sqlite_s_shared_lock(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    store = SQLStore(f"sqlite:///{db}")
    rec = store.claim("ns", "k", NewClaim("tool", "me", 30.0))  # creates and migrates
    assert rec.mine
    # Our connection is open in WAL mode, so another process must see SQLite's shared lock.
    assert holder_lock_state(db) == "held"
    store.close()
    assert holder_lock_state(db) == "free"  # the probe itself can tell the difference
