"""``onceonly doctor``: each check turns red (exit 1) when its problem is real, says what
to fix, and never creates or migrates anything; on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("typer")
pytest.importorskip("rich")

import sqlalchemy as sa
from typer.testing import CliRunner, Result

from _services import fresh_database
from onceonly_core import Guard
from onceonly_core.cli import build_app
from onceonly_core.stores.schema import HEAD
from onceonly_core.stores.sql import SQLStore

app = build_app()
CLEAN_ENV: dict[str, str | None] = {
    "ONCEONLY_DB_URL": None,
    "ONCEONLY_NAMESPACE": None,
    "COLUMNS": "250",
}


def doctor(*args: str, env: dict[str, str] | None = None) -> tuple[Result, dict[str, Any]]:
    result = CliRunner().invoke(app, ["doctor", *args, "--json"], env={**CLEAN_ENV, **(env or {})})
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1), result.output
    return result, json.loads(result.stdout)


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in report["checks"] if c["name"] == name]
    return found


def red(report: dict[str, Any]) -> list[str]:
    return [c["name"] for c in report["checks"] if c["status"] == "fail"]


def test_a_working_sqlite_ledger_is_green(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Guard(url, quiet=True) as g:
        g(lambda: 1)
    result, report = doctor("--url", url)
    assert result.exit_code == 0 and report["ok"] and red(report) == []
    assert check(report, "migrations") == {
        "name": "migrations",
        "status": "ok",
        "detail": f"schema at head ({HEAD})",
        "fix": "",
    }
    assert check(report, "extra cli")["status"] == "ok"
    assert check(report, "ledger URL")["detail"].endswith("(from --url)")
    text = CliRunner().invoke(app, ["doctor", "--url", url], env=CLEAN_ENV)
    assert text.exit_code == 0 and "ready to guard calls" in text.output


def test_the_url_comes_from_the_environment_and_says_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    _, report = doctor(env={"ONCEONLY_DB_URL": url})
    assert "(from ONCEONLY_DB_URL)" in check(report, "ledger URL")["detail"]


def test_a_ledger_not_made_yet_is_a_note_and_stays_unmade(tmp_path: Path) -> None:
    path = tmp_path / "later.db"
    result, report = doctor("--url", f"sqlite:///{path}")
    assert result.exit_code == 0 and report["ok"]
    assert check(report, "database")["status"] == "warn"
    assert "first guarded call creates it" in check(report, "database")["fix"]
    assert not path.exists()


def test_a_bare_file_name_is_red_with_the_url_meant() -> None:
    result, report = doctor("--url", "ledger.db")
    assert result.exit_code == 1 and red(report) == ["ledger URL"]
    assert "sqlite:///ledger.db" in check(report, "ledger URL")["detail"]


def test_a_bad_namespace_is_red() -> None:
    result, report = doctor("--url", "memory://", env={"ONCEONLY_NAMESPACE": "x" * 1000})
    assert result.exit_code == 1 and "namespace" in red(report)


def test_a_file_that_is_not_a_ledger_is_red(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("not a database, just text " * 100)
    result, report = doctor("--url", f"sqlite:///{path}")
    assert result.exit_code == 1 and "database" in red(report)


def test_a_missing_driver_is_red_with_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymysql", None)  # as if PyMySQL were not installed
    result, report = doctor("--url", "mysql+pymysql://root@127.0.0.1:3306/test")
    assert result.exit_code == 1
    assert check(report, "database")["fix"] == 'pip install "onceonly-core[mysql]"'


def test_an_unreachable_server_is_red() -> None:
    pytest.importorskip("psycopg")
    result, report = doctor("--url", "postgresql+psycopg://postgres@127.0.0.1:1/test")
    assert result.exit_code == 1 and red(report) == ["database"]
    assert "database server is running" in check(report, "database")["fix"]


# -- server databases ------------------------------------------------------------------
@pytest.fixture(params=["pg", "mysql"])
def server_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("pg_url" if request.param == "pg" else "mysql_url"))


def test_a_server_database_without_the_schema_is_red_until_migrated(server_url: str) -> None:
    with fresh_database(server_url) as url:
        shown = sa.make_url(url).render_as_string(hide_password=True)
        result, report = doctor("--url", url)
        assert result.exit_code == 1 and red(report) == ["migrations"]
        assert check(report, "migrations")["fix"] == f"onceonly migrate --url '{shown}'"
        assert check(report, "database")["status"] == "ok"
        assert check(report, "clock")["status"] == "ok"  # same machine: no skew
        store = SQLStore(url)  # doctor itself changed nothing: still no schema
        try:
            assert store._schema_version() is None
            store.migrate()
        finally:
            store.close()
        result, report = doctor("--url", url)
        assert result.exit_code == 0 and report["ok"], report


def test_a_database_clock_far_from_ours_is_red(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fresh_database(pg_url) as url:
        store = SQLStore(url)
        try:
            store.migrate()
        finally:
            store.close()
        real = SQLStore.now
        monkeypatch.setattr(SQLStore, "now", lambda self: real(self) + 90.0)
        result, report = doctor("--url", url)
        assert result.exit_code == 1 and red(report) == ["clock"]
        assert (
            "90." in check(report, "clock")["detail"]
            and "ahead" in check(report, "clock")["detail"]
        )
        monkeypatch.setattr(SQLStore, "now", lambda self: real(self) - 5.0)
        result, report = doctor("--url", url)
        assert result.exit_code == 0 and check(report, "clock")["status"] == "warn"


# -- Redis and remote mode ------------------------------------------------------------------
def test_a_redis_ledger_is_checked_and_its_durability_told(redis_url: str) -> None:
    pytest.importorskip("redis")
    from onceonly_core.stores.redis import RedisStore

    result, report = doctor("--url", redis_url)
    assert red(report) == [] and result.exit_code == 0, report
    assert check(report, "database")["detail"].startswith("redis answers")
    store = RedisStore(redis_url, durability_check=False)
    try:
        problems = store.durability_problems()
    finally:
        store.close()
    durability = check(report, "durability")
    if problems:  # this server could lose a claim: the note names the setting
        assert durability["status"] == "warn" and problems[0] in durability["detail"]
        assert "appendfsync always" in durability["fix"]
    else:
        assert durability["status"] == ("warn" if problems is None else "ok")


def test_remote_mode_without_a_key_is_red_with_what_to_do() -> None:
    pytest.importorskip("httpx")
    result, report = doctor("--url", "https://onceonly.example", env={"ONCEONLY_API_KEY": ""})
    assert result.exit_code == 1 and red(report) == ["database"]
    assert "ONCEONLY_API_KEY" in check(report, "database")["detail"]
