"""Guarded LlamaIndex tools: a thin renderer over ``Guard.run_call_classified``.

LlamaIndex agents run tool calls concurrently (``num_workers=4``) and their
instrumentation cannot veto a call, so the guard lives in the tool itself: the agent
calls ``await tool.acall(**kwargs)`` and gets a proper ``ToolOutput`` back, whatever the
guard decided.

One call path (docs/integrations/contract.md): the model's arguments are validated
against the tool's ``fn_schema`` first (defaults, ``default_factory``, coercion), and the
call is keyed by the tool's *name* plus those validated arguments, which are also exactly
what the function receives. So ``{"amount": "25.00"}`` and ``{"amount": 25.0}`` are one
call. The core classifies the outcome; this module only renders the
:class:`~onceonly_core.Classification` into a ``ToolOutput`` and emits one LlamaIndex
instrumentation event per decision. Sync and async differ in one line each: the shared
steps are :func:`_prepare` (arguments, scope, run id) and the ``_answer`` renderers.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from llama_index.core.tools import FunctionTool
from llama_index.core.tools.types import AsyncBaseTool, BaseTool, ToolMetadata, ToolOutput
from llama_index_instrumentation.dispatcher import active_instrument_tags
from pydantic import BaseModel, Field, ValidationError

from onceonly_core import Classification, ConfigError, Guard, Options, classify, current_run_id
from onceonly_core import guard as default_guard
from onceonly_core.contract import invalid_json, register_interrupt

from ._events import emit

__all__ = [
    "RUN_ID_TAG",
    "AgentTools",
    "GuardedFunctionTool",
    "GuardedTool",
    "GuardedToolOutput",
    "RunId",
    "Scope",
    "SpendUSD",
    "ToolError",
    "active_run_id",
    "guard_tool",
    "guard_tools",
]

#: A fixed price per call, or a function of the call's (validated) arguments.
SpendUSD = float | Callable[[Mapping[str, Any]], float | None] | None
#: A dedup scope (a conversation or thread id), or a function returning the current one.
Scope = str | Callable[[], str | None] | None
#: A run id, or a function returning the current one (``None`` from it: no run id).
RunId = str | Callable[[], str | None] | None

#: The list type LlamaIndex agents take (``FunctionAgent(tools=...)``, ``ReActAgent``):
#: ``list`` is invariant, so :func:`guard_tools` returns exactly this type and the
#: documented ``FunctionAgent(tools=guard_tools(...))`` type-checks.
AgentTools = list[BaseTool | Callable[..., Any]]

#: The instrumentation tag under which LlamaIndex workflows publish their run id.
RUN_ID_TAG = "llamaindex.run_id"

_OPTION_NAMES = frozenset(f.name for f in fields(Options))
# The tool name is the LlamaIndex tool's name: the adapter sets it.
_RESERVED = frozenset({"name"})


def _register_workflow_interrupts() -> None:
    # A human-in-the-loop step (``await ctx.wait_for_event(...)``) pauses by raising
    # WaitingForEvent: control flow the agent re-raises, not a failure to answer.
    try:
        from workflows.runtime.types.results import WaitingForEvent
    except ImportError:  # pragma: no cover - an older llama-index-workflows
        return
    register_interrupt(WaitingForEvent)


_register_workflow_interrupts()


def active_run_id() -> str | None:
    """The id of the LlamaIndex workflow run (an agent's ``run()``) this code runs in.

    Read from the run's own context (the instrumentation tags a workflow sets for each
    run and its steps), so concurrent runs never see each other's id. None outside a run.
    """
    rid = active_instrument_tags.get().get(RUN_ID_TAG)
    return rid if isinstance(rid, str) and rid else None


# Whether a Guard's ledger can hold run timelines. Weak: a per-request Guard is not kept
# alive by having called a tool once.
_timelines: weakref.WeakKeyDictionary[Guard, bool] = weakref.WeakKeyDictionary()


def _has_timelines(guard: Guard) -> bool:
    ok = _timelines.get(guard)
    if ok is None:
        try:
            guard.gov.store  # noqa: B018 - a ledger without governance refuses here
        except ConfigError:
            ok = False
        except Exception:  # the ledger is down: not cached; the call answers guard_error
            return True
        else:
            ok = True
        _timelines[guard] = ok
    return ok


def _value(v: str | Callable[[], str | None] | None) -> str | None:
    return v() if callable(v) else v


@dataclass(frozen=True, slots=True)
class _Governance:
    """How one wrapped tool is governed: the guard and the per-call arguments."""

    guard: Guard | None
    agent_id: str | None
    spend_usd: SpendUSD
    run_id: RunId
    scope: Scope
    options: Mapping[str, Any]

    @property
    def resolved(self) -> Guard:
        # The default guard is read at call time, so `onceonly_core.guard.configure(...)`
        # after the tools were built still takes effect.
        return self.guard if self.guard is not None else default_guard

    def call_kwargs(self, guard: Guard, args: Mapping[str, Any]) -> dict[str, Any]:
        """``run_call`` keywords for one call: options, agent, spend, run id, scope."""
        kw: dict[str, Any] = dict(self.options)
        # Only what was set: None would override the Guard's / scope's agent and run.
        if self.agent_id is not None:
            kw["agent_id"] = self.agent_id
        spend = self.spend_usd(args) if callable(self.spend_usd) else self.spend_usd
        if spend is not None:
            kw["spend_usd"] = spend
        live = active_run_id()
        if self.run_id is not None:
            run = _value(self.run_id)
        elif current_run_id() is None and live is not None and _has_timelines(guard):
            # The active LlamaIndex run's own id, never a shared one: each call of each
            # concurrent run is tagged and put on its own run's timeline.
            run = live
        else:
            run = None  # the core reads `with guard.run(...)`, if any
        if run is not None:
            kw["run_id"] = run
        # Scope: explicit scope= wins; then `with guard.workflow(...)` (the core's own);
        # then the LlamaIndex run; with none of them the core warns once and keys globally.
        scope = _value(self.scope)
        if scope is None and live is not None and guard.current_namespace() == guard.namespace:
            scope = live
        if scope is not None:
            kw["scope"] = scope
        return kw


def _governance(
    guard: Guard | None,
    agent_id: str | None,
    spend_usd: SpendUSD,
    run_id: RunId,
    scope: Scope,
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
    return _Governance(guard, agent_id, spend_usd, run_id, scope, dict(options))


# -- arguments -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Prepared:
    """One call, ready for the guard: the same for call and acall."""

    guard: Guard
    name: str
    args: dict[str, Any]  # validated: the key, and what the tool receives
    hidden: dict[str, Any]  # the Context and partial_params: passed, never keyed
    raw_input: dict[str, Any]
    kw: dict[str, Any]  # run_call keywords
    early: Classification | None  # the arguments failed the schema: nothing runs


def _named(
    name: str, schema: type[BaseModel] | None, args: tuple[Any, ...], given: dict[str, Any]
) -> dict[str, Any]:
    """Positional arguments named by the schema's fields (a model never sends them)."""
    if not args:
        return given
    names = tuple(schema.model_fields) if schema is not None else ("input",)
    if len(args) > len(names):
        raise TypeError(
            f"{name}: {len(args)} positional arguments, the schema has {len(names)} fields"
        )
    named = dict(zip(names, args, strict=False))
    clash = set(named) & set(given)
    if clash:
        raise TypeError(f"{name}: {sorted(clash)} given twice")
    return {**named, **given}


def _validated(schema: type[BaseModel] | None, given: dict[str, Any]) -> dict[str, Any]:
    """The arguments as the schema makes them: defaults, default_factory, coercion.

    Field values are taken as attributes (a nested model stays a model, as the function's
    annotation says). Keys the schema does not declare are kept as given: LlamaIndex
    passes them on too (a function may take ``**kwargs``).
    """
    if schema is None:
        return dict(given)
    model = schema.model_validate(given)
    declared = type(model).model_fields
    known = set(declared) | {f.alias for f in declared.values() if f.alias}
    out = {k: v for k, v in given.items() if k not in known}
    for fname, f in declared.items():
        key = f.alias if (f.alias and fname not in given and f.alias in given) else fname
        out[key] = getattr(model, fname)
    return out


def _prepare(
    metadata: ToolMetadata,
    gov: _Governance,
    args: tuple[Any, ...],
    given: dict[str, Any],
    hidden: dict[str, Any],
    raw_input: dict[str, Any] | None,
) -> _Prepared:
    name = metadata.get_name()
    schema = metadata.fn_schema
    named = _named(name, schema, args, given)
    guard = gov.resolved
    early = None
    try:
        valid = _validated(schema, named)
    except ValidationError as err:  # the model's mistake: an answer, not an exception
        valid, early = named, classify(err, tool=name)
    return _Prepared(
        guard=guard,
        name=name,
        args=valid,
        hidden=hidden,
        raw_input=named if raw_input is None else raw_input,
        kw={} if early is not None else gov.call_kwargs(guard, valid),
        early=early,
    )


# -- rendering -----------------------------------------------------------------------------
class GuardedToolOutput(ToolOutput):
    """A ``ToolOutput`` that says what the guard decided: ``classification`` is the
    adapter contract's ``Classification.as_dict()`` (``code``, ``reason``, ``key``...).

    ``content`` is what the model reads: the tool's own output for a call that ran now or
    a replay, else the contract's sentence. ``is_error`` is set for every code but
    ``executed`` / ``replayed``, and then ``raw_output`` is the classification too.
    """

    classification: dict[str, Any] = Field(default_factory=dict)

    def __init__(self, *, classification: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classification = dict(classification)

    @property
    def code(self) -> str | None:
        """The contract code (``executed``, ``replayed``, ``blocked``, ...)."""
        code = self.classification.get("code")
        return code if isinstance(code, str) else None


class ToolError(Exception):
    """A wrapped tool answered with ``ToolOutput(is_error=True)``: a failure, not a result.

    Raised inside the guarded call so the ledger records a failure (which is not cached:
    the next call runs again); ``output`` is the tool's own error output.
    """

    def __init__(self, output: ToolOutput) -> None:
        super().__init__(output.content)
        self.output = output


def _plain_result(c: Classification) -> bool:
    """Rendered as the tool renders its own output: it ran now, or the stored result."""
    return (c.code, c.reason) in (("executed", "ok"), ("replayed", "dedup"))


def _rendered(c: Classification, raw_input: dict[str, Any]) -> GuardedToolOutput:
    """Every other outcome: the contract's sentence for the model.

    A call that ran but was not recorded, or a replay whose result was not stored, is not
    an error and keeps its result; anything else is ``is_error`` with the classification,
    JSON-safe, as ``raw_output`` (a workflow Context holding the output still serialises).
    """
    err = c.exception
    if isinstance(err, ToolError):  # the tool's own error output: its exception, if any
        err = err.output.exception or err
    return GuardedToolOutput(
        content=c.text,
        tool_name=c.tool,
        raw_input=raw_input,
        raw_output=c.result if c.ok else c.as_dict(),
        is_error=not c.ok,
        exception=err if isinstance(err, Exception) and not c.ok else None,
        classification=c.as_dict(),
    )


def _marked(out: ToolOutput, c: Classification) -> GuardedToolOutput:
    """A tool's own ToolOutput (or a callback's), with the classification attached."""
    return GuardedToolOutput(
        blocks=out.blocks,
        tool_name=out.tool_name,
        raw_input=out.raw_input,
        raw_output=out.raw_output,
        is_error=out.is_error,
        exception=out.exception,
        classification=c.as_dict(),
    )


# -- the wrappers --------------------------------------------------------------------------
def _parse(name: str, raw_args: str) -> dict[str, Any] | Classification:
    """The model's argument text as keywords, or the contract's invalid_json answer."""
    try:
        data = json.loads(raw_args) if raw_args.strip() else {}
    except ValueError as err:
        return invalid_json(name, err)
    return data if isinstance(data, dict) else invalid_json(name)


class _ModelText:
    """``call_json`` / ``acall_json``: a call from the model's raw argument text, for an
    agent loop that has the text rather than LlamaIndex's parsed ``tool_kwargs``."""

    if TYPE_CHECKING:

        @property
        def metadata(self) -> ToolMetadata: ...
        def call(self, *args: Any, **kwargs: Any) -> GuardedToolOutput: ...
        async def acall(self, *args: Any, **kwargs: Any) -> GuardedToolOutput: ...

    def _refused(self, raw_args: str) -> tuple[dict[str, Any], GuardedToolOutput | None]:
        parsed = _parse(self.metadata.get_name(), raw_args)
        if isinstance(parsed, dict):
            return parsed, None
        emit(parsed)
        return {}, _rendered(parsed, {"raw_args": raw_args})

    def call_json(self, raw_args: str) -> GuardedToolOutput:
        """Run the tool for the model's JSON argument text (as it appears in a tool
        call); text that is not a JSON object is answered ``invalid_arguments``."""
        kwargs, refused = self._refused(raw_args)
        return refused if refused is not None else self.call(**kwargs)

    async def acall_json(self, raw_args: str) -> GuardedToolOutput:
        """:meth:`call_json`, async."""
        kwargs, refused = self._refused(raw_args)
        return refused if refused is not None else await self.acall(**kwargs)


class GuardedFunctionTool(_ModelText, FunctionTool):
    """A ``FunctionTool`` whose ``call`` / ``acall`` run at most once per key.

    It is still a ``FunctionTool`` (same ``ToolMetadata``, callbacks, ``partial_params``),
    so agents keep injecting the workflow ``Context`` into a ``ctx: Context`` parameter.
    The key is the tool's name plus the model's arguments validated by ``fn_schema``: the
    ``Context`` and the ``partial_params`` are passed to the function, never keyed.

    ``fn``, ``async_fn`` and ``real_fn`` are the *unguarded* functions.
    """

    def __init__(self, tool: FunctionTool, governance: _Governance) -> None:
        # A clone, not a second FunctionTool.__init__: it keeps fn/async_fn exactly as
        # LlamaIndex derived them (sync_to_async / async_to_sync), the callbacks, the
        # Context parameter and the FieldInfo defaults.
        self.__dict__.update(vars(tool))
        self._onceonly = governance
        self._onceonly_inner = tool
        hidden = set(tool.partial_params)
        if tool.ctx_param_name is not None:
            hidden.add(tool.ctx_param_name)
        self._onceonly_hidden = frozenset(hidden)

    @property
    def inner(self) -> FunctionTool:
        """The unguarded tool this one wraps."""
        return self._onceonly_inner

    def _prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Prepared:
        all_kwargs = {**self._field_defaults, **self.partial_params, **kwargs}
        ctx_name = self.ctx_param_name
        if self.requires_context and ctx_name is not None and ctx_name not in all_kwargs:
            raise ValueError("Context is required for this tool")
        # As FunctionTool reports it: without the Context (so the output serialises).
        raw_input = {
            "args": args,
            "kwargs": {k: v for k, v in all_kwargs.items() if k != ctx_name},
        }
        hidden = {k: all_kwargs.pop(k) for k in self._onceonly_hidden if k in all_kwargs}
        return _prepare(self.metadata, self._onceonly, args, all_kwargs, hidden, raw_input)

    def _answer(self, c: Classification, p: _Prepared, override: Any) -> GuardedToolOutput:
        emit(c)
        if not _plain_result(c):
            return _rendered(c, p.raw_input)
        if isinstance(override, ToolOutput):
            return _marked(override, c)
        # A replay renders the stored value as the first call did: the model sees the
        # same content (the callback runs again, as it would have).
        return GuardedToolOutput(
            content=str(override) if override is not None else None,
            blocks=None if override is not None else self._parse_tool_output(c.result),
            tool_name=self.metadata.get_name(),
            raw_input=p.raw_input,
            raw_output=c.result,
            classification=c.as_dict(),
        )

    def call(self, *args: Any, **kwargs: Any) -> GuardedToolOutput:
        """Run the tool at most once per key (sync)."""
        p = self._prepare(args, kwargs)
        run = functools.partial(self.fn, **p.args, **p.hidden)
        c = p.early or p.guard.run_call_classified(p.name, p.args, run, **p.kw)
        return self._answer(c, p, self._run_sync_callback(c.result) if _plain_result(c) else None)

    async def acall(self, *args: Any, **kwargs: Any) -> GuardedToolOutput:
        """Run the tool at most once per key (async; the ledger never blocks the loop)."""
        p = self._prepare(args, kwargs)
        run = functools.partial(self.async_fn, **p.args, **p.hidden)
        c = p.early or await p.guard.arun_call_classified(p.name, p.args, run, **p.kw)
        callback = await self._run_async_callback(c.result) if _plain_result(c) else None
        return self._answer(c, p, callback)

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


def _checked(run: Callable[..., ToolOutput], args: Mapping[str, Any]) -> ToolOutput:
    out = run(**args)
    if out.is_error:
        raise ToolError(out)
    return out


async def _achecked(run: Callable[..., Any], args: Mapping[str, Any]) -> ToolOutput:
    out: ToolOutput = await run(**args)
    if out.is_error:
        raise ToolError(out)
    return out


class GuardedTool(_ModelText, AsyncBaseTool):
    """Any ``BaseTool`` / ``AsyncBaseTool``, run at most once per key.

    The stored result is the tool's ``ToolOutput``; a replay returns it. An output with
    ``is_error=True`` is a failure (:class:`ToolError`): not stored, the next call runs.
    """

    def __init__(self, tool: BaseTool, governance: _Governance) -> None:
        self._tool = tool
        self._onceonly = governance

    @property
    def metadata(self) -> ToolMetadata:
        return self._tool.metadata

    @property
    def inner(self) -> BaseTool:
        """The unguarded tool this one wraps."""
        return self._tool

    def _answer(self, c: Classification, p: _Prepared) -> GuardedToolOutput:
        out = c.result
        if isinstance(out, ToolOutput) and not _plain_result(c) and c.exception is not None:
            # It ran but was not recorded (CompletionNotRecorded, LeaseLost: both carry the
            # result): the contract's sentence quotes the content the model would have
            # read, not the ToolOutput object around it.
            err = copy.copy(c.exception)
            err.result = out.content  # type: ignore[attr-defined]
            c = classify(err, tool=c.tool)
        emit(c)
        if _plain_result(c) and isinstance(out, ToolOutput):
            return _marked(out, c)
        return _rendered(c, p.raw_input)

    def call(self, *args: Any, **kwargs: Any) -> GuardedToolOutput:
        """Run the tool at most once per key (sync)."""
        p = _prepare(self.metadata, self._onceonly, args, kwargs, {}, None)
        tool = self._tool
        sync = tool.call if isinstance(tool, AsyncBaseTool) else tool
        run = functools.partial(_checked, sync, p.args)
        c = p.early or p.guard.run_call_classified(p.name, p.args, run, **p.kw)
        return self._answer(c, p)

    async def acall(self, *args: Any, **kwargs: Any) -> GuardedToolOutput:
        """Run the tool at most once per key (async; a sync-only tool in a worker thread,
        as ``adapt_to_async_tool`` does)."""
        p = _prepare(self.metadata, self._onceonly, args, kwargs, {}, None)
        tool = self._tool
        run: Callable[[], Any] = (
            functools.partial(_achecked, tool.acall, p.args)
            if isinstance(tool, AsyncBaseTool)
            else functools.partial(_checked, tool, p.args)
        )
        c = p.early or await p.guard.arun_call_classified(p.name, p.args, run, **p.kw)
        return self._answer(c, p)


# -- building ------------------------------------------------------------------------------
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
    run_id: RunId = None,
    scope: Scope = None,
    **options: Any,
) -> GuardedFunctionTool | GuardedTool:
    """Guard one tool: a ``FunctionTool``, any ``BaseTool``, or a plain function.

    ``guard`` defaults to ``onceonly_core.guard``. ``agent_id`` turns governance on
    (policies, budgets, approvals); ``spend_usd`` is a price per call or a function of
    the validated arguments. ``scope`` is the dedup scope (a conversation id, or a
    function returning it); by default ``with guard.workflow(...)``, else the active
    LlamaIndex run. ``run_id`` defaults to ``with guard.run(...)``, else the active
    LlamaIndex run's id. Other keywords are guard options (``read_only=True``, ``ttl=``,
    ``key_args=``, ``wait=``...). A ``FunctionTool`` comes back as a
    :class:`GuardedFunctionTool`, anything else as a :class:`GuardedTool`; a tool that is
    already guarded is returned unchanged.
    """
    if isinstance(tool, (GuardedFunctionTool, GuardedTool)):
        return tool
    gov = _governance(guard, agent_id, spend_usd, run_id, scope, options)
    if not isinstance(tool, BaseTool):
        if isinstance(tool, type) and issubclass(tool, BaseModel):
            raise ConfigError(
                f"{tool.__name__} is a pydantic model class, not a tool: pass a function, "
                "or a FunctionTool with fn_schema=" + tool.__name__
            )
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
    run_id: RunId = None,
    scope: Scope = None,
    tool_options: Mapping[str, Mapping[str, Any]] | None = None,
    **options: Any,
) -> AgentTools:
    """Guard a list of tools; ``tool_options={"pay": {"spend_usd": 5.0}}`` per tool name
    (``{"weather": {"read_only": True}}`` for a read tool)."""
    per_tool = dict(tool_options or {})
    out: AgentTools = []
    for t in tools:
        name = t.metadata.name if isinstance(t, BaseTool) else getattr(t, "__name__", None)
        extra = dict(per_tool.pop(name, {})) if name is not None else {}
        kw: dict[str, Any] = {
            "agent_id": agent_id,
            "spend_usd": spend_usd,
            "run_id": run_id,
            "scope": scope,
            **options,
            **extra,
        }
        out.append(guard_tool(t, guard, **kw))
    if per_tool:
        raise ConfigError(f"tool_options names unknown tools: {', '.join(sorted(per_tool))}")
    return out
