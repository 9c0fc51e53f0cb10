"""The proxy: an MCP server whose ``tools/call`` goes through the guard to an upstream server.

Three parts, top-down:

* :class:`Upstream` — the upstream server as a stdio subprocess behind an MCP client,
  restarted after it dies. It knows when a call was cut off (the server's stdout ended
  while the call was in flight) and says so with :class:`Interrupted`.
* :func:`guarded_call` — the one place the proxy calls the guard: it hands over the tool's
  name and canonical arguments and classifies what happened into an :class:`Answer`
  (a stable code, one sentence for the model, the fields behind it).
* :func:`render` and :func:`build_server` — the answer as an MCP ``CallToolResult``, and
  the low-level MCP server that lists the upstream's tools unchanged.

How hints are read (docs/mcp.md): a ``readOnlyHint`` tool is never deduplicated (it runs
every time, still governed and audited); an ``idempotentHint`` tool may run again after
an unknown outcome (``on_unknown="retry"``), where any other tool answers
``unknown_outcome`` until someone checks (``--on-unknown``, default ``raise``).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .. import __version__
from ..contract import classify
from ..errors import (
    MissingExtraError,
    OnceOnlyError,
)
from ..guard import Guard, current_call
from . import FEATURE

try:
    import anyio
    from anyio.abc import TaskGroup, TaskStatus
    from mcp import Client, StdioServerParameters, stdio_client, types
    from mcp.server.lowlevel import Server
    from mcp.shared.exceptions import MCPError
except ImportError as _err:  # pragma: no cover - exercised by tests/core/test_missing_extras
    raise MissingExtraError(FEATURE, "mcp", "mcp") from _err

__all__ = [
    "IDEMPOTENCY_KEY_META",
    "Answer",
    "Interrupted",
    "Proxy",
    "ProxyConfig",
    "Upstream",
    "UpstreamToolError",
    "UpstreamUnavailable",
    "build_server",
    "guarded_call",
    "render",
    "serve_http",
    "serve_stdio",
]

log = logging.getLogger("onceonly.mcp")

R = TypeVar("R")

IDEMPOTENCY_KEY_META = "onceonly/idempotency-key"
"""The ``_meta`` entry of every forwarded ``tools/call``: the call's idempotency key, the
same for every attempt, for an upstream that can pass it on (Stripe's Idempotency-Key)."""

OUTCOME_META = "onceonly/outcome"

# The SDK stamps its own identity into every result's _meta; a stored result must not
# carry the upstream's stamp into later replays (the proxy's server stamps its own).
_RESERVED_META = "io.modelcontextprotocol/"


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """What ``onceonly mcp-proxy`` was told (see docs/mcp.md for each option)."""

    command: Sequence[str]
    url: str | None = None
    namespace: str | None = None
    agent_id: str | None = None
    scope: str | None = None
    run_id: str | None = None
    on_unknown: Literal["retry", "raise"] = "raise"
    lease: float | None = None
    wait: float | None = None
    ttl: float | None = None
    hints: bool = True
    cwd: str | None = None


# -- the upstream server ---------------------------------------------------------------------
class Interrupted(BaseException):
    """The upstream stopped (or the exchange broke) while a call was in flight.

    A BaseException on purpose: to the guard's protocol this is an interrupted execution
    (like a cancelled task), not the tool's failure, so it expires the claim's lease at
    once and leaves the outcome unknown — the next call of the same key applies
    ``on_unknown`` — instead of recording a failure that a retry would simply run again.
    """

    def __init__(self, tool: str, detail: str) -> None:
        self.tool = tool
        self.detail = detail
        super().__init__(f"the upstream MCP server stopped while running {tool!r}: {detail}")


class UpstreamUnavailable(OnceOnlyError):
    """The upstream MCP server could not be started, or ended before its handshake."""


def _first_leaf(err: BaseException) -> BaseException:
    group = getattr(err, "exceptions", None)  # an (anyio) exception group
    return _first_leaf(group[0]) if group else err


class UpstreamToolError(Exception):
    """The upstream answered a call with ``isError``: the tool's own failure (not cached)."""

    def __init__(self, tool: str, result: dict[str, Any]) -> None:
        self.tool = tool
        self.result = result
        texts = [c.get("text", "") for c in result.get("content", []) if c.get("type") == "text"]
        super().__init__("; ".join(t for t in texts if t) or f"{tool} reported an error")


#: The proxy's own settings (its ledger URL, API key, token): never passed to the upstream.
OWN_ENV_PREFIX = "ONCEONLY_"


class Upstream:
    """The upstream MCP server: a stdio subprocess behind an SDK ``Client``.

    It starts at first use and again after it died. Each connection lives in a task of
    ``tg`` (anyio scopes must be left by the task that entered them); ``drop`` ends it.
    """

    def __init__(self, command: Sequence[str], tg: TaskGroup, *, cwd: str | None = None) -> None:
        if not command:
            raise ValueError("the upstream command is empty")
        # The upstream sees the proxy's environment: an MCP host (Claude Desktop, Cursor)
        # sets the upstream's API keys in the env of the command it starts, which is this
        # proxy. The SDK's default would pass only HOME, PATH, SHELL, ... But not the
        # proxy's own settings: ONCEONLY_API_KEY is a tenant's admin key and
        # ONCEONLY_DB_URL may hold a database password, and the upstream is someone
        # else's code.
        env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_ENV_PREFIX)}
        self.params = StdioServerParameters(
            command=command[0], args=list(command[1:]), env=env, cwd=cwd
        )
        self._tg = tg
        self._client: Client | None = None
        self._stop: anyio.Event | None = None
        self._eof: anyio.Event | None = None
        self._lock = anyio.Lock()
        self.starts = 0

    async def client(self) -> Client:
        """The live connection, (re)starting the server when there is none or it died."""
        async with self._lock:
            if self._client is not None and self._eof is not None and self._eof.is_set():
                # Its stdout ended between calls: nothing was in flight, so restarting
                # before sending is safe, and the next call runs on a live server.
                log.warning("the upstream MCP server exited; restarting it")
                self._drop_locked()
            if self._client is None:
                stop, eof = anyio.Event(), anyio.Event()
                self._client = await self._tg.start(self._run, stop, eof)
                self._stop, self._eof = stop, eof
                self.starts += 1
            return self._client

    def drop(self, client: Client) -> None:
        """End this connection (its server is stopped); the next call starts a new one."""
        if self._client is client:
            self._drop_locked()

    def close(self) -> None:
        if self._client is not None:
            self._drop_locked()

    def _drop_locked(self) -> None:
        assert self._stop is not None
        self._stop.set()
        self._client, self._stop, self._eof = None, None, None

    async def _run(
        self, stop: anyio.Event, eof: anyio.Event, *, task_status: TaskStatus[Client]
    ) -> None:
        started = False
        try:
            async with Client(_watched(self.params, eof), cache=None) as client:
                task_status.started(client)
                started = True
                await stop.wait()
        except Exception:
            if not started:
                raise  # to the caller of client(): the server could not be started
            # After the fact (the server died, its pipes broke while closing): the calls
            # in flight have their own answer; this only must not end the proxy.
            log.warning("the upstream MCP server's connection ended with an error", exc_info=True)

    async def read(self, ask: Callable[[Client], Awaitable[R]]) -> R:
        """A read-only request (a listing, a resource, a prompt): after a lost connection
        it is simply asked again, once, of a restarted server."""
        for attempt in (1, 2):
            client = await self.client()
            try:
                return await ask(client)
            except MCPError as err:
                if err.code != types.CONNECTION_CLOSED or attempt == 2:
                    raise
                self.drop(client)
        raise AssertionError("unreachable")

    async def list_tools(self, cursor: str | None) -> types.ListToolsResult:
        """One page of the upstream's tools."""
        return await self.read(lambda c: c.list_tools(cursor=cursor, cache_mode="refresh"))

    async def call(
        self, name: str, arguments: Mapping[str, Any], meta: dict[str, Any] | None
    ) -> types.CallToolResult:
        """Forward one ``tools/call``. Raises Interrupted when the outcome is unknown."""
        client = await self.client()
        try:
            return await client.call_tool(name, dict(arguments), meta=meta)  # type: ignore[arg-type]
        except MCPError as err:
            if err.code == types.CONNECTION_CLOSED:
                self.drop(client)
                raise Interrupted(name, err.message) from err
            # A JSON-RPC error from a live server (unknown tool, invalid params): the
            # request was refused, nothing ran. The tool's failure, not cached.
            raise
        except Exception as err:
            # Anything else after the request may have been sent (a result that fails
            # the tool's output schema, a broken pipe): the effect may have happened.
            raise Interrupted(name, f"{type(err).__name__}: {err}") from err


@contextlib.asynccontextmanager
async def _watched(
    params: StdioServerParameters, eof: anyio.Event
) -> AsyncIterator[tuple[Any, Any]]:
    """``stdio_client`` whose read side sets ``eof`` when the server's stdout ends.

    The event is set before the client sees the end, so a call that fails with
    "connection closed" can tell a server that died under it from one that had died
    before (see Upstream.client): only the first leaves an unknown outcome.
    """
    async with stdio_client(params) as (read, write):
        relay_in, relay_out = anyio.create_memory_object_stream[Any](0)

        async def relay() -> None:
            try:
                async with relay_in:
                    async for message in read:
                        await relay_in.send(message)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the client went away first
            finally:
                eof.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(relay)
            try:
                yield relay_out, write
            finally:
                tg.cancel_scope.cancel()


# -- one tool, as the guard sees it -----------------------------------------------------------
class _Forward:
    """The callable the guard runs for one upstream tool: forwards the call.

    One instance per tool name, reused, so the guard prepares the tool once. Arguments
    arrive by name (``**arguments``), so any JSON property name works, ``self`` included.
    """

    __slots__ = ("__weakref__", "name", "upstream")

    def __init__(self, upstream: Upstream, name: str) -> None:
        self.upstream = upstream
        self.name = name

    async def __call__(self, /, **arguments: Any) -> dict[str, Any]:
        ctx = current_call()  # None for a read-only tool, which runs without a claim
        meta = None if ctx is None else {IDEMPOTENCY_KEY_META: ctx.idempotency_key}
        result = await self.upstream.call(self.name, arguments, meta)
        stored = _stored(result)
        if result.is_error:
            raise UpstreamToolError(self.name, stored)
        return stored


def _stored(result: types.CallToolResult) -> dict[str, Any]:
    """A result as the ledger keeps it: the wire form, minus the SDK's identity stamp."""
    data = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    meta = {
        k: v for k, v in (data.pop("_meta", None) or {}).items() if not k.startswith(_RESERVED_META)
    }
    if meta:
        data["_meta"] = meta
    return data


@dataclass(slots=True)
class _Plan:
    """How one listed tool is guarded, from its listing."""

    name: str
    forward: _Forward
    options: dict[str, Any]
    defaults: dict[str, Any]
    idempotent: bool
    read_only: bool


def _plan(tool: types.Tool, upstream: Upstream, cfg: ProxyConfig) -> _Plan:
    notes = tool.annotations if cfg.hints else None
    read_only = bool(notes and notes.read_only_hint)
    idempotent = bool(notes and notes.idempotent_hint)
    options: dict[str, Any] = {}
    if read_only:
        options["read_only"] = True  # runs every time; governance and audit still apply
    else:
        options["on_unknown"] = "retry" if idempotent else cfg.on_unknown
        for name in ("lease", "wait", "ttl"):
            value = getattr(cfg, name)
            if value is not None:
                options[name] = value
    # Top-level schema defaults filled in: a call that omits an argument and one that
    # passes its default are the same call (one key), as they are to the upstream.
    props = tool.input_schema.get("properties") if isinstance(tool.input_schema, dict) else None
    defaults = {
        k: v["default"] for k, v in (props or {}).items() if isinstance(v, dict) and "default" in v
    }
    forward = _Forward(upstream, tool.name)
    return _Plan(tool.name, forward, options, defaults, idempotent, read_only)


# -- the one call path ------------------------------------------------------------------------
Code = Literal[
    "executed",
    "replayed",
    "blocked",
    "pending_approval",
    "in_progress",
    "unknown_outcome",
    "failed",
    "guard_error",
    "invalid_arguments",
    "interrupted",
    "unknown_tool",
]


@dataclass(slots=True)
class Answer:
    """How one call ended: a stable code, one sentence for the model, what backs it."""

    code: Code
    text: str
    result: dict[str, Any] | None = None  # the upstream's CallToolResult (wire form)
    fields: dict[str, Any] = field(default_factory=dict)


async def guarded_call(
    guard: Guard, plan: _Plan, args: Mapping[str, Any], cfg: ProxyConfig
) -> Answer:
    """Run one call through the guard's one call path and render its classification.

    The only place the proxy calls the guard: ``Guard.arun_call_classified`` keys the call
    by tool name + canonical arguments in ``cfg.scope``, governs and audits it, and
    classifies the outcome (docs/integrations/contract.md). The proxy adds no wording of
    its own: the model reads the contract's sentence, or the upstream's own result.
    """
    name = plan.name
    thunk = functools.partial(plan.forward, **args)
    try:
        c = await guard.arun_call_classified(
            name,
            args,
            thunk,
            scope=cfg.scope,
            agent_id=cfg.agent_id,
            run_id=cfg.run_id,
            **plan.options,
        )
    except Interrupted as err:
        # The upstream died mid-call: an interruption (the claim's lease is expired at
        # once and the outcome left unknown), answered to the client instead of re-raised
        # because the proxy itself goes on serving.
        c = classify(err, tool=name)
        return Answer("interrupted", c.text, fields={"detail": err.detail})
    fields: dict[str, Any] = {}
    for k in ("key", "reason", "approval_id", "retry_after"):
        v = getattr(c, k)
        if v is not None:
            fields[k] = v
    if c.code in ("executed", "replayed"):
        if c.reason in ("completion_not_recorded", "lease_lost"):
            log.warning("tool %s ran, but its outcome may not have been recorded", name)
        if isinstance(c.result, dict):
            return Answer(c.code, "ok", result=c.result, fields=fields)
        return Answer(c.code, c.text, fields=fields)
    own = c.exception
    if c.code == "failed" and isinstance(own, UpstreamToolError):
        # The tool's own error: the model reads what the upstream said, unchanged.
        return Answer("failed", str(own), result=own.result, fields=fields)
    return Answer(c.code, c.text, fields=fields)


def render(answer: Answer) -> types.CallToolResult:
    """An answer as the MCP result the client receives (``_meta`` says the code)."""
    meta = {OUTCOME_META: answer.code, **{f"onceonly/{k}": v for k, v in answer.fields.items()}}
    if answer.result is not None:
        data = dict(answer.result)
        data["_meta"] = {**(data.get("_meta") or {}), **meta}
        return types.CallToolResult.model_validate(data)
    return types.CallToolResult.model_validate(
        {"content": [{"type": "text", "text": answer.text}], "isError": True, "_meta": meta}
    )


# -- the server -------------------------------------------------------------------------------
class Proxy:
    """The proxy's state: the guard, the upstream and how each listed tool is guarded."""

    def __init__(self, cfg: ProxyConfig, guard: Guard, upstream: Upstream) -> None:
        self.cfg = cfg
        self.guard = guard
        self.upstream = upstream
        self.plans: dict[str, _Plan] = {}

    async def list_tools(self, cursor: str | None) -> types.ListToolsResult:
        page = await self.upstream.list_tools(cursor)
        for tool in page.tools:
            self.plans[tool.name] = _plan(tool, self.upstream, self.cfg)
        # The tools exactly as the upstream lists them: names, descriptions, schemas,
        # annotations. Only the SDK's own identity stamp is not copied.
        return types.ListToolsResult(tools=page.tools, next_cursor=page.next_cursor)

    async def call_tool(
        self, name: str, arguments: Mapping[str, Any] | None
    ) -> types.CallToolResult:
        if arguments is not None and not isinstance(arguments, Mapping):
            return render(
                Answer("invalid_arguments", f"The arguments for tool {name!r} must be an object.")
            )
        plan = self.plans.get(name)
        if plan is None:
            await self._relist()  # a client may call without listing first
            plan = self.plans.get(name)
        if plan is None:
            known = ", ".join(sorted(self.plans)) or "none"
            return render(
                Answer(
                    "unknown_tool", f"There is no tool named {name!r}. Available tools: {known}."
                )
            )
        args = {**plan.defaults, **(arguments or {})}
        return render(await guarded_call(self.guard, plan, args, self.cfg))

    async def _relist(self) -> None:
        cursor: str | None = None
        for _ in range(100):  # a paginator that never ends cannot hang a call
            page = await self.list_tools(cursor)
            cursor = page.next_cursor
            if cursor is None:
                return


def build_server(
    proxy: Proxy,
    *,
    instructions: str | None = None,
    capabilities: types.ServerCapabilities | None = None,
) -> Server[Any]:
    """The low-level MCP server: ``tools/list`` and ``tools/call`` through the guard, and
    the upstream's resources and prompts (what it advertises in ``capabilities``) passed
    through unchanged: they are reads, with nothing to run once."""
    up = proxy.upstream

    def cursor(params: types.PaginatedRequestParams | None) -> str | None:
        return params.cursor if params is not None else None

    async def on_list_tools(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return await proxy.list_tools(cursor(params))

    async def on_call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        return await proxy.call_tool(params.name, params.arguments)

    async def on_list_resources(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        page = await up.read(
            lambda c: c.list_resources(cursor=cursor(params), cache_mode="refresh")
        )
        return types.ListResourcesResult(resources=page.resources, next_cursor=page.next_cursor)

    async def on_list_resource_templates(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        page = await up.read(
            lambda c: c.list_resource_templates(cursor=cursor(params), cache_mode="refresh")
        )
        return types.ListResourceTemplatesResult(
            resource_templates=page.resource_templates, next_cursor=page.next_cursor
        )

    async def on_read_resource(
        ctx: Any, params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        got = await up.read(lambda c: c.read_resource(str(params.uri), cache_mode="refresh"))
        return types.ReadResourceResult(contents=got.contents)

    async def on_list_prompts(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        page = await up.read(lambda c: c.list_prompts(cursor=cursor(params), cache_mode="refresh"))
        return types.ListPromptsResult(prompts=page.prompts, next_cursor=page.next_cursor)

    async def on_get_prompt(
        ctx: Any, params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        got = await up.read(lambda c: c.get_prompt(params.name, params.arguments))
        return types.GetPromptResult(description=got.description, messages=got.messages)

    caps = capabilities or types.ServerCapabilities()
    resources = caps.resources is not None
    prompts = caps.prompts is not None
    return Server(
        "onceonly-mcp-proxy",
        version=__version__,
        instructions=instructions,
        on_list_tools=on_list_tools,
        on_call_tool=on_call_tool,
        on_list_resources=on_list_resources if resources else None,
        on_list_resource_templates=on_list_resource_templates if resources else None,
        on_read_resource=on_read_resource if resources else None,
        on_list_prompts=on_list_prompts if prompts else None,
        on_get_prompt=on_get_prompt if prompts else None,
    )


@contextlib.asynccontextmanager
async def _running(cfg: ProxyConfig) -> AsyncIterator[tuple[Proxy, Server[Any]]]:
    """Open the ledger, start the upstream (failing fast on a wrong command), build the
    server; stop the upstream and close the ledger on the way out."""
    guard = Guard(cfg.url, namespace=cfg.namespace, quiet=True)
    failed: BaseException | None = None
    try:
        guard.store  # noqa: B018 - open the ledger now: a bad URL fails before serving
        if cfg.agent_id is not None:
            guard.gov.get_policy(cfg.agent_id)  # and the governance tables
        async with anyio.create_task_group() as tg:
            upstream = Upstream(cfg.command, tg, cwd=cfg.cwd)
            try:
                client = await upstream.client()
            except Exception as err:
                failed = err  # raised below, outside the task group: one plain error
            else:
                try:
                    proxy = Proxy(cfg, guard, upstream)
                    server = build_server(
                        proxy,
                        instructions=client.instructions,
                        capabilities=client.server_capabilities,
                    )
                    yield proxy, server
                finally:
                    upstream.close()
    finally:
        guard.close()
    if failed is not None:
        leaf = _first_leaf(failed)
        detail = f"{type(leaf).__name__}: {leaf}"
        if isinstance(leaf, MCPError) and leaf.code == types.CONNECTION_CLOSED:
            detail = "it exited before the MCP handshake (its own error output is above)"
        raise UpstreamUnavailable(
            f"the upstream MCP server ({' '.join(cfg.command)}) could not be started: {detail}"
        ) from failed


async def serve_stdio(cfg: ProxyConfig) -> None:
    """Serve the proxy over this process's stdin/stdout until the client goes away."""
    from mcp.server.stdio import stdio_server

    async with _running(cfg) as (_, server), stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


async def serve_http(cfg: ProxyConfig, host: str, port: int, token: str | None = None) -> None:
    """Serve the proxy over MCP streamable HTTP at ``http://HOST:PORT/mcp``.

    On a loopback host the SDK checks the Host and Origin headers (DNS rebinding); with
    ``token``, every request must carry ``Authorization: Bearer <token>``.
    """
    import uvicorn

    async with _running(cfg) as (_, server):
        app: Any = server.streamable_http_app(host=host)
        if token:
            app = _bearer(app, token)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        await uvicorn.Server(config).serve()


ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def _bearer(app: ASGIApp, token: str) -> ASGIApp:
    """Refuse HTTP requests without ``Authorization: Bearer <token>`` (constant-time)."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b"Bearer"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": b'{"error":"unauthorized"}'})
                return
        await app(scope, receive, send)

    return guarded
