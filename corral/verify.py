"""Verifies Corral invocation tokens inside a tool service: the signature against the executor's
JWKS (fetched and cached), the standard claims, this tool in the audience, and the executor's
revocation list. Shipped to tool services, so it depends on PyJWT and httpx only.

    claims = await averify_invocation_token(bearer, audience="search")
    if claims.invocation_id != request.headers["X-Corral-Invocation"]: refuse

InvalidInvocationToken means refuse the call (401); VerificationUnavailable means the executor
could not be asked, so neither accept nor refuse: answer 503 and let the caller retry.

`audience` is the tool's own registered name, one string: the executor mints a token per tool
call with that tool as its only audience, so a token handed to another tool is refused here as
"wrong audience". Tokens of older executors listed every tool the version declares; they still
verify for each tool they list."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

JWKS_URL_ENV = "CORRAL_JWKS_URL"
# The executor publishes a key long before it signs with it (see its KeyRing), so a JWKS this old
# still holds every key in use; an unknown kid triggers an early refetch, rate-limited so a
# stream of forged kids cannot turn into a stream of fetches.
JWKS_TTL_S = 300.0
UNKNOWN_KID_REFETCH_S = 30.0
REQUIRED_CLAIMS = ("exp", "iat", "jti", "sub", "aud")
_CUSTOM_CLAIMS = ("session", "invocation_id", "tenant", "user")


class InvalidInvocationToken(Exception):
    """The token must be refused. `reason` is one of: expired, not yet valid, revoked,
    wrong audience, wrong issuer, bad signature, unknown key, malformed."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class VerificationUnavailable(Exception):
    """The executor's JWKS or revocation list could not be reached or gave no usable answer."""


@dataclass(frozen=True)
class InvocationClaims:
    version: str  # agents/{agent}/versions/{n}
    session: str
    invocation_id: str
    tenant: str
    user: str
    audience: tuple[str, ...]  # the tools this invocation may call
    expires_at: float
    jti: str


@dataclass
class _LoopIO:
    """An httpx.AsyncClient and a lock are bound to one event loop; each loop gets its own."""

    client: httpx.AsyncClient
    lock: asyncio.Lock


class TokenVerifier:
    """Verifies tokens against the JWKS at `jwks_url`; revocation is asked of the same origin.

    Thread-safe for `verify`; `averify` may be used from any number of event loops."""

    def __init__(
        self,
        jwks_url: str,
        *,
        timeout_s: float = 2.0,
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(jwks_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"JWKS URL {jwks_url!r} must be an http(s) URL with a host")
        self.jwks_url = jwks_url
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._timeout = httpx.Timeout(timeout_s)
        self._transport = transport
        self._async_transport = async_transport
        self._clock = clock
        self._keys: dict[str, Ed25519PublicKey] | None = None
        self._refresh_at = 0.0
        self._last_fetch = -UNKNOWN_KID_REFETCH_S  # monotonic time of the last fetch attempt
        self._lock = threading.Lock()  # one JWKS fetch at a time across threads
        self._client_lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._loops: dict[asyncio.AbstractEventLoop, _LoopIO] = {}

    # -- public --------------------------------------------------------------------------------

    def verify(self, token: str, *, audience: str, check_revocation: bool = True,
               leeway_s: float = 5, issuer: str | None = None) -> InvocationClaims:
        """Blocks on HTTP when the JWKS is due or revocation is checked: not for event loops."""
        _check_audience(audience)
        kid = _unverified_kid(token)
        if self._must_fetch(kid):
            with self._lock:
                if self._needs_refresh(kid):
                    self._refresh(self._clock(), self._fetch_jwks())
        claims = self._decode(token, kid, audience, leeway_s, issuer)
        if check_revocation:
            url = self._revocation_url(claims.jti)
            _raise_if_revoked(claims.jti, _get(lambda: self._sync_client().get(url), url))
        return claims

    async def averify(self, token: str, *, audience: str, check_revocation: bool = True,
                      leeway_s: float = 5, issuer: str | None = None) -> InvocationClaims:
        """verify() for event loops: the same checks, over this loop's HTTP client."""
        _check_audience(audience)
        kid = _unverified_kid(token)
        if self._must_fetch(kid):
            io = self._loop_io()
            async with io.lock:
                if self._needs_refresh(kid):
                    self._refresh(self._clock(), await self._afetch_jwks(io))
        claims = self._decode(token, kid, audience, leeway_s, issuer)
        if check_revocation:
            url = self._revocation_url(claims.jti)
            _raise_if_revoked(claims.jti, await _aget(self._loop_io().client.get(url), url))
        return claims

    def _must_fetch(self, kid: str) -> bool:
        return self._known_key(kid) is None and self._needs_refresh(kid)

    def _decode(
        self, token: str, kid: str, audience: str, leeway_s: float, issuer: str | None
    ) -> InvocationClaims:
        return _decode(token, _require_key(self._known_key(kid), kid), audience, leeway_s, issuer)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def aclose(self) -> None:
        """Closes this event loop's client (others are dropped when their loop closes)."""
        io = self._loops.pop(asyncio.get_running_loop(), None)
        if io is not None:
            await io.client.aclose()

    # -- the JWKS cache ------------------------------------------------------------------------

    def _known_key(self, kid: str) -> Ed25519PublicKey | None:
        """The cached key for `kid`, unless the whole cache is due for its periodic refresh."""
        if self._keys is None or self._clock() >= self._refresh_at:
            return None
        return self._keys.get(kid)

    def _needs_refresh(self, kid: str) -> bool:
        now = self._clock()
        if self._keys is None or now >= self._refresh_at:
            return True
        return kid not in self._keys and now - self._last_fetch >= UNKNOWN_KID_REFETCH_S

    def _refresh(self, started: float, outcome: httpx.Response | VerificationUnavailable) -> None:
        """Installs a fetched JWKS; `outcome` is the response, or why there is none."""
        self._last_fetch = started
        try:
            if isinstance(outcome, VerificationUnavailable):
                raise outcome
            keys = _parse_jwks(outcome)
        except VerificationUnavailable as err:
            if self._keys is None:
                raise
            # Keys change rarely: the stale set is better than refusing every call meanwhile.
            log.warning("keeping the cached JWKS: %s", err)
            self._refresh_at = started + UNKNOWN_KID_REFETCH_S
            return
        self._keys = keys
        self._refresh_at = started + JWKS_TTL_S

    # -- HTTP ----------------------------------------------------------------------------------

    def _fetch_jwks(self) -> httpx.Response | VerificationUnavailable:
        try:
            return _get(lambda: self._sync_client().get(self.jwks_url), self.jwks_url)
        except VerificationUnavailable as err:
            return err

    async def _afetch_jwks(self, io: _LoopIO) -> httpx.Response | VerificationUnavailable:
        try:
            return await _aget(io.client.get(self.jwks_url), self.jwks_url)
        except VerificationUnavailable as err:
            return err

    def _revocation_url(self, jti: str) -> str:
        return f"{self._origin}/v1/revocations/{jti}"

    def _sync_client(self) -> httpx.Client:
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = httpx.Client(timeout=self._timeout, transport=self._transport)
                client = self._client
        return client

    def _loop_io(self) -> _LoopIO:
        loop = asyncio.get_running_loop()
        io = self._loops.get(loop)
        if io is None:
            # A closed loop's client cannot be closed any more; forget it.
            for closed in [lp for lp in self._loops if lp.is_closed()]:
                del self._loops[closed]
            client = httpx.AsyncClient(timeout=self._timeout, transport=self._async_transport)
            io = self._loops[loop] = _LoopIO(client, asyncio.Lock())
        return io


# -- module-level API --------------------------------------------------------------------------

_verifiers: dict[str, TokenVerifier] = {}
_verifiers_lock = threading.Lock()


def verifier_for(jwks_url: str | None = None) -> TokenVerifier:
    """The process-wide verifier for `jwks_url` (default: $CORRAL_JWKS_URL), so every call
    shares one JWKS cache and one connection pool."""
    url = jwks_url or os.environ.get(JWKS_URL_ENV)
    if not url:
        raise ValueError(
            f"no JWKS URL: pass jwks_url or set {JWKS_URL_ENV} to the executor's "
            "http://HOST:PORT/.well-known/jwks.json"
        )
    with _verifiers_lock:
        verifier = _verifiers.get(url)
        if verifier is None:
            verifier = _verifiers[url] = TokenVerifier(url)
        return verifier


def verify_invocation_token(token: str, *, audience: str, jwks_url: str | None = None,
                            check_revocation: bool = True, leeway_s: float = 5) -> InvocationClaims:
    """Verifies `token` for the tool named `audience`. Blocking: use averify_invocation_token
    inside an event loop."""
    verifier = verifier_for(jwks_url)
    return verifier.verify(token, audience=audience, check_revocation=check_revocation,
                           leeway_s=leeway_s)


async def averify_invocation_token(
    token: str, *, audience: str, jwks_url: str | None = None, check_revocation: bool = True,
    leeway_s: float = 5,
) -> InvocationClaims:
    """verify_invocation_token() for event loops."""
    return await verifier_for(jwks_url).averify(
        token, audience=audience, check_revocation=check_revocation, leeway_s=leeway_s
    )


# -- token checks ------------------------------------------------------------------------------


def _check_audience(audience: object) -> None:
    # PyJWT would take a list as "any of these", so one tool could accept another's token.
    if not isinstance(audience, str) or not audience:
        raise ValueError(
            f"audience must be this tool's own name (one non-empty string), not {audience!r}"
        )


def _unverified_kid(token: str) -> str:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as err:
        raise InvalidInvocationToken("malformed", str(err)) from err
    alg = header.get("alg")
    if alg != "EdDSA":
        raise InvalidInvocationToken("malformed", f"algorithm {alg!r} is not EdDSA")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidInvocationToken("malformed", "the header names no key (kid)")
    return kid


def _require_key(key: Ed25519PublicKey | None, kid: str) -> Ed25519PublicKey:
    if key is None:
        raise InvalidInvocationToken("unknown key", f"kid {kid!r} is not in the executor's JWKS")
    return key


def _decode(
    token: str, key: Ed25519PublicKey, audience: str, leeway_s: float, issuer: str | None
) -> InvocationClaims:
    try:
        payload = jwt.decode(
            token,
            key,
            algorithms=["EdDSA"],
            audience=audience,
            issuer=issuer,
            leeway=leeway_s,
            options={"require": list(REQUIRED_CLAIMS), "verify_iss": issuer is not None},
        )
    except jwt.InvalidSignatureError as err:
        raise InvalidInvocationToken("bad signature") from err
    except jwt.ExpiredSignatureError as err:
        raise InvalidInvocationToken("expired") from err
    except jwt.ImmatureSignatureError as err:
        raise InvalidInvocationToken("not yet valid", str(err)) from err
    except jwt.InvalidAudienceError as err:
        raise InvalidInvocationToken("wrong audience", f"{audience!r} is not allowed") from err
    except jwt.InvalidIssuerError as err:
        raise InvalidInvocationToken("wrong issuer", str(err)) from err
    except jwt.InvalidTokenError as err:
        raise InvalidInvocationToken("malformed", str(err)) from err
    return _claims(payload)


def _claims(payload: Mapping[str, Any]) -> InvocationClaims:
    values = {name: payload.get(name) for name in _CUSTOM_CLAIMS}
    missing = [name for name, value in values.items() if not isinstance(value, str)]
    if missing:
        raise InvalidInvocationToken("malformed", f"missing claims: {', '.join(missing)}")
    aud = payload["aud"]
    return InvocationClaims(
        version=str(payload["sub"]),
        session=str(values["session"]),
        invocation_id=str(values["invocation_id"]),
        tenant=str(values["tenant"]),
        user=str(values["user"]),
        audience=(aud,) if isinstance(aud, str) else tuple(aud),
        expires_at=float(payload["exp"]),
        jti=str(payload["jti"]),
    )


def _parse_jwks(response: httpx.Response) -> dict[str, Ed25519PublicKey]:
    if response.status_code != 200:
        raise VerificationUnavailable(f"GET {response.url} answered {response.status_code}")
    try:
        entries = response.json()["keys"]
        keys = {}
        for jwk in entries:
            if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and "kid" in jwk:
                keys[str(jwk["kid"])] = Ed25519PublicKey.from_public_bytes(_b64url(jwk["x"]))
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as err:
        raise VerificationUnavailable(f"GET {response.url} gave no valid JWKS: {err}") from err
    return keys


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _get(fetch: Callable[[], httpx.Response], url: str) -> httpx.Response:
    try:
        return fetch()
    except httpx.HTTPError as err:
        raise VerificationUnavailable(f"GET {url}: {err!r}") from err


async def _aget(request: Awaitable[httpx.Response], url: str) -> httpx.Response:
    try:
        response = await request
    except httpx.HTTPError as err:
        raise VerificationUnavailable(f"GET {url}: {err!r}") from err
    return response


def _raise_if_revoked(jti: str, response: httpx.Response) -> None:
    if response.status_code != 200:
        raise VerificationUnavailable(
            f"revocation check for {jti} answered {response.status_code}: {response.text[:200]}"
        )
    try:
        revoked = response.json()["revoked"]
    except (ValueError, KeyError, TypeError) as err:
        raise VerificationUnavailable(f"revocation check for {jti} gave no answer") from err
    if revoked is not False:
        raise InvalidInvocationToken("revoked", f"token {jti} was revoked")
