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

See docs/custom-store.md. ``MemoryStore`` (``onceonly_core.MemoryStore``) is the in-process
test double for code that uses a Guard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store_contract import StoreContract

__all__ = ["StoreContract"]


def __getattr__(name: str) -> Any:
    if name == "StoreContract":  # imports pytest only when the kit is used
        from .store_contract import StoreContract

        return StoreContract
    raise AttributeError(name)
