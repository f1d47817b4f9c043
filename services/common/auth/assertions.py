"""The end user's principal on internal hops: a short JWT the service that verified the user's
credential signs with its own service key, carrying its certificate (`x5c`). Every later hop
checks the certificate against the service CA and the signature against the certificate, and
honours an assertion only on a connection whose peer proved a service identity (mutual TLS), so a
user cannot forge one and one service's signature cannot pass for another's."""

from __future__ import annotations

import base64
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.auth.pki import PkiError, ServiceIdentity, common_name, issued_by
from services.common.auth.principal import CredentialKind, Principal, Role, check_name
from services.common.errors import InvalidArgument, Unauthenticated
from services.common.settings import SERVICES

ASSERTION_KEY = "x-corral-principal"
AUDIENCE = "corral-internal"
# Long enough for the longest invocation's last hop; an assertion is honoured only from a peer
# that proved a service identity, so its lifetime is not what keeps it from being replayed.
LIFETIME_S = 3600
# A principal's assertion is signed once and reused for this long.
RESIGN_AFTER_S = 300
_CACHE_SIZE = 10_000


def _claims(principal: Principal) -> dict[str, object]:
    return {
        "tenant": principal.tenant, "sub": principal.subject,
        "roles": sorted(role.label for role in principal.roles),
        "kind": principal.kind.value, "cred": principal.credential,
        "padm": principal.platform_admin,
    }


class AssertionSigner:
    """Signs the principals this service verified; one signature per principal per few minutes."""

    def __init__(self, identity: ServiceIdentity, clock: Callable[[], float] = time.time) -> None:
        self._identity = identity
        self._clock = clock
        cert_der = identity.certificate.public_bytes(serialization.Encoding.DER)
        self._header = {"x5c": [base64.b64encode(cert_der).decode()]}
        self._signed: OrderedDict[Principal, tuple[str, float]] = OrderedDict()

    def sign(self, principal: Principal) -> str:
        now = self._clock()
        cached = self._signed.get(principal)
        if cached is not None and now - cached[1] < RESIGN_AFTER_S:
            return cached[0]
        claims = {**_claims(principal), "iss": self._identity.service, "aud": AUDIENCE,
                  "iat": int(now), "exp": int(now) + LIFETIME_S}
        token = jwt.encode(claims, self._identity.private_key, algorithm="ES256", headers=self._header)
        self._signed[principal] = (token, now)
        self._signed.move_to_end(principal)
        while len(self._signed) > _CACHE_SIZE:
            self._signed.popitem(last=False)
        return token


class AssertionVerifier:
    """Checks assertions against the service CA; verified ones are remembered until they end."""

    def __init__(self, ca: x509.Certificate, clock: Callable[[], float] = time.time) -> None:
        self._ca = ca
        self._clock = clock
        self._signers: dict[bytes, tuple[str, object]] = {}
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def verify(self, token: str) -> Principal:
        now = self._clock()
        cached = self._verified.get(token)
        if cached is not None and now < cached[1]:
            return cached[0]
        try:
            header = jwt.get_unverified_header(token)
            chain = header.get("x5c")
            if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
                raise Unauthenticated("the principal assertion carries no signer certificate")
            signer, key = self._signer(base64.b64decode(chain[0]))
            claims = jwt.decode(
                token, key, algorithms=["ES256"], audience=AUDIENCE, issuer=signer,  # type: ignore[arg-type]
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
            principal = Principal(
                tenant=check_name(str(claims["tenant"]), "tenant"),
                subject=check_name(str(claims["sub"]), "subject"),
                roles=frozenset(Role.parse(str(r)) for r in claims.get("roles", [])),
                kind=CredentialKind(str(claims.get("kind", ""))),
                credential=str(claims.get("cred", "")),
                platform_admin=bool(claims.get("padm", False)),
            )
        except (jwt.PyJWTError, ValueError, KeyError, InvalidArgument) as exc:
            raise Unauthenticated(f"the principal assertion is not valid: {exc}") from None
        self._verified[token] = (principal, float(claims["exp"]))
        while len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    def _signer(self, der: bytes) -> tuple[str, object]:
        """The service a certificate names, and its public key, once checked against the CA."""
        digest = hashlib.sha256(der).digest()
        known = self._signers.get(digest)
        if known is not None:
            return known
        try:
            cert = x509.load_der_x509_certificate(der)
            issued_by(cert, self._ca)
        except (ValueError, PkiError) as exc:
            raise Unauthenticated(f"the principal assertion's signer is not a Corral service: {exc}") from None
        service = common_name(cert)
        if service not in SERVICES:
            raise Unauthenticated(f"the principal assertion's signer {service!r} is not a Corral service")
        self._signers[digest] = (service, cert.public_key())
        return self._signers[digest]
