"""Notifications from the shell: ``onceonly notify list | retry | deliver`` (the outbox's
dead-letter view and its deliverer; ``docs/notifications.md``).

``register(app)`` adds ``notify`` to the ``onceonly`` app (``app.py`` calls it).
"""

import contextlib
import time
from enum import Enum
from typing import Annotated

import typer
from rich.text import Text

from ..governance.outbox import Deliverer, Settings
from ._common import (
    DEFAULT_URL,
    CliError,
    JsonOpt,
    UrlOpt,
    _console,
    _emit_json,
    _note,
    _table,
    _when,
)
from .gov import DEFAULT_NAMESPACE, NamespaceOpt, _governance

notify_app = typer.Typer(
    help="Notifications (the outbox): list, retry dead ones, deliver.", no_args_is_help=True
)
STATE_STYLES = {"pending": "yellow", "delivered": "green", "dead": "red"}


class OutboxState(str, Enum):
    pending = "pending"
    delivered = "delivered"
    dead = "dead"
    all = "all"


@notify_app.command("list")
def notify_list(
    state: Annotated[
        OutboxState, typer.Option("--state", help="Only notifications in this state.")
    ] = OutboxState.all,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many rows.")] = 100,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Notifications in the outbox, newest first (redacted); --state dead: dead letters."""
    with _governance(url, namespace) as gov:
        rows = gov.deliverer().list(None if state is OutboxState.all else state.value, limit)
        if as_json:
            _emit_json(rows)
            return
        if not rows:
            which = "" if state is OutboxState.all else f"{state.value} "
            _note(f"No {which}notifications in namespace {namespace!r}.")
            return
        table = _table(f"Notifications in {namespace}")
        for name in ("id", "state", "event", "destination", "tries", "created", "last error"):
            table.add_column(name, overflow="fold")
        for r in rows:
            table.add_row(
                r["id"],
                Text(r["state"], style=STATE_STYLES.get(r["state"], "")),
                f"{r['event_type']} {r['event_id']}",
                r["destination"],
                str(r["attempts"]),
                _when(r["created_at"]),
                r["last_error"] or "",
            )
        _console().print(table)


@notify_app.command("retry")
def notify_retry(
    row_id: Annotated[str, typer.Argument(help="The notification id (ntf_...).")],
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Send a dead notification again (same event id: receivers dedupe)."""
    with _governance(url, namespace, write=True) as gov:
        if not gov.deliverer().retry(row_id):
            raise CliError(
                f"no dead or pending notification {row_id!r} in namespace {namespace!r} "
                f"(see: onceonly notify list --state dead --namespace {namespace})"
            )
        if as_json:
            _emit_json({"id": row_id, "state": "pending"})
            return
        _console().print(Text.assemble(("retrying ", "bold green"), f"{row_id}: due now"))


@notify_app.command("deliver")
def notify_deliver(
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep delivering until interrupted.")
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0, help="Seconds to keep retrying pending rows.")
    ] = 30.0,
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", help="Deliver every namespace's outbox.")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Deliver due notifications; safe beside a server or other deliverers."""
    with _governance(url, namespace) as gov:
        if not getattr(gov.store, "local_delivery", True):
            raise CliError(
                "remote mode: the control plane delivers its own outbox (onceonly serve "
                "does, in the background); list and retry work from here"
            )
        d = Deliverer(
            gov.store,  # type: ignore[arg-type]
            Settings.from_env(),
            tenant=None if all_namespaces else namespace,
        )
        try:
            if follow:
                with contextlib.suppress(KeyboardInterrupt):
                    d.run()
            done = d.drain(timeout) if not follow else True
            left, _ = d.pending()
        finally:
            d.close()
        if as_json:
            _emit_json({"idle": done, "pending": left, "at": time.time()})
            return
        if left:
            _note(f"{left} notification(s) still pending: retried by the next deliverer")
        else:
            _note("every notification is delivered or dead (see: onceonly notify list)")


def register(app: typer.Typer) -> None:
    """Add ``onceonly notify list | retry | deliver`` to the ``onceonly`` app."""
    app.add_typer(notify_app, name="notify")
