"""``OnceOnlyMiddleware``: every tool call of a ``create_agent`` agent, governed and claimed.

The middleware sits where LangChain makes the call (``wrap_tool_call`` /
``awrap_tool_call``), so it can do what a callback cannot: skip the tool and answer
for it. Each call ends in exactly one ``ToolMessage`` for its ``tool_call_id``:

- executed: the tool's own message;
- replayed: the stored result, re-addressed to the *current* call id;
- blocked / pending approval / ledger unavailable: an error message telling the model why.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
import threading
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import ToolMessage
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command
from pydantic_core import PydanticUndefined

from onceonly_core import Guard
from onceonly_core import guard as default_guard
from onceonly_core.errors import OnceOnlyError
from onceonly_core.governance.models import ToolResult

from ._common import (
    _THREAD,
    GraphBubbleUp,
    Resolver,
    Settings,
    SpendRule,
    decode_output,
    encode_output,
    infra_text,
    ran_anyway,
    reraise_config,
    scoped,
)

__all__ = ["OnceOnlyMiddleware"]

Output = ToolMessage | Command[Any]
Handler = Callable[[ToolCallRequest], Any]

# The call being executed in this thread / task: (handler, request, holder for the live
# output). The runner passed to the core is one stable function per argument shape (so
# the core's per-function cache stays small), so it finds its call here.
_active: contextvars.ContextVar[tuple[Handler, ToolCallRequest, list[Any]]] = (
    contextvars.ContextVar("onceonly_langchain_call")
)
_MAX_RUNNERS = 4096


class _ErrorOutput(Exception):
    """The tool answered with an error message: a failure, so it is not replayed."""

    def __init__(self, output: ToolMessage) -> None:
        super().__init__(str(output.content)[:2000])
        self.output = output


def _settle(output: Any, holder: list[Any], call_id: str | None) -> dict[str, Any]:
    if isinstance(output, ToolMessage) and output.status == "error":
        raise _ErrorOutput(output)
    holder.append(output)
    return encode_output(output, call_id)


def _run_sync(**_: Any) -> dict[str, Any]:
    handler, request, holder = _active.get()
    return _settle(handler(request), holder, request.tool_call.get("id"))


async def _run_async(**_: Any) -> dict[str, Any]:
    handler, request, holder = _active.get()
    return _settle(await handler(request), holder, request.tool_call.get("id"))


def _call_id(request: ToolCallRequest) -> str:
    return request.tool_call.get("id") or ""


def _make_runner(is_async: bool) -> Callable[..., Any]:
    if is_async:

        async def arunner(**kw: Any) -> Any:
            return await _run_async(**kw)

        arunner.__qualname__ = arunner.__name__ = "langchain_tool_call"
        return arunner

    def runner(**kw: Any) -> Any:
        return _run_sync(**kw)

    runner.__qualname__ = runner.__name__ = "langchain_tool_call"
    return runner


class OnceOnlyMiddleware(AgentMiddleware):
    """Govern and claim every tool call of an agent (``create_agent(middleware=[...])``).

    ``guard``: the Guard (default: ``onceonly_core.guard``). ``agent_id``: governance
    policies apply to this agent. ``scope``: the dedup scope (default: the LangGraph
    thread id, or an enclosing ``guard.workflow``; a string or ``config -> str``; None:
    the guard's current namespace). ``run_id``: the timeline run (a string, or
    ``thread_run_id`` for one per thread; default: the enclosing ``guard.run``).
    ``spend_usd``: ``{tool: usd}`` or ``(tool, args) -> usd``.
    ``tools``: govern only these names (default: all).
    ``tool_options``: per-tool guard options, e.g. ``{"send_email": {"key_args": ["to"]}}``;
    ``**options`` apply to every tool (``ttl=``, ``wait=``, ...).
    """

    def __init__(
        self,
        guard: Guard | None = None,
        *,
        agent_id: str | None = None,
        scope: Resolver | object = _THREAD,
        run_id: Resolver = None,
        spend_usd: SpendRule = None,
        tools: Collection[str] | None = None,
        tool_options: Mapping[str, Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.settings = Settings(
            guard or default_guard,
            agent_id=agent_id,
            scope=scope,
            run_id=run_id,
            spend_usd=spend_usd,
            options=options,
            tool_options=dict(tool_options or {}),
        )
        self.only = None if tools is None else frozenset(tools)
        # Per tool: the options dict passed to the core, built once. The core caches its
        # prepared tools by the identity of option values, so they must be stable objects.
        self._opts: dict[str, dict[str, Any]] = {}
        self._runners: dict[tuple[bool, tuple[str, ...]], Callable[..., Any]] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "OnceOnlyMiddleware"

    # -- the two hooks -------------------------------------------------------------------
    def wrap_tool_call(self, request: ToolCallRequest, handler: Handler) -> Output:
        call = request.tool_call
        name = call["name"]
        if self.only is not None and name not in self.only:
            return handler(request)  # type: ignore[no-any-return]
        s = self.settings
        config = request.runtime.config if request.runtime is not None else None
        runner, args = self._runner(False, self._arguments(request))
        holder: list[Any] = []
        token = _active.set((handler, request, holder))
        try:
            with scoped(s.guard, s.scope_for(config)):
                res = s.guard.call_tool(
                    runner,
                    args,
                    # Interned: the core caches prepared tools by the identity of options.
                    tool=sys.intern(name),
                    agent_id=s.agent_id,
                    spend_usd=s.spend_for(name, call["args"]),
                    run_id=s.run_for(config),
                    **self._options(name),
                )
        except OnceOnlyError as err:
            return self._infra(request, err)
        finally:
            _active.reset(token)
        return self._answer(request, res, holder)

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[Any]]
    ) -> Output:
        call = request.tool_call
        name = call["name"]
        if self.only is not None and name not in self.only:
            return await handler(request)  # type: ignore[no-any-return]
        s = self.settings
        config = request.runtime.config if request.runtime is not None else None
        runner, args = self._runner(True, self._arguments(request))
        holder: list[Any] = []
        token = _active.set((handler, request, holder))
        try:
            with scoped(s.guard, s.scope_for(config)):
                res = await s.guard.acall_tool(
                    runner,
                    args,
                    # Interned: the core caches prepared tools by the identity of options.
                    tool=sys.intern(name),
                    agent_id=s.agent_id,
                    spend_usd=s.spend_for(name, call["args"]),
                    run_id=s.run_for(config),
                    **self._options(name),
                )
        except OnceOnlyError as err:
            return self._infra(request, err)
        finally:
            _active.reset(token)
        return self._answer(request, res, holder)

    # -- decisions → one ToolMessage ---------------------------------------------------
    def _answer(self, request: ToolCallRequest, res: ToolResult, holder: list[Any]) -> Output:
        call_id = _call_id(request)
        name = request.tool_call["name"]
        meta = {"decision": res.decision, "policy_reason": res.policy_reason, "key": res.key}
        if res.decision == "executed":
            if holder:
                live = holder[-1]
                if isinstance(live, ToolMessage):
                    live.response_metadata = {**live.response_metadata, "onceonly": meta}
                return live  # type: ignore[no-any-return]
            return self._replay(res.result, call_id, name, meta)  # reentrant: stored form
        if res.decision == "dedup":
            return self._replay(res.result, call_id, name, meta)
        if res.decision == "failed":
            err = res.exception
            if isinstance(err, _ErrorOutput):
                return err.output  # the tool's own error message, unchanged
            if isinstance(err, GraphBubbleUp):
                raise err  # interrupt() inside the tool: LangGraph must see it
            if isinstance(err, BaseException):
                # The tool's own exception goes where it would have gone without us:
                # ToolNode's handle_tool_errors, or the caller.
                raise err
            return self._error(request, res.message, meta)
        return self._error(request, res.message, meta)

    def _replay(self, stored: Any, call_id: str, name: str, meta: dict[str, Any]) -> Output:
        if not isinstance(stored, Mapping):
            return ToolMessage(
                content=str(stored),
                tool_call_id=call_id,
                name=name,
                response_metadata={"onceonly": meta},
            )
        return decode_output(stored, call_id, name, meta)  # type: ignore[no-any-return]

    def _error(self, request: ToolCallRequest, text: str, meta: dict[str, Any]) -> ToolMessage:
        return ToolMessage(
            content=text,
            tool_call_id=_call_id(request),
            name=request.tool_call["name"],
            status="error",
            response_metadata={"onceonly": meta},
        )

    def _infra(self, request: ToolCallRequest, err: OnceOnlyError) -> Output:
        reraise_config(err)
        ran, value = ran_anyway(err)
        if ran and isinstance(value, Mapping):
            # The tool ran; only recording it failed. The model must see the real result.
            meta = {"decision": "executed", "policy_reason": "ok", "key": None}
            return self._replay(value, _call_id(request), request.tool_call["name"], meta)
        meta = {"decision": "failed", "policy_reason": type(err).__name__, "key": None}
        return self._error(request, infra_text(request.tool_call["name"], err), meta)

    # -- arguments, runners, options --------------------------------------------------
    def _arguments(self, request: ToolCallRequest) -> dict[str, Any]:
        """The model's arguments with the schema's defaults filled in, so that leaving an
        optional argument out and passing its default are the same call."""
        args = dict(request.tool_call.get("args") or {})
        tool = request.tool
        schema = getattr(tool, "tool_call_schema", None) if tool is not None else None
        fields = getattr(schema, "model_fields", None)
        if isinstance(fields, Mapping):
            for fname, info in fields.items():
                missing = fname not in args and info.default_factory is None
                if missing and info.default is not PydanticUndefined:
                    args[fname] = info.default
        return args

    def _runner(
        self, is_async: bool, args: dict[str, Any]
    ) -> tuple[Callable[..., Any], dict[str, Any]]:
        """A runner whose signature is the call's argument names (the core binds a call to
        its function's signature), one per argument shape so the core's cache stays small."""
        names = tuple(sorted(args))
        runner = self._runners.get((is_async, names))
        if runner is None:
            try:
                params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
            except ValueError:
                params = None
            if params is None:
                # A name that is not a Python identifier: the whole mapping is one
                # argument (key_args cannot name such arguments; the docs say so).
                return self._runner(is_async, {"arguments": args})[0], {"arguments": args}
            # A fresh function per shape: the signature lives on the function object.
            runner = _make_runner(is_async)
            runner.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
            with self._lock:
                if len(self._runners) < _MAX_RUNNERS:
                    self._runners[(is_async, names)] = runner
        return runner, args

    def _options(self, tool: str) -> dict[str, Any]:
        opts = self._opts.get(tool)
        if opts is None:
            opts = self.settings.options_for(tool)
            with self._lock:
                self._opts[tool] = opts
        return opts
