"""Policy templates: starting points, overridden field by field.

Patterns match a tool's full name (``shop.delete_user``) or its short name
(``delete_user``); see ``docs/governance.md`` for the table of what each contains.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

__all__ = ["TEMPLATES", "template"]

_DESTRUCTIVE = ["delete_*", "drop_*", "destroy_*", "wipe_*", "truncate_*"]
_READS = ["get_*", "list_*", "search_*", "read_*", "fetch_*", "lookup_*", "describe_*"]

TEMPLATES: dict[str, dict[str, Any]] = {
    # Production agents touching money: small budgets, destructive tools off, money moves
    # need a human.
    "strict": {
        "blocked_tools": _DESTRUCTIVE,
        "require_approval": ["refund*", "transfer*", "payout*", "send_payment*"],
        "max_actions_per_hour": 30,
        "max_spend_usd_per_day": 10.0,
        "max_calls_per_tool": {"*": 20},
        "default_risk": "medium",
        "risk_levels": {"charge*": "high", "refund*": "high", "transfer*": "critical"},
    },
    # The usual default: destructive tools off, refunds approved, generous caps.
    "moderate": {
        "blocked_tools": _DESTRUCTIVE,
        "require_approval": ["refund*", "transfer*"],
        "max_actions_per_hour": 200,
        "max_spend_usd_per_day": 100.0,
        "risk_levels": {"charge*": "medium", "refund*": "high"},
    },
    # Development and trusted automation: only the budget and rate stop a loop.
    "permissive": {
        "max_actions_per_hour": 1000,
        "max_spend_usd_per_day": 1000.0,
    },
    # Observers and research agents: reads only, no spend.
    "read_only": {
        "allowed_tools": _READS,
        "max_actions_per_hour": 500,
        "max_spend_usd_per_day": 0.0,
    },
    # A customer-support bot: look things up, write to tickets and email; refunds
    # need approval and are capped.
    "support_bot": {
        "allowed_tools": [
            *_READS,
            "send_email",
            "create_ticket",
            "update_ticket",
            "add_note",
            "refund*",
        ],
        "require_approval": ["refund*"],
        "max_actions_per_hour": 100,
        "max_spend_usd_per_day": 50.0,
        "max_calls_per_tool": {"send_email": 50, "refund*": 5},
        "risk_levels": {"refund*": "high", "send_email": "medium"},
    },
}


def template(name: str) -> dict[str, Any]:
    try:
        base = TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            f"unknown policy template {name!r}; choose one of {', '.join(sorted(TEMPLATES))}"
        ) from None
    # Copies: a caller's override must never mutate the template.
    return {
        k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
        for k, v in base.items()
    }
