"""Test kits for users of OnceOnly. Imported only by tests: nothing here is loaded by
``import onceonly_core``, and pytest stays an optional dependency.

``StoreContract`` (in :mod:`onceonly_core.testing.store_contract`, which imports pytest) is
the store contract suite: every primitive, fencing, the store's clock, ttl, and claims
raced by threads and by processes. Subclass it in a test module and give it your store::

    import functools
    import pytest
    from onceonly_core.testing import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self):
            s = MyStore("...")
            yield s
            s.close()

        @pytest.fixture
        def store_factory(self):  # optional: enables the cross-process races
            return functools.partial(MyStore, "...")

``GovernanceContract`` (:mod:`onceonly_core.testing.governance_contract`) does the same for
a ledger's ``governance_store()``: caps and holds under concurrency, settle/release/sweep at
most once, approvals used once, the audit chain. Give it a ``ledger`` fixture.

``scratch_database`` (:mod:`onceonly_core.testing.databases`) gives a test an empty
database of its own on a PostgreSQL or MySQL/MariaDB server, dropped afterwards.

See docs/custom-store.md. ``MemoryStore`` (``onceonly_core.MemoryStore``) is the in-process
test double for code that uses a Guard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .governance_contract import GovernanceContract
    from .store_contract import StoreContract

__all__ = ["GovernanceContract", "StoreContract"]

_KITS = {
    "StoreContract": "store_contract",
    "GovernanceContract": "governance_contract",
}


def __getattr__(name: str) -> Any:
    if name in _KITS:  # imports pytest only when the kit is used
        import importlib

        try:
            module = importlib.import_module(f".{_KITS[name]}", __name__)
        except ImportError as err:
            if err.name != "pytest":
                raise
            raise ImportError(
                f"onceonly_core.testing.{name} is a pytest class: pip install pytest",
                name="pytest",
            ) from err
        return getattr(module, name)
    raise AttributeError(name)
