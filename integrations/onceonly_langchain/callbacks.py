"""Callback handlers: visibility without changing how an agent is built.

``OnceOnlyCallbackHandler`` (sync) and ``AsyncOnceOnlyCallbackHandler`` record every
tool start, end and error on the run timeline (``guard.gov.post_event``), keyed by
LangChain's run ids, and — with an ``agent_id`` — in the audit log.

Limits, by LangChain's design: a callback cannot skip a tool or replace its result, so
these handlers never deduplicate. ``enforce=True`` raises :class:`ToolCallBlocked` from
``on_tool_start`` for a call the agent's policy refuses (kill switch, blocked / not
allowed tool, approval required); that stops the tool, and with it the run unless the
``ToolNode`` handles the error. Caps and budgets are not enforced here (they need the
call to go through the guard). Use ``OnceOnlyMiddleware`` or ``guard_tool`` to enforce.

A LangGraph ``interrupt()`` is not a failure: the tool and the run are recorded as
``interrupted``, with no failed audit row.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler

from onceonly_core import Classification, Guard, classify
from onceonly_core import guard as default_guard
from onceonly_core.contract import is_interrupt, preview
from onceonly_core.errors import ConfigError, PolicyBlocked

__all__ = ["AsyncOnceOnlyCallbackHandler", "OnceOnlyCallbackHandler", "ToolCallBlocked"]

_PREVIEW = 500


class ToolCallBlocked(PolicyBlocked):
    """Raised by an enforcing callback handler for a tool call the policy refuses.

    ``classification`` is the core's answer (code ``blocked``); the message is its text."""

    def __init__(self, agent_id: str, tool: str, reason: str, detail: str = "") -> None:
        super().__init__(agent_id, tool, reason, detail)
        self.classification: Classification = classify(
            PolicyBlocked(agent_id, tool, reason, detail), tool=tool
        )
        self.args = (self.classification.text,)


def _preview(value: Any) -> str:
    content = getattr(value, "content", value)  # a ToolMessage: its content
    return preview(content, _PREVIEW)


class _Recorder:
    """The handlers' one core: LangChain's callback events, turned into timeline events and
    audit rows. Synchronous; the async handler runs it in a worker thread."""

    def __init__(self, guard: Guard, agent_id: str | None, run_id: str | None, enforce: bool):
        if enforce and agent_id is None:
            raise ConfigError("enforce=True needs an agent_id: policies are per agent")
        self.guard = guard
        self.agent_id = agent_id
        self.run_id = run_id
        self.enforce = enforce
        # LangChain run id -> (timeline run id, tool name). Entries leave on end/error.
        self.runs: dict[UUID, tuple[str, str | None]] = {}
        self.last_run_id: str | None = None
        self.lock = threading.Lock()

    # -- LangChain's events (the handlers' methods, by name) -----------------------------
    def on_chain_start(
        self,
        serialized: Mapping[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kw: Any,
    ) -> None:
        timeline = self._timeline(run_id, parent_run_id)
        with self.lock:
            self.runs[run_id] = (timeline, None)
        if parent_run_id is None:
            self.last_run_id = timeline
            name = _name(serialized, kw)
            self.post(timeline, "run_started", status="running", data={"name": name})

    def on_chain_end(
        self, outputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kw: Any
    ) -> None:
        self._chain_end(run_id, parent_run_id, None)

    def on_chain_error(
        self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None, **kw: Any
    ) -> None:
        self._chain_end(run_id, parent_run_id, error)

    def on_tool_start(
        self,
        serialized: Mapping[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        inputs: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        tool = _name(serialized, kw) or "tool"
        timeline = self._timeline(run_id, parent_run_id)
        with self.lock:
            self.runs[run_id] = (timeline, tool)
        data = {
            "lc_run_id": str(run_id),
            "tool_call_id": kw.get("tool_call_id"),
            "args": dict(inputs) if inputs is not None else input_str[:_PREVIEW],
        }
        if self.enforce:
            assert self.agent_id is not None
            refused = self.refusal(tool)
            if refused is not None:
                with self.lock:
                    self.runs.pop(run_id, None)
                reason, detail = refused
                blocked = {**data, "reason": reason}
                self.post(timeline, "blocked", tool=tool, status="blocked", data=blocked)
                self.audit(tool, data["args"], "blocked", reason, timeline)
                raise ToolCallBlocked(self.agent_id, tool, reason, detail)
        self.post(timeline, "tool_call", tool=tool, status="started", data=data)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kw: Any) -> None:
        self._tool_end(run_id, output, None)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kw: Any) -> None:
        self._tool_end(run_id, None, error)

    # -- what they record ----------------------------------------------------------------
    def _timeline(self, run_id: UUID, parent: UUID | None) -> str:
        if self.run_id is not None:
            return self.run_id
        with self.lock:
            if parent is not None and parent in self.runs:
                return self.runs[parent][0]
        # Not seen (the handler was attached below the root): the parent's id, else ours.
        return str(parent or run_id)

    def _chain_end(self, run_id: UUID, parent: UUID | None, error: BaseException | None) -> None:
        with self.lock:
            entry = self.runs.pop(run_id, None)
        if entry is not None and parent is None:
            data = None if error is None else {"error": f"{type(error).__name__}: {error}"}
            status = "ok" if error is None else "failed"
            if is_interrupt(error):
                status = "interrupted"  # a human in the loop: the run pauses, it did not fail
            self.post(entry[0], "run_finished", status=status, data=data)

    def _tool_end(self, run_id: UUID, output: Any, error: BaseException | None) -> None:
        with self.lock:
            entry = self.runs.pop(run_id, None)
        if entry is None:
            return
        timeline, tool = entry
        data: dict[str, Any] = {"lc_run_id": str(run_id)}
        if error is None:
            data["output"] = _preview(output)
            status = "error" if getattr(output, "status", None) == "error" else "executed"
        else:
            data["error"] = f"{type(error).__name__}: {str(error)[:_PREVIEW]}"
            status = "interrupted" if is_interrupt(error) else "failed"
        self.post(timeline, "tool_result", tool=tool, status=status, data=data)
        if status == "interrupted":
            return  # control flow, not an outcome: nothing to audit
        decision = "executed" if status == "executed" else "failed"
        reason = "ok" if decision == "executed" else "tool_error"
        self.audit(tool or "", None, decision, reason, timeline)

    def refusal(self, tool: str) -> tuple[str, str] | None:
        """(reason, detail) when the agent's policy refuses ``tool`` now, else None."""
        assert self.agent_id is not None
        verdict = self.guard.gov.check(self.agent_id, tool)
        if not verdict["allowed"]:
            return str(verdict["reason"]), str(verdict.get("detail") or "")
        # A callback cannot wait for a human: a tool that needs approval is refused here.
        return ("approval_required", "") if verdict["needs_approval"] else None

    def post(
        self,
        timeline: str,
        kind: str,
        *,
        tool: str | None = None,
        status: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.guard.gov.post_event(
            timeline, kind, agent_id=self.agent_id, tool=tool, status=status, data=data
        )

    def audit(self, tool: str, args: Any, decision: str, reason: str, run: str) -> None:
        if self.agent_id is None or not tool:
            return
        # An observed call (not governed here): recorded in the same hash-chained log.
        self.guard.gov.record(
            self.agent_id, tool, decision=decision, reason=reason, args=args, run_id=run
        )


def _name(serialized: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> str | None:
    name = kwargs.get("name")
    if name:
        return str(name)
    if serialized:
        return str(serialized.get("name") or "") or None
    return None


def _sync(event: str) -> Callable[..., None]:
    def handle(self: OnceOnlyCallbackHandler, *args: Any, **kwargs: Any) -> None:
        getattr(self.recorder, event)(*args, **kwargs)

    handle.__name__ = handle.__qualname__ = event
    return handle


def _async(event: str) -> Callable[..., Any]:
    async def handle(self: AsyncOnceOnlyCallbackHandler, *args: Any, **kwargs: Any) -> None:
        method = getattr(self.recorder, event)
        if self.recorder.guard.gov.store.kind == "memory":
            method(*args, **kwargs)
        else:
            await asyncio.to_thread(method, *args, **kwargs)  # the event loop never waits

    handle.__name__ = handle.__qualname__ = event
    return handle


class _Handler:
    """What both handlers share: the recorder, its options, ``last_run_id``."""

    def __init__(
        self,
        guard: Guard | None = None,
        *,
        agent_id: str | None = None,
        run_id: str | None = None,
        enforce: bool = False,
    ) -> None:
        self.recorder = _Recorder(guard or default_guard, agent_id, run_id, enforce)
        # LangChain swallows a handler's errors unless it says otherwise.
        self.raise_error = enforce

    @property
    def last_run_id(self) -> str | None:
        """The timeline id of the latest root run this handler saw."""
        return self.recorder.last_run_id


class OnceOnlyCallbackHandler(_Handler, BaseCallbackHandler):
    """Record tool calls on the OnceOnly run timeline (and audit log, with ``agent_id``).

    ``run_id``: one timeline for everything (default: the root LangChain run's id).
    ``enforce=True`` (needs ``agent_id``) refuses blocked tools by raising
    :class:`ToolCallBlocked`; it sets ``raise_error`` so LangChain does not swallow it.
    """

    on_chain_start = _sync("on_chain_start")
    on_chain_end = _sync("on_chain_end")
    on_chain_error = _sync("on_chain_error")
    on_tool_start = _sync("on_tool_start")
    on_tool_end = _sync("on_tool_end")
    on_tool_error = _sync("on_tool_error")


class AsyncOnceOnlyCallbackHandler(_Handler, AsyncCallbackHandler):
    """:class:`OnceOnlyCallbackHandler` for async runs: the database writes run in a
    worker thread, so the event loop never waits on the ledger.

    LangChain swallows errors of async handlers driven from sync code — including a
    sync-only tool under ``ainvoke``, which LangChain runs through its sync path — so
    ``enforce`` here only holds for async tools. :class:`OnceOnlyCallbackHandler`
    enforces in sync and async runs alike.
    """

    on_chain_start = _async("on_chain_start")
    on_chain_end = _async("on_chain_end")
    on_chain_error = _async("on_chain_error")
    on_tool_start = _async("on_tool_start")
    on_tool_end = _async("on_tool_end")
    on_tool_error = _async("on_tool_error")
