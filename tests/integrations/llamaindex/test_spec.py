"""Guarded tool specs: the subclass and the wrapper around an existing spec."""

import asyncio
from typing import Any, ClassVar

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.tools.tool_spec.base import BaseToolSpec
from llama_index.core.tools.types import ToolMetadata

from onceonly_core import ConfigError, Guard
from onceonly_core.governance.models import Policy
from onceonly_llamaindex import GuardedFunctionTool, GuardedSpec, GuardedToolSpec, guard_spec


class Payments(BaseToolSpec):
    """An ordinary spec: a sync function, an async one, and a (sync, async) pair."""

    spec_functions: ClassVar[list[Any]] = ["charge", "anotify", ("lookup", "alookup")]

    def __init__(self) -> None:
        self.log: list[str] = []

    def charge(self, customer: str, amount_usd: float) -> str:
        """Charge a customer."""
        self.log.append(f"charge {customer} {amount_usd}")
        return f"charged {customer}"

    async def anotify(self, to: str) -> str:
        """Notify someone."""
        self.log.append(f"notify {to}")
        return f"notified {to}"

    def lookup(self, q: str) -> str:
        """Look something up."""
        self.log.append(f"lookup {q}")
        return q

    async def alookup(self, q: str) -> str:
        """Look something up."""
        self.log.append(f"alookup {q}")
        return q


def test_wrapping_an_existing_spec(guard: Guard) -> None:
    spec = Payments()
    bare = {t.metadata.name: t for t in spec.to_tool_list()}
    wrapped = guard_spec(spec, guard)
    assert isinstance(wrapped, GuardedSpec) and isinstance(wrapped, BaseToolSpec)
    assert wrapped.log is spec.log  # attributes fall through to the spec
    tools = {t.metadata.name: t for t in wrapped.to_tool_list()}
    assert set(tools) == {"charge", "anotify", "lookup"}
    for name, tool in tools.items():
        assert isinstance(tool, GuardedFunctionTool)
        assert tool.metadata.description == bare[name].metadata.description
        assert tool.metadata.get_parameters_dict() == bare[name].metadata.get_parameters_dict()
    tools["charge"].call(customer="c", amount_usd=2.0)
    tools["charge"].call(customer="c", amount_usd=2.0)
    asyncio.run(tools["anotify"].acall(to="x"))
    tools["anotify"].call(to="x")
    asyncio.run(tools["lookup"].acall(q="a"))
    tools["lookup"].call(q="a")
    tools["lookup"].call(q="b")
    assert spec.log == ["charge c 2.0", "notify x", "alookup a", "lookup b"]
    assert guard_spec(wrapped) is wrapped
    # A subset, and the async builder, are guarded too.
    [only] = wrapped.to_tool_list(spec_functions=["charge"])
    assert isinstance(only, GuardedFunctionTool)
    alist = asyncio.run(wrapped.to_tool_list_async())
    assert all(isinstance(t, GuardedFunctionTool) for t in alist)


def test_custom_metadata_mapping_is_kept(guard: Guard) -> None:
    meta = ToolMetadata(name="bill", description="Bill the customer.")
    [tool] = guard_spec(Payments(), guard).to_tool_list(
        spec_functions=["charge"], func_to_metadata_mapping={"charge": meta}
    )
    assert tool.metadata is meta


class Billing(GuardedToolSpec):
    spec_functions: ClassVar[list[Any]] = ["charge", "delete_customer"]
    onceonly_options: ClassVar[dict[str, Any]] = {"agent_id": "billing-bot"}
    onceonly_tool_options: ClassVar[dict[str, Any]] = {"charge": {"spend_usd": 1.0}}
    runs: ClassVar[list[str]] = []

    def charge(self, customer: str, amount_usd: float) -> str:
        """Charge a customer."""
        self.runs.append("charge")
        return f"charged {customer} {amount_usd}"

    def delete_customer(self, customer: str) -> str:
        """Delete a customer."""
        self.runs.append("delete")
        return "deleted"


def test_guarded_spec_subclass_in_an_agent(guard: Guard, scripted: Any) -> None:
    guard.gov.upsert_policy(Policy(agent_id="billing-bot", blocked_tools=["delete_*"]))

    class MyBilling(Billing):
        onceonly_guard = guard

    tools = MyBilling().to_tool_list()
    assert all(isinstance(t, GuardedFunctionTool) for t in tools)
    calls = [
        ("charge", {"customer": "c", "amount_usd": 3.0}),
        ("charge", {"customer": "c", "amount_usd": 3.0}),
        ("delete_customer", {"customer": "c"}),
    ]

    async def main() -> list[ToolCallResult]:
        handler = FunctionAgent(tools=tools, llm=scripted(calls)).run(user_msg="bill")
        out = [e async for e in handler.stream_events() if isinstance(e, ToolCallResult)]
        await handler
        return out

    with guard.workflow("invoice-9"):
        results = asyncio.run(main())
    assert Billing.runs == ["charge"]
    errors = {r.tool_name: r.tool_output.is_error for r in results}
    assert errors == {"charge": False, "delete_customer": True}
    metrics = guard.gov.agent_metrics("billing-bot", "day")
    assert metrics.spend_usd == pytest.approx(1.0)  # charged once, the replay is free


def test_bad_spec_options(guard: Guard) -> None:
    class Broken(Payments, GuardedToolSpec):
        onceonly_options: ClassVar[dict[str, Any]] = {"colour": "red"}

    with pytest.raises(ConfigError, match="colour"):
        Broken().to_tool_list()
    with pytest.raises(ConfigError, match="BaseToolSpec"):
        guard_spec(object(), guard)  # type: ignore[arg-type]
