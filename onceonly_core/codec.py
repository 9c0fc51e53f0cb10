"""Results are stored as JSON text and replayed with their Python types.

Plain JSON values (str, int, float, bool, None, lists, dicts with str keys) are stored
as they are. Everything else is a tagged object ``{"$": tag, "v": ...}``: tuples, sets,
bytes, Decimal, datetime/date/time/timedelta, UUID, paths, Enums, dataclasses,
pydantic models, non-finite floats and dicts whose keys are not plain strings (or that
contain the key ``"$"``). Classes are recorded by import path and re-imported on replay.

Register other types with :meth:`Codec.register`, or pass your own object with
``encode``/``decode`` methods as ``Guard(codec=...)``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import enum
import importlib
import json
import math
import pathlib
import re
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Protocol

from .errors import CodecError

__all__ = ["Codec", "ResultCodec", "default_codec"]


class ResultCodec(Protocol):
    def encode(self, value: Any) -> str: ...

    def decode(self, text: str) -> Any: ...


_PLAIN = (str, int, bool, type(None))
# What json.dumps(v, separators=(",", ":"), ensure_ascii=False) builds on every call.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_ASCII_JSON = json.JSONEncoder(separators=(",", ":"))
_SURROGATE = re.compile("[\ud800-\udfff]")


def _import(path: str) -> Any:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _path(t: type) -> str:
    if "<locals>" in t.__qualname__:
        raise CodecError(f"{t.__qualname__} is defined inside a function and cannot be replayed")
    return f"{t.__module__}:{t.__qualname__}"


class Codec:
    """The default result codec. ``register`` adds a type."""

    def __init__(self) -> None:
        self._by_type: dict[type, tuple[str, Callable[[Any], Any]]] = {}
        self._by_tag: dict[str, Callable[[Any], Any]] = {}

    def register(
        self,
        cls: type,
        tag: str,
        to_json: Callable[[Any], Any],
        from_json: Callable[[Any], Any],
    ) -> None:
        """Store ``cls`` values as ``to_json(value)`` under ``tag``; replay with ``from_json``."""
        self._by_type[cls] = (tag, to_json)
        self._by_tag[tag] = from_json

    # -- encoding -----------------------------------------------------------------------
    def encode(self, value: Any) -> str:
        try:
            data = self._enc(value, 0)
            text = _JSON.encode(data)
            if not text.isascii() and _SURROGATE.search(text):
                # A lone surrogate cannot be written as UTF-8 by any backend: escape it
                # (\ud800) instead, which json.loads turns back into the same string.
                text = _ASCII_JSON.encode(data)
            return text
        except CodecError:
            raise
        except (TypeError, ValueError, RecursionError) as err:
            raise CodecError(f"cannot store the result: {err}") from err

    def _enc(self, v: Any, depth: int) -> Any:
        t = type(v)
        if t in _PLAIN:
            return v
        if t is float:
            if math.isfinite(v):
                return v
            return {"$": "float", "v": repr(v)}
        if depth > 200:
            raise CodecError("the result is nested too deeply (or contains a cycle)")
        if t is list:
            return [self._enc(x, depth + 1) for x in v]
        if t is dict:
            if all(type(k) is str for k in v) and "$" not in v:
                return {k: self._enc(x, depth + 1) for k, x in v.items()}
            return {
                "$": "map",
                "v": [[self._enc(k, depth + 1), self._enc(x, depth + 1)] for k, x in v.items()],
            }
        if t is tuple:
            return {"$": "tuple", "v": [self._enc(x, depth + 1) for x in v]}
        if t in self._by_type:
            tag, fn = self._by_type[t]
            return {"$": "x:" + tag, "v": self._enc(fn(v), depth + 1)}
        if isinstance(v, enum.Enum):
            return {"$": "enum", "c": _path(t), "v": self._enc(v.value, depth + 1)}
        if isinstance(v, bool):
            return bool(v)
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return self._enc(float(v), depth)
        if isinstance(v, str):
            return str(v)
        if isinstance(v, (set, frozenset)):
            tag = "frozenset" if isinstance(v, frozenset) else "set"
            return {"$": tag, "v": [self._enc(x, depth + 1) for x in v]}
        if isinstance(v, (bytes, bytearray)):
            return {"$": "bytes", "v": base64.b64encode(bytes(v)).decode("ascii")}
        if isinstance(v, Decimal):
            return {"$": "decimal", "v": str(v)}
        if isinstance(v, _dt.datetime):
            return {"$": "datetime", "v": v.isoformat()}
        if isinstance(v, _dt.date):
            return {"$": "date", "v": v.isoformat()}
        if isinstance(v, _dt.time):
            return {"$": "time", "v": v.isoformat()}
        if isinstance(v, _dt.timedelta):
            return {"$": "timedelta", "v": [v.days, v.seconds, v.microseconds]}
        if isinstance(v, uuid.UUID):
            return {"$": "uuid", "v": str(v)}
        if isinstance(v, pathlib.PurePath):
            return {"$": "path", "c": _path(t), "v": str(v)}
        if hasattr(t, "__pydantic_fields__") and hasattr(v, "model_dump"):
            # Field by field with this codec (not model_dump(mode="json")), so Any-typed
            # fields keep their types and a SecretStr is refused instead of stored masked.
            data = {
                (info.alias or name): self._enc(getattr(v, name), depth + 1)
                for name, info in t.__pydantic_fields__.items()
            }
            for name, extra in (getattr(v, "__pydantic_extra__", None) or {}).items():
                data[name] = self._enc(extra, depth + 1)
            return {"$": "pydantic", "c": _path(t), "v": data}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            fields = {
                f.name: self._enc(getattr(v, f.name), depth + 1) for f in dataclasses.fields(v)
            }
            return {"$": "dataclass", "c": _path(t), "v": fields}
        if isinstance(v, (list, tuple, dict)):
            raise CodecError(f"cannot store a {t.__qualname__} (a subclass of a builtin container)")
        for base, (tag, fn) in self._by_type.items():
            if isinstance(v, base):
                return {"$": "x:" + tag, "v": self._enc(fn(v), depth + 1)}
        raise CodecError(
            f"cannot store a result of type {t.__module__}.{t.__qualname__}; "
            "register it with guard.codec.register(...)"
        )

    # -- decoding -----------------------------------------------------------------------
    def decode(self, text: str) -> Any:
        # The replay path: json's C scanner straight on the text (what json.loads runs,
        # without its Python wrapper and whitespace regexes). Our encoder writes no
        # surrounding whitespace; anything it did not parse whole (whitespace, trailing
        # data, not JSON) goes through json.loads, which parses or names the error.
        try:
            raw, end = _scan(text, 0)
        except (StopIteration, ValueError):
            end = -1
        if end != len(text):
            try:
                raw = json.loads(text)
            except ValueError as err:
                raise CodecError(f"stored result is not valid JSON: {err}") from err
        if '"$"' not in text:
            return raw  # plain JSON: nothing tagged inside
        try:
            return self._dec(raw)
        except CodecError:
            raise
        except Exception as err:
            raise CodecError(f"cannot replay the stored result: {err!r}") from err

    def _dec(self, v: Any) -> Any:
        if type(v) is list:
            return [self._dec(x) for x in v]
        if type(v) is not dict:
            return v
        tag = v.get("$")
        if tag is None:
            return {k: self._dec(x) for k, x in v.items()}
        payload: Any = v.get("v")
        if tag == "tuple":
            return tuple(self._dec(x) for x in payload)
        if tag == "map":
            return {self._dec(k): self._dec(x) for k, x in payload}
        if tag == "float":
            return float(payload)
        if tag == "set":
            return {self._dec(x) for x in payload}
        if tag == "frozenset":
            return frozenset(self._dec(x) for x in payload)
        if tag == "bytes":
            return base64.b64decode(payload)
        if tag == "decimal":
            return Decimal(payload)
        if tag == "datetime":
            return _dt.datetime.fromisoformat(payload)
        if tag == "date":
            return _dt.date.fromisoformat(payload)
        if tag == "time":
            return _dt.time.fromisoformat(payload)
        if tag == "timedelta":
            return _dt.timedelta(days=payload[0], seconds=payload[1], microseconds=payload[2])
        if tag == "uuid":
            return uuid.UUID(payload)
        if tag == "path":
            return _import(v["c"])(payload)
        if tag == "enum":
            return _import(v["c"])(self._dec(payload))
        if tag == "pydantic":
            return _import(v["c"]).model_validate({k: self._dec(x) for k, x in payload.items()})
        if tag == "dataclass":
            cls = _import(v["c"])
            values = {k: self._dec(x) for k, x in payload.items()}
            init = {f.name for f in dataclasses.fields(cls) if f.init}
            obj = cls(**{k: x for k, x in values.items() if k in init})
            for k, x in values.items():
                if k not in init:
                    object.__setattr__(obj, k, x)
            return obj
        if isinstance(tag, str) and tag.startswith("x:") and tag[2:] in self._by_tag:
            return self._by_tag[tag[2:]](self._dec(payload))
        raise CodecError(f"unknown tag {tag!r} in a stored result; register it on the codec")


default_codec = Codec()

#: json's own scanner, as json.loads uses it (the C one where built): (value, end).
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
