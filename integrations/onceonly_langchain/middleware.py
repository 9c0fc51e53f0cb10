"""``OnceOnlyMiddleware``: every tool call of a ``create_agent`` agent, guarded by the core.

The middleware sits where LangChain makes the call (``wrap_tool_call`` /
``awrap_tool_call``), so it can do what a callback cannot: skip the tool and answer for it.
Each call goes through ``guard.run_call_classified`` with the tool's name and its validated
arguments, LangChain's own handler as the thunk, and ends in exactly one ``ToolMessage`` for
its ``tool_call_id``, rendered from the core's classification (see
docs/integrations/contract.md). A LangGraph ``interrupt()`` inside the tool passes through
unchanged. With an ``agent_id``, the kill switch also stops the model loop
(``before_model``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Collection, Mapping
from functools import partial
from typing import Any

from langchain.agents.middleware import AgentMiddleware, AgentState, hook_config
from langchain_core.messages import AIMessage, InvalidToolCall, ToolMessage
from langchain_core.tools import BaseTool
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.runtime import Runtime
from langgraph.types import Command
from pydantic import ValidationError

from onceonly_core import Classification, Guard, classify
from onceonly_core import guard as default_guard
from onceonly_core.contract import invalid_arguments, invalid_json, unknown_tool

from ._common import THREAD, Call, Resolver, Settings, SpendRule, validated_arguments

__all__ = ["OnceOnlyMiddleware"]

Output = ToolMessage | Command[Any]
Handler = Callable[[ToolCallRequest], Any]
Plan = tuple[Call, "dict[str, Any] | Classification"]


class OnceOnlyMiddleware(AgentMiddleware[AgentState[Any], Any]):
    """Guard every tool call of an agent (``create_agent(middleware=[...])``).

    ``guard``: the Guard (default: ``onceonly_core.guard``). ``agent_id``: governance
    policies and the kill switch apply to this agent. ``scope``: the dedup scope (default:
    the LangGraph thread id, or an enclosing ``guard.workflow``; a string or
    ``config -> str``). ``run_id``: the timeline run (a string, or ``thread_run_id`` for one
    per thread; default: the enclosing ``guard.run``). ``spend_usd``: ``{tool: usd}`` or
    ``(tool, args) -> usd``. ``tools``: guard only these tools (names or ``BaseTool``\\ s;
    default: all). ``tool_options``: per-tool guard options, e.g.
    ``{"search": {"read_only": True}}``; ``**options`` apply to every tool (``ttl=``,
    ``wait=``, ``key_args=``...). ``name``: the middleware's name; by default it carries
    the agent id and the tools, so two instances with different configurations can sit in
    one agent (``create_agent`` refuses two middlewares of one name).
    """

    def __init__(
        self,
        guard: Guard | None = None,
        *,
        agent_id: str | None = None,
        scope: Resolver | object = THREAD,
        run_id: Resolver = None,
        spend_usd: SpendRule = None,
        tools: Collection[str | BaseTool] | None = None,
        tool_options: Mapping[str, Mapping[str, Any]] | None = None,
        name: str | None = None,
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
            tool_options={k: dict(v) for k, v in (tool_options or {}).items()},
        )
        # Not ``self.tools``: create_agent adds a middleware's ``tools`` to the agent.
        self.only = (
            None if tools is None else frozenset(t if isinstance(t, str) else t.name for t in tools)
        )
        self._name = name or _default_name(agent_id, self.only, scope)

    @property
    def name(self) -> str:
        return self._name

    # -- tool calls ------------------------------------------------------------------------
    def wrap_tool_call(self, request: ToolCallRequest, handler: Handler) -> Output:
        plan = self._plan(request)
        if plan is None:
            return handler(request)  # type: ignore[no-any-return]
        call, args = plan
        if isinstance(args, Classification):
            return call.render(args)  # type: ignore[no-any-return]
        guard = self.settings.guard
        run = partial(_run, call, handler, request)
        c = guard.run_call_classified(call.name, call.args, run, **args)
        return call.render(c)  # type: ignore[no-any-return]

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[Any]]
    ) -> Output:
        plan = self._plan(request)
        if plan is None:
            return await handler(request)  # type: ignore[no-any-return]
        call, args = plan
        if isinstance(args, Classification):
            return call.render(args)  # type: ignore[no-any-return]
        guard = self.settings.guard
        run = partial(_arun, call, handler, request)
        c = await guard.arun_call_classified(call.name, call.args, run, **args)
        return call.render(c)  # type: ignore[no-any-return]

    def _plan(self, request: ToolCallRequest) -> Plan | None:
        """What both hooks do before the call: None (not ours), an answer the adapter gives
        without calling (unknown tool, invalid arguments), or the call and its options."""
        tc = request.tool_call
        name = tc["name"]
        if self.only is not None and name not in self.only:
            return None
        call_id = tc.get("id") or ""
        raw = tc.get("args") or {}
        tool = request.tool
        if tool is None:
            return Call(name, {}, call_id), unknown_tool(name)
        try:
            args = validated_arguments(tool, raw, call_id)
        except ValidationError as err:
            return Call(name, {}, call_id), classify(err, tool=name)
        call = Call(name, args, call_id)
        config = request.runtime.config if request.runtime is not None else None
        return call, self.settings.call_options(name, args, config)

    # -- tool calls the model wrote but LangChain could not parse -------------------------
    def after_model(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Answer each malformed tool call of the model's last message (its arguments not
        a JSON object: ``AIMessage.invalid_tool_calls``) with the contract's
        ``invalid_arguments`` / ``invalid_json`` message, so the transcript answers every
        call id, as the model's API requires, in the same words as every adapter."""
        messages = state["messages"]
        last = messages[-1] if messages else None
        if not isinstance(last, AIMessage) or not last.invalid_tool_calls:
            return None
        answered = {m.tool_call_id for m in messages if isinstance(m, ToolMessage)}
        answers = []
        for bad in last.invalid_tool_calls:
            call_id, name = bad.get("id"), bad.get("name") or ""
            if not call_id or call_id in answered:
                continue
            if self.only is not None and name not in self.only:
                continue
            answers.append(Call(name, {}, call_id).render(_unreadable(name, bad)))
        return {"messages": answers} if answers else None

    # -- the kill switch stops the model loop ---------------------------------------------
    @hook_config(can_jump_to=["end"])
    def before_model(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        return self._stop_if_disabled()

    @hook_config(can_jump_to=["end"])
    async def abefore_model(
        self, state: AgentState[Any], runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        if self.settings.agent_id is None or self.settings.guard.gov.store.kind == "memory":
            return self._stop_if_disabled()
        return await asyncio.to_thread(self._stop_if_disabled)  # a database read

    def _stop_if_disabled(self) -> dict[str, Any] | None:
        """With an agent id: when the agent (or every agent) is disabled, end the run with
        a message instead of asking the model for more tool calls."""
        agent = self.settings.agent_id
        if agent is None:
            return None
        status = self.settings.guard.gov.agent_status(agent)
        if not status["disabled"]:
            return None
        why = status.get("reason") or ""
        meta = {"code": "blocked", "reason": "agent_disabled", "agent_id": agent, "error": why}
        text = f"Stopped: agent {agent} is disabled" + (f" ({why})" if why else "") + "."
        msg = AIMessage(content=text, response_metadata={"onceonly": meta})
        return {"messages": [msg], "jump_to": "end"}


def _unreadable(name: str, bad: InvalidToolCall) -> Classification:
    """The answer to a tool call whose argument text did not parse (read again here: the
    framework keeps the text and a message, the contract words the parser's error)."""
    raw = bad.get("args")
    try:
        data = json.loads(raw) if raw and raw.strip() else {}
    except ValueError as err:
        return invalid_json(name, err)
    if not isinstance(data, dict):
        return invalid_json(name)
    detail = bad.get("error") or "its arguments could not be read"
    return invalid_arguments(name, detail, reason="invalid_json")


def _run(call: Call, handler: Handler, request: ToolCallRequest) -> Any:
    return call.settle(handler(request))


async def _arun(
    call: Call, handler: Callable[[ToolCallRequest], Awaitable[Any]], request: ToolCallRequest
) -> Any:
    return call.settle(await handler(request))


def _default_name(agent_id: str | None, only: frozenset[str] | None, scope: Any) -> str:
    """``OnceOnlyMiddleware``, with the configuration that tells two instances apart.
    Stable across processes (graph node names are kept in checkpoints); free of ``:`` and
    ``|``, which LangGraph reserves in node names."""
    parts = []
    if agent_id is not None:
        parts.append(f"agent={agent_id}")
    if only is not None:
        parts.append("tools=" + ",".join(sorted(only)))
    if isinstance(scope, str):
        parts.append(f"scope={scope}")
    if not parts:
        return "OnceOnlyMiddleware"
    label = ";".join(parts).replace(":", "_").replace("|", "_")
    return f"OnceOnlyMiddleware[{label}]"
