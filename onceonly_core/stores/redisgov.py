"""Governance on the Redis ledger: policies, caps and spend, approvals, the kill switch,
the hash-chained audit log and timelines, each primitive one Lua script.

A script is atomic on the server as one SQL transaction is: nothing else runs between
its reads and its writes. Every key of a tenant carries the tenant as its hash tag
(``P:gov:{T}:…``), so every script's keys are in one Redis Cluster slot. The clock is the
server's ``TIME``, read inside the script, as in the ledger store.

=================  ==============================================================
primitive          what is atomic (one script)
=================  ==============================================================
``snapshot``       the clock, the agent's row, the ``*`` switch row, the tool rows
``reserve``        read every counter, check every cap in order, add every amount
                   (``INCRBY``) and store the hold (``ZADD`` lease + ``HSET``); on a
                   failed cap nothing is written
``settle``         the hold is deleted and the audit row appended together, only if
                   the hold still exists (False otherwise) and the chain head is the
                   one the row was hashed over (else nothing is written, and the row
                   is hashed again over the new head)
``release``        the same, and the amounts are given back: at most once, since the
                   hold's existence is the condition
``sweep``          per expired hold: delete it and append its audit row as
                   ``unknown``, only if it is still there and still expired
``extend``         ``ZADD XX`` of the lease: a deleted hold is not brought back
``append_audit``   append only if the chain head still equals what was read
``approval_for``   find the call's latest request, take an approved one or open the
                   next round after a consumed one
``outbox_claim``   per due row: a fresh lease token, one more attempt, its due time
                   moved out by the lease (of two deliverers, one gets the row)
``outbox_mark``    delivered / retry later / dead, only while the token holds the lease
=================  ==============================================================

Two things differ in *form* from :class:`~onceonly_core.stores.govsql.GovStore`,
not in outcome:

* **Hashes are computed in Python.** Redis's Lua has no SHA-256, so an append reads the
  chain head and the server's clock (one script), hashes the row (:func:`chain_hash`)
  and appends it with a compare-and-set on the head; a concurrent append of the same
  agent makes it hash again over the new head. A row's ``created_at`` is the server time
  of that read.
* **The sweep of expired holds runs after the reservation, not inside it.** Sweeping
  changes no counter (an expired hold stays counted: its tool may have run), so the cap
  check sees the same numbers either way; the reserve script reports whether the tenant
  has expired holds, and only then is the sweep (delete + audit row, atomically per
  hold) run.

Layout (``P`` the ledger's prefix, ``T`` the tenant, percent-encoded like a namespace)::

    P:gov:{T}:ag:<agent>     HASH   policy, disabled, disabled_reason, updated_at
    P:gov:{T}:agents         SET    agent ids (listing)
    P:gov:{T}:t:<scope,name> HASH   row (JSON), enabled, updated_at
    P:gov:{T}:tools          SET    the registrations (listing)
    P:gov:{T}:c:<a,m,w>      STRING a counter; expires two days + the lease after its
                                    window starts (windows are an hour or a day)
    P:gov:{T}:h:<rid>        HASH   a hold: agent_id, namespace, idem_key, amounts,
                                    lease_until, created_at, audit
    P:gov:{T}:holds          ZSET   rid -> lease end (us)
    P:gov:{T}:hd:<agent>     HASH   the chain head: seq, hash, base_seq, base_hash
    P:gov:{T}:chains         SET    agents with a chain
    P:gov:{T}:au             HASH   audit row id -> the row (JSON, without its id)
    P:gov:{T}:atz            ZSET   row ids of the tenant (score = id)
    P:gov:{T}:az:<agent>     ZSET   row ids of one agent
    P:gov:{T}:ids            HASH   id counters (audit, event)
    P:gov:{T}:ap:<id>        HASH   an approval request
    P:gov:{T}:apk            HASH   [namespace, key] -> id of the call's latest request
    P:gov:{T}:aps            ZSET   approval ids by creation time
    P:gov:{T}:ev:<run>       LIST   a run's timeline events
    P:gov:{T}:wh             HASH   webhook id -> row (JSON)
    P:gov:{T}:ob:<id>        HASH   an outbox row: the columns of onceonly_outbox (times
                                    in us); written by the script that appends its audit
                                    row (settle, release, append) or by enqueue
    P:gov:{T}:obq            ZSET   pending outbox row ids -> next attempt (us): the due
                                    index claims read (a dead or delivered row leaves it)
    P:gov:{T}:obs            ZSET   every outbox row id -> created_at (us): listings
    P:gov:tenants            SET    every tenant used (listings across tenants)

Some scripts read keys they build themselves: ``approval_for`` the request the index
names, ``reserve`` and the sweep's listing the holds of expired entries, the outbox's
claim and the appends its rows. Each such key has
the tenant's hash tag, so it is in the slot of the script's declared keys, which Redis
Cluster serves.

A write whose reply is lost (a dropped connection) is not re-sent: it raises StoreError.
A reservation whose reply was lost stays held until its lease runs out and is then
swept as spent — the conservative side of the spend rule.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import redis

from ..errors import StoreError
from . import governance as _gov
from .governance import GENESIS, GovernanceStore, Reservation, Want, audit_fields, chain_hash


class RedisLedger(Protocol):
    """What this store reads of the Redis ledger it sits beside (``stores.redis.RedisStore``;
    a protocol, so the two modules do not import each other)."""

    client: Any
    prefix: str
    _ready: bool

    def _first_use(self) -> None: ...

    def now(self) -> float: ...


__all__ = ["RedisGovernanceStore"]

_US = 1_000_000
#: A counter lives this long past its window's start, plus the hold's lease: longer
#: than the longest window (a day) by a day of clock slack.
_KEEP = 2 * 86_400
#: Decisions an audit row records a run with (what ``audit verify`` counts).
RAN = ("executed", "unknown")
#: How many times an append hashes its row again when other appends keep moving the head.
_APPEND_TRIES = 200

_PRELUDE = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function fmt(x) return string.format('%.0f', x) end
"""

# KEYS: holds zset, hold hash, then one key per distinct counter.
# ARGV: rid, lease_us, n_counters, then per counter its expire-at (s),
#       n_wants, then per want: counter index, amount, cap ('' = none),
#       then agent_id, namespace, idem_key, amounts JSON, audit JSON ('' = none), and
#       the hold keys' prefix.
_RESERVE = """
local now = now_us()
local lease = tonumber(ARGV[2])
local nc = tonumber(ARGV[3])
local used = {}
for i = 1, nc do used[i] = tonumber(redis.call('GET', KEYS[2 + i]) or '0') end
local nw = tonumber(ARGV[4 + nc])
local base = 4 + nc
local h = base + 3 * nw
-- Has this agent an expired hold? The caller sweeps it after this (sweeping changes no
-- counter: an expired hold stays counted, so the check below sees the same numbers).
local expired = 0
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(now),
    'LIMIT', 0, 32)) do
  if redis.call('HGET', ARGV[h + 6] .. rid, 'agent_id') == ARGV[h + 1] then
    expired = 1
    break
  end
end
local function out(ok, failed)
  local r = {ok, fmt(now), failed, expired}
  for i = 1, nc do r[#r + 1] = used[i] end
  return r
end
-- Every cap, in evaluation order, against counted + held amounts: the first that does
-- not fit fails the call and nothing at all is written.
for w = 1, nw do
  local c, amount, cap = tonumber(ARGV[base + 3*w - 2]), tonumber(ARGV[base + 3*w - 1]),
    ARGV[base + 3*w]
  if cap ~= '' and used[c] + amount > tonumber(cap) then return out(0, w) end
end
local touched = {}
for w = 1, nw do
  local c, amount = tonumber(ARGV[base + 3*w - 2]), tonumber(ARGV[base + 3*w - 1])
  if amount ~= 0 then
    used[c] = used[c] + amount
    redis.call('INCRBY', KEYS[2 + c], amount)
    touched[c] = true
  end
end
for c in pairs(touched) do
  -- Kept past its window and the longest hold on it: a late release still finds it.
  local at = tonumber(ARGV[3 + c])
  local ttl = redis.call('TTL', KEYS[2 + c])
  if ttl < at - math.floor(now / 1000000) then redis.call('EXPIREAT', KEYS[2 + c], at) end
end
local sets = {'agent_id', ARGV[h + 1], 'namespace', ARGV[h + 2], 'idem_key', ARGV[h + 3],
  'amounts', ARGV[h + 4], 'lease_until', fmt(now + lease), 'created_at', fmt(now)}
if ARGV[h + 5] ~= '' then sets[#sets + 1] = 'audit'; sets[#sets + 1] = ARGV[h + 5] end
redis.call('HSET', KEYS[2], unpack(sets))
redis.call('ZADD', KEYS[1], fmt(now + lease), ARGV[1])
return out(1, 0)
"""

# KEYS: head. Returns now, seq, hash, base_seq, base_hash (the clock the row is hashed with).
_HEAD = """
local now = now_us()
local h = redis.call('HMGET', KEYS[1], 'seq', 'hash', 'base_seq', 'base_hash')
return {fmt(now), h[1] or '0', h[2] or '__GENESIS__', h[3] or '0', h[4] or '__GENESIS__'}
"""

# Outbox rows (a decision's notification, or an event of its own), written inside the
# calling script, so atomically with whatever else it writes (the audit row).
# ARGV[at]: the rows' key prefix, ARGV[at + 1]: the tenant, ARGV[at + 2]: how many rows,
# then per row: id, event_id, event_type, payload, destination. The keys it builds carry
# the tenant's hash tag (the slot of the script's declared keys).
_OUTBOX_ROWS = """
local function outbox_add(due, all, at)
  local n = tonumber(ARGV[at + 2] or '0')
  if n == 0 then return 0 end
  local now = fmt(now_us())
  for i = 0, n - 1 do
    local b = at + 3 + 5 * i
    local id = ARGV[b]
    redis.call('HSET', ARGV[at] .. id, 'id', id, 'tenant', ARGV[at + 1],
      'event_id', ARGV[b + 1], 'event_type', ARGV[b + 2], 'payload', ARGV[b + 3],
      'destination', ARGV[b + 4], 'state', 'pending', 'attempts', 0,
      'next_attempt_at', now, 'created_at', now)
    redis.call('ZADD', due, now, id)
    redis.call('ZADD', all, now, id)
  end
  return n
end
"""

# KEYS: head, rows, tenant row ids, agent row ids, id counters, chains, hold, holds zset,
#       outbox due zset, outbox rows zset, then the counters to give back (release).
# ARGV: mode (none | settle | release | sweep), rid, agent_id, seq read, hash read,
#       row JSON ('' = no row), the row's hash, then the amounts to give back, then the
#       decision's outbox rows (see _OUTBOX_ROWS).
# Returns {0} hold gone, {2} head moved (hash again), {1, id} done.
_APPEND = """
local mode = ARGV[1]
if mode ~= 'none' then
  -- The hold's existence is the decision: whoever deletes it first (settle, release or
  -- a sweep) wins, and everyone else writes nothing.
  if redis.call('EXISTS', KEYS[7]) == 0 then return {0} end
  if mode == 'sweep' then
    local lease = redis.call('ZSCORE', KEYS[8], ARGV[2])
    if not lease or tonumber(lease) >= now_us() then return {0} end  -- extended meanwhile
  end
end
local row = ARGV[6]
if row ~= '' then
  -- Compare-and-set on the chain head: the row was hashed over this head in Python.
  local h = redis.call('HMGET', KEYS[1], 'seq', 'hash')
  if (h[1] or '0') ~= ARGV[4] or (h[2] or '__GENESIS__') ~= ARGV[5] then return {2} end
end
if mode ~= 'none' then
  redis.call('DEL', KEYS[7])
  redis.call('ZREM', KEYS[8], ARGV[2])
  if mode == 'release' then
    -- The tool did not run: give the amounts back (never below zero, as in SQL).
    -- A counter already gone (its window long past) stays gone: no key without a TTL.
    for i = 11, #KEYS do
      if redis.call('EXISTS', KEYS[i]) == 1 then
        local left = redis.call('DECRBY', KEYS[i], ARGV[i - 3])
        if left < 0 then redis.call('INCRBY', KEYS[i], -left) end
      end
    end
  end
end
if row == '' then return {1, 0} end
local id = redis.call('HINCRBY', KEYS[5], 'audit', 1)
redis.call('HSET', KEYS[2], id, row)
redis.call('ZADD', KEYS[3], id, id)
redis.call('ZADD', KEYS[4], id, id)
redis.call('SADD', KEYS[6], ARGV[3])
redis.call('HSET', KEYS[1], 'seq', tonumber(ARGV[4]) + 1, 'hash', ARGV[7])
redis.call('HSETNX', KEYS[1], 'base_seq', 0)
redis.call('HSETNX', KEYS[1], 'base_hash', '__GENESIS__')
-- The decision's notification, in the decision's script: both are written or neither
-- (every condition above is checked before the first write).
outbox_add(KEYS[9], KEYS[10], 8 + #KEYS - 10)
return {1, id}
"""

# KEYS: hold, holds zset. ARGV: rid, lease_us.
_EXTEND = """
local now = now_us()
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local at = fmt(now + tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], 'XX', at, ARGV[1])
redis.call('HSET', KEYS[1], 'lease_until', at)
return 1
"""

# KEYS: holds zset. Expired holds: rid, agent, audit (flattened), after the clock.
_EXPIRED = """
local now = now_us()
local out = {fmt(now)}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(now))) do
  local h = redis.call('HMGET', ARGV[1] .. rid, 'agent_id', 'audit')
  out[#out + 1] = rid
  out[#out + 1] = h[1] or ''
  out[#out + 1] = h[2] or ''
end
return out
"""

# KEYS: agent, switch, tool (global), tool (agent scope). The snapshot, one read.
_SNAPSHOT = """
local now = now_us()
local out = {fmt(now)}
for i = 1, 4 do out[i + 1] = redis.call('HGETALL', KEYS[i]) end
return out
"""

# KEYS: agent, agents set. ARGV: agent_id, policy ('' leave, '-' null, '=' .. json),
# disabled ('' leave, '0', '1'), reason.
_PUT_AGENT = """
local now = fmt(now_us())
local sets = {'updated_at', now}
local dels = {}
if ARGV[2] == '-' then dels[#dels + 1] = 'policy'
elseif ARGV[2] ~= '' then sets[#sets + 1] = 'policy'; sets[#sets + 1] = string.sub(ARGV[2], 2)
end
if ARGV[3] ~= '' then
  sets[#sets + 1] = 'disabled'; sets[#sets + 1] = ARGV[3]
  if ARGV[3] == '1' and ARGV[4] ~= '' then
    sets[#sets + 1] = 'disabled_reason'; sets[#sets + 1] = string.sub(ARGV[4], 2)
  else dels[#dels + 1] = 'disabled_reason' end
end
-- One script per row: two writers of different fields never lose each other's.
redis.call('HSET', KEYS[1], unpack(sets))
if #dels > 0 then redis.call('HDEL', KEYS[1], unpack(dels)) end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# KEYS: tool, tools set. ARGV: member, row JSON, enabled.
_PUT_TOOL = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'row', ARGV[2], 'enabled', ARGV[3], 'updated_at', fmt(now_us()))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# KEYS: tool. ARGV: enabled.
_ENABLE_TOOL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'enabled', ARGV[1], 'updated_at', fmt(now_us()))
return 1
"""

# KEYS: index, ids zset. ARGV: field, approval key prefix, new id, agent, tool, ns, key,
# args, in_flight_us. Returns {now, state-as-returned, the row as a flat list}.
_APPROVAL_FOR = """
local now = now_us()
local id = redis.call('HGET', KEYS[1], ARGV[1])
local row, k
if id then
  k = ARGV[2] .. id
  row = redis.call('HGETALL', k)
  local st = redis.call('HGET', k, 'state')
  if st == 'approved' then
    -- Take it: approved -> consumed here, so exactly one caller runs on it.
    redis.call('HSET', k, 'state', 'consumed', 'consumed_at', fmt(now))
    return {fmt(now), 'approved', row}
  end
  if st ~= 'consumed' then return {fmt(now), st, row} end
  local at = tonumber(redis.call('HGET', k, 'consumed_at') or '0')
  if now - at < tonumber(ARGV[9]) then return {fmt(now), st, row} end
end
-- None, or consumed: that approval was used; this execution needs its own request.
local round = 0
if id then round = tonumber(redis.call('HGET', k, 'round')) + 1 end
local nk = ARGV[2] .. ARGV[3]
redis.call('HSET', nk, 'id', ARGV[3], 'agent_id', ARGV[4], 'tool', ARGV[5],
  'namespace', ARGV[6], 'idem_key', ARGV[7], 'args', ARGV[8], 'state', 'pending',
  'created_at', fmt(now), 'round', round)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], fmt(now), ARGV[3])
return {fmt(now), 'pending', redis.call('HGETALL', nk)}
"""

# KEYS: approval. ARGV: from, to, then field/value pairs to set ('@now' = the clock),
# then '--', then fields to delete. Compare-and-set on the state.
_MOVE_APPROVAL = """
local now = fmt(now_us())
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return -1 end
if st ~= ARGV[1] then return 0 end
local sets = {'state', ARGV[2]}
local i = 3
while i <= #ARGV and ARGV[i] ~= '--' do
  local v = ARGV[i + 1]
  if v == '@now' then v = now end
  sets[#sets + 1] = ARGV[i]; sets[#sets + 1] = v
  i = i + 2
end
redis.call('HSET', KEYS[1], unpack(sets))
for j = i + 1, #ARGV do redis.call('HDEL', KEYS[1], ARGV[j]) end
return 1
"""

# KEYS: the run's list, id counters. ARGV: event JSON (without id and created_at).
_EVENT = """
local now = now_us()
local id = redis.call('HINCRBY', KEYS[2], 'event', 1)
redis.call('RPUSH', KEYS[1], '[' .. id .. ',' .. fmt(now) .. ',' .. ARGV[1] .. ']')
return id
"""

# KEYS: head, rows, tenant row ids, agent row ids. ARGV: base seq read, last seq, last
# hash, the ids to delete. Moves the chain's base and deletes in one step.
_PURGE = """
if (redis.call('HGET', KEYS[1], 'base_seq') or '0') ~= ARGV[1] then return -1 end
for i = 4, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[3], ARGV[i])
  redis.call('ZREM', KEYS[4], ARGV[i])
end
redis.call('HSET', KEYS[1], 'base_seq', ARGV[2], 'base_hash', ARGV[3])
return #ARGV - 3
"""

# KEYS: webhooks. ARGV: id, row JSON without created_at.
_WEBHOOK = """
local now = now_us()
redis.call('HSET', KEYS[1], ARGV[1], '{"created_at":' .. fmt(now) .. ',' .. string.sub(ARGV[2], 2))
return 1
"""

# KEYS: outbox due zset, outbox rows zset. ARGV: see _OUTBOX_ROWS (at = 1).
_OUTBOX_ADD = """
return outbox_add(KEYS[1], KEYS[2], 1)
"""

# KEYS: outbox due zset. ARGV: the rows' key prefix, limit, lease (us), a token base.
# Returns per claimed row: id, event_id, event_type, payload, destination, attempts, token.
_OUTBOX_CLAIM = """
local now = now_us()
local at = fmt(now + tonumber(ARGV[3]))
local out = {}
for i, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now),
    'LIMIT', 0, tonumber(ARGV[2]))) do
  local k = ARGV[1] .. id
  if redis.call('HGET', k, 'state') ~= 'pending' then
    redis.call('ZREM', KEYS[1], id)  -- not due any more (gone, or marked): out of the index
  else
    -- The claim, in one script: the row leaves "due" (its time moves out by the lease)
    -- as it gets our token, so of two deliverers racing for it exactly one takes it; if
    -- we die before marking, it is due again when the lease ends. The attempt is counted
    -- now, before the send, so a crash counts too.
    local token = ARGV[4] .. i
    local n = redis.call('HINCRBY', k, 'attempts', 1)
    redis.call('HSET', k, 'lease_token', token, 'next_attempt_at', at)
    redis.call('ZADD', KEYS[1], at, id)
    local r = redis.call('HMGET', k, 'event_id', 'event_type', 'payload', 'destination')
    out[#out + 1] = {id, r[1], r[2], r[3], r[4], n, token}
  end
end
return out
"""

# KEYS: the row, outbox due zset. ARGV: id, token, state, delay (us), error ('' = none,
# else '=' .. error). Only while the token holds the row's lease.
_OUTBOX_MARK = """
if redis.call('HGET', KEYS[1], 'lease_token') ~= ARGV[2] then return 0 end
local now = now_us()
redis.call('HDEL', KEYS[1], 'lease_token', 'last_error')
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'last_error', string.sub(ARGV[5], 2)) end
if ARGV[3] == 'delivered' then
  redis.call('HSET', KEYS[1], 'state', 'delivered', 'delivered_at', fmt(now))
else
  local at = fmt(now + tonumber(ARGV[4]))
  redis.call('HSET', KEYS[1], 'state', ARGV[3], 'next_attempt_at', at)
  -- The row and its index change together: a pending row is due at its new time, a
  -- dead one is never claimed again.
  if ARGV[3] == 'pending' then redis.call('ZADD', KEYS[2], at, ARGV[1]) end
end
if ARGV[3] ~= 'pending' then redis.call('ZREM', KEYS[2], ARGV[1]) end
return 1
"""

# KEYS: outbox due zset. Returns now, how many pending, the earliest due time ('' none).
_OUTBOX_PENDING = """
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {fmt(now_us()), redis.call('ZCARD', KEYS[1]), first[2] or ''}
"""

# KEYS: the row, outbox due zset. ARGV: id. A dead or pending row: due in a second (the
# resend is signed with a newer whole-second timestamp, which a replay cache accepts).
_OUTBOX_RETRY = """
local st = redis.call('HGET', KEYS[1], 'state')
if st ~= 'dead' and st ~= 'pending' then return 0 end
local at = fmt(now_us() + 1000000)
redis.call('HSET', KEYS[1], 'state', 'pending', 'attempts', 0, 'next_attempt_at', at)
redis.call('HDEL', KEYS[1], 'lease_token')
redis.call('ZADD', KEYS[2], at, ARGV[1])
return 1
"""

_SCRIPTS = {
    "reserve": _RESERVE,
    "head": _HEAD,
    "append": _OUTBOX_ROWS + _APPEND,
    "extend": _EXTEND,
    "expired": _EXPIRED,
    "snapshot": _SNAPSHOT,
    "put_agent": _PUT_AGENT,
    "put_tool": _PUT_TOOL,
    "enable_tool": _ENABLE_TOOL,
    "approval_for": _APPROVAL_FOR,
    "move_approval": _MOVE_APPROVAL,
    "event": _EVENT,
    "purge": _PURGE,
    "webhook": _WEBHOOK,
    "outbox_add": _OUTBOX_ROWS + _OUTBOX_ADD,
    "outbox_claim": _OUTBOX_CLAIM,
    "outbox_mark": _OUTBOX_MARK,
    "outbox_pending": _OUTBOX_PENDING,
    "outbox_retry": _OUTBOX_RETRY,
}


def _s(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def _g(v: Any) -> str:
    """A head hash as stored ('__GENESIS__' is the empty chain's)."""
    text = _s(v)
    return GENESIS if text == "__GENESIS__" else text


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)}


def _sec(v: str | None) -> float | None:
    return None if v is None else int(v) / _US


def _tag(tenant: str) -> str:
    return tenant.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _agent_row(agent_id: str, h: dict[str, str]) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "policy": h.get("policy"),
        "disabled": h.get("disabled") == "1",
        "disabled_reason": h.get("disabled_reason"),
        "updated_at": _sec(h.get("updated_at")),
    }


def _approval_row(tenant: str, h: dict[str, str]) -> dict[str, Any]:
    return {
        "id": h["id"],
        "tenant": tenant,
        "agent_id": h["agent_id"],
        "tool": h["tool"],
        "namespace": h["namespace"],
        "idem_key": h["idem_key"],
        "args": h.get("args"),
        "state": h["state"],
        "reason": h.get("reason"),
        "decided_by": h.get("decided_by"),
        "created_at": _sec(h["created_at"]),
        "decided_at": _sec(h.get("decided_at")),
        "round": int(h.get("round", "0")),
        "consumed_at": _sec(h.get("consumed_at")),
    }


class RedisGovernanceStore(GovernanceStore):
    """Governance primitives over a :class:`~onceonly_core.stores.redis.RedisStore`
    (see the module docstring)."""

    kind = "redis"

    def __init__(self, ledger: RedisLedger) -> None:
        self.ledger = ledger
        self.client = ledger.client
        self.prefix = f"{ledger.prefix}:gov"
        self._scripts = {
            name: self.client.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()
        }
        self._tenants_key = f"{self.prefix}:tenants"
        self._known: set[str] = set()
        self._lock = threading.Lock()

    # -- plumbing -----------------------------------------------------------------------
    def _k(self, tenant: str, *parts: str) -> str:
        """A key of the tenant: its hash tag puts every key of one tenant in one slot."""
        return f"{self.prefix}:{{{_tag(tenant)}}}:" + ":".join(parts)

    def _run(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if not self.ledger._ready:
            self.ledger._first_use()
        try:
            return self._scripts[name](keys=keys, args=args)
        except redis.RedisError as err:
            if isinstance(err, redis.ConnectionError):
                # The server may have restarted without its data: register tenants again.
                with self._lock:
                    self._known.clear()
            raise StoreError(f"Redis governance store: {name} failed: {err}") from err

    def _read(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """A read-only script: retried once on a dropped connection (it changes nothing)."""
        try:
            return self._run(name, keys, args)
        except StoreError as err:
            if not isinstance(err.__cause__, redis.ConnectionError):
                raise
        return self._run(name, keys, args)

    def _cmd(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except redis.RedisError as err:
            raise StoreError(f"Redis governance store: {what} failed: {err}") from err

    def _register(self, tenant: str) -> None:
        # Listings across tenants (pending holds, verify, chain count) find it. A separate
        # key (another slot), idempotent, written before the tenant's first row.
        if tenant in self._known:
            return
        self._cmd("register", self.client.sadd, self._tenants_key, tenant)
        with self._lock:
            self._known.add(tenant)

    def _tenants(self, tenant: str | None) -> list[str]:
        if tenant is not None:
            return [tenant]
        return sorted(_s(t) for t in self._cmd("list", self.client.smembers, self._tenants_key))

    def _pipe(self, what: str, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for method, args in calls:
                    getattr(pipe, method)(*args)
                return list(pipe.execute())
        except redis.RedisError as err:
            raise StoreError(f"Redis governance store: {what} failed: {err}") from err

    # -- clock --------------------------------------------------------------------------
    def now(self) -> float:
        return self.ledger.now()

    # -- agents, policies, kill switch --------------------------------------------------
    def snapshot(self, tenant: str, agent_id: str, tool: str) -> dict[str, Any]:
        keys = [
            self._k(tenant, "ag", agent_id),
            self._k(tenant, "ag", "*"),
            self._k(tenant, "t", json.dumps(["global", tool])),
            self._k(tenant, "t", json.dumps([f"agent:{agent_id}", tool])),
        ]
        got = self._read("snapshot", keys, [])
        out: dict[str, Any] = {"now": int(got[0]) / _US, "agent": None, "global": None}
        out["tool"] = None
        for slot, who, flat in (("agent", agent_id, got[1]), ("global", "*", got[2])):
            if flat:
                row = _agent_row(who, _pairs(flat))
                del row["updated_at"]
                out[slot] = row
        # An agent-scoped registration overrides the global one.
        for flat in (got[3], got[4]):
            if flat:
                out["tool"] = self._tool_row(tenant, _pairs(flat))
        return out

    def put_agent(
        self,
        tenant: str,
        agent_id: str,
        *,
        policy: Any = ...,
        disabled: bool | None = None,
        reason: str | None = None,
    ) -> None:
        self._register(tenant)
        p = "" if policy is ... else ("-" if policy is None else "=" + str(policy))
        d = "" if disabled is None else ("1" if disabled else "0")
        r = "" if reason is None else "=" + reason
        keys = [self._k(tenant, "ag", agent_id), self._k(tenant, "agents")]
        self._run("put_agent", keys, [agent_id, p, d, r])

    def get_agent(self, tenant: str, agent_id: str) -> dict[str, Any] | None:
        h = self._cmd("read", self.client.hgetall, self._k(tenant, "ag", agent_id))
        if not h:
            return None
        return {"tenant": tenant, **_agent_row(agent_id, _pairs(_flat(h)))}

    def list_agents(self, tenant: str) -> list[dict[str, Any]]:
        ids = sorted(
            _s(a) for a in self._cmd("list", self.client.smembers, self._k(tenant, "agents"))
        )
        ids = [a for a in ids if a != "*"]
        rows = self._pipe("list", [("hgetall", [self._k(tenant, "ag", a)]) for a in ids])
        return [
            {"tenant": tenant, **_agent_row(a, _pairs(_flat(h)))}
            for a, h in zip(ids, rows, strict=True)
            if h
        ]

    # -- budgets ------------------------------------------------------------------------
    def _counter_key(self, tenant: str, agent_id: str, metric: str, window: int) -> str:
        return self._k(tenant, "c", json.dumps([agent_id, metric, int(window)]))

    def _hold_key(self, tenant: str, rid: str) -> str:
        return self._k(tenant, "h", rid)

    def reserve(
        self,
        tenant: str,
        agent_id: str,
        namespace: str,
        key: str,
        wants: Sequence[Want],
        lease: float,
        audit: dict[str, Any] | None = None,
    ) -> Reservation:
        self._register(tenant)
        # The tenant rides in the id: extend(rid) finds the hold's keys from it alone.
        rid = f"{uuid.uuid4().hex}@{tenant}"
        counters = list(dict.fromkeys((w.metric, int(w.window)) for w in wants))
        index = {k: i + 1 for i, k in enumerate(counters)}
        keys = [self._k(tenant, "holds"), self._hold_key(tenant, rid)]
        keys += [self._counter_key(tenant, agent_id, m, w) for m, w in counters]
        lease_us = round(lease * _US)
        args: list[Any] = [rid, lease_us, len(counters)]
        args += [w + _KEEP + int(lease) + 1 for _, w in counters]
        args.append(len(wants))
        for w in wants:
            args += [index[(w.metric, int(w.window))], int(w.amount)]
            args.append("" if w.cap is None else int(w.cap))
        amounts = json.dumps([[w.metric, w.window, w.amount] for w in wants])
        args += [agent_id, namespace, key, amounts, "" if audit is None else json.dumps(audit)]
        args.append(self._k(tenant, "h", ""))
        got = self._run("reserve", keys, args)
        ok, now, failed, expired = int(got[0]), int(got[1]) / _US, int(got[2]), int(got[3])
        used = {k: int(v) for k, v in zip(counters, got[4:], strict=True)}
        if expired:
            # Expired holds (crashed or stalled workers whose tool may have run) are
            # settled as spent with their audit rows; their amounts were counted all along.
            self.sweep(tenant, agent_id)
        if not ok:
            w = wants[failed - 1]
            return Reservation(False, None, w, used[(w.metric, int(w.window))], now, used)
        return Reservation(True, rid, None, 0, now, used)

    def _append(
        self,
        tenant: str,
        agent_id: str,
        entry: dict[str, Any] | None,
        *,
        mode: str = "none",
        rid: str = "",
        give_back: Sequence[tuple[str, int]] = (),
    ) -> tuple[int, str, int] | None:
        """Append ``entry`` (if any) to the agent's chain, together with the hold
        operation ``mode``; None when the hold is gone. Returns (seq, hash, row id)."""
        head_key = self._k(tenant, "hd", agent_id)
        keys = [
            head_key,
            self._k(tenant, "au"),
            self._k(tenant, "atz"),
            self._k(tenant, "az", agent_id),
            self._k(tenant, "ids"),
            self._k(tenant, "chains"),
            self._hold_key(tenant, rid) if rid else self._k(tenant, "h", "-"),
            self._k(tenant, "holds"),
            self._k(tenant, "obq"),
            self._k(tenant, "obs"),
            *(k for k, _ in give_back),
        ]
        # The decision's notification: its rows are planned here (destinations, ids) and
        # written by the script that appends the audit row, so both are written or
        # neither; the same rows on every try below.
        notify = entry.get("notify") if entry is not None else None
        outbox = self._outbox_args(tenant, notify) if notify else []
        for _ in range(_APPEND_TRIES):
            seq, prev, body, digest = 0, GENESIS, "", ""
            if entry is not None:
                head = self._read("head", [head_key], [])
                now = int(head[0]) / _US
                seq, prev = int(head[1]), _g(head[2])
                row = {**entry, "tenant": tenant, "agent_id": agent_id, "seq": seq + 1}
                row["created_at"] = now
                fields = audit_fields(_Row(row))
                digest = chain_hash(prev, fields)
                body = json.dumps({**fields, "prev_hash": prev, "hash": digest})
            args = [mode, rid, agent_id, seq, "__GENESIS__" if prev == GENESIS else prev]
            args += [body, digest, *(a for _, a in give_back), *outbox]
            got = self._run("append", keys, args)
            if int(got[0]) == 0:
                return None
            if int(got[0]) == 1:
                return seq + 1, digest, int(got[1])
            # 2: another append of this agent moved the head: hash again over it.
        raise StoreError(f"the audit chain of {agent_id!r} kept moving; try again")

    def settle(
        self,
        tenant: str,
        agent_id: str,
        rid: str,
        amounts: list[Any],
        audit: dict[str, Any] | None = None,
    ) -> bool:
        # The hold's deletion is the decision: if it is gone, a sweep (which counted it
        # and wrote its audit row) or an earlier attempt got there first.
        return self._append(tenant, agent_id, audit, mode="settle", rid=rid) is not None

    def release(
        self, tenant: str, agent_id: str, rid: str, audit: dict[str, Any] | None = None
    ) -> bool:
        raw = self._cmd("read", self.client.hget, self._hold_key(tenant, rid), "amounts")
        if raw is None:
            return False  # swept as spent (and audited) meanwhile: that stands
        give: dict[str, int] = {}
        for m, w, a in json.loads(_s(raw)):
            if int(a):
                k = self._counter_key(tenant, agent_id, m, int(w))
                give[k] = give.get(k, 0) + int(a)
        # The script gives back only if the hold is still there: at most once.
        done = self._append(
            tenant, agent_id, audit, mode="release", rid=rid, give_back=sorted(give.items())
        )
        return done is not None

    def extend(self, rid: str, lease: float) -> bool:
        tenant = rid.partition("@")[2]
        keys = [self._hold_key(tenant, rid), self._k(tenant, "holds")]
        return int(self._run("extend", keys, [rid, round(lease * _US)])) == 1

    def sweep(self, tenant: str, agent_id: str | None = None) -> int:
        got = self._run("expired", [self._k(tenant, "holds")], [self._k(tenant, "h", "")])
        done = 0
        items = [(_s(got[i]), _s(got[i + 1]), _s(got[i + 2])) for i in range(1, len(got), 3)]
        for rid, agent, audit in sorted(items, key=lambda x: (x[1], x[0])):
            if not agent or (agent_id is not None and agent != agent_id):
                continue
            entry = None
            if audit:
                entry = json.loads(audit)
                entry.update(decision="unknown", reason="lease_expired", token=None)
            # Delete and audit together, only if the hold is still there and expired.
            if self._append(tenant, agent, entry, mode="sweep", rid=rid) is not None:
                done += 1
        return done

    def _holds(self, tenant: str) -> list[dict[str, Any]]:
        members = self._cmd(
            "list", self.client.zrange, self._k(tenant, "holds"), 0, -1, False, True
        )
        rids = [_s(m) for m, _ in members]
        rows = self._pipe("list", [("hgetall", [self._hold_key(tenant, r)]) for r in rids])
        out = []
        for rid, h in zip(rids, rows, strict=True):
            if h:
                d = _pairs(_flat(h))
                out.append(
                    {
                        "id": rid,
                        "tenant": tenant,
                        "agent_id": d["agent_id"],
                        "namespace": d["namespace"],
                        "idem_key": d["idem_key"],
                        "lease_until": int(d["lease_until"]) / _US,
                        "created_at": int(d["created_at"]) / _US,
                    }
                )
        return out

    def pending_holds(self, tenant: str | None = None) -> list[dict[str, Any]]:
        now = self.now()
        rows = [h for t in self._tenants(tenant) for h in self._holds(t)]
        rows.sort(key=lambda h: h["created_at"])
        return [
            {**{k: v for k, v in h.items() if k != "created_at"}, "expired": h["lease_until"] < now}
            for h in rows
        ]

    def counter(self, tenant: str, agent_id: str, metric: str, window: int) -> int:
        v = self._cmd("read", self.client.get, self._counter_key(tenant, agent_id, metric, window))
        return int(v or 0)

    def holds(self, tenant: str, agent_id: str) -> int:
        return sum(1 for h in self._holds(tenant) if h["agent_id"] == agent_id)

    # -- approvals ----------------------------------------------------------------------
    def approval_for(
        self,
        tenant: str,
        agent_id: str,
        tool: str,
        namespace: str,
        key: str,
        args: str,
        in_flight_for: float = 0.0,
    ) -> dict[str, Any]:
        self._register(tenant)
        new_id = "apr_" + uuid.uuid4().hex[:24]
        keys = [self._k(tenant, "apk"), self._k(tenant, "aps")]
        argv: list[Any] = [json.dumps([namespace, key]), self._k(tenant, "ap", ""), new_id]
        argv += [agent_id, tool, namespace, key, args, round(in_flight_for * _US)]
        got = self._run("approval_for", keys, argv)
        row = _approval_row(tenant, _pairs(got[2]))
        row["state"] = _s(got[1])
        return row

    def _move(self, tenant: str, approval_id: str, frm: str, to: str, *extra: Any) -> int:
        key = self._k(tenant, "ap", approval_id)
        return int(self._run("move_approval", [key], [frm, to, *extra]))

    def restore_approval(self, tenant: str, approval_id: str) -> bool:
        return self._move(tenant, approval_id, "consumed", "approved", "--", "consumed_at") == 1

    def decide_approval(
        self, tenant: str, approval_id: str, state: str, by: str | None, reason: str | None
    ) -> dict[str, Any] | None:
        extra: list[Any] = ["decided_at", "@now"]
        dels = []
        for field, value in (("decided_by", by), ("reason", reason)):
            if value is None:
                dels.append(field)
            else:
                extra += [field, value]
        # Only from pending: a decision is final (compare-and-set on the state).
        changed = self._move(tenant, approval_id, "pending", state, *extra, "--", *dels)
        if changed < 0:
            return None
        h = self._cmd("read", self.client.hgetall, self._k(tenant, "ap", approval_id))
        return {**_approval_row(tenant, _pairs(_flat(h))), "changed": changed == 1}

    def consume_approval(self, tenant: str, approval_id: str) -> None:
        self._move(tenant, approval_id, "approved", "consumed", "consumed_at", "@now")

    def list_approvals(self, tenant: str, state: str | None = None) -> list[dict[str, Any]]:
        ids = [_s(i) for i in self._cmd("list", self.client.zrange, self._k(tenant, "aps"), 0, -1)]
        rows = self._pipe("list", [("hgetall", [self._k(tenant, "ap", i)]) for i in ids])
        out = [_approval_row(tenant, _pairs(_flat(h))) for h in rows if h]
        return [r for r in out if state is None or r["state"] == state]

    # -- audit --------------------------------------------------------------------------
    def append_audit(self, tenant: str, entry: dict[str, Any]) -> tuple[int, str]:
        self._register(tenant)
        done = self._append(tenant, entry["agent_id"], entry)
        assert done is not None  # no hold involved
        return done[0], done[1]

    def _rows(self, tenant: str, ids: Sequence[Any]) -> list[dict[str, Any]]:
        if not ids:
            return []
        raw = self._cmd("read", self.client.hmget, self._k(tenant, "au"), list(ids))
        out = []
        for i, body in zip(ids, raw, strict=True):
            if body is not None:  # a row deleted behind our back: verify_audit says so
                out.append({"id": int(i), **json.loads(_s(body))})
        return out

    def audit_rows(
        self,
        tenant: str,
        *,
        agent_id: str | None = None,
        since: float | None = None,
        limit: int = 100,
        newest_first: bool = True,
    ) -> list[dict[str, Any]]:
        index = self._k(tenant, "atz") if agent_id is None else self._k(tenant, "az", agent_id)
        if since is None:
            fetch = self.client.zrevrange if newest_first else self.client.zrange
            ids = self._cmd("list", fetch, index, 0, limit - 1)
            return self._rows(tenant, [_s(i) for i in ids])
        # Row times follow row ids (one server clock), but not strictly across agents:
        # filter by the row's time rather than trust the order.
        ids = [_s(i) for i in self._cmd("list", self.client.zrange, index, 0, -1)]
        rows = [r for r in self._rows(tenant, ids) if r["created_at"] >= since]
        if newest_first:
            rows.reverse()
        return rows[:limit]

    def _all_rows(self, tenant: str) -> list[dict[str, Any]]:
        raw = self._cmd("read", self.client.hgetall, self._k(tenant, "au"))
        rows = [{"id": int(i), **json.loads(_s(b))} for i, b in raw.items()]
        return sorted(rows, key=lambda r: r["id"])

    def audited_calls(self, tenant: str) -> dict[str, set[int | None]]:
        out: dict[str, set[int | None]] = {}
        for r in self._all_rows(tenant):
            if r["idem_key"] is None:
                continue
            tokens = out.setdefault(r["idem_key"], set())
            if r["decision"] in RAN:
                tokens.add(None if r["token"] is None else int(r["token"]))
        return out

    def _heads(self, tenant: str) -> dict[str, dict[str, str]]:
        agents = sorted(
            _s(a) for a in self._cmd("list", self.client.smembers, self._k(tenant, "chains"))
        )
        got = self._pipe("list", [("hgetall", [self._k(tenant, "hd", a)]) for a in agents])
        return {a: _pairs(_flat(h)) for a, h in zip(agents, got, strict=True) if h}

    def chain_count(self, tenant: str | None = None) -> int:
        return sum(len(self._heads(t)) for t in self._tenants(tenant))

    def verify_audit(self, tenant: str | None = None) -> list[dict[str, Any]]:
        problems: list[dict[str, Any]] = []
        for ten in self._tenants(tenant):
            heads = self._heads(ten)
            by_agent: dict[str, list[dict[str, Any]]] = {}
            for r in self._all_rows(ten):
                by_agent.setdefault(r["agent_id"], []).append(r)
            for agent in sorted(set(heads) | set(by_agent)):
                bad = _walk(heads.get(agent), by_agent.get(agent, []))
                if bad is not None:
                    problems.append(
                        {"tenant": ten, "agent_id": agent, "seq": bad[0], "id": bad[1]}
                        | {"problem": bad[2]}
                    )
        return problems

    def purge_audit(self, tenant: str, before: float) -> int:
        total = 0
        for agent, head in sorted(self._heads(tenant).items()):
            rows = self.audit_rows(tenant, agent_id=agent, limit=10**9, newest_first=False)
            old = [r for r in rows if r["created_at"] < before]
            if not old:
                continue
            last = max(old, key=lambda r: r["seq"])
            ids = [r["id"] for r in rows if r["seq"] <= last["seq"]]
            keys = [
                self._k(tenant, "hd", agent),
                self._k(tenant, "au"),
                self._k(tenant, "atz"),
                self._k(tenant, "az", agent),
            ]
            # Deleting the rows and moving the chain's base are one step: the chain
            # verifies from the cut whenever it is read.
            args = [head.get("base_seq", "0"), last["seq"], last["hash"], *ids]
            n = int(self._run("purge", keys, args))
            if n < 0:
                raise StoreError(f"the audit chain of {agent!r} was purged concurrently")
            total += n
        return total

    def metrics(self, tenant: str, agent_id: str, since: float) -> dict[str, Any]:
        rows = self.audit_rows(tenant, agent_id=agent_id, since=since, limit=10**9)
        by: dict[str, int] = {}
        spend = 0
        top: dict[str, int] = {}
        for r in rows:
            by[r["decision"]] = by.get(r["decision"], 0) + 1
            spend += int(r["spend_micros"] or 0)
            if r["decision"] == "executed":
                top[r["tool"]] = top.get(r["tool"], 0) + 1
        ranked = sorted(top.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        return {"by_decision": by, "spend_micros": spend, "top_tools": ranked}

    # -- timeline -----------------------------------------------------------------------
    def post_event(self, tenant: str, event: dict[str, Any]) -> int:
        keys = [self._k(tenant, "ev", str(event["run_id"])), self._k(tenant, "ids")]
        return int(self._run("event", keys, [json.dumps(event)]))

    def timeline(self, tenant: str, run_id: str, limit: int, offset: int) -> list[dict[str, Any]]:
        raw = self._cmd(
            "read", self.client.lrange, self._k(tenant, "ev", run_id), offset, offset + limit - 1
        )
        out = []
        for item in raw:
            eid, at, body = json.loads(_s(item))
            row = {"type": None, "agent_id": None, "tool": None, "status": None, "data": None}
            out.append(
                {**row, **body, "id": int(eid), "tenant": tenant, "created_at": int(at) / _US}
            )
        return out

    # -- tools registry -----------------------------------------------------------------
    def _tool_row(self, tenant: str, h: dict[str, str]) -> dict[str, Any]:
        return {
            **json.loads(h["row"]),
            "tenant": tenant,
            "enabled": h["enabled"] == "1",
            "updated_at": int(h["updated_at"]) / _US,
        }

    def put_tool(self, tenant: str, values: dict[str, Any]) -> None:
        self._register(tenant)
        member = json.dumps([values["scope_id"], values["name"]])
        row = {k: v for k, v in values.items() if k not in ("enabled", "tenant", "updated_at")}
        enabled = "1" if values.get("enabled", True) else "0"
        keys = [self._k(tenant, "t", member), self._k(tenant, "tools")]
        self._run("put_tool", keys, [member, json.dumps(row), enabled])

    def get_tools(
        self, tenant: str, name: str | None = None, scope_id: str | None = None
    ) -> list[dict[str, Any]]:
        members = sorted(
            json.loads(_s(m))
            for m in self._cmd("list", self.client.smembers, self._k(tenant, "tools"))
        )
        members = [
            m
            for m in members
            if (name is None or m[1] == name) and (scope_id is None or m[0] == scope_id)
        ]
        got = self._pipe(
            "list", [("hgetall", [self._k(tenant, "t", json.dumps(m))]) for m in members]
        )
        rows = [self._tool_row(tenant, _pairs(_flat(h))) for h in got if h]
        return sorted(rows, key=lambda r: (r["name"], r["scope_id"]))

    def set_tool_enabled(self, tenant: str, name: str, scope_id: str, enabled: bool) -> bool:
        key = self._k(tenant, "t", json.dumps([scope_id, name]))
        return int(self._run("enable_tool", [key], ["1" if enabled else "0"])) == 1

    def delete_tool(self, tenant: str, name: str, scope_id: str) -> bool:
        member = json.dumps([scope_id, name])
        got = self._pipe(
            "delete",
            [
                ("delete", [self._k(tenant, "t", member)]),
                ("srem", [self._k(tenant, "tools"), member]),
            ],
        )
        return bool(got[0])

    # -- webhooks -----------------------------------------------------------------------
    def add_webhook(self, tenant: str, values: dict[str, Any]) -> str:
        self._register(tenant)
        wid = "wh_" + uuid.uuid4().hex[:20]
        row = {**values, "id": wid, "tenant": tenant}
        self._run("webhook", [self._k(tenant, "wh")], [wid, json.dumps(row)])
        return wid

    def list_webhooks(self, tenant: str) -> list[dict[str, Any]]:
        raw = self._cmd("list", self.client.hgetall, self._k(tenant, "wh"))
        rows = [json.loads(_s(v)) for v in raw.values()]
        for r in rows:
            r["created_at"] = int(r["created_at"]) / _US
        return sorted(rows, key=lambda r: (r["created_at"], r["id"]))

    def delete_webhook(self, tenant: str, webhook_id: str) -> bool:
        return bool(self._cmd("delete", self.client.hdel, self._k(tenant, "wh"), webhook_id))

    # -- notifications (the outbox; see governance/outbox.py) ---------------------------
    #: The engine's notifications are written here, in the decision's script.
    outbox = True

    def _outbox_args(self, tenant: str, event: dict[str, Any]) -> list[Any]:
        """The ARGV tail of _OUTBOX_ROWS for ``event``'s rows (planned in Python: which
        webhooks want it, which channels are configured)."""
        rows = _gov.plan_notification(tenant, event, self.list_webhooks(tenant))
        args: list[Any] = [self._k(tenant, "ob", ""), tenant, len(rows)]
        for r in rows:
            args += [r["id"], r["event_id"], r["event_type"], r["payload"], r["destination"]]
        return args

    def enqueue_notification(self, tenant: str, event: dict[str, Any]) -> int:
        """Write ``event``'s outbox rows in one script (events not tied to a decision's
        audit row: run_failed, budget_threshold)."""
        self._register(tenant)
        args = self._outbox_args(tenant, event)
        keys = [self._k(tenant, "obq"), self._k(tenant, "obs")]
        return int(self._run("outbox_add", keys, args)) if args[2] else 0

    def outbox_claim(self, tenant: str | None, limit: int, lease: float) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        for t in self._tenants(tenant):
            if len(got) >= limit:
                break
            args = [self._k(t, "ob", ""), limit - len(got), round(lease * _US)]
            args.append(uuid.uuid4().hex[:24])
            for r in self._run("outbox_claim", [self._k(t, "obq")], args):
                i, eid, etype, payload, dest, n, token = (_s(v) for v in r)
                got.append(
                    {
                        "id": i,
                        "tenant": t,
                        "event_id": eid,
                        "event_type": etype,
                        "payload": payload,
                        "destination": dest,
                        "attempts": int(n),
                        "lease_token": token,
                    }
                )
        return got

    def outbox_mark(
        self, tenant: str, row_id: str, token: str, state: str, delay: float, error: str | None
    ) -> bool:
        keys = [self._k(tenant, "ob", row_id), self._k(tenant, "obq")]
        args = [row_id, token, state, round(delay * _US), "" if error is None else "=" + error]
        return int(self._run("outbox_mark", keys, args)) == 1

    def outbox_pending(self, tenant: str | None) -> tuple[int, float | None]:
        count, wait = 0, None
        for t in self._tenants(tenant):
            now, n, first = self._read("outbox_pending", [self._k(t, "obq")], [])
            count += int(n)
            if _s(first):
                w = (int(_s(first)) - int(now)) / _US
                wait = w if wait is None else min(wait, w)
        return count, wait

    def outbox_list(
        self, tenant: str | None, state: str | None, limit: int
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for t in self._tenants(tenant):
            index, start = self._k(t, "obs"), 0
            found: list[dict[str, Any]] = []
            while len(found) < limit:  # newest first, a page at a time
                ids = self._cmd("list", self.client.zrevrange, index, start, start + 499)
                if not ids:
                    break
                got = self._pipe("list", [("hgetall", [self._k(t, "ob", _s(i))]) for i in ids])
                rows = [_outbox_row(_pairs(_flat(h))) for h in got if h]
                found += [r for r in rows if state is None or r["state"] == state]
                start += 500
            out += found[:limit]
        out.sort(key=lambda r: r["created_at"], reverse=True)
        return out[:limit]

    def outbox_retry(self, tenant: str | None, row_id: str) -> bool:
        return any(
            int(self._run("outbox_retry", [self._k(t, "ob", row_id), self._k(t, "obq")], [row_id]))
            for t in self._tenants(tenant)
        )

    def outbox_webhook(self, tenant: str, webhook_id: str) -> dict[str, Any] | None:
        raw = self._cmd("read", self.client.hget, self._k(tenant, "wh"), webhook_id)
        if raw is None:
            return None
        row = json.loads(_s(raw))
        return {"url": row["url"], "secret": row["secret"], "enabled": bool(row["enabled"])}

    def close(self) -> None:
        """The connections are the ledger's: closed with it."""


def _flat(h: Any) -> list[Any]:
    """HGETALL's dict (redis-py) as the flat list a script returns."""
    out: list[Any] = []
    for k, v in h.items():
        out += [k, v]
    return out


def _outbox_row(h: dict[str, str]) -> dict[str, Any]:
    """An outbox row as SQL has it (times in seconds; absent fields None)."""
    return {
        "id": h["id"],
        "tenant": h["tenant"],
        "event_id": h["event_id"],
        "event_type": h["event_type"],
        "payload": h["payload"],
        "destination": h["destination"],
        "state": h["state"],
        "attempts": int(h["attempts"]),
        "next_attempt_at": int(h["next_attempt_at"]) / _US,
        "lease_token": h.get("lease_token"),
        "last_error": h.get("last_error"),
        "created_at": int(h["created_at"]) / _US,
        "delivered_at": _sec(h.get("delivered_at")),
    }


def _walk(head: dict[str, str] | None, rows: list[dict[str, Any]]) -> tuple[Any, Any, str] | None:
    """The first problem of one chain, as GovStore.verify_audit finds it, or None."""
    if head is None:
        return None, None, "chain head missing"
    prev, expect = _g(head.get("base_hash", GENESIS)), int(head.get("base_seq", "0")) + 1
    for row in sorted(rows, key=lambda r: (int(r["seq"]), r["id"])):
        if int(row["seq"]) != expect:
            what = "row missing" if int(row["seq"]) > expect else "out of order"
            return expect, row["id"], f"{what}: expected seq {expect}, found {row['seq']}"
        if row["prev_hash"] != prev:
            return row["seq"], row["id"], "previous-hash link broken (row moved or removed)"
        if chain_hash(prev, audit_fields(_Row(row))) != row["hash"]:
            return row["seq"], row["id"], "contents altered (hash mismatch)"
        prev, expect = row["hash"], expect + 1
    if expect - 1 != int(head["seq"]) or prev != _g(head["hash"]):
        return expect, None, f"rows after seq {expect - 1} missing (head at {head['seq']})"
    return None


class _Row:
    """Attribute access over a dict, for :func:`audit_fields`."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        return None
