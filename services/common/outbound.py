"""The outbound policy: where the platform may connect on someone's behalf (a tenant's tools, rollout
and experiment webhooks, the model provider). A target is parsed (forms it does not understand are
refused), resolved once, every address checked, and the caller dials the address that was checked,
so a second lookup cannot switch it (DNS rebinding). Pure but for the Resolver seam."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# CORRAL_TOOLS_ALLOW_LOOPBACK=true is shorthand for listing these in CORRAL_OUTBOUND_ALLOW.
LOOPBACK: tuple[Network, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv6Network("::1/128"),
)
DEFAULT_TIMEOUT_S = 5.0
MAX_HOST_CHARS = 253
# Quoted back to the caller at most this long: a target can be a 2 KB URL.
_QUOTE_CHARS = 120

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known NAT64 prefix: IPv4 inside
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible IPv6: IPv4 inside
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# A host whose last label is a number is an IPv4 address, in any legacy spelling (decimal, hex,
# octal, fewer parts), as URL parsers and the C library read it: never a name.
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")
# gRPC target schemes (a resolver each); "dns:///host:port" is the only one we resolve ourselves.
_GRPC_SCHEMES = frozenset({
    "dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p", "passthrough",
})


class OutboundRefused(Exception):
    """The target may not be reached: its message says why and what to do."""


class Unresolved(OutboundRefused):
    """The target's name did not resolve (or timed out): nothing was checked, so nothing is dialed."""


@dataclass(frozen=True)
class Target:
    """A parsed destination: `host` is the name (lower case, no trailing dot, no brackets) the
    caller gave, which stays the HTTP Host, the TLS name and the gRPC authority."""

    scheme: str  # http, https or grpc
    host: str
    port: int
    literal: IPAddress | None = None

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Destination:
    """A target whose every address the policy allowed, and the one to dial."""

    target: Target
    address: IPAddress
    addresses: tuple[IPAddress, ...]

    @property
    def grpc_target(self) -> str:
        """The gRPC target that dials exactly `address` (no resolver of gRPC's own runs)."""
        if isinstance(self.address, ipaddress.IPv4Address):
            return f"ipv4:{self.address}:{self.target.port}"
        return f"ipv6:[{self.address}]:{self.target.port}"


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> Sequence[IPAddress]: ...


class SystemResolver:
    """The operating system's resolver (getaddrinfo, in a worker thread)."""

    async def resolve(self, host: str, port: int) -> Sequence[IPAddress]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def parse_allow(text: str) -> tuple[Network, ...]:
    """CORRAL_OUTBOUND_ALLOW: comma-separated CIDRs (a bare address is a /32 or /128)."""
    networks: list[Network] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"{item!r} is not a CIDR (for example 10.0.0.0/8, 127.0.0.0/8 or fd00::/8)"
            ) from None
    return tuple(networks)


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "…")


def parse_host(host: str) -> tuple[str, IPAddress | None]:
    """The host as dialled names go (lower case, no trailing dot, no brackets), and its address
    when it is an IP literal in any spelling (`2852039166`, `0xA9FEA9FE`, `0251.0376.0251.0376`
    are all 169.254.169.254, as the C library reads them)."""
    name = host.lower()
    if name.startswith("[") and name.endswith("]"):
        inner = name[1:-1]
        if "%" in inner:
            raise OutboundRefused(f"{_quote(host)}: IPv6 zone ids (%…) are not allowed")
        try:
            v6 = ipaddress.IPv6Address(inner)
        except ValueError:
            raise OutboundRefused(f"{_quote(host)} is not an IPv6 address") from None
        return inner, v6
    name = name.removesuffix(".")
    if not name or len(name) > MAX_HOST_CHARS:
        raise OutboundRefused(f"{_quote(host)} is not a host name")
    if ":" in name:
        raise OutboundRefused(f"{_quote(host)}: write an IPv6 address in brackets, [::1]")
    if _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):
        try:
            if not all(_NUMERIC_LABEL.match(part) for part in name.split(".")):
                raise OSError
            v4 = ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            raise OutboundRefused(f"{_quote(host)} is not a valid IPv4 address") from None
        return str(v4), v4
    if not all(_LABEL.match(label) for label in name.split(".")):
        raise OutboundRefused(
            f"{_quote(host)} is not a host name (letters, digits, '-' and '.'; write an "
            "internationalized name in its xn-- form)"
        )
    return name, None


def parse_url(url: str) -> Target:
    """An http(s) URL's destination. Credentials in the URL are refused: parsers disagree on
    where userinfo ends (`http://a@b@c/`), and credentials belong in a tool's secret."""
    if not url.isascii() or any(not c.isprintable() or c.isspace() or c == "\\" for c in url):
        raise OutboundRefused(f"{_quote(url)}: a URL is printable ASCII without spaces or '\\'")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise OutboundRefused(f"{_quote(url)} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise OutboundRefused(f"{_quote(url)} must be an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise OutboundRefused(f"{_quote(url)} must not carry user@ or user:password@")
    raw = parts.hostname or ""
    host, literal = parse_host(f"[{raw}]" if ":" in raw else raw)
    if port == 0:
        raise OutboundRefused(f"{_quote(url)}: the port must be from 1 to 65535")
    return Target(scheme, host, port or (443 if scheme == "https" else 80), literal)


def parse_grpc(address: str) -> Target:
    """A gRPC tool's destination: `host:port`, `[v6]:port` or `dns:///host:port`. The other target
    forms gRPC knows (`ipv4:`, `ipv6:`, `unix:`, `unix-abstract:`, `vsock:`, `dns://server/…`,
    `xds:`…) pick their own addresses or resolver, so they are refused."""
    if not address.isascii() or any(not c.isprintable() or c.isspace() for c in address):
        raise OutboundRefused(f"{_quote(address)}: an address is printable ASCII without spaces")
    rest = address
    if address.lower().startswith("dns:///"):
        rest = address[len("dns:///"):]
    else:
        scheme = address.split(":", 1)[0].lower()
        if scheme in _GRPC_SCHEMES or "://" in address or address.startswith("dns:"):
            raise OutboundRefused(
                f"{_quote(address)}: gRPC target form {scheme + ':'!r} is not supported; give "
                "host:port, [IPv6]:port or dns:///host:port"
            )
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise OutboundRefused(f"{_quote(address)} must be host:port with a port from 1 to 65535")
    name, literal = parse_host(host)
    return Target("grpc", name, int(port), literal)


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries and may reach it through: 6to4, NAT64, or the
    deprecated IPv4-compatible form (IPv4-mapped ones are unwrapped before this)."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def category(ip: IPAddress) -> str | None:
    """What kind of non-public address `ip` is, or None for a public one."""
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip == _BROADCAST:
        return "broadcast"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "shared (carrier-grade NAT)"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


# Never allowed, whatever CORRAL_OUTBOUND_ALLOW says: no service listens there on purpose.
_NEVER = ("unspecified", "multicast", "broadcast")


@dataclass(frozen=True)
class OutboundPolicy:
    """Public addresses are allowed; every other kind only inside a network `allow` lists, except
    unspecified, multicast and broadcast addresses, which are never allowed."""

    allow: tuple[Network, ...] = ()
    resolver: Resolver = field(default_factory=SystemResolver)
    timeout_s: float = DEFAULT_TIMEOUT_S

    def dialable(self, ip: IPAddress) -> IPAddress:
        """`ip` as it is dialled: an IPv4-mapped IPv6 address is the IPv4 address."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ip

    def refusal(self, ip: IPAddress) -> str | None:
        """Why `ip` may not be dialled, or None when it may."""
        ip = self.dialable(ip)
        checks: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            inner = _embedded_v4(ip)
            if inner is not None:
                checks.append(inner)
        for each in checks:
            kind = category(each)
            if kind is None:
                continue
            article = "an" if kind[0] in "aeiou" else "a"
            if kind in _NEVER:
                return f"{each}, {article} {kind} address (never allowed)"
            if not any(each.version == net.version and each in net for net in self.allow):
                return (
                    f"{each}, {article} {kind} address (allowed only in networks the operator "
                    "lists in CORRAL_OUTBOUND_ALLOW)"
                )
        return None

    async def check(self, target: Target) -> Destination:
        """The target's addresses, every one allowed; OutboundRefused otherwise (Unresolved when
        the name does not resolve)."""
        if target.literal is not None:
            addresses: list[IPAddress] = [target.literal]
        else:
            addresses = await self._resolve(target)
        for ip in addresses:
            why = self.refusal(ip)
            if why is not None:
                raise OutboundRefused(_refused(target, why))
        dialled = tuple(dict.fromkeys(self.dialable(ip) for ip in addresses))
        return Destination(target, dialled[0], dialled)

    async def _resolve(self, target: Target) -> list[IPAddress]:
        try:
            async with asyncio.timeout(self.timeout_s):
                found = list(await self.resolver.resolve(target.host, target.port))
        except TimeoutError:
            raise Unresolved(
                f"{target.host} did not resolve within {self.timeout_s:g}s; nothing was dialled"
            ) from None
        except (OSError, UnicodeError, ValueError) as exc:
            raise Unresolved(f"{target.host} does not resolve ({exc}); nothing was dialled") from None
        if not found:
            raise Unresolved(f"{target.host} resolves to no address; nothing was dialled")
        return found

    async def check_url(self, url: str) -> Destination:
        return await self.check(parse_url(url))

    async def check_grpc(self, address: str) -> Destination:
        return await self.check(parse_grpc(address))


def _refused(target: Target, why: str) -> str:
    if target.literal is not None:
        return f"{target.host} is refused: {why}"
    return f"{target.host} is refused: it resolves to {why}"


def allow_list(networks: Iterable[Network], allow_loopback: bool) -> tuple[Network, ...]:
    """The networks an operator allowed, with loopback added by CORRAL_TOOLS_ALLOW_LOOPBACK."""
    merged = list(networks)
    if allow_loopback:
        merged.extend(net for net in LOOPBACK if net not in merged)
    return tuple(merged)
