"""The suite's own plumbing: backend fixtures, automatic markers, skip-or-fail on servers."""

from __future__ import annotations

import re

import pytest

from _services import POSTGRES, require_services, unavailable, unreachable_reason


def test_namespace_is_unique_per_test(namespace: str) -> None:
    assert re.fullmatch(r"t-[0-9a-f]{12}", namespace)


@pytest.mark.parametrize("any_url", ["memory", "sqlite"], indirect=True)
def test_local_backend_urls(any_url: str, request: pytest.FixtureRequest) -> None:
    assert any_url == "memory://" or re.fullmatch(r"sqlite:///.+/ledger\.db", any_url)
    assert request.node.get_closest_marker("services") is None


@pytest.mark.parametrize("db_url", ["postgresql", "mysql"], indirect=True)
def test_server_backends_are_marked(db_url: str, request: pytest.FixtureRequest) -> None:
    # The core session deselects these by marker (`-m "not services"`): it has no drivers.
    backend = request.node.callspec.params["db_url"]
    assert db_url.startswith(backend)
    assert request.node.get_closest_marker({"postgresql": "pg", "mysql": "mysql"}[backend])
    assert request.node.get_closest_marker("services")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:////nonexistent-dir/ledger.db", "OperationalError"),
        ("postgresql+nosuchdriver://u@127.0.0.1/db", "NoSuchModuleError"),
    ],
)
def test_unreachable_reason_names_the_error(url: str, expected: str) -> None:
    reason = unreachable_reason(url)
    assert reason is not None
    assert reason.startswith(f"{expected}: ")
    assert "\n" not in reason


def test_reachable_sqlite(tmp_path: object) -> None:
    assert unreachable_reason(f"sqlite:///{tmp_path}/ok.db") is None


def test_unreachable_server_skips_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONCEONLY_REQUIRE_SERVICES", raising=False)
    assert not require_services()
    url = "postgresql+psycopg://u:secret@db.invalid/x"
    with pytest.raises(pytest.skip.Exception) as excinfo:
        unavailable(POSTGRES, url, "OperationalError: boom")
    assert str(excinfo.value) == (
        "PostgreSQL not reachable at postgresql+psycopg://u:***@db.invalid/x: "
        "OperationalError: boom; set ONCEONLY_PG_URL"
    )


def test_unreachable_server_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCEONLY_REQUIRE_SERVICES", "1")
    assert require_services()
    with pytest.raises(pytest.fail.Exception, match=r"^PostgreSQL not reachable at .*; set "):
        unavailable(POSTGRES, "postgresql+psycopg://u@db.invalid/x", "boom")


@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
def test_redis_backend_is_marked(store_url: str, request: pytest.FixtureRequest) -> None:
    # The core session has no redis-py: `-m "not services"` must deselect the Redis variants.
    assert store_url.startswith("redis://") and "prefix=oo-test-" in store_url
    assert request.node.get_closest_marker("redis")
    assert request.node.get_closest_marker("services")
