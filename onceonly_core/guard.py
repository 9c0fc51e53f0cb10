"""The facade: ``guard(fn, *args, **kwargs)``, ``@guard.once``, ``guard.wrap_tools`` and friends.

There is one call path, :meth:`Guard.run_call` (and its async twin): a tool *name*, the
call's arguments as a *mapping* and a thunk that runs it. The key comes from the scope,
the name and the canonical arguments; no Python signature is involved. Every other way in
binds its arguments to a mapping first (``guard(fn, ...)``, ``@guard.once``,
``wrap_tools``, ``call_tool``) and then takes the same path: options resolved
(:meth:`Guard._spec`), the call prepared (:meth:`Guard._prepare`), governed
(:meth:`Guard._governed`) and run on the one copy of the protocol in
:mod:`onceonly_core.protocol` (:meth:`Guard._execute`), driven synchronously or on the
event loop. Outcomes are classified once for adapters in :mod:`onceonly_core.contract`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import types
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from . import fingerprint as fp
from .codec import ResultCodec, default_codec
from .contract import classify, is_interrupt
from .errors import ConfigError, OnceOnlyError
from .keyhealth import KeyHealth
from .limits import check_text
from .protocol import (
    BLOCKED,
    Call,
    CallContext,
    Get,
    Options,
    Outcome,
    Ran,
    decide,
    flow,
    replay_of,
    replayed,
    run_async,
    run_op,
    run_sync,
    safe_str,
)
from .stores import Record, Store, check_url, open_store
from .stores.base import MAX_LABEL, NewClaim, check_labels

if TYPE_CHECKING:
    from .contract import Classification
    from .governance.engine import Governance, Inner, Request
    from .governance.models import ToolResult

__all__ = [
    "BLOCKED",
    "GLOBAL",
    "Guard",
    "Stats",
    "current_call",
    "current_run_id",
    "guard",
]

log = logging.getLogger("onceonly")
# The audited arguments' JSON (json.dumps(..., sort_keys=True)), built once: json.dumps
# with any non-default option builds a new JSONEncoder per call.
_SORTED_JSON = json.JSONEncoder(sort_keys=True)

F = TypeVar("F", bound=Callable[..., Any])

_Var = contextvars.ContextVar
_workflow: _Var[str | None] = _Var("onceonly_workflow", default=None)
_caller: _Var[str | None] = _Var("onceonly_caller", default=None)
_run_id: _Var[str | None] = _Var("onceonly_run", default=None)
_agent: _Var[str | None] = _Var("onceonly_agent", default=None)
_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "onceonly_call", default=None
)

_OPTION_NAMES = frozenset(f.name for f in fields(Options))
# Exact builtin types that can never be awaitable: skips isawaitable()'s ABC check.
_NEVER_AWAITABLE = frozenset({type(None), bool, int, float, str, bytes, dict, list, tuple})


def current_call() -> CallContext | None:
    """The context of the guarded call running in this thread/task, or None."""
    return _current.get()


def current_run_id() -> str | None:
    """The run id set by ``with guard.run(...)`` in this thread/task, or None."""
    return _run_id.get()


_T = TypeVar("_T")


class CallObserver(Protocol):
    """Wraps each call the guard makes: a ledger ``Call`` or a governance ``Request``,
    and a function doing it. :func:`onceonly_core.telemetry.instrument` installs one
    (``telemetry.Observer``); it is defined here and implemented above, so the guard never
    imports telemetry."""

    @property
    def logs(self) -> bool:
        """True when the observer writes the per-call decision records itself."""

    def run(self, subject: Call | Request, fn: Callable[..., _T], *args: Any) -> _T: ...

    async def arun(
        self, subject: Call | Request, fn: Callable[..., Awaitable[_T]], *args: Any
    ) -> _T: ...


@dataclass(slots=True)
class Stats:
    """Decisions this Guard made in this process (the ledger has the durable view)."""

    attempts: int = 0
    executed: int = 0
    replayed: int = 0
    blocked: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_CONTROL = re.compile(r"[\x00-\x1f]")


def _label(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_LABEL:
        raise ConfigError(f"{what} must be a non-empty string of at most {MAX_LABEL} characters")
    if _CONTROL.search(value) is not None:
        raise ConfigError(f"{what} must not contain control characters: {value!r}")
    check_text(value, what)  # lone surrogates: no backend can store them
    return value


class _Heartbeats:
    """One daemon thread per Guard extends the leases of long calls.

    A call registers when it starts executing; the thread extends its lease every
    ``lease / 3`` seconds with a fenced UPDATE. Calls shorter than that never cost a
    write. A stopped process (crash, SIGSTOP) stops heartbeating, so its lease expires.
    """

    def __init__(self, guard: Guard) -> None:
        self._guard = weakref.ref(guard)
        self._active: dict[int, list[Any]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._ids = iter(range(1, sys.maxsize))
        # When the loop's current wait ends (monotonic); inf while it is not waiting.
        # add() wakes the loop only if a new call falls due before then: waking a
        # thread on every call costs the caller a GIL handoff (tens of microseconds).
        self._sleep_until = 0.0

    def add(
        self,
        store: Store,
        ns: str,
        key: str,
        token: int,
        lease: float,
        extra: Callable[[], Any] | None = None,
    ) -> int:
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._loop, name="onceonly-heartbeat", daemon=True
                )
                self._thread.start()
            hid = next(self._ids)
            due = time.monotonic() + lease / 3
            self._active[hid] = [store, ns, key, token, lease, due, extra]
            wake = due < self._sleep_until
        if wake:
            self._wake.set()  # the loop would sleep past this call's first due time
        return hid

    def remove(self, hid: int) -> None:
        with self._lock:
            self._active.pop(hid, None)

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._sleep_until = math.inf  # busy: a call added meanwhile wakes the wait
                due = [(hid, e) for hid, e in self._active.items() if e[5] <= time.monotonic()]
            for hid, (store, ns, key, token, lease, _, extra) in due:
                try:
                    ok = store.heartbeat(ns, key, token, lease)
                    if ok and extra is not None:
                        extra()  # e.g. a budget reservation lives as long as the claim
                except OnceOnlyError as err:
                    log.warning("heartbeat for %s failed: %s", key, err)
                    ok = True  # transient; the fenced completion is the real check
                with self._lock:
                    entry = self._active.get(hid)
                    if entry is not None:
                        entry[5] = time.monotonic() + lease / 3
                if not ok:
                    log.warning("lease on %s (token %s) was taken over while running", key, token)
            if self._guard() is None:
                return
            with self._lock:  # the same lock as add(): no call can slip past the deadline
                now = time.monotonic()
                nxt = min((e[5] for e in self._active.values()), default=now + 1.0)
                timeout = max(0.01, min(1.0, nxt - now))
                self._sleep_until = now + timeout
            self._wake.wait(timeout)
            self._wake.clear()


@dataclass(slots=True)
class _Fn:
    """What a callable tells the call path, read once per callable: its identity, its
    signature (to bind arguments to a mapping) and whether it is async.

    Holds no reference to the callable itself: the cache maps callables to these weakly,
    so a per-request tool (a closure, a partial, a bound method of a per-request object)
    is freed with its request."""

    name: str
    sig: fp.Signature
    is_async: bool


@dataclass(frozen=True, slots=True)
class _Spec:
    """One tool's options: the guard's defaults, the policy for its name and the call's own
    options, merged and checked once (``dataclasses.replace`` costs ~10 us a call)."""

    name: str
    overrides: dict[str, Any]
    opts: Options
    bare: bool  # no ledger claim: read_only or unlimited


class _Global:
    def __repr__(self) -> str:
        return "GLOBAL"


GLOBAL: Any = _Global()
"""``scope=GLOBAL``: deduplicate across every scope on purpose (no workflow), without the
unscoped-call warning."""


class Guard:
    """An exactly-once guard over one ledger.

    ``Guard()`` reads ``ONCEONLY_DB_URL`` (default ``sqlite:///onceonly.db``),
    ``ONCEONLY_NAMESPACE`` (default ``default``) and ``ONCEONLY_QUIET`` at first use,
    not at construction, and creates nothing until then.

    Remote mode: ``Guard("https://onceonly.example", api_key=...)`` (or
    ``ONCEONLY_DB_URL=https://…`` with ``ONCEONLY_API_KEY``) keeps its ledger and
    governance on a ``onceonly serve`` control plane (docs/remote.md).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        store: Store | None = None,
        codec: ResultCodec | None = None,
        quiet: bool | None = None,
        caller: str | None = None,
        agent_id: str | None = None,
        key_health: bool | None = None,
        api_key: str | None = None,
        **defaults: Any,
    ) -> None:
        unknown = set(defaults) - _OPTION_NAMES - {"store_options"}
        if unknown:
            raise ConfigError(f"unknown Guard options: {', '.join(sorted(unknown))}")
        if url is not None:  # fail here, not at the first call, with the URL meant
            check_url(url)
        self._url = url
        self._store_options: dict[str, Any] = defaults.pop("store_options", {}) or {}
        if api_key is not None:  # remote mode: Guard("https://...", api_key=...)
            self._store_options["api_key"] = api_key
        self._namespace = _label(namespace, "namespace")
        self._store = store
        self._quiet = quiet
        self._caller = _label(caller, "caller")
        self._agent_id = _label(agent_id, "agent id")
        if agent_id is not None:
            self._check_governance(store or url or os.environ.get("ONCEONLY_DB_URL"))
        self._gov: Any = None
        self.codec: ResultCodec = codec or default_codec
        self._defaults = Options(**defaults)
        _check_options(self._defaults)
        self._policies: dict[str, dict[str, Any]] = {}
        # Prepared tools, two caches. By callable, *weakly*: a per-request tool (a closure,
        # a partial, a bound method of a per-request object) must die with its request.
        # Bound methods are cached by their function (``obj.m`` is a new object each time).
        self._fns: weakref.WeakKeyDictionary[Any, _Fn] = weakref.WeakKeyDictionary()
        self._methods: weakref.WeakKeyDictionary[Any, _Fn] = weakref.WeakKeyDictionary()
        # By tool name and option values (only values compared by equality: no object is
        # pinned by the cache). Cleared, and _gen bumped, whenever defaults or policies change.
        self._specs: dict[Any, _Spec] = {}
        self._gen = 0
        self._warned_unscoped = False
        self._stats = Stats()
        #: Keys this Guard saw completed, (namespace, key): read before claiming again.
        self._done: dict[tuple[str, str], None] = {}
        self._stats_lock = threading.Lock()
        self._hooks: dict[str, list[Callable[[Outcome], Any]]] = {
            "executed": [],
            "replayed": [],
            "blocked": [],
            "failed": [],
        }
        self._config_lock = threading.Lock()
        self._heartbeats = _Heartbeats(self)
        # Set by onceonly_core.telemetry.instrument(): wraps each call in a span (and a
        # log record). None, the default, costs one attribute read per call.
        self._observer: CallObserver | None = None
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Warns (once) when a tool's arguments never repeat; None: ONCEONLY_KEY_HEALTH at
        # first use (docs/keys.md, "Keys that never repeat").
        self._key_health_on = key_health
        self._key_health = KeyHealth()

    # -- configuration (lazy) -----------------------------------------------------------
    @property
    def store(self) -> Store:
        """The ledger, opened at first use."""
        s = self._store
        if s is None:
            with self._config_lock:
                if self._store is None:
                    url = self._url or os.environ.get("ONCEONLY_DB_URL") or "sqlite:///onceonly.db"
                    self._store = open_store(url, **self._store_options)
                s = self._store
        return s

    @property
    def namespace(self) -> str:
        if self._namespace is None:
            ns = _label(os.environ.get("ONCEONLY_NAMESPACE") or "default", "ONCEONLY_NAMESPACE")
            assert ns is not None
            self._namespace = ns
        return self._namespace

    @property
    def quiet(self) -> bool:
        """No per-call decision records on the ``onceonly`` logger (``quiet=True`` or
        ``ONCEONLY_QUIET=1``). The guard never prints either way; warnings still log."""
        if self._quiet is None:
            self._quiet = os.environ.get("ONCEONLY_QUIET", "").lower() in ("1", "true", "yes")
        return self._quiet

    def configure(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        store: Store | None = None,
        quiet: bool | None = None,
        key_health: bool | None = None,
        **defaults: Any,
    ) -> Guard:
        """Point this guard elsewhere or change defaults (before or between uses)."""
        with self._config_lock:
            if url is not None or store is not None:
                if self._gov is not None:
                    self._gov.close()
                    self._gov = None
                if self._store is not None:
                    self._store.close()
                self._store, self._url = store, url
            if namespace is not None:
                self._namespace = _label(namespace, "namespace")
            if quiet is not None:
                self._quiet = quiet
            if key_health is not None:
                self._key_health_on = key_health
            if defaults:
                unknown = set(defaults) - _OPTION_NAMES
                if unknown:
                    raise ConfigError(f"unknown options: {', '.join(sorted(unknown))}")
                self._defaults = replace(self._defaults, **defaults)
                _check_options(self._defaults)
            self._forget()
        return self

    def _forget(self) -> None:
        """Defaults or policies changed: prepared options are stale (callables are not)."""
        self._specs = {}
        self._gen += 1

    def close(self) -> None:
        if self._gov is not None:
            self._gov.close()
        if self._store is not None:
            self._store.close()

    @property
    def gov(self) -> Governance:
        """Governance over this guard's ledger: policies, kill switch, tools, approvals,
        audit, metrics, timelines (``guard.gov.upsert_policy(...)``)."""
        if self._gov is None:
            from .governance.engine import Governance

            self._check_governance(self._store or self._url or os.environ.get("ONCEONLY_DB_URL"))
            with self._config_lock:
                if self._gov is None:
                    self._gov = Governance(_GovernancePort(self))
        return self._gov  # type: ignore[no-any-return]

    @staticmethod
    def _check_governance(ledger: str | Store | None) -> None:
        from .stores import governance_unsupported

        reason = governance_unsupported(ledger)
        if reason is not None:
            raise ConfigError(reason)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scopes (context-local: safe across threads and asyncio tasks) ------------------
    @contextlib.contextmanager
    def workflow(self, workflow_id: str) -> Iterator[None]:
        """Scope keys to a workflow: records live in namespace ``<namespace>/<workflow>``."""
        token = _workflow.set(_label(workflow_id, "workflow id"))
        try:
            yield
        finally:
            _workflow.reset(token)

    @contextlib.contextmanager
    def as_caller(self, caller: str) -> Iterator[None]:
        """Record who is calling (a worker, a user) on the records claimed inside."""
        token = _caller.set(_label(caller, "caller"))
        try:
            yield
        finally:
            _caller.reset(token)

    @contextlib.contextmanager
    def run(self, run_id: str) -> Iterator[None]:
        """Tag records claimed inside with an agent run id (readable by the tool)."""
        token = _run_id.set(_label(run_id, "run id"))
        try:
            yield
        finally:
            _run_id.reset(token)

    @contextlib.contextmanager
    def agent(self, agent_id: str) -> Iterator[None]:
        """Govern the calls made inside as this agent's (policies, caps, kill switch)."""
        token = _agent.set(_label(agent_id, "agent id"))
        try:
            yield
        finally:
            _agent.reset(token)

    @property
    def agent_id(self) -> str | None:
        """The Guard's default agent id (``Guard(agent_id=...)``), or None."""
        return self._agent_id

    def current_agent(self) -> str | None:
        """The agent governing calls here: ``guard.agent(...)`` scope, else ``agent_id``."""
        return _agent.get() or self._agent_id

    def current_namespace(self) -> str:
        wf = _workflow.get()
        return self.namespace if wf is None else f"{self.namespace}/{wf}"

    # -- policies and hooks -------------------------------------------------------------
    def policy(self, tool: Callable[..., Any] | str, **options: Any) -> None:
        """Per-tool options (by callable or by tool name): ``read_only=``, ``replay=``,
        ``max=``, ``ttl=``, ``lease=``, ``wait=``, ``on_unknown=``, ``cache_errors=``..."""
        unknown = set(options) - _OPTION_NAMES
        if unknown:
            raise ConfigError(f"unknown policy options: {', '.join(sorted(unknown))}")
        _check_options(replace(self._defaults, **options))
        name = tool if isinstance(tool, str) else fp.tool_identity(tool)
        with self._config_lock:
            self._policies[name] = {**self._policies.get(name, {}), **options}
            self._forget()

    def on_success(self, hook: Callable[[Outcome], Any]) -> Callable[[Outcome], Any]:
        self._hooks["executed"].append(hook)
        return hook

    def on_replay(self, hook: Callable[[Outcome], Any]) -> Callable[[Outcome], Any]:
        self._hooks["replayed"].append(hook)
        return hook

    def on_block(self, hook: Callable[[Outcome], Any]) -> Callable[[Outcome], Any]:
        self._hooks["blocked"].append(hook)
        return hook

    def on_failure(self, hook: Callable[[Outcome], Any]) -> Callable[[Outcome], Any]:
        self._hooks["failed"].append(hook)
        return hook

    # -- the one call path ----------------------------------------------------------------
    def run_call(
        self,
        tool: str,
        args: Mapping[str, Any],
        thunk: Callable[[], Any],
        /,
        *,
        scope: str | None = None,
        agent_id: str | None = None,
        spend_usd: float | None = None,
        run_id: str | None = None,
        **options: Any,
    ) -> ToolResult:
        """Run ``thunk()`` at most once per (scope, tool name, canonical ``args``), governed.

        The one call path: every other way in (``call_tool``, ``guard(fn, ...)``,
        ``@guard.once``, ``wrap_tools``, the framework adapters) binds its arguments to a
        mapping and comes here. No Python signature is involved: the key is
        ``sha256(scheme, scope, tool, canonical(args))`` (see docs/keys.md).

        ``args`` are the arguments *as the tool receives them* — for a framework, after
        its schema validation, defaults, ``default_factory`` and coercion — so two calls
        that are equal after validation get one key. ``thunk`` runs the tool with exactly
        those arguments; it is called at most once, only if this call executes.

        ``scope`` is the dedup scope (a conversation, a thread, an order): the same call
        in another scope is another call. ``run_call(..., scope="t-1")`` is
        ``with guard.workflow("t-1"): run_call(...)``: records live in namespace
        ``<namespace>/<scope>`` and the scope is part of the derived key. ``None`` keeps
        the surrounding ``guard.workflow(...)``, if any; without one the call is
        deduplicated forever, across conversations (logged once per Guard as a warning;
        ``scope=GLOBAL`` says you mean it). Read tools: ``read_only=True``.

        Options are those of ``guard.policy`` (``read_only=``, ``key_args=``, ``ttl=``,
        ``replay=``...). Governance applies as in :meth:`call_tool` (agent id, spend,
        run id, approvals, caps, audit). Returns a ToolResult; never raises for the tool's
        own exception or a policy decision, raises our own errors (InProgress,
        UnknownOutcome, StoreError, FingerprintError, ...). For one classified answer
        per outcome, use :meth:`run_call_classified`.
        """
        spec, bound, by_name = self._named(tool, args, options)
        if _is_async(thunk):
            raise ConfigError(f"{spec.name}: the thunk is async; use `await guard.arun_call(...)`")
        with _Scope(scope):
            agent = self._begin(spec, scope, agent_id, by_name)
            return self._governed(spec, bound, thunk, agent, spend_usd, run_id, by_name)

    async def arun_call(
        self,
        tool: str,
        args: Mapping[str, Any],
        thunk: Callable[[], Any],
        /,
        *,
        scope: str | None = None,
        agent_id: str | None = None,
        spend_usd: float | None = None,
        run_id: str | None = None,
        **options: Any,
    ) -> ToolResult:
        """:meth:`run_call` for async code.

        An async ``thunk`` (``async def``, a ``functools.partial`` of one, or an object
        with an ``async def __call__``) is awaited in this task. A sync thunk runs in a
        worker thread, never on the event loop; if it returns an awaitable (a lambda
        around a coroutine function), that is awaited too.
        """
        spec, bound, by_name = self._named(tool, args, options)
        with _Scope(scope):
            agent = self._begin(spec, scope, agent_id, by_name)
            return await self._agoverned(
                spec, bound, thunk, _is_async(thunk), agent, spend_usd, run_id, by_name
            )

    def run_call_classified(
        self,
        tool: str,
        args: Mapping[str, Any],
        thunk: Callable[[], Any],
        /,
        *,
        scope: str | None = None,
        agent_id: str | None = None,
        spend_usd: float | None = None,
        run_id: str | None = None,
        **options: Any,
    ) -> Classification:
        """:meth:`run_call`, answered as one :class:`~onceonly_core.contract.Classification`.

        What adapters call. Every outcome — executed, replayed, blocked, pending approval,
        in progress, unknown outcome, the tool's failure, our own error, invalid arguments
        — comes back as a Classification (stable ``code``, structured fields, ``text``
        for the model); nothing raises, except an interruption (cancellation,
        KeyboardInterrupt, a framework's interrupt such as LangGraph's ``GraphInterrupt``),
        which is re-raised unchanged: it is control flow, not an outcome.
        """
        try:
            res = self.run_call(
                tool,
                args,
                thunk,
                scope=scope,
                agent_id=agent_id,
                spend_usd=spend_usd,
                run_id=run_id,
                **options,
            )
        except BaseException as err:
            return _answer(classify(err, tool=tool), err)
        return _answer(classify(res), None)

    async def arun_call_classified(
        self,
        tool: str,
        args: Mapping[str, Any],
        thunk: Callable[[], Any],
        /,
        *,
        scope: str | None = None,
        agent_id: str | None = None,
        spend_usd: float | None = None,
        run_id: str | None = None,
        **options: Any,
    ) -> Classification:
        """:meth:`run_call_classified` for async code (see :meth:`arun_call`)."""
        try:
            res = await self.arun_call(
                tool,
                args,
                thunk,
                scope=scope,
                agent_id=agent_id,
                spend_usd=spend_usd,
                run_id=run_id,
                **options,
            )
        except BaseException as err:
            return _answer(classify(err, tool=tool), err)
        return _answer(classify(res), None)

    def _named(
        self, tool: str, args: Mapping[str, Any], options: dict[str, Any]
    ) -> tuple[_Spec, dict[str, Any], bool]:
        """A call by name: its options, its arguments (checked, copied), by registry name?"""
        by_name = bool(options.pop("_by_name", False))
        spec = self._spec(_label(tool, "tool name") or "", options)
        return spec, _mapping(spec.name, args), by_name

    def _begin(self, spec: _Spec, scope: Any, agent_id: str | None, by_name: bool) -> str | None:
        """Inside the call's scope: the governing agent, and the unscoped-call warning."""
        self._check_scope(spec, scope, by_name)
        return agent_id or _agent.get() or self._agent_id

    def _check_scope(self, spec: _Spec, scope: Any, by_name: bool) -> None:
        """Warn once per Guard when a call that is deduplicated runs without a scope."""
        if (
            self._warned_unscoped
            or scope is GLOBAL
            or by_name  # a registered tool run by name (gov.run_tool, the /v1 API): tenant-wide
            or spec.bare
            or spec.opts.key is not None  # the caller chose the key: its scope is theirs
            or _workflow.get() is not None
        ):
            return
        with self._config_lock:  # once, even when two threads get here together
            if self._warned_unscoped:
                return
            self._warned_unscoped = True
        log.warning(
            "onceonly: tool %r ran without a scope, so its calls are deduplicated forever, "
            "across conversations: pass scope= (a conversation or thread id) or use "
            "guard.workflow(...); mark read tools read_only=True; scope=GLOBAL means it "
            "(this warning is given once per Guard)",
            spec.name,
        )

    # -- calling ------------------------------------------------------------------------
    def __call__(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` at most once per key; replay its result after.

        Every keyword goes to ``fn`` (a tool may take a parameter called ``key``); set
        options with ``guard.using(key=...)(fn, ...)`` or ``@guard.once(...)``.
        For an ``async def`` tool this returns an awaitable.
        """
        fn, info, overrides = self._resolve(fn, {})
        return self._invoke(fn, info, self._spec_for(info, overrides), args, kwargs, False)

    def using(self, **options: Any) -> Callable[..., Any]:
        """Options for one call: ``guard.using(key="order-42")(charge, "c1", 500)``."""
        unknown = set(options) - _OPTION_NAMES
        if unknown:
            raise ConfigError(f"unknown options: {', '.join(sorted(unknown))}")

        def call(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
            fn, info, overrides = self._resolve(fn, options)
            return self._invoke(fn, info, self._spec_for(info, overrides), args, kwargs, False)

        return call

    @overload
    def once(self, fn: F, /) -> F: ...

    @overload
    def once(self, fn: None = None, /, **options: Any) -> Callable[[F], F]: ...

    def once(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Decorator: ``@guard.once`` or ``@guard.once(key_args=["order_id"], ttl=3600)``."""
        unknown = set(options) - _OPTION_NAMES
        if unknown:
            raise ConfigError(f"unknown options: {', '.join(sorted(unknown))}")

        def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
            target, info, overrides = self._resolve(f, options)
            # The decorated function's options, prepared once and again only after
            # guard.configure()/policy() (a generation bump): one (gen, spec) pair, swapped
            # whole so concurrent callers never see a half-updated one.
            cell = [(self._gen, self._spec_for(info, overrides))]

            def spec() -> _Spec:
                gen, s = cell[0]
                if gen != self._gen:
                    gen = self._gen
                    s = self._spec_for(info, overrides)
                    cell[0] = (gen, s)
                return s

            if info.is_async:

                @functools.wraps(f)
                async def awrapper(*args: Any, **kwargs: Any) -> Any:
                    return await self._invoke(target, info, spec(), args, kwargs, False)

                awrapper.__onceonly_tool__ = spec().name  # type: ignore[attr-defined]
                awrapper.__onceonly_guard__ = (self, options)  # type: ignore[attr-defined]
                return awrapper

            @functools.wraps(f)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return self._invoke(target, info, spec(), args, kwargs, False)

            wrapper.__onceonly_tool__ = spec().name  # type: ignore[attr-defined]
            wrapper.__onceonly_guard__ = (self, options)  # type: ignore[attr-defined]
            return wrapper

        return wrap if fn is None else wrap(fn)

    def wrap_tools(self, tools: Any, *, blocked_return: Any = BLOCKED, **options: Any) -> Any:
        """Guard every callable in a dict (same keys) or a list (same order).

        With ``blocked_return=X``, a duplicate returns ``X`` instead of replaying the
        stored result.
        """
        if blocked_return is not BLOCKED:
            options = {"replay": False, "blocked_return": blocked_return, **options}
        if isinstance(tools, Mapping):
            return type(tools)({k: self.once(**options)(v) for k, v in tools.items()})  # type: ignore[call-arg]
        if isinstance(tools, (list, tuple)):
            return type(tools)(self.once(**options)(v) for v in tools)
        raise ConfigError(f"wrap_tools takes a dict or a list of callables, not {type(tools)!r}")

    def force(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run again even if the key already ran; fences out any current owner."""
        fn, info, overrides = self._resolve(fn, {})
        return self._invoke(fn, info, self._spec_for(info, overrides), args, kwargs, True)

    def retry(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> bool:
        """Clear the record of this call so the next call runs again.

        Returns False if there was nothing to clear. Raises InProgress if the call is
        running with a live lease (clearing it would allow a concurrent second run).
        """
        ns, key = self._key_of(fn, args, kwargs)
        return self.clear(key, namespace=ns)

    def clear(self, key: str, *, namespace: str | None = None) -> bool:
        """Clear one record by key (what ``onceonly retry`` does)."""
        from .errors import InProgress

        ns = namespace or self.current_namespace()
        done = self.store.clear(ns, key)
        if done is False:
            rec = self.store.get(ns, key)
            raise InProgress(ns, key, rec.owner if rec else None)
        if done is None:  # a typo'd key or namespace must not pass as "cleared"
            log.warning("clear: no record with key %r in namespace %r; nothing cleared", key, ns)
        return bool(done)

    def key_for(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> str:
        """The key a call would use (for logs, ``onceonly retry --key``)."""
        return self._key_of(fn, args, kwargs)[1]

    def key_for_call(
        self,
        tool: str,
        args: Mapping[str, Any],
        *,
        scope: str | None = None,
        **options: Any,
    ) -> str:
        """The key :meth:`run_call` would use for these arguments (nothing runs)."""
        spec, bound, _ = self._named(tool, args, options)
        with _Scope(scope):
            return self._key(spec, bound)[1]

    def _key_of(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str, str]:
        fn, info, overrides = self._resolve(fn, {})
        spec = self._spec_for(info, overrides)
        ns, key, _, _ = self._key(spec, self._bind(info, spec.name, args, kwargs))
        return ns, key

    # -- reading ------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """This process's decisions: attempts, executed, replayed, blocked, failed."""
        with self._stats_lock:
            return self._stats.as_dict()

    def history(
        self,
        tool: Callable[..., Any] | str | None = None,
        *,
        limit: int = 50,
        all_namespaces: bool = False,
    ) -> list[Record]:
        """Recent records of this namespace (and its workflows), newest first."""
        name = None if tool is None else tool if isinstance(tool, str) else fp.tool_identity(tool)
        ns = None if all_namespaces else self.namespace
        return self.store.list(namespace=ns, prefix=True, tool=name, limit=limit)

    def log(self, limit: int = 20, file: Any = None) -> None:
        """Write recent records (state, tool, key, attempts) to ``file`` (default stdout).

        An explicit request for output; the guard itself never prints (decisions go to
        the ``onceonly`` logger)."""
        out = file or sys.stdout
        for r in self.history(limit=limit):
            stamp = time.strftime("%H:%M:%S", time.localtime(r.updated_at))
            out.write(
                f"{stamp}  {r.state:<9}  {r.tool}  key={r.key[:16]}  token={r.token} "
                f"runs={r.executions}\n"
            )

    def check(self) -> bool:
        """Self-test: exactly-once, replay and fencing on a scratch in-memory ledger,
        then a round trip on this guard's own ledger. Raises on any failure."""
        from .stores.memory import MemoryStore

        clock = [1000.0]
        scratch = Guard(store=MemoryStore(clock=lambda: clock[0]), quiet=True, lease=5.0)
        calls: list[int] = []

        def tool(x: int) -> int:
            calls.append(x)
            return x * 2

        if [scratch(tool, 21), scratch(tool, 21), scratch(tool, 22)] != [42, 42, 44]:
            raise OnceOnlyError("self-test: wrong results")
        if calls != [21, 22]:
            raise OnceOnlyError(f"self-test: executions {calls}")
        store = self.store
        # One fixed record per namespace, reused: a health probe must not grow the ledger.
        ns, key = f"{self.namespace}/_check", "self-test"
        new = NewClaim("onceonly.check", self._owner, 5.0)
        rec = store.claim(ns, key, new)
        if not rec.mine:
            taken = store.take_over(ns, key, rec, new, force=True)
            if taken is None:
                raise OnceOnlyError("self-test: a concurrent check holds the record; retry")
            rec = taken
        if store.claim(ns, key, new).mine:
            raise OnceOnlyError("self-test: the ledger's claim is not exclusive")
        if not store.finish(ns, key, rec.token, ok=True, result="1"):
            raise OnceOnlyError("self-test: the ledger refused the owner's completion")
        if store.finish(ns, key, rec.token, ok=True, result="2"):
            raise OnceOnlyError("self-test: the ledger accepted a second completion")
        return True

    # -- preparing a call ---------------------------------------------------------------
    def _resolve(
        self, fn: Callable[..., Any], overrides: Mapping[str, Any]
    ) -> tuple[Callable[..., Any], _Fn, Mapping[str, Any]]:
        """The callable to run, what it tells us, and the call's options.

        A function this guard already decorated (``@guard.once(...)``) passed to
        guard(), retry(), force(), key_for() or wrap_tools: the original runs with the
        decorator's options, so it is the same call (same key), guarded once."""
        marker = getattr(fn, "__onceonly_guard__", None)
        while marker is not None and marker[0] is self:
            overrides = {**marker[1], **overrides}
            fn = fn.__wrapped__  # type: ignore[attr-defined]
            marker = getattr(fn, "__onceonly_guard__", None)
        return fn, self._fn(fn), overrides

    def _fn(self, fn: Callable[..., Any]) -> _Fn:
        """Identity, signature and async-ness of a callable, cached weakly by callable."""
        method = type(fn) is types.MethodType
        cache: weakref.WeakKeyDictionary[Any, _Fn] | None = self._methods if method else self._fns
        ref: Any = fn.__func__ if method else fn  # type: ignore[attr-defined]
        try:
            info = cache.get(ref)  # type: ignore[union-attr]
        except TypeError:  # unhashable, or no weak reference possible: read it each time
            info, cache = None, None
        if info is not None:
            return info
        if not callable(fn):
            raise ConfigError(f"guard needs a callable, got {type(fn).__name__}")
        info = _Fn(fp.tool_identity(fn), fp.Signature(fn), _is_async(fn))
        if cache is not None:
            with contextlib.suppress(TypeError):
                cache[ref] = info
        return info

    def _spec_for(self, info: _Fn, overrides: Mapping[str, Any]) -> _Spec:
        return self._spec(overrides.get("name") or info.name, overrides)

    def _spec(self, name: str, overrides: Mapping[str, Any]) -> _Spec:
        """The options of one call of tool ``name``: defaults < policy(name) < overrides."""
        cache_key: Any = name
        if overrides:
            parts = []
            for k, v in overrides.items():
                part = _option_key(v)
                if part is None:  # an object compared by identity: not cached (see below)
                    cache_key = None
                    break
                parts.append((k, part))
            else:
                cache_key = (name, tuple(sorted(parts)))
        specs = self._specs
        if cache_key is not None:
            spec = specs.get(cache_key)
            if spec is not None:
                return spec
        unknown = set(overrides) - _OPTION_NAMES
        if unknown:
            raise ConfigError(f"unknown options: {', '.join(sorted(unknown))}")
        check_text(name, "the tool name")  # stored as a name on every backend: no NUL
        merged = {**self._policies.get(name, {}), **overrides}
        for opt in ("key_args", "exclude"):
            if isinstance(merged.get(opt), str):
                merged[opt] = (merged[opt],)
            elif merged.get(opt) is not None:
                merged[opt] = tuple(merged[opt])
        opts = replace(self._defaults, **merged) if merged else self._defaults
        _check_options(opts)
        spec = _Spec(name, merged, opts, bool(opts.unlimited or opts.read_only))
        # Only equal-compared option values are cached: caching an option object (a key=
        # callable, a reconcile callback, a blocked_return) would keep it — and whatever
        # it holds — alive for the life of the Guard. Decorators keep their own spec.
        if cache_key is not None:
            if len(specs) >= 10_000:
                specs.clear()
            specs[cache_key] = spec
        return spec

    def _bind(
        self, info: _Fn, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The call's arguments by parameter name, defaults applied."""
        try:
            return info.sig.bind(args, kwargs)
        except TypeError as err:
            hint = ""
            if set(kwargs) & _OPTION_NAMES:
                hint = (
                    " (guard(fn, ...) passes every keyword to the tool; set options with "
                    "guard.using(key=...)(fn, ...) or @guard.once(...))"
                )
            raise TypeError(f"{name}: {err}{hint}") from None

    def _key(self, spec: _Spec, bound: Mapping[str, Any]) -> tuple[str, str, str | None, Options]:
        opts = spec.opts
        wf = _workflow.get()
        ns = self.namespace if wf is None else f"{self.namespace}/{wf}"  # current_namespace()
        if opts.key is not None:
            key = opts.key if isinstance(opts.key, str) else opts.key(**bound)
            if not isinstance(key, str):
                raise ConfigError(f"key= must give a string, got {type(key).__name__}")
            skip = set(opts.exclude)
            data = {k: v for k, v in bound.items() if k not in skip}
            digest = (
                fp.digest(spec.name, fp.canonical(data, float_digits=opts.float_digits))
                if opts.check_payload
                else None
            )
        else:
            key = fp.derive_key(
                spec.name,
                bound,
                workflow=wf,
                key_args=opts.key_args,
                exclude=opts.exclude,
                float_digits=opts.float_digits,
            )
            digest = None
        check_labels(ns, key)
        return ns, key, digest, opts

    def _prepare(self, spec: _Spec, bound: Mapping[str, Any], force: bool) -> Call:
        ns, key, digest, opts = self._key(spec, bound)
        new = NewClaim(
            spec.name,
            self._owner,
            opts.lease,
            digest,
            _run_id.get(),
            _caller.get() or self._caller,
            # Keys seen done are read first (_reads_first); the rest are new here.
            self.store.read_before_claim and (ns, key) not in self._done,
        )
        return Call(ns, key, spec.name, digest, opts, new, self.codec, force)

    # -- the facade's calls (value or exception, as the function itself would) ------------
    def _invoke(
        self,
        fn: Callable[..., Any],
        info: _Fn,
        spec: _Spec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        force: bool,
    ) -> Any:
        if info.is_async:
            return self._ainvoke(fn, info, spec, args, kwargs, force)
        agent = _agent.get() or self._agent_id
        if agent is not None and not force:
            bound = self._bind(info, spec.name, args, kwargs)
            thunk = functools.partial(fn, *args, **kwargs)
            return _unwrap(self._governed(spec, bound, thunk, agent, None, None, False))
        if spec.bare and not force:
            self._count("attempts")
            return fn(*args, **kwargs)
        bound = self._bind(info, spec.name, args, kwargs)
        call = self._prepare(spec, bound, force)
        if _reentrant(call):
            return fn(*args, **kwargs)
        done = self._replayed(call)
        if done is None:
            done = self._execute(call, functools.partial(fn, *args, **kwargs), bound)
        return self._after(done)

    async def _ainvoke(
        self,
        fn: Callable[..., Any],
        info: _Fn,
        spec: _Spec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        force: bool,
    ) -> Any:
        agent = _agent.get() or self._agent_id
        if agent is not None and not force:
            bound = self._bind(info, spec.name, args, kwargs)
            thunk = functools.partial(fn, *args, **kwargs)
            res = await self._agoverned(spec, bound, thunk, True, agent, None, None, False)
            return _unwrap(res)
        if spec.bare and not force:
            self._count("attempts")
            return await fn(*args, **kwargs)
        bound = self._bind(info, spec.name, args, kwargs)
        call = self._prepare(spec, bound, force)
        if _reentrant(call):
            return await fn(*args, **kwargs)
        thunk = functools.partial(fn, *args, **kwargs)
        return self._after(await self._aexecute(call, thunk, True, bound))

    # -- claim → execute → fenced completion, on the flow of protocol.py -------------------
    def _replayed(self, call: Call) -> Outcome | None:
        """The replay hot path (:func:`protocol.replayed`): the claim, and the replay
        when that is the decision, before any thunk, closure or generator is built.
        None: the flow goes on from ``call.claimed``. With an observer (telemetry) the
        whole call goes through the flow, inside its span."""
        if call.claimed is not None or self._observer is not None:
            return None
        store = self.store
        try:
            if not store.read_before_claim:
                return replayed(call, store)
            first = self._reads_first(call)
            out = replayed(call, store, first)
            if out is not None and not first:  # a key read first is remembered already
                self._remember(out)
            return out
        except BaseException as err:
            self._after_error(call, err)
            raise

    def _reads_first(self, call: Call) -> bool:
        """A key this Guard has seen done (executed or replayed), on a store whose claim
        costs more than a read, is read before it is claimed: a retry's replay is then one
        read (see Store.read_before_claim). Forced calls always claim. (``first_sight``
        is :meth:`_prepare`'s lookup of the key among those seen done.)"""
        return self.store.read_before_claim and not call.force and not call.new.first_sight

    def _saw_done(self, outcome: Outcome) -> Outcome:
        """Remember a completed key for :meth:`_replayed`'s read-first (stores that
        ``read_before_claim``: the SQL ones)."""
        if (
            outcome.decision in ("executed", "replayed", "reconciled")
            and self.store.read_before_claim
        ):
            self._remember(outcome)
        return outcome

    def _remember(self, outcome: Outcome) -> None:
        done = self._done
        if len(done) >= _DONE_KEYS:
            done.clear()  # bounded: forgotten together; their next replays claim first
        done[(outcome.namespace, outcome.key)] = None

    def _execute(
        self,
        call: Call,
        thunk: Callable[[], Any],
        bound: Mapping[str, Any],
        extra: Callable[[], Any] | None = None,
        seen: list[BaseException] | None = None,
    ) -> Outcome:
        """Claim → execute → fenced completion. The tool's own exception propagates
        (and is appended to ``seen``, so a caller can tell it from our errors)."""
        done = self._replayed(call)
        if done is not None:
            return done
        store = self.store

        def execute(ctx: CallContext) -> Ran:
            self._observe_key(call, ctx, bound)
            hid = self._heartbeats.add(
                store, ctx.namespace, ctx.key, ctx.token, call.opts.lease, extra
            )
            token = _current.set(ctx)
            try:
                value = thunk()
            except BaseException as err:
                if seen is not None:
                    seen.append(err)
                return Ran(False, error=err)
            finally:
                _current.reset(token)
                self._heartbeats.remove(hid)
            if type(value) not in _NEVER_AWAITABLE and inspect.isawaitable(value):
                if inspect.iscoroutine(value):
                    value.close()
                return Ran(
                    False,
                    error=TypeError(
                        f"{call.tool} returned an awaitable; guard async tools with "
                        "`await guard(fn, ...)` or `await guard.arun_call(...)`"
                    ),
                )
            return Ran(True, value)

        def reconcile(ctx: CallContext) -> Any:
            assert callable(call.opts.on_unknown)
            return call.opts.on_unknown(ctx)

        try:
            obs = self._observer
            if obs is not None:
                return self._saw_done(
                    obs.run(call, run_sync, flow(call), store, execute, reconcile)
                )
            return self._saw_done(run_sync(flow(call), store, execute, reconcile))
        except BaseException as err:
            self._after_error(call, err)
            raise

    async def _aexecute(
        self,
        call: Call,
        thunk: Callable[[], Any],
        is_async: bool,
        bound: Mapping[str, Any],
        extra: Callable[[], Any] | None = None,
        seen: list[BaseException] | None = None,
    ) -> Outcome:
        store = self.store

        async def execute(ctx: CallContext) -> Ran:
            self._observe_key(call, ctx, bound)
            hid = self._heartbeats.add(
                store, ctx.namespace, ctx.key, ctx.token, call.opts.lease, extra
            )
            token = _current.set(ctx)
            try:
                value = await _acall(thunk, is_async, ctx)
            except BaseException as err:
                if seen is not None:
                    seen.append(err)
                return Ran(False, error=err)
            finally:
                _current.reset(token)
                self._heartbeats.remove(hid)
            return Ran(True, value)

        def reconcile(ctx: CallContext) -> Any:
            assert callable(call.opts.on_unknown)
            return call.opts.on_unknown(ctx)

        try:
            obs = self._observer
            if obs is not None:
                return self._saw_done(
                    await obs.arun(call, run_async, flow(call), store, execute, reconcile)
                )
            if call.claimed is None and self._reads_first(call):
                # The read where the flow runs every primitive (protocol.run_op: on the
                # loop on SQLite WAL NORMAL, else in a worker thread).
                out = replay_of(call, await run_op(Get(call.namespace, call.key), store))
                if out is not None:
                    return out  # a key read first is remembered already
            return self._saw_done(await run_async(flow(call), store, execute, reconcile))
        except BaseException as err:
            self._after_error(call, err)
            raise

    # -- governed calls (DESIGN §5) -----------------------------------------------------
    def call_tool(
        self,
        fn: Callable[..., Any],
        /,
        args: Mapping[str, Any] | None = None,
        *,
        tool: str | None = None,
        agent_id: str | None = None,
        spend_usd: float | None = None,
        run_id: str | None = None,
        scope: str | None = None,
        **options: Any,
    ) -> ToolResult:
        """Run ``fn(**args)`` governed and at most once per key; return a ToolResult.

        :meth:`run_call` for a Python callable: ``args`` are bound to ``fn``'s signature
        (defaults applied) to make the key, and ``fn(**args)`` is the thunk.
        Never raises for the tool's own exception or a policy decision (``decision`` says
        what happened); our infrastructure errors (StoreError, ...) do raise. Governance
        applies when an agent id is given, set by ``guard.agent(...)`` or on the Guard.
        """
        fn, info, spec, kwargs, by_name = self._callable(fn, args, tool, options)
        if info.is_async:
            raise ConfigError(f"{spec.name} is async: use `await guard.acall_tool(...)`")
        with _Scope(scope):
            agent = self._begin(spec, scope, agent_id, by_name)
            bound = self._bind_for(info, spec, kwargs, agent)
            thunk = functools.partial(fn, **kwargs)
            return self._governed(spec, bound, thunk, agent, spend_usd, run_id, by_name)

    async def acall_tool(
        self,
        fn: Callable[..., Any],
        /,
        args: Mapping[str, Any] | None = None,
        *,
        tool: str | None = None,
        agent_id: str | None = None,
        spend_usd: float | None = None,
        run_id: str | None = None,
        scope: str | None = None,
        **options: Any,
    ) -> ToolResult:
        """:meth:`call_tool` for async code; a sync ``fn`` runs in a worker thread."""
        fn, info, spec, kwargs, by_name = self._callable(fn, args, tool, options)
        with _Scope(scope):
            agent = self._begin(spec, scope, agent_id, by_name)
            bound = self._bind_for(info, spec, kwargs, agent)
            thunk = functools.partial(fn, **kwargs)
            return await self._agoverned(
                spec, bound, thunk, info.is_async, agent, spend_usd, run_id, by_name
            )

    def _callable(
        self,
        fn: Callable[..., Any],
        args: Mapping[str, Any] | None,
        tool: str | None,
        options: dict[str, Any],
    ) -> tuple[Callable[..., Any], _Fn, _Spec, dict[str, Any], bool]:
        """call_tool's call: the callable, what it tells us, its options, its kwargs."""
        by_name = bool(options.pop("_by_name", False))
        fn, info, overrides = self._resolve(fn, {**options, "name": tool} if tool else options)
        return fn, info, self._spec_for(info, overrides), dict(args or {}), by_name

    def _bind_for(
        self, info: _Fn, spec: _Spec, kwargs: dict[str, Any], agent: str | None
    ) -> dict[str, Any]:
        """Bound once: the key and the audited arguments come from the same binding. A
        bare (read-only, unlimited) call nobody audits needs none: the tool checks its own."""
        if spec.bare and agent is None:
            return kwargs
        return self._bind(info, spec.name, (), kwargs)

    def _request(
        self,
        spec: _Spec,
        bound: Mapping[str, Any],
        agent: str | None,
        spend_usd: float | None,
        run_id: str | None,
        by_name: bool,
    ) -> tuple[Request, Call | None]:
        if spend_usd is not None:
            from .governance.models import micros

            try:
                micros(spend_usd)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{spec.name}: {err}") from None
        run = _label(run_id, "run id") or _run_id.get()
        _label(agent, "agent id")  # a name on every backend, refused before anything is held
        call = None if spec.bare else self._prepare(spec, bound, False)
        if call is not None and run is not None:
            call.new = replace(call.new, run_id=run)
        redacted = "null"
        if agent is not None:
            # What the tool excluded from its key (injected state, clients, callbacks) is
            # not an argument worth auditing either.
            skip = set(spec.opts.exclude)
            shown = {k: v for k, v in bound.items() if k not in skip}
            redacted = _SORTED_JSON.encode(self.gov.redactor.redact(shown))

        def would_replay(rec: Record) -> bool:
            assert call is not None
            return decide(rec, call.opts, call.digest) in ("replay", "block")

        req: Request = _engine().Request(
            agent_id=agent,
            tool=spec.name,
            namespace=call.namespace if call else self.current_namespace(),
            key=call.key if call else None,
            args_digest=(call.digest or call.key) if call else None,
            args_json=redacted,
            spend_usd=spend_usd,
            run_id=run,
            lease=spec.opts.lease,
            by_name=by_name,
            would_replay=would_replay,
            claim=None if call is None or call.force or _reentrant(call) else call.new,
        )
        return req, call

    def _governed(
        self,
        spec: _Spec,
        bound: Mapping[str, Any],
        thunk: Callable[[], Any],
        agent: str | None,
        spend_usd: float | None,
        run_id: str | None,
        by_name: bool,
    ) -> ToolResult:
        eng = _engine()
        req, call = self._request(spec, bound, agent, spend_usd, run_id, by_name)
        gov = self.gov if (agent is not None or req.run_id) else None
        peek = functools.partial(self._peek, call)

        def inner(op: Inner | None) -> Any:
            seen: list[BaseException] = []
            try:
                if call is None or _reentrant(call):
                    return self._unledgered(spec, req, thunk())
                extra = self._joined(op, call, req.agent_id)
                outcome = self._execute(call, thunk, bound, extra, seen)
            except Exception as err:
                return _failure(err, call, seen)
            self._after(outcome)
            return ("ok", outcome)

        def drive() -> ToolResult:
            if gov is None:
                return _plain(inner(None), req)
            res: ToolResult = eng.drive_sync(eng.governed(gov, req), gov, peek, inner)
            return res

        obs = self._observer
        return drive() if obs is None else obs.run(req, drive)

    async def _agoverned(
        self,
        spec: _Spec,
        bound: Mapping[str, Any],
        thunk: Callable[[], Any],
        is_async: bool,
        agent: str | None,
        spend_usd: float | None,
        run_id: str | None,
        by_name: bool,
    ) -> ToolResult:
        eng = _engine()
        req, call = self._request(spec, bound, agent, spend_usd, run_id, by_name)
        gov = self.gov if (agent is not None or req.run_id) else None
        peek = functools.partial(self._peek, call)

        async def inner(op: Inner | None) -> Any:
            seen: list[BaseException] = []
            try:
                if call is None or _reentrant(call):
                    return self._unledgered(spec, req, await _acall(thunk, is_async, None))
                extra = self._joined(op, call, req.agent_id)
                outcome = await self._aexecute(call, thunk, is_async, bound, extra, seen)
            except Exception as err:
                return _failure(err, call, seen)
            self._after(outcome)
            return ("ok", outcome)

        async def drive() -> ToolResult:
            if gov is None:
                return _plain(await inner(None), req)
            res: ToolResult = await eng.drive_async(eng.governed(gov, req), gov, peek, inner)
            return res

        obs = self._observer
        return await (drive() if obs is None else obs.arun(req, drive))

    def _observe_key(
        self,
        call: Call,
        ctx: CallContext,
        args: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    ) -> None:
        """A claim was won and the tool is about to run: let the key-health check look
        at the arguments (by name, or a callable binding them only if looked at).

        Only a first attempt is a new key (a take-over re-runs a key that repeated), and
        a forced run bypasses the key. Cheap: sampled, never raises.
        """
        on = self._key_health_on
        if on is None:
            flag = os.environ.get("ONCEONLY_KEY_HEALTH", "1").strip().lower()
            on = self._key_health_on = flag not in ("0", "false", "no", "off")
        if on and ctx.attempt == 1 and not call.force:
            opts = call.opts
            self._key_health.observe(
                call.tool,
                call.namespace,
                args,
                key_args=opts.key_args,
                exclude=opts.exclude,
                explicit_key=opts.key is not None,
                unlimited=opts.unlimited or opts.read_only,
            )

    # -- the pieces both governed shells share ---------------------------------------------
    def _peek(self, call: Call | None) -> Record | None:
        """The ledger record of this call, if any (is it a replay? then it costs nothing)."""
        return None if call is None else self.store.get(call.namespace, call.key)

    def _joined(self, op: Inner | None, call: Call, agent: str | None) -> Callable[[], Any] | None:
        """Hand the flow what the governed call's transactions did for it (the claim
        begin_claim made, the completion that settles the hold); the hold's extender."""
        if op is None:
            return None
        call.claimed, call.complete = op.claimed, op.complete
        return self._extender(op.reservation, call, agent)

    def _extender(self, rid: str | None, call: Call, agent: str | None) -> Callable[[], Any] | None:
        """A heartbeat add-on that keeps a budget hold alive as long as the claim (found
        by its key: the tenant, the agent that reserved it, its id)."""
        if rid is None or agent is None:
            return None
        gov = self.gov
        return functools.partial(gov.store.extend_hold, gov.tenant, agent, rid, call.opts.lease)

    def _unledgered(self, spec: _Spec, req: Request, value: Any) -> tuple[str, Outcome]:
        """A read-only, unlimited or re-entrant call ran without a claim of its own."""
        self._count("attempts", "executed")
        return ("ok", Outcome("executed", spec.name, req.namespace, "", value))

    def _not_found(
        self, tool: str, agent_id: str, args: Mapping[str, Any] | None, run_id: str | None
    ) -> ToolResult:
        """run_tool of a name nobody registered: blocked, audited, on the timeline."""
        from .governance.engine import Request, drive_sync, governed

        req = Request(
            agent_id=agent_id,
            tool=tool,
            namespace=self.current_namespace(),
            key=None,
            args_digest=None,
            args_json=_SORTED_JSON.encode(self.gov.redactor.redact(dict(args or {}))),
            spend_usd=None,
            run_id=_label(run_id, "run id") or _run_id.get(),
            lease=self._defaults.lease,
            by_name=True,
            would_replay=lambda rec: False,
        )

        def never(_: Any) -> Any:
            raise AssertionError("a tool that was not found never runs")

        obs = self._observer
        if obs is not None:
            return obs.run(req, drive_sync, governed(self.gov, req), self.gov, lambda: None, never)
        return drive_sync(governed(self.gov, req), self.gov, lambda: None, never)

    def _count(self, *names: str) -> None:
        with self._stats_lock:
            for n in names:
                setattr(self._stats, n, getattr(self._stats, n) + 1)

    def _after(self, outcome: Outcome) -> Any:
        decision = outcome.decision
        kind = "executed" if decision == "reconciled" else decision
        with self._stats_lock:
            stats = self._stats
            stats.attempts += 1
            setattr(stats, kind, getattr(stats, kind) + 1)
        self._emit(kind, outcome)
        return outcome.value  # for "blocked": blocked_return, BLOCKED unless the tool set one

    def _after_error(self, call: Call, err: BaseException) -> None:
        if is_interrupt(err):
            # Control flow (cancellation, a graph's interrupt()), not a failure: no
            # on_failure hook. The flow has already given the key back.
            self._count("attempts")
            return
        self._count("attempts", "failed")
        self._emit("failed", Outcome("failed", call.tool, call.namespace, call.key, error=err))

    def _emit(self, kind: str, outcome: Outcome) -> None:
        # One INFO record per decision on the "onceonly" logger; nothing is formatted
        # unless a handler wants INFO (the library prints nothing: DESIGN §9b). With
        # telemetry's structured records on (instrument()), those say it instead.
        obs = self._observer
        if log.isEnabledFor(logging.INFO) and not self.quiet and (obs is None or not obs.logs):
            err = outcome.error
            extra = f" ({type(err).__name__}: {safe_str(err)})" if err is not None else ""
            log.info(
                "%s %s %s%s",
                _MARKS[kind],
                outcome.tool,
                kind,
                extra,
                extra={"onceonly_decision": kind, "onceonly_key": outcome.key},
            )
        for hook in self._hooks[kind]:
            try:
                hook(outcome)
            except Exception:  # a hook must never turn a done effect into an error
                log.exception("onceonly %s hook %r failed", kind, hook)


#: At most this many completed keys a Guard remembers for reading before claiming
#: (all forgotten at once when full).
_DONE_KEYS = 1024


_MARKS = {"executed": "✓", "replayed": "↺", "blocked": "✗", "failed": "!"}


def _is_async(fn: Any) -> bool:
    """An ``async def`` function, a partial of one, or an object with ``async __call__``."""
    target = fn
    while isinstance(target, functools.partial):
        target = target.func
    if type(target) is types.FunctionType and not target.__dict__:
        # The hot path (an adapter's thunk is a lambda or a partial of a function): what
        # iscoroutinefunction reads, without its layers; a function marked by
        # inspect.markcoroutinefunction has a __dict__ and takes the long way.
        return bool(target.__code__.co_flags & inspect.CO_COROUTINE)
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - async callable objects
    )


async def _acall(thunk: Callable[[], Any], is_async: bool, ctx: CallContext | None) -> Any:
    """Run a thunk from async code: an async one in this task, a sync one in a worker
    thread (never on the event loop), awaiting what it returns if that is awaitable."""
    if is_async:
        return await thunk()
    value = await asyncio.to_thread(thunk if ctx is None else _in_context(thunk, ctx))
    if type(value) not in _NEVER_AWAITABLE and inspect.isawaitable(value):
        value = await value  # a sync lambda around a coroutine function
    return value


def _mapping(tool: str, args: Any) -> dict[str, Any]:
    """run_call's arguments: a mapping of parameter names, copied (the audit and the key
    must not change if the tool mutates what it was given)."""
    if not isinstance(args, Mapping):
        raise ConfigError(f"{tool}: args must be a mapping of argument names, not {type(args)!r}")
    out = dict(args)
    for k in out:
        if type(k) is not str:
            raise ConfigError(f"{tool}: argument names must be strings, got {k!r}")
    return out


class _GovernancePort:
    """The guard as governance sees it (:class:`onceonly_core.governance.engine.Facade`).

    Governance sits below the facade and never imports it: ``Guard.gov`` hands it this,
    so the engine reaches the guard through a typed interface, never its privates."""

    __slots__ = ("_guard",)

    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    @property
    def namespace(self) -> str:
        return self._guard.namespace

    @property
    def given_ledger(self) -> Store | None:
        return self._guard._store

    @property
    def ledger(self) -> Store:
        return self._guard.store

    def current_call(self) -> CallContext | None:
        return _current.get()

    def run_by_name(
        self,
        fn: Callable[..., Any],
        args: Mapping[str, Any] | None,
        *,
        tool: str,
        agent_id: str,
        spend_usd: float | None,
        run_id: str | None,
        **options: Any,
    ) -> ToolResult:
        return self._guard.call_tool(
            fn,
            args,
            tool=tool,
            agent_id=agent_id,
            spend_usd=spend_usd,
            run_id=run_id,
            _by_name=True,
            **options,
        )

    async def arun_by_name(
        self,
        fn: Callable[..., Any],
        args: Mapping[str, Any] | None,
        *,
        tool: str,
        agent_id: str,
        spend_usd: float | None,
        run_id: str | None,
        **options: Any,
    ) -> ToolResult:
        return await self._guard.acall_tool(
            fn,
            args,
            tool=tool,
            agent_id=agent_id,
            spend_usd=spend_usd,
            run_id=run_id,
            _by_name=True,
            **options,
        )

    def not_found(
        self, tool: str, agent_id: str, args: Mapping[str, Any] | None, run_id: str | None
    ) -> ToolResult:
        return self._guard._not_found(tool, agent_id, args, run_id)


class _Scope:
    """A call's explicit scope, for the call only: ``scope="t-1"`` is
    ``guard.workflow("t-1")``, ``GLOBAL`` no workflow, None the surrounding one. A plain
    class, not @contextmanager: it is on every call by name."""

    __slots__ = ("_token",)

    def __init__(self, scope: Any) -> None:
        if scope is None:
            self._token: contextvars.Token[str | None] | None = None
        elif scope is GLOBAL:
            self._token = _workflow.set(None)
        else:
            self._token = _workflow.set(_label(scope, "scope"))

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _workflow.reset(self._token)


def _answer(c: Classification, err: BaseException | None) -> Classification:
    """run_call_classified's last step: an interruption is re-raised, never answered;
    our own errors are logged (an adapter answers the model, the developer sees this)."""
    if c.code == "interrupted":
        raise (err if err is not None else c.exception)  # type: ignore[misc]
    if c.code == "guard_error" and err is not None:
        log.warning("onceonly: %s: %s", c.tool, c.error, exc_info=err)
    return c


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _option_key(value: Any) -> Any:
    """The option cache's key for one option value: equal values share an entry (adapters
    pass a fresh ``key_args`` list or name string on every call); None for anything else,
    which is not cached (an id() would need the object pinned, or be reused once freed)."""
    kind = type(value)
    if kind in _SCALARS:
        return ("v", kind.__name__, value)  # the type too: True == 1 must not share
    if kind in (list, tuple) and all(type(x) is str for x in value):
        return ("seq", tuple(value))
    return None


def _failure(err: Exception, call: Call | None, seen: list[BaseException]) -> tuple[str, Exception]:
    """The tool's own exception is a ``failed`` decision; ours (InProgress, KeyReuseError,
    StoreError, ...) is raised after the governed flow gave its reservation back, and so
    is an interruption (a graph's interrupt() inside the tool): control flow, neither
    audited as a failure nor notified as ``tool_failed``."""
    if is_interrupt(err):
        return ("raise", err)
    if call is None or any(err is e for e in seen):
        return ("error", err)
    return ("raise", err)


def _plain(ran: Any, req: Request) -> ToolResult:
    if ran[0] == "raise":
        raise ran[1]
    base = {"tool": req.tool, "agent_id": None, "run_id": req.run_id}
    res: ToolResult = _engine()._from_run(ran, base, req, "low", 0)
    return res


@functools.cache
def _engine() -> types.ModuleType:
    """The governance engine, imported at its first use (it brings pydantic, which a
    plain ``import onceonly_core`` does not load), then kept: a relative import inside
    a function costs ~1 us on every call."""
    from .governance import engine

    return engine


def _unwrap(res: ToolResult) -> Any:
    """The facade's view of a governed call: the value, the tool's own exception, or
    PolicyBlocked / ApprovalPending."""
    from .errors import ApprovalPending, PolicyBlocked

    if res.decision in ("executed", "dedup"):
        return res.result
    if res.decision == "failed":
        assert res.exception is not None
        raise res.exception
    if res.decision == "pending_approval":
        raise ApprovalPending(res.agent_id or "", res.tool, res.approval_id or "")
    if res.policy_reason == "dedup":  # replay=False: the blocked sentinel, as ungoverned
        return res.result
    raise PolicyBlocked(res.agent_id or "", res.tool, res.policy_reason, res.error or "")


def _in_context(fn: Callable[..., Any], ctx: CallContext) -> Callable[..., Any]:
    """Run ``fn`` in a worker thread with the call context visible (current_call())."""

    def run(*args: Any, **kwargs: Any) -> Any:
        token = _current.set(ctx)
        try:
            return fn(*args, **kwargs)
        finally:
            _current.reset(token)

    return run


def _reentrant(call: Call) -> bool:
    """True inside the execution of this very key (a tool guarded twice, e.g. a
    ``@guard.once`` function passed to ``guard(...)`` or ``wrap_tools``): the outer call
    holds the claim, so the inner one runs the function instead of waiting on itself."""
    cur = _current.get()
    return cur is not None and cur.key == call.key and cur.namespace == call.namespace


def _check_options(o: Options) -> None:
    # Stored as timestamps: a non-finite lease or ttl is not a value every backend holds.
    if not math.isfinite(o.lease) or (o.ttl is not None and not math.isfinite(o.ttl)):
        raise ConfigError(f"lease and ttl must be finite (ttl=None: forever): {o.lease}, {o.ttl}")
    if o.lease <= 0:
        raise ConfigError(f"lease must be > 0 seconds, got {o.lease}")
    if o.wait < 0:
        raise ConfigError(f"wait must be >= 0 seconds, got {o.wait}")
    if o.ttl is not None and o.ttl <= 0:
        raise ConfigError(f"ttl must be > 0 seconds or None, got {o.ttl}")
    if not isinstance(o.max, int) or o.max < 1:
        raise ConfigError(f"max must be an integer >= 1, got {o.max!r}")
    if o.on_unknown not in ("retry", "raise") and not callable(o.on_unknown):
        raise ConfigError("on_unknown must be 'retry', 'raise' or a reconcile callable")
    if o.key is not None and not (isinstance(o.key, str) or callable(o.key)):
        raise ConfigError("key= must be a string or a callable returning one")
    if o.key is not None and o.key_args is not None:
        raise ConfigError("pass key= or key_args=, not both")
    if o.float_digits is not None and not (1 <= o.float_digits <= 17):
        raise ConfigError("float_digits must be between 1 and 17")
    if o.max_result_bytes is not None and not o.max_result_bytes > 0:
        raise ConfigError(f"max_result_bytes must be > 0 or None, got {o.max_result_bytes!r}")


guard = Guard()
"""The default guard: configured from the environment at first use."""
