"""Tool spans on the run timeline: a LlamaIndex instrumentation span handler.

Observe only: LlamaIndex's instrumentation cannot veto a call (the guarded tools do
that). The handler records every tool span — guarded or not — as one ``tool_span``
event on the OnceOnly run timeline, so a user sees all of an agent's tools in one place,
next to the decisions the guard records for the governed ones.

Which run a span belongs to is read from the span's own context, never from shared
state: ``instrument(...)`` claims only the spans started inside its block (a context
variable, so two concurrent ``with instrument(...)`` blocks never record each other's
spans), and without an explicit ``run_id`` a span goes to ``with guard.run(...)``'s run,
else to the LlamaIndex workflow run it was started in (``llamaindex.run_id``).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from llama_index.core.instrumentation.span import SimpleSpan
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.tools.types import BaseTool, ToolOutput
from llama_index_instrumentation import get_dispatcher  # llama-index-core re-exports it
from pydantic import PrivateAttr

from onceonly_core import Guard, current_run_id
from onceonly_core import guard as default_guard

from ._tools import RUN_ID_TAG, GuardedFunctionTool, GuardedTool, GuardedToolOutput

__all__ = ["EVENT_TYPE", "OnceOnlySpanHandler", "instrument"]

log = logging.getLogger("onceonly.llamaindex")

#: The timeline event type of one finished tool span.
EVENT_TYPE = "tool_span"

RunId = str | Callable[[], str | None] | None
_STOP = object()

# The handlers of the `instrument(...)` blocks this code runs inside. Context-local: an
# asyncio task (and every workflow step it starts) sees only its own blocks.
_claimed: contextvars.ContextVar[frozenset[object]] = contextvars.ContextVar(
    "onceonly_llamaindex_instrument", default=frozenset()
)


def _inner(tool: Any) -> Any:
    return tool.inner if isinstance(tool, (GuardedFunctionTool, GuardedTool)) else None


class OnceOnlySpanHandler(BaseSpanHandler[SimpleSpan]):
    """Records tool spans (``call`` / ``acall`` / ``__call__`` of any ``BaseTool``).

    ``run_id`` is the timeline to write to: a string, or a function returning the current
    one (it returns ``None``: skip the span). Without one, each span goes to the run it
    was started in: ``with guard.run(...)``, else its LlamaIndex workflow run (no run:
    skipped). Events are written by a background thread so a span never waits on the
    database; :meth:`flush` waits for them. A failed write is logged, never raised into
    the agent. ``scoped=True`` (what :func:`instrument` sets) records only the spans
    started inside the ``instrument`` block that owns the handler.
    """

    _guard: Guard | None = PrivateAttr(default=None)
    _run_id: RunId = PrivateAttr(default=None)
    _agent_id: str | None = PrivateAttr(default=None)
    _tools: dict[str, tuple[Any, float, str | None]] = PrivateAttr(default_factory=dict)
    _queue: queue.Queue[Any] = PrivateAttr(default_factory=queue.Queue)
    _thread: threading.Thread | None = PrivateAttr(default=None)
    _start_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _scoped: bool = PrivateAttr(default=False)
    # What an `instrument` block puts in _claimed: a token of its own, never an id() that
    # a later handler could reuse while a task of the old block still runs.
    _claim: object = PrivateAttr(default_factory=object)

    def __init__(
        self,
        guard: Guard | None = None,
        *,
        run_id: RunId = None,
        agent_id: str | None = None,
        scoped: bool = False,
    ) -> None:
        super().__init__(open_spans={}, completed_spans=[], dropped_spans=[], current_span_ids={})
        self._guard = guard
        self._run_id = run_id
        self._agent_id = agent_id
        self._scoped = scoped

    @classmethod
    def class_name(cls) -> str:
        return "OnceOnlySpanHandler"

    # -- span lifecycle ---------------------------------------------------------------
    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        if not isinstance(instance, BaseTool):
            return None
        if self._scoped and self._claim not in _claimed.get():
            return None  # another block's run (or none): not ours to record
        parent = self._tools.get(parent_span_id) if parent_span_id else None
        # One span per logical call: FunctionTool.__call__ -> call, a sync tool's async
        # adapter, and a guarded wrapper -> its inner tool are the same call.
        if parent is not None:
            outer = parent[0]
            if outer is instance or _inner(outer) is instance or _inner(instance) is outer:
                return None
            if getattr(outer, "base_tool", None) is instance:  # BaseToolAsyncAdapter
                return None
        run_id = self._resolve_run_id(tags)
        if run_id is None:
            return None
        self._tools[id_] = (instance, time.perf_counter(), run_id)
        return SimpleSpan(id_=id_, parent_id=parent_span_id, tags=tags or {})

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        span = self.open_spans.get(id_)
        entry = self._tools.pop(id_, None)
        if span is None or entry is None:
            return None
        is_error = isinstance(result, ToolOutput) and result.is_error
        data: dict[str, Any] = {"is_error": is_error}
        if isinstance(result, GuardedToolOutput) and result.code is not None:
            data["code"] = result.code  # what the guard decided (the contract code)
        self._record(entry, id_, span, "error" if is_error else "ok", data)
        return span

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        span = self.open_spans.get(id_)
        entry = self._tools.pop(id_, None)
        if span is None or entry is None:
            return None
        data = {"is_error": True, "error_type": type(err).__name__ if err else None}
        self._record(entry, id_, span, "exception", data)
        return span

    # -- writing ----------------------------------------------------------------------
    def _resolve_run_id(self, tags: dict[str, Any] | None) -> str | None:
        rid = self._run_id
        if rid is None:
            live = (tags or {}).get(RUN_ID_TAG)
            return current_run_id() or (live if isinstance(live, str) and live else None)
        if callable(rid):
            try:
                return rid()
            except Exception:
                log.exception("run_id callable failed; span not recorded")
                return None
        return rid

    def _record(
        self,
        entry: tuple[Any, float, str | None],
        span_id: str,
        span: SimpleSpan,
        status: str,
        data: dict[str, Any],
    ) -> None:
        tool, started, run_id = entry
        if run_id is None:
            return
        name = tool.metadata.name
        data.update(
            framework="llamaindex",
            span_id=span_id,
            parent_span_id=span.parent_id,
            method=span_id.split("-", 1)[0].rsplit(".", 1)[-1],
            governed=isinstance(tool, (GuardedFunctionTool, GuardedTool)),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        self._ensure_writer()
        self._queue.put((run_id, name, status, data))

    def _ensure_writer(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._write_loop, name="onceonly-llamaindex-timeline", daemon=True
                )
                self._thread.start()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                run_id, name, status, data = item
                guard = self._guard if self._guard is not None else default_guard
                guard.gov.post_event(
                    run_id, EVENT_TYPE, agent_id=self._agent_id, tool=name, status=status, data=data
                )
            except Exception:  # observe only: a timeline write never breaks the agent
                log.exception("could not record a LlamaIndex tool span on the timeline")
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every recorded span is on the timeline."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        """Flush and stop the writer (LlamaIndex calls this on dispatcher shutdown)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join()
        self._thread = None


@contextlib.contextmanager
def instrument(
    guard: Guard | None = None,
    *,
    run_id: RunId = None,
    agent_id: str | None = None,
) -> Iterator[OnceOnlySpanHandler]:
    """Record the tool spans started inside the block on the run timeline; flush at the end.

    ``with instrument(guard, run_id="run-7"): await agent.run(...)``; without ``run_id``,
    each span goes to its own run (``guard.run(...)``, else the LlamaIndex run it belongs
    to). Only spans started inside this block (this thread or task, and the workflow steps
    it starts) are recorded, so concurrent blocks never mix their runs. For an app-wide
    handler, ``get_dispatcher().add_span_handler(OnceOnlySpanHandler(guard))``.
    """
    handler = OnceOnlySpanHandler(guard, run_id=run_id, agent_id=agent_id, scoped=True)
    root = get_dispatcher()
    token = _claimed.set(_claimed.get() | {handler._claim})
    root.add_span_handler(handler)
    try:
        yield handler
    finally:
        _claimed.reset(token)
        # A plain list on the root dispatcher; LlamaIndex has no remove_span_handler.
        with contextlib.suppress(ValueError):
            root.span_handlers.remove(handler)
        handler.close()
