"""The typer application behind ``onceonly`` (imported only when typer and rich exist)."""

import json
import sqlite3
import sys
import time
from collections.abc import Sequence
from enum import Enum
from typing import Annotated, Any, NoReturn

import sqlalchemy as sa
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from .. import __version__
from ..errors import ConfigError, OnceOnlyError, SchemaError, StoreError
from ..stores import (
    CLEARED,
    FAILED,
    REDIS_SCHEMES,
    REMOTE_SCHEMES,
    RUNNING,
    STATES,
    SUCCEEDED,
    Record,
    Store,
    check_url,
)
from ._common import (
    DEFAULT_URL,
    NAMESPACE_ENV,
    URL_ENV,
    CliError,
    JsonOpt,
    ReadNamespaceOpt,
    UrlOpt,
    _busy,
    _console,
    _emit_json,
    _interactive,
    _note,
    _open,
    _session,
    _short_key,
    _shown,
    _table,
    _when,
)
from .dashboard import register as _register_dashboard
from .doctor import doctor as _doctor
from .gov import register as _register_gov
from .mcp import register as _register_mcp
from .notify import register as _register_notify
from .retention import register as _register_retention
from .server import register as _register_server

STATE_STYLES = {RUNNING: "yellow", SUCCEEDED: "green", FAILED: "red", CLEARED: "dim"}


# -- errors: one message, exit status 1, no traceback --------------------------------------


def _fail(message: str) -> NoReturn:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(1)


class _Group(TyperGroup):
    """Turns the ledger's own errors into a message and exit status 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except SchemaError as err:
            url = _shown(_session.url)
            hint = "" if "--url" in str(err) else f"\nrun: onceonly migrate --url '{url}'"
            _fail(f"{err}{hint}")
        except CliError as err:
            _fail(str(err))
        except StoreError as err:
            url = _shown(_session.url)
            lines = str(err).strip().splitlines()
            text = "\n".join(lines[:4])
            hint = f"Check the URL (--url or {URL_ENV})"
            if url.startswith(REMOTE_SCHEMES):
                hint += " and that the onceonly serve server is running and reachable"
            elif url.startswith(REDIS_SCHEMES):
                hint += " and that the Redis server is running and reachable"
            elif not url.startswith("sqlite"):
                hint += (
                    " and that the database server is running; a new database needs: "
                    f"onceonly migrate --url '{url}'"
                )
            _fail(f"{text}\n{hint}")
        except OnceOnlyError as err:  # ConfigError, MissingExtraError, ...
            _fail(str(err))
        except (sqlite3.Error, sa.exc.SQLAlchemyError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            _fail(f"the ledger at {_shown(_session.url)} failed: {first}")


# -- options shared by the commands ------------------------------------------------------


WriteNamespaceOpt = Annotated[
    str,
    typer.Option(
        "--namespace",
        "-n",
        envvar=NAMESPACE_ENV,
        help="The namespace (exactly; a workflow is NS/WORKFLOW).",
        show_default=False,
    ),
]
ResultsOpt = Annotated[
    bool,
    typer.Option("--results", help="Also show stored results (they may hold secrets)."),
]


class StateChoice(str, Enum):
    running = RUNNING
    succeeded = SUCCEEDED
    failed = FAILED
    cleared = CLEARED


assert {s.value for s in StateChoice} == set(STATES)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"onceonly-core {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="onceonly",
    cls=_Group,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,  # locals may hold URLs with passwords
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=(
        f"Every command reads the ledger at --url (or {URL_ENV}; default {DEFAULT_URL}). "
        "Stored results are never printed unless you pass --results. "
        "Exit status: 0 done, 1 nothing matched or an error to fix, 2 a usage error. "
        "New here? onceonly doctor checks the install; onceonly demo shows what it does."
    ),
)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Show the version and exit.", is_eager=True, callback=_version
        ),
    ] = False,
) -> None:
    """OnceOnly: see what your agents' tools did, once each, and run one again on purpose."""


# -- helpers -----------------------------------------------------------------------------


def _decode_result(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:  # a custom codec's format
        return text


def _record_json(r: Record, results: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "namespace": r.namespace,
        "key": r.key,
        "tool": r.tool,
        "state": r.state,
        "token": r.token,
        "attempt": r.attempt,
        "executions": r.executions,
        "owner": r.owner,
        "caller": r.caller,
        "run_id": r.run_id,
        "error": r.error,
        "lease_until": r.lease_until,
        "lease_live": r.lease_live,
        "expires_at": r.expires_at,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "args_digest": r.args_digest,
    }
    if results:
        out["result"] = _decode_result(r.result)
    return out


def _error_summary(error: str | None, width: int = 60) -> str:
    if not error:
        return ""
    first = error.strip().splitlines()[0] if error.strip() else ""
    kind, sep, msg = first.partition(": ")
    if sep and " " not in kind:  # "module.Class: message" -> "Class: message"
        first = f"{kind.rsplit('.', 1)[-1]}: {msg}"
    return first if len(first) <= width else first[: width - 1] + "…"


def _state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def _records_table(
    rows: Sequence[Record], results: bool, title: str | None = None, *, tool: bool = True
) -> Table:
    """One row per record. Columns empty in every row are left out, and a namespace shared
    by every row goes to the title, so the table fits a normal terminal."""
    namespaces = {r.namespace for r in rows}
    one_ns = len(namespaces) == 1
    if one_ns:
        title = f"{title} in {rows[0].namespace}" if title else rows[0].namespace
    # (header, cell, style); None cells mark a column for removal when empty everywhere.
    columns: list[tuple[str, list[str | Text], dict[str, Any]]] = []

    def column(name: str, cells: list[str | Text], **style: Any) -> None:
        if any(str(c) for c in cells):
            columns.append((name, cells, style))

    wrap: dict[str, Any] = {"overflow": "fold"}
    whole: dict[str, Any] = {"no_wrap": True}
    number: dict[str, Any] = {"no_wrap": True, "justify": "right"}
    column("updated", [_when(r.updated_at) for r in rows], **whole)
    if not one_ns:
        column("namespace", [r.namespace for r in rows], **wrap)
    if tool:
        column("tool", [r.tool for r in rows], **wrap)
    column("state", [_state_text(r.state) for r in rows], **whole)
    column("key", [_short_key(r.key) for r in rows], **whole)
    column("token", [str(r.token) for r in rows], **number)
    column("attempt", [str(r.attempt) for r in rows], **number)
    column("runs", [str(r.executions) for r in rows], **number)
    column("caller", [r.caller or "" for r in rows], **wrap)
    column("run id", [r.run_id or "" for r in rows], **wrap)
    column("error", [_error_summary(r.error) for r in rows], **wrap)
    if results:
        shown = [r.result or "" for r in rows]
        column("result", [t if len(t) <= 80 else t[:79] + "…" for t in shown], **wrap)
    table = _table(title)
    for name, _, style in columns:
        table.add_column(name, **style)
    for i in range(len(rows)):
        table.add_row(*(cells[i] for _, cells, _ in columns))
    return table


def _matching_tool(store: Store, namespace: str | None, tool: str) -> list[Record]:
    """Records of ``tool``: its full name, or a unique dotted suffix (``charge_card``)."""
    names = {r.tool for r in store.iter_all(namespace) if r.tool.endswith("." + tool)}
    if len(names) > 1:
        raise CliError(f"{tool!r} matches several tools: {', '.join(sorted(names))}")
    return [r for r in store.iter_all(namespace) if r.tool in names]


def _list(
    store: Store,
    namespace: str | None,
    *,
    state: str | None = None,
    tool: str | None = None,
    limit: int = 20,
) -> list[Record]:
    rows = store.list(namespace=namespace, prefix=True, state=state, tool=tool, limit=limit)
    if not rows and tool is not None:
        rows = [r for r in _matching_tool(store, namespace, tool) if state in (None, r.state)]
        rows = rows[:limit]
    return rows


def _empty(store: Store, namespace: str | None, what: str = "records") -> str:
    """Why a listing is empty, naming the namespaces that do exist."""
    if namespace is None:
        return f"No {what} in this ledger."
    recent: list[str] = []
    for r in store.list(limit=500):
        if r.namespace not in recent:
            recent.append(r.namespace)
    hint = f" Recent namespaces: {', '.join(recent[:6])}." if recent else " The ledger is empty."
    return f"No {what} in namespace {namespace!r} (or its workflows {namespace}/...).{hint}"


# -- commands ----------------------------------------------------------------------------
@app.command()
def show(
    url: UrlOpt = DEFAULT_URL,
    namespace: ReadNamespaceOpt = None,
    state: Annotated[
        StateChoice | None, typer.Option("--state", help="Only records in this state.")
    ] = None,
    tool: Annotated[
        str | None,
        typer.Option("--tool", help="Only this tool (full name, or its last part)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 20,
    results: ResultsOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Recent records, newest first."""
    with _open(url) as store:
        rows = _list(store, namespace, state=state.value if state else None, tool=tool, limit=limit)
        # Nothing matched a filter the user gave: exit 1, as grep does. An unfiltered
        # look at an empty ledger is an answer, not a miss.
        missed = not rows and (namespace is not None or state is not None or tool is not None)
        if as_json:
            _emit_json([_record_json(r, results) for r in rows])
        elif not rows:
            _note(_empty(store, namespace))
        else:
            _console().print(_records_table(rows, results))
        if missed:
            raise typer.Exit(1)


@app.command()
def history(
    tool: Annotated[str, typer.Argument(help="Tool name (full, or its last part).")],
    url: UrlOpt = DEFAULT_URL,
    namespace: ReadNamespaceOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 50,
    results: ResultsOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """The records of one tool, newest first."""
    with _open(url) as store:
        rows = _list(store, namespace, tool=tool, limit=limit)
        if as_json:
            _emit_json([_record_json(r, results) for r in rows])
            if not rows:
                raise typer.Exit(1)  # nothing matched the tool
            return
        if not rows:
            _note(_empty(store, namespace, f"records of tool {tool!r}"))
            raise typer.Exit(1)
        one_tool = len({r.tool for r in rows}) == 1
        title = f"History of {rows[0].tool}" if one_tool else f"History of {tool}"
        _console().print(_records_table(rows, results, title, tool=not one_tool))


def _signature(r: Record) -> tuple[Any, ...]:
    return (r.state, r.token, r.attempt, r.executions, r.updated_at)


def _tail_line(r: Record) -> Text:
    line = Text()
    line.append(_when(r.updated_at), style="dim")
    line.append("  ")
    line.append(f"{r.state:<9}", style=STATE_STYLES.get(r.state, ""))
    line.append(f"  {r.namespace}  {r.tool}  key={_short_key(r.key)}")
    line.append(f"  token={r.token} attempt={r.attempt} runs={r.executions}", style="dim")
    if r.caller:
        line.append(f"  caller={r.caller}", style="dim")
    if r.error:
        line.append(f"  {_error_summary(r.error)}", style="red")
    return line


@app.command()
def tail(
    url: UrlOpt = DEFAULT_URL,
    namespace: ReadNamespaceOpt = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.01, help="Seconds between polls.")
    ] = 1.0,
    count: Annotated[
        int | None, typer.Option("--count", min=1, help="Stop after this many lines.")
    ] = None,
    last: Annotated[
        int, typer.Option("--last", min=0, help="Start with this many recent records.")
    ] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Follow the ledger: print records as they are claimed, finish or change (Ctrl-C stops)."""
    overlap = 5.0  # re-read this many seconds back: late commits are not missed
    printed = 0
    console = _console()

    def emit(r: Record) -> bool:
        nonlocal printed
        if as_json:
            typer.echo(json.dumps(_record_json(r, False), ensure_ascii=False))
        else:
            console.print(_tail_line(r), soft_wrap=True)  # one line per change, for grep
        sys.stdout.flush()
        printed += 1
        return count is not None and printed >= count

    with _open(url) as store:
        cursor = store.now()
        seen: dict[tuple[str, str], tuple[Any, ...]] = {}
        for r in store.list(namespace=namespace, prefix=True, since=cursor - overlap, limit=10**6):
            seen[(r.namespace, r.key)] = _signature(r)
        backlog = store.list(namespace=namespace, prefix=True, limit=last) if last else []
        for r in reversed(backlog):
            seen[(r.namespace, r.key)] = _signature(r)
            if emit(r):
                return
        where = f"namespace {namespace}" if namespace else "every namespace"
        _note(f"following {where} in {_shown(url)} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(interval)
                rows = store.list(
                    namespace=namespace, prefix=True, since=cursor - overlap, limit=10_000
                )
                for r in reversed(rows):  # oldest change first
                    ident = (r.namespace, r.key)
                    sig = _signature(r)
                    if seen.get(ident) == sig:
                        continue
                    seen[ident] = sig
                    if emit(r):
                        return
                    cursor = max(cursor, r.updated_at)
                if rows:
                    cursor = max(cursor, rows[0].updated_at)
                horizon = cursor - 2 * overlap
                for ident in [i for i, s in seen.items() if s[-1] < horizon]:
                    del seen[ident]
        except KeyboardInterrupt:
            return


@app.command()
def stats(
    url: UrlOpt = DEFAULT_URL,
    namespace: ReadNamespaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per namespace and tool: records by state, executions, take-overs."""
    columns = ("records", *STATES, "executions", "takeovers")
    groups: dict[tuple[str, str], dict[str, int]] = {}
    with _open(url) as store:
        for r in store.iter_all(namespace):
            g = groups.setdefault((r.namespace, r.tool), dict.fromkeys(columns, 0))
            g["records"] += 1
            g[r.state] = g.get(r.state, 0) + 1
            g["executions"] += r.executions
            g["takeovers"] += max(0, r.attempt - 1)
        total = dict.fromkeys(columns, 0)
        for g in groups.values():
            for c in columns:
                total[c] += g[c]
        ordered = sorted(groups.items())
        if as_json:
            _emit_json(
                {
                    "groups": [{"namespace": ns, "tool": t, **g} for (ns, t), g in ordered],
                    "total": total,
                }
            )
            return
        if not groups:
            _note(_empty(store, namespace))
            return
    one_ns = len({ns for ns, _ in groups}) == 1
    table = _table(ordered[0][0][0] if one_ns else None)
    table.show_footer = len(groups) > 1
    if not one_ns:
        table.add_column("namespace", footer="total", overflow="fold")
    table.add_column("tool", footer="" if not one_ns else "total", overflow="fold")
    for c in columns:
        style = STATE_STYLES.get(c, "")
        table.add_column(c, justify="right", footer=str(total[c]), style=style, no_wrap=True)
    for (ns, t), g in ordered:
        table.add_row(*([] if one_ns else [ns]), t, *(str(g[c]) for c in columns))
    _console().print(table)
    _note("takeovers: re-runs after a failure, an expired lease, a clear or a TTL")


@app.command()
def retry(
    key: Annotated[str, typer.Argument(help="The record's key (or a unique prefix of it).")],
    namespace: WriteNamespaceOpt,
    url: UrlOpt = DEFAULT_URL,
    as_json: JsonOpt = False,
) -> None:
    """Clear one record, so the next call with its key runs again."""
    with _open(url) as store:
        rec = store.get(namespace, key)
        if rec is None and len(key) >= 4:
            found = [
                r
                for r in store.list(namespace=namespace, limit=10**6)
                if r.key.startswith(key.rstrip("…"))
            ]
            if len(found) > 1:
                keys = ", ".join(_short_key(r.key) for r in found[:5])
                raise CliError(f"{key!r} matches {len(found)} keys in {namespace!r}: {keys}")
            rec = found[0] if found else None
        if rec is None:
            raise CliError(
                f"no record with key {key!r} in namespace {namespace!r} "
                "(see: onceonly show --namespace ...)"
            )
        done = store.clear(namespace, rec.key)
        if done is False:
            live = store.get(namespace, rec.key) or rec
            left = max(0.0, (live.lease_until or live.now) - live.now)
            raise CliError(
                f"refusing to clear {rec.key!r} in {namespace!r}: it is running right now "
                f"(owner {live.owner}, lease ends in {left:.0f} s). Clearing it would let a "
                "second copy run at the same time; wait until it finishes or its lease expires."
            )
        if done is None:
            raise CliError(f"the record {rec.key!r} in {namespace!r} disappeared")
        if as_json:
            _emit_json(
                {
                    "namespace": namespace,
                    "key": rec.key,
                    "tool": rec.tool,
                    "previous_state": rec.state,
                    "cleared": True,
                }
            )
            return
        _console().print(
            Text.assemble(
                ("cleared ", "bold green"),
                f"{rec.tool} key={_short_key(rec.key)} in {namespace} (was {rec.state}): "
                "the next call with this key runs again",
            ),
            soft_wrap=True,
        )


@app.command()
def clear(
    namespace: WriteNamespaceOpt,
    url: UrlOpt = DEFAULT_URL,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Clear every record of a namespace (running ones are kept), so each call runs again."""
    with _open(url) as store:
        rows = store.list(namespace=namespace, limit=10**6)
        if not rows:
            raise CliError(f"nothing to clear. {_empty(store, namespace)}")
        running = sum(1 for r in rows if r.lease_live)
        clearable = sum(1 for r in rows if r.state != CLEARED and not r.lease_live)
        if clearable and not yes:
            if as_json or not _interactive():
                raise CliError(
                    f"clearing {clearable} records of {namespace!r} needs confirmation: pass --yes"
                )
            question = f"Clear {clearable} records in namespace {namespace!r}?"
            if running:
                question += f" ({running} running with a live lease will be kept)"
            if not typer.confirm(question, default=False):
                _note("nothing cleared")
                raise typer.Exit(1)
        if not clearable:
            raise CliError(
                f"nothing to clear in {namespace!r}: its {len(rows)} records are already "
                f"cleared{' or running' if running else ''}"
            )
        n = store.clear_namespace(namespace)
        kept = sum(1 for r in store.list(namespace=namespace, limit=10**6) if r.lease_live)
        if as_json:
            _emit_json({"namespace": namespace, "cleared": n, "kept_running": kept})
            return
        msg = f"cleared {n} records in {namespace}"
        if kept:
            msg += f"; kept {kept} running with a live lease"
        _console().print(Text.assemble(("done ", "bold green"), msg), soft_wrap=True)


@app.command()
def migrate(url: UrlOpt = DEFAULT_URL, as_json: JsonOpt = False) -> None:
    """Create or upgrade the ledger schema (Alembic); prints the revision."""
    from ..stores.schema import HEAD
    from ..stores.sql import SQLStore

    _session.url = url
    check_url(url)
    if url.startswith("memory:"):
        raise ConfigError("memory:// has no schema to migrate: it lives inside one process")
    if url.startswith(REDIS_SCHEMES):
        raise ConfigError("a Redis ledger has no schema to migrate")
    if url.startswith(REMOTE_SCHEMES):
        raise ConfigError(
            "remote mode: the control plane's database is migrated on the server "
            "(onceonly migrate --url <its database URL>, or onceonly serve --migrate)"
        )
    store = SQLStore(url, auto_migrate=False)
    try:
        before = store._schema_version()
        with _busy(f"migrating {_shown(url)} …", as_json):
            store.migrate()
        after = store._schema_version()
    finally:
        store.close()
    if as_json:
        _emit_json({"url": _shown(url), "before": before, "revision": after, "head": HEAD})
        return
    change = f"{before or 'empty'} → {after}" if before != after else f"already at {after}"
    _console().print(
        Text.assemble(("migrated ", "bold green"), f"{_shown(url)}: {change} (head {HEAD})"),
        soft_wrap=True,
    )


@app.command()
def demo(
    url: UrlOpt = DEFAULT_URL,
    fast: Annotated[bool, typer.Option("--fast", help="No pauses, short leases.")] = False,
) -> None:
    """Play the offline demo: retries, crashes, races, policy, budget, kill switch, approval."""
    from .demo import run_demo

    report = run_demo(url, fast=fast)
    if not report.ok:
        raise typer.Exit(1)


# -- the other modules' commands, in the order help lists them -----------------------------
app.command("doctor")(_doctor)
_register_gov(app)  # policy, agent, tools, approvals, audit, timeline (cli/gov.py)
_register_notify(app)  # notify list | retry | deliver (cli/notify.py)
_register_retention(app)  # retention (cli/retention.py)
_register_server(app)  # serve, worker, keys create|list|revoke, server ... (cli/server.py)
_register_dashboard(app)  # dashboard (cli/dashboard.py)
_register_mcp(app)  # mcp-proxy (cli/mcp.py)
