"""The governance store contract kit (:class:`onceonly_core.testing.GovernanceContract`) on
every ledger that ships one: memory, SQLite, PostgreSQL, MariaDB and Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from onceonly_core.stores import Store, open_store
from onceonly_core.testing import GovernanceContract


class TestGovernanceContract(GovernanceContract):
    @pytest.fixture
    def ledger(self, store_url: str) -> Iterator[Store]:
        store = open_store(store_url)
        migrate = getattr(store, "migrate", None)
        if store_url.startswith(("postgresql", "mysql")) and migrate is not None:
            migrate()
        yield store
        store.close()
