"""A local identity provider for the tests: RSA key pairs, a JWKS served over HTTP on loopback (a
thread), and tokens minted as a real provider would, or broken in the ways a verifier must refuse.

    with LocalIssuer() as idp:
        env["CORRAL_OIDC_ISSUERS"] = json.dumps([idp.config()])
        token = idp.mint("acme", "alice", roles=("operator",))

FakeJwksSource answers a verifier from issuers made with `serve=False`, for tests that open no
socket."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.common.auth.jwks import SigningKey, jwks_unavailable, parse_jwks

_HMAC = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_names = itertools.count(1)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class LocalIssuer:
    """An identity provider on 127.0.0.1 (an ephemeral port): its JWKS at `.jwks_url`, counted in
    `jwks_requests`; while `available` is False it answers 503. With `serve=False` nothing
    listens (its URLs are https://….test) and only FakeJwksSource can read its keys."""

    def __init__(self, *, serve: bool = True, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # Published keys by kid, oldest first: the last one signs.
        self._keys: dict[str, rsa.RSAPrivateKey] = {}
        self._foreign = _new_key()
        self._unpublished = (f"unpublished-{secrets.token_hex(4)}", _new_key())
        self.jwks_requests = 0
        self.available = True
        self.rotate()
        self._server: ThreadingHTTPServer | None = None
        if serve:
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
            self._server.daemon_threads = True
            threading.Thread(
                target=self._server.serve_forever, name="local-issuer", daemon=True
            ).start()
            self._url = f"http://127.0.0.1:{self._server.server_address[1]}"
        else:
            self._url = f"https://issuer-{next(_names)}.test"

    @property
    def issuer(self) -> str:
        return self._url

    @property
    def jwks_url(self) -> str:
        return f"{self._url}/jwks.json"

    @property
    def current_kid(self) -> str:
        return next(reversed(self._keys))

    def config(self, audience: str = "corral", **overrides: Any) -> dict[str, Any]:
        """This issuer as one entry of CORRAL_OIDC_ISSUERS."""
        return {"issuer": self.issuer, "audience": audience, "jwks_url": self.jwks_url,
                **overrides}

    def jwks(self) -> dict[str, Any]:
        """The JWKS document it publishes."""
        keys = []
        for kid, key in list(self._keys.items()):
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": keys}

    def rotate(self) -> str:
        """A new current key; the old ones stay published. Returns the new kid."""
        kid = f"key-{len(self._keys) + 1}-{secrets.token_hex(4)}"
        self._keys[kid] = _new_key()
        return kid

    def mint(
        self,
        tenant: str,
        subject: str,
        roles: Sequence[str] = (),
        audience: str = "corral",
        *,
        expires_in: float = 3600,
        not_before: float | None = None,
        issuer: str | None = None,
        key: str = "current",
        claims: Mapping[str, Any] | None = None,
        algorithm: str = "RS256",
    ) -> str:
        """A token for `subject` in `tenant`. `not_before` is seconds from now (an absolute Unix
        time when above 10⁹); `claims` adds or replaces claims, None removing one. `key`:
        "current", a published kid, "foreign" (another key under the current kid: a bad
        signature) or "unknown" (a key whose kid is not published). `algorithm` "none" leaves the
        token unsigned; HS256/384/512 sign with the public key as the HMAC secret (the
        algorithm-confusion attack); others sign with the RSA key."""
        now = self._clock()
        payload: dict[str, Any] = {
            "iss": issuer or self.issuer, "sub": subject, "aud": audience, "tenant": tenant,
            "roles": list(roles), "iat": int(now), "exp": int(now + expires_in),
        }
        if not_before is not None:
            payload["nbf"] = int(not_before if not_before > 1e9 else now + not_before)
        for name, value in (claims or {}).items():
            if value is None:
                payload.pop(name, None)
            else:
                payload[name] = value
        kid, signer = self._signer(key)
        return _sign(payload, kid, signer, algorithm)

    def _signer(self, key: str) -> tuple[str, rsa.RSAPrivateKey]:
        if key == "current":
            return self.current_kid, self._keys[self.current_kid]
        if key == "foreign":
            return self.current_kid, self._foreign
        if key == "unknown":
            return self._unpublished
        if key in self._keys:
            return key, self._keys[key]
        raise ValueError(f"key {key!r}: use current, foreign, unknown or a published kid")

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def _sign(payload: dict[str, Any], kid: str, key: rsa.RSAPrivateKey, algorithm: str) -> str:
    if algorithm != "none" and algorithm not in _HMAC:
        return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid})
    header = {"alg": algorithm, "typ": "JWT", "kid": kid}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, payload)
    )
    if algorithm == "none":
        return f"{signing_input}."
    # PyJWT refuses an RSA key as an HMAC secret; an attacker's own code would not.
    secret = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mac = hmac.new(secret, signing_input.encode(), _HMAC[algorithm]).digest()
    return f"{signing_input}.{_b64url(mac)}"


def _handler(issuer: LocalIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not issuer.available:
                self._answer(503, {"error": "temporarily unavailable"})
            elif self.path == "/jwks.json":
                issuer.jwks_requests += 1
                self._answer(200, issuer.jwks())
            elif self.path == "/.well-known/openid-configuration":
                self._answer(200, {"issuer": issuer.issuer, "jwks_uri": issuer.jwks_url})
            else:
                self._answer(404, {"error": f"no {self.path}"})

        def _answer(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


class FakeJwksSource:
    """A JwksSource answering from LocalIssuers' current JWKS without HTTP or caching. `fetches`
    records each call as (url, refresh); while `available` is False every call fails as an
    unreachable provider does."""

    def __init__(self, *issuers: LocalIssuer) -> None:
        self._issuers = {issuer.jwks_url: issuer for issuer in issuers}
        self.fetches: list[tuple[str, bool]] = []
        self.available = True

    async def keys(self, url: str, *, refresh: bool) -> Mapping[str, SigningKey]:
        self.fetches.append((url, refresh))
        issuer = self._issuers.get(url)
        if not self.available or issuer is None:
            raise jwks_unavailable(url, "connection refused")
        return parse_jwks(issuer.jwks(), url)
