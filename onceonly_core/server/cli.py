"""CLI commands for the server: ``onceonly serve``, ``onceonly worker``,
``onceonly server create-key|list-keys|revoke-key`` (also ``onceonly keys create|list|revoke``).

Register them on the main app with one line in ``onceonly_core/cli/app.py``::

    from onceonly_core.server.cli import register; register(app)
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Annotated, Any

import typer

__all__ = ["keys_app", "register", "server_app"]

URL_ENV = "ONCEONLY_DB_URL"

UrlOpt = Annotated[
    str,
    typer.Option(
        "--url",
        envvar=URL_ENV,
        help="Ledger URL: sqlite:///file.db or postgresql+psycopg://...",
    ),
]
MigrateOpt = Annotated[
    bool, typer.Option("--migrate", help="Create or upgrade the schema first (servers).")
]

server_app = typer.Typer(
    name="server",
    help="The self-hosted OnceOnly /v1 server: API keys and tenants.",
    no_args_is_help=True,
)


def _url(url: str) -> str:
    return url or os.environ.get(URL_ENV) or "sqlite:///onceonly.db"


def _handlers(specs: list[str]) -> list[tuple[str, Any]]:
    """``PATTERN=module:function`` → (pattern, callable)."""
    out = []
    for spec in specs:
        pattern, _, target = spec.partition("=")
        module, _, attr = target.partition(":")
        if not pattern or not module or not attr:
            raise typer.BadParameter(f"--handler wants PATTERN=module:function, got {spec!r}")
        out.append((pattern, getattr(importlib.import_module(module), attr)))
    return out


HandlerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--handler",
        help="A key-mode job handler, PATTERN=module:function (repeatable).",
    ),
]


@server_app.command("create-key")
def create_key(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant name (created if new).")],
    url: UrlOpt = "",
    label: Annotated[str | None, typer.Option(help="A note stored with the key.")] = None,
    rate_limit: Annotated[
        float | None, typer.Option(help="Requests per second for this key (per replica).")
    ] = None,
    make_limit: Annotated[
        int | None, typer.Option(help="Monthly check-lock quota of the tenant.")
    ] = None,
    ai_limit: Annotated[int | None, typer.Option(help="Monthly AI lease/run quota.")] = None,
    migrate: MigrateOpt = False,
) -> None:
    """Create an API key and print it. It is shown this once: only its SHA-256 is stored."""
    from . import create_key as make

    key = make(
        _url(url),
        tenant,
        label=label,
        rate_limit=rate_limit,
        make_limit=make_limit,
        ai_limit=ai_limit,
        migrate=migrate,
    )
    typer.echo(key)


@server_app.command("list-keys")
def list_keys(
    url: UrlOpt = "",
    tenant: Annotated[str | None, typer.Option("--tenant")] = None,
) -> None:
    """List keys (id, tenant, prefix; never the key itself)."""
    from .control import ControlPlane

    cp = ControlPlane(_url(url))
    try:
        typer.echo(json.dumps(cp.keys.list_keys(tenant), indent=2))
    finally:
        cp.close()


@server_app.command("revoke-key")
def revoke_key(key_id: str, url: UrlOpt = "") -> None:
    """Revoke a key by id (replicas stop accepting it within 5 seconds)."""
    from .control import ControlPlane

    cp = ControlPlane(_url(url))
    try:
        if not cp.keys.revoke_key(key_id):
            typer.echo(f"no active key {key_id}", err=True)
            raise typer.Exit(1)
        typer.echo(f"revoked {key_id}")
    finally:
        cp.close()


def serve(
    url: UrlOpt = "",
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
    job_workers: Annotated[
        int, typer.Option(help="Job worker threads per process (0: run `onceonly worker`).")
    ] = 1,
    handler: HandlerOpt = None,
    migrate: MigrateOpt = False,
    dashboard: Annotated[
        str | None,
        typer.Option(
            "--dashboard",
            metavar="TENANT",
            help="Also serve the operator dashboard of this tenant on 127.0.0.1.",
        ),
    ] = None,
    dashboard_port: Annotated[int, typer.Option(help="The dashboard's port.")] = 8765,
) -> None:
    """Serve the OnceOnly /v1 API (point onceonly-sdk at http://HOST:PORT/v1)."""
    from . import _require

    _require()
    import uvicorn

    from .control import ControlPlane

    db = _url(url)
    if migrate:
        ControlPlane(db, migrate=True).close()
    if dashboard:
        _dashboard_thread(db, dashboard, dashboard_port)
    os.environ[URL_ENV] = db
    os.environ["ONCEONLY_SERVER_JOB_WORKERS"] = str(job_workers)
    os.environ["ONCEONLY_SERVER_HANDLERS"] = json.dumps(handler or [])
    uvicorn.run(
        "onceonly_core.server.cli:_factory",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
    )


def _dashboard_thread(db: str, tenant: str, port: int) -> None:
    """The dashboard of one tenant, next to the API, in this (the parent) process. It is
    bound to loopback only: it has no API keys, anyone who reaches it can stop agents."""
    import threading

    import uvicorn

    from ..dashboard import create_dashboard

    app = create_dashboard(db, namespace=tenant)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, name="onceonly-dashboard", daemon=True).start()
    typer.echo(f"dashboard of tenant {tenant!r}: http://127.0.0.1:{port}/", err=True)


def _factory() -> Any:
    """The app for uvicorn's worker processes (settings come through the environment)."""
    from . import create_app

    app = create_app(
        os.environ.get(URL_ENV),
        job_workers=int(os.environ.get("ONCEONLY_SERVER_JOB_WORKERS", "1")),
    )
    for pattern, fn in _handlers(json.loads(os.environ.get("ONCEONLY_SERVER_HANDLERS", "[]"))):
        app.state.control.jobs.register(pattern, fn)
    return app


def worker(
    url: UrlOpt = "",
    threads: Annotated[int, typer.Option(help="Job worker threads.")] = 2,
    handler: HandlerOpt = None,
) -> None:
    """Run key-mode job workers (any number, any machine, one database)."""
    from .control import ControlPlane

    cp = ControlPlane(_url(url), job_workers=threads)
    for pattern, fn in _handlers(handler or []):
        cp.jobs.register(pattern, fn)
    try:
        typer.echo(f"onceonly worker: {threads} thread(s) on {cp.jobs.worker_id}", err=True)
        cp.jobs.run_forever()
    finally:
        cp.close()


server_app.command("serve")(serve)
server_app.command("worker")(worker)

#: ``onceonly keys create|list|revoke``: the same commands under the issue's names.
keys_app = typer.Typer(name="keys", help="API keys of the server.", no_args_is_help=True)
keys_app.command("create")(create_key)
keys_app.command("list")(list_keys)
keys_app.command("revoke")(revoke_key)


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``worker`` and the ``server`` and ``keys`` groups to the app."""
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.add_typer(server_app, name="server")
    app.add_typer(keys_app, name="keys")
