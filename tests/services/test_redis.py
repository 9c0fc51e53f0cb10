"""The Redis ledger under real processes, real crashes and a real server restart.

* The storms, the crash points (kill -9 before the claim, after the claim, after the effect,
  after the completion) and the paused owner (SIGSTOP past its lease) are the very tests of
  ``test_crash_and_races.py``, collected here a second time with ``db_url`` pointing at
  Redis: the crash matrix in docs/guarantees.md holds on Redis as written.
* The Redis server is killed (``kill -9``) under a running worker and started again: calls
  in the outage get ``StoreError`` and run nothing; with ``appendonly yes`` +
  ``appendfsync always`` no acknowledged claim is lost, so no key runs twice. Without
  persistence (the CI server's own settings) a restart forgets every record, which is what
  the store's startup warning says.
* Governance is refused at construction on a Redis ledger.

The restart tests stop and start the Redis server behind ``ONCEONLY_REDIS_URL`` and need it
to be local and ``redis-server`` installed; they always start it again with the settings it
had (read with ``CONFIG GET`` first).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

import pytest
import redis

from _services import redis_drop_prefix, require_services
from onceonly_core import ConfigError, Guard
from onceonly_core.stores import NewClaim, open_store
from onceonly_core.stores import redis as redis_store
from onceonly_core.stores.redis import RedisStore
from procs.harness import ledger, stored_value, workers
from services.test_crash_and_races import (  # the same tests, on Redis (db_url below)
    store,
    test_kill_after_completion_replays,
    test_kill_after_the_claim_before_the_effect,
    test_kill_after_the_effect_raise_runs_nothing,
    test_kill_after_the_effect_reconcile_records_the_downstream_answer,
    test_kill_after_the_effect_retry_runs_again_with_the_same_idempotency_key,
    test_kill_before_the_claim_commits,
    test_paused_owner_is_fenced_out,
    test_retry_storm_after_a_failed_or_interrupted_first_run,
    test_storm_every_key_runs_once_and_every_caller_gets_its_result,
)
from services.test_pg_restart import ok_count, wait_results

__all__ = [
    "store",
    "test_kill_after_completion_replays",
    "test_kill_after_the_claim_before_the_effect",
    "test_kill_after_the_effect_raise_runs_nothing",
    "test_kill_after_the_effect_reconcile_records_the_downstream_answer",
    "test_kill_after_the_effect_retry_runs_again_with_the_same_idempotency_key",
    "test_kill_before_the_claim_commits",
    "test_paused_owner_is_fenced_out",
    "test_retry_storm_after_a_failed_or_interrupted_first_run",
    "test_storm_every_key_runs_once_and_every_caller_gets_its_result",
]


def with_prefix(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


@pytest.fixture
def db_url(redis_url: str) -> Iterator[str]:
    """A Redis ledger URL with a key prefix of its own (deleted afterwards): the imported
    crash and race tests run on it."""
    prefix = f"oo-test-{uuid4().hex[:12]}"
    yield with_prefix(redis_url, prefix)
    # A restart test that left no server behind has failed loudly already.
    with contextlib.suppress(redis.ConnectionError):
        redis_drop_prefix(redis_url, prefix)


# -- governance -------------------------------------------------------------------------
def test_governance_is_refused_at_construction(db_url: str) -> None:
    with pytest.raises(ConfigError, match=r"governance .* not available on the Redis ledger"):
        Guard(db_url, agent_id="agent-1")
    s = open_store(db_url)
    try:
        with pytest.raises(ConfigError, match="governance-store interface"):
            Guard(store=s, agent_id="agent-1")
        g = Guard(store=s, namespace="ns", quiet=True)
        with pytest.raises(ConfigError, match="Redis ledger"):
            g.gov  # noqa: B018 - the property is the check
        ran: list[int] = []

        def tool(x: int) -> int:
            ran.append(x)
            return x * 2

        with g.agent("agent-1"), pytest.raises(ConfigError, match="Redis ledger"):
            g(tool, 1)
        with pytest.raises(ConfigError, match="Redis ledger"):
            g.call_tool(tool, {"x": 2}, agent_id="agent-1")
        assert ran == []  # refused before anything ran or was claimed
        assert s.list(namespace="ns") == []
        assert g(tool, 21) == 42  # the ledger itself works
    finally:
        s.close()


def test_the_cli_reads_a_redis_ledger(db_url: str) -> None:
    g = Guard(db_url, namespace="cli-ns", quiet=True)
    try:
        g(str.upper, "a")
    finally:
        g.close()
    out = subprocess.run(
        [sys.executable, "-m", "onceonly_core.cli", "show", "--url", db_url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert (row["namespace"], row["state"]) == ("cli-ns", "succeeded")
    assert row["tool"] == "builtins.str.upper"
    migrate = subprocess.run(
        [sys.executable, "-m", "onceonly_core.cli", "migrate", "--url", db_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrate.returncode != 0 and "no schema to migrate" in migrate.stderr


# -- durability warning -----------------------------------------------------------------
def _fresh_warnings() -> None:
    redis_store._WARNED.clear()


def test_durability_warning_names_the_settings(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One warning per server per process, with the settings that could lose a claim."""
    client = redis.Redis.from_url(db_url.partition("?")[0], decode_responses=True)
    try:
        conf = dict(client.config_get("append*"))
    finally:
        client.close()
    _fresh_warnings()
    caplog.set_level(logging.WARNING, logger="onceonly")
    stores = [open_store(db_url) for _ in range(2)]
    try:
        for s in stores:
            s.claim("ns", "k", NewClaim("t", "w", 30.0))
    finally:
        for s in stores:
            s.close()
    warnings = [r for r in caplog.records if r.name == "onceonly"]
    durable = (conf.get("appendonly"), conf.get("appendfsync")) == ("yes", "always")
    if durable:
        assert warnings == []
        return
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    if conf.get("appendonly") != "yes":
        assert f"appendonly {conf.get('appendonly')}" in text
    else:
        assert f"appendfsync {conf.get('appendfsync')}" in text
    assert "appendonly yes and appendfsync always" in text


class NoConfig(redis.Redis):
    """A server where CONFIG is disabled (renamed away), as on many managed services."""

    def config_get(self, *args: Any, **kwargs: Any) -> Any:
        raise redis.ResponseError("unknown command 'CONFIG'")


def test_a_server_without_config_gets_one_honest_warning(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    _fresh_warnings()
    caplog.set_level(logging.WARNING, logger="onceonly")
    prefix = f"oo-test-{uuid4().hex[:12]}"
    s = RedisStore(client=NoConfig.from_url(redis_url), prefix=prefix)
    try:
        assert s.claim("ns", "k", NewClaim("t", "w", 30.0)).mine
        assert s.durability_problems() is None
    finally:
        s.close()
        redis_drop_prefix(redis_url, prefix)
    (warning,) = [r for r in caplog.records if r.name == "onceonly"]
    assert "cannot read the server's persistence settings" in warning.getMessage()


def test_a_dropped_connection_is_never_retried_for_a_write(redis_url: str) -> None:
    """redis-py re-sends a command after a dropped connection by default; a claim whose reply
    was lost may have committed, so the store's client must not."""
    s = open_store(redis_url)
    try:
        assert isinstance(s, RedisStore)
        retry = s.client.get_retry()
        assert retry is not None and retry.get_retries() == 0
    finally:
        s.close()


# -- a Redis restart under a running worker ---------------------------------------------
SETTINGS = ("dir", "logfile", "appendonly", "appendfsync", "save", "bind", "port")


def _unusable(reason: str) -> None:
    if require_services():
        pytest.fail(f"cannot restart Redis: {reason} (ONCEONLY_REQUIRE_SERVICES=1)")
    pytest.skip(f"cannot restart Redis: {reason}")


class Server:
    """The local Redis server behind the URL: stop it, start it with other settings, and
    put it back as it was."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.hostname not in ("localhost", "127.0.0.1", "::1"):
            _unusable(f"{parts.hostname} is not this machine")
        if shutil.which("redis-server") is None:
            _unusable("redis-server is not installed")
        self.url = url
        self.client = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
        )
        try:
            found: dict[str, str] = {}
            for name in SETTINGS:
                found.update(self.client.config_get(name))
        except redis.ResponseError as err:
            _unusable(f"CONFIG GET is refused: {err}")
        self.original = found

    def pid(self) -> int:
        return int(self.client.info("server")["process_id"])

    def up(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def start(self, **override: str) -> None:
        conf = {**self.original, **override}
        args = ["redis-server", "--daemonize", "yes"]
        for name in SETTINGS:
            if name == "bind":
                args += ["--bind", *conf[name].split()]
            else:
                args += [f"--{name}", conf[name]]
        subprocess.run(args, check=True, timeout=30, capture_output=True)
        deadline = time.monotonic() + 30
        while not self.up():
            assert time.monotonic() < deadline, "Redis did not come back"
            time.sleep(0.05)

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown, no save."""
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.up():
            assert time.monotonic() < deadline, "Redis survived SIGKILL"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.up():
            self.client.shutdown(nosave=True)
        deadline = time.monotonic() + 30
        while self.up():
            assert time.monotonic() < deadline, "Redis did not stop"
            time.sleep(0.05)

    def restore(self) -> None:
        """Back as it was: the original settings (stop whatever runs now first)."""
        now = {}
        if self.up():
            for name in ("dir", "appendonly", "appendfsync"):
                now.update(self.client.config_get(name))
        if now != {k: self.original[k] for k in ("dir", "appendonly", "appendfsync")}:
            self.stop()
        if not self.up():
            self.start()
        self.client.close()


@pytest.fixture
def server(redis_url: str) -> Iterator[Server]:
    s = Server(redis_url)
    try:
        yield s
    finally:
        s.restore()  # never leave Redis down, or changed, for the rest of the suite


def run_through_a_crash(server: Server, url: str, tmp_path: Path, namespace: str) -> Any:
    """A worker calls the guard in a loop; Redis is killed after 20 calls, stays down for
    longer than the completion retries, and is started again (same settings, same dir)."""
    stop = tmp_path / "stop"
    with workers(tmp_path, url, namespace) as w:
        # A short lease and on_unknown="raise": a key whose completion could not be
        # recorded must never run twice here; calling it again has to raise UnknownOutcome.
        loop = w.start(
            "loop",
            "--stop-file",
            str(stop),
            "--lease",
            "2.0",
            "--wait",
            "10",
            "--on-unknown",
            "raise",
            "--tool-sleep",
            "0.01",  # most of the time the worker is inside the tool: the kill cuts a claim
        )
        wait_results(loop, lambda r: ok_count(r) >= 20, "20 calls before the crash")
        conf = dict(server.client.config_get("dir"))
        conf.update(server.client.config_get("append*"))
        server.kill()
        killed = time.monotonic()
        down_since = len(loop.results())
        wait_results(
            loop,
            lambda r: sum("error" in x for x in r[down_since:]) >= 10,
            "10 failed calls while Redis is down",
        )
        time.sleep(max(0.0, killed + 2.5 - time.monotonic()))
        server.start(**{k: conf[k] for k in ("dir", "appendonly", "appendfsync")})
        back = len(loop.results())
        wait_results(loop, lambda r: ok_count(r[back:]) >= 20, "20 calls after the restart")
        stop.touch()
        loop.expect_exit(0)
        results = loop.results()
        effects = w.effect_lines()
    return results, effects, back


def check_outage_calls(results: list[dict[str, Any]], effects: list[dict[str, Any]]) -> None:
    """Every failure is one of ours, the outage was seen as StoreError, and a call that
    failed with a plain StoreError ran nothing (no run without a claim)."""
    foreign = [r for r in results if r.get("foreign")]
    assert not foreign, f"a driver error escaped the guard: {foreign[:3]}"
    errors = [r for r in results if "error" in r]
    assert any(r["store_error"] for r in errors), "the outage was never noticed"
    ran = {e["seq"] for e in effects}
    for r in errors:
        if r["error"] == "StoreError":
            assert r["seq"] not in ran, f"call {r['seq']} ran although its claim failed"


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_redis_killed_mid_run_with_appendfsync_always(
    server: Server, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """appendonly yes + appendfsync always: every acknowledged claim survives the crash, so
    the checks of the PostgreSQL restart test hold — no key runs twice, no effect without
    its record, and the sweep either replays or reports the unknown outcome."""
    data = tmp_path / "redis-data"
    data.mkdir()
    server.stop()
    server.start(dir=str(data), appendonly="yes", appendfsync="always")
    url = with_prefix(redis_url, "oo-test-durable")
    results, effects, back = run_through_a_crash(server, url, tmp_path, namespace)
    store = open_store(url)
    try:
        records = ledger(store, namespace)
    finally:
        store.close()

    check_outage_calls(results, effects)
    for r in results:
        if "error" in r and not r["store_error"]:
            # Only a key left running by the cut may answer UnknownOutcome.
            assert r["error"] == "UnknownOutcome", r
            assert records[r["item"]].state == "running", r
    runs = collections.Counter(e["item"] for e in effects)
    assert [k for k, n in runs.items() if n > 1] == [], "a key ran twice"
    by_seq = {r["seq"]: r for r in results}
    for e in effects:
        rec = records.get(e["item"])
        assert rec is not None, f"{e['item']} ran, and its claim was lost in the crash"
        assert rec.token == 1, rec
        call = by_seq[e["seq"]]
        if "value" in call:
            assert (rec.state, rec.executions) == ("succeeded", 1)
            assert stored_value(rec) == call["value"] == e["value"]
        else:
            assert call["error"] == "CompletionNotRecorded", call
            assert (rec.state, rec.executions) in {("running", 0), ("succeeded", 1)}, rec
    first: dict[str, str] = {}
    for r in results:
        if "value" in r:
            assert first.setdefault(r["item"], r["value"]) == r["value"], r
    assert ok_count(results[back:]) >= 20
    for r in (r for r in results if r.get("sweep")):
        if "value" not in r:
            assert r["error"] == "UnknownOutcome", r
            assert records[r["item"]].state == "running"


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_redis_killed_mid_run_without_persistence_forgets(
    server: Server, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """No persistence (appendonly no, no snapshots): the outage is still StoreError with no
    run without a claim, but the restarted server has no records, so keys completed before
    the crash run again after it — the loss the store's startup warning names."""
    server.stop()
    server.start(dir=str(tmp_path), appendonly="no", save="")
    url = with_prefix(redis_url, "oo-test-volatile")
    results, effects, _ = run_through_a_crash(server, url, tmp_path, namespace)
    check_outage_calls(results, effects)
    runs = collections.Counter(e["item"] for e in effects)
    before_crash = {r["item"] for r in results if "value" in r and r["seq"] < 20}
    assert before_crash, "nothing completed before the crash"
    assert all(runs[item] == 2 for item in before_crash), "the crash did not forget them"
