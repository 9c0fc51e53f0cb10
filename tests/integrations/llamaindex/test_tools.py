"""The tool wrappers on their own: metadata kept, keys, replays, refusals, sync/async."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import pytest
from llama_index.core.base.llms.types import TextBlock
from llama_index.core.tools import FunctionTool
from llama_index.core.tools.types import (
    AsyncBaseTool,
    BaseTool,
    ToolMetadata,
    ToolOutput,
)
from pydantic import BaseModel, Field

from onceonly_core import ConfigError, FingerprintError, Guard, InProgress
from onceonly_core.governance.models import Policy
from onceonly_llamaindex import (
    GuardedFunctionTool,
    GuardedTool,
    GuardedToolOutput,
    guard_tool,
    guard_tools,
)


class Receipt(BaseModel):
    charge_id: str
    amount: float


def counting() -> tuple[Any, list[Any]]:
    calls: list[Any] = []

    def charge(customer: str, amount_usd: float, memo: str = "") -> Receipt:
        """Charge a customer.

        Args:
            customer (str): the customer id
            amount_usd (float): how much
        """
        calls.append((customer, amount_usd, memo))
        return Receipt(charge_id=f"ch_{len(calls)}", amount=amount_usd)

    return charge, calls


def test_metadata_is_kept(guard: Guard) -> None:
    charge, _ = counting()
    bare = FunctionTool.from_defaults(charge, return_direct=True)
    tool = guard_tool(bare, guard)
    assert isinstance(tool, GuardedFunctionTool) and isinstance(tool, FunctionTool)
    assert tool.metadata is bare.metadata
    assert tool.metadata.name == "charge"
    assert tool.metadata.return_direct is True
    assert tool.metadata.fn_schema is bare.metadata.fn_schema
    assert tool.metadata.to_openai_tool() == bare.metadata.to_openai_tool()
    assert tool.inner is bare


def test_sync_call_replays_the_stored_result(guard: Guard) -> None:
    charge, calls = counting()
    tool = guard_tool(charge, guard)
    first = tool.call(customer="c1", amount_usd=9.99)
    again = tool.call(customer="c1", amount_usd=9.99, memo="")  # defaults are the same call
    positional = tool.call("c1", 9.99)
    other = tool.call(customer="c1", amount_usd=9.98)
    assert len(calls) == 2
    assert isinstance(again, ToolOutput) and not again.is_error
    assert isinstance(again.raw_output, Receipt)  # replayed with its type
    assert again.raw_output == first.raw_output == positional.raw_output
    assert again.content == first.content == str(first.raw_output)
    assert again.tool_name == "charge"
    assert first.raw_input == {"args": (), "kwargs": {"customer": "c1", "amount_usd": 9.99}}
    assert positional.raw_input == {"args": ("c1", 9.99), "kwargs": {}}
    assert other.raw_output.charge_id == "ch_2"


def test_async_and_sync_paths_share_one_key(guard: Guard) -> None:
    charge, calls = counting()
    tool = guard_tool(charge, guard)
    out = asyncio.run(tool.acall(customer="c1", amount_usd=1.0))
    assert tool.call(customer="c1", amount_usd=1.0).raw_output == out.raw_output
    assert tool(customer="c1", amount_usd=1.0).raw_output == out.raw_output  # __call__
    assert len(calls) == 1


def test_async_only_tool_sync_and_async(guard: Guard) -> None:
    calls: list[str] = []

    async def notify(to: str) -> str:
        """Send a notification."""
        await asyncio.sleep(0)
        calls.append(to)
        return f"notified {to}"

    tool = guard_tool(notify, guard)
    assert asyncio.run(tool.acall(to="a")).content == "notified a"
    assert tool.call(to="a").content == "notified a"  # LlamaIndex's async_to_sync path
    assert tool.call(to="b").content == "notified b"
    assert calls == ["a", "b"]


def test_sync_and_async_pair(guard: Guard) -> None:
    calls: list[str] = []

    def put(k: str) -> str:
        calls.append(f"sync:{k}")
        return k

    async def aput(k: str) -> str:
        calls.append(f"async:{k}")
        return k

    tool = guard_tool(FunctionTool.from_defaults(fn=put, async_fn=aput, name="put"), guard)
    asyncio.run(tool.acall(k="x"))
    tool.call(k="x")
    tool.call(k="y")
    assert calls == ["async:x", "sync:y"]


def test_concurrent_threads_execute_once(guard: Guard) -> None:
    charge, calls = counting()
    gate = threading.Event()

    def slow(customer: str, amount_usd: float) -> Receipt:
        gate.wait(5)
        return charge(customer, amount_usd)

    tool = guard_tool(FunctionTool.from_defaults(slow, name="charge"), guard)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(tool.call, customer="c", amount_usd=2.0) for _ in range(8)]
        threading.Timer(0.2, gate.set).start()
        outs = [f.result(timeout=30) for f in futures]
    assert len(calls) == 1
    assert {o.raw_output.charge_id for o in outs} == {"ch_1"}


def test_concurrent_tasks_execute_once(guard: Guard) -> None:
    calls: list[int] = []

    async def book(seat: str) -> str:
        await asyncio.sleep(0.1)
        calls.append(1)
        return f"booked {seat}"

    tool = guard_tool(book, guard)

    async def main() -> list[ToolOutput]:
        return await asyncio.gather(*(tool.acall(seat="12A") for _ in range(6)))

    outs = asyncio.run(main())
    assert len(calls) == 1 and {o.content for o in outs} == {"booked 12A"}


def test_partial_params_reach_the_tool_but_not_the_key(guard: Guard) -> None:
    seen: list[Any] = []

    class Client:  # not fingerprintable: it must stay out of the key
        pass

    def send(to: str, client: Client) -> str:
        seen.append(client)
        return f"sent to {to}"

    one, two = Client(), Client()
    a = guard_tool(FunctionTool.from_defaults(send, partial_params={"client": one}), guard)
    b = guard_tool(FunctionTool.from_defaults(send, partial_params={"client": two}), guard)
    assert "client" not in a.metadata.get_parameters_dict()["properties"]
    assert a.call(to="x").content == "sent to x"
    assert b.call(to="x").content == "sent to x"  # same tool name and model arguments
    assert asyncio.run(a.acall(to="y")).content == "sent to y"
    assert seen == [one, one]
    assert a.call(to="x").raw_input["kwargs"] == {"client": one, "to": "x"}


def test_field_info_defaults_are_part_of_the_call(guard: Guard) -> None:
    calls: list[int] = []

    def search(
        query: Annotated[str, "what to look for"], limit: int = Field(default=5, ge=1)
    ) -> str:
        calls.append(limit)
        return f"{query}:{limit}"

    tool = guard_tool(search, guard)
    assert tool.call(query="q").content == "q:5"
    assert tool.call(query="q", limit=5).content == "q:5"
    assert tool.call(query="q", limit=6).content == "q:6"
    assert calls == [5, 6]


def test_callback_runs_on_the_replay_too(guard: Guard) -> None:
    charge, calls = counting()
    tool = guard_tool(
        FunctionTool.from_defaults(charge, callback=lambda r: f"receipt {r.charge_id}"), guard
    )
    assert tool.call(customer="c", amount_usd=1.0).content == "receipt ch_1"
    assert tool.call(customer="c", amount_usd=1.0).content == "receipt ch_1"
    assert asyncio.run(tool.acall(customer="c", amount_usd=1.0)).content == "receipt ch_1"
    assert len(calls) == 1


def test_content_blocks_are_stored_and_replayed(guard: Guard) -> None:
    calls: list[int] = []

    def blocks(n: int) -> list[TextBlock]:
        calls.append(n)
        return [TextBlock(text=f"line {i}") for i in range(n)]

    tool = guard_tool(blocks, guard)
    first, second = tool.call(n=2), tool.call(n=2)
    assert second.blocks == first.blocks == [TextBlock(text="line 0"), TextBlock(text="line 1")]
    assert calls == [2]


def test_tool_exception_is_a_failed_output_and_not_cached(guard: Guard) -> None:
    attempts: list[int] = []

    def flaky(x: int) -> int:
        attempts.append(x)
        if len(attempts) == 1:
            raise TimeoutError("gateway timeout")
        return x

    tool = guard_tool(flaky, guard)
    failed = tool.call(x=1)  # an answer the model reads, with the tool's own exception
    assert isinstance(failed, GuardedToolOutput) and failed.is_error
    assert failed.code == "failed" and failed.raw_output["error_type"] == "TimeoutError"
    assert failed.content.startswith("Failed: flaky raised TimeoutError: gateway timeout;")
    assert isinstance(failed.exception, TimeoutError)
    assert tool.call(x=1).content == "1"
    assert tool.call(x=1).content == "1"
    assert attempts == [1, 1]


def test_blocked_call_never_runs(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="bot", allowed_tools=["search"]))
    charge, calls = counting()
    tool = guard_tool(charge, guard, agent_id="bot")
    for out in (
        tool.call(customer="c", amount_usd=1.0),
        asyncio.run(tool.acall(customer="c", amount_usd=1.0)),
    ):
        assert out.is_error and out.tool_name == "charge"
        assert out.content == (
            "Not allowed: charge was blocked by policy (tool_not_in_allowed_list); do not "
            "retry this call; tell the user or do something else."
        )
        assert out.raw_output["code"] == "blocked"
        assert out.raw_output["reason"] == "tool_not_in_allowed_list"
        assert out.raw_output == out.classification and out.raw_output["text"] == out.content
    assert calls == []


def test_pending_approval_then_approved(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="bot", require_approval=["charge"]))
    charge, calls = counting()
    tool = guard_tool(charge, guard, agent_id="bot")
    out = tool.call(customer="c", amount_usd=1.0)
    assert out.is_error and out.raw_output["code"] == "pending_approval"
    approval_id = out.raw_output["approval_id"]
    assert approval_id and approval_id in out.content
    assert calls == []
    guard.gov.approve(approval_id, by="ops")
    done = tool.call(customer="c", amount_usd=1.0)
    assert not done.is_error and done.raw_output.charge_id == "ch_1"
    assert tool.call(customer="c", amount_usd=1.0).raw_output.charge_id == "ch_1"
    assert len(calls) == 1


def test_spend_is_charged_per_execution(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="bot", max_spend_usd_per_day=10.0))
    charge, calls = counting()
    tool = guard_tool(charge, guard, agent_id="bot", spend_usd=lambda a: a["amount_usd"])
    assert not tool.call(customer="a", amount_usd=6.0).is_error
    assert not tool.call(customer="a", amount_usd=6.0).is_error  # a replay costs nothing
    over = tool.call(customer="b", amount_usd=6.0)
    assert over.is_error and over.raw_output["reason"] == "daily_spend_exceeded"
    assert len(calls) == 1


def test_unfingerprintable_argument_is_invalid_arguments(guard: Guard) -> None:
    ran: list[Any] = []

    def f(x: Any) -> str:
        ran.append(x)
        return "ran"

    tool = guard_tool(f, guard)
    out = tool.call(x=object())
    assert out.is_error and out.raw_output["code"] == "invalid_arguments"
    assert out.raw_output["reason"] == "invalid_value" and "x" in out.content
    assert isinstance(out.exception, FingerprintError) and ran == []


def test_options_pass_through(guard: Guard) -> None:
    calls: list[str] = []

    def refund(order_id: str, reason: str) -> str:
        calls.append(reason)
        return f"refunded {order_id}"

    tool = guard_tool(refund, guard, key_args=["order_id"])
    tool.call(order_id="o", reason="damaged")
    tool.call(order_id="o", reason="arrived damaged")
    assert calls == ["damaged"]


def test_in_progress_is_answered_after_wait(guard: Guard) -> None:
    gate = threading.Event()

    def hold(x: int) -> int:
        gate.wait(5)
        return x

    tool = guard_tool(hold, guard, wait=0)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(tool.call, x=1)
        for _ in range(100):
            if guard.history():
                break
            threading.Event().wait(0.02)
        busy = tool.call(x=1)
        assert busy.is_error and busy.raw_output["code"] == "in_progress"
        assert isinstance(busy.exception, InProgress)
        gate.set()
        assert first.result(10).content == "1"


def test_bad_configuration(guard: Guard) -> None:
    charge, _ = counting()
    with pytest.raises(ConfigError, match="unknown guard options: colour"):
        guard_tool(charge, guard, colour="red")
    with pytest.raises(ConfigError, match=r"metadata\.name"):
        guard_tool(charge, guard, name="other")
    with pytest.raises(ConfigError, match="tool_options names unknown tools: nope"):
        guard_tools([charge], guard, tool_options={"nope": {}})
    with pytest.raises(ConfigError, match="Guard"):
        guard_tool(charge, "sqlite:///x.db")  # type: ignore[arg-type]
    tool = guard_tool(charge, guard)
    assert guard_tool(tool, guard) is tool  # guarding twice is a no-op


def test_tool_options_per_tool(guard: Guard) -> None:
    guard.gov.upsert_policy(Policy(agent_id="bot", max_spend_usd_per_day=1.0))
    a, a_calls = counting()

    def b(x: int) -> int:
        return x

    ta, tb = guard_tools([a, b], guard, agent_id="bot", tool_options={"charge": {"spend_usd": 5}})
    assert ta.call(customer="c", amount_usd=1.0).raw_output["reason"] == ("daily_spend_exceeded")
    assert tb.call(x=1).content == "1"
    assert a_calls == []


class Lookup(BaseTool):
    """A plain sync BaseTool (no acall)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @property
    def metadata(self) -> ToolMetadata:
        return ToolMetadata(name="lookup", description="Look up a thing.")

    def __call__(self, input: str) -> ToolOutput:
        self.calls.append(input)
        if input == "bad":
            return ToolOutput(
                content="no such thing",
                tool_name="lookup",
                raw_input={},
                raw_output=None,
                is_error=True,
            )
        return ToolOutput(
            content=f"found {input}",
            tool_name="lookup",
            raw_input={"input": input},
            raw_output={"hit": input},
        )


class Ticket(AsyncBaseTool):
    """An AsyncBaseTool with its own call/acall."""

    class Args(BaseModel):
        title: str
        priority: int = 3

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @property
    def metadata(self) -> ToolMetadata:
        return ToolMetadata(name="ticket", description="Open a ticket.", fn_schema=self.Args)

    def call(self, title: str, priority: int = 3) -> ToolOutput:
        self.calls.append(("sync", title))
        return ToolOutput(
            content=f"T-{len(self.calls)}",
            tool_name="ticket",
            raw_input={"title": title},
            raw_output=len(self.calls),
        )

    async def acall(self, title: str, priority: int = 3) -> ToolOutput:
        self.calls.append(("async", title))
        return ToolOutput(
            content=f"T-{len(self.calls)}",
            tool_name="ticket",
            raw_input={"title": title},
            raw_output=len(self.calls),
        )


def test_plain_base_tool(guard: Guard) -> None:
    inner = Lookup()
    tool = guard_tool(inner, guard)
    assert isinstance(tool, GuardedTool) and tool.metadata is not None
    assert tool.metadata.name == "lookup"
    first = tool("x")  # positional: named by the default schema's field, "input"
    again = asyncio.run(tool.acall(input="x"))
    assert first.content == again.content == "found x" and again.raw_output == {"hit": "x"}
    assert inner.calls == ["x"]
    # An error output is a failure: returned as is, and the next call runs again.
    assert tool.call(input="bad").is_error and tool.call(input="bad").is_error
    assert inner.calls == ["x", "bad", "bad"]


def test_async_base_tool(guard: Guard) -> None:
    inner = Ticket()
    tool = guard_tool(inner, guard)
    assert tool.metadata.fn_schema is Ticket.Args
    out = asyncio.run(tool.acall(title="disk full"))
    assert tool.call(title="disk full").content == out.content == "T-1"
    assert tool.call("disk full").content == "T-1"  # positional, named by the schema
    assert tool.call(title="disk full", priority=1).content == "T-2"
    assert inner.calls == [("async", "disk full"), ("sync", "disk full")]
    with pytest.raises(TypeError, match="given twice"):
        tool.call("a", title="a")


def test_function_tool_subclass_overriding_call_is_wrapped_generically(guard: Guard) -> None:
    class Loud(FunctionTool):
        def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
            out = super().call(*args, **kwargs)
            out.content = out.content.upper()
            return out

        async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
            return self.call(*args, **kwargs)

    calls: list[str] = []

    def shout(word: str) -> str:
        calls.append(word)
        return word

    bare = FunctionTool.from_defaults(shout)
    loud = Loud(fn=shout, metadata=bare.metadata)
    tool = guard_tool(loud, guard)
    assert isinstance(tool, GuardedTool)
    assert tool.call(word="hi").content == "HI" and tool.call(word="hi").content == "HI"
    assert calls == ["hi"]
