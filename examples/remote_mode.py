"""Remote mode: agents on many hosts share one control plane, without database credentials.

    pip install "onceonly-core[server]"
    python examples/remote_mode.py

Starts ``onceonly serve`` on a SQLite file in a temporary directory (in production: on
PostgreSQL, behind TLS), creates an API key for tenant ``acme``, then runs four agent
processes that all make the same charge through ``Guard("http://…", api_key=…)``: the card
is charged once. An operator's policy set over the ``/v1`` API then stops the agents' next
charge. Everything the agents did is in the server's ledger and audit log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

AGENT = """
import os, sys
from pathlib import Path
from onceonly_core import Guard

# The agent's whole configuration: the control plane's URL and its API key.
guard = Guard(os.environ["ONCEONLY_URL"], api_key=os.environ["ONCEONLY_API_KEY"],
              agent_id="billing-bot", quiet=True)
charges = Path(sys.argv[1])

def charge_card(customer: str, amount_usd: float) -> dict:
    with charges.open("a") as f:  # the payment provider's side effect
        f.write(f"{customer} {amount_usd}\\n")
    return {"charged": amount_usd}

result = guard.run_call(
    "charge_card",
    {"customer": "cus_42", "amount_usd": 99.99},
    lambda: charge_card("cus_42", 99.99),
    scope="order-1001",
)
print(result.decision)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def onceonly(*args: str) -> str:
    cmd = [sys.executable, "-m", "onceonly_core.cli", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{Path(tmp) / 'control-plane.db'}"
        key = json.loads(onceonly("keys", "create", "--tenant", "acme", "--url", db, "--json"))
        api_key = key["key"]
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "onceonly_core.cli", "serve", "--url", db, "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            print(f"1. onceonly serve is up at {url}; tenant acme has an API key")

            charges = Path(tmp) / "charges.txt"
            env = {**os.environ, "ONCEONLY_URL": url, "ONCEONLY_API_KEY": api_key}
            agents = [
                subprocess.Popen(
                    [sys.executable, "-c", AGENT, str(charges)],
                    env=env,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(4)
            ]
            decisions = sorted(a.communicate(timeout=120)[0].strip() for a in agents)
            lines = charges.read_text().splitlines()
            print(f"2. four agent processes made the same charge: {decisions}")
            print(f"   the card was charged {len(lines)} time(s): {lines}")
            assert len(lines) == 1 and decisions.count("executed") == 1

            api = httpx.Client(base_url=f"{url}/v1", headers={"Authorization": f"Bearer {api_key}"})
            api.post("/policies/billing-bot", json={"blocked_tools": ["charge_card"]})
            print("3. the operator blocks charge_card for billing-bot over /v1/policies")
            again = subprocess.run(
                [sys.executable, "-c", AGENT.replace("order-1001", "order-1002"), str(charges)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            print(f"   the next charge (order 1002): {again.stdout.strip()}")
            assert again.stdout.strip() == "blocked"
            assert len(charges.read_text().splitlines()) == 1

            logs = api.get("/agents/billing-bot/logs").json()
            print(f"4. the server's audit log: {[e['decision'] for e in logs]}")
            api.close()
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
