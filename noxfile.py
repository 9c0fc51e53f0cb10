"""Developer and CI tasks. `python -m nox` runs lint, typecheck, core, integration, tests and
docs, in that order.

* ``lint``: ruff check and ruff format --check; import-linter's contracts (the layers read
  top-down, no import cycles, each framework and extra imported in its one place).
* ``typecheck``: mypy --strict on the onceonly_core package.
* ``core``: the core install alone (no extras); proves no optional dependency leaks in,
  then runs tests/core on the memory and SQLite ledgers.
* ``tests``: everything installed, the whole suite. PostgreSQL, MariaDB and Redis come from
  ONCEONLY_PG_URL / ONCEONLY_MYSQL_URL / ONCEONLY_REDIS_URL (local defaults otherwise); with
  ONCEONLY_REQUIRE_SERVICES=1 an unreachable server fails the run instead of skipping.
* ``docs``: ``mkdocs build --strict``: a broken link, a page missing from the nav or a
  dead API reference fails.
* ``bench_smoke``: every benchmark for a few iterations (``benchmarks/run.py --short``);
  fails on an error, never on a figure. The server bench needs ``wrk`` and is skipped,
  saying so, without it (.ci/run installs it).
* ``bench`` (not run by default): the full suite; prints the one floor table and writes it
  to benchmarks/README.md and benchmarks/results.json.

Arguments after ``--`` go to pytest (or to benchmarks/run.py): ``nox -s tests -- -k sqlite``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "core", "integration", "tests", "docs", "bench_smoke"]
nox.options.error_on_missing_interpreters = False

PYTHON = "3.11"
ROOT = Path(__file__).resolve().parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")

TEST_DEPS = nox.project.dependency_groups(PYPROJECT, "test")  # pytest, hypothesis, pytest-timeout
SERVER_TEST_DEPS = nox.project.dependency_groups(PYPROJECT, "server-test")  # onceonly-sdk
OTEL_TEST_DEPS = nox.project.dependency_groups(PYPROJECT, "otel-test")
# langchain-mcp-adapters (MCP SDK 1.x): the langchain session drives `onceonly mcp-proxy`
# with it; the proxy runs from a second virtualenv the test builds (`onceonly-core[mcp]`).
LANGCHAIN_MCP_TEST_DEPS = nox.project.dependency_groups(PYPROJECT, "langchain-mcp-test")
BROWSER_TEST_DEPS = nox.project.dependency_groups(PYPROJECT, "browser-test")  # playwright
LINT_DEPS = nox.project.dependency_groups(PYPROJECT, "lint")
DOCS_DEPS = nox.project.dependency_groups(PYPROJECT, "docs")  # mkdocs-material, mkdocstrings
TYPECHECK_DEPS = nox.project.dependency_groups(PYPROJECT, "typecheck")

# Everything but the agent frameworks (each has its own session).
SERVER_EXTRAS = "postgres,mysql,redis,cli,http,server,otel"

PASSTHROUGH_ENV = (
    "ONCEONLY_REQUIRE_SERVICES",
    "ONCEONLY_PG_URL",
    "ONCEONLY_MYSQL_URL",
    "ONCEONLY_REDIS_URL",
)

LINT_PATHS = ("onceonly_core", "integrations", "tests", "examples", "benchmarks", "noxfile.py")

# What the core install must neither import nor have installed (top-level module names).
OPTIONAL_MODULES = (
    "psycopg",
    "pymysql",
    "redis",
    "typer",
    "rich",
    "langchain",
    "langchain_core",
    "openai",
    "llama_index",
    "httpx",
    "opentelemetry",
    "fastapi",
    "uvicorn",
    "agents",
    "langgraph",
    "mcp",
)

CORE_IMPORT_CHECK = (
    "import importlib.util as u, sys, onceonly_core, onceonly_core.stores; "
    f"opt = {OPTIONAL_MODULES!r}; "
    "leaked = sorted(m for m in sys.modules if m.split('.')[0] in opt); "
    "installed = [m for m in opt if u.find_spec(m) is not None]; "
    "assert not leaked, f'import onceonly_core imported optional modules: {leaked}'; "
    "assert not installed, f'the core install pulled in optional packages: {installed}'; "
    "print('core import check: none of', ', '.join(opt), 'imported or installed')"
)


def _passthrough_env() -> dict[str, str]:
    return {name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ}


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check + import-linter (pyproject's [tool.importlinter])."""
    session.install(*LINT_DEPS)
    # Empty folders are not in a git checkout; ruff refuses paths that do not exist.
    paths = [path for path in LINT_PATHS if (ROOT / path).exists()]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)
    # Reads the sources, imports nothing: no extra is installed. The checkout is on the
    # path (lint-imports adds the working directory), the integration packages through
    # PYTHONPATH, as in a wheel where they are top-level packages.
    session.run("lint-imports", env={"PYTHONPATH": str(ROOT / "integrations")})


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the core and the integration packages (configured in pyproject.toml)."""
    # pytest: onceonly_core.testing (the store contract kit) is typed against it.
    # mcp: onceonly_core/mcp type-checks against the MCP SDK it imports.
    # The frameworks: each integration package type-checks against the framework it adapts.
    extras = f"{SERVER_EXTRAS},mcp,{','.join(INTEGRATIONS)}"
    session.install("-e", f".[{extras}]", *TYPECHECK_DEPS, *TEST_DEPS)
    session.run("mypy", *session.posargs)


@nox.session(python=PYTHON)
def core(session: nox.Session) -> None:
    """The core install alone: no extras, no framework, no driver but SQLite's."""
    session.install(".", *TEST_DEPS)
    session.run("python", "-c", CORE_IMPORT_CHECK)
    # Tests parametrized over db_url/any_url also have PostgreSQL and MariaDB variants,
    # marked `services`; their drivers are extras, so they run in the `tests` session only.
    session.run("pytest", "tests/core", "-m", "not services", *session.posargs)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole suite with every extra installed, against the real servers."""
    session.install(
        "-e",
        f".[{SERVER_EXTRAS}]",
        *TEST_DEPS,
        *SERVER_TEST_DEPS,
        *OTEL_TEST_DEPS,
        *BROWSER_TEST_DEPS,
    )
    # Each framework's tests run in its own `integration` session, with only its extra.
    session.run(
        "pytest", "tests", "--ignore=tests/integrations", *session.posargs, env=_passthrough_env()
    )


# One session per framework: only that extra installed, its tests and examples run.
INTEGRATIONS = ("langchain", "openai", "llamaindex", "mcp")
# Each session installs its framework's extra and the SQL drivers (no other framework):
# the call path is proven on every SQL ledger through each adapter. The server extra runs
# the adapter contract suite in remote mode too, against `onceonly serve` on PostgreSQL.
# The MCP proxy is also driven by the OpenAI Agents SDK's own MCP client (extra openai).
EXTRAS = {"mcp": "mcp,openai,postgres,mysql,server"}
# LangChain's own MCP client needs the MCP SDK 1.x, the `mcp` extra 2.x: it is installed here,
# and tests/integrations/langchain/test_mcp_proxy.py builds the proxy's environment itself.
TEST_EXTRAS = {"langchain": LANGCHAIN_MCP_TEST_DEPS}


@nox.session(python=PYTHON)
@nox.parametrize("framework", INTEGRATIONS)
def integration(session: nox.Session, framework: str) -> None:
    """One integration with only its own framework installed (tests/integrations/<framework>)."""
    extras = EXTRAS.get(framework, f"{framework},postgres,mysql,server")
    session.install("-e", f".[{extras}]", *TEST_DEPS, *TEST_EXTRAS.get(framework, ()))
    session.run(
        "pytest", f"tests/integrations/{framework}", *session.posargs, env=_passthrough_env()
    )


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The docs site from docs/ (mkdocs.yml), built with --strict into site/."""
    # The API reference reads the sources statically (griffe): no extra is installed.
    session.install(*DOCS_DEPS)
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"}
    )


# The benchmarks: the servers' drivers, the three frameworks (adapter overhead) and the
# two peer libraries measured next to ours.
BENCH_DEPS = (
    f".[{SERVER_EXTRAS},langchain,openai,llamaindex]",
    "ledger-once==0.1.5",
    "safeagent-exec-guard==0.1.25",
)


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Every benchmark, each figure next to a floor measured in the same run (not a test).

    benchmarks/run.py runs its own cases, then bench_governance, bench_redis,
    bench_server (under wrk), the three adapters and bench_retention, and prints one
    table: figure, floor, ratio, target, met/missed, what bounds a miss."""
    session.install(*BENCH_DEPS)
    session.run("python", "benchmarks/run.py", *session.posargs, env=_passthrough_env())


@nox.session(python=PYTHON)
def bench_smoke(session: nox.Session) -> None:
    """``benchmarks/run.py --short``: every benchmark a few iterations; errors fail, figures
    never do (about 2 minutes)."""
    session.install(*BENCH_DEPS)
    session.run("python", "benchmarks/run.py", "--short", *session.posargs, env=_passthrough_env())
