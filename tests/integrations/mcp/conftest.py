"""Fixtures for the MCP guard (tests/_mcp_rig.py has the rig)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mcp", reason="the mcp extra is not installed")

from _mcp_rig import Rig


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


@pytest.fixture
def db_rig(tmp_path: Path, db_url: str, namespace: str) -> Iterator[Rig]:
    """The rig on every SQL ledger (SQLite, PostgreSQL, MariaDB), in its own namespace."""
    r = Rig(tmp_path, db_url, namespace)
    yield r
    r.close()
