"""What the dashboard shows, read from the ledger and governance (no web framework here).

Every function takes a :class:`~onceonly_core.guard.Guard` and returns plain data: lists
and dicts of strings and numbers, safe to serialise as JSON and to render (escaped).
Nothing here writes except :func:`act`, which the app calls for a checked POST only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..codec import default_codec
from ..errors import ConfigError
from ..governance.engine import _tool_metric
from ..governance.models import matches
from ..stores.base import Record

if TYPE_CHECKING:
    from ..governance.models import AuditEntry, Policy
    from ..guard import Guard

__all__ = ["Filters", "act", "agents", "approvals", "feed", "record_detail", "run_timeline"]

HOUR = 3600
DAY = 86400
#: Ledger states of records no governed decision explains, as feed decisions.
_STATE_DECISION = {
    "succeeded": "executed",
    "failed": "failed",
    "running": "running",
    "cleared": "cleared",
}
#: Result tags whose decoding would import a class named by the stored data. The
#: dashboard never imports what the database names: such values are shown as stored.
_IMPORTING_TAGS = frozenset({"path", "enum", "pydantic", "dataclass"})


@dataclass(slots=True)
class Filters:
    """Exact-match filters of the live feed; empty strings mean "any"."""

    agent: str = ""
    tool: str = ""
    workflow: str = ""
    run: str = ""
    decision: str = ""

    @classmethod
    def from_query(cls, q: Mapping[str, str]) -> Filters:
        def one(name: str) -> str:
            return str(q.get(name, "") or "").strip()[:255]

        return cls(one("agent"), one("tool"), one("workflow"), one("run"), one("decision"))

    def as_dict(self) -> dict[str, str]:
        return {
            "agent": self.agent,
            "tool": self.tool,
            "workflow": self.workflow,
            "run": self.run,
            "decision": self.decision,
        }


@dataclass(slots=True)
class Feed:
    items: list[dict[str, Any]]
    choices: dict[str, list[str]] = field(default_factory=dict)


def workflow_of(tenant: str, namespace: str | None) -> str:
    """The workflow part of a namespace (``tenant/workflow``), "" for the tenant itself."""
    if namespace is None or namespace == tenant:
        return ""
    if namespace.startswith(tenant + "/"):
        return namespace[len(tenant) + 1 :]
    return namespace


def _audit_item(a: AuditEntry, rec: Record | None, tenant: str) -> dict[str, Any]:
    ns = rec.namespace if rec is not None else None
    return {
        "source": "audit",
        "id": f"a{a.id}",
        "time": a.created_at,
        "decision": a.decision,
        "reason": a.reason,
        "agent": a.agent_id,
        "tool": a.tool,
        "namespace": ns,
        "workflow": workflow_of(tenant, ns),
        "run": a.run_id or "",
        "key": a.key or "",
        "spend_usd": a.spend_usd,
        "risk": a.risk_level,
        "token": a.token,
    }


def _record_item(r: Record, tenant: str) -> dict[str, Any]:
    return {
        "source": "ledger",
        "id": f"l:{r.namespace}:{r.key}",
        "time": r.updated_at,
        "decision": _STATE_DECISION.get(r.state, r.state),
        "reason": "ungoverned",
        "agent": "",
        "tool": r.tool,
        "namespace": r.namespace,
        "workflow": workflow_of(tenant, r.namespace),
        "run": r.run_id or "",
        "key": r.key,
        "spend_usd": 0.0,
        "risk": "",
        "token": r.token,
    }


def feed(guard: Guard, filters: Filters | None = None, limit: int = 100) -> Feed:
    """The newest calls: governed decisions from the audit log, plus ledger records that
    no audit row explains (ungoverned calls), newest first, filtered."""
    f = filters or Filters()
    limit = max(1, min(limit, 1000))
    tenant = guard.namespace
    gov = guard.gov
    scan = max(limit * 4, 200)
    entries = gov.agent_logs(f.agent, limit=scan) if f.agent else gov.audit_log(limit=scan)
    records = guard.store.list(namespace=tenant, prefix=True, limit=scan)
    by_key: dict[str, Record] = {}
    for r in records:
        by_key.setdefault(r.key, r)
    explained = {a.key for a in entries if a.key}
    if f.agent:  # the agent filter reads only that agent's rows: ask for the rest too
        explained |= {a.key for a in gov.audit_log(limit=scan) if a.key}
    items = [_audit_item(a, by_key.get(a.key or ""), tenant) for a in entries]
    items += [
        _record_item(r, tenant)
        for r in records
        if r.key not in explained and r.tool != "onceonly.check"
    ]
    items.sort(key=lambda i: i["time"], reverse=True)
    choices: dict[str, set[str]] = {"agent": set(), "tool": set(), "workflow": set(), "run": set()}
    for i in items:
        for name in choices:
            if i[name]:
                choices[name].add(i[name])
    out = [i for i in items if _keep(i, f)][:limit]
    return Feed(out, {k: sorted(v)[:200] for k, v in choices.items()})


def _keep(item: Mapping[str, Any], f: Filters) -> bool:
    if f.agent and item["agent"] != f.agent:
        return False
    if f.tool and item["tool"] != f.tool:
        return False
    if f.workflow and f.workflow not in (item["workflow"], item["namespace"]):
        return False
    if f.run and item["run"] != f.run:
        return False
    return not (f.decision and item["decision"] != f.decision)


# -- agents --------------------------------------------------------------------------------
def agents(guard: Guard) -> dict[str, Any]:
    """One card per agent (a policy, a kill-switch row or recent audit rows): status,
    today's spend against the daily budget, this hour's actions against the hourly cap,
    per-tool calls against their caps (the very counters the caps enforce), and the
    day's metrics."""
    gov = guard.gov
    tenant = guard.namespace
    rows = {r["agent_id"]: r for r in gov.store.list_agents(tenant)}
    glob = rows.pop("*", None) or {}
    names = set(rows)
    names |= {a.agent_id for a in gov.audit_log(limit=500)}
    now = gov.store.now()
    hour, day = int(now // HOUR) * HOUR, int(now // DAY) * DAY
    cards = []
    for name in sorted(names):
        row = rows.get(name) or {}
        policy = gov.get_policy(name)
        m = gov.agent_metrics(name, "day")
        card: dict[str, Any] = {
            "agent": name,
            "disabled": bool(row.get("disabled")),
            "reason": row.get("disabled_reason") or "",
            "has_policy": policy is not None,
            "template": policy.template if policy is not None else None,
            "metrics": {
                "total": m.total_actions,
                "executed": m.executed,
                "dedup": m.dedup,
                "blocked": m.blocked,
                "failed": m.failed,
                "pending_approval": m.pending_approval,
                "spend_usd": m.spend_usd,
                "top_tools": [list(t) for t in m.top_tools],
            },
            "spend_today_usd": 0.0,
            "budget_usd": None,
            "actions_this_hour": 0,
            "actions_cap": None,
            "tool_caps": [],
            "policy": _policy_summary(policy),
        }
        if policy is not None:
            card["spend_today_usd"] = gov.store.counter(tenant, name, "spend", day) / 1e6
            card["budget_usd"] = policy.max_spend_usd_per_day
            card["actions_this_hour"] = gov.store.counter(tenant, name, "actions", hour)
            card["actions_cap"] = policy.max_actions_per_hour
            # A per-tool cap counts each tool's calls (a glob caps each matching tool).
            tools = {t for t, _ in m.top_tools}
            for p in policy.max_calls_per_tool:  # a capped tool not called yet today
                if not any(c in p for c in "*?[") and not any(matches(t, [p]) for t in tools):
                    tools.add(p)
            for tool in sorted(tools):
                cap = policy.cap_for(tool)
                if cap is not None:
                    used = gov.store.counter(tenant, name, _tool_metric(tool), day)
                    card["tool_caps"].append({"tool": tool, "used": used, "cap": cap})
        cards.append(card)
    return {
        "global_disabled": bool(glob.get("disabled")),
        "global_reason": glob.get("disabled_reason") or "",
        "agents": cards,
    }


def _policy_summary(p: Policy | None) -> list[tuple[str, str]]:
    if p is None:
        return []
    out: list[tuple[str, str]] = []
    if p.template:
        out.append(("template", p.template))
    out.append(
        ("allowed", "all" if p.allowed_tools is None else ", ".join(p.allowed_tools) or "none")
    )
    if p.blocked_tools:
        out.append(("blocked", ", ".join(p.blocked_tools)))
    if p.require_approval:
        out.append(("approval", ", ".join(p.require_approval)))
    if p.pricing_rules:
        out.append(("prices", ", ".join(f"{k} ${v:g}" for k, v in sorted(p.pricing_rules.items()))))
    return out


def global_status(guard: Guard) -> dict[str, Any]:
    row = guard.gov.store.get_agent(guard.namespace, "*") or {}
    return {"disabled": bool(row.get("disabled")), "reason": row.get("disabled_reason") or ""}


# -- approvals -----------------------------------------------------------------------------
def approvals(guard: Guard, limit: int = 50) -> dict[str, Any]:
    gov = guard.gov
    everything = gov.list_approvals(state=None)
    everything.sort(key=lambda a: a.created_at, reverse=True)
    pending = [a for a in everything if a.state == "pending"]
    decided = [a for a in everything if a.state != "pending"][:limit]

    def one(a: Any) -> dict[str, Any]:
        return {
            "id": a.id,
            "agent": a.agent_id,
            "tool": a.tool,
            "namespace": a.namespace,
            "workflow": workflow_of(guard.namespace, a.namespace),
            "key": a.key,
            "state": a.state,
            "args": gov.redactor.redact(a.args),
            "reason": a.reason or "",
            "decided_by": a.decided_by or "",
            "created_at": a.created_at,
            "decided_at": a.decided_at,
        }

    return {"pending": [one(a) for a in pending], "decided": [one(a) for a in decided]}


# -- runs ------------------------------------------------------------------------------------
def recent_runs(guard: Guard, limit: int = 50) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for a in guard.gov.audit_log(limit=1000):
        if a.run_id:
            r = seen.setdefault(a.run_id, {"run": a.run_id, "last": a.created_at, "calls": 0})
            r["calls"] += 1
            r["last"] = max(r["last"], a.created_at)
    for rec in guard.store.list(namespace=guard.namespace, prefix=True, limit=1000):
        if rec.run_id and rec.run_id not in seen:
            seen[rec.run_id] = {"run": rec.run_id, "last": rec.updated_at, "calls": 1}
    return sorted(seen.values(), key=lambda r: r["last"], reverse=True)[:limit]


def run_timeline(guard: Guard, run_id: str, limit: int = 500) -> list[dict[str, Any]]:
    gov = guard.gov
    return [
        {
            "id": e.id,
            "time": e.created_at,
            "type": e.type,
            "agent": e.agent_id or "",
            "tool": e.tool or "",
            "status": e.status or "",
            "data": gov.redactor.redact(e.data),
        }
        for e in gov.get_run_timeline(run_id, limit=limit)
    ]


# -- one record ------------------------------------------------------------------------------
def display_result(text: str | None, guard: Guard) -> tuple[str, Any]:
    """``(kind, value)`` of a stored result for display, redacted: ``("none", None)``,
    ``("decoded", value)`` (decoded with the default codec), ``("stored", json)`` (a value
    whose decoding would import a class the database names: shown as stored), or
    ``("invalid", None)``."""
    if text is None:
        return "none", None
    try:
        raw = json.loads(text)
    except ValueError:
        return "invalid", None
    if _imports(raw):
        return "stored", guard.gov.redactor.redact(raw)
    try:
        value = default_codec.decode(text)
    except Exception:
        return "stored", guard.gov.redactor.redact(raw)
    return "decoded", guard.gov.redactor.redact(value)


def _imports(v: Any, depth: int = 0) -> bool:
    if depth > 300:
        return True
    if isinstance(v, list):
        return any(_imports(x, depth + 1) for x in v)
    if isinstance(v, dict):
        tag = v.get("$")
        if isinstance(tag, str) and (tag in _IMPORTING_TAGS or tag.startswith("x:")):
            return True
        return any(_imports(x, depth + 1) for x in v.values())
    return False


def record_detail(guard: Guard, key: str, namespace: str | None = None) -> dict[str, Any]:
    """The ledger record of ``key`` (in ``namespace``, or found among the tenant's
    records), its replay result (decoded, redacted) and the audit rows that name it."""
    if not key:
        raise ConfigError("a record needs a key")
    tenant = guard.namespace
    rec: Record | None = None
    if namespace:
        if namespace != tenant and not namespace.startswith(tenant + "/"):
            raise ConfigError("that namespace is not this dashboard's")
        rec = guard.store.get(namespace, key)
    else:
        rec = next(
            (
                r
                for r in guard.store.list(namespace=tenant, prefix=True, limit=5000)
                if r.key == key
            ),
            None,
        )
    red = guard.gov.redactor
    audit = [
        {
            "id": a.id,
            "time": a.created_at,
            "agent": a.agent_id,
            "tool": a.tool,
            "decision": a.decision,
            "reason": a.reason,
            "risk": a.risk_level,
            "spend_usd": a.spend_usd,
            "run": a.run_id or "",
            "token": a.token,
            "args_digest": a.args_digest or "",
            "args": red.redact(a.args),
        }
        for a in guard.gov.audit_log(limit=5000)
        if a.key == key
    ]
    out: dict[str, Any] = {"key": key, "record": None, "result": ("none", None), "audit": audit}
    if rec is not None:
        out["record"] = {
            "namespace": rec.namespace,
            "workflow": workflow_of(tenant, rec.namespace),
            "key": rec.key,
            "tool": rec.tool,
            "state": rec.state,
            "token": rec.token,
            "owner": rec.owner or "",
            "attempt": rec.attempt,
            "executions": rec.executions,
            "run": rec.run_id or "",
            "caller": rec.caller or "",
            "args_digest": rec.args_digest or "",
            "created_at": rec.created_at,
            "updated_at": rec.updated_at,
            "lease_until": rec.lease_until,
            "expires_at": rec.expires_at,
            "error": red.redact_text(rec.error) if rec.error else "",
        }
        out["result"] = display_result(rec.result, guard)
    return out


# -- actions (POST only, after the CSRF check) ----------------------------------------------
ACTIONS = (
    "disable",
    "enable",
    "disable_all",
    "enable_all",
    "approve",
    "deny",
    "retry_notification",
)


def act(guard: Guard, action: str, form: Mapping[str, str], by: str = "dashboard") -> str:
    """Apply one operator action; returns a short message code."""
    gov = guard.gov
    agent = form.get("agent", "").strip()
    reason = form.get("reason", "").strip()[:500]
    if action == "disable":
        if not agent:
            raise ConfigError("which agent?")
        gov.disable_agent(agent, reason or "disabled from the dashboard")
        return "agent_disabled"
    if action == "enable":
        if not agent:
            raise ConfigError("which agent?")
        gov.enable_agent(agent)
        return "agent_enabled"
    if action == "disable_all":
        gov.disable_all(reason or "global kill switch (dashboard)")
        return "all_disabled"
    if action == "enable_all":
        gov.enable_all()
        return "all_enabled"
    if action in ("approve", "deny"):
        aid = form.get("approval", "").strip()
        if not aid:
            raise ConfigError("which approval?")
        if action == "approve":
            gov.approve(aid, by=by)
            return "approved"
        gov.deny(aid, by=by, reason=reason)
        return "denied"
    if action == "retry_notification":
        nid = form.get("notification", "").strip()
        if not nid or not gov.deliverer().retry(nid):
            raise ConfigError(f"no dead or pending notification {nid!r}")
        return "notification_retried"
    raise ConfigError(f"unknown action {action!r}")


def notifications(guard: Guard, limit: int = 100) -> dict[str, list[dict[str, Any]]]:
    """The outbox's dead letters and its latest rows (payloads are redacted when stored)."""
    d = guard.gov.deliverer()
    return {"dead": d.list("dead", limit), "recent": d.list(None, 20)}


def stamp() -> float:
    return time.time()
