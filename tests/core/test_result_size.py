"""A result too big to store never reruns the tool (issue #13, item 7).

Over ``max_result_bytes`` the result is not written: the record is ``succeeded`` with the
"result not stored" marker, the first caller gets its value, every replay raises
ResultNotStored, and the tool never runs again. The default is below what every backend
accepts in one statement (MariaDB's ``max_allowed_packet``, read from the server here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from onceonly_core import Guard, Options, ResultNotStored
from onceonly_core.errors import CodecError, ConfigError
from onceonly_core.limits import DEFAULT_MAX_RESULT_BYTES


@pytest.fixture
def g(any_url: str, namespace: str) -> Iterator[Guard]:
    guard = Guard(any_url, namespace=namespace, quiet=True, max_result_bytes=10_000)
    yield guard
    guard.close()


def _record(g: Guard) -> object:
    (rec,) = g.store.list(namespace=g.current_namespace(), prefix=True)
    return rec


def test_an_oversized_result_runs_once_and_replays_raise(g: Guard) -> None:
    runs: list[int] = []

    def report(n: int) -> str:
        runs.append(n)
        return "é" * n  # 2 bytes a character: the limit counts UTF-8 bytes

    first = g(report, 6_000)
    assert first == "é" * 6_000  # the caller that ran it gets its value
    rec = _record(g)
    assert rec.state == "succeeded"  # type: ignore[attr-defined]
    assert rec.result is None  # type: ignore[attr-defined]
    assert "result not stored" in rec.error  # type: ignore[attr-defined]
    assert "max_result_bytes=10000" in rec.error  # type: ignore[attr-defined]
    with pytest.raises(ResultNotStored) as info:
        g(report, 6_000)
    assert isinstance(info.value, CodecError)  # `except CodecError` keeps working
    assert info.value.reason.startswith("12002 bytes")  # the JSON text, quotes included
    with pytest.raises(ResultNotStored):
        g(report, 6_000)
    assert runs == [6_000]
    assert _record(g).executions == 1  # type: ignore[attr-defined]


def test_a_result_at_the_limit_is_stored(g: Guard) -> None:
    runs: list[int] = []

    def report() -> str:
        runs.append(1)
        return "x" * (10_000 - 2)  # 10,000 bytes with its quotes

    assert g(report) == g(report)
    assert runs == [1]


def test_governed_and_async_calls_never_rerun(g: Guard) -> None:
    runs: list[str] = []

    def big(tag: str) -> list[int]:
        runs.append(tag)
        return list(range(5_000))

    res = g.call_tool(big, {"tag": "gov"}, agent_id="bot")
    assert res.decision == "executed" and res.result == list(range(5_000))
    with pytest.raises(ResultNotStored):
        g.call_tool(big, {"tag": "gov"}, agent_id="bot")

    async def abig(tag: str) -> list[int]:
        runs.append(tag)
        return list(range(5_000))

    assert asyncio.run(g(abig, "async")) == list(range(5_000))
    with pytest.raises(ResultNotStored):
        asyncio.run(g(abig, "async"))
    assert runs == ["gov", "async"]


def test_the_limit_is_an_option(any_url: str, namespace: str) -> None:
    with Guard(any_url, namespace=namespace, quiet=True) as g:
        assert Options().max_result_bytes == DEFAULT_MAX_RESULT_BYTES
        runs: list[int] = []

        def big() -> str:
            runs.append(1)
            return "y" * 20_000

        g.policy(big, max_result_bytes=None)  # no limit for this tool
        assert g(big) == g(big)
        with pytest.raises(ConfigError):
            g.policy(big, max_result_bytes=0)
        assert runs == [1]


def test_the_default_fits_mariadb_max_allowed_packet(mysql_url: str, namespace: str) -> None:
    """Read the server's real max_allowed_packet: the default limit plus the rest of the
    statement must fit, so a result just under the limit is stored, and one over it is
    not stored and the tool does not run again (before the fix: CompletionNotRecorded,
    the record stayed running and every later call ran the tool again)."""
    import sqlalchemy as sa

    engine = sa.create_engine(mysql_url)
    with engine.connect() as conn:
        packet = int(conn.execute(sa.text("SELECT @@max_allowed_packet")).scalar_one())
    engine.dispose()
    assert packet > DEFAULT_MAX_RESULT_BYTES + 64 * 1024, (DEFAULT_MAX_RESULT_BYTES, packet)

    with Guard(mysql_url, namespace=namespace, quiet=True) as g:
        runs: list[int] = []

        def blob(n: int) -> str:
            runs.append(n)
            return "z" * n

        under = DEFAULT_MAX_RESULT_BYTES - 1024
        assert g(blob, under) == g(blob, under)  # stored and replayed
        over = max(DEFAULT_MAX_RESULT_BYTES, packet) + 1024  # over the packet too
        assert len(g(blob, over)) == over
        with pytest.raises(ResultNotStored):
            g(blob, over)
        assert runs == [under, over]
