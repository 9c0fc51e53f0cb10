"""The governance store seam, kept importable here: it lives beside ``Store`` in
:mod:`onceonly_core.stores.governance` (a ledger's ``governance_store()`` returns one,
and the stores sit below governance, so they never import this package)."""

from ..stores.governance import (
    GENESIS,
    GovernanceStore,
    Reservation,
    Want,
    audit_fields,
    chain_hash,
)

__all__ = ["GENESIS", "GovernanceStore", "Reservation", "Want", "audit_fields", "chain_hash"]
