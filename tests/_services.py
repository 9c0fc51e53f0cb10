"""Where the test suite finds PostgreSQL, MariaDB and Redis, and what it does when they are absent.

Importable from test modules (pytest puts ``tests/`` on ``sys.path``) and from scripts that
tests start in subprocesses (pass ``env=subprocess_env()``).

A server that cannot be reached skips the tests that need it, unless
``ONCEONLY_REQUIRE_SERVICES=1`` is set (CI sets it), in which case they fail: a green CI run
must mean the SQL ledgers were really exercised.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NoReturn

import pytest

from onceonly_core.testing.databases import scratch_database

TESTS_DIR = Path(__file__).resolve().parent

REQUIRE_SERVICES_ENV = "ONCEONLY_REQUIRE_SERVICES"


@dataclass(frozen=True)
class Service:
    name: str
    env: str
    default_url: str

    @property
    def url(self) -> str:
        return os.environ.get(self.env) or self.default_url


POSTGRES = Service(
    "PostgreSQL", "ONCEONLY_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL = Service("MariaDB/MySQL", "ONCEONLY_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS = Service("Redis", "ONCEONLY_REDIS_URL", "redis://127.0.0.1:6379/0")


def require_services() -> bool:
    """True when an unreachable server must fail the tests instead of skipping them."""
    return os.environ.get(REQUIRE_SERVICES_ENV, "").strip().lower() in {"1", "true", "yes"}


def _display(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


@cache
def unreachable_reason(url: str, timeout: float = 3.0) -> str | None:
    """Why ``url`` cannot be used (driver missing, server down, ...), or None if it can.

    Opens one real connection and disposes of the engine. Cached per URL, so a test session
    pays for the check once.
    """
    if url.startswith(("redis://", "rediss://")):
        return _redis_unreachable(url, timeout)
    try:
        from sqlalchemy import create_engine, make_url, text

        # psycopg and PyMySQL both take connect_timeout (whole seconds); sqlite3 does not.
        connect_args = {}
        if make_url(url).get_backend_name() in {"postgresql", "mysql", "mariadb"}:
            connect_args["connect_timeout"] = max(1, round(timeout))
        engine = create_engine(url, connect_args=connect_args)
    except Exception as exc:  # driver not installed, bad URL
        return f"{type(exc).__name__}: {exc}"
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first_line}"
    finally:
        engine.dispose()
    return None


def _redis_unreachable(url: str, timeout: float) -> str | None:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except Exception as exc:  # redis-py not installed, bad URL
        return f"{type(exc).__name__}: {exc}"
    try:
        client.ping()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    finally:
        client.close()
    return None


def redis_drop_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix:`` (a test's own keys in the shared Redis)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(batch), 1000):
            client.unlink(*batch[i : i + 1000])
    finally:
        client.close()


def unavailable(service: Service, url: str, reason: str) -> NoReturn:
    """Skip, or fail under ONCEONLY_REQUIRE_SERVICES=1, with one message naming the fix."""
    message = f"{service.name} not reachable at {_display(url)}: {reason}; set {service.env}"
    if require_services():
        pytest.fail(f"{message} ({REQUIRE_SERVICES_ENV}=1)", pytrace=False)
    pytest.skip(message)


def service_url(service: Service) -> str:
    """The service's URL after checking it answers; skips or fails otherwise."""
    url = service.url
    reason = unreachable_reason(url)
    if reason is not None:
        unavailable(service, url, reason)
    return url


def subprocess_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus ``tests/`` on PYTHONPATH, for scripts that import these helpers."""
    env = dict(os.environ)
    paths = [str(TESTS_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def cut_connections(url: str) -> None:
    """Cut every other connection to ``url``'s database from the server side (what a
    restart does to a pool, without the restart): PostgreSQL terminates their backends,
    MariaDB/MySQL kills their threads."""

    import sqlalchemy as sa

    eng = sa.create_engine(url, poolclass=sa.NullPool)
    with eng.connect() as conn:
        if url.startswith("postgresql"):
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        else:
            ids = conn.execute(
                sa.text(
                    "SELECT id FROM information_schema.processlist "
                    "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
                )
            ).scalars()
            for i in list(ids):
                with contextlib.suppress(sa.exc.DBAPIError):  # gone already
                    conn.execute(sa.text(f"KILL {int(i)}"))
        conn.commit()
    eng.dispose()


#: A new, empty database on the test server (dropped afterwards): the package's own.
fresh_database = scratch_database
