"""schemathesis against the published OpenAPI schema: no 5xx, no schema violations.

Every phase (examples, coverage, fuzzing, and the stateful phase that follows the schema's
OpenAPI links: lease → extend/complete/fail/cancel/status/result, tool → get/toggle/delete,
event → run timeline, policy → agent), positive and negative data, NUL characters
allowed, on SQLite, PostgreSQL and MariaDB. A 5xx is a double execution for the client
(it fails open), so ``not_a_server_error`` is the check that matters most.

Skipped unless schemathesis is installed (the ``server-test`` dependency group)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Running = Any  # tests/server/conftest.py: Running


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(importlib.util.find_spec("schemathesis") is None, reason="no schemathesis")
def test_schemathesis_finds_no_server_errors(
    db_url: str, make_server: Callable[..., Running], tmp_path: Path
) -> None:
    srv = make_server(db_url, migrate=True)
    tenant = f"fuzz-{os.urandom(4).hex()}"
    key = srv.key(tenant)
    srv.cp.register_tool(tenant, "echo", lambda **kw: kw)
    checks = "not_a_server_error,response_schema_conformance,status_code_conformance"
    exe = Path(sys.executable).with_name("schemathesis")
    res = subprocess.run(
        [
            str(exe),
            "run",
            srv.base_url + "/openapi.json",
            "-H",
            f"Authorization: Bearer {key}",
            "-n",
            os.environ.get("ONCEONLY_SCHEMATHESIS_EXAMPLES", "10"),
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--mode",
            "all",
            "--generation-allow-x00",
            "true",
            "--seed",
            os.environ.get("ONCEONLY_SCHEMATHESIS_SEED", "13"),
            "-c",
            checks + ",content_type_conformance",
        ],
        capture_output=True,
        text=True,
        timeout=560,
        cwd=tmp_path,  # schemathesis writes a .schemathesis/ cache here
    )
    assert res.returncode == 0, res.stdout[-6000:]
    assert "✅ Stateful" in res.stdout, res.stdout[-3000:]  # the links were followed
