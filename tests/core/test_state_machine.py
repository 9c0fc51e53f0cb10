"""A model-based test of the store primitives (hypothesis ``RuleBasedStateMachine``).

Workers claim, take over (from fresh or stale snapshots, forced or not), finish and
heartbeat with current or stale tokens, records are cleared, and time moves — in any order.
A plain-Python model says what every primitive must answer and what every record must hold.
Invariants checked after every step:

* the store agrees with the model field by field;
* a key's token never decreases;
* no (key, token) is ever handed out to two holders;
* a stale token's finish / heartbeat is refused and changes nothing;
* ``executions`` counts exactly the successful fenced completions;
* a ``succeeded`` record keeps its result until someone takes it over.

Run over ``MemoryStore`` and over the SQLite ledger, both on a fake clock.
"""

from __future__ import annotations

import itertools
import types
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from onceonly_core import MemoryStore
from onceonly_core.stores import NewClaim, Record, Store
from onceonly_core.stores import sql as sql_module
from onceonly_core.stores.sql import SQLStore

KEYS = st.sampled_from(["a", "b"])
LEASES = st.sampled_from([-1.0, 1.0, 2.5, 10.0])
STEPS = st.sampled_from([0.5, 1.0, 2.5, 30.0])


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Model:
    state: str
    token: int
    attempt: int
    executions: int
    owner: str
    lease_until: float | None
    expires_at: float | None = None
    result: str | None = None
    error: str | None = None


def stable(rec: Record | None) -> Any:
    if rec is None:
        return None
    return (
        rec.state,
        rec.token,
        rec.owner,
        rec.attempt,
        rec.executions,
        rec.lease_until,
        rec.expires_at,
        rec.result,
        rec.error,
        rec.updated_at,
    )


class LedgerMachine(RuleBasedStateMachine):
    #: (clock) -> (store, namespace); set by each test.
    open_store: ClassVar[Callable[[Clock], tuple[Store, str]]]

    handles = Bundle("handles")  # (key, token) pairs a worker believes it holds
    snapshots = Bundle("snapshots")  # records read at some point (possibly stale by now)

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.store, self.ns = type(self).open_store(self.clock)
        self.model: dict[str, Model] = {}
        self.highest: dict[str, int] = {}
        self.issued: set[tuple[str, int]] = set()
        self.names = itertools.count()

    # -- helpers -------------------------------------------------------------------------
    def owner(self) -> str:
        return f"w{next(self.names)}"

    def get(self, key: str) -> Record | None:
        return self.store.get(self.ns, key)

    def issue(self, key: str, token: int) -> tuple[str, int]:
        assert (key, token) not in self.issued, f"token {token} of {key!r} handed out twice"
        self.issued.add((key, token))
        return (key, token)

    def live(self, m: Model) -> bool:
        return m.state == "running" and m.lease_until is not None and m.lease_until >= self.clock.t

    # -- rules -----------------------------------------------------------------------------
    @rule(target=handles, key=KEYS, lease=LEASES)
    def claim(self, key: str, lease: float) -> Any:
        owner = self.owner()
        rec = self.store.claim(self.ns, key, NewClaim("mod.tool", owner, lease))
        m = self.model.get(key)
        if m is None:
            assert rec.mine
            assert (rec.token, rec.state, rec.owner) == (1, "running", owner)
            self.model[key] = Model("running", 1, 1, 0, owner, self.clock.t + lease)
            return self.issue(key, 1)
        assert not rec.mine
        assert (rec.token, rec.state, rec.owner) == (m.token, m.state, m.owner)
        return multiple()

    @rule(target=snapshots, key=KEYS)
    def observe(self, key: str) -> Any:
        rec = self.get(key)
        if rec is None:
            assert key not in self.model
            return multiple()
        return rec

    @rule(target=handles, seen=snapshots, lease=LEASES, force=st.booleans())
    def take_over(self, seen: Record, lease: float, force: bool) -> Any:
        key = seen.key
        m = self.model[key]
        allowed = m.token == seen.token and (force or (m.state == seen.state and not self.live(m)))
        before = stable(self.get(key))
        owner = self.owner()
        got = self.store.take_over(
            self.ns, key, seen, NewClaim("mod.tool", owner, lease), force=force
        )
        if not allowed:
            assert got is None
            assert stable(self.get(key)) == before
            return multiple()
        assert got is not None and got.mine
        assert (got.token, got.owner, got.state) == (m.token + 1, owner, "running")
        m.token += 1
        m.attempt += 1
        m.state = "running"
        m.owner = owner
        m.lease_until = self.clock.t + lease
        m.error = None
        return self.issue(key, m.token)

    @rule(
        handle=handles,
        ok=st.booleans(),
        result=st.text(max_size=4),
        ttl=st.sampled_from([None, 5.0]),
    )
    def finish(self, handle: tuple[str, int], ok: bool, result: str, ttl: float | None) -> None:
        key, token = handle
        m = self.model[key]
        current = token == m.token and m.state == "running"
        before = stable(self.get(key))
        text = f'"{result}"' if ok else None
        error = None if ok else f"Error: {result}"
        done = self.store.finish(self.ns, key, token, ok=ok, result=text, error=error, ttl=ttl)
        assert done == current
        if not current:
            assert stable(self.get(key)) == before  # a stale owner changes nothing
            return
        m.state = "succeeded" if ok else "failed"
        m.result, m.error = text, error
        m.executions += ok
        m.lease_until = None
        m.expires_at = None if ttl is None else self.clock.t + ttl

    @rule(handle=handles, lease=LEASES)
    def heartbeat(self, handle: tuple[str, int], lease: float) -> None:
        key, token = handle
        m = self.model[key]
        current = token == m.token and m.state == "running"
        before = stable(self.get(key))
        assert self.store.heartbeat(self.ns, key, token, lease) == current
        if not current:
            assert stable(self.get(key)) == before
            return
        m.lease_until = self.clock.t + lease

    @rule(key=KEYS)
    def clear(self, key: str) -> None:
        m = self.model.get(key)
        before = stable(self.get(key))
        answer = self.store.clear(self.ns, key)
        if m is None:
            assert answer is None
        elif self.live(m):
            assert answer is False  # never clear a running call
            assert stable(self.get(key)) == before
        else:
            assert answer is True
            m.state = "cleared"

    @rule(seconds=STEPS)
    def advance(self, seconds: float) -> None:
        self.clock.t += seconds

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def store_matches_model(self) -> None:
        for key in ("a", "b"):
            rec = self.get(key)
            m = self.model.get(key)
            if m is None:
                assert rec is None
                continue
            assert rec is not None
            assert rec.token >= self.highest.get(key, 0), "a token went backwards"
            self.highest[key] = rec.token
            assert (rec.state, rec.token, rec.attempt, rec.owner) == (
                m.state,
                m.token,
                m.attempt,
                m.owner,
            )
            assert rec.executions == m.executions
            assert rec.lease_until == m.lease_until
            assert rec.expires_at == m.expires_at
            assert rec.error == m.error
            assert rec.result == m.result  # in particular: succeeded keeps its result
            assert rec.lease_live == self.live(m)
            assert rec.now == self.clock.t


def _memory(clock: Clock) -> tuple[Store, str]:
    return MemoryStore(clock=clock), "ns"


def test_memory_store_state_machine() -> None:
    machine = type("MemoryLedger", (LedgerMachine,), {"open_store": staticmethod(_memory)})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=250,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_sqlite_store_state_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The SQLite ledger takes its clock from the host; point it at the machine's fake one.
    current: list[Clock] = [Clock()]
    monkeypatch.setattr(sql_module, "time", types.SimpleNamespace(time=lambda: current[0]()))
    store = SQLStore(f"sqlite:///{tmp_path}/machine.db?synchronous=normal")

    def open_sqlite(clock: Clock) -> tuple[Store, str]:
        current[0] = clock
        return store, f"m-{uuid.uuid4().hex[:8]}"  # a fresh namespace per run

    machine = type("SQLiteLedger", (LedgerMachine,), {"open_store": staticmethod(open_sqlite)})
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=60,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        store.close()
