"""Retention: delete expired ledger records and archive old audit rows, in batches.

Two operations, both safe to run while agents call tools, both bounded per transaction:

* :func:`purge_expired` deletes records whose ttl has elapsed (see
  :meth:`Store.purge_expired <onceonly_core.stores.base.Store.purge_expired>` for what
  counts as expired, and why a record taken over or running is never deleted);
* :func:`archive_audit` appends audit rows older than a cut to a JSON-lines file, flushed
  to disk, *then* deletes them with the governance store's ``purge_audit``, which records
  where each agent's chain was cut, so ``onceonly audit verify`` keeps passing.

``onceonly retention`` (``onceonly_core/cli/retention.py``) is the command over these.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .governance.base import GovernanceStore
    from .stores.base import Store

__all__ = ["AuditArchived", "archive_audit", "purge_expired"]

log = logging.getLogger("onceonly")

#: Rows per transaction unless told otherwise: big enough to amortise a commit, small
#: enough that no lock or undo log grows with the table.
BATCH = 1000


def purge_expired(
    store: Store, *, namespace: str | None = None, before: float | None = None, batch: int = BATCH
) -> int:
    """Delete every expired record (of ``namespace``, or of all), ``batch`` per
    transaction; return how many. ``before`` defaults to the store's clock now."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    cut = store.now() if before is None else before
    total = 0
    while True:
        n = store.purge_expired(namespace, cut, batch)
        total += n
        if n < batch:
            break
    if total:
        log.info("retention: deleted %d expired ledger records", total)
    return total


@dataclass(frozen=True)
class AuditArchived:
    """What :func:`archive_audit` did: rows written to the archive and rows purged."""

    archived: int
    purged: int
    batches: int


def archive_audit(
    gov: GovernanceStore,
    before: float,
    archive: Path | str | None,
    *,
    tenants: list[str] | None = None,
    batch: int = BATCH,
) -> AuditArchived:
    """Move audit rows recorded before ``before`` to ``archive`` (JSON lines, appended),
    then delete them, ``batch`` rows (about) per transaction.

    Each batch's rows are written and fsynced before they are deleted: a crash between
    the two leaves a row both archived and in the database (the next run archives it
    again), never neither. ``archive=None`` deletes without a copy."""
    from .stores.govsql import GovStore

    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    if not isinstance(gov, GovStore):
        if archive is not None:
            raise ConfigError(f"{type(gov).__name__}: archiving audit rows needs a SQL ledger")
        purged = sum(gov.purge_audit(t, before) for t in tenants or [])
        return AuditArchived(0, purged, 1 if purged else 0)
    archived = purged = batches = 0
    out: IO[str] | None = None
    try:
        if archive is not None:
            out = open(archive, "a", encoding="utf-8")  # noqa: SIM115 - closed below
        for tenant in tenants if tenants is not None else _tenants(gov):
            for low, cut, rows in _batches(gov, tenant, before, batch):
                if out is not None:
                    for row in rows:
                        out.write(json.dumps(row, sort_keys=True, default=str) + "\n")
                    # Durable before the delete: the archive is the only copy after it.
                    out.flush()
                    os.fsync(out.fileno())
                n = gov.purge_audit(tenant, cut, after=low)
                if n != len(rows):  # another purge ran at the same time
                    log.warning(
                        "retention: %s: archived %d audit rows before %s, purged %d",
                        tenant,
                        len(rows),
                        cut,
                        n,
                    )
                archived += len(rows) if out is not None else 0
                purged += n
                batches += 1
    finally:
        if out is not None:
            out.close()
    if purged:
        log.info("retention: archived %d and purged %d audit rows", archived, purged)
    return AuditArchived(archived, purged, batches)


def _tenants(gov: Any) -> list[str]:
    import sqlalchemy as sa

    from .stores import schema as S

    with gov.engine.connect() as conn:
        return sorted(r[0] for r in conn.execute(sa.select(S.audit_heads.c.tenant).distinct()))


def _batches(
    gov: Any, tenant: str, before: float, batch: int
) -> Iterator[tuple[float | None, float, list[dict[str, Any]]]]:
    """(low, cut, rows) per batch: exactly the rows ``purge_audit(tenant, cut)`` deletes,
    none older than ``low`` (the previous batch's cut, which the caller purged before
    asking for the next; None at first): the ``after`` to give ``purge_audit``.

    ``purge_audit`` deletes, per agent, every row up to the last one recorded before the
    cut. The cut is the time of the ``batch``-th oldest row still there, so a batch holds
    about ``batch`` rows (rows sharing one timestamp go together)."""
    import sqlalchemy as sa

    from .stores import schema as S

    au, h = S.audit, S.audit_heads
    low: float | None = None  # no row older than this is left (the previous cut)
    while True:
        mine = au.c.tenant == tenant
        if low is not None:
            # Read the time index from the last cut on: on PostgreSQL the rows earlier
            # batches deleted stay in it until a vacuum, and walking past them again on
            # every batch would cost time in the square of the rows.
            mine = sa.and_(mine, au.c.created_at >= low)
        with gov.engine.connect() as conn:
            nth = conn.execute(
                sa.select(au.c.created_at)
                .where(mine, au.c.created_at < before)
                .order_by(au.c.created_at)
                .limit(1)
                .offset(batch - 1)
            ).scalar()
            if nth is None:
                cut = before
            else:
                cut = float(nth)
                first = conn.execute(sa.select(sa.func.min(au.c.created_at)).where(mine)).scalar()
                if first is not None and float(first) >= cut:  # a whole batch at one time
                    cut = min(before, math.nextafter(cut, math.inf))
            # Per agent, its rows up to the last one before the cut: one range of the
            # chain's unique index each, from the chain's base (the rows below were
            # purged by earlier batches), so a batch costs its own rows, not the table's.
            last = conn.execute(
                sa.select(au.c.agent_id, sa.func.max(au.c.seq))
                .where(mine, au.c.created_at < cut)
                .group_by(au.c.agent_id)
            ).all()
            bases = dict(
                conn.execute(
                    sa.select(h.c.agent_id, h.c.base_seq).where(h.c.tenant == tenant)
                ).all()
            )
            rows = []
            for agent, top in last:
                rows += [
                    r._asdict()
                    for r in conn.execute(
                        sa.select(au).where(
                            au.c.tenant == tenant,
                            au.c.agent_id == agent,
                            au.c.seq > bases.get(agent, 0),
                            au.c.seq <= top,
                        )
                    ).all()
                ]
            rows.sort(key=lambda r: (r["created_at"], r["id"]))
        if not rows:
            return
        yield low, cut, rows
        if cut >= before:
            return
        low = cut  # the caller purged up to the cut before asking for more
