"""Fixtures shared by the whole suite: ledger URLs for every backend, and namespaces.

Layout:

* ``tests/core/``: tests of the core install (memory and SQLite ledgers). Backend-generic
  tests here may use ``db_url``/``any_url``: the nox ``tests`` session runs them on every
  backend, the ``core`` session (no extras, so no server drivers) with ``-m "not services"``.
* ``tests/services/``: tests that only make sense against PostgreSQL, MariaDB or Redis.
* ``store_url``: every store (``any_url`` plus Redis), for the store contract kit.
* ``gov_url``: ``db_url`` plus Redis, for the notification outbox.

Tests that use ``pg_url``/``mysql_url``/``redis_url`` (directly, or through the
``postgresql``/``mysql``/``redis`` parameters of ``db_url``/``any_url``/``store_url``/
``gov_url``) are marked ``pg``/``mysql``/``redis`` and ``services`` automatically, and so
is everything under ``tests/services/``; ``pytest -m "not services"`` runs everything
that needs no server. An unreachable server skips those tests, or fails them
when ``ONCEONLY_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from _services import MYSQL, POSTGRES, REDIS, redis_drop_prefix, service_url

SERVICES_DIR = Path(__file__).resolve().parent / "services"

SQL_BACKENDS = ["sqlite", "postgresql", "mysql"]
ALL_BACKENDS = ["memory", *SQL_BACKENDS]
STORE_BACKENDS = [*ALL_BACKENDS, "redis"]
GOV_BACKENDS = [*SQL_BACKENDS, "redis"]

# fixture name -> marker it implies
_SERVICE_FIXTURES = {"pg_url": "pg", "mysql_url": "mysql", "redis_url": "redis"}
# parameter of db_url / any_url / store_url -> marker it implies
_SERVICE_PARAMS = {"postgresql": "pg", "mysql": "mysql", "redis": "redis"}


def _migrated(url: str) -> str:
    """The shared server database at the code's schema (the stores do not migrate a
    server database themselves: ``onceonly migrate`` does), once per test session, so
    that no test depends on another having migrated it first."""
    from onceonly_core.stores.sql import SQLStore

    with SQLStore(url) as store:
        store.migrate()
    return url


@pytest.fixture(scope="session")
def pg_url() -> str:
    """SQLAlchemy URL of a reachable PostgreSQL database (``ONCEONLY_PG_URL``), migrated."""
    return _migrated(service_url(POSTGRES))


@pytest.fixture(scope="session")
def mysql_url() -> str:
    """SQLAlchemy URL of a reachable MariaDB/MySQL database (``ONCEONLY_MYSQL_URL``),
    migrated."""
    return _migrated(service_url(MYSQL))


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a reachable Redis (``ONCEONLY_REDIS_URL``, default redis://127.0.0.1:6379/0)."""
    return service_url(REDIS)


def _backend_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    if backend == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    if backend == "mysql":
        return str(request.getfixturevalue("mysql_url"))
    raise AssertionError(f"unknown backend {backend!r}")


@pytest.fixture(params=SQL_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQL ledger URL: a fresh SQLite file, or the shared PostgreSQL / MariaDB database.

    The server databases are shared by every test: isolate with ``namespace``.
    """
    return _backend_url(request.param, request, tmp_path)


@pytest.fixture(params=ALL_BACKENDS)
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every ledger: ``memory://`` plus the ``db_url`` backends."""
    return _backend_url(request.param, request, tmp_path)


@pytest.fixture(autouse=True)
def _egress_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from the egress guard's default (no allowlist), whatever the
    developer's shell exports."""
    monkeypatch.delenv("ONCEONLY_EGRESS_ALLOW", raising=False)


@pytest.fixture
def allow_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Allowlist 127.0.0.1 for outbound requests in this test: its remote tools and
    webhooks are loopback servers, which the egress guard refuses by default."""
    monkeypatch.setenv("ONCEONLY_EGRESS_ALLOW", "127.0.0.1")


def _url_or_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """``_backend_url``, or a Redis URL with a key prefix of its own (``?prefix=``),
    deleted after the test."""
    if request.param != "redis":
        yield _backend_url(request.param, request, tmp_path)
        return
    base = str(request.getfixturevalue("redis_url"))
    prefix = f"oo-test-{uuid4().hex[:12]}"
    yield f"{base}{'&' if '?' in base else '?'}prefix={prefix}"
    redis_drop_prefix(base, prefix)


@pytest.fixture(params=STORE_BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every store: the ``any_url`` backends plus Redis. A Redis URL carries a key prefix of
    its own (``?prefix=``), deleted after the test."""
    yield from _url_or_redis(request, tmp_path)


@pytest.fixture(params=GOV_BACKENDS)
def gov_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every ledger whose governance store lives beyond the process (the ``db_url``
    backends plus Redis): what the notification outbox is proven on."""
    yield from _url_or_redis(request, tmp_path)


@pytest.fixture(scope="session")
def remote_server(pg_url: str) -> Iterator[Any]:
    """``onceonly serve`` on PostgreSQL in its own process, for remote mode's tests
    (``tests/_remote.py``); ``remote_server.tenant()`` gives a fresh tenant and key."""
    pytest.importorskip("fastapi", reason="remote mode's server needs the 'server' extra")
    pytest.importorskip("uvicorn", reason="remote mode's server needs the 'server' extra")
    from _remote import start_remote_server

    yield from start_remote_server(pg_url)


@pytest.fixture
def remote(remote_server: Any) -> Any:
    """A fresh tenant on the remote-mode server: ``.root``, ``.key``, ``.name``."""
    return remote_server.tenant()


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses, so tests can share one server database."""
    return f"t-{uuid4().hex[:12]}"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects, so `-m "not services"` sees these
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        markers: set[str] = set()
        if item.path.is_relative_to(SERVICES_DIR):
            markers.add("services")
        fixturenames = getattr(item, "fixturenames", ())
        markers.update(mark for name, mark in _SERVICE_FIXTURES.items() if name in fixturenames)
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            for fixture in ("db_url", "any_url", "store_url", "gov_url", "empty_url"):
                backend = callspec.params.get(fixture)
                if backend in _SERVICE_PARAMS:
                    markers.add(_SERVICE_PARAMS[backend])
        if markers & {"pg", "mysql", "redis"}:
            markers.add("services")
        for mark in sorted(markers):
            item.add_marker(mark)
