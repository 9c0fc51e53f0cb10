"""Outbound requests are hostile until checked: the egress guard for remote HTTP tools
and webhooks (``docs/security.md``, "Outbound requests").

A destination is refused unless it is a **public** address or is covered by the
allowlist. "Public" is decided by :func:`refusal` on the address itself, never on the
spelling of the URL:

* loopback, link-local (``169.254.169.254``, where cloud metadata lives; ``fe80::/10``),
  private (RFC 1918, ``fc00::/7``), shared address space (CGNAT ``100.64.0.0/10``),
  multicast, unspecified, broadcast, reserved, benchmarking and documentation ranges,
  deprecated site-local ``fec0::/10`` and every other special-purpose block the
  standard library's :mod:`ipaddress` knows as not globally routable;
* IPv6 forms that carry an IPv4 address are judged by the address they carry:
  IPv4-mapped ``::ffff:a.b.c.d``, 6to4 ``2002::/16`` and NAT64 ``64:ff9b::/96``;
  IPv4-compatible ``::a.b.c.d``, Teredo ``2001::/32`` and local-use NAT64
  ``64:ff9b:1::/48`` are refused outright.

The URL itself must be ``http``/``https``, without credentials (``user@host``), with an
ASCII host (international names in their ``xn--`` form) and, when the host is an IPv4
address, in the canonical dotted form: ``2130706433``, ``0177.0.0.1``, ``0x7f.1`` and
``127.1`` are read as ``127.0.0.1`` by some parsers and as names or other addresses by
others, so they are refused whatever they decode to. ``localhost`` and ``*.localhost``
are loopback by definition (RFC 6761). One trailing dot is ignored (``127.0.0.1.`` is
``127.0.0.1``).

Two checks, one rule:

* **At registration** (:func:`check_url`): the URL's form, and, for a host name, every
  address it resolves to right now. A name that does not resolve yet is accepted (with a
  warning): what counts is the second check.
* **At connect time** (:func:`connect_addresses`, used by the transports from
  :func:`transport` / :func:`async_transport`): the host is resolved **once**, every
  address is judged, and the connection is made to a judged address, never to a second
  lookup, so DNS rebinding (public at registration, ``127.0.0.1`` at connect) is refused.
  TLS still verifies the certificate for the host name (SNI is the name, not the
  address).

The allowlist (``ONCEONLY_EGRESS_ALLOW`` plus ``gov.egress_allow`` /
``ControlPlane(egress_allow=...)``) holds host names (``tools.intranet``, or
``*.intranet`` for every name under it), addresses and networks (``10.0.0.0/8``). An
allowlisted name may resolve to anything (its DNS is trusted); an allowlisted network
admits the addresses in it whatever name led there. Scheme, credential and spelling
rules apply even then.

The address checks need only the standard library; the transports import ``httpx`` (the
``http`` extra) when first asked for.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError, MissingExtraError

__all__ = [
    "ALLOW_ENV",
    "Egress",
    "EgressRefused",
    "Target",
    "async_transport",
    "check_url",
    "connect_addresses",
    "refusal",
    "transport",
]

log = logging.getLogger("onceonly.egress")

#: The environment variable holding the process-wide allowlist (comma separated).
ALLOW_ENV = "ONCEONLY_EGRESS_ALLOW"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressRefused(ConfigError):
    """An outbound URL or the address it leads to is refused by the egress guard."""


# -- addresses ----------------------------------------------------------------------------
_N = ipaddress.ip_network
_RFC1918 = (_N("10.0.0.0/8"), _N("172.16.0.0/12"), _N("192.168.0.0/16"))
_CGNAT = _N("100.64.0.0/10")
_6TO4_RELAY = _N("192.88.99.0/24")  # deprecated anycast relays (RFC 7526)
_COMPAT = _N("::/96")  # IPv4-compatible IPv6 (deprecated, RFC 4291)
_NAT64 = _N("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are the host
_NAT64_LOCAL = _N("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215): not global
_TEREDO = _N("2001::/32")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def refusal(addr: Address) -> str | None:
    """Why ``addr`` is not a public destination, or None when it is.

    Built on :mod:`ipaddress`'s properties, plus what they miss (multicast counts as
    "global" there; 6to4, NAT64 and IPv4-compatible forms are judged by the address
    inside them; CGNAT and site-local are named explicitly).
    """
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is not None:  # on a dual-stack socket this *is* the IPv4 host
            inner = refusal(mapped)
            return f"IPv4-mapped form of {mapped} ({inner})" if inner else None
        if addr in _NAT64:
            v4 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
            inner = refusal(v4)
            return f"NAT64 form of {v4} ({inner})" if inner else None
        six = addr.sixtofour
        if six is not None:
            inner = refusal(six)
            if inner:
                return f"6to4 form of {six} ({inner})"
        if addr.teredo is not None or addr in _TEREDO:
            return "Teredo tunnel address"
        if addr in _NAT64_LOCAL:
            return "local-use NAT64 address"
        if addr in _COMPAT and not (addr.is_unspecified or addr.is_loopback):
            return "IPv4-compatible IPv6 address (deprecated)"
    if addr.is_unspecified:
        return "unspecified address"
    if addr == _BROADCAST:
        return "broadcast address"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local (cloud metadata services live here)"
    if addr.is_multicast:
        return "multicast"
    if isinstance(addr, ipaddress.IPv4Address):
        if addr in _CGNAT:
            return "shared address space (CGNAT, RFC 6598)"
        if any(addr in n for n in _RFC1918):
            return "private (RFC 1918)"
        if addr in _6TO4_RELAY:
            return "deprecated 6to4 relay anycast"
    else:
        if addr.is_site_local:
            return "site-local (deprecated)"
        if addr in _N("fc00::/7"):
            return "unique local (private)"
    if addr.is_reserved:
        return "reserved"
    if addr.is_private or not addr.is_global:
        return "special-purpose, not globally routable"
    return None


# -- host names ---------------------------------------------------------------------------
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")


def _host(raw: str) -> tuple[str, Address | None]:
    """Normalise a host; (name, None) for a DNS name, (text, address) for a literal."""
    host = raw.lower()
    if ":" in host:  # an IPv6 literal (brackets already removed)
        if "%" in host:
            raise EgressRefused(f"host {raw!r}: IPv6 zone identifiers are refused")
        try:
            v6 = ipaddress.IPv6Address(host)
        except ValueError:
            raise EgressRefused(f"host {raw!r} is not a valid IPv6 address") from None
        return str(v6), v6
    if not host.isascii():
        raise EgressRefused(
            f"host {raw!r} is not ASCII: write an international name in its xn-- form"
        )
    if host.endswith("."):
        host = host[:-1]  # the DNS root: "localhost." is "localhost"
    labels = host.split(".")
    if not host or len(host) > 253 or "" in labels:
        raise EgressRefused(f"host {raw!r} is not a valid host name")
    if _NUMERIC.match(labels[-1]):
        # A name ending in a number is an IPv4 address to URL parsers (WHATWG) and to
        # inet_aton(); only the canonical dotted quad is unambiguous.
        try:
            v4 = ipaddress.IPv4Address(host)
        except ValueError:
            raise EgressRefused(
                f"host {raw!r} is an ambiguous spelling of an IPv4 address "
                "(decimal, octal, hex or short forms are refused; write a.b.c.d)"
            ) from None
        return str(v4), v4
    if not all(_LABEL.match(label) for label in labels):
        raise EgressRefused(f"host {raw!r} is not a valid host name")
    return host, None


def _is_localhost(name: str) -> bool:
    return name == "localhost" or name.endswith(".localhost")


# -- the allowlist ------------------------------------------------------------------------
class Egress:
    """An allowlist: host names (exact, or ``*.suffix``) and networks (CIDR or address).

    ``Egress("10.0.0.0/8, tools.intranet")`` or ``Egress(["127.0.0.1", "*.corp"])``.
    An empty allowlist admits public addresses only.
    """

    __slots__ = ("hosts", "nets", "suffixes")

    def __init__(self, allow: str | Iterable[str] = (), *, source: str = "egress allowlist"):
        entries = re.split(r"[\s,]+", allow) if isinstance(allow, str) else list(allow)
        hosts: set[str] = set()
        suffixes: set[str] = set()
        nets: list[Network] = []
        for entry in entries:
            if not isinstance(entry, str):
                raise ConfigError(f"{source}: entries must be strings, got {entry!r}")
            text = entry.strip().lower()
            if not text:
                continue
            if text.startswith("[") and "]" in text:
                text = text[1:].replace("]", "", 1)
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            wildcard = text.startswith(("*.", "."))
            name = text[2:] if text.startswith("*.") else text.lstrip(".")
            try:
                norm, literal = _host(name)
            except EgressRefused:
                norm, literal = "", None
            if not norm or literal is not None:
                raise ConfigError(f"{source}: {entry!r} is not a host name, address or CIDR")
            (suffixes if wildcard else hosts).add(norm)
        self.hosts = frozenset(hosts)
        self.suffixes = tuple(sorted("." + s for s in suffixes))
        self.nets = tuple(nets)

    def __repr__(self) -> str:
        items = sorted(self.hosts) + ["*" + s for s in self.suffixes] + [str(n) for n in self.nets]
        return f"Egress({', '.join(items)!r})"

    def __bool__(self) -> bool:
        return bool(self.hosts or self.suffixes or self.nets)

    def __or__(self, other: Egress) -> Egress:
        out = Egress()
        out.hosts = self.hosts | other.hosts
        out.suffixes = tuple(sorted(set(self.suffixes) | set(other.suffixes)))
        out.nets = self.nets + tuple(n for n in other.nets if n not in self.nets)
        return out

    def allows_host(self, name: str) -> bool:
        """True when the (normalised) host name is allowlisted."""
        return name in self.hosts or any(name.endswith(s) for s in self.suffixes)

    def judge(self, addr: Address) -> str | None:
        """Why ``addr`` is refused, or None (public, or inside an allowlisted network)."""
        reason = refusal(addr)
        if reason is None:
            return None
        candidates: list[Address] = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            candidates.append(addr.ipv4_mapped)
        for a in candidates:
            if any(a.version == n.version and a in n for n in self.nets):
                return None
        return reason

    @classmethod
    def of(cls, allow: AllowSpec = None) -> Egress:
        """The effective allowlist: ``ONCEONLY_EGRESS_ALLOW`` plus ``allow``."""
        env = _from_env(os.environ.get(ALLOW_ENV, ""))
        if allow is None:
            return env
        extra = allow if isinstance(allow, Egress) else _parse(allow)
        return env | extra if env else extra


#: What an ``egress_allow`` setting may be: an :class:`Egress`, a comma-separated string,
#: a list of entries, or None (the environment's allowlist alone).
AllowSpec = Egress | str | Iterable[str] | None


@functools.lru_cache(maxsize=32)
def _from_env(text: str) -> Egress:
    # Parsed once per distinct value: the check runs on every registration and connect.
    return Egress(text, source=ALLOW_ENV)


def _parse(allow: str | Iterable[str]) -> Egress:
    key = allow if isinstance(allow, str) else tuple(allow)
    return _parse_cached(key)


@functools.lru_cache(maxsize=64)
def _parse_cached(key: str | tuple[str, ...]) -> Egress:
    return Egress(key)


# -- URLs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A checked URL: scheme, normalised host, port, and the address for a literal host."""

    scheme: str
    host: str
    port: int
    address: Address | None

    @property
    def shown(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_url(url: str) -> Target:
    """The form checks alone (no DNS, no allowlist): scheme, credentials, host spelling."""
    if not isinstance(url, str) or not url:
        raise EgressRefused("the url must be a non-empty string")
    if _BAD_URL_CHARS.search(url):
        raise EgressRefused("the url contains whitespace, control characters or a backslash")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise EgressRefused("the url cannot be parsed (bad port or brackets)") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = scheme or "none"
        raise EgressRefused(f"url scheme {shown!r} is refused: only http and https")
    if "@" in parts.netloc:
        raise EgressRefused(
            "credentials in the url (user@host) are refused: use the tool's auth/secret"
        )
    if not parts.hostname:
        raise EgressRefused("the url has no host")
    host, addr = _host(parts.hostname)
    if port == 0:
        raise EgressRefused("port 0 is refused")
    return Target(scheme, host, port or (443 if scheme == "https" else 80), addr)


def resolve(host: str, port: int) -> list[Address]:
    """Every address ``host`` resolves to (TCP), in the resolver's order, once each."""
    seen: list[Address] = []
    for _family, _type, _proto, _canon, sockaddr in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        text = str(sockaddr[0]).split("%", 1)[0]
        addr = ipaddress.ip_address(text)
        if addr not in seen:
            seen.append(addr)
    return seen


def _judge_all(egress: Egress, host: str, addrs: list[Address]) -> None:
    for a in addrs:
        reason = egress.judge(a)
        if reason is not None:
            raise EgressRefused(
                f"destination {host} resolves to {a}, which is refused: {reason}; "
                f"allowlist it with {ALLOW_ENV} if it is an intranet tool"
            )


def check_url(url: str, allow: AllowSpec = None, *, resolve_names: bool = True) -> Target:
    """The registration check: raises :class:`EgressRefused` (a ``ConfigError``) when
    ``url`` is not allowed. A host name is resolved and every address judged; a name that
    does not resolve (yet) is accepted with a warning, since every connection is checked
    again on the address it goes to."""
    target = parse_url(url)
    egress = Egress.of(allow)
    if target.address is not None:
        reason = egress.judge(target.address)
        if reason is not None:
            raise EgressRefused(
                f"destination {target.address} is refused: {reason}; "
                f"allowlist it with {ALLOW_ENV} if it is an intranet tool"
            )
        return target
    if egress.allows_host(target.host):
        return target
    if _is_localhost(target.host):
        raise EgressRefused(f"destination {target.host} is refused: loopback (RFC 6761)")
    if resolve_names:
        try:
            addrs = resolve(target.host, target.port)
        except (OSError, UnicodeError, ValueError):
            log.warning(
                "egress: %s does not resolve now; it is checked again at every connection",
                target.host,
            )
            return target
        _judge_all(egress, target.host, addrs)
    return target


def connect_addresses(host: str, port: int, allow: AllowSpec = None) -> list[str]:
    """The connect-time check: resolve ``host`` once, judge every address, and return the
    addresses to connect to (all of them allowed). Raises :class:`EgressRefused`, or
    ``OSError`` when the name does not resolve."""
    name, addr = _host(host)
    egress = allow if isinstance(allow, Egress) else Egress.of(allow)
    if addr is not None:
        reason = egress.judge(addr)
        if reason is not None:
            raise EgressRefused(f"destination {addr} is refused: {reason}")
        return [str(addr)]
    if egress.allows_host(name):
        return [str(a) for a in resolve(name, port)]
    if _is_localhost(name):
        raise EgressRefused(f"destination {name} is refused: loopback (RFC 6761)")
    addrs = resolve(name, port)
    if not addrs:
        raise OSError(f"{name} has no address")
    _judge_all(egress, name, addrs)
    return [str(a) for a in addrs]


# -- transports (httpx, lazily) -----------------------------------------------------------
def transport(allow: AllowSpec = None, **options: Any) -> Any:
    """An ``httpx.HTTPTransport`` whose every connection goes through
    :func:`connect_addresses`: the name is resolved once, each address judged, and the
    socket opened to a judged address (the next one on a connect error). TLS is verified
    for the host name. ``options`` go to ``httpx.HTTPTransport``; environment proxies are
    not used (a client given a transport ignores them), so the address checked is the
    address connected to. Raises :class:`~onceonly_core.errors.MissingExtraError` without
    httpx (the ``http`` extra)."""
    httpx = _httpx()
    egress = Egress.of(allow)
    t = httpx.HTTPTransport(**options)
    pool = t._pool
    # httpx builds the pool; only its network backend is swapped, so TLS, HTTP/2 and the
    # limits stay exactly as httpx configured them.
    if not hasattr(pool, "_network_backend"):  # pragma: no cover - a future httpcore
        raise RuntimeError("this httpcore has no pluggable network backend")
    pool._network_backend = _classes()[0](pool._network_backend, egress)
    return t


def async_transport(allow: AllowSpec = None, **options: Any) -> Any:
    """The ``httpx.AsyncHTTPTransport`` twin of :func:`transport`."""
    httpx = _httpx()
    egress = Egress.of(allow)
    t = httpx.AsyncHTTPTransport(**options)
    pool = t._pool
    if not hasattr(pool, "_network_backend"):  # pragma: no cover - a future httpcore
        raise RuntimeError("this httpcore has no pluggable network backend")
    pool._network_backend = _classes()[1](pool._network_backend, egress)
    return t


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise MissingExtraError("outbound HTTP (remote tools, webhooks)", "http", "httpx") from None
    return httpx


@functools.lru_cache(maxsize=1)
def _classes() -> tuple[Any, Any]:
    """The guarded httpcore network backends, defined on first use (httpcore is optional)."""
    import anyio.to_thread
    import httpcore

    def _no_address(exc: OSError, host: str) -> httpcore.ConnectError:
        return httpcore.ConnectError(f"cannot resolve {host}: {exc}")

    class Guarded(httpcore.NetworkBackend):
        def __init__(self, inner: httpcore.NetworkBackend, egress: Egress) -> None:
            self.inner = inner
            self.egress = egress

        def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Iterable[Any] | None = None,
        ) -> httpcore.NetworkStream:
            try:
                addrs = connect_addresses(host, port, self.egress)
            except EgressRefused:
                raise
            except OSError as exc:
                raise _no_address(exc, host) from None
            last: Exception | None = None
            for a in addrs:  # connect to the checked address: no second lookup
                try:
                    return self.inner.connect_tcp(a, port, timeout, local_address, socket_options)
                except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                    last = exc
            assert last is not None
            raise last

        def connect_unix_socket(
            self, path: str, timeout: float | None = None, socket_options: Any = None
        ) -> httpcore.NetworkStream:
            raise EgressRefused("unix sockets are refused by the egress guard")

        def sleep(self, seconds: float) -> None:
            self.inner.sleep(seconds)

    class AsyncGuarded(httpcore.AsyncNetworkBackend):
        def __init__(self, inner: httpcore.AsyncNetworkBackend, egress: Egress) -> None:
            self.inner = inner
            self.egress = egress

        async def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Iterable[Any] | None = None,
        ) -> httpcore.AsyncNetworkStream:
            try:
                # getaddrinfo blocks; run it in a worker thread (asyncio and trio alike).
                addrs = await anyio.to_thread.run_sync(connect_addresses, host, port, self.egress)
            except EgressRefused:
                raise
            except OSError as exc:
                raise _no_address(exc, host) from None
            last: Exception | None = None
            for a in addrs:
                try:
                    return await self.inner.connect_tcp(
                        a, port, timeout, local_address, socket_options
                    )
                except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                    last = exc
            assert last is not None
            raise last

        async def connect_unix_socket(
            self, path: str, timeout: float | None = None, socket_options: Any = None
        ) -> httpcore.AsyncNetworkStream:
            raise EgressRefused("unix sockets are refused by the egress guard")

        async def sleep(self, seconds: float) -> None:
            await self.inner.sleep(seconds)

    return Guarded, AsyncGuarded
