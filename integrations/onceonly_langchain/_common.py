"""The one call path of the LangChain adapter, shared by the middleware and the tool wrappers.

Both do the same four things for a tool call, and only the first differs:

1. find the call's *validated* arguments — the model's arguments after the tool's
   ``args_schema`` (defaults, ``default_factory``, coercion), without the arguments
   LangGraph injects (state, store, runtime, the call id), which change every turn;
2. run LangChain's own handler for the call (``ToolNode``'s execution, or the tool's
   ``run``) as the thunk of ``guard.run_call_classified(name, args, thunk, ...)``, keeping
   the message it produced;
3. let the core decide (``onceonly_core.contract``);
4. render the :class:`~onceonly_core.Classification` as one ``ToolMessage`` for the call
   id (:meth:`Call.render`), adding no wording of its own.

The thunk returns the *stored form* of the tool's message (:func:`encode_output`): a string
for a plain message, so the ledger and a model text show the tool's own words, else a small
dict, with anything a dict cannot carry (an artifact, a ``Command``) packed by LangGraph's
checkpoint serializer, so a replay restores it as a checkpoint would.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, ToolException
from langchain_core.tools.base import FILTERED_ARGS
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from pydantic import BaseModel, create_model

from onceonly_core import Classification, Guard
from onceonly_core.errors import OnceOnlyError

__all__ = [
    "Call",
    "GuardRefused",
    "Resolver",
    "Settings",
    "SpendRule",
    "ToolErrorMessage",
    "decode_output",
    "encode_output",
    "hidden_arguments",
    "thread_run_id",
    "validated_arguments",
]

#: A value, or a callable that reads it from the call's ``RunnableConfig`` (None: unset).
Resolver: TypeAlias = "str | Callable[[RunnableConfig], str | None] | None"
SpendRule: TypeAlias = (
    "Mapping[str, float] | Callable[[str, Mapping[str, Any]], float | None] | None"
)

# Labels (scopes and run ids) are at most this long in the ledger; a thread id that is
# longer or has control characters is hashed instead (a LangGraph thread id is any string).
_MAX_SCOPE = 200
THREAD: Any = object()  # the default scope: the LangGraph thread id
_serde = JsonPlusSerializer()


class GuardRefused(OnceOnlyError, ToolException):
    """A tool called directly (no tool call id, so no ``ToolMessage`` to answer with) that
    OnceOnly did not run: blocked, pending approval, in progress, invalid arguments...

    ``classification`` is the core's answer; the message is its ``text``."""

    def __init__(self, classification: Classification) -> None:
        super().__init__(classification.text)
        self.classification = classification


@dataclass(frozen=True, slots=True)
class Settings:
    """What the middleware and the tool wrappers need to guard one tool call."""

    guard: Guard
    agent_id: str | None = None
    scope: Any = THREAD
    run_id: Resolver = None
    spend_usd: SpendRule = None
    options: Mapping[str, Any] = field(default_factory=dict)
    tool_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def call_options(
        self, tool: str, args: Mapping[str, Any], config: RunnableConfig | None
    ) -> dict[str, Any]:
        """The keyword arguments of ``run_call_classified`` for one call of ``tool``."""
        per_tool = self.tool_options.get(tool)
        return {
            **self.options,
            **(per_tool or {}),
            "scope": self.scope_for(config),
            "agent_id": self.agent_id,
            "spend_usd": self.spend_for(tool, args),
            "run_id": self.run_for(config),
        }

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
        """The dedup scope of a call, or None: the core keeps an enclosing
        ``guard.workflow(...)``, and warns once when there is none.

        An explicit ``scope=`` (a string, or ``config -> str``) wins; an enclosing
        ``with guard.workflow(...)`` is the user's choice and is kept; otherwise the
        LangGraph thread (``config["configurable"]["thread_id"]``), so a resumed or retried
        thread replays its calls and another conversation does not.
        """
        s = self.scope
        if s is None:
            return None
        if isinstance(s, str):
            return s
        if s is not THREAD:
            return _label(s(config or {}))
        if self.guard.current_namespace() != self.guard.namespace:
            return None  # inside the user's own guard.workflow(...)
        return _label(thread_id(config)) if config else None


def thread_run_id(config: RunnableConfig) -> str | None:
    """``run_id=thread_run_id``: one timeline per LangGraph thread (or LangChain run id)."""
    if config.get("run_id") is not None:
        return str(config["run_id"])
    return _label(thread_id(config))


def thread_id(config: RunnableConfig | None) -> str | None:
    tid = ((config or {}).get("configurable") or {}).get("thread_id")
    return None if tid is None else str(tid)


def _label(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > _MAX_SCOPE or any(ord(c) < 32 for c in value) or not value:
        return "h:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return value


# -- validated arguments ---------------------------------------------------------------------
def _fields(schema: Any) -> dict[str, Any]:
    if isinstance(schema, dict):
        return dict(schema.get("properties") or {})
    return dict(getattr(schema, "model_fields", None) or {})


def hidden_arguments(tool: BaseTool) -> frozenset[str]:
    """Arguments LangChain or LangGraph supply at call time, not the model: injected state,
    store, runtime and call id, ``callbacks``/``run_manager``. They change every turn while
    the call stays the same, so they are never part of its key."""
    names = set(FILTERED_ARGS) | set(getattr(tool, "_injected_args_keys", ()) or ())
    full = tool.args_schema
    if full is not None and not isinstance(full, dict):
        names |= set(_fields(full)) - set(_fields(tool.tool_call_schema))
    return frozenset(names)


def validated_arguments(
    tool: BaseTool, tool_input: str | Mapping[str, Any], call_id: str | None
) -> dict[str, Any]:
    """The arguments as ``tool`` receives them: its ``args_schema`` applied (defaults,
    ``default_factory``, coercion), so ``{"amount": 1.5}`` and ``{"amount": "1.5"}`` are
    one call. Raises pydantic's ``ValidationError`` for arguments the schema rejects.

    ``tool_input`` may hold the injected arguments (a tool's own ``run``: the tool's own
    parser runs) or not (what a model sent, seen by the middleware: the tool's schema runs
    with the injected fields optional). Injected arguments are never in the result.
    """
    if isinstance(tool_input, str):
        tool._parse_input(tool_input, call_id)  # validates a one-field schema
        return {"tool_input": tool_input}
    given = dict(tool_input)
    full = tool.args_schema
    hidden = hidden_arguments(tool)
    if not isinstance(full, type) or not issubclass(full, BaseModel):
        # No schema, a JSON schema (an MCP tool) or pydantic v1: LangChain hands the tool
        # the arguments as they are, and so are they keyed.
        return {k: v for k, v in given.items() if k not in hidden}
    missing = frozenset(k for k in set(_fields(full)) & hidden if k not in given)
    if not missing:
        # Everything the tool validates is here: its own parsing, model validators too.
        parsed = tool._parse_input(given, call_id)
        assert isinstance(parsed, dict)
        return {k: v for k, v in parsed.items() if k not in hidden}
    # What a model sent, without the values LangGraph injects later: the tool's own schema
    # (its validators, coercion, defaults) with those fields made optional.
    schema = _model_facing(full, missing)
    model = schema.model_validate(given)
    out = {}
    for name, info in schema.model_fields.items():
        # As BaseTool._parse_input: given fields, and fields with a default (the value the
        # tool gets when the model leaves them out).
        if name in hidden:
            continue
        if name in given or name in model.model_fields_set or not info.is_required():
            out[name] = getattr(model, name)
    return out


def _model_facing(full: type[BaseModel], injected: frozenset[str]) -> type[BaseModel]:
    """``full`` with its ``injected`` fields optional: a subclass, so every validator of
    the tool's schema still runs (LangChain's ``tool_call_schema`` copies the fields but
    drops the ``@field_validator`` decorators). Built once per schema and kept on the
    schema class itself, so it lives exactly as long as the tool's schema does (a
    per-request tool's schema is freed with it; a module-level cache would pin it)."""
    cache: dict[frozenset[str], type[BaseModel]] | None = full.__dict__.get(_FACING)
    if cache is None:
        cache = {}
        type.__setattr__(full, _FACING, cache)
    schema = cache.get(injected)
    if schema is None:
        fields: dict[str, Any] = {name: (Any, None) for name in injected}
        schema = create_model(f"{full.__name__}ModelArgs", __base__=full, **fields)
        cache[injected] = schema
    return schema


_FACING = "__onceonly_model_facing__"


# -- the stored form of a tool's message -----------------------------------------------------
def _pack(value: Any) -> dict[str, str]:
    kind, data = _serde.dumps_typed(value)
    return {"serde": kind, "data": base64.b64encode(data).decode("ascii")}


def _unpack(packed: Mapping[str, str]) -> Any:
    return _serde.loads_typed((packed["serde"], base64.b64decode(packed["data"])))


def encode_output(output: Any, call_id: str | None) -> Any:
    """What the ledger stores for a tool's output (see the module docstring)."""
    if isinstance(output, ToolMessage):
        if isinstance(output.content, str) and output.artifact is None:
            return output.content
        stored: dict[str, Any] = {"content": output.content, "status": output.status}
        if output.artifact is not None:
            stored["artifact"] = _pack(output.artifact)
        return stored
    if isinstance(output, str):
        return output
    return {"output": _pack(output), "call_id": call_id}


def decode_output(stored: Any, call_id: str, name: str) -> Any:
    """The stored output as a message for the *current* call id."""
    if isinstance(stored, Mapping) and "output" in stored and "call_id" in stored:
        output = _unpack(stored["output"])
        _visit(output, stored.get("call_id"), lambda m: _readdress(m, call_id))
        return output
    if isinstance(stored, Mapping) and "content" in stored and "status" in stored:
        return ToolMessage(
            content=stored["content"],
            artifact=_unpack(stored["artifact"]) if "artifact" in stored else None,
            tool_call_id=call_id,
            name=name,
            status=stored["status"],
        )
    # A plain string (or a raw value stored by an earlier release): the message content.
    content = stored if isinstance(stored, (str, list)) else _stringify(stored)
    return ToolMessage(content=content, tool_call_id=call_id, name=name)


def _stringify(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _readdress(message: ToolMessage, call_id: str) -> None:
    message.tool_call_id = call_id


def _visit(output: Any, call_id: str | None, fn: Callable[[ToolMessage], None]) -> None:
    """Apply ``fn`` to every ToolMessage for ``call_id`` in an output (a message, a list, a
    LangGraph ``Command`` whose update carries messages)."""
    if isinstance(output, ToolMessage):
        if output.tool_call_id == call_id:
            fn(output)
    elif isinstance(output, (list, tuple)):
        for item in output:
            _visit(item, call_id, fn)
    elif isinstance(output, Mapping):
        for item in output.values():
            _visit(item, call_id, fn)
    else:
        update = getattr(output, "update", None)  # a langgraph Command
        if update is not None:
            _visit(update, call_id, fn)


# -- one call --------------------------------------------------------------------------------
class ToolErrorMessage(Exception):
    """The framework answered the call with an error message (``status="error"``: the
    tool's handled exception). A failure, so not recorded as done; the message itself is
    the answer the model gets."""

    def __init__(self, output: ToolMessage) -> None:
        super().__init__(str(output.content)[:2000])
        self.output = output


@dataclass(slots=True)
class Call:
    """One tool call on its way through the guard: its name, validated arguments, call id,
    and the live output of LangChain's handler once the thunk has run it."""

    name: str
    args: dict[str, Any]
    call_id: str
    direct: bool = False  # called without a tool call id: answer as the tool would, not a message
    live: list[Any] = field(default_factory=list)

    def settle(self, output: Any) -> Any:
        """The thunk's last step: keep the live output, return its stored form."""
        if isinstance(output, ToolMessage) and output.status == "error":
            raise ToolErrorMessage(output)
        self.live.append(output)
        return encode_output(output, self.call_id)

    def render(self, c: Classification) -> Any:
        """The one answer for this call (see docs/integrations/contract.md, Rendering): the
        tool's own message when it ran now, the stored one re-addressed to this call id
        when it ran before, else the classification's text (``status="error"`` unless the
        tool ran). The classification's fields go into ``response_metadata["onceonly"]``
        (and the ``artifact`` of a message the adapter wrote)."""
        meta = c.as_dict()
        plain = (c.code, c.reason) in (("executed", "ok"), ("replayed", "dedup"))
        if c.code == "executed" and self.live and (plain or self.direct):
            out = self.live[-1]  # a direct caller gets the value even if unrecorded
        elif plain and c.result is not None:
            out = decode_output(c.result, self.call_id, self.name)
        elif c.code == "failed" and isinstance(c.exception, ToolErrorMessage):
            out = c.exception.output  # the framework's own error message for the call
        elif self.direct:
            if c.code == "failed" and c.exception is not None:
                raise c.exception  # the tool's own exception, for a direct caller
            raise GuardRefused(c)
        else:
            return ToolMessage(
                content=c.text,
                tool_call_id=self.call_id,
                name=self.name,
                status="success" if c.ok else "error",
                artifact=meta,
                response_metadata={"onceonly": meta},
            )
        if self.direct:
            return out.content if isinstance(out, ToolMessage) else out
        _visit(out, self.call_id, lambda m: _annotate(m, meta))
        return out


def _annotate(message: ToolMessage, meta: dict[str, Any]) -> None:
    message.response_metadata = {**message.response_metadata, "onceonly": meta}
