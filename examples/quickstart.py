"""Quickstart: guard a function that charges a card, call it twice, see the replay.

    python examples/quickstart.py

Runs offline on a SQLite ledger in a temporary directory. The second call (a retry, even
one spelled with keyword arguments, even from a new process) does not charge again: it
gets the first call's result back from the ledger.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from onceonly_core import Guard, current_call

charges: list[tuple[str, float, str]] = []  # what the payment provider actually did


def charge_card(customer: str, amount_usd: float) -> dict[str, Any]:
    call = current_call()
    assert call is not None
    # Pass the call's idempotency key downstream (e.g. Stripe's Idempotency-Key).
    charges.append((customer, amount_usd, call.idempotency_key))
    print(f"    (the card of {customer} is charged ${amount_usd})")
    return {"charge_id": f"ch_{len(charges)}", "amount": amount_usd}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'ledger.db'}"
        guard = Guard(url, namespace="quickstart", quiet=True)
        charge = guard.once(charge_card)

        print("1. the agent charges cus_42 $99.99")
        first = charge("cus_42", 99.99)
        print(f"   -> {first}")

        print("2. the agent retries the same call (keyword arguments this time)")
        retry = charge(customer="cus_42", amount_usd=99.99)
        print(f"   -> {retry}  (replayed from the ledger: no second charge)")

        print("3. a different amount is a different call")
        other = charge("cus_42", 99.98)
        print(f"   -> {other}")

        print("4. a new Guard on the same ledger (think: the process restarted) replays too")
        guard.close()
        restarted = Guard(url, namespace="quickstart", quiet=True)
        again = restarted(charge_card, "cus_42", 99.99)
        print(f"   -> {again}")

        records = restarted.history()
        print(f"\nledger: {len(records)} records")
        for r in records:
            print(f"   {r.state:<9} {r.tool}  key={r.key[:12]}…  executions={r.executions}")
        restarted.close()

    print(f"\ncharges made: {len(charges)} for 4 calls")
    assert first == retry == again, "a retry must replay the first result"
    assert first != other
    assert len(charges) == 2, f"expected 2 charges, got {len(charges)}"
    assert len({key for _, _, key in charges}) == 2
    assert [r.executions for r in records] == [1, 1]


if __name__ == "__main__":
    main()
