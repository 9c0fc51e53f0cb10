"""The dashboard's dead-letter panel (issue 16 item 3): dead notifications are listed as
text (never markup), and a retry is a CSRF-checked form post that makes the row due again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from onceonly_core import Guard

EVIL = "<script>alert('dead')</script>"


@pytest.fixture
def guard(store_url: str) -> Iterator[Guard]:
    """The panel on a SQL-backed guard and on a Redis-backed one (issue 18)."""
    g = Guard(store_url, namespace="acme", quiet=True)
    yield g
    g.close()


def dead_row(guard: Guard, monkeypatch: Any) -> str:
    monkeypatch.setenv("ONCEONLY_NOTIFY_IN_PROCESS", "0")
    monkeypatch.setenv("ONCEONLY_NOTIFY_EMAIL_TO", "ops@example.com")
    store: Any = guard.gov.store
    guard.gov.deliverer()  # imports the outbox, which plans the rows the store writes
    assert store.enqueue_notification(guard.namespace, {"type": "run_failed", "tool": EVIL}) == 1
    # As the deliverer leaves a row after its last attempt (a hostile receiver's words
    # could only reach last_error through our own formatting; markup here proves escaping).
    (claim,) = store.outbox_claim(guard.namespace, 10, 60.0)
    assert store.outbox_mark(guard.namespace, claim["id"], claim["lease_token"], "dead", 1.0, EVIL)
    return str(claim["id"])


@pytest.mark.parametrize("store_url", ["memory", "redis"], indirect=True)
def test_dead_letters_are_listed_as_text_and_retried_by_a_form_post(
    client: Any, guard: Guard, post: Any, monkeypatch: Any
) -> None:
    nid = dead_row(guard, monkeypatch)
    page = client.get("/notifications")
    assert page.status_code == 200
    assert EVIL not in page.text and "&lt;script&gt;alert(&#x27;dead&#x27;)" in page.text
    api = client.get("/api/notifications")
    assert "<script" not in api.text  # the JSON carries markup as escaped data
    (shown,) = api.json()["rows"]
    assert shown["cells"][-1]["t"] == guard.gov.deliverer().list()[0]["event_id"]

    refused = client.post(
        "/actions/retry_notification",
        data={"csrf": "0" * 64, "notification": nid, "next": "/notifications"},
        follow_redirects=False,
    )
    assert refused.status_code == 403
    assert guard.gov.deliverer().list("dead")[0]["id"] == nid

    done = post(client, "/actions/retry_notification", {"notification": nid})
    assert done.status_code == 303 and "done=notification_retried" in done.headers["location"]
    (row,) = guard.gov.deliverer().list()
    assert row["state"] == "pending" and row["attempts"] == 0
    assert client.get("/api/notifications").json()["rows"] == []

    again = post(client, "/actions/retry_notification", {"notification": "ntf_nope"})
    assert again.status_code == 409
