"""The ``onceonly`` command: every subcommand, its ``--json`` output, and its error messages.

Commands run in-process through typer's CliRunner, except ``tail``, which runs as a real
process so the test can change the ledger while it follows. Errors the user can fix (a bad
URL, a missing ledger or schema, a missing driver, a live running record) must be one
message and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pytest

pytest.importorskip("typer")
pytest.importorskip("rich")

import sqlalchemy as sa
from typer.testing import CliRunner, Result

import onceonly_core.cli.app as cli_app
from _services import fresh_database
from onceonly_core import Guard
from onceonly_core.cli import build_app
from onceonly_core.stores.base import NewClaim
from onceonly_core.stores.schema import HEAD
from onceonly_core.stores.sql import SQLStore

ROOT = Path(__file__).resolve().parents[2]
SECRET = "tok_SECRET_4242"

app = build_app()
runner = CliRunner()
# The tests choose the ledger; the developer's environment must not.
CLEAN_ENV: dict[str, str | None] = {
    "ONCEONLY_DB_URL": None,
    "ONCEONLY_NAMESPACE": None,
    "COLUMNS": "250",
}


def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, list(args), input=input, env={**CLEAN_ENV, **(env or {})})


def ok_json(*args: str) -> Any:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def failed(result: Result) -> str:
    """The output of a command that must fail cleanly: status 1, a message, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result.output


# -- a ledger with one record in every interesting state ---------------------------------
def charge(customer: str, cents: int) -> dict[str, Any]:
    return {"card_token": SECRET, "customer": customer, "cents": cents}


class Declined(Exception):
    pass


def decline(customer: str) -> None:
    raise Declined(f"card of {customer} declined")


@dataclass
class Ledger:
    url: str
    ns: str
    store: SQLStore
    guard: Guard
    charge_key: str
    failed_key: str
    live_key: str
    retried_key: str


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ns = f"t-{uuid.uuid4().hex[:8]}"
    guard = Guard(url, namespace=ns, quiet=True)
    guard(charge, "cus_1", 500)
    charge_key = guard.key_for(charge, "cus_1", 500)
    with pytest.raises(Declined):
        guard(decline, "cus_2")
    failed_key = guard.key_for(decline, "cus_2")
    # A record that failed once, then succeeded: attempt 2, one execution.
    flaky_calls: list[int] = []

    def flaky(n: int) -> int:
        flaky_calls.append(n)
        if len(flaky_calls) == 1:
            raise Declined("first try")
        return n

    with pytest.raises(Declined):
        guard(flaky, 7)
    guard(flaky, 7)
    retried_key = guard.key_for(flaky, 7)
    # A workflow under the namespace, and another namespace.
    with guard.workflow("wf-1"):
        guard(charge, "cus_wf", 100)
    Guard(url, namespace=f"{ns}-other", quiet=True)(charge, "cus_other", 1)
    # A call running right now, with a live lease held by another worker.
    store = SQLStore(url)
    live_key = "live-" + uuid.uuid4().hex
    store.claim(ns, live_key, NewClaim("tools.slow_job", "worker-x:123", 300.0))
    yield Ledger(url, ns, store, guard, charge_key, failed_key, live_key, retried_key)
    guard.close()
    store.close()


# -- help and version ------------------------------------------------------------------
def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("show", "tail", "stats", "history", "retry", "clear", "migrate", "demo"):
        assert command in result.output
    assert "--install-completion" in result.output  # shell completion is on
    assert invoke().exit_code in (0, 2)  # no arguments: the help, not a traceback
    assert "show" in invoke().output


def test_version() -> None:
    from onceonly_core import __version__

    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"onceonly-core {__version__}"


# -- show --------------------------------------------------------------------------------
def test_show_json_lists_records_without_their_results(ledger: Ledger) -> None:
    rows = ok_json("show", "--url", ledger.url, "--namespace", ledger.ns)
    by_key = {r["key"]: r for r in rows}
    assert by_key[ledger.charge_key]["state"] == "succeeded"
    assert by_key[ledger.charge_key]["executions"] == 1
    assert by_key[ledger.failed_key]["state"] == "failed"
    assert "Declined: card of cus_2 declined" in by_key[ledger.failed_key]["error"]
    assert by_key[ledger.live_key]["state"] == "running"
    assert by_key[ledger.live_key]["lease_live"] is True
    assert by_key[ledger.retried_key]["attempt"] == 2
    # The namespace includes its workflows, and excludes other namespaces.
    assert {r["namespace"] for r in rows} == {ledger.ns, f"{ledger.ns}/wf-1"}
    assert all("result" not in r for r in rows)
    # Newest first.
    assert [r["updated_at"] for r in rows] == sorted((r["updated_at"] for r in rows), reverse=True)


def test_results_are_shown_only_when_asked(ledger: Ledger) -> None:
    plain = invoke("show", "--url", ledger.url, "--namespace", ledger.ns)
    assert plain.exit_code == 0
    assert SECRET not in plain.output
    assert SECRET not in invoke("show", "--url", ledger.url, "--json").output
    assert "succeeded" in plain.output and "failed" in plain.output
    assert ledger.charge_key[:10] + "…" in plain.output  # keys are shortened for people

    shown = invoke("show", "--url", ledger.url, "--namespace", ledger.ns, "--results")
    assert SECRET in shown.output
    rows = ok_json("show", "--url", ledger.url, "--namespace", ledger.ns, "--results")
    result = next(r["result"] for r in rows if r["key"] == ledger.charge_key)
    assert result == {"card_token": SECRET, "customer": "cus_1", "cents": 500}


def test_show_filters_by_state_tool_and_limit(ledger: Ledger) -> None:
    base = ("show", "--url", ledger.url, "--namespace", ledger.ns)
    assert [r["key"] for r in ok_json(*base, "--state", "failed")] == [ledger.failed_key]
    charges = ok_json(*base, "--tool", "charge")  # the last part of test_cli.charge
    assert {r["tool"] for r in charges} == {f"{__name__}.charge"}
    assert len(charges) == 2  # the namespace's and its workflow's
    assert len(ok_json(*base, "--limit", "1")) == 1
    assert invoke(*base, "--state", "bogus").exit_code == 2  # a usage error names the choices


def test_show_every_namespace_by_default_and_from_the_environment(ledger: Ledger) -> None:
    namespaces = {r["namespace"] for r in ok_json("show", "--url", ledger.url)}
    assert namespaces == {ledger.ns, f"{ledger.ns}/wf-1", f"{ledger.ns}-other"}
    result = invoke(
        "show", "--json", env={"ONCEONLY_DB_URL": ledger.url, "ONCEONLY_NAMESPACE": ledger.ns}
    )
    assert result.exit_code == 0, result.output
    assert {r["namespace"] for r in json.loads(result.stdout)} == {ledger.ns, f"{ledger.ns}/wf-1"}


def test_show_unknown_namespace_says_which_exist(ledger: Ledger) -> None:
    result = invoke("show", "--url", ledger.url, "--namespace", "nope")
    assert result.exit_code == 1  # nothing matched, as grep says it
    assert "No records in namespace 'nope'" in result.output
    assert ledger.ns in result.output  # the hint names real namespaces
    as_json = invoke("show", "--url", ledger.url, "--namespace", "nope", "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout) == []


# -- history and stats -------------------------------------------------------------------
def test_history_of_one_tool(ledger: Ledger) -> None:
    rows = ok_json("history", "decline", "--url", ledger.url)
    assert [(r["key"], r["state"]) for r in rows] == [(ledger.failed_key, "failed")]
    full = ok_json("history", f"{__name__}.charge", "--url", ledger.url, "-n", ledger.ns)
    assert len(full) == 2
    text = invoke("history", "charge", "--url", ledger.url)
    assert text.exit_code == 0 and f"History of {__name__}.charge" in text.output
    assert SECRET not in text.output
    empty = invoke("history", "no_such_tool", "--url", ledger.url)
    assert empty.exit_code == 1 and "No records of tool 'no_such_tool'" in empty.output


def test_stats_counts_states_executions_and_takeovers(ledger: Ledger) -> None:
    data = ok_json("stats", "--url", ledger.url, "--namespace", ledger.ns)
    groups = {(g["namespace"], g["tool"].rsplit(".", 1)[-1]): g for g in data["groups"]}
    ns = ledger.ns
    assert groups[(ns, "charge")] | {} == {
        "namespace": ns,
        "tool": f"{__name__}.charge",
        "records": 1,
        "running": 0,
        "succeeded": 1,
        "failed": 0,
        "cleared": 0,
        "executions": 1,
        "takeovers": 0,
    }
    assert groups[(ns, "decline")]["failed"] == 1
    assert groups[(ns, "decline")]["executions"] == 0
    assert groups[(ns, "slow_job")]["running"] == 1
    flaky = next(g for (n, t), g in groups.items() if n == ns and t.endswith("flaky"))
    assert (flaky["takeovers"], flaky["executions"], flaky["succeeded"]) == (1, 1, 1)
    assert groups[(f"{ns}/wf-1", "charge")]["records"] == 1
    assert data["total"]["records"] == sum(g["records"] for g in data["groups"]) == 5
    assert data["total"]["executions"] == 3
    text = invoke("stats", "--url", ledger.url, "--namespace", ledger.ns)
    assert text.exit_code == 0 and "takeovers" in text.output and "total" in text.output


# -- retry -------------------------------------------------------------------------------
def test_retry_clears_a_record_and_the_next_call_runs_again(ledger: Ledger) -> None:
    calls: list[str] = []

    def email(to: str) -> str:
        calls.append(to)
        return f"msg-{len(calls)}"

    assert ledger.guard(email, "a@example.com") == "msg-1"
    assert ledger.guard(email, "a@example.com") == "msg-1"  # replayed
    key = ledger.guard.key_for(email, "a@example.com")
    out = ok_json("retry", key, "--url", ledger.url, "--namespace", ledger.ns)
    assert out == {
        "namespace": ledger.ns,
        "key": key,
        "tool": f"{__name__}.{email.__qualname__}",
        "previous_state": "succeeded",
        "cleared": True,
    }
    rec = ledger.store.get(ledger.ns, key)
    assert rec is not None and rec.state == "cleared"
    assert ledger.guard(email, "a@example.com") == "msg-2"  # ran again
    assert calls == ["a@example.com", "a@example.com"]


def test_retry_accepts_the_shortened_key_that_show_prints(ledger: Ledger) -> None:
    result = invoke("retry", ledger.failed_key[:10] + "…", "--url", ledger.url, "-n", ledger.ns)
    assert result.exit_code == 0, result.output
    assert "cleared" in result.output and "runs again" in result.output
    rec = ledger.store.get(ledger.ns, ledger.failed_key)
    assert rec is not None and rec.state == "cleared"


def test_retry_refuses_a_record_running_with_a_live_lease(ledger: Ledger) -> None:
    out = failed(invoke("retry", ledger.live_key, "--url", ledger.url, "-n", ledger.ns))
    assert "refusing" in out and "running right now" in out and "worker-x:123" in out
    rec = ledger.store.get(ledger.ns, ledger.live_key)
    assert rec is not None and rec.state == "running" and rec.lease_live


def test_retry_of_an_unknown_key_or_namespace(ledger: Ledger) -> None:
    out = failed(invoke("retry", "no-such-key", "--url", ledger.url, "-n", ledger.ns))
    assert "no record with key 'no-such-key'" in out
    out = failed(invoke("retry", ledger.charge_key, "--url", ledger.url, "-n", "elsewhere"))
    assert "namespace 'elsewhere'" in out
    missing = invoke("retry", ledger.charge_key, "--url", ledger.url)
    assert missing.exit_code == 2 and "--namespace" in missing.output


# -- clear -------------------------------------------------------------------------------
def _states(ledger: Ledger) -> dict[str, str]:
    return {r.key: r.state for r in ledger.store.list(namespace=ledger.ns, limit=100)}


def test_clear_without_yes_refuses_when_nobody_can_answer(ledger: Ledger) -> None:
    before = _states(ledger)
    out = failed(invoke("clear", "--url", ledger.url, "-n", ledger.ns))
    assert "--yes" in out
    failed(invoke("clear", "--url", ledger.url, "-n", ledger.ns, "--json"))
    assert _states(ledger) == before


def test_clear_asks_and_respects_no(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_app, "_interactive", lambda: True)
    before = _states(ledger)
    result = invoke("clear", "--url", ledger.url, "-n", ledger.ns, input="n\n")
    assert result.exit_code == 1
    assert f"Clear 3 records in namespace '{ledger.ns}'?" in result.output
    assert "1 running with a live lease will be kept" in result.output
    assert _states(ledger) == before

    result = invoke("clear", "--url", ledger.url, "-n", ledger.ns, input="y\n")
    assert result.exit_code == 0, result.output
    states = _states(ledger)
    assert states.pop(ledger.live_key) == "running"  # a live call is never cleared
    assert set(states.values()) == {"cleared"}


def test_clear_yes_json_keeps_live_calls_and_other_namespaces(ledger: Ledger) -> None:
    out = ok_json("clear", "--url", ledger.url, "-n", ledger.ns, "--yes")
    assert out == {"namespace": ledger.ns, "cleared": 3, "kept_running": 1}
    others = ledger.store.list(namespace=f"{ledger.ns}-other", limit=10)
    workflow = ledger.store.list(namespace=f"{ledger.ns}/wf-1", limit=10)
    assert [r.state for r in others + workflow] == ["succeeded", "succeeded"]
    # Clearing again: nothing left to clear is "nothing matched", status 1 with a message.
    again = failed(invoke("clear", "--url", ledger.url, "-n", ledger.ns, "--yes"))
    assert "nothing to clear" in again and "already cleared" in again
    # The cleared calls run again.
    assert ledger.guard(charge, "cus_1", 500)["cents"] == 500
    rec = ledger.store.get(ledger.ns, ledger.charge_key)
    assert rec is not None and rec.executions == 2


def test_clear_an_unknown_namespace_is_an_error(ledger: Ledger) -> None:
    out = failed(invoke("clear", "--url", ledger.url, "-n", "nope", "--yes"))
    assert "No records in namespace 'nope'" in out and ledger.ns in out


# -- migrate -----------------------------------------------------------------------------
def test_migrate_creates_the_schema_and_show_reads_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    failed(invoke("show", "--url", url))  # no ledger yet, and show does not create one
    assert not (tmp_path / "new.db").exists()
    assert ok_json("migrate", "--url", url) == {
        "url": url,
        "before": None,
        "revision": HEAD,
        "head": HEAD,
    }
    assert ok_json("show", "--url", url) == []
    again = invoke("migrate", "--url", url)
    assert again.exit_code == 0 and f"already at {HEAD}" in again.output


def test_migrate_refuses_memory() -> None:
    assert "memory://" in failed(invoke("migrate", "--url", "memory://"))


# -- errors: one message, status 1, no traceback ----------------------------------------
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nosuchdb://host/db", "unsupported database 'nosuchdb'"),
        ("not a url", "not a database URL"),
        ("sqlite:///:memory:", "in-memory SQLite database"),
        ("sqlite:///ledger.db?journal=off", "unknown SQLite URL options"),
    ],
)
@pytest.mark.parametrize("command", ["show", "stats", "tail", "migrate"])
def test_bad_url(command: str, url: str, message: str) -> None:
    out = failed(invoke(command, "--url", url))
    assert out.startswith("error: ") and message in out


def test_missing_sqlite_ledger_is_reported_not_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    for command in (["show"], ["stats"], ["history", "x"], ["retry", "k", "-n", "ns"]):
        out = failed(invoke(*command, "--url", f"sqlite:///{path}"))
        assert f"no ledger at {path}" in out
    assert not path.exists()


def test_a_file_that_is_not_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are not the droids " * 200)
    out = failed(invoke("show", "--url", f"sqlite:///{path}"))
    assert "file is not a database" in out


def test_sqlite_file_without_schema_says_run_migrate(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sa.create_engine(f"sqlite:///{path}").connect().close()  # an empty SQLite file
    url = f"sqlite:///{path}"
    out = failed(invoke("show", "--url", url))
    assert "missing" in out and f"onceonly migrate --url '{url}'" in out
    assert ok_json("migrate", "--url", url)["revision"] == HEAD


def test_unreachable_server() -> None:
    pytest.importorskip("psycopg")
    url = "postgresql+psycopg://postgres@127.0.0.1:1/test"
    out = failed(invoke("show", "--url", url))
    assert "cannot reach the ledger" in out and "127.0.0.1:1" in out
    assert "database server is running" in out


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymysql", None)  # as if PyMySQL were not installed
    out = failed(invoke("show", "--url", "mysql+pymysql://root@127.0.0.1:3306/test"))
    assert 'pip install "onceonly-core[mysql]"' in out


def test_password_is_not_echoed() -> None:
    pytest.importorskip("psycopg")
    out = failed(invoke("show", "--url", "postgresql+psycopg://u:hunter2@127.0.0.1:1/db"))
    assert "hunter2" not in out


# -- server databases: a new database has no schema until `onceonly migrate` --------------
def _missing_schema_then_migrate(url: str) -> None:
    shown = sa.make_url(url).render_as_string(hide_password=True)
    for command in ("show", "stats"):
        out = failed(invoke(command, "--url", url))
        assert "schema" in out and "missing" in out
        assert f"onceonly migrate --url '{shown}'" in out
    assert ok_json("migrate", "--url", url) == {
        "url": shown,
        "before": None,
        "revision": HEAD,
        "head": HEAD,
    }
    assert ok_json("show", "--url", url) == []
    with Guard(url, namespace="cli", quiet=True) as guard:
        guard(charge, "cus_9", 900)
    rows = ok_json("show", "--url", url)
    assert [(r["namespace"], r["state"], r["executions"]) for r in rows] == [
        ("cli", "succeeded", 1)
    ]


def test_missing_schema_on_postgresql(pg_url: str) -> None:
    with fresh_database(pg_url) as url:
        _missing_schema_then_migrate(url)


def test_missing_schema_on_mariadb(mysql_url: str) -> None:
    with fresh_database(mysql_url) as url:
        _missing_schema_then_migrate(url)


# -- tail --------------------------------------------------------------------------------
def test_tail_starts_with_the_most_recent_records(ledger: Ledger) -> None:
    newest = ok_json("show", "--url", ledger.url, "-n", ledger.ns, "--limit", "2")
    result = invoke(
        "tail", "--url", ledger.url, "-n", ledger.ns, "--last", "2", "--count", "2", "--json"
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["key"] for r in lines] == [r["key"] for r in reversed(newest)]  # oldest first
    assert all("result" not in r for r in lines)


class Lines:
    """Lines of a process's stream, read by a thread, with a timeout per line."""

    def __init__(self, stream: TextIO) -> None:
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: TextIO) -> None:
        for line in stream:
            self._q.put(line)
        self._q.put(None)

    def next(self, timeout: float = 60.0) -> str:
        line = self._q.get(timeout=timeout)
        assert line is not None, "the stream closed"
        return line


def test_tail_follows_claims_and_completions(ledger: Ledger) -> None:
    ns = f"{ledger.ns}-tail"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCEONLY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "onceonly_core.cli", "tail", "--url", ledger.url]
    cmd += ["-n", ns, "--json", "--last", "0", "--interval", "0.05", "--count", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        assert "following namespace" in err.next()
        new = NewClaim("tools.tailed", "me", 60.0)
        rec = ledger.store.claim(ns, "tail-key", new)
        ledger.store.claim(ledger.ns, "elsewhere", new)  # another namespace: not shown
        first = json.loads(out.next())
        assert (first["namespace"], first["key"], first["state"]) == (ns, "tail-key", "running")
        assert ledger.store.finish(ns, "tail-key", rec.token, ok=True, result='"secret"')
        second = json.loads(out.next())
        assert (second["key"], second["state"], second["executions"]) == (
            "tail-key",
            "succeeded",
            1,
        )
        assert "result" not in second
        assert proc.wait(timeout=60) == 0  # --count 2 reached
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# -- demo --------------------------------------------------------------------------------
def test_demo_refuses_a_ledger_other_processes_cannot_see() -> None:
    out = failed(invoke("demo", "--url", "memory://"))
    assert "shared between processes" in out
