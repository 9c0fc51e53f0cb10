"""The FastAPI application: the OnceOnly ``/v1`` REST API over :class:`ControlPlane`.

Response shapes follow what ``onceonly-sdk`` 3.0.5 parses (``docs/server.md`` lists the
choices made where the client leaves them open). Error bodies are ``{"detail": ...}``:
a string for 401/413/422/429 (the client shows it as the message), an object with
``error`` and ``message`` for 400/402/404/409 (the client exposes it as ``.detail``).
"""

import asyncio
import contextlib
import contextvars
import functools
import inspect
import itertools
import json
import math
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import date, timedelta
from typing import Annotated, Any, TypeVar

import pydantic
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import (
    ConfigError,
    InProgress,
    KeyReuseError,
    LeaseLost,
    OnceOnlyError,
    ResultNotStored,
    StoreError,
    UnknownOutcome,
)
from ..governance.models import Policy
from ..limits import INT_MAX, INT_MIN, MAX_BODY_BYTES, MAX_JSON_DEPTH, MAX_SPEND_USD, bad_text
from .control import ControlPlane, LeaseError, QuotaExceeded, iso, tool_result_json
from .db import KeyInfo
from .remote_api import remote_router

__all__ = ["ApiFailure", "create_app"]

_LABEL = re.compile(r"^[^\x00-\x1f/?#]{1,255}$")


class ApiFailure(Exception):
    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def _err(status: int, error: str, message: str, **extra: Any) -> ApiFailure:
    return ApiFailure(status, {"error": error, "message": message, **extra})


def _not_found(what: str) -> ApiFailure:
    return _err(404, "not_found", f"{what} not found")


def _label(value: str, what: str) -> str:
    if not _LABEL.match(value):
        raise ApiFailure(422, f"{what} must be 1..255 characters, without control characters")
    return value


# -- request bodies ------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


Key = Annotated[str, Field(min_length=1, max_length=255)]
LeaseId = Annotated[str, Field(min_length=1, max_length=64)]


class CheckLockBody(_Body):
    key: Key
    ttl: int | None = Field(default=None, ge=0, le=10**9)
    metadata: dict[str, Any] | None = None


class LeaseBody(_Body):
    key: Key
    ttl: int | None = Field(default=None, ge=0, le=10**9)
    metadata: dict[str, Any] | None = None


class RunBody(_Body):
    key: Key | None = None
    ttl: int | None = Field(default=None, ge=0, le=10**9)
    metadata: dict[str, Any] | None = None
    agent_id: str | None = Field(default=None, max_length=255)
    tool: str | None = Field(default=None, max_length=255)
    args: dict[str, Any] | None = None
    spend_usd: float | None = Field(default=None, ge=0, le=MAX_SPEND_USD)


class ExtendBody(_Body):
    key: Key
    lease_id: LeaseId
    ttl: int | None = Field(default=None, ge=0, le=10**9)


class CompleteBody(_Body):
    key: Key
    lease_id: LeaseId
    result: dict[str, Any] | None = None
    result_hash: str | None = Field(default=None, max_length=255)


class FailBody(_Body):
    key: Key
    lease_id: LeaseId
    error_code: str = Field(min_length=1, max_length=128)
    error_hash: str | None = Field(default=None, max_length=255)


class CancelBody(_Body):
    key: Key
    lease_id: LeaseId
    reason: str | None = Field(default=None, max_length=1000)


class NotificationsBody(_Body):
    email_notifications_enabled: bool | None = None
    tool_error_notifications_enabled: bool | None = None
    run_failure_notifications_enabled: bool | None = None


class EventBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    run_id: str = Field(min_length=1, max_length=255)
    type: str = Field(min_length=1, max_length=64)
    ts: float | None = None
    status: str | None = Field(default=None, max_length=64)
    duration_ms: float | None = None
    step: str | None = None
    tool: str | None = Field(default=None, max_length=512)
    req_id: str | None = None
    lease_id: str | None = None
    agent_id: str | None = Field(default=None, max_length=255)
    message: str | None = None
    data: dict[str, Any] | None = None


class TemplateBody(_Body):
    template: str = Field(min_length=1, max_length=64)
    overrides: dict[str, Any] | None = None


class ToggleBody(_Body):
    enabled: bool


class AgentBody(_Body):
    reason: str | None = Field(default=None, max_length=1000)


class ToolBody(_Body):
    name: str = Field(min_length=1, max_length=255)
    scope_id: str = "global"
    url: str = Field(min_length=1, max_length=2048)
    auth: dict[str, Any] | str | None = None
    secret: str | None = None
    timeout_ms: int = Field(default=4000, ge=1, le=600_000)
    max_retries: int = Field(default=0, ge=0, le=10)
    enabled: bool = True
    description: str = Field(default="", max_length=512)


# -- rate limits ---------------------------------------------------------------------------
class RateLimiter:
    """A token bucket per API key (per replica): ``rate`` requests/second, burst ``rate``."""

    def __init__(self) -> None:
        self._buckets: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def check(self, key_id: str, rate: float | None) -> float:
        """0 when allowed, else the seconds until the next request would be."""
        if not rate or rate <= 0:
            return 0.0
        now = time.monotonic()
        burst = max(1.0, rate)
        with self._lock:
            b = self._buckets.setdefault(key_id, [burst, now])
            b[0] = min(burst, b[0] + (now - b[1]) * rate)
            b[1] = now
            if b[0] >= 1.0:
                b[0] -= 1.0
                return 0.0
            return (1.0 - b[0]) / rate


class _Refused(ValueError):
    """A request the caller must change: answered 422 before any route runs."""


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a finite number; JSON numbers must be finite")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text[:40]} does not fit a 64-bit float")
    return value


def _int64(text: str) -> int:
    # Length first: int() of a 100,000-digit literal is slow, and Python refuses > 4,300.
    if len(text) > 20:
        raise _Refused(f"{text[:24]}... does not fit a signed 64-bit integer")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise _Refused(f"{text} does not fit a signed 64-bit integer")
    return value


#: Top-level body fields holding the caller's free-form data (stored as JSON text, where
#: a NUL is escaped): a NUL is allowed inside them and nowhere else.
_DATA_FIELDS = frozenset({"args", "metadata", "result", "data"})


#: One decoder for every body (``json.loads`` with hooks builds a new one per call).
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite, parse_int=_int64)

#: Where :class:`BodyLimit` leaves the body it parsed, for the route (parsed once).
PARSED_BODY = "onceonly.parsed_body"
F = TypeVar("F", bound=Callable[..., Any])

#: Where :class:`BodyLimit` leaves the app's count of requests in progress.
IN_FLIGHT = "onceonly.in_flight"


class InFlight:
    """Requests of one app in progress in this process (from the body's read to the
    response's end), and the loop's tasks that are not requests. Read and written on
    the event loop thread only."""

    __slots__ = ("base", "n")

    def __init__(self) -> None:
        self.n = 0
        #: the loop's tasks when no request is in progress (the server's own), counted
        #: at startup (lifespan); None (never alone) where no lifespan ran
        self.base: int | None = None

    def alone(self) -> bool:
        """No other request in progress, and none arrived and waiting to start: each
        request is a task from its arrival, counted before it reaches the app."""
        return self.n == 1 and self.base is not None and len(asyncio.all_tasks()) <= self.base + 1


#: The in-progress count of the request the current task serves (set per request by
#: :class:`ParsedRoute`, read by its endpoint wrapper).
_flight: contextvars.ContextVar[InFlight | None] = contextvars.ContextVar(
    "onceonly_in_flight", default=None
)


def inline_when_alone(
    when: Callable[[dict[str, Any]], bool] | None = None,
) -> Callable[[F], F]:
    """Mark a sync endpoint whose work is a few bounded database statements (no tool,
    no outbound call; ``when(kwargs)`` says so per request, if given): when it is the
    only request the process has in progress, :class:`ParsedRoute` runs it on the event
    loop instead of in the thread pool.

    Why: with one request in progress the loop has nothing else to do while the
    statement runs, and the pool's round trip (a queue, two cross-thread wake-ups) is
    a quarter of a request's latency (benchmarks/README.md). With others in progress it
    runs in the pool as before: blocking the loop then would stall their responses."""

    def mark(fn: F) -> F:
        fn.__onceonly_inline__ = when or _always  # type: ignore[attr-defined]
        return fn

    return mark


def _always(_: dict[str, Any]) -> bool:
    return True


def check_json_body(body: bytes) -> Any:
    """Return the parsed body; raise :class:`_Refused` unless ``body`` is JSON that every
    backend can hold.

    UTF-8; finite numbers; integers within signed 64 bits; at most
    :data:`~onceonly_core.limits.MAX_JSON_DEPTH` levels; no lone surrogate anywhere; no
    NUL outside the free-form data fields (``args``, ``metadata``, ``result``, ``data``).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused("the request body is not UTF-8") from None
    if text.startswith("\ufeff"):  # as json.loads refuses it (JSONDecoder.decode would not)
        raise _Refused("the request body is not JSON: Unexpected UTF-8 BOM at 0")
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise _Refused(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as err:
        raise _Refused(f"the request body is not JSON: {err.msg} at {err.pos}") from None
    # Iterative: (value, depth, may hold NUL, path).
    stack: list[tuple[Any, int, bool, str]] = [(value, 0, False, "body")]
    while stack:
        v, depth, data, path = stack.pop()
        t = type(v)
        if t is str:
            # A NUL inside free-form data is stored escaped and replayed exactly.
            why = bad_text(v.replace("\x00", "") if data else v)
            if why is not None:
                raise _Refused(f"{path} {why}")
        elif t is dict or t is list:
            if depth >= MAX_JSON_DEPTH:
                raise _Refused(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
            if t is list:
                stack.extend((x, depth + 1, data, f"{path}[{i}]") for i, x in enumerate(v))
                continue
            for k, x in v.items():
                why = bad_text(k.replace("\x00", "") if data else k)
                if why is not None:
                    raise _Refused(f"{path}: a field name {why}")
                inside = data or (depth == 0 and k in _DATA_FIELDS)
                stack.append((x, depth + 1, inside, f"{path}.{k}"[:200]))
    return value


def _url_refusal(scope: Scope) -> str | None:
    """Why the path or query cannot be used as names on every backend (a NUL), or None."""
    if "\x00" in scope.get("path", ""):
        return "the URL path contains a NUL character"
    if b"%00" in scope.get("query_string", b"").lower():
        return "the query string contains a NUL character"
    for name, value in scope.get("headers", []):
        if name in (b"x-request-id", b"authorization") and b"\x00" in value:
            return f"the {name.decode()} header contains a NUL character"
    return None


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, declared or streamed, and
    bodies or URLs no backend can hold (:func:`check_json_body`) with 422, before any
    route runs: a 5xx is a double execution for the client, which fails open on it."""

    def __init__(self, app: ASGIApp, limit: int, flight: InFlight | None = None) -> None:
        self.app = app
        self.limit = limit
        self.flight = flight if flight is not None else InFlight()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        flight = self.flight
        scope[IN_FLIGHT] = flight
        flight.n += 1
        try:
            await self._http(scope, receive, send)
        finally:
            flight.n -= 1

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = _url_refusal(scope)
        if refused is not None:
            await _refuse(send, 422, refused)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = True
                if too_big:
                    await _too_large(send, self.limit)
                    return
        body = b""
        more = True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            body += msg.get("body", b"")
            more = bool(msg.get("more_body"))
            if len(body) > self.limit:
                await _too_large(send, self.limit)
                return
        if body.strip() and scope.get("method") not in ("GET", "HEAD", "OPTIONS"):
            try:
                # The route reads this value instead of parsing the body again
                # (ParsedRequest.json): the body is parsed once per request.
                scope[PARSED_BODY] = check_json_body(body)
            except _Refused as err:
                await _refuse(send, 422, str(err))
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    await _refuse(send, 413, f"request body over {limit} bytes")


async def _refuse(send: Send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class ParsedRequest(Request):
    """A request whose ``json()`` is the value :class:`BodyLimit` already parsed (and
    checked): the same value ``json.loads`` gives for every body the check lets through."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            if PARSED_BODY in self.scope:
                self._json = self.scope[PARSED_BODY]
            else:
                self._json = await super().json()
        return self._json


class ParsedRoute(APIRoute):
    """Routes that hand FastAPI a :class:`ParsedRequest`, and run a sync endpoint on a
    worker thread once per request.

    FastAPI runs a sync endpoint in the thread pool, then, when it returns a value (not a
    ``Response``), hops to the pool a second time only to validate that value against the
    return annotation (``serialize_response``). A sync endpoint is therefore wrapped in an
    ``async def`` that awaits it in the pool: one hop, and the (cheap) validation runs on
    the event loop. Same signature (``functools.wraps``), dependencies, status codes and
    exception handling; measured on ``/v1/ai/run`` at 1 client (benchmarks/README.md)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            sync = endpoint
            inline: Callable[[dict[str, Any]], bool] | None = getattr(
                sync, "__onceonly_inline__", None
            )

            @functools.wraps(sync)
            async def endpoint(*args: Any, **kw: Any) -> Any:
                if inline is not None:
                    flight = _flight.get()
                    if flight is not None and flight.alone() and inline(kw):
                        return sync(*args, **kw)  # alone: see inline_when_alone
                return await run_in_threadpool(sync, *args, **kw)

        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parsed(request: Request) -> Response:
            token = _flight.set(request.scope.get(IN_FLIGHT))
            try:
                return await handler(ParsedRequest(request.scope, request.receive, request._send))
            finally:
                _flight.reset(token)

        return parsed


class SafeJSONResponse(JSONResponse):
    """Strict JSON, except that a non-finite float (a local tool's NaN, an old event)
    is sent as null instead of failing the response with a 500 after the work is done."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:
            return super().render(_finite_only(content))


def _finite_only(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite_only(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_only(x) for x in v]
    return v


# -- the application -----------------------------------------------------------------------
def create_app(
    url: str | None = None,
    *,
    control: ControlPlane | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_metadata_bytes: int = 2048,
    inline: bool = True,
    **options: Any,
) -> FastAPI:
    """Build the app. ``options`` go to :class:`ControlPlane` (``job_workers``,
    ``migrate``, ``default_lock_ttl``, ...) unless ``control`` is given. ``inline=False``:
    every sync route runs in the thread pool (see :func:`inline_when_alone`)."""
    cp = control if control is not None else ControlPlane(url, **options)
    limiter = RateLimiter()
    limits_cache: dict[str, tuple[dict[str, Any], float]] = {}
    flight = InFlight()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        from ..governance import outbox
        from ..governance.outbox import Deliverer, Settings

        # The sync routes run on this many threads: as many as the ledger pool has
        # connections (ControlPlane.threads), so no request waits for a connect.
        anyio.to_thread.current_default_thread_limiter().total_tokens = cp.threads
        cp.keys.ensure()
        cp.jobs.start()
        # Notifications of every tenant, in the background: rows left by a restart (or
        # by agents that do not deliver in-process) go out here; replicas share the work.
        notifier = Deliverer(cp.gov_store, Settings.from_env(egress_allow=cp.egress_allow))
        notifier.start()
        # The tenants' /v1/me/notifications choices, for decisions on this server's database
        # only (an embedded guard in the same process has no tenants table).
        outbox.preferences = functools.partial(_stored_prefs, cp.gov_store.engine)
        if inline:
            flight.base = len(asyncio.all_tasks())  # the server's own tasks and this one
        try:
            yield
        finally:
            outbox.preferences = None
            notifier.close()
            if control is None:
                cp.close()
            else:
                cp.jobs.stop()
                if cp._usage is not None:
                    cp._usage.flush()

    app = FastAPI(
        responses=_ERROR_RESPONSES,
        title="OnceOnly Core server",
        version="1",
        description="Self-hosted OnceOnly /v1 API (exactly-once + governance).",
        openapi_url="/v1/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
    )
    app.state.control = cp
    app.router.route_class = ParsedRoute

    def openapi() -> dict[str, Any]:
        # Our 422 body is {"detail": "<text>"} (the client shows a string), not FastAPI's list.
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["HTTPValidationError"] = {
                "title": "HTTPValidationError",
                "type": "object",
                "properties": {"detail": {"type": "string", "title": "Detail"}},
                "required": ["detail"],
            }
            _add_links(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, limit=max_body_bytes, flight=flight)

    @app.exception_handler(ApiFailure)
    async def _api_failure(_: Request, exc: ApiFailure) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(pydantic.ValidationError)
    async def _invalid_model(_: Request, exc: pydantic.ValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()[:5]
        ]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(OnceOnlyError)
    async def _ours(_: Request, exc: OnceOnlyError) -> JSONResponse:
        # Everything of ours but StoreError (handled below: the database is unreachable)
        # is about the request or the record, never the server: 409 for a key's state,
        # 422 for input (ConfigError, FingerprintError, CodecError, ...).
        if isinstance(exc, (KeyReuseError, InProgress, UnknownOutcome, LeaseLost, ResultNotStored)):
            name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
            return JSONResponse({"detail": {"error": name, "message": str(exc)}}, 409)
        return JSONResponse({"detail": str(exc)[:1000]}, status_code=422)

    @app.exception_handler(LeaseError)
    async def _lease(_: Request, exc: LeaseError) -> JSONResponse:
        body = {"detail": {"error": exc.error, "message": exc.message}}
        return JSONResponse(body, status_code=409)

    @app.exception_handler(QuotaExceeded)
    async def _quota(_: Request, exc: QuotaExceeded) -> JSONResponse:
        detail = {
            "error": "usage_limit",
            "message": str(exc),
            "kind": exc.kind,
            "usage": exc.used,
            "limit": exc.limit,
        }
        return JSONResponse({"detail": detail}, status_code=402)

    @app.exception_handler(StoreError)
    async def _store(_: Request, exc: StoreError) -> JSONResponse:
        body = {"detail": {"error": "store_unavailable", "message": str(exc)[:500]}}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    # -- auth ---------------------------------------------------------------------------
    async def auth(request: Request) -> KeyInfo:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiFailure(401, "missing API key: send Authorization: Bearer <key>")
        hit, info = cp.keys.cached(token)
        if not hit:  # a database read: off the event loop
            info = await run_in_threadpool(cp.keys.authenticate, token)
        if info is None:
            raise ApiFailure(401, "invalid API key")
        wait = limiter.check(info.key_id, info.rate_limit)
        if wait > 0:
            retry = f"{max(0.001, math.ceil(wait * 1000) / 1000):.3f}"
            raise ApiFailure(429, "rate limit exceeded", {"Retry-After": retry})
        return info

    Auth = Annotated[KeyInfo, Depends(auth)]
    # Remote mode (Guard("https://...")): the store primitives, tenant-bound (remote_api.py).
    app.include_router(remote_router(cp, auth))

    def quota(tenant: str, kind: str) -> None:
        hit = limits_cache.get(tenant)
        now = time.monotonic()
        if hit is None or hit[1] <= now:
            hit = (cp.keys.tenant_row(tenant), now + 5.0)
            limits_cache[tenant] = hit
        limit = hit[0].get(f"{kind}_limit")
        if limit is None:
            return
        used = cp.usage.charged(tenant, kind)
        if used >= int(limit):
            raise QuotaExceeded(kind, used, int(limit))

    def check_meta(meta: dict[str, Any] | None) -> None:
        if meta is not None and len(json.dumps(meta, default=str)) > max_metadata_bytes:
            raise ApiFailure(422, f"metadata: at most {max_metadata_bytes} bytes of JSON")

    # -- health -------------------------------------------------------------------------
    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        try:
            cp.ledger.now()
            cp.keys.ensure()
        except Exception as err:
            return JSONResponse({"ok": False, "error": str(err)[:300]}, status_code=503)
        return JSONResponse({"ok": True})

    # -- account ------------------------------------------------------------------------
    def prefs_of(tenant: str) -> dict[str, bool]:
        raw = json.loads(cp.keys.tenant_row(tenant).get("prefs") or "{}")
        names = (
            "email_notifications_enabled",
            "tool_error_notifications_enabled",
            "run_failure_notifications_enabled",
        )
        return {n: bool(raw.get(n, False)) for n in names}

    @app.get("/v1/me")
    def me(k: Auth) -> dict[str, Any]:
        return {
            "plan": "self-hosted",
            "tenant": k.tenant,
            "key_id": k.key_id,
            "key_prefix": k.prefix,
            "email": None,
            **prefs_of(k.tenant),
        }

    @app.post("/v1/me/notifications")
    def notifications(body: NotificationsBody, k: Auth) -> dict[str, Any]:
        changes = {n: v for n, v in body.model_dump().items() if v is not None}
        if not changes:
            raise ApiFailure(422, "give at least one preference field")
        cp.keys.update_prefs(k.tenant, changes)
        return {"ok": True, **prefs_of(k.tenant)}

    def usage_of(tenant: str, kind: str) -> dict[str, Any]:
        m = cp.usage.month(tenant, kind)
        limit = cp.keys.tenant_row(tenant).get(f"{kind}_limit")
        return {
            "usage": m["charged"],
            "limit": limit,
            "requests_total_month": m["requests"],
            "blocked_total_month": m["blocked"],
            "charged_total_month": m["charged"],
            "polling_total_month": m["requests"] - m["charged"] if kind == "ai" else 0,
        }

    @app.get("/v1/usage")
    def usage(k: Auth, kind: Annotated[str, Query(pattern="^(make|ai)$")] = "make") -> Any:
        month = time.strftime("%Y-%m", time.gmtime())
        return {"plan": "self-hosted", "month": month, "kind": kind, **usage_of(k.tenant, kind)}

    @app.get("/v1/usage/all")
    def usage_all(k: Auth) -> dict[str, Any]:
        month = time.strftime("%Y-%m", time.gmtime())
        return {
            "plan": "self-hosted",
            "month": month,
            "make": usage_of(k.tenant, "make"),
            "ai": usage_of(k.tenant, "ai"),
        }

    @app.get("/v1/metrics")
    def metrics(k: Auth, from_day: str, to_day: str) -> dict[str, Any]:
        try:
            first, last = date.fromisoformat(from_day), date.fromisoformat(to_day)
        except ValueError:
            raise ApiFailure(422, "from_day and to_day must be YYYY-MM-DD") from None
        if last < first or (last - first).days > 366:
            raise ApiFailure(422, "to_day must be within 366 days after from_day")
        cp.usage.flush()
        rows = cp.keys.usage_rows(k.tenant, first.isoformat(), last.isoformat())
        days: dict[str, dict[str, dict[str, int]]] = {}
        d = first
        while d <= last:
            zero = {"requests": 0, "charged": 0, "blocked": 0}
            days[d.isoformat()] = {"make": dict(zero), "ai": dict(zero)}
            d += timedelta(days=1)
        for r in rows:
            days[r["day"]][r["kind"]][r["metric"]] = int(r["n"])
        return {
            "from_day": first.isoformat(),
            "to_day": last.isoformat(),
            "days": [{"day": day, **v} for day, v in days.items()],
        }

    # -- check-lock ---------------------------------------------------------------------
    @app.post("/v1/check-lock")
    @inline_when_alone()
    def check_lock(body: CheckLockBody, request: Request, k: Auth) -> JSONResponse:
        check_meta(body.metadata)
        quota(k.tenant, "make")
        rid = request.headers.get("x-request-id") or None
        out = cp.check_lock(k.tenant, body.key, body.ttl, rid)
        headers = {"X-OnceOnly-Status": out["status"], "X-Request-Id": rid or _req_id()}
        return JSONResponse(out, headers=headers)

    # -- ai -----------------------------------------------------------------------------
    @app.post("/v1/ai/lease")
    def ai_lease(body: LeaseBody, k: Auth) -> dict[str, Any]:
        check_meta(body.metadata)
        quota(k.tenant, "ai")
        return cp.lease(k.tenant, body.key, body.ttl, body.metadata)

    @app.post("/v1/ai/run")
    @inline_when_alone(lambda kw: kw["body"].key is not None)  # a job's lease; a tool: never
    def ai_run(body: RunBody, k: Auth) -> dict[str, Any]:
        if body.key is not None:
            if body.agent_id or body.tool:
                raise ApiFailure(422, "give either key or agent_id/tool, not both")
            meta = body.metadata or {}
            if len(json.dumps(meta, default=str)) > 65536:
                raise ApiFailure(422, "metadata: at most 65536 bytes of JSON for a job")
            quota(k.tenant, "ai")
            return cp.lease(k.tenant, body.key, body.ttl, meta, job=True)
        if not body.agent_id or not body.tool:
            raise ApiFailure(422, "give key (a job) or agent_id and tool (a tool run)")
        _label(body.agent_id, "agent_id")
        args = dict(body.args or {})
        run_id = args.pop("run_id", None)
        run = _label(str(run_id), "run_id") if run_id is not None else None
        res = cp.guard(k.tenant).gov.run_tool(
            body.agent_id, body.tool, args, spend_usd=body.spend_usd, run_id=run
        )
        return tool_result_json(res)

    @app.get("/v1/ai/status")
    @inline_when_alone()  # one read of the ledger (a client polling its job)
    def ai_status(key: Annotated[str, Query(min_length=1, max_length=255)], k: Auth) -> Any:
        return cp.status(k.tenant, key)

    @app.get("/v1/ai/result")
    @inline_when_alone()  # one or two reads of the ledger
    def ai_result(key: Annotated[str, Query(min_length=1, max_length=255)], k: Auth) -> Any:
        return cp.result(k.tenant, key)

    @app.post("/v1/ai/extend")
    def ai_extend(body: ExtendBody, k: Auth) -> dict[str, Any]:
        return cp.extend(k.tenant, body.key, body.lease_id, body.ttl)

    @app.post("/v1/ai/complete")
    def ai_complete(body: CompleteBody, k: Auth) -> dict[str, Any]:
        return cp.complete(k.tenant, body.key, body.lease_id, body.result, body.result_hash)

    @app.post("/v1/ai/fail")
    def ai_fail(body: FailBody, k: Auth) -> dict[str, Any]:
        return cp.fail(k.tenant, body.key, body.lease_id, body.error_code, body.error_hash)

    @app.post("/v1/ai/cancel")
    def ai_cancel(body: CancelBody, k: Auth) -> dict[str, Any]:
        return cp.cancel(k.tenant, body.key, body.lease_id, body.reason)

    # -- events and timelines -----------------------------------------------------------
    @app.post("/v1/events")
    def post_event(body: EventBody, k: Auth) -> dict[str, Any]:
        wire = body.model_dump(exclude={"run_id", "type", "agent_id", "tool", "status", "data"})
        wire = {n: v for n, v in wire.items() if v is not None}
        payload = {"_wire": 1, "data": body.data, **wire}
        eid = cp.guard(k.tenant).gov.post_event(
            body.run_id,
            body.type,
            agent_id=body.agent_id,
            tool=body.tool,
            status=body.status,
            data=payload,
        )
        return {"ok": True, "event_id": eid, "run_id": body.run_id}

    @app.get("/v1/events")
    def events(
        k: Auth,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    ) -> dict[str, Any]:
        rows, total = _recent_events(cp, k.tenant, limit, offset)
        return {"data": rows, "total": total, "limit": limit, "offset": offset}

    @app.get("/v1/runs/{run_id:path}")
    def run_timeline(
        run_id: str,
        k: Auth,
        limit: Annotated[int, Query(ge=1, le=2000)] = 200,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    ) -> dict[str, Any]:
        if not run_id or len(run_id) > 255 or any(ord(c) < 32 for c in run_id):
            raise ApiFailure(422, "run_id must be 1..255 characters, without control characters")
        gov = cp.guard(k.tenant).gov
        items = gov.get_run_timeline(run_id, limit=limit, offset=offset)
        events = [_event_json(e.model_dump()) for e in items]
        total = _count_events(cp, k.tenant, run_id)
        return {
            "run_id": run_id,
            "total": total,
            "limit": limit,
            "offset": offset,
            "events": events,
        }

    # -- policies -----------------------------------------------------------------------
    def policy_json(p: Policy) -> dict[str, Any]:
        return {"agent_id": p.agent_id, "policy": p.model_dump()}

    @app.get("/v1/policies")
    def list_policies(k: Auth) -> list[dict[str, Any]]:
        return [policy_json(p) for p in cp.guard(k.tenant).gov.list_policies()]

    @app.get("/v1/policies/{agent_id}")
    def get_policy(agent_id: str, k: Auth) -> dict[str, Any]:
        p = cp.guard(k.tenant).gov.get_policy(_label(agent_id, "agent_id"))
        if p is None:
            raise _not_found(f"policy for agent {agent_id!r}")
        return policy_json(p)

    @app.post("/v1/policies/{agent_id}")
    def upsert_policy(agent_id: str, body: dict[str, Any], k: Auth) -> dict[str, Any]:
        _label(agent_id, "agent_id")
        fields = _policy_fields(body)
        fields["agent_id"] = agent_id
        p = cp.guard(k.tenant).gov.upsert_policy(Policy.model_validate(fields))
        return policy_json(p)

    @app.post("/v1/policies/{agent_id}/from-template")
    def from_template(agent_id: str, body: TemplateBody, k: Auth) -> dict[str, Any]:
        _label(agent_id, "agent_id")
        from ..governance.templates import template

        try:
            template(body.template)
        except ConfigError as err:
            raise _err(404, "unknown_template", str(err)) from None
        overrides = _policy_fields(body.overrides or {})
        overrides.pop("agent_id", None)
        p = cp.guard(k.tenant).gov.policy_from_template(agent_id, body.template, overrides)
        return policy_json(p)

    # -- agents: kill switch, logs, metrics ---------------------------------------------
    def agent_json(tenant: str, agent_id: str) -> dict[str, Any]:
        gov = cp.guard(tenant).gov
        st = gov.agent_status(agent_id)
        row = gov.store.get_agent(tenant, agent_id) or {}
        disabled = bool(st["disabled"])
        return {
            "agent_id": agent_id,
            "is_enabled": not disabled,
            "disabled_reason": st["reason"] if disabled else None,
            "disabled_at": iso(row.get("updated_at")) if row.get("disabled") else None,
            "global_disabled": st["global_disabled"],
        }

    @app.post("/v1/agents/{agent_id}/disable")
    def disable_agent(agent_id: str, body: AgentBody, k: Auth) -> dict[str, Any]:
        cp.guard(k.tenant).gov.disable_agent(_label(agent_id, "agent_id"), body.reason or "")
        return agent_json(k.tenant, agent_id)

    @app.post("/v1/agents/{agent_id}/enable")
    def enable_agent(agent_id: str, body: AgentBody, k: Auth) -> dict[str, Any]:
        cp.guard(k.tenant).gov.enable_agent(_label(agent_id, "agent_id"))
        return agent_json(k.tenant, agent_id)

    @app.get("/v1/agents/{agent_id}/logs")
    def agent_logs(
        agent_id: str, k: Auth, limit: Annotated[int, Query(ge=1, le=500)] = 100
    ) -> list[dict[str, Any]]:
        entries = cp.guard(k.tenant).gov.agent_logs(_label(agent_id, "agent_id"), limit=limit)
        return [
            {
                "id": e.id,
                "ts": e.created_at,
                "agent_id": e.agent_id,
                "tool": e.tool,
                "allowed": e.decision in ("executed", "dedup"),
                "decision": e.decision,
                "policy_reason": e.reason,
                "reason": e.reason,
                "risk_level": e.risk_level,
                "args_hash": e.args_digest,
                "spend_usd": e.spend_usd,
                "run_id": e.run_id,
            }
            for e in entries
        ]

    @app.get("/v1/agents/{agent_id}/metrics")
    def agent_metrics(
        agent_id: str,
        k: Auth,
        period: Annotated[str, Query(pattern="^(hour|day|week)$")] = "day",
    ) -> dict[str, Any]:
        m = cp.guard(k.tenant).gov.agent_metrics(_label(agent_id, "agent_id"), period)
        return {
            "agent_id": m.agent_id,
            "period": m.period,
            "since": m.since,
            "total_actions": m.total_actions,
            "blocked_actions": m.blocked,
            "executed_actions": m.executed,
            "dedup_actions": m.dedup,
            "failed_actions": m.failed,
            "total_spend_usd": m.spend_usd,
            "top_tools": [{"tool": t, "count": n} for t, n in m.top_tools],
        }

    # -- tools registry -----------------------------------------------------------------
    def tool_json(spec: Any) -> dict[str, Any]:
        d: dict[str, Any] = spec.model_dump()
        d["secret_mask"] = "********" if spec.has_secret else None
        return d

    @app.post("/v1/tools")
    def create_tool(body: ToolBody, k: Auth) -> dict[str, Any]:
        gov = cp.guard(k.tenant).gov
        auth_type, secret = "none", body.secret
        if isinstance(body.auth, dict):
            auth_type = str(body.auth.get("type") or "none")
            secret = body.auth.get("secret") or secret
        elif isinstance(body.auth, str):
            auth_type = body.auth
        if auth_type not in ("none", "hmac_sha256"):
            raise ApiFailure(422, "auth.type must be none or hmac_sha256")
        if auth_type == "hmac_sha256" and not secret:
            old = gov.store.get_tools(k.tenant, body.name, body.scope_id)
            secret = old[0].get("secret") if old else None
            if not secret:
                raise ApiFailure(422, "auth.secret is required for hmac_sha256")
        if secret is not None and len(str(secret)) < 8:
            raise ApiFailure(422, "auth.secret must be at least 8 characters")
        spec = gov.create_tool(
            body.name,
            url=body.url,
            scope_id=body.scope_id,
            auth=auth_type,
            secret=str(secret) if secret else None,
            timeout_ms=min(body.timeout_ms, cp.max_tool_timeout_ms),
            max_retries=body.max_retries,
            enabled=body.enabled,
            description=body.description,
        )
        return tool_json(spec)

    @app.get("/v1/tools")
    def list_tools(k: Auth, scope_id: str = "global") -> list[dict[str, Any]]:
        tools = cp.guard(k.tenant).gov.list_tools()
        return [tool_json(t) for t in tools if t.scope_id == scope_id]

    @app.get("/v1/tools/{name}")
    def get_tool(name: str, k: Auth, scope_id: str = "global") -> dict[str, Any]:
        spec = cp.guard(k.tenant).gov.get_tool(name, scope_id)
        if spec is None:
            raise _not_found(f"tool {name!r}")
        return tool_json(spec)

    @app.post("/v1/tools/{name}/toggle")
    def toggle_tool(name: str, body: ToggleBody, k: Auth, scope_id: str = "global") -> Any:
        gov = cp.guard(k.tenant).gov
        if not gov.toggle_tool(name, body.enabled, scope_id):
            raise _not_found(f"tool {name!r}")
        spec = gov.get_tool(name, scope_id)
        if spec is None:
            raise _not_found(f"tool {name!r}")
        return tool_json(spec)

    @app.delete("/v1/tools/{name}")
    def delete_tool(name: str, k: Auth, scope_id: str = "global") -> dict[str, Any]:
        if not cp.guard(k.tenant).gov.delete_tool(name, scope_id):
            raise _not_found(f"tool {name!r}")
        return {"ok": True, "deleted": name, "scope_id": scope_id}

    return app


class ErrorBody(BaseModel):
    """``detail`` is a string (401/413/422/429) or ``{"error", "message", ...}``."""

    detail: str | dict[str, Any]


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "Malformed JSON body"),
        (401, "Missing or invalid API key"),
        (402, "Tenant quota reached"),
        (404, "Not found (or another tenant's)"),
        (409, "Lease id is not the holder's, or the lease is already finished"),
        (413, "Request body too large"),
        (422, "Invalid input (a string detail): a value no backend can hold, or a bad field"),
        (429, "Rate limit (Retry-After)"),
        (503, "Database unavailable (Retry-After)"),
    )
}


# OpenAPI links: what a response hands to the next call (schemathesis' stateful phase
# follows them; they also document the flows). (producer, consumer, parameters, body).
_LEASE = {"key": "$response.body#/key", "lease_id": "$response.body#/lease_id"}
_AGENT = {"agent_id": "$response.body#/agent_id"}
_LINKS: list[tuple[tuple[str, str], tuple[str, str], dict[str, str], dict[str, str]]] = [
    *(
        (("post", "/v1/ai/lease"), ("post", f"/v1/ai/{op}"), {}, _LEASE)
        for op in ("extend", "complete", "fail", "cancel")
    ),
    *(
        (("post", "/v1/ai/lease"), ("get", f"/v1/ai/{op}"), {"key": "$response.body#/key"}, {})
        for op in ("status", "result")
    ),
    *(
        (("post", "/v1/tools"), (m, p), {"name": "$response.body#/name"}, {})
        for m, p in (
            ("get", "/v1/tools/{name}"),
            ("post", "/v1/tools/{name}/toggle"),
            ("delete", "/v1/tools/{name}"),
        )
    ),
    (
        ("post", "/v1/events"),
        ("get", "/v1/runs/{run_id}"),
        {"run_id": "$response.body#/run_id"},
        {},
    ),
    *(
        (("post", "/v1/policies/{agent_id}"), (m, p), _AGENT, {})
        for m, p in (
            ("get", "/v1/policies/{agent_id}"),
            ("post", "/v1/agents/{agent_id}/disable"),
            ("get", "/v1/agents/{agent_id}/logs"),
            ("get", "/v1/agents/{agent_id}/metrics"),
        )
    ),
]


def _add_links(schema: dict[str, Any]) -> None:
    paths = schema.get("paths", {})
    for (pm, pp), (cm, cp_), params, body in _LINKS:
        producer = paths.get(pp, {}).get(pm)
        consumer = paths.get(cp_, {}).get(cm)
        if producer is None or consumer is None:
            continue
        link: dict[str, Any] = {"operationId": consumer["operationId"]}
        if params:
            link["parameters"] = params
        if body:
            link["requestBody"] = body
        ok = producer.setdefault("responses", {}).setdefault("200", {"description": "OK"})
        name = consumer["operationId"]
        ok.setdefault("links", {})[name] = link


_RID: list[Any] = [0, "", itertools.count()]


def _req_id() -> str:
    """A request id for a caller that sent none: unique per process (a random prefix
    drawn per process, then a counter), without an ``os.urandom`` call per request."""
    if _RID[0] != os.getpid():
        _RID[:] = [os.getpid(), secrets.token_hex(4), itertools.count()]
    return f"req_{_RID[1]}{next(_RID[2]):08x}"


def _policy_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The client's policy dict → our Policy fields (``pricing_rules`` may be a list of
    ``{"tool", "price_usd"}`` as the hosted API documents)."""
    fields = dict(body)
    rules = fields.get("pricing_rules")
    if isinstance(rules, list):
        out: dict[str, Any] = {}
        for r in rules:
            if not isinstance(r, dict) or "tool" not in r:
                raise ApiFailure(422, "pricing_rules items need tool and price_usd")
            out[str(r["tool"])] = r.get("price_usd", r.get("price"))
        fields["pricing_rules"] = out
    return fields


def _event_json(e: dict[str, Any]) -> dict[str, Any]:
    data = e.get("data")
    out: dict[str, Any] = {
        "id": e["id"],
        "run_id": e["run_id"],
        "ts": e["created_at"],
        "created_at": e["created_at"],
        "type": e["type"],
        "status": e.get("status"),
        "agent_id": e.get("agent_id"),
        "tool": e.get("tool"),
        "step": None,
        "message": None,
        "data": data,
    }
    if isinstance(data, dict) and data.get("_wire") == 1:
        extra = {n: v for n, v in data.items() if n not in ("_wire", "data")}
        out.update(extra)
        out["data"] = data.get("data")
    return out


def _count_events(cp: ControlPlane, tenant: str, run_id: str) -> int:
    import sqlalchemy as sa

    from ..stores import schema as S

    ev = S.events
    q = (
        sa.select(sa.func.count())
        .select_from(ev)
        .where(ev.c.tenant == tenant, ev.c.run_id == run_id)
    )
    with cp.gov_store.engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def _recent_events(
    cp: ControlPlane, tenant: str, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    import sqlalchemy as sa

    from ..stores import schema as S

    ev = S.events
    q = (
        sa.select(ev)
        .where(ev.c.tenant == tenant)
        .order_by(ev.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    count = sa.select(sa.func.count()).select_from(ev).where(ev.c.tenant == tenant)
    with cp.gov_store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(q)]
        total = int(conn.execute(count).scalar_one())
    out = []
    for r in rows:
        r["data"] = json.loads(r["data"]) if r.get("data") else None
        out.append(_event_json(r))
    return out, total


def _stored_prefs(engine: Any, conn: Any, tenant: str) -> dict[str, Any] | None:
    """A tenant's notification preferences, read on the deciding transaction's connection
    (the server's tables live in the same database); None for a tenant we do not serve,
    or for a decision made on another database (an embedded guard in this process)."""
    import sqlalchemy as sa

    from .db import tenants

    if conn.engine is not engine:
        return None

    row = conn.execute(sa.select(tenants.c.prefs).where(tenants.c.tenant == tenant)).first()
    if row is None:
        return None
    prefs: dict[str, Any] = json.loads(row.prefs or "{}")
    return prefs
