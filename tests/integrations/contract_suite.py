"""The adapter contract suite (issue 14): one set of scenarios, run against every adapter.

The same model tool call gives the same code, the same model text and the same number of
effects whichever framework carries it. This module imports no framework: each framework's
``integration`` nox session (only that extra installed) runs it from
``tests/integrations/<framework>/test_contract.py`` with that framework's driver::

    from contract_suite import ContractSuite

    class TestLangChainContract(ContractSuite):
        driver_factory = LangChainDriver          # defined in that file

(``tests/integrations/conftest.py`` puts this directory on ``sys.path``.)

A driver builds a framework tool from a function and a pydantic argument schema, and invokes
it the way the framework does when a MODEL asks for it, from the model's raw JSON text. It
reads the answer back from the framework's native message (the code from the structured
metadata the adapter attached, never parsed out of the text) as a :class:`Rendered`.

Every expected answer is computed here by the core itself (:func:`reference`): the suite
asserts ``Rendered.code`` and ``Rendered.text`` against the core's ``Classification``, so
the three adapters agree with each other by construction, and none adds wording.

What the model reads (``Rendered.text``), per the contract (docs/integrations/contract.md):
``executed`` with reason ``ok`` and ``replayed`` with reason ``dedup`` render the tool's
result as the framework renders a tool's output (every result in this suite is a ``str``,
so: that string, unchanged); every other outcome renders ``Classification.text`` unchanged.
``interrupted`` is never rendered: the driver's call raises it.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import pytest
from pydantic import BaseModel, Field, ValidationError

import onceonly_core.protocol
from onceonly_core import Guard, classify
from onceonly_core.contract import Classification, invalid_json
from onceonly_core.errors import CompletionNotRecorded, StoreError
from onceonly_core.governance.models import Policy
from onceonly_core.stores import NewClaim
from onceonly_core.stores.memory import MemoryStore

__all__ = [
    "ContractSuite",
    "CoreDriver",
    "Driver",
    "Payment",
    "Rendered",
    "call_options",
    "reference",
    "validated",
]


# -- the driver interface ------------------------------------------------------------------
@dataclass(frozen=True)
class Rendered:
    """An adapter's answer to one tool call, read back from the framework's native type."""

    code: str
    """The contract code the adapter put into its native message's metadata."""
    text: str
    """The text the MODEL sees (ToolMessage.content / the output string / ToolOutput.content)."""
    raw: Any = field(default=None, compare=False)
    """The native object (a ToolMessage, a dict item, a ToolOutput)."""


class Driver(Protocol):
    """What each framework's test_contract.py implements."""

    name: str  # "langchain" | "openai" | "llamaindex"

    def __init__(self, guard: Guard) -> None: ...

    def add_tool(
        self, name: str, fn: Callable[..., Any], schema: type[BaseModel], **options: Any
    ) -> None:
        """A framework tool around ``fn`` whose arguments are described by ``schema``.

        ``fn`` is called with the validated fields as keywords (``fn(**args)``); it is an
        ``async def`` in the async runs, a plain function in the sync runs. ``options``
        are the guard options of this tool: ``agent_id=``, ``spend_usd=`` (a number) and
        ``run_call`` options such as ``read_only=True``, ``wait=0``, ``on_unknown="raise"``.
        """
        ...

    def call(self, name: str, raw_args: str, *, scope: str) -> Rendered:
        """Invoke the tool as the framework does when a model asks for it: ``raw_args``
        is the model's JSON text, exactly as it appears in the tool call; ``scope`` the
        conversation / thread id."""
        ...

    async def acall(self, name: str, raw_args: str, *, scope: str) -> Rendered:
        """:meth:`call` through the framework's async path."""
        ...


# -- the core's own answer ------------------------------------------------------------------
class Payment(BaseModel):
    """The arguments of most tools here: a coerced float, a default and a default_factory."""

    customer: str
    amount: float
    currency: str = "usd"
    tags: list[str] = Field(default_factory=list)


_CALL_KW = ("agent_id", "spend_usd", "run_id")


def call_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a tool's options into ``run_call`` keywords (agent, spend, run id) and the
    policy options that shape the key (``read_only``, ``wait``, ``on_unknown``...)."""
    kw = {k: v for k, v in options.items() if k in _CALL_KW}
    return kw, {k: v for k, v in options.items() if k not in _CALL_KW}


def validated(schema: type[BaseModel], raw_args: str) -> dict[str, Any] | Classification:
    """The arguments a tool receives for the model's text, or the answer refusing them.

    The model's JSON object, validated by the tool's schema: defaults filled in,
    ``default_factory`` run, values coerced; every field, by its name.
    """
    try:
        data = json.loads(raw_args) if raw_args.strip() else {}
    except ValueError as err:
        return invalid_json("?", err)
    if not isinstance(data, dict):
        return invalid_json("?")
    try:
        model = schema.model_validate(data)
    except ValidationError as err:
        return classify(err, tool="?")
    return {name: getattr(model, name) for name in type(model).model_fields}


def _named(c: Classification, tool: str) -> Classification:
    # validated() answers before it knows the tool's name; the texts name the tool.
    if c.tool == tool:
        return c
    if c.reason == "invalid_json":
        return invalid_json(tool, c.exception)
    assert c.exception is not None
    return classify(c.exception, tool=tool)


def reference(
    guard: Guard,
    name: str,
    schema: type[BaseModel],
    raw_args: str,
    *,
    scope: str,
    thunk: Callable[[], Any] | None = None,
    **options: Any,
) -> Classification:
    """What the core answers for this call on ``guard``, now: the expected classification.

    Run on the guard the driver uses, in the same state, after the driver's call: a
    refusal (blocked, pending, in progress, unknown outcome, invalid arguments) is asked
    again and answers the same. ``thunk`` runs only where the expected outcome runs the
    tool (a failing tool); by default reaching it is an error of the scenario.
    """

    def must_not_run() -> Any:
        raise AssertionError(f"the reference call of {name} was not supposed to run it")

    args = validated(schema, raw_args)
    if isinstance(args, Classification):
        return _named(args, name)
    kw, opts = call_options(options)
    return guard.run_call_classified(name, args, thunk or must_not_run, scope=scope, **kw, **opts)


def key_of(
    guard: Guard, name: str, schema: type[BaseModel], raw_args: str, *, scope: str, **options: Any
) -> tuple[str, str]:
    """(namespace, key) of this call: the same in every framework, by the contract."""
    args = validated(schema, raw_args)
    assert isinstance(args, dict)
    _, opts = call_options(options)
    with guard.workflow(scope):
        namespace = guard.current_namespace()
    return namespace, guard.key_for_call(name, args, scope=scope, **opts)


def model_text(c: Classification) -> str:
    """What the model reads for ``c`` (the rule in this module's docstring)."""
    if (c.code, c.reason) in (("executed", "ok"), ("replayed", "dedup")):
        return c.result if isinstance(c.result, str) else json.dumps(c.result, sort_keys=True)
    return c.text


_WAIT = re.compile(r"for \d+ seconds")


def same_text(text: str) -> str:
    # A cap's text says how long until its window resets, in seconds of the clock at the
    # call: two answers a second boundary apart differ only there.
    return _WAIT.sub("for N seconds", text)


class CoreDriver:
    """The core's answer with no framework in between: the reference every adapter
    renders (it proves the suite's own expectations against the core)."""

    name = "core"

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.tools: dict[str, tuple[Callable[..., Any], type[BaseModel], dict[str, Any]]] = {}

    def add_tool(
        self, name: str, fn: Callable[..., Any], schema: type[BaseModel], **options: Any
    ) -> None:
        self.tools[name] = (fn, schema, options)

    def call(self, name: str, raw_args: str, *, scope: str) -> Rendered:
        fn, schema, options = self.tools[name]
        args = validated(schema, raw_args)
        if isinstance(args, Classification):
            c = _named(args, name)
        else:
            kw, opts = call_options(options)
            bound = args
            c = self.guard.run_call_classified(
                name, bound, lambda: fn(**bound), scope=scope, **kw, **opts
            )
        return Rendered(c.code, model_text(c), c)

    async def acall(self, name: str, raw_args: str, *, scope: str) -> Rendered:
        fn, schema, options = self.tools[name]
        args = validated(schema, raw_args)
        if isinstance(args, Classification):
            c = _named(args, name)
        else:
            kw, opts = call_options(options)
            bound = args
            c = await self.guard.arun_call_classified(
                name, bound, lambda: fn(**bound), scope=scope, **kw, **opts
            )
        return Rendered(c.code, model_text(c), c)


# -- fixtures -------------------------------------------------------------------------------
class Flaky:
    """A ledger whose ``finish`` can be made to fail: ``fail_finish`` writes in a row raise
    StoreError (the ledger dropped the connection after the tool ran)."""

    fail_finish = 0

    def finish(self, *args: Any, **kwargs: Any) -> bool:
        if self.fail_finish > 0:
            self.fail_finish -= 1
            raise StoreError("the ledger closed the connection")
        return super().finish(*args, **kwargs)  # type: ignore[misc,no-any-return]


class FlakyStore(Flaky, MemoryStore):
    """The memory ledger, flaky on demand."""


def flaky_remote(root: str, api_key: str) -> Any:
    """Remote mode's ledger (a live ``onceonly serve``), flaky on demand."""
    from onceonly_core.stores.remote import RemoteStore  # httpx: the server extra

    class FlakyRemoteStore(Flaky, RemoteStore):
        pass

    return FlakyRemoteStore(root, api_key=api_key)


@dataclass
class Harness:
    """One scenario's driver, guard, store, effects and mode (sync or async)."""

    driver: Driver
    guard: Guard
    store: Any  # FlakyStore, or remote mode's flaky RemoteStore
    mode: str
    effects: list[dict[str, Any]] = field(default_factory=list)
    schemas: dict[str, type[BaseModel]] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def tool(
        self,
        name: str,
        *,
        schema: type[BaseModel] = Payment,
        body: Callable[[dict[str, Any]], str] | None = None,
        **options: Any,
    ) -> None:
        """Register ``name``: each run appends its arguments to ``effects`` and returns
        ``body(args)`` (default: a receipt naming the amount and currency)."""
        make = body or receipt
        effects = self.effects
        fn: Callable[..., Any]
        if self.mode == "sync":

            def fn(**args: Any) -> str:
                out = make(args)
                effects.append(args)
                return out

        else:

            async def fn(**args: Any) -> str:
                await asyncio.sleep(0)  # a real await: the async path, not a sync call
                out = make(args)
                effects.append(args)
                return out

        fn.__name__ = name
        self.driver.add_tool(name, fn, schema, **options)
        self.schemas[name] = schema
        self.options[name] = options

    def call(self, name: str, raw_args: str, *, scope: str = "thread-1") -> Rendered:
        if self.mode == "sync":
            return self.driver.call(name, raw_args, scope=scope)
        return asyncio.run(self.driver.acall(name, raw_args, scope=scope))

    def expect(
        self,
        name: str,
        raw_args: str,
        *,
        scope: str = "thread-1",
        thunk: Callable[[], Any] | None = None,
    ) -> Classification:
        return reference(
            self.guard,
            name,
            self.schemas[name],
            raw_args,
            scope=scope,
            thunk=thunk,
            **self.options[name],
        )

    def key(self, name: str, raw_args: str, *, scope: str = "thread-1") -> tuple[str, str]:
        return key_of(
            self.guard, name, self.schemas[name], raw_args, scope=scope, **self.options[name]
        )


def receipt(args: Mapping[str, Any]) -> str:
    return f"paid {args['amount']} {args['currency']} for {args['customer']}"


def assert_answer(got: Rendered, want: Classification) -> None:
    """The adapter's answer is the core's: the same code, the same model text."""
    assert got.code == want.code, (got, want)
    assert same_text(got.text) == same_text(model_text(want)), (got.text, want.text)


# -- the scenarios --------------------------------------------------------------------------
class ContractSuite:
    """The scenarios. Subclass with ``driver_factory`` set to your driver class."""

    driver_factory: ClassVar[Callable[[Guard], Driver]]

    @pytest.fixture(params=["sync", "async"])
    def mode(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    # Embedded (the memory ledger) and remote mode (a live `onceonly serve` on PostgreSQL,
    # a fresh tenant per test): the same scenarios, the same answers.
    @pytest.fixture(
        params=["embedded", pytest.param("remote", marks=[pytest.mark.pg, pytest.mark.services])]
    )
    def ledger(self, request: pytest.FixtureRequest) -> Any:
        if request.param == "embedded":
            return FlakyStore()
        remote = request.getfixturevalue("remote")
        return flaky_remote(remote.root, remote.key)

    @pytest.fixture
    def h(self, mode: str, ledger: Any) -> Iterator[Harness]:
        store = ledger
        guard = Guard(store=store, quiet=True)
        driver = type(self).driver_factory(guard)
        yield Harness(driver, guard, store, mode)
        guard.close()

    # 1. coerced-equal arguments are one call
    def test_coerced_equal_arguments_are_one_call(self, h: Harness) -> None:
        h.tool("pay")
        first = h.call("pay", '{"customer": "c1", "amount": 1.5}')
        again = h.call("pay", '{"customer": "c1", "amount": "1.5"}')
        assert (first.code, again.code) == ("executed", "replayed")
        assert first.text == again.text == "paid 1.5 usd for c1"  # the result, no wording
        assert len(h.effects) == 1
        assert_answer(again, h.expect("pay", '{"customer": "c1", "amount": 1.5}'))

    def test_defaults_omitted_or_given_are_one_call(self, h: Harness) -> None:
        h.tool("pay")
        first = h.call("pay", '{"customer": "c2", "amount": 3}')
        explicit = '{"customer": "c2", "amount": 3.0, "currency": "usd", "tags": []}'
        again = h.call("pay", explicit)
        assert (first.code, again.code) == ("executed", "replayed")
        assert h.effects == [{"customer": "c2", "amount": 3.0, "currency": "usd", "tags": []}]
        assert_answer(again, h.expect("pay", explicit))

    # 2. NaN / Infinity, malformed JSON
    @pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
    def test_nan_and_infinity_are_invalid_arguments(self, h: Harness, bad: str) -> None:
        h.tool("pay")
        raw = f'{{"customer": "c1", "amount": {bad}}}'
        got = h.call("pay", raw)
        assert got.code == "invalid_arguments"
        want = h.expect("pay", raw)
        assert (want.code, want.reason) == ("invalid_arguments", "invalid_value")
        assert_answer(got, want)
        assert h.effects == []

    @pytest.mark.parametrize(
        "raw", ['{"customer": "c1", "amount": ', "[1, 2]"], ids=["truncated", "not-an-object"]
    )
    def test_malformed_json_is_invalid_arguments(self, h: Harness, raw: str) -> None:
        h.tool("pay")
        got = h.call("pay", raw)
        want = h.expect("pay", raw)
        assert (want.code, want.reason) == ("invalid_arguments", "invalid_json")
        assert_answer(got, want)
        assert h.effects == []

    # 3. schema violation
    def test_schema_violation_is_invalid_arguments(self, h: Harness) -> None:
        h.tool("pay")
        raw = '{"customer": "c1"}'
        got = h.call("pay", raw)
        want = h.expect("pay", raw)
        assert (want.code, want.reason) == ("invalid_arguments", "validation")
        assert "amount" in want.text
        assert_answer(got, want)
        assert h.effects == []

    # 4. the tool raises
    def test_a_failing_tool_is_failed_and_runs_again(self, h: Harness) -> None:
        def declined(args: dict[str, Any]) -> str:
            raise ValueError(f"card of {args['customer']} declined")

        h.tool("pay", body=declined)
        raw = '{"customer": "c1", "amount": 2}'
        got = h.call("pay", raw)
        assert got.code == "failed"
        assert "ValueError: card of c1 declined" in got.text
        want = h.expect("pay", raw, thunk=lambda: declined({"customer": "c1"}))
        assert_answer(got, want)
        assert h.effects == []  # the body raised before its effect
        assert h.call("pay", raw).code == "failed"  # nothing was recorded as done: runs again

    # 5. blocked by policy, spend cap
    def test_a_blocked_tool_is_blocked(self, h: Harness) -> None:
        h.guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["refund"]))
        h.tool("refund", agent_id="bot")
        raw = '{"customer": "c1", "amount": 2}'
        got = h.call("refund", raw)
        want = h.expect("refund", raw)
        assert (want.code, want.reason) == ("blocked", "tool_blocked")
        assert_answer(got, want)
        assert h.effects == []

    def test_a_spend_cap_blocks(self, h: Harness) -> None:
        h.guard.gov.upsert_policy(Policy(agent_id="bot", max_spend_usd_per_day=1.0))
        h.tool("pay", agent_id="bot", spend_usd=5.0)
        raw = '{"customer": "c1", "amount": 5}'
        got = h.call("pay", raw)
        want = h.expect("pay", raw)
        assert (want.code, want.reason) == ("blocked", "daily_spend_exceeded")
        assert_answer(got, want)
        assert h.effects == []

    # 6. approval required
    def test_approval_then_the_same_call_runs_once(self, h: Harness) -> None:
        h.guard.gov.upsert_policy(Policy(agent_id="bot", require_approval=["pay"]))
        h.tool("pay", agent_id="bot")
        raw = '{"customer": "c1", "amount": 7}'
        got = h.call("pay", raw)
        want = h.expect("pay", raw)
        assert want.code == "pending_approval" and want.approval_id
        assert_answer(got, want)
        assert want.approval_id in got.text
        assert h.effects == []
        h.guard.gov.approve(want.approval_id, by="ops")
        assert h.call("pay", raw).code == "executed"
        assert h.call("pay", '{"customer": "c1", "amount": "7"}').code == "replayed"
        assert len(h.effects) == 1

    # 7. the tool ran, its completion was not recorded
    def test_an_unrecorded_completion_is_executed(
        self, h: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The core retries a failed finish (protocol.FINISH_RETRIES): fail every attempt of
        # this one call, with short pauses, so it ends in CompletionNotRecorded.
        monkeypatch.setattr(onceonly_core.protocol, "FINISH_RETRIES", (0.01,))
        h.tool("pay")
        h.store.fail_finish = 2
        got = h.call("pay", '{"customer": "c1", "amount": 4}')
        assert len(h.effects) == 1
        want = classify(CompletionNotRecorded("lost", result="paid 4.0 usd for c1"), tool="pay")
        assert (want.code, want.reason, want.ran) == ("executed", "completion_not_recorded", True)
        assert_answer(got, want)
        assert "do not call it again" in got.text

    # 8. unknown outcome
    def test_an_expired_earlier_claim_is_an_unknown_outcome(self, h: Harness) -> None:
        h.tool("pay", on_unknown="raise")
        raw = '{"customer": "c1", "amount": 6}'
        namespace, key = h.key("pay", raw)
        # Another worker claimed this very call and died: its lease runs out unrecorded.
        h.store.claim(namespace, key, NewClaim("pay", "worker-that-died", 0.01))
        time.sleep(0.05)
        got = h.call("pay", raw)
        want = h.expect("pay", raw)
        assert want.code == "unknown_outcome"
        assert_answer(got, want)
        assert h.effects == []

    # 9. in progress elsewhere
    def test_a_live_claim_elsewhere_is_in_progress(self, h: Harness) -> None:
        h.tool("pay", wait=0)
        raw = '{"customer": "c1", "amount": 8}'
        namespace, key = h.key("pay", raw)
        h.store.claim(namespace, key, NewClaim("pay", "another-worker", 60))
        got = h.call("pay", raw)
        want = h.expect("pay", raw)
        assert want.code == "in_progress"
        assert_answer(got, want)
        assert h.effects == []

    # 10. read tools
    def test_a_read_only_tool_runs_every_time(self, h: Harness) -> None:
        h.tool("quote", read_only=True)
        raw = '{"customer": "c1", "amount": 1}'
        assert [h.call("quote", raw).code for _ in range(2)] == ["executed", "executed"]
        assert len(h.effects) == 2

    # 11. interruptions pass through
    def test_an_interrupt_is_raised_not_answered(self, h: Harness) -> None:
        stop = [True]

        def body(args: dict[str, Any]) -> str:
            if stop[0]:
                raise KeyboardInterrupt
            return receipt(args)

        h.tool("pay", body=body, wait=0)
        raw = '{"customer": "c1", "amount": 9}'
        with pytest.raises(KeyboardInterrupt):
            h.call("pay", raw)
        stop[0] = False
        # The key was given back: the resumed call runs at once (wait=0: no lease to wait out).
        assert h.call("pay", raw).code == "executed"
        assert len(h.effects) == 1

    def test_a_cancelled_async_call_raises_cancelled_error(self, h: Harness) -> None:
        started, release = asyncio.Event(), asyncio.Event()
        effects = h.effects

        async def slow(**args: Any) -> str:
            started.set()
            await release.wait()
            effects.append(args)
            return receipt(args)

        h.driver.add_tool("pay", slow, Payment, wait=0)
        raw = '{"customer": "c1", "amount": 10}'

        async def scenario() -> Rendered:
            task = asyncio.ensure_future(h.driver.acall("pay", raw, scope="thread-1"))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert effects == []
            started.clear()
            release.set()
            return await h.driver.acall("pay", raw, scope="thread-1")

        assert asyncio.run(scenario()).code == "executed"  # the key was given back
        assert len(effects) == 1

    # 12. concurrent calls of the same arguments in one scope
    def test_concurrent_calls_run_once(self, h: Harness) -> None:
        def slow(args: dict[str, Any]) -> str:
            time.sleep(0.05)  # every caller arrives while the first one runs
            return receipt(args)

        h.tool("pay", body=slow)
        raw = '{"customer": "c1", "amount": 11}'
        if h.mode == "sync":
            barrier = threading.Barrier(8)
            codes: list[str] = []

            def worker() -> None:
                barrier.wait()
                codes.append(h.driver.call("pay", raw, scope="thread-1").code)

            threads = [threading.Thread(target=worker) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        else:

            async def all_at_once() -> list[str]:
                answers = await asyncio.gather(
                    *(h.driver.acall("pay", raw, scope="thread-1") for _ in range(8))
                )
                return [a.code for a in answers]

            codes = asyncio.run(all_at_once())
        assert len(codes) == 8
        assert set(codes) <= {"executed", "replayed", "in_progress"}, codes
        assert codes.count("executed") == 1
        assert len(h.effects) == 1

    # 13. scopes
    def test_the_same_call_in_two_scopes_runs_twice(self, h: Harness) -> None:
        h.tool("pay")
        raw = '{"customer": "c1", "amount": 12}'
        assert h.call("pay", raw, scope="thread-1").code == "executed"
        assert h.call("pay", raw, scope="thread-2").code == "executed"
        assert h.call("pay", raw, scope="thread-2").code == "replayed"
        assert len(h.effects) == 2
