"""Guarded tool specs: ``to_tool_list()`` hands out guarded tools."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from llama_index.core.tools import FunctionTool
from llama_index.core.tools.tool_spec.base import SPEC_FUNCTION_TYPE, BaseToolSpec
from llama_index.core.tools.types import BaseTool, ToolMetadata

from onceonly_core import Guard
from onceonly_core.errors import ConfigError

from ._tools import guard_tools

__all__ = ["GuardedSpec", "GuardedToolSpec", "guard_spec"]


def _guarded(
    tools: list[FunctionTool],
    guard: Guard | None,
    options: Mapping[str, Any],
    tool_options: Mapping[str, Mapping[str, Any]],
) -> list[FunctionTool]:
    # Only the tools asked for: per-tool options for functions left out are not an error.
    names = {t.metadata.name for t in tools}
    chosen = {k: v for k, v in tool_options.items() if k in names}
    guarded = guard_tools(tools, guard, tool_options=chosen, **options)
    # guard_tools turns a FunctionTool into a GuardedFunctionTool (a FunctionTool), unless
    # a subclass overrides call/acall; to_tool_list promises FunctionTools, so say so.
    out: list[FunctionTool] = []
    for t in guarded:
        if not isinstance(t, FunctionTool):
            name = t.metadata.name if isinstance(t, BaseTool) else t
            raise ConfigError(
                f"tool {name!r} overrides FunctionTool.call/acall; guard it "
                "with guard_tool() and use it as a BaseTool"
            )
        out.append(t)
    return out


class GuardedToolSpec(BaseToolSpec):
    """A ``BaseToolSpec`` whose ``to_tool_list()`` returns guarded tools.

    Subclass it instead of ``BaseToolSpec``; configure with class attributes::

        class Payments(GuardedToolSpec):
            spec_functions = ["charge", "refund"]
            onceonly_guard = Guard("sqlite:///ledger.db")
            onceonly_options = {"agent_id": "billing-bot"}
            onceonly_tool_options = {"charge": {"spend_usd": 5.0}}
    """

    #: The guard (``None``: ``onceonly_core.guard``).
    onceonly_guard: ClassVar[Guard | None] = None
    #: ``guard_tool`` keywords for every tool: agent_id, spend_usd, run_id, guard options.
    onceonly_options: ClassVar[Mapping[str, Any]] = {}
    #: Per spec function name: keywords that override ``onceonly_options``.
    onceonly_tool_options: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def to_tool_list(
        self,
        spec_functions: list[SPEC_FUNCTION_TYPE] | None = None,
        func_to_metadata_mapping: dict[str, ToolMetadata] | None = None,
    ) -> list[FunctionTool]:
        """The spec's tools, each guarded (name, schema and docs unchanged)."""
        tools = super().to_tool_list(spec_functions, func_to_metadata_mapping)
        return _guarded(
            tools, self.onceonly_guard, self.onceonly_options, self.onceonly_tool_options
        )


class GuardedSpec(BaseToolSpec):
    """Wraps an existing spec instance; ``to_tool_list()`` guards what the spec returns.

    Attribute access falls through to the wrapped spec.
    """

    def __init__(
        self,
        spec: BaseToolSpec,
        guard: Guard | None = None,
        *,
        tool_options: Mapping[str, Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> None:
        self.spec = spec
        self.spec_functions = list(spec.spec_functions)
        self._guard = guard
        self._options = dict(options)
        self._tool_options = dict(tool_options or {})

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes this object lacks: the spec's own methods and state.
        if name == "spec":  # not set yet (during unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.spec, name)

    def to_tool_list(
        self,
        spec_functions: list[SPEC_FUNCTION_TYPE] | None = None,
        func_to_metadata_mapping: dict[str, ToolMetadata] | None = None,
    ) -> list[FunctionTool]:
        """The wrapped spec's tools (its own ``to_tool_list``), each guarded."""
        tools = self.spec.to_tool_list(spec_functions, func_to_metadata_mapping)
        return _guarded(tools, self._guard, self._options, self._tool_options)


def guard_spec(
    spec: BaseToolSpec,
    guard: Guard | None = None,
    *,
    tool_options: Mapping[str, Mapping[str, Any]] | None = None,
    **options: Any,
) -> GuardedSpec:
    """Guard an existing spec: ``guard_spec(MySpec(), guard, agent_id="bot")``."""
    if isinstance(spec, GuardedSpec):
        return spec
    if not isinstance(spec, BaseToolSpec):
        raise ConfigError(f"guard_spec needs a BaseToolSpec, got {type(spec).__name__}")
    return GuardedSpec(spec, guard, tool_options=tool_options, **options)
