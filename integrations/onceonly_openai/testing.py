"""A scripted OpenAI server for offline tests and examples.

``ScriptedOpenAI(replies)`` answers each ``POST /chat/completions`` or ``/responses``
with the next scripted reply, through the HTTP transport the real ``openai`` client
uses, so requests and replies go through the SDK's own serialisation and parsing::

    server = ScriptedOpenAI([chat_tool_calls(("charge_card", {"amount": 5}, "call_1")),
                             chat_text("Done.")])
    client = server.client()          # a real openai.OpenAI
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx2
import openai

__all__ = [
    "ScriptedOpenAI",
    "Streamed",
    "chat_text",
    "chat_tool_call_chunks",
    "chat_tool_calls",
    "response_text",
    "response_tool_call_events",
    "response_tool_calls",
]


class Streamed(list[dict[str, Any]]):
    """A streamed reply: these chunks / events, sent as server-sent events (the body of a
    ``stream=True`` request)."""


Reply = Mapping[str, Any] | Streamed | Callable[[dict[str, Any]], Mapping[str, Any]] | BaseException
_ids = itertools.count(1)


class ScriptedOpenAI:
    """Replies in order; ``requests`` holds every request body (parsed JSON).

    A reply may be a dict (the JSON body), a function of the request body returning one,
    or an exception to raise in the transport (a dropped connection).
    """

    def __init__(self, replies: Iterable[Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content or b"{}")
        with self._lock:
            self.requests.append(body)
            if not self.replies:
                return httpx2.Response(500, json={"error": {"message": "script exhausted"}})
            reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, Streamed):
            sse = "".join(f"data: {json.dumps(event)}\n\n" for event in reply)
            return httpx2.Response(
                200,
                content=(sse + "data: [DONE]\n\n").encode(),
                headers={"content-type": "text/event-stream"},
            )
        data = reply(body) if callable(reply) else reply
        return httpx2.Response(200, json=dict(data))

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """A real ``openai.OpenAI`` whose requests reach this script."""
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(
            api_key="sk-test",
            base_url="http://scripted.test/v1",
            http_client=httpx2.Client(transport=httpx2.MockTransport(self.handle)),
            **kwargs,
        )

    def async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """A real ``openai.AsyncOpenAI`` whose requests reach this script."""
        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(
            api_key="sk-test",
            base_url="http://scripted.test/v1",
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(self.handle)),
            **kwargs,
        )


def _args(args: str | Mapping[str, Any]) -> str:
    return args if isinstance(args, str) else json.dumps(args)


def chat_tool_calls(*calls: tuple[str, str | Mapping[str, Any], str]) -> dict[str, Any]:
    """A chat completion asking for ``(name, arguments, call_id)`` calls.

    A name starting with ``custom:`` makes a custom tool call whose input is the text.
    """
    tool_calls = []
    for name, args, call_id in calls:
        if name.startswith("custom:"):
            body = {"name": name[7:], "input": _args(args)}
            tool_calls.append({"id": call_id, "type": "custom", "custom": body})
        else:
            body = {"name": name, "arguments": _args(args)}
            tool_calls.append({"id": call_id, "type": "function", "function": body})
    message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
    return _completion(message, "tool_calls")


def _pieces(text: str, n: int) -> list[str]:
    size = max(1, -(-len(text) // n))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def chat_tool_call_chunks(
    *calls: tuple[str, str | Mapping[str, Any], str], pieces: int = 3
) -> Streamed:
    """The chunks (``ChatCompletionChunk``) of a streamed reply asking for ``(name, arguments,
    call_id)`` calls: each call's arguments arrive in ``pieces`` fragments, as the API
    streams them (the id and name in the call's first delta only)."""
    ident = f"chatcmpl-{next(_ids)}"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "gpt-scripted",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    out = Streamed([chunk({"role": "assistant", "content": None})])
    for index, (name, args, call_id) in enumerate(calls):
        head = {"index": index, "id": call_id, "type": "function"}
        out.append(chunk({"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]}))
        for part in _pieces(_args(args), pieces):
            out.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]}))
    out.append(chunk({}, "tool_calls"))
    return out


def chat_text(text: str) -> dict[str, Any]:
    """A chat completion answering with text."""
    return _completion({"role": "assistant", "content": text}, "stop")


def _completion(message: dict[str, Any], finish: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{next(_ids)}",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-scripted",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
    }


def response_tool_calls(*calls: tuple[str, str | Mapping[str, Any], str]) -> dict[str, Any]:
    """A Responses API response with ``function_call`` (or ``custom:`` custom) items."""
    items = []
    for name, args, call_id in calls:
        n = next(_ids)
        if name.startswith("custom:"):
            items.append(
                {
                    "type": "custom_tool_call",
                    "id": f"ctc_{n}",
                    "call_id": call_id,
                    "name": name[7:],
                    "input": _args(args),
                }
            )
        else:
            items.append(
                {
                    "type": "function_call",
                    "id": f"fc_{n}",
                    "call_id": call_id,
                    "name": name,
                    "arguments": _args(args),
                    "status": "completed",
                }
            )
    return _response(items)


def response_tool_call_events(
    *calls: tuple[str, str | Mapping[str, Any], str], pieces: int = 3
) -> Streamed:
    """The events of a streamed Responses API reply with ``function_call`` items: each
    item added, its arguments in ``pieces`` deltas, ``...arguments.done``, the item done,
    then ``response.completed``."""
    final = response_tool_calls(*calls)
    seq = itertools.count()
    base = {**final, "status": "in_progress", "output": []}
    out = Streamed([{"type": "response.created", "sequence_number": next(seq), "response": base}])
    for index, item in enumerate(final["output"]):
        empty = {**item, "arguments": "", "status": "in_progress"}
        where = {"output_index": index, "item_id": item["id"]}
        out.append(
            {
                "type": "response.output_item.added",
                "sequence_number": next(seq),
                "output_index": index,
                "item": empty,
            }
        )
        for part in _pieces(item["arguments"], pieces):
            out.append(
                {
                    "type": "response.function_call_arguments.delta",
                    "sequence_number": next(seq),
                    "delta": part,
                    **where,
                }
            )
        out.append(
            {
                "type": "response.function_call_arguments.done",
                "sequence_number": next(seq),
                "arguments": item["arguments"],
                "name": item["name"],
                **where,
            }
        )
        out.append(
            {
                "type": "response.output_item.done",
                "sequence_number": next(seq),
                "output_index": index,
                "item": item,
            }
        )
    out.append({"type": "response.completed", "sequence_number": next(seq), "response": final})
    return out


def response_text(text: str) -> dict[str, Any]:
    """A Responses API response with one assistant message."""
    message = {
        "type": "message",
        "id": f"msg_{next(_ids)}",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    return _response([message])


def _response(output: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": f"resp_{next(_ids)}",
        "object": "response",
        "created_at": 1_700_000_000,
        "model": "gpt-scripted",
        "status": "completed",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }
