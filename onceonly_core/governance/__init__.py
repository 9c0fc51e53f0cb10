"""Governance (DESIGN §5): policies, atomic caps and budgets, the kill switch, the tools
registry, approvals, the tamper-evident audit log, metrics and run timelines.

Reached through a guard: ``guard.gov.upsert_policy(...)``, ``guard.call_tool(...)``.
"""

from __future__ import annotations

from .models import (
    AgentMetrics,
    Approval,
    AuditEntry,
    Policy,
    TimelineEvent,
    ToolResult,
    ToolSpec,
)
from .templates import TEMPLATES

__all__ = [
    "TEMPLATES",
    "AgentMetrics",
    "Approval",
    "AuditEntry",
    "Policy",
    "TimelineEvent",
    "ToolResult",
    "ToolSpec",
]
