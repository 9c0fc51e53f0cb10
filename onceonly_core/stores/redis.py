"""The Redis ledger (extra ``redis``, on redis-py): ``redis://``, ``rediss://``,
``redis+sentinel://``, ``redis+cluster://``.

Every primitive is **one Lua script**, so it is atomic on the server exactly as one SQL
statement is: no other command runs between its read and its write. The scripts read the
clock with ``TIME`` inside the script, so leases and TTLs are judged by the Redis server's
clock — one clock for every worker, as with PostgreSQL. (Redis >= 5 replicates a script
by its effects, which is what allows ``TIME`` in a script that writes.)

Layout (``P`` is the prefix, ``onceonly`` by default; ``{NS}`` is the namespace with ``%``,
``{`` and ``}`` percent-encoded, so the hash tag is never cut short and every key of one
namespace hashes to one Redis Cluster slot)::

    P:{NS}:r:<key>   HASH   one record (the ledger columns; absent field = NULL)
    P:{NS}:i         ZSET   key -> updated_at (us): listing, newest first
    P:{NS}:x         ZSET   key -> when Redis deletes the record (us), for records with a TTL
    P:{NS}:f         STRING the token floor: every token a deleted record ever had is below it
    P:namespaces     SET    every namespace used (listing across namespaces)

Times are integer microseconds in the hash (exact in a Lua double) and float seconds in
:class:`~onceonly_core.stores.base.Record`.

Expiry: records live forever, like SQL rows, unless a call completes **successfully with a
ttl**: that record is deleted by Redis at ``expires_at`` (``PEXPIREAT``), the moment the
protocol would let the key run again anyway. A running record never carries a TTL (a
take-over removes it), so no claim disappears while it is held. Because a deleted record
takes its token with it, the script raises the namespace's token floor first, and a record
created afterwards starts above it: tokens for a key only grow, and an owner frozen since
before the deletion stays fenced out.

Round trips: a first call is two (the claim script, the finish script) and a replay one
(the claim script finds the record). A store built from a URL sends them on connections
it holds from redis-py's pool, packed by hiredis, without redis-py's per-command layer
(see ``RedisStore._send``); a cluster or a given client goes through redis-py as usual.

Durability: Redis acknowledges a write before it reaches the disk unless the server runs
with ``appendonly yes`` and ``appendfsync always``. The store reads the server's settings
at first use and logs one warning (logger ``onceonly``) when a crash or a restart could
lose a claim. See docs/guarantees.md.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from ..errors import ConfigError, MissingExtraError, StoreError
from .base import RUNNING, NewClaim, Record, Store

if TYPE_CHECKING:
    from .governance import GovernanceStore

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import RedisCluster
    from redis.retry import Retry
except ImportError:  # pragma: no cover - the extra is missing
    raise MissingExtraError("the Redis store", "redis", "redis") from None

_pack: Callable[[tuple[Any, ...]], bytes] | None
try:  # the extra installs redis[hiredis]; without it the fast path packs in Python
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover
    _pack = None

__all__ = ["SCHEMES", "RedisStore"]

log = logging.getLogger("onceonly")

SCHEMES = ("redis://", "rediss://", "redis+sentinel://", "redis+cluster://", "rediss+cluster://")

# Each redis.call() inside a script costs a few microseconds in Redis 7.0 (its arguments
# and reply are converted between Lua and Redis), so the scripts make few calls and carry
# no shared prelude: a record is read with one HGETALL (cheaper than an HMGET of every
# field, and nearly free when the key does not exist), written with one HSET and one HDEL,
# and the server's clock is TIME's two strings, handed back as they are. Optional string
# arguments arrive as "" (NULL) or "=" + value, so that an empty string and NULL stay
# different things.
#
# A script that returns a record returns HGETALL's field/value pairs followed by TIME's
# seconds and microseconds: an even-length list, never shorter than 8 (tool, state and
# token are always there).

# KEYS: record, index, floor, expiry. ARGV: key, tool, owner, lease_us, digest, run, caller.
# A record found: its pairs + TIME (it is not ours). A claim: {seconds, microseconds, token}.
_CLAIM = """
local row = redis.call('HGETALL', KEYS[1])
local t = redis.call('TIME')
if #row > 0 then
  row[#row + 1] = t[1]
  row[#row + 1] = t[2]
  return row
end
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = string.format('%.0f', now)
-- Above every token a deleted (expired) record of this namespace ever had: fencing holds
-- across the deletion. The floor is 0 in a namespace that never used a ttl.
local floor = tonumber(redis.call('GET', KEYS[3]) or '0')
local sets = {'tool', ARGV[2], 'state', 'running', 'token', floor + 1, 'owner', ARGV[3],
  'attempt', 1, 'executions', 0,
  'lease_until', string.format('%.0f', now + tonumber(ARGV[4])),
  'created_at', n, 'updated_at', n}
if ARGV[5] ~= '' then sets[#sets + 1] = 'args_digest'; sets[#sets + 1] = string.sub(ARGV[5], 2) end
if ARGV[6] ~= '' then sets[#sets + 1] = 'run_id'; sets[#sets + 1] = string.sub(ARGV[6], 2) end
if ARGV[7] ~= '' then sets[#sets + 1] = 'caller'; sets[#sets + 1] = string.sub(ARGV[7], 2) end
redis.call('HSET', KEYS[1], unpack(sets))
redis.call('ZADD', KEYS[2], n, ARGV[1])
if floor > 0 then redis.call('ZREM', KEYS[4], ARGV[1]) end  -- the deleted one's entry
return {t[1], t[2], floor + 1}
"""

# KEYS: record, index, expiry. ARGV: key, tool, owner, lease_us, digest, run, caller,
# seen token, seen state, force ('1'/'0'). The record taken over (pairs + TIME), or nil.
_TAKE_OVER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cur = redis.call('HMGET', KEYS[1], 'token', 'state', 'lease_until', 'attempt',
  'expires_at')
-- Compare-and-set on (token, state): whoever changed the record since the caller read it
-- wins, and the caller loses cleanly. A running record is taken only once its lease has
-- expired by this server's clock.
if not cur[1] or tonumber(cur[1]) ~= tonumber(ARGV[8]) then return false end
if ARGV[10] ~= '1' then
  if cur[2] ~= ARGV[9] then return false end
  if cur[2] == 'running' and tonumber(cur[3] or '0') >= now then return false end
end
local n = string.format('%.0f', now)
local sets = {'state', 'running', 'token', tonumber(cur[1]) + 1, 'owner', ARGV[3],
  'attempt', tonumber(cur[4]) + 1,
  'lease_until', string.format('%.0f', now + tonumber(ARGV[4])),
  'tool', ARGV[2], 'updated_at', n}
local dels = {'error'}
for i, field in ipairs({'args_digest', 'run_id', 'caller'}) do
  local v = ARGV[i + 4]
  if v == '' then dels[#dels + 1] = field
  else sets[#sets + 1] = field; sets[#sets + 1] = string.sub(v, 2) end
end
redis.call('HSET', KEYS[1], unpack(sets))
redis.call('HDEL', KEYS[1], unpack(dels))
if cur[5] then
  -- Completed with a ttl before: a held record must never expire, so drop its TTL.
  redis.call('PERSIST', KEYS[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('ZADD', KEYS[2], n, ARGV[1])
local row = redis.call('HGETALL', KEYS[1])
row[#row + 1] = t[1]
row[#row + 1] = t[2]
return row
"""

# KEYS: record, index, floor, expiry. ARGV: key, token, ok ('1'/'0'), result, error, ttl_us.
_FINISH = """
local cur = redis.call('HMGET', KEYS[1], 'token', 'state', 'executions')
-- Fenced: only the holder of the current token, while the record is running, completes.
-- (A running record never has a TTL: claims create none and take-overs remove it.)
if not cur[1] or tonumber(cur[1]) ~= tonumber(ARGV[2]) or cur[2] ~= 'running' then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = string.format('%.0f', now)
local ok = ARGV[3] == '1'
local sets = {'state', ok and 'succeeded' or 'failed', 'updated_at', n,
  'executions', tonumber(cur[3]) + (ok and 1 or 0)}
local dels = {'lease_until'}
if ARGV[4] == '' then dels[#dels + 1] = 'result'
else sets[#sets + 1] = 'result'; sets[#sets + 1] = string.sub(ARGV[4], 2) end
if ARGV[5] == '' then dels[#dels + 1] = 'error'
else sets[#sets + 1] = 'error'; sets[#sets + 1] = string.sub(ARGV[5], 2) end
local exp = nil
if ARGV[6] == '' then
  dels[#dels + 1] = 'expires_at'
else
  exp = now + tonumber(ARGV[6])
  sets[#sets + 1] = 'expires_at'
  sets[#sets + 1] = string.format('%.0f', exp)
end
redis.call('HSET', KEYS[1], unpack(sets))
redis.call('HDEL', KEYS[1], unpack(dels))
redis.call('ZADD', KEYS[2], n, ARGV[1])
if exp and ok then
  -- Deleted at expires_at, when the protocol lets the key run again anyway (never
  -- earlier: one millisecond past it). Raise the floor first: the token goes with it.
  -- (A failure with a ttl is kept: cache_errors replays it.)
  local floor = tonumber(redis.call('GET', KEYS[3]) or '0')
  if floor < tonumber(cur[1]) then redis.call('SET', KEYS[3], cur[1]) end
  local at = math.floor(exp / 1000) + 1
  redis.call('PEXPIREAT', KEYS[1], at)
  redis.call('ZADD', KEYS[4], string.format('%.0f', at * 1000), ARGV[1])
  -- Housekeeping, bounded: index entries of records Redis has already deleted.
  local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', n, 'LIMIT', 0, 8)
  if #gone > 0 then
    redis.call('ZREM', KEYS[2], unpack(gone))
    redis.call('ZREM', KEYS[4], unpack(gone))
  end
end
return 1
"""

# KEYS: record. ARGV: token, lease_us.
_HEARTBEAT = """
local cur = redis.call('HMGET', KEYS[1], 'token', 'state')
-- Same fence as finish: a stale owner cannot extend a lease it no longer holds.
if not cur[1] or tonumber(cur[1]) ~= tonumber(ARGV[1]) or cur[2] ~= 'running' then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('HSET', KEYS[1], 'lease_until', string.format('%.0f', now + tonumber(ARGV[2])))
return 1
"""

# KEYS: record, index. ARGV: key. -1: no record, 0: refused (live lease), 1: cleared.
_CLEAR = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cur = redis.call('HMGET', KEYS[1], 'token', 'state', 'lease_until')
if not cur[1] then return -1 end
if cur[2] == 'running' and tonumber(cur[3] or '0') >= now then return 0 end
-- The token is kept: the next call takes the record over with token + 1, so an owner
-- from before the clear can never complete the new run.
local n = string.format('%.0f', now)
redis.call('HSET', KEYS[1], 'state', 'cleared', 'updated_at', n)
redis.call('ZADD', KEYS[2], n, ARGV[1])
return 1
"""

# KEYS: index, then the records. ARGV: their keys. Returns how many were cleared.
_CLEAR_MANY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = string.format('%.0f', now)
local done = 0
for i = 2, #KEYS do
  local cur = redis.call('HMGET', KEYS[i], 'token', 'state', 'lease_until')
  if cur[1] and cur[2] ~= 'cleared'
     and not (cur[2] == 'running' and tonumber(cur[3] or '0') >= now) then
    redis.call('HSET', KEYS[i], 'state', 'cleared', 'updated_at', n)
    redis.call('ZADD', KEYS[1], n, ARGV[i - 1])
    done = done + 1
  end
end
return done
"""

# KEYS: record. A read with the server's clock, in one round trip: the record's pairs +
# TIME, or TIME alone when there is no record.
_GET = """
local row = redis.call('HGETALL', KEYS[1])
local t = redis.call('TIME')
row[#row + 1] = t[1]
row[#row + 1] = t[2]
return row
"""

_US = 1_000_000

Client = redis.Redis | RedisCluster


def _opt(value: str | None) -> str:
    return "" if value is None else "=" + value


def _sec(v: Any) -> float | None:
    return None if v is None else int(v) / _US


def _text(v: Any) -> str | None:
    return None if v is None else v.decode("utf-8")


def _tag(namespace: str) -> str:
    # Percent-encode what would end or nest the hash tag, so the tag is the whole
    # namespace (never empty, never cut at a "}" inside it).
    return namespace.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _clock(seconds: bytes, micros: bytes) -> float:
    """TIME's reply as the float seconds of a Record (via integer microseconds, as the
    stored times)."""
    return (int(seconds) * _US + int(micros)) / _US


def _record(namespace: str, key: str, row: Sequence[Any], mine: bool = False) -> Record:
    """A script's record reply: HGETALL's field/value pairs, then TIME's two strings."""
    fields = dict(zip(row[0:-2:2], row[1:-2:2], strict=True))
    return _from_fields(namespace, key, fields, _clock(row[-2], row[-1]), mine)


def _from_fields(
    namespace: str, key: str, f: dict[bytes, bytes], now: float, mine: bool = False
) -> Record:
    g = f.get
    return Record(
        namespace,
        key,
        f[b"tool"].decode("utf-8"),
        f[b"state"].decode("ascii"),
        int(f[b"token"]),
        _text(g(b"owner")),
        int(f[b"attempt"]),
        int(f[b"executions"]),
        _sec(g(b"lease_until")),
        _sec(g(b"expires_at")),
        _text(g(b"args_digest")),
        _text(g(b"result")),
        _text(g(b"error")),
        _text(g(b"run_id")),
        _text(g(b"caller")),
        int(f[b"created_at"]) / _US,
        int(f[b"updated_at"]) / _US,
        now,
        mine,
    )


def _us(seconds: float) -> int:
    return round(seconds * _US)


# Every RedisStore, weakly: a forked child must never write on its parent's sockets (two
# processes reading replies off one connection would each get the other's), so the child
# forgets the connections the fast path holds; redis-py's pool resets itself likewise.
_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _after_fork() -> None:
    for store in list(_STORES):
        store._free = []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

# One durability warning per server per process, however many stores are opened on it.
_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()


class RedisStore(Store):
    """A ledger in Redis, selected by URL.

    * ``redis://[[user]:password@]host[:port][/db]``, ``rediss://…`` (TLS): redis-py's
      URL options (``?socket_timeout=5``, ``ssl_cert_reqs=…``) apply.
    * ``redis+sentinel://[[user]:password@]host:port[,host:port…]/service[/db]``: the
      master of ``service``, found through the listed Sentinels (redis-py's Sentinel).
    * ``redis+cluster://host:port`` (``rediss+cluster://`` for TLS): a Redis Cluster,
      through any of its nodes (redis-py's RedisCluster). The durability check reads the
      settings of one node.
    * ``?prefix=NAME`` (or ``prefix=``): the key prefix, ``onceonly`` by default.

    ``client``: an existing ``redis.Redis`` to use instead of a URL (its retry policy is
    yours: a client that re-sends a command after a dropped connection may re-send a
    claim that committed; its commands go through redis-py's command layer, where a store
    built from a URL sends its scripts on held connections, see ``_send``).
    ``durability_check=False`` skips reading the server's settings. ``auto_migrate`` is
    accepted for symmetry with the SQL store: Redis has no schema.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Client | None = None,
        prefix: str | None = None,
        socket_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        durability_check: bool = True,
        auto_migrate: bool | None = None,
    ) -> None:
        del auto_migrate  # nothing to migrate
        query: dict[str, str] = {}
        if url is not None:
            parts = urlsplit(url)
            query = dict(parse_qsl(parts.query, keep_blank_values=True))
            prefix = query.pop("prefix", None) or prefix
            url = parts._replace(query=urlencode(query)).geturl()
        self.prefix = prefix or "onceonly"
        if any(c in self.prefix for c in "{}"):
            raise ConfigError(f"a Redis key prefix may not contain braces: {self.prefix!r}")
        self._durability_check = durability_check
        self._shown = "the given client"
        self._sentinels: list[redis.Redis] = []
        if client is not None:
            self.client = client
        elif url is None:
            raise ConfigError("RedisStore needs a redis:// URL or a client")
        else:
            self.client = self._connect(url, socket_timeout, connect_timeout)
        self._scripts = {
            name: self.client.register_script(body)
            for name, body in (
                ("claim", _CLAIM),
                ("take_over", _TAKE_OVER),
                ("finish", _FINISH),
                ("heartbeat", _HEARTBEAT),
                ("clear", _CLEAR),
                ("clear_many", _CLEAR_MANY),
                ("get", _GET),
            )
        }
        self._sha = {name: script.sha for name, script in self._scripts.items()}
        # The fast path (see _send) for a client this store built itself, not a cluster:
        # a given client keeps its own command layer, retry policy included.
        self._pool: Any = getattr(self.client, "connection_pool", None)
        self._fast = (
            client is None
            and isinstance(self.client, redis.Redis)
            and self.client.connection is None  # not a single-connection client
            and getattr(self._pool, "cache", None) is None  # no client-side caching
        )
        self._free: list[Any] = []  # idle connections of the fast path
        _STORES.add(self)  # a forked child drops them (_after_fork)
        self._namespaces = f"{self.prefix}:namespaces"
        self._known: set[str] = set()  # namespaces this process has registered
        self._key_cache: dict[str, tuple[str, str, str, str]] = {}
        self._ready = False
        self._ready_lock = threading.Lock()

    # -- connections ------------------------------------------------------------------
    def _connect(self, url: str, socket_timeout: float, connect_timeout: float) -> Client:
        parts = urlsplit(url)
        self._shown = _hide_password(parts)
        # Never re-send a command on a dropped connection: a claim whose reply was lost
        # may have committed, and a blind second claim would find our own record and wait
        # for its lease. The error reaches the protocol as StoreError instead (a read is
        # retried once, below, where that is harmless).
        options: dict[str, Any] = {
            "retry": Retry(NoBackoff(), 0),
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
        }
        if parts.scheme in ("redis", "rediss"):
            try:
                return redis.Redis.from_url(url, **options)
            except ValueError as err:
                raise ConfigError(f"not a Redis URL: {self._shown} ({err})") from None
        if parts.scheme == "redis+sentinel":
            return self._sentinel(parts, options)
        if parts.scheme in ("redis+cluster", "rediss+cluster"):
            # Any node of the cluster; the client finds the others. Every script's keys
            # are in one slot (one namespace), so each runs on the node that owns it.
            seed = parts._replace(scheme=parts.scheme.partition("+")[0]).geturl()
            try:
                cluster = RedisCluster.from_url(seed, **options)
            except ValueError as err:
                raise ConfigError(f"not a Redis URL: {self._shown} ({err})") from None
            except redis.RedisError as err:  # it reads the cluster's layout at once
                raise StoreError(f"cannot reach the Redis cluster {self._shown}: {err}") from err
            return cluster
        raise ConfigError(f"not a Redis URL: {self._shown} (use {', '.join(SCHEMES)})")

    def _sentinel(self, parts: Any, options: dict[str, Any]) -> redis.Redis:
        from redis.sentinel import Sentinel

        netloc = parts.netloc.rpartition("@")[2]
        nodes = []
        for node in filter(None, netloc.split(",")):
            host, _, port = node.rpartition(":") if ":" in node else (node, "", "")
            try:
                nodes.append((host, int(port or 26379)))
            except ValueError:
                raise ConfigError(f"bad Sentinel address {node!r} in {self._shown}") from None
        path = [p for p in parts.path.split("/") if p]
        if not nodes or not path or len(path) > 2:
            raise ConfigError(
                f"a Sentinel URL is redis+sentinel://host:port[,host:port]/service[/db], "
                f"got {self._shown}"
            )
        conn: dict[str, Any] = dict(options)
        conn.update(dict(parse_qsl(parts.query)))
        for name in ("socket_timeout", "socket_connect_timeout"):
            conn[name] = float(conn[name])
        if len(path) == 2:
            conn["db"] = int(path[1])
        if parts.password:
            conn["password"] = unquote(parts.password)
        if parts.username:
            conn["username"] = unquote(parts.username)
        sentinel = Sentinel(nodes, sentinel_kwargs={"socket_timeout": conn["socket_timeout"]})
        self._sentinels = sentinel.sentinels  # closed with the store
        master: redis.Redis = sentinel.master_for(path[0], **conn)
        return master

    def _send(self, command: tuple[Any, ...]) -> Any:
        """Send one command and read its reply on a pooled connection held by this store,
        without redis-py's command layer: a redis-py call encodes every argument in Python,
        checks a connection out of the pool and back in (with its observability hooks) and
        looks up a response callback, about half of a loopback round trip's client CPU.
        Here hiredis packs the command in C and the reply is returned as parsed.

        The connection is handled as redis-py handles it: one the server closed (a restart,
        an idle timeout) is reconnected before use, one that failed mid-command is
        disconnected, and nothing is ever sent twice. Only connected connections wait in
        ``_free`` (a failed one goes back to the pool, which reconnects it when next
        checked out). After a fork the parent's connections are dropped, never shared
        (_after_fork)."""
        try:
            conn = self._free.pop()
        except IndexError:
            conn = self._pool.get_connection()  # connected and checked by the pool
        else:
            try:
                # Pending data or EOF: the server closed it (or a reply is left over).
                stale = conn.can_read()
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                stale = True
            if stale:
                conn.disconnect()
                try:
                    conn.connect()
                except BaseException:
                    self._pool.release(conn)
                    raise
        try:
            conn.send_packed_command(
                (_pack(command),) if _pack is not None else conn.pack_command(*command)
            )
            reply = conn.read_response()
        except redis.ResponseError:
            self._free.append(conn)  # an error reply: the connection is in sync
            raise
        except BaseException:
            conn.disconnect()  # mid-command: whatever is left on the wire is lost with it
            self._pool.release(conn)
            raise
        self._free.append(conn)
        return reply

    def _call(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if not self._ready:
            self._first_use()
        try:
            if self._fast:
                try:
                    return self._send(("EVALSHA", self._sha[name], len(keys), *keys, *args))
                except redis.exceptions.NoScriptError:
                    # Not run: the server has lost its script cache (a restart, SCRIPT
                    # FLUSH). redis-py's Script loads it and runs it, once.
                    pass
            return self._scripts[name](keys=keys, args=args)
        except redis.RedisError as err:
            if isinstance(err, redis.ConnectionError):
                # The server may have restarted without its data: register namespaces
                # again, so listing across namespaces keeps finding new records.
                self._known.clear()
            raise StoreError(f"Redis ledger {self._shown}: {name} failed: {err}") from err

    def _read(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """A read-only script: retried once on a dropped connection (it changes nothing)."""
        try:
            return self._call(name, keys, args)
        except StoreError as err:
            if not isinstance(err.__cause__, redis.ConnectionError):
                raise
        return self._call(name, keys, args)

    def _first_use(self) -> None:
        with self._ready_lock:
            if self._ready:
                return
            if self._durability_check:
                self.check_durability()
            self._ready = True

    def durability_problems(self) -> list[str] | None:
        """What in the server's settings could lose a claim (empty: nothing), or None
        when the settings cannot be read (CONFIG disabled, as on many managed services)."""
        try:
            found: dict[Any, Any] = {}
            for pattern in ("appendonly", "appendfsync", "maxmemory", "maxmemory-policy"):
                found.update(self.client.config_get(pattern))
        except redis.ResponseError:
            return None
        except redis.RedisError as err:
            raise StoreError(f"cannot reach the Redis ledger {self._shown}: {err}") from err
        conf = {_str(k): _str(v) for k, v in found.items()}
        problems = []
        if conf.get("appendonly") != "yes":
            problems.append(
                f"appendonly {conf.get('appendonly')} (a restart loses every claim since "
                "the last snapshot)"
            )
        elif conf.get("appendfsync") != "always":
            problems.append(
                f"appendfsync {conf.get('appendfsync')} (an OS crash or power loss loses the "
                "claims of up to the last second)"
            )
        if conf.get("maxmemory", "0") != "0" and conf.get("maxmemory-policy") != "noeviction":
            problems.append(
                f"maxmemory-policy {conf.get('maxmemory-policy')} with maxmemory "
                f"{conf.get('maxmemory')} (Redis may evict records)"
            )
        return problems

    def check_durability(self) -> None:
        """Log one warning if the server could lose a claim (run at first use)."""
        problems = self.durability_problems()
        server = self._shown.partition("?")[0]  # the server, whatever the prefix
        with _WARNED_LOCK:
            if server in _WARNED:
                return
            if problems is None:
                _WARNED.add(server)
                log.warning(
                    "Redis ledger %s: cannot read the server's persistence settings (CONFIG "
                    "is disabled); exactly-once across a Redis crash needs appendonly yes "
                    "and appendfsync always",
                    self._shown,
                )
            elif problems:
                _WARNED.add(server)
                log.warning(
                    "Redis ledger %s could lose a claim: %s; exactly-once across a Redis "
                    "crash needs appendonly yes and appendfsync always",
                    self._shown,
                    "; ".join(problems),
                )

    # -- keys -----------------------------------------------------------------------------
    def _keys(self, namespace: str) -> tuple[str, str, str, str]:
        """(record key prefix, index, floor, expiry) of a namespace: one hash slot."""
        try:
            return self._key_cache[namespace]
        except KeyError:
            pass
        base = f"{self.prefix}:{{{_tag(namespace)}}}:"
        keys = base + "r:", base + "i", base + "f", base + "x"
        if len(self._key_cache) < 10_000:  # bounded: namespaces may be per request
            self._key_cache[namespace] = keys
        return keys

    def _register(self, namespace: str) -> None:
        # Before the first record of the namespace exists, so listing never misses one.
        # Idempotent, and a separate key (another cluster slot), so not in the claim script.
        if namespace in self._known:
            return
        try:
            self.client.sadd(self._namespaces, namespace)
        except redis.RedisError as err:
            raise StoreError(f"Redis ledger {self._shown}: claim failed: {err}") from err
        self._known.add(namespace)

    # -- primitives -----------------------------------------------------------------------
    def get(self, namespace: str, key: str) -> Record | None:
        rec, _, _, _ = self._keys(namespace)
        row = self._read("get", [rec + key], [])
        return None if len(row) == 2 else _record(namespace, key, row)

    def claim(self, namespace: str, key: str, new: NewClaim) -> Record:
        if not self._ready:
            self._first_use()
        self._register(namespace)
        rec, idx, floor, exp = self._keys(namespace)
        args = (
            key,
            new.tool[:512],
            new.owner,
            _us(new.lease),
            _opt(new.args_digest),
            _opt(new.run_id),
            _opt(new.caller),
        )
        row = self._call("claim", [rec + key, idx, floor, exp], args)
        if len(row) != 3:  # a record was there: its pairs and the clock
            return _record(namespace, key, row)
        now_us = int(row[0]) * _US + int(row[1])
        now = now_us / _US
        lease_until = (now_us + _us(new.lease)) / _US
        return Record(
            namespace,
            key,
            new.tool[:512],
            RUNNING,
            int(row[2]),
            new.owner,
            1,
            0,
            lease_until,
            None,
            new.args_digest,
            None,
            None,
            new.run_id,
            new.caller,
            now,
            now,
            now,
            True,
        )

    def take_over(
        self, namespace: str, key: str, seen: Record, new: NewClaim, *, force: bool = False
    ) -> Record | None:
        rec, idx, _, exp = self._keys(namespace)
        args = (
            key,
            new.tool[:512],
            new.owner,
            _us(new.lease),
            _opt(new.args_digest),
            _opt(new.run_id),
            _opt(new.caller),
            seen.token,
            seen.state,
            "1" if force else "0",
        )
        row = self._call("take_over", [rec + key, idx, exp], args)
        return None if row is None else _record(namespace, key, row, True)

    def finish(
        self,
        namespace: str,
        key: str,
        token: int,
        *,
        ok: bool,
        result: str | None = None,
        error: str | None = None,
        ttl: float | None = None,
    ) -> bool:
        rec, idx, floor, exp = self._keys(namespace)
        args = (
            key,
            token,
            "1" if ok else "0",
            _opt(result),
            _opt(error),
            "" if ttl is None else _us(ttl),
        )
        return int(self._call("finish", [rec + key, idx, floor, exp], args)) == 1

    def heartbeat(self, namespace: str, key: str, token: int, lease: float) -> bool:
        rec, _, _, _ = self._keys(namespace)
        return int(self._call("heartbeat", [rec + key], [token, _us(lease)])) == 1

    def clear(self, namespace: str, key: str) -> bool | None:
        rec, idx, _, _ = self._keys(namespace)
        done = int(self._call("clear", [rec + key, idx], [key]))
        return None if done < 0 else bool(done)

    def clear_namespace(self, namespace: str) -> int:
        rec, idx, _, _ = self._keys(namespace)
        keys = [_str(m) for m in self._members(idx)]
        n = 0
        for i in range(0, len(keys), 200):  # bounded scripts: Redis serves others between
            chunk = keys[i : i + 200]
            n += int(self._call("clear_many", [idx, *(rec + k for k in chunk)], chunk))
        return n

    def now(self) -> float:
        try:
            sec, usec = self.client.time()
        except redis.RedisError as err:
            raise StoreError(f"reading the Redis ledger's clock failed: {err}") from err
        return int(sec) + int(usec) / _US

    # -- operator queries -----------------------------------------------------------------
    def _members(self, idx: str, since: float | None = None, top: int | None = None) -> list[Any]:
        low = "-inf" if since is None else f"({_us(since)}"
        try:
            if top is None:
                return list(self.client.zrevrangebyscore(idx, "+inf", low))
            return list(self.client.zrevrangebyscore(idx, "+inf", low, start=0, num=top))
        except redis.RedisError as err:
            raise StoreError(f"listing the Redis ledger failed: {err}") from err

    def list(
        self,
        *,
        namespace: str | None = None,
        prefix: bool = False,
        state: str | None = None,
        tool: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Record]:
        if not self._ready:
            self._first_use()
        if namespace is not None and not prefix:
            names = [namespace]
        else:
            try:
                every = sorted(_str(n) for n in self.client.smembers(self._namespaces))
            except redis.RedisError as err:
                raise StoreError(f"listing the Redis ledger failed: {err}") from err
            names = [
                n
                for n in every
                if namespace is None or n == namespace or n.startswith(namespace + "/")
            ]
        now = self.now()
        top = None if (state is not None or tool is not None) else limit
        out: list[Record] = []
        for ns in names:
            rec, idx, _, _ = self._keys(ns)
            members = [_str(m) for m in self._members(idx, since, top)]
            if not members:
                continue
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    for m in members:
                        pipe.hgetall(rec + m)
                    rows = pipe.execute()
            except redis.RedisError as err:
                raise StoreError(f"listing the Redis ledger failed: {err}") from err
            for m, row in zip(members, rows, strict=True):
                if not row:  # deleted at its expiry, index not yet tidied
                    continue
                r = _from_fields(ns, m, row, now)
                if (state is None or r.state == state) and (tool is None or r.tool == tool):
                    out.append(r)
        out.sort(key=lambda r: (r.updated_at, r.key), reverse=True)
        return out[:limit]

    def governance_store(self) -> GovernanceStore:
        """Policies, caps, approvals, the kill switch and the audit chain in this Redis,
        each primitive one script (onceonly_core.stores.redisgov)."""
        from .redisgov import RedisGovernanceStore

        return RedisGovernanceStore(self)

    def purge_expired(self, namespace: str | None, before: float, limit: int = 1000) -> int:
        """Nothing to do: Redis deletes a record with a ttl itself at ``expires_at``
        (``PEXPIREAT``), raising the namespace's token floor first."""
        return 0

    def close(self) -> None:
        free, self._free = self._free, []
        for conn in free:
            self._pool.release(conn)
        self.client.close()
        for sentinel in self._sentinels:
            sentinel.close()


def _str(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def _hide_password(parts: Any) -> str:
    if parts.password is None:
        return parts.geturl()  # type: ignore[no-any-return]
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()  # type: ignore[no-any-return]
