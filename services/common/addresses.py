"""Where a service's replicas are: `CORRAL_<SERVICE>_ADDR` (and `_INTERNAL_ADDR`) name one address,
or several replicas as a comma-separated list of `ip:port`. A channel to a list balances calls
round-robin over the replicas that answer and leaves one that stops answering, so a replica's
death costs only the calls that were in flight on it.

A single address keeps gRPC's defaults (a DNS name, e.g. a Kubernetes Service, goes to whatever it
resolves to). A list has no one host name to check a certificate against, so the channel checks
that each replica's certificate names the service itself (every service certificate does:
services/common/auth/pki.py, deploy/k8s's cert-manager example), which says more than a host name."""

from __future__ import annotations

import ipaddress

ChannelOptions = list[tuple[str, str | int]]


class AddressError(ValueError):
    """An address setting that cannot be used; the message says why and what to write."""


def replicas(address: str) -> list[str]:
    """The `host:port` addresses in `address` (one, or a comma-separated list)."""
    return [part.strip() for part in address.split(",") if part.strip()]


def check(address: str, what: str) -> None:
    """Raises AddressError unless `address` is one `host:port`, or a list of `ip:port` (the same
    family each)."""
    parts = replicas(address)
    if not parts:
        raise AddressError(f"{what} is empty; give host:port")
    for part in parts:
        if ":" not in part:
            raise AddressError(f"{what} ({part!r}) must be host:port")
    if len(parts) > 1:
        families = {_family(part, what) for part in parts}
        if len(families) > 1:
            raise AddressError(f"{what} ({address!r}) mixes IPv4 and IPv6 replicas; list one family")


def _family(part: str, what: str) -> str:
    host = part.rpartition(":")[0].strip("[]")
    try:
        return "ipv6" if ipaddress.ip_address(host).version == 6 else "ipv4"
    except ValueError:
        raise AddressError(
            f"{what}: {part!r} is not ip:port; a list of replicas names each by its IP address "
            "(or give one DNS name that resolves to every replica)"
        ) from None


def grpc_target(address: str, service: str) -> tuple[str, ChannelOptions]:
    """The gRPC target and channel options that reach `service` at `address` (checked by
    `check`), over TLS."""
    parts = replicas(address)
    if len(parts) == 1:
        return parts[0], []
    family = _family(parts[0], service)
    return f"{family}:{','.join(parts)}", [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.ssl_target_name_override", service),
    ]


def listen_address(address: str, variable: str) -> str:
    """The one address a server listens on, given where it is reached: `address` itself, unless
    it lists replicas (then each replica needs its own listen setting)."""
    parts = replicas(address)
    if len(parts) != 1:
        raise AddressError(
            f"{variable} is unset and the address lists {len(parts)} replicas; set {variable} "
            "to this replica's own host:port"
        )
    return parts[0]

