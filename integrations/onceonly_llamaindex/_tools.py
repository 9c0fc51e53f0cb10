"""Guarded LlamaIndex tools: every call goes through ``Guard.call_tool`` / ``acall_tool``.

LlamaIndex agents run tool calls concurrently (``num_workers=4``) and their
instrumentation cannot veto a call, so the guard lives in the tool itself: the
agent calls ``await tool.acall(**kwargs)`` and gets a proper ``ToolOutput`` back,
whatever the guard decided.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from llama_index.core.tools import FunctionTool
from llama_index.core.tools.types import (
    AsyncBaseTool,
    BaseTool,
    DefaultToolFnSchema,
    ToolMetadata,
    ToolOutput,
)

from onceonly_core import Guard, Options
from onceonly_core import guard as default_guard
from onceonly_core.errors import ConfigError
from onceonly_core.governance.models import ToolResult

__all__ = [
    "GuardedFunctionTool",
    "GuardedTool",
    "SpendUSD",
    "guard_tool",
    "guard_tools",
]

#: A fixed price per call, or a function of the call's arguments (``None``: no spend).
SpendUSD = float | Callable[[Mapping[str, Any]], float | None] | None

_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(Options))
# The tool name is the LlamaIndex tool's name: the adapter sets it.
_RESERVED = frozenset({"name"})

# The arguments of the running call that are not the model's (Context, partial_params).
_hidden: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "onceonly_llamaindex_hidden",
    default={},  # noqa: B039 - never mutated
)


@dataclasses.dataclass(frozen=True)
class _Governance:
    """How one wrapped tool is governed: the guard and the per-call arguments."""

    guard: Guard | None
    agent_id: str | None
    spend_usd: SpendUSD
    run_id: str | None
    options: Mapping[str, Any]

    @property
    def resolved(self) -> Guard:
        # The default guard is read at call time, so `onceonly_core.guard.configure(...)`
        # after the tools were built still takes effect.
        return self.guard if self.guard is not None else default_guard

    def call_kwargs(self, args: Mapping[str, Any]) -> dict[str, Any]:
        kw: dict[str, Any] = dict(self.options)
        # Only what was set: None would override the Guard's / scope's agent and run.
        if self.agent_id is not None:
            kw["agent_id"] = self.agent_id
        if self.run_id is not None:
            kw["run_id"] = self.run_id
        spend = self.spend_usd(args) if callable(self.spend_usd) else self.spend_usd
        if spend is not None:
            kw["spend_usd"] = spend
        return kw


def _governance(
    guard: Guard | None,
    agent_id: str | None,
    spend_usd: SpendUSD,
    run_id: str | None,
    options: Mapping[str, Any],
) -> _Governance:
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise ConfigError(f"unknown guard options: {', '.join(sorted(unknown))}")
    reserved = set(options) & _RESERVED
    if reserved:
        raise ConfigError(
            "the LlamaIndex tool's metadata.name is the tool's identity; "
            f"do not pass {', '.join(sorted(reserved))}="
        )
    if guard is not None and not isinstance(guard, Guard):
        raise ConfigError(f"guard must be an onceonly_core.Guard, got {type(guard).__name__}")
    return _Governance(guard, agent_id, spend_usd, run_id, dict(options))


class _ErrorOutput(Exception):
    """A wrapped tool answered with ``ToolOutput(is_error=True)``: a failure, not a result.

    Raised inside the guarded call so the ledger records a failure (which is not
    cached: the next call runs again); the original output is handed back unchanged.
    """

    def __init__(self, output: ToolOutput) -> None:
        super().__init__(output.content)
        self.output = output


def _refusal(res: ToolResult, tool_name: str, raw_input: dict[str, Any]) -> ToolOutput:
    """The output for a call the guard did not run: the model reads why."""
    return ToolOutput(
        content=res.message,
        tool_name=tool_name,
        raw_input=raw_input,
        # JSON-friendly, so a workflow Context holding this output still serialises.
        raw_output={
            "decision": res.decision,
            "policy_reason": res.policy_reason,
            "approval_id": res.approval_id,
        },
        is_error=True,
    )


def _unexpected(res: ToolResult) -> BaseException:
    if isinstance(res.exception, BaseException):
        return res.exception
    return RuntimeError(res.message)


class GuardedFunctionTool(FunctionTool):
    """A ``FunctionTool`` whose ``call`` / ``acall`` run at most once per key.

    It is still a ``FunctionTool`` (same ``ToolMetadata``, callbacks, ``partial_params``),
    so agents keep injecting the workflow ``Context`` into a ``ctx: Context`` parameter.
    The key is the tool's name plus the model's arguments: the ``Context`` and the
    ``partial_params`` are left out.

    ``fn``, ``async_fn`` and ``real_fn`` are the *unguarded* functions.
    """

    def __init__(self, tool: FunctionTool, governance: _Governance) -> None:
        # A clone, not a second FunctionTool.__init__: it keeps fn/async_fn exactly as
        # LlamaIndex derived them (sync_to_async / async_to_sync), the callbacks, the
        # Context parameter and the FieldInfo defaults.
        self.__dict__.update(vars(tool))
        self._onceonly = governance
        self._onceonly_inner = tool
        sig = inspect.signature(tool.real_fn)
        self._onceonly_sig = sig
        hidden = set(tool.partial_params)
        if tool.ctx_param_name is not None:
            hidden.add(tool.ctx_param_name)
        self._onceonly_hidden = frozenset(hidden)
        fn, afn = tool.fn, tool.async_fn

        # The Context and the partial_params reach the function through a context
        # variable, not the guarded arguments: they are not the model's arguments, so
        # they are neither in the key nor in the audit log (a Context is not data, a
        # partial param is often a client or a secret).
        def run(**kwargs: Any) -> Any:
            return fn(**kwargs, **_hidden.get())

        async def arun(**kwargs: Any) -> Any:
            return await afn(**kwargs, **_hidden.get())

        # The shims carry the real signature (minus the hidden parameters), so the guard
        # binds and fingerprints the call by parameter name with defaults applied,
        # identically for call and acall.
        shown = sig.replace(parameters=[p for p in sig.parameters.values() if p.name not in hidden])
        run.__signature__ = shown  # type: ignore[attr-defined]
        arun.__signature__ = shown  # type: ignore[attr-defined]
        self._onceonly_run = run
        self._onceonly_arun = arun

    @property
    def inner(self) -> FunctionTool:
        """The unguarded tool this one wraps."""
        return self._onceonly_inner

    def _prepare(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(the model's arguments, the hidden ones, the output's raw_input)."""
        all_kwargs = {**self._field_defaults, **self.partial_params, **kwargs}
        if (
            self.requires_context
            and self.ctx_param_name is not None
            and self.ctx_param_name not in all_kwargs
        ):
            raise ValueError("Context is required for this tool")
        raw_input = {
            "args": args,
            "kwargs": {k: v for k, v in all_kwargs.items() if k != self.ctx_param_name},
        }
        if args:
            # The guard takes a mapping: name positional arguments by the real signature.
            all_kwargs = {**self._onceonly_sig.bind_partial(*args).arguments, **all_kwargs}
        hidden = self._onceonly_hidden
        shown = {k: v for k, v in all_kwargs.items() if k not in hidden}
        extra = {k: v for k, v in all_kwargs.items() if k in hidden}
        return shown, extra, raw_input

    def _success(self, res: ToolResult, raw_input: dict[str, Any]) -> ToolOutput | None:
        if res.decision in ("executed", "dedup"):
            return None
        if res.decision == "failed":
            # The tool's own exception, unchanged, as the bare FunctionTool would raise it:
            # the agent turns it into an error output (and re-raises a workflow
            # WaitingForEvent, so human-in-the-loop tools keep working).
            raise _unexpected(res)
        return _refusal(res, self.metadata.get_name(), raw_input)

    def _output(self, raw_output: Any, raw_input: dict[str, Any]) -> ToolOutput:
        return ToolOutput(
            blocks=self._parse_tool_output(raw_output),
            tool_name=self.metadata.get_name(),
            raw_input=raw_input,
            raw_output=raw_output,
        )

    def _override(self, override: Any, default: ToolOutput) -> ToolOutput:
        if override is None:
            return default
        if isinstance(override, ToolOutput):
            return override
        return ToolOutput(
            content=str(override),
            tool_name=default.tool_name,
            raw_input=default.raw_input,
            raw_output=default.raw_output,
        )

    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        """Run the tool at most once per key (sync)."""
        shown, extra, raw_input = self._prepare(args, kwargs)
        gov = self._onceonly
        token = _hidden.set(extra)
        try:
            res = gov.resolved.call_tool(
                self._onceonly_run,
                shown,
                tool=self.metadata.get_name(),
                **gov.call_kwargs(shown),
            )
        finally:
            _hidden.reset(token)
        refused = self._success(res, raw_input)
        if refused is not None:
            return refused
        # A replay goes through the callback too: the model sees the same content.
        default = self._output(res.result, raw_input)
        return self._override(self._run_sync_callback(res.result), default)

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        """Run the tool at most once per key (async; the ledger never blocks the loop)."""
        shown, extra, raw_input = self._prepare(args, kwargs)
        gov = self._onceonly
        token = _hidden.set(extra)
        try:
            res = await gov.resolved.acall_tool(
                self._onceonly_arun,
                shown,
                tool=self.metadata.get_name(),
                **gov.call_kwargs(shown),
            )
        finally:
            _hidden.reset(token)
        refused = self._success(res, raw_input)
        if refused is not None:
            return refused
        default = self._output(res.result, raw_input)
        return self._override(await self._run_async_callback(res.result), default)

    def _plain(self, *args: Any, **kwargs: Any) -> Any:
        out = self.call(*args, **kwargs)
        return out.content if out.is_error else out.raw_output

    async def _aplain(self, *args: Any, **kwargs: Any) -> Any:
        out = await self.acall(*args, **kwargs)
        return out.content if out.is_error else out.raw_output

    def to_langchain_tool(self, **langchain_tool_kwargs: Any) -> Any:
        """A LangChain tool that goes through this guard (not the bare function)."""
        from llama_index.core.bridge.langchain import Tool

        kw = self._process_langchain_tool_kwargs(langchain_tool_kwargs)
        return Tool.from_function(func=self._plain, coroutine=self._aplain, **kw)

    def to_langchain_structured_tool(self, **langchain_tool_kwargs: Any) -> Any:
        """A LangChain structured tool that goes through this guard."""
        from llama_index.core.bridge.langchain import StructuredTool

        kw = self._process_langchain_tool_kwargs(langchain_tool_kwargs)
        return StructuredTool.from_function(func=self._plain, coroutine=self._aplain, **kw)


class GuardedTool(AsyncBaseTool):
    """Any ``BaseTool`` / ``AsyncBaseTool``, run at most once per key.

    The stored result is the tool's ``ToolOutput``; a replay returns it. An output with
    ``is_error=True`` is a failure: it is returned, not stored, and the next call runs.
    """

    def __init__(self, tool: BaseTool, governance: _Governance) -> None:
        self._tool = tool
        self._onceonly = governance
        schema = tool.metadata.fn_schema
        # Positional calls (`tool("query")`) are named by the schema's fields, so they
        # key like the keyword calls an agent makes.
        self._fields: tuple[str, ...] = (
            ("input",)
            if schema is None or schema is DefaultToolFnSchema
            else tuple(schema.model_fields)
        )

        def run(**kwargs: Any) -> ToolOutput:
            out = tool.call(**kwargs) if isinstance(tool, AsyncBaseTool) else tool(**kwargs)
            if out.is_error:
                raise _ErrorOutput(out)
            return out

        async def arun(**kwargs: Any) -> ToolOutput:
            if isinstance(tool, AsyncBaseTool):
                out = await tool.acall(**kwargs)
            else:
                # What adapt_to_async_tool does: a sync tool runs in a worker thread.
                import asyncio

                out = await asyncio.to_thread(tool, **kwargs)
            if out.is_error:
                raise _ErrorOutput(out)
            return out

        self._onceonly_run = run
        self._onceonly_arun = arun

    @property
    def metadata(self) -> ToolMetadata:
        return self._tool.metadata

    @property
    def inner(self) -> BaseTool:
        """The unguarded tool this one wraps."""
        return self._tool

    def _named(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if not args:
            return dict(kwargs)
        if len(args) > len(self._fields):
            raise TypeError(
                f"{self.metadata.get_name()}: {len(args)} positional arguments, "
                f"the schema has {len(self._fields)} fields"
            )
        named = dict(zip(self._fields, args, strict=False))
        clash = set(named) & set(kwargs)
        if clash:
            raise TypeError(f"{self.metadata.get_name()}: {sorted(clash)} given twice")
        return {**named, **kwargs}

    def _finish(self, res: ToolResult, raw_input: dict[str, Any]) -> ToolOutput:
        if res.decision in ("executed", "dedup"):
            return cast(ToolOutput, res.result)
        if res.decision == "failed":
            err = res.exception
            if isinstance(err, _ErrorOutput):
                return err.output
            raise _unexpected(res)
        return _refusal(res, self.metadata.get_name(), raw_input)

    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        """Run the tool at most once per key (sync)."""
        data = self._named(args, kwargs)
        gov = self._onceonly
        res = gov.resolved.call_tool(
            self._onceonly_run,
            data,
            tool=self.metadata.get_name(),
            **gov.call_kwargs(data),
        )
        return self._finish(res, data)

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        """Run the tool at most once per key (async)."""
        data = self._named(args, kwargs)
        gov = self._onceonly
        res = await gov.resolved.acall_tool(
            self._onceonly_arun,
            data,
            tool=self.metadata.get_name(),
            **gov.call_kwargs(data),
        )
        return self._finish(res, data)


def _defined_by(cls: type, attr: str) -> type | None:
    return next((c for c in cls.__mro__ if attr in c.__dict__), None)


def _overrides_calls(tool: FunctionTool) -> bool:
    # By defining class, not identity: the instrumentation's wrapt decorators hand out
    # a fresh wrapper object on every class attribute access.
    cls = type(tool)
    return any(_defined_by(cls, m) is not FunctionTool for m in ("call", "acall", "__call__"))


def guard_tool(
    tool: BaseTool | Callable[..., Any],
    guard: Guard | None = None,
    *,
    agent_id: str | None = None,
    spend_usd: SpendUSD = None,
    run_id: str | None = None,
    **options: Any,
) -> AsyncBaseTool:
    """Guard one tool: a ``FunctionTool``, any ``BaseTool``, or a plain function.

    ``guard`` defaults to ``onceonly_core.guard``. ``agent_id`` turns governance on
    (policies, budgets, approvals); ``spend_usd`` is a price per call or a function of
    the arguments; other keywords are guard options (``ttl=``, ``key_args=``, ``wait=``...).
    A ``FunctionTool`` comes back as a :class:`GuardedFunctionTool`, anything else as a
    :class:`GuardedTool`; a tool that is already guarded is returned unchanged.
    """
    if isinstance(tool, (GuardedFunctionTool, GuardedTool)):
        return tool
    gov = _governance(guard, agent_id, spend_usd, run_id, options)
    if not isinstance(tool, BaseTool):
        if not callable(tool):
            raise ConfigError(f"guard_tool needs a tool or a callable, got {type(tool).__name__}")
        if inspect.iscoroutinefunction(tool):
            tool = FunctionTool.from_defaults(async_fn=tool)
        else:
            tool = FunctionTool.from_defaults(fn=tool)
    if tool.metadata.name is None:
        raise ConfigError("a guarded tool needs a name (ToolMetadata.name): it is its identity")
    if isinstance(tool, FunctionTool) and not _overrides_calls(tool):
        return GuardedFunctionTool(tool, gov)
    return GuardedTool(tool, gov)


def guard_tools(
    tools: Iterable[BaseTool | Callable[..., Any]],
    guard: Guard | None = None,
    *,
    agent_id: str | None = None,
    spend_usd: SpendUSD = None,
    run_id: str | None = None,
    tool_options: Mapping[str, Mapping[str, Any]] | None = None,
    **options: Any,
) -> list[AsyncBaseTool]:
    """Guard a list of tools; ``tool_options={"pay": {"spend_usd": 5.0}}`` per tool name."""
    per_tool = dict(tool_options or {})
    out: list[AsyncBaseTool] = []
    for t in tools:
        name = t.metadata.name if isinstance(t, BaseTool) else getattr(t, "__name__", None)
        extra = dict(per_tool.pop(name, {})) if name is not None else {}
        kw: dict[str, Any] = {
            "agent_id": agent_id,
            "spend_usd": spend_usd,
            "run_id": run_id,
            **options,
            **extra,
        }
        out.append(guard_tool(t, guard, **kw))
    if per_tool:
        raise ConfigError(f"tool_options names unknown tools: {', '.join(sorted(per_tool))}")
    return out
