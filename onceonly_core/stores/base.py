"""The store contract: a handful of primitives, each one atomic on its own.

Everything else — deciding whether to replay, wait, take over or run; heartbeats;
hooks — lives above, in :mod:`onceonly_core.protocol`. A store never holds a lock or a
transaction across a tool's execution.

Primitives (each a single conditional write or a single read):

``claim``      insert a ``running`` record if the key is absent; else return the record
``take_over``  compare-and-set on (token, state): ``token + 1``, state ``running``
``finish``     fenced completion: only the holder of the current token may write
``heartbeat``  fenced lease extension (``lease=0`` releases the lease at once)
``clear``      mark a record ``cleared`` unless it is running with a live lease
``get``        read one record (with the store's clock reading)

Times are float seconds since the epoch from one clock: the database server's for
PostgreSQL and MySQL, the host's for SQLite and memory (one host by construction).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from ..errors import WouldBlock  # re-exported: a store's run_nowait raises it

if TYPE_CHECKING:
    from .governance import GovernanceStore

__all__ = [
    "CLEARED",
    "FAILED",
    "RUNNING",
    "STATES",
    "SUCCEEDED",
    "NewClaim",
    "Record",
    "Store",
    "WouldBlock",
]

_T = TypeVar("_T")

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CLEARED = "cleared"
STATES = (RUNNING, SUCCEEDED, FAILED, CLEARED)

MAX_KEY = 255
MAX_NAMESPACE = 255
MAX_LABEL = 255


#: Record's stored fields, in order (see :meth:`Record.stored`).
Stored = tuple[
    str, str, str, str, int, "str | None", int, int, "float | None", "float | None",
    "str | None", "str | None", "str | None", "str | None", "str | None", float, float,
]  # fmt: skip


@dataclass(slots=True)
class Record:
    """One ledger row, as read at store clock time ``now``."""

    namespace: str
    key: str
    tool: str
    state: str
    token: int
    owner: str | None
    attempt: int
    executions: int
    lease_until: float | None
    expires_at: float | None
    args_digest: str | None
    result: str | None
    error: str | None
    run_id: str | None
    caller: str | None
    created_at: float
    updated_at: float
    now: float = 0.0
    mine: bool = field(default=False, compare=False)

    def stored(self) -> Stored:
        """Every stored field, in order (not the clock reading, not ``mine``)."""
        return (
            self.namespace,
            self.key,
            self.tool,
            self.state,
            self.token,
            self.owner,
            self.attempt,
            self.executions,
            self.lease_until,
            self.expires_at,
            self.args_digest,
            self.result,
            self.error,
            self.run_id,
            self.caller,
            self.created_at,
            self.updated_at,
        )

    @property
    def lease_live(self) -> bool:
        # ">=": the same boundary as take_over and clear (a lease is taken only once
        # lease_until < now), else a reader at lease_until == now spins between the two.
        return (
            self.state == RUNNING and self.lease_until is not None and self.lease_until >= self.now
        )


@dataclass(slots=True)
class NewClaim:
    """What a caller writes when it claims or takes over a key. Treat it as read-only.

    Not ``frozen``: a frozen dataclass sets each field through ``object.__setattr__``,
    ~0.7 µs per construction here, and one is built on every guarded call."""

    tool: str
    owner: str
    lease: float
    args_digest: str | None = None
    run_id: str | None = None
    caller: str | None = None
    #: A hint, never a rule: the caller has not seen this key completed lately (a
    #: guard's first call of it). A store whose claim reads before it writes (SQLite)
    #: then writes first, which saves the read on a new key; a key completed elsewhere
    #: costs it an insert attempt and then the read. Every answer stays the same.
    first_sight: bool = False


class Store(abc.ABC):
    """Base class of every store. Subclass it to add a backend; see the module docstring."""

    #: True when primitives may block (network, disk locks): async callers then run
    #: them in a worker thread instead of on the event loop.
    blocking: bool = True

    #: True when :meth:`run_nowait` usually runs a primitive at once although the store
    #: is ``blocking`` (SQLite WAL NORMAL: a local write without fsync, ~100 us, unless
    #: another connection holds the write lock). Async callers then try it on the event
    #: loop first, which saves a worker-thread hop per primitive.
    nowait: bool = False

    #: The backend's name: ``memory``, ``sqlite``, ``postgresql``, ``mysql``, ``redis``.
    kind: str = "custom"

    #: True when :meth:`claim` of a held key costs more than :meth:`get` (PostgreSQL's
    #: claim is an insert attempt and a read, MySQL's an insert that fails and a read;
    #: SQLite's takes the write lock, or reads first when not told otherwise): a guard
    #: then reads first for the keys it has itself seen completed, so that a retry's
    #: replay is one read, and claims the others with ``NewClaim.first_sight``. Others
    #: claim first (the memory and Redis stores answer both in one step).
    read_before_claim: bool = False

    #: The longest namespace this store holds (remote mode's is shorter: the server puts
    #: the tenant in front of it).
    max_namespace: int = MAX_NAMESPACE

    @abc.abstractmethod
    def get(self, namespace: str, key: str) -> Record | None: ...

    @abc.abstractmethod
    def claim(self, namespace: str, key: str, new: NewClaim) -> Record:
        """Insert a running record with token 1 unless the key exists (``mine=True``),
        or return the existing record (``mine=False``)."""

    @abc.abstractmethod
    def take_over(
        self, namespace: str, key: str, seen: Record, new: NewClaim, *, force: bool = False
    ) -> Record | None:
        """Take ``seen`` over if it is unchanged (same token and state; for a running
        record, its lease has expired). ``force`` only requires the same token.
        Returns the new record (token + 1, ``mine=True``) or None if another caller won."""

    @abc.abstractmethod
    def finish(
        self,
        namespace: str,
        key: str,
        token: int,
        *,
        ok: bool,
        result: str | None = None,
        error: str | None = None,
        ttl: float | None = None,
    ) -> bool:
        """Record the outcome iff ``token`` is current and the record is running."""

    @abc.abstractmethod
    def heartbeat(self, namespace: str, key: str, token: int, lease: float) -> bool:
        """Extend the lease to now + ``lease`` iff ``token`` is current and running."""

    @abc.abstractmethod
    def clear(self, namespace: str, key: str) -> bool | None:
        """Mark cleared so the next call runs again. True: cleared; False: refused
        (running with a live lease); None: no such record."""

    def run_nowait(self, fn: Callable[[Store], _T]) -> _T:
        """``fn(self)`` (one primitive) where it cannot wait: if it would wait for a lock
        held elsewhere, raise :class:`WouldBlock` having written nothing, so that the
        caller may run it again where waiting is allowed (a worker thread)."""
        if self.blocking:
            raise WouldBlock
        return fn(self)

    # -- reading for operators (not on the hot path) -----------------------------------
    @abc.abstractmethod
    def list(
        self,
        *,
        namespace: str | None = None,
        prefix: bool = False,
        state: str | None = None,
        tool: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Record]:
        """Records newest-updated first; ``prefix`` matches namespaces that start with
        ``namespace`` (a workflow under a tenant is ``tenant/workflow``)."""

    @abc.abstractmethod
    def clear_namespace(self, namespace: str) -> int:
        """Clear every record of a namespace that is not running with a live lease."""

    # -- retention (operators; not on the hot path) -----------------------------------
    def purge_expired(self, namespace: str | None, before: float, limit: int = 1000) -> int:
        """Delete at most ``limit`` expired records (of ``namespace``, or of every
        namespace); return how many. Call it again until it returns less than ``limit``.

        Expired: ``succeeded`` with ``expires_at <= before`` (its ttl has elapsed, so the
        protocol would run the key again anyway) and token 1. A record taken over at
        least once (token > 1) is kept: deleting it would hand token 1 again to the next
        claim, and an owner paused since before the take-over still holds a lower token
        that must stay fenced out. A running record is never deleted.

        Stores without it raise :class:`~onceonly_core.errors.ConfigError`."""
        from ..errors import ConfigError

        raise ConfigError(f"{type(self).__name__} cannot delete expired records")

    def iter_all(self, namespace: str | None = None, batch: int = 1000) -> Iterator[Record]:
        yield from self.list(namespace=namespace, prefix=True, limit=10**9)

    def now(self) -> float:
        """The store's clock."""
        import time

        return time.time()

    def governance_store(self) -> GovernanceStore:
        """The governance store over this ledger (policies, budgets, approvals, audit).

        Override it to give a custom ledger governance: return an implementation of
        :class:`onceonly_core.governance.base.GovernanceStore`. Left alone, using
        governance with this store (an agent id, ``guard.gov``) raises ConfigError
        before any call runs."""
        from ..errors import ConfigError

        raise ConfigError(
            f"{type(self).__name__} provides no governance: implement "
            "governance_store() returning a onceonly_core.governance.base.GovernanceStore"
        )

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_labels(namespace: str, key: str) -> None:
    if (
        0 < len(key) <= MAX_KEY
        and 0 < len(namespace) <= MAX_NAMESPACE
        and key.isascii()
        and "\x00" not in key
        and "\x00" not in namespace
    ):
        return  # the hot path: no import, one comparison chain each
    from ..errors import ConfigError
    from ..limits import check_text

    if not key or len(key) > MAX_KEY:
        raise ConfigError(f"a key must be 1..{MAX_KEY} characters, got {len(key)}")
    if not namespace or len(namespace) > MAX_NAMESPACE:
        raise ConfigError(f"a namespace must be 1..{MAX_NAMESPACE} characters")
    # PostgreSQL cannot hold NUL and no backend a lone surrogate: refuse on every backend
    # alike, before the claim, rather than fail on one of them at the write.
    check_text(key, "a key")
    check_text(namespace, "a namespace")


def summarize(records: Sequence[Record]) -> dict[str, int]:
    out = {s: 0 for s in STATES}
    for r in records:
        out[r.state] = out.get(r.state, 0) + 1
    return out
