"""schemathesis against the published OpenAPI schema: no 5xx, no schema violations.

Skipped unless schemathesis is installed (it is not a project dependency yet)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

Running = Any  # tests/server/conftest.py: Running


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(importlib.util.find_spec("schemathesis") is None, reason="no schemathesis")
def test_schemathesis_finds_no_server_errors(srv: Running, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("schemathesis")
    key = srv.key("fuzz")
    checks = "not_a_server_error,response_schema_conformance,status_code_conformance"
    res = subprocess.run(
        [
            str(exe),
            "run",
            srv.base_url + "/openapi.json",
            "-H",
            f"Authorization: Bearer {key}",
            "-n",
            os.environ.get("ONCEONLY_SCHEMATHESIS_EXAMPLES", "10"),
            "-c",
            checks + ",content_type_conformance",
        ],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=tmp_path,  # schemathesis writes a .schemathesis/ cache here
    )
    assert res.returncode == 0, res.stdout[-4000:]
