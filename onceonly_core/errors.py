"""Every error OnceOnly raises derives from one root, :class:`OnceOnlyError`.

Where a builtin exception already describes the situation, the class subclasses
it too, so ``except TypeError`` or ``except ImportError`` keeps working::

    OnceOnlyError
    ├── ConfigError (ValueError)            bad URL, option or name
    ├── MissingExtraError (ImportError)     an optional dependency is not installed
    ├── FingerprintError (TypeError)        an argument cannot be canonicalised
    ├── CodecError (TypeError)              a result cannot be stored or replayed
    │   └── ResultNotStored                 replay of a call that ran, whose result was not stored
    ├── KeyReuseError (ValueError)          same key, different arguments
    ├── InProgress                          another caller holds a live claim
    ├── UnknownOutcome                      a claim expired while running (on_unknown="raise")
    ├── LeaseLost                           a stale owner tried to complete or heartbeat
    ├── CachedFailure                       replay of a recorded failure (cache_errors=True)
    ├── PolicyBlocked (PermissionError)     governance refused the call (``reason`` code)
    │   └── ApprovalPending                 the call waits for a human approval
    ├── SignatureError (ValueError)         a signed request/webhook failed verification
    ├── RemoteToolError                     a remote HTTP tool failed or answered badly
    ├── WouldBlock                          a store primitive would wait (a signal, caught inside)
    └── StoreError                          the ledger could not be read or written
        ├── SchemaError                     the ledger schema is missing or too old
        └── CompletionNotRecorded           the tool ran, recording its outcome may have failed

The tool's own exceptions are never wrapped: they propagate unchanged.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApprovalPending",
    "CachedFailure",
    "CodecError",
    "CompletionNotRecorded",
    "ConfigError",
    "FingerprintError",
    "InProgress",
    "KeyReuseError",
    "LeaseLost",
    "MissingExtraError",
    "OnceOnlyError",
    "PolicyBlocked",
    "RemoteToolError",
    "ResultNotStored",
    "SchemaError",
    "SignatureError",
    "StoreError",
    "UnknownOutcome",
    "WouldBlock",
]


class OnceOnlyError(Exception):
    """Root of every exception raised by OnceOnly itself."""


class ConfigError(OnceOnlyError, ValueError):
    """An option, URL, namespace or name is invalid."""


class MissingExtraError(OnceOnlyError, ImportError):
    """An optional dependency is missing; the message has the exact pip command."""

    def __init__(self, feature: str, extra: str, missing: str | None = None) -> None:
        self.feature = feature
        self.extra = extra
        what = f" ({missing} is not installed)" if missing else ""
        super().__init__(
            f"{feature} needs the '{extra}' extra{what}: pip install \"onceonly-core[{extra}]\"",
            name=missing,
        )


class FingerprintError(OnceOnlyError, TypeError):
    """An argument cannot be turned into a canonical fingerprint.

    ``path`` names the argument, e.g. ``order.items[2].price``.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot fingerprint argument {path!r}: {reason}")


class CodecError(OnceOnlyError, TypeError):
    """A result cannot be encoded for the ledger, or a stored one cannot be decoded."""


class ResultNotStored(CodecError):
    """The call ran once and succeeded, but its result was not stored, so it cannot be
    replayed: it was larger than ``max_result_bytes`` or the codec could not encode it.

    The record is ``succeeded`` (the tool never runs again for this key); ``reason``
    says why nothing was stored. Read the effect from the downstream system, or
    ``guard.retry(...)`` the key to run it again on purpose.
    """

    def __init__(self, namespace: str, key: str, tool: str, reason: str) -> None:
        self.namespace = namespace
        self.key = key
        self.tool = tool
        self.reason = reason
        super().__init__(
            f"{tool} ran once (key {key!r} in namespace {namespace!r}) but its result was "
            f"not stored, so it cannot be replayed: {reason}"
        )


class KeyReuseError(OnceOnlyError, ValueError):
    """A key was reused with arguments that differ from the first call's."""

    def __init__(self, namespace: str, key: str, tool: str) -> None:
        self.namespace = namespace
        self.key = key
        self.tool = tool
        super().__init__(
            f"key {key!r} in namespace {namespace!r} was first used with different "
            f"arguments (tool {tool}); use a new key, or check_payload=False to replay anyway"
        )


class InProgress(OnceOnlyError):
    """Another caller holds a live claim on this key and did not finish in time."""

    def __init__(self, namespace: str, key: str, owner: str | None) -> None:
        self.namespace = namespace
        self.key = key
        self.owner = owner
        super().__init__(f"key {key!r} in namespace {namespace!r} is running (owner {owner})")


class UnknownOutcome(OnceOnlyError):
    """A claim's lease expired while it was running: the effect may or may not have happened.

    Raised when the tool's policy is ``on_unknown="raise"``; reconcile by hand, then
    ``guard.retry(...)`` to run again or ``guard.force(...)``.
    """

    def __init__(self, namespace: str, key: str, owner: str | None, token: int) -> None:
        self.namespace = namespace
        self.key = key
        self.owner = owner
        self.token = token
        super().__init__(
            f"key {key!r} in namespace {namespace!r}: the owner {owner} (token {token}) "
            "stopped heartbeating before it finished; its outcome is unknown"
        )


class LeaseLost(OnceOnlyError):
    """A completion or heartbeat carried a token that is no longer current.

    The ledger was not changed: another caller took the claim over. ``result`` holds
    what this (stale) execution returned, if it returned.
    """

    def __init__(self, namespace: str, key: str, token: int, result: Any = None) -> None:
        self.namespace = namespace
        self.key = key
        self.token = token
        self.result = result
        super().__init__(
            f"key {key!r} in namespace {namespace!r}: token {token} is stale; "
            "another owner took over and this outcome was not recorded"
        )


class CachedFailure(OnceOnlyError):
    """Replay of a failure recorded earlier (``cache_errors=True``)."""

    def __init__(self, error_type: str, message: str) -> None:
        self.error_type = error_type
        self.message = message
        super().__init__(f"replayed failure: {error_type}: {message}")


class PolicyBlocked(OnceOnlyError, PermissionError):
    """Governance refused the call; ``reason`` is the stable reason code (docs/governance.md).

    Raised by the facade (``guard(fn, ...)`` with an agent id); ``call_tool`` returns a
    ``ToolResult`` instead.
    """

    def __init__(self, agent_id: str, tool: str, reason: str, detail: str = "") -> None:
        self.agent_id = agent_id
        self.tool = tool
        self.reason = reason
        more = f" ({detail})" if detail else ""
        super().__init__(f"agent {agent_id!r}: tool {tool!r} blocked: {reason}{more}")


class ApprovalPending(PolicyBlocked):
    """The tool needs a human approval; ``approval_id`` names the pending request."""

    def __init__(self, agent_id: str, tool: str, approval_id: str) -> None:
        self.approval_id = approval_id
        super().__init__(agent_id, tool, "approval_required", f"request {approval_id}")


class SignatureError(OnceOnlyError, ValueError):
    """A signed request or webhook failed verification (bad, stale or replayed)."""


class RemoteToolError(OnceOnlyError):
    """A remote HTTP tool failed, timed out or answered with something unusable.

    ``status`` is the HTTP status when there was one; ``retryable`` says whether the
    request provably did not take effect (connection refused) or the server asked to retry.
    """

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        self.status = status
        self.retryable = retryable
        super().__init__(message)


class StoreError(OnceOnlyError):
    """The ledger could not be read or written. Nothing ran unless stated otherwise."""


class SchemaError(StoreError):
    """The ledger's tables are missing or at an older revision."""


class CompletionNotRecorded(StoreError):
    """The tool ran, but writing its outcome failed (after retries).

    ``result`` is what the tool returned. If no write committed, the record stays
    ``running`` until its lease expires and then the tool's unknown-outcome policy
    decides; if a write committed and only its reply was lost, the record is already
    ``succeeded`` and later calls replay it.
    """

    def __init__(self, message: str, result: Any = None) -> None:
        self.result = result
        super().__init__(message)


class WouldBlock(OnceOnlyError):
    """:meth:`Store.run_nowait <onceonly_core.stores.base.Store.run_nowait>` found that a
    primitive would have to wait (another connection holds a lock): nothing was done, and
    the caller runs it where it may wait. A signal between a store and the protocol's
    async shell, which catches it; it never reaches a caller. Not a StoreError on purpose:
    code that tolerates a failed write (``suppress(StoreError)``) must not swallow it."""
