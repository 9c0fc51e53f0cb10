"""Streamed tool calls, accumulated into complete calls for the dispatcher.

A streamed reply delivers a tool call in pieces: Chat Completions ``ChatCompletionChunk``
deltas carry ``tool_calls[i]`` with an ``index`` and fragments of ``arguments``; the
Responses API sends ``response.output_item.added`` (the call's id and name),
``response.function_call_arguments.delta`` fragments and ``...arguments.done``. A call may
only run once its arguments are complete, so :class:`ToolCallStream` collects the pieces
and hands out each call as soon as it is complete::

    calls = ToolCallStream()
    for chunk in client.chat.completions.create(..., stream=True):
        calls.add(chunk)                  # returns the calls this chunk completed
    messages += dispatcher.chat(calls.calls)

Chat chunks are accumulated by the SDK's own ``ChatCompletionStreamState`` (the one
``client.chat.completions.stream()`` uses); the Responses events are folded here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._dispatch import ToolCall, _get

if TYPE_CHECKING:
    from openai.lib.streaming.chat import ChatCompletionStreamState

__all__ = ["ToolCallStream"]

_DONE = ("response.function_call_arguments.done", "response.custom_tool_call_input.done")


@dataclass(slots=True)
class _Partial:
    call_id: str | None
    name: str
    custom: bool
    text: list[str] = field(default_factory=list)


class ToolCallStream:
    """Accumulates streamed chunks (Chat Completions) or events (Responses API) into
    complete :class:`~onceonly_openai.ToolCall`\\ s.

    :meth:`add` takes one ``ChatCompletionChunk`` or one Responses stream event (model
    objects or dicts) and returns the calls it completed, in order; :attr:`calls` holds
    every complete call so far. Feed them to ``dispatcher.dispatch(...)``, ``.chat(...)``
    or ``.responses(...)``. Other events (text deltas, reasoning) are ignored. A chat call
    is complete when the next call starts or the choice finishes (``finish_reason``); a
    Responses call at ``...arguments.done`` (or ``...input.done``) or its
    ``output_item.done``, whichever comes first.
    """

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._chat: ChatCompletionStreamState[Any] | None = None
        self._ids: dict[int, str] = {}  # Chat: tool call index -> call id
        self._items: dict[str, _Partial] = {}  # Responses: item id -> the call so far
        self._done: set[str] = set()

    def add(self, piece: Any) -> list[ToolCall]:
        """Fold in one chunk or event; return the calls it completed."""
        kind = _get(piece, "type")
        if isinstance(kind, str) and kind.startswith("response."):
            return self._response_event(kind, piece)
        if _get(piece, "object") == "chat.completion.chunk":
            return self._chat_chunk(piece)
        return []

    # -- Chat Completions -------------------------------------------------------------
    def _chat_chunk(self, chunk: Any) -> list[ToolCall]:
        from openai.lib.streaming.chat import ChatCompletionStreamState
        from openai.types.chat import ChatCompletionChunk

        if self._chat is None:
            self._chat = ChatCompletionStreamState()
        if not isinstance(chunk, ChatCompletionChunk):
            chunk = ChatCompletionChunk.model_validate(chunk)
        # The SDK's done event names a call by its index; the id comes in the call's first
        # delta (of the first choice: the one a tool loop answers).
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            for delta in choice.delta.tool_calls or []:
                if delta.id:
                    self._ids[delta.index] = delta.id
        out = []
        for event in self._chat.handle_chunk(chunk):
            if event.type == "tool_calls.function.arguments.done":
                call_id = self._ids.get(event.index)
                if call_id not in self._done:
                    out.append(self._complete(call_id, event.name, False, event.arguments))
        return out

    # -- Responses ---------------------------------------------------------------------
    def _response_event(self, kind: str, event: Any) -> list[ToolCall]:
        if kind in ("response.output_item.added", "response.output_item.done"):
            item = _get(event, "item")
            itype = _get(item, "type")
            if itype not in ("function_call", "custom_tool_call"):
                return []
            custom = itype == "custom_tool_call"
            item_id = _get(item, "id") or _get(item, "call_id")
            call_id, name = _get(item, "call_id"), str(_get(item, "name"))
            text = _get(item, "input") if custom else _get(item, "arguments")
            if kind == "response.output_item.added":
                self._items[item_id] = _Partial(call_id, name, custom, [text] if text else [])
                return []
            # done: the complete item, authoritative whatever deltas were seen.
            if call_id in self._done:
                return []
            return [self._complete(call_id, name, custom, text or "")]
        if kind in (
            "response.function_call_arguments.delta",
            "response.custom_tool_call_input.delta",
        ):
            part = self._items.get(_get(event, "item_id"))
            if part is not None:
                part.text.append(_get(event, "delta") or "")
            return []
        if kind in (
            "response.function_call_arguments.done",
            "response.custom_tool_call_input.done",
        ):
            part = self._items.get(_get(event, "item_id"))
            if part is None or part.call_id is None or part.call_id in self._done:
                return []
            full = _get(event, "arguments" if kind.endswith("arguments.done") else "input")
            text = full if isinstance(full, str) else "".join(part.text)
            return [
                self._complete(part.call_id, _get(event, "name") or part.name, part.custom, text)
            ]
        return []

    def _complete(self, call_id: str | None, name: str, custom: bool, text: str) -> ToolCall:
        if not isinstance(call_id, str):
            raise ValueError(f"a streamed tool call of {name} has no call id")
        self._done.add(call_id)
        call = ToolCall(call_id, name, custom, text)
        self.calls.append(call)
        return call
