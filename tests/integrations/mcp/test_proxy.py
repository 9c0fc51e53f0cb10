"""``onceonly mcp-proxy`` end to end: SDK client → proxy process → stdio MCP server.

Every test starts the proxy as a real subprocess (``python -m onceonly_core.cli
mcp-proxy``) in front of ``upstream_server.py``, talks to it with the SDK's
``ClientSession`` over stdio, and counts effects in the file the upstream appends to.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError

from _mcp_rig import UPSTREAM, Rig, child_env
from onceonly_core.governance.models import Policy

pytestmark = pytest.mark.timeout(120)


def run(fn: Any, *args: Any) -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(90):
            return await fn(*args)

    return anyio.run(bounded)


# -- listing ---------------------------------------------------------------------------------
def test_tools_are_listed_unchanged(rig: Rig) -> None:
    async def scenario() -> tuple[Any, Any]:
        direct = StdioServerParameters(
            command=sys.executable, args=[str(UPSTREAM), str(rig.effects)], env=child_env()
        )
        async with (
            stdio_client(direct) as (read, write),
            ClientSession(read, write) as upstream,
        ):
            await upstream.initialize()
            want = await upstream.list_tools()
        async with rig.session() as proxy:
            got = await proxy.list_tools()
        return want, got

    want, got = run(scenario)
    dump = [t.model_dump(by_alias=True, exclude_none=True) for t in want.tools]
    assert [t.model_dump(by_alias=True, exclude_none=True) for t in got.tools] == dump
    names = {t["name"] for t in dump}
    assert {"charge", "balance", "set_email", "slow_charge", "crash", "refuse"} <= names
    balance = next(t for t in got.tools if t.name == "balance")
    assert balance.annotations is not None and balance.annotations.read_only_hint is True


def test_resources_and_prompts_pass_through_unchanged(rig: Rig) -> None:
    async def scenario(session_of: Any) -> list[Any]:
        async with session_of() as s:
            await s.call_tool("charge", {"customer": "r", "cents": 1})
            return [
                (await s.list_resources()).resources,
                (await s.read_resource("effects://count")).contents,
                (await s.list_prompts()).prompts,
                (await s.get_prompt("refund_policy", {"customer": "r"})).messages,
            ]

    @contextlib.asynccontextmanager
    async def direct() -> Any:
        params = StdioServerParameters(
            command=sys.executable, args=[str(UPSTREAM), str(rig.effects)], env=child_env()
        )
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            yield s

    proxied = run(scenario, rig.session)
    assert [r.model_dump() for r in proxied[0]] == [
        r.model_dump() for r in run(scenario, direct)[0]
    ]
    assert proxied[1][0].text == "1"  # read after one charge through the proxy
    assert [p.name for p in proxied[2]] == ["refund_policy"]
    assert "Refund r only after checking" in proxied[3][0].content.text
    assert len(rig.lines("charge")) == 2  # the direct session charged again: no guard there


# -- exactly once ----------------------------------------------------------------------------
def test_duplicate_calls_run_once_and_replay_the_same_result(rig: Rig) -> None:
    async def scenario() -> list[Any]:
        async with rig.session("--scope", "order-7") as s:
            return [
                await s.call_tool("charge", {"customer": "c1", "cents": 500}),
                # Same call, arguments in another order, a default passed explicitly:
                # the same canonical arguments.
                await s.call_tool("charge", {"cents": 500, "customer": "c1", "note": ""}),
                await s.call_tool("charge", {"customer": "c1", "cents": 501}),
                await s.call_tool("set_email", {"customer": "c1", "email": "a@x"}),
                await s.call_tool("set_email", {"customer": "c1", "email": "a@x"}),
            ]

    first, again, other, email, email_again = run(scenario)
    assert [rig.outcome(r) for r in (first, again, other, email, email_again)] == [
        "executed",
        "replayed",
        "executed",
        "executed",
        "replayed",
    ]
    assert again.content == first.content and not again.is_error
    assert rig.text(first) == "charged c1 500 cents"
    # A structured result is replayed with its structure.
    assert (
        email_again.structured_content
        == email.structured_content
        == {
            "customer": "c1",
            "email": "a@x",
        }
    )
    charges = rig.lines("charge")
    assert [e["args"]["cents"] for e in charges] == [500, 501]
    # The upstream received the call's idempotency key in _meta (scope in the namespace).
    assert charges[0]["key"] == f"default/order-7:{first.meta['onceonly/key']}"


def test_every_sql_ledger(db_rig: Rig) -> None:
    """Duplicates, a governed refusal and an upstream crash on SQLite, PostgreSQL and
    MariaDB: the proxy is the same call path over every store."""
    rig = db_rig
    rig.guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["refuse"]))

    async def scenario() -> list[Any]:
        async with rig.session("--agent", "bot") as s:
            return [
                await s.call_tool("charge", {"customer": "db", "cents": 3}),
                await s.call_tool("charge", {"customer": "db", "cents": 3}),
                await s.call_tool("refuse", {"reason": "x"}),
                await s.call_tool("crash", {"tag": "db"}),
                await s.call_tool("crash", {"tag": "db"}),
            ]

    results = run(scenario)
    outcomes = [rig.outcome(r) for r in results]
    assert outcomes[0] == "executed", rig.text(results[0])
    assert outcomes == ["executed", "replayed", "blocked", "interrupted", "unknown_outcome"]
    assert len(rig.lines("charge")) == 1 and rig.lines("refuse") == []
    decisions = [(r.tool, r.decision) for r in reversed(rig.guard.gov.agent_logs("bot"))]
    assert decisions[:3] == [("charge", "executed"), ("charge", "dedup"), ("refuse", "blocked")]


def test_a_new_proxy_replays_what_an_earlier_one_ran(rig: Rig) -> None:
    async def call() -> Any:
        async with rig.session() as s:
            return await s.call_tool("charge", {"customer": "c2", "cents": 1})

    assert rig.outcome(run(call)) == "executed"
    assert rig.outcome(run(call)) == "replayed"
    assert len(rig.lines("charge")) == 1


def test_two_proxies_racing_the_same_call_run_it_once(rig: Rig) -> None:
    """Two agents' proxies on one ledger send the same call at once: one runs it, the
    other waits on the claim and replays the result."""
    hold = rig.effects.with_suffix(".hold")
    hold.touch()
    slow = {"customer": "race"}
    results: list[Any] = []

    async def one_proxy(started: anyio.Event | None) -> None:
        async with rig.session() as s:
            if started is not None:
                started.set()
            results.append(await s.call_tool("slow_charge", slow))

    async def race() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(one_proxy, None)
            await anyio.to_thread.run_sync(_wait_for, rig, "slow_charge", "start")
            second = anyio.Event()
            tg.start_soon(one_proxy, second)
            await second.wait()
            await anyio.sleep(1.0)  # the second call is waiting on the first one's claim
            hold.unlink()

    run(race)
    assert sorted(rig.outcome(r) for r in results) == ["executed", "replayed"]
    assert results[0].content == results[1].content
    assert len(rig.lines("slow_charge", phase="start")) == 1
    assert len(rig.lines("slow_charge")) == 1


def test_scopes_keep_equal_calls_apart(rig: Rig) -> None:
    async def call(scope: str) -> Any:
        async with rig.session("--scope", scope) as s:
            return await s.call_tool("charge", {"customer": "c", "cents": 1})

    assert [rig.outcome(run(call, s)) for s in ("a", "b", "a")] == [
        "executed",
        "executed",
        "replayed",
    ]
    assert len(rig.lines("charge")) == 2


def test_read_only_tools_run_every_time(rig: Rig) -> None:
    async def scenario(*options: str) -> list[str]:
        async with rig.session("--agent", "bot", *options) as s:
            return [rig.outcome(await s.call_tool("balance", {"customer": "c"})) for _ in range(3)]

    assert run(scenario) == ["executed"] * 3
    assert len(rig.lines("balance")) == 3
    # Still governed and audited: one audit row per run.
    rows = [r for r in rig.guard.gov.agent_logs("bot") if r.tool == "balance"]
    assert [r.decision for r in rows] == ["executed"] * 3
    # --ignore-hints: the operator does not trust the hint; a duplicate is replayed.
    assert run(scenario, "--ignore-hints") == ["executed", "replayed", "replayed"]
    assert len(rig.lines("balance")) == 4


def test_a_tool_error_is_passed_through_and_not_cached(rig: Rig) -> None:
    async def scenario() -> list[Any]:
        async with rig.session() as s:
            return [await s.call_tool("refuse", {"reason": "card declined"}) for _ in range(2)]

    results = run(scenario)
    assert all(r.is_error and rig.outcome(r) == "failed" for r in results)
    # What the upstream said, unchanged (the SDK hides the exception's text by default).
    assert rig.text(results[0]) == "Error executing tool refuse"
    assert len(rig.lines("refuse")) == 2


def test_unknown_tool_and_non_object_arguments(rig: Rig) -> None:
    async def scenario() -> Any:
        async with rig.session() as s:
            return await s.call_tool("nope", {})

    res = run(scenario)
    assert res.is_error and rig.outcome(res) == "unknown_tool"
    assert "Available tools:" in rig.text(res) and "charge" in rig.text(res)


# -- governance ------------------------------------------------------------------------------
def test_a_blocked_tool_is_a_tool_error_with_the_reason(rig: Rig) -> None:
    rig.guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["charge"]))

    async def scenario() -> Any:
        async with rig.session("--agent", "bot") as s:
            args = {"customer": "c", "cents": 5, "card_token": "tok_visa_4242"}
            return await s.call_tool("charge", args)

    res = run(scenario)
    assert res.is_error and rig.outcome(res) == "blocked"
    assert res.meta["onceonly/reason"] == "tool_blocked"
    assert "blocked by policy (tool_blocked); do not retry this call" in rig.text(res)
    assert "do not retry this call" in rig.text(res)
    assert rig.lines("charge") == []
    [row] = rig.guard.gov.agent_logs("bot")
    assert (row.tool, row.decision, row.reason) == ("charge", "blocked", "tool_blocked")
    # The audited arguments (schema defaults filled in), the secret redacted.
    audited = row.args if isinstance(row.args, dict) else json.loads(row.args)
    assert audited["customer"] == "c"
    assert "tok_visa_4242" not in json.dumps(audited)


def test_the_kill_switch_stops_every_tool(rig: Rig) -> None:
    rig.guard.gov.disable_agent("bot", "runaway")

    async def scenario() -> Any:
        async with rig.session("--agent", "bot") as s:
            return await s.call_tool("balance", {"customer": "c"})

    res = run(scenario)
    assert res.is_error and res.meta["onceonly/reason"] == "agent_disabled"
    assert "runaway" in rig.text(res)
    assert rig.lines() == []


def test_a_pending_approval_runs_once_after_it_is_approved(rig: Rig) -> None:
    gov = rig.guard.gov
    gov.upsert_policy(Policy(agent_id="bot", require_approval=["charge"]))
    args = {"customer": "c", "cents": 900}

    async def call() -> Any:
        async with rig.session("--agent", "bot") as s:
            return await s.call_tool("charge", args)

    pending = run(call)
    assert pending.is_error and rig.outcome(pending) == "pending_approval"
    approval_id = pending.meta["onceonly/approval_id"]
    assert "Waiting for human approval" in rig.text(pending) and approval_id in rig.text(pending)
    assert rig.lines("charge") == []

    gov.approve(approval_id, by="ops")
    assert rig.outcome(run(call)) == "executed"
    assert rig.outcome(run(call)) == "replayed"
    assert len(rig.lines("charge")) == 1
    decisions = [r.decision for r in reversed(gov.agent_logs("bot"))]
    assert decisions == ["pending_approval", "executed", "dedup"]
    assert gov.verify_audit() == []


def test_approving_through_the_cli(rig: Rig) -> None:
    """The operator approves with ``onceonly approvals approve`` on the same ledger."""
    import subprocess

    rig.guard.gov.upsert_policy(Policy(agent_id="bot", require_approval=["charge"]))

    async def call() -> Any:
        async with rig.session("--agent", "bot") as s:
            return await s.call_tool("charge", {"customer": "cli", "cents": 1})

    approval_id = run(call).meta["onceonly/approval_id"]
    approve = ["approvals", "approve", approval_id, "--url", rig.url]
    subprocess.run(
        [sys.executable, "-m", "onceonly_core.cli", *approve],
        env=child_env(),
        check=True,
        capture_output=True,
    )
    assert rig.outcome(run(call)) == "executed"
    assert len(rig.lines("charge")) == 1


def test_caps_and_spend_count_proxied_calls(rig: Rig) -> None:
    rig.guard.gov.upsert_policy(
        Policy(agent_id="bot", max_calls_per_tool={"charge": 2}, pricing_rules={"charge": 0.25})
    )

    async def scenario() -> list[Any]:
        async with rig.session("--agent", "bot") as s:
            return [
                await s.call_tool("charge", {"customer": f"c{i}", "cents": 1}) for i in range(3)
            ]

    results = run(scenario)
    assert [rig.outcome(r) for r in results] == ["executed", "executed", "blocked"]
    assert results[2].meta["onceonly/reason"] == "max_calls_per_tool_exceeded"
    assert "is over a limit (max_calls_per_tool_exceeded); do not retry" in rig.text(results[2])
    assert len(rig.lines("charge")) == 2
    metrics = rig.guard.gov.agent_metrics("bot", period="day")
    assert metrics.spend_usd == pytest.approx(0.5)


# -- crashes ---------------------------------------------------------------------------------
def test_an_upstream_that_dies_mid_call_leaves_an_unknown_outcome(rig: Rig) -> None:
    async def scenario() -> list[Any]:
        async with rig.session("--agent", "bot") as s:
            return [
                await s.call_tool("crash", {"tag": "t"}),
                # The same call again: its outcome is unknown (--on-unknown raise).
                await s.call_tool("crash", {"tag": "t"}),
                # Other calls run on a restarted upstream.
                await s.call_tool("charge", {"customer": "c", "cents": 1}),
            ]

    cut, again, after = run(scenario)
    assert cut.is_error and rig.outcome(cut) == "interrupted"
    assert "may or may not have run" in rig.text(cut)
    assert "do not call it again" in rig.text(cut)
    assert again.is_error and rig.outcome(again) == "unknown_outcome"
    assert "ask the user to check" in rig.text(again)
    assert rig.outcome(after) == "executed"
    [started] = rig.lines("crash", phase="start")
    [charged] = rig.lines("charge")
    assert charged["pid"] != started["pid"]  # a new upstream process
    assert charged["ppid"] == started["ppid"]  # the same proxy


def test_an_upstream_that_died_between_calls_is_restarted_before_the_next(rig: Rig) -> None:
    """Nothing was in flight: the next call runs on a new server, it is not "interrupted"."""

    async def scenario() -> list[Any]:
        async with rig.session() as s:
            first = await s.call_tool("charge", {"customer": "a", "cents": 1})
            os.kill(rig.lines("charge")[0]["pid"], signal.SIGKILL)
            await anyio.sleep(1.0)  # the proxy sees the server's stdout end
            return [first, await s.call_tool("charge", {"customer": "b", "cents": 1})]

    results = run(scenario)
    assert [rig.outcome(r) for r in results] == ["executed", "executed"]
    first, second = rig.lines("charge")
    assert first["pid"] != second["pid"] and first["ppid"] == second["ppid"]


def test_an_idempotent_tool_runs_again_after_the_upstream_died(rig: Rig) -> None:
    rig.effects.with_suffix(".crash").write_text("b@x")  # the first run dies mid-call
    args = {"customer": "c", "email": "b@x"}

    async def scenario() -> list[Any]:
        async with rig.session() as s:
            return [await s.call_tool("set_email", args) for _ in range(3)]

    cut, rerun, replay = run(scenario)
    assert rig.outcome(cut) == "interrupted"
    assert "may or may not have run" in rig.text(cut)
    assert [rig.outcome(rerun), rig.outcome(replay)] == ["executed", "replayed"]
    starts = rig.lines("set_email", phase="start")
    assert len(starts) == 2 and len(rig.lines("set_email")) == 1
    # Both attempts carried the same idempotency key downstream.
    assert starts[0]["key"] == starts[1]["key"] is not None


def _wait_for(rig: Rig, tool: str, phase: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = rig.lines(tool, phase=phase)
        if lines:
            return lines[-1]
        time.sleep(0.05)
    raise AssertionError(f"{tool} never reached {phase}")


def test_a_proxy_killed_mid_call_and_restarted(rig: Rig) -> None:
    """SIGKILL the proxy while a call runs: a completed call is replayed by the next proxy;
    the cut-off call's claim expires and its retry follows on_unknown."""
    hold = rig.effects.with_suffix(".hold")
    hold.touch()
    lease = ("--lease", "1")
    slow = {"customer": "s"}

    async def first_proxy() -> BaseException | None:
        async with rig.session(*lease) as s:
            done = await s.call_tool("charge", {"customer": "k", "cents": 1})
            assert rig.outcome(done) == "executed"
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(s.call_tool, "slow_charge", slow)
                    await anyio.to_thread.run_sync(_wait_for, rig, "slow_charge", "start")
                    started = rig.lines("slow_charge", phase="start")[0]
                    # The proxy dies mid-call; so does its upstream (the machine went down).
                    os.kill(started["ppid"], signal.SIGKILL)
                    os.kill(started["pid"], signal.SIGKILL)
            except BaseException as err:  # the client sees its connection close
                return err
        return None

    err = run(first_proxy)
    assert err is not None
    assert any(isinstance(e, MCPError) for e in _leaves(err)), err
    hold.unlink()

    async def second_proxy(*options: str) -> list[Any]:
        async with rig.session(*lease, *options) as s:
            return [
                await s.call_tool("charge", {"customer": "k", "cents": 1}),
                await s.call_tool("slow_charge", slow),
            ]

    replayed, unknown = run(second_proxy)
    assert rig.outcome(replayed) == "replayed"
    assert unknown.is_error and rig.outcome(unknown) == "unknown_outcome"
    assert len(rig.lines("charge")) == 1 and rig.lines("slow_charge") == []

    # An operator who knows it did not happen lets it run again: --on-unknown retry.
    _, rerun = run(second_proxy, "--on-unknown", "retry")
    assert rig.outcome(rerun) == "executed"
    assert len(rig.lines("slow_charge")) == 1
    starts = rig.lines("slow_charge", phase="start")
    assert starts[0]["key"] == starts[1]["key"]  # the same idempotency key downstream


def _leaves(err: BaseException) -> list[BaseException]:
    group = getattr(err, "exceptions", None)  # an exception group (Python 3.11+ or backport)
    return [leaf for e in group for leaf in _leaves(e)] if group else [err]


def test_a_client_that_goes_away_mid_call_leaves_an_unknown_outcome(rig: Rig) -> None:
    """The MCP host quits during a call: the proxy stops with it and expires the claim at
    once, so the next proxy's retry answers unknown_outcome without waiting for the lease."""
    hold = rig.effects.with_suffix(".hold")
    hold.touch()
    slow = {"customer": "gone"}

    async def leave_mid_call() -> None:
        async with rig.session() as s, anyio.create_task_group() as tg:
            tg.start_soon(s.call_tool, "slow_charge", slow)
            await anyio.to_thread.run_sync(_wait_for, rig, "slow_charge", "start")
            tg.cancel_scope.cancel()

    run(leave_mid_call)
    hold.unlink()
    [record] = rig.guard.history("slow_charge")
    assert record.state == "running" and record.lease_until <= record.now  # expired at once

    async def retry() -> Any:
        async with rig.session() as s:  # the default 30 s lease: no wait for it
            return await s.call_tool("slow_charge", slow)

    assert rig.outcome(run(retry)) == "unknown_outcome"


def test_an_upstream_that_cannot_start_is_one_clear_error(rig: Rig) -> None:
    import subprocess

    for command, says in (
        (["no-such-mcp-server-xyz"], "FileNotFoundError"),
        ([sys.executable, "-c", "raise SystemExit(3)"], "exited before the MCP handshake"),
    ):
        argv = [sys.executable, "-m", "onceonly_core.cli", "mcp-proxy", "--url", rig.url, "--"]
        done = subprocess.run(
            [*argv, *command],
            env=child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        assert "could not be started" in done.stderr and says in done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
