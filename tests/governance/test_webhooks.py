"""The signed webhook sink against a real loopback receiver that verifies every request."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from governance._loopback import Reply, Request, loopback, sequence, verifying
from onceonly_core.errors import ConfigError
from onceonly_core.governance import webhooks
from onceonly_core.governance.signing import ReplayCache
from onceonly_core.governance.webhooks import WebhookSink

SECRET = "whsec_d2ViaG9vay1zZWNyZXQtd2ViaG9vay1zZWNyZXQ="
OK = Reply(200, b"", {})

# The receivers here live on 127.0.0.1: allowlisted explicitly (the default refuses it).
pytestmark = pytest.mark.usefixtures("allow_loopback")


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhooks, "BACKOFF_BASE", 0.01)


@pytest.fixture
def sinks() -> Iterator[list[WebhookSink]]:
    made: list[WebhookSink] = []
    yield made
    for sink in made:
        sink.close()


def event(kind: str = "tool_failed", **data: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "agent_id": "support-bot",
        "tool": "stripe.refund",
        "reason": "tool_error",
        "data": data,
        "ts": 1_700_000_000.5,
    }


def test_delivers_signed_events_that_the_receiver_verifies(sinks: list[WebhookSink]) -> None:
    cache = ReplayCache()
    with loopback(verifying(SECRET, cache, OK)) as srv:
        sink = WebhookSink(srv.url, SECRET)
        sinks.append(sink)
        sink.deliver(event("tool_failed", error="boom"))
        sink.deliver(event("budget_threshold", spent=80.0, cap=100.0))
        assert sink.flush(5)
    assert [r.verified is not None for r in srv.requests] == [True, True]
    bodies = [json.loads(r.body) for r in srv.requests]
    assert [b["type"] for b in bodies] == ["tool_failed", "budget_threshold"]
    assert bodies[1]["data"] == {"spent": 80.0, "cap": 100.0}
    for req, body in zip(srv.requests, bodies, strict=True):
        assert req.headers["webhook-id"] == body["id"]  # the id is signed, in the body too
        assert req.headers["content-type"] == "application/json"
    assert sink.delivered == 2 and sink.dropped == 0


def test_only_wanted_events_are_sent(sinks: list[WebhookSink]) -> None:
    with loopback(lambda req: OK) as srv:
        sink = WebhookSink(srv.url, SECRET, events=["blocked", "budget_*"])
        sinks.append(sink)
        assert sink.wants("blocked") and sink.wants("budget_threshold")
        assert not sink.wants("tool_failed")
        sink.deliver(event("tool_failed"))
        sink.deliver(event("blocked"))
        assert sink.flush(5)
    assert [json.loads(r.body)["type"] for r in srv.requests] == ["blocked"]


def test_failed_delivery_is_retried_with_the_same_id_and_a_fresh_signature(
    sinks: list[WebhookSink],
) -> None:
    cache = ReplayCache()
    replies = sequence(Reply(500, b"", {}), Reply(503, b"", {"Retry-After": "0"}), OK)
    with loopback(verifying(SECRET, cache, replies)) as srv:
        sink = WebhookSink(srv.url, SECRET, max_retries=3)
        sinks.append(sink)
        sink.deliver(event("run_failed"))
        assert sink.flush(5)
    assert len(srv.requests) == 3
    assert all(r.verified for r in srv.requests)  # the replay cache accepted every retry
    assert len({r.headers["webhook-id"] for r in srv.requests}) == 1
    assert len({r.headers["webhook-timestamp"] for r in srv.requests}) == 3
    assert sink.delivered == 1


def test_a_refused_event_is_dropped_without_retries(
    sinks: list[WebhookSink], caplog: pytest.LogCaptureFixture
) -> None:
    with loopback(lambda req: Reply(400, b"", {})) as srv:
        sink = WebhookSink(srv.url, SECRET, max_retries=3)
        sinks.append(sink)
        sink.deliver(event())
        assert sink.flush(5)
    assert len(srv.requests) == 1 and sink.dropped == 1
    assert "dropped tool_failed event" in caplog.text and "HTTP 400" in caplog.text


def test_retries_are_bounded(sinks: list[WebhookSink]) -> None:
    with loopback(lambda req: Reply(502, b"", {})) as srv:
        sink = WebhookSink(srv.url, SECRET, max_retries=2)
        sinks.append(sink)
        sink.deliver(event())
        assert sink.flush(5)
    assert len(srv.requests) == 3 and sink.dropped == 1


def test_a_full_queue_drops_with_a_warning_and_never_blocks(
    sinks: list[WebhookSink], caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()

    def slow(req: Request) -> Reply:
        release.wait(5)
        return OK

    with loopback(slow) as srv:
        sink = WebhookSink(srv.url, SECRET, queue_size=2, timeout=5)
        sinks.append(sink)
        started = time.monotonic()
        for i in range(10):
            sink.deliver(event(n=i))
        assert time.monotonic() - started < 0.5
        release.set()
        assert sink.flush(5)
    # One in flight (maybe), two queued: the rest were dropped.
    assert 2 <= sink.delivered <= 3
    assert sink.delivered + sink.dropped == 10
    assert "queue full" in caplog.text


def test_flush_times_out_while_the_receiver_hangs(sinks: list[WebhookSink]) -> None:
    with loopback(lambda req: Reply(delay=3.0)) as srv:
        sink = WebhookSink(srv.url, SECRET, timeout=2.0, max_retries=0)
        sinks.append(sink)
        sink.deliver(event())
        started = time.monotonic()
        assert sink.flush(0.2) is False
        assert time.monotonic() - started < 1.0


def test_deliver_never_raises(sinks: list[WebhookSink]) -> None:
    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no")

    with loopback(lambda req: OK) as srv:
        sink = WebhookSink(srv.url, SECRET)
        sinks.append(sink)
        for junk in (None, 42, "text", {1, 2}, {"type": Hostile()}, {"data": object()}):
            sink.deliver(junk)  # type: ignore[arg-type]
        cyclic: dict[str, Any] = {"type": "blocked"}
        cyclic["self"] = cyclic
        sink.deliver(cyclic)
        sink.deliver({"type": "blocked", "id": "has.a.dot"})  # not a valid webhook-id
        assert sink.flush(5)
    assert len(srv.requests) == 8
    assert all(json.loads(r.body)["id"].startswith("evt_") for r in srv.requests)


def test_secrets_in_events_are_redacted(sinks: list[WebhookSink]) -> None:
    with loopback(lambda req: OK) as srv:
        sink = WebhookSink(srv.url, SECRET)
        sinks.append(sink)
        sink.deliver(
            event(
                args={"api_key": "plain-value-123", "note": "Bearer abcdefghijklmnopqrstu"},
                error="card 4242 4242 4242 4242 declined",
            )
        )
        assert sink.flush(5)
    text = srv.requests[0].body.decode()
    for secret in ("plain-value-123", "abcdefghijklmnopqrstu", "4242 4242 4242 4242"):
        assert secret not in text


def test_close_drains_then_stops_and_later_events_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with loopback(lambda req: OK) as srv:
        sink = WebhookSink(srv.url, SECRET)
        sink.deliver(event())
        sink.close()
        sink.close()  # idempotent
        sink.deliver(event())
    assert len(srv.requests) == 1
    assert "closed" in caplog.text


def test_an_unreachable_receiver_does_not_hang_close() -> None:
    sink = WebhookSink("http://127.0.0.1:9/hook", SECRET, timeout=0.5, max_retries=50)
    sink.deliver(event())
    started = time.monotonic()
    sink.close()
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize(
    ("url", "secret", "match"),
    [
        ("ftp://host/x", SECRET, "http:// or https://"),
        ("http://", SECRET, "http:// or https://"),
        ("http://127.0.0.1/x", "whsec_***", "base64"),
        ("http://127.0.0.1/x", "", "empty"),
    ],
)
def test_bad_configuration_fails_at_construction(url: str, secret: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        WebhookSink(url, secret)
