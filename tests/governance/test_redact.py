"""Redaction: by key name, by value shape, JSON-safe conversion, and properties: seeded
secrets anywhere in random nested structures never survive into the JSON output."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import random
import re
import uuid
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr

from onceonly_core.governance.redact import (
    DEFAULT_KEYS,
    Redactor,
    default_redactor,
    normalize_key,
)

M = "[REDACTED]"
r = default_redactor


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "API-Key",
        "api_key",
        "apiKey",
        "X-Api-Key",
        "Authorization",
        "db_password",
        "github_token",
        "clientSecret",
        "AWS_SECRET_ACCESS_KEY",
        "card_number",
        "CVV",
        "ssn",
        "Set-Cookie",
        "refresh.token",
        "private key",
    ],
)
def test_secret_key_names_are_masked_whatever_the_value(name: str) -> None:
    out = r.redact({name: {"nested": "x"}, "other": [name]})
    assert out == {name: M, "other": [name]}


@pytest.mark.parametrize(
    "name", ["max_tokens", "token_count", "author", "authority", "user", "amount", "cardinality"]
)
def test_ordinary_key_names_survive(name: str) -> None:
    assert r.redact({name: 5}) == {name: 5}


def test_default_keys_cover_the_documented_names() -> None:
    for name in (
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "access_token",
        "refresh_token",
        "authorization",
        "auth",
        "cookie",
        "card_number",
        "card",
        "cvv",
        "cvc",
        "ssn",
        "private_key",
        "client_secret",
    ):
        assert name in DEFAULT_KEYS
    assert normalize_key("API-Key") == normalize_key("api_key") == normalize_key("apiKey")


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        ("key sk_live_4eC39HqLyjWDarjtT1zdp7dc ok", "4eC39HqLyjWDarjtT1zdp7dc"),
        ("sk_test_abcdefghijkl", "abcdefghijkl"),
        ("rk_live_abcdefghijkl1", "abcdefghijkl1"),
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ("Authorization: Bearer abc.def-123_456", "abc.def-123_456"),
        ("authorization: basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("t=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sflKxwRJSMeKKF2QT4fw", "sflKxwRJSMeKKF2QT4fw"),
        ("AKIAIOSFODNN7EXAMPLE in config", "AKIAIOSFODNN7EXAMPLE"),
        ("ghp_" + "A1b2" * 9, "A1b2A1b2A1b2"),
        ("openai sk-proj-abcdefghijklmnopqrstuv", "abcdefghijklmnopqrstuv"),
        ("card 4242 4242 4242 4242 declined", "4242 4242 4242 4242"),
        ("card 4242-4242-4242-4242", "4242-4242-4242-4242"),
        ("amex 378282246310005.", "378282246310005"),
        ("call 555-1234 4111 1111 1111 1111", "4111 1111 1111 1111"),
        ("https://api.example.com/v1?api_key=abc123&q=1", "abc123"),
        ('{"password": "hunter2", "user": "bob"}', "hunter2"),
        ('{\\"password\\": \\"hunter2\\"}', "hunter2"),
        ("postgresql://app:s3cr3t@db:5432/x", "s3cr3t"),
        ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANB\n-----END PRIVATE KEY-----", "MIIEvQIBADANB"),
    ],
)
def test_secret_shapes_in_text(text: str, gone: str) -> None:
    out = r.redact_text(text)
    assert gone not in out
    assert M in out


@pytest.mark.parametrize(
    "text",
    [
        "basic functionality works",
        "order 4242424242424241 (fails Luhn)",
        "0000 0000 0000 0000",
        "ts 1700000000000 phone +1 415 555 0123",
        "00000000-0000-0000-0000-000000000005",
        "max_tokens: 100, author: Jane",
        "the task-runner-abcdefghijklmnopq",
    ],
)
def test_ordinary_text_survives(text: str) -> None:
    assert r.redact_text(text) == text


def test_only_the_secret_part_is_replaced() -> None:
    assert r.redact_text("Authorization: Bearer abcdefghijkl") == f"Authorization: Bearer {M}"
    assert r.redact_text("pay 4242 4242 4242 4242 now") == f"pay {M} now"
    assert r.redact_text("a=1&token=xyz&b=2") == f"a=1&token={M}&b=2"


class Color(enum.Enum):
    RED = "red"
    KEY = "sk_live_abcdefghijklmnop"


@dataclasses.dataclass
class Login:
    user: str
    password: str


class Account(BaseModel):
    name: str
    api_key: str
    pin: SecretStr


def test_non_json_types_become_json_safe() -> None:
    value = {
        "dec": Decimal("12.50"),
        "when": dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.timezone.utc),
        "day": dt.date(2024, 5, 1),
        "span": dt.timedelta(seconds=90),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "blob": b"\x00\x01\x02",
        "path": PurePosixPath("/tmp/x"),
        "enum": Color.RED,
        "secret_enum": Color.KEY,
        "tuple": (1, 2),
        "set": {3, 1, 2},
        "login": Login("bob", "hunter2"),
        "account": Account(name="acme", api_key="k-123", pin=SecretStr("1234")),
        7: "int key",
        None: "none key",
        "nan": float("nan"),
        "inf": float("-inf"),
        "nul": "a\x00b",
        "surrogate": "x\ud800y",
        "huge": 10**5000,
        "obj": object(),
    }
    out = r.redact(value)
    text = json.dumps(out, allow_nan=False)
    text.encode("utf-8")  # no lone surrogates left
    assert out["dec"] == "12.50"
    assert out["when"] == "2024-05-01T12:30:00+00:00"
    assert out["day"] == "2024-05-01" and out["span"] == 90.0
    assert out["id"] == "12345678-1234-5678-1234-567812345678"
    assert out["blob"] == "<3 bytes>" and out["path"] == "/tmp/x"
    assert out["enum"] == "red" and out["secret_enum"] == M
    assert out["tuple"] == [1, 2] and out["set"] == [1, 2, 3]
    assert out["login"] == {"user": "bob", "password": M}
    assert out["account"] == {"name": "acme", "api_key": M, "pin": M}
    assert out["7"] == "int key" and out["null"] == "none key"
    assert out["nan"] == "NaN" and out["inf"] == "-Infinity"
    assert out["nul"] == "a\ufffdb" and out["surrogate"] == "x\ufffdy"
    assert out["huge"].startswith("<int of")
    assert out["obj"].startswith("<object object")


def test_input_is_not_modified() -> None:
    value = {"password": "x", "list": [{"token": "y"}]}
    r.redact(value)
    assert value == {"password": "x", "list": [{"token": "y"}]}


def test_cycles_depth_and_hostile_objects_never_raise() -> None:
    cyclic: dict[str, Any] = {"a": 1}
    cyclic["self"] = cyclic
    assert r.redact(cyclic) == {"a": 1, "self": "<cycle>"}

    deep: list[Any] = []
    node = deep
    for _ in range(100):
        node.append([])
        node = node[0]
    text = json.dumps(Redactor(max_depth=5).redact(deep))
    assert text == f'[[[[["{M}"]]]]]'

    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("boom")

        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("boom")

    out = r.redact({"h": Hostile(), "ok": 1})
    assert out["ok"] == 1 and isinstance(out["h"], str)
    very_deep: list[Any] = []
    node = very_deep
    for _ in range(50_000):
        node.append([])
        node = node[0]
    assert json.dumps(Redactor(max_depth=10**6).redact(very_deep))  # RecursionError inside


def test_configuration() -> None:
    custom = Redactor(
        keys=["pin"],
        extra_keys=["ticket_id"],
        patterns=[r"ACME-\d{6}", re.compile(r"user=(?P<secret>\w+)")],
        mask="***",
    )
    out = custom.redact(
        {"pin": 1, "ticketId": 2, "password": "kept", "note": "ACME-123456 user=bob"}
    )
    assert out == {"pin": "***", "ticketId": "***", "password": "kept", "note": "*** user=***"}
    # Shapes stay on with custom keys.
    assert custom.redact_text("sk_live_abcdefghijkl") == "***"


def test_colliding_masked_keys_are_both_kept() -> None:
    out = r.redact({"sk_live_aaaaaaaaaaaa": 1, "sk_live_bbbbbbbbbbbb": 2})
    assert sorted(out.values()) == [1, 2]


# -- properties ---------------------------------------------------------------------------
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _rand(rng: random.Random, n: int, alphabet: str = ALNUM) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _luhn_card(rng: random.Random) -> str:
    length = rng.choice([13, 15, 16, 19])
    digits = [rng.choice("3456")] + [rng.choice("0123456789") for _ in range(length - 2)]
    for check in "0123456789":
        cand = "".join(digits) + check
        total = 0
        for i, ch in enumerate(reversed(cand)):
            d = int(ch) * (2 if i % 2 else 1)
            total += d - 9 if d > 9 else d
        if total % 10 == 0:
            break
    sep = rng.choice(["", " ", "-"])
    return sep.join(cand[i : i + 4] for i in range(0, len(cand), 4))


def _shaped_secret(rng: random.Random) -> tuple[str, str]:
    """(text to plant, part that must not survive)."""
    kind = rng.randrange(9)
    if kind == 0:
        tail = _rand(rng, 24)
        return f"{rng.choice(['sk_live_', 'sk_test_', 'rk_live_'])}{tail}", tail
    if kind == 1:
        tok = _rand(rng, 32, ALNUM + "-._~")
        return f"{rng.choice(['Bearer', 'bearer', 'BEARER'])} {tok}", tok
    if kind == 2:
        sig = _rand(rng, 43, ALNUM + "-_")
        return f"eyJ{_rand(rng, 20)}.eyJ{_rand(rng, 30)}.{sig}", sig
    if kind == 3:
        key = "AKIA" + _rand(rng, 16, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
        return key, key
    if kind == 4:
        key = "ghp_" + _rand(rng, 36)
        return key, key[4:]
    if kind == 5:
        card = _luhn_card(rng)
        return card, card
    if kind == 6:
        value = "v" + _rand(rng, 20)
        return f"https://x.test/cb?access_token={value}&page=2", value
    if kind == 7:
        value = "v" + _rand(rng, 20)
        return json.dumps({"client_secret": value}), value
    key = "whsec_" + _rand(rng, 32)
    return key, key[6:]


SECRET_KEY_NAMES = [
    "password",
    "API-Key",
    "apiKey",
    "x_api_key",
    "Authorization",
    "token",
    "refreshToken",
    "card_number",
    "cvv",
    "client-secret",
    "Cookie",
    "ssn",
]

plain = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
)
structures = st.recursive(
    plain,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(alphabet="abcxyz_", max_size=6), inner, max_size=4),
        st.tuples(inner, inner),
    ),
    max_leaves=20,
)


def _plant(value: Any, rng: random.Random, planted: list[str]) -> Any:
    """Put secrets at random places: as values under secret keys, inside strings, as keys."""
    choice = rng.random()
    if isinstance(value, dict):
        out = {k: _plant(v, rng, planted) for k, v in value.items()}
        if choice < 0.4:
            secret = "S" + _rand(rng, 24)
            planted.append(secret)
            nested: Any = secret if rng.random() < 0.5 else {"inner": [secret]}
            out[rng.choice(SECRET_KEY_NAMES)] = nested
        elif choice < 0.6:
            text, gone = _shaped_secret(rng)
            planted.append(gone)
            out[text] = 1
        return out
    if isinstance(value, (list, tuple)):
        items = [_plant(v, rng, planted) for v in value]
        if choice < 0.5:
            text, gone = _shaped_secret(rng)
            planted.append(gone)
            items.insert(rng.randrange(len(items) + 1), text)
        return items if isinstance(value, list) or choice < 0.7 else tuple(items)
    if isinstance(value, str) and choice < 0.5:
        text, gone = _shaped_secret(rng)
        planted.append(gone)
        cut = rng.randrange(len(value) + 1)
        return f"{value[:cut]} {text} {value[cut:]}"
    return value


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(structure=structures, seed=st.integers(0, 2**32))
def test_seeded_secrets_never_survive(structure: Any, seed: int) -> None:
    rng = random.Random(seed)
    planted: list[str] = []
    value = _plant({"args": structure}, rng, planted)
    text, gone = _shaped_secret(rng)  # at least one, always
    planted.append(gone)
    value["note"] = f"see {text}."
    out = json.dumps(r.redact(value), allow_nan=False)
    for secret in planted:
        assert secret not in out, (secret, out)


@given(structure=structures)
def test_output_is_always_json_safe_and_idempotent(structure: Any) -> None:
    once = r.redact(structure)
    json.dumps(once, allow_nan=False).encode("utf-8")
    assert r.redact(once) == once


# Pieces of every built-in shape (and near misses), glued at random: the one search for
# any shape (the fast path that skips the subs) must answer as the patterns do one by one.
_PIECES = [
    "sk_live_", "rk_test_", "pk_", "whsec_", "sk-", "ghp_", "github_pat_", "xoxb-", "AIza",
    "AKIA", "ASIA", "eyJ", "eyJhbGciOi", ".", "Bearer ", "BEARER ", "bearer\t", "Basic ",
    "basic ", "https://", "u:", "p@ss", "@", "host", "-----BEGIN RSA PRIVATE KEY-----",
    "-----END RSA PRIVATE KEY-----", "\n", " ", "A", "Z", "0", "9", "abcdefgh", "ABCDEFGH",
    "12345678", "_-", "+/=", "Zm9vOmJhcg==", "token=", "4242 4242 4242 4242",
]  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join))
def test_one_search_finds_a_shape_where_the_patterns_one_by_one_do(text: str) -> None:
    from onceonly_core.redact import _ANY_DEFAULT, _CARD_RUN, DEFAULT_PATTERNS

    assert (_ANY_DEFAULT.search(text) is not None) == any(p.search(text) for p in DEFAULT_PATTERNS)
    r = Redactor()
    one_by_one = text
    for p in DEFAULT_PATTERNS:
        repl = r._group_replacer() if "secret" in p.groupindex else r.mask
        one_by_one = p.sub(repl, one_by_one)
    assert r.redact_text(text) == _CARD_RUN.sub(r._cards, r._pairs(one_by_one))
