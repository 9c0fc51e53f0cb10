"""Keys that never repeat (issue 16, item 4; docs/keys.md "Keys that never repeat").

A tool called again and again with arguments that differ only in a timestamp, a fresh uuid
or a nonce gets a new key every time, so a retry is never deduplicated. The check warns
once per tool, scope and argument on the ``onceonly.keyhealth`` logger, and stays silent for
stable arguments, for business values, when the key leaves the volatile value out, and when
it is switched off.

The pure check (:class:`KeyHealth`) runs on an injected clock; the guard's wiring runs
through real guarded calls on the ledgers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from onceonly_core import Guard
from onceonly_core import keyhealth as kh
from onceonly_core.keyhealth import KeyHealth, volatile_kind

NOW = 1_796_500_000.0  # 2026-12-06, the fake wall clock of the pure tests
UTC = dt.timezone.utc


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(clock: Clock) -> KeyHealth:
    return KeyHealth(clock=clock, monotonic=clock)


Logged = Callable[[], list[logging.LogRecord]]


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[Logged]:
    """The key-health warnings logged so far (they propagate to the "onceonly" logger)."""
    with caplog.at_level(logging.WARNING, logger="onceonly"):
        yield lambda: [r for r in caplog.records if r.name == "onceonly.keyhealth"]


_rng = random.Random(16)


def _b64_token() -> str:
    # A token_urlsafe()-like nonce from a seeded generator (deterministic test data).
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    while True:
        token = "".join(_rng.choice(alphabet) for _ in range(22))
        if kh._random_id(token):  # the ~5% that read as words are not what this tests
            return token


# Each maker gives a fresh volatile value for the i-th call at wall time t.
VOLATILE: dict[str, Callable[[int, float], Any]] = {
    "aware datetime": lambda i, t: dt.datetime.fromtimestamp(t, UTC),
    "naive datetime (UTC)": lambda i, t: dt.datetime.fromtimestamp(t, UTC).replace(tzinfo=None),
    "naive datetime (local)": lambda i, t: dt.datetime.fromtimestamp(t),
    "ISO string": lambda i, t: dt.datetime.fromtimestamp(t, UTC).isoformat(),
    "ISO string with Z": lambda i, t: dt.datetime.fromtimestamp(t, UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    ),
    "ISO basic format": lambda i, t: dt.datetime.fromtimestamp(t, UTC).strftime("%Y%m%dT%H%M%SZ"),
    "epoch seconds": lambda i, t: int(t),
    "epoch seconds, float": lambda i, t: t + 0.25,
    "epoch milliseconds": lambda i, t: int(t * 1000),
    "epoch nanoseconds": lambda i, t: int(t * 1e9),
    "epoch seconds as text": lambda i, t: str(int(t)),
    "uuid.UUID": lambda i, t: uuid.uuid4(),
    "uuid string": lambda i, t: str(uuid.uuid4()),
    "uuid hex": lambda i, t: uuid.uuid4().hex,
    "uuid1": lambda i, t: uuid.uuid1(),
    "hex nonce": lambda i, t: f"{_rng.getrandbits(128):032x}",
    "base64 nonce": lambda i, t: _b64_token(),
    "ULID": lambda i, t: (
        "01" + "".join(_rng.choice("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for _ in range(24))
    ),
}


def calls(
    health: KeyHealth, clock: Clock, make: Callable[[int, float], dict[str, Any]], n: int = 3
) -> None:
    for i in range(n):
        clock.t += 1.0  # each call a second later, as retries come
        health.observe("shop.send", "default", make(i, clock.t))


@pytest.mark.parametrize("kind", list(VOLATILE))
def test_warns_once_for_a_volatile_argument(
    kind: str, health: KeyHealth, clock: Clock, logged: Logged
) -> None:
    value = VOLATILE[kind]
    calls(health, clock, lambda i, t: {"to": "a@example.com", "body": "hi", "stamp": value(i, t)})
    [rec] = logged()
    assert rec.levelno == logging.WARNING
    msg = rec.getMessage()
    assert "shop.send" in msg and "'stamp'" in msg and "'default'" in msg
    # The fix, spelled out: exclude the volatile argument or key on the stable ones.
    assert "exclude=['stamp']" in msg
    assert "key_args=['to', 'body']" in msg
    assert rec.onceonly_args == ["stamp"]
    # Once: more calls like these say nothing more.
    calls(
        health, clock, lambda i, t: {"to": "a@example.com", "body": "hi", "stamp": value(i, t)}, 10
    )
    assert len(logged()) == 1


def test_two_calls_are_not_yet_a_pattern(health: KeyHealth, clock: Clock, logged: Logged) -> None:
    calls(health, clock, lambda i, t: {"to": "a", "at": dt.datetime.fromtimestamp(t, UTC)}, 2)
    assert logged() == []
    calls(health, clock, lambda i, t: {"to": "a", "at": dt.datetime.fromtimestamp(t, UTC)}, 1)
    assert len(logged()) == 1


@dataclasses.dataclass
class Order:
    id: str
    created_at: dt.datetime


class Refund(pydantic.BaseModel):
    order_id: str
    requested_at: str


@pytest.mark.parametrize(
    ("make", "path"),
    [
        (
            lambda i, t: {"order": {"id": "o-1", "created_at": dt.datetime.fromtimestamp(t, UTC)}},
            "order.created_at",
        ),
        (
            lambda i, t: {"order": Order("o-1", dt.datetime.fromtimestamp(t, UTC))},
            "order.created_at",
        ),
        (
            lambda i, t: {"refund": Refund(order_id="o-1", requested_at=str(int(t * 1000)))},
            "refund.requested_at",
        ),
        (lambda i, t: {"items": [{"sku": "A", "ts": int(t)}], "n": 1}, "items[0].ts"),
        (
            lambda i, t: {"meta": {"trace": {"request_id": f"r{i}"}}, "x": 1},
            "meta.trace.request_id",
        ),
    ],
    ids=["dict", "dataclass", "pydantic", "list", "per-call name"],
)
def test_names_nested_paths(
    make: Callable[[int, float], dict[str, Any]],
    path: str,
    health: KeyHealth,
    clock: Clock,
    logged: Logged,
) -> None:
    calls(health, clock, make)
    [rec] = logged()
    assert rec.onceonly_args == [path]
    msg = rec.getMessage()
    assert repr(path) in msg
    # exclude= drops whole arguments: for a field inside one, the fix is a key= function
    # (or key_args= on the other arguments, when there are any).
    assert "a key= built from the stable fields of" in msg
    assert "exclude=[" not in msg


def test_once_per_tool_scope_and_argument(health: KeyHealth, clock: Clock, logged: Logged) -> None:
    def stamped(tool: str, scope: str, arg: str) -> None:
        for _ in range(3):
            clock.t += 1.0
            health.observe(tool, scope, {"to": "a", arg: int(clock.t)})

    stamped("t1", "s1", "sent_at")
    stamped("t1", "s1", "sent_at")
    assert len(logged()) == 1
    stamped("t1", "s1", "queued_at")  # another argument of the same tool: its own warning
    stamped("t1", "s2", "sent_at")  # another scope
    stamped("t2", "s1", "sent_at")  # another tool
    named = [(r.onceonly_tool, r.onceonly_scope, r.onceonly_args) for r in logged()]
    assert named == [
        ("t1", "s1", ["sent_at"]),
        ("t1", "s1", ["queued_at"]),
        ("t1", "s2", ["sent_at"]),
        ("t2", "s1", ["sent_at"]),
    ]


def test_several_volatile_arguments_in_one_warning(
    health: KeyHealth, clock: Clock, logged: Logged
) -> None:
    calls(
        health,
        clock,
        lambda i, t: {"to": "a", "at": int(t), "request_id": str(uuid.uuid4())},
    )
    [rec] = logged()
    assert rec.onceonly_args == ["at", "request_id"]
    assert "exclude=['at', 'request_id'] (or key_args=['to'])" in rec.getMessage()


# -- silence -----------------------------------------------------------------------------
SILENT: dict[str, Callable[[int, float], dict[str, Any]]] = {
    "stable arguments": lambda i, t: {"to": "a@example.com", "amount": 5, "at": "2026-01-01"},
    "different emails": lambda i, t: {"to": f"user{i}@example.com", "body": "hi"},
    "different amounts": lambda i, t: {"customer": "c-1", "amount": 100 + i},
    "customer ids that are uuids": lambda i, t: {"customer_id": str(uuid.uuid4()), "amount": 5},
    "customerId objects": lambda i, t: {"customerId": uuid.uuid4(), "amount": 5},
    "provider ids": lambda i, t: {"customer": f"cus_{uuid.uuid4().hex[:14]}", "amount": 5},
    "ids made from the clock": lambda i, t: {"order_id": int(t * 1000), "action": "cancel"},
    "versions stamped with a time": lambda i, t: {"doc": "d1", "version": int(t)},
    "content digests": lambda i, t: {"path": "a.txt", "sha256": uuid.uuid4().hex * 2},
    "titles": lambda i, t: {"title": f"QuarterlyReport{2020 + i}Final", "owner": "bob"},
    "business and volatile both differ": lambda i, t: {"to": f"u{i}@x.org", "at": int(t)},
    "old timestamps": lambda i, t: {"to": "a", "since": int(t) - 30 * 86_400 + i},
    "scheduled times": lambda i, t: {"user": "u1", "remind_at": int(t) + 3600 * (i + 1)},
    "dates": lambda i, t: {"report": "sales", "day": dt.date(2026, 12, 1 + i)},
    "request text": lambda i, t: {"request": f"refund order {i}", "priority": 1},
}


@pytest.mark.parametrize("case", list(SILENT))
def test_silent_for(case: str, health: KeyHealth, clock: Clock, logged: Logged) -> None:
    calls(health, clock, SILENT[case], 6)
    assert logged() == []


def test_silent_when_the_key_leaves_the_volatile_value_out(
    health: KeyHealth, clock: Clock, logged: Logged
) -> None:
    for _ in range(6):
        clock.t += 1.0
        args = {"to": "a", "body": "hi", "sent_at": int(clock.t)}
        health.observe("t", "s", args, key_args=("to", "body"))
        health.observe("t", "s", args, exclude=("sent_at",))
        health.observe("t", "s", args, explicit_key=True)
        health.observe("t", "s", args, unlimited=True)
    assert logged() == []
    # key_args that keep the volatile argument do not hide it.
    calls(health, clock, lambda i, t: {"to": "a", "sent_at": int(t)})
    assert len(logged()) == 1


def test_a_slow_trickle_is_not_a_retry(health: KeyHealth, clock: Clock, logged: Logged) -> None:
    # The same call once an hour and a bit (a daily digest, a poller): not retries.
    for _ in range(5):
        clock.t += kh.WINDOW + 1
        health.observe("digest", "s", {"user": "u1", "at": int(clock.t)})
    assert logged() == []


def test_never_raises(health: KeyHealth, logged: Logged) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("binding failed")

    health.observe("t", "s", broken)
    health.observe("t", "s", {"x": object(), "y": [{1, 2}], "z": {"k": [[[[[[[[1]]]]]]]]}})
    health.observe("t", None, {"n": 10**400, "f": float("nan"), "d": dt.datetime.max})
    for _ in range(3):  # too big to walk: skipped, whole
        health.observe("big", "s", {"rows": list(range(10**5)), "at": dt.datetime.now(UTC)})
    assert logged() == []


# -- cost and memory ---------------------------------------------------------------------
def test_only_a_bounded_sample_of_calls_is_bound(health: KeyHealth) -> None:
    bound = 0

    def args() -> dict[str, Any]:
        nonlocal bound
        bound += 1
        return {"to": "a", "amount": 5}

    n = 10_000
    for _ in range(n):
        health.observe("t", "s", args)
    # The first WARMUP calls, then one in STRIDE: the arguments of the rest are never bound.
    assert kh.WARMUP + (n - kh.WARMUP) // kh.STRIDE - 1 <= bound <= kh.WARMUP + n // kh.STRIDE


def test_a_suspect_is_looked_at_until_named(
    health: KeyHealth, clock: Clock, logged: Logged
) -> None:
    # Business values on every call, with a clock among them: the warm-up has passed
    # when the retries begin, yet they are all inspected (the tool is a suspect).
    for i in range(kh.WARMUP * 4):
        clock.t += 1.0
        health.observe("t", "s", {"to": f"u{i}", "at": int(clock.t)})
    for _ in range(3):
        clock.t += 1.0
        health.observe("t", "s", {"to": "again", "at": int(clock.t)})
    assert len(logged()) == 1


def test_memory_is_bounded(health: KeyHealth, clock: Clock) -> None:
    for i in range(100_000):
        clock.t += 0.001
        health.observe(f"tool{i % 50_000}", f"scope{i}", {"to": "a", "at": int(clock.t)})
    assert len(health) == kh.MAX_SLOTS
    for i in range(1000):  # one tool, a thousand shapes
        health.observe("wide", "s", {"to": f"u{i}", "at": int(clock.t) + i})
    assert len(health._slots[("wide", "s")].shapes) == kh.MAX_SHAPES
    for i in range(kh.MAX_WARNED + 100):  # warnings remembered: bounded too
        for _ in range(3):
            clock.t += 1
            health.observe(f"w{i}", "s", {"to": "a", "at": int(clock.t)})
    assert len(health._warned) == kh.MAX_WARNED


def test_thread_safe_and_still_once(health: KeyHealth, clock: Clock, logged: Logged) -> None:
    start = threading.Barrier(8)

    def worker(w: int) -> None:
        start.wait()
        for i in range(500):
            health.observe("t", "s", {"to": "a", "request_id": f"{w}-{i}"})
            health.observe(f"t{w}", "s", {"to": "a", "amount": i})

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [rec] = logged()
    assert rec.onceonly_args == ["request_id"]


def test_volatile_kind() -> None:
    assert volatile_kind(NOW, "x", NOW) == "a clock reading"
    assert volatile_kind(uuid.uuid4(), "x", NOW) == "a random id"
    assert volatile_kind(uuid.uuid4(), "order_id", NOW) is None
    assert volatile_kind(uuid.uuid4(), "user_uuid", NOW) is None
    assert volatile_kind(NOW, "order_id", NOW) is None  # an id made from the clock
    assert volatile_kind("x1", "uuid", NOW) == "a per-call value"
    assert volatile_kind(str(uuid.uuid4()), "request_uuid", NOW) == "a per-call value"
    assert volatile_kind("r-17", "requestId", NOW) == "a per-call value"
    assert volatile_kind(2, "attempt", NOW) == "a per-call value"
    assert volatile_kind(True, "nonce", NOW) is None
    assert volatile_kind("1h", "time_span", NOW) is None
    assert volatile_kind(NOW + 3600, "x", NOW) is None  # the future: a scheduled time


# -- wired into the guard ----------------------------------------------------------------
def send(to: str, body: str, sent_at: dt.datetime) -> str:
    return f"sent to {to}"


def test_guard_warns_for_new_claims(any_url: str, namespace: str, logged: Logged) -> None:
    with Guard(any_url, namespace=namespace, quiet=True) as g:
        for _ in range(3):
            g(send, "a@example.com", "hi", dt.datetime.now(UTC))
        [rec] = logged()
        assert rec.onceonly_tool == f"{__name__}.send"
        assert rec.onceonly_scope == namespace
        assert "exclude=['sent_at'] (or key_args=['to', 'body'])" in rec.getMessage()
        for _ in range(5):
            g(send, "a@example.com", "hi", dt.datetime.now(UTC))
        assert len(logged()) == 1


def test_guard_replays_are_not_looked_at(logged: Logged) -> None:
    # One new claim and many replays of the same stamped call: the stamp repeated, so the
    # key works; nothing to say.
    g = Guard("memory://", quiet=True)
    at = dt.datetime.now(UTC)
    for _ in range(10):
        g(send, "a@example.com", "hi", at)
    assert g.stats()["replayed"] == 9
    assert logged() == []


def test_guard_silent_with_key_args_exclude_key_unlimited(logged: Logged) -> None:
    g = Guard("memory://", quiet=True)
    variants = [
        g.once(key_args=["to", "body"], name="by_key_args")(send),
        g.once(exclude=["sent_at"], name="by_exclude")(send),
        g.once(key=lambda to, body, sent_at: f"{to}:{sent_at.isoformat()}", name="by_key")(send),
        g.once(unlimited=True, name="read_only")(send),
    ]
    for fn in variants:
        for _ in range(4):
            fn("a@example.com", "hi", dt.datetime.now(UTC))
    assert logged() == []


def test_guard_switched_off(monkeypatch: pytest.MonkeyPatch, logged: Logged) -> None:
    def stamped(g: Guard) -> None:
        for _ in range(3):
            g(send, "a@example.com", "hi", dt.datetime.now(UTC))

    stamped(Guard("memory://", quiet=True, key_health=False))
    stamped(Guard("memory://", quiet=True).configure(key_health=False))
    monkeypatch.setenv("ONCEONLY_KEY_HEALTH", "0")
    stamped(Guard("memory://", quiet=True))
    assert logged() == []
    stamped(Guard("memory://", quiet=True, key_health=True))  # the argument wins over the env
    monkeypatch.setenv("ONCEONLY_KEY_HEALTH", "1")
    stamped(Guard("memory://", quiet=True))
    assert len(logged()) == 2


def test_guard_async_and_call_tool_paths(logged: Logged) -> None:
    g = Guard("memory://", quiet=True)

    async def notify(user: str, nonce: str) -> str:
        return user

    async def main() -> None:
        for _i in range(3):
            await g(notify, "u1", f"{random.getrandbits(64):016x}")

    asyncio.run(main())
    for _ in range(3):
        g.call_tool(send, {"to": "b@example.com", "body": "x", "sent_at": dt.datetime.now(UTC)})
    assert [r.onceonly_args for r in logged()] == [["nonce"], ["sent_at"]]


def test_guard_governed_calls(tmp_path: Path, logged: Logged) -> None:
    # An agent's calls go through governance (policy, audit) and the same claim path.
    with Guard(f"sqlite:///{tmp_path}/ledger.db", quiet=True) as g:
        for _ in range(3):
            args = {"to": "a@example.com", "body": "hi", "sent_at": dt.datetime.now(UTC)}
            assert g.call_tool(send, args, agent_id="agent-1").decision == "executed"
        [rec] = logged()
        assert rec.onceonly_args == ["sent_at"]
