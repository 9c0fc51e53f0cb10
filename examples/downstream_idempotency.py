"""Downstream idempotency: make "at most once in the ledger" effectively once in the world.

    python examples/downstream_idempotency.py

The ledger can only know what the tool reported. When a call ends without a recorded
outcome — the response was lost, the worker was killed mid-call — the default policy
(``on_unknown="retry"``) runs the tool again, with the *same* idempotency key. Hand that
key to an API that de-duplicates on it (Stripe's ``Idempotency-Key`` header, most
payment and messaging APIs) and the retry is safe: the API returns the first charge.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

from onceonly_core import Guard, current_call


class WorkerKilled(BaseException):
    """Stands in for the worker dying mid-call (SIGTERM, Ctrl-C, a cancelled task)."""


class PaymentAPI:
    """A fake payment API that honours idempotency keys, like Stripe."""

    def __init__(self) -> None:
        self.charges: dict[str, dict[str, Any]] = {}  # by idempotency key
        self.requests: list[str] = []
        self.lose_next_response = False
        self.kill_worker_after_next_charge = False

    def create_charge(self, customer: str, cents: int, *, idempotency_key: str) -> dict[str, Any]:
        self.requests.append(idempotency_key)
        if idempotency_key in self.charges:  # a retry: answer with the original charge
            return self.charges[idempotency_key]
        charge = {"id": "ch_" + uuid.uuid4().hex[:8], "customer": customer, "cents": cents}
        self.charges[idempotency_key] = charge
        print(f"    (API: created {charge['id']} for {customer}, {cents} cents)")
        if self.lose_next_response:
            self.lose_next_response = False
            raise ConnectionError("connection reset: the response never arrived")
        if self.kill_worker_after_next_charge:
            self.kill_worker_after_next_charge = False
            raise WorkerKilled
        return charge


api = PaymentAPI()


def charge_order(order_id: str, customer: str, cents: int) -> dict[str, Any]:
    call = current_call()
    assert call is not None
    print(f"    attempt {call.attempt}, Idempotency-Key {call.idempotency_key[:32]}…")
    return api.create_charge(customer, cents, idempotency_key=call.idempotency_key)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        guard = Guard(f"sqlite:///{Path(tmp) / 'ledger.db'}", namespace="shop", quiet=True)
        charge = guard.once(charge_order)

        print("1. the response is lost after the API created the charge")
        api.lose_next_response = True
        try:
            charge("order-1", "cus_ada", 4200)
        except ConnectionError as err:
            print(f"   the tool failed: {err} (a failure is not cached)")
        print("   the agent retries: the tool runs again with the same key")
        first = charge("order-1", "cus_ada", 4200)
        print(f"   -> {first['id']}: the API recognised the key, no second charge")

        print("2. the worker is killed right after the API created the charge")
        api.kill_worker_after_next_charge = True
        try:
            charge("order-2", "cus_bob", 1500)
        except WorkerKilled:
            rec = guard.history(limit=1)[0]
            print(f"   the worker died; the ledger says {rec.state!r}: the outcome is unknown")
        print("   the next worker picks the order up: on_unknown='retry', same key")
        second = charge("order-2", "cus_bob", 1500)
        print(f"   -> {second['id']}: again, no second charge")

        records = {r.attempt for r in guard.history()}
        guard.close()

    keys = set(api.requests)
    print(f"\ntool executions: {len(api.requests)}, charges created: {len(api.charges)}")
    assert len(api.requests) == 4, api.requests
    assert len(keys) == 2, "each order keeps one idempotency key across attempts"
    assert len(api.charges) == 2, "one charge per order"
    assert first == api.charges[api.requests[0]] and second == api.charges[api.requests[2]]
    assert records == {2}, "both orders took a second attempt"


if __name__ == "__main__":
    main()
