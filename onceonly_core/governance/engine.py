"""Governed execution (DESIGN §5), written once for sync and async.

:func:`evaluate` is pure: a policy snapshot in, a verdict out. :func:`governed` is a
generator that walks one call through the §5 order —

    kill switch (global, agent) → tool registered/enabled → blocked list → allowed list
    → approval → per-tool daily cap → actions/hour → spend/day → claim → execute → settle

— yielding what it needs done (a governance-store primitive, a ledger read, the guarded
execution itself), driven by :func:`drive_sync` or :func:`drive_async`.

Caps are fixed UTC windows (the hour, the day) read from the database clock: one counter
row per window enforces a cap with one locked read-modify-write, where a sliding window
would have to count event rows under a lock. The cost is the boundary burst: up to twice
a cap across two adjacent windows. Documented in ``docs/governance.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..egress import check_url
from ..errors import ConfigError, OnceOnlyError
from ..protocol import safe_str
from ..stores.governance import GovernanceStore, Want
from .models import (
    AgentMetrics,
    Approval,
    AuditEntry,
    Policy,
    TimelineEvent,
    ToolResult,
    ToolSpec,
    matches,
    micros,
)
from .templates import template

if TYPE_CHECKING:
    from ..protocol import CallContext, Finish, Outcome
    from ..stores.base import NewClaim, Record, Store

__all__ = ["Governance", "Verdict", "evaluate"]

log = logging.getLogger("onceonly.governance")

HOUR = 3600
DAY = 86400
PERIODS = {"hour": HOUR, "day": DAY, "week": 7 * DAY}


# -- pure decisions ----------------------------------------------------------------------
@dataclass(slots=True)
class Verdict:
    reason: str | None  # None: allowed so far
    risk: str
    policy: Policy | None
    spend: int = 0  # micro-dollars this call would spend
    approval: bool = False
    wants: list[Want] = field(default_factory=list)
    detail: str = ""


def evaluate(
    snap: Mapping[str, Any], agent_id: str, tool: str, spend_usd: float | None, *, by_name: bool
) -> Verdict:
    """The §5 checks up to the caps, and the counter amounts the caps need."""
    row = snap.get("agent")
    policy = _policy(row["policy"]) if row and row.get("policy") else None
    risk = policy.risk_for(tool) if policy else "low"
    glob = snap.get("global")
    if glob and glob["disabled"]:
        return Verdict("agent_disabled", risk, policy, detail=glob.get("disabled_reason") or "")
    if row and row["disabled"]:
        return Verdict("agent_disabled", risk, policy, detail=row.get("disabled_reason") or "")
    reg = snap.get("tool")
    if reg is None and by_name:
        return Verdict("tool_not_found", risk, policy)
    if reg is not None and not reg["enabled"]:
        return Verdict("tool_disabled", risk, policy)
    price = spend_usd
    if policy is not None:
        if matches(tool, policy.blocked_tools):
            return Verdict("tool_blocked", risk, policy)
        if policy.allowed_tools is not None and not matches(tool, policy.allowed_tools):
            return Verdict("tool_not_in_allowed_list", risk, policy)
        if price is None:
            price = policy.price_for(tool)
    try:
        spend = micros(price)
    except (TypeError, ValueError) as err:  # refused before anything is claimed
        raise ConfigError(f"{tool}: {err}") from None
    verdict = Verdict(None, risk, policy, spend=spend)
    if policy is None:
        return verdict  # no policy: nothing to count against
    verdict.approval = matches(tool, policy.require_approval)
    now = float(snap["now"])
    day, hour = int(now // DAY) * DAY, int(now // HOUR) * HOUR
    cap = policy.cap_for(tool)
    if cap is not None:
        verdict.wants.append(
            Want(_tool_metric(tool), day, 1, cap, "max_calls_per_tool_exceeded", DAY)
        )
    verdict.wants.append(
        Want("actions", hour, 1, policy.max_actions_per_hour, "max_actions_per_hour_exceeded", HOUR)
    )
    spend_cap = policy.max_spend_usd_per_day
    verdict.wants.append(
        Want(
            "spend",
            day,
            verdict.spend,
            None if spend_cap is None else _cap_micros(spend_cap),
            "daily_spend_exceeded",
            DAY,
        )
    )
    return verdict


_POLICIES: dict[str, Policy] = {}


def _policy(text: str) -> Policy:
    """The policy stored as ``text``, parsed once per process (validation costs tens of
    µs on every call). Keyed by the exact stored text, so a changed policy is parsed
    anew on the very next call; nothing here mutates a Policy."""
    policy = _POLICIES.get(text)
    if policy is None:
        policy = Policy.model_validate_json(text)
        if len(_POLICIES) >= 256:
            _POLICIES.clear()
        _POLICIES[text] = policy
    return policy


def _tool_metric(tool: str) -> str:
    # The counter key column holds 128 characters (MySQL caps a key at 3072 bytes).
    if len(tool) <= 120:
        return f"tool:{tool}"
    import hashlib

    return "tool:#" + hashlib.sha256(tool.encode()).hexdigest()[:40]


# -- ops yielded by governed() ------------------------------------------------------------
@dataclass(slots=True)
class G:
    """A governance-store primitive."""

    method: str
    args: tuple[Any, ...]
    quiet: bool = False  # bookkeeping after the effect: log a failure, never raise it
    urgent: bool = False  # after an interrupt: must run even if the task is cancelled again


@dataclass(slots=True)
class Peek:
    """Read the ledger record of this call (is it already a replay?)."""


@dataclass(slots=True)
class Nap:
    """Wait a moment (another caller's execution is on its way to the ledger)."""

    seconds: float


@dataclass(slots=True)
class Inner:
    """Run the guarded call (claim → execute → fenced completion)."""

    reservation: str | None
    #: The ledger record begin_claim's transaction claimed (the flow's first Claim).
    claimed: Record | None = None
    #: The completion that settles the hold in the same transaction (Finish.via).
    complete: Complete | None = None


@dataclass(slots=True)
class Complete:
    """A governed call's second transaction, as the flow's completion of an executed
    call (:attr:`Finish.via`): the ledger's fenced completion, the hold's settle (``rid``
    None: the call reserved nothing) and the audit row — ``audit``, or ``lost`` when the
    lease was lost — in one commit (:meth:`GovernanceStore.complete`). ``settled``: it
    returned, so the engine neither settles nor audits again."""

    store: GovernanceStore
    tenant: str
    agent_id: str
    rid: str | None
    amounts: list[list[Any]]
    audit: dict[str, Any]
    lost: dict[str, Any]
    settled: bool = False

    def __call__(self, ledger: Store, fin: Finish) -> bool:
        done = self.store.complete(
            self.tenant,
            self.agent_id,
            self.rid,
            self.amounts,
            ledger,
            fin.namespace,
            fin.key,
            fin.token,
            result=fin.result,
            error=fin.error,
            ttl=fin.ttl,
            # Both rows carry the run's token: a retried completion finds its row by it.
            audit={**self.audit, "token": fin.token},
            lost={**self.lost, "token": fin.token},
        )
        self.settled = True
        return done


@dataclass(slots=True)
class Request:
    """One governed call, prepared by the facade."""

    agent_id: str | None
    tool: str
    namespace: str
    key: str | None
    args_digest: str | None
    args_json: str
    spend_usd: float | None
    run_id: str | None
    lease: float
    by_name: bool
    would_replay: Callable[[Any], bool]
    #: What the ledger's claim writes (None: this call is not claimed by the engine's
    #: first transaction — unlimited, re-entrant, forced, or no key).
    claim: NewClaim | None = None


_QUIET_FAIL = object()

#: Our errors that mean the tool *did* run: its spend stays counted, its run is audited.
_RAN_ANYWAY = {"CompletionNotRecorded": "completion_not_recorded", "LeaseLost": "lease_lost"}


def governed(gov: Governance, req: Request) -> Generator[Any, Any, ToolResult]:
    tenant = gov.tenant
    base: dict[str, Any] = {"tool": req.tool, "agent_id": req.agent_id, "run_id": req.run_id}
    if req.run_id:
        yield G("post_event", (tenant, gov.event(req, "tool_call")), quiet=True)
    if req.agent_id is None:
        ran = yield Inner(None)
        if ran[0] == "raise":
            raise ran[1]
        result = _from_run(ran, base, req, "low", 0)
        yield from _record(gov, req, result, None)
        return result
    agent = req.agent_id
    peeked: Any = _UNSEEN
    ledger = gov.joined(req)
    if ledger is None and gov.capped.get((agent, req.tool)):
        # This agent's calls of this tool reserved budget last time: read the ledger
        # first (a replay spends nothing), so that the policy snapshot and the
        # reservation can share one transaction.
        peeked = yield Peek()
    seen: list[Verdict] = []

    def judge(snap: dict[str, Any], rec: Any) -> tuple[bool, tuple[list[Want], Any] | None]:
        """Whether the call goes ahead now, and what it reserves, given the ledger
        record (``_UNSEEN``: not read yet, reserve later)."""
        v = evaluate(snap, agent, req.tool, req.spend_usd, by_name=req.by_name)
        seen[:] = [v]
        if v.reason is not None or v.approval:
            return False, None  # blocked, or an approval comes first
        if not v.wants or rec is _UNSEEN:
            return True, None  # nothing to count (or not known yet)
        if rec is not None and req.would_replay(rec):
            return True, None  # a replay runs nothing and spends nothing
        return True, (v.wants, _audit_entry(req, None, v, "unknown", "lease_expired"))

    def decide(snap: dict[str, Any]) -> tuple[list[Want], dict[str, Any]] | None:
        return judge(snap, peeked)[1]

    claimed: Record | None = None
    # The policy snapshot (kill switch, registry, policy) and, when the verdict allows,
    # the reservation: one transaction where the store can (GovernanceStore.begin), with
    # the ledger's claim when the store shares the ledger's database (begin_claim).
    if ledger is not None:
        snap, res, claimed = yield G(
            "begin_claim",
            (
                tenant,
                agent,
                req.tool,
                ledger,
                req.namespace,
                req.key or "",
                req.claim,
                judge,
                req.lease,
            ),
        )
        if claimed is not None:
            peeked = claimed
    elif peeked is _UNSEEN:
        # No reservation expected: the snapshot alone (a read, no write lock).
        snap, res = (yield G("snapshot", (tenant, agent, req.tool))), None
    else:
        snap, res = yield G(
            "begin", (tenant, agent, req.tool, req.namespace, req.key or "", decide, req.lease)
        )
    v = seen[0] if seen else evaluate(snap, agent, req.tool, req.spend_usd, by_name=req.by_name)
    gov.note_capped(agent, req.tool, bool(v.wants))
    approval_id = None
    taken = False  # this call holds an approval (taken: approved → consumed)
    if v.reason is None and v.approval:
        if req.key is None:
            raise ConfigError(f"{req.tool}: a tool that needs approval cannot be unlimited")
        delay = 0.005
        while True:
            peeked = yield Peek()
            if peeked is not None and req.would_replay(peeked):
                break  # a replay runs nothing and needs no approval
            # Not yet in the ledger, or running: another caller may be executing this
            # call on the approval it just consumed. Wait for it (up to the lease) rather
            # than open a new request; anything else runs only on a fresh approval.
            flying = peeked is None or (peeked.state == "running" and peeked.lease_live)
            ap = yield G(
                "approval_for",
                (
                    tenant,
                    agent,
                    req.tool,
                    req.namespace,
                    req.key,
                    req.args_json,
                    req.lease if flying else 0.0,
                ),
            )
            if ap["state"] != "consumed":
                break
            yield Nap(delay)
            delay = min(delay * 2, 0.25)
        if peeked is None or not req.would_replay(peeked):
            approval_id = ap["id"]
            if ap["state"] == "pending":
                result = ToolResult(
                    ok=False,
                    allowed=False,
                    decision="pending_approval",
                    policy_reason="approval_required",
                    risk_level=v.risk,  # type: ignore[arg-type]
                    approval_id=approval_id,
                    key=req.key,
                    namespace=req.namespace,
                    **base,
                )
                yield from _record(gov, req, result, None)
                return result
            if ap["state"] == "denied":
                v.reason, v.detail = "approval_denied", ap.get("reason") or ""
            else:
                taken = True
    if v.reason is not None:
        result = _blocked(v, base, req, approval_id)
        yield from _record(gov, req, result, None)
        return result
    if res is None and v.wants:
        if peeked is _UNSEEN:
            peeked = yield Peek()
        if peeked is None or not req.would_replay(peeked):
            pending = _audit_entry(req, None, v, "unknown", "lease_expired")
            res = yield G(
                "reserve",
                (tenant, agent, req.namespace, req.key or "", v.wants, req.lease, pending),
            )
            assert res is not None
    if res is not None and not res.ok:
        assert res.failed is not None
        if taken:
            yield G("restore_approval", (tenant, approval_id), quiet=True)
        v.reason = res.failed.reason
        result = _blocked(v, base, req, approval_id)
        yield from _record(gov, req, result, None)
        return result
    rid = res.id if res is not None else None
    complete = None
    if claimed is not None:
        # The completion, the hold's settle (if any) and the audit row: one transaction
        # (the flow's).
        complete = Complete(
            gov.store,
            tenant,
            agent,
            rid,
            _amounts(v) if rid is not None else [],
            _audit_entry(req, None, v, "executed", "ok"),
            _audit_entry(req, None, v, "executed", "lease_lost"),
        )
    try:
        ran = yield Inner(rid, claimed, complete)
    except BaseException:
        # Interrupted (cancelled task, KeyboardInterrupt, SystemExit) with the tool
        # possibly run: settle the hold as spent and audit the unknown outcome at once,
        # instead of leaving the hold for the whole lease; the approval stays used.
        # The ledger's lease was expired already, so the next call applies on_unknown.
        entry = _audit_entry(req, None, v, "unknown", "interrupted")
        if rid is not None:
            amounts = _amounts(v)
            yield G("settle", (tenant, agent, rid, amounts, entry), quiet=True, urgent=True)
        else:
            yield G("append_audit", (tenant, entry), quiet=True, urgent=True)
        raise
    if ran[0] == "raise":
        err = ran[1]
        why = _RAN_ANYWAY.get(type(err).__name__)
        if why is not None:
            # The tool ran; only its ledger completion failed (CompletionNotRecorded)
            # or was refused (LeaseLost): keep the spend counted and audit the run.
            entry = _audit_entry(req, None, v, "executed", why)
            if complete is not None and complete.settled:
                pass  # the completion's transaction settled it (lease_lost) already
            elif rid is not None:
                yield G("settle", (tenant, agent, rid, _amounts(v), entry), quiet=True)
            else:
                yield G("append_audit", (tenant, entry), quiet=True)
            raise err
        # Our own error before the tool ran (the key is in progress elsewhere, reused
        # with other arguments, the ledger is down): give the reservation and the
        # approval back, then raise.
        if rid is not None:
            yield G("release", (tenant, agent, rid), quiet=True)
        if taken:
            yield G("restore_approval", (tenant, approval_id), quiet=True)
        raise err
    result = _from_run(ran, base, req, v.risk, v.spend)
    result.approval_id = approval_id
    reconciled = ran[0] == "ok" and ran[1].decision == "reconciled"
    if reconciled:
        # An earlier attempt did run (its hold was counted when swept): this call ran
        # nothing and spends nothing.
        result.spend_usd = 0.0
        result.policy_reason = "reconciled"
    entry = _audit_entry(req, result, v)
    note = _note(req, result)
    if note is not None:
        entry["notify"] = note  # written with the audit row, in its transaction
    wrote: Any = None
    if result.decision == "executed" and not reconciled:
        if complete is not None and complete.settled:
            pass  # settled and audited in the completion's transaction
        elif rid is not None:
            # Settle and audit in one transaction (retried on a fresh connection by the
            # store). If it still fails, the hold stays: it counts as spent, and whoever
            # sweeps it writes the audit row. Never released: the tool ran.
            done = yield G("settle", (tenant, agent, rid, _amounts(v), entry), quiet=True)
            if done is _QUIET_FAIL:
                log.error(
                    "%s ran (key %r) but settling its budget hold %s failed: the hold "
                    "stays counted and the next sweep audits it",
                    req.tool,
                    req.key,
                    rid,
                )
        else:
            yield G("append_audit", (tenant, entry), quiet=True)
    else:
        # Failed, replayed after all, blocked by replay=False, reconciled: the tool did
        # not run here, so the hold is given back, with the audit row in the same
        # transaction; the approval is not used up either.
        if rid is not None:
            wrote = yield G("release", (tenant, agent, rid, entry), quiet=True)
        else:
            wrote = yield G("append_audit", (tenant, entry), quiet=True)
        if taken:
            yield G("restore_approval", (tenant, approval_id), quiet=True)
    # release() is False when a sweep audited the hold instead: then no row carried it.
    yield from _record(gov, req, result, v, audited=True, note=note, enqueued=_wrote(wrote))
    if res is not None and result.decision == "executed" and v.policy is not None and v.spend:
        cap = v.policy.max_spend_usd_per_day
        spend = next((w for w in v.wants if w.metric == "spend"), None)
        if cap and spend is not None:
            after = res.after.get((spend.metric, spend.window), 0)
            gov.budget_check(agent, after - v.spend, after, _cap_micros(cap))
    return result


_UNSEEN = object()


def _amounts(v: Verdict) -> list[list[Any]]:
    return [[w.metric, w.window, w.amount] for w in v.wants]


def _cap_micros(cap: float) -> int:
    return round(cap * 1_000_000)


def _audit_entry(
    req: Request,
    result: ToolResult | None,
    v: Verdict | None = None,
    decision: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """The audit row of a decision: from ``result``, or (no result: the tool's outcome
    is not known here) ``decision``/``reason`` with the verdict's risk and spend."""
    if result is not None:
        return {
            "agent_id": req.agent_id,
            "tool": req.tool,
            "args_digest": req.args_digest,
            "args": req.args_json,
            "decision": result.decision,
            "reason": result.policy_reason,
            "risk_level": result.risk_level,
            "spend_micros": micros(result.spend_usd),
            "run_id": req.run_id,
            "token": result.token,
            "idem_key": req.key,
        }
    assert v is not None and decision is not None and reason is not None
    return {
        "agent_id": req.agent_id,
        "tool": req.tool,
        "args_digest": req.args_digest,
        "args": req.args_json,
        "decision": decision,
        "reason": reason,
        "risk_level": v.risk,
        "spend_micros": v.spend,
        "run_id": req.run_id,
        "token": None,
        "idem_key": req.key,
    }


def _blocked(v: Verdict, base: dict[str, Any], req: Request, approval_id: str | None) -> ToolResult:
    assert v.reason is not None
    return ToolResult(
        ok=False,
        allowed=False,
        decision="blocked",
        policy_reason=v.reason,
        risk_level=v.risk,  # type: ignore[arg-type]
        error=v.detail or None,
        key=req.key,
        namespace=req.namespace,
        approval_id=approval_id,
        **base,
    )


def _from_run(ran: Any, base: dict[str, Any], req: Request, risk: str, spend: int) -> ToolResult:
    kind, payload = ran
    common = {"key": req.key, "namespace": req.namespace, "risk_level": risk, **base}
    if kind == "error":
        err: BaseException = payload
        return ToolResult(
            ok=False,
            allowed=True,
            decision="failed",
            policy_reason="tool_error",
            error=_text(err),
            error_type=type(err).__name__,
            exception=err,
            **common,
        )
    outcome: Outcome = payload
    common["token"] = outcome.token or None
    if outcome.decision == "replayed":
        return ToolResult(
            ok=True,
            allowed=True,
            decision="dedup",
            policy_reason="dedup",
            result=outcome.value,
            **common,
        )
    if outcome.decision == "blocked":  # replay=False: a duplicate gets the sentinel
        return ToolResult(
            ok=False,
            allowed=False,
            decision="blocked",
            policy_reason="dedup",
            result=outcome.value,
            **common,
        )
    return ToolResult(
        ok=True,
        allowed=True,
        decision="executed",
        policy_reason="ok",
        result=outcome.value,
        spend_usd=spend / 1_000_000,
        **common,
    )


def _text(err: BaseException) -> str:
    return safe_str(err)[:2000] or type(err).__name__  # redacted: events, hooks, the model


def _note(req: Request, result: ToolResult) -> dict[str, Any] | None:
    """The notification a decision raises, if any (blocked, tool_failed)."""
    if result.decision == "blocked" and result.policy_reason != "dedup":
        kind = "blocked"
    elif result.decision == "failed":
        kind = "tool_failed"
    else:
        return None
    from .outbox import make_event

    return make_event(
        {
            "type": kind,
            "agent_id": req.agent_id,
            "tool": req.tool,
            "reason": result.policy_reason,
            "data": {"error": result.error},
        }
    )


def _wrote(done: Any) -> bool:
    return done is not None and done is not False and done is not _QUIET_FAIL


def _record(
    gov: Governance,
    req: Request,
    result: ToolResult,
    v: Verdict | None,
    *,
    audited: bool = False,
    note: dict[str, Any] | None = None,
    enqueued: bool = False,
) -> Generator[Any, Any, None]:
    """Audit row, timeline event, notifications: after the decision, never raising.
    The notification rides on the audit row (the outbox, same transaction) when there
    is one; otherwise it is written on its own (:meth:`Governance.notify`)."""
    tenant = gov.tenant
    if not audited:
        note = _note(req, result)
    if req.agent_id is not None and not audited:
        entry = _audit_entry(req, result)
        if note is not None:
            entry["notify"] = note
        enqueued = _wrote((yield G("append_audit", (tenant, entry), quiet=True)))
    if req.run_id:
        kind = {"executed": "tool_result", "failed": "tool_result", "dedup": "dedup"}.get(
            result.decision, "blocked"
        )
        data = {"decision": result.decision, "reason": result.policy_reason}
        if result.error:
            data["error"] = result.error
        yield G(
            "post_event",
            (tenant, gov.event(req, kind, status=result.decision, data=data)),
            quiet=True,
        )
    if note is not None:
        gov.notify(note, enqueued=enqueued and bool(getattr(gov.store, "outbox", False)))


# -- drivers ------------------------------------------------------------------------------
def drive_sync(
    gen: Generator[Any, Any, ToolResult],
    gov: Governance,
    peek: Callable[[], Any],
    inner: Callable[[Inner], Any],
) -> ToolResult:
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = gen.throw(error) if error is not None else gen.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = None
        if type(op) is G:
            send = _g(gov, op)
        elif type(op) is Peek:
            send = peek()
        elif type(op) is Nap:
            time.sleep(op.seconds)
            send = None
        else:
            try:
                send = inner(op)
            except BaseException as err:  # interrupted: governed() settles, re-raises
                error = err


async def drive_async(
    gen: Generator[Any, Any, ToolResult],
    gov: Governance,
    peek: Callable[[], Any],
    inner: Callable[[Inner], Any],
) -> ToolResult:
    send: Any = None
    error: BaseException | None = None
    inline = gov.store.kind == "memory"
    while True:
        try:
            op = gen.throw(error) if error is not None else gen.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = None
        if type(op) is G:
            if inline:
                send = _g(gov, op)
            elif op.method == "begin_claim":
                send = await _claiming(gov, op)
            elif op.urgent:
                # The task was just cancelled: the write runs in its own thread and
                # completes even if this task is cancelled again while waiting for it.
                task = asyncio.ensure_future(asyncio.to_thread(_g, gov, op))
                try:
                    send = await asyncio.shield(task)
                except asyncio.CancelledError:
                    send = _QUIET_FAIL
            else:
                # Database work in a worker thread: the event loop never waits on a lock.
                send = await asyncio.to_thread(_g, gov, op)
        elif type(op) is Peek:
            send = peek() if inline else await asyncio.to_thread(peek)
        elif type(op) is Nap:
            await asyncio.sleep(op.seconds)
            send = None
        else:
            try:
                send = await inner(op)
            except BaseException as err:  # cancelled: governed() settles, re-raises
                error = err


async def _claiming(gov: Governance, op: G) -> Any:
    """begin_claim in a worker thread, shielded: cancelled while it runs, the task
    waits for it and, if it claimed the key and held budget, gives both back before
    leaving (the lease expired at once, as a cancelled plain claim's; the hold
    released: the tool never ran)."""
    task = asyncio.ensure_future(asyncio.to_thread(_g, gov, op))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            _snap, res, rec = await task
        except BaseException:  # failed or cancelled: nothing to give back
            raise asyncio.CancelledError from None
        tenant, agent, ledger = op.args[0], op.args[1], op.args[3]
        if res is not None and res.ok:
            _g(gov, G("release", (tenant, agent, res.id), quiet=True))
        if rec is not None and rec.mine:
            try:
                ledger.heartbeat(rec.namespace, rec.key, rec.token, -1.0)
            except Exception:
                log.exception("giving back the claim of %r failed", rec.key)
        raise


def _g(gov: Governance, op: G) -> Any:
    if not op.quiet:
        return getattr(gov.store, op.method)(*op.args)
    try:
        return getattr(gov.store, op.method)(*op.args)
    except Exception:
        # After the effect: losing an audit row or an event must not turn a done charge
        # into an error for the caller. Logged loudly instead.
        log.exception("governance bookkeeping %s failed", op.method)
        return _QUIET_FAIL


# -- the API ------------------------------------------------------------------------------
class Facade(Protocol):
    """The guard facade as governance sees it.

    The guard sits above governance and imports it; governance never imports the guard.
    ``Guard.gov`` hands :class:`Governance` an implementation of this (guard.py's
    ``_GovernancePort``): the ledger, the tenant, and the call path to run a registered
    tool by name."""

    @property
    def namespace(self) -> str:
        """The tenant."""

    @property
    def given_ledger(self) -> Store | None:
        """The store handed to the Guard, if any (checked at once; a URL opens later)."""

    @property
    def ledger(self) -> Store:
        """The guard's ledger, opened at first use."""

    def current_call(self) -> CallContext | None:
        """The context of the guarded call running in this thread/task."""

    def run_by_name(
        self,
        fn: Callable[..., Any],
        args: Mapping[str, Any] | None,
        *,
        tool: str,
        agent_id: str,
        spend_usd: float | None,
        run_id: str | None,
        **options: Any,
    ) -> ToolResult:
        """Run a registered tool by name on the call path, governed (tenant-wide scope)."""

    async def arun_by_name(
        self,
        fn: Callable[..., Any],
        args: Mapping[str, Any] | None,
        *,
        tool: str,
        agent_id: str,
        spend_usd: float | None,
        run_id: str | None,
        **options: Any,
    ) -> ToolResult:
        """:meth:`run_by_name` for async code."""

    def not_found(
        self, tool: str, agent_id: str, args: Mapping[str, Any] | None, run_id: str | None
    ) -> ToolResult:
        """A tool nobody registered, run by name: blocked, audited, on the timeline."""


class Governance:
    """Policies, kill switch, tools registry, approvals, audit, metrics and timelines,
    in the guard's ledger database, scoped to the guard's namespace (the tenant).

    Reached as ``guard.gov``. Names follow the OnceOnly SDK."""

    def __init__(self, guard: Facade) -> None:
        from .redact import default_redactor

        self._guard = guard
        ledger = guard.given_ledger  # a store given to the Guard: check it now
        if ledger is not None:
            _supports_governance(ledger)
        self._store: GovernanceStore | None = None
        self._owns_store = False
        self._local: dict[str, Callable[..., Any]] = {}
        self._hooks: list[tuple[Callable[[dict[str, Any]], Any], frozenset[str] | None]] = []
        self.redactor = default_redactor
        self.budget_threshold = 0.8
        #: Outbound allowlist added to ONCEONLY_EGRESS_ALLOW (hosts, CIDRs): docs/security.md.
        self.egress_allow: str | list[str] | None = None
        #: (agent, tool) pairs whose last call reserved budget: a hint only (which order
        #: to read in), never a decision; see governed().
        self.capped: dict[tuple[str, str], bool] = {}
        self._joins: tuple[GovernanceStore, Store, bool] | None = None

    def joined(self, req: Request) -> Store | None:
        """The ledger, when this call's claim and completion can join the governance
        store's transactions (same database; the call has a claim to make)."""
        if req.claim is None:
            return None
        ledger = self._guard.ledger
        store = self.store
        seen = self._joins
        if seen is None or seen[0] is not store or seen[1] is not ledger:
            seen = self._joins = (store, ledger, store.joins(ledger))
        return ledger if seen[2] else None

    def note_capped(self, agent_id: str, tool: str, capped: bool) -> None:
        key = (agent_id, tool)
        if self.capped.get(key) is not capped:
            if len(self.capped) >= 4096:
                self.capped.clear()
            self.capped[key] = capped

    @property
    def store(self) -> GovernanceStore:
        if self._store is None:
            ledger = self._guard.ledger
            _supports_governance(ledger)
            self._store = ledger.governance_store()
            self._owns_store = True
        return self._store

    def share_store(self, store: GovernanceStore) -> None:
        """Use a governance store shared with other guards on the same ledger (one
        connection pool for many tenants, as the server does). It is not closed here."""
        if self._store is not None and self._owns_store:
            self._store.close()
        self._store, self._owns_store = store, False

    @property
    def tenant(self) -> str:
        return self._guard.namespace

    def close(self) -> None:
        d = self.__dict__.pop("_deliverer", None)
        if d is not None:
            d.close()
        if self._store is not None and self._owns_store:
            self._store.close()
        self._store = None

    # -- policies -------------------------------------------------------------------------
    def upsert_policy(self, policy: Policy | Mapping[str, Any]) -> Policy:
        p = policy if isinstance(policy, Policy) else Policy.model_validate(dict(policy))
        self.store.put_agent(self.tenant, p.agent_id, policy=p.model_dump_json())
        return p

    def policy_from_template(
        self, agent_id: str, template_name: str, overrides: Mapping[str, Any] | None = None
    ) -> Policy:
        fields = {**template(template_name), **dict(overrides or {})}
        return self.upsert_policy(
            Policy.model_validate({**fields, "agent_id": agent_id, "template": template_name})
        )

    def get_policy(self, agent_id: str) -> Policy | None:
        row = self.store.get_agent(self.tenant, agent_id)
        if row is None or not row.get("policy"):
            return None
        return Policy.model_validate_json(row["policy"])

    def list_policies(self) -> list[Policy]:
        return [
            Policy.model_validate_json(r["policy"])
            for r in self.store.list_agents(self.tenant)
            if r.get("policy")
        ]

    def list_agents(self) -> list[dict[str, Any]]:
        """Every agent this tenant knows (a policy or kill-switch state), with its status."""
        return [
            {
                "agent_id": r["agent_id"],
                "disabled": bool(r["disabled"]),
                "reason": r["disabled_reason"],
                "has_policy": bool(r["policy"]),
            }
            for r in self.store.list_agents(self.tenant)
        ]

    def delete_policy(self, agent_id: str) -> None:
        self.store.put_agent(self.tenant, agent_id, policy=None)

    # -- kill switch ----------------------------------------------------------------------
    def disable_agent(self, agent_id: str, reason: str = "") -> None:
        """Stop this agent's next call in every process sharing the ledger."""
        self.store.put_agent(self.tenant, agent_id, disabled=True, reason=reason or None)

    def enable_agent(self, agent_id: str) -> None:
        self.store.put_agent(self.tenant, agent_id, disabled=False)

    def disable_all(self, reason: str = "") -> None:
        """The global switch: every agent of this tenant stops."""
        self.store.put_agent(self.tenant, "*", disabled=True, reason=reason or None)

    def enable_all(self) -> None:
        self.store.put_agent(self.tenant, "*", disabled=False)

    def agent_status(self, agent_id: str) -> dict[str, Any]:
        row = self.store.get_agent(self.tenant, agent_id) or {}
        glob = self.store.get_agent(self.tenant, "*") or {}
        return {
            "agent_id": agent_id,
            "disabled": bool(row.get("disabled")) or bool(glob.get("disabled")),
            "reason": row.get("disabled_reason") or glob.get("disabled_reason"),
            "global_disabled": bool(glob.get("disabled")),
            "has_policy": bool(row.get("policy")),
        }

    def check(self, agent_id: str, tool: str, *, spend_usd: float | None = None) -> dict[str, Any]:
        """Dry run of the §5 checks before the caps (kill switch, registry, block and
        allow lists, approval): ``{"allowed", "reason", "risk_level", "needs_approval"}``.

        Nothing is reserved or recorded; the caps are only decided atomically by a call.
        """
        snap = self.store.snapshot(self.tenant, agent_id, tool)
        v = evaluate(snap, agent_id, tool, spend_usd, by_name=False)
        return {
            "allowed": v.reason is None,
            "reason": v.reason or "ok",
            "risk_level": v.risk,
            "needs_approval": v.reason is None and v.approval,
            "detail": v.detail,
        }

    def record(
        self,
        agent_id: str,
        tool: str,
        *,
        decision: str,
        reason: str = "observed",
        args: Any = None,
        run_id: str | None = None,
        spend_usd: float | None = None,
    ) -> int:
        """Append an audit row for a call this library observed but did not govern
        (e.g. a framework callback); ``args`` are redacted first. Returns its seq."""
        if decision not in ("executed", "dedup", "blocked", "failed", "pending_approval"):
            raise ConfigError(f"unknown decision {decision!r}")
        entry = {
            "agent_id": agent_id,
            "tool": tool,
            "args_digest": None,
            "args": json.dumps(self.redactor.redact(args), sort_keys=True),
            "decision": decision,
            "reason": reason[:64],
            "risk_level": "low",
            "spend_micros": micros(spend_usd),
            "run_id": run_id,
            "token": None,
            "idem_key": None,
        }
        return self.store.append_audit(self.tenant, entry)[0]

    # -- tools registry -------------------------------------------------------------------
    def create_tool(
        self,
        name: str,
        fn: Callable[..., Any] | None = None,
        *,
        url: str | None = None,
        scope_id: str = "global",
        auth: str = "none",
        secret: str | None = None,
        timeout_ms: int = 10_000,
        max_retries: int = 2,
        enabled: bool = True,
        description: str = "",
    ) -> ToolSpec:
        """Register a local callable (``fn``) or a remote HTTP tool (``url``)."""
        if (fn is None) == (url is None):
            raise ConfigError("create_tool needs exactly one of fn= (local) or url= (remote)")
        if auth == "hmac_sha256" and not secret:
            raise ConfigError("auth='hmac_sha256' needs a secret")
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"a remote tool's url must be http(s), got {url!r}")
        if url is not None:
            check_url(url, self.egress_allow)  # the egress guard: EgressRefused is a ConfigError
        spec = ToolSpec(
            name=name,
            kind="local" if fn is not None else "http",
            url=url,
            scope_id=scope_id,
            auth=auth,  # type: ignore[arg-type]
            timeout_ms=timeout_ms,
            max_retries=max_retries,
            enabled=enabled,
            description=description,
            has_secret=bool(secret),
        )
        row = spec.model_dump(exclude={"has_secret"})
        row["secret"] = secret
        self.store.put_tool(self.tenant, row)
        if fn is not None:
            self._local[name] = fn
        return spec

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        """Attach this process's callable to a registered local tool."""
        self._local[name] = fn

    def _spec(self, row: Mapping[str, Any]) -> ToolSpec:
        values = {k: row[k] for k in ToolSpec.model_fields if k in row and k != "has_secret"}
        return ToolSpec(**values, has_secret=bool(row.get("secret")))

    def get_tool(self, name: str, scope_id: str | None = None) -> ToolSpec | None:
        rows = self.store.get_tools(self.tenant, name, scope_id)
        return self._spec(rows[0]) if rows else None

    def list_tools(self) -> list[ToolSpec]:
        return [self._spec(r) for r in self.store.get_tools(self.tenant)]

    def toggle_tool(self, name: str, enabled: bool, scope_id: str = "global") -> bool:
        return self.store.set_tool_enabled(self.tenant, name, scope_id, enabled)

    def delete_tool(self, name: str, scope_id: str = "global") -> bool:
        self._local.pop(name, None)
        return self.store.delete_tool(self.tenant, name, scope_id)

    def _resolve(self, name: str, agent_id: str) -> Callable[..., Any] | None:
        rows = self.store.get_tools(self.tenant, name)
        mine = [r for r in rows if r["scope_id"] in ("global", f"agent:{agent_id}")]
        if not mine:
            return None
        row = sorted(mine, key=lambda r: r["scope_id"] != "global")[-1]
        if row["kind"] == "local":
            fn = self._local.get(name)
            if fn is None:

                def missing(**_: Any) -> Any:
                    raise OnceOnlyError(
                        f"tool {name!r} is registered, but this process has no callable for "
                        "it: gov.register(name, fn)"
                    )

                return missing
            return fn
        # Without httpx no remote call can ever be made: raise MissingExtraError (with the
        # pip command) here, before the call path, which would turn it into a failed
        # ToolResult that reads like the tool's own failure.
        from .remote import _httpx

        _httpx()
        spec = self._spec(row)
        secret = row.get("secret")

        def remote(**args: Any) -> Any:
            from .remote import call_http_tool

            ctx = self._guard.current_call()
            key = ctx.idempotency_key if ctx else ""
            payload = {"tool": name, "args": args, "agent_id": agent_id}
            return call_http_tool(
                spec, secret, payload, idempotency_key=key, egress_allow=self.egress_allow
            )

        remote.__name__ = name
        return remote

    def run_tool(
        self,
        agent_id: str,
        tool: str,
        args: Mapping[str, Any] | None = None,
        *,
        spend_usd: float | None = None,
        run_id: str | None = None,
        **options: Any,
    ) -> ToolResult:
        """Run a registered tool by name, governed and exactly once per (tool, args)."""
        fn = self._resolve(tool, agent_id)
        if fn is None:
            return self._guard.not_found(tool, agent_id, args, run_id)
        return self._guard.run_by_name(
            fn, args, tool=tool, agent_id=agent_id, spend_usd=spend_usd, run_id=run_id, **options
        )

    async def arun_tool(
        self,
        agent_id: str,
        tool: str,
        args: Mapping[str, Any] | None = None,
        *,
        spend_usd: float | None = None,
        run_id: str | None = None,
        **options: Any,
    ) -> ToolResult:
        fn = await asyncio.to_thread(self._resolve, tool, agent_id)
        if fn is None:
            return await asyncio.to_thread(self._guard.not_found, tool, agent_id, args, run_id)
        return await self._guard.arun_by_name(
            fn, args, tool=tool, agent_id=agent_id, spend_usd=spend_usd, run_id=run_id, **options
        )

    # -- approvals ------------------------------------------------------------------------
    def list_approvals(self, state: str | None = "pending") -> list[Approval]:
        return [_approval(r) for r in self.store.list_approvals(self.tenant, state)]

    def get_approval(self, approval_id: str) -> Approval | None:
        rows = [r for r in self.store.list_approvals(self.tenant) if r["id"] == approval_id]
        return _approval(rows[0]) if rows else None

    def approve(self, approval_id: str, *, by: str | None = None) -> Approval:
        return self._decide(approval_id, "approved", by, None)

    def deny(self, approval_id: str, *, by: str | None = None, reason: str = "") -> Approval:
        return self._decide(approval_id, "denied", by, reason or None)

    def _decide(self, approval_id: str, state: str, by: str | None, reason: str | None) -> Approval:
        """pending → approved | denied. A decision is final: a denied or consumed request
        cannot be decided again (ConfigError saying what it is; a consumed one authorised
        its execution already, and the next execution asks anew). Approving a request
        that is approved and not yet used changes nothing and succeeds."""
        row = self.store.decide_approval(self.tenant, approval_id, state, by, reason)
        if row is None:
            raise ConfigError(f"no approval request {approval_id!r}")
        done = _approval(row)
        if row.get("changed") or (state == done.state == "approved"):
            return done  # approving an approved request again (a double click) is a no-op
        if done.state == "consumed":
            raise ConfigError(
                f"approval {approval_id} was already consumed by the execution it authorised; "
                "it never authorises another: the next execution of the call asks anew"
            )
        raise ConfigError(f"approval {approval_id} was already {done.state}: a decision is final")
        return done

    # -- audit, metrics, timeline ----------------------------------------------------------
    def agent_logs(self, agent_id: str, limit: int = 100) -> list[AuditEntry]:
        rows = self.store.audit_rows(self.tenant, agent_id=agent_id, limit=limit)
        return [_audit(r) for r in rows]

    def audit_log(self, limit: int = 100, since: float | None = None) -> list[AuditEntry]:
        return [_audit(r) for r in self.store.audit_rows(self.tenant, since=since, limit=limit)]

    def verify_audit(self, all_tenants: bool = False) -> list[dict[str, Any]]:
        """[] when the audit log is whole; else one entry per problem: a broken chain
        (its first bad row: ``seq``, ``id``) or a governed execution in the ledger with
        no audit row (``key``, ``token``). See :meth:`audit_report`."""
        return self.audit_report(all_tenants)["problems"]  # type: ignore[no-any-return]

    def audit_report(self, all_tenants: bool = False) -> dict[str, Any]:
        """Verify the audit log and say what was checked.

        1. Holds whose lease expired (calls whose worker died or lost the database
           before settling) are settled as spent first, each writing its audit row
           (decision ``unknown``): the log is then as complete as it can be.
        2. Every hash chain is walked (``chains``).
        3. The ledger's executions are cross-checked against the audit rows
           (``executions``): each succeeded record in the tenant's namespaces whose key
           the audit log knows must have a row for its token (or, for a run whose token
           was never known, an ``unknown`` row of its key). Keys the audit log never
           mentions were not governed and are not counted (``ungoverned``).

        Returns ``{"chains", "executions", "ungoverned", "in_flight", "problems"}``.
        """
        store = self.store
        scope = None if all_tenants else self.tenant
        for t in sorted({h["tenant"] for h in store.pending_holds(scope) if h["expired"]}):
            store.sweep(t)
        problems = list(store.verify_audit(scope))
        live = {(h["namespace"], h["idem_key"]) for h in store.pending_holds(scope)}
        known: dict[str, dict[str, set[int | None]]] = {}
        checked = ungoverned = 0
        for rec in self._guard.ledger.iter_all(scope):
            if rec.state != "succeeded" or not rec.executions:
                continue
            if scope is None:
                t = rec.namespace.split("/", 1)[0]
            elif rec.namespace == scope or rec.namespace.startswith(scope + "/"):
                t = scope
            else:
                continue  # another tenant sharing the prefix ("acme" vs "acme2")
            if t not in known:
                known[t] = store.audited_calls(t)
            tokens = known[t].get(rec.key)
            if tokens is None:
                ungoverned += 1
                continue
            checked += 1
            if rec.token in tokens or None in tokens or (rec.namespace, rec.key) in live:
                continue
            problems.append(
                {
                    "tenant": t,
                    "agent_id": None,
                    "seq": None,
                    "id": None,
                    "namespace": rec.namespace,
                    "key": rec.key,
                    "token": rec.token,
                    "problem": f"execution without an audit row: {rec.tool} "
                    f"(key {rec.key!r}, token {rec.token})",
                }
            )
        return {
            "chains": store.chain_count(scope),
            "executions": checked,
            "ungoverned": ungoverned,
            "in_flight": len(live),
            "problems": problems,
        }

    def purge_audit(self, before: float) -> int:
        return self.store.purge_audit(self.tenant, before)

    def agent_metrics(self, agent_id: str, period: str = "day") -> AgentMetrics:
        if period not in PERIODS:
            raise ConfigError(f"period must be hour, day or week, not {period!r}")
        since = self.store.now() - PERIODS[period]
        m = self.store.metrics(self.tenant, agent_id, since)
        by = m["by_decision"]
        return AgentMetrics(
            agent_id=agent_id,
            period=period,  # type: ignore[arg-type]
            since=since,
            total_actions=sum(by.values()),
            executed=by.get("executed", 0),
            dedup=by.get("dedup", 0),
            blocked=by.get("blocked", 0),
            failed=by.get("failed", 0),
            pending_approval=by.get("pending_approval", 0),
            spend_usd=m["spend_micros"] / 1_000_000,
            top_tools=m["top_tools"],
        )

    def event(
        self, req: Request, type_: str, *, status: str | None = None, data: Any = None
    ) -> dict[str, Any]:
        return {
            "run_id": req.run_id,
            "type": type_,
            "agent_id": req.agent_id,
            "tool": req.tool,
            "status": status,
            "data": json.dumps(self.redactor.redact(data)) if data is not None else None,
        }

    def post_event(
        self,
        run_id: str,
        type: str,
        *,
        agent_id: str | None = None,
        tool: str | None = None,
        status: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> int:
        """Append an event to a run's timeline (``data`` is redacted first)."""
        if not run_id or not type:
            raise ConfigError("post_event needs a run_id and a type")
        event = {
            "run_id": run_id,
            "type": type[:64],
            "agent_id": agent_id,
            "tool": tool,
            "status": status,
            "data": json.dumps(self.redactor.redact(dict(data))) if data is not None else None,
        }
        eid = self.store.post_event(self.tenant, event)
        if type == "run_finished" and status in ("failed", "error"):
            self.notify(
                {
                    "type": "run_failed",
                    "agent_id": agent_id,
                    "tool": tool,
                    "reason": status,
                    "data": {"run_id": run_id},
                }
            )
        return eid

    def get_run_timeline(
        self, run_id: str, limit: int = 100, offset: int = 0
    ) -> list[TimelineEvent]:
        if limit < 0 or offset < 0:
            raise ConfigError("limit and offset must be >= 0")
        rows = self.store.timeline(self.tenant, run_id, limit, offset)
        return [
            TimelineEvent(
                id=r["id"],
                run_id=r["run_id"],
                type=r["type"],
                agent_id=r["agent_id"],
                tool=r["tool"],
                status=r["status"],
                data=json.loads(r["data"]) if r["data"] else None,
                created_at=r["created_at"],
            )
            for r in rows
        ]

    # -- notifications --------------------------------------------------------------------
    def on_notify(
        self, hook: Callable[[dict[str, Any]], Any], *, events: list[str] | None = None
    ) -> Callable[[dict[str, Any]], Any]:
        """Call ``hook(event)`` for tool_failed, run_failed, blocked, budget_threshold."""
        self._hooks.append((hook, frozenset(events) if events else None))
        return hook

    def add_webhook(
        self,
        url: str,
        secret: str,
        *,
        events: list[str] | None = None,
        budget_threshold: float | None = None,
    ) -> str:
        """A signed webhook sink (Standard Webhooks headers), stored in the ledger."""
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"webhook url must be http(s), got {url!r}")
        check_url(url, self.egress_allow)  # the egress guard: EgressRefused is a ConfigError
        if budget_threshold is not None and not 0 < budget_threshold <= 1:
            raise ConfigError("budget_threshold must be in (0, 1]")
        self.__dict__.pop("_hooks_cache", None)
        return self.store.add_webhook(
            self.tenant,
            {
                "url": url,
                "secret": secret,
                "events": json.dumps(events or []),
                "budget_threshold": budget_threshold,
                "enabled": True,
            },
        )

    def list_webhooks(self) -> list[dict[str, Any]]:
        return [
            {
                "id": r["id"],
                "url": r["url"],
                "events": json.loads(r["events"]),
                "budget_threshold": r["budget_threshold"],
                "enabled": bool(r["enabled"]),
            }
            for r in self.store.list_webhooks(self.tenant)
        ]

    def remove_webhook(self, webhook_id: str) -> bool:
        self.__dict__.pop("_hooks_cache", None)
        return self.store.delete_webhook(self.tenant, webhook_id)

    def _webhooks(self) -> list[dict[str, Any]]:
        """The tenant's webhook sinks, re-read at most every 5 s: a notification check
        runs after every paid call, and sinks change rarely. (The kill switch and policies
        are never cached: they are read on every call.)"""
        import time

        cached = self.__dict__.get("_hooks_cache")
        if cached is not None and time.monotonic() - cached[0] < 5.0:
            return cached[1]  # type: ignore[no-any-return]
        rows = self.store.list_webhooks(self.tenant)
        self.__dict__["_hooks_cache"] = (time.monotonic(), rows)
        return rows

    def budget_check(self, agent_id: str | None, before: int, after: int, cap: int) -> None:
        """Notify when a day's spend crosses a threshold (hooks: budget_threshold)."""
        if after < 0.01 * cap:
            return
        thresholds = {self.budget_threshold}
        try:
            sinks = self._webhooks()
        except Exception:
            sinks = []
        for s in sinks:
            if s["budget_threshold"]:
                thresholds.add(float(s["budget_threshold"]))
        for t in sorted(thresholds):
            if before < t * cap <= after:
                self.notify(
                    {
                        "type": "budget_threshold",
                        "agent_id": agent_id,
                        "tool": None,
                        "reason": f"{int(t * 100)}% of the daily budget",
                        "data": {"threshold": t, "spend_usd": after / 1e6, "cap_usd": cap / 1e6},
                    },
                    threshold=t,
                )

    def notify(
        self, event: dict[str, Any], *, threshold: float | None = None, enqueued: bool = False
    ) -> None:
        """Call the hooks, and write the event to the outbox unless ``enqueued`` (it rode
        on its decision's audit row). Delivery: :mod:`~onceonly_core.governance.outbox`."""
        from .outbox import make_event

        event = self.redactor.redact(make_event(event))  # hooks see no secret
        for hook, kinds in self._hooks:
            if kinds is None or event["type"] in kinds:
                try:
                    hook(event)
                except Exception:
                    log.exception("notification hook %r failed", hook)
        if not enqueued:
            write = getattr(self.store, "enqueue_notification", None)
            if write is None:
                _no_outbox(self.store)
                return
            try:
                enqueued = bool(write(self.tenant, event))
            except Exception:
                log.exception("writing a %s notification to the outbox failed", event["type"])
                return
        if enqueued:
            self._kick()

    def deliverer(self) -> Any:
        """This tenant's outbox :class:`~onceonly_core.governance.outbox.Deliverer`."""
        from .outbox import Deliverer, Settings

        d = self.__dict__.get("_deliverer")
        if d is None:
            settings = Settings.from_env(egress_allow=self.egress_allow)
            d = self.__dict__["_deliverer"] = Deliverer(
                self.store,  # type: ignore[arg-type]
                settings,
                tenant=self.tenant,
            )
        elif d.settings.egress_allow != self.egress_allow:
            d.set_egress_allow(self.egress_allow)  # the allowlist is read at each use
        return d

    def _kick(self) -> None:
        if not getattr(self.store, "local_delivery", True):
            return  # remote mode: the server delivers its outbox
        try:
            d = self.deliverer()
            if d.settings.in_process:
                d.kick()  # in-process delivery; off: a server or `onceonly notify deliver`
        except Exception:
            log.exception("starting the notification deliverer failed")

    def flush_notifications(self, timeout: float = 5.0) -> bool:
        """Deliver this tenant's pending notifications now; False if some are still
        pending after ``timeout`` seconds (retrying, or their receiver is down)."""
        if not getattr(self.store, "outbox", False):
            return True
        if not getattr(self.store, "local_delivery", True):
            return True  # remote mode: the server delivers; nothing is pending here
        return bool(self.deliverer().drain(timeout))


#: Store classes already warned about (once per class and process).
_WARNED_NO_OUTBOX: set[str] = set()


def _no_outbox(store: Any) -> None:
    """A store without the outbox primitives cannot deliver: say so, once, rather than
    drop notifications in silence."""
    name = f"{type(store).__module__}.{type(store).__qualname__}"
    if name in _WARNED_NO_OUTBOX:
        return
    _WARNED_NO_OUTBOX.add(name)
    log.warning(
        "governance store %s has no notification outbox (enqueue_notification and the "
        "outbox_* primitives of onceonly_core.stores.governance.OutboxStore): webhook, "
        "Slack and e-mail notifications are not delivered on it (on_notify hooks still "
        "run); see docs/custom-store.md",
        name,
    )


def _supports_governance(ledger: Any) -> None:
    """A ledger offers governance through ``Store.governance_store()``; one that does not
    is refused here, before any call, saying what to implement."""
    from ..stores.base import Store

    hook = getattr(type(ledger), "governance_store", None)
    if hook is None or hook is Store.governance_store:
        raise ConfigError(
            f"{type(ledger).__name__} provides no governance: policies, budgets, approvals "
            "and the audit log need its governance_store() to return a "
            "onceonly_core.governance.base.GovernanceStore (see docs/governance.md, "
            "'Custom stores'), or use a SQL or memory ledger"
        )


def _approval(r: Mapping[str, Any]) -> Approval:
    return Approval(
        id=r["id"],
        agent_id=r["agent_id"],
        tool=r["tool"],
        namespace=r["namespace"],
        key=r["idem_key"],
        state=r["state"],
        args=json.loads(r["args"]) if r["args"] else None,
        reason=r["reason"],
        decided_by=r["decided_by"],
        created_at=r["created_at"],
        decided_at=r["decided_at"],
    )


def _audit(r: Mapping[str, Any]) -> AuditEntry:
    return AuditEntry(
        id=r["id"],
        agent_id=r["agent_id"],
        seq=r["seq"],
        tool=r["tool"],
        args_digest=r["args_digest"],
        args=json.loads(r["args"]) if r["args"] else None,
        decision=r["decision"],
        reason=r["reason"],
        risk_level=r["risk_level"],
        spend_usd=r["spend_micros"] / 1_000_000,
        run_id=r["run_id"],
        token=r["token"],
        key=r["idem_key"],
        created_at=r["created_at"],
        hash=r["hash"],
    )
