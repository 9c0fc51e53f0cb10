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
* The store contract kit runs on a three-node Redis Cluster and on a master behind a
  Sentinel, both started by this module.

The restart tests stop and start the Redis server behind ``ONCEONLY_REDIS_URL`` and need it
to be local and ``redis-server`` installed; they always start it again with the settings it
had (read with ``CONFIG GET`` first).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

import pytest
import redis

from _services import redis_drop_prefix, require_services
from onceonly_core import ConfigError, Guard, StoreError
from onceonly_core.stores import NewClaim, open_store
from onceonly_core.stores import redis as redis_store
from onceonly_core.stores.redis import RedisStore
from onceonly_core.testing import StoreContract
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
def test_governance_runs_on_the_redis_ledger(db_url: str) -> None:
    """Guard(url="redis://…", agent_id=…) governs: the policy blocks, the cap holds, and
    the decisions are in a verifying audit chain, all in this Redis."""
    from onceonly_core.governance import Policy
    from onceonly_core.stores.redisgov import RedisGovernanceStore

    g = Guard(db_url, namespace="ns", agent_id="agent-1", quiet=True)
    try:
        assert isinstance(g.gov.store, RedisGovernanceStore)
        g.gov.upsert_policy(Policy(agent_id="agent-1", max_actions_per_hour=1))
        ran: list[int] = []

        def tool(x: int) -> int:
            ran.append(x)
            return x * 2

        assert g.call_tool(tool, {"x": 1}).decision == "executed"
        second = g.call_tool(tool, {"x": 2})
        assert (second.decision, second.policy_reason) == (
            "blocked",
            "max_actions_per_hour_exceeded",
        )
        assert ran == [1]
        assert [e.decision for e in g.gov.agent_logs("agent-1")] == ["blocked", "executed"]
        assert g.gov.verify_audit() == []
    finally:
        g.close()


def test_a_custom_store_without_governance_is_refused_at_construction(db_url: str) -> None:
    """The seam: a store that leaves governance_store() alone is refused when an agent is
    given, before anything runs; ungoverned calls still work on it."""
    from onceonly_core.stores.base import Store
    from onceonly_core.stores.redis import RedisStore

    class Plain(RedisStore):
        governance_store = Store.governance_store  # type: ignore[assignment]

    s = Plain(db_url)
    try:
        with pytest.raises(ConfigError, match=r"Plain provides no governance.*governance_store"):
            Guard(store=s, agent_id="agent-1")
        g = Guard(store=s, namespace="ns", quiet=True)
        with pytest.raises(ConfigError, match="governance_store"):
            g.gov  # noqa: B018 - the property is the check
        ran: list[int] = []

        def tool(x: int) -> int:
            ran.append(x)
            return x * 2

        with pytest.raises(ConfigError, match="governance_store"):
            g.call_tool(tool, {"x": 2}, agent_id="agent-1")
        assert ran == []  # refused before anything ran or was claimed
        assert s.list(namespace="ns") == []
        assert g(tool, 21) == 42  # the ledger itself works
    finally:
        s.close()


def test_async_calls_on_one_key_run_once(db_url: str) -> None:
    """Twenty concurrent tasks, one key: the store's primitives run in worker threads
    (``blocking``), one task executes, the others wait and replay its result."""
    runs: list[int] = []

    async def fetch(n: int) -> str:
        runs.append(n)
        await asyncio.sleep(0.05)
        return f"page {n}"

    async def main() -> list[str]:
        g = Guard(db_url, namespace="async", quiet=True)
        try:
            return list(await asyncio.gather(*(g(fetch, 7) for _ in range(20))))
        finally:
            g.close()

    assert asyncio.run(main()) == ["page 7"] * 20
    assert runs == [7]


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


# -- the contract kit on a Redis Cluster ------------------------------------------------
def _free_port() -> int:
    """A port that is free, and whose cluster bus port (+10000) is free too."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair")


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A three-node Redis Cluster of our own (no replicas, no persistence), started from
    the redis-server and redis-cli of this machine and shut down afterwards."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        _unusable("redis-server / redis-cli are not installed")
    base = tmp_path_factory.mktemp("cluster")
    ports = [_free_port() for _ in range(3)]
    try:
        for port in ports:
            d = base / str(port)
            d.mkdir()
            subprocess.run(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--daemonize",
                    "yes",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(d),
                    "--logfile",
                    str(d / "redis.log"),
                ],
                check=True,
                timeout=30,
                capture_output=True,
            )
        nodes = [f"127.0.0.1:{p}" for p in ports]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            timeout=60,
            capture_output=True,
        )
        deadline = time.monotonic() + 30
        for port in ports:
            client = redis.Redis(port=port, decode_responses=True)
            try:
                while client.cluster("info").get("cluster_state") != "ok":
                    assert time.monotonic() < deadline, "the cluster did not form"
                    time.sleep(0.1)
            finally:
                client.close()
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for port in ports:  # the nodes this fixture started, by their ports
            subprocess.run(
                ["redis-cli", "-p", str(port), "shutdown", "nosave"],
                timeout=30,
                capture_output=True,
            )


class TestRedisClusterContract(StoreContract):
    """The store contract kit on a real Redis Cluster: every script's keys must be in one
    slot, or the cluster refuses it (CROSSSLOT)."""

    @pytest.fixture
    def store(self, cluster_url: str) -> Iterator[RedisStore]:
        s = RedisStore(cluster_url, durability_check=False)
        yield s
        s.close()

    @pytest.fixture
    def store_factory(self, cluster_url: str) -> Any:
        return functools.partial(RedisStore, cluster_url, durability_check=False)

    def test_the_cluster_client_never_re_sends(self, store: RedisStore) -> None:
        assert store.client.retry.get_retries() == 0


# -- the contract kit through Sentinel ---------------------------------------------------
@pytest.fixture(scope="module")
def sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis master and one Sentinel watching it, both our own, stopped afterwards."""
    if shutil.which("redis-server") is None:
        _unusable("redis-server is not installed")
    base = tmp_path_factory.mktemp("sentinel")
    master, sentinel = _free_port(), _free_port()
    conf = base / "sentinel.conf"
    conf.write_text(f"sentinel monitor oo-master 127.0.0.1 {master} 1\n")
    pidfile = base / "sentinel.pid"
    try:
        subprocess.run(
            [
                "redis-server",
                "--port",
                str(master),
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(base),
                "--logfile",
                str(base / "master.log"),
            ],
            check=True,
            timeout=30,
            capture_output=True,
        )
        subprocess.run(
            [
                "redis-server",
                str(conf),
                "--sentinel",
                "--port",
                str(sentinel),
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "yes",
                "--pidfile",
                str(pidfile),
                "--logfile",
                str(base / "sentinel.log"),
            ],
            check=True,
            timeout=30,
            capture_output=True,
        )
        client = redis.Redis(port=sentinel, decode_responses=True)
        deadline = time.monotonic() + 30
        try:
            while True:
                with contextlib.suppress(redis.ConnectionError):
                    if client.sentinel_get_master_addr_by_name("oo-master"):
                        break
                assert time.monotonic() < deadline, "the Sentinel did not start"
                time.sleep(0.1)
        finally:
            client.close()
        yield f"redis+sentinel://127.0.0.1:{sentinel}/oo-master/0"
    finally:
        if pidfile.exists():  # the Sentinel this fixture started
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        subprocess.run(
            ["redis-cli", "-p", str(master), "shutdown", "nosave"], timeout=30, capture_output=True
        )


class TestRedisSentinelContract(StoreContract):
    """The store contract kit on a master found through Sentinel (redis+sentinel://)."""

    @pytest.fixture
    def store(self, sentinel_url: str) -> Iterator[RedisStore]:
        s = RedisStore(sentinel_url, durability_check=False)
        yield s
        s.close()

    @pytest.fixture
    def store_factory(self, sentinel_url: str) -> Any:
        return functools.partial(RedisStore, sentinel_url, durability_check=False)

    def test_the_master_client_never_re_sends(self, store: RedisStore) -> None:
        retry = store.client.get_retry()
        assert retry is not None and retry.get_retries() == 0


# -- a reply lost after the claim committed ---------------------------------------------
class LosingProxy:
    """A TCP proxy in front of Redis that, once armed, forwards the next EVALSHA to the
    server (which runs it) and then cuts the connection instead of passing the reply on:
    a claim that committed and whose reply was lost."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = False
        self.cut = threading.Event()
        self.evalshas = 0  # EVALSHA commands sent upstream since arming
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        try:
            while data := src.recv(65536):
                if upward and self.armed:
                    self.evalshas += data.upper().count(b"EVALSHA")
                if not upward and self.armed and self.evalshas and not self.cut.is_set():
                    self.cut.set()  # the server ran it; the reply never arrives
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _drop(s)

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            _drop(s)


def _drop(s: socket.socket) -> None:
    # shutdown() first: it sends the FIN and wakes the other pump's recv(); close() alone
    # leaves the connection open while another thread still reads from it.
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()


def test_a_claim_whose_reply_was_lost_is_not_sent_again(redis_url: str) -> None:
    """The claim script ran on the server, its reply was lost: the caller gets StoreError,
    the claim is in Redis once (ours, token 1), and the store sent it exactly once — with
    redis-py's default retry it would have been sent again, found our own record, and the
    call would have waited out its own lease. The guarded tool never ran."""
    parts = urlsplit(redis_url)
    proxy = LosingProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    prefix = f"oo-test-{uuid4().hex[:12]}"
    direct = RedisStore(redis_url, prefix=prefix, durability_check=False)
    lossy = RedisStore(
        f"redis://127.0.0.1:{proxy.port}{parts.path or '/0'}",
        prefix=prefix,
        durability_check=False,
    )
    ran: list[str] = []

    def charge(order: str) -> str:
        ran.append(order)
        return f"charged {order}"

    try:
        direct.claim("ns", "warm-up", NewClaim("t", "w", 30.0))  # the scripts are loaded
        assert lossy.get("ns", "nothing") is None  # connected through the proxy
        g = Guard(store=lossy, namespace="ns", quiet=True)
        proxy.armed = True
        with pytest.raises(StoreError, match="claim failed"):
            g.using(key="order-1")(charge, "o-1")
        assert proxy.cut.is_set()
        assert proxy.evalshas == 1, "the claim was sent again"
        assert ran == []
        rec = direct.get("ns", "order-1")
        assert rec is not None and (rec.state, rec.token, rec.owner) == ("running", 1, g._owner)
    finally:
        lossy.close()
        direct.close()
        proxy.close()
        redis_drop_prefix(redis_url, prefix)


# -- keys and URLs ----------------------------------------------------------------------
@pytest.mark.parametrize("namespace", ["t", "a}b", "}x", "{x}", "{", "a/b%7B", "\u5de5{}"])
def test_a_namespace_lives_in_one_cluster_slot(namespace: str) -> None:
    """Every key a script touches for a namespace hashes to one Redis Cluster slot, whatever
    braces the namespace holds (an empty or cut hash tag would scatter them)."""
    from redis.crc import key_slot

    s = RedisStore(client=redis.Redis(), prefix="oo", durability_check=False)
    record, index, floor, expiry = s._keys(namespace)
    keys = [record + "k1", record + "another key", index, floor, expiry]
    assert len({key_slot(k.encode()) for k in keys}) == 1, keys
    other = s._keys(namespace + "-2")[0]
    assert other != record


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h/0?prefix=a{b}", "may not contain braces"),
        ("redis+sentinel://h:26379", "redis\\+sentinel://host:port"),
        ("redis+sentinel://h:x/svc", "bad Sentinel address"),
    ],
)
def test_bad_redis_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_store(url)


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
    other = db_url.replace("prefix=", "prefix=other-")  # another prefix, the same server
    stores = [open_store(db_url), open_store(db_url), open_store(other)]
    try:
        for s in stores:
            s.claim("ns", "k", NewClaim("t", "w", 30.0))
    finally:
        for s in stores:
            s.close()
        other_prefix = other.partition("prefix=")[2].partition("&")[0]
        redis_drop_prefix(db_url.partition("?")[0], other_prefix)  # db_url drops its own
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


def test_the_fast_path_reconnects_and_a_forked_child_never_shares_a_socket(db_url: str) -> None:
    """The store sends its scripts on connections it holds (RedisStore._send). One the
    server closed is reconnected before use; a forked child opens its own, so parent and
    child never read each other's replies off one socket."""
    s = open_store(db_url)
    assert isinstance(s, RedisStore) and s._fast
    try:
        assert s.claim("ns", "parent-1", NewClaim("t", "parent", 30.0)).mine
        held = list(s._free)
        assert held, "the fast path holds its connection between calls"
        # The server drops the connection (as a restart or an idle timeout would).
        killer = redis.Redis.from_url(db_url.partition("?")[0])
        try:
            held[0].send_command("CLIENT", "ID")
            killer.client_kill_filter(_id=held[0].read_response())
        finally:
            killer.close()
        assert s.claim("ns", "parent-2", NewClaim("t", "parent", 30.0)).mine
        pid = os.fork()
        if pid == 0:  # the child: its own connection, its own replies
            code = 1
            try:
                ok = all(
                    s.claim("ns", f"child-{i}", NewClaim("t", "child", 30.0)).mine
                    for i in range(50)
                )
                code = 0 if ok and s._free and s._free[0] not in held else 1
            finally:
                os._exit(code)
        for i in range(50):  # meanwhile the parent keeps using its own
            rec = s.claim("ns", f"parent-x{i}", NewClaim("t", "parent", 30.0))
            assert rec.mine and rec.key == f"parent-x{i}"
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        owners = {r.key: r.owner for r in s.list(namespace="ns", limit=1000)}
        assert sum(o == "child" for o in owners.values()) == 50
        assert sum(o == "parent" for o in owners.values()) == 52
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
