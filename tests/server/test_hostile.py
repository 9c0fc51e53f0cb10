"""Hostile input against every ``/v1`` endpoint family: never a 5xx (DESIGN §9b).

The published client fails open on a 5xx, so a 5xx answered to input the caller controls
is a double execution. Every case here runs against a real uvicorn server on SQLite,
PostgreSQL and MariaDB (``db_url``): NUL characters, lone surrogates, ``1e400``, NaN,
``2**64``, nesting 10,000 deep, multi-megabyte bodies, wrong content types and odd
headers, sent over HTTP and as raw bytes on a socket.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from onceonly import OnceOnly

from onceonly_core.limits import MAX_JSON_DEPTH

Running = Any  # tests/server/conftest.py: Running

pytestmark = pytest.mark.timeout(300)


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


# -- the hostile values ---------------------------------------------------------------------
# JSON text (not Python values): NaN, 1e400 and lone surrogates only exist as wire text.
HOSTILE_SCALARS: dict[str, str] = {
    "nul": '"a\\u0000b"',
    "nul_only": '"\\u0000"',
    "lone_surrogate": '"a\\ud800b"',
    "low_surrogate": '"\\udfff"',
    "big_float": "1e400",
    "neg_big_float": "-1e400",
    "nan": "NaN",
    "infinity": "Infinity",
    "neg_infinity": "-Infinity",
    "int_2_64": str(2**64),
    "int_neg_2_64": str(-(2**64)),
    "int_5000_digits": "9" * 5000,
    "deep_list": "[" * 10_000 + "]" * 10_000,
    "deep_dict": '{"a":' * 10_000 + "1" + "}" * 10_000,
    "just_deep": "[" * (MAX_JSON_DEPTH + 2) + "]" * (MAX_JSON_DEPTH + 2),
    "long_string": json.dumps("x" * 300_000),
    "emoji": '"\U0001f4a5\u200d\u202e"',
    "control": '"\\u0001\\n\\t\\u007f"',
    "empty": '""',
    "object": '{"$": "float", "v": "nan"}',
    "neg": "-1",
    "huge_ok_int": str(2**63 - 1),
    "huge_finite": "1e300",
    "spend_1e13": "1e13",  # USD: past 64-bit micro-dollars
    "tiny": "5e-324",
}

# Raw bodies that are not JSON objects at all.
HOSTILE_BODIES: dict[str, bytes] = {
    "not_json": b"{not json",
    "truncated": b'{"key": "a',
    "latin1": b'{"key": "\xff\xfe"}',
    "utf16": '{"key": "k"}'.encode("utf-16"),
    "bom": b'\xef\xbb\xbf{"key": "k"}',
    "array": b"[1, 2, 3]",
    "string": b'"key"',
    "null": b"null",
    "multi_mb": b'{"key": "' + b"x" * (3 * 1024 * 1024) + b'"}',
    "multi_mb_nested": b'{"args": ' + b"[" * 500_000 + b"]" * 500_000 + b"}",
    "nul_bytes": b'{"key": "a\x00b"}',
    "dup_keys": b'{"key": "a", "key": "b\\u0000"}',
}

# The POST endpoints and the fields to poison. {lease} is replaced by a live lease id.
POSTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/check-lock", {"key": "k", "ttl": 60, "metadata": {"m": 1}}),
    ("/v1/ai/lease", {"key": "k", "ttl": 60, "metadata": {"run_id": "r"}}),
    ("/v1/ai/run", {"key": "job", "metadata": {"m": 1}}),
    ("/v1/ai/run", {"agent_id": "bot", "tool": "echo", "args": {"x": 1}, "spend_usd": 0.5}),
    ("/v1/ai/extend", {"key": "held", "lease_id": "{lease}", "ttl": 60}),
    ("/v1/ai/complete", {"key": "held", "lease_id": "{lease}", "result": {"r": 1}}),
    ("/v1/ai/fail", {"key": "held", "lease_id": "{lease}", "error_code": "e"}),
    ("/v1/ai/cancel", {"key": "held", "lease_id": "{lease}", "reason": "r"}),
    ("/v1/events", {"run_id": "run", "type": "custom", "message": "m", "data": {"d": 1}}),
    ("/v1/me/notifications", {"email_notifications_enabled": True}),
    ("/v1/policies/bot", {"max_actions_per_hour": 10, "allowed_tools": ["echo"]}),
    ("/v1/policies/bot/from-template", {"template": "permissive", "overrides": {}}),
    ("/v1/agents/bot/disable", {"reason": "r"}),
    ("/v1/agents/bot/enable", {}),
    (
        "/v1/tools",
        {"name": "remote1", "url": "https://tools.example.com/x", "description": "d"},
    ),
    ("/v1/tools/remote1/toggle", {"enabled": True}),
]

# GET/DELETE paths, each with a spot ("{}") for a hostile percent-encoded value.
GETS: list[tuple[str, str]] = [
    ("GET", "/v1/me?x={}"),
    ("GET", "/v1/usage?kind={}"),
    ("GET", "/v1/usage/all?x={}"),
    ("GET", "/v1/metrics?from_day={}&to_day=2024-01-01"),
    ("GET", "/v1/ai/status?key={}"),
    ("GET", "/v1/ai/result?key={}"),
    ("GET", "/v1/events?limit={}"),
    ("GET", "/v1/runs/{}"),
    ("GET", "/v1/policies"),
    ("GET", "/v1/policies/{}"),
    ("GET", "/v1/agents/{}/logs"),
    ("GET", "/v1/agents/{}/metrics?period=day"),
    ("GET", "/v1/tools?scope_id={}"),
    ("GET", "/v1/tools/{}"),
    ("DELETE", "/v1/tools/{}?scope_id={}"),
]

URL_VALUES = [
    "%00",
    "a%00b",
    "%ED%A0%80",  # a surrogate's UTF-8 bytes: not valid UTF-8
    "%FF%FE",
    "%C0%80",  # overlong NUL
    "1e400",
    "NaN",
    "-Infinity",
    str(2**64),
    "9" * 5000,
    "x" * 8000,
    "%25",
    "..%2F..%2F",
    "%0d%0aSet-Cookie:x",
]


def _poisoned(template: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(case name, JSON text): each field in turn replaced by each hostile scalar, and a
    hostile value nested inside each object field."""
    for field in template:
        for name, raw in HOSTILE_SCALARS.items():
            parts = [
                f"{json.dumps(k)}: {raw if k == field else json.dumps(v)}"
                for k, v in template.items()
            ]
            yield f"{field}={name}", "{" + ", ".join(parts) + "}"
    for name, raw in HOSTILE_SCALARS.items():
        for field, value in template.items():
            if isinstance(value, dict):
                inner = '{"h": ' + raw + ', "h\\u0000": 1}'
                parts = [
                    f"{json.dumps(k)}: {inner if k == field else json.dumps(v)}"
                    for k, v in template.items()
                ]
                yield f"{field}.h={name}", "{" + ", ".join(parts) + "}"


@pytest.fixture
def hostile_srv(db_url: str, make_server: Callable[..., Running]) -> Iterator[tuple[Running, str]]:
    srv = make_server(db_url, migrate=True)
    tenant = _tenant()
    key = srv.key(tenant)
    srv.cp.register_tool(tenant, "echo", lambda **kw: kw)
    # No spend cap: a huge spend reaches the counters instead of being blocked first.
    srv.cp.guard(tenant).gov.policy_from_template(
        "bot", "permissive", {"max_spend_usd_per_day": None}
    )
    yield srv, key


def _lease(http: httpx.Client, key: str) -> str:
    r = http.post("/v1/ai/lease", json={"key": key, "ttl": 600})
    assert r.status_code == 200, r.text
    return str(r.json()["lease_id"])


def test_hostile_bodies_never_get_a_5xx(hostile_srv: tuple[Running, str]) -> None:
    srv, key = hostile_srv
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    base = srv.base_url.removesuffix("/v1")
    seen: dict[int, int] = {}
    bad: list[str] = []
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        lease = _lease(http, "held")
        for path, template in POSTS:
            tmpl = {k: (lease if v == "{lease}" else v) for k, v in template.items()}
            ok = http.post(path, content=json.dumps(tmpl))
            assert ok.status_code < 500, (path, ok.text)
            cases = list(_poisoned(tmpl))
            for name, text in cases:
                r = http.post(path, content=text.encode("utf-8", "surrogatepass"))
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
                if r.status_code >= 500:
                    bad.append(f"{path} {name}: {r.status_code} {r.text[:200]}")
                elif r.status_code == 422:
                    # The client prints a string detail for 422.
                    assert isinstance(r.json()["detail"], str), (path, name, r.text)
            for name, body in HOSTILE_BODIES.items():
                for ctype in ("application/json", "text/plain", None):
                    h = {"Content-Type": ctype} if ctype else {"Content-Type": ""}
                    try:
                        r = http.post(path, content=body, headers=h)
                    except httpx.TransportError:
                        # 413 answered before the upload finished: the server hung up.
                        assert len(body) > 1_048_576, (path, name)
                        continue
                    seen[r.status_code] = seen.get(r.status_code, 0) + 1
                    if r.status_code >= 500:
                        bad.append(f"{path} {name} ({ctype}): {r.status_code} {r.text[:200]}")
    assert not bad, "\n".join(bad[:40])
    assert seen.get(422, 0) > 100  # the cases reached the checks, not just the auth


def test_hostile_urls_never_get_a_5xx(hostile_srv: tuple[Running, str]) -> None:
    srv, key = hostile_srv
    base = srv.base_url.removesuffix("/v1")
    bad: list[str] = []
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        for method, template in GETS:
            for value in URL_VALUES:
                # httpx would re-encode a raw "%": build the target by hand.
                target = template.replace("{}", value)
                r = http.request(method, httpx.URL(base + target))
                if r.status_code >= 500:
                    bad.append(f"{method} {target[:80]}: {r.status_code} {r.text[:200]}")
    assert not bad, "\n".join(bad[:40])


def _raw(port: int, request: bytes) -> int | None:
    """Send raw bytes; the status code of the answer, or None if the server hung up."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(request)
            while len(data) < 12:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:  # reset while sending or reading: the server refused the request
            pass
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data[9:12])


def test_odd_headers_never_get_a_5xx(hostile_srv: tuple[Running, str]) -> None:
    srv, key = hostile_srv
    port = int(srv.base_url.split(":")[2].split("/")[0])
    body = b'{"key": "hdr", "ttl": 60}'
    auth = f"Authorization: Bearer {key}\r\n".encode()

    def req(headers: bytes, payload: bytes = body, path: bytes = b"/v1/check-lock") -> bytes:
        head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        return head + headers + b"\r\n" + payload

    cl = f"Content-Length: {len(body)}\r\n".encode()
    ctype = b"Content-Type: application/json\r\n"
    cases = {
        "request_id_latin1": auth + cl + ctype + b"X-Request-Id: a\xff\xfe\x80\r\n",
        "request_id_long": auth + cl + ctype + b"X-Request-Id: " + b"r" * 60_000 + b"\r\n",
        "request_id_nul": auth + cl + ctype + b"X-Request-Id: a\x00b\r\n",
        "auth_latin1": b"Authorization: Bearer \xff\xfe\r\n" + cl + ctype,
        "auth_nul": b"Authorization: Bearer oo_\x00\r\n" + cl + ctype,
        "auth_scheme_only": b"Authorization: Bearer\r\n" + cl + ctype,
        "auth_twice": auth + auth + cl + ctype,
        "auth_huge": b"Authorization: Bearer " + b"k" * 100_000 + b"\r\n" + cl + ctype,
        "content_type_odd": auth + cl + b"Content-Type: application/json; charset=utf-16\r\n",
        "content_type_form": auth + cl + b"Content-Type: multipart/form-data; boundary=x\r\n",
        "content_type_garbage": auth + cl + b"Content-Type: \xff/\x01\r\n",
        "length_short": auth + b"Content-Length: 3\r\n" + ctype,
        "length_negative": auth + b"Content-Length: -5\r\n" + ctype,
        "length_huge": auth + b"Content-Length: 99999999999999999999\r\n" + ctype,
        "length_twice": auth + cl + cl.replace(b": ", b": 1") + ctype,
        "chunked_bad": auth + b"Transfer-Encoding: chunked\r\n" + ctype,
        "chunked_and_length": auth + cl + b"Transfer-Encoding: chunked\r\n" + ctype,
        "expect": auth + cl + ctype + b"Expect: 100-continue\r\n",
        "many_headers": auth + cl + ctype + b"".join(b"X-%d: v\r\n" % i for i in range(500)),
    }
    bad = []
    for name, headers in cases.items():
        status = _raw(port, req(headers))
        if status is not None and status >= 500:
            bad.append(f"{name}: {status}")
    assert not bad, bad
    # And the server still answers.
    assert _raw(port, req(auth + cl + ctype)) == 200


# -- the unmodified client: a hostile key never runs twice ----------------------------------
HOSTILE_KEYS = [
    "a\x00b",
    "\x00",
    "a\ud800b",
    "k" * 256,
    "k" * 255,
    "\U0001f4a5 \u202e key",
    "line\nbreak",
    " padded ",
    "%00",
    "../../etc",
]


@pytest.mark.parametrize("how", ["check_lock", "run_fn"])
def test_client_never_runs_a_hostile_key_twice(hostile_srv: tuple[Running, str], how: str) -> None:
    """Two callers of the same hostile key with the published client (fail_open on, as
    shipped): at most one proceeds, and exactly one when the server accepts the key."""
    srv, api_key = hostile_srv
    for hostile in HOSTILE_KEYS:
        proceeded: list[str] = []
        refused: list[BaseException] = []
        barrier = threading.Barrier(2)

        def call(
            key: str = hostile,
            proceeded: list[str] = proceeded,
            refused: list[BaseException] = refused,
            barrier: threading.Barrier = barrier,
        ) -> None:
            c = OnceOnly(api_key, base_url=srv.base_url)
            try:
                barrier.wait()
                try:
                    if how == "check_lock":
                        if c.check_lock(key, ttl=60).locked:
                            proceeded.append(key)
                    else:
                        c.ai.run_fn(
                            key, lambda: proceeded.append(key), ttl=60, wait_on_conflict=False
                        )
                except Exception as err:  # a 4xx: the caller does not proceed
                    refused.append(err)
            finally:
                c.close()

        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(proceeded) <= 1, (hostile, proceeded)
        if not refused:
            assert len(proceeded) == 1, hostile


HOSTILE_RESULTS: list[Any] = [
    {"v": float("nan")},
    {"v": float("inf")},
    {"v": 2**64},
    {"v": "a\x00b"},
    {"v": "a\ud800b"},
    {"v": "x" * (2 * 1024 * 1024)},
    {"v": json.loads("[" * 100 + "]" * 100)},
]


@pytest.mark.parametrize("n", range(len(HOSTILE_RESULTS)))
def test_client_run_fn_never_reruns_after_a_hostile_result(
    hostile_srv: tuple[Running, str], n: int
) -> None:
    """run_fn whose result the server refuses (or stores): a second run_fn of the key
    does not run the function again."""
    srv, api_key = hostile_srv
    runs: list[int] = []
    key = f"fn-{n}"

    def fn() -> Any:
        runs.append(1)
        return HOSTILE_RESULTS[n]

    for _ in range(2):
        c = OnceOnly(api_key, base_url=srv.base_url)
        try:
            c.ai.run_fn(key, fn, ttl=60, wait_on_conflict=False)
        except Exception:  # the first caller's complete was refused: its fn ran, it raised
            pass
        finally:
            c.close()
    assert runs == [1]


def test_tool_results_no_backend_can_hold_never_get_a_5xx(hostile_srv: tuple[Running, str]) -> None:
    """A local tool's NaN goes out as null; a result over max_result_bytes runs once and
    its replay is a 409 (the key's state), never a 5xx the client would fail open on."""
    srv, key = hostile_srv
    tenant = srv.cp.keys.authenticate(key).tenant
    runs: list[str] = []

    def odd(kind: str) -> object:
        runs.append(kind)
        if kind == "nan":
            return {"v": float("nan"), "w": [float("inf")]}
        return "x" * (9 * 1024 * 1024)  # over the 8 MiB default

    srv.cp.register_tool(tenant, "odd", odd)
    base = srv.base_url.removesuffix("/v1")
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
        body = {"agent_id": "bot", "tool": "odd", "args": {"kind": "nan"}}
        for _ in range(2):
            r = h.post("/v1/ai/run", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["result"] == {"v": None, "w": [None]}
        body = {"agent_id": "bot", "tool": "odd", "args": {"kind": "big"}}
        r = h.post("/v1/ai/run", json=body)
        assert r.status_code == 200 and len(r.json()["result"]["value"]) == 9 * 1024 * 1024
        for _ in range(2):
            r = h.post("/v1/ai/run", json=body)
            assert r.status_code == 409, r.text
            assert r.json()["detail"]["error"] == "result_not_stored"
    assert runs == ["nan", "big"]


def test_the_server_refuses_a_ledger_it_cannot_serve_with_a_clear_error() -> None:
    # Tenants, keys and jobs live in SQL tables: memory and Redis ledgers are refused at
    # construction with a ConfigError (an operator error), never an assertion.
    from onceonly_core.errors import ConfigError
    from onceonly_core.server.control import ControlPlane

    for url in ("memory://", "redis://127.0.0.1:6379/0"):
        with pytest.raises(ConfigError, match="needs a SQL ledger"):
            ControlPlane(url)
