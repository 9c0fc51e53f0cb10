"""Connections pinned to threads, for the stores' hot paths.

A thread that keeps one pooled connection between its statements (or transactions)
skips the pool's checkout and checkin, which cost more than a statement on a local
database. Up to ``limit`` threads pin one; the others get None and check one out per
use. A thread's connection goes back (``close()``) when the thread ends and its
thread-local is dropped, when its owner :meth:`~ThreadPins.drop`\\ s it after a driver
error, or on :meth:`~ThreadPins.close_all`; in a forked child the parent's are never
used or closed (:meth:`~ThreadPins.forget`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar


class _Conn(Protocol):
    def close(self) -> Any: ...

    def invalidate(self) -> Any: ...


C = TypeVar("C", bound=_Conn)

#: This process's id, kept current in a forked child (``os.register_at_fork``): the
#: stores compare it on every statement to notice a fork, and ``os.getpid()`` is a
#: system call (~0.13 µs) where this is a list read.
PID = [os.getpid()]


def _after_fork() -> None:
    PID[0] = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

#: A parent's pinned connections, kept referenced in a forked child: finalizing one
#: there would hand the parent's socket (or open database file) back to a pool, or
#: close it under the parent.
_FORKED_AWAY: list[Any] = []


class _Pin(Generic[C]):
    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: C) -> None:
        self.conn = conn


class ThreadPins(Generic[C]):
    """At most ``limit`` threads' own connections (see the module docstring)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0  # threads holding one (read by tests)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: weakref.WeakSet[_Pin[C]] = weakref.WeakSet()

    def get(self, open_one: Callable[[], C]) -> C | None:
        """This thread's connection, pinned now with ``open_one()`` if it has none;
        None when ``limit`` threads hold one already."""
        pin: _Pin[C] | None = getattr(self._local, "pin", None)
        if pin is not None:
            return pin.conn
        with self._lock:
            if self.count >= self.limit:
                return None
            self.count += 1
        try:
            conn = open_one()
        except BaseException:
            with self._lock:
                self.count -= 1
            raise
        pin = _Pin(conn)
        fin = weakref.finalize(pin, _unpin, weakref.ref(self), conn)
        fin.atexit = False  # at exit the engine is disposed anyway
        self._local.pin = pin
        self._all.add(pin)
        return conn

    def drop(self) -> None:
        """Unpin this thread's connection (its finalizer gives it back): after a driver
        error, the thread's next use pins a fresh one."""
        self._local.pin = None

    def close_all(self) -> None:
        """Invalidate every pinned connection (checked out for good, so an engine's
        dispose() would leave them open); a thread that runs again pins afresh."""
        for pin in list(self._all):
            with contextlib.suppress(Exception):
                pin.conn.invalidate()
        self._local = threading.local()
        self._all = weakref.WeakSet()

    def forget(self) -> None:
        """In a forked child: the parent's connections are the parent's. Keep them
        referenced (never finalized here) and count afresh."""
        _FORKED_AWAY.append((self._local, list(self._all)))
        self._local = threading.local()
        self._all = weakref.WeakSet()
        self.count = 0


def dispose(engine: Any) -> None:
    """``engine.dispose()``, and a connection still checked out of the old pool is closed
    when it comes back: otherwise its check-in parks it in a pool that nothing uses any
    more, and it stays open until the garbage collector finds that pool (psycopg then
    warns that a connection was deleted while still open). A statement in flight while
    its store closes (a server request, a job worker) comes back that way."""
    import sqlalchemy as sa

    old = engine.pool
    engine.dispose()
    # Pool events move to the new pool at dispose(); this one is the old pool's alone.
    sa.event.listen(old, "checkin", _close_on_checkin)


def _close_on_checkin(dbapi_connection: Any, _record: Any) -> None:
    if dbapi_connection is not None:
        with contextlib.suppress(Exception):  # already broken: nothing left to close
            dbapi_connection.close()


def _unpin(pins_ref: weakref.ReferenceType[ThreadPins[Any]], conn: _Conn) -> None:
    pins = pins_ref()
    if pins is not None:
        with pins._lock:
            pins.count -= 1
    with contextlib.suppress(Exception):  # a pool closed meanwhile: nothing to return to
        conn.close()
