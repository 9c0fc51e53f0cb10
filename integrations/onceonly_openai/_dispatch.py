"""The dispatcher: model tool calls in, one answer per call id out.

Every call goes through ``guard.run_call_classified`` with the tool's *name* and its
*validated* arguments (after the tool's schema: defaults, ``default_factory``, coercion),
so ``{"amount": "25.00"}`` and ``{"amount": 25.0}`` for a float field are one call. The
core classifies every outcome (docs/integrations/contract.md); this module only renders
it: the tool's result as text for ``executed`` / ``replayed``, the contract's sentence for
the model otherwise. Every call gets exactly one output, in call order, whatever happened.
Keys come from the scope + tool name + canonical arguments, never from the call id, which
is new on every model turn: a replayed call gets the stored result under its new id.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pydantic import ValidationError

from onceonly_core import Guard, classify
from onceonly_core.contract import Classification, invalid_arguments, invalid_json, unknown_tool
from onceonly_core.errors import ConfigError

from ._serialize import to_text
from ._tools import Tool, tool

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionToolMessageParam, ChatCompletionToolUnionParam
    from openai.types.responses import ResponseInputItemParam, ToolParam

__all__ = ["ToolAnswer", "ToolCall", "ToolDispatcher", "render"]

log = logging.getLogger("onceonly.openai")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model made, whatever shape it arrived in."""

    call_id: str
    name: str
    custom: bool
    text: str
    """The JSON arguments of a function call, or the free-text input of a custom call."""


def render(outcome: Classification) -> str:
    """What the model reads for an outcome: the tool's result (``executed``, ``replayed``)
    as deterministic text (see :func:`to_text`), else the contract's sentence."""
    if (outcome.code, outcome.reason) in (("executed", "ok"), ("replayed", "dedup")):
        return to_text(outcome.result)
    return outcome.text


@dataclass(frozen=True, slots=True)
class ToolAnswer:
    """The answer to one tool call: the call, the core's classification of its outcome
    (``outcome.code``, ``outcome.as_dict()`` for logs and metadata) and ``output``, the
    text the model reads. Render it for the API with :meth:`chat_message` or
    :meth:`response_item`."""

    call: ToolCall
    outcome: Classification
    output: str

    @property
    def code(self) -> str:
        return self.outcome.code

    def chat_message(self) -> ChatCompletionToolMessageParam:
        """The Chat Completions ``{"role": "tool"}`` message."""
        return {"role": "tool", "tool_call_id": self.call.call_id, "content": self.output}

    def response_item(self) -> ResponseInputItemParam:
        """The Responses API ``function_call_output`` (or ``custom_tool_call_output``) item."""
        if self.call.custom:
            return {
                "type": "custom_tool_call_output",
                "call_id": self.call.call_id,
                "output": self.output,
            }
        return {"type": "function_call_output", "call_id": self.call.call_id, "output": self.output}


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def chat_calls(source: Any) -> list[ToolCall]:
    """Tool calls from a ``ChatCompletionMessage``, a message dict, or a list of calls."""
    items = source
    if isinstance(source, Mapping) or hasattr(source, "tool_calls"):
        items = _get(source, "tool_calls") or []
    out = []
    for tc in items:
        if isinstance(tc, ToolCall):
            out.append(tc)
            continue
        kind, call_id = _get(tc, "type"), _get(tc, "id")
        body = _get(tc, "custom") if kind == "custom" else _get(tc, "function")
        if not isinstance(call_id, str) or body is None:
            raise ValueError(f"not a Chat Completions tool call: {tc!r}")
        raw = _get(body, "input") if kind == "custom" else _get(body, "arguments")
        out.append(ToolCall(call_id, str(_get(body, "name")), kind == "custom", raw or ""))
    return out


def response_calls(source: Any) -> list[ToolCall]:
    """``function_call`` / ``custom_tool_call`` items of a ``Response``, its ``output``
    list, or one item."""
    items = source
    if isinstance(source, ToolCall):
        return [source]
    if isinstance(source, Mapping):  # one item (it has a "type"), or a Response as a dict
        items = [source] if "type" in source else source.get("output") or []
    elif not isinstance(source, (list, tuple)):  # one item model, or a Response: its output
        single = getattr(source, "type", None) is not None and not hasattr(source, "output")
        items = [source] if single else getattr(source, "output", None) or []
    out = []
    for item in items:
        if isinstance(item, ToolCall):
            out.append(item)
            continue
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


_RUN_KW = ("agent_id", "run_id", "scope")


class ToolDispatcher:
    """Dispatch OpenAI tool calls to guarded callables.

    ``tools``: a mapping of name to callable (or :class:`Tool`), or a list of them.
    ``scope``: the dedup scope, a conversation id (each method also takes ``scope=``);
    ``None`` uses the caller's ``guard.workflow(...)``, and without one the calls are
    deduplicated forever, across conversations (the guard warns once). ``agent_id``
    turns governance on.
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
    def chat_tools(self) -> list[ChatCompletionToolUnionParam]:
        """``tools=[...]`` for ``client.chat.completions.create``."""
        return [cast(Any, t.chat_schema(strict=self.strict)) for t in self.tools.values()]

    def responses_tools(self) -> list[ToolParam]:
        """``tools=[...]`` for ``client.responses.create``."""
        return [cast(Any, t.responses_schema(strict=self.strict)) for t in self.tools.values()]

    # -- dispatching ------------------------------------------------------------------
    def chat(
        self, message: Any, *, scope: str | None = None
    ) -> list[ChatCompletionToolMessageParam]:
        """One ``{"role": "tool"}`` message per tool call of a ``ChatCompletionMessage``
        (or its ``tool_calls``, or dicts), in call order."""
        return [a.chat_message() for a in self.dispatch(chat_calls(message), scope=scope)]

    async def achat(
        self, message: Any, *, scope: str | None = None
    ) -> list[ChatCompletionToolMessageParam]:
        """:meth:`chat` for async code: the calls run concurrently."""
        answers = await self.adispatch(chat_calls(message), scope=scope)
        return [a.chat_message() for a in answers]

    def responses(self, response: Any, *, scope: str | None = None) -> list[ResponseInputItemParam]:
        """One ``function_call_output`` / ``custom_tool_call_output`` item per call of a
        ``Response``, its ``output``, or a single item, in call order."""
        return [a.response_item() for a in self.dispatch(response_calls(response), scope=scope)]

    async def aresponses(
        self, response: Any, *, scope: str | None = None
    ) -> list[ResponseInputItemParam]:
        """:meth:`responses` for async code: the calls run concurrently."""
        answers = await self.adispatch(response_calls(response), scope=scope)
        return [a.response_item() for a in answers]

    def dispatch(self, calls: Iterable[ToolCall], *, scope: str | None = None) -> list[ToolAnswer]:
        """The structured answers (:class:`ToolAnswer`) to ``calls``, in call order.

        Sync tools run one after the other; async ones with ``asyncio.run`` when no event
        loop is running (inside one, use :meth:`adispatch`).
        """
        todo = _unique(list(calls))
        if not any(self._is_async(c) for c in todo):
            return [self._answer(c, scope) for c in todo]
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.adispatch(todo, scope=scope))
        raise ConfigError("async tools inside a running event loop: use `await dispatcher.a...()`")

    async def adispatch(
        self, calls: Iterable[ToolCall], *, scope: str | None = None
    ) -> list[ToolAnswer]:
        """:meth:`dispatch` for async code: the calls run concurrently (sync tools in
        worker threads); answers stay in call order."""
        todo = _unique(list(calls))
        # gather keeps the order of its arguments whatever order the calls finish in.
        return list(await asyncio.gather(*(self._aanswer(c, scope) for c in todo)))

    # -- internals --------------------------------------------------------------------
    def _answer(self, call: ToolCall, scope: str | None) -> ToolAnswer:
        prepared = self._prepare(call)
        if isinstance(prepared, Classification):
            return ToolAnswer(call, prepared, prepared.text)
        t, args = prepared
        kw, options = self._call_options(t, args, scope)
        c = self.guard.run_call_classified(t.name, args, _thunk(t, args), **kw, **options)
        return ToolAnswer(call, c, render(c))

    async def _aanswer(self, call: ToolCall, scope: str | None) -> ToolAnswer:
        prepared = self._prepare(call)
        if isinstance(prepared, Classification):
            return ToolAnswer(call, prepared, prepared.text)
        t, args = prepared
        kw, options = self._call_options(t, args, scope)
        c = await self.guard.arun_call_classified(t.name, args, _thunk(t, args), **kw, **options)
        return ToolAnswer(call, c, render(c))

    def _is_async(self, call: ToolCall) -> bool:
        t = self.tools.get(call.name)
        return t is not None and t.is_async

    def _prepare(self, call: ToolCall) -> tuple[Tool, dict[str, Any]] | Classification:
        """The tool and its validated arguments, or the answer refusing the call."""
        t = self.tools.get(call.name)
        if t is None:
            return unknown_tool(call.name, self.tools)
        if t.custom or call.custom:
            if not t.custom:
                return invalid_arguments(
                    t.name, "it is a function tool: call it with JSON arguments"
                )
            return t, t.custom_args(call.text)
        try:
            raw = json.loads(call.text) if call.text.strip() else {}
        except ValueError as err:
            return invalid_json(t.name, err)
        if not isinstance(raw, dict):
            return invalid_json(t.name)
        try:
            return t, t.validate(raw)
        except ValidationError as err:
            return classify(err, tool=t.name)

    def _call_options(
        self, t: Tool, args: Mapping[str, Any], scope: str | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        kw: dict[str, Any] = {
            "scope": scope if scope is not None else self.scope,
            "agent_id": self.agent_id,
            "run_id": self.run_id,
            "spend_usd": t.spend(args),
        }
        options = dict(t.options)
        for name in _RUN_KW:  # a tool's own agent, run id or scope wins over the dispatcher's
            if name in options:
                kw[name] = options.pop(name)
        return kw, options


def _thunk(t: Tool, args: dict[str, Any]) -> Callable[[], Any]:
    """Run the tool with exactly the arguments it is keyed by: an async thunk for an
    async tool (awaited on the loop), a plain one otherwise (a worker thread in async code)."""
    if t.is_async:

        async def run() -> Any:
            return await t.fn(**args)

        return run
    return functools.partial(t.fn, **args)
