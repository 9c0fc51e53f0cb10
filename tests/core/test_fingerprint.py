"""Keys: the canonical form of a call and the identity of a tool (DESIGN §4 "Key", docs/keys.md).

What must never happen: two different calls sharing a key (a real charge silently skipped),
and one call getting two keys (a charge run twice). Both directions are tested with fixed
cases (including every false dedup the ledger-once peer had) and with hypothesis.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import json
import os
import pathlib
import pickle
import subprocess
import sys
import unicodedata
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onceonly_core import ConfigError, FingerprintError, Guard, MemoryStore
from onceonly_core import fingerprint as fp
from onceonly_core.fingerprint import MAX_DEPTH, MAX_NODES, SCHEME, canonical, tool_identity

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def g() -> Guard:
    return Guard(store=MemoryStore(), namespace="fp", quiet=True)


def charge(customer: str, amount: Any, currency: str = "usd") -> tuple[str, Any, str]:
    return customer, amount, currency


def place(order: Any) -> Any:
    return order


def same(a: Any, b: Any) -> bool:
    """Do two argument values give the same key (through the real facade)?"""
    k = Guard(store=MemoryStore(), quiet=True).key_for
    return bool(k(place, a) == k(place, b))


# -- binding: positional ≡ keyword ≡ defaults applied ------------------------------------


def test_positional_keyword_and_defaults_give_one_key(g: Guard) -> None:
    forms = [
        g.key_for(charge, "c1", 5),
        g.key_for(charge, customer="c1", amount=5),
        g.key_for(charge, amount=5, customer="c1"),
        g.key_for(charge, "c1", 5, "usd"),
        g.key_for(charge, "c1", amount=5, currency="usd"),
        g.key_for(charge, currency="usd", amount=5, customer="c1"),
    ]
    assert len(set(forms)) == 1
    assert g.key_for(charge, "c1", 5, "eur") != forms[0]
    assert g.key_for(charge, "c2", 5) != forms[0]


def test_var_args_and_var_kwargs_are_part_of_the_key(g: Guard) -> None:
    def f(a: int, *rest: int, **opts: int) -> None: ...

    assert g.key_for(f, 1, 2, 3, x=1, y=2) == g.key_for(f, 1, 2, 3, y=2, x=1)
    assert g.key_for(f, 1, 2, 3, x=1) != g.key_for(f, 1, 2, 3, x=2)
    assert g.key_for(f, 1, 2, 3) != g.key_for(f, 1, 3, 2)
    assert g.key_for(f, 1) != g.key_for(f, 1, x=0)


def test_a_call_the_tool_would_reject_is_rejected_before_anything_is_claimed(g: Guard) -> None:
    def kwonly(a: int, *, b: int = 1) -> int:
        return a + b

    ran: list[int] = []

    def tool(a: int, *, b: int = 1) -> int:
        ran.append(a)
        return a

    # Positional arguments cannot fill a keyword-only parameter (Python refuses the call).
    with pytest.raises(TypeError):
        g.key_for(kwonly, 1, 2)
    with pytest.raises(TypeError):
        g(tool, 1, 2)
    assert ran == []
    assert g.store.list() == []
    with pytest.raises(TypeError, match=r"guard\.using"):
        g(charge, "c1", 5, key="k1")  # charge has no `key` parameter: the hint names the fix
    assert g.key_for(kwonly, 1, b=1) == g.key_for(kwonly, 1)


def test_builtin_bound_methods_and_module_functions_bind_their_real_parameters(
    g: Guard,
) -> None:
    # A builtin method's signature has no `self` to drop ("a,b".split.__self__ is the str);
    # neither has a C module function (os.fspath.__self__ is the module).
    sig = fp.Signature("a,b".split)
    assert sig.bind((",",), {}) == {"sep": ",", "maxsplit": -1}
    assert g.key_for("a,b".split, ",") == g.key_for("a,b".split, sep=",")
    assert g("a,b".split, sep=",") == ["a", "b"]
    assert fp.Signature(os.fspath).bind(("x",), {}) == {"path": "x"}


def test_methods_classmethods_and_staticmethods_bind_without_the_receiver(g: Guard) -> None:
    class Api:
        def charge(self, amount: int) -> int:
            return amount

        @classmethod
        def refund(cls, amount: int) -> int:
            return -amount

        @staticmethod
        def ping(n: int) -> int:
            return n

    api = Api()
    assert g.key_for(api.charge, 5) == g.key_for(api.charge, amount=5)
    assert g.key_for(Api.refund, 5) == g.key_for(Api.refund, amount=5)
    assert g.key_for(api.ping, 5) == g.key_for(Api.ping, n=5)
    assert g(api.charge, amount=7) == 7
    assert g(Api.refund, amount=7) == -7


# -- tool identity --------------------------------------------------------------------------


class Stripe:
    def charge(self, amount: int) -> str:
        return f"stripe {amount}"


class Paypal:
    def charge(self, amount: int) -> str:
        return f"paypal {amount}"


def test_two_classes_methods_of_one_name_never_collide(g: Guard) -> None:
    assert tool_identity(Stripe().charge).endswith("Stripe.charge")
    assert tool_identity(Paypal().charge).endswith("Paypal.charge")
    assert g.key_for(Stripe().charge, 5) != g.key_for(Paypal().charge, 5)
    assert g(Stripe().charge, 5) == "stripe 5"
    assert g(Paypal().charge, 5) == "paypal 5"  # not a replay of Stripe's result


def test_bound_methods_of_two_instances_share_an_identity_documented(g: Guard) -> None:
    # docs/keys.md: the receiver is not part of the key (usually a client object).
    a, b = Stripe(), Stripe()
    assert tool_identity(a.charge) == tool_identity(b.charge)
    assert g.key_for(a.charge, 5) == g.key_for(b.charge, 5)
    assert g(a.charge, 5) == "stripe 5"
    assert g.stats()["executed"] == 1
    assert g(b.charge, 5) == "stripe 5"
    stats = g.stats()
    assert (stats["executed"], stats["replayed"]) == (1, 1)


def test_functions_with_one_qualname_in_two_modules_differ(g: Guard) -> None:
    def make(module: str) -> Any:
        def send(to: str) -> str:
            return to

        send.__module__ = module
        return send

    a, b = make("billing.email"), make("marketing.email")
    assert tool_identity(a) != tool_identity(b)
    assert g.key_for(a, "x") != g.key_for(b, "x")


def test_two_lambdas_in_one_scope_do_not_collide(g: Guard) -> None:
    double = lambda x: x * 2  # noqa: E731
    triple = lambda x: x * 3  # noqa: E731
    assert tool_identity(double) != tool_identity(triple)
    assert "<lambda>@" in tool_identity(double)
    assert g.key_for(double, 5) != g.key_for(triple, 5)
    assert g(double, 5) == 10
    assert g(triple, 5) == 15  # the peer silently skipped this call


def test_two_lambdas_on_one_line_do_not_collide() -> None:
    double, triple = (lambda x: x * 2), (lambda x: x * 3)
    assert tool_identity(double) != tool_identity(triple)


def test_partial_is_its_function_with_the_partial_arguments_merged(g: Guard) -> None:
    ran: list[tuple[str, int]] = []

    def pay(customer: str, amount: int) -> str:
        ran.append((customer, amount))
        return f"{customer}:{amount}"

    p = functools.partial(pay, "c1")
    assert tool_identity(p) == tool_identity(pay)
    assert g.key_for(p, 5) == g.key_for(pay, "c1", 5)
    assert g.key_for(functools.partial(pay, amount=5), "c1") == g.key_for(pay, "c1", 5)
    assert g.key_for(functools.partial(functools.partial(pay, "c1"), 5)) == g.key_for(pay, "c1", 5)
    assert g(p, 5) == "c1:5"
    assert g(pay, "c1", 5) == "c1:5"  # a replay: the same call
    assert g(p, 6) == "c1:6"
    assert ran == [("c1", 5), ("c1", 6)]


def test_callable_objects_are_identified_by_their_class(g: Guard) -> None:
    class Sender:
        def __call__(self, to: str) -> str:
            return f"sent {to}"

    class Mailer:
        def __call__(self, to: str) -> str:
            return f"mailed {to}"

    assert tool_identity(Sender()).endswith("Sender")
    assert g.key_for(Sender(), "x") != g.key_for(Mailer(), "x")
    assert g(Sender(), "x") == "sent x"
    assert g(Mailer(), "x") == "mailed x"


def test_name_overrides_the_identity(g: Guard) -> None:
    def v1(order: int) -> str:
        return "v1"

    def v2(order: int) -> str:
        return "v2"

    assert g.using(name="payments.refund")(v1, 1) == "v1"
    # A renamed function with the same name= is the same tool: replayed.
    assert g.using(name="payments.refund")(v2, 1) == "v1"
    assert g(v2, 1) == "v2"  # without name=: its own identity


# -- numbers --------------------------------------------------------------------------------

DISTINCT_AMOUNTS = [
    (99.99, 99.98),
    (1e-9, 2e-9),
    (1.000000001, 1.000000004),
    (1.4e-8, 6e-9),
    (0.1 + 0.2, 0.3),
    (99.99, 99.9900000001),
    (1e-300, 2e-300),
    (2.0**53, 2.0**53 + 2),
    (2**53, 2**53 + 1),
    (10**30, 10**30 + 1),
    (-5, 5),
    (Decimal("1.00000000000000000000000000000001"), Decimal(1)),
    (Decimal("1.00000000000000000000000000000001"), Decimal("1.00000000000000000000000000000002")),
    (Decimal("0.1"), Decimal("0.10000000000000000000000000000000000000000001")),
]


@pytest.mark.parametrize(("a", "b"), DISTINCT_AMOUNTS, ids=repr)
def test_distinct_amounts_never_share_a_key(a: Any, b: Any, g: Guard) -> None:
    assert canonical(a) != canonical(b)
    ran: list[Any] = []

    def pay(amount: Any) -> Any:
        ran.append(amount)
        return amount

    g(pay, a)
    g(pay, b)
    assert ran == [a, b]  # both ran: no false dedup


EQUAL_NUMBERS = [
    (100, 100.0),
    (100, Decimal("100.00")),
    (100.0, Decimal("1E+2")),
    (0.0, -0.0),
    (0, -0.0),
    (0, Decimal("-0.000")),
    (1.5, Decimal("1.50")),
    (0.1, Decimal("0.1")),  # a float's value is its shortest round-trip decimal (documented)
    (10**40, Decimal("1E+40")),
    (10**40, 1e40),
    (-(10**31), Decimal("-1E+31")),
    (123 * 10**28, Decimal("1.23E+30")),
]


@pytest.mark.parametrize(("a", "b"), EQUAL_NUMBERS, ids=repr)
def test_equal_numbers_share_a_key_documented(a: Any, b: Any) -> None:
    assert canonical(a) == canonical(b)
    assert same(a, b)


def test_bool_is_not_a_number() -> None:
    assert not same(True, 1)
    assert not same(False, 0)
    assert not same(True, 1.0)
    assert not same([True], [1])
    assert not same({"x": True}, {"x": 1})


@pytest.mark.parametrize(
    "bad",
    [float("nan"), float("inf"), float("-inf"), Decimal("NaN"), Decimal("sNaN"), Decimal("-Inf")],
    ids=repr,
)
def test_non_finite_numbers_are_an_error_naming_the_argument(bad: Any, g: Guard) -> None:
    ran: list[Any] = []
    with pytest.raises(FingerprintError) as info:
        g(lambda order: ran.append(order), {"items": [1, 2, bad]})
    assert info.value.path == "args['order']['items'][2]"
    assert "not a finite number" in info.value.reason
    assert ran == []
    assert g.store.list() == []  # nothing claimed


# -- containers and strings -------------------------------------------------------------


def test_mapping_and_sequence_rules() -> None:
    assert not same({1: "x"}, {"1": "x"})
    assert same({1: "x"}, {1.0: "x"})
    assert same((1, 2), [1, 2])
    assert not same([1, 2], [2, 1])
    assert same({"a": 1, "b": [1, {"c": 2, "d": 3}]}, {"b": [1, {"d": 3, "c": 2}], "a": 1})
    assert not same({"a": 1}, {"a": 1, "b": None})
    assert not same([], {})
    assert not same([], None)
    assert not same([[]], [])
    assert not same(["ab"], ["a", "b"])
    assert not same({"a": "bc"}, {"ab": "c"})


def test_sets_ignore_order_and_hash_seed() -> None:
    names = [f"name-{i}" for i in range(50)]
    assert same(set(names), set(reversed(names)))
    assert same(set(names), frozenset(names))
    assert not same(set(names), names)
    assert not same({1, 2}, {1, 3})
    assert same({1, 2.0, Decimal(3)}, {3, 2, 1})


def test_strings_are_nfc_normalised() -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed
    assert same(composed, decomposed)
    assert same({"name": composed}, {"name": decomposed})
    assert not same("a", "a ")
    assert not same("a", "A")
    assert not same("k\u0301", "k")
    assert not same("x", b"x")
    assert not same("1", 1)
    assert not same("", None)


def test_two_keys_equal_after_normalisation_are_an_error() -> None:
    # Otherwise the dict's insertion order would decide the key.
    with pytest.raises(FingerprintError) as info:
        canonical({"caf\u00e9": 1, "cafe\u0301": 2})
    assert "same after normalisation" in info.value.reason
    assert info.value.path.startswith("args[")


def test_lone_surrogates_are_an_error(g: Guard) -> None:
    with pytest.raises(FingerprintError) as info:
        g.key_for(place, {"note": "ok \ud800"})
    assert info.value.path == "args['order']['note']"
    assert "surrogate" in info.value.reason


# -- other types ----------------------------------------------------------------------------


class Color(enum.Enum):
    RED = 1
    BLUE = 2


class Shade(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    LOW = 1


@dataclasses.dataclass
class Item:
    sku: str
    qty: int


@dataclasses.dataclass
class Line:
    sku: str
    qty: int


@dataclasses.dataclass
class Order:
    items: list[Item]
    note: str = ""
    total: int = dataclasses.field(init=False, default=0)


class Customer(pydantic.BaseModel):
    id: str
    since: dt.date


class Account(pydantic.BaseModel):
    id: str
    since: dt.date


UTC = dt.timezone.utc
PLUS2 = dt.timezone(dt.timedelta(hours=2))


def test_datetimes() -> None:
    naive = dt.datetime(2024, 5, 1, 12, 0)
    aware = dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert not same(naive, aware)
    assert same(aware, dt.datetime(2024, 5, 1, 14, 0, tzinfo=PLUS2))  # the same instant
    assert not same(aware, dt.datetime(2024, 5, 1, 12, 0, tzinfo=PLUS2))
    assert not same(aware, aware + dt.timedelta(microseconds=1))
    assert same(naive, dt.datetime(2024, 5, 1, 12, 0, 0, 0))
    assert not same(dt.date(2024, 5, 1), dt.datetime(2024, 5, 1))
    assert not same(dt.date(2024, 5, 1), "2024-05-01")
    assert same(dt.date(2024, 5, 1), dt.date(2024, 5, 1))
    assert not same(dt.date(2024, 5, 1), dt.date(2024, 5, 2))
    assert same(dt.time(9, 30), dt.time(9, 30, 0))
    assert not same(dt.time(9, 30), dt.time(9, 30, 1))
    assert not same(dt.time(9, 30), dt.time(9, 30, tzinfo=UTC))
    assert same(dt.timedelta(seconds=1), dt.timedelta(microseconds=1_000_000))
    assert same(dt.timedelta(days=1), dt.timedelta(hours=24))
    assert not same(dt.timedelta(days=1), dt.timedelta(seconds=86399))
    assert not same(dt.timedelta(seconds=-1), dt.timedelta(seconds=1))


def test_aware_datetimes_beyond_the_utc_range() -> None:
    # datetime.max at -05:00 is after 9999-12-31 in UTC: astimezone() overflows.
    minus5 = dt.timezone(dt.timedelta(hours=-5))
    minus6 = dt.timezone(dt.timedelta(hours=-6))
    late = dt.datetime.max.replace(tzinfo=minus5)
    same_instant = (dt.datetime.max - dt.timedelta(hours=1)).replace(tzinfo=minus6)
    assert late == same_instant
    assert same(late, same_instant)
    assert not same(late, late - dt.timedelta(microseconds=1))
    assert not same(late, dt.datetime.max)  # naive
    early = dt.datetime.min.replace(tzinfo=dt.timezone(dt.timedelta(hours=3)))
    assert same(early, early)
    assert not same(early, early + dt.timedelta(microseconds=1))


def test_uuid_bytes_paths_enums() -> None:
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert same(u, uuid.UUID(u.hex))
    assert not same(u, str(u))
    assert not same(u, uuid.UUID(int=u.int + 1))
    assert same(b"\x00\xff", bytearray(b"\x00\xff"))
    assert not same(b"\x00", b"\x00\x00")
    assert same(pathlib.Path("a/b"), pathlib.PurePosixPath("a/b"))
    assert not same(pathlib.Path("a/b"), "a/b")
    assert not same(pathlib.Path("a/b"), pathlib.Path("a/c"))
    assert same(Color.RED, Color(1))
    assert not same(Color.RED, Color.BLUE)
    assert not same(Color.RED, Shade.RED)  # same name and value, another class
    assert not same(Color.RED, 1)
    assert not same(Level.LOW, 1)


def test_dataclasses_and_pydantic_models() -> None:
    assert same(Order([Item("a", 1)], "n"), Order([Item("a", 1)], "n"))
    assert not same(Order([Item("a", 1)]), Order([Item("a", 2)]))
    assert not same(Item("a", 1), Line("a", 1))  # same fields, another class
    assert not same(Item("a", 1), {"sku": "a", "qty": 1})
    c = Customer(id="c1", since=dt.date(2020, 1, 1))
    assert same(c, Customer(id="c1", since=dt.date(2020, 1, 1)))
    assert not same(c, Customer(id="c2", since=dt.date(2020, 1, 1)))
    assert not same(c, Account(id="c1", since=dt.date(2020, 1, 1)))
    assert not same(c, {"id": "c1", "since": dt.date(2020, 1, 1)})


class Loose(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    id: str


def test_pydantic_extra_fields_are_part_of_the_key() -> None:
    # Regression: only declared fields were walked, so extra="allow" data was ignored and
    # two different payloads shared a key (a false dedup).
    assert not same(Loose(id="a", amount=1), Loose(id="a", amount=2))
    assert not same(Loose(id="a", amount=1), Loose(id="a"))
    assert same(Loose(id="a", amount=1, note="x"), Loose(id="a", note="x", amount=1))
    assert same(Loose(id="a"), Loose(id="a"))


def test_every_supported_type_runs_once_and_replays(g: Guard) -> None:
    ran: list[Any] = []

    def tool(value: Any) -> str:
        ran.append(value)
        return "done"

    values = [
        Decimal("99.99"),
        dt.datetime(2024, 1, 1, tzinfo=UTC),
        dt.date(2024, 1, 1),
        dt.time(1, 2),
        dt.timedelta(3),
        uuid.UUID(int=7),
        Color.RED,
        b"\x01",
        pathlib.Path("x"),
        {1, 2},
        frozenset({3}),
        (1, "a"),
        Order([Item("a", 1)]),
        Customer(id="c", since=dt.date(2020, 1, 1)),
    ]
    for v in values:
        assert g(tool, v) == "done"
        assert g(tool, v) == "done"
    assert ran == values


# -- limits and errors ------------------------------------------------------------------


def nest(levels: int) -> Any:
    v: Any = 1
    for _ in range(levels):
        v = [v]
    return v


def test_depth_limit_names_the_path(g: Guard) -> None:
    assert MAX_DEPTH == 32
    g.key_for(place, nest(MAX_DEPTH - 1))  # the argument mapping itself is level 1
    with pytest.raises(FingerprintError) as info:
        g.key_for(place, nest(MAX_DEPTH))
    assert info.value.path == "args['order']" + "[0]" * (MAX_DEPTH - 1)
    assert "deeper" in info.value.reason


def test_node_limit_names_the_path(g: Guard) -> None:
    assert MAX_NODES == 100_000
    g.key_for(place, list(range(MAX_NODES - 10)))
    with pytest.raises(FingerprintError) as info:
        g.key_for(place, list(range(MAX_NODES + 1)))
    # nodes: the argument mapping, the key "order", the list, then its items
    assert info.value.path == f"args['order'][{MAX_NODES - 3}]"
    assert "more than" in info.value.reason


def test_cycles_name_the_path(g: Guard) -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(FingerprintError) as info:
        g.key_for(place, loop)
    assert info.value.path == "args['order'][0]"
    assert "cycle" in info.value.reason
    d: dict[str, Any] = {}
    d["self"] = d
    with pytest.raises(FingerprintError) as info:
        g.key_for(place, {"x": d})
    assert info.value.path == "args['order']['x']['self']"
    # A shared (acyclic) reference is fine.
    shared = [1, 2]
    g.key_for(place, [shared, shared, {"a": shared}])


def test_unknown_types_are_an_error_naming_the_argument(g: Guard) -> None:
    class Opaque:
        pass

    ran: list[Any] = []
    with pytest.raises(FingerprintError) as info:
        g(lambda order: ran.append(order), {"items": [1, 2, Opaque()]})
    assert info.value.path == "args['order']['items'][2]"
    assert "Opaque" in info.value.reason
    assert "register" in str(info.value)
    assert isinstance(info.value, TypeError)
    with pytest.raises(FingerprintError) as info:
        g.key_for(place, object())
    assert info.value.path == "args['order']"
    with pytest.raises(FingerprintError) as info:
        g.key_for(place, {"k": {1, 2, float("inf")}})
    assert info.value.path == "args['order']['k']{item}"
    with pytest.raises(FingerprintError) as info:
        g.key_for(place, [Item("a", float("nan"))])  # type: ignore[arg-type]
    assert info.value.path == "args['order'][0].qty"
    with pytest.raises(FingerprintError) as info:
        g.key_for(place, {float("nan"): 1})
    assert info.value.path == "args['order'][nan]"
    assert ran == []


class Money:
    def __init__(self, amount: str, currency: str) -> None:
        self.amount, self.currency = amount, currency


class Euro(Money):
    pass


@pytest.fixture
def registered_money() -> Any:
    fp.register(Money, lambda m: (m.amount, m.currency))
    yield
    fp._CUSTOM.pop(Money, None)


def test_register_teaches_a_type(registered_money: None) -> None:
    assert same(Money("1.00", "usd"), Money("1.00", "usd"))
    assert not same(Money("1.00", "usd"), Money("1.00", "eur"))
    assert not same(Money("1.00", "usd"), ("1.00", "usd"))  # tagged with the type's name
    assert same(Euro("1", "eur"), Euro("1", "eur"))  # subclasses use the base's function
    assert not same(Euro("1", "eur"), Euro("2", "eur"))


def test_unregistered_type_fails_then_works_once_registered(g: Guard) -> None:
    with pytest.raises(FingerprintError):
        g.key_for(place, Money("1", "usd"))
    fp.register(Money, lambda m: [m.amount, m.currency])
    try:
        assert g.key_for(place, Money("1", "usd")) == g.key_for(place, Money("1", "usd"))
    finally:
        fp._CUSTOM.pop(Money, None)


def test_float_tolerance_is_opt_in(g: Guard) -> None:
    ran: list[float] = []

    def pay(amount: float) -> float:
        ran.append(amount)
        return amount

    g(pay, 1.0000001)
    g(pay, 1.0000002)
    assert ran == [1.0000001, 1.0000002]
    rounded = g.using(float_digits=6)
    assert rounded(pay, 2.0000001) == 2.0000001
    assert rounded(pay, 2.0000002) == 2.0000001  # replayed: equal to 6 significant digits
    assert rounded(pay, 1e-9) == 1e-9
    assert rounded(pay, 2e-9) == 2e-9  # relative, never absolute rounding
    with pytest.raises(ConfigError):
        g.using(float_digits=0)(pay, 1.0)


# -- the scheme is stable -------------------------------------------------------------------


def test_canonical_form_and_key_are_frozen_for_scheme_oo1() -> None:
    # Changing any of these changes every stored key: bump SCHEME instead.
    assert SCHEME == "oo1"
    value = {
        "customer": "cus_42",
        "amount": Decimal("99.99"),
        "items": [1, 2.5, None, True],
        "at": dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        "tags": {"b", "a"},
        "id": uuid.UUID(int=1),
        "raw": b"\x00\xff",
        "n": -0.0,
        "big": 10**40,
        "tiny": 1e-9,
        "caf\u00e9": "x",
    }
    assert canonical(value) == (
        "{s1:n:n0;s2:at:D2024-05-01T12:00:00;s2:id:u00000000000000000000000000000001;"
        "s3:big:n1e40;s3:raw:b00ff;s4:tags:<s1:as1:b>s4:tiny:n1e-9;s5:caf\u00e9:s1:x"
        "s5:items:[n1;n25e-1;zT]s6:amount:n9999e-2;s8:customer:s6:cus_42}"
    )
    assert fp.derive_key("shop.charge", {"customer": "cus_42", "amount": 500}) == (
        "12c2836b6c44b024db865f678eb4bd487d601e5247290a2bcb9b57bb9d769c2a"
    )


def test_workflow_is_part_of_a_derived_key(g: Guard) -> None:
    plain = g.key_for(charge, "c1", 5)
    with g.workflow("wf-1"):
        one = g.key_for(charge, "c1", 5)
    with g.workflow("wf-2"):
        two = g.key_for(charge, "c1", 5)
    assert len({plain, one, two}) == 3


# -- key=, key_args=, exclude= --------------------------------------------------------------


def test_explicit_key(g: Guard) -> None:
    ran: list[int] = []

    def refund(order_id: int, reason: str) -> int:
        ran.append(order_id)
        return order_id

    assert g.using(key="refund-1")(refund, 1, "damaged") == 1
    assert g.using(key="refund-1")(refund, 1, "damaged") == 1
    by_order = g.using(key=lambda order_id, **_: f"refund-{order_id}", check_payload=False)
    assert by_order(refund, 1, "late") == 1  # the same key as above
    assert by_order(refund, 2, "late") == 2
    assert ran == [1, 2]
    with pytest.raises(ConfigError):
        g.using(key=lambda *_, **__: 42)(refund, 3, "x")
    with pytest.raises(ConfigError):
        g.using(key="")(refund, 3, "x")
    with pytest.raises(ConfigError):
        g.using(key="k" * 256)(refund, 3, "x")
    with pytest.raises(ConfigError):
        g.using(key="k", key_args=["order_id"])(refund, 3, "x")
    assert ran == [1, 2]


def test_key_args_picks_the_identifying_subset(g: Guard) -> None:
    ran: list[tuple[int, str]] = []

    def refund(order_id: int, reason: str) -> str:
        ran.append((order_id, reason))
        return reason

    assert g.using(key_args=["order_id"])(refund, 1, "damaged") == "damaged"
    assert g.using(key_args=["order_id"])(refund, 1, "reworded by the model") == "damaged"
    # A string is one name, not a list of letters.
    assert g.using(key_args="order_id")(refund, 1, "again") == "damaged"
    assert g.using(key_args=("order_id",))(refund, 2, "x") == "x"
    assert ran == [(1, "damaged"), (2, "x")]
    with pytest.raises(ConfigError, match="nope"):
        g.using(key_args=["nope"])(refund, 3, "x")
    assert ran == [(1, "damaged"), (2, "x")]


def test_key_args_and_exclude_given_as_fresh_lists_are_not_mixed_up(g: Guard) -> None:
    # Regression: the tool cache was keyed on id() of the option values; a freed list's
    # id is reused at once by CPython, so key_args=[b] silently used an earlier [a].
    ran: list[tuple[str, int]] = []

    def charge2(customer: str, amount: int) -> None:
        ran.append((customer, amount))

    for name in ["customer", "amount", "customer", "amount"]:
        g.using(key_args=[name])(charge2, "c", 1)
    assert len(ran) == 2  # one key per distinct key_args
    for skip in ["customer", "amount", "customer", "amount"]:
        g.using(exclude=[skip])(charge2, "d", 2)
    assert len(ran) == 4


def test_exclude_drops_volatile_arguments(g: Guard) -> None:
    ran: list[int] = []

    def send(to: str, request_time: float) -> str:
        ran.append(1)
        return to

    once = g.using(exclude=["request_time"])
    assert once(send, "a", 1.0) == "a"
    assert once(send, "a", 2.0) == "a"
    assert once(send, "b", 3.0) == "b"
    assert g.using(exclude="request_time")(send, "a", 4.0) == "a"
    assert len(ran) == 2


def test_a_tool_receives_parameters_named_like_options(g: Guard) -> None:
    seen: list[dict[str, Any]] = []

    def tool(key: str, ttl: int, name: str, max: int, replay: bool, wait: float) -> str:
        seen.append({"key": key, "ttl": ttl, "name": name, "max": max, "replay": replay})
        return key

    assert g(tool, key="x", ttl=5, name="n", max=3, replay=False, wait=0.0) == "x"
    assert seen == [{"key": "x", "ttl": 5, "name": "n", "max": 3, "replay": False}]
    assert g(tool, key="x", ttl=5, name="n", max=3, replay=False, wait=0.0) == "x"  # replay
    assert g(tool, key="y", ttl=5, name="n", max=3, replay=False, wait=0.0) == "y"
    assert len(seen) == 2
    # Options and a parameter called `key` together.
    assert (
        g.using(key="explicit")(tool, key="z", ttl=1, name="n", max=1, replay=True, wait=0) == "z"
    )
    assert len(seen) == 3


# -- hypothesis: injectivity, equivalence, binding, determinism -----------------------------

NFC = functools.partial(unicodedata.normalize, "NFC")
NFD = functools.partial(unicodedata.normalize, "NFD")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=6).map(NFC), inner, max_size=4),
    ),
    max_leaves=12,
)


def _num(v: Any) -> Decimal:
    # The documented value of a number: ints exactly, floats by their shortest repr.
    return Decimal(repr(v)) if isinstance(v, float) else Decimal(v)


def strict_eq(a: Any, b: Any) -> bool:
    """Structural equality with the canonical form's rules (and no others)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float, Decimal)) and isinstance(b, (int, float, Decimal)):
        return _num(a) == _num(b)
    if isinstance(a, str) and isinstance(b, str):
        return NFC(a) == NFC(b)
    if a is None or b is None:
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(strict_eq(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        na = {NFC(k): v for k, v in a.items()}
        nb = {NFC(k): v for k, v in b.items()}
        return na.keys() == nb.keys() and all(strict_eq(na[k], nb[k]) for k in na)
    return False


def equivalent(v: Any, flip: bool) -> Any:
    """A different Python value that must get the same canonical form."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return float(v) if abs(v) < 2**53 and flip else v
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e300:
            return Decimal(repr(v)) if flip else int(Decimal(repr(v)))
        return Decimal(repr(v))
    if isinstance(v, str):
        return NFD(v)
    if isinstance(v, list):
        items = [equivalent(x, not flip) for x in v]
        return tuple(items) if flip else items
    if isinstance(v, dict):
        return {NFD(k): equivalent(x, flip) for k, x in reversed(list(v.items()))}
    raise AssertionError(v)


@settings(max_examples=400, deadline=None)
@given(json_like, json_like)
def test_canonical_is_injective_on_json_like_values(a: Any, b: Any) -> None:
    assert (canonical(a) == canonical(b)) == strict_eq(a, b)


@settings(max_examples=300, deadline=None)
@given(json_like, st.booleans())
def test_equivalent_values_share_a_canonical_form(v: Any, flip: bool) -> None:
    w = equivalent(v, flip)
    assert strict_eq(v, w)
    assert canonical(v) == canonical(w)


def walker_text(value: Any, float_digits: int | None = None) -> str:
    """The general walker's output, bypassing any fast path in canonical()."""
    w = fp._Walker(float_digits)
    w.walk(value, "args", 0)
    return "".join(w.out)


flat_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**35), max_value=10**35),
    st.floats(),
    st.text(max_size=6),
    st.text(alphabet="abc\u00e9", max_size=3),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(st.text(max_size=6), flat_values, max_size=8),
    st.sampled_from([None, 1, 6, 17]),
)
def test_canonical_fast_path_writes_what_the_walker_writes(
    d: dict[str, Any], digits: int | None
) -> None:
    # canonical() has a fast path for flat dicts (the usual bound arguments); it must be
    # byte-identical to the general walker, or keys would depend on which path ran.
    try:
        expected: str | type[FingerprintError] = walker_text(d, digits)
    except FingerprintError:
        expected = FingerprintError
    if expected is FingerprintError:
        with pytest.raises(FingerprintError):
            canonical(d, float_digits=digits)
    else:
        assert canonical(d, float_digits=digits) == expected


def tool4(a: Any, b: Any, c: Any = 0, d: Any = None) -> None: ...


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_positional_keyword_equivalence_for_generated_calls(data: st.DataObject) -> None:
    g = Guard(store=MemoryStore(), quiet=True)
    values = data.draw(st.fixed_dictionaries({n: json_like for n in "abcd"}))
    names = list("abcd")
    reference = g.key_for(tool4, *(values[n] for n in names))
    npos = data.draw(st.integers(0, 4))
    rest = data.draw(st.permutations(names[npos:]))
    kwargs = {n: values[n] for n in rest}
    if npos <= 2 and values["c"] == 0 and type(values["c"]) is int and data.draw(st.booleans()):
        kwargs.pop("c")  # the default, applied
    if npos <= 3 and values["d"] is None and data.draw(st.booleans()):
        kwargs.pop("d")
    assert g.key_for(tool4, *(values[n] for n in names[:npos]), **kwargs) == reference


HASHSEED_SCRIPT = r"""
import pickle, sys
from onceonly_core import fingerprint as fp
values = pickle.load(open(sys.argv[1], "rb"))
for v in values:
    print(fp.derive_key("mod.tool", {"v": v}))
"""

seedable = st.recursive(
    st.one_of(
        scalars,
        st.decimals(allow_nan=False, allow_infinity=False),
        st.datetimes(timezones=st.sampled_from([None, UTC, PLUS2])),
        st.dates(),
        st.uuids(),
        st.binary(max_size=6),
        st.timedeltas(),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.frozensets(st.text(max_size=5) | st.integers(), max_size=6),
        st.sets(st.text(max_size=5), max_size=6),
        st.dictionaries(st.text(max_size=5).map(NFC), inner, max_size=4),
        st.dictionaries(st.integers(-5, 5), inner, max_size=3),
    ),
    max_leaves=10,
)


@settings(max_examples=3, deadline=None)
@given(st.lists(seedable, min_size=20, max_size=40))
def test_keys_do_not_depend_on_the_hash_seed_or_the_process(
    tmp_path_factory: pytest.TempPathFactory, values: list[Any]
) -> None:
    path = tmp_path_factory.mktemp("seed") / "values.pickle"
    path.write_bytes(pickle.dumps(values))
    expected = [fp.derive_key("mod.tool", {"v": v}) for v in values]
    for seed in ("0", "123"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", HASHSEED_SCRIPT, str(path)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
        assert out == expected, f"PYTHONHASHSEED={seed}"


def test_hash_seed_sensitive_values_in_two_processes(tmp_path: Path) -> None:
    # The peer str()-ed sets, so a set's key changed with PYTHONHASHSEED.
    values = [
        {f"tag-{i}" for i in range(30)},
        frozenset({"a", "b", "c", 1, 2, 3}),
        {"k": {"x", "y", "z"}, "n": [{"p", "q"}]},
        {("a", 1): "tuple key", ("b", 2): "other"},
    ]
    path = tmp_path / "values.pickle"
    path.write_bytes(pickle.dumps(values))
    runs = []
    for seed in ("0", "123", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, "-c", HASHSEED_SCRIPT, str(path)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        runs.append(proc.stdout.split())
    assert runs[0] == runs[1] == runs[2] == [fp.derive_key("mod.tool", {"v": v}) for v in values]
    assert json.dumps(runs[0])  # four 64-hex keys
    assert all(len(k) == 64 for k in runs[0])
