"""The store contract (onceonly_core/stores/base.py), the same on every backend.

The suite itself is the public kit, :class:`onceonly_core.testing.StoreContract`; this module
is one of its users, as a custom store's test module would be: memory, SQLite, PostgreSQL,
MariaDB and Redis (``store_url`` in tests/conftest.py) all pass the same tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pytest

from onceonly_core import MemoryStore, open_store
from onceonly_core.stores import Store
from onceonly_core.testing import StoreContract


class TestStoreContract(StoreContract):
    @pytest.fixture
    def store(self, store_url: str) -> Iterator[Store]:
        s: Store = (
            MemoryStore() if store_url == "memory://" else open_store(store_url, auto_migrate=True)
        )
        yield s
        s.close()

    @pytest.fixture
    def store_factory(self, store_url: str) -> Callable[[], Store] | None:
        if store_url == "memory://":
            return None  # one process by construction
        return functools.partial(open_store, store_url, auto_migrate=True)
