"""The outbound policy for httpx: a transport that checks each request's destination and dials the
address it checked, keeping the name in the Host header and as the TLS server name (SNI and
certificate verification). Every request through it is checked, so a redirect hop would be too;
the platform's clients follow none (see pinned_client)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from services.common.outbound import IPAddress, OutboundPolicy, parse_url


class PinnedTransport(httpx.AsyncBaseTransport):
    """Raises OutboundRefused (before any connection) for a destination the policy refuses."""

    def __init__(
        self, policy: OutboundPolicy,
        pool: Callable[[], httpx.AsyncBaseTransport] | None = None, **transport: Any,
    ) -> None:
        # `pool` makes the transport for each name (a test's MockTransport, say); by default an
        # httpx.AsyncHTTPTransport with `transport` as its options.
        self._policy = policy
        self._new_pool = pool or (lambda: httpx.AsyncHTTPTransport(**transport))
        # One connection pool per host name: a TLS connection verified for one name must never
        # carry a request for another name that happens to resolve to the same address.
        self._pools: dict[tuple[str, str, int], httpx.AsyncBaseTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        destination = await self._policy.check(parse_url(str(request.url)))
        target = destination.target
        key = (target.scheme, target.host, target.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = self._new_pool()
        # Each checked address in turn while connecting fails (nothing of the request was sent
        # yet), as a client given the name would; never an address that was not checked.
        *others, last = destination.addresses
        for address in others:
            try:
                return await pool.handle_async_request(_pinned(request, address, target.host))
            except httpx.ConnectError:
                continue
        return await pool.handle_async_request(_pinned(request, last, target.host))

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()


def _pinned(request: httpx.Request, address: IPAddress, name: str) -> httpx.Request:
    """`request` sent to `address`: the Host header was set from the original URL when the
    request was built; TLS uses `name` for SNI and certificate verification."""
    return httpx.Request(
        request.method, request.url.copy_with(host=str(address)),
        headers=request.headers, stream=request.stream,
        extensions={**request.extensions, "sni_hostname": name},
    )


def pinned_client(
    policy: OutboundPolicy, *, timeout: float | httpx.Timeout = 5.0,
    pool: Callable[[], httpx.AsyncBaseTransport] | None = None,
) -> httpx.AsyncClient:
    """An AsyncClient for outbound calls: policy-checked and pinned, no redirects (a 3xx is the
    answer), no proxies from the environment (a proxy would do its own lookup)."""
    return httpx.AsyncClient(
        transport=PinnedTransport(policy, pool), follow_redirects=False, trust_env=False,
        timeout=timeout,
    )
