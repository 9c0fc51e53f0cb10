"""The self-hosted OnceOnly ``/v1`` control plane (DESIGN §7), extra ``server``.

``create_app(url)`` builds the FastAPI application over the same engine as the embedded
guard: check-lock and the AI lease keyspace are claims in the ledger, tool-mode runs are
governed calls, policies/audit/timelines are :mod:`onceonly_core.governance`. Every
object is scoped to a tenant (a Guard namespace); API keys are stored as SHA-256 digests.

Importing this package is cheap; FastAPI is imported on first use of ``create_app``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import MissingExtraError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .control import ControlPlane

__all__ = ["ControlPlane", "create_app", "create_key", "run_worker"]


def _require() -> None:
    for module, dist in (("fastapi", "fastapi"), ("uvicorn", "uvicorn")):
        try:
            __import__(module)
        except ImportError:
            raise MissingExtraError("the OnceOnly server", "server", dist) from None


def create_app(url: str | None = None, **options: Any) -> FastAPI:
    """The ``/v1`` application over the ledger at ``url`` (``ONCEONLY_DB_URL``)."""
    _require()
    from .app import create_app as _create

    return _create(url, **options)


def create_key(url: str | None, tenant: str, **options: Any) -> str:
    """Create an API key for ``tenant`` (created if new) and return it; only its
    SHA-256 digest is stored, so this is the one time the key can be seen."""
    from .control import ControlPlane

    cp = ControlPlane(url, job_workers=0, migrate=options.pop("migrate", False))
    try:
        return cp.keys.create_key(tenant, **options)
    finally:
        cp.close()


def run_worker(url: str | None = None, **options: Any) -> None:
    """Run key-mode job workers in this process until interrupted."""
    from .control import ControlPlane

    cp = ControlPlane(url, **options)
    try:
        cp.jobs.run_forever()
    finally:
        cp.close()


def __getattr__(name: str) -> Any:
    if name == "ControlPlane":
        from .control import ControlPlane

        return ControlPlane
    raise AttributeError(name)
