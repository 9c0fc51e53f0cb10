"""The operator dashboard (DESIGN §8): a local web page over the ledger and governance.

``create_dashboard(url)`` builds the ASGI app; ``serve_dashboard(url)`` runs it with
uvicorn on 127.0.0.1. Live calls (executed / dedup / blocked / failed / pending
approval), per-agent spend and caps, run timelines, approvals and the kill switch.
Server-rendered, no build step, no CDN; see ``docs/dashboard.md``.

Importing this package is cheap; FastAPI (the ``server`` extra) is imported on first use.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, MissingExtraError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..guard import Guard

__all__ = ["create_dashboard", "dashboard_server", "is_loopback", "serve_dashboard"]


def _require(*modules: str) -> None:
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            raise MissingExtraError("the dashboard", "server", module) from None


def create_dashboard(
    url: str | None = None,
    *,
    namespace: str | None = None,
    token: str | None = None,
    guard: Guard | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """The dashboard's ASGI app over the ledger at ``url`` (``ONCEONLY_DB_URL``, else
    ``sqlite:///onceonly.db``), for the tenant ``namespace`` (``ONCEONLY_NAMESPACE``,
    else ``default``).

    ``token``: require it once (``/?token=…``), then an HttpOnly SameSite=Strict cookie.
    ``guard``: read through this Guard instead of opening one (it is not closed).
    ``allowed_hosts``: ``Host`` names accepted besides the loopback ones (``"*"``: any).
    """
    _require("fastapi")
    from ..guard import Guard
    from .app import build_app

    if token is not None and not token:
        raise ConfigError("an empty access token protects nothing: pass a real one or None")
    owns = guard is None
    g = guard if guard is not None else Guard(url, namespace=namespace, quiet=True)
    return build_app(g, token=token, allowed_hosts=allowed_hosts, owns_guard=owns)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_dashboard(
    url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    *,
    namespace: str | None = None,
    **uvicorn_options: Any,
) -> None:
    """Serve the dashboard with uvicorn until interrupted. Loopback by default; any other
    bind address needs an access ``token`` (anyone who can reach the port could
    otherwise stop your agents)."""
    _require("fastapi", "uvicorn")
    import uvicorn

    if not is_loopback(host) and not token:
        raise ConfigError(
            f"the dashboard binds to {host!r}, which is not loopback: pass --token so that "
            "only people with the token can use it"
        )
    extra: list[str] = []
    if not is_loopback(host):
        extra = ["*"] if host in ("0.0.0.0", "::", "") else [host]
    app = create_dashboard(url, namespace=namespace, token=token, allowed_hosts=extra)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", **uvicorn_options)
    dashboard_server(config).run()


def dashboard_server(config: Any) -> Any:
    """A ``uvicorn.Server`` for the dashboard app of ``config``: on Ctrl+C / SIGTERM it
    first tells the open event streams to end (a graceful shutdown waits for open
    responses, and every dashboard tab holds one), then shuts down."""
    import uvicorn

    closing = config.app.state.closing

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            closing.set()
            super().handle_exit(sig, frame)

    return Server(config)
