"""Remote mode: the ledger and governance of a ``onceonly serve`` control plane, over HTTP.

``Guard("https://onceonly.example", api_key=...)`` (or ``ONCEONLY_DB_URL=https://…`` with
``ONCEONLY_API_KEY``) opens a :class:`RemoteStore`. The guard runs exactly as embedded —
the same call path, fingerprints, decisions, heartbeats and governance engine — and each
store primitive is one HTTP request to the server, which runs it on its own database with
the same atomicity. Agents on many hosts share one control plane and never hold database
credentials; the API key names the tenant (docs/remote.md).

Wire (``docs/server.md``, "Remote mode"): ``POST /v1/ledger/{op}`` for the ledger
primitives and ``POST /v1/governance/{op}`` for the governance primitives, each with a
JSON body ``{"args": {...}}`` and a JSON answer ``{"result": ...}``. Values that JSON has
no type for travel tagged (:func:`encode` / :func:`decode`).

Failures, chosen so that nothing runs twice and no spend is lost:

* A request that never reached the server (connection refused, connect timeout, no pooled
  connection) is sent again, up to ``retries`` times with backoff: nothing was done.
  A ``429`` is waited out (``Retry-After``) and sent again: the server refused it before
  doing anything.
* Anything after the request was sent (read timeout, reset, ``5xx``) raises
  :class:`~onceonly_core.errors.StoreError`: the primitive may or may not have been
  applied, which is exactly what a lost database reply means to the protocol above
  (a claim is never blindly re-sent; a settle stays counted).
* ``401`` raises :class:`~onceonly_core.errors.ConfigError` (a bad key is configuration).
* Errors of ours raised on the server come back as their own class (``KeyReuseError``,
  ``ConfigError``, …) with their message.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import errors
from ..errors import ConfigError, MissingExtraError, OnceOnlyError, StoreError
from .base import NewClaim, Record, Store
from .governance import GovernanceStore, Reservation, Want

if TYPE_CHECKING:
    import httpx

__all__ = ["RemoteGovernanceStore", "RemoteStore", "decode", "encode"]

log = logging.getLogger("onceonly.stores")  # redact.LOGGERS lists it

#: Seconds a request may take; a primitive is one database transaction on the server.
DEFAULT_TIMEOUT = 30.0

_LOOPBACK = ("localhost", "127.0.0.1", "::1", "[::1]")


# -- the wire codec ------------------------------------------------------------------------
_DATACLASSES: dict[str, type[Any]] = {
    "Want": Want,
    "Reservation": Reservation,
    "Record": Record,
    "NewClaim": NewClaim,
}


def encode(value: Any) -> Any:
    """A JSON-ready form of ``value``: dataclasses of the store contract, tuples, sets,
    non-string keys and non-finite floats are tagged with a ``$`` key."""
    t = type(value)
    if value is None or t is bool or t is int or t is str:
        return value
    if t is float:
        return value if math.isfinite(value) else {"$float": repr(value)}
    if t is list:
        return [encode(v) for v in value]
    if t is dict:
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: encode(v) for k, v in value.items()}
        return {"$map": [[encode(k), encode(v)] for k, v in value.items()]}
    if t is tuple:
        return {"$tuple": [encode(v) for v in value]}
    if t is set or t is frozenset:
        return {"$set": [encode(v) for v in value]}
    if isinstance(value, str):  # a str subclass (an enum, a driver's quoted name)
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return encode(float(value))
    name = t.__name__
    if _DATACLASSES.get(name) is t:
        fields = {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"$dc": name, "fields": fields}
    raise ConfigError(f"remote mode cannot send a {name} value over the wire")


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`; refuses unknown tags (``ConfigError``)."""
    t = type(value)
    if t is list:
        return [decode(v) for v in value]
    if t is not dict:
        return value
    if not any(type(k) is str and k.startswith("$") for k in value):
        return {k: decode(v) for k, v in value.items()}
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "$tuple" and type(inner) is list:
            return tuple(decode(v) for v in inner)
        if tag == "$set" and type(inner) is list:
            return {decode(v) for v in inner}
        if tag == "$map" and type(inner) is list and all(_pair(p) for p in inner):
            return {_hashable(decode(k)): decode(v) for k, v in inner}
        if tag == "$float" and inner in ("inf", "-inf", "nan"):
            return float(inner)
    if set(value) == {"$dc", "fields"}:
        cls = _DATACLASSES.get(value["$dc"])
        if cls is not None and type(value["fields"]) is dict:
            fields = {k: decode(v) for k, v in value["fields"].items()}
            try:
                return cls(**fields)
            except TypeError as err:
                raise ConfigError(f"a {value['$dc']} with the wrong fields: {err}") from None
    raise ConfigError(f"an unknown tagged value on the wire: {sorted(value)[:3]}")


def _pair(p: Any) -> bool:
    return type(p) is list and len(p) == 2


def _hashable(k: Any) -> Any:
    try:
        hash(k)
    except TypeError:
        raise ConfigError("a map key on the wire must be hashable") from None
    return k


def _error_class(name: Any) -> type[OnceOnlyError]:
    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, OnceOnlyError):
        return cls
    return OnceOnlyError


def _rebuild(name: Any, message: str) -> BaseException:
    """The server's exception, as its own class where that class is one of ours."""
    if name in ("ValueError", "TypeError", "KeyError", "LookupError"):
        return ConfigError(message)
    cls = _error_class(name)
    try:
        return cls(message)
    except TypeError:  # a class with required fields (RemoteToolError, PolicyBlocked, ...)
        err = cls.__new__(cls)
        Exception.__init__(err, message)
        return err


# -- the HTTP client -----------------------------------------------------------------------
class _Wire:
    """One keep-alive connection pool to the server, shared by the ledger and governance."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 3,
        client: httpx.Client | None = None,
    ) -> None:
        try:
            import httpx
        except ImportError as err:  # pragma: no cover - exercised by the missing-extra test
            feature = "remote mode (an https:// ledger URL)"
            raise MissingExtraError(feature, "http", "httpx") from err
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"not a server URL: {_shown(url)} (https://host[:port])")
        if parts.username or parts.password:
            raise ConfigError("pass the API key as api_key= (or ONCEONLY_API_KEY), not in the URL")
        if parts.query or parts.fragment:
            raise ConfigError(f"a server URL has no query or fragment: {_shown(url)}")
        key = api_key or os.environ.get("ONCEONLY_API_KEY")
        if not key:
            raise ConfigError(
                f"remote mode ({_shown(url)}) needs an API key: Guard(url, api_key=...) or "
                "ONCEONLY_API_KEY (create one on the server: onceonly keys create --tenant NAME)"
            )
        if any(ord(c) < 33 for c in key):
            raise ConfigError("the API key contains whitespace or control characters")
        if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            log.warning(
                "remote mode over plain http to %s: the API key travels unencrypted; "
                "use https:// outside one host",
                parts.hostname,
            )
        base = url.rstrip("/")
        # The published client's base_url ends in /v1; the same value works here.
        self.url = base[:-3] if base.endswith("/v1") else base
        self.retries = retries
        self._httpx = httpx
        self._client = client or httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout),
            headers={"Authorization": f"Bearer {key}", "User-Agent": "onceonly-core-remote"},
            follow_redirects=False,  # a redirect would carry the key to another host
        )
        self._owns_client = client is None
        if client is not None:
            client.headers["Authorization"] = f"Bearer {key}"

    def call(self, path: str, args: dict[str, Any]) -> Any:
        """POST ``{"args": ...}`` to ``path``; the decoded ``result``."""
        httpx = self._httpx
        body = json.dumps({"args": encode(args)}, separators=(",", ":"), allow_nan=False)
        attempt = 0
        while True:
            try:
                resp = self._client.post(
                    path, content=body, headers={"Content-Type": "application/json"}
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as err:
                # Never sent: safe to send again.
                if attempt >= self.retries:
                    raise StoreError(
                        f"the OnceOnly server at {self.url} is unreachable: {err}"
                    ) from err
                attempt += 1
                time.sleep(min(2.0, 0.05 * 2**attempt) * random.random())
                continue
            except httpx.HTTPError as err:
                # Sent, and no answer: the primitive may have been applied.
                raise StoreError(
                    f"no answer from the OnceOnly server for {path} (it may have been applied): "
                    f"{type(err).__name__}: {err}"
                ) from err
            status = resp.status_code
            if status == 200:
                try:
                    return decode(resp.json()["result"])
                except (ValueError, KeyError, TypeError) as err:
                    raise StoreError(f"an unreadable answer from {path}: {err}") from err
            if status == 429 and attempt < self.retries:
                attempt += 1
                time.sleep(_retry_after(resp))
                continue
            raise _failure(path, resp)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()


def _retry_after(resp: httpx.Response) -> float:
    try:
        return min(5.0, max(0.0, float(resp.headers.get("retry-after", "0.2"))))
    except ValueError:
        return 0.2


def _failure(path: str, resp: httpx.Response) -> BaseException:
    status = resp.status_code
    try:
        detail = resp.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, dict):
        message = str(detail.get("message") or detail.get("error") or "")
        kind = detail.get("type")
    else:
        message, kind = str(detail or resp.reason_phrase), None
    if status == 401:
        return ConfigError(f"the OnceOnly server refused the API key: {message}")
    if status == 404:
        return ConfigError(
            f"the server has no {path}: it is not a OnceOnly Core server with remote mode "
            f"(onceonly serve, version 0.2 or later)"
        )
    if status >= 500 or kind == "StoreError":
        return StoreError(f"the OnceOnly server could not do {path} ({status}): {message}")
    if kind is not None:
        return _rebuild(kind, message)
    return ConfigError(f"the OnceOnly server refused {path} ({status}): {message}")


def _shown(url: str) -> str:
    p = urlsplit(url)
    host = p.hostname or "?"
    return f"{p.scheme}://{host}{':' + str(p.port) if p.port else ''}{p.path}"


# -- the ledger ------------------------------------------------------------------------------
class RemoteStore(Store):
    """The ledger of a ``onceonly serve`` control plane (see the module docstring)."""

    blocking = True
    kind = "remote"

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 3,
        client: httpx.Client | None = None,
    ) -> None:
        self._wire = _Wire(url, api_key, timeout=timeout, retries=retries, client=client)
        self._gov: RemoteGovernanceStore | None = None
        self._lock = threading.Lock()
        self._max_namespace: int | None = None

    @property
    def url(self) -> str:
        return self._wire.url

    @property
    def max_namespace(self) -> int:  # type: ignore[override]
        """255 less the tenant's name and a ``/``: the server keeps namespace ``N`` of
        the key's tenant ``T`` as ``T/N`` (asked once)."""
        if self._max_namespace is None:
            self._max_namespace = int(self._op("max_namespace"))
        return self._max_namespace

    def _op(self, op: str, **args: Any) -> Any:
        return self._wire.call(f"/v1/ledger/{op}", args)

    def get(self, namespace: str, key: str) -> Record | None:
        return _record(self._op("get", namespace=namespace, key=key))

    def claim(self, namespace: str, key: str, new: NewClaim) -> Record:
        rec = _record(self._op("claim", namespace=namespace, key=key, new=new))
        assert rec is not None
        return rec

    def take_over(
        self, namespace: str, key: str, seen: Record, new: NewClaim, *, force: bool = False
    ) -> Record | None:
        return _record(
            self._op("take_over", namespace=namespace, key=key, seen=seen, new=new, force=force)
        )

    def finish(
        self,
        namespace: str,
        key: str,
        token: int,
        *,
        ok: bool,
        result: str | None = None,
        error: str | None = None,
        ttl: float | None = None,
    ) -> bool:
        return bool(
            self._op(
                "finish",
                namespace=namespace,
                key=key,
                token=token,
                ok=ok,
                result=result,
                error=error,
                ttl=ttl,
            )
        )

    def heartbeat(self, namespace: str, key: str, token: int, lease: float) -> bool:
        return bool(self._op("heartbeat", namespace=namespace, key=key, token=token, lease=lease))

    def clear(self, namespace: str, key: str) -> bool | None:
        out = self._op("clear", namespace=namespace, key=key)
        return None if out is None else bool(out)

    def list(
        self,
        *,
        namespace: str | None = None,
        prefix: bool = False,
        state: str | None = None,
        tool: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Record]:
        rows = self._op(
            "list",
            namespace=namespace,
            prefix=prefix,
            state=state,
            tool=tool,
            since=since,
            limit=limit,
        )
        return [r for r in (_record(x) for x in rows) if r is not None]

    def iter_all(self, namespace: str | None = None, batch: int = 1000) -> Iterator[Record]:
        yield from self.list(namespace=namespace, prefix=True, limit=10**6)

    def clear_namespace(self, namespace: str) -> int:
        return int(self._op("clear_namespace", namespace=namespace))

    def now(self) -> float:
        return float(self._op("now"))

    def governance_store(self) -> RemoteGovernanceStore:
        with self._lock:
            if self._gov is None:
                self._gov = RemoteGovernanceStore(self._wire)
            return self._gov

    def close(self) -> None:
        self._wire.close()


def _record(value: Any) -> Record | None:
    if value is None or isinstance(value, Record):
        return value
    raise StoreError(f"the server answered a {type(value).__name__} where a record was due")


# -- governance ------------------------------------------------------------------------------
class RemoteGovernanceStore(GovernanceStore):
    """The governance primitives of the control plane. The tenant is the API key's: the
    ``tenant`` each primitive takes is the guard's namespace, and the server replaces it
    with the key's tenant (a key never reaches another tenant's state)."""

    kind = "remote"
    #: Notifications ride on the server's audit rows; the server delivers them.
    outbox = True
    local_delivery = False

    def __init__(self, wire: _Wire) -> None:
        self._wire = wire

    def _op(self, op: str, **args: Any) -> Any:
        return self._wire.call(f"/v1/governance/{op}", args)

    def now(self) -> float:
        return float(self._op("now"))

    def snapshot(self, tenant: str, agent_id: str, tool: str) -> dict[str, Any]:
        return dict(self._op("snapshot", tenant=tenant, agent_id=agent_id, tool=tool))

    def put_agent(
        self,
        tenant: str,
        agent_id: str,
        *,
        policy: Any = ...,
        disabled: bool | None = None,
        reason: str | None = None,
    ) -> None:
        args: dict[str, Any] = {"tenant": tenant, "agent_id": agent_id}
        if policy is not ...:  # "leave the policy alone" has no JSON form: omit it
            args["policy"] = policy
        self._op("put_agent", **args, disabled=disabled, reason=reason)

    def get_agent(self, tenant: str, agent_id: str) -> dict[str, Any] | None:
        out = self._op("get_agent", tenant=tenant, agent_id=agent_id)
        return None if out is None else dict(out)

    def list_agents(self, tenant: str) -> list[dict[str, Any]]:
        return list(self._op("list_agents", tenant=tenant))

    def reserve(
        self,
        tenant: str,
        agent_id: str,
        namespace: str,
        key: str,
        wants: Sequence[Want],
        lease: float,
        audit: dict[str, Any] | None = None,
    ) -> Reservation:
        out = self._op(
            "reserve",
            tenant=tenant,
            agent_id=agent_id,
            namespace=namespace,
            key=key,
            wants=list(wants),
            lease=lease,
            audit=audit,
        )
        if not isinstance(out, Reservation):
            raise StoreError("the server answered a reservation in an unknown form")
        return out

    def settle(
        self,
        tenant: str,
        agent_id: str,
        rid: str,
        amounts: list[Any],
        audit: dict[str, Any] | None = None,
    ) -> bool:
        return bool(
            self._op(
                "settle", tenant=tenant, agent_id=agent_id, rid=rid, amounts=amounts, audit=audit
            )
        )

    def release(
        self, tenant: str, agent_id: str, rid: str, audit: dict[str, Any] | None = None
    ) -> bool:
        return bool(self._op("release", tenant=tenant, agent_id=agent_id, rid=rid, audit=audit))

    def extend(self, rid: str, lease: float) -> bool:
        return bool(self._op("extend", rid=rid, lease=lease))

    def sweep(self, tenant: str, agent_id: str | None = None) -> int:
        return int(self._op("sweep", tenant=tenant, agent_id=agent_id))

    def pending_holds(self, tenant: str | None = None) -> list[dict[str, Any]]:
        return list(self._op("pending_holds", tenant=tenant))

    def counter(self, tenant: str, agent_id: str, metric: str, window: int) -> int:
        return int(
            self._op("counter", tenant=tenant, agent_id=agent_id, metric=metric, window=window)
        )

    def holds(self, tenant: str, agent_id: str) -> int:
        return int(self._op("holds", tenant=tenant, agent_id=agent_id))

    def approval_for(
        self,
        tenant: str,
        agent_id: str,
        tool: str,
        namespace: str,
        key: str,
        args: str,
        in_flight_for: float = 0.0,
    ) -> dict[str, Any]:
        return dict(
            self._op(
                "approval_for",
                tenant=tenant,
                agent_id=agent_id,
                tool=tool,
                namespace=namespace,
                key=key,
                args=args,
                in_flight_for=in_flight_for,
            )
        )

    def restore_approval(self, tenant: str, approval_id: str) -> bool:
        return bool(self._op("restore_approval", tenant=tenant, approval_id=approval_id))

    def decide_approval(
        self, tenant: str, approval_id: str, state: str, by: str | None, reason: str | None
    ) -> dict[str, Any] | None:
        out = self._op(
            "decide_approval",
            tenant=tenant,
            approval_id=approval_id,
            state=state,
            by=by,
            reason=reason,
        )
        return None if out is None else dict(out)

    def consume_approval(self, tenant: str, approval_id: str) -> None:
        self._op("consume_approval", tenant=tenant, approval_id=approval_id)

    def list_approvals(self, tenant: str, state: str | None = None) -> list[dict[str, Any]]:
        return list(self._op("list_approvals", tenant=tenant, state=state))

    def append_audit(self, tenant: str, entry: dict[str, Any]) -> tuple[int, str]:
        seq, digest = self._op("append_audit", tenant=tenant, entry=entry)
        return int(seq), str(digest)

    def append_audit_once(self, tenant: str, entry: dict[str, Any]) -> None:
        self._op("append_audit_once", tenant=tenant, entry=entry)  # checked on the server

    def audit_rows(
        self,
        tenant: str,
        *,
        agent_id: str | None = None,
        since: float | None = None,
        limit: int = 100,
        newest_first: bool = True,
    ) -> list[dict[str, Any]]:
        return list(
            self._op(
                "audit_rows",
                tenant=tenant,
                agent_id=agent_id,
                since=since,
                limit=limit,
                newest_first=newest_first,
            )
        )

    def audited_calls(self, tenant: str) -> dict[str, set[int | None]]:
        return dict(self._op("audited_calls", tenant=tenant))

    def verify_audit(self, tenant: str | None = None) -> list[dict[str, Any]]:
        return list(self._op("verify_audit", tenant=tenant))

    def chain_count(self, tenant: str | None = None) -> int:
        return int(self._op("chain_count", tenant=tenant))

    def purge_audit(self, tenant: str, before: float) -> int:
        return int(self._op("purge_audit", tenant=tenant, before=before))

    def metrics(self, tenant: str, agent_id: str, since: float) -> dict[str, Any]:
        return dict(self._op("metrics", tenant=tenant, agent_id=agent_id, since=since))

    def post_event(self, tenant: str, event: dict[str, Any]) -> int:
        return int(self._op("post_event", tenant=tenant, event=event))

    def timeline(self, tenant: str, run_id: str, limit: int, offset: int) -> list[dict[str, Any]]:
        return list(self._op("timeline", tenant=tenant, run_id=run_id, limit=limit, offset=offset))

    def put_tool(self, tenant: str, values: dict[str, Any]) -> None:
        self._op("put_tool", tenant=tenant, values=values)

    def get_tools(
        self, tenant: str, name: str | None = None, scope_id: str | None = None
    ) -> list[dict[str, Any]]:
        return list(self._op("get_tools", tenant=tenant, name=name, scope_id=scope_id))

    def set_tool_enabled(self, tenant: str, name: str, scope_id: str, enabled: bool) -> bool:
        return bool(
            self._op(
                "set_tool_enabled", tenant=tenant, name=name, scope_id=scope_id, enabled=enabled
            )
        )

    def delete_tool(self, tenant: str, name: str, scope_id: str) -> bool:
        return bool(self._op("delete_tool", tenant=tenant, name=name, scope_id=scope_id))

    def add_webhook(self, tenant: str, values: dict[str, Any]) -> str:
        return str(self._op("add_webhook", tenant=tenant, values=values))

    def list_webhooks(self, tenant: str) -> list[dict[str, Any]]:
        return list(self._op("list_webhooks", tenant=tenant))

    def delete_webhook(self, tenant: str, webhook_id: str) -> bool:
        return bool(self._op("delete_webhook", tenant=tenant, webhook_id=webhook_id))

    def enqueue_notification(self, tenant: str, event: dict[str, Any]) -> int:
        """Write a notification not tied to an audit row into the server's outbox."""
        return int(self._op("enqueue_notification", tenant=tenant, event=event))

    # The dead-letter view of the server's outbox (onceonly notify list / retry, the
    # dashboard). Delivery itself (claim, mark) is the server's: local_delivery is False.
    def outbox_list(
        self, tenant: str | None, state: str | None, limit: int
    ) -> list[dict[str, Any]]:
        return list(self._op("outbox_list", tenant=tenant, state=state, limit=limit))

    def outbox_pending(self, tenant: str | None) -> tuple[int, float | None]:
        count, due = self._op("outbox_pending", tenant=tenant)
        return int(count), None if due is None else float(due)

    def outbox_retry(self, tenant: str | None, row_id: str) -> bool:
        return bool(self._op("outbox_retry", tenant=tenant, row_id=row_id))
