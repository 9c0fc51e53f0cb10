"""Guarded LangChain tools: ``guard_tool(tool, guard)`` and ``wrap_tools([...], guard)``.

The guarded tool is the same tool — name, description, ``args_schema``,
``return_direct``, ``response_format`` (including ``content_and_artifact``), sync and
async — whose function runs through ``guard.call_tool``. Injected arguments
(``InjectedToolCallId``, ``InjectedState``, ``InjectedStore``, ``ToolRuntime``) and the
``RunnableConfig`` / ``callbacks`` parameters are excluded from the fingerprint: they
change on every turn while the call stays the same.

A call that a policy blocks, that waits for approval, or that the ledger cannot take
becomes an error ``ToolMessage`` (``status="error"``) telling the model why; the tool's
own exceptions propagate exactly as before.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar, cast

from langchain_core.runnables.config import ensure_config
from langchain_core.tools import BaseTool, StructuredTool, Tool, ToolException

# How LangChain itself finds a tool function's RunnableConfig parameter (private, stable
# through 1.x): that parameter carries the call's config, never part of its identity.
from langchain_core.tools.base import _get_runnable_config_param

from onceonly_core import Guard
from onceonly_core import guard as default_guard
from onceonly_core.errors import OnceOnlyError
from onceonly_core.governance.models import ToolResult

from ._common import (
    _THREAD,
    Resolver,
    Settings,
    SpendRule,
    infra_text,
    ran_anyway,
    reraise_config,
    scoped,
)

__all__ = ["GuardRefused", "guard_tool", "wrap_tools"]

T = TypeVar("T", bound=BaseTool)
_ALWAYS_EXCLUDED = frozenset({"callbacks", "run_manager"})


class GuardRefused(ToolException):
    """A call OnceOnly did not run (blocked, pending approval, ledger unavailable).

    Raised inside the tool and turned into an error ``ToolMessage`` by the tool itself;
    ``result`` is the :class:`ToolResult` (None when the ledger failed)."""

    def __init__(self, message: str, result: ToolResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class _RefusalAware:
    """``handle_tool_error`` of a guarded tool: refusals become the error message; any
    other ToolException is handled exactly as the original setting says."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(self, err: ToolException) -> Any:
        if isinstance(err, GuardRefused):
            return str(err)
        flag = self.original
        if not flag:
            raise err  # the original tool re-raised it
        if isinstance(flag, bool):
            return err.args[0] if err.args else "Tool execution error"
        if isinstance(flag, str):
            return flag
        return flag(err)


def guard_tool(
    tool: T | Callable[..., Any],
    guard: Guard | None = None,
    *,
    agent_id: str | None = None,
    scope: Resolver | object = _THREAD,
    run_id: Resolver = None,
    spend_usd: float | SpendRule = None,
    **options: Any,
) -> T:
    """A guarded copy of ``tool`` (a ``BaseTool``, or a function: it is made a tool first).

    Options as for :class:`OnceOnlyMiddleware` (``scope``, ``run_id``, ``agent_id``),
    plus guard options for this tool (``key_args=``, ``exclude=``, ``ttl=``, ...).
    ``spend_usd`` may be a number for this tool.
    """
    if not isinstance(tool, BaseTool):
        tool = StructuredTool.from_function(tool)  # type: ignore[assignment]
    assert isinstance(tool, BaseTool)
    if isinstance(spend_usd, (int, float)) and not isinstance(spend_usd, bool):
        spend_usd = {tool.name: float(spend_usd)}
    settings = Settings(
        guard or default_guard,
        agent_id=agent_id,
        scope=scope,
        run_id=run_id,
        spend_usd=spend_usd,  # type: ignore[arg-type]
        options=options,
    )
    name = sys.intern(tool.name)
    injected = _injected(tool)
    aware = _RefusalAware(tool.handle_tool_error)
    pair = tool.response_format == "content_and_artifact"
    if isinstance(tool, (StructuredTool, Tool)):
        update: dict[str, Any] = {"handle_tool_error": aware}
        if tool.func is not None:
            update["func"] = _sync(tool.func, settings, name, injected, pair)
        if tool.coroutine is not None:
            update["coroutine"] = _async(tool.coroutine, settings, name, injected, pair)
        return cast(T, tool.model_copy(update=update))
    return _DelegatingTool(  # type: ignore[return-value]
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        return_direct=tool.return_direct,
        response_format=tool.response_format,
        handle_tool_error=aware,
        handle_validation_error=tool.handle_validation_error,
        verbose=tool.verbose,
        callbacks=tool.callbacks,
        tags=tool.tags,
        metadata=tool.metadata,
        extras=tool.extras,
        inner=tool,
        sync_fn=_sync(tool._run, settings, name, injected, pair),
        async_fn=_async(tool._arun, settings, name, injected, pair),
    )


def wrap_tools(
    tools: Sequence[BaseTool | Callable[..., Any]],
    guard: Guard | None = None,
    *,
    only: Collection[str] | None = None,
    tool_options: Mapping[str, Mapping[str, Any]] | None = None,
    **common: Any,
) -> list[BaseTool]:
    """Guard a list of tools. ``only``: guard just these names (others are returned as
    they are); ``tool_options``: per-tool options, e.g. ``{"search": {"unlimited": True}}``."""
    out: list[BaseTool] = []
    for t in tools:
        base = t if isinstance(t, BaseTool) else StructuredTool.from_function(t)
        if only is not None and base.name not in only:
            out.append(base)
            continue
        per_tool = dict((tool_options or {}).get(base.name, {}))
        out.append(guard_tool(base, guard, **{**common, **per_tool}))
    return out


# -- the guarded functions -------------------------------------------------------------


def _injected(tool: BaseTool) -> frozenset[str]:
    """Arguments LangChain or LangGraph supply at call time (not the model)."""
    names: set[str] = set(getattr(tool, "_injected_args_keys", ()) or ())
    own = [getattr(tool, "func", None), getattr(tool, "coroutine", None)]
    if not isinstance(tool, (StructuredTool, Tool)):
        own = [tool._run, tool._arun]  # a subclass: its own methods get the config
    for fn in own:
        if fn is not None and (param := _get_runnable_config_param(fn)):
            names.add(param)
    visible: set[str]
    schema = tool.tool_call_schema
    if isinstance(schema, dict):
        visible = set((schema.get("properties") or {}).keys())
    else:
        visible = set(getattr(schema, "model_fields", {}) or {})
    full = tool.args_schema
    if full is not None:
        if isinstance(full, dict):
            names |= set((full.get("properties") or {}).keys()) - visible
        else:
            names |= set(getattr(full, "model_fields", {}) or {}) - visible
    return frozenset(names | _ALWAYS_EXCLUDED)


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments by their parameter names (the core calls ``fn(**args)``)."""
    if not args:
        return kwargs
    bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    return dict(bound.arguments)


class _Options:
    """The options of one guarded tool per set of injected arguments present, built once:
    the core caches its prepared tools by the identity of option values."""

    def __init__(self, settings: Settings, name: str, injected: frozenset[str]) -> None:
        self.settings, self.name, self.injected = settings, name, injected
        self.by_skip: dict[tuple[str, ...], dict[str, Any]] = {}

    def __call__(self, mapping: Mapping[str, Any]) -> dict[str, Any]:
        skip = tuple(k for k in mapping if k in self.injected)
        opts = self.by_skip.get(skip)
        if opts is None:
            opts = self.settings.options_for(self.name)
            if skip:
                opts["exclude"] = (*tuple(opts.get("exclude") or ()), *skip)
            if len(self.by_skip) < 64:
                self.by_skip[skip] = opts
        return opts


def _result(res: ToolResult, pair: bool) -> Any:
    if res.decision in ("executed", "dedup"):
        value = res.result
        if pair and isinstance(value, list) and len(value) == 2:
            return tuple(value)  # content_and_artifact needs a 2-tuple; storage made it a list
        return value
    if res.decision == "failed":
        err = res.exception
        if isinstance(err, BaseException):
            raise err  # the tool's own exception, unchanged (GraphInterrupt included)
        raise ToolException(res.message)
    raise GuardRefused(res.message, res)


def _infra(name: str, err: OnceOnlyError, pair: bool) -> Any:
    reraise_config(err)
    ran, value = ran_anyway(err)
    if ran:
        return tuple(value) if pair and isinstance(value, list) else value
    raise GuardRefused(infra_text(name, err)) from err


def _sync(
    fn: Callable[..., Any],
    settings: Settings,
    name: str,
    injected: frozenset[str],
    pair: bool,
) -> Callable[..., Any]:
    options_for = _Options(settings, name, injected)

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        config = ensure_config()
        mapping = _bind(fn, args, kwargs)
        with scoped(settings.guard, settings.scope_for(config)):
            try:
                res = settings.guard.call_tool(
                    fn,
                    mapping,
                    tool=name,
                    agent_id=settings.agent_id,
                    spend_usd=settings.spend_for(name, mapping),
                    run_id=settings.run_for(config),
                    **options_for(mapping),
                )
            except OnceOnlyError as err:
                return _infra(name, err, pair)
        return _result(res, pair)

    return guarded


def _async(
    fn: Callable[..., Any],
    settings: Settings,
    name: str,
    injected: frozenset[str],
    pair: bool,
) -> Callable[..., Any]:
    options_for = _Options(settings, name, injected)

    @functools.wraps(fn)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        config = ensure_config()
        mapping = _bind(fn, args, kwargs)
        with scoped(settings.guard, settings.scope_for(config)):
            try:
                res = await settings.guard.acall_tool(
                    fn,
                    mapping,
                    tool=name,
                    agent_id=settings.agent_id,
                    spend_usd=settings.spend_for(name, mapping),
                    run_id=settings.run_for(config),
                    **options_for(mapping),
                )
            except OnceOnlyError as err:
                return _infra(name, err, pair)
        return _result(res, pair)

    return guarded


class _DelegatingTool(BaseTool):
    """A guarded stand-in for a ``BaseTool`` subclass (one without ``func``): runs the
    original's ``_run`` / ``_arun`` through the guard."""

    inner: BaseTool
    sync_fn: Callable[..., Any]
    async_fn: Callable[..., Any]

    @functools.cached_property
    def _injected_args_keys(self) -> frozenset[str]:
        return frozenset(getattr(self.inner, "_injected_args_keys", ()) or ())

    def _run(self, *args: Any, run_manager: Any = None, **kwargs: Any) -> Any:
        if run_manager is not None and "run_manager" in _params(self.inner._run):
            kwargs["run_manager"] = run_manager
        if param := _get_runnable_config_param(self.inner._run):
            kwargs[param] = ensure_config()
        return self.sync_fn(*args, **kwargs)

    async def _arun(self, *args: Any, run_manager: Any = None, **kwargs: Any) -> Any:
        inner = self.inner
        overridden = type(inner)._arun is not BaseTool._arun
        if not overridden:
            # The original runs _run in a thread; so do we, guarded, with a sync manager.
            if run_manager is not None and "run_manager" in _params(inner._run):
                kwargs["run_manager"] = run_manager.get_sync()
            if param := _get_runnable_config_param(inner._run):
                kwargs[param] = ensure_config()
            return await _to_thread(self.sync_fn, *args, **kwargs)
        if run_manager is not None and "run_manager" in _params(inner._arun):
            kwargs["run_manager"] = run_manager
        if param := _get_runnable_config_param(inner._arun):
            kwargs[param] = ensure_config()
        return await self.async_fn(*args, **kwargs)


def _params(fn: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(fn).parameters


async def _to_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    import asyncio
    import contextvars

    ctx = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(
        None, functools.partial(ctx.run, fn, *args, **kwargs)
    )
