"""Deterministic text for tool outputs: the same value always gives the same string.

A replay must hand the model exactly what the first run handed it, and a transcript
must not change between processes (set order, dict order), so structured results are
JSON with sorted keys and no incidental whitespace.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

__all__ = ["to_text"]


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, BaseModel):
        # Python mode keeps sets as sets (sorted below); JSON mode would list them unsorted.
        return _plain(value.model_dump())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        # JSON object keys are strings; converting first keeps sort_keys from failing on
        # mixed key types ({1: .., "a": ..}).
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        # Set iteration order depends on the process's hash seed: sort by canonical text.
        items = [_plain(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, default=str))
    # Decimal, datetime, UUID, Enum, bytes, paths...: pydantic's JSON rules; anything
    # else is described by str() rather than failing a call that already ran.
    return to_jsonable_python(value, fallback=str)


# Built once: json.dumps() with options builds a new JSONEncoder on every call.
_TEXT_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def to_text(value: Any) -> str:
    """A tool's result as the text the model reads: strings as they are, else JSON."""
    if isinstance(value, str):
        return value
    return _TEXT_JSON.encode(_plain(value))
