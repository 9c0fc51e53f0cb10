"""OnceOnly for the OpenAI Agents SDK: guarded ``FunctionTool``s and a policy guardrail.

``guard_function_tool(tool)`` returns a copy of the tool whose ``on_invoke_tool`` runs
through ``guard.acall_tool``: once per key (scope + tool name + canonical arguments, not
the per-turn ``tool_call_id``), governed when an agent id is given. A blocked or
pending call answers the model with a message instead of running.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from onceonly_core import Guard
from onceonly_core.errors import MissingExtraError, OnceOnlyError

try:
    from agents import (
        Agent,
        FunctionTool,
        ToolGuardrailFunctionOutput,
        ToolInputGuardrail,
        ToolInputGuardrailData,
    )
    from agents import tool as _sdk_tool
    from agents.tool_context import ToolContext
except ImportError as err:
    raise MissingExtraError(
        "OnceOnly's OpenAI Agents SDK integration", "openai", "openai-agents"
    ) from err

from ._dispatch import _infra_error, render
from ._serialize import error_text
from ._tools import SpendFn

__all__ = ["guard_agent", "guard_function_tool", "policy_guardrail"]

Invoke = Callable[[ToolContext[Any], str], Awaitable[Any]]


class _Invocation:
    __slots__ = ("ctx", "failure", "inner", "input")

    def __init__(self, inner: Invoke, ctx: ToolContext[Any], input: str) -> None:
        self.inner, self.ctx, self.input = inner, ctx, input
        self.failure: BaseException | None = None


# The guard calls ``fn(**args)``; the SDK's context and raw input reach the original
# invoker through this variable (set per invocation, so concurrent calls never mix).
_current: contextvars.ContextVar[_Invocation | None] = contextvars.ContextVar(
    "onceonly_openai_invocation", default=None
)


class _HandledFailure(Exception):
    """The SDK's failure formatter turned the tool's exception into text for the model.

    Raised inside the guarded call so the guard records a failure (the next call runs
    again) instead of storing the error text as the tool's result.
    """

    def __init__(self, output: Any, error: BaseException) -> None:
        super().__init__(str(error))
        self.output = output


def _key_function(tool: FunctionTool) -> Callable[..., Awaitable[Any]]:
    """The callable the guard runs: its signature is the tool's JSON parameters, so keys,
    ``key_args=`` and ``exclude=`` see the model's argument names."""

    async def run(**_: Any) -> Any:
        inv = _current.get()
        assert inv is not None, "a guarded Agents tool ran outside its invocation"
        out = await inv.inner(inv.ctx, inv.input)
        if inv.failure is not None:
            raise _HandledFailure(out, inv.failure) from inv.failure
        return out

    props = tool.params_json_schema.get("properties") or {}
    required = set(tool.params_json_schema.get("required") or ())
    params = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if name in required else None,
        )
        for name in props
        if name.isidentifier()
    ]
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__name__ = run.__qualname__ = tool.name
    return run


def _install_failure_recorder(copied: FunctionTool, original: FunctionTool) -> None:
    # A @function_tool catches the tool's exception and answers with a formatted message;
    # record that it happened (then format as before) so the guard can tell a failure
    # from a result. Tools without the SDK's failure handling raise to the guard directly.
    if not hasattr(copied.on_invoke_tool, "__agents_bind_function_tool__"):
        return

    async def recorder(ctx: Any, error: Exception) -> Any:
        inv = _current.get()
        if inv is not None:
            inv.failure = error
        fmt = _sdk_tool.resolve_function_tool_failure_error_function(original, ctx)
        if fmt is None:
            raise error
        out = fmt(ctx, error)
        return await out if inspect.isawaitable(out) else out

    _sdk_tool.set_function_tool_failure_error_function(copied, recorder)


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

    ``scope``: the dedup scope (default: the caller's ``guard.workflow(...)``).
    ``input_guardrail=True`` also adds :func:`policy_guardrail`, which rejects a call
    the agent's policy blocks before the tool is even invoked. Other keywords are guard
    options (``key_args=``, ``ttl=``...).
    """
    if not isinstance(tool, FunctionTool):
        raise TypeError(f"guard_function_tool takes a FunctionTool, not {type(tool).__name__}")
    if guard is None:
        from onceonly_core import guard as default_guard

        guard = default_guard
    g = guard
    new = copy.copy(tool)  # the SDK's copy rebinds the tool's own invoker to the copy
    _install_failure_recorder(new, tool)
    inner: Invoke = new.on_invoke_tool
    fn = _key_function(tool)
    name = tool.name

    async def on_invoke_tool(ctx: ToolContext[Any], input: str) -> Any:
        try:
            args = json.loads(input) if input.strip() else {}
        except ValueError as err:
            return error_text(
                "invalid_json", f"The arguments for tool {name!r} are not valid JSON: {err}."
            )
        if not isinstance(args, dict):
            return error_text(
                "invalid_arguments", f"The arguments for tool {name!r} must be a JSON object."
            )
        spend = spend_usd(args) if callable(spend_usd) else spend_usd
        token = _current.set(_Invocation(inner, ctx, input))
        try:
            if scope is not None:
                with g.workflow(scope):
                    res = await g.acall_tool(
                        fn, args, tool=name, agent_id=agent_id, spend_usd=spend, **options
                    )
            else:
                res = await g.acall_tool(
                    fn, args, tool=name, agent_id=agent_id, spend_usd=spend, **options
                )
        except OnceOnlyError as err:
            return _infra_error(name, err)
        except TypeError as err:  # arguments that do not fit the tool's parameters
            return error_text("invalid_arguments", f"Invalid arguments for tool {name!r}: {err}.")
        finally:
            _current.reset(token)
        if res.decision in ("executed", "dedup"):
            return res.result
        if res.decision == "failed":
            exc = res.exception
            if isinstance(exc, _HandledFailure):
                return exc.output  # the SDK's own message for the failure
            if isinstance(exc, BaseException):
                raise exc  # no failure handler configured: the SDK fails the run, as before
        return render(res)

    new.on_invoke_tool = on_invoke_tool
    if input_guardrail:
        new.tool_input_guardrails = [
            *(tool.tool_input_guardrails or []),
            policy_guardrail(guard=g, agent_id=agent_id),
        ]
    return new


def guard_agent(agent: Agent[Any], **kwargs: Any) -> Agent[Any]:
    """A clone of ``agent`` with every ``FunctionTool`` guarded (:func:`guard_function_tool`)."""
    tools = [
        guard_function_tool(t, **kwargs) if isinstance(t, FunctionTool) else t for t in agent.tools
    ]
    return agent.clone(tools=tools)


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
    refuses outright (kill switch, blocked or not-allowed tool), with the policy reason.

    Caps, spend and approvals depend on the call itself and stay with the guarded tool.
    """
    if guard is None:
        from onceonly_core import guard as default_guard

        guard = default_guard
    g = guard

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
        message = f"Tool {tool!r} was blocked by policy: {reason}." + (
            f" {detail}" if detail else ""
        )
        info: Mapping[str, Any] = {"reason": reason, "agent_id": agent, "tool": tool}
        return ToolGuardrailFunctionOutput.reject_content(message, output_info=dict(info))

    return ToolInputGuardrail(guardrail_function=onceonly_policy, name="onceonly_policy")
