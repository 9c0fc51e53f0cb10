"""``onceonly keys create | list | revoke``: the one home of the API-key commands, with
``--json``, a table for people, and status 1 when what was named does not exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("typer")
pytest.importorskip("fastapi")

from typer.testing import CliRunner, Result

from onceonly_core.cli import build_app
from onceonly_core.server.db import KEY_PREFIX

app = build_app()
CLEAN_ENV: dict[str, str | None] = {"ONCEONLY_DB_URL": None, "COLUMNS": "250"}


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=CLEAN_ENV)


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'server.db'}"
    made = run("keys", "create", "--tenant", "acme", "--url", url, "--json")
    assert made.exit_code == 0, made.output
    created = json.loads(made.stdout)
    assert created["tenant"] == "acme" and created["key"].startswith(KEY_PREFIX)

    listed = run("keys", "list", "--url", url, "--json")
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert row["tenant"] == "acme" and created["key"] not in listed.stdout

    table = run("keys", "list", "--url", url)
    assert table.exit_code == 0 and "API keys" in table.output and row["id"] in table.output
    assert created["key"] not in table.output

    nobody = run("keys", "list", "--url", url, "--tenant", "nobody", "--json")
    assert nobody.exit_code == 1 and json.loads(nobody.stdout) == []

    gone = run("keys", "revoke", row["id"], "--url", url, "--json")
    assert gone.exit_code == 0 and json.loads(gone.stdout) == {"id": row["id"], "revoked": True}
    again = run("keys", "revoke", "key_nope", "--url", url)
    assert again.exit_code == 1 and "no active key 'key_nope'" in again.output

    # The old spelling still works: a hidden alias of the same command.
    old = run("server", "list-keys", "--url", url, "--json")
    assert old.exit_code == 0 and json.loads(old.stdout)[0]["id"] == row["id"]
