"""Guarded LangChain tools: ``guard_tool(tool, guard)`` and ``wrap_tools([...], guard)``.

The guarded tool is the same tool — an instance of a subclass of the tool's own class with
every field of the original: name, description, ``args_schema``, ``return_direct``,
``response_format``, ``func`` / ``coroutine``, so LangGraph injects ``InjectedState``,
``InjectedStore``, ``ToolRuntime`` and ``InjectedToolCallId`` exactly as before. Only its
``run`` / ``arun`` differ: they take the call through ``guard.run_call_classified`` with the
tool's name and its validated arguments (the tool's own parsing: defaults,
``default_factory``, coercion; injected arguments left out of the key), with the tool's
original ``run`` as the thunk, and answer with the core's classification rendered as one
``ToolMessage`` for the call id (the same rendering as :class:`OnceOnlyMiddleware`).

Called directly, without a tool call id, the guarded tool returns what the tool returns;
a call it did not run raises :class:`GuardRefused` (with the classification), and the
tool's own exception propagates.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar, cast

from langchain_core.runnables.config import ensure_config
from langchain_core.tools import BaseTool, StructuredTool
from pydantic import PrivateAttr, ValidationError

from onceonly_core import Classification, Guard, classify
from onceonly_core import guard as default_guard

from ._common import THREAD, Call, GuardRefused, Resolver, Settings, SpendRule, validated_arguments

__all__ = ["GuardRefused", "guard_tool", "wrap_tools"]

T = TypeVar("T", bound=BaseTool)
# A direct call (no tool call id) still runs as a tool call inside, so that the tool's
# handled error comes back marked status="error" (a failure, not a result to replay).
_DIRECT = "onceonly-direct-call"


class _Guarded(BaseTool):
    """The guarded ``run`` / ``arun``; mixed in before a tool's own class (see ``_class``)."""

    _onceonly: Settings | None = PrivateAttr(default=None)

    def run(self, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
        plan = self._plan(tool_input, kwargs)
        if plan is None:
            return super().run(tool_input, *args, **kwargs)
        call, opts = plan
        if isinstance(opts, Classification):
            return call.render(opts)
        s = self._settings
        run = partial(_run, call, super().run, tool_input, args, kwargs)
        return call.render(s.guard.run_call_classified(call.name, call.args, run, **opts))

    async def arun(self, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
        plan = self._plan(tool_input, kwargs)
        if plan is None:
            return await super().arun(tool_input, *args, **kwargs)
        call, opts = plan
        if isinstance(opts, Classification):
            return call.render(opts)
        s = self._settings
        run = partial(_arun, call, super().arun, tool_input, args, kwargs)
        return call.render(await s.guard.arun_call_classified(call.name, call.args, run, **opts))

    @property
    def _settings(self) -> Settings:
        assert self._onceonly is not None, "a guarded tool is made by guard_tool()"
        return self._onceonly

    def _plan(
        self, tool_input: Any, kwargs: dict[str, Any]
    ) -> tuple[Call, dict[str, Any] | Classification] | None:
        """What run and arun do before the call: None (arguments the tool itself rejects,
        called directly: it answers as it would), an answer without calling, or the call."""
        call_id = kwargs.get("tool_call_id")
        try:
            if call_id is None:
                # Raises for a tool that needs its call id (InjectedToolCallId), as it would.
                self._parse_input(_copy(tool_input), None)
            args = validated_arguments(self, tool_input, call_id)
        except ValidationError as err:
            if call_id is None:
                return None
            return Call(self.name, {}, call_id), classify(err, tool=self.name)
        except ValueError:
            return None  # e.g. an InjectedToolCallId tool called without a call: as before
        call = Call(self.name, args, call_id or _DIRECT, direct=call_id is None)
        kwargs["tool_call_id"] = call.call_id
        config = kwargs.get("config") or ensure_config()
        return call, self._settings.call_options(self.name, args, config)


def _copy(tool_input: Any) -> Any:
    return dict(tool_input) if isinstance(tool_input, Mapping) else tool_input


def _run(
    call: Call, run: Callable[..., Any], tool_input: Any, args: Any, kwargs: dict[str, Any]
) -> Any:
    return call.settle(run(tool_input, *args, **kwargs))


async def _arun(
    call: Call, arun: Callable[..., Any], tool_input: Any, args: Any, kwargs: dict[str, Any]
) -> Any:
    return call.settle(await arun(tool_input, *args, **kwargs))


_GUARDED = "__onceonly_guarded__"


def _class(cls: type[BaseTool]) -> type[_Guarded]:
    """``Guarded<Tool>``: the tool's class with the guarded run/arun first in its MRO. One
    per tool class, kept on that class, so it lives as long as the class does (a tool
    class defined per request is not pinned by a module-level cache)."""
    sub: type[_Guarded] | None = cls.__dict__.get(_GUARDED)
    if sub is None:
        ns = {"__module__": __name__, "__qualname__": f"Guarded{cls.__name__}"}
        sub = cast(type[_Guarded], type(f"Guarded{cls.__name__}", (_Guarded, cls), ns))
        # Two threads may both build one: either is right, the last one is kept.
        type.__setattr__(cls, _GUARDED, sub)
    return sub


def guard_tool(
    tool: T | Callable[..., Any],
    guard: Guard | None = None,
    *,
    agent_id: str | None = None,
    scope: Resolver | object = THREAD,
    run_id: Resolver = None,
    spend_usd: float | SpendRule = None,
    **options: Any,
) -> T:
    """A guarded copy of ``tool`` (a ``BaseTool``, or a function: it is made a tool first).

    Options as for :class:`OnceOnlyMiddleware` (``scope``, ``run_id``, ``agent_id``), plus
    guard options for this tool (``read_only=True``, ``key_args=``, ``ttl=``, ...).
    ``spend_usd`` may be a number for this tool.
    """
    base: BaseTool = tool if isinstance(tool, BaseTool) else StructuredTool.from_function(tool)
    if isinstance(base, _Guarded):
        raise TypeError(f"{base.name} is already guarded")
    if isinstance(spend_usd, (int, float)) and not isinstance(spend_usd, bool):
        spend_usd = {base.name: float(spend_usd)}
    settings = Settings(
        guard or default_guard,
        agent_id=agent_id,
        scope=scope,
        run_id=run_id,
        spend_usd=cast(SpendRule, spend_usd),
        options=options,
    )
    cls = _class(type(base))
    # Every field as the original has it (no validation re-run: it was valid).
    values = {k: base.__dict__[k] for k in type(base).model_fields if k in base.__dict__}
    guarded = cls.model_construct(_fields_set=set(base.model_fields_set), **values)
    guarded._onceonly = settings
    return cast(T, guarded)


def wrap_tools(
    tools: Sequence[BaseTool | Callable[..., Any]],
    guard: Guard | None = None,
    *,
    only: Collection[str] | None = None,
    tool_options: Mapping[str, Mapping[str, Any]] | None = None,
    **common: Any,
) -> list[BaseTool]:
    """Guard a list of tools. ``only``: guard just these names (others are returned as
    they are); ``tool_options``: per-tool options, e.g. ``{"search": {"read_only": True}}``."""
    out: list[BaseTool] = []
    for t in tools:
        base = t if isinstance(t, BaseTool) else StructuredTool.from_function(t)
        if only is not None and base.name not in only:
            out.append(base)
            continue
        per_tool = dict((tool_options or {}).get(base.name, {}))
        out.append(guard_tool(base, guard, **{**common, **per_tool}))
    return out
