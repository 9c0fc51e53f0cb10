"""Optional dependencies stay optional.

* Each integration package, imported without its framework, raises MissingExtraError (an
  ImportError) whose message is the exact pip command (sentry-python's
  ``test_shadowed_module``, logfire's per-extra message tests).
* ``import onceonly_core`` imports no framework, database driver or CLI library.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from onceonly_core.errors import MissingExtraError


@dataclass(frozen=True)
class Integration:
    package: str  # what users import
    framework: str  # the module it needs
    extra: str  # pip extra that installs it
    distribution: str  # what that extra installs
    feature: str  # how the message names it

    @property
    def message(self) -> str:
        return (
            f"{self.feature} needs the '{self.extra}' extra ({self.distribution} is not "
            f'installed): pip install "onceonly-core[{self.extra}]"'
        )


INTEGRATIONS = [
    Integration(
        "onceonly_langchain",
        "langchain_core",
        "langchain",
        "langchain-core",
        "OnceOnly's LangChain integration",
    ),
    Integration("onceonly_openai", "openai", "openai", "openai", "OnceOnly's OpenAI integration"),
    Integration(
        "onceonly_llamaindex",
        "llama_index.core",
        "llamaindex",
        "llama-index-core",
        "OnceOnly's LlamaIndex integration",
    ),
]

# Modules that `import onceonly_core` must never pull in.
OPTIONAL_MODULES = [
    "psycopg",
    "psycopg2",
    "pymysql",
    "typer",
    "rich",
    "langchain",
    "langchain_core",
    "openai",
    "llama_index",
    "opentelemetry",
    "fastapi",
    "httpx",
]


@pytest.mark.parametrize("integration", INTEGRATIONS, ids=lambda i: i.package)
def test_integration_without_its_framework_names_the_extra(
    integration: Integration, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import <framework>` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, integration.framework, None)
    monkeypatch.delitem(sys.modules, integration.package, raising=False)

    with pytest.raises(MissingExtraError) as excinfo:
        importlib.import_module(integration.package)

    err = excinfo.value
    assert isinstance(err, ImportError)
    assert str(err) == integration.message
    assert f'pip install "onceonly-core[{integration.extra}]"' in str(err)
    assert err.extra == integration.extra
    assert err.name == integration.distribution
    assert isinstance(err.__cause__, ImportError)
    assert integration.package not in sys.modules


@pytest.mark.parametrize("integration", INTEGRATIONS, ids=lambda i: i.package)
def test_the_named_extra_exists(integration: Integration) -> None:
    """The pip command in the message must actually install the framework."""
    try:
        metadata = importlib.metadata.metadata("onceonly-core")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onceonly-core is not installed (running from a bare checkout)")
    assert integration.extra in (metadata.get_all("Provides-Extra") or [])
    requirements = [Requirement(r) for r in importlib.metadata.requires("onceonly-core") or []]
    installed_by_extra = {
        canonicalize_name(req.name)
        for req in requirements
        if req.marker is not None and req.marker.evaluate({"extra": integration.extra})
    }
    assert canonicalize_name(integration.distribution) in installed_by_extra


_PROBE = """
import importlib, importlib.util, json, sys
imported = []
for name in ("onceonly_core", "onceonly_core.stores", "onceonly_core.guard"):
    if importlib.util.find_spec(name) is not None:
        importlib.import_module(name)
        imported.append(name)
forbidden = json.loads(sys.argv[1])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(json.dumps({"imported": imported, "leaked": leaked}))
"""


def test_importing_the_core_imports_no_optional_dependency() -> None:
    # A fresh interpreter: this one already has pytest plugins and other tests' imports.
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(OPTIONAL_MODULES)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "onceonly_core" in report["imported"]
    assert report["leaked"] == []


def test_remote_mode_without_httpx_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Guard("https://…")`` with httpx hidden: the one error, with the pip command."""
    monkeypatch.setitem(sys.modules, "httpx", None)  # import httpx -> ImportError
    from onceonly_core import Guard

    g = Guard("https://onceonly.example", api_key="k" * 20, quiet=True)
    with pytest.raises(MissingExtraError) as err:
        g.run_call("t", {}, lambda: 1, scope="s")
    assert str(err.value) == (
        "remote mode (an https:// ledger URL) needs the 'http' extra (httpx is not "
        'installed): pip install "onceonly-core[http]"'
    )
