"""Shared by the middleware, the tool wrappers and the callback handler: scopes, run ids,
the stored form of tool messages, and the texts a model reads when a call does not run."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.errors import GraphBubbleUp

from onceonly_core import Guard
from onceonly_core.errors import (
    CompletionNotRecorded,
    ConfigError,
    InProgress,
    LeaseLost,
    OnceOnlyError,
    StoreError,
    UnknownOutcome,
)

__all__ = [
    "GraphBubbleUp",
    "Resolver",
    "Settings",
    "infra_text",
    "scoped",
    "thread_run_id",
]

#: A value, or a callable that reads it from the call's ``RunnableConfig`` (None: unset).
Resolver: TypeAlias = "str | Callable[[RunnableConfig], str | None] | None"
SpendRule: TypeAlias = (
    "Mapping[str, float] | Callable[[str, Mapping[str, Any]], float | None] | None"
)

# Labels (workflow and run ids) are at most this long in the ledger (stores.base.MAX_LABEL
# is larger; a thread id that is longer or has control characters is hashed instead).
_MAX_SCOPE = 200
_THREAD = object()  # the default scope: the LangGraph thread id
_serde = JsonPlusSerializer()


@dataclass(frozen=True, slots=True)
class Settings:
    """What both adapters need to govern one tool call."""

    guard: Guard
    agent_id: str | None = None
    scope: Any = _THREAD
    run_id: Resolver = None
    spend_usd: SpendRule = None
    options: Mapping[str, Any] = field(default_factory=dict)
    tool_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def options_for(self, tool: str) -> dict[str, Any]:
        per_tool = self.tool_options.get(tool)
        return {**self.options, **per_tool} if per_tool else dict(self.options)

    def spend_for(self, tool: str, args: Mapping[str, Any]) -> float | None:
        rule = self.spend_usd
        if rule is None:
            return None
        if callable(rule):
            return rule(tool, args)
        return rule.get(tool)

    def run_for(self, config: RunnableConfig | None) -> str | None:
        """The governance run id (its timeline): ``run_id=`` if given (a string, or a
        callable such as :func:`thread_run_id`), else the enclosing ``guard.run(...)``.

        Off by default: a timeline costs two more ledger writes per call."""
        r = self.run_id
        if r is None or isinstance(r, str):
            return r
        return r(config or {})

    def scope_for(self, config: RunnableConfig | None) -> str | None:
        """The dedup scope of a call (a ``guard.workflow`` id), or None for the current one.

        An explicit ``scope=`` wins; an enclosing ``with guard.workflow(...)`` is the user's
        choice and is kept; otherwise the LangGraph thread, so a resumed or retried thread
        replays its calls and another conversation does not.
        """
        s = self.scope
        if s is None:
            return None
        if isinstance(s, str):
            return s
        if s is not _THREAD:
            return _label(s(config or {}))
        if self.guard.current_namespace() != self.guard.namespace:
            return None  # inside the user's own guard.workflow(...)
        return _label(thread_id(config)) if config else None


def thread_run_id(config: RunnableConfig) -> str | None:
    """``run_id=thread_run_id``: one timeline per LangGraph thread (or LangChain run id)."""
    if config.get("run_id") is not None:
        return str(config["run_id"])
    return _label(thread_id(config))


def thread_id(config: RunnableConfig) -> str | None:
    tid = (config.get("configurable") or {}).get("thread_id")
    return None if tid is None else str(tid)


def _label(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > _MAX_SCOPE or any(ord(c) < 32 for c in value) or not value:
        return "h:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return value


@contextlib.contextmanager
def scoped(guard: Guard, scope: str | None) -> Iterator[None]:
    if scope is None:
        yield
    else:
        with guard.workflow(scope):
            yield


# -- the stored form of a tool's output ----------------------------------------------------
# A ToolMessage is stored as a small dict the operator can read (`onceonly show --results`);
# anything a plain dict cannot carry (an artifact, a Command, a list of outputs) goes through
# LangGraph's own checkpoint serializer, so it replays exactly as a checkpoint would restore it.


def _pack(value: Any) -> dict[str, str]:
    kind, data = _serde.dumps_typed(value)
    return {"serde": kind, "data": base64.b64encode(data).decode("ascii")}


def _unpack(packed: Mapping[str, str]) -> Any:
    return _serde.loads_typed((packed["serde"], base64.b64decode(packed["data"])))


def encode_output(output: Any, call_id: str | None) -> dict[str, Any]:
    if isinstance(output, ToolMessage):
        stored: dict[str, Any] = {"content": output.content, "status": output.status}
        if output.artifact is not None:
            stored["artifact"] = _pack(output.artifact)
        return stored
    return {"output": _pack(output), "call_id": call_id}


def decode_output(stored: Mapping[str, Any], call_id: str, name: str, meta: dict[str, Any]) -> Any:
    """The stored output, re-addressed to the *current* call id."""
    if "output" not in stored:
        artifact = _unpack(stored["artifact"]) if "artifact" in stored else None
        return ToolMessage(
            content=stored["content"],
            artifact=artifact,
            tool_call_id=call_id,
            name=name,
            status=stored.get("status", "success"),
            response_metadata={"onceonly": meta},
        )
    output = _unpack(stored["output"])
    _readdress(output, stored.get("call_id"), call_id)
    return output


def _readdress(output: Any, old: str | None, new: str) -> None:
    """Point the replayed ToolMessages of the original call at the current call id."""
    if isinstance(output, ToolMessage):
        if output.tool_call_id == old:
            output.tool_call_id = new
    elif isinstance(output, (list, tuple)):
        for item in output:
            _readdress(item, old, new)
    elif isinstance(output, Mapping):
        for item in output.values():
            _readdress(item, old, new)
    else:
        update = getattr(output, "update", None)  # a langgraph Command
        if update is not None:
            _readdress(update, old, new)


# -- what the model reads -------------------------------------------------------------------


def infra_text(tool: str, err: OnceOnlyError) -> str:
    """Text for the model when the ledger, not the tool or a policy, stopped a call."""
    if isinstance(err, InProgress):
        return (
            f"Tool {tool!r} with these arguments is already running elsewhere and has not "
            "finished yet. Do not call it again now; its result will be available later."
        )
    if isinstance(err, UnknownOutcome):
        return (
            f"Tool {tool!r} was interrupted earlier and it is unknown whether it took effect. "
            "It will not run again until an operator reconciles it; tell the user."
        )
    if isinstance(err, StoreError):
        return (
            f"Tool {tool!r} did not run: its execution ledger is unavailable "
            f"({type(err).__name__}). Try again later."
        )
    return f"Tool {tool!r} did not run: {type(err).__name__}: {err}"


def ran_anyway(err: OnceOnlyError) -> tuple[bool, Any]:
    """(True, the tool's value) when the tool ran but its completion was not recorded."""
    if isinstance(err, (CompletionNotRecorded, LeaseLost)) and err.result is not None:
        return True, err.result
    return False, None


def reraise_config(err: OnceOnlyError) -> None:
    """A configuration mistake is the developer's to fix, not the model's: raise it."""
    if isinstance(err, ConfigError):
        raise err
