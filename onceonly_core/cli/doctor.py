"""``onceonly doctor``: is this install ready to guard calls, and if not, what to do.

Checks, in the order a new user would trip over them: the Python version and settings
(the ledger URL and where it came from, the namespace), whether the database answers,
whether its schema is at this version's head, which extras are installed (and whether
the URL needs one that is not), and how far the database clock is from this machine's.

Each check is ``ok``, ``warn`` (works, but worth knowing), ``fail`` (fix it first) or
``off`` (an optional extra that is not installed). The command exits 1 when any check
fails, 0 otherwise, so it can gate a deploy script. It never creates or migrates
anything: a SQLite file that does not exist yet stays that way.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import sqlalchemy as sa
import typer
from rich.text import Text

from ..errors import ConfigError, MissingExtraError, OnceOnlyError, StoreError
from ..stores import REDIS_SCHEMES, REMOTE_SCHEMES, check_url, open_store
from ._common import (
    DEFAULT_URL,
    NAMESPACE_ENV,
    URL_ENV,
    JsonOpt,
    _console,
    _emit_json,
    _shown,
    _table,
)

OK, WARN, FAIL, OFF = "ok", "warn", "fail", "off"
MARKS = {OK: ("✓", "green"), WARN: ("!", "yellow"), FAIL: ("✗", "bold red"), OFF: ("·", "dim")}
# The drift between this machine's clock and the database's above which times shown by
# the CLI and dashboard (which mix both) mislead. Leases, TTLs and caps use the database
# clock alone, so a skew never breaks exactly-once; it only confuses people.
SKEW_WARN = 1.0
SKEW_FAIL = 30.0
DISTRIBUTION = "onceonly-core"
# The extra a URL's driver comes from (stores/sql.py raises MissingExtraError without it).
URL_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}
SUPPORTED_PYTHON = (3, 10)


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def _extras() -> dict[str, list[str]] | None:
    """Each extra of the installed distribution and the distributions it needs (None when
    onceonly-core is not installed, e.g. imported from a checkout through PYTHONPATH)."""
    try:
        meta = importlib.metadata.metadata(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    extras: dict[str, list[str]] = {name: [] for name in meta.get_all("Provides-Extra") or []}
    for req in importlib.metadata.requires(DISTRIBUTION) or []:
        marker = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", req)
        name = re.match(r"[A-Za-z0-9._-]+", req)
        if marker and name and marker.group(1) in extras:
            extras[marker.group(1)].append(name.group(0))
    return extras


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _pip(extra: str) -> str:
    return f'pip install "{DISTRIBUTION}[{extra}]"'


def check_python() -> Check:
    version = ".".join(str(n) for n in sys.version_info[:3])
    if sys.version_info[:2] < SUPPORTED_PYTHON:
        return Check(
            "python", FAIL, f"Python {version}", "onceonly-core supports Python 3.10 and newer"
        )
    return Check("python", OK, f"Python {version} ({sys.executable})")


def check_settings(url: str, source: str) -> tuple[list[Check], bool]:
    """The URL and namespace settings; the flag says whether the URL can be opened."""
    checks: list[Check] = []
    good = True
    try:
        check_url(url)
        if not url.startswith(("memory:", *REDIS_SCHEMES, *REMOTE_SCHEMES)):
            backend = sa.make_url(url).get_backend_name()
            if backend not in ("sqlite", *URL_EXTRAS):
                raise ConfigError(f"unsupported database {backend!r}")
        checks.append(Check("ledger URL", OK, f"{_shown(url)} (from {source})"))
    except (ConfigError, sa.exc.ArgumentError) as err:
        good = False
        checks.append(
            Check(
                "ledger URL",
                FAIL,
                f"{_shown(url)} (from {source}): {err}",
                f"set --url or {URL_ENV} to e.g. sqlite:///onceonly.db",
            )
        )
    namespace = os.environ.get(NAMESPACE_ENV)
    if namespace is None:
        checks.append(Check("namespace", OK, f"default ({NAMESPACE_ENV} is not set)"))
    else:
        from ..guard import Guard
        from ..stores import MemoryStore

        try:
            Guard(store=MemoryStore(), namespace=namespace)
            checks.append(Check("namespace", OK, f"{namespace} (from {NAMESPACE_ENV})"))
        except ConfigError as err:
            checks.append(Check("namespace", FAIL, str(err), f"fix or unset {NAMESPACE_ENV}"))
    return checks, good


def check_extras(url: str) -> list[Check]:
    extras = _extras()
    if extras is None:
        return [
            Check(
                "extras",
                WARN,
                f"{DISTRIBUTION} is imported from {Path(__file__).parents[2]} but not installed",
                'pip install -e ".[cli]" in the checkout',
            )
        ]
    needed = None
    if url.startswith(REDIS_SCHEMES):
        needed = "redis"
    elif url.startswith(REMOTE_SCHEMES):
        needed = "http"  # remote mode: httpx
    elif not url.startswith("memory:"):
        try:
            needed = URL_EXTRAS.get(sa.make_url(url).get_backend_name())
        except sa.exc.ArgumentError:
            needed = None
    checks = []
    for extra, dists in sorted(extras.items()):
        if extra == "all":
            continue
        missing = [d for d in dists if not _installed(d)]
        if not missing:
            checks.append(Check(f"extra {extra}", OK, "installed"))
        elif extra == needed:
            checks.append(
                Check(
                    f"extra {extra}",
                    FAIL,
                    f"the ledger URL needs it; not installed: {', '.join(missing)}",
                    _pip(extra),
                )
            )
        else:
            checks.append(
                Check(f"extra {extra}", OFF, f"not installed ({', '.join(missing)})", _pip(extra))
            )
    return checks


def check_database(url: str) -> list[Check]:
    """Reachability, schema revision and clock skew of the ledger at ``url``."""
    from ..stores.schema import HEAD
    from ..stores.sql import SQLStore

    if url.startswith("memory:"):
        return [
            Check(
                "database",
                WARN,
                "memory:// lives inside one process: nothing to reach, nothing survives it",
                "use sqlite:///file.db or a server URL for a ledger that lasts",
            )
        ]
    if url.startswith((*REDIS_SCHEMES, *REMOTE_SCHEMES)):
        return check_service_store(url)
    try:
        store = SQLStore(url, auto_migrate=False)
    except MissingExtraError as err:
        return [Check("database", FAIL, str(err), _pip(err.extra))]
    except OnceOnlyError as err:
        return [Check("database", FAIL, str(err), f"fix --url or {URL_ENV}")]
    try:
        if store.kind == "sqlite" and not store.path.exists():
            return [
                Check(
                    "database",
                    WARN,
                    f"no ledger yet at {store.path.resolve()}",
                    "nothing to do: the first guarded call creates it (or run: onceonly demo)",
                )
            ]
        checks = []
        try:
            version = store._schema_version()
            local_before = time.time()
            db_now = store.now()
            local_after = time.time()
        except (StoreError, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            hint = "check the URL, and that the database server is running and reachable"
            if store.kind == "sqlite":
                hint = "check the file is a OnceOnly ledger and readable"
            return [Check("database", FAIL, first, hint)]
        where = str(store.path.resolve()) if store.kind == "sqlite" else _shown(url)
        checks.append(Check("database", OK, f"{store.kind} answers: {where}"))
        migrate = f"onceonly migrate --url '{_shown(url)}'"
        if version == HEAD:
            checks.append(Check("migrations", OK, f"schema at head ({HEAD})"))
        elif store.kind == "sqlite" and (version is None or version < HEAD):
            state = "no schema yet" if version is None else f"schema at {version}, head is {HEAD}"
            checks.append(
                Check(
                    "migrations",
                    WARN,
                    f"{state}; a SQLite ledger upgrades itself on first use",
                    f"nothing to do (or now: {migrate})",
                )
            )
        elif version is None or version < HEAD:
            state = "no schema" if version is None else f"schema at {version}, head is {HEAD}"
            checks.append(
                Check("migrations", FAIL, f"{state}: calls fail until it is migrated", migrate)
            )
        else:
            checks.append(
                Check(
                    "migrations",
                    FAIL,
                    f"schema at {version}, newer than this onceonly-core knows ({HEAD})",
                    f'upgrade onceonly-core: pip install -U "{DISTRIBUTION}"',
                )
            )
        if store.kind == "sqlite":
            checks.append(Check("clock", OK, "SQLite uses this machine's clock"))
        else:
            checks.append(_clock(db_now, local_before, local_after, "database"))
        return checks
    finally:
        store.close()


def _clock(their_now: float, local_before: float, local_after: float, whose: str) -> Check:
    skew = their_now - (local_before + local_after) / 2
    size = abs(skew)
    status = FAIL if size >= SKEW_FAIL else WARN if size >= SKEW_WARN else OK
    fix = "" if status == OK else f"sync this machine's and the {whose}'s clocks (NTP)"
    side = "ahead of" if skew > 0 else "behind"
    return Check("clock", status, f"the {whose} clock is {size:.3f} s {side} this one", fix)


def check_service_store(url: str) -> list[Check]:
    """A Redis ledger (reachable; settings that could lose a claim) or a ``onceonly
    serve`` control plane in remote mode (reachable; the API key accepted). Neither has
    a schema for this machine to migrate."""
    remote = url.startswith(REMOTE_SCHEMES)
    whose = "server" if remote else "Redis server"
    try:
        store = open_store(url)
    except MissingExtraError as err:
        return [Check("database", FAIL, str(err), _pip(err.extra))]
    except OnceOnlyError as err:  # remote mode without an API key, a bad URL
        return [Check("database", FAIL, str(err), f"fix --url or {URL_ENV}")]
    try:
        try:
            local_before = time.time()
            their_now = store.now()
            local_after = time.time()
        except OnceOnlyError as err:  # unreachable, or the key refused (ConfigError)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            hint = "check the URL and that the server is running and reachable"
            if remote and isinstance(err, ConfigError):
                hint = "check ONCEONLY_API_KEY (onceonly keys create on the server)"
            return [Check("database", FAIL, first, hint)]
        if remote:
            checks = [
                Check("database", OK, f"onceonly serve answers at {_shown(url)}; key accepted"),
                Check("migrations", OK, "the server's database is migrated on the server"),
            ]
        else:
            checks = [Check("database", OK, f"redis answers: {_shown(url)}")]
            problems = store.durability_problems()  # type: ignore[attr-defined]
            if problems is None:
                checks.append(
                    Check(
                        "durability",
                        WARN,
                        "cannot read the server's persistence settings (CONFIG disabled)",
                        "make sure it runs with appendonly yes and appendfsync always",
                    )
                )
            elif problems:
                checks.append(
                    Check(
                        "durability",
                        WARN,
                        "a Redis crash could lose a claim: " + "; ".join(problems),
                        "redis-server --appendonly yes --appendfsync always",
                    )
                )
            else:
                checks.append(Check("durability", OK, "appendonly yes, appendfsync always"))
        checks.append(_clock(their_now, local_before, local_after, whose))
        return checks
    finally:
        store.close()


def run_checks(url: str, source: str) -> list[Check]:
    checks = [check_python()]
    settings, good = check_settings(url, source)
    checks += settings
    checks += check_extras(url)
    if good:
        checks += check_database(url)
    return checks


def doctor(
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help=f"Ledger URL to check (default: {URL_ENV}, then {DEFAULT_URL}).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check settings, database, migrations, extras and clock; say what to fix."""
    if url is not None:
        source = "--url"
    elif os.environ.get(URL_ENV) is not None:
        url, source = os.environ[URL_ENV], URL_ENV
    else:
        url, source = DEFAULT_URL, f"the default; {URL_ENV} is not set"
    checks = run_checks(url, source)
    failed = [c for c in checks if c.status == FAIL]
    warned = [c for c in checks if c.status == WARN]
    if as_json:
        _emit_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
    else:
        _print(checks, failed, warned)
    if failed:
        raise typer.Exit(1)


def _print(checks: list[Check], failed: list[Check], warned: list[Check]) -> None:
    console = _console()
    table = _table("onceonly doctor")
    table.add_column("", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("result", overflow="fold")
    table.add_column("to fix", overflow="fold")
    for c in checks:
        mark, style = MARKS[c.status]
        table.add_row(
            Text(mark, style),
            c.name,
            Text(c.detail, style="dim" if c.status == OFF else ""),
            c.fix if c.status != OFF else Text(c.fix, "dim"),
        )
    console.print(table)
    if failed:
        console.print(
            Text.assemble(
                (f"{len(failed)} to fix", "bold red"),
                ": see the ✗ rows, then run onceonly doctor again",
            )
        )
    elif warned:
        console.print(Text.assemble(("ready", "bold green"), f" ({len(warned)} notes: the ! rows)"))
    else:
        console.print(Text.assemble(("all green", "bold green"), ": ready to guard calls"))
