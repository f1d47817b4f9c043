"""The public keys of identity providers: JWKS documents fetched over HTTP and cached, so that
verifying a bearer token costs no request while the keys are fresh.

A JWKS that cannot be fetched fails closed: tokens of that provider are refused (UNAUTHENTICATED,
reason JWKS_UNAVAILABLE) until it answers again, rather than accepted on keys that may have been
withdrawn."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from services.common.errors import Unauthenticated

log = logging.getLogger(__name__)

PublicKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey

# Providers rotate keys rarely and publish a new one before signing with it, so a JWKS this old
# still holds every key in use; a token naming a key we do not know triggers an early refetch,
# at most this often per URL, so that a flood of made-up key ids cannot hammer the provider.
DEFAULT_TTL_S = 300.0
UNKNOWN_KID_REFETCH_S = 30.0
# After a failed fetch, calls fail at once (with the same message) for this long instead of each
# waiting for a provider that is down.
FAILED_FETCH_RETRY_S = 5.0
DEFAULT_TIMEOUT_S = 3.0
MAX_JWKS_BYTES = 1024 * 1024


@dataclass(frozen=True)
class SigningKey:
    """One key of a JWKS. `kid` is "" for a key published without an id; `algorithm` is the one
    the JWK pins with its `alg` member, if it does."""

    kid: str
    key: PublicKey
    algorithm: str | None = None


class JwksSource(Protocol):
    """Where the verifier gets a provider's keys: kid → key. `refresh=True` asks for the
    provider's current keys (a token named one not known yet); a source may answer from its cache
    when it fetched very recently. Raises Unauthenticated when the keys cannot be had."""

    async def keys(self, url: str, *, refresh: bool) -> Mapping[str, SigningKey]: ...


def jwks_unavailable(url: str, why: str) -> Unauthenticated:
    return Unauthenticated(
        f"the identity provider's signing keys could not be fetched from {url} ({why}), so its "
        "tokens cannot be checked and are refused; retry later, or use an API key",
        reason="JWKS_UNAVAILABLE",
    )


def parse_jwks(document: Any, url: str) -> dict[str, SigningKey]:
    """The signing keys of a JWKS document (encryption keys and key types PyJWT cannot use are
    skipped); Unauthenticated when it is not a JWKS or holds no usable signing key."""
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise jwks_unavailable(url, 'the answer is not a JWKS: no "keys" list')
    keys: dict[str, SigningKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            log.info("skipping a key of %s that cannot verify signatures: %s", url, exc)
            continue
        if not isinstance(key, PublicKey):  # a symmetric ("oct") or private key
            continue
        kid = entry.get("kid", "")
        alg = entry.get("alg")
        keys[str(kid)] = SigningKey(str(kid), key, alg if isinstance(alg, str) else None)
    if not keys:
        raise jwks_unavailable(url, "the JWKS holds no public signing key")
    return keys


@dataclass
class _Fetched:
    """What is known of one URL: its keys and when they came, the last attempt and its error."""

    keys: Mapping[str, SigningKey] | None = None
    fetched_at: float = 0.0
    attempted_at: float = 0.0
    error: Unauthenticated | None = None


class HttpJwksSource:
    """Fetches JWKS documents with one long-lived httpx.AsyncClient and caches each for `ttl_s`.

    Concurrent calls for one URL wait for a single fetch. `clock` is monotonic seconds."""

    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        refetch_s: float = UNKNOWN_KID_REFETCH_S,
        retry_s: float = FAILED_FETCH_RETRY_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s, self._refetch_s, self._retry_s = ttl_s, refetch_s, retry_s
        self._timeout = httpx.Timeout(timeout_s)
        self._transport = transport
        self._clock = clock
        self._client: httpx.AsyncClient | None = None
        self._state: dict[str, _Fetched] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def keys(self, url: str, *, refresh: bool) -> Mapping[str, SigningKey]:
        state = self._state.setdefault(url, _Fetched())
        if not self._should_fetch(state, refresh):
            return self._cached(state)
        async with self._locks.setdefault(url, asyncio.Lock()):
            # Another call may have fetched while this one waited.
            if not self._should_fetch(state, refresh):
                return self._cached(state)
            state.attempted_at = self._clock()
            try:
                keys = parse_jwks(await self._get(url), url)
            except Unauthenticated as exc:
                log.warning("%s", exc.message)
                state.error = exc
                raise
            state.keys, state.fetched_at, state.error = keys, state.attempted_at, None
            log.info("fetched %d signing keys from %s", len(keys), url)
            return keys

    def _fresh(self, state: _Fetched) -> bool:
        return state.keys is not None and self._clock() - state.fetched_at < self._ttl_s

    def _should_fetch(self, state: _Fetched, refresh: bool) -> bool:
        since_attempt = self._clock() - state.attempted_at
        if not self._fresh(state):
            return state.error is None or since_attempt >= self._retry_s
        return refresh and since_attempt >= self._refetch_s

    def _cached(self, state: _Fetched) -> Mapping[str, SigningKey]:
        if state.keys is not None and self._fresh(state):
            return state.keys
        assert state.error is not None  # not fresh and not fetched: only after a failure
        raise state.error

    async def _get(self, url: str) -> Any:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self._timeout, transport=self._transport, follow_redirects=False,
                headers={"accept": "application/json"},
            )
        try:
            response = await self._client.get(url)
        except httpx.HTTPError as exc:
            raise jwks_unavailable(url, f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        if response.status_code != 200:
            raise jwks_unavailable(url, f"it answered HTTP {response.status_code}")
        if len(response.content) > MAX_JWKS_BYTES:
            raise jwks_unavailable(url, f"the answer is larger than {MAX_JWKS_BYTES} bytes")
        try:
            return response.json()
        except ValueError:
            raise jwks_unavailable(url, "the answer is not JSON") from None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
