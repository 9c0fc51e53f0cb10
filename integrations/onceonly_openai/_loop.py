"""The complete tool loop: ask the model, dispatch its calls, append, repeat.

The transcript is kept as plain request dicts (what ``create`` accepts), so it can be
stored, resumed and sent again. A retried loop (a crash, a re-run of the job) asks the
model again; the model repeats its calls with new call ids and the dispatcher replays
the stored results, so nothing runs twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from onceonly_core.errors import OnceOnlyError

from ._dispatch import ToolAnswer, ToolCall, ToolDispatcher, chat_calls, response_calls

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI
    from openai.types.chat import (
        ChatCompletion,
        ChatCompletionAssistantMessageParam,
        ChatCompletionMessage,
        ChatCompletionMessageParam,
    )
    from openai.types.responses import Response, ResponseInputItemParam

__all__ = [
    "LoopResult",
    "MaxTurnsExceeded",
    "arun_chat",
    "arun_responses",
    "assistant_param",
    "output_params",
    "run_chat",
    "run_responses",
]

R = TypeVar("R")
M = TypeVar("M")


@dataclass(slots=True)
class LoopResult(Generic[R, M]):
    """The transcript (request params, every call answered), the last reply and the turns.

    ``run_chat``: ``LoopResult[ChatCompletion, ChatCompletionMessageParam]``;
    ``run_responses``: ``LoopResult[Response, ResponseInputItemParam]``.
    """

    transcript: list[M]
    response: R
    turns: int

    @property
    def text(self) -> str | None:
        """The model's final text."""
        r: Any = self.response
        if hasattr(r, "choices"):
            return r.choices[0].message.content  # type: ignore[no-any-return]
        return getattr(r, "output_text", None)


class MaxTurnsExceeded(OnceOnlyError):
    """The model still asked for tools after ``max_turns`` replies.

    ``transcript`` is complete (every call has its output), so the loop can be resumed.
    """

    def __init__(self, max_turns: int, transcript: list[Any], response: Any) -> None:
        self.max_turns = max_turns
        self.transcript = transcript
        self.response = response
        super().__init__(f"the model still called tools after {max_turns} turns")


def _check(max_turns: int) -> None:
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")


# -- the loop, once: a generator the sync and async drivers below run ------------------------
class _Ask:
    """The loop needs the model's next reply (to the transcript as it is now)."""


@dataclass(frozen=True, slots=True)
class _Run:
    """The loop needs these calls answered."""

    calls: list[ToolCall]


Loop = Generator["_Ask | _Run", Any, LoopResult[R, M]]


def _loop(
    transcript: list[M],
    max_turns: int,
    reply: Callable[[R], tuple[list[M], list[ToolCall]]],
    render: Callable[[ToolAnswer], M],
) -> Loop[R, M]:
    """Ask, answer every call, append, repeat: the decisions of every tool loop. ``reply``
    turns a reply into the items it adds to the transcript and its tool calls; ``render``
    turns an answer into a transcript item."""
    _check(max_turns)
    for turn in range(1, max_turns + 1):
        response: R = yield _Ask()
        items, calls = reply(response)
        transcript.extend(items)
        if not calls:
            return LoopResult(transcript, response, turn)
        answers: list[ToolAnswer] = yield _Run(calls)
        transcript.extend(render(a) for a in answers)
    raise MaxTurnsExceeded(max_turns, transcript, response)


def _drive(
    loop: Loop[R, M],
    ask: Callable[[], R],
    run: Callable[[list[ToolCall]], list[ToolAnswer]],
) -> LoopResult[R, M]:
    op = next(loop)
    while True:
        value = ask() if isinstance(op, _Ask) else run(op.calls)
        try:
            op = loop.send(value)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def _adrive(
    loop: Loop[R, M],
    ask: Callable[[], Awaitable[R]],
    run: Callable[[list[ToolCall]], Awaitable[list[ToolAnswer]]],
) -> LoopResult[R, M]:
    op = next(loop)
    while True:
        value = await ask() if isinstance(op, _Ask) else await run(op.calls)
        try:
            op = loop.send(value)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


# -- Chat Completions ----------------------------------------------------------------------
def assistant_param(msg: ChatCompletionMessage) -> ChatCompletionAssistantMessageParam:
    """A reply's ``ChatCompletionMessage`` as the request param that goes back into
    ``messages`` (typed: ``messages.append(assistant_param(message))``)."""
    out: ChatCompletionAssistantMessageParam = {"role": "assistant", "content": msg.content}
    if msg.refusal:
        out["refusal"] = msg.refusal
    if msg.audio is not None:
        out["audio"] = {"id": msg.audio.id}
    if msg.tool_calls:
        out["tool_calls"] = [
            cast(Any, tc.model_dump(mode="json", exclude_none=True)) for tc in msg.tool_calls
        ]
    return out


def _chat_reply(
    completion: ChatCompletion,
) -> tuple[list[ChatCompletionMessageParam], list[ToolCall]]:
    msg = completion.choices[0].message
    return [assistant_param(msg)], chat_calls(msg)


def _chat_output(answer: ToolAnswer) -> ChatCompletionMessageParam:
    return answer.chat_message()


def _chat_kwargs(dispatcher: ToolDispatcher, create: dict[str, Any]) -> dict[str, Any]:
    if "tools" not in create and dispatcher.tools:
        create["tools"] = dispatcher.chat_tools()
    return create


def run_chat(
    client: OpenAI,
    dispatcher: ToolDispatcher,
    messages: Iterable[ChatCompletionMessageParam],
    *,
    scope: str | None = None,
    max_turns: int = 10,
    **create: Any,
) -> LoopResult[ChatCompletion, ChatCompletionMessageParam]:
    """Run ``client.chat.completions.create`` until the model stops calling tools.

    ``scope``: the conversation id the calls are deduplicated in (default: the
    dispatcher's). ``create`` goes to every request (``model=``...); ``tools`` defaults
    to the dispatcher's schemas.
    """
    transcript = list(messages)
    kwargs = _chat_kwargs(dispatcher, dict(create))
    return _drive(
        _loop(transcript, max_turns, _chat_reply, _chat_output),
        lambda: client.chat.completions.create(messages=transcript, **kwargs),
        lambda calls: dispatcher.dispatch(calls, scope=scope),
    )


async def arun_chat(
    client: AsyncOpenAI,
    dispatcher: ToolDispatcher,
    messages: Iterable[ChatCompletionMessageParam],
    *,
    scope: str | None = None,
    max_turns: int = 10,
    **create: Any,
) -> LoopResult[ChatCompletion, ChatCompletionMessageParam]:
    """:func:`run_chat` for ``AsyncOpenAI``: each turn's calls run concurrently."""
    transcript = list(messages)
    kwargs = _chat_kwargs(dispatcher, dict(create))
    return await _adrive(
        _loop(transcript, max_turns, _chat_reply, _chat_output),
        lambda: client.chat.completions.create(messages=transcript, **kwargs),
        lambda calls: dispatcher.adispatch(calls, scope=scope),
    )


# -- Responses -----------------------------------------------------------------------------
def _items(input: str | Iterable[ResponseInputItemParam]) -> list[ResponseInputItemParam]:
    if isinstance(input, str):
        return [{"role": "user", "content": input}]
    return list(input)


def output_params(response: Response) -> list[ResponseInputItemParam]:
    """A response's output items as input items for the next request: the model needs its
    own calls (and reasoning) next to their outputs."""
    # by_alias: ``async_`` is sent as ``async``.
    return [
        cast(Any, item.model_dump(mode="json", by_alias=True, exclude_none=True))
        for item in response.output
    ]


def _responses_reply(
    response: Response,
) -> tuple[list[ResponseInputItemParam], list[ToolCall]]:
    return output_params(response), response_calls(response)


def _responses_output(answer: ToolAnswer) -> ResponseInputItemParam:
    return answer.response_item()


def _responses_kwargs(dispatcher: ToolDispatcher, create: dict[str, Any]) -> dict[str, Any]:
    if "tools" not in create and dispatcher.tools:
        create["tools"] = dispatcher.responses_tools()
    return create


def run_responses(
    client: OpenAI,
    dispatcher: ToolDispatcher,
    input: str | Iterable[ResponseInputItemParam],
    *,
    scope: str | None = None,
    max_turns: int = 10,
    **create: Any,
) -> LoopResult[Response, ResponseInputItemParam]:
    """Run ``client.responses.create`` until the response has no tool calls.

    ``scope``: the conversation id the calls are deduplicated in (default: the
    dispatcher's)."""
    transcript = _items(input)
    kwargs = _responses_kwargs(dispatcher, dict(create))
    return _drive(
        _loop(transcript, max_turns, _responses_reply, _responses_output),
        lambda: client.responses.create(input=transcript, **kwargs),
        lambda calls: dispatcher.dispatch(calls, scope=scope),
    )


async def arun_responses(
    client: AsyncOpenAI,
    dispatcher: ToolDispatcher,
    input: str | Iterable[ResponseInputItemParam],
    *,
    scope: str | None = None,
    max_turns: int = 10,
    **create: Any,
) -> LoopResult[Response, ResponseInputItemParam]:
    """:func:`run_responses` for ``AsyncOpenAI``: each turn's calls run concurrently."""
    transcript = _items(input)
    kwargs = _responses_kwargs(dispatcher, dict(create))
    return await _adrive(
        _loop(transcript, max_turns, _responses_reply, _responses_output),
        lambda: client.responses.create(input=transcript, **kwargs),
        lambda calls: dispatcher.adispatch(calls, scope=scope),
    )
