"""``onceonly mcp-proxy``: guard any MCP server (registered on the main app by one line)."""

from __future__ import annotations

import ipaddress
import logging
import sys
from enum import Enum
from typing import Annotated

import typer

from ..errors import ConfigError

__all__ = ["mcp_proxy", "register"]


class OnUnknown(str, Enum):
    retry = "retry"
    raise_ = "raise"


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"--http takes HOST:PORT or PORT, got {value!r}") from None
    if not 0 < number < 65536:
        raise ConfigError(f"--http port must be 1-65535, got {number}")
    return host, number


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mcp_proxy(
    command: Annotated[
        list[str],
        typer.Argument(
            help="The upstream MCP server's command and its arguments, after --.",
            show_default=False,
        ),
    ],
    agent: Annotated[
        str | None,
        typer.Option(
            "--agent",
            envvar="ONCEONLY_AGENT_ID",
            help="Govern the calls as this agent's (policies, caps, spend, approvals, audit).",
        ),
    ] = None,
    scope: Annotated[
        str | None,
        typer.Option("--scope", help="Deduplicate within this scope (a workflow, a conversation)."),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="ONCEONLY_DB_URL",
            help="Ledger URL (default sqlite:///onceonly.db, relative to the working directory).",
        ),
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", envvar="ONCEONLY_NAMESPACE", help="Tenant namespace."),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Tag the calls with this run id (timeline).")
    ] = None,
    on_unknown: Annotated[
        OnUnknown,
        typer.Option(
            "--on-unknown",
            help="After an interrupted call of a tool not marked idempotent: 'raise' answers "
            "unknown_outcome until someone checks; 'retry' runs it again.",
        ),
    ] = OnUnknown.raise_,
    lease: Annotated[
        float | None,
        typer.Option("--lease", help="Seconds a running call's claim lives unrenewed."),
    ] = None,
    ttl: Annotated[
        float | None,
        typer.Option("--ttl", help="Seconds a completed call is replayed (default: forever)."),
    ] = None,
    ignore_hints: Annotated[
        bool,
        typer.Option(
            "--ignore-hints",
            help="Guard every tool as side-effecting, whatever its readOnly/idempotent hints.",
        ),
    ] = False,
    http: Annotated[
        str | None,
        typer.Option(
            "--http",
            help="Serve MCP streamable HTTP on HOST:PORT (path /mcp) instead of stdio.",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="ONCEONLY_MCP_TOKEN",
            help="With --http: require 'Authorization: Bearer TOKEN' (needed off loopback).",
        ),
    ] = None,
) -> None:
    """Guard an MCP server: every tools/call runs once per arguments, governed and audited.

    onceonly mcp-proxy --agent support-bot --url sqlite:////abs/ledger.db -- npx -y some-mcp-server
    """
    from ..mcp import require

    require()  # MissingExtraError (the pip command) without the SDK
    import anyio

    from ..mcp.proxy import ProxyConfig, serve_http, serve_stdio

    # stdout is the MCP channel in stdio mode: diagnostics go to stderr only.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
    cfg = ProxyConfig(
        command=command,
        url=url,
        namespace=namespace,
        agent_id=agent,
        scope=scope,
        run_id=run_id,
        on_unknown="retry" if on_unknown is OnUnknown.retry else "raise",
        lease=lease,
        ttl=ttl,
        hints=not ignore_hints,
    )
    if http is None:
        anyio.run(serve_stdio, cfg)
        return
    host, port = _host_port(http)
    if not _loopback(host) and not token:
        raise ConfigError(
            f"--http {host}:{port} is reachable from other machines: pass --token "
            "(or ONCEONLY_MCP_TOKEN), or bind to 127.0.0.1"
        )
    typer.echo(f"OnceOnly MCP proxy on http://{host}:{port}/mcp  (Ctrl+C to stop)", err=True)
    anyio.run(serve_http, cfg, host, port, token)


def register(app: typer.Typer) -> None:
    """Add ``onceonly mcp-proxy`` to a typer app."""
    app.command(
        "mcp-proxy",
        # Everything after the options is the upstream's command, its own options included.
        context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
    )(mcp_proxy)
