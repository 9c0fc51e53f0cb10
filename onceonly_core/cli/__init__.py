"""The ``onceonly`` command: read and repair the ledger, migrate it, run the demo.

It needs the ``cli`` extra (typer + rich): ``pip install "onceonly-core[cli]"``. This
module imports neither until :func:`main` or :func:`build_app` runs, so the core install
(and ``import onceonly_core``) never needs them; without them, ``onceonly`` prints the
pip command and exits with status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import MissingExtraError

if TYPE_CHECKING:
    import typer

__all__ = ["build_app", "main"]

_CLI_DEPENDENCIES = ("typer", "rich")


def build_app() -> typer.Typer:
    """The typer application (raises MissingExtraError without the ``cli`` extra)."""
    for module in _CLI_DEPENDENCIES:
        try:
            __import__(module)
        except ImportError:
            raise MissingExtraError("the onceonly CLI", "cli", module) from None
    from .app import app

    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``onceonly``)."""
    try:
        app = build_app()
    except MissingExtraError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    app(args=None if argv is None else list(argv), prog_name="onceonly")
