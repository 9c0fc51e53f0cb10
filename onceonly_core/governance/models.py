"""Public governance models (pydantic v2): policies, tool results, registry entries,
approvals, audit entries, timeline events and metrics.

Spend is carried as ``float`` US dollars in the API and stored as integer micro-dollars
(``round(usd * 1_000_000)``) in the database, so sums and caps are exact.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..limits import MAX_CAP_USD, MAX_SPEND_USD

__all__ = [
    "DECISIONS",
    "REASONS",
    "AgentMetrics",
    "Approval",
    "AuditEntry",
    "Decision",
    "Policy",
    "RiskLevel",
    "TimelineEvent",
    "ToolResult",
    "ToolSpec",
    "micros",
]

Decision = Literal["executed", "dedup", "blocked", "failed", "pending_approval"]
RiskLevel = Literal["low", "medium", "high", "critical"]
DECISIONS: tuple[str, ...] = ("executed", "dedup", "blocked", "failed", "pending_approval")

#: Stable reason codes, in evaluation order (DESIGN §5), then the outcome codes.
REASONS: tuple[str, ...] = (
    "agent_disabled",
    "tool_not_found",
    "tool_disabled",
    "tool_blocked",
    "tool_not_in_allowed_list",
    "approval_required",
    "approval_denied",
    "max_calls_per_tool_exceeded",
    "max_actions_per_hour_exceeded",
    "daily_spend_exceeded",
    "ok",
    "dedup",
    "tool_error",
)

TOOL_NAME = re.compile(r"^[a-zA-Z0-9_.:-]+$")
MICROS = 1_000_000


def micros(usd: float | int | None) -> int:
    """US dollars → integer micro-dollars (exact sums and caps in the database).

    Refuses what cannot be a price: not a number, not finite, negative, or more than
    :data:`MAX_SPEND_USD` for one call."""
    if usd is None:
        return 0
    if isinstance(usd, bool) or not isinstance(usd, (int, float)):
        raise TypeError(f"spend_usd must be a number, got {type(usd).__name__}")
    if usd != usd or usd in (float("inf"), float("-inf")):
        raise ValueError("spend_usd must be finite")
    if usd < 0:
        raise ValueError(f"spend_usd must be >= 0, got {usd}")
    if usd > MAX_SPEND_USD:
        raise ValueError(f"spend_usd must be at most {MAX_SPEND_USD:,} per call, got {usd:g}")
    return round(usd * MICROS)


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
        isinstance(v, str) for v in value
    ):
        raise ValueError("must be a name or a list of names")  # pydantic: a 422, not a 500
    return list(value)


def _hit(name: str, pattern: str) -> bool:
    short = name.rsplit(".", 1)[-1]
    return (
        name == pattern
        or short == pattern
        or fnmatch.fnmatchcase(name, pattern)
        or fnmatch.fnmatchcase(short, pattern)
    )


def matches(name: str, patterns: list[str]) -> bool:
    """Exact names and shell globs (``stripe.*``, ``delete_*``), case-sensitive, against
    the tool's full name (``shop.charge_card``) or its short name (``charge_card``)."""
    return any(_hit(name, p) for p in patterns)


class Policy(BaseModel):
    """What one agent may do. ``None`` means "no limit" for every cap.

    Tool names in lists, caps, prices and risk levels may be exact names or globs.
    """

    model_config = ConfigDict(extra="forbid")

    agent_id: str = Field(min_length=1, max_length=255)
    allowed_tools: list[str] | None = None
    """None: every tool is allowed (unless blocked). A list: only these (globs)."""
    blocked_tools: list[str] = Field(default_factory=list)
    max_actions_per_hour: int | None = Field(default=None, ge=0)
    max_spend_usd_per_day: float | None = Field(
        default=None, ge=0, le=MAX_CAP_USD, allow_inf_nan=False
    )
    max_calls_per_tool: dict[str, int] = Field(default_factory=dict)
    """Per-tool cap per UTC day: tool (or glob) → calls."""
    pricing_rules: dict[str, float] = Field(default_factory=dict)
    """Tool (or glob) → price in USD, used when a call gives no ``spend_usd``."""
    require_approval: list[str] = Field(default_factory=list)
    risk_levels: dict[str, RiskLevel] = Field(default_factory=dict)
    default_risk: RiskLevel = "low"
    template: str | None = None

    @field_validator("allowed_tools", "blocked_tools", "require_approval", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return v if v is None else _names(v)

    @field_validator("max_calls_per_tool")
    @classmethod
    def _caps(cls, v: dict[str, int]) -> dict[str, int]:
        for name, cap in v.items():
            if cap < 0:
                raise ValueError(f"max_calls_per_tool[{name!r}] must be >= 0")
        return v

    @field_validator("pricing_rules")
    @classmethod
    def _prices(cls, v: dict[str, float]) -> dict[str, float]:
        for name, price in v.items():
            micros(price)  # raises on negative / non-finite
            del name
        return v

    def _lookup(self, table: dict[str, Any], tool: str) -> Any:
        if tool in table:  # an exact entry wins over globs
            return table[tool]
        for pattern, value in table.items():
            if _hit(tool, pattern):
                return value
        return None

    def risk_for(self, tool: str) -> str:
        found = self._lookup(self.risk_levels, tool)
        return str(found) if found is not None else self.default_risk

    def price_for(self, tool: str) -> float | None:
        found = self._lookup(self.pricing_rules, tool)
        return None if found is None else float(found)

    def cap_for(self, tool: str) -> int | None:
        found = self._lookup(self.max_calls_per_tool, tool)
        return None if found is None else int(found)


class ToolResult(BaseModel):
    """The outcome of one governed tool call. Never raised: always returned.

    ``message`` is text for a model: why a call was blocked or is waiting.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    ok: bool
    allowed: bool
    decision: Decision
    policy_reason: str
    risk_level: RiskLevel = "low"
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    tool: str
    agent_id: str | None = None
    run_id: str | None = None
    key: str | None = None
    namespace: str | None = None
    spend_usd: float = 0.0
    approval_id: str | None = None
    token: int | None = None
    """The fencing token of the execution (executed / dedup)."""
    exception: Any = Field(default=None, exclude=True, repr=False)
    """The tool's own exception object for ``failed`` (not serialised)."""

    @property
    def message(self) -> str:
        if self.decision in ("executed", "dedup"):
            return "ok"
        if self.decision == "pending_approval":
            return (
                f"Tool {self.tool!r} needs human approval before it can run "
                f"(request {self.approval_id}). Do not retry it now; tell the user it is "
                "waiting for approval."
            )
        if self.decision == "blocked":
            return f"Tool {self.tool!r} was blocked by policy: {self.policy_reason}."
        return f"Tool {self.tool!r} failed: {self.error or self.policy_reason}"


class ToolSpec(BaseModel):
    """A registered tool: a local Python callable or a remote HTTP tool.

    ``secret`` is write-only: reads return ``has_secret`` and never the secret.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    kind: Literal["local", "http"] = "local"
    url: str | None = None
    scope_id: str = "global"
    auth: Literal["none", "hmac_sha256"] = "none"
    timeout_ms: int = Field(default=10_000, ge=1, le=600_000)
    max_retries: int = Field(default=2, ge=0, le=10)
    enabled: bool = True
    description: str = ""
    has_secret: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TOOL_NAME.match(v):
            raise ValueError(f"tool name must match {TOOL_NAME.pattern}, got {v!r}")
        return v

    @field_validator("scope_id")
    @classmethod
    def _scope(cls, v: str) -> str:
        if len(v) > 128:
            raise ValueError("scope_id must be at most 128 characters")
        if v != "global" and not (v.startswith("agent:") and len(v) > len("agent:")):
            raise ValueError(f"scope_id must be 'global' or 'agent:<id>', got {v!r}")
        return v


class Approval(BaseModel):
    id: str
    agent_id: str
    tool: str
    namespace: str
    key: str
    state: Literal["pending", "approved", "denied", "consumed"]
    args: Any = None
    """The call's arguments, redacted."""
    reason: str | None = None
    decided_by: str | None = None
    created_at: float
    decided_at: float | None = None


class AuditEntry(BaseModel):
    id: int
    agent_id: str
    seq: int
    tool: str
    args_digest: str | None
    args: Any = None
    decision: str
    reason: str
    risk_level: str
    spend_usd: float
    run_id: str | None
    token: int | None
    key: str | None
    created_at: float
    hash: str


class TimelineEvent(BaseModel):
    id: int
    run_id: str
    type: str
    agent_id: str | None = None
    tool: str | None = None
    status: str | None = None
    data: Any = None
    created_at: float


class AgentMetrics(BaseModel):
    agent_id: str
    period: Literal["hour", "day", "week"]
    since: float
    total_actions: int
    executed: int
    dedup: int
    blocked: int
    failed: int
    pending_approval: int
    spend_usd: float
    top_tools: list[tuple[str, int]]
