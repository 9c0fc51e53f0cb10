"""The ``otel`` extra stays optional (no OpenTelemetry SDK needed to run these).

* Without ``opentelemetry`` (hidden in a subprocess), ``instrument()`` raises
  MissingExtraError whose message is the exact pip command, and ``instrument_logging()``
  still works.
* ``import onceonly_core`` and guarded calls, plain and governed, import no OpenTelemetry.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_HIDDEN = """
import sys
sys.modules["opentelemetry"] = None  # `import opentelemetry...` now raises ImportError
import onceonly_core
from onceonly_core import Guard, MemoryStore, MissingExtraError
from onceonly_core.telemetry import instrument, instrument_logging
g = Guard(store=MemoryStore(), quiet=True)
try:
    instrument(g)
except MissingExtraError as err:
    assert isinstance(err, ImportError) and isinstance(err.__cause__, ImportError)
    assert err.extra == "otel" and err.name == "opentelemetry-api", (err.extra, err.name)
    print(err)
else:
    raise SystemExit("instrument() did not raise")
assert g._observer is None
instrument_logging(g)  # needs no OpenTelemetry
assert g(len, "abc") == 3
"""

_PROBE = """
import sys
import onceonly_core
from onceonly_core import Guard, MemoryStore
g = Guard(store=MemoryStore(), quiet=True)
def tool(x):
    return x
g(tool, "abc")
g.call_tool(tool, {"x": "abc"}, agent_id="bot")
from onceonly_core.telemetry import instrument_logging
instrument_logging(g)
g(tool, "def")
g.call_tool(tool, {"x": "def"}, agent_id="bot")
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
"""


def _python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_without_the_extra_instrument_names_it() -> None:
    assert _python(_HIDDEN) == (
        "OpenTelemetry instrumentation needs the 'otel' extra (opentelemetry-api is not "
        'installed): pip install "onceonly-core[otel]"'
    )


def test_importing_the_core_imports_no_opentelemetry() -> None:
    assert _python(_PROBE) == "[]"
