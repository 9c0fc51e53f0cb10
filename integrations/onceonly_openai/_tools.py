"""Registered tools: a callable, its name, its argument model and its JSON schemas.

One pydantic model per tool — built once from the signature, or given as ``schema=`` —
does two jobs: it validates the model's arguments before anything runs (the validated
values are what the tool receives and what the call is keyed by), and it is the source
of the ``tools=[...]`` schema sent to the API, so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from onceonly_core.errors import ConfigError
from onceonly_core.protocol import Options

__all__ = ["Tool", "tool"]

# The API's rule for function and custom tool names.
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

SpendFn = Callable[[Mapping[str, Any]], float]

# The guard's per-call options, and the call's own agent, run id and dedup scope.
_OPTIONS = frozenset(f.name for f in dataclasses.fields(Options)) | {"agent_id", "run_id", "scope"}


@dataclass(frozen=True, slots=True)
class Tool:
    """A callable the model may call, with its guard options. Build it with :func:`tool`."""

    fn: Callable[..., Any]
    name: str
    description: str
    custom: bool
    spend_usd: float | SpendFn | None
    options: Mapping[str, Any]
    is_async: bool
    model: type[BaseModel] = field(repr=False)
    # Model field name -> parameter name. Fields are named p0, p1, ... with the
    # parameter name as alias, so a parameter called ``json`` or ``copy`` cannot shadow
    # a BaseModel attribute. With ``schema=``: each field's own name, twice.
    params: tuple[tuple[str, str], ...] = field(repr=False)
    var_kw: bool = field(repr=False, default=False)

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments as the callable receives them — defaults filled in,
        ``default_factory`` run, values coerced: every parameter, by name. This mapping
        is also what the call is keyed by. Raises ValidationError."""
        m = self.model.model_validate(raw)
        args = {param: getattr(m, f) for f, param in self.params}
        if self.var_kw and m.model_extra:
            args.update(m.model_extra)
        return args

    def custom_args(self, text: str) -> dict[str, Any]:
        """A custom tool's free-text input, passed to its first parameter."""
        return {self.params[0][1]: text}

    def spend(self, args: Mapping[str, Any]) -> float | None:
        s = self.spend_usd
        return s(args) if callable(s) else s

    def parameters(self, *, strict: bool = False) -> dict[str, Any]:
        """The JSON schema of the arguments (``strict``: the API's structured-outputs form)."""
        schema = self.model.model_json_schema(by_alias=True)
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        schema.setdefault("properties", {})
        if strict:
            _strict(schema)
        return schema

    def chat_schema(self, *, strict: bool = False) -> dict[str, Any]:
        """The Chat Completions ``tools=[...]`` entry."""
        if self.custom:
            return {
                "type": "custom",
                "custom": {"name": self.name, "description": self.description},
            }
        fn: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters(strict=strict),
        }
        if strict:
            fn["strict"] = True
        return {"type": "function", "function": fn}

    def responses_schema(self, *, strict: bool = False) -> dict[str, Any]:
        """The Responses API ``tools=[...]`` entry."""
        if self.custom:
            return {"type": "custom", "name": self.name, "description": self.description}
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters(strict=strict),
            "strict": strict,
        }


def check_options(options: Mapping[str, Any], allowed: frozenset[str] = _OPTIONS) -> None:
    """Refuse unknown option names here, not as a guard_error answered to the model at the
    tool's first call."""
    unknown = set(options) - allowed
    if unknown:
        raise ConfigError(f"unknown tool options: {', '.join(sorted(unknown))}")


def _strict(node: Any) -> None:
    # Structured outputs: every object closed and every property required.
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            node["additionalProperties"] = False
            node["required"] = list(node.get("properties", {}))
        node.pop("default", None)
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )


def tool(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    custom: bool = False,
    spend_usd: float | SpendFn | None = None,
    schema: type[BaseModel] | None = None,
    **options: Any,
) -> Tool:
    """Register ``fn`` as a tool.

    The arguments are described by ``fn``'s signature, or by ``schema=``, a pydantic
    model: the model's JSON is validated by it and ``fn`` is called with its fields as
    keywords (``fn(**fields)``). ``custom=True`` makes it a custom (free-text input)
    tool: the text goes to its first parameter. ``spend_usd`` (a number, or a function of
    the arguments) feeds the spend policies. Other keywords are guard options
    (``read_only=True`` for a tool that only reads, ``key_args=``, ``ttl=``...), and this
    tool's own ``agent_id=``, ``run_id=`` or ``scope=`` (e.g. ``scope=GLOBAL`` for a call
    that is once per customer, whatever the conversation), which win over the dispatcher's.

    A pydantic model *class* is not a tool (it has no effect to run): passing one raises
    ConfigError; give the function that does the work, with ``schema=Model``.
    """
    if isinstance(fn, Tool):
        return fn
    check_options(options)
    if isinstance(fn, type) and issubclass(fn, BaseModel):
        raise ConfigError(
            f"{fn.__name__} is a pydantic model class, not a tool: pass the function that "
            f"does the work, with schema={fn.__name__} to describe its arguments"
        )
    if not callable(fn):
        raise ConfigError(f"a tool must be callable, got {type(fn).__name__}")
    tool_name = name or getattr(fn, "__name__", None) or type(fn).__name__
    if not _NAME.match(tool_name):
        raise ConfigError(
            f"tool name {tool_name!r} must be 1-64 letters, digits, '_' or '-' (the API's rule)"
        )
    if schema is not None:
        return _from_schema(fn, tool_name, schema, description, custom, spend_usd, options)
    try:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
    except (TypeError, ValueError, NameError) as err:
        raise ConfigError(f"cannot read the signature of tool {tool_name!r}: {err}") from err
    fields: dict[str, Any] = {}
    params: list[tuple[str, str]] = []
    var_kw = False
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue  # arguments arrive by name; *args stays empty
        if p.kind is p.POSITIONAL_ONLY:
            raise ConfigError(
                f"tool {tool_name!r}: parameter {p.name!r} is positional-only; the model "
                "passes arguments by name"
            )
        default = ... if p.default is p.empty else p.default
        fields[f"p{i}"] = (hints.get(p.name, Any), Field(default, alias=p.name))
        params.append((f"p{i}", p.name))
    if custom and not params:
        raise ConfigError(f"custom tool {tool_name!r} needs a parameter for its text input")
    model = create_model(
        f"{tool_name}_arguments",
        __config__=ConfigDict(extra="allow" if var_kw else "forbid", arbitrary_types_allowed=True),
        **fields,
    )
    doc = description if description is not None else (inspect.getdoc(fn) or "")
    return Tool(
        fn=fn,
        name=tool_name,
        description=doc.strip().split("\n\n")[0].replace("\n", " ") if description is None else doc,
        custom=custom,
        spend_usd=spend_usd,
        options=options,
        is_async=_is_async(fn),
        model=model,
        params=tuple(params),
        var_kw=var_kw,
    )


def _from_schema(
    fn: Callable[..., Any],
    tool_name: str,
    schema: type[BaseModel],
    description: str | None,
    custom: bool,
    spend_usd: float | SpendFn | None,
    options: Mapping[str, Any],
) -> Tool:
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise ConfigError(f"tool {tool_name!r}: schema= takes a pydantic model class")
    if custom:
        raise ConfigError(f"custom tool {tool_name!r} takes free text: it has no schema=")
    names = tuple((f, f) for f in schema.model_fields)
    doc = description if description is not None else (inspect.getdoc(fn) or "")
    return Tool(
        fn=fn,
        name=tool_name,
        description=doc.strip().split("\n\n")[0].replace("\n", " ") if description is None else doc,
        custom=False,
        spend_usd=spend_usd,
        options=options,
        is_async=_is_async(fn),
        model=schema,
        params=names,
        var_kw=schema.model_config.get("extra") == "allow",
    )
