"""Every failure found in the peers (research/peers.md §1-§3), as a test that passes here.

Named after the peer case: ``ledger_*`` is ledger-once 0.1.5, ``safeagent_*`` is
safeagent-exec-guard 0.1.25; the letter is the probe in peers.md §3. Multi-process storms
and kill -9 live in tests/services/; here the same races run on threads or on direct store
calls, on every backend (``any_url``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import functools
import os
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydantic
import pytest

from onceonly_core import (
    BLOCKED,
    CodecError,
    Guard,
    InProgress,
    KeyReuseError,
    LeaseLost,
    MemoryStore,
    UnknownOutcome,
    current_call,
)
from onceonly_core.fingerprint import tool_identity
from onceonly_core.stores import NewClaim

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def guard_for(url: str, namespace: str, **options: Any) -> Guard:
    extra: dict[str, Any] = {}
    if url.startswith("sqlite"):
        url += "?synchronous=normal"
    elif not url.startswith("memory"):
        extra["store_options"] = {"auto_migrate": True}
    return Guard(url, namespace=namespace, quiet=True, **extra, **options)


@pytest.fixture
def g(any_url: str, namespace: str) -> Iterator[Guard]:
    guard = guard_for(any_url, namespace)
    yield guard
    guard.close()


class Effects:
    """A side effect that counts per key, thread-safely (the peers' O_APPEND line)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count: Counter[Any] = Counter()

    def hit(self, key: Any) -> int:
        with self.lock:
            self.count[key] += 1
            return self.count[key]


def storm(n_threads: int, work: Callable[[int], None]) -> None:
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            work(i)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]


# -- (a) races ---------------------------------------------------------------------------------


def test_ledger_a_lost_update_back_to_running_after_success(g: Guard) -> None:
    # ledger-once: a blocked caller read RUNNING, the owner wrote SUCCESS, then the blocked
    # caller's full-row put wrote RUNNING back. Here readers never write a record; the only
    # write a non-owner can attempt is a compare-and-set, which a finished record refuses.
    effects = Effects()

    def charge(key: int) -> dict[str, int]:
        return {"key": key, "n": effects.hit(key)}

    keys = list(range(12))

    def worker(i: int) -> None:
        for k in keys[i % 3 :] + keys[: i % 3]:
            assert g(charge, k) == {"key": k, "n": 1}

    storm(8, worker)
    assert effects.count == Counter({k: 1 for k in keys})
    recs = g.store.list(namespace=g.namespace, limit=100)
    assert len(recs) == len(keys)
    assert {(r.state, r.executions, r.token) for r in recs} == {("succeeded", 1, 1)}
    assert all(r.result is not None for r in recs)
    # The reader's stale snapshot of RUNNING cannot be written back.
    ns, key = g.namespace, g.key_for(charge, 999)
    owner = g.store.claim(ns, key, NewClaim("t", "owner", 60))
    seen_running = g.store.get(ns, key)
    assert seen_running is not None
    assert g.store.finish(ns, key, owner.token, ok=True, result="1")
    assert g.store.take_over(ns, key, seen_running, NewClaim("t", "reader", 60)) is None
    assert g.store.claim(ns, key, NewClaim("t", "reader", 60)).state == "succeeded"


def test_ledger_a2_completed_keys_never_run_again_later(g: Guard) -> None:
    # ledger-once: stuck RUNNING rows re-executed completed charges after the stale timeout.
    effects = Effects()

    def charge(key: int) -> int:
        return effects.hit(key)

    storm(6, lambda i: [g(charge, k) for k in range(10)])
    later = guard_for_same_store(g)
    assert [later.using(wait=0)(charge, k) for k in range(10)] == [1] * 10
    assert effects.count == Counter({k: 1 for k in range(10)})


def guard_for_same_store(g: Guard) -> Guard:
    return Guard(store=g.store, namespace=g.namespace, quiet=True)


def test_ledger_a4_concurrent_retries_after_a_failure_run_once(g: Guard) -> None:
    # ledger-once: get, delete and claim were separate steps, so a worker that saw the old
    # FAILED row deleted another worker's fresh claim: up to 3 executions per key.
    effects = Effects()
    failing = {k: True for k in range(10)}

    def charge(key: int) -> str:
        n = effects.hit(key)
        if failing[key]:
            raise ConnectionError("gateway 503")
        return f"charged {key} on attempt {n}"

    for k in failing:
        with pytest.raises(ConnectionError):
            g(charge, k)
    failing.update({k: False for k in failing})
    results: dict[int, set[str]] = {k: set() for k in failing}

    def worker(i: int) -> None:
        for k in failing:
            results[k].add(g(charge, k))

    storm(8, worker)
    assert effects.count == Counter({k: 2 for k in failing})  # 1 failure + exactly 1 success
    assert all(len(v) == 1 for v in results.values())  # every worker saw the same result
    for r in g.store.list(namespace=g.namespace, limit=100):
        assert (r.state, r.executions, r.token) == ("succeeded", 1, 2)


def test_ledger_a4_concurrent_retries_after_a_stale_claim_run_once(g: Guard) -> None:
    effects = Effects()

    def charge(key: int) -> int:
        return effects.hit(key)

    for k in range(10):  # crashed owners: running, lease expired
        g.store.claim(g.namespace, g.key_for(charge, k), NewClaim("t", f"dead-{k}", -1.0))
    storm(8, lambda i: [g(charge, k) for k in range(10)])
    assert effects.count == Counter({k: 1 for k in range(10)})
    for r in g.store.list(namespace=g.namespace, limit=100):
        assert (r.state, r.executions, r.token, r.attempt) == ("succeeded", 1, 2, 2)


def test_safeagent_a3_threads_sharing_one_guard_run_once_and_never_hang(g: Guard) -> None:
    # safeagent: one shared sqlite3 connection across threads gave double executions, rows
    # PENDING forever and random SystemError/DatabaseError.
    effects = Effects()

    def charge(key: int) -> int:
        return effects.hit(key)

    storm(8, lambda i: [g(charge, k) for k in range(25)])
    assert effects.count == Counter({k: 1 for k in range(25)})
    states = Counter(r.state for r in g.store.list(namespace=g.namespace, limit=100))
    assert states == Counter({"succeeded": 25})


def test_safeagent_in_memory_registry_is_locked() -> None:
    # safeagent's default in-memory registry had no lock: 8 threads, 8 executions.
    g = Guard(store=MemoryStore(), quiet=True)
    effects = Effects()
    storm(8, lambda i: g(lambda: effects.hit("only")))
    assert effects.count["only"] == 1


# -- (b) floats --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [(1e-9, 2e-9), (1.000000001, 1.000000004), (1.4e-8, 6e-9), (99.99, 99.9900000001)],
    ids=repr,
)
def test_ledger_b_float_false_dedup(a: float, b: float) -> None:
    # ledger-once rounded to 8 decimals: the second, real charge was silently skipped.
    g = Guard(store=MemoryStore(), quiet=True)
    paid: list[float] = []
    g(paid.append, a)
    g(paid.append, b)
    assert paid == [a, b]


def test_ledger_b_type_differences_and_the_documented_choices() -> None:
    g = Guard(store=MemoryStore(), quiet=True)
    paid: list[Any] = []

    def pay(amount: Any) -> None:
        paid.append(amount)

    for amount in (100, 100.0, Decimal("100.00"), 0.0, -0.0, True, 1, 0.1 + 0.2, 0.3):
        g(pay, amount)
    # 100 ≡ 100.0 ≡ Decimal("100.00"); 0.0 ≡ -0.0; True ≠ 1; 0.1+0.2 ≠ 0.3.
    assert paid == [100, 0.0, True, 1, 0.1 + 0.2, 0.3]


def test_exit_guard_str_float_keys() -> None:
    # safeagent's exit guard keyed on str(float): 6 ≠ 6.0 and 0.1+0.2 ≠ 0.3.
    g = Guard(store=MemoryStore(), quiet=True)
    exits: list[Any] = []

    def close_position(symbol: str, qty: Any) -> None:
        exits.append(qty)

    g(close_position, "BTC", 6)
    g(close_position, "BTC", 6.0)
    assert exits == [6]


# -- (c) identity and binding ------------------------------------------------------------------


def test_ledger_c_swallowed_key_param() -> None:
    # ledger-once popped `key` from every call: send(key=...) failed with a missing argument.
    g = Guard(store=MemoryStore(), quiet=True)

    def put_object(bucket: str, key: str) -> str:
        return f"{bucket}/{key}"

    assert g(put_object, "b", key="photos/1.jpg") == "b/photos/1.jpg"
    assert g(put_object, "b", key="photos/2.jpg") == "b/photos/2.jpg"
    assert g.using(key="upload-1")(put_object, "b", key="photos/3.jpg") == "b/photos/3.jpg"


class Stripe:
    def charge(self, amount: int) -> str:
        return "stripe"


class Paypal:
    def charge(self, amount: int) -> str:
        return "paypal"


def test_ledger_c_class_method_collision() -> None:
    # ledger-once used module.__name__: Stripe().charge(5) and Paypal().charge(5) collided.
    g = Guard(store=MemoryStore(), quiet=True)
    assert g(Stripe().charge, 5) == "stripe"
    assert g(Paypal().charge, 5) == "paypal"


def test_ledger_c_lambda_collision() -> None:
    g = Guard(store=MemoryStore(), quiet=True)
    sent: list[str] = []
    email = lambda to: sent.append(f"email {to}")  # noqa: E731
    sms = lambda to: sent.append(f"sms {to}")  # noqa: E731
    g(email, "ann")
    g(sms, "ann")
    assert sent == ["email ann", "sms ann"]


def test_ledger_c_partial_has_no_name() -> None:
    # ledger-once: AttributeError: functools.partial has no __name__.
    g = Guard(store=MemoryStore(), quiet=True)
    paid: list[tuple[str, int]] = []

    def pay(customer: str, amount: int) -> None:
        paid.append((customer, amount))

    g(functools.partial(pay, "c1"), 5)
    g(pay, "c1", 5)  # the same call
    g(functools.partial(pay, "c2"), 5)
    assert paid == [("c1", 5), ("c2", 5)]


def test_safeagent_c_multi_argument_functions_work() -> None:
    # safeagent_guard called func(payload_dict): any multi-argument tool failed, terminally.
    g = Guard(store=MemoryStore(), quiet=True)

    def transfer(src: str, dst: str, amount: int, memo: str = "") -> str:
        return f"{src}->{dst}:{amount}{memo}"

    assert g(transfer, "a", "b", 5) == "a->b:5"
    assert g(transfer, src="a", dst="b", amount=5, memo="") == "a->b:5"


# -- (d) crash inside the effect -----------------------------------------------------------------


def test_ledger_d_crash_inside_the_effect(g: Guard) -> None:
    # A process died inside the tool (simulated: a claim whose lease has expired).
    # ledger-once re-executed silently after 300 s with history reset; safeagent left the
    # row PENDING forever with no way to recover. Here: the policy decides, at once, and
    # the retry carries the same idempotency key.
    ns = g.namespace
    charged: list[str] = []

    def charge(customer: str) -> str:
        ctx = current_call()
        assert ctx is not None
        charged.append(ctx.idempotency_key)
        return f"charged with {ctx.idempotency_key} attempt {ctx.attempt}"

    key = g.key_for(charge, "c1")
    g.store.claim(ns, key, NewClaim(tool_identity(charge), "crashed-host:1", -1.0))
    with pytest.raises(UnknownOutcome):
        g.using(on_unknown="raise")(charge, "c1")
    assert charged == []
    result = g.using(wait=0)(charge, "c1")
    assert result == f"charged with {ns}:{key} attempt 2"
    rec = g.store.get(ns, key)
    assert rec is not None
    assert (rec.attempt, rec.executions, rec.token) == (2, 1, 2)  # history kept, not reset


def test_safeagent_d_a_pending_record_can_be_recovered(g: Guard) -> None:
    def charge(customer: str) -> str:
        return "charged"

    key = g.key_for(charge, "c1")
    g.store.claim(g.namespace, key, NewClaim(tool_identity(charge), "dead", -1.0))
    assert g.retry(charge, "c1") is True  # an operator can release it
    assert g(charge, "c1") == "charged"


# -- (e) zombie -----------------------------------------------------------------------------------


def test_ledger_e_zombie_overwrite_is_fenced() -> None:
    # ledger-once: A's claim went stale while A still ran; B took over; A finished last
    # and overwrote B's record. Here A's completion carries a stale token and is refused.
    clock = Clock()
    store = MemoryStore(clock=clock)
    worker_a = Guard(store=store, namespace="ns", quiet=True)
    worker_b = Guard(store=store, namespace="ns", quiet=True)
    release = threading.Event()
    started = threading.Event()
    executed: list[str] = []

    def job(order: int) -> dict[str, str]:
        ctx = current_call()
        assert ctx is not None
        who = "A" if ctx.token == 1 else "B"
        executed.append(who)
        if who == "A":
            started.set()
            assert release.wait(20)
        return {"executed_by": who}

    out: list[Any] = []

    def run_a() -> None:
        try:
            out.append(worker_a(job, 1))
        except BaseException as err:
            out.append(err)

    thread = threading.Thread(target=run_a)
    thread.start()
    assert started.wait(10)
    clock.t += 100  # A is frozen past its lease
    assert worker_b(job, 1) == {"executed_by": "B"}
    release.set()
    thread.join(10)
    assert isinstance(out[0], LeaseLost)
    assert out[0].result == {"executed_by": "A"}
    rec = store.list(namespace="ns")[0]
    assert (rec.result, rec.executions, rec.token, rec.attempt) == (
        '{"executed_by":"B"}',
        1,
        2,
        2,
    )
    assert worker_a(job, 1) == {"executed_by": "B"}  # replays the recorded winner
    assert executed == ["A", "B"]


def test_ledger_e_retry_while_running_is_refused(g: Guard) -> None:
    # ledger-once's retry (and its dashboard button) deleted a RUNNING row: a second run.
    started, release = threading.Event(), threading.Event()
    runs: list[int] = []

    def job(order: int) -> str:
        runs.append(order)
        started.set()
        assert release.wait(20)
        return "done"

    thread = threading.Thread(target=lambda: g(job, 1))
    thread.start()
    assert started.wait(10)
    with pytest.raises(InProgress):
        g.retry(job, 1)
    assert g.store.clear_namespace(g.namespace) == 0
    with pytest.raises(InProgress):
        g.using(wait=0)(job, 1)
    release.set()
    thread.join(10)
    assert g(job, 1) == "done"
    assert runs == [1]


# -- (f) non-JSON arguments and results --------------------------------------------------------


class Tier(enum.Enum):
    GOLD = "gold"


@dataclasses.dataclass
class Invoice:
    number: str
    lines: list[Decimal]


class Customer(pydantic.BaseModel):
    id: str
    joined: dt.datetime


NON_JSON = [
    dt.datetime(2024, 1, 1, 9, 30, tzinfo=dt.timezone.utc),
    b"\x00\xffbytes",
    Decimal("19.99"),
    {1, 2, 3},
    frozenset({"a"}),
    uuid.UUID(int=5),
    Tier.GOLD,
    Invoice("INV-1", [Decimal("1.10")]),
    Customer(id="c1", joined=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)),
    (1, 2),
    {1: "int key"},
    {1: "mixed", "a": "keys"},
]


@pytest.mark.parametrize("value", NON_JSON, ids=lambda v: type(v).__name__)
def test_ledger_f_non_json_args_and_results(g: Guard, value: Any) -> None:
    # ledger-once: TypeError before execution for these args (tools unusable), and a
    # non-JSON result raised after the effect and left the row RUNNING.
    # safeagent: the effect ran, then TypeError and PENDING forever.
    runs: list[Any] = []

    def echo(value: Any) -> Any:
        runs.append(value)
        return value

    assert g(echo, value) == value
    replayed = g(echo, value)
    assert replayed == value
    assert type(replayed) is type(value)
    assert len(runs) == 1


def test_ledger_f_unstorable_result_after_the_effect(g: Guard) -> None:
    effects = Effects()

    class Socketish:
        pass

    def open_channel(n: int) -> Socketish:
        effects.hit(n)
        return Socketish()

    assert isinstance(g(open_channel, 1), Socketish)  # the effect's caller gets its value
    rec = g.store.get(g.namespace, g.key_for(open_channel, 1))
    assert rec is not None
    assert rec.state == "succeeded"  # not RUNNING, so it is never re-run after a timeout
    with pytest.raises(CodecError):
        g(open_channel, 1)
    assert effects.count[1] == 1


# -- (g) exceptions and interruptions ------------------------------------------------------------


def test_ledger_g_exception_propagates_and_retry_works(g: Guard) -> None:
    attempts: list[int] = []

    def charge(amount: int) -> str:
        attempts.append(amount)
        if len(attempts) == 1:
            raise ValueError("card declined: insufficient funds")
        return "ok"

    with pytest.raises(ValueError, match="insufficient funds"):
        g(charge, 5)
    rec = g.store.get(g.namespace, g.key_for(charge, 5))
    assert rec is not None
    assert rec.state == "failed"
    assert "ValueError: card declined: insufficient funds" in (rec.error or "")
    assert g(charge, 5) == "ok"


def test_safeagent_g_exceptions_are_not_swallowed_nor_terminal(g: Guard) -> None:
    # safeagent swallowed the exception, dropped its message, and never retried.
    calls: list[int] = []

    def flaky(x: int) -> str:
        calls.append(x)
        if len(calls) < 3:
            raise TimeoutError(f"transient {len(calls)}")
        return "finally"

    for i in (1, 2):
        with pytest.raises(TimeoutError, match=f"transient {i}"):
            g(flaky, 1)
    assert g(flaky, 1) == "finally"
    assert g(flaky, 1) == "finally"
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_ledger_g_interrupt_leaves_no_stuck_row(g: Guard, interrupt: type[BaseException]) -> None:
    # ledger-once: KeyboardInterrupt / SystemExit left RUNNING; retries BLOCKED for 300 s.
    calls: list[int] = []

    def job(x: int) -> str:
        calls.append(x)
        if len(calls) == 1:
            raise interrupt
        return "ran"

    with pytest.raises(interrupt):
        g(job, 1)
    assert g.using(wait=0)(job, 1) == "ran"  # wait=0: a live lease would raise InProgress
    assert calls == [1, 1]


def test_ledger_g_cancelled_task_leaves_no_stuck_row(g: Guard) -> None:
    calls: list[int] = []

    async def job(x: int) -> str:
        calls.append(x)
        if len(calls) == 1:
            await asyncio.sleep(60)
        return "ran"

    async def main() -> str:
        task = asyncio.create_task(g(job, 1))
        while not calls:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return str(await g.using(wait=0)(job, 1))

    assert asyncio.run(main()) == "ran"
    assert calls == [1, 1]


def test_ledger_g_async_gather_of_two_identical_awaits(g: Guard) -> None:
    # ledger-once: ['sent', BLOCKED]. Here the second waits and replays.
    sent: list[str] = []

    async def send(to: str) -> str:
        sent.append(to)
        await asyncio.sleep(0.02)
        return "sent"

    async def main() -> list[Any]:
        return list(await asyncio.gather(g(send, "ann"), g(send, "ann")))

    assert asyncio.run(main()) == ["sent", "sent"]
    assert sent == ["ann"]


# -- packaging and API hygiene ------------------------------------------------------------------


def test_safeagent_m_async_fn_never_awaited(g: Guard) -> None:
    # safeagent recorded an un-awaited coroutine as "executed ok" and deduped it forever.
    ran: list[int] = []

    async def send(x: int) -> str:
        ran.append(x)
        return "sent"

    assert asyncio.run(g(send, 1)) == "sent"  # an async tool really runs
    assert ran == [1]

    def hides_a_coroutine(x: int) -> Any:
        return send(x)

    with pytest.raises(TypeError, match="awaitable"):
        g(hides_a_coroutine, 2)
    assert ran == [1]
    rec = g.store.get(g.namespace, g.key_for(hides_a_coroutine, 2))
    assert rec is not None
    assert rec.state == "failed"  # not "executed", not deduped forever


def test_ledger_ttl_refreshed_by_duplicates() -> None:
    # ledger-once: ttl=2 s and a call every second ran once in 6 s ("once per quiet day").
    clock = Clock()
    g = Guard(store=MemoryStore(clock=clock), quiet=True)
    runs: list[float] = []

    def digest(x: int) -> None:
        runs.append(clock.t)

    for _ in range(7):
        g.using(ttl=2)(digest, 1)
        clock.t += 1
    assert [t - runs[0] for t in runs] == [0, 2, 4, 6]


def test_ledger_blocked_return_inverted(g: Guard) -> None:
    # ledger-once: duplicates got BLOCKED (never X), and a tool that returned None got X
    # on its first, real run.
    done: list[str] = []

    def notify(to: str) -> None:
        done.append(to)

    tools = g.wrap_tools({"notify": notify}, blocked_return="already sent")
    assert tools["notify"]("ann") is None
    assert tools["notify"]("ann") == "already sent"
    assert g(notify, "ann") is None  # a plain replay of None is None, never BLOCKED
    assert g.using(replay=False)(notify, "ann") is BLOCKED
    assert done == ["ann"]


def test_ledger_unlimited_blocking_concurrent_reads(g: Guard) -> None:
    # ledger-once: "unlimited" still claimed a RUNNING row; two concurrent identical reads
    # gave [BLOCKED, 'result'].
    barrier = threading.Barrier(2)

    def read(q: str) -> str:
        barrier.wait(10)  # both reads are inside the tool at the same time
        return f"rows for {q}"

    results: list[Any] = []
    storm(2, lambda i: results.append(g.using(unlimited=True)(read, "q")))
    assert results == ["rows for q", "rows for q"]
    assert g.store.list(namespace=g.namespace) == []


def test_safeagent_same_request_id_with_another_payload() -> None:
    # safeagent deduped a reused request_id with a different payload, silently.
    g = Guard(store=MemoryStore(), quiet=True)
    paid: list[int] = []

    def pay(amount: int) -> int:
        paid.append(amount)
        return amount

    assert g.using(key="req-1")(pay, 10) == 10
    with pytest.raises(KeyReuseError):
        g.using(key="req-1")(pay, 1000)
    assert paid == [10]


def test_safeagent_tool_return_value_is_kept() -> None:
    # safeagent discarded the tool's return value; a replay only had a receipt.
    g = Guard(store=MemoryStore(), quiet=True)
    assert g(lambda: {"charge_id": "ch_1"}) == {"charge_id": "ch_1"}
    assert g(lambda: {"charge_id": "ch_1"}) == {"charge_id": "ch_1"}


IMPORT_SCRIPT = r"""
import os
import onceonly_core
from onceonly_core import guard, Guard
Guard()  # constructing a guard creates nothing either
assert os.listdir(".") == [], os.listdir(".")
print("clean")
"""

ENV_SCRIPT = r"""
import os, sys
from onceonly_core import guard
os.environ["ONCEONLY_DB_URL"] = "sqlite:///" + sys.argv[1]
guard(lambda: "x")
print(guard.store.path)
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONCEONLY_")}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)}


def test_ledger_import_creating_a_file(tmp_path: Path) -> None:
    # ledger-once: `import ledger` created ./ledger.db.
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_SCRIPT],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"
    assert list(tmp_path.iterdir()) == []


def test_ledger_env_read_at_import(tmp_path: Path) -> None:
    # ledger-once read LEDGER_DB once at import; setting it afterwards had no effect.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    db = tmp_path / "chosen.db"
    proc = subprocess.run(
        [sys.executable, "-c", ENV_SCRIPT, str(db)],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == db
    assert db.exists()
    assert list(cwd.iterdir()) == []
