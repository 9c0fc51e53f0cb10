"""CLI commands for the server: ``onceonly serve``, ``onceonly worker`` and
``onceonly keys create|list|revoke``.

Each command has one home. The older spellings ``onceonly server create-key|list-keys|
revoke-key|serve|worker`` still work as hidden aliases of the same functions (scripts keep
running), but help and the docs only show the home.

``app.py`` registers them on the main app (:func:`register`).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
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
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
MigrateOpt = Annotated[
    bool, typer.Option("--migrate", help="Create or upgrade the schema first (servers).")
]

#: ``onceonly server ...``: hidden aliases of ``keys``, ``serve`` and ``worker``.
server_app = typer.Typer(
    name="server",
    help="Old spellings, kept working: server create-key | list-keys | revoke-key are "
    "onceonly keys create | list | revoke; server serve | worker are onceonly serve | worker.",
    no_args_is_help=True,
)


def _url(url: str) -> str:
    return url or os.environ.get(URL_ENV) or "sqlite:///onceonly.db"


def _cwd_importable() -> None:
    """Put the working directory first on ``sys.path``, as uvicorn and celery do, so
    ``--handler jobs:send`` finds ./jobs.py. A console script's sys.path holds the
    script's directory, not the one it runs in. Processes spawned later (uvicorn's
    ``--workers``) inherit the parent's sys.path."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _handlers(specs: list[str]) -> list[tuple[str, Any]]:
    """``PATTERN=module:function`` → (pattern, callable)."""
    _cwd_importable()
    out = []
    for spec in specs:
        pattern, _, target = spec.partition("=")
        module, _, attr = target.partition(":")
        if not pattern or not module or not attr:
            raise typer.BadParameter(f"--handler wants PATTERN=module:function, got {spec!r}")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise typer.BadParameter(
                f"--handler {spec!r}: cannot load {module}:{attr} ({err}); the module is "
                f"imported from the working directory ({os.getcwd()}) or an installed package"
            ) from None
        out.append((pattern, fn))
    return out


HandlerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--handler",
        help="A key-mode job handler, PATTERN=module:function (repeatable).",
    ),
]


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
    as_json: JsonOpt = False,
) -> None:
    """Create an API key and print it. It is shown this once: only its SHA-256 is stored."""
    from ..server import create_key as make

    key = make(
        _url(url),
        tenant,
        label=label,
        rate_limit=rate_limit,
        make_limit=make_limit,
        ai_limit=ai_limit,
        migrate=migrate,
    )
    typer.echo(json.dumps({"tenant": tenant, "key": key}) if as_json else key)


def list_keys(
    url: UrlOpt = "",
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List keys (id, tenant, prefix, limits; never the key itself)."""
    from ..server.control import ControlPlane

    cp = ControlPlane(_url(url))
    try:
        rows = cp.keys.list_keys(tenant)
    finally:
        cp.close()
    missed = not rows and tenant is not None  # a named tenant with no key: nothing matched
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif not rows:
        typer.echo("No API keys" + (f" for tenant {tenant!r}." if tenant else "."), err=True)
    if missed:
        raise typer.Exit(1)
    if as_json or not rows:
        return
    from ._common import _console, _table, _when

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        if value is None:
            return ""
        return _when(value) if column in ("created_at", "revoked_at") else str(value)

    table = _table("API keys")
    columns = ("id", "tenant", "prefix", "label", "rate_limit", "created_at", "revoked_at")
    for column in columns:
        table.add_column(column.replace("_at", "").replace("_", " "), overflow="fold")
    for row in rows:
        table.add_row(*(cell(row, c) for c in columns))
    _console().print(table)


def revoke_key(
    key_id: Annotated[str, typer.Argument(help="The key's id (onceonly keys list).")],
    url: UrlOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key by id (replicas stop accepting it within 5 seconds)."""
    from ..server.control import ControlPlane

    cp = ControlPlane(_url(url))
    try:
        if not cp.keys.revoke_key(key_id):
            typer.echo(f"error: no active key {key_id!r} (see: onceonly keys list)", err=True)
            raise typer.Exit(1)
        typer.echo(json.dumps({"id": key_id, "revoked": True}) if as_json else f"revoked {key_id}")
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
    threads: Annotated[
        int | None,
        typer.Option(
            help="Request threads per worker process (default: 2 x CPUs, from 4 to 16); "
            "each holds one pooled database connection (PostgreSQL's max_connections must "
            "cover workers x threads x 2).",
            min=1,
        ),
    ] = None,
    access_log: Annotated[
        bool,
        typer.Option(
            "--access-log/--no-access-log",
            help="Log one line per request (uvicorn's access log; costs ~5% of a request).",
        ),
    ] = False,
    inline: Annotated[
        bool,
        typer.Option(
            "--inline/--no-inline",
            help="Run /v1/check-lock and a key-mode /v1/ai/run on the event loop when the "
            "worker has no other request in progress (a quarter less latency at low load); "
            "--no-inline: always in the thread pool.",
        ),
    ] = True,
) -> None:
    """Serve the OnceOnly /v1 API (point onceonly-sdk at http://HOST:PORT/v1)."""
    from ..server import _require

    _require()
    import uvicorn

    _cwd_importable()

    from ..server.control import ControlPlane

    db = _url(url)
    if migrate:
        ControlPlane(db, migrate=True).close()
    if dashboard:
        _dashboard_thread(db, dashboard, dashboard_port)
    os.environ[URL_ENV] = db
    os.environ["ONCEONLY_SERVER_JOB_WORKERS"] = str(job_workers)
    os.environ["ONCEONLY_SERVER_HANDLERS"] = json.dumps(handler or [])
    if threads is not None:
        os.environ["ONCEONLY_SERVER_THREADS"] = str(threads)
    os.environ["ONCEONLY_SERVER_INLINE"] = "1" if inline else "0"
    uvicorn.run(
        "onceonly_core.cli.server:_factory",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=access_log,
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
    from ..server import create_app

    threads = os.environ.get("ONCEONLY_SERVER_THREADS")
    app = create_app(
        os.environ.get(URL_ENV),
        job_workers=int(os.environ.get("ONCEONLY_SERVER_JOB_WORKERS", "1")),
        threads=int(threads) if threads else None,  # None: default_threads()
        inline=os.environ.get("ONCEONLY_SERVER_INLINE", "1") != "0",
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
    from ..server.control import ControlPlane

    _cwd_importable()
    cp = ControlPlane(_url(url), job_workers=threads)
    for pattern, fn in _handlers(handler or []):
        cp.jobs.register(pattern, fn)
    try:
        typer.echo(f"onceonly worker: {threads} thread(s) on {cp.jobs.worker_id}", err=True)
        cp.jobs.run_forever()
    finally:
        cp.close()


#: ``onceonly keys create|list|revoke``: the home of the API-key commands.
keys_app = typer.Typer(name="keys", help="API keys of the /v1 server.", no_args_is_help=True)
keys_app.command("create")(create_key)
keys_app.command("list")(list_keys)
keys_app.command("revoke")(revoke_key)

# The old spellings: the same functions, hidden from help and completion.
for _name, _fn in (
    ("create-key", create_key),
    ("list-keys", list_keys),
    ("revoke-key", revoke_key),
    ("serve", serve),
    ("worker", worker),
):
    server_app.command(_name, hidden=True)(_fn)
del _name, _fn


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``worker`` and ``keys`` (plus the hidden ``server`` aliases)."""
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.add_typer(keys_app, name="keys")
    app.add_typer(server_app, name="server", hidden=True)
