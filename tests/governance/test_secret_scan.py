"""A secret-leak scan (issue #13, item 6): calls whose arguments, errors, events and
results carry fresh random secrets, then every onceonly table is dumped and searched.

Fresh secrets each run (so a hit is this run's leak, never old data), in the shapes the
redactor recognises (Stripe/OpenAI/GitHub/AWS keys, JWTs, ``Authorization: Bearer``,
``?api_key=``/``&token=`` in URLs, passwords in DSNs) and as values of secret-named
arguments. They go through embedded governed and plain calls, approvals, timeline
events, notifications, log lines and the ``/v1`` server (fail, cancel, events, jobs).

The one place a secret may stay is a tool's own *return value* in the ledger's result
column: a replay must hand the caller back exactly what the tool returned. Previews,
events, notifications and logs of it are redacted; the test checks the result secret is
found in that column and nowhere else.
"""

from __future__ import annotations

import logging
import secrets
import string
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from onceonly_core.server import create_app
from onceonly_core.server.control import ControlPlane


def _alnum(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def fresh_secrets() -> dict[str, str]:
    return {
        "stripe": "sk_live_" + _alnum(24),
        "openai": "sk-" + _alnum(40),
        "github": "ghp_" + _alnum(36),
        "aws": "AKIA" + _alnum(16, string.ascii_uppercase + string.digits),
        "jwt": f"eyJ{_alnum(20)}.{_alnum(30)}.{_alnum(20)}",
        "bearer": _alnum(32),
        "query_key": _alnum(24),
        "query_token": _alnum(24),
        "dsn_password": _alnum(18),
        "password_arg": _alnum(20),
        "api_key_arg": _alnum(20),
        "token_arg": _alnum(20),
        "header_arg": _alnum(20),
        "event_secret": _alnum(22),
        "server_error": _alnum(22),
        "server_reason": _alnum(22),
        "job_error": _alnum(22),
        "hook_error": _alnum(22),
    }


def _leaky_text(s: dict[str, str]) -> str:
    """What an HTTP library's exception says: the URL, a header dump, a DSN, keys."""
    return (
        f"POST https://api.example.com/v1/charge?api_key={s['query_key']}"
        f"&token={s['query_token']} failed: 401; request headers: "
        f"{{'Authorization': 'Bearer {s['bearer']}'}}; db "
        f"postgresql://app:{s['dsn_password']}@db.internal:5432/pay; keys "
        f"{s['stripe']} {s['openai']} {s['github']} {s['aws']} {s['jwt']}"
    )


def _dump(engine: sa.Engine) -> dict[str, str]:
    """``table.column`` -> every value of that column as text, for every onceonly table.

    Every row of the shared test database, whatever earlier runs left there, so the
    values are collected in lists and joined once (linear: appending to one growing
    string per value was quadratic and, with a few megabyte results stored by the
    result-size tests, ran past the test's timeout once the database had grown)."""
    parts: dict[str, list[str]] = {}
    md = sa.MetaData()
    names = [n for n in sa.inspect(engine).get_table_names() if n.startswith("onceonly")]
    assert len(names) >= 10, names
    md.reflect(engine, only=names)
    with engine.connect() as conn:
        for table in md.sorted_tables:
            for row in conn.execute(sa.select(table)):
                for col, value in row._mapping.items():
                    if isinstance(value, (bytes, bytearray, memoryview)):
                        value = bytes(value).decode("utf-8", "replace")
                    parts.setdefault(f"{table.name}.{col}", []).append(f"{value}")
    return {where: "\n".join(values) for where, values in parts.items()}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def capture() -> Iterator[_Capture]:
    handler = _Capture()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


def test_no_secret_is_stored_in_any_table_or_log(db_url: str, capture: _Capture) -> None:
    s = fresh_secrets()
    result_secret = "sk_live_" + _alnum(24)
    tenant = f"t-{secrets.token_hex(6)}"
    cp = ControlPlane(db_url, migrate=True, job_workers=0)
    try:
        _drive(cp, tenant, s, result_secret)
        tables = _dump(cp.gov_store.engine)
    finally:
        cp.close()

    leaks = [
        f"{name} in {where}"
        for name, secret in s.items()
        for where, text in tables.items()
        if secret in text
    ]
    assert not leaks, leaks
    # The tool's own return value: stored as returned (replay is byte-exact), only there.
    holders = [where for where, text in tables.items() if result_secret in text]
    assert holders == ["onceonly_ledger.result"], holders
    logged = "\n".join(capture.lines)
    assert any("redacted" in line.lower() or "[REDACTED]" in line for line in capture.lines)
    bad = [n for n, secret in {**s, "result": result_secret}.items() if secret in logged]
    assert not bad, bad


def _drive(cp: ControlPlane, tenant: str, s: dict[str, str], result_secret: str) -> None:
    cp.keys.ensure_tenant(tenant)
    g = cp.guard(tenant)
    gov = g.gov
    gov.policy_from_template("bot", "permissive", {"require_approval": ["wire"]})
    notified: list[dict[str, Any]] = []
    gov.on_notify(notified.append)

    def broken_hook(event: dict[str, Any]) -> None:
        raise RuntimeError(f"hook failed with password={s['hook_error']}")

    gov.on_notify(broken_hook)  # logged with its traceback by the engine

    def charge(amount: int, api_key: str, password: str, token: str, headers: Any) -> None:
        raise RuntimeError(_leaky_text(s))

    def wire(amount: int, api_key: str) -> str:
        return "sent"

    def lookup(customer: str) -> dict[str, str]:
        return {"customer": customer, "restricted_key": result_secret}

    args = {
        "amount": 100,
        "api_key": s["api_key_arg"],
        "password": s["password_arg"],
        "token": s["token_arg"],
        "headers": {"X-Api-Key": s["header_arg"], "note": f"Bearer {s['bearer']}"},
    }
    # Governed, failing: the ledger error, the audit row, the timeline, notifications.
    res = g.call_tool(charge, args, agent_id="bot", run_id="run-1")
    assert res.decision == "failed"
    assert s["stripe"] not in (res.error or "")  # the caller's (and a model's) view too
    # Plain guarded call, failing: the ledger error column.
    with pytest.raises(RuntimeError):
        g(charge, 5, s["api_key_arg"], s["password_arg"], s["token_arg"], None)
    # Pending approval: the approval's arguments.
    res = g.call_tool(wire, {"amount": 1, "api_key": s["api_key_arg"]}, agent_id="bot")
    assert res.decision == "pending_approval"
    # A custom timeline event.
    gov.post_event(
        "run-1",
        "note",
        data={"msg": f"retrying with api_key={s['event_secret']}", "secret": s["event_secret"]},
    )
    # A result carrying a secret: replayed exactly.
    first = g.call_tool(lookup, {"customer": "c1"}, agent_id="bot", run_id="run-1")
    again = g.call_tool(lookup, {"customer": "c1"}, agent_id="bot", run_id="run-1")
    assert first.result == again.result == {"customer": "c1", "restricted_key": result_secret}
    assert notified and all(s["stripe"] not in str(e) for e in notified)

    # The /v1 server: fail and cancel texts, events, a failing job.
    def job(ctx: Any) -> None:
        raise RuntimeError(f"downstream said token={s['job_error']} was revoked")

    cp.jobs.register("job-*", job)
    app = create_app(control=cp)
    with TestClient(app) as http:
        h = {"Authorization": f"Bearer {cp.keys.create_key(tenant)}"}
        lease = http.post("/v1/ai/lease", json={"key": "k1"}, headers=h).json()["lease_id"]
        r = http.post(
            "/v1/ai/fail",
            json={"key": "k1", "lease_id": lease, "error_code": f"api_key={s['server_error']}"},
            headers=h,
        )
        assert r.status_code == 200, r.text
        lease = http.post("/v1/ai/lease", json={"key": "k2"}, headers=h).json()["lease_id"]
        r = http.post(
            "/v1/ai/cancel",
            json={"key": "k2", "lease_id": lease, "reason": f"password: {s['server_reason']}"},
            headers=h,
        )
        assert r.status_code == 200, r.text
        r = http.post(
            "/v1/events",
            json={
                "run_id": "run-2",
                "type": "custom",
                "message": f"Authorization: Bearer {s['bearer']}",
                "data": {"api_key": s["api_key_arg"]},
            },
            headers=h,
        )
        assert r.status_code == 200, r.text
        r = http.post("/v1/ai/run", json={"key": "job-1", "metadata": {"x": 1}}, headers=h)
        assert r.status_code == 200, r.text
        assert cp.jobs.run_once() == 1


def test_every_onceonly_logger_redacts() -> None:
    """A filter on a logger only sees that logger's records: each one must have it."""
    import re
    from pathlib import Path

    from onceonly_core.redact import LOGGERS, log_filter

    root = Path(__file__).resolve().parents[2]
    names = set()
    for path in [
        *root.joinpath("onceonly_core").rglob("*.py"),
        *root.joinpath("integrations").rglob("*.py"),
    ]:
        names.update(re.findall(r"getLogger\(\"(onceonly[\w.]*)\"\)", path.read_text()))
    assert names and names <= set(LOGGERS), names - set(LOGGERS)
    for name in LOGGERS:
        assert log_filter in logging.getLogger(name).filters
    record = logging.LogRecord(
        "onceonly", logging.ERROR, __file__, 1, "url %s", ("x?api_key=abcdefgh12",), None
    )
    assert log_filter.filter(record)
    assert record.getMessage() == "url x?api_key=[REDACTED]"
