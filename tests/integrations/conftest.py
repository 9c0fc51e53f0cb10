"""Shared by every framework's integration tests: the adapter contract suite.

Each framework's session runs ``pytest tests/integrations/<framework>``; their
test_contract.py modules import ``contract_suite`` (a plain module beside this file), so
this directory goes on ``sys.path`` as ``tests/`` itself does (pyproject's ``pythonpath``).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
