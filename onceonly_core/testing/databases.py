"""A scratch database on a PostgreSQL or MySQL/MariaDB server, for tests and benchmarks.

    from onceonly_core.testing.databases import scratch_database

    with scratch_database("postgresql+psycopg://postgres@127.0.0.1/test") as url:
        store = SQLStore(url)   # an empty database of its own, dropped afterwards
        store.migrate()

The server's account needs the right to create and drop databases. No pytest needed.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import sqlalchemy as sa

__all__ = ["scratch_database"]


@contextlib.contextmanager
def scratch_database(server_url: str, prefix: str = "oo_test") -> Iterator[str]:
    """A new, empty database on ``server_url``'s server (its URL, password included),
    dropped afterwards, with any connection still open to it (PostgreSQL's ``FORCE``)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    base = sa.make_url(server_url)
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            force = " WITH (FORCE)" if base.get_backend_name() == "postgresql" else ""
            with admin.connect() as conn:
                conn.execute(sa.text(f"DROP DATABASE {name}{force}"))
    finally:
        admin.dispose()
