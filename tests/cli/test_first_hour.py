"""The first hour of a new user (issue 17): every stumble found on a fresh clone, each
fixed and held here. Real processes where the user would run one (the worker, the
dashboard, the demo), real databases for the server cases."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from _services import fresh_database
from onceonly_core import Guard
from onceonly_core.errors import ConfigError, MissingExtraError, SchemaError

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the sessions run 3.11

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

# A console script's sys.path: the script's own directory, never the working directory
# (unlike `python -m` or `python -c`, which put it first and so would hide the bug).
CONSOLE_SCRIPT = (
    "import os, sys; "
    "sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]; "
    "from onceonly_core.cli import main; main(sys.argv[1:])"
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCEONLY_")}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "integrations"), env.get("PYTHONPATH")])
    )
    return env


def onceonly(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CONSOLE_SCRIPT, *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- the repository: LICENSE, .gitignore, llms.txt ---------------------------------------
def test_the_license_named_in_pyproject_is_in_the_repository() -> None:
    project = PYPROJECT["project"]
    assert project.get("license") == "MIT"
    assert project.get("license-files") == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "Permission is hereby granted" in text


@pytest.mark.parametrize(
    "path",
    [
        "onceonly.db",
        "onceonly.db-wal",
        "onceonly.db-shm",
        "onceonly.db.migrate.lock",
        "examples/ledger.db.migrate.lock",
        "site/index.html",
        ".coverage",
        "htmlcov/index.html",
        ".nox/tests/bin/python",
        "dist/onceonly_core-0.1.0.tar.gz",
        "onceonly_core/__pycache__/guard.cpython-311.pyc",
        ".venv/bin/python",
        ".DS_Store",
    ],
)
def test_gitignore_covers_what_a_run_leaves_behind(path: str) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, check=False)
    assert proc.returncode == 0, f"{path} is not ignored by .gitignore"


def test_llms_txt_lists_the_extras_of_all_as_pyproject_does() -> None:
    (spec,) = PYPROJECT["project"]["optional-dependencies"]["all"]
    in_all = set(re.search(r"\[(.*)\]", spec).group(1).split(","))  # type: ignore[union-attr]
    text = (ROOT / "llms.txt").read_text(encoding="utf-8")
    match = re.search(r"`all` \(([^)]*)\)", text)
    assert match, "llms.txt should say what `all` contains"
    assert {e.strip() for e in match.group(1).split(",")} == in_all
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = re.search(r"^\| `all` \| ([^|]*) \|", readme, re.M)
    assert row and {e.strip() for e in row.group(1).split("+")} == in_all


def test_no_page_points_at_a_document_outside_the_repository() -> None:
    pages = [ROOT / "README.md", ROOT / "llms.txt", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "DESIGN §" not in text and "DESIGN.md" not in text, page


# -- errors that say what to do ----------------------------------------------------------
def test_a_bare_file_name_suggests_the_sqlite_url() -> None:
    with pytest.raises(ConfigError, match=re.escape("'sqlite:///ledger.db'")):
        Guard("ledger.db")
    with pytest.raises(ConfigError, match=re.escape("'sqlite:///data/ledger.db'")):
        Guard("data/ledger.db")


def test_an_empty_url_is_an_error_not_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for url in ("", "   "):
        with pytest.raises(ConfigError, match="empty"):
            Guard(url)
    assert not (tmp_path / "onceonly.db").exists()
    # None still means "from the environment, else the default".
    monkeypatch.setenv("ONCEONLY_DB_URL", "memory://")
    with Guard(None, quiet=True) as g:
        assert g(lambda: 1) == 1


def test_clearing_an_unknown_key_says_so_in_the_log_not_on_stdout(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    def tool(x: int) -> int:
        return x

    with Guard("memory://", quiet=True, namespace="t") as g:
        with caplog.at_level(logging.INFO, logger="onceonly"):
            assert g.clear("no-such-key") is False
            assert g.retry(tool, 1) is False  # never ran: nothing to clear
        messages = [r.getMessage() for r in caplog.records if r.name == "onceonly"]
        assert any("no-such-key" in m and "nothing cleared" in m for m in messages), messages
        assert len(messages) == 2
        caplog.clear()
        g(tool, 1)
        with caplog.at_level(logging.INFO, logger="onceonly"):
            assert g.retry(tool, 1) is True
        assert not [r for r in caplog.records if "nothing cleared" in r.getMessage()]
    assert capsys.readouterr() == ("", "")  # the library never prints


def test_a_remote_tool_without_httpx_raises_missing_extra(
    monkeypatch: pytest.MonkeyPatch, allow_loopback: None
) -> None:
    import asyncio

    with Guard("memory://", quiet=True) as g:
        g.gov.create_tool("quote", url="http://127.0.0.1:9/quote")
        monkeypatch.setitem(sys.modules, "httpx", None)  # `import httpx` raises ImportError
        pip = re.escape('pip install "onceonly-core[http]"')
        with pytest.raises(MissingExtraError, match=pip):
            g.gov.run_tool("bot", "quote", {"sku": "A-1"})
        with pytest.raises(MissingExtraError, match=pip):
            asyncio.run(g.gov.arun_tool("bot", "quote", {"sku": "A-1"}))
        # Nothing was claimed or audited as the tool's failure.
        assert g.store.list(limit=10) == []
        assert [e.decision for e in g.gov.audit_log()] == []


# -- the worker imports handlers from the working directory --------------------------------
def test_worker_imports_a_handler_module_from_the_working_directory(tmp_path: Path) -> None:
    pytest.importorskip("typer")
    pytest.importorskip("fastapi")
    marker = tmp_path / "imported.txt"
    (tmp_path / "myjobs.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('yes')\n"
        "def send(job):\n"
        "    return {'sent': True}\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", CONSOLE_SCRIPT, "worker", "--url", "sqlite:///jobs.db",
         "--threads", "1", "--handler", "mail-*=myjobs:send"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        running = proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert marker.exists() and running, err
    assert "No module named" not in err


def test_worker_names_a_handler_it_cannot_load(tmp_path: Path) -> None:
    pytest.importorskip("typer")
    pytest.importorskip("fastapi")
    proc = onceonly(
        "worker", "--url", "sqlite:///jobs.db", "--handler", "x=nosuchmodule:fn", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "nosuchmodule:fn" in proc.stderr and str(tmp_path) in proc.stderr.replace("\n", "")
    assert "Traceback" not in proc.stderr


# -- the demo never migrates a server database ------------------------------------------
def _tables(url: str) -> list[str]:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()


@pytest.fixture(params=["pg", "mysql"])
def server_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("pg_url" if request.param == "pg" else "mysql_url"))


def test_demo_refuses_an_unmigrated_server_database(server_url: str, tmp_path: Path) -> None:
    import io

    from onceonly_core.cli.demo import run_demo

    with fresh_database(server_url) as url:
        out = io.StringIO()
        with pytest.raises(SchemaError, match="onceonly migrate --url") as caught:
            run_demo(url, fast=True, out=out, plain=True)
        assert "migrations are explicit" in str(caught.value)
        assert _tables(url) == []  # nothing was created behind the operator's back
        if importlib_has("typer"):
            proc = onceonly("demo", "--fast", "--url", url, cwd=tmp_path)
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert "onceonly migrate --url" in proc.stderr and "Traceback" not in proc.stderr
            assert _tables(url) == []


def importlib_has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- the dashboard binds before it says where it is ---------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dashboard_on_a_busy_port_says_so_without_a_banner(tmp_path: Path) -> None:
    pytest.importorskip("typer")
    pytest.importorskip("fastapi")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = onceonly(
            "dashboard", "--url", "sqlite:///d.db", "--port", str(port), cwd=tmp_path, timeout=60
        )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "OnceOnly dashboard on" not in proc.stdout  # no banner for a server that is not up
    assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr
    assert "--port" in proc.stderr and "Traceback" not in proc.stderr


def test_dashboard_banner_means_it_is_listening(tmp_path: Path) -> None:
    pytest.importorskip("typer")
    pytest.importorskip("fastapi")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", CONSOLE_SCRIPT, "dashboard", "--url", "sqlite:///d.db",
         "--port", str(port)],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"http://localhost:{port}/" in banner
        # No retry loop: the banner is printed only once the port accepts connections.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
