"""The adapter contract: every outcome of a guarded call, classified once.

Adapters render; the core decides. :func:`classify` turns whatever a call ended with — a
:class:`~onceonly_core.governance.models.ToolResult`, an
:class:`~onceonly_core.protocol.Outcome`, or an exception the call path raised — into one
:class:`Classification`: a stable ``code``, structured fields, and ``text``, one sentence
written for the model that says what happened and what to do next. Adapters turn that into
their framework's native type (a ``ToolMessage``, a ``function_call_output``, a
``ToolOutput``) and add nothing of their own, so every framework answers the same way.

``Guard.run_call_classified`` / ``arun_call_classified`` run a call and classify it in one
step. The codes, their fields and their texts are tabulated in docs/integrations/contract.md.

Codes, and whether the tool ran *in this call* (``ran``):

==================  ======  ============================================================
code                ran     when
==================  ======  ============================================================
executed            yes     it ran now (also: it ran but its completion was not recorded)
replayed            no      it ran earlier with these arguments: the stored result
blocked             no      governance refused it (``reason``: the policy reason code),
                            or a duplicate with ``replay=False`` (``reason="dedup"``)
pending_approval    no      it waits for a human approval (``approval_id``)
in_progress         no      the same call is running elsewhere (live lease)
unknown_outcome     unknown an earlier attempt stopped before recording its outcome
failed              yes     the tool raised (``error``, ``error_type``); also a replayed
                            recorded failure (``cache_errors=True``; ran: no)
guard_error         no      our infrastructure or configuration failed (ledger down...)
invalid_arguments   no      arguments that cannot be keyed (NaN, Infinity, unknown
                            types), that fail the schema, or that reuse a key
interrupted         unknown cancellation, KeyboardInterrupt, a framework interrupt:
                            control flow, re-raised by ``run_call_classified``
==================  ======  ============================================================
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

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
    PolicyBlocked,
    RemoteToolError,
    ResultNotStored,
    StoreError,
    UnknownOutcome,
)

# is_interrupt / register_interrupt: the registry lives in the protocol (the ledger's
# release of an interrupted call reads it); adapters import it from here.
from .protocol import Outcome, is_interrupt, register_interrupt, safe_str

if TYPE_CHECKING:
    from .governance.models import ToolResult

__all__ = [
    "CODES",
    "Classification",
    "Code",
    "classify",
    "invalid_arguments",
    "invalid_json",
    "is_interrupt",
    "preview",
    "register_interrupt",
    "unknown_tool",
]

Code = Literal[
    "executed",
    "replayed",
    "blocked",
    "pending_approval",
    "in_progress",
    "unknown_outcome",
    "failed",
    "guard_error",
    "invalid_arguments",
    "interrupted",
]
CODES: tuple[str, ...] = get_args(Code)

#: Characters of a result or an error shown in a model text (the full value stays in
#: ``Classification.result`` / ``error``).
PREVIEW_CHARS = 500

# Caps are fixed UTC windows (governance/engine.py): a cap frees up at the next boundary.
_HOUR, _DAY = 3600, 86400
_WINDOW = {
    "max_actions_per_hour_exceeded": _HOUR,
    "max_calls_per_tool_exceeded": _DAY,
    "daily_spend_exceeded": _DAY,
}


@dataclass(frozen=True, slots=True)
class Classification:
    """One outcome of one guarded call, as every adapter answers it.

    ``code`` is stable (see :data:`CODES`); ``text`` is one sentence for the model.
    ``ran`` says whether the tool ran in this call: True, False, or None (unknown).
    ``decision`` is the governance decision (``executed``, ``dedup``, ``blocked``,
    ``failed``, ``pending_approval``) when the call was decided there, else None.
    ``reason`` refines the code: the policy reason of ``blocked`` (``tool_blocked``,
    ``daily_spend_exceeded``, ``agent_disabled``, ``dedup``...), or why an ``executed``
    / ``replayed`` / ``invalid_arguments`` / ``failed`` / ``guard_error`` is special
    (``completion_not_recorded``, ``result_unavailable``, ``result_not_stored``,
    ``key_reuse``...).
    ``result`` is the tool's value for ``executed`` / ``replayed`` (not serialised by
    :meth:`as_dict`; ``result_preview`` is). ``retry_after`` (seconds) is set where
    waiting helps: a cap that frees up at the next hour or day.
    ``exception`` is the exception the outcome came from, if any (for logging, and to
    re-raise an interruption).
    """

    code: Code
    tool: str
    text: str
    ran: bool | None
    reason: str | None = None
    decision: str | None = None
    key: str | None = None
    namespace: str | None = None
    approval_id: str | None = None
    retry_after: float | None = None
    result: Any = field(default=None, compare=False)
    result_preview: str | None = None
    error: str | None = None
    error_type: str | None = None
    agent_id: str | None = None
    run_id: str | None = None
    token: int | None = None
    spend_usd: float = 0.0
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """True when the call has a result: ``executed`` or ``replayed``."""
        return self.code in ("executed", "replayed")

    def as_dict(self) -> dict[str, Any]:
        """The structured fields, JSON-safe (no result object, no exception): for tool
        message metadata, logs and events."""
        return {
            "code": self.code,
            "tool": self.tool,
            "ran": self.ran,
            "reason": self.reason,
            "decision": self.decision,
            "key": self.key,
            "namespace": self.namespace,
            "approval_id": self.approval_id,
            "retry_after": self.retry_after,
            "result_preview": self.result_preview,
            "error": self.error,
            "error_type": self.error_type,
            "agent_id": self.agent_id,
            "run_id": self.run_id,
            "token": self.token,
            "spend_usd": self.spend_usd,
            "text": self.text,
        }


# -- texts ---------------------------------------------------------------------------------
# One encoder, built once: json.dumps() with any non-default option builds a new
# JSONEncoder on every call (~1 us of the ~2 us a small preview costs).
_PREVIEW_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True)


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """A short text of a result for a model sentence: strings as they are, anything else
    as compact JSON (pydantic models, dataclasses, datetimes included), cut at ``limit``."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = _PREVIEW_JSON.encode(_jsonable()(value, fallback=repr))
        except Exception:  # a value whose repr or fields raise: say so, never fail here
            text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(text: str | None, limit: int = 300) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _blocked_text(tool: str, reason: str, detail: str, wait: float | None) -> str:
    more = f": {_short(detail)}" if detail else ""
    if reason == "dedup":
        return (
            f"Already done: {tool} ran earlier with these arguments and is not repeated; "
            "do not call it again."
        )
    if reason == "agent_disabled":
        return f"Not allowed: this agent is disabled{more}; stop calling tools and tell the user."
    if reason == "tool_not_found":
        return f"Not allowed: there is no tool named {tool}{more}; do not call it again."
    if reason == "approval_denied":
        return (
            f"Not allowed: a person denied approval for {tool}{more}; do not retry this call; "
            "tell the user."
        )
    if wait is not None:
        return (
            f"Not allowed now: {tool} is over a limit ({reason}); do not retry this call for "
            f"{int(wait)} seconds; tell the user or do something else."
        )
    return (
        f"Not allowed: {tool} was blocked by policy ({reason}{more}); do not retry this call; "
        "tell the user or do something else."
    )


def _make(
    code: Code,
    tool: str,
    *,
    reason: str | None = None,
    detail: str = "",
    result: Any = None,
    err: BaseException | None = None,
    now: float | None = None,
    **fields: Any,
) -> Classification:
    """Build a Classification with its model text: the one place the texts live."""
    ran: bool | None
    shown = None
    wait = None
    etype = fields.pop("error_type", None) or (type(err).__name__ if err is not None else None)
    error = fields.pop("error", None)
    if error is None and err is not None:
        error = safe_str(err)
    if code == "executed":
        ran, shown, reason = True, preview(result), reason or "ok"
        if reason == "completion_not_recorded":
            text = (
                f"Done: {tool} ran, but its record may not have been saved; do not call it "
                f"again with these arguments; its result: {shown}"
            )
        elif reason == "lease_lost":
            text = (
                f"Done: {tool} ran, but another worker took the call over meanwhile; do not "
                f"call it again with these arguments; its result: {shown}"
            )
        else:
            text = f"Done: {tool} ran; its result: {shown}"
    elif code == "replayed":
        ran, reason = False, reason or "dedup"
        head = (
            f"Already done: {tool} ran earlier with these arguments and was not run again; "
            "do not call it again; "
        )
        if reason in ("result_unavailable", "result_not_stored"):
            text = head + "its result was not stored."
        else:
            shown = preview(result)
            text = head + f"its result: {shown}"
    elif code == "blocked":
        ran = False
        assert reason is not None
        size = _WINDOW.get(reason)
        if size is not None:
            t = time.time() if now is None else now
            wait = float(math.ceil(size - t % size))
        text = _blocked_text(tool, reason, detail, wait)
    elif code == "pending_approval":
        ran = False
        text = (
            f"Waiting for human approval {fields.get('approval_id')}: {tool} has not run; do "
            "not retry it until a person approves it; tell the user it is waiting for approval."
        )
    elif code == "in_progress":
        ran = False
        text = (
            f"Already running: the same {tool} call is in progress elsewhere; do not start it "
            "again; calling it again later returns its result once it has finished."
        )
    elif code == "unknown_outcome":
        ran = None
        text = (
            f"Unknown outcome: an earlier {tool} call with these arguments stopped before its "
            "outcome was recorded, so it may or may not have run; do not call it again; ask "
            "the user to check before doing anything else."
        )
    elif code == "failed":
        if reason == "cached_failure":
            ran = False
            text = (
                f"Failed earlier: {tool} already failed with these arguments "
                f"({_short(error)}); do not call it again with the same arguments."
            )
        else:
            ran = fields.pop("ran", True)
            text = (
                f"Failed: {tool} raised {etype}: {_short(error)}; no result was recorded, so "
                "you may correct the arguments and call it again, or tell the user."
            )
    elif code == "guard_error":
        ran = False
        text = (
            f"Could not run {tool}: the guard had an internal error ({etype}); the tool did "
            "not run; try again later or tell the user."
        )
    elif code == "invalid_arguments":
        ran = False
        if reason == "key_reuse":
            text = (
                f"Conflicting call: {tool} was not run because its key was already used with "
                "different arguments; do not retry it with changed arguments; ask the user."
            )
        else:
            text = (
                f"Invalid arguments: {tool} was not run because {_short(detail)}; correct the "
                "arguments and call it again."
            )
    else:  # interrupted
        ran = None
        text = (
            f"Interrupted: {tool} was stopped before it finished and may or may not have "
            "run; do not call it again until someone checks whether it took effect."
        )
    fields.pop("ran", None)
    return Classification(
        code=code,
        tool=tool,
        text=text,
        ran=ran,
        reason=reason,
        retry_after=wait,
        result=result,
        result_preview=shown,
        error=error if code not in ("executed", "replayed") else None,
        error_type=etype if code not in ("executed", "replayed") else None,
        exception=err,
        **fields,
    )


# -- classify ------------------------------------------------------------------------------
# Imported at first use (pydantic is not loaded by ``import onceonly_core``), then kept: a
# function-level import costs ~0.3-1 us on every call of the hot path.
@functools.cache
def _tool_result() -> type[ToolResult]:
    from .governance.models import ToolResult

    return ToolResult


@functools.cache
def _jsonable() -> Callable[..., Any]:
    from pydantic_core import to_jsonable_python

    return to_jsonable_python


def classify(
    subject: Any, *, tool: str | None = None, from_tool: bool = False, now: float | None = None
) -> Classification:
    """Classify how a call ended: a ToolResult, an Outcome, or an exception.

    Pure: the same input gives the same answer (``now``, default ``time.time()``, only
    sets ``retry_after`` of a cap that frees up at the next hour or day).

    An exception is taken as raised *by the call path* (``run_call``, ``call_tool``),
    where the tool's own exceptions are returned as ``failed`` results, never raised: an
    exception that is not ours is then a ``guard_error``. Pass ``from_tool=True`` for an
    exception that came out of the tool (the facade ``guard(fn, ...)`` re-raises those
    unchanged): it is ``failed``. ``tool`` names the tool for an exception.
    """
    if isinstance(subject, _tool_result()):
        return _from_result(subject, now)
    if isinstance(subject, Outcome):
        return _from_outcome(subject)
    if isinstance(subject, BaseException):
        return _from_error(subject, tool or "the tool", from_tool, now)
    raise TypeError(
        f"classify() takes a ToolResult, an Outcome or an exception, not {type(subject)!r}"
    )


def _from_result(res: ToolResult, now: float | None) -> Classification:
    base: dict[str, Any] = {
        "decision": res.decision,
        "key": res.key,
        "namespace": res.namespace,
        "agent_id": res.agent_id,
        "run_id": res.run_id,
        "token": res.token,
        "approval_id": res.approval_id,
    }
    d = res.decision
    if d == "executed":
        return _make("executed", res.tool, result=res.result, spend_usd=res.spend_usd, **base)
    if d == "dedup":
        return _make("replayed", res.tool, result=res.result, **base)
    if d == "pending_approval":
        return _make("pending_approval", res.tool, reason=res.policy_reason, **base)
    if d == "blocked":
        return _make(
            "blocked", res.tool, reason=res.policy_reason, detail=res.error or "", now=now, **base
        )
    err = res.exception if isinstance(res.exception, BaseException) else None
    if is_interrupt(err):
        return _make("interrupted", res.tool, reason=type(err).__name__, err=err, **base)
    if isinstance(err, RemoteToolError) and err.retryable:
        base["ran"] = False  # provably not taken effect (connection refused, asked to retry)
    return _make(
        "failed",
        res.tool,
        reason=res.policy_reason,
        err=err,
        error=res.error,
        error_type=res.error_type,
        **base,
    )


def _from_outcome(o: Outcome) -> Classification:
    base: dict[str, Any] = {"key": o.key or None, "namespace": o.namespace}
    base["token"] = o.token or None
    if o.decision in ("executed", "reconciled"):
        return _make("executed", o.tool, result=o.value, **base)
    if o.decision == "replayed":
        return _make("replayed", o.tool, result=o.value, **base)
    if o.decision == "blocked":
        return _make("blocked", o.tool, reason="dedup", **base)
    if is_interrupt(o.error):
        return _make("interrupted", o.tool, reason=type(o.error).__name__, err=o.error, **base)
    return _make("failed", o.tool, reason="tool_error", err=o.error, **base)


def _from_error(
    err: BaseException, tool: str, from_tool: bool, now: float | None
) -> Classification:
    where: dict[str, Any] = {}
    for name in ("key", "namespace"):
        value = getattr(err, name, None)
        if isinstance(value, str):
            where[name] = value
    if is_interrupt(err):
        return _make("interrupted", tool, reason=type(err).__name__, err=err, **where)
    # The tool RAN: an unrecorded completion or a lost lease is never a guard error.
    if isinstance(err, CompletionNotRecorded):
        return _make(
            "executed", tool, reason="completion_not_recorded", result=err.result, err=err, **where
        )
    if isinstance(err, LeaseLost):
        return _make("executed", tool, reason="lease_lost", result=err.result, err=err, **where)
    if isinstance(err, ApprovalPending):
        return _make(
            "pending_approval",
            tool,
            reason="approval_required",
            err=err,
            approval_id=err.approval_id,
            agent_id=err.agent_id or None,
            **where,
        )
    if isinstance(err, PolicyBlocked):
        detail = safe_str(err).partition(f"blocked: {err.reason}")[2].strip(" ()")
        return _make(
            "blocked",
            tool,
            reason=err.reason,
            detail=detail,
            err=err,
            now=now,
            agent_id=err.agent_id or None,
            **where,
        )
    if isinstance(err, InProgress):
        return _make("in_progress", tool, reason="in_progress", err=err, **where)
    if isinstance(err, UnknownOutcome):
        return _make(
            "unknown_outcome", tool, reason="unknown_outcome", err=err, token=err.token, **where
        )
    if isinstance(err, KeyReuseError):
        return _make("invalid_arguments", tool, reason="key_reuse", err=err, **where)
    if isinstance(err, FingerprintError):
        detail = f"argument {err.path} {err.reason}"
        return _make("invalid_arguments", tool, reason="invalid_value", detail=detail, err=err)
    if _is_validation_error(err):
        return _make("invalid_arguments", tool, reason="validation", detail=_explain(err), err=err)
    if isinstance(err, CachedFailure):
        return _make(
            "failed",
            tool,
            reason="cached_failure",
            err=err,
            error=f"{err.error_type}: {err.message}",
            error_type=err.error_type.rpartition(".")[2] or None,
            **where,
        )
    if isinstance(err, ResultNotStored):
        # It ran once and succeeded; its result was too large (or unencodable) to store.
        return _make("replayed", tool, reason="result_not_stored", err=err, **where)
    if isinstance(err, CodecError):
        # Raised by a replay whose stored result is missing or unreadable: done before.
        return _make("replayed", tool, reason="result_unavailable", err=err, **where)
    if from_tool or isinstance(err, RemoteToolError):
        ran = not (isinstance(err, RemoteToolError) and err.retryable)
        return _make("failed", tool, reason="tool_error", err=err, ran=ran, **where)
    if isinstance(err, StoreError):
        reason = "store_error"
    elif isinstance(err, ConfigError):
        reason = "config_error"
    else:
        reason = "internal_error"
    return _make("guard_error", tool, reason=reason, err=err, **where)


def _is_validation_error(err: BaseException) -> bool:
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - pydantic is a core dependency
        return False
    return isinstance(err, ValidationError)


def _explain(err: Any) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(x) for x in e["loc"]) or "arguments"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts) or "the arguments do not match the tool's schema"


# -- answers adapters build before any call ------------------------------------------------
def invalid_arguments(
    tool: str, detail: str, *, reason: str = "validation", error: BaseException | None = None
) -> Classification:
    """Arguments the adapter rejected before calling (bad JSON, not an object, schema
    errors): ``detail`` completes "<tool> was not run because ..."."""
    return _make("invalid_arguments", tool, reason=reason, detail=detail, err=error)


def invalid_json(tool: str, error: BaseException | None = None) -> Classification:
    """The model's argument text is not a JSON object (malformed JSON, or another JSON
    value such as a list): ``invalid_arguments`` / ``invalid_json``, worded here so every
    adapter answers it with the same sentence. ``error``: what ``json.loads`` raised, if
    it raised (its position goes into the text, so the model can find the fault)."""
    if isinstance(error, json.JSONDecodeError):
        detail = (
            f"its arguments are not valid JSON ({error.msg} at line {error.lineno} "
            f"column {error.colno})"
        )
    else:
        detail = "its arguments are not a JSON object"
    return _make("invalid_arguments", tool, reason="invalid_json", detail=detail, err=error)


def unknown_tool(tool: str, available: Iterable[str] = ()) -> Classification:
    """A call of a tool name the adapter does not have: ``blocked`` / ``tool_not_found``,
    as governance answers a registered-tool lookup that finds nothing."""
    names = ", ".join(sorted(available))
    return _make(
        "blocked",
        tool,
        reason="tool_not_found",
        detail=f"available tools: {names}" if names else "",
        decision="blocked",
    )
