"""The exception tree promised by onceonly_core.errors (DESIGN §3)."""

from __future__ import annotations

import inspect

import pytest

from onceonly_core import errors
from onceonly_core.errors import (
    CachedFailure,
    CodecError,
    CompletionNotRecorded,
    ConfigError,
    FingerprintError,
    InProgress,
    KeyReuseError,
    LeaseLost,
    MissingExtraError,
    OnceOnlyError,
    SchemaError,
    StoreError,
    UnknownOutcome,
)

PUBLIC_CLASSES = [getattr(errors, name) for name in errors.__all__]


def test_all_lists_every_exception_class_sorted() -> None:
    defined = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    }
    assert set(errors.__all__) == defined
    assert list(errors.__all__) == sorted(errors.__all__)


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda cls: cls.__name__)
def test_every_public_class_derives_from_the_root(cls: type[BaseException]) -> None:
    assert issubclass(cls, OnceOnlyError)
    assert issubclass(cls, Exception)


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (ConfigError, ValueError),
        (MissingExtraError, ImportError),
        (FingerprintError, TypeError),
        (CodecError, TypeError),
        (KeyReuseError, ValueError),
    ],
    ids=lambda value: value.__name__,
)
def test_builtin_bases_keep_plain_except_clauses_working(
    cls: type[OnceOnlyError], builtin: type[Exception]
) -> None:
    assert issubclass(cls, builtin)


@pytest.mark.parametrize("cls", [SchemaError, CompletionNotRecorded], ids=lambda c: c.__name__)
def test_store_errors(cls: type[StoreError]) -> None:
    assert issubclass(cls, StoreError)


@pytest.mark.parametrize(
    "cls", [InProgress, UnknownOutcome, LeaseLost, CachedFailure], ids=lambda c: c.__name__
)
def test_protocol_outcomes_are_not_builtin_errors(cls: type[OnceOnlyError]) -> None:
    builtin_bases = {ValueError, TypeError, ImportError, LookupError, RuntimeError, OSError}
    assert not any(issubclass(cls, base) for base in builtin_bases)


def test_missing_extra_message_has_the_exact_pip_command() -> None:
    err = MissingExtraError("The PostgreSQL ledger", "postgres", "psycopg")

    assert isinstance(err, ImportError)
    assert str(err) == (
        "The PostgreSQL ledger needs the 'postgres' extra (psycopg is not installed): "
        'pip install "onceonly-core[postgres]"'
    )
    assert (err.feature, err.extra, err.name) == ("The PostgreSQL ledger", "postgres", "psycopg")


def test_missing_extra_without_a_package_name() -> None:
    err = MissingExtraError("The CLI", "cli")

    assert str(err) == "The CLI needs the 'cli' extra: pip install \"onceonly-core[cli]\""
    assert err.name is None


def test_missing_extra_is_caught_by_except_import_error() -> None:
    with pytest.raises(ImportError, match=r'pip install "onceonly-core\[mysql\]"'):
        raise MissingExtraError("The MariaDB ledger", "mysql", "PyMySQL")


def test_errors_carry_their_context() -> None:
    assert FingerprintError("order.items[2].price", "NaN").path == "order.items[2].price"
    reuse = KeyReuseError("ns", "k", "pay")
    assert (reuse.namespace, reuse.key, reuse.tool) == ("ns", "k", "pay")
    unknown = UnknownOutcome("ns", "k", "worker-1", 7)
    assert (unknown.owner, unknown.token) == ("worker-1", 7)
    lost = LeaseLost("ns", "k", 3, result={"ok": True})
    assert lost.result == {"ok": True}
    assert CompletionNotRecorded("disk full", result=42).result == 42
    assert str(CachedFailure("ValueError", "bad")) == "replayed failure: ValueError: bad"
