"""Keys that never repeat: warn when a tool's arguments differ only in volatile values.

A derived key is only as stable as the arguments it is derived from. A tool called with a
timestamp, a fresh uuid or a nonce among its arguments gets a new key on every call, so a
retry is never deduplicated — silently. :class:`KeyHealth` watches the calls that made a
*new* claim (a replay repeated its key by definition, so it is never looked at) and, when
one tool in one scope is called again and again with arguments that are equal except for
values that look volatile, logs one warning per tool, scope and argument on the
``onceonly.keyhealth`` logger, naming the argument and the fix (``key_args=`` / ``exclude=``).

What looks volatile (see ``docs/keys.md``, "Keys that never repeat"):

* a clock reading near now: a ``datetime``, an ISO-8601 string with a time of day, or a
  number of seconds, milliseconds, microseconds or nanoseconds since the epoch, between a
  day ago and five minutes ahead;
* a random identifier — a ``UUID`` (object, dashed or hex string), a ULID, a hex or base64
  token of 16 characters or more;
* any scalar under a name that says "fresh per call" (``request_id``, ``nonce``,
  ``idempotency_key``, ``trace_id``, ``attempt``…).

Nothing under a name that says it refers to something (``customer_id``, ``ref``,
``sha256``, ``version``, ``user``…) looks volatile: a uuid or an epoch-based number there
is a different customer or order as often as it is a nonce, and we stay silent.

The cost is kept off the hot path: nothing is inspected before a claim, only new claims
are inspected, and after the first :data:`WARMUP` new claims of a tool in a scope only one
in :data:`STRIDE` is (every one while the tool is a suspect, within a budget). Memory is
bounded: a small LRU of tool+scope slots, each with a small LRU of argument shapes, and
only hashes are kept, never the arguments. Self-contained: no I/O besides the log
record, no imports from the rest of the engine.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import itertools
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["KeyHealth", "volatile_kind"]

log = logging.getLogger("onceonly.keyhealth")

#: New claims of one tool with equal stable arguments before the warning fires.
THRESHOLD = 3
#: Seconds within which those claims must fall (retries come close together).
WINDOW = 3600.0
#: A clock reading is "near now" between this many seconds ago and :data:`CLOCK_AHEAD` ahead.
CLOCK_BEHIND = 86_400.0
CLOCK_AHEAD = 300.0
#: Every new claim of a tool in a scope is inspected up to this many; then one in STRIDE.
WARMUP = 32
STRIDE = 16
#: A suspect (volatile-looking values seen, no warning yet) is inspected on every call up
#: to this many more times, then sampled like the others.
SUSPECT_BUDGET = 1024
#: Bounds: tool+scope slots, argument shapes per slot, warnings remembered.
MAX_SLOTS = 1024
MAX_SHAPES = 16
MAX_WARNED = 4096
#: Arguments with more leaves or deeper nesting than this are not inspected.
MAX_LEAVES = 64
MAX_DEPTH = 6

# Words in an argument's name that say "a fresh value on every call"...
_PER_CALL = frozenset(
    {
        "nonce",
        "cnonce",
        "jti",
        "idempotency",
        "idempotent",
        "idem",
        "salt",
        "dedup",
        "dedupe",
        "attempt",
        "attempts",
        "timestamp",
        "ts",
        "random",
        "rand",
    }
)
# ... or do so when followed by an id word (``request_id``, ``traceId``, ``call_key``):
# alone they are data (``request="refund my order"``, ``time_span="1h"``).
_PER_CALL_ID = frozenset(
    {"request", "req", "trace", "span", "correlation", "corr", "invocation", "unique", "call"}
)
_ID_WORDS = frozenset({"id", "key", "token", "uuid", "guid"})
# ... or are the whole name (``uuid=uuid4()``; ``user_uuid`` is a reference).
_PER_CALL_NAMES = frozenset({"now", "uuid", "guid"})
# Last words of a name that say "this refers to something": a random-looking value under
# it is an entity's id (a different customer), not a nonce.
_REFERENCE = frozenset(
    {
        "id",
        "ids",
        "uuid",
        "guid",
        "ref",
        "refs",
        "reference",
        "key",
        "keys",
        "pk",
        "sku",
        "code",
        "number",
        "num",
        "no",
        "handle",
        "slug",
        "name",
        "email",
        "path",
        "url",
        "uri",
        "hash",
        "sha",
        "sha1",
        "sha256",
        "md5",
        "digest",
        "checksum",
        "etag",
        "version",
        "signature",
        "user",
        "customer",
        "account",
        "order",
        "client",
        "tenant",
        "org",
        "organization",
        "team",
        "project",
        "owner",
        "member",
        "contact",
        "session",
        "thread",
        "conversation",
        "channel",
        "document",
        "doc",
        "file",
        "item",
        "product",
        "invoice",
        "payment",
        "charge",
        "subscription",
        "ticket",
        "issue",
        "record",
        "entity",
        "target",
        "recipient",
        "parent",
        "device",
        "address",
        "wallet",
        "card",
    }
)
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")
_TYPED_ID = re.compile(r"[a-z]{2,10}[_-]")  # cus_…, pi_…, xoxb-…: a provider's typed id
_HEX = frozenset("0123456789abcdefABCDEF")
_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_")
_CROCKFORD = frozenset("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
_EPOCH_SCALES = (1.0, 1e3, 1e6, 1e9)
_SCALARS = (str, int, float, bytes, uuid.UUID, _dt.datetime)
_PLAIN = frozenset({str, int, float, bool, type(None), bytes, uuid.UUID, _dt.datetime})

PER_CALL, REFERENCE = 1, 2


@functools.lru_cache(maxsize=1024)
def _name_kind(name: str) -> int:
    """PER_CALL, REFERENCE or 0 for an argument name (cached: names repeat)."""
    words = [w.lower() for w in _WORD.findall(name)]
    if name.lower() in _PER_CALL_NAMES or any(w in _PER_CALL for w in words):
        return PER_CALL
    if any(a in _PER_CALL_ID and b in _ID_WORDS for a, b in itertools.pairwise(words)):
        return PER_CALL
    tail = re.split(r"[^A-Za-z0-9]+", name)[-1].lower()  # "sha256", "md5"
    alpha = [w for w in words if not w.isdigit()]
    if tail in _REFERENCE or (alpha and alpha[-1] in _REFERENCE):
        return REFERENCE
    return 0


def _near(seconds: float, now: float) -> bool:
    return now - CLOCK_BEHIND <= seconds <= now + CLOCK_AHEAD


def _clock(value: Any, now: float) -> bool:
    """True for a clock reading near ``now``: datetime, ISO-8601 with a time, epoch number."""
    t = type(value)
    if t is int or t is float:
        if not 1e9 <= value < 1e20:  # before 2001 in seconds, or past ns: not today
            return False
        return any(_near(value / scale, now) for scale in _EPOCH_SCALES)
    if t is str:
        n = len(value)
        if n in (10, 13, 16, 19) and value.isdigit() and value.isascii():
            return _clock(int(value), now)
        if not 15 <= n <= 40 or not value[:4].isdigit():
            return False
        # 2026-12-06T02:40:10Z (extended) or 20261206T024010Z (basic): a time of day is
        # required, a bare date is a business date (a daily report), not a clock reading.
        if not ((value[4] == "-" and value[10:11] in ("T", "t", " ")) or value[8] in "Tt"):
            return False
        try:
            parsed = _dt.datetime.fromisoformat(value.upper() if "t" in value else value)
        except ValueError:
            return False
        return _datetime_near(parsed, now)
    if isinstance(value, _dt.datetime):
        return _datetime_near(value, now)
    return False


def _datetime_near(value: _dt.datetime, now: float) -> bool:
    try:
        if value.tzinfo is not None and value.utcoffset() is not None:
            return _near(value.timestamp(), now)
        # Naive: the caller's wall clock, or UTC written without a zone; either is a clock.
        utc = value.replace(tzinfo=_dt.timezone.utc).timestamp()
        return _near(utc, now) or _near(value.timestamp(), now)
    except (OverflowError, ValueError, OSError):  # year 1 or 9999 in some zone
        return False


def _random_id(value: Any) -> bool:
    """True for a random-looking identifier: UUID, ULID, a hex or base64 token."""
    if isinstance(value, uuid.UUID):
        return True
    if type(value) is not str:
        return False
    n = len(value)
    if n < 16 or n > 256 or not value.isascii():
        return False
    if n == 36 and value[8] == value[13] == value[18] == value[23] == "-":
        return _HEX.issuperset(value.replace("-", ""))
    if n == 26 and _CROCKFORD.issuperset(value.upper()) and value[0] in "01234567":
        return not value.isdigit()  # a ULID (its first character is at most 7)
    chars = set(value)
    if chars <= _HEX:  # 16+ hex digits: a uuid.hex, a token_hex(), a random id
        return not value.isdigit() and not value.isalpha()
    body = value.rstrip("=")
    if not chars - {"="} <= _B64 or "=" in body or _TYPED_ID.match(value):
        return False
    # token_urlsafe(), base64 of random bytes: upper and lower case and digits, changing
    # class at ~64% of positions; a CamelCase title with a year ("Report2026Final") has
    # all three but changes class rarely.
    if not (
        any(c.isupper() for c in body)
        and any(c.islower() for c in body)
        and any(c.isdigit() for c in body)
    ):
        return False
    classes = [c.isupper() - c.islower() + 2 * c.isdigit() for c in body]
    switches = sum(a != b for a, b in itertools.pairwise(classes))
    return switches >= 0.4 * (len(body) - 1)


def volatile_kind(value: Any, name: str, now: float | None = None) -> str | None:
    """Why ``value`` (passed as argument ``name``) looks volatile, or None.

    Returns ``"a clock reading"``, ``"a random id"`` or ``"a per-call value"``.
    """
    if now is None:
        now = time.time()
    if value is None or type(value) is bool:
        return None
    kind = _name_kind(name) if name else 0
    if kind == REFERENCE:
        # order_id=<uuid7 or epoch-based number>, version=<timestamp>: another order,
        # another version — data, however fresh it looks.
        return None
    if _clock(value, now):
        return "a clock reading"
    if kind == PER_CALL and isinstance(value, _SCALARS):
        return "a per-call value"
    if _random_id(value):
        return "a random id"
    return None


def _leaves(args: Mapping[str, Any]) -> list[tuple[str, str, Any]] | None:
    """``(path, name, value)`` for every leaf of the arguments, or None when too big.

    ``path`` is how the warning names the value (``order.created_at``, ``items[0].ts``);
    ``name`` is the nearest argument or field name (what :func:`_name_kind` reads).
    """
    if len(args) > MAX_LEAVES:
        return None
    out: list[tuple[str, str, Any]] = []
    stack: list[tuple[str, str, Any, int]] = [(str(k), str(k), v, 0) for k, v in args.items()]
    while stack:
        path, name, v, depth = stack.pop()
        if type(v) in _PLAIN:  # the common leaf, without the ABC checks below
            out.append((path, name, v))
            if len(out) > MAX_LEAVES:
                return None
            continue
        if isinstance(v, Mapping):
            if len(v) > MAX_LEAVES:  # too big to be worth walking: never a whole payload
                return None
            children: Iterable[tuple[Any, Any]] = v.items()
        elif isinstance(v, (list, tuple)):
            if depth >= MAX_DEPTH or len(v) > MAX_LEAVES:
                return None
            stack.extend((f"{path}[{i}]", name, x, depth + 1) for i, x in enumerate(v))
            continue
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            children = ((f.name, getattr(v, f.name)) for f in dataclasses.fields(v))
        elif hasattr(type(v), "__pydantic_fields__") and hasattr(v, "model_dump"):
            children = ((f, getattr(v, f, None)) for f in type(v).__pydantic_fields__)
        else:
            out.append((path, name, v))
            if len(out) > MAX_LEAVES:
                return None
            continue
        if depth >= MAX_DEPTH:
            return None
        for k, x in children:
            sub = f"{path}.{k}" if type(k) is str else f"{path}[{k!r}]"
            stack.append((sub, str(k), x, depth + 1))
    return out


def _token(value: Any) -> Any:
    """A hashable stand-in for a stable value (only its hash is kept)."""
    try:
        hash(value)
    except TypeError:
        return (type(value).__qualname__, repr(value))
    return value


class _Shape:
    """Calls of one tool whose stable arguments are equal: how often, and what changed."""

    __slots__ = ("changed", "count", "first", "last")

    def __init__(self, now: float, last: dict[str, int]) -> None:
        self.count = 1
        self.first = now
        self.last = last  # path -> hash of the volatile value last seen
        self.changed: set[str] = set()


class _Slot:
    """One tool in one scope."""

    __slots__ = ("budget", "calls", "shapes", "suspect")

    def __init__(self) -> None:
        self.calls = 1
        self.suspect = False
        self.budget = SUSPECT_BUDGET
        self.shapes: OrderedDict[int, _Shape] = OrderedDict()


ArgsSource = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


class KeyHealth:
    """Watches new claims and warns, once per tool, scope and argument, about arguments
    that never repeat. Thread-safe; :meth:`observe` never raises.

    ``clock`` (wall time, for "near now") and ``monotonic`` (for :data:`WINDOW`) are
    injectable for tests.
    """

    def __init__(
        self,
        *,
        threshold: int = THRESHOLD,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_slots: int = MAX_SLOTS,
    ) -> None:
        self.threshold = threshold
        self._clock = clock
        self._monotonic = monotonic
        self._max_slots = max_slots
        self._slots: OrderedDict[tuple[str, str], _Slot] = OrderedDict()
        self._warned: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many tool+scope slots are tracked (at most ``max_slots``)."""
        return len(self._slots)

    def observe(
        self,
        tool: str,
        scope: str | None,
        args: ArgsSource,
        *,
        key_args: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        explicit_key: bool = False,
        unlimited: bool = False,
    ) -> None:
        """Note one call of ``tool`` in ``scope`` that made a new claim.

        ``args`` are the tool's arguments by name, or a callable returning them (bound
        only if this call is inspected). ``key_args``/``exclude`` are the tool's options:
        only what the key is derived from is looked at. A call with an explicit key, or
        of an unlimited (read-only) tool, is not looked at: its key does not come from
        its arguments, or there is no key.
        """
        if explicit_key or unlimited:
            return
        where = (tool, scope or "")
        slot = self._slots.get(where)
        if slot is not None:
            # The common case ends here, without the lock: a lost increment under a race
            # only shifts which call is sampled.
            n = slot.calls = slot.calls + 1
            if n > WARMUP and n % STRIDE:
                if not slot.suspect or slot.budget <= 0:
                    return
                slot.budget -= 1
        try:
            self._inspect(where, args, key_args, exclude)
        except Exception:  # a diagnostic must never break a call
            log.debug("key health check of %s failed", tool, exc_info=True)

    def _inspect(
        self,
        where: tuple[str, str],
        args: ArgsSource,
        key_args: Iterable[str] | None,
        exclude: Iterable[str],
    ) -> None:
        with self._lock:
            slot = self._slot(where)  # and mark it recently used
        tool, scope = where
        bound = args() if callable(args) else args
        if key_args is not None:
            names = tuple(key_args)
            bound = {k: bound[k] for k in names if k in bound}
        elif exclude:
            skip = set(exclude)
            bound = {k: v for k, v in bound.items() if k not in skip}
        leaves = _leaves(bound)
        if not leaves:
            return
        now = self._clock()
        stable: list[tuple[str, Any]] = []
        volatile: dict[str, tuple[str, int]] = {}
        for path, name, value in leaves:
            kind = volatile_kind(value, name, now)
            if kind is None:
                stable.append((path, _token(value)))
            else:
                volatile[path] = (kind, hash(_token(value)))
        if not volatile:
            return
        stable.sort()
        shape_key = hash((tuple(stable), tuple(sorted(volatile))))
        values = {p: h for p, (_, h) in volatile.items()}
        t = self._monotonic()
        with self._lock:
            slot.suspect = True
            shape = slot.shapes.get(shape_key)
            if shape is None or t - shape.first > WINDOW:
                slot.shapes[shape_key] = _Shape(t, values)
                slot.shapes.move_to_end(shape_key)
                while len(slot.shapes) > MAX_SHAPES:
                    slot.shapes.popitem(last=False)
                return
            slot.shapes.move_to_end(shape_key)
            changed = {p for p, h in values.items() if shape.last.get(p) != h}
            if not changed:
                return  # the same values again: nothing volatile about this call
            shape.count += 1
            shape.changed |= changed
            shape.last = values
            if shape.count < self.threshold:
                return
            fresh = [p for p in sorted(shape.changed) if (tool, scope, p) not in self._warned]
            for p in fresh:
                self._warned[(tool, scope, p)] = None
            while len(self._warned) > MAX_WARNED:
                self._warned.popitem(last=False)
            slot.budget = 0  # named: back to sampling, like any tool
        if fresh:
            self._warn(tool, scope, fresh, {p: volatile[p][0] for p in fresh}, bound, shape.count)

    def _slot(self, key: tuple[str, str]) -> _Slot:
        slots = self._slots
        slot = slots.get(key)
        if slot is None:
            slot = slots[key] = _Slot()  # counts this call
            if len(slots) > self._max_slots:
                slots.popitem(last=False)
        else:
            slots.move_to_end(key)
        return slot

    def _warn(
        self,
        tool: str,
        scope: str,
        paths: list[str],
        kinds: dict[str, str],
        bound: Mapping[str, Any],
        count: int,
    ) -> None:
        roots = sorted({_root(p) for p in paths})
        stable = [k for k in bound if k not in roots]
        what = ", ".join(f"{p!r} ({kinds[p]})" for p in paths)
        nested = sorted({_root(p) for p in paths if p != _root(p)})
        if not nested:
            fix = f"exclude={roots!r}"
            if stable:
                fix += f" (or key_args={stable!r})"
        else:
            # exclude= and key_args= name whole arguments: a volatile field inside one
            # (order.created_at) is left out by keying on the others, or by a key= function.
            inside = ", ".join(repr(r) for r in nested)
            fix = f"key_args={stable!r}, or " if stable else ""
            fix += f"a key= built from the stable fields of {inside}"
            fix += " (exclude= and key_args= name whole arguments)"
        log.warning(
            "%s was called %d times in scope %r with arguments that differ only in %s: "
            "every call gets a new key, so a retry is never deduplicated. If that value is "
            "made afresh for each call, leave it out of the key: %s.",
            tool,
            count,
            scope,
            what,
            fix,
            extra={"onceonly_tool": tool, "onceonly_scope": scope, "onceonly_args": paths},
        )


def _root(path: str) -> str:
    """The argument a path starts in: ``order.items[0].ts`` -> ``order``."""
    cut = len(path)
    for sep in (".", "["):
        i = path.find(sep)
        if i != -1:
            cut = min(cut, i)
    return path[:cut]
