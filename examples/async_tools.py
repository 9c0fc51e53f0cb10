"""Async tools: five duplicate calls raced with asyncio.gather execute once.

    python examples/async_tools.py

An agent framework that runs tool calls concurrently may issue the same call twice in
one step. ``await guard(fn, ...)`` claims the key once; the duplicates wait for the
winner and get its result.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from onceonly_core import Guard

sent: list[tuple[str, str]] = []  # what the SMS gateway actually delivered


async def send_sms(to: str, text: str) -> dict[str, Any]:
    await asyncio.sleep(0.2)  # the gateway is slow: the duplicates arrive meanwhile
    sent.append((to, text))
    print(f"    (SMS to {to}: {text!r})")
    return {"sid": f"SM{len(sent):04d}", "to": to}


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        guard = Guard(f"sqlite:///{Path(tmp) / 'ledger.db'}", namespace="async", quiet=True)

        print("1. five identical tool calls in one step, raced with asyncio.gather")
        results = await asyncio.gather(
            *(guard(send_sms, "+15550100", "Your code is 4821") for _ in range(5))
        )
        for i, r in enumerate(results, 1):
            print(f"   call {i} -> {r}")

        print("2. a decorated async tool: two different messages run, each once")
        notify = guard.once(send_sms)
        a, b, a_again = await asyncio.gather(
            notify("+15550100", "Your order shipped"),
            notify("+15550199", "Your order shipped"),
            notify("+15550100", "Your order shipped"),
        )
        print(f"   -> {a}\n   -> {b}\n   -> {a_again}")
        stats = guard.stats()
        guard.close()

    print(f"\nSMS sent: {len(sent)} for 8 calls; this guard's decisions: {stats}")
    assert len(sent) == 3, f"expected 3 messages, got {sent}"
    assert all(r == results[0] for r in results), "every duplicate gets the same result"
    assert a == a_again and a != b
    assert stats["executed"] == 3 and stats["replayed"] == 5


if __name__ == "__main__":
    asyncio.run(main())
