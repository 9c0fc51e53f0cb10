"""A Chat Completions tool loop that crashes after charging a card, and is run again.

The real ``openai`` client talks to a scripted server (no network). The first process
charges the card and dies before the model's next reply. The retried loop asks the
model again; the model repeats ``charge_card`` under a new call id, and the guard
replays the stored charge instead of charging twice.

    python examples/openai_chat_crash_retry.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from onceonly_core import Guard, current_call
from onceonly_openai import LoopResult, ToolDispatcher, run_chat
from onceonly_openai.testing import ScriptedOpenAI, chat_text, chat_tool_calls

ARGS = {"customer": "cus_42", "amount_usd": 99.99}


def charge_card(customer: str, amount_usd: float) -> dict[str, Any]:
    """Charge the customer's card."""
    call = current_call()
    assert call is not None
    # The payment API would get this as its Idempotency-Key; here we append to a file.
    with open(os.environ["CHARGES_FILE"], "a") as f:
        f.write(json.dumps({"customer": customer, "amount": amount_usd}) + "\n")
    return {"charge_id": "ch_1", "amount_usd": amount_usd, "key": call.idempotency_key}


def attempt(db: str, *, crash: bool) -> LoopResult[ChatCompletion, ChatCompletionMessageParam]:
    guard = Guard(f"sqlite:///{db}", quiet=True)

    def next_reply(body: dict[str, Any]) -> dict[str, Any]:
        if crash:
            os._exit(1)  # the worker dies: the card is charged, the loop never finished
        return chat_text("Your card was charged $99.99.")

    # The model's call id is new on every turn: "call_first" before, "call_retry" after.
    call_id = "call_first" if crash else "call_retry"
    server = ScriptedOpenAI([chat_tool_calls(("charge_card", ARGS, call_id)), next_reply])
    dispatcher = ToolDispatcher({"charge_card": charge_card}, guard=guard, scope="order-42")
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Charge cus_42 $99.99 for order 42."}
    ]
    result = run_chat(server.client(), dispatcher, messages, model="gpt-4.1")
    guard.close()
    return result


def main() -> None:
    if sys.argv[1:2] == ["--crash"]:
        attempt(sys.argv[2], crash=True)
        raise SystemExit("unreachable: the scripted crash did not happen")
    with tempfile.TemporaryDirectory() as tmp:
        db, charges = str(Path(tmp) / "ledger.db"), Path(tmp) / "charges.jsonl"
        env = {**os.environ, "CHARGES_FILE": str(charges)}
        first = subprocess.run([sys.executable, __file__, "--crash", db], env=env, check=False)
        assert first.returncode == 1, first.returncode
        assert len(charges.read_text().splitlines()) == 1  # charged, then crashed

        os.environ["CHARGES_FILE"] = str(charges)
        result = attempt(db, crash=False)
        tool_msg = next(dict(m) for m in result.transcript if m["role"] == "tool")
        assert tool_msg["tool_call_id"] == "call_retry"  # answered under the new id
        assert json.loads(str(tool_msg["content"]))["charge_id"] == "ch_1"  # the stored charge
        assert len(charges.read_text().splitlines()) == 1, "charged twice"
        print(f"crash, retry -> charged once; model says: {result.text}")


if __name__ == "__main__":
    main()
