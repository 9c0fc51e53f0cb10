"""Canonical form of a tool call and the key derived from it.

A derived key is ``sha256(SCHEME, workflow, tool identity, canonical args)`` in hex. The
canonical form is a compact, tagged text that depends only on the *values* of the
arguments, never on ``PYTHONHASHSEED``, memory addresses, the machine or the Python
version. The scheme is versioned (:data:`SCHEME`); a change to the canonical form bumps
it, so old and new keys never silently compare equal.

Rules (documented in ``docs/keys.md``):

* arguments are bound to the signature: positional ≡ keyword, defaults applied;
* numbers compare by decimal value: ``100 == 100.0 == Decimal("100.00")``, while
  ``99.99 != 99.98`` and ``1e-9 != 2e-9`` (floats are written exactly, by their shortest
  round-tripping repr); ``True`` is not ``1``; NaN and infinities are rejected;
* ``str`` is NFC-normalised; lone surrogates are rejected;
* tuples ≡ lists; sets are sorted by the canonical form of their items; mappings are
  sorted by the canonical form of their keys (so ``{1: x}`` differs from ``{"1": x}``);
* Decimal, datetime (aware → UTC; naive stays naive and differs from aware), date, time,
  timedelta, UUID, Enum, bytes, paths, dataclasses and pydantic models are supported;
* anything else, a cycle, nesting deeper than :data:`MAX_DEPTH` or more than
  :data:`MAX_NODES` values raises :class:`~onceonly_core.errors.FingerprintError` naming
  the argument path. Register your own type with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
import hashlib
import inspect
import pathlib
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from .errors import ConfigError, FingerprintError

__all__ = [
    "MAX_DEPTH",
    "MAX_NODES",
    "SCHEME",
    "Signature",
    "canonical",
    "derive_key",
    "register",
    "tool_identity",
]

SCHEME = "oo1"
MAX_DEPTH = 32
MAX_NODES = 100_000

_CUSTOM: dict[type, Callable[[Any], Any]] = {}


def register(cls: type, to_canonical: Callable[[Any], Any]) -> None:
    """Teach the fingerprint a type: ``to_canonical(value)`` returns supported values.

    The output is tagged with the type's module and qualname, so two registered types
    never collide with each other or with builtins.
    """
    _CUSTOM[cls] = to_canonical


class _Walker:
    __slots__ = ("float_digits", "nodes", "out", "stack")

    def __init__(self, float_digits: int | None) -> None:
        self.out: list[str] = []
        self.nodes = 0
        self.stack: set[int] = set()
        self.float_digits = float_digits

    def walk(self, v: Any, path: str, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise FingerprintError(path, f"more than {MAX_NODES} values in the arguments")
        out = self.out
        t = type(v)
        # Exact-type checks first: they are the hot path and keep bool out of int.
        if t is str:
            out.append("s")
            out.append(_text(v, path))
        elif t is int:
            out.append("n")
            out.append(_int(v, path))
            out.append(";")
        elif t is float:
            out.append("n")
            out.append(_float(v, path, self.float_digits))
            out.append(";")
        elif v is None:
            out.append("z")
        elif t is bool:
            out.append("T" if v else "F")
        elif t is dict or isinstance(v, Mapping):
            self._enter(v, path, depth)
            items = []
            for k, val in v.items():
                sub = _Walker(self.float_digits)
                sub.nodes = self.nodes
                sub.stack = self.stack
                sub.walk(k, f"{path}[{k!r}]", depth + 1)
                self.nodes = sub.nodes
                items.append(("".join(sub.out), k, val))
            items.sort(key=lambda item: item[0])
            for i in range(1, len(items)):
                if items[i - 1][0] == items[i][0]:  # e.g. "é" composed and decomposed:
                    ka, kb = items[i - 1][1], items[i][1]  # the order would decide
                    raise FingerprintError(
                        f"{path}[{kb!r}]",
                        f"the keys {ka!r} and {kb!r} are the same after normalisation",
                    )
            out.append("{")
            for enc, k, val in items:
                out.append(enc)
                out.append(":")
                self.walk(val, f"{path}[{k!r}]", depth + 1)
            out.append("}")
            self.stack.discard(id(v))
        elif t is list or t is tuple or isinstance(v, (list, tuple)):
            self._enter(v, path, depth)
            out.append("[")
            for i, item in enumerate(v):
                self.walk(item, f"{path}[{i}]", depth + 1)
            out.append("]")
            self.stack.discard(id(v))
        elif isinstance(v, (set, frozenset)):
            self._enter(v, path, depth)
            encoded = []
            for item in v:
                sub = _Walker(self.float_digits)
                sub.nodes = self.nodes
                sub.stack = self.stack
                sub.walk(item, f"{path}{{item}}", depth + 1)
                self.nodes = sub.nodes
                encoded.append("".join(sub.out))
            encoded.sort()
            out.append("<")
            out.extend(encoded)
            out.append(">")
            self.stack.discard(id(v))
        elif isinstance(v, bool):
            out.append("T" if v else "F")
        elif isinstance(v, enum.Enum):
            out.append("E")
            out.append(_text(_type_name(t), path))
            self.walk(v.value, f"{path}.value", depth + 1)
        elif isinstance(v, int):
            out.append("n")
            out.append(_int(int(v), path))
            out.append(";")
        elif isinstance(v, float):
            out.append("n")
            out.append(_float(float(v), path, self.float_digits))
            out.append(";")
        elif isinstance(v, Decimal):
            out.append("n")
            out.append(_decimal(v, path))
            out.append(";")
        elif isinstance(v, str):
            out.append("s")
            out.append(_text(str(v), path))
        elif isinstance(v, (bytes, bytearray, memoryview)):
            b = bytes(v)
            out.append("b")
            out.append(b.hex())
            out.append(";")
        elif isinstance(v, _dt.datetime):
            if v.tzinfo is not None and v.utcoffset() is not None:
                out.append("D")
                out.append(_utc_text(v))
            else:
                out.append("d")
                out.append(v.replace(tzinfo=None).isoformat())
            out.append(";")
        elif isinstance(v, _dt.date):
            out.append("a")
            out.append(v.isoformat())
            out.append(";")
        elif isinstance(v, _dt.time):
            out.append("h")
            if v.tzinfo is not None and v.utcoffset() is not None:
                out.append(v.isoformat())
            else:
                out.append(v.replace(tzinfo=None).isoformat())
            out.append(";")
        elif isinstance(v, _dt.timedelta):
            out.append("t")
            out.append(str((v.days * 86400 + v.seconds) * 1_000_000 + v.microseconds))
            out.append(";")
        elif isinstance(v, uuid.UUID):
            out.append("u")
            out.append(v.hex)
            out.append(";")
        elif isinstance(v, pathlib.PurePath):
            out.append("p")
            out.append(_text(v.as_posix(), path))
        elif t in _CUSTOM:
            out.append("X")
            out.append(_text(_type_name(t), path))
            self._enter(v, path, depth)
            self.walk(_CUSTOM[t](v), f"{path}", depth + 1)
            self.stack.discard(id(v))
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            self._enter(v, path, depth)
            out.append("C")
            out.append(_text(_type_name(t), path))
            out.append("{")
            for f in dataclasses.fields(v):
                out.append(_text(f.name, path))
                self.walk(getattr(v, f.name), f"{path}.{f.name}", depth + 1)
            out.append("}")
            self.stack.discard(id(v))
        elif hasattr(t, "__pydantic_fields__") and hasattr(v, "model_dump"):
            self._enter(v, path, depth)
            out.append("M")
            out.append(_text(_type_name(t), path))
            out.append("{")
            for name in t.__pydantic_fields__:
                out.append(_text(name, path))
                self.walk(getattr(v, name), f"{path}.{name}", depth + 1)
            extra = getattr(v, "__pydantic_extra__", None)
            if extra:  # extra="allow" fields are data too ("+" never starts a field name)
                out.append("+")
                self.walk(dict(extra), path, depth + 1)
            out.append("}")
            self.stack.discard(id(v))
        else:
            for base, fn in _CUSTOM.items():
                if isinstance(v, base):
                    out.append("X")
                    out.append(_text(_type_name(base), path))
                    self.walk(fn(v), path, depth + 1)
                    return
            raise FingerprintError(
                path,
                f"values of type {_type_name(t)} are not supported; pass key=, key_args= or "
                "exclude=, or teach it with onceonly_core.fingerprint.register()",
            )

    def _enter(self, v: Any, path: str, depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise FingerprintError(path, f"nested deeper than {MAX_DEPTH} levels")
        i = id(v)
        if i in self.stack:
            raise FingerprintError(path, "the value contains a reference cycle")
        self.stack.add(i)


_EPOCH = _dt.datetime(1970, 1, 1)


def _utc_text(v: _dt.datetime) -> str:
    try:
        return v.astimezone(_dt.timezone.utc).replace(tzinfo=None).isoformat()
    except OverflowError:
        # The instant is outside year 1..9999 in UTC (e.g. datetime.max at -05:00): write
        # it as microseconds since the epoch ("@…", never a valid isoformat prefix).
        offset = v.utcoffset()
        assert offset is not None
        micros = (v.replace(tzinfo=None) - _EPOCH - offset) // _dt.timedelta(microseconds=1)
        return f"@{micros}"


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _text(s: str, path: str) -> str:
    # Length-prefixed: no escaping needed, and no string can imitate another token.
    if not s.isascii():
        if not unicodedata.is_normalized("NFC", s):
            s = unicodedata.normalize("NFC", s)
        try:
            n = len(s.encode("utf-8"))
        except UnicodeEncodeError:
            raise FingerprintError(path, "the string contains a lone surrogate") from None
        return f"{n}:{s}"
    return f"{len(s)}:{s}"


def _float(v: float, path: str, digits: int | None) -> str:
    if v != v or v in (float("inf"), float("-inf")):
        raise FingerprintError(path, f"{v!r} is not a finite number")
    if digits is not None:
        v = float(f"{v:.{digits}g}")
    if v.is_integer() and -1e15 < v < 1e15:
        return str(int(v))  # 100.0 -> "100", -0.0 -> "0": the same amount as the int
    # repr() is the shortest text that round-trips: distinct floats never share it.
    return _decimal(Decimal(repr(v)), path)


def _decimal(v: Decimal, path: str) -> str:
    # Exact: no Decimal context is involved (normalize() would round to 28 digits).
    if not v.is_finite():
        raise FingerprintError(path, f"{v!r} is not a finite number")
    sign, digits, exp = v.as_tuple()
    assert isinstance(exp, int)
    text = "".join(map(str, digits))
    stripped = text.rstrip("0")
    if not stripped:
        return "0"  # -0, 0E+5 and 0.000 are all zero
    exp += len(text) - len(stripped)
    prefix = "-" if sign else ""
    if exp >= 0 and len(stripped) + exp <= _PLAIN_DIGITS:
        return prefix + stripped + "0" * exp  # an integer: the same form as int
    return f"{prefix}{stripped}e{exp}"


def _int(v: int, path: str) -> str:
    if -_PLAIN_LIMIT < v < _PLAIN_LIMIT:
        return str(v)
    return _decimal(Decimal(v), path)


_PLAIN_DIGITS = 30
_PLAIN_LIMIT = 10**_PLAIN_DIGITS
_FLAT_MAX = 64
_INFINITE = (float("inf"), float("-inf"))


def _flat(d: dict[Any, Any], digits: int | None) -> str | None:
    """The hot path of :func:`canonical`: the bound arguments of most tool calls are a
    small dict of ASCII-str names to ASCII strings, ints, finite floats, None or bools.

    Returns exactly the text the walker writes for such a dict, or None for anything
    else, which the walker then handles, errors and all. Each pair is written as one
    string and the strings are sorted: no encoded name (``s<len>:<name>``) is a prefix
    of another, so two pairs differ first inside their names, and sorting the pairs
    sorts by encoded name, as the walker does.
    """
    parts = []
    for k, v in d.items():
        if type(k) is not str or not k.isascii():
            return None
        t = type(v)
        if t is str:
            if not v.isascii():
                return None
            parts.append(f"s{len(k)}:{k}:s{len(v)}:{v}")
        elif t is int:
            if -_PLAIN_LIMIT < v < _PLAIN_LIMIT:
                parts.append(f"s{len(k)}:{k}:n{v};")
            else:
                parts.append(f"s{len(k)}:{k}:n{_int(v, '')};")
        elif t is float:
            if v != v or v in _INFINITE:
                return None
            try:
                parts.append(f"s{len(k)}:{k}:n{_float(v, '', digits)};")
            except FingerprintError:  # rounded to infinity: the walker names the argument
                return None
        elif v is None:
            parts.append(f"s{len(k)}:{k}:z")
        elif t is bool:
            parts.append(f"s{len(k)}:{k}:T" if v else f"s{len(k)}:{k}:F")
        else:
            return None
    if len(parts) > 1:
        parts.sort()
    return "{" + "".join(parts) + "}"


def canonical(value: Any, *, float_digits: int | None = None, path: str = "args") -> str:
    """Return the canonical text of ``value`` (the part of a key that depends on data)."""
    if type(value) is dict and len(value) <= _FLAT_MAX:
        text = _flat(value, float_digits)
        if text is not None:
            return text
    w = _Walker(float_digits)
    w.walk(value, path, 0)
    return "".join(w.out)


def tool_identity(fn: Callable[..., Any]) -> str:
    """Stable name of a callable: ``module.qualname``.

    Bound methods use their function's qualname (``Stripe.charge`` and ``Paypal.charge``
    differ); ``functools.partial`` uses the wrapped function; lambdas add their source
    line and column (``module.f.<locals>.<lambda>@12:8``), so two lambdas never collide
    — pass ``name=`` for an identity that survives edits to the file.
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    target = getattr(fn, "__func__", fn)  # bound method -> function
    qualname = getattr(target, "__qualname__", None)
    module = getattr(target, "__module__", None)
    if qualname is None:
        # A callable instance: identify it by its class.
        cls = type(target)
        qualname, module = cls.__qualname__, cls.__module__
    name = f"{module or 'builtins'}.{qualname}"
    if "<lambda>" in qualname:
        code = getattr(target, "__code__", None)
        if code is not None:
            name += f"@{code.co_firstlineno}"
            # Python >= 3.11 knows columns too: two lambdas on one line stay apart.
            positions = getattr(code, "co_positions", None)
            if positions is not None:
                cols = [c for _, _, c, _ in positions() if c]
                if cols:
                    name += f":{min(cols)}"
    return name


class Signature:
    """A callable's parameters, bound fast to a call's arguments.

    ``bind(args, kwargs)`` returns the canonical mapping ``{name: value}`` with defaults
    applied, ``*args`` as a list and ``**kwargs`` merged as a dict under its name, so
    ``f(1, 2)``, ``f(1, b=2)`` and ``f(a=1, b=2)`` bind equally.
    """

    __slots__ = (
        "_defaults",
        "_fast",
        "_names",
        "_npos",
        "_sig",
        "partial_args",
        "partial_kw",
    )

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.partial_args: tuple[Any, ...] = ()
        self.partial_kw: dict[str, Any] = {}
        while isinstance(fn, functools.partial):
            self.partial_args = tuple(fn.args) + self.partial_args
            self.partial_kw = {**fn.keywords, **self.partial_kw}
            fn = fn.func
        # The receiver of a bound method is not part of the fingerprint: it is usually a
        # client object without a stable value. Distinguish accounts with key_args/namespace.
        # Not kept either: the guard caches a method's Signature by its function, and must
        # not keep a per-request receiver alive.
        bound_self = getattr(fn, "__self__", None)
        target = getattr(fn, "__func__", fn)
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"cannot read the signature of {fn!r}: {err}") from err
        params = list(sig.parameters.values())
        # Only a Python method's __func__ lists the receiver; builtin methods and module
        # functions (``"a".split``, ``os.remove``: __self__ is the str / the module) don't.
        unwrapped = target is not fn
        if bound_self is not None and unwrapped and params:
            params = params[1:]  # self, or cls for a classmethod
        self._sig = sig.replace(parameters=params)
        simple = all(
            p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params
        ) and not any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in params)
        self._fast = simple
        # Positional arguments may only fill positional parameters (not keyword-only ones).
        self._npos = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        self._names = tuple(p.name for p in params)
        self._defaults = tuple(p.default for p in params)

    @property
    def parameters(self) -> tuple[str, ...]:
        return self._names

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if self.partial_args:
            args = (*self.partial_args, *args)
        if self.partial_kw:
            kwargs = {**self.partial_kw, **kwargs}
        if self._fast and len(args) <= self._npos:
            names = self._names
            out: dict[str, Any] = dict(zip(names, args, strict=False))  # len(args) <= npos
            ok = True
            for k, val in kwargs.items():
                if k in out or k not in names:
                    ok = False
                    break
                out[k] = val
            if ok and len(out) < len(names):
                empty = inspect.Parameter.empty
                for name, default in zip(names, self._defaults, strict=True):
                    if name not in out:
                        if default is empty:
                            ok = False
                            break
                        out[name] = default
            if ok:
                # Positional arguments then defaults are in parameter order already;
                # keywords may not be.
                return {n: out[n] for n in names} if kwargs else out
        bound = self._sig.bind(*args, **kwargs)  # raises the usual TypeError
        bound.apply_defaults()
        return dict(bound.arguments)


def derive_key(
    tool: str,
    bound: Mapping[str, Any],
    *,
    workflow: str | None = None,
    key_args: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    float_digits: int | None = None,
) -> str:
    """The derived key of one call, 64 hex characters."""
    if key_args is not None:
        chosen = {}
        for name in key_args:
            if name not in bound:
                raise ConfigError(f"key_args names {name!r}, which {tool} does not take")
            chosen[name] = bound[name]
        data: Mapping[str, Any] = chosen
    elif exclude:
        skip = set(exclude)
        data = {k: v for k, v in bound.items() if k not in skip}
    else:
        data = bound
    text = canonical(data, float_digits=float_digits)
    return digest(tool, text, workflow)


def digest(tool: str, canonical_text: str, workflow: str | None = None) -> str:
    # The hash of the (scheme, workflow, tool) prefix is kept per tool and workflow and
    # copied: a key costs one update of the arguments' text.
    head = _HEADS.get((tool, workflow))
    if head is None:
        head = hashlib.sha256(f"{SCHEME}\0{workflow or ''}\0{tool}\0".encode())
        if len(_HEADS) >= 4096:
            _HEADS.clear()
        _HEADS[(tool, workflow)] = head
    h = head.copy()
    h.update(canonical_text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


_HEADS: dict[tuple[str, str | None], Any] = {}
