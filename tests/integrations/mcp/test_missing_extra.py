"""Without the ``mcp`` SDK, the proxy says which extra to install (and nothing else breaks)."""

from __future__ import annotations

import importlib
import sys

import pytest
from typer.testing import CliRunner

from onceonly_core.cli import build_app
from onceonly_core.errors import MissingExtraError

MESSAGE = (
    "the MCP proxy (onceonly mcp-proxy) needs the 'mcp' extra (mcp is not installed): "
    'pip install "onceonly-core[mcp]"'
)


@pytest.fixture
def no_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import mcp` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "mcp", None)
    monkeypatch.delitem(sys.modules, "onceonly_core.mcp.proxy", raising=False)


@pytest.mark.usefixtures("no_sdk")
def test_the_proxy_module_names_the_extra() -> None:
    with pytest.raises(MissingExtraError) as excinfo:
        importlib.import_module("onceonly_core.mcp.proxy")
    err = excinfo.value
    assert isinstance(err, ImportError)
    assert str(err) == MESSAGE
    assert (err.extra, err.name) == ("mcp", "mcp")
    assert isinstance(err.__cause__, ImportError)


@pytest.mark.usefixtures("no_sdk")
def test_the_command_prints_the_pip_command() -> None:
    app = build_app()  # the rest of the CLI does not need the SDK
    result = CliRunner().invoke(app, ["mcp-proxy", "--", sys.executable, "server.py"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert 'pip install "onceonly-core[mcp]"' in " ".join(result.output.split())
