"""``onceonly dashboard``: serve the dashboard on 127.0.0.1.

Register it on the main app with one line in ``onceonly_core/cli/app.py``::

    from onceonly_core.dashboard.cli import register as _dash; _dash(app)
"""

from __future__ import annotations

import os
import secrets
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
    from ..errors import ConfigError, MissingExtraError
    from . import is_loopback, serve_dashboard

    if token == "auto":
        token = secrets.token_urlsafe(24)
    shown = "localhost" if is_loopback(host) else host
    where = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/"
    if token:
        where += f"?token={token}"
    typer.echo(f"OnceOnly dashboard on {where}  (Ctrl+C to stop)")
    try:
        serve_dashboard(
            url or os.environ.get("ONCEONLY_DB_URL"), host, port, token, namespace=namespace
        )
    except (ConfigError, MissingExtraError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    """Add ``onceonly dashboard`` to a typer app."""
    app.command("dashboard")(dashboard)
