"""The dispatcher: model tool calls in, one tool output per call id out.

Every call goes through ``guard.call_tool`` (exactly once per key, governed), and
every call gets exactly one output, in call order, whatever happened: bad JSON, an
unknown tool, arguments that fail the schema, a policy block, a pending approval, a
failing tool or a ledger error all become an error output the model can read. Keys
come from the scope + tool name + canonical arguments, never from the call id, which
is new on every model turn: a replayed call gets the stored result under its new id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from onceonly_core import Guard
from onceonly_core.errors import ConfigError, InProgress, OnceOnlyError
from onceonly_core.governance.models import ToolResult

from ._serialize import error_text, to_text
from ._tools import Tool, explain, tool

__all__ = ["ToolCall", "ToolDispatcher"]

log = logging.getLogger("onceonly.openai")

Api = Literal["chat", "responses"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model made, whatever shape it arrived in."""

    call_id: str
    name: str
    custom: bool
    text: str
    """The JSON arguments of a function call, or the free-text input of a custom call."""


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def chat_calls(source: Any) -> list[ToolCall]:
    """Tool calls from a ``ChatCompletionMessage``, a message dict, or a list of calls."""
    items = source
    if isinstance(source, Mapping) or hasattr(source, "tool_calls"):
        items = _get(source, "tool_calls") or []
    out = []
    for tc in items:
        kind, call_id = _get(tc, "type"), _get(tc, "id")
        body = _get(tc, "custom") if kind == "custom" else _get(tc, "function")
        if not isinstance(call_id, str) or body is None:
            raise ValueError(f"not a Chat Completions tool call: {tc!r}")
        raw = _get(body, "input") if kind == "custom" else _get(body, "arguments")
        out.append(ToolCall(call_id, str(_get(body, "name")), kind == "custom", raw or ""))
    return out


def response_calls(source: Any) -> list[ToolCall]:
    """``function_call`` / ``custom_tool_call`` items of a ``Response`` or its output list."""
    items = source
    if not isinstance(source, (list, tuple)) and hasattr(source, "output"):
        items = source.output
    out = []
    for item in items:
        kind = _get(item, "type")
        if kind not in ("function_call", "custom_tool_call"):
            continue  # messages, reasoning, hosted tools: nothing for us to answer
        call_id = _get(item, "call_id")
        if not isinstance(call_id, str):
            raise ValueError(f"{kind} item without a call_id: {item!r}")
        custom = kind == "custom_tool_call"
        raw = _get(item, "input") if custom else _get(item, "arguments")
        out.append(ToolCall(call_id, str(_get(item, "name")), custom, raw or ""))
    return out


def _unique(calls: list[ToolCall]) -> list[ToolCall]:
    # Exactly one output per call id: a repeated id (never sent by the API, possible in
    # hand-built input) is answered once, by its first occurrence.
    seen: set[str] = set()
    out = []
    for c in calls:
        if c.call_id in seen:
            log.warning("tool call id %s appears twice; answering it once", c.call_id)
            continue
        seen.add(c.call_id)
        out.append(c)
    return out


class ToolDispatcher:
    """Dispatch OpenAI tool calls to guarded callables.

    ``tools``: a mapping of name to callable (or :class:`Tool`), or a list of them.
    ``scope``: the dedup scope (a conversation, an order); ``None`` uses the caller's
    ``guard.workflow(...)``. ``agent_id`` turns governance on.
    """

    def __init__(
        self,
        tools: Mapping[str, Callable[..., Any] | Tool] | Iterable[Callable[..., Any] | Tool],
        *,
        guard: Guard | None = None,
        agent_id: str | None = None,
        scope: str | None = None,
        run_id: str | None = None,
        strict: bool = False,
    ) -> None:
        if guard is None:
            from onceonly_core import guard as default_guard

            guard = default_guard
        self.guard = guard
        self.agent_id = agent_id
        self.scope = scope
        self.run_id = run_id
        self.strict = strict
        self.tools: dict[str, Tool] = {}
        entries: Iterable[tuple[str | None, Any]] = (
            tools.items() if isinstance(tools, Mapping) else ((None, t) for t in tools)
        )
        for name, fn in entries:
            t = fn if isinstance(fn, Tool) else tool(fn, name=name)
            if name is not None and t.name != name:
                raise ConfigError(f"tool registered as {name!r} is named {t.name!r}")
            if t.name in self.tools:
                raise ConfigError(f"two tools are named {t.name!r}")
            self.tools[t.name] = t

    # -- schemas ----------------------------------------------------------------------
    def chat_tools(self) -> list[dict[str, Any]]:
        """``tools=[...]`` for ``client.chat.completions.create``."""
        return [t.chat_schema(strict=self.strict) for t in self.tools.values()]

    def responses_tools(self) -> list[dict[str, Any]]:
        """``tools=[...]`` for ``client.responses.create``."""
        return [t.responses_schema(strict=self.strict) for t in self.tools.values()]

    # -- dispatching ------------------------------------------------------------------
    def chat(self, message: Any) -> list[dict[str, Any]]:
        """Tool messages (``role="tool"``) for every tool call, in call order."""
        calls = _unique(chat_calls(message))
        return [_chat_output(c, t) for c, t in zip(calls, self._run_all(calls), strict=True)]

    async def achat(self, message: Any) -> list[dict[str, Any]]:
        """:meth:`chat` for async code: the calls run concurrently."""
        calls = _unique(chat_calls(message))
        return [_chat_output(c, t) for c, t in zip(calls, await self._arun_all(calls), strict=True)]

    def responses(self, response: Any) -> list[dict[str, Any]]:
        """``function_call_output`` / ``custom_tool_call_output`` items, in call order."""
        calls = _unique(response_calls(response))
        return [_response_output(c, t) for c, t in zip(calls, self._run_all(calls), strict=True)]

    async def aresponses(self, response: Any) -> list[dict[str, Any]]:
        """:meth:`responses` for async code: the calls run concurrently."""
        calls = _unique(response_calls(response))
        return [
            _response_output(c, t) for c, t in zip(calls, await self._arun_all(calls), strict=True)
        ]

    def run_call(self, call: ToolCall) -> str:
        """The output text for one call (sync tools)."""
        prepared = self._prepare(call)
        if isinstance(prepared, str):
            return prepared
        t, args = prepared
        try:
            with self._scope():
                res = self.guard.call_tool(t.fn, args, **self._call_options(t, args))
        except OnceOnlyError as err:
            return _infra_error(t.name, err)
        return render(res)

    async def arun_call(self, call: ToolCall) -> str:
        """The output text for one call (async or sync tools; never blocks the loop)."""
        prepared = self._prepare(call)
        if isinstance(prepared, str):
            return prepared
        t, args = prepared
        try:
            with self._scope():
                res = await self.guard.acall_tool(t.fn, args, **self._call_options(t, args))
        except OnceOnlyError as err:
            return _infra_error(t.name, err)
        return render(res)

    # -- internals --------------------------------------------------------------------
    def _run_all(self, calls: list[ToolCall]) -> list[str]:
        if not any(self._is_async(c) for c in calls):
            return [self.run_call(c) for c in calls]
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._arun_all(calls))
        raise ConfigError("async tools inside a running event loop: use `await dispatcher.a...()`")

    async def _arun_all(self, calls: list[ToolCall]) -> list[str]:
        # gather keeps the order of its arguments whatever order the calls finish in.
        return list(await asyncio.gather(*(self.arun_call(c) for c in calls)))

    def _is_async(self, call: ToolCall) -> bool:
        t = self.tools.get(call.name)
        return t is not None and t.is_async

    def _prepare(self, call: ToolCall) -> tuple[Tool, dict[str, Any]] | str:
        t = self.tools.get(call.name)
        if t is None:
            known = ", ".join(sorted(self.tools)) or "none"
            return error_text(
                "unknown_tool", f"There is no tool named {call.name!r}. Available tools: {known}."
            )
        if t.custom or call.custom:
            if not t.custom:
                return error_text(
                    "invalid_arguments",
                    f"Tool {t.name!r} is a function tool; call it with JSON arguments.",
                )
            return t, t.custom_args(call.text)
        try:
            raw = json.loads(call.text) if call.text.strip() else {}
        except ValueError as err:
            return error_text(
                "invalid_json", f"The arguments for tool {t.name!r} are not valid JSON: {err}."
            )
        if not isinstance(raw, dict):
            return error_text(
                "invalid_arguments",
                f"The arguments for tool {t.name!r} must be a JSON object, "
                f"not {type(raw).__name__}.",
            )
        try:
            return t, t.validate(raw)
        except ValidationError as err:
            return error_text(
                "invalid_arguments", f"Invalid arguments for tool {t.name!r}: {explain(err)}."
            )

    def _call_options(self, t: Tool, args: Mapping[str, Any]) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "tool": t.name,
            "agent_id": self.agent_id,
            "spend_usd": t.spend(args),
            "run_id": self.run_id,
        }
        opts.update(t.options)
        return opts

    def _scope(self) -> contextlib.AbstractContextManager[None]:
        return self.guard.workflow(self.scope) if self.scope is not None else _null()


@contextlib.contextmanager
def _null() -> Iterator[None]:
    yield


def render(res: ToolResult) -> str:
    """A ``ToolResult`` as the text the model reads."""
    if res.decision in ("executed", "dedup"):
        return to_text(res.result)
    if res.decision == "pending_approval":
        return error_text("pending_approval", res.message, approval_id=res.approval_id)
    if res.decision == "blocked":
        return error_text("blocked", res.message, reason=res.policy_reason)
    return error_text("tool_error", res.message, error_type=res.error_type)


def _infra_error(name: str, err: OnceOnlyError) -> str:
    # The ledger, not the tool, failed. The transcript still needs this call's output;
    # say plainly whether it may be retried.
    if isinstance(err, InProgress):
        return error_text(
            "in_progress",
            f"Tool {name!r} is already running for these arguments; its result is not "
            "available yet. Do not call it again now.",
        )
    log.warning("tool %s: %s: %s", name, type(err).__name__, err)
    return error_text(
        "guard_error", f"Tool {name!r} could not be run safely: {type(err).__name__}: {err}"
    )


def _chat_output(call: ToolCall, text: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call.call_id, "content": text}


def _response_output(call: ToolCall, text: str) -> dict[str, Any]:
    kind = "custom_tool_call_output" if call.custom else "function_call_output"
    return {"type": kind, "call_id": call.call_id, "output": text}
