"""``onceonly retention``: delete expired ledger records, archive and purge old audit rows.

The work is :mod:`onceonly_core.retention`; this module parses options and renders.
``register(app)`` adds the command to the ``onceonly`` app (``app.py`` calls it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from .. import retention
from ..stores import REMOTE_SCHEMES
from ._common import (
    DEFAULT_URL,
    CliError,
    JsonOpt,
    ReadNamespaceOpt,
    UrlOpt,
    _busy,
    _console,
    _emit_json,
    _interactive,
    _open,
)
from .gov import _cutoff, _iso


def retention_command(
    audit_before: Annotated[
        str | None,
        typer.Option(
            "--audit-before",
            help="Also move audit rows recorded before this out of the database: an ISO "
            "date/datetime (UTC unless it says otherwise) or an age like 90d, 12h, 2w.",
            show_default=False,
        ),
    ] = None,
    archive: Annotated[
        Path | None,
        typer.Option(
            "--archive",
            help="Append the audit rows to this JSON-lines file (fsynced) before deleting "
            "them. Required with --audit-before unless --discard.",
            show_default=False,
        ),
    ] = None,
    discard: Annotated[
        bool, typer.Option("--discard", help="Delete old audit rows without archiving them.")
    ] = False,
    records: Annotated[
        bool,
        typer.Option(
            "--records/--no-records",
            help="Delete ledger records whose ttl has elapsed (never running or taken-over ones).",
        ),
    ] = True,
    batch: Annotated[
        int, typer.Option("--batch", min=1, help="Rows deleted per transaction.")
    ] = retention.BATCH,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: UrlOpt = DEFAULT_URL,
    namespace: ReadNamespaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retention: delete expired records; archive, then purge, old audit rows."""
    if audit_before is not None and archive is None and not discard:
        raise CliError("--audit-before needs --archive FILE (or --discard to keep no copy)")
    if archive is not None and audit_before is None:
        raise CliError("--archive goes with --audit-before (which audit rows to move)")
    if url.startswith(REMOTE_SCHEMES):
        raise CliError(
            "remote mode: retention runs on the control plane's server, against its "
            "database (onceonly retention --url <its database URL> there)"
        )
    with _open(url) as store:
        now = store.now()
        cut = None if audit_before is None else _cutoff(audit_before, now)
        if cut is not None and cut > now:
            raise CliError(
                f"--audit-before {audit_before!r} is in the future ({_iso(cut)}): that "
                "would purge rows written from now on too"
            )
        if not yes:
            if as_json or not _interactive():
                raise CliError("deleting records needs confirmation: pass --yes")
            what = []
            if records:
                what.append("delete expired ledger records")
            if cut is not None:
                what.append(
                    f"{'archive and ' if archive else ''}purge audit rows before {_iso(cut)}"
                )
            where = f"namespace {namespace!r}" if namespace else "every namespace"
            if not typer.confirm(f"{' and '.join(what).capitalize()} in {where}?", default=False):
                raise typer.Exit(1)
        t0 = time.perf_counter()
        deleted = 0
        audit = retention.AuditArchived(0, 0, 0)
        with _busy("applying retention …", as_json):
            if records:
                deleted = retention.purge_expired(
                    store, namespace=namespace, before=now, batch=batch
                )
            if cut is not None:
                gov = store.governance_store()
                try:
                    audit = retention.archive_audit(
                        gov,
                        cut,
                        archive,
                        tenants=None if namespace is None else [namespace],
                        batch=batch,
                    )
                finally:
                    gov.close()
        seconds = time.perf_counter() - t0
    if as_json:
        _emit_json(
            {
                "namespace": namespace,
                "records_deleted": deleted,
                "audit_before": cut,
                "audit_archived": audit.archived,
                "audit_purged": audit.purged,
                "archive": None if archive is None else str(archive),
                "seconds": round(seconds, 3),
            }
        )
        return
    detail = f"{deleted} expired records deleted"
    if cut is not None:
        detail += f"; {audit.purged} audit rows before {_iso(cut)} purged"
        detail += f", archived to {archive}" if archive else ""
    _console().print(
        Text.assemble(("retention ", "bold green"), f"{detail} ({seconds:.1f} s)"), soft_wrap=True
    )


def register(app: typer.Typer) -> None:
    """Add ``onceonly retention`` to the ``onceonly`` app."""
    app.command("retention")(retention_command)
