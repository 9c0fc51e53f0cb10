"""Results replay with their Python types (DESIGN §4 "succeeded → replay the stored result").

The peer JSON-round-tripped results, so ``(1, 2)`` came back as ``[1, 2]``, ``{1: "a"}`` as
``{"1": "a"}``, and a ``datetime`` result raised after the side effect had happened.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import pathlib
import uuid
from decimal import Decimal
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onceonly_core import Codec, CodecError, Guard, MemoryStore
from onceonly_core.codec import default_codec


class Status(enum.Enum):
    OK = "ok"
    DECLINED = "declined"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass
class Item:
    sku: str
    qty: int
    price: Decimal


@dataclasses.dataclass
class Receipt:
    id: uuid.UUID
    items: list[Item]
    at: dt.datetime
    tags: frozenset[str] = frozenset()
    total: Decimal = dataclasses.field(init=False)
    note: str = dataclasses.field(init=False, default="")

    def __post_init__(self) -> None:
        self.total = sum((i.price * i.qty for i in self.items), Decimal(0))


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class Charge(pydantic.BaseModel):
    id: str
    amount: Decimal
    at: dt.datetime
    status: Status


class Batch(pydantic.BaseModel):
    charges: list[Charge]
    meta: dict[str, int] = {}


UTC = dt.timezone.utc
TOKYO = dt.timezone(dt.timedelta(hours=9))
RECEIPT = Receipt(
    uuid.UUID(int=42),
    [Item("a", 2, Decimal("9.99")), Item("b", 1, Decimal("0.01"))],
    dt.datetime(2024, 5, 1, 12, 30, tzinfo=TOKYO),
    frozenset({"gift"}),
)
RECEIPT.note = "set after __init__"
CHARGE = Charge(
    id="ch_1", amount=Decimal("99.99"), at=dt.datetime(2024, 1, 1, tzinfo=UTC), status=Status.OK
)

VALUES: list[Any] = [
    {"a": 1, "b": [1, 2, {"c": None}]},
    [1, "x", None, True, False, 1.5],
    "",
    "unicode \u00e9 \u2603 \U0001f600",
    0,
    -(2**100),
    2**63,
    1.0,
    -0.0,
    1e-300,
    0.1 + 0.2,
    float("inf"),
    float("-inf"),
    None,
    True,
    (),
    (1, (2, (3,))),
    [(1, 2), (3, 4)],
    {1, 2, 3},
    frozenset({"a", "b"}),
    set(),
    {1: "one", 2: "two"},
    {(1, 2): "tuple key", None: "none key", True: "bool key", 1.5: "float key"},
    {"$": "dollar key"},
    {"$": "tuple", "v": [1, 2]},  # looks like a tag: must come back as this dict
    {"nested": {"$": "set", "v": []}},
    b"",
    b"\x00\xff\xfe binary",
    Decimal("1.10"),
    Decimal("-0.000"),
    Decimal("1.00000000000000000000000000000001"),
    Decimal("1E+400"),
    dt.datetime(2024, 5, 1, 12, 30, 15, 123456),
    dt.datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
    dt.datetime(2024, 5, 1, 12, 30, tzinfo=TOKYO),
    dt.date(1999, 12, 31),
    dt.time(23, 59, 59, 999999),
    dt.time(8, 0, tzinfo=TOKYO),
    dt.timedelta(days=-1, seconds=5, microseconds=7),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    Status.DECLINED,
    Priority.HIGH,
    pathlib.Path("/tmp/x/y.txt"),
    pathlib.PurePosixPath("a/b"),
    Item("a", 1, Decimal("1.5")),
    Point(1, 2),
    RECEIPT,
    CHARGE,
    Batch(charges=[CHARGE, CHARGE], meta={"n": 2}),
    {"receipt": RECEIPT, "charges": (CHARGE,), "when": {dt.date(2024, 1, 1): [Status.OK]}},
    [{"s": {1, 2}, "f": frozenset({(1, "a")}), "b": b"x", "d": {2: Decimal("2")}}],
]


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (1 is not 1.0 is not True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, Decimal):
        return str(a) == str(b)  # exponent and sign kept: "1.10" stays "1.10"
    if isinstance(a, dt.datetime | dt.time):
        return a == b and a.utcoffset() == b.utcoffset()
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return False
        bk = {k: k for k in b}
        return all(same(k, bk[k]) and same(v, b[k]) for k, v in a.items())
    if isinstance(a, (set, frozenset)):
        return a == b and all(any(same(x, y) for y in b) for x in a)
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, pydantic.BaseModel):
        return all(same(getattr(a, n), getattr(b, n)) for n in type(a).model_fields)
    return bool(a == b)


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_round_trip_keeps_value_and_type(value: Any) -> None:
    text = default_codec.encode(value)
    assert isinstance(text, str)
    json.loads(text)  # valid JSON
    back = default_codec.decode(text)
    assert same(back, value), (value, text, back)


def test_nan_round_trips() -> None:
    back = default_codec.decode(default_codec.encode({"x": [float("nan")]}))
    assert math.isnan(back["x"][0])


def test_plain_json_is_stored_as_plain_json() -> None:
    # Readable by any SQL client; only non-JSON types are tagged.
    assert default_codec.encode({"a": [1, "x", None, True]}) == '{"a":[1,"x",null,true]}'
    assert default_codec.encode("caf\u00e9") == '"caf\u00e9"'


def test_dataclass_init_false_fields_are_restored() -> None:
    back = default_codec.decode(default_codec.encode(RECEIPT))
    assert back.total == Decimal("19.99")
    assert back.note == "set after __init__"  # not recomputed away by __init__


def test_bytearray_comes_back_as_bytes() -> None:
    assert default_codec.decode(default_codec.encode(bytearray(b"ab"))) == b"ab"


class Opaque:
    pass


class MyList(list[int]):
    pass


@pytest.mark.parametrize(
    "value",
    [object(), Opaque(), [1, Opaque()], {"k": Opaque()}, MyList([1]), lambda: 1],
    ids=["object", "class", "in-list", "in-dict", "list-subclass", "lambda"],
)
def test_unknown_types_raise_codec_error(value: Any) -> None:
    with pytest.raises(CodecError):
        default_codec.encode(value)


def test_classes_defined_in_a_function_cannot_be_replayed() -> None:
    @dataclasses.dataclass
    class Local:
        x: int

    with pytest.raises(CodecError, match="inside a function"):
        default_codec.encode(Local(1))


def test_cycles_and_absurd_depth_raise_codec_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(CodecError):
        default_codec.encode(loop)


@pytest.mark.parametrize(
    "text",
    ["not json", '{"$": "no-such-tag", "v": 1}', '{"$": "enum", "c": "nowhere:Nope", "v": 1}'],
)
def test_corrupt_stored_results_raise_codec_error(text: str) -> None:
    with pytest.raises(CodecError):
        default_codec.decode(text)


@pytest.mark.parametrize("text", ["7 ", " 7", '\n{"a": [1, 2]}\t', "7x", "[1,]", "{", "", "1 2"])
def test_decode_reads_stored_text_exactly_as_json_loads(text: str) -> None:
    # decode() runs json's scanner straight on the text (the replay path) and hands what
    # it did not parse whole to json.loads: surrounding whitespace is read, trailing data
    # or a broken document is a CodecError, as with json.loads.
    try:
        expected: Any = json.loads(text)
    except ValueError:
        with pytest.raises(CodecError, match="not valid JSON"):
            default_codec.decode(text)
    else:
        assert default_codec.decode(text) == expected


class Money:
    def __init__(self, cents: int, currency: str) -> None:
        self.cents, self.currency = cents, currency

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (self.cents, self.currency) == (
            other.cents,
            other.currency,
        )

    __hash__ = None  # type: ignore[assignment]


def test_register_a_type_on_a_private_codec() -> None:
    codec = Codec()
    codec.register(Money, "money", lambda m: [m.cents, m.currency], lambda v: Money(*v))
    value = {"price": Money(999, "usd"), "list": [Money(1, "eur")]}
    assert codec.decode(codec.encode(value)) == value
    with pytest.raises(CodecError):
        default_codec.encode(Money(1, "usd"))  # the default codec was not touched


def test_a_guard_replays_typed_results() -> None:
    g = Guard(store=MemoryStore(), quiet=True)
    runs: list[int] = []

    def tool(i: int) -> Any:
        runs.append(i)
        return VALUES[i]

    for i in range(len(VALUES)):
        first = g(tool, i)
        assert first is VALUES[i]  # the first caller gets the very object
        assert same(g(tool, i), VALUES[i])  # a replay gets an equal, same-typed copy
    assert runs == list(range(len(VALUES)))


def test_a_guard_with_a_custom_codec() -> None:
    codec = Codec()
    codec.register(Money, "money", lambda m: [m.cents, m.currency], lambda v: Money(*v))
    g = Guard(store=MemoryStore(), quiet=True, codec=codec)
    assert g(lambda: Money(5, "usd")) == Money(5, "usd")
    assert g(lambda: Money(5, "usd")) == Money(5, "usd")


class Envelope(pydantic.BaseModel):
    payload: Any = None


class Credentials(pydantic.BaseModel):
    user: str
    token: pydantic.SecretStr


def test_pydantic_any_fields_keep_their_types() -> None:
    value = Envelope(payload={"t": (1, 2), "d": Decimal("1.5"), "s": {3}})
    assert same(default_codec.decode(default_codec.encode(value)), value)


def test_pydantic_secret_fields_are_refused_not_stored_masked() -> None:
    # A masked '**********' replay would be silently wrong data, and storing the secret
    # would put it in the ledger in plain text: the codec refuses (the first caller still
    # gets its value; a replay raises CodecError naming the type).
    value = Credentials(user="svc", token=pydantic.SecretStr("hunter2"))
    with pytest.raises(CodecError, match="SecretStr"):
        default_codec.encode(value)


# -- hypothesis ------------------------------------------------------------------------------

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)

hashable = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.binary(max_size=4),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)

rich = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(max_size=8)
    | st.decimals(allow_nan=False)
    | st.datetimes(timezones=st.sampled_from([None, UTC, TOKYO]))
    | st.dates()
    | st.times()
    | st.timedeltas()
    | st.uuids()
    | st.sampled_from(list(Status)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.sets(hashable, max_size=4)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        | st.dictionaries(hashable, inner, max_size=4)
    ),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(json_like)
def test_json_like_values_round_trip(value: Any) -> None:
    assert same(default_codec.decode(default_codec.encode(value)), value)


@settings(max_examples=300, deadline=None)
@given(rich)
def test_rich_values_round_trip(value: Any) -> None:
    assert same(default_codec.decode(default_codec.encode(value)), value)
