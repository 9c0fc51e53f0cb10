"""One LlamaIndex instrumentation event per guard decision.

Every guarded call ends in one :class:`GuardDecisionEvent` on the
``onceonly_llamaindex`` dispatcher (a child of LlamaIndex's root dispatcher), so any
LlamaIndex observability (an event handler, Arize Phoenix, Langfuse, OpenTelemetry...)
sees what the guard decided next to the tool span it belongs to: the event's
``span_id`` is the guarded tool's ``call`` / ``acall`` span, and its ``tags`` carry the
workflow run (``llamaindex.run_id``).
"""

from __future__ import annotations

from typing import Any

from llama_index.core.instrumentation.event_handlers import NullEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index_instrumentation import get_dispatcher  # llama-index-core re-exports it

from onceonly_core import Classification

__all__ = ["DISPATCHER_NAME", "GuardDecisionEvent", "emit"]

#: The dispatcher the decision events go to (it propagates to the root dispatcher).
DISPATCHER_NAME = "onceonly_llamaindex"

_dispatcher = get_dispatcher(DISPATCHER_NAME)


class GuardDecisionEvent(BaseEvent):
    """What the guard decided for one tool call: the adapter contract's classification.

    ``code`` is the contract code (``executed``, ``replayed``, ``blocked``, ...);
    ``classification`` is ``Classification.as_dict()`` (JSON-safe: no result object).
    """

    code: str
    tool: str
    reason: str | None = None
    ran: bool | None = None
    key: str | None = None
    run_id: str | None = None
    agent_id: str | None = None
    approval_id: str | None = None
    classification: dict[str, Any]

    @classmethod
    def class_name(cls) -> str:
        return "OnceOnlyGuardDecision"


# The classification's fields an event carries at the top level, for filtering.
_FIELDS = ("code", "tool", "reason", "ran", "key", "run_id", "agent_id", "approval_id")


def emit(c: Classification) -> None:
    """Dispatch the decision (LlamaIndex swallows a failing handler: observe only).

    Built only when a handler listens on the way up the dispatcher chain (the path
    ``Dispatcher.event`` walks): an event is a pydantic model with a fresh uuid, several
    microseconds on every call for nobody."""
    if not _listened():
        return
    d = c.as_dict()
    _dispatcher.event(GuardDecisionEvent(**{k: d[k] for k in _FIELDS}, classification=d))


def _listened() -> bool:
    c: Any = _dispatcher
    while c is not None:
        for h in c.event_handlers:
            if type(h) is not NullEventHandler:  # the root's default: does nothing
                return True
        c = c.parent if c.propagate else None
    return False
