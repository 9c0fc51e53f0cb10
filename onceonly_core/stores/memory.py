"""An in-process store: a dict behind one lock. Public, for users' tests.

``MemoryStore(clock=...)`` accepts a clock so tests can move time (expire leases and
TTLs) without sleeping. It keeps nothing across processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import CLEARED, FAILED, RUNNING, SUCCEEDED, NewClaim, Record, Store

__all__ = ["MemoryStore"]

if TYPE_CHECKING:
    from .governance import GovernanceStore


class MemoryStore(Store):
    """Every primitive runs under one lock, so each is atomic like a SQL statement."""

    blocking = False
    kind = "memory"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._rows: dict[tuple[str, str], Record] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    @staticmethod
    def _out(rec: Record, now: float, mine: bool = False) -> Record:
        # A copy (the caller must not see later writes to the stored row), built by
        # position: dataclasses.replace() costs several times this on every primitive.
        return Record(*rec.stored(), now, mine)

    def get(self, namespace: str, key: str) -> Record | None:
        with self._lock:
            rec = self._rows.get((namespace, key))
            return None if rec is None else self._out(rec, self._clock())

    def claim(self, namespace: str, key: str, new: NewClaim) -> Record:
        with self._lock:
            now = self._clock()
            rec = self._rows.get((namespace, key))
            if rec is not None:
                return self._out(rec, now)
            rec = Record(
                namespace=namespace,
                key=key,
                tool=new.tool,
                state=RUNNING,
                token=1,
                owner=new.owner,
                attempt=1,
                executions=0,
                lease_until=now + new.lease,
                expires_at=None,
                args_digest=new.args_digest,
                result=None,
                error=None,
                run_id=new.run_id,
                caller=new.caller,
                created_at=now,
                updated_at=now,
            )
            self._rows[(namespace, key)] = rec
            return self._out(rec, now, mine=True)

    def take_over(
        self, namespace: str, key: str, seen: Record, new: NewClaim, *, force: bool = False
    ) -> Record | None:
        with self._lock:
            now = self._clock()
            rec = self._rows.get((namespace, key))
            if rec is None or rec.token != seen.token:
                return None
            if not force:
                if rec.state != seen.state:
                    return None
                if rec.state == RUNNING and (rec.lease_until or 0) >= now:
                    return None
            rec.state = RUNNING
            rec.token += 1
            rec.owner = new.owner
            rec.attempt += 1
            rec.lease_until = now + new.lease
            rec.tool = new.tool
            rec.args_digest = new.args_digest
            rec.run_id = new.run_id
            rec.caller = new.caller
            rec.error = None
            rec.updated_at = now
            return self._out(rec, now, mine=True)

    def finish(
        self,
        namespace: str,
        key: str,
        token: int,
        *,
        ok: bool,
        result: str | None = None,
        error: str | None = None,
        ttl: float | None = None,
    ) -> bool:
        with self._lock:
            now = self._clock()
            rec = self._rows.get((namespace, key))
            if rec is None or rec.token != token or rec.state != RUNNING:
                return False
            rec.state = SUCCEEDED if ok else FAILED
            rec.result = result
            rec.error = error
            if ok:
                rec.executions += 1
            rec.lease_until = None
            rec.expires_at = None if ttl is None else now + ttl
            rec.updated_at = now
            return True

    def heartbeat(self, namespace: str, key: str, token: int, lease: float) -> bool:
        with self._lock:
            now = self._clock()
            rec = self._rows.get((namespace, key))
            if rec is None or rec.token != token or rec.state != RUNNING:
                return False
            rec.lease_until = now + lease
            rec.updated_at = now
            return True

    def clear(self, namespace: str, key: str) -> bool | None:
        with self._lock:
            now = self._clock()
            rec = self._rows.get((namespace, key))
            if rec is None:
                return None
            if rec.state == RUNNING and (rec.lease_until or 0) >= now:
                return False
            rec.state = CLEARED
            rec.updated_at = now
            return True

    def clear_namespace(self, namespace: str) -> int:
        with self._lock:
            now = self._clock()
            n = 0
            for (ns, _), rec in self._rows.items():
                if ns != namespace or rec.state == CLEARED:
                    continue
                if rec.state == RUNNING and (rec.lease_until or 0) >= now:
                    continue
                rec.state = CLEARED
                rec.updated_at = now
                n += 1
            return n

    def list(
        self,
        *,
        namespace: str | None = None,
        prefix: bool = False,
        state: str | None = None,
        tool: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Record]:
        with self._lock:
            now = self._clock()
            rows = [
                self._out(r, now)
                for (ns, _), r in self._rows.items()
                if (
                    namespace is None
                    or ns == namespace
                    or (prefix and ns.startswith(namespace + "/"))
                )
                and (state is None or r.state == state)
                and (tool is None or r.tool == tool)
                and (since is None or r.updated_at > since)
            ]
        rows.sort(key=lambda r: (r.updated_at, r.key), reverse=True)
        return rows[:limit]

    def purge_expired(self, namespace: str | None, before: float, limit: int = 1000) -> int:
        with self._lock:
            gone = [
                k
                for k, r in self._rows.items()
                if (namespace is None or k[0] == namespace)
                and r.state == SUCCEEDED
                and r.token == 1
                and r.expires_at is not None
                and r.expires_at <= before
            ][:limit]
            for k in gone:
                del self._rows[k]
            return len(gone)

    def governance_store(self) -> GovernanceStore:
        from .govsql import GovStore

        return GovStore(self)
