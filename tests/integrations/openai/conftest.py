"""Fixtures for the OpenAI integration: a real SQLite ledger per test, scripted servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from onceonly_core import Guard

# The Agents SDK exports traces to OpenAI by default; tests are offline.
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")


@pytest.fixture
def guard(tmp_path: Path) -> Iterator[Guard]:
    g = Guard(f"sqlite:///{tmp_path / 'ledger.db'}", quiet=True)
    yield g
    g.close()
