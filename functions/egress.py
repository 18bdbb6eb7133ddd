"""Where the `http` kind may connect: public addresses, and those TASKRUNNER_HTTP_ALLOWED_HOSTS
allows; checked on the address actually connected to.

A task's URL is the user's: without a check, `http://169.254.169.254/` (the cloud's metadata
service), `http://localhost:5432/` or any address inside the VPC is one task away. The check
is made where the connection is opened (`GuardedBackend`, httpcore's network backend): the
host name is resolved once, each address checked, and the connection opened to an address
that passed, by number. A name that resolves to a public address when checked and to a
private one when connected (DNS rebinding) cannot slip through: nothing resolves it again.
TLS and the Host header still use the name (httpcore asks the stream for TLS with the URL's
host as `server_hostname`), so certificates are verified as usual.

Refused: loopback, private (RFC 1918, fc00::/7), link-local (169.254.0.0/16 with the
metadata address, fe80::/10), multicast, unspecified, reserved, and anything else the IANA
registries say is not globally reachable (100.64.0.0/10, 192.0.0.0/24, documentation
ranges...); an IPv6 address that carries an IPv4 one (::ffff:127.0.0.1, 64:ff9b::7f00:1) is
judged by that one. No import of httpx or httpcore at module level: the API never needs them.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from functions.settings import Settings

if TYPE_CHECKING:
    import httpcore
    import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(Exception):
    """A connection the http kind refuses to open: its message says to what and why."""


@dataclass(frozen=True)
class Allowed:
    """TASKRUNNER_HTTP_ALLOWED_HOSTS, read: host names and networks."""

    names: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    def allows(self, host: str, address: Address) -> bool:
        return host_key(host) in self.names or any(address in net for net in self.networks)


@lru_cache(maxsize=16)
def allowed(setting: str | None) -> Allowed:
    """The allow-list of the setting (as `settings._check_allowed_hosts` normalised it)."""
    names: set[str] = set()
    networks: list[Network] = []
    for item in (setting or "").split(","):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            names.add(host_key(item))
    return Allowed(frozenset(names), tuple(networks))


def host_key(host: str) -> str:
    """A host as the allow-list compares it: lowercase, no trailing dot, no brackets."""
    return host.strip("[]").rstrip(".").lower()


def why_refused(address: Address) -> str | None:
    """What kind of address `address` is, if one the http kind refuses by default; None for
    a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped
        if inner is None and address in _NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            why = why_refused(inner)
            return None if why is None else f"{why} (inside {address})"
    for what, test in (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    ):
        if test:
            return f"{'an' if what[0] in 'aeiou' else 'a'} {what} address"
    if not address.is_global:
        return "an address that is not globally reachable"
    return None


def check(host: str, address: Address, allow: Allowed) -> None:
    """Raise AddressRefused unless the http kind may connect to `address` for `host`."""
    why = why_refused(address)
    if why is not None and not allow.allows(host, address):
        shown = host if host_key(host) == host_key(str(address)) else f"{host} ({address})"
        raise AddressRefused(
            f"refused to connect to {shown}: {why}; TASKRUNNER_HTTP_ALLOWED_HOSTS can allow"
            " its host name or network"
        )


def _resolved(infos: Iterable[tuple[Any, ...]]) -> list[Address]:
    found: list[Address] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        # (An IPv6 sockaddr may carry a scope: fe80::1%eth0.)
        address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        if address not in found:
            found.append(address)
    return found


@cache
def _backend_class() -> Callable[[Allowed], httpcore.AsyncNetworkBackend]:
    import anyio
    import httpcore

    class GuardedBackend(httpcore.AsyncNetworkBackend):
        """httpcore's AnyIO backend, connecting only to addresses `check` lets through:
        the host is resolved here, and the connection opened to the address checked."""

        def __init__(self, allow: Allowed) -> None:
            self.allow = allow
            self.inner = httpcore.AnyIOBackend()

        async def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Iterable[Any] | None = None,
        ) -> httpcore.AsyncNetworkStream:
            try:
                with anyio.fail_after(timeout):
                    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except TimeoutError:
                raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
            except OSError as exc:  # socket.gaierror: no such name, no DNS
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
            addresses = _resolved(infos)
            refusal: AddressRefused | None = None
            error: Exception | None = None
            for address in addresses:
                try:
                    check(host, address, self.allow)
                except AddressRefused as exc:
                    refusal = refusal or exc
                    continue
                try:
                    return await self.inner.connect_tcp(
                        str(address), port, timeout, local_address, socket_options
                    )
                except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                    error = exc  # the next address may answer
            if error is not None:
                raise error
            if refusal is not None:
                raise refusal
            raise httpcore.ConnectError(f"{host} resolves to no address")

        async def connect_unix_socket(
            self,
            path: str,
            timeout: float | None = None,
            socket_options: Iterable[Any] | None = None,
        ) -> httpcore.AsyncNetworkStream:
            raise AddressRefused("refused to connect to a Unix socket")

        async def sleep(self, seconds: float) -> None:
            await self.inner.sleep(seconds)

    return GuardedBackend


def guarded_transport(
    tls: ssl.SSLContext, limits: httpx.Limits, settings: Settings
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections are opened by the guarded backend, under
    `settings.http_allowed_hosts`. httpx's transports take no network backend (a pull
    request to add one, encode/httpx#3749, is open): the pool httpx made is replaced by
    httpcore's own, built as httpx builds it, with the backend. A test connects through it
    to a refused address, so a change of that attribute in httpx cannot pass unseen."""
    import httpcore
    import httpx

    transport = httpx.AsyncHTTPTransport(verify=tls, trust_env=False, limits=limits)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=tls,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=_backend_class()(allowed(settings.http_allowed_hosts)),
    )
    return transport
