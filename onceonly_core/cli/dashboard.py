"""``onceonly dashboard``: serve the dashboard on 127.0.0.1.

``app.py`` registers it on the main app (:func:`register`).
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
from typing import Annotated

import typer

__all__ = ["dashboard", "register"]


def dashboard(
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="ONCEONLY_DB_URL",
            help="Ledger URL (default sqlite:///onceonly.db).",
        ),
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option(
            "--namespace", envvar="ONCEONLY_NAMESPACE", help="Tenant (default 'default')."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Bind address; non-loopback needs --token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="ONCEONLY_DASHBOARD_TOKEN",
            help="Require this access token ('auto': generate one).",
        ),
    ] = None,
) -> None:
    """Live calls, agents' spend and caps, run timelines, approvals and the kill switch."""
    from ..dashboard import _require, create_dashboard, dashboard_server, is_loopback
    from ..errors import ConfigError, MissingExtraError

    if token == "auto":
        token = secrets.token_urlsafe(24)
    if not is_loopback(host) and not token:  # a usage error: status 2, like a bad option
        typer.echo(
            f"error: the dashboard binds to {host!r}, which is not loopback: pass --token so "
            "that only people with the token can use it",
            err=True,
        )
        raise typer.Exit(2)
    try:
        _require("fastapi", "uvicorn")
        # Bind before saying where we are: a port in use is reported as such, with exit
        # status 1, instead of a banner followed by uvicorn's traceback.
        sock = _bind(host, port)
        extra: list[str] = []
        if not is_loopback(host):
            extra = ["*"] if host in ("0.0.0.0", "::", "") else [host]
        app = create_dashboard(
            url or os.environ.get("ONCEONLY_DB_URL"),
            namespace=namespace,
            token=token,
            allowed_hosts=extra,
        )
    except (ConfigError, MissingExtraError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    import uvicorn

    shown = "localhost" if is_loopback(host) else host
    where = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/"
    if token:
        where += f"?token={token}"
    typer.echo(f"OnceOnly dashboard on {where}  (Ctrl+C to stop)")
    # Ctrl+C ends the open live-event streams first, then the server (dashboard_server).
    dashboard_server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or an OSError that says what to do."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise OSError(f"cannot resolve the bind address {host!r}: {err}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restarted dashboard may rebind while old connections linger.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise OSError(
                f"port {port} on {host} is already in use (another dashboard?): stop it, "
                "or pass --port with a free port"
            ) from None
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def register(app: typer.Typer) -> None:
    """Add ``onceonly dashboard`` to a typer app."""
    app.command("dashboard")(dashboard)
