"""OpenTelemetry spans and metrics, and structured ``logging`` records, for guarded calls.

>>> from onceonly_core import guard
>>> from onceonly_core.telemetry import instrument
>>> inst = instrument(guard)            # global providers; or tracer_provider=/meter_provider=
>>> inst.uninstrument()

``instrument()`` needs the ``otel`` extra (``opentelemetry-api``); nothing else in
``onceonly_core`` imports OpenTelemetry, and an uninstrumented Guard pays an attribute
read per call (``Guard._observer is None``). :func:`instrument_logging` gives the log
records alone, without OpenTelemetry.

What is emitted, per guarded call (``guard(...)``, ``@guard.once``, ``call_tool``,
``gov.run_tool``, sync or async):

* one span ``onceonly.call <tool>`` around the whole call (governance checks, claim,
  execution, completion), current while the tool runs, so the tool's own spans (an
  instrumented HTTP client, say) are its children. Attributes: ``onceonly.tool``,
  ``onceonly.namespace``, ``onceonly.key`` (its first 16 characters), ``onceonly.decision``
  (``executed``/``replayed``/``blocked``/``failed``/``reconciled`` for a plain guarded call;
  ``executed``/``dedup``/``blocked``/``failed``/``pending_approval`` for a governed one),
  ``onceonly.token``, ``onceonly.attempt``, ``onceonly.agent_id``, ``onceonly.run_id``,
  ``onceonly.policy_reason``; on failure an ERROR status and ``error.type``. Exception
  messages are not recorded: they may quote argument values.
* metrics: counter ``onceonly.calls`` {``onceonly.decision``, ``onceonly.tool``}, counter
  ``onceonly.blocked`` {``onceonly.policy_reason``, ``onceonly.tool``} and histogram
  ``onceonly.call.duration`` (seconds) {``onceonly.decision``, ``onceonly.tool``}.
* one record on the ``onceonly`` logger: DEBUG, or INFO for ``blocked``, ``failed`` and
  ``pending_approval``, with ``extra={"onceonly": {...}}`` (the fields above, plus
  ``duration_s``, ``error_type`` and ``trace_id``/``span_id`` when traced). Never an
  argument, a result or an error message.

Telemetry never changes a call: an exception inside it is logged and swallowed.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ConfigError, MissingExtraError
from .protocol import Call, Outcome

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, MeterProvider
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from .governance.engine import Request
    from .guard import Guard

__all__ = [
    "Instrumentation",
    "Observer",
    "instrument",
    "instrument_logging",
    "uninstrument",
]

log = logging.getLogger("onceonly")

T = TypeVar("T")

SPAN_PREFIX = "onceonly.call "
KEY_CHARS = 16
# Seconds: from a replay (well under a millisecond) to a slow tool call.
DURATION_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)
DURATION_BUCKETS += (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_LOUD = frozenset({"blocked", "failed", "pending_approval"})


@dataclass(slots=True, eq=False)
class _Handle:
    """One observed call, from start to end."""

    governed: bool = False
    tool: str = ""
    namespace: str = ""
    key: str | None = None
    agent_id: str | None = None
    run_id: str | None = None
    start: float = 0.0
    token: int = 0
    attempt: int = 0
    parent: _Handle | None = None  # set on the ledger half of a governed call
    merged: bool = False  # a governed call whose ledger half has been folded in
    span: Span | None = None
    ctx: contextvars.Token[Any] | None = None  # the OpenTelemetry context attached
    active: contextvars.Token[_Handle | None] | None = None


# The governed call being observed in this thread/task: its ledger call (same namespace
# and key) is folded into the governed call's span instead of opening a second one.
_active: contextvars.ContextVar[_Handle | None] = contextvars.ContextVar(
    "onceonly_telemetry", default=None
)


@dataclass(slots=True)
class _Instruments:
    calls: Counter
    blocked: Counter
    duration: Histogram


class Observer:
    """What :func:`instrument` installs on a Guard (``guard._observer``): an
    implementation of :class:`onceonly_core.guard.CallObserver`.

    The Guard calls :meth:`run` (or :meth:`arun`) with the call it is about to make — a
    ledger ``Call`` or a governance ``Request`` — and a function doing it.
    """

    def __init__(self, tracer: Tracer | None, instruments: _Instruments | None, logs: bool) -> None:
        self._tracer = tracer
        self._instruments = instruments
        self._logs = logs
        if tracer is not None:
            from opentelemetry import context, trace

            self._attach = context.attach
            self._detach = context.detach
            self._in_context = trace.set_span_in_context
            self._status = trace.Status
            self._error = trace.StatusCode.ERROR

    @property
    def logs(self) -> bool:
        """Whether this observer writes one structured log record per call."""
        return self._logs

    # -- the hook point ------------------------------------------------------------------
    def run(self, subject: Call | Request, fn: Callable[..., T], *args: Any) -> T:
        handle = self._start(subject)
        try:
            result = fn(*args)
        except BaseException as err:
            self._end(handle, None, err)
            raise
        self._end(handle, result, None)
        return result

    async def arun(self, subject: Call | Request, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        handle = self._start(subject)
        try:
            result = await fn(*args)
        except BaseException as err:
            self._end(handle, None, err)
            raise
        self._end(handle, result, None)
        return result

    # -- internals -----------------------------------------------------------------------
    def _start(self, subject: Call | Request) -> _Handle | None:
        try:
            return self._open(subject)
        except Exception:
            log.exception("onceonly telemetry failed to start a span")
            return None

    def _open(self, subject: Call | Request) -> _Handle:
        if isinstance(subject, Call):
            cur = _active.get()
            if (
                cur is not None
                and cur.governed
                and not cur.merged
                and cur.key == subject.key
                and cur.namespace == subject.namespace
            ):
                cur.merged = True  # the governed call's own claim: report it on its span
                return _Handle(parent=cur)
            h = _Handle(
                False, subject.tool, subject.namespace, subject.key, None, subject.new.run_id
            )
        else:
            h = _Handle(
                True, subject.tool, subject.namespace, subject.key, subject.agent_id, subject.run_id
            )
        h.start = time.perf_counter()
        if self._tracer is not None:
            attrs: dict[str, str] = {"onceonly.tool": h.tool, "onceonly.namespace": h.namespace}
            if h.key:
                attrs["onceonly.key"] = h.key[:KEY_CHARS]
            if h.agent_id:
                attrs["onceonly.agent_id"] = h.agent_id
            if h.run_id:
                attrs["onceonly.run_id"] = h.run_id
            span = self._tracer.start_span(SPAN_PREFIX + h.tool, attributes=attrs)
            h.span = span
            h.ctx = self._attach(self._in_context(span))
        h.active = _active.set(h)
        return h

    def _end(self, h: _Handle | None, result: Any, err: BaseException | None) -> None:
        if h is None:
            return
        try:
            if h.parent is not None:  # the ledger half of a governed call
                if isinstance(result, Outcome):
                    h.parent.token, h.parent.attempt = result.token, result.attempt
                return
            self._close(h, result, err)
        except Exception:
            log.exception("onceonly telemetry failed to end a span")
        finally:
            if h.active is not None:
                _active.reset(h.active)
            if h.ctx is not None:
                self._detach(h.ctx)

    def _close(self, h: _Handle, result: Any, err: BaseException | None) -> None:
        elapsed = time.perf_counter() - h.start
        token, attempt, reason, error_type = h.token, h.attempt, None, None
        exc = err
        if err is not None:
            decision = "failed"
        elif isinstance(result, Outcome):
            decision, token, attempt = result.decision, result.token, result.attempt
            if decision == "blocked":
                reason = "dedup"  # replay=False: a duplicate, as governance names it
        else:  # a ToolResult
            decision, reason = result.decision, result.policy_reason
            token = result.token or token
            h.agent_id = result.agent_id or h.agent_id
            if decision == "failed":
                exc = result.exception
                error_type = result.error_type
        if exc is not None:
            error_type = _type_name(exc)
        fields: dict[str, Any] = {
            "tool": h.tool,
            "namespace": h.namespace,
            "key": h.key[:KEY_CHARS] if h.key else None,
            "decision": decision,
            "token": token or None,
            "attempt": attempt or None,
            "agent_id": h.agent_id,
            "run_id": h.run_id,
            "policy_reason": reason,
            "error_type": error_type,
            "duration_s": round(elapsed, 6),
        }
        span = h.span
        if span is not None:
            attrs: dict[str, str | int] = {"onceonly.decision": decision}
            if token:
                attrs["onceonly.token"] = token
            if attempt:
                attrs["onceonly.attempt"] = attempt
            if h.agent_id:
                attrs["onceonly.agent_id"] = h.agent_id
            if reason:
                attrs["onceonly.policy_reason"] = reason
            if error_type:
                attrs["error.type"] = error_type
            span.set_attributes(attrs)
            if decision == "failed":
                span.set_status(self._status(self._error, error_type))
            span.end()
            sc = span.get_span_context()
            if sc.is_valid:
                fields["trace_id"] = format(sc.trace_id, "032x")
                fields["span_id"] = format(sc.span_id, "016x")
        inst = self._instruments
        if inst is not None:
            labels = {"onceonly.decision": decision, "onceonly.tool": h.tool}
            inst.calls.add(1, labels)
            inst.duration.record(elapsed, labels)
            if decision == "blocked":
                inst.blocked.add(
                    1, {"onceonly.policy_reason": reason or "unknown", "onceonly.tool": h.tool}
                )
        if self._logs:
            level = logging.INFO if decision in _LOUD else logging.DEBUG
            if log.isEnabledFor(level):
                why = f" ({reason})" if reason and reason not in ("ok", "dedup") else ""
                log.log(
                    level,
                    "%s %s%s",
                    h.tool,
                    decision,
                    why,
                    extra={"onceonly": {k: v for k, v in fields.items() if v is not None}},
                )


def _type_name(err: BaseException) -> str:
    t = type(err)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


# -- the API ---------------------------------------------------------------------------
class Instrumentation:
    """What :func:`instrument` returns: the Guard it instruments, and the way back."""

    def __init__(self, guard: Guard, observer: Observer) -> None:
        self.guard = guard
        self.observer = observer

    @property
    def active(self) -> bool:
        return self.guard._observer is self.observer

    def uninstrument(self) -> bool:
        """Stop emitting for this guard. False if this instrumentation was not active
        (already removed, or replaced by a later ``instrument()``)."""
        if self.guard._observer is not self.observer:
            return False
        self.guard._observer = None
        return True


def instrument(
    guard: Guard,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    logs: bool = True,
) -> Instrumentation:
    """Emit OpenTelemetry spans and metrics (and, with ``logs``, log records) for every
    call ``guard`` makes. Without a provider, the global one is used (set it before or
    after: the API resolves it lazily). Instrumenting an instrumented guard replaces the
    earlier instrumentation.

    Raises MissingExtraError when ``opentelemetry-api`` is not installed.
    """
    try:
        from opentelemetry import metrics, trace
    except ImportError as err:
        raise MissingExtraError(
            "OpenTelemetry instrumentation", "otel", "opentelemetry-api"
        ) from err
    from . import __version__

    _check(guard)
    tracer = trace.get_tracer("onceonly_core", __version__, tracer_provider=tracer_provider)
    meter = metrics.get_meter("onceonly_core", __version__, meter_provider=meter_provider)
    calls = meter.create_counter(
        "onceonly.calls", unit="{call}", description="Guarded tool calls, by decision"
    )
    blocked = meter.create_counter(
        "onceonly.blocked", unit="{call}", description="Blocked tool calls, by reason"
    )
    about = "Duration of guarded tool calls (governance, claim, execution, completion)"
    try:
        duration = meter.create_histogram(
            "onceonly.call.duration",
            unit="s",
            description=about,
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
    except TypeError:  # opentelemetry-api < 1.30: no advisory buckets
        duration = meter.create_histogram("onceonly.call.duration", unit="s", description=about)
    observer = Observer(tracer, _Instruments(calls, blocked, duration), logs)
    guard._observer = observer
    return Instrumentation(guard, observer)


def instrument_logging(guard: Guard) -> Instrumentation:
    """The log records alone (one per call on the ``onceonly`` logger), without
    OpenTelemetry. Replaces an earlier instrumentation of ``guard``."""
    _check(guard)
    observer = Observer(None, None, True)
    guard._observer = observer
    return Instrumentation(guard, observer)


def uninstrument(guard: Guard) -> bool:
    """Remove whatever instrumentation ``guard`` has. False if it had none."""
    _check(guard)
    had = guard._observer is not None
    guard._observer = None
    return had


def _check(guard: Any) -> None:
    from .guard import Guard

    if not isinstance(guard, Guard):
        raise ConfigError(f"instrument() takes a Guard, not {type(guard).__name__}")
