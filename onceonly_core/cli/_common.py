"""What every ``onceonly`` command module shares: the URL and JSON options, the error a
user can fix, opening the ledger, and the console, tables and times they print.

The command modules (``app.py``, ``gov.py``, ``doctor.py``, ``server.py``,
``dashboard.py``, ``mcp.py``) import this, never each other; ``app.py`` builds the
application and registers the others' commands on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..errors import OnceOnlyError
from ..stores import REDIS_SCHEMES, REMOTE_SCHEMES, MemoryStore, Store, check_url, open_store

DEFAULT_URL = "sqlite:///onceonly.db"
URL_ENV = "ONCEONLY_DB_URL"
NAMESPACE_ENV = "ONCEONLY_NAMESPACE"


class CliError(OnceOnlyError):
    """A problem the user can fix, reported as one message and exit status 1."""


# The URL of the command running, for error messages (the group reads it).
@dataclass
class _Session:
    url: str = DEFAULT_URL


_session = _Session()


def _shown(url: str) -> str:
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _url_callback(value: str) -> str:
    _session.url = value
    return value


UrlOpt = Annotated[
    str,
    typer.Option(
        "--url",
        envvar=URL_ENV,
        help=(
            "Ledger URL: sqlite:///file.db, postgresql+psycopg://..., mysql+pymysql://..., "
            "redis://..., or a onceonly serve https://... (with ONCEONLY_API_KEY)"
        ),
        callback=_url_callback,
    ),
]

ReadNamespaceOpt = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        "-n",
        envvar=NAMESPACE_ENV,
        help="Only this namespace and its workflows (NS/...). Default: every namespace.",
        show_default=False,
    ),
]

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


@contextlib.contextmanager
def _open(url: str, *, create: bool = False) -> Iterator[Store]:
    """The ledger at ``url``. Reading never creates a ledger or its schema."""
    _session.url = url
    check_url(url)  # "ledger.db" gets "did you mean sqlite:///ledger.db"
    store: Store
    if url.startswith("memory:"):
        _note("memory:// lives inside one process: this ledger starts empty")
        store = MemoryStore()
    elif url.startswith(REDIS_SCHEMES):
        store = open_store(url)  # nothing to create: Redis has no schema
    elif url.startswith(REMOTE_SCHEMES):
        store = open_store(url)  # remote mode: the key from ONCEONLY_API_KEY, the server's schema
    else:
        from ..stores.sql import SQLStore

        sql = SQLStore(url, auto_migrate=create)
        if sql.kind == "sqlite" and not create and not sql.path.exists():
            raise CliError(
                f"no ledger at {sql.path.resolve()}: nothing has run with this URL yet. "
                f"Point --url (or {URL_ENV}) at your ledger, or make one: onceonly demo"
            )
        store = sql
    try:
        yield store
    finally:
        store.close()


def _console() -> Console:
    """stdout; wide when it is not a terminal, so piped tables are not cut."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=200)
    return console


def _busy(message: str, as_json: bool = False) -> contextlib.AbstractContextManager[Any]:
    """A spinner on stderr for operations that may take a while (migrate, verify, purge),
    only for a person at a terminal: scripts (``--json``, pipes) see nothing extra."""
    if as_json or not sys.stderr.isatty():
        return contextlib.nullcontext()
    return Console(stderr=True).status(message)


def _note(text: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(Text(text, style="dim"))


def _emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _short_key(key: str) -> str:
    return key if len(key) <= 14 else key[:10] + "…"


def _when(ts: float) -> str:
    t = time.localtime(ts)
    if time.strftime("%Y-%m-%d", t) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", t)
    return time.strftime("%Y-%m-%d %H:%M", t)


def _table(title: str | None = None) -> Table:
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )


def _interactive() -> bool:
    return sys.stdin.isatty()
