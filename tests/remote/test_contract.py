"""Remote mode keeps the store contracts: the public kits, run against a live
``onceonly serve`` on PostgreSQL through :class:`~onceonly_core.stores.remote.RemoteStore`.

One API key is one tenant: the governance kit's ``tenant`` is the key's, and the server
puts every primitive in it whatever the body says (tests/remote/test_remote.py proves the
isolation)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from onceonly_core.stores import Store
from onceonly_core.stores.remote import RemoteStore
from onceonly_core.testing import GovernanceContract, StoreContract


class TestRemoteStoreContract(StoreContract):
    @pytest.fixture
    def store(self, remote: Any) -> Iterator[Store]:
        s = RemoteStore(remote.root, api_key=remote.key)
        yield s
        s.close()

    @pytest.fixture
    def store_factory(self, remote: Any) -> Callable[[], Store] | None:
        return functools.partial(RemoteStore, remote.root, api_key=remote.key)


class TestRemoteGovernanceContract(GovernanceContract):
    purges_audit = False  # an agent's key cannot delete audit rows; the server's operator can
    one_tenant = True  # the key's; tests/remote/test_remote.py proves the binding

    @pytest.fixture
    def tenant(self, remote: Any) -> str:
        return str(remote.name)

    @pytest.fixture
    def ledger(self, remote: Any) -> Iterator[Store]:
        s = RemoteStore(remote.root, api_key=remote.key)
        yield s
        s.close()
