"""The proxy's one call path in-process: outcomes that are hard to provoke through pipes.

A real Guard over a real (in-memory) ledger; only the upstream is replaced by a coroutine.
"""

from __future__ import annotations

from typing import Any

import anyio

from onceonly_core import Guard, MemoryStore
from onceonly_core.errors import StoreError
from onceonly_core.mcp.proxy import ProxyConfig, _Plan, guarded_call, render

RESULT = {"content": [{"type": "text", "text": "charged"}], "isError": False}
CFG = ProxyConfig(command=["unused"])


class LosesCompletions(MemoryStore):
    """A ledger whose completions fail: the tool runs, its record cannot be written."""

    def finish(self, *args: Any, **kwargs: Any) -> bool:
        if kwargs.get("ok"):
            raise StoreError("the database went away")
        return bool(super().finish(*args, **kwargs))


def plan(calls: list[dict[str, Any]]) -> _Plan:
    async def forward(**arguments: Any) -> dict[str, Any]:
        calls.append(arguments)
        return RESULT

    return _Plan("charge", forward, {}, {}, False, False)  # type: ignore[arg-type]


def test_a_call_that_ran_but_was_not_recorded_still_answers_its_result() -> None:
    calls: list[dict[str, Any]] = []
    with Guard(store=LosesCompletions(), quiet=True) as guard:
        answer = anyio.run(guarded_call, guard, plan(calls), {"customer": "c"}, CFG)
    assert answer.code == "executed" and answer.fields["reason"] == "completion_not_recorded"
    assert calls == [{"customer": "c"}]
    result = render(answer)
    assert not result.is_error and result.model_dump()["content"][0]["text"] == "charged"
    meta = {"onceonly/outcome": "executed", "onceonly/reason": "completion_not_recorded"}
    assert result.meta == meta


def test_arguments_that_cannot_be_keyed_are_invalid_and_nothing_runs() -> None:
    calls: list[dict[str, Any]] = []
    with Guard("memory://", quiet=True) as guard:
        answer = anyio.run(guarded_call, guard, plan(calls), {"amount": float("nan")}, CFG)
    assert answer.code == "invalid_arguments" and "amount" in answer.text
    assert calls == [] and render(answer).is_error
