"""The claim protocol (DESIGN §4), written once, free of I/O.

:func:`decide` is a pure function of a record and the caller's options. :func:`flow`
is a generator that walks one call through claim → decide → (wait | take over | replay)
→ execute → fenced completion. It *yields* what it needs done — a store primitive, a
sleep, the execution of the tool, a reconcile callback — and is driven by a thin
synchronous shell or a thin asynchronous shell (see :mod:`onceonly_core.guard`). The
protocol therefore exists in one copy for both.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal

from .codec import ResultCodec
from .errors import (
    CachedFailure,
    CodecError,
    CompletionNotRecorded,
    InProgress,
    KeyReuseError,
    LeaseLost,
    ResultNotStored,
    StoreError,
    UnknownOutcome,
)
from .limits import DEFAULT_MAX_RESULT_BYTES
from .redact import default_redactor
from .stores.base import (
    CLEARED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    NewClaim,
    Record,
    Store,
    WouldBlock,
)

__all__ = ["BLOCKED", "NOT_DONE", "CallContext", "Options", "Outcome", "decide", "flow"]

OnUnknown = Literal["retry", "raise"] | Callable[["CallContext"], Any]


class _NotDone:
    def __repr__(self) -> str:
        return "NOT_DONE"


#: Returned by a reconcile callback: "the earlier attempt did not happen, run again".
NOT_DONE: Any = _NotDone()


class _Blocked:
    """Returned for a duplicate when replay is off (unless ``blocked_return`` is set).

    Falsy, a singleton."""

    _instance: _Blocked | None = None

    def __new__(cls) -> _Blocked:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "BLOCKED"


BLOCKED: Any = _Blocked()


@dataclass(frozen=True, slots=True)
class Options:
    """Per-call behaviour. Set defaults on the Guard, per tool with ``guard.policy``,
    per call with ``guard.using(...)`` / ``@guard.once(...)``."""

    key: str | Callable[..., str] | None = None
    key_args: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    name: str | None = None
    ttl: float | None = None
    lease: float = 30.0
    wait: float = 30.0
    on_unknown: OnUnknown = "retry"
    cache_errors: bool = False
    max: int = 1
    unlimited: bool = False
    # A read tool: never deduplicated (no ledger claim), still governed and audited.
    read_only: bool = False
    replay: bool = True
    blocked_return: Any = BLOCKED
    check_payload: bool = True
    float_digits: int | None = None
    max_result_bytes: int | None = DEFAULT_MAX_RESULT_BYTES


@dataclass(slots=True)
class CallContext:
    """What a running tool can read about its own call (``onceonly_core.current_call()``).

    Pass ``idempotency_key`` downstream (e.g. Stripe's ``Idempotency-Key``): it is the
    same for every attempt of this key, which turns "at most once in our ledger" into
    "effectively once in the world" when the downstream honours it.
    """

    namespace: str
    key: str
    tool: str
    token: int
    attempt: int
    run_id: str | None
    caller: str | None

    @property
    def idempotency_key(self) -> str:
        raw = f"{self.namespace}:{self.key}"
        if len(raw) <= 255:
            return raw
        import hashlib

        return "oo-" + hashlib.sha256(raw.encode()).hexdigest()


@dataclass(slots=True)
class Outcome:
    """How one guarded call ended; handed to hooks and kept in stats."""

    decision: Literal["executed", "replayed", "blocked", "failed", "reconciled"]
    tool: str
    namespace: str
    key: str
    value: Any = None
    error: BaseException | None = None
    record: Record | None = None
    token: int = 0
    attempt: int = 0


# -- ops yielded by flow(), carried out by a driver ------------------------------------
# One class per store primitive, so mypy checks the arguments of every store call; the
# driver calls ``op.run(store)``. Plain slotted dataclasses, not frozen: a frozen
# dataclass's __init__ sets each field through object.__setattr__, several times the cost
# of these on the hot path (two ops per call), and nothing keeps an op after its run.
class StoreOp:
    """A store primitive the flow needs done (see :class:`~onceonly_core.stores.base.Store`)."""

    __slots__ = ()

    def run(self, store: Store) -> Any:
        raise NotImplementedError


@dataclass(slots=True)
class Claim(StoreOp):
    namespace: str
    key: str
    new: NewClaim

    def run(self, store: Store) -> Record:
        return store.claim(self.namespace, self.key, self.new)


@dataclass(slots=True)
class TakeOver(StoreOp):
    namespace: str
    key: str
    seen: Record
    new: NewClaim
    force: bool = False

    def run(self, store: Store) -> Record | None:
        return store.take_over(self.namespace, self.key, self.seen, self.new, force=self.force)


@dataclass(slots=True)
class Get(StoreOp):
    namespace: str
    key: str

    def run(self, store: Store) -> Record | None:
        return store.get(self.namespace, self.key)


@dataclass(slots=True)
class Heartbeat(StoreOp):
    namespace: str
    key: str
    token: int
    lease: float  # < 0: give the key back at once

    def run(self, store: Store) -> bool:
        return store.heartbeat(self.namespace, self.key, self.token, self.lease)


@dataclass(slots=True)
class Finish(StoreOp):
    namespace: str
    key: str
    token: int
    ok: bool
    result: str | None = None
    error: str | None = None
    ttl: float | None = None
    #: Runs this completion instead of ``store.finish`` (Call.complete); None: the store.
    via: Callable[[Store, Finish], bool] | None = None

    def run(self, store: Store) -> bool:
        if self.via is not None:
            return self.via(store, self)
        return store.finish(
            self.namespace,
            self.key,
            self.token,
            ok=self.ok,
            result=self.result,
            error=self.error,
            ttl=self.ttl,
        )


@dataclass(slots=True)
class Sleep:
    seconds: float


@dataclass(slots=True)
class Execute:
    context: CallContext


@dataclass(slots=True)
class Reconcile:
    context: CallContext


@dataclass(slots=True)
class Ran:
    """What the driver sends back after Execute."""

    ok: bool
    value: Any = None
    error: BaseException | None = None


# -- pure decisions --------------------------------------------------------------------
EXECUTE = "execute"
REPLAY = "replay"
BLOCK = "block"
REPLAY_ERROR = "replay_error"
KEY_REUSE = "key_reuse"
WAIT = "wait"
TAKE_OVER = "take_over"
UNKNOWN = "unknown"


def decide(rec: Record, opts: Options, digest: str | None) -> str:
    """What to do with the record a claim found. Pure: same inputs, same answer."""
    if rec.mine:
        return EXECUTE
    state = rec.state
    expired = state == SUCCEEDED and rec.expires_at is not None and rec.expires_at <= rec.now
    if (
        opts.check_payload
        and digest is not None
        and rec.args_digest is not None
        and digest != rec.args_digest
        and state
        not in (CLEARED, FAILED)  # a failure is no result: a corrected retry may reuse the key
        and not expired
    ):
        return KEY_REUSE
    if state == SUCCEEDED:
        if expired or rec.executions < opts.max:
            return TAKE_OVER
        return REPLAY if opts.replay else BLOCK
    if state == FAILED:
        # A graph interrupt's release is not a failure to replay: the resume runs the tool.
        cached = opts.cache_errors and not (rec.error or "").startswith(INTERRUPTED)
        return REPLAY_ERROR if cached else TAKE_OVER
    if state == CLEARED:
        return TAKE_OVER
    if state == RUNNING:
        return WAIT if rec.lease_live else UNKNOWN
    raise StoreError(f"record {rec.key!r} has an unknown state {state!r}")


# -- interruptions -------------------------------------------------------------------------
_INTERRUPTS: tuple[type[BaseException], ...] = ()

#: The error text of a call released because its tool was interrupted by control flow (a
#: graph interrupt): a failure that is never cached, since the resumed call must run.
INTERRUPTED = "interrupted: "


def register_interrupt(*classes: type[BaseException]) -> None:
    """Declare exception classes that are control flow, not failures (an adapter
    registers its framework's, e.g. a graph interrupt). Classified ``interrupted``."""
    global _INTERRUPTS
    _INTERRUPTS = tuple(dict.fromkeys((*_INTERRUPTS, *classes)))


def is_interrupt(err: BaseException | None) -> bool:
    """Cancellation, KeyboardInterrupt, SystemExit (anything that is not an Exception),
    a registered interrupt class, or LangGraph's ``GraphBubbleUp`` family (interrupt(),
    Command(graph=PARENT)) when langgraph is loaded — looked up, never imported."""
    if err is None:
        return False
    if not isinstance(err, Exception):
        return True
    if _INTERRUPTS and isinstance(err, _INTERRUPTS):
        return True
    mod = sys.modules.get("langgraph.errors")
    bubble = getattr(mod, "GraphBubbleUp", None) if mod is not None else None
    return isinstance(bubble, type) and isinstance(err, bubble)


def error_text(err: BaseException) -> str:
    return f"{type(err).__module__}.{type(err).__qualname__}: {safe_str(err)}"[:4000]


def safe_str(err: BaseException) -> str:
    """str(err) with secrets masked, even for an exception whose __str__ raises: a broken
    message must not replace the tool's own error, nor skip the write that releases its
    claim.

    HTTP libraries quote the failing URL or header (``?api_key=...``, ``Authorization:
    Bearer ...``): this text goes to the ledger's error column, events, notifications and
    log lines, so it is redacted here, once, for all of them. NUL characters and lone
    surrogates become U+FFFD, so the text is storable on every backend.
    """
    try:
        text = str(err)[:_MAX_ERROR_SCAN]
    except Exception:
        return f"<unprintable {type(err).__name__}>"
    return default_redactor.redact_text(text)


_MAX_ERROR_SCAN = 16_000  # redaction is linear, but a 100 MB message is not worth scanning


# -- the flow --------------------------------------------------------------------------
@dataclass(slots=True)
class Call:
    """Everything the flow needs about one call, prepared by the facade."""

    namespace: str
    key: str
    tool: str
    digest: str | None
    opts: Options
    new: NewClaim
    codec: ResultCodec
    force: bool = False
    #: The record a claim of this key already returned (a governed call's first
    #: transaction claimed it with the budget reservation): the flow's first Claim.
    claimed: Record | None = None
    #: Runs the completion of an executed call instead of ``store.finish`` (a governed
    #: call's second transaction: completion, settle and audit; see Finish.via).
    complete: Callable[[Store, Finish], bool] | None = None


FINISH_RETRIES = (0.05, 0.2, 0.5, 1.0)

Op = StoreOp | Sleep | Execute | Reconcile


def replayed(call: Call, store: Store, read_first: bool = False) -> Outcome | None:
    """The flow's first step, flat, for the sync hot path: claim the key; when the record
    found is one to replay, the replay's Outcome (no generator, no driver); otherwise
    None, with the record left in ``call.claimed`` for :func:`flow` to go on from.
    The decision is :func:`decide`'s, as in the flow; a claim that fails raises as it
    would there (before anything ran).

    ``read_first``: read the record before claiming (a key the caller has seen done, on
    a store whose claim costs more than a read): a record to replay is replayed from the
    read, as it would be from the claim's (a claim of a held key changes nothing); any
    other record, or none, and the claim runs as usual."""
    if read_first and not call.force:
        out = replay_of(call, store.get(call.namespace, call.key))
        if out is not None:
            return out
    rec = call.claimed = store.claim(call.namespace, call.key, call.new)
    if (
        rec is not None
        and not rec.mine
        and not call.force
        and decide(rec, call.opts, call.digest) == REPLAY
    ):
        return _replay(call, rec)
    return None


def replay_of(call: Call, seen: Record | None) -> Outcome | None:
    """The replay of a record read before any claim (``read_first``), when :func:`decide`
    says to replay it; None for any other record, or none: the claim decides then."""
    if seen is not None and decide(seen, call.opts, call.digest) == REPLAY:
        return _replay(call, seen)
    return None


def flow(call: Call) -> Generator[Op, Any, Outcome]:
    ns, key, opts = call.namespace, call.key, call.opts
    rec: Record | None = call.claimed
    if rec is None:
        rec = yield Claim(ns, key, call.new)
    deadline: float | None = None
    delay = 0.002
    while True:
        if rec is None:  # purged while we looked: claim afresh
            rec = yield Claim(ns, key, call.new)
            continue
        if call.force and not rec.mine:
            taken = yield TakeOver(ns, key, rec, call.new, force=True)
            if taken is None:
                rec = yield Get(ns, key)
                continue
            rec = taken
            break
        d = decide(rec, opts, call.digest)
        if d == EXECUTE:
            break
        if d == REPLAY:
            return _replay(call, rec)
        if d == BLOCK:
            return Outcome(
                "blocked",
                call.tool,
                ns,
                key,
                opts.blocked_return,
                record=rec,
                token=rec.token,
                attempt=rec.attempt,
            )
        if d == REPLAY_ERROR:
            etype, _, msg = (rec.error or "").partition(": ")
            raise CachedFailure(etype, msg)
        if d == KEY_REUSE:
            raise KeyReuseError(ns, key, rec.tool)
        if d == WAIT:
            now = time.monotonic()
            if deadline is None:
                deadline = now + opts.wait
            if now >= deadline:
                raise InProgress(ns, key, rec.owner)
            yield Sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.25)
            rec = yield Get(ns, key)
            continue
        if d == UNKNOWN and opts.on_unknown == "raise":
            raise UnknownOutcome(ns, key, rec.owner, rec.token)
        # TAKE_OVER, or UNKNOWN with retry/reconcile: fence first (token + 1), so that
        # exactly one caller proceeds and the old owner can no longer complete.
        taken = yield TakeOver(ns, key, rec, call.new)
        if taken is None:
            rec = yield Get(ns, key)
            continue
        if d == UNKNOWN and callable(opts.on_unknown):
            ctx = _context(call, taken)
            try:
                verdict = yield Reconcile(ctx)
            except BaseException:
                # The reconciler failed: give the key back at once, outcome still unknown.
                with contextlib.suppress(StoreError):
                    yield Heartbeat(ns, key, taken.token, -1.0)
                raise
            if verdict is not NOT_DONE:
                yield from _record_success(call, taken, verdict)
                return Outcome(
                    "reconciled",
                    call.tool,
                    ns,
                    key,
                    verdict,
                    record=taken,
                    token=taken.token,
                    attempt=taken.attempt,
                )
        rec = taken
        break

    ran: Ran = yield Execute(_context(call, rec))
    if ran.ok:
        yield from _record_success(call, rec, ran.value, call.complete)
        return Outcome("executed", call.tool, ns, key, ran.value, None, rec, rec.token, rec.attempt)
    assert ran.error is not None
    if isinstance(ran.error, Exception):
        # The tool failed: release the key (a failure is not a result) so a retry runs.
        # If this write fails the lease expires on its own; the tool's error matters more.
        # A graph interrupt (an Exception raised on purpose at a pause point, before any
        # effect) is released the same way, marked so that cache_errors never replays it.
        text = error_text(ran.error)
        if is_interrupt(ran.error):
            text = INTERRUPTED + text
        with contextlib.suppress(StoreError):
            yield Finish(ns, key, rec.token, ok=False, error=text)
    else:
        # Interrupted (cancelled task, KeyboardInterrupt, SystemExit): whether the effect
        # happened is unknown. Expire the lease now, so the next caller applies the
        # unknown-outcome policy at once instead of waiting out the lease.
        with contextlib.suppress(StoreError):
            yield Heartbeat(ns, key, rec.token, -1.0)
    raise ran.error


def _context(call: Call, rec: Record) -> CallContext:
    return CallContext(
        call.namespace,
        call.key,
        call.tool,
        rec.token,
        rec.attempt,
        call.new.run_id,
        call.new.caller,
    )


def _replay(call: Call, rec: Record) -> Outcome:
    if rec.result is None:
        # The "result not stored" marker: succeeded, no result, the reason in ``error``.
        # Never run again (the effect happened); say so instead.
        reason = (rec.error or "no result").removeprefix(NOT_STORED)
        raise ResultNotStored(call.namespace, rec.key, call.tool, reason)
    value = call.codec.decode(rec.result)
    # Positional (value, error, record, token, attempt): half the cost of keywords.
    return Outcome(
        "replayed", call.tool, call.namespace, call.key, value, None, rec, rec.token, rec.attempt
    )


#: Prefix of the ``error`` column of a succeeded record whose result was not stored.
NOT_STORED = "result not stored: "


def _oversize(text: str, limit: int | None) -> int | None:
    """The UTF-8 size of ``text`` when it is over ``limit`` bytes, else None."""
    if limit is None or len(text) * 4 <= limit:  # the hot path: no encoding needed
        return None
    size = len(text.encode("utf-8", "surrogatepass"))
    return size if size > limit else None


def _record_success(
    call: Call, rec: Record, value: Any, via: Callable[[Store, Finish], bool] | None = None
) -> Generator[Op, Any, None]:
    try:
        text: str | None = call.codec.encode(value)
        note = None
    except Exception as err:  # CodecError, or anything a field getter / custom codec raises
        # The effect happened: record success anyway (never run again), without a result.
        detail = safe_str(err)
        if not isinstance(err, CodecError):
            detail = f"{type(err).__name__}: {detail}"
        text, note = None, f"{NOT_STORED}{detail}"
    if text is not None and (size := _oversize(text, call.opts.max_result_bytes)) is not None:
        # Checked before the write: a statement over the backend's limit (MariaDB's
        # max_allowed_packet) would fail, leave the record running and rerun the tool.
        # Succeeded without a result instead: replays raise ResultNotStored.
        limit = call.opts.max_result_bytes
        text, note = None, f"{NOT_STORED}{size} bytes, over max_result_bytes={limit}"
    for i, pause in enumerate((0.0, *FINISH_RETRIES)):
        if pause:
            yield Sleep(pause)
        try:
            done = yield Finish(
                call.namespace,
                call.key,
                rec.token,
                ok=True,
                result=text,
                error=note,
                ttl=call.opts.ttl,
                via=via,
            )
        except StoreError as err:
            if i == len(FINISH_RETRIES):
                raise CompletionNotRecorded(
                    f"{call.tool} ran (key {call.key!r}, token {rec.token}) but its outcome "
                    f"may not have been recorded: {err}. Unless a write committed and only "
                    "its reply was lost, the record stays running until its lease expires; "
                    "then the unknown-outcome policy applies.",
                    result=value,
                ) from err
            continue
        if not done:
            if i:
                # An earlier attempt may have committed and lost only its reply (connection
                # dropped): a succeeded record still carrying our token was written by us.
                try:
                    now = yield Get(call.namespace, call.key)
                except StoreError:
                    now = None
                if now is not None and now.token == rec.token and now.state == SUCCEEDED:
                    return
            raise LeaseLost(call.namespace, call.key, rec.token, result=value)
        return


def run_sync(
    gen: Generator[Op, Any, Outcome],
    store: Store,
    execute: Callable[[CallContext], Ran],
    reconcile: Callable[[CallContext], Any],
) -> Outcome:
    """Drive :func:`flow` synchronously."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = gen.throw(error) if error is not None else gen.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = None
        send = None
        try:
            if isinstance(op, StoreOp):
                send = op.run(store)
            elif type(op) is Sleep:
                time.sleep(op.seconds)
            elif type(op) is Execute:
                send = execute(op.context)
            elif type(op) is Reconcile:
                send = reconcile(op.context)
        except BaseException as err:  # handed to the flow, which re-raises what it can't use
            error = err


async def run_async(
    gen: Generator[Op, Any, Outcome],
    store: Store,
    execute: Callable[[CallContext], Any],
    reconcile: Callable[[CallContext], Any],
) -> Outcome:
    """Drive :func:`flow` on an event loop. A blocking store's primitives run in a
    worker thread, unless the store runs them at once without waiting for a lock
    (:attr:`Store.nowait`, :meth:`Store.run_nowait`: SQLite WAL NORMAL)."""
    import asyncio
    import inspect

    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = gen.throw(error) if error is not None else gen.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = None
        send = None
        try:
            if isinstance(op, StoreOp):
                send = await run_op(op, store)
            elif type(op) is Sleep:
                await asyncio.sleep(op.seconds)
            elif type(op) is Execute:
                send = await execute(op.context)
            elif type(op) is Reconcile:
                send = reconcile(op.context)
                if inspect.isawaitable(send):
                    send = await send
        except BaseException as err:
            error = err


async def run_op(op: StoreOp, store: Store) -> Any:
    """One primitive from a coroutine, where :func:`run_async` runs each: inline for a
    store that never blocks, on the loop when the store runs it at once without waiting
    for a lock (:attr:`Store.nowait`, :meth:`Store.run_nowait`: SQLite WAL NORMAL), else
    in a worker thread."""
    if not store.blocking or (type(op) is Heartbeat and op.lease < 0):
        # Releasing a lease runs inline: it must happen even when the task has just
        # been cancelled, and awaiting again could be cancelled too.
        return op.run(store)
    if store.nowait and not (type(op) is Finish and op.via is not None):
        # On the loop unless it would wait for a lock (SQLite WAL NORMAL): a
        # worker-thread hop costs about as much as the write itself.
        try:
            return store.run_nowait(op.run)
        except WouldBlock:  # nothing was written: run it where it may wait
            pass
    return await _in_thread(op, store)


async def _in_thread(op: StoreOp, store: Store) -> Any:
    """``op.run(store)`` in a worker thread, shielded from cancellation."""
    import asyncio

    task = asyncio.ensure_future(asyncio.to_thread(op.run, store))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # Cancelled while a claim was in flight in its thread: wait for it, and if it
        # made us the owner, give the key back before leaving.
        with contextlib.suppress(BaseException):
            claimed = await task
            if isinstance(claimed, Record) and claimed.mine:
                store.heartbeat(claimed.namespace, claimed.key, claimed.token, -1.0)
        raise
