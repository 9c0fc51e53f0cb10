"""The core's outcome contract in remote mode: every scenario of
``tests/core/test_contract.py`` that runs through a guard (its ``g`` fixture) runs here
again through ``Guard("http://…", api_key=…)`` against a live ``onceonly serve`` on
PostgreSQL, and must give the same code, reason, fields and model text."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pytest

import core.test_contract as embedded
from onceonly_core import Guard

# The scenarios themselves, unchanged: each one that takes the guard fixture `g`.
for _name, _test in vars(embedded).items():
    if _name.startswith("test_") and "g" in inspect.signature(_test).parameters:
        globals()[_name] = _test


@pytest.fixture
def g(remote: Any, namespace: str) -> Iterator[Guard]:
    guard = Guard(remote.root, api_key=remote.key, namespace=namespace, quiet=True)
    yield guard
    guard.close()
