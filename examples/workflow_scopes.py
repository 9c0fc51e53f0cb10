"""Workflow scoping and ``key_args``: what counts as "the same call".

    python examples/workflow_scopes.py

* ``with guard.workflow("order-1001"):`` scopes keys to one workflow: the same call in
  another workflow is a different call (records live in namespace ``shop/order-1001``).
* ``key_args=[...]`` names the arguments that identify a call. An LLM that re-words the
  email body on a retry still means the same email: identify it by order and recipient.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from onceonly_core import Guard

outbox: list[tuple[str, str, str]] = []  # emails actually sent


def send_shipping_email(order_id: str, to: str, body: str) -> str:
    outbox.append((order_id, to, body))
    print(f"    (email to {to}: {body!r})")
    return f"msg-{len(outbox)}"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        guard = Guard(f"sqlite:///{Path(tmp) / 'ledger.db'}", namespace="shop", quiet=True)
        by_order = guard.once(key_args=["order_id", "to"])(send_shipping_email)

        print("1. key_args: the retry re-words the body, and is still the same email")
        with guard.workflow("order-1001"):
            first = by_order("1001", "ada@example.com", "Your order has shipped!")
            reworded = by_order("1001", "ada@example.com", "Good news: order 1001 is on its way.")
        print(f"   -> {first}, then {reworded} (replayed)")

        print("2. without key_args every argument counts: the re-worded retry sends again")
        with guard.workflow("order-1001"):
            plain_a = guard(send_shipping_email, "1001", "ada@example.com", "Shipped!")
            plain_b = guard(send_shipping_email, "1001", "ada@example.com", "It shipped!")
        print(f"   -> {plain_a} and {plain_b}: two emails")

        print("3. workflows: the same call in another workflow runs again")
        with guard.workflow("order-1002"):
            other = by_order("1001", "ada@example.com", "Your order has shipped!")
        print(f"   -> {other} (workflow order-1002 is a separate scope)")

        namespaces = sorted({r.namespace for r in guard.history()})
        print(f"\nnamespaces in the ledger: {namespaces}")
        guard.close()

    print(f"emails sent: {len(outbox)} for 5 calls")
    assert first == reworded, "a re-worded retry with the same key_args is replayed"
    assert plain_a != plain_b, "without key_args a different body is a different call"
    assert other not in (first, reworded), "another workflow is another scope"
    assert len(outbox) == 4, outbox
    assert namespaces == ["shop/order-1001", "shop/order-1002"], namespaces


if __name__ == "__main__":
    main()
