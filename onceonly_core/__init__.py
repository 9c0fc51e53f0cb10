"""OnceOnly Core: run each side-effecting agent tool call at most once per key.

>>> from onceonly_core import guard
>>> guard(charge_card, "cus_42", 500)      # runs
>>> guard(charge_card, "cus_42", 500)      # replays the stored result

See README.md for the guarantees and the crash matrix.
"""

from __future__ import annotations

from .codec import Codec
from .contract import Classification, classify
from .errors import (
    ApprovalPending,
    CachedFailure,
    CodecError,
    CompletionNotRecorded,
    ConfigError,
    FingerprintError,
    InProgress,
    KeyReuseError,
    LeaseLost,
    MissingExtraError,
    OnceOnlyError,
    PolicyBlocked,
    RemoteToolError,
    ResultNotStored,
    SchemaError,
    SignatureError,
    StoreError,
    UnknownOutcome,
)
from .guard import BLOCKED, GLOBAL, Guard, Stats, current_call, current_run_id, guard
from .protocol import NOT_DONE, CallContext, Options, Outcome
from .stores import MemoryStore, Record, Store, open_store

__version__ = "0.1.0"

__all__ = [
    "BLOCKED",
    "GLOBAL",
    "NOT_DONE",
    "ApprovalPending",
    "CachedFailure",
    "CallContext",
    "Classification",
    "Codec",
    "CodecError",
    "CompletionNotRecorded",
    "ConfigError",
    "FingerprintError",
    "Guard",
    "InProgress",
    "KeyReuseError",
    "LeaseLost",
    "MemoryStore",
    "MissingExtraError",
    "OnceOnlyError",
    "Options",
    "Outcome",
    "PolicyBlocked",
    "Record",
    "RemoteToolError",
    "ResultNotStored",
    "SchemaError",
    "SignatureError",
    "Stats",
    "Store",
    "StoreError",
    "UnknownOutcome",
    "classify",
    "current_call",
    "current_run_id",
    "guard",
    "open_store",
]
