"""Remote mode's test rig: ``onceonly serve`` on PostgreSQL, in a process of its own.

The server gets a database of its own (``<pg database>_remote``, created if missing): its
notification deliverer serves every tenant of its database, and must not touch the
outboxes of the other tests sharing the ``test`` database. Each test gets a tenant of its
own (a fresh API key): one key is one tenant.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import sqlalchemy as sa

from _live_server import free_port

_SERVER = """
import sys
import uvicorn
from onceonly_core.server import create_app
uvicorn.run(create_app(sys.argv[1], job_workers=0), host="127.0.0.1", port=int(sys.argv[2]),
            log_level="warning")
"""


@dataclass
class RemoteServer:
    root: str
    db_url: str
    proc: subprocess.Popen[bytes]

    def tenant(self) -> RemoteTenant:
        from onceonly_core.server.control import ControlPlane

        name = f"t-{uuid.uuid4().hex[:12]}"
        cp = ControlPlane(self.db_url, job_workers=0)
        try:
            key = cp.keys.create_key(name)
        finally:
            cp.close()
        return RemoteTenant(self.root, name, key)


@dataclass
class RemoteTenant:
    root: str
    name: str
    key: str


def own_database(pg_url: str, suffix: str = "_remote") -> str:
    url = sa.engine.make_url(pg_url)
    name = f"{url.database}{suffix}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(
                sa.text("select 1 from pg_database where datname = :n"), {"n": name}
            ).first()
            if exists is None:
                conn.execute(sa.text(f'create database "{name}"'))
    finally:
        admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def start_remote_server(pg_url: str) -> Iterator[RemoteServer]:
    from onceonly_core.server.control import ControlPlane

    db_url = own_database(pg_url)
    ControlPlane(db_url, migrate=True, job_workers=0).close()
    port = free_port()
    env = {**os.environ, "ONCEONLY_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, db_url, str(port)], env=env)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(root + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"onceonly serve did not start (exit {proc.poll()})")
            time.sleep(0.1)
        yield RemoteServer(root, db_url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
