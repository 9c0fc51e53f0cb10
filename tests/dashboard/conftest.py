"""Fixtures of the dashboard tests: a governed Guard with a policy, the app over it, and
a TestClient that talks to it as the operator's browser would (Host 127.0.0.1)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the dashboard needs the 'server' extra")

with warnings.catch_warnings():
    # Starlette asks for httpx2 and warns when it finds httpx; the client works either way.
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

from onceonly_core import Guard
from onceonly_core.dashboard import create_dashboard
from onceonly_core.governance import Policy

BASE = "http://127.0.0.1:8765"
CSRF = re.compile(r'<meta name="csrf-token" content="([0-9a-f]+)">')


def csrf_of(html: str) -> str:
    m = CSRF.search(html)
    assert m, "no CSRF token on the page"
    return m.group(1)


@pytest.fixture
def guard() -> Iterator[Guard]:
    g = Guard("memory://", namespace="acme", quiet=True)
    g.gov.upsert_policy(
        Policy(
            agent_id="bot",
            max_spend_usd_per_day=10,
            max_actions_per_hour=50,
            max_calls_per_tool={"send_email": 5},
            require_approval=["refund"],
        )
    )
    yield g
    g.close()


@pytest.fixture
def client(guard: Guard) -> Iterator[TestClient]:
    with TestClient(create_dashboard(guard=guard), base_url=BASE) as c:
        yield c


def _post(c: TestClient, path: str, fields: dict[str, str], **headers: str) -> Any:
    """A form post from the dashboard's own page (with its CSRF token)."""
    token = csrf_of(c.get("/").text)
    return c.post(
        path,
        data={"csrf": token, "next": "/agents", **fields},
        headers={"origin": BASE, "sec-fetch-site": "same-origin", **headers},
        follow_redirects=False,
    )


@pytest.fixture
def post() -> Callable[..., Any]:
    """``post(client, "/actions/x", {fields}, **headers)``: a same-origin form post."""
    return _post


@pytest.fixture
def csrf() -> Callable[[str], str]:
    """The CSRF token on a page."""
    return csrf_of


@pytest.fixture
def make_client() -> Callable[[Any], TestClient]:
    """A TestClient for another app (use it as a context manager)."""
    return lambda app: TestClient(app, base_url=BASE)
