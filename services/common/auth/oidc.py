"""Bearer tokens from the user's identity provider (OIDC access or ID tokens, any JWT issuer with a
JWKS): which issuers are trusted (CORRAL_OIDC_ISSUERS), and the verifier that turns a token of
one of them into a Principal, or refuses it saying why."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from services.common.auth.jwks import HttpJwksSource, JwksSource, PublicKey, SigningKey
from services.common.auth.principal import (
    CredentialKind,
    Principal,
    Role,
    check_name,
    check_subject,
    roles_from,
)
from services.common.errors import InvalidArgument, Unauthenticated

SETTING = "CORRAL_OIDC_ISSUERS"
# Public-key algorithms only: a shared-secret (HS*) token can be minted by anyone holding the
# secret, and "none" by anyone at all.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA")
MAX_LEEWAY_S = 300.0
MAX_TOKEN_CHARS = 16 * 1024
_LOOPBACK = ("localhost", "127.0.0.1", "::1")
_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_ROLE_SEPARATORS = re.compile(r"[\s,]+")


class IssuerConfigError(ValueError):
    """An entry of CORRAL_OIDC_ISSUERS is wrong; the message names the entry and the field."""

    def __init__(self, field: str, description: str, index: int | None = None) -> None:
        self.field, self.description, self.index = field, description, index
        where = SETTING if index is None else f"{SETTING}[{index}]"
        super().__init__(f"{where}{'.' + field if field else ''}: {description}")


@dataclass(frozen=True)
class OidcIssuer:
    """An identity provider whose tokens are accepted, and how its claims name a principal."""

    # The exact `iss` of its tokens (Auth0's ends with a slash, Keycloak's with /realms/NAME).
    issuer: str
    # The `aud` its tokens must carry for Corral (one of them, when `aud` is a list).
    audience: str
    jwks_url: str
    # The signature algorithms accepted; a token announcing another one is refused.
    algorithms: tuple[str, ...] = ("RS256",)
    # Claim names; a dotted path (realm_access.roles) reaches into nested objects.
    tenant_claim: str = "tenant"
    subject_claim: str = "sub"
    roles_claim: str = "roles"
    # Every principal of this issuer is in this tenant (tenant_claim is then ignored).
    tenant: str | None = None
    # Clock skew tolerated on exp and nbf.
    leeway_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("issuer", "audience", "tenant_claim", "subject_claim", "roles_claim"):
            value = getattr(self, name)
            if not value or value != value.strip():
                raise IssuerConfigError(name, "must be a non-empty string without spaces around it")
        _check_jwks_url(self.jwks_url)
        if not self.algorithms:
            raise IssuerConfigError("algorithms", f"name at least one of {', '.join(ALGORITHMS)}")
        for alg in self.algorithms:
            _check_algorithm(alg)
        if self.tenant is not None:
            try:
                check_name(self.tenant, "tenant")
            except InvalidArgument as exc:
                raise IssuerConfigError("tenant", exc.violations[0].description) from None
        if not 0 <= self.leeway_s <= MAX_LEEWAY_S:
            raise IssuerConfigError("leeway_s", f"must be between 0 and {MAX_LEEWAY_S:g} seconds")


def _check_jwks_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise IssuerConfigError("jwks_url", f"{url!r} is not an http(s) URL with a host")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        # Keys fetched in the clear could be swapped by anyone on the path.
        raise IssuerConfigError("jwks_url", f"{url!r} must use https (http only on loopback)")


def _check_algorithm(alg: object) -> None:
    if not isinstance(alg, str) or alg.lower() == "none":
        raise IssuerConfigError(
            "algorithms", f"{alg!r} is refused: unsigned tokens can be forged by anyone"
        )
    if alg.upper().startswith("HS"):
        raise IssuerConfigError(
            "algorithms",
            f"{alg} is refused: it signs with a shared secret, so whoever verifies could also "
            "mint tokens; configure the provider to sign with RS256 (or another public-key "
            "algorithm) and publish a JWKS",
        )
    if alg not in ALGORITHMS:
        raise IssuerConfigError("algorithms", f"{alg!r} is not one of {', '.join(ALGORITHMS)}")


_FIELDS = {
    "issuer": str, "audience": str, "jwks_url": str, "algorithms": list, "tenant_claim": str,
    "subject_claim": str, "roles_claim": str, "tenant": str, "leeway_s": float,
}
_REQUIRED = ("issuer", "audience", "jwks_url")


def parse_issuers(text: str) -> tuple[OidcIssuer, ...]:
    """The issuers of CORRAL_OIDC_ISSUERS: a JSON list of objects with the fields of OidcIssuer
    (issuer, audience and jwks_url required). Empty text → no issuer."""
    if not text.strip():
        return ()
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise IssuerConfigError("", f"is not JSON ({exc})") from None
    if not isinstance(entries, list):
        raise IssuerConfigError(
            "", 'must be a JSON list of issuers: [{"issuer": ..., "audience": ..., '
            '"jwks_url": ...}]'
        )
    issuers: list[OidcIssuer] = []
    for index, entry in enumerate(entries):
        try:
            issuer = _issuer_entry(entry)
        except IssuerConfigError as exc:
            raise IssuerConfigError(exc.field, exc.description, index) from None
        for earlier, other in enumerate(issuers):
            if other.issuer == issuer.issuer:
                raise IssuerConfigError(
                    "issuer", f"{issuer.issuer!r} is configured twice (also entry {earlier})", index
                )
        issuers.append(issuer)
    return tuple(issuers)


def _issuer_entry(entry: object) -> OidcIssuer:
    if not isinstance(entry, dict):
        raise IssuerConfigError("", "must be an object with issuer, audience and jwks_url")
    for name in entry:
        if name not in _FIELDS:
            raise IssuerConfigError(name, f"is not a field (the fields: {', '.join(_FIELDS)})")
    for name in _REQUIRED:
        if name not in entry:
            raise IssuerConfigError(name, "is required")
    values: dict[str, Any] = {}
    for name, value in entry.items():
        kind = _FIELDS[name]
        if name == "tenant" and value is None:
            continue
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value
            ):
                raise IssuerConfigError(name, f"{value!r} is not a number of seconds")
            value = float(value)
        elif kind is list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise IssuerConfigError(name, f'{value!r} is not a list like ["RS256"]')
            value = tuple(value)
        elif not isinstance(value, str):
            raise IssuerConfigError(name, f"{value!r} is not a string")
        values[name] = value
    return OidcIssuer(**values)


def looks_like_jwt(credential: str) -> bool:
    """Whether the credential has a JWT's shape (three base64url parts; the signature may be
    empty, so that an unsigned token is refused as such rather than as an unknown credential)."""
    return len(credential) <= MAX_TOKEN_CHARS and _JWT.match(credential) is not None


def _refused(reason: str, message: str) -> Unauthenticated:
    return Unauthenticated(message, reason=reason)


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _TokenCache:
    """Principals of verified tokens by the token's SHA-256, least recently used evicted first,
    each dropped at its token's expiry."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()

    def get(self, digest: bytes, now: float) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if now >= entry[1]:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return entry[0]

    def put(self, digest: bytes, principal: Principal, expires_at: float) -> None:
        if self._size <= 0:
            return
        self._entries[digest] = (principal, expires_at)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class OidcVerifier:
    """A CredentialVerifier for JWTs of the configured issuers: the issuer by exact `iss`, the
    algorithm pinned per issuer, the signature against its JWKS, audience, expiry and not-before
    (with the issuer's leeway), then tenant, subject and roles from its claims."""

    def __init__(
        self,
        issuers: Sequence[OidcIssuer],
        *,
        source: JwksSource | None = None,
        clock: Callable[[], float] = time.time,
        token_cache_size: int = 1024,
    ) -> None:
        self._issuers = {issuer.issuer: issuer for issuer in issuers}
        # A source of our own (not one passed in) is ours to close.
        self._http: HttpJwksSource | None = None
        if source is None:
            source = self._http = HttpJwksSource()
        self._source = source
        self._clock = clock
        self._cache = _TokenCache(token_cache_size)

    async def verify(self, credential: str) -> Principal:
        if not looks_like_jwt(credential):
            raise _refused(
                "MALFORMED_TOKEN",
                "the bearer credential is not a JWT (three base64url parts separated by dots)",
            )
        digest = hashlib.sha256(credential.encode()).digest()
        cached = self._cache.get(digest, self._clock())
        if cached is not None:
            return cached
        header, unverified = _unverified(credential)
        issuer = self._issuer(unverified)
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            raise _refused(
                "ALGORITHM_NOT_ALLOWED",
                f"the token is signed with {alg!r}, but tokens of {issuer.issuer} must use "
                f"{' or '.join(issuer.algorithms)}",
            )
        key = await self._key(issuer, header.get("kid"))
        claims = _decode(credential, key, str(alg), issuer, unverified)
        expires_at = _check_times(claims, issuer, self._clock())
        principal = _principal(claims, issuer)
        self._cache.put(digest, principal, expires_at)
        return principal

    def _issuer(self, unverified: Mapping[str, Any]) -> OidcIssuer:
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss:
            raise _refused("UNKNOWN_ISSUER", "the token names no issuer (its iss claim)")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise _refused(
                "UNKNOWN_ISSUER",
                f"the token's issuer {iss[:200]!r} is not an identity provider this platform "
                f"trusts: use a token from a configured one, or ask the operator to add it to "
                f"{SETTING}",
            )
        return issuer

    async def _key(self, issuer: OidcIssuer, kid: object) -> SigningKey:
        if kid is not None and (not isinstance(kid, str) or not kid):
            raise _refused("MALFORMED_TOKEN", "the token's key id (kid) is not a string")
        key = _pick(await self._source.keys(issuer.jwks_url, refresh=False), kid)
        if key is None:
            # The provider may have rotated to a key published after our last fetch.
            key = _pick(await self._source.keys(issuer.jwks_url, refresh=True), kid)
        if key is None:
            named = f"key id {kid!r}" if kid else "no key id (kid), and there are several keys"
            raise _refused(
                "UNKNOWN_KEY",
                f"the token names {named} not among the keys {issuer.issuer} publishes at "
                f"{issuer.jwks_url}: get a new token from the provider",
            )
        return key

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims before any check: only to choose the issuer and key."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise _refused("MALFORMED_TOKEN", f"the token cannot be read: {exc}") from None
    return header, claims


def _pick(keys: Mapping[str, SigningKey], kid: str | None) -> SigningKey | None:
    if kid:
        return keys.get(kid)
    return next(iter(keys.values())) if len(keys) == 1 else None


# The key type each family of algorithms verifies with (by the first two letters of its name).
_KEY_TYPES: dict[str, tuple[type[PublicKey], ...]] = {
    "RS": (RSAPublicKey,), "PS": (RSAPublicKey,), "ES": (EllipticCurvePublicKey,),
    "Ed": (Ed25519PublicKey, Ed448PublicKey),
}


def _decode(
    token: str, key: SigningKey, alg: str, issuer: OidcIssuer, unverified: Mapping[str, Any]
) -> dict[str, Any]:
    """The claims once signature, issuer and audience hold (times are checked on our clock)."""
    if not isinstance(key.key, _KEY_TYPES.get(alg[:2], ())) or key.algorithm not in (None, alg):
        raise _refused(
            "BAD_SIGNATURE",
            f"key {key.kid!r} of {issuer.issuer} cannot verify an {alg} signature",
        )
    try:
        return jwt.decode(
            token, key.key, algorithms=[alg], audience=issuer.audience, issuer=issuer.issuer,
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                     "require": ["exp"]},
        )
    except jwt.InvalidSignatureError:
        raise _refused(
            "BAD_SIGNATURE",
            f"the token's signature does not match key {key.kid!r} of {issuer.issuer}: it was "
            "altered, or signed by someone else",
        ) from None
    except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as exc:
        if isinstance(exc, jwt.MissingRequiredClaimError) and exc.claim != "aud":
            raise _refused(
                "MALFORMED_TOKEN", f"the token has no {exc.claim} claim; Corral needs it"
            ) from None
        raise _refused(
            "WRONG_AUDIENCE",
            f"the token is for audience {unverified.get('aud')!r}, not {issuer.audience!r}: ask "
            f"the identity provider for a token whose audience is {issuer.audience!r}",
        ) from None
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise _refused("MALFORMED_TOKEN", f"the token cannot be verified: {exc}") from None


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refused("MALFORMED_TOKEN", f"the token's {name} claim is not a time in seconds")
    return float(value)


def _check_times(claims: Mapping[str, Any], issuer: OidcIssuer, now: float) -> float:
    """The token's expiry, once it is neither expired nor not yet valid."""
    expires_at = _number(claims, "exp")
    assert expires_at is not None  # required by _decode
    if now > expires_at + issuer.leeway_s:
        raise _refused(
            "TOKEN_EXPIRED",
            f"the token expired at {_when(expires_at)}: get a new one from {issuer.issuer}",
        )
    not_before = _number(claims, "nbf")
    if not_before is not None and now + issuer.leeway_s < not_before:
        raise _refused(
            "TOKEN_NOT_YET_VALID",
            f"the token is not valid before {_when(not_before)}: wait, or check this machine's "
            "clock against the identity provider's",
        )
    return expires_at


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """The claim `name`, or the nested one its dotted path reaches (realm_access.roles); a name
    that is itself a claim wins (Auth0's namespaced claims are URLs with dots)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _principal(claims: Mapping[str, Any], issuer: OidcIssuer) -> Principal:
    tenant = issuer.tenant or _named(claims, issuer.tenant_claim, "tenant", issuer, check_name)
    subject = _named(claims, issuer.subject_claim, "subject", issuer, check_subject)
    return Principal(
        tenant=tenant, subject=subject, roles=_roles(claims, issuer), kind=CredentialKind.JWT,
        credential=issuer.issuer,
    )


def _named(
    claims: Mapping[str, Any], claim: str, what: str, issuer: OidcIssuer,
    check: Callable[[str, str], str],
) -> str:
    value = _claim(claims, claim)
    if not isinstance(value, str) or not value:
        raise _refused(
            "MISSING_CLAIM",
            f"the token carries no {what} (claim {claim!r}): configure {issuer.issuer} to add "
            f"it, or set {what}_claim for this issuer in {SETTING}",
        )
    try:
        return check(value, what)
    except InvalidArgument as exc:
        raise _refused(
            "INVALID_CLAIM", f"claim {claim!r}: {exc.violations[0].description}"
        ) from None


def _roles(claims: Mapping[str, Any], issuer: OidcIssuer) -> frozenset[Role]:
    """The Corral roles named by the roles claim (a list, or a string separated by spaces or
    commas); other roles the provider grants are none of Corral's business."""
    value = _claim(claims, issuer.roles_claim)
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = _ROLE_SEPARATORS.split(value)
    if not isinstance(value, list):
        raise _refused(
            "INVALID_CLAIM",
            f"claim {issuer.roles_claim!r} must be a list of roles or a string of them",
        )
    known = [v for v in value if isinstance(v, str) and v.strip().upper() in Role.__members__]
    return roles_from(known, issuer.roles_claim)
