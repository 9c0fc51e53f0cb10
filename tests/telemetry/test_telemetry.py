"""OpenTelemetry spans and metrics and structured log records (onceonly_core.telemetry),
checked with the real OpenTelemetry SDK (in-memory span exporter and metric reader).
Without the SDK installed, this module is skipped; tests/telemetry/test_optional.py is not.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from onceonly_core import ApprovalPending, Guard, PolicyBlocked, current_call
from onceonly_core.fingerprint import tool_identity
from onceonly_core.governance import Policy
from onceonly_core.telemetry import (
    DURATION_BUCKETS,
    Instrumentation,
    instrument,
    instrument_logging,
    uninstrument,
)

SECRET = "sk_live_DO_NOT_LOG_4242"


class Otel:
    """A tracer provider and a meter provider that keep what they get in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def span(self) -> ReadableSpan:
        spans = self.spans()
        assert len(spans) == 1, [s.name for s in spans]
        return spans[0]

    def points(self, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
        """{attributes: value (counter) or count (histogram)} of one metric."""
        data = self.reader.get_metrics_data()
        out: dict[frozenset[tuple[str, Any]], Any] = {}
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        for p in m.data.data_points:
                            value = getattr(p, "value", None)
                            out[frozenset(p.attributes.items())] = (
                                value if value is not None else p.count  # type: ignore[union-attr]
                            )
        return out

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    yield o
    o.close()


@pytest.fixture
def guard(tmp_path: Path) -> Iterator[Guard]:
    g = Guard(f"sqlite:///{tmp_path}/ledger.db", quiet=True)
    yield g
    g.close()


@pytest.fixture
def inst(guard: Guard, otel: Otel) -> Instrumentation:
    return instrument(
        guard, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
    )


charges: list[int] = []


def charge(customer: str, amount: int, api_key: str = "") -> dict[str, Any]:
    charges.append(amount)
    return {"charged": amount, "echo": api_key}


def boom(n: int, api_key: str = "") -> int:
    raise RuntimeError(f"downstream refused {n} with {api_key}")


async def acharge(customer: str, amount: int, api_key: str = "") -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"charged": amount, "echo": api_key}


CHARGE, BOOM, ACHARGE = tool_identity(charge), tool_identity(boom), tool_identity(acharge)


def labels(**kw: str) -> frozenset[tuple[str, Any]]:
    return frozenset((f"onceonly.{k}", v) for k, v in kw.items())


# -- plain guarded calls ---------------------------------------------------------------
def test_executed_call_is_one_span_with_its_attributes(
    guard: Guard, otel: Otel, inst: Instrumentation
) -> None:
    assert guard(charge, "c1", 500) == {"charged": 500, "echo": ""}
    span = otel.span()
    assert span.name == f"onceonly.call {CHARGE}"
    assert span.kind == trace.SpanKind.INTERNAL
    key = guard.key_for(charge, "c1", 500)
    assert dict(span.attributes or {}) == {
        "onceonly.tool": CHARGE,
        "onceonly.namespace": "default",
        "onceonly.key": key[:16],
        "onceonly.decision": "executed",
        "onceonly.token": 1,
        "onceonly.attempt": 1,
    }
    assert span.status.status_code == StatusCode.UNSET
    assert otel.points("onceonly.calls") == {labels(decision="executed", tool=CHARGE): 1}
    assert otel.points("onceonly.call.duration") == {labels(decision="executed", tool=CHARGE): 1}
    assert otel.points("onceonly.blocked") == {}
    (hist,) = [
        m.data.data_points[0]
        for rm in otel.reader.get_metrics_data().resource_metrics  # type: ignore[union-attr]
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "onceonly.call.duration"
    ]
    assert tuple(hist.explicit_bounds) == DURATION_BUCKETS  # seconds, not the ms defaults
    assert 0 < hist.sum < 5


def test_a_tool_guarded_twice_is_one_span(guard: Guard, otel: Otel, inst: Instrumentation) -> None:
    once = guard.once(charge)
    assert guard(once, "c0", 1) == once("c0", 1)
    assert [(s.attributes or {})["onceonly.decision"] for s in otel.spans()] == [
        "executed",
        "replayed",
    ]


def test_replay_is_its_own_span_with_the_original_token(
    guard: Guard, otel: Otel, inst: Instrumentation
) -> None:
    guard(charge, "c2", 1)
    guard(charge, "c2", 1)
    first, second = otel.spans()
    assert first.attributes is not None and second.attributes is not None
    assert second.attributes["onceonly.decision"] == "replayed"
    assert second.attributes["onceonly.token"] == first.attributes["onceonly.token"] == 1
    assert second.attributes["onceonly.key"] == first.attributes["onceonly.key"]
    assert otel.points("onceonly.calls") == {
        labels(decision="executed", tool=CHARGE): 1,
        labels(decision="replayed", tool=CHARGE): 1,
    }


def test_failed_call_has_error_status_and_the_error_type_only(
    guard: Guard, otel: Otel, inst: Instrumentation
) -> None:
    with pytest.raises(RuntimeError, match="downstream refused 7"):  # unchanged
        guard(boom, 7, api_key=SECRET)
    span = otel.span()
    assert span.attributes is not None
    assert span.attributes["onceonly.decision"] == "failed"
    assert span.attributes["error.type"] == "RuntimeError"
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "RuntimeError"
    assert not span.events  # no exception event: its message quotes the arguments
    assert SECRET not in repr(span.to_json())
    assert otel.points("onceonly.calls") == {labels(decision="failed", tool=BOOM): 1}


def test_duplicate_with_replay_off_is_blocked_as_dedup(
    guard: Guard, otel: Otel, inst: Instrumentation
) -> None:
    once = guard.once(replay=False)(charge)
    once("c3", 3)
    assert not once("c3", 3)  # BLOCKED
    blocked = otel.spans()[1]
    assert blocked.attributes is not None
    assert blocked.attributes["onceonly.decision"] == "blocked"
    assert blocked.attributes["onceonly.policy_reason"] == "dedup"
    assert otel.points("onceonly.blocked") == {
        frozenset({("onceonly.policy_reason", "dedup"), ("onceonly.tool", CHARGE)}): 1
    }


def test_the_span_is_current_while_the_tool_runs(
    guard: Guard, otel: Otel, inst: Instrumentation
) -> None:
    tracer = otel.tracer_provider.get_tracer("downstream")
    seen: list[Any] = []

    def pay(order: str) -> str:
        seen.append(current_call())
        with tracer.start_as_current_span("stripe.charge"):
            return order

    with tracer.start_as_current_span("agent.step"):
        guard(pay, "o1")
    by_name = {s.name: s for s in otel.spans()}
    step, call = by_name["agent.step"], by_name[f"onceonly.call {tool_identity(pay)}"]
    child = by_name["stripe.charge"]
    assert call.parent is not None and call.parent.span_id == step.context.span_id
    assert child.parent is not None and child.parent.span_id == call.context.span_id
    assert seen[0] is not None and seen[0].token == 1  # the tool's context is untouched
    assert trace.get_current_span() is trace.INVALID_SPAN  # and detached afterwards


def test_nested_guarded_calls_nest_their_spans(
    guard: Guard, otel: Otel, inst: Instrumentation
) -> None:
    def outer(order: str) -> Any:
        return guard(charge, order, 10)

    guard.call_tool(outer, {"order": "o2"}, agent_id="bot")
    by_name = {s.name: s for s in otel.spans()}
    assert set(by_name) == {f"onceonly.call {tool_identity(outer)}", f"onceonly.call {CHARGE}"}
    inner = by_name[f"onceonly.call {CHARGE}"]
    outer_span = by_name[f"onceonly.call {tool_identity(outer)}"]
    assert inner.parent is not None and inner.parent.span_id == outer_span.context.span_id


# -- governed calls --------------------------------------------------------------------
def test_governed_call_is_one_span_with_the_ledger_token(
    guard: Guard, otel: Otel, inst: Instrumentation
) -> None:
    res = guard.call_tool(charge, {"customer": "c4", "amount": 4}, agent_id="bot", run_id="r1")
    assert res.decision == "executed"
    span = otel.span()  # governance and the ledger claim: one span, not two
    assert dict(span.attributes or {}) == {
        "onceonly.tool": CHARGE,
        "onceonly.namespace": "default",
        "onceonly.key": (res.key or "")[:16],
        "onceonly.agent_id": "bot",
        "onceonly.run_id": "r1",
        "onceonly.decision": "executed",
        "onceonly.policy_reason": "ok",
        "onceonly.token": 1,
        "onceonly.attempt": 1,
    }
    again = guard.call_tool(charge, {"customer": "c4", "amount": 4}, agent_id="bot")
    assert again.decision == "dedup"
    replay = dict(otel.spans()[1].attributes or {})
    assert replay == {
        **{k: v for k, v in dict(span.attributes or {}).items() if k != "onceonly.run_id"},
        "onceonly.decision": "dedup",
        "onceonly.policy_reason": "dedup",
    }


def test_policy_block_is_counted_by_reason(guard: Guard, otel: Otel, inst: Instrumentation) -> None:
    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["*.charge"]))
    before = len(charges)
    res = guard.call_tool(charge, {"customer": "c5", "amount": 5}, agent_id="bot")
    assert res.decision == "blocked" and len(charges) == before
    with guard.agent("bot"), pytest.raises(PolicyBlocked):  # the facade raises; same span
        guard(charge, "c5", 6)
    first, second = otel.spans()
    for span in (first, second):
        assert span.attributes is not None
        assert span.attributes["onceonly.decision"] == "blocked"
        assert span.attributes["onceonly.policy_reason"] == "tool_blocked"
        assert span.attributes["onceonly.agent_id"] == "bot"
        assert "onceonly.token" not in span.attributes  # never claimed
        assert span.status.status_code == StatusCode.UNSET  # a policy working is no error
    assert otel.points("onceonly.blocked") == {
        frozenset({("onceonly.policy_reason", "tool_blocked"), ("onceonly.tool", CHARGE)}): 2
    }
    assert otel.points("onceonly.calls") == {labels(decision="blocked", tool=CHARGE): 2}


def test_kill_switch_approval_and_unknown_tool(
    guard: Guard, otel: Otel, inst: Instrumentation
) -> None:
    guard.gov.disable_agent("rogue", reason="runaway")
    guard.call_tool(charge, {"customer": "c", "amount": 1}, agent_id="rogue")
    guard.gov.upsert_policy(Policy(agent_id="bot", require_approval=["refund"]))
    assert guard.gov.run_tool("bot", "refund", {"order": "o1"}).decision == "blocked"
    guard.gov.create_tool("refund", lambda order: f"refunded {order}")
    assert guard.gov.run_tool("bot", "refund", {"order": "o1"}).decision == "pending_approval"
    with guard.agent("bot"), pytest.raises(ApprovalPending):
        guard.using(name="refund")(lambda order: order, "o1")
    reasons = [
        ((s.attributes or {})["onceonly.decision"], (s.attributes or {})["onceonly.policy_reason"])
        for s in otel.spans()
    ]
    assert reasons == [
        ("blocked", "agent_disabled"),
        ("blocked", "tool_not_found"),
        ("pending_approval", "approval_required"),
        ("pending_approval", "approval_required"),
    ]


def test_governed_failure(guard: Guard, otel: Otel, inst: Instrumentation) -> None:
    res = guard.call_tool(boom, {"n": 1}, agent_id="bot")
    assert res.decision == "failed"
    span = otel.span()
    assert span.attributes is not None
    assert span.attributes["onceonly.decision"] == "failed"
    assert span.attributes["onceonly.policy_reason"] == "tool_error"
    assert span.attributes["error.type"] == "RuntimeError"
    assert span.status.status_code == StatusCode.ERROR
    assert otel.points("onceonly.calls") == {labels(decision="failed", tool=BOOM): 1}


# -- async -----------------------------------------------------------------------------
def test_async_calls(guard: Guard, otel: Otel, inst: Instrumentation) -> None:
    tracer = otel.tracer_provider.get_tracer("test")

    async def main() -> None:
        with tracer.start_as_current_span("agent"):
            assert (await guard(acharge, "c6", 6))["charged"] == 6
            assert (await guard(acharge, "c6", 6))["charged"] == 6
            res = await guard.acall_tool(charge, {"customer": "c7", "amount": 7}, agent_id="bot")
            assert res.decision == "executed"
            res = await guard.acall_tool(acharge, {"customer": "c8", "amount": 8})
            assert res.decision == "executed"

    asyncio.run(main())
    spans = otel.spans()
    agent = next(s for s in spans if s.name == "agent")
    calls = [s for s in spans if s.name.startswith("onceonly.call ")]
    got = [(s.name, (s.attributes or {})["onceonly.decision"]) for s in calls]
    assert got == [
        (f"onceonly.call {ACHARGE}", "executed"),
        (f"onceonly.call {ACHARGE}", "replayed"),
        (f"onceonly.call {CHARGE}", "executed"),
        (f"onceonly.call {ACHARGE}", "executed"),
    ]
    for s in calls:
        assert s.parent is not None and s.parent.span_id == agent.context.span_id
    assert (calls[2].attributes or {})["onceonly.agent_id"] == "bot"
    assert otel.points("onceonly.calls")[labels(decision="executed", tool=ACHARGE)] == 2


def test_async_failure_and_block(guard: Guard, otel: Otel, inst: Instrumentation) -> None:
    guard.gov.upsert_policy(Policy(agent_id="bot", allowed_tools=["nothing"]))

    async def main() -> None:
        with pytest.raises(RuntimeError):
            await guard(_aboom, 1)
        res = await guard.acall_tool(acharge, {"customer": "c9", "amount": 9}, agent_id="bot")
        assert res.policy_reason == "tool_not_in_allowed_list"

    asyncio.run(main())
    first, second = otel.spans()
    assert first.status.status_code == StatusCode.ERROR
    assert (first.attributes or {})["error.type"] == "RuntimeError"
    assert (second.attributes or {})["onceonly.decision"] == "blocked"
    assert otel.points("onceonly.blocked") == {
        frozenset(
            {("onceonly.policy_reason", "tool_not_in_allowed_list"), ("onceonly.tool", ACHARGE)}
        ): 1
    }


async def _aboom(n: int) -> int:
    raise RuntimeError(f"no {n}")


# -- switching it off, and never breaking a call -----------------------------------------
def test_uninstrument_stops_emission(guard: Guard, otel: Otel, inst: Instrumentation) -> None:
    guard(charge, "c10", 10)
    assert inst.active
    assert inst.uninstrument() is True
    assert inst.uninstrument() is False
    assert not inst.active and guard._observer is None
    guard(charge, "c11", 11)
    guard.call_tool(charge, {"customer": "c12", "amount": 12}, agent_id="bot")
    assert len(otel.spans()) == 1
    assert otel.points("onceonly.calls") == {labels(decision="executed", tool=CHARGE): 1}

    again = instrument(guard, tracer_provider=otel.tracer_provider)
    later = instrument_logging(guard)  # replaces the previous instrumentation
    assert not again.active and later.active
    guard(charge, "c13", 13)
    assert len(otel.spans()) == 1
    assert uninstrument(guard) is True and uninstrument(guard) is False


def test_a_broken_tracer_never_breaks_a_call(
    guard: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
            return self

        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("exporter on fire")

    instrument(guard, tracer_provider=Broken())  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="onceonly"):
        assert guard(charge, "c14", 14)["charged"] == 14
        assert guard.call_tool(charge, {"customer": "c15", "amount": 1}).decision == "executed"
    assert "telemetry failed" in caplog.text


def test_instrument_takes_a_guard() -> None:
    from onceonly_core import ConfigError

    with pytest.raises(ConfigError, match="takes a Guard"):
        instrument(object())  # type: ignore[arg-type]


# -- structured logs -------------------------------------------------------------------
def test_log_records_carry_the_fields_and_never_arguments_or_results(
    guard: Guard, otel: Otel, inst: Instrumentation, caplog: pytest.LogCaptureFixture
) -> None:
    guard.gov.upsert_policy(Policy(agent_id="bot", blocked_tools=["*.boom"]))
    with caplog.at_level(logging.DEBUG, logger="onceonly"):
        guard(charge, "cust", 1, api_key=SECRET)  # executed (the result echoes the secret)
        guard(charge, "cust", 1, api_key=SECRET)  # replayed
        with pytest.raises(RuntimeError):
            guard(boom, 1, api_key=SECRET)  # failed (the message quotes the secret)
        guard.call_tool(boom, {"n": 2, "api_key": SECRET}, agent_id="bot")  # blocked
        guard.call_tool(charge, {"customer": "c", "amount": 2, "api_key": SECRET}, run_id="r")
    records = [r for r in caplog.records if hasattr(r, "onceonly")]
    assert [(r.levelname, r.onceonly["decision"]) for r in records] == [  # type: ignore[attr-defined]
        ("DEBUG", "executed"),
        ("DEBUG", "replayed"),
        ("INFO", "failed"),
        ("INFO", "blocked"),
        ("DEBUG", "executed"),
    ]
    assert all(r.name == "onceonly" for r in records)
    first = records[0].onceonly  # type: ignore[attr-defined]
    assert set(first) == {
        "tool",
        "namespace",
        "key",
        "decision",
        "token",
        "attempt",
        "duration_s",
        "trace_id",
        "span_id",
    }
    assert first["tool"] == CHARGE and first["token"] == 1 and first["duration_s"] >= 0
    span = otel.spans()[0]
    assert first["trace_id"] == format(span.context.trace_id, "032x")
    failed, blocked = records[2].onceonly, records[3].onceonly  # type: ignore[attr-defined]
    assert failed["error_type"] == "RuntimeError"
    assert blocked["policy_reason"] == "tool_blocked" and blocked["agent_id"] == "bot"
    assert records[4].onceonly["run_id"] == "r"  # type: ignore[attr-defined]
    assert records[3].getMessage() == f"{BOOM} blocked (tool_blocked)"
    everything = [
        (r.getMessage(), repr(r.args), json.dumps(getattr(r, "onceonly", None)), r.exc_text)
        for r in caplog.records
    ]
    assert SECRET not in repr(everything)
    assert "cust" not in json.dumps([r.onceonly for r in records])  # type: ignore[attr-defined]


def test_logs_without_opentelemetry_spans(guard: Guard, caplog: pytest.LogCaptureFixture) -> None:
    instrument_logging(guard)
    with caplog.at_level(logging.DEBUG, logger="onceonly"):
        guard(charge, "c16", 16)
    (record,) = [r for r in caplog.records if hasattr(r, "onceonly")]
    assert record.onceonly["decision"] == "executed"  # type: ignore[attr-defined]
    assert "trace_id" not in record.onceonly  # type: ignore[attr-defined]


def test_logs_off(guard: Guard, otel: Otel, caplog: pytest.LogCaptureFixture) -> None:
    instrument(guard, tracer_provider=otel.tracer_provider, logs=False)
    with caplog.at_level(logging.DEBUG, logger="onceonly"):
        guard(charge, "c17", 17)
    assert not [r for r in caplog.records if hasattr(r, "onceonly")]
    assert len(otel.spans()) == 1
