"""Remote mode's side of the wire: ``/v1/ledger/{op}`` and ``/v1/governance/{op}``.

An embedded guard opened on ``https://…`` (:class:`~onceonly_core.stores.remote.RemoteStore`)
sends each store primitive here; it runs on the server's own stores, with their atomicity,
and the answer goes back tagged (:func:`~onceonly_core.stores.remote.encode`).

Tenancy is the API key's, never the body's:

* every ``tenant`` argument is replaced by the key's tenant ``T`` (``None``, "every
  tenant", too);
* the guard's ledger namespace ``N`` lives at ``T/N`` on the server (``N``'s first segment
  may not be ``make`` or ``ai``: those are the ``/check-lock`` and ``/ai`` keyspaces), and
  records come back under ``N``;
* a hold is extended only if it is the tenant's.

Arguments are validated against the primitive's own annotations in the store contract
(``GovernanceStore`` / ``Store``) with pydantic: anything else is a 422, before any
primitive runs. One primitive is not offered: ``purge_audit`` (audit retention is the
operator's, on the server). The key is the tenant's admin credential, as everywhere in
``/v1`` (it can set policies), so approvals can be decided with it; the server's egress
guard checks every outbound URL a tool or webhook registration carries.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at
# runtime, and `Key` below is local to remote_router().
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..egress import check_url
from ..errors import (
    InProgress,
    KeyReuseError,
    LeaseLost,
    OnceOnlyError,
    StoreError,
    UnknownOutcome,
)
from ..stores.base import MAX_NAMESPACE, Record, Store
from ..stores.governance import GovernanceStore
from ..stores.remote import decode, encode
from .control import ControlPlane

__all__ = ["remote_router"]

#: Namespaces of the server's own keyspaces under a tenant (control.py).
_RESERVED = ("make", "ai")

_LEDGER_OPS = (
    "get",
    "claim",
    "take_over",
    "finish",
    "heartbeat",
    "clear",
    "list",
    "clear_namespace",
    "now",
)
_GOV_REFUSED = {
    "purge_audit": "audit retention runs on the server (`onceonly retention` there), "
    "not through an agent's key",
}
#: Beyond the abstract primitives: a retried completion's audit append (checked on the
#: server, in the append's transaction), and the outbox primitives a remote guard uses:
#: writing a standalone event, and the operator's dead-letter view (list, retry,
#: pending). Claiming and marking rows stay on the server, which delivers its outbox
#: itself.
_GOV_EXTRA = (
    "append_audit_once",
    "enqueue_notification",
    "outbox_list",
    "outbox_pending",
    "outbox_retry",
)


class RemoteCall(BaseModel):
    """``{"args": {...}}``: the primitive's arguments by name, tagged where JSON has no
    type for them (:func:`~onceonly_core.stores.remote.encode`)."""

    model_config = ConfigDict(extra="forbid")

    args: dict[str, Any] = Field(default_factory=dict)


class _Refused(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _answer(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"detail": {"error": "remote_refused", "type": kind, "message": message[:1000]}},
        status_code=status,
    )


class _Op:
    """One primitive: its signature, and a validator per argument from its annotations."""

    def __init__(self, owner: type, name: str) -> None:
        fn = getattr(owner, name)
        self.name = name
        self.sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        self.adapters = {
            p: pydantic.TypeAdapter(hints[p])
            for p in self.sig.parameters
            if p != "self" and p in hints
        }

    def bind(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            bound = self.sig.bind(None, **args)
        except TypeError as err:
            raise _Refused(422, "ConfigError", f"{self.name}: {err}") from None
        out: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if name == "self":
                continue
            adapter = self.adapters.get(name)
            if adapter is None or value is ...:
                out[name] = value
                continue
            try:
                out[name] = adapter.validate_python(value)
            except pydantic.ValidationError as err:
                first = err.errors()[0]
                raise _Refused(
                    422, "ConfigError", f"{self.name}: {name}: {first.get('msg')}"
                ) from None
        return out


def _ops(owner: type, names: typing.Iterable[str]) -> dict[str, _Op]:
    return {n: _Op(owner, n) for n in names}


def remote_router(cp: ControlPlane, auth: Callable[..., Any]) -> APIRouter:
    """The remote-mode routes over ``cp``; ``auth`` is the app's API-key dependency
    (it returns a :class:`~onceonly_core.server.db.KeyInfo`, or answers 401/429)."""
    router = APIRouter(include_in_schema=True, tags=["remote mode"])
    ledger_ops = _ops(Store, _LEDGER_OPS)
    gov_names = [
        n
        for n in GovernanceStore.__abstractmethods__
        if n not in _GOV_REFUSED and not n.startswith("_")
    ]
    gov_ops = _ops(GovernanceStore, sorted(gov_names))
    from ..stores.govsql import GovStore

    gov_ops.update(_ops(GovStore, _GOV_EXTRA))

    def server_ns(tenant: str, ns: str | None, *, listing: bool = False) -> str:
        if ns is None:
            if listing:
                return tenant
            raise _Refused(422, "ConfigError", "namespace is required")
        if ns.split("/", 1)[0] in _RESERVED:
            raise _Refused(
                422,
                "ConfigError",
                f"namespace {ns!r} is reserved on the server (its first part may not be "
                "'make' or 'ai': those are the /check-lock and /ai keyspaces)",
            )
        full = f"{tenant}/{ns}"
        if len(full) > MAX_NAMESPACE:
            raise _Refused(
                422, "ConfigError", f"namespace {ns!r} is too long for tenant {tenant!r}"
            )
        return full

    def client_record(tenant: str, rec: Record | None) -> Record | None:
        if rec is not None and rec.namespace.startswith(tenant + "/"):
            rec.namespace = rec.namespace[len(tenant) + 1 :]
        return rec

    def run_ledger(tenant: str, op: str, args: dict[str, Any]) -> Any:
        if op == "max_namespace":  # Store.max_namespace, as this tenant sees it
            return MAX_NAMESPACE - len(tenant) - 1
        spec = ledger_ops.get(op)
        if spec is None:
            raise _Refused(404, "ConfigError", f"no ledger primitive {op!r}")
        a = spec.bind(args)
        store = cp.ledger
        if op == "now":
            return store.now()
        if op == "list":
            ns = a.get("namespace")
            if ns is None:
                a["namespace"], a["prefix"] = tenant, True
                rows = [r for r in store.list(**a) if r.namespace.startswith(tenant + "/")]
            else:
                a["namespace"] = server_ns(tenant, ns)
                rows = store.list(**a)
            return [client_record(tenant, r) for r in rows]
        a["namespace"] = server_ns(tenant, a["namespace"])
        if op == "take_over":
            seen: Record = a["seen"]
            seen.namespace = a["namespace"]  # the record as the server holds it
        out = getattr(store, op)(**a)
        if isinstance(out, Record):
            return client_record(tenant, out)
        return out

    def run_gov(tenant: str, op: str, args: dict[str, Any]) -> Any:
        if op in _GOV_REFUSED:
            raise _Refused(403, "ConfigError", _GOV_REFUSED[op])
        spec = gov_ops.get(op)
        if spec is None:
            raise _Refused(404, "ConfigError", f"no governance primitive {op!r}")
        a = spec.bind(args)
        store = cp.gov_store
        if "tenant" in a:
            a["tenant"] = tenant  # the key's tenant, whatever the body said
        if "namespace" in a:
            a["namespace"] = server_ns(tenant, a["namespace"])
        if op == "extend":
            mine = {h["id"]: h["agent_id"] for h in store.pending_holds(tenant)}
            if a["rid"] not in mine:
                return False  # gone, or another tenant's: the same answer
            # By its key (the tenant's holds just read name its agent): no scan of every
            # tenant's holds in flight.
            return store.extend_hold(tenant, mine[a["rid"]], a["rid"], a["lease"])
        if op in ("put_tool", "add_webhook"):
            url = a["values"].get("url")
            if url:
                check_url(str(url), cp.egress_allow)  # EgressRefused: a ConfigError, 422
        return getattr(store, op)(**a)

    def handle(kind: str, op: str, wire_args: dict[str, Any], tenant: str) -> JSONResponse:
        try:
            args = decode(wire_args)
            out = run_ledger(tenant, op, args) if kind == "ledger" else run_gov(tenant, op, args)
            return JSONResponse({"result": encode(out)})
        except _Refused as err:
            return _answer(err.status, err.kind, err.message)
        except StoreError as err:
            # The database: the primitive may not have run, or may have; the client says so.
            resp = _answer(503, "StoreError", str(err))
            resp.headers["Retry-After"] = "1"
            return resp
        except OnceOnlyError as err:
            return _answer(409 if _state_error(err) else 422, type(err).__name__, str(err))
        except (ValueError, TypeError, KeyError) as err:
            # Input the caller controls that a primitive refused: a 4xx, never a 5xx.
            return _answer(422, "ConfigError", f"{op}: {err}")

    Key = Annotated[Any, Depends(auth)]

    @router.post("/v1/ledger/{op}", summary="Remote mode: one ledger primitive")
    def ledger_op(op: str, body: RemoteCall, k: Key) -> JSONResponse:
        return handle("ledger", op, body.args, k.tenant)

    @router.post("/v1/governance/{op}", summary="Remote mode: one governance primitive")
    def governance_op(op: str, body: RemoteCall, k: Key) -> JSONResponse:
        return handle("governance", op, body.args, k.tenant)

    return router


def _state_error(err: OnceOnlyError) -> bool:
    """A key's state (409), as the rest of the API answers it; anything else is input (422)."""
    return isinstance(err, (KeyReuseError, InProgress, UnknownOutcome, LeaseLost))
