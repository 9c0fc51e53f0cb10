"""The adapter contract (issue 14): every outcome of a guarded call, classified once.

Each code is produced by a real call through ``Guard.run_call_classified`` /
``arun_call_classified`` on every ledger (memory, SQLite, PostgreSQL, MariaDB), and checked
for its fields, its model text and whether the tool ran.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from _docblocks import ROOT, blocks, run_block
from onceonly_core import (
    CompletionNotRecorded,
    FingerprintError,
    Guard,
    InProgress,
    StoreError,
    classify,
    errors,
)
from onceonly_core.contract import (
    CODES,
    Classification,
    invalid_arguments,
    is_interrupt,
    preview,
    register_interrupt,
    unknown_tool,
)
from onceonly_core.fingerprint import derive_key
from onceonly_core.governance.models import Policy
from onceonly_core.stores import NewClaim

SEEN: set[str] = set()  # codes produced by the tests of this module (checked last)


def guard_for(url: str, namespace: str, **options: Any) -> Guard:
    extra: dict[str, Any] = {}
    if url.startswith("sqlite"):
        url += "?synchronous=normal"
    elif not url.startswith("memory"):
        extra["store_options"] = {"auto_migrate": True}
    return Guard(url, namespace=namespace, quiet=True, **extra, **options)


@pytest.fixture
def g(any_url: str, namespace: str) -> Iterator[Guard]:
    guard = guard_for(any_url, namespace)
    yield guard
    guard.close()


class Tool:
    """A tool that counts its runs; ``fail`` makes it raise."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.runs = 0
        self.fail = fail

    def __call__(self) -> dict[str, Any]:
        self.runs += 1
        if self.fail is not None:
            raise self.fail
        return {"charged": self.runs}


def run(g: Guard, tool: Tool, *, name: str = "charge", **kw: Any) -> Classification:
    kw.setdefault("scope", "conv-1")
    args = kw.pop("args", {"amount": 5})
    c = g.run_call_classified(name, args, tool, **kw)
    SEEN.add(c.code)
    assert isinstance(c, Classification) and c.code in CODES
    assert c.text and "\n" not in c.text and c.tool == name
    return c


# -- executed / replayed --------------------------------------------------------------------
def test_executed_then_replayed(g: Guard) -> None:
    tool = Tool()
    done = run(g, tool)
    assert (done.code, done.ran, done.ok, done.result) == ("executed", True, True, {"charged": 1})
    assert done.decision == "executed" and done.key and done.namespace
    assert done.text == 'Done: charge ran; its result: {"charged": 1}'
    again = run(g, tool)
    assert (again.code, again.ran, again.result, again.key) == (
        "replayed",
        False,
        {"charged": 1},
        done.key,
    )
    assert again.text.startswith("Already done: charge ran earlier with these arguments")
    assert "do not call it again" in again.text and again.text.endswith('{"charged": 1}')
    assert tool.runs == 1
    assert again.as_dict()["result_preview"] == '{"charged": 1}'
    with pytest.raises(dataclasses.FrozenInstanceError):
        again.code = "executed"  # type: ignore[misc]


def test_a_duplicate_without_replay_is_blocked_as_dedup(g: Guard) -> None:
    tool = Tool()
    run(g, tool, replay=False)
    dup = run(g, tool, replay=False)
    assert (dup.code, dup.reason, dup.ran, dup.result) == ("blocked", "dedup", False, None)
    assert dup.text.startswith("Already done:") and "do not call it again" in dup.text
    assert tool.runs == 1


# -- governance -----------------------------------------------------------------------------
def test_blocked_by_policy_and_by_the_kill_switch(g: Guard) -> None:
    g.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["delete_*"]))
    tool = Tool()
    no = run(g, tool, name="delete_user", agent_id="bot")
    assert (no.code, no.reason, no.decision) == ("blocked", "tool_blocked", "blocked")
    assert no.ran is False
    assert no.agent_id == "bot" and no.retry_after is None
    assert no.text.startswith("Not allowed: delete_user was blocked by policy (tool_blocked)")
    assert "do not retry this call" in no.text
    g.gov.disable_agent("bot", "runaway loop")
    off = run(g, tool, agent_id="bot")
    assert (off.code, off.reason) == ("blocked", "agent_disabled")
    assert off.text == (
        "Not allowed: this agent is disabled: runaway loop; stop calling tools and tell the user."
    )
    assert tool.runs == 0
    # The same decision raised by the facade (guard(fn) with an agent) classifies alike.
    with g.agent("bot"), pytest.raises(Exception) as raised:
        g(lambda: 1)
    c = classify(raised.value, tool="x")
    assert (c.code, c.reason, c.agent_id) == ("blocked", "agent_disabled", "bot")


def test_caps_tell_when_to_retry(g: Guard) -> None:
    g.gov.upsert_policy(Policy(agent_id="spender", max_spend_usd_per_day=1.0))
    tool = Tool()
    assert run(g, tool, agent_id="spender", spend_usd=0.75).code == "executed"
    over = run(g, tool, agent_id="spender", spend_usd=0.5, args={"amount": 6})
    assert (over.code, over.reason) == ("blocked", "daily_spend_exceeded")
    assert over.retry_after is not None and 0 < over.retry_after <= 86_400
    assert over.text.startswith("Not allowed now: charge is over a limit (daily_spend_exceeded)")
    assert f"for {int(over.retry_after)} seconds" in over.text
    g.gov.upsert_policy(Policy(agent_id="busy", max_actions_per_hour=1))
    assert run(g, tool, agent_id="busy", args={"amount": 7}).code == "executed"
    hot = run(g, tool, agent_id="busy", args={"amount": 8})
    assert (hot.code, hot.reason) == ("blocked", "max_actions_per_hour_exceeded")
    assert hot.retry_after is not None and 0 < hot.retry_after <= 3_600
    # Pure: the wait is the time to the next fixed UTC window.
    at = classify(Exception(), tool="t")  # (a non-OnceOnly exception raised by the path)
    assert at.code == "guard_error"
    res_now = 3_600 * 1000 + 600.0
    from onceonly_core.governance.models import ToolResult

    capped = ToolResult(
        ok=False,
        allowed=False,
        decision="blocked",
        policy_reason="max_actions_per_hour_exceeded",
        tool="t",
    )
    assert classify(capped, now=res_now).retry_after == 3_000.0
    assert tool.runs == 2


def test_pending_approval(g: Guard) -> None:
    g.gov.upsert_policy(Policy(agent_id="support", require_approval=["refund"]))
    tool = Tool()
    wait = run(g, tool, name="refund", agent_id="support")
    assert (wait.code, wait.ran, wait.reason) == ("pending_approval", False, "approval_required")
    assert wait.approval_id and wait.approval_id in wait.text
    assert wait.text.startswith(f"Waiting for human approval {wait.approval_id}: refund has")
    assert "do not retry it until a person approves it" in wait.text
    g.gov.approve(wait.approval_id, by="ops")
    ok = run(g, tool, name="refund", agent_id="support")
    assert (ok.code, ok.approval_id, tool.runs) == ("executed", wait.approval_id, 1)


# -- the ledger's states ----------------------------------------------------------------------
def test_in_progress(g: Guard) -> None:
    tool = Tool()
    # The documented derivation: scope (the workflow), tool name, canonical arguments.
    key = derive_key("charge", {"amount": 5}, workflow="conv-1")
    # Another worker holds a live claim on the same call.
    ns = f"{g.namespace}/conv-1"
    g.store.claim(ns, key, NewClaim("charge", "other-worker", 30.0))
    busy = run(g, tool, wait=0)
    assert (busy.code, busy.ran, busy.key, busy.namespace) == ("in_progress", False, key, ns)
    assert busy.text.startswith("Already running: the same charge call is in progress")
    assert tool.runs == 0


def test_unknown_outcome(g: Guard) -> None:
    tool = Tool()
    key = derive_key("charge", {"amount": 5}, workflow="conv-1")
    ns = f"{g.namespace}/conv-1"
    g.store.claim(ns, key, NewClaim("charge", "crashed-worker", 0.05))
    time.sleep(0.3)  # its lease expires: it stopped before recording an outcome
    lost = run(g, tool, on_unknown="raise")
    assert (lost.code, lost.ran, lost.key) == ("unknown_outcome", None, key)
    assert "may or may not have run; do not call it again; ask the user" in lost.text
    assert tool.runs == 0


# -- failures -------------------------------------------------------------------------------
def test_failed_releases_the_key_and_a_cached_failure_does_not_run_again(g: Guard) -> None:
    tool = Tool(fail=ValueError("card declined"))
    bad = run(g, tool)
    assert (bad.code, bad.ran, bad.error_type, bad.error) == (
        "failed",
        True,
        "ValueError",
        "card declined",
    )
    assert bad.text.startswith("Failed: charge raised ValueError: card declined;")
    assert isinstance(bad.exception, ValueError)
    tool.fail = None
    assert run(g, tool).code == "executed" and tool.runs == 2  # a failure is not a result
    sticky = Tool(fail=ValueError("no such account"))
    run(g, sticky, name="open", cache_errors=True)
    cached = run(g, sticky, name="open", cache_errors=True)
    assert (cached.code, cached.reason, cached.ran) == ("failed", "cached_failure", False)
    assert cached.text.startswith("Failed earlier: open already failed with these arguments")
    assert sticky.runs == 1


def test_guard_error_when_the_ledger_is_down(
    g: Guard, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tool = Tool()

    def down(*a: Any, **k: Any) -> Any:
        raise StoreError("connection refused to db.internal:5432")

    monkeypatch.setattr(g.store, "claim", down)
    err = run(g, tool)
    assert (err.code, err.ran, err.reason, err.error_type) == (
        "guard_error",
        False,
        "store_error",
        "StoreError",
    )
    assert "db.internal" not in err.text  # infrastructure details are for the log
    assert "db.internal" in (err.error or "")
    assert err.text.startswith("Could not run charge: the guard had an internal error")
    assert any("db.internal" in r.getMessage() for r in caplog.records)
    bad_option = run(g, tool, retries=3)
    assert (bad_option.code, bad_option.reason) == ("guard_error", "config_error")
    assert tool.runs == 0


def test_an_unrecorded_completion_is_executed_never_a_guard_error(
    g: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = Tool()

    def lost(*a: Any, **k: Any) -> Any:
        raise StoreError("server closed the connection")

    monkeypatch.setattr("onceonly_core.protocol.FINISH_RETRIES", (0.01,))
    monkeypatch.setattr(g.store, "finish", lost)
    c = run(g, tool)
    assert (c.code, c.reason, c.ran, c.result) == (
        "executed",
        "completion_not_recorded",
        True,
        {"charged": 1},
    )
    assert isinstance(c.exception, CompletionNotRecorded)
    assert "do not call it again" in c.text and c.text.endswith('{"charged": 1}')


def test_a_lost_lease_is_executed(g: Guard, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = Tool()
    monkeypatch.setattr(g.store, "finish", lambda *a, **k: False)  # another owner took over
    c = run(g, tool)
    assert (c.code, c.reason, c.ran, c.result) == ("executed", "lease_lost", True, {"charged": 1})


# -- invalid arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_invalid_arguments(g: Guard, bad: float) -> None:
    tool = Tool()
    c = run(g, tool, args={"amount": bad})
    assert (c.code, c.reason, c.ran) == ("invalid_arguments", "invalid_value", False)
    assert isinstance(c.exception, FingerprintError)
    assert c.text.startswith("Invalid arguments: charge was not run because argument")
    assert c.text.endswith("correct the arguments and call it again.")
    assert tool.runs == 0


def test_a_reused_key_with_other_arguments_is_invalid(g: Guard) -> None:
    tool = Tool()
    assert run(g, tool, key="order-1").code == "executed"
    c = run(g, tool, key="order-1", args={"amount": 6})
    assert (c.code, c.reason, c.ran) == ("invalid_arguments", "key_reuse", False)
    assert c.text.startswith("Conflicting call: charge was not run")
    assert tool.runs == 1


def test_adapter_side_answers() -> None:
    class Args(BaseModel):
        amount: float

    with pytest.raises(ValidationError) as raised:
        Args.model_validate({"amount": "lots"})
    c = classify(raised.value, tool="charge")
    assert (c.code, c.reason) == ("invalid_arguments", "validation")
    assert "amount: Input should be a valid number" in c.text
    j = invalid_arguments("charge", "the arguments are not valid JSON", reason="invalid_json")
    assert (j.code, j.reason, j.ran) == ("invalid_arguments", "invalid_json", False)
    assert j.text == (
        "Invalid arguments: charge was not run because the arguments are not valid JSON; "
        "correct the arguments and call it again."
    )
    u = unknown_tool("chrage", ["refund", "charge"])
    assert (u.code, u.reason) == ("blocked", "tool_not_found")
    assert u.text == (
        "Not allowed: there is no tool named chrage: available tools: charge, refund; "
        "do not call it again."
    )
    SEEN.update({c.code, u.code})


# -- interruptions ----------------------------------------------------------------------------
class Pause(Exception):
    """A framework's interrupt: an Exception used as control flow."""


register_interrupt(Pause)


def test_an_interrupt_is_re_raised_and_the_call_can_resume(g: Guard) -> None:
    tool = Tool(fail=Pause("waiting for input"))
    with pytest.raises(Pause):
        g.run_call_classified("ask", {"q": 1}, tool, scope="conv-1")
    SEEN.add(classify(Pause(), tool="ask").code)
    tool.fail = None  # resumed: the same call runs again, from the start
    assert run(g, tool, name="ask", args={"q": 1}).code == "executed"
    assert tool.runs == 2


def test_langgraph_interrupts_are_recognised_without_registration() -> None:
    errors = pytest.importorskip("langgraph.errors")
    assert is_interrupt(errors.GraphInterrupt())
    assert classify(errors.GraphInterrupt(), tool="t").code == "interrupted"
    assert not is_interrupt(ValueError())


def test_cancellation_is_re_raised(g: Guard) -> None:
    started = asyncio.Event()

    async def slow() -> int:
        started.set()
        await asyncio.sleep(30)
        return 1

    async def main() -> None:
        task = asyncio.ensure_future(g.arun_call_classified("slow", {"n": 1}, slow, scope="conv-1"))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    c = classify(asyncio.CancelledError(), tool="slow")
    assert (c.code, c.ran) == ("interrupted", None)
    SEEN.add(c.code)


# -- async parity ---------------------------------------------------------------------------
def test_async_gives_the_same_classifications(g: Guard) -> None:
    async def charge(amount: int) -> dict[str, int]:
        if amount < 0:
            raise ValueError("negative")
        return {"charged": amount}

    async def main() -> list[tuple[str, str | None]]:
        out = []
        for amount in (5, 5, -1, math.nan):
            c = await g.arun_call_classified(
                "charge", {"amount": amount}, functools.partial(charge, amount), scope="a"
            )
            out.append((c.code, c.reason))
        busy_key = derive_key("charge", {"amount": 9}, workflow="a")
        g.store.claim(f"{g.namespace}/a", busy_key, NewClaim("charge", "w2", 30.0))
        c = await g.arun_call_classified(
            "charge", {"amount": 9}, functools.partial(charge, 9), scope="a", wait=0
        )
        out.append((c.code, c.reason))
        return out

    assert asyncio.run(main()) == [
        ("executed", "ok"),
        ("replayed", "dedup"),
        ("failed", "tool_error"),
        ("invalid_arguments", "invalid_value"),
        ("in_progress", "in_progress"),
    ]


# -- pure pieces ------------------------------------------------------------------------------
def test_classify_covers_exceptions_and_outcomes() -> None:
    assert classify(InProgress("ns", "k", "w")).code == "in_progress"
    assert classify(CompletionNotRecorded("x", result=3)).result == 3
    assert classify(KeyboardInterrupt()).code == "interrupted"
    assert classify(ValueError("x"), tool="t", from_tool=True).code == "failed"
    with pytest.raises(TypeError):
        classify(42)
    assert preview("x" * 600).endswith("…") and len(preview("x" * 600)) == 500
    assert preview({"b": 1, "a": [1.5]}) == '{"a": [1.5], "b": 1}'

    class Weird:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert preview(Weird()) == "<Weird>"


_EVERY_ERROR: list[tuple[BaseException, str, bool | None]] = [
    (errors.OnceOnlyError("x"), "guard_error", False),
    (errors.ConfigError("bad option"), "guard_error", False),
    (errors.MissingExtraError("the CLI", "cli", "typer"), "guard_error", False),
    (errors.FingerprintError("args['a']", "NaN is not a number"), "invalid_arguments", False),
    (errors.CodecError("no result stored"), "replayed", False),
    (errors.ResultNotStored("ns", "k", "t", "9 MB over max_result_bytes"), "replayed", False),
    (errors.KeyReuseError("ns", "k", "t"), "invalid_arguments", False),
    (errors.InProgress("ns", "k", "w"), "in_progress", False),
    (errors.UnknownOutcome("ns", "k", "w", 3), "unknown_outcome", None),
    (errors.LeaseLost("ns", "k", 3, result=1), "executed", True),
    (errors.CachedFailure("builtins.ValueError", "x"), "failed", False),
    (errors.PolicyBlocked("a", "t", "tool_blocked"), "blocked", False),
    (errors.ApprovalPending("a", "t", "ap-1"), "pending_approval", False),
    (errors.SignatureError("bad signature"), "guard_error", False),
    (errors.RemoteToolError("502 from the tool"), "failed", True),
    (errors.StoreError("down"), "guard_error", False),
    (errors.SchemaError("too old"), "guard_error", False),
    (errors.CompletionNotRecorded("x", result=1), "executed", True),
    (errors.WouldBlock(), "guard_error", False),
]


@pytest.mark.parametrize(
    ("err", "code", "ran"), _EVERY_ERROR, ids=[type(e).__name__ for e, _, _ in _EVERY_ERROR]
)
def test_every_error_class_maps_to_one_code(
    err: BaseException, code: str, ran: bool | None
) -> None:
    c = classify(err, tool="t")
    assert (c.code, c.ran, c.tool) == (code, ran, "t") and c.exception is err
    assert c.text and "\n" not in c.text


def test_the_error_table_covers_every_error_class() -> None:
    # A new error class must be given a code here (and in contract.py) before it ships.
    assert {type(e).__name__ for e, _, _ in _EVERY_ERROR} == set(errors.__all__)


def test_every_code_is_produced_by_this_module() -> None:
    # Runs last in this file (pytest keeps definition order): each code was seen above.
    if len(SEEN) < 3:
        pytest.skip("run with the rest of the module")
    assert set(CODES) <= SEEN, set(CODES) - SEEN


@pytest.mark.parametrize(
    ("name", "code"), blocks(ROOT / "docs" / "integrations" / "contract.md"), ids=lambda v: v
)
def test_the_contract_doc_runs(name: str, code: str, tmp_path: Path) -> None:
    run_block(name, code, tmp_path)
