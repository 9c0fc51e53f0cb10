"""OnceOnly for the OpenAI Agents SDK: guarded tools, agents, handoffs, MCP servers.

``guard_function_tool(tool)`` returns a copy of a ``FunctionTool`` whose
``on_invoke_tool`` goes through ``guard.arun_call_classified`` with the tool's name and
its *validated* arguments (for a ``@function_tool``, the SDK's own argument model: defaults
filled in, values coerced), keyed by scope + name + canonical arguments, never by the
per-turn ``tool_call_id``. Every outcome is rendered from the core's classification: the
tool's result when it ran or is replayed, the contract's sentence for the model otherwise.

``guard_agent(agent)`` guards a whole agent graph: the agent's function tools, the agents
it hands off to (recursively, cycles included), agents used through ``as_tool`` (their
own tools are guarded inside the nested run) and its MCP servers (every
``call_tool`` goes through the guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import inspect
import json
import types
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from pydantic import ValidationError

from onceonly_core import Guard, classify
from onceonly_core.contract import Classification, invalid_json
from onceonly_core.errors import ConfigError, MissingExtraError, PolicyBlocked

try:
    from agents import (
        Agent,
        FunctionTool,
        Handoff,
        ToolGuardrailFunctionOutput,
        ToolInputGuardrail,
        ToolInputGuardrailData,
    )
    from agents import tool as _sdk_tool
    from agents.function_schema import function_schema
    from agents.mcp import MCPServer
    from agents.tool_context import ToolContext
except ImportError as err:
    raise MissingExtraError(
        "OnceOnly's OpenAI Agents SDK integration", "openai", "openai-agents"
    ) from err

from ._tools import _OPTIONS as _ALLOWED
from ._tools import SpendFn, check_options

__all__ = [
    "MCPToolError",
    "guard_agent",
    "guard_function_tool",
    "guard_mcp_server",
    "outcome_of",
    "policy_guardrail",
]

Invoke = Callable[[ToolContext[Any], str], Awaitable[Any]]
Validate = Callable[[dict[str, Any]], dict[str, Any]]

_GUARDED = "__onceonly_guarded__"


def _default_guard(guard: Guard | None) -> Guard:
    if guard is not None:
        return guard
    from onceonly_core import guard as default_guard

    return default_guard


def _ok(c: Classification) -> bool:
    return (c.code, c.reason) in (("executed", "ok"), ("replayed", "dedup"))


# -- validated arguments ---------------------------------------------------------------------
def _validator(tool: FunctionTool) -> Validate:
    """The tool's validated arguments for the model's JSON object.

    A ``@function_tool`` keeps the callable it wraps (``tool.__wrapped__``): its arguments
    are validated by the same model the SDK builds from that callable (``function_schema``),
    so the key sees what the function receives (``"25.00"`` and ``25.0`` for a float are
    one call). A tool built from a JSON schema only (MCP, ``as_tool``, hand-built) receives
    the JSON itself: its top-level schema defaults are filled in.
    """
    try:
        fn = tool.__wrapped__
        model = function_schema(
            fn, name_override=tool.name, strict_json_schema=tool.strict_json_schema
        ).params_pydantic_model
    except Exception:  # no wrapped callable, or one the SDK cannot describe: JSON it is
        props = tool.params_json_schema.get("properties") or {}
        defaults = {
            k: v["default"] for k, v in props.items() if isinstance(v, dict) and "default" in v
        }

        def from_json(data: dict[str, Any]) -> dict[str, Any]:
            return {**defaults, **data}

        return from_json

    def from_model(data: dict[str, Any]) -> dict[str, Any]:
        parsed = model(**data)
        return {name: getattr(parsed, name) for name in type(parsed).model_fields}

    return from_model


def _parse(name: str, text: str, validate: Validate) -> dict[str, Any] | Classification:
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as err:
        return invalid_json(name, err)
    if not isinstance(data, dict):
        return invalid_json(name)
    try:
        return validate(data)
    except ValidationError as err:
        return classify(err, tool=name)


# -- function tools --------------------------------------------------------------------------
class _Invocation:
    __slots__ = ("failure",)

    def __init__(self) -> None:
        self.failure: Exception | None = None


# The SDK's failure formatter reports a handled tool exception to the invocation it belongs
# to through this variable (set per invocation, so concurrent calls never mix).
_current: contextvars.ContextVar[_Invocation | None] = contextvars.ContextVar(
    "onceonly_openai_invocation", default=None
)


def _install_failure_recorder(copied: FunctionTool, original: FunctionTool) -> None:
    # A @function_tool catches the tool's exception and answers with a formatted message;
    # record that it happened so the guard records a failure (the next call runs again)
    # instead of storing the message as the tool's result. Tools without the SDK's failure
    # handling raise to the guard directly.
    if not hasattr(copied.on_invoke_tool, "__agents_bind_function_tool__"):
        return

    async def recorder(ctx: Any, error: Exception) -> Any:
        fmt = _sdk_tool.resolve_function_tool_failure_error_function(original, ctx)
        if fmt is None:
            raise error  # failure_error_function=None: the SDK raises, and so do we
        inv = _current.get()
        if inv is not None:
            inv.failure = error
        out = fmt(ctx, error)
        return await out if inspect.isawaitable(out) else out

    _sdk_tool.set_function_tool_failure_error_function(copied, recorder)


_OUTCOME = "_onceonly_outcome"


def _remember(ctx: Any, c: Classification) -> None:
    # The invocation's ToolContext carries its classification to the custom data extractor.
    with contextlib.suppress(AttributeError):  # a context without attributes: no outcome
        setattr(ctx, _OUTCOME, c)


def outcome_of(item: Any) -> dict[str, Any] | None:
    """The contract outcome (``Classification.as_dict()``: ``code``, ``reason``...) of a
    guarded tool's ``ToolCallOutputItem``, or None for an unguarded tool."""
    data = getattr(item, "custom_data", None) or {}
    found = data.get("onceonly")
    return dict(found) if isinstance(found, Mapping) else None


def _with_outcome(user: Any) -> Callable[[Any], Awaitable[Mapping[str, Any] | None]]:
    """The SDK's custom data extractor: the tool output item gets the outcome under
    ``custom_data["onceonly"]`` (not sent to the model), beside the tool's own data."""

    async def extract(data: Any) -> Mapping[str, Any] | None:
        own = user(data) if user is not None else None
        if inspect.isawaitable(own):
            own = await own
        c = getattr(data.tool_context, _OUTCOME, None)
        if not isinstance(c, Classification):
            return own
        return {**(own or {}), "onceonly": c.as_dict()}

    return extract


def guard_function_tool(
    tool: FunctionTool,
    *,
    guard: Guard | None = None,
    agent_id: str | None = None,
    scope: str | None = None,
    spend_usd: float | SpendFn | None = None,
    input_guardrail: bool = False,
    **options: Any,
) -> FunctionTool:
    """A copy of ``tool`` whose invocations are guarded and governed.

    ``scope``: the dedup scope, a conversation id (default: the caller's
    ``guard.workflow(...)``; without either the core warns once). ``input_guardrail=True``
    also adds :func:`policy_guardrail`, which rejects a call the agent's policy blocks
    before the tool is invoked. Other keywords are guard options (``read_only=True``,
    ``key_args=``, ``ttl=``...).

    The tool's exception becomes the contract's ``failed`` sentence for the model (and is
    not recorded as done, so the next call runs again); with the SDK's
    ``failure_error_function=None`` it is raised and fails the run, as the SDK does.
    """
    if not isinstance(tool, FunctionTool):
        raise TypeError(f"guard_function_tool takes a FunctionTool, not {type(tool).__name__}")
    if getattr(tool, _GUARDED, False):
        # Guarded twice, a call would wait on its own claim of the same key.
        raise ConfigError(f"tool {tool.name!r} is already guarded")
    check_options(options)
    g = _default_guard(guard)
    new = copy.copy(tool)  # the SDK's copy rebinds the tool's own invoker to the copy
    _install_failure_recorder(new, tool)
    inner: Invoke = new.on_invoke_tool
    validate = _validator(tool)
    name = tool.name

    async def on_invoke_tool(ctx: ToolContext[Any], input: str) -> Any:
        args = _parse(name, input, validate)
        if isinstance(args, Classification):
            _remember(ctx, args)
            return args.text
        inv = _Invocation()

        async def run() -> Any:
            out = await inner(ctx, input)
            if inv.failure is not None:
                # The SDK formatted the tool's exception into text: a failure, not a result.
                raise inv.failure
            return out

        spend = spend_usd(args) if callable(spend_usd) else spend_usd
        token = _current.set(inv)
        try:
            c = await g.arun_call_classified(
                name, args, run, scope=scope, agent_id=agent_id, spend_usd=spend, **options
            )
        finally:
            _current.reset(token)
        _remember(ctx, c)
        if _ok(c):
            return c.result
        unhandled = c.code == "failed" and c.reason == "tool_error" and inv.failure is None
        if unhandled and isinstance(c.exception, BaseException):
            raise c.exception  # no failure handler: the SDK fails the run, as without us
        return c.text

    new.on_invoke_tool = on_invoke_tool
    new.custom_data_extractor = _with_outcome(tool.custom_data_extractor)
    setattr(new, _GUARDED, True)
    if input_guardrail:
        new.tool_input_guardrails = [
            *(tool.tool_input_guardrails or []),
            policy_guardrail(guard=g, agent_id=agent_id),
        ]
    return new


# -- MCP servers -----------------------------------------------------------------------------
class MCPToolError(Exception):
    """An MCP tool answered with ``isError``: the call failed (it is not recorded as done)."""


class _GuardedMCPServer(MCPServer):
    """An MCP server whose ``call_tool`` goes through the guard; everything else is the
    wrapped server's (attributes included, through ``__getattr__``)."""

    def __init__(self, inner: MCPServer, call: _Options) -> None:
        # No super().__init__(): the wrapped server's settings are read through __getattr__.
        self._inner = inner
        self._call = call

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("_inner")  # absent while copy/pickle rebuild the object
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def cached_tools(self) -> Any:
        return self._inner.cached_tools

    async def connect(self) -> None:
        await cast(Any, self._inner).connect()

    async def cleanup(self) -> None:
        await cast(Any, self._inner).cleanup()

    async def list_tools(self, run_context: Any = None, agent: Any = None) -> Any:
        return await self._inner.list_tools(run_context, agent)

    async def list_prompts(self) -> Any:
        return await self._inner.list_prompts()

    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self._inner.get_prompt(name, arguments)

    async def list_resources(self, cursor: str | None = None) -> Any:
        return await self._inner.list_resources(cursor)

    async def list_resource_templates(self, cursor: str | None = None) -> Any:
        return await self._inner.list_resource_templates(cursor)

    async def read_resource(self, uri: str) -> Any:
        return await self._inner.read_resource(uri)

    def _get_needs_approval_for_tool(self, tool: Any, agent: Any) -> Any:
        return self._inner._get_needs_approval_for_tool(tool, agent)

    def _get_failure_error_function(self, agent_failure_error_function: Any) -> Any:
        return self._inner._get_failure_error_function(agent_failure_error_function)

    async def call_tool(
        self, tool_name: str, arguments: dict[str, Any] | None, meta: dict[str, Any] | None = None
    ) -> Any:
        from mcp.types import CallToolResult

        args = dict(arguments or {})

        async def run() -> Any:
            if meta is None:
                result = await self._inner.call_tool(tool_name, arguments)
            else:
                result = await self._inner.call_tool(tool_name, arguments, meta=meta)
            if _is_error(result):
                raise MCPToolError(_text_of(result) or f"{tool_name} reported an error")
            # Stored as plain JSON and rebuilt on replay: the same result object either way.
            return result.model_dump(mode="json", by_alias=True)

        c = await self._call.run(tool_name, args, run)
        if _ok(c):
            return CallToolResult.model_validate(c.result)
        # By alias ("isError"): the same in mcp 1.x (camelCase fields) and 2.x (snake_case).
        answer = {"content": [{"type": "text", "text": c.text}], "isError": True}
        return CallToolResult.model_validate(answer)


def _is_error(result: Any) -> bool:
    return bool(getattr(result, "is_error", None) or getattr(result, "isError", None))


def _text_of(result: Any) -> str:
    return " ".join(str(getattr(c, "text", "")) for c in getattr(result, "content", []) or [])


_PER_TOOL = _ALLOWED | {"spend_usd", "input_guardrail"}


class _Options:
    """One guard_agent call's settings: how each tool of the graph is guarded."""

    def __init__(
        self,
        guard: Guard,
        agent_id: str | None,
        scope: str | None,
        spend_usd: float | SpendFn | None,
        input_guardrail: bool,
        tool_options: Mapping[str, Mapping[str, Any]],
        options: Mapping[str, Any],
    ) -> None:
        check_options(options)
        for per_tool in tool_options.values():
            check_options(per_tool, _PER_TOOL)
        self.guard, self.agent_id, self.scope = guard, agent_id, scope
        self.spend_usd, self.input_guardrail = spend_usd, input_guardrail
        self.tool_options, self.options = tool_options, options

    def for_tool(self, name: str, **defaults: Any) -> dict[str, Any]:
        return {**defaults, **self.options, **self.tool_options.get(name, {})}

    async def run(
        self, name: str, args: dict[str, Any], thunk: Callable[[], Any]
    ) -> Classification:
        opts = self.for_tool(name)
        spend = opts.pop("spend_usd", self.spend_usd)
        spend = spend(args) if callable(spend) else spend
        agent_id, scope = opts.pop("agent_id", self.agent_id), opts.pop("scope", self.scope)
        return await self.guard.arun_call_classified(
            name, args, thunk, scope=scope, agent_id=agent_id, spend_usd=spend, **opts
        )


def guard_mcp_server(
    server: MCPServer,
    *,
    guard: Guard | None = None,
    agent_id: str | None = None,
    scope: str | None = None,
    spend_usd: float | SpendFn | None = None,
    tool_options: Mapping[str, Mapping[str, Any]] | None = None,
    **options: Any,
) -> MCPServer:
    """``server`` with every ``call_tool`` guarded: the MCP tool's name and the arguments
    the model sent (the server validates them itself), one call per scope. Connect and
    clean up either object: they are the same server."""
    call = _Options(
        _default_guard(guard), agent_id, scope, spend_usd, False, tool_options or {}, options
    )
    return _GuardedMCPServer(server, call)


# -- agents ----------------------------------------------------------------------------------
class _AgentGuard:
    """Guards one agent graph; every agent, tool and server is wrapped once (a memo by
    identity), so handoff cycles end and a shared sub-agent stays one object."""

    def __init__(self, call: _Options) -> None:
        self.call = call
        # By id, with the original kept alive beside its clone: an id is only unique while
        # its object lives (agents are unhashable dataclasses, so no weak mapping).
        self.agents: dict[int, tuple[Agent[Any], Agent[Any]]] = {}
        self.servers: dict[int, tuple[MCPServer, MCPServer]] = {}

    def agent(self, agent: Agent[Any]) -> Agent[Any]:
        if getattr(agent, _GUARDED, False):
            return agent
        done = self.agents.get(id(agent))
        if done is not None:
            return done[1]
        clone = agent.clone()
        self.agents[id(agent)] = (agent, clone)
        setattr(clone, _GUARDED, True)
        clone.tools = [self.tool(t) for t in agent.tools]
        clone.handoffs = [self.handoff(h) for h in agent.handoffs]
        clone.mcp_servers = [self.server(s) for s in agent.mcp_servers]
        return clone

    def tool(self, tool: Any) -> Any:
        if not isinstance(tool, FunctionTool) or getattr(tool, _GUARDED, False):
            return tool
        defaults: dict[str, Any] = {}
        if getattr(tool, "_is_agent_tool", False):
            tool = self.agent_tool(tool)
            # The nested run is not an effect of its own (its tools are guarded inside it):
            # governed and audited, never replayed.
            defaults["read_only"] = True
        opts = self.call.for_tool(tool.name, **defaults)
        # A tool's own entry in tool_options may name its agent, scope, spend or guardrail.
        return guard_function_tool(
            tool,
            guard=self.call.guard,
            agent_id=opts.pop("agent_id", self.call.agent_id),
            scope=opts.pop("scope", self.call.scope),
            spend_usd=opts.pop("spend_usd", self.call.spend_usd),
            input_guardrail=opts.pop("input_guardrail", self.call.input_guardrail),
            **opts,
        )

    def agent_tool(self, tool: FunctionTool) -> FunctionTool:
        """An ``agent.as_tool(...)`` tool whose nested run uses the guarded agent."""
        sub = getattr(tool, "_agent_instance", None)
        if not isinstance(sub, Agent) or getattr(sub, _GUARDED, False):
            return tool
        guarded = self.agent(sub)
        # as_tool's invoker runs `Runner.run(starting_agent=self)` on the agent it closed
        # over, keeping every as_tool option (run_config, max_turns, extractors) in that
        # closure: rebuild the invoker with the guarded agent in place of that one cell.
        invoker: Any = tool.on_invoke_tool
        impl = getattr(invoker, "_invoke_tool_impl", None)
        code = getattr(impl, "__code__", None)
        if impl is None or code is None or "self" not in code.co_freevars:
            raise ConfigError(
                f"cannot guard the agent inside tool {tool.name!r} (this openai-agents "
                "version builds as_tool differently): guard the agent first, "
                "guard_agent(agent).as_tool(...)"
            )
        cells = list(impl.__closure__ or ())
        cells[code.co_freevars.index("self")] = types.CellType(guarded)
        rebuilt = types.FunctionType(
            code, impl.__globals__, impl.__name__, impl.__defaults__, tuple(cells)
        )
        rebuilt.__kwdefaults__ = impl.__kwdefaults__
        rebuilt.__dict__.update(impl.__dict__)
        new = copy.copy(tool)
        bound = type(invoker)(rebuilt, invoker._on_handled_error)
        new.on_invoke_tool = bound.__agents_bind_function_tool__(new)
        new._agent_instance = guarded
        return new

    def handoff(self, handoff: Any) -> Any:
        if isinstance(handoff, Agent):
            return self.agent(handoff)
        if not isinstance(handoff, Handoff):
            return handoff
        new = copy.copy(handoff)
        invoke = handoff.on_invoke_handoff

        async def on_invoke_handoff(ctx: Any, input_json: str) -> Any:
            return self.agent(await invoke(ctx, input_json))

        new.on_invoke_handoff = on_invoke_handoff
        return new

    def server(self, server: MCPServer) -> MCPServer:
        if isinstance(server, _GuardedMCPServer):
            return server
        done = self.servers.get(id(server))
        if done is None:
            done = self.servers[id(server)] = (server, _GuardedMCPServer(server, self.call))
        return done[1]


def guard_agent(
    agent: Agent[Any],
    *,
    guard: Guard | None = None,
    agent_id: str | None = None,
    scope: str | None = None,
    spend_usd: float | SpendFn | None = None,
    input_guardrail: bool = False,
    tool_options: Mapping[str, Mapping[str, Any]] | None = None,
    **options: Any,
) -> Agent[Any]:
    """A clone of ``agent`` whose whole graph is guarded.

    Its ``FunctionTool``\\ s (:func:`guard_function_tool`), the agents it hands off to
    (``Agent`` or ``Handoff`` entries, recursively; a cycle of handoffs stays a cycle of
    guarded clones), agents used through ``as_tool`` (the nested run uses the guarded
    agent; the agent tool itself is governed but ``read_only``, never replayed) and its
    ``mcp_servers`` (every ``call_tool``). ``tool_options`` gives options per tool name
    (``{"get_weather": {"read_only": True}}``); other keywords apply to every tool.
    The original agents are not changed.
    """
    call = _Options(
        _default_guard(guard),
        agent_id,
        scope,
        spend_usd,
        input_guardrail,
        tool_options or {},
        options,
    )
    return _AgentGuard(call).agent(agent)


# -- the policy guardrail --------------------------------------------------------------------
def _static_reason(guard: Guard, agent_id: str, tool: str) -> tuple[str, str] | None:
    # The core's dry run of the checks a guardrail can decide before the call: kill
    # switch, registry, block and allow lists. Caps are only decided atomically by a call.
    verdict = guard.gov.check(agent_id, tool)
    if verdict["allowed"]:
        return None
    return str(verdict["reason"]), str(verdict.get("detail") or "")


def policy_guardrail(
    *, guard: Guard | None = None, agent_id: str | None
) -> ToolInputGuardrail[Any]:
    """A tool input guardrail that rejects, before the tool runs, a call the agent's policy
    refuses outright (kill switch, blocked or not-allowed tool), answering with the
    contract's ``blocked`` sentence (which names the policy reason).

    Caps, spend and approvals depend on the call itself and stay with the guarded tool.
    """
    g = _default_guard(guard)

    async def onceonly_policy(data: ToolInputGuardrailData) -> ToolGuardrailFunctionOutput:
        agent = agent_id
        if agent is None:  # no agent: governance does not apply
            return ToolGuardrailFunctionOutput.allow()
        tool = data.context.tool_name
        # The governance store is synchronous: keep it off the event loop.
        found = await asyncio.to_thread(_static_reason, g, agent, tool)
        if found is None:
            return ToolGuardrailFunctionOutput.allow()
        reason, detail = found
        c = classify(PolicyBlocked(agent, tool, reason, detail), tool=tool)
        info: Mapping[str, Any] = {"reason": reason, "agent_id": agent, "tool": tool}
        return ToolGuardrailFunctionOutput.reject_content(c.text, output_info=dict(info))

    return ToolInputGuardrail(guardrail_function=onceonly_policy, name="onceonly_policy")
