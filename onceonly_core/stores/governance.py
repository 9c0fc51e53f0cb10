"""The governance store seam: what a backend must provide for policies, budgets,
approvals and the audit log (DESIGN §5).

A ledger :class:`~onceonly_core.stores.base.Store` offers governance through its
``governance_store()`` hook, which returns a :class:`GovernanceStore`. The SQL and
memory ledgers return :class:`~onceonly_core.stores.govsql.GovStore`; a custom
ledger (Redis, ...) implements this ABC, or leaves the hook alone and gets a
:class:`~onceonly_core.errors.ConfigError` the first time governance is used.

Rows are plain dicts keyed by the column names of ``stores/schema.py`` (the server,
the dashboard and the CLI read them). Times are float seconds from the store's clock.
Amounts are integer micro-dollars (or plain counts). Every primitive states what must
be atomic: a backend that cannot give that atomicity cannot enforce the caps.

The spend rule every backend keeps: *spend of a call that may have executed stays
counted until it is shown not to have executed*. So a hold is given back only by
:meth:`GovernanceStore.release` (the caller showed the tool did not run); a hold whose
lease expired is swept *as spent*, with an audit row saying the outcome is unknown.
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, runtime_checkable

# The ledger's types (stores.base), typed Any here: stores.base already names this
# module (Store.governance_store), and the modules of stores form no cycle.
Store: TypeAlias = Any
NewClaim: TypeAlias = Any
Record: TypeAlias = Any
__all__ = [
    "GENESIS",
    "Decide",
    "DecideClaim",
    "GovernanceStore",
    "OutboxStore",
    "Reservation",
    "Want",
    "audit_fields",
    "chain_hash",
    "completed_by",
]

#: The previous hash of an agent's first audit row.
GENESIS = "0" * 64


@dataclass(frozen=True, slots=True)
class Want:
    """One amount a call needs from one counter window; ``cap`` None: count only."""

    metric: str
    window: int
    amount: int
    cap: int | None
    reason: str
    #: the window's length in seconds (0: not said); a store may use it to lock the
    #: next call's counters early (the PostgreSQL store does)
    span: int = 0


@dataclass(frozen=True, slots=True)
class Reservation:
    ok: bool
    id: str | None
    failed: Want | None
    used: int = 0
    now: float = 0.0
    #: Every counter involved, after this reservation (what a threshold check needs).
    after: dict[tuple[str, int], int] = field(default_factory=dict)


#: What :meth:`GovernanceStore.begin` asks of the caller once it has the snapshot: the
#: amounts to reserve and the audit entry a sweep writes if the hold never settles, or
#: None to reserve nothing. Pure (no I/O): a store may call it inside its transaction,
#: and again if it reruns that transaction.
Decide = Callable[[dict[str, Any]], tuple[Sequence[Want], dict[str, Any] | None] | None]

#: What :meth:`GovernanceStore.begin_claim` asks of the caller once it has the snapshot
#: and the ledger record the claim found (``mine``: claimed now; None: no record, a store
#: that only read it): whether the call goes ahead (False: the claim must not survive,
#: e.g. a blocked call or one that needs an approval first) and, as for :data:`Decide`,
#: what to reserve. Pure, as Decide.
DecideClaim = Callable[
    [dict[str, Any], Any],
    tuple[bool, tuple[Sequence[Want], dict[str, Any] | None] | None],
]


# Built once: json.dumps with any non-default option builds a new JSONEncoder per call.
_CHAIN_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_body(fields: dict[str, Any]) -> str:
    """The row's canonical JSON, as :func:`chain_hash` hashes it (the PostgreSQL store
    sends it to the server to hash there: one serialization for both)."""
    return _CHAIN_JSON.encode(fields)


def chain_hash(prev: str, fields: dict[str, Any]) -> str:
    """sha256 over the previous hash and the row's canonical JSON."""
    return hashlib.sha256(f"{prev}\n{chain_body(fields)}".encode()).hexdigest()


def audit_fields(row: Any) -> dict[str, Any]:
    """The hashed part of an audit row (everything but id, prev_hash and hash).

    ``row`` has attribute access (a SQLAlchemy row, or any object with these names)."""
    return {
        "tenant": row.tenant,
        "agent_id": row.agent_id,
        "seq": int(row.seq),
        "tool": row.tool,
        "args_digest": row.args_digest,
        "args": row.args,
        "decision": row.decision,
        "reason": row.reason,
        "risk_level": row.risk_level,
        "spend_micros": int(row.spend_micros),
        "run_id": row.run_id,
        "token": None if row.token is None else int(row.token),
        "idem_key": row.idem_key,
        "created_at": float(row.created_at),
    }


#: ``audit_rows``' limit that reads every row (no store keeps more).
_EVERY_ROW = 2**62


def completed_by(rec: Record | None, token: int) -> bool:
    """A completion that matched no row was ours after all: an earlier attempt committed
    and lost only its reply (the record is succeeded with our token: no one else can
    write that)."""
    return rec is not None and rec.token == token and rec.state == "succeeded"


class GovernanceStore(abc.ABC):
    """Governance state of one ledger database, shared by every tenant in it.

    Subclass it to put governance on another backend. ``kind`` names the backend
    ("memory" makes the async driver call primitives inline instead of in a thread).
    """

    kind: str = "custom"

    # -- clock ------------------------------------------------------------------------
    @abc.abstractmethod
    def now(self) -> float:
        """The store's clock (the database server's where there is one): windows and
        leases are read from one clock shared by every process."""

    # -- agents, policies, kill switch --------------------------------------------------
    @abc.abstractmethod
    def snapshot(self, tenant: str, agent_id: str, tool: str) -> dict[str, Any]:
        """``{"now", "agent", "global", "tool"}``: the agent's row, the global switch row
        (agent ``"*"``), the tool's registration (an ``agent:<id>`` scope over
        ``global``), each None when absent. One consistent read, never cached: a kill
        switch flipped in another process stops the very next call."""

    @abc.abstractmethod
    def put_agent(
        self,
        tenant: str,
        agent_id: str,
        *,
        policy: Any = ...,
        disabled: bool | None = None,
        reason: str | None = None,
    ) -> None:
        """Create or update the agent's row (``...``/None: leave that field). Atomic
        per row: two writers never lose each other's other field."""

    @abc.abstractmethod
    def get_agent(self, tenant: str, agent_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def list_agents(self, tenant: str) -> list[dict[str, Any]]:
        """Every agent row of the tenant but the global switch, by agent id."""

    # -- budgets ------------------------------------------------------------------------
    def begin(
        self,
        tenant: str,
        agent_id: str,
        tool: str,
        namespace: str,
        key: str,
        decide: Decide,
        lease: float,
    ) -> tuple[dict[str, Any], Reservation | None]:
        """A governed call's first phase: :meth:`snapshot`, then ``decide(snapshot)``,
        then, unless it returned None, :meth:`reserve` of its wants (with its audit
        entry). Returns the snapshot and the reservation (None: nothing was reserved).

        This default runs the two primitives one after the other, which is correct: the
        reservation checks the caps atomically on its own, and a policy or switch change
        between the two reads is the same as one just after the call began. A store that
        can do both in one transaction (one round trip, one commit) overrides it; the SQL
        store does. ``decide`` may then be called more than once (a rerun)."""
        snap = self.snapshot(tenant, agent_id, tool)
        plan = decide(snap)
        if plan is None:
            return snap, None
        wants, audit = plan
        return snap, self.reserve(tenant, agent_id, namespace, key, wants, lease, audit)

    # -- a governed call in two transactions (issue 15) ---------------------------------
    def joins(self, ledger: Store) -> bool:
        """True when this store can run ``ledger``'s claim and completion inside its own
        transactions (:meth:`begin_claim`, :meth:`complete`): the same database. The
        engine then runs a governed call in two commits, as a plain call has; otherwise
        (this default) it keeps the ledger's primitives and this store's apart."""
        return False

    def begin_claim(
        self,
        tenant: str,
        agent_id: str,
        tool: str,
        ledger: Store,
        namespace: str,
        key: str,
        new: NewClaim,
        decide: DecideClaim,
        lease: float,
    ) -> tuple[dict[str, Any], Reservation | None, Record | None]:
        """:meth:`begin` with the ledger's claim of ``key`` in the same transaction:
        the snapshot, the claim (``ledger.claim``'s conditional insert, or the record
        that holds the key), ``decide(snapshot, record)``, the reservation. If the
        decision says no, or a cap refuses the reservation, nothing commits — the claim
        neither (a claim left by a refused call would make its retry an unknown outcome).
        Returns the snapshot, the reservation and the record the claim found (None:
        nothing was claimed here, the caller claims as usual).

        This default claims nothing: it reads the record, then runs :meth:`begin`."""
        found = ledger.get(namespace, key)

        def plan(snap: dict[str, Any]) -> tuple[Sequence[Want], dict[str, Any] | None] | None:
            return decide(snap, found)[1]

        snap, res = self.begin(tenant, agent_id, tool, namespace, key, plan, lease)
        return snap, res, None

    def complete(
        self,
        tenant: str,
        agent_id: str,
        rid: str | None,
        amounts: list[Any],
        ledger: Store,
        namespace: str,
        key: str,
        token: int,
        *,
        result: str | None,
        error: str | None,
        ttl: float | None,
        audit: dict[str, Any],
        lost: dict[str, Any],
    ) -> bool:
        """The tool ran: the ledger's fenced completion (``ledger.finish(ok=True)``)
        and :meth:`settle` of hold ``rid`` (None: the call reserved nothing, so only the
        audit row is appended), with ``audit`` — or, when the completion matched no record
        (the lease was lost to a take-over), with ``lost`` — in one transaction where the
        store can. Returns the completion's answer, as ``finish`` does. Safe to retry:
        the settle is idempotent (the hold gone: nothing written), a record already
        succeeded with ``token`` counts as completed, and without a hold a retry appends
        the audit row only if the call's row is not in yet.

        This default runs the primitives one after the other; a failed settle or append
        leaves the hold, counted as spent, for a sweep to audit (or, without a hold, an
        execution without its audit row, which :meth:`verify_audit`'s report shows)."""
        fresh: bool = ledger.finish(
            namespace, key, token, ok=True, result=result, error=error, ttl=ttl
        )
        done = fresh or completed_by(ledger.get(namespace, key), token)
        entry = audit if done else lost
        try:
            if rid is not None:
                self.settle(tenant, agent_id, rid, amounts, entry)
            elif fresh:
                self.append_audit(tenant, entry)
            else:
                # Matched no row: a retry whose row may be in already, or a lost lease.
                self.append_audit_once(tenant, entry)
        except Exception:
            import logging

            logging.getLogger("onceonly.governance").exception(
                "recording the run of %r (hold %s) failed: a hold stays counted and a "
                "sweep audits it",
                key,
                rid,
            )
        return done

    def append_audit_once(self, tenant: str, entry: dict[str, Any]) -> None:
        """:meth:`append_audit`, unless the call's row is in already: a row of the same
        agent with the same key, token and decision (a retried completion whose first
        attempt committed and lost its reply). An entry without a token is appended.

        This default reads all of the agent's rows before appending (so it is exact
        however many rows came after; it runs only for a completion that matched no
        ledger row). A store that can look in the append's own transaction overrides
        it; the SQL store does."""
        token = entry.get("token")
        if token is not None:
            for r in self.audit_rows(tenant, agent_id=entry["agent_id"], limit=_EVERY_ROW):
                if (r.get("idem_key"), r.get("token"), r.get("decision")) == (
                    entry.get("idem_key"),
                    token,
                    entry["decision"],
                ):
                    return
        self.append_audit(tenant, entry)

    @abc.abstractmethod
    def reserve(
        self,
        tenant: str,
        agent_id: str,
        namespace: str,
        key: str,
        wants: Sequence[Want],
        lease: float,
        audit: dict[str, Any] | None = None,
    ) -> Reservation:
        """Check every cap and hold every amount, or hold nothing.

        Atomic: sweep the agent's expired holds (see :meth:`sweep`), then read every
        counter involved, check each ``want`` in order against counted + held amounts,
        and on success add every amount and insert one hold (lease ``lease`` seconds),
        all under one lock of those counters: two concurrent reservations never both
        pass a cap that only one fits. ``audit``: the audit entry to write if the hold
        is swept unresolved (decision rewritten to ``unknown``)."""

    @abc.abstractmethod
    def settle(
        self,
        tenant: str,
        agent_id: str,
        rid: str,
        amounts: list[Any],
        audit: dict[str, Any] | None = None,
    ) -> bool:
        """The tool ran: delete the hold, its amounts stay counted, and append ``audit``
        — all in one transaction. Idempotent: if the hold is gone (an earlier attempt
        committed and lost its reply, or a sweep settled it and wrote its audit row),
        nothing is written and False is returned. Safe to retry."""

    @abc.abstractmethod
    def release(
        self, tenant: str, agent_id: str, rid: str, audit: dict[str, Any] | None = None
    ) -> bool:
        """The tool is shown not to have run: delete the hold, give its amounts back,
        and append ``audit``, in one transaction, at most once (False if the hold is
        gone: a sweep counted it as spent and audited it, and that stands)."""

    @abc.abstractmethod
    def extend(self, rid: str, lease: float) -> bool:
        """Move the hold's lease to now + ``lease`` (False if it is gone)."""

    def extend_hold(self, tenant: str, agent_id: str, rid: str, lease: float) -> bool:
        """:meth:`extend` for a hold whose tenant and agent the caller knows (the
        heartbeat of the call that reserved it): a store keyed by them finds the hold
        without a scan (the SQL stores, since revision 0005). A hold of another tenant
        or agent is not extended (False). The default calls :meth:`extend`."""
        return self.extend(rid, lease)

    @abc.abstractmethod
    def sweep(self, tenant: str, agent_id: str | None = None) -> int:
        """Settle every hold whose lease expired *as spent* (the tool may have run),
        appending its stored audit entry with decision ``unknown``; returns how many.
        Atomic per hold: the delete and its audit row commit together."""

    @abc.abstractmethod
    def pending_holds(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Holds not yet settled or released (``expired`` says whether the lease ran
        out): calls whose outcome is not audited yet. Their spend is counted."""

    @abc.abstractmethod
    def counter(self, tenant: str, agent_id: str, metric: str, window: int) -> int: ...

    @abc.abstractmethod
    def holds(self, tenant: str, agent_id: str) -> int:
        """How many holds the agent has (live or expired)."""

    # -- approvals ----------------------------------------------------------------------
    @abc.abstractmethod
    def approval_for(
        self,
        tenant: str,
        agent_id: str,
        tool: str,
        namespace: str,
        key: str,
        args: str,
        in_flight_for: float = 0.0,
    ) -> dict[str, Any]:
        """The open approval request of this call, created pending if there is none.

        Atomic: concurrent asks of one call share one request. A ``consumed`` request
        is closed forever: the next ask opens a new pending one. An ``approved``
        request is *taken* here (approved → consumed in the same transaction) and
        returned with ``state == "approved"``: exactly one caller gets to run on it;
        give it back with :meth:`restore_approval` if the tool then did not run. A
        request consumed less than ``in_flight_for`` seconds ago is returned as it is
        (``state == "consumed"``): its execution may not have reached the ledger yet,
        and the caller waits for it instead of opening a new request."""

    @abc.abstractmethod
    def restore_approval(self, tenant: str, approval_id: str) -> bool:
        """consumed → approved, for a call that took the approval but was shown not to
        have run (a replay, a refusal, the tool's own exception)."""

    @abc.abstractmethod
    def decide_approval(
        self, tenant: str, approval_id: str, state: str, by: str | None, reason: str | None
    ) -> dict[str, Any] | None:
        """pending → ``state`` (approved | denied), only from pending: a decision is final.
        Returns the row as it is after the attempt, plus ``"changed"``: whether this
        call made the decision (None: no such request). Atomic: a conditional update."""

    @abc.abstractmethod
    def consume_approval(self, tenant: str, approval_id: str) -> None:
        """approved → consumed (no-op in any other state)."""

    @abc.abstractmethod
    def list_approvals(self, tenant: str, state: str | None = None) -> list[dict[str, Any]]:
        """The tenant's requests, oldest first (``state`` filters)."""

    # -- audit --------------------------------------------------------------------------
    @abc.abstractmethod
    def append_audit(self, tenant: str, entry: dict[str, Any]) -> tuple[int, str]:
        """Append one row to the agent's hash chain; returns (seq, hash).

        Atomic: lock the agent's chain head, insert the row hashed (:func:`chain_hash`)
        over the previous hash, move the head. One chain per agent."""

    @abc.abstractmethod
    def audit_rows(
        self,
        tenant: str,
        *,
        agent_id: str | None = None,
        since: float | None = None,
        limit: int = 100,
        newest_first: bool = True,
    ) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def audited_calls(self, tenant: str) -> dict[str, set[int | None]]:
        """Every idempotency key the tenant's audit log mentions, with the tokens of its
        rows that record a run (decision executed or unknown). What
        ``audit verify`` cross-checks the ledger's executions against."""

    @abc.abstractmethod
    def verify_audit(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Walk every chain (of ``tenant``, or all); one problem per broken chain:
        ``{"tenant", "agent_id", "seq", "id", "problem"}``."""

    @abc.abstractmethod
    def chain_count(self, tenant: str | None = None) -> int:
        """How many chains (agents with an audit head) there are."""

    @abc.abstractmethod
    def purge_audit(self, tenant: str, before: float) -> int:
        """Delete rows older than ``before``, moving each chain's base so it keeps
        verifying from the cut. Atomic per tenant."""

    @abc.abstractmethod
    def metrics(self, tenant: str, agent_id: str, since: float) -> dict[str, Any]:
        """``{"by_decision": {decision: count}, "spend_micros", "top_tools"}`` from the
        audit rows since ``since``."""

    # -- timeline -----------------------------------------------------------------------
    @abc.abstractmethod
    def post_event(self, tenant: str, event: dict[str, Any]) -> int:
        """Append a timeline event; returns its id (increasing per store)."""

    @abc.abstractmethod
    def timeline(
        self, tenant: str, run_id: str, limit: int, offset: int
    ) -> list[dict[str, Any]]: ...

    # -- tools registry -----------------------------------------------------------------
    @abc.abstractmethod
    def put_tool(self, tenant: str, values: dict[str, Any]) -> None:
        """Create or replace one (scope_id, name) registration."""

    @abc.abstractmethod
    def get_tools(
        self, tenant: str, name: str | None = None, scope_id: str | None = None
    ) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def set_tool_enabled(self, tenant: str, name: str, scope_id: str, enabled: bool) -> bool: ...

    @abc.abstractmethod
    def delete_tool(self, tenant: str, name: str, scope_id: str) -> bool: ...

    # -- webhooks -----------------------------------------------------------------------
    @abc.abstractmethod
    def add_webhook(self, tenant: str, values: dict[str, Any]) -> str: ...

    @abc.abstractmethod
    def list_webhooks(self, tenant: str) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def delete_webhook(self, tenant: str, webhook_id: str) -> bool: ...

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""


# -- notifications: the outbox seam ------------------------------------------------------
@runtime_checkable
class OutboxStore(Protocol):
    """What a governance store implements to deliver notifications (``outbox = True``):
    the engine writes rows through it, the deliverer
    (:class:`~onceonly_core.governance.outbox.Deliverer`) drains them through it.

    A decision's notification rides on its audit entry (``entry["notify"]``, the event)
    and must be written *atomically with that audit row* by ``append_audit`` / ``settle``
    / ``release``: one row per destination, the decision and its notification commit
    together or not at all. ``tenant=None``: every tenant of the store. Times are
    seconds on the store's clock; ``delay`` is counted from it.
    """

    outbox: bool

    def enqueue_notification(self, tenant: str, event: dict[str, Any]) -> int:
        """Write the rows of an event not tied to an audit row (run_failed,
        budget_threshold) in one atomic step; returns how many."""

    def outbox_claim(self, tenant: str | None, limit: int, lease: float) -> list[dict[str, Any]]:
        """Claim up to ``limit`` due pending rows: each gets a fresh ``lease_token``, one
        more attempt, and ``next_attempt_at = now + lease``, atomically per row, so of two
        racing deliverers exactly one claims a row. Rows: id, tenant, event_id,
        event_type, payload, destination, attempts (counted), lease_token."""

    def outbox_mark(
        self, tenant: str, row_id: str, token: str, state: str, delay: float, error: str | None
    ) -> bool:
        """Only while ``token`` still holds the row: ``delivered`` (delivered_at now), or
        ``pending`` / ``dead`` with ``last_error`` and ``next_attempt_at = now + delay``;
        the lease is dropped. False: the lease was lost (another deliverer has it)."""

    def outbox_pending(self, tenant: str | None) -> tuple[int, float | None]:
        """(rows pending, seconds until the earliest is due, None if none)."""

    def outbox_list(
        self, tenant: str | None, state: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Rows (every column of ``onceonly_outbox``; ``payload`` the stored JSON text),
        newest first."""

    def outbox_retry(self, tenant: str | None, row_id: str) -> bool:
        """A dead or pending row: pending, attempts 0, due in a second, lease dropped.
        False if unknown or delivered."""

    def outbox_webhook(self, tenant: str, webhook_id: str) -> dict[str, Any] | None:
        """The stored webhook's ``url``, ``secret`` and ``enabled``, or None."""


#: Plans a notification's outbox rows: ``(tenant, event, webhooks)`` -> one row per
#: destination that wants it (``id``, ``event_id``, ``event_type``, ``payload``,
#: ``destination``; ``webhooks`` are the tenant's stored rows). For a store that computes
#: its rows before its atomic write (Redis). Installed by
#: :mod:`onceonly_core.governance.outbox` when it is imported (the engine imports it before
#: it builds a notification): the stores never import governance.
NotificationPlanner = Callable[
    [str, Mapping[str, Any], Sequence[Mapping[str, Any]]], list[dict[str, Any]]
]
notification_planner: NotificationPlanner | None = None


def plan_notification(
    tenant: str, event: Mapping[str, Any], webhooks: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The rows :data:`notification_planner` gives for ``event``."""
    if notification_planner is None:  # pragma: no cover - the engine imports the outbox first
        raise RuntimeError("onceonly_core.governance.outbox was not imported")
    return notification_planner(tenant, event, webhooks)
