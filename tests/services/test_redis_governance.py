"""Governance under real concurrency on the Redis ledger: the same multi-process tests as
on SQL (tests/governance/test_races.py) — 8 processes racing a cap with 0 overshoot, a
worker killed while holding a reservation, the kill switch flipped from another process,
one approval re-asked by eight processes — with ``db_url`` a Redis URL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from uuid import uuid4

import pytest
import redis

from _services import redis_drop_prefix
from governance.test_races import (  # the same tests, on Redis (db_url below)
    guard,
    test_a_killed_worker_reservation_is_swept_as_spent_and_audited,
    test_an_approval_is_consumed_once_when_eight_processes_reask,
    test_disable_agent_from_another_process_stops_the_very_next_call,
    test_racing_processes_never_exceed_a_cap,
)

__all__ = [
    "guard",
    "test_a_killed_worker_reservation_is_swept_as_spent_and_audited",
    "test_an_approval_is_consumed_once_when_eight_processes_reask",
    "test_disable_agent_from_another_process_stops_the_very_next_call",
    "test_racing_processes_never_exceed_a_cap",
]

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]


@pytest.fixture
def db_url(redis_url: str) -> Iterator[str]:
    """A Redis ledger URL with a key prefix of its own, deleted afterwards."""
    prefix = f"oo-test-{uuid4().hex[:12]}"
    yield f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={prefix}"
    with contextlib.suppress(redis.ConnectionError):
        redis_drop_prefix(redis_url, prefix)
