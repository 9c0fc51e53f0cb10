"""Embedded mode: input no backend can hold fails the same way everywhere, before a claim.

Names (key, namespace, tool name, agent id, run id, caller) with a NUL or a lone
surrogate raise ConfigError; arguments that cannot be fingerprinted (NaN, infinities,
lone surrogates, nesting past the limit) raise FingerprintError. Either way nothing lands
in the ledger, on memory, SQLite, PostgreSQL and MariaDB alike. NUL inside argument and
result strings is data: it is stored escaped and replays exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from onceonly_core import Guard
from onceonly_core.errors import ConfigError, FingerprintError
from onceonly_core.fingerprint import MAX_DEPTH, derive_key
from onceonly_core.limits import bad_text, check_text


@pytest.fixture
def g(any_url: str, namespace: str) -> Iterator[Guard]:
    guard = Guard(any_url, namespace=namespace, quiet=True)
    yield guard
    guard.close()


def _nested(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v]
    return v


BAD_NAMES = ["a\x00b", "\x00", "a\ud800b", "\udfff"]


# (what, how to make the call) -> the error expected, raised before any claim.
def _cases(bad: str) -> list[tuple[str, Callable[[Guard, Callable[..., Any]], Any]]]:
    return [
        ("key", lambda g, f: g.using(key=bad)(f, 1)),
        ("tool name", lambda g, f: g.using(name=bad)(f, 1)),
        ("call_tool agent", lambda g, f: g.call_tool(f, {"x": 1}, agent_id=bad)),
        ("call_tool tool", lambda g, f: g.call_tool(f, {"x": 1}, tool=bad)),
        ("call_tool run", lambda g, f: g.call_tool(f, {"x": 1}, run_id=bad)),
        ("run_tool agent", lambda g, f: g.gov.run_tool(bad, "echo", {"x": 1})),
    ]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=["nul", "nul_only", "surrogate", "low"])
def test_unstorable_names_are_refused_before_the_claim(g: Guard, bad: str) -> None:
    runs: list[int] = []

    def echo(x: int) -> int:
        runs.append(x)
        return x

    g.gov.create_tool("echo", echo)
    for what, call in _cases(bad):
        with pytest.raises(ConfigError) as info:
            call(g, echo)
        assert any(w in str(info.value) for w in ("NUL", "surrogate", "control")), what
    assert runs == []
    assert g.store.list(namespace=g.current_namespace(), prefix=True) == []
    assert g.gov.audit_log() == []


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, "a\ud800b", _nested(MAX_DEPTH + 5)],
    ids=["nan", "inf", "-inf", "surrogate", "deep"],
)
def test_unfingerprintable_arguments_are_refused_before_the_claim(g: Guard, value: Any) -> None:
    runs: list[Any] = []

    def tool(x: Any) -> str:
        runs.append(x)
        return "done"

    with pytest.raises(FingerprintError):
        g(tool, value)
    with pytest.raises(FingerprintError):  # an explicit key still checks the payload
        g.using(key="k1")(tool, value)
    with pytest.raises(FingerprintError):  # governed: before the hold and the audit row
        g.call_tool(tool, {"x": value}, agent_id="bot")
    assert runs == []
    assert g.store.list(namespace=g.current_namespace(), prefix=True) == []
    assert g.gov.audit_log() == []


def test_nul_in_arguments_and_results_is_data(g: Guard) -> None:
    runs: list[str] = []

    def tool(s: str) -> dict[str, str]:
        runs.append(s)
        return {"echo": s, "k\x00": "\x00", "lone": "\ud800"}

    first = g(tool, "a\x00b")
    again = g(tool, "a\x00b")
    assert first == again == {"echo": "a\x00b", "k\x00": "\x00", "lone": "\ud800"}
    assert runs == ["a\x00b"]
    assert g(tool, "a\x00c")["echo"] == "a\x00c"  # a different argument: a different key
    assert runs == ["a\x00b", "a\x00c"]


def test_an_error_quoting_nul_is_stored_on_every_backend(g: Guard) -> None:
    def boom() -> None:
        raise ValueError("bad \x00 byte and \ud800 half")

    with pytest.raises(ValueError):
        g(boom)
    (rec,) = g.store.list(namespace=g.current_namespace(), prefix=True)
    assert rec.state == "failed"
    assert rec.error is not None and "\x00" not in rec.error and "\ud800" not in rec.error


def test_the_key_does_not_depend_on_the_backend() -> None:
    # Pure: the same text on every machine; NUL is data in an argument.
    a = derive_key("t", {"s": "a\x00b"})
    assert a == derive_key("t", {"s": "a\x00b"})
    assert a != derive_key("t", {"s": "ab"})
    assert len(a) == 64


def test_check_text() -> None:
    assert bad_text("plain") is None
    assert bad_text("émoji 💥") is None
    assert bad_text("a\x00") == "contains a NUL character"
    assert "surrogate" in (bad_text("\ud800") or "")
    check_text(None, "x")
    with pytest.raises(ConfigError, match="the key contains a NUL"):
        check_text("k\x00", "the key")


@pytest.mark.parametrize("spend", [1e13, 9.3e12, 1e300, math.inf, math.nan, -1.0])
def test_a_spend_that_does_not_fit_is_refused_before_the_claim(g: Guard, spend: float) -> None:
    runs: list[int] = []

    def pay(x: int) -> int:
        runs.append(x)
        return x

    g.gov.policy_from_template("bot", "permissive", {"max_spend_usd_per_day": None})
    with pytest.raises(ConfigError, match="spend_usd"):
        g.call_tool(pay, {"x": 1}, agent_id="bot", spend_usd=spend)
    assert runs == []
    assert g.store.list(namespace=g.current_namespace(), prefix=True) == []
    assert g.gov.audit_log() == []


@pytest.mark.parametrize(
    "opt", [{"lease": math.inf}, {"lease": math.nan}, {"ttl": math.inf}, {"ttl": math.nan}]
)
def test_non_finite_lease_or_ttl_is_refused(g: Guard, opt: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="finite"):
        g.using(**opt)(len, "abc")
    assert g.store.list(namespace=g.current_namespace(), prefix=True) == []
