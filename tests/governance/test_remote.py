"""Remote HTTP tools against a real loopback server that verifies signatures like a
receiver would: signing, the idempotency key, timeouts, what is retried and what is not,
and responses treated as untrusted input."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from typing import Any

import httpx
import pytest

from governance._loopback import Reply, Request, loopback, sequence, verifying
from onceonly_core.errors import CodecError, ConfigError, MissingExtraError, RemoteToolError
from onceonly_core.governance import remote
from onceonly_core.governance.models import ToolSpec
from onceonly_core.governance.remote import acall_http_tool, call_http_tool
from onceonly_core.governance.signing import ReplayCache

# The tool servers here live on 127.0.0.1: allowlisted explicitly (the default refuses it).
pytestmark = pytest.mark.usefixtures("allow_loopback")

SECRET = "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"
KEY = "ns:order-42:charge"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "BACKOFF_BASE", 0.01)


def spec(url: str, **kw: Any) -> ToolSpec:
    fields: dict[str, Any] = {"name": "charge", "kind": "http", "url": url, "auth": "hmac_sha256"}
    fields.update(kw)
    return ToolSpec(**fields)


def reply_json(value: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(value).encode(), dict(JSON))


def test_signed_call_returns_result_and_carries_the_key() -> None:
    cache = ReplayCache()
    with loopback(verifying(SECRET, cache, reply_json({"result": {"charged": 100}}))) as srv:
        out = call_http_tool(spec(srv.url), SECRET, {"b": 2, "a": "é"}, idempotency_key=KEY)
    assert out == {"charged": 100}
    (req,) = srv.requests
    assert req.verified is not None
    assert req.body == '{"a":"é","b":2}'.encode()  # canonical: sorted, compact, UTF-8
    assert req.headers["idempotency-key"] == KEY
    assert req.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"result": None}, None),
        ({"result": [1, 2]}, [1, 2]),
        ({"result": 1, "meta": 2}, {"result": 1, "meta": 2}),  # not exactly {"result": ...}
        ([1, "two"], [1, "two"]),
        ("text", "text"),
        (3.5, 3.5),
    ],
)
def test_result_envelope_or_any_json_value(body: Any, expected: Any) -> None:
    with loopback(lambda req: reply_json(body)) as srv:
        assert call_http_tool(spec(srv.url, auth="none"), None, {}, idempotency_key=KEY) == expected


def test_unsigned_tool_sends_no_signature_headers() -> None:
    with loopback(lambda req: reply_json({"result": 1})) as srv:
        call_http_tool(spec(srv.url, auth="none"), SECRET, {}, idempotency_key=KEY)
    assert not any(h.startswith("webhook-") for h in srv.requests[0].headers)


def test_wrong_secret_is_rejected_by_the_receiver_and_not_retried() -> None:
    with (
        loopback(verifying(SECRET, ReplayCache(), reply_json({"result": 1}))) as srv,
        pytest.raises(RemoteToolError) as err,
    ):
        call_http_tool(spec(srv.url), "another-secret", {}, idempotency_key=KEY)
    assert err.value.status == 401 and not err.value.retryable
    assert len(srv.requests) == 1
    # The receiver's reason stays out of the error (docs/security.md: bodies are not echoed).
    assert "HTTP 401" in str(err.value) and "no matching signature" not in str(err.value)


def test_slow_tool_times_out_per_timeout_ms() -> None:
    with loopback(lambda req: Reply(delay=5.0)) as srv:
        started = time.monotonic()
        with pytest.raises(RemoteToolError, match="timed out after 300 ms") as err:
            call_http_tool(spec(srv.url, timeout_ms=300), SECRET, {}, idempotency_key=KEY)
        elapsed = time.monotonic() - started
    assert elapsed < 1.5
    assert not err.value.retryable  # delivered: the tool may be running
    assert len(srv.requests) == 1  # a read timeout is never retried


def test_a_dribbling_response_is_cut_off_by_the_deadline() -> None:
    # Every read arrives well within timeout_ms; the whole response does not.
    body = json.dumps({"result": "x" * 60}).encode()
    with loopback(lambda req: Reply(200, body, dict(JSON), drip=0.05)) as srv:
        started = time.monotonic()
        with pytest.raises(RemoteToolError, match="timed out after 400 ms"):
            call_http_tool(spec(srv.url, timeout_ms=400), SECRET, {}, idempotency_key=KEY)
        assert time.monotonic() - started < 1.5
    assert len(srv.requests) == 1


def test_503_then_200_is_retried_with_the_same_idempotency_key() -> None:
    cache = ReplayCache()
    replies = sequence(Reply(503, b"busy", {}), reply_json({"result": "done"}))
    with loopback(verifying(SECRET, cache, replies)) as srv:
        out = call_http_tool(spec(srv.url, max_retries=2), SECRET, {"x": 1}, idempotency_key=KEY)
    assert out == "done"
    first, second = srv.requests
    # Both attempts verified (the receiver's replay cache accepted the retry) ...
    assert first.verified and second.verified
    # ... with one message id and key for the logical call, and a fresh signed timestamp.
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"] == KEY
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.headers["webhook-timestamp"] != second.headers["webhook-timestamp"]
    assert first.body == second.body


def test_429_retry_after_is_honoured() -> None:
    replies = sequence(Reply(429, b"", {"Retry-After": "0"}), reply_json({"result": 1}))
    with loopback(replies) as srv:
        assert call_http_tool(spec(srv.url, auth="none"), None, {}, idempotency_key=KEY) == 1
    assert len(srv.requests) == 2


def test_retry_after_beyond_the_cap_gives_up() -> None:
    with (
        loopback(lambda req: Reply(503, b"", {"Retry-After": "3600"})) as srv,
        pytest.raises(RemoteToolError) as err,
    ):
        call_http_tool(spec(srv.url, auth="none"), None, {}, idempotency_key=KEY)
    assert err.value.status == 503 and err.value.retryable
    assert len(srv.requests) == 1


def test_retries_are_bounded_by_max_retries() -> None:
    with (
        loopback(lambda req: Reply(502, b"bad gateway", {})) as srv,
        pytest.raises(RemoteToolError, match="after 3 attempts") as err,
    ):
        call_http_tool(spec(srv.url, auth="none", max_retries=2), None, {}, idempotency_key=KEY)
    assert err.value.status == 502 and err.value.retryable
    assert len(srv.requests) == 3


def test_400_is_not_retried_and_the_message_is_sanitised(caplog: pytest.LogCaptureFixture) -> None:
    echo = f"bad request\n\n  secret={SECRET} key sk_live_abcdefghijklmnopqrstuvwx " + "x" * 500
    caplog.set_level(logging.DEBUG)
    with (
        loopback(lambda req: Reply(400, echo.encode(), {})) as srv,
        pytest.raises(RemoteToolError) as err,
    ):
        call_http_tool(spec(srv.url), SECRET, {}, idempotency_key=KEY)
    assert len(srv.requests) == 1
    assert err.value.status == 400 and not err.value.retryable
    message = str(err.value)
    # The error names the status and the size, never the body: it travels back to callers.
    assert message.endswith(f"answered HTTP 400 ({len(echo)}-byte body)")
    assert "bad request" not in message and SECRET not in message and "sk_live_" not in message
    # The DEBUG log keeps a redacted, whitespace-collapsed excerpt for the operator.
    assert "bad request secret=" in caplog.text  # whitespace collapsed
    assert SECRET not in caplog.text and "sk_live_" not in caplog.text
    assert "x" * 201 not in caplog.text  # at most 200 characters of it


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"<html>hi</html>", "text/html"),
        (b'{"result": 1}', "text/plain"),  # JSON, but not declared as such
        (b"not json", "application/json"),
        (b"", "application/json"),
        (b'{"result": NaN}', "application/json"),
        (b'{"a": 1, "a": 2}', "application/json"),
        (b"[" * 200 + b"]" * 200, "application/json"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json"),
        (b'"\xff\xfe"', "application/json"),
        (b"1" * 5000, "application/json"),  # int over Python's 4,300-digit limit
    ],
    ids=[
        "html",
        "text-plain",
        "garbage",
        "empty",
        "nan",
        "dup-keys",
        "deep",
        "deeper",
        "bad-utf8",
        "huge-int",
    ],
)
def test_invalid_responses_are_rejected(body: bytes, ctype: str) -> None:
    with (
        loopback(lambda req: Reply(200, body, {"Content-Type": ctype})) as srv,
        pytest.raises(RemoteToolError) as err,
    ):
        call_http_tool(spec(srv.url, auth="none"), None, {}, idempotency_key=KEY)
    assert err.value.status == 200 and not err.value.retryable
    # No parser exception is attached (it could carry body fragments into logs).
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__
    assert len(srv.requests) == 1


def test_json_suffix_content_types_are_accepted() -> None:
    reply = Reply(
        200, b'{"result": 7}', {"Content-Type": "application/problem+json; charset=utf-8"}
    )
    with loopback(lambda req: reply) as srv:
        assert call_http_tool(spec(srv.url, auth="none"), None, {}, idempotency_key=KEY) == 7


@pytest.mark.parametrize("content_length", [True, False], ids=["declared", "streamed"])
def test_oversized_responses_are_rejected(content_length: bool) -> None:
    big = json.dumps({"result": "x" * 200_000}).encode()
    reply = Reply(200, big, dict(JSON), content_length=content_length)
    with (
        loopback(lambda req: reply) as srv,
        pytest.raises(RemoteToolError, match="65536-byte limit"),
    ):
        call_http_tool(
            spec(srv.url, auth="none"),
            None,
            {},
            idempotency_key=KEY,
            max_response_bytes=65536,
        )


def test_204_returns_none() -> None:
    with loopback(lambda req: Reply(204, b"", {})) as srv:
        assert call_http_tool(spec(srv.url, auth="none"), None, {}, idempotency_key=KEY) is None


def test_redirects_are_not_followed() -> None:
    with (
        loopback(lambda req: Reply(307, b"", {"Location": "http://127.0.0.1:9/steal"})) as srv,
        pytest.raises(RemoteToolError, match="redirects are not followed") as err,
    ):
        call_http_tool(spec(srv.url), SECRET, {}, idempotency_key=KEY)
    assert err.value.status == 307 and len(srv.requests) == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_is_retried_then_reported_retryable() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/tool?token=abc"  # (user:pw@ is refused outright)
    with pytest.raises(RemoteToolError, match="after 3 attempts") as err:
        call_http_tool(spec(url, max_retries=2), SECRET, {}, idempotency_key=KEY)
    assert err.value.retryable and err.value.status is None
    assert "could not connect" in str(err.value)
    assert "token=abc" not in str(err.value)


def test_a_given_client_is_used_and_left_open() -> None:
    with loopback(lambda req: reply_json({"result": 1})) as srv, httpx.Client() as client:
        assert call_http_tool(spec(srv.url), SECRET, {}, idempotency_key=KEY, client=client) == 1
        assert not client.is_closed


def test_async_call_retries_and_times_out() -> None:
    async def main() -> None:
        cache = ReplayCache()
        replies = sequence(Reply(503, b"", {}), reply_json({"result": "async"}))
        with loopback(verifying(SECRET, cache, replies)) as srv:
            assert await acall_http_tool(spec(srv.url), SECRET, {}, idempotency_key=KEY) == "async"
            assert [r.verified is not None for r in srv.requests] == [True, True]
        with loopback(lambda req: Reply(delay=5.0)) as srv:
            started = time.monotonic()
            with pytest.raises(RemoteToolError, match="timed out"):
                await acall_http_tool(
                    spec(srv.url, timeout_ms=300), SECRET, {}, idempotency_key=KEY
                )
            assert time.monotonic() - started < 1.5
            assert len(srv.requests) == 1
        with loopback(lambda req: Reply(200, b"nope", {"Content-Type": "text/plain"})) as srv:
            async with httpx.AsyncClient() as client:
                with pytest.raises(RemoteToolError, match="not application/json"):
                    await acall_http_tool(
                        spec(srv.url), SECRET, {}, idempotency_key=KEY, client=client
                    )

    asyncio.run(main())


def test_config_errors_are_raised_before_sending() -> None:
    with loopback(lambda req: reply_json({"result": 1})) as srv:
        with pytest.raises(ConfigError, match="no secret"):
            call_http_tool(spec(srv.url), None, {}, idempotency_key=KEY)
        with pytest.raises(ConfigError, match="idempotency_key"):
            call_http_tool(spec(srv.url), SECRET, {}, idempotency_key="bad\nkey")
        with pytest.raises(CodecError, match="not JSON"):
            call_http_tool(spec(srv.url), SECRET, {"x": float("nan")}, idempotency_key=KEY)
        with pytest.raises(CodecError, match="not JSON"):
            call_http_tool(spec(srv.url), SECRET, {"x": object()}, idempotency_key=KEY)
        assert srv.requests == []
    with pytest.raises(ConfigError, match="not a remote HTTP tool"):
        call_http_tool(ToolSpec(name="local"), None, {}, idempotency_key=KEY)
    with pytest.raises(ConfigError, match="http:// or https://"):
        call_http_tool(spec("file:///etc/passwd"), SECRET, {}, idempotency_key=KEY)


def test_missing_httpx_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # makes `import httpx` raise ImportError
    with pytest.raises(MissingExtraError, match=r"onceonly-core\[http\]"):
        call_http_tool(spec("http://127.0.0.1:9/"), SECRET, {}, idempotency_key=KEY)


def test_request_body_is_what_was_signed() -> None:
    seen: list[Request] = []

    def handler(req: Request) -> Reply:
        seen.append(req)
        return reply_json({"result": json.loads(req.body)})

    with loopback(handler) as srv:
        payload = {"z": [3, 2, 1], "a": {"nested": True}, "m": None}
        assert call_http_tool(spec(srv.url), SECRET, payload, idempotency_key=KEY) == payload
