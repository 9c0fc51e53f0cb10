"""Standard Webhooks signing: the published test vector, round trips, every rejection
reason, the replay cache, and a loopback receiver verifying real HTTP requests."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from governance._loopback import Reply, loopback, verifying
from onceonly_core.errors import ConfigError, SignatureError
from onceonly_core.governance.signing import ReplayCache, secret_key, sign, verify

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
NOW = 1_700_000_000

ids = st.from_regex(r"\A[A-Za-z0-9_:\-]{1,64}\Z")
secrets = st.one_of(st.binary(min_size=1, max_size=64), st.text(min_size=1, max_size=64))


def test_standard_webhooks_reference_vector() -> None:
    # Published by Standard Webhooks / svix: a receiver library must accept what we send.
    headers = sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        b'{"test": 2432232314}',
        msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
        timestamp=1614265330,
    )
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }


@given(secret=secrets, body=st.binary(max_size=2048), msg_id=ids, ts=st.integers(0, 2**40))
def test_sign_verify_round_trip(secret: str | bytes, body: bytes, msg_id: str, ts: int) -> None:
    headers = sign(secret, body, msg_id=msg_id, timestamp=ts)
    assert verify(secret, headers, body, now=ts) == msg_id


@given(body=st.binary(min_size=1, max_size=512), data=st.data())
def test_any_altered_byte_is_rejected(body: bytes, data: st.DataObject) -> None:
    headers = sign(SECRET, body, msg_id="msg_1", timestamp=NOW)
    i = data.draw(st.integers(0, len(body) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = body[:i] + bytes([body[i] ^ flip]) + body[i + 1 :]
    with pytest.raises(SignatureError, match="no matching signature"):
        verify(SECRET, headers, tampered, now=NOW)


def test_header_names_are_case_insensitive() -> None:
    headers = {k.upper(): v for k, v in sign(SECRET, b"{}", timestamp=NOW).items()}
    assert verify(SECRET, headers, b"{}", now=NOW).startswith("msg_")


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header(name: str) -> None:
    headers = sign(SECRET, b"{}", timestamp=NOW)
    del headers[name]
    with pytest.raises(SignatureError, match=f"missing {name}"):
        verify(SECRET, headers, b"{}", now=NOW)


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("webhook-timestamp", "12.5", "malformed webhook-timestamp"),
        ("webhook-timestamp", "soon", "malformed webhook-timestamp"),
        ("webhook-id", "msg.1", "malformed webhook-id"),
        ("webhook-signature", "garbage", "no v1 signature"),
        ("webhook-signature", "v1a,AAAA", "no v1 signature"),
        ("webhook-signature", "v1,not base64!", "no v1 signature"),
        ("webhook-signature", "v1," + "A" * 5000, "too long"),
    ],
)
def test_malformed_headers(name: str, value: str, match: str) -> None:
    headers = sign(SECRET, b"{}", timestamp=NOW)
    headers[name] = value
    with pytest.raises(SignatureError, match=match):
        verify(SECRET, headers, b"{}", now=NOW)


def test_stale_and_future_timestamps() -> None:
    old = sign(SECRET, b"{}", timestamp=NOW - 301)
    with pytest.raises(SignatureError, match="too old"):
        verify(SECRET, old, b"{}", now=NOW)
    future = sign(SECRET, b"{}", timestamp=NOW + 301)
    with pytest.raises(SignatureError, match="too far in the future"):
        verify(SECRET, future, b"{}", now=NOW)
    # Inside the tolerance in both directions.
    verify(SECRET, sign(SECRET, b"{}", timestamp=NOW - 299), b"{}", now=NOW)
    verify(SECRET, sign(SECRET, b"{}", timestamp=NOW + 299), b"{}", now=NOW)


def test_wrong_secret_is_rejected() -> None:
    headers = sign(SECRET, b"{}", timestamp=NOW)
    with pytest.raises(SignatureError, match="no matching signature"):
        verify(
            "whsec_" + base64.b64encode(b"another secret, 24 bytes").decode(),
            headers,
            b"{}",
            now=NOW,
        )


def test_rotation_any_v1_signature_matches() -> None:
    new = sign("new-secret", b"{}", msg_id="msg_r", timestamp=NOW)
    old = sign("old-secret", b"{}", msg_id="msg_r", timestamp=NOW)
    both = dict(new, **{"webhook-signature": f"v1a,xyz {old['webhook-signature']} v1,!!"})
    both["webhook-signature"] += " " + new["webhook-signature"]
    assert verify("new-secret", both, b"{}", now=NOW) == "msg_r"
    assert verify("old-secret", both, b"{}", now=NOW) == "msg_r"


def test_secret_forms() -> None:
    raw = b"0123456789abcdef0123456789abcdef"
    assert secret_key(SECRET) == raw
    assert secret_key(raw) == raw
    assert secret_key("plain text secret") == b"plain text secret"
    body = b'{"a":1}'
    assert verify(raw, sign(SECRET, body, timestamp=NOW), body, now=NOW)
    with pytest.raises(ConfigError, match="base64") as err:
        secret_key("whsec_not*base64*at*all")
    assert "not*base64" not in str(err.value)  # the secret is never echoed
    with pytest.raises(ConfigError, match="empty"):
        sign("", b"{}")
    with pytest.raises(ConfigError, match=r"no '\.'"):
        sign(SECRET, b"{}", msg_id="has.dot")


def test_replay_is_rejected_and_a_re_signed_retry_is_not() -> None:
    cache = ReplayCache()
    first = sign(SECRET, b"{}", msg_id="msg_a", timestamp=NOW)
    assert verify(SECRET, first, b"{}", now=NOW, replay=cache) == "msg_a"
    with pytest.raises(SignatureError, match="replayed"):
        verify(SECRET, first, b"{}", now=NOW + 1, replay=cache)
    # The sender's retry: same id, signed again for a new timestamp.
    retry = sign(SECRET, b"{}", msg_id="msg_a", timestamp=NOW + 2)
    assert verify(SECRET, retry, b"{}", now=NOW + 2, replay=cache) == "msg_a"


def test_forged_requests_do_not_burn_ids() -> None:
    # The replay check runs after the signature check: a forgery with a real id and
    # timestamp must not make the genuine message look replayed.
    cache = ReplayCache()
    genuine = sign(SECRET, b"{}", msg_id="msg_b", timestamp=NOW)
    forged = dict(genuine, **{"webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()})
    with pytest.raises(SignatureError, match="no matching"):
        verify(SECRET, forged, b"{}", now=NOW, replay=cache)
    assert verify(SECRET, genuine, b"{}", now=NOW, replay=cache) == "msg_b"


def test_replay_cache_expires_and_is_bounded() -> None:
    cache = ReplayCache(tolerance=10, max_entries=3)
    assert not cache.seen("a", 100, now=100)
    assert cache.seen("a", 100, now=105)
    assert not cache.seen("a", 100, now=111)  # expired: verify() would call it stale anyway
    for i in range(10):
        cache.seen(f"m{i}", 200 + i, now=200 + i)
    assert len(cache) == 3
    assert cache.seen("m9", 209, now=209)  # the newest survive eviction
    assert not cache.seen("late", 1, now=300)  # already stale: not kept
    assert len(cache) <= 3


def test_replay_cache_is_thread_safe() -> None:
    cache = ReplayCache()
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        results.append(cache.seen("same", NOW, now=NOW))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(False) == 1 and results.count(True) == 15


def test_loopback_receiver_verifies_real_requests() -> None:
    cache = ReplayCache()
    with loopback(verifying(SECRET, cache, Reply(200, b"{}"))) as srv, httpx.Client() as http:

        def post(headers: dict[str, str], body: bytes) -> int:
            return http.post(srv.url, content=body, headers=headers).status_code

        body = b'{"amount":100}'
        valid = sign(SECRET, body)
        assert post(valid, body) == 200
        assert post(valid, body) == 401  # replayed verbatim
        assert post(sign(SECRET, body, timestamp=int(time.time()) - 600), body) == 401  # stale
        assert post(sign(SECRET, body), b'{"amount":999}') == 401  # tampered body
        assert post(sign("whsec_" + base64.b64encode(b"w" * 24).decode(), body), body) == 401
        assert post({}, body) == 401
        reasons = [r.verified for r in srv.requests]
        assert reasons[0] == valid["webhook-id"] and reasons[1:] == [None] * 5
