"""Invocation credentials without sockets: the keyring on disk (persistence, rotation, retention),
the claims and JWKS the issuer produces, and the tool-side verifier over httpx's MockTransport."""

from __future__ import annotations

import base64
import json
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from corral.verify import (
    JWKS_TTL_S,
    UNKNOWN_KID_REFETCH_S,
    InvalidInvocationToken,
    TokenVerifier,
    VerificationUnavailable,
)
from services.executor.credentials import Credential, CredentialIssuer
from services.executor.keys import KeyRing, jwk_thumbprint
from services.executor.store import RedisRevocations
from tests.fakes.common import EpochClock
from tests.fakes.executor import FakeRedis, mint, tamper

pytestmark = pytest.mark.timeout(30)

TOOL = "search"
JWKS_URL = "http://executor.test/.well-known/jwks.json"


class Executor:
    """The executor's HTTP routes served from an issuer and a FakeRedis, counting JWKS fetches."""

    def __init__(self, issuer: CredentialIssuer, redis: FakeRedis, prefix: str) -> None:
        self.issuer, self.redis, self.prefix = issuer, redis, prefix
        self.jwks_fetches = 0
        self.down = False

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/.well-known/jwks.json":
            self.jwks_fetches += 1
            return httpx.Response(200, json=self.issuer.keyring.jwks())
        jti = request.url.path.rsplit("/", 1)[-1]
        revoked = f"{self.prefix}revoked:{jti}" in self.redis.ttl
        return httpx.Response(200, json={"jti": jti, "revoked": revoked})

    def verifier(self, clock: EpochClock | None = None) -> TokenVerifier:
        transport = httpx.MockTransport(self.handle)
        return TokenVerifier(
            JWKS_URL,
            transport=transport,
            async_transport=transport,
            clock=clock or time.monotonic,
        )


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def redis() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def issuer(keys_dir: Path, redis: FakeRedis) -> CredentialIssuer:
    keyring = KeyRing(keys_dir, rotation_s=3600, retain_s=900)
    return CredentialIssuer(keyring, RedisRevocations(redis, "t:"), "executor-1")  # type: ignore[arg-type]


@pytest.fixture
def executor(issuer: CredentialIssuer, redis: FakeRedis) -> Iterator[Executor]:
    yield Executor(issuer, redis, "t:")


@pytest.fixture
def clock() -> EpochClock:
    """A verifier's clock (monotonic seconds, as it reads them), moved by the test."""
    return EpochClock(1000.0)


def key_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.pem"))


# -- keyring -----------------------------------------------------------------------------------


def test_kid_is_the_rfc7638_thumbprint() -> None:
    # RFC 8037, appendix A.2 and A.3.
    x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "="))
    assert jwk_thumbprint(key) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_keys_survive_a_restart_with_private_permissions(keys_dir: Path) -> None:
    first = KeyRing(keys_dir, rotation_s=3600, retain_s=900)
    (keys_dir / ".123-abc.pem.1a2b3c4d.tmp").write_bytes(b"half a key")  # a crash mid-write
    again = KeyRing(keys_dir, rotation_s=3600, retain_s=900)
    assert again.signing_key().kid == first.signing_key().kid
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    [path] = list(keys_dir.iterdir())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()


def test_loose_permissions_are_tightened(keys_dir: Path) -> None:
    KeyRing(keys_dir, rotation_s=3600, retain_s=900)
    keys_dir.chmod(0o755)
    [path] = key_files(keys_dir)
    path.chmod(0o644)
    KeyRing(keys_dir, rotation_s=3600, retain_s=900)
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_file_whose_key_does_not_match_its_name_is_ignored(keys_dir: Path) -> None:
    ring = KeyRing(keys_dir, rotation_s=3600, retain_s=900)
    [path] = key_files(keys_dir)
    other = KeyRing(keys_dir.parent / "other", rotation_s=3600, retain_s=900)
    path.write_bytes(key_files(other.directory)[0].read_bytes())
    reloaded = KeyRing(keys_dir, rotation_s=3600, retain_s=900)
    assert ring.signing_key().kid not in {k["kid"] for k in reloaded.jwks()["keys"]}
    assert reloaded.signing_key().kid != other.signing_key().kid


def test_rotation_publishes_ahead_then_retires_then_deletes(keys_dir: Path) -> None:
    clock = EpochClock()
    t0 = clock.now
    ring = KeyRing(keys_dir, rotation_s=100, retain_s=50, publish_ahead_s=10, clock=clock)
    first = ring.signing_key()

    clock.now = t0 + 89
    assert not ring.maybe_rotate()
    assert len(ring.jwks()["keys"]) == 1

    clock.now = t0 + 90  # the successor is published, but does not sign yet
    assert ring.maybe_rotate()
    kids = [k["kid"] for k in ring.jwks()["keys"]]
    assert len(kids) == 2 and first.kid in kids
    assert ring.signing_key().kid == first.kid

    clock.now = t0 + 100  # it signs on time, even before the next maybe_rotate()
    second = ring.signing_key()
    assert second.kid != first.kid
    ring.maybe_rotate()
    retired = next(p for p in key_files(keys_dir) if first.kid in p.name)
    assert b"PRIVATE" not in retired.read_bytes()  # a retired key can no longer sign
    assert first.kid in [k["kid"] for k in ring.jwks()["keys"]]

    clock.now = t0 + 149
    ring.maybe_rotate()
    assert first.kid in [k["kid"] for k in ring.jwks()["keys"]]
    clock.now = t0 + 150  # retained for retain_s after retirement, then gone from disk too
    ring.maybe_rotate()
    assert first.kid not in [k["kid"] for k in ring.jwks()["keys"]]
    assert [p for p in key_files(keys_dir) if first.kid in p.name] == []


def test_rotation_state_survives_a_restart(keys_dir: Path) -> None:
    clock = EpochClock()
    t0 = clock.now
    ring = KeyRing(keys_dir, rotation_s=100, retain_s=50, publish_ahead_s=10, clock=clock)
    clock.now = t0 + 95
    ring.maybe_rotate()
    clock.now = t0 + 120
    ring.maybe_rotate()
    again = KeyRing(keys_dir, rotation_s=100, retain_s=50, publish_ahead_s=10, clock=clock)
    assert again.jwks() == ring.jwks()
    assert again.signing_key().kid == ring.signing_key().kid


def test_an_overdue_key_at_load_signs_until_its_successor_is_published(keys_dir: Path) -> None:
    clock = EpochClock()
    t0 = clock.now
    first = KeyRing(keys_dir, rotation_s=100, retain_s=50, publish_ahead_s=10, clock=clock)
    clock.now = t0 + 500  # the executor was down past the rotation
    ring = KeyRing(keys_dir, rotation_s=100, retain_s=50, publish_ahead_s=10, clock=clock)
    assert len(ring.jwks()["keys"]) == 2
    assert ring.signing_key().kid == first.signing_key().kid
    clock.now = t0 + 510
    assert ring.signing_key().kid != first.signing_key().kid


def test_without_publish_ahead_the_new_key_signs_when_made(keys_dir: Path) -> None:
    clock = EpochClock()
    ring = KeyRing(keys_dir, rotation_s=100, retain_s=50, publish_ahead_s=0, clock=clock)
    first = ring.signing_key().kid
    clock.now += 100
    ring.maybe_rotate()
    assert ring.signing_key().kid != first


# -- issuer ------------------------------------------------------------------------------------


def test_claims_and_header(issuer: CredentialIssuer) -> None:
    expires_at = time.time() + 60
    cred = mint(issuer, expires_at=expires_at)
    header = jwt.get_unverified_header(cred.token)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == issuer.keyring.signing_key().kid
    claims = jwt.decode(
        cred.token, issuer.keyring.signing_key().public, algorithms=["EdDSA"], audience=TOOL
    )
    assert claims == {
        "iss": "executor-1",
        "sub": "agents/x/versions/3",
        "aud": [TOOL, "calendar"],
        "exp": int(expires_at),
        "iat": claims["iat"],
        "nbf": claims["iat"],
        "jti": cred.jti,
        "session": "sessions/s1",
        "invocation_id": "inv-1",
        "tenant": "acme",
        "user": "alice",
    }
    assert abs(claims["iat"] - time.time()) < 5
    assert len(cred.jti) == 32 and uuid.UUID(hex=cred.jti).version == 4
    assert cred.expires_at == int(expires_at)


async def test_jwks_lists_public_keys_only(issuer: CredentialIssuer) -> None:
    jwks = await issuer.jwks()
    [jwk] = jwks["keys"]
    assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert jwk["kid"] == issuer.keyring.signing_key().kid
    assert len(base64.urlsafe_b64decode(jwk["x"] + "=")) == 32
    json.dumps(jwks)  # serialisable as is


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"expires_at": time.time() - 1}, "not in the future"),
        ({"expires_at": time.time() + 3600}, "at most the key retention"),
        ({"audience": []}, "audience"),
        ({"audience": TOOL}, "audience"),
    ],
)
def test_mint_refuses_credentials_it_could_not_honour(
    issuer: CredentialIssuer, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        mint(issuer, **overrides)


async def test_revocation_lives_as_long_as_the_token(issuer: CredentialIssuer, redis: FakeRedis) -> None:
    cred = mint(issuer, expires_at=time.time() + 120)
    assert not await issuer.is_revoked(cred.jti)
    await issuer.revoke(cred)
    assert await issuer.is_revoked(cred.jti)
    assert 118 <= redis.ttl[f"t:revoked:{cred.jti}"] <= 121
    late = Credential(token="", jti=uuid.uuid4().hex, expires_at=time.time() - 10)
    await issuer.revoke(late)
    assert redis.ttl[f"t:revoked:{late.jti}"] == 1


# -- verifier ----------------------------------------------------------------------------------


def reason(verifier: TokenVerifier, token: str, audience: str = TOOL) -> str:
    with pytest.raises(InvalidInvocationToken) as info:
        verifier.verify(token, audience=audience)
    return info.value.reason


def test_a_valid_token_verifies(issuer: CredentialIssuer, executor: Executor) -> None:
    cred = mint(issuer)
    claims = executor.verifier().verify(cred.token, audience=TOOL)
    assert (claims.version, claims.session, claims.invocation_id) == (
        "agents/x/versions/3",
        "sessions/s1",
        "inv-1",
    )
    assert (claims.tenant, claims.user, claims.jti) == ("acme", "alice", cred.jti)
    assert claims.audience == (TOOL, "calendar")


async def test_async_verify_checks_revocation(issuer: CredentialIssuer, executor: Executor) -> None:
    verifier = executor.verifier()
    cred = mint(issuer)
    assert (await verifier.averify(cred.token, audience=TOOL)).jti == cred.jti
    await issuer.revoke(cred)
    with pytest.raises(InvalidInvocationToken, match="revoked"):
        await verifier.averify(cred.token, audience=TOOL)
    assert (await verifier.averify(cred.token, audience=TOOL, check_revocation=False)).jti
    await verifier.aclose()


def test_tampered_claims_break_the_signature(issuer: CredentialIssuer, executor: Executor) -> None:
    token = mint(issuer).token
    verifier = executor.verifier()
    assert reason(verifier, tamper(token, invocation_id="inv-2")) == "bad signature"
    assert reason(verifier, tamper(token, aud=["shell"]), "shell") == "bad signature"
    assert reason(verifier, tamper(token, exp=int(time.time()) + 600)) == "bad signature"


def test_refusals_name_their_reason(issuer: CredentialIssuer, executor: Executor) -> None:
    verifier = executor.verifier()
    past = CredentialIssuer(
        issuer.keyring, RedisRevocations(FakeRedis(), "t:"), "x", clock=lambda: time.time() - 600  # type: ignore[arg-type]
    )
    assert reason(verifier, mint(past, expires_at=time.time() - 60).token) == "expired"
    assert reason(verifier, mint(issuer).token, audience="shell") == "wrong audience"
    assert reason(verifier, "not.a.token") == "malformed"
    key = issuer.keyring.signing_key()
    secret = "a shared secret an attacker might guess"
    hs256 = jwt.encode({"sub": "x"}, secret, algorithm="HS256", headers={"kid": key.kid})
    assert reason(verifier, hs256) == "malformed"
    unsigned = jwt.encode({"sub": "x"}, None, algorithm="none", headers={"kid": key.kid})
    assert reason(verifier, unsigned) == "malformed"
    no_jti = {"sub": "agents/x/versions/1", "aud": [TOOL], "exp": int(time.time()) + 60}
    assert key.private is not None
    bare = jwt.encode(no_jti, key.private, algorithm="EdDSA", headers={"kid": key.kid})
    assert reason(verifier, bare) == "malformed"


async def test_a_token_for_one_tool_is_refused_by_another(
    issuer: CredentialIssuer, executor: Executor
) -> None:
    verifier = executor.verifier()
    search = mint(issuer, audience=["search"])
    assert verifier.verify(search.token, audience="search").audience == ("search",)
    assert reason(verifier, search.token, audience="calendar") == "wrong audience"
    with pytest.raises(InvalidInvocationToken, match="wrong audience"):
        await verifier.averify(search.token, audience="calendar")
    # The older form, one token listing every declared tool, still verifies for each of them.
    both = mint(issuer, audience=["search", "calendar"])
    assert verifier.verify(both.token, audience="calendar").audience == ("search", "calendar")
    await verifier.aclose()


@pytest.mark.parametrize("audience", ["", ["search", "calendar"], ("search",), None])
async def test_the_audience_is_one_tool_name(
    issuer: CredentialIssuer, executor: Executor, audience: object
) -> None:
    verifier, token = executor.verifier(), mint(issuer, audience=["search"]).token
    with pytest.raises(ValueError, match="this tool's own name"):
        verifier.verify(token, audience=audience)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="this tool's own name"):
        await verifier.averify(token, audience=audience)  # type: ignore[arg-type]
    assert executor.jwks_fetches == 0, "refused before anything is fetched"


def test_forged_tokens_are_refused(issuer: CredentialIssuer, executor: Executor) -> None:
    verifier = executor.verifier()
    claims = jwt.decode(mint(issuer).token, options={"verify_signature": False})
    forger = Ed25519PrivateKey.generate()
    own_kid = jwk_thumbprint(forger.public_key())
    forged = jwt.encode(claims, forger, algorithm="EdDSA", headers={"kid": own_kid})
    assert reason(verifier, forged) == "unknown key"
    real_kid = issuer.keyring.signing_key().kid
    borrowed = jwt.encode(claims, forger, algorithm="EdDSA", headers={"kid": real_kid})
    assert reason(verifier, borrowed) == "bad signature"


def test_jwks_is_cached_and_unknown_kids_refetch_at_most_every_30_s(
    issuer: CredentialIssuer, executor: Executor, clock: EpochClock
) -> None:
    verifier = executor.verifier(clock)
    token = mint(issuer).token
    verifier.verify(token, audience=TOOL)
    verifier.verify(token, audience=TOOL)
    assert executor.jwks_fetches == 1

    forger = Ed25519PrivateKey.generate()
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode(claims, forger, algorithm="EdDSA", headers={"kid": "nope"})
    clock.now += UNKNOWN_KID_REFETCH_S
    for _ in range(5):
        assert reason(verifier, forged) == "unknown key"
    assert executor.jwks_fetches == 2  # one refetch, not five

    clock.now += JWKS_TTL_S
    verifier.verify(token, audience=TOOL)
    assert executor.jwks_fetches == 3  # the periodic refresh


def test_a_key_published_ahead_is_known_before_it_signs(keys_dir: Path) -> None:
    # PyJWT checks iat and exp against the real clock, so the fake one ends at the real now.
    clock = EpochClock(time.time() - 100)
    ring = KeyRing(keys_dir, rotation_s=100, retain_s=90, publish_ahead_s=40, clock=clock)
    redis = FakeRedis()
    issuer = CredentialIssuer(ring, RedisRevocations(redis, "t:"), "x", clock=clock)  # type: ignore[arg-type]
    executor = Executor(issuer, redis, "t:")
    verifier = executor.verifier(clock)
    clock.now += 60
    ring.maybe_rotate()
    verifier.verify(mint(issuer, expires_at=clock.now + 80).token, audience=TOOL)
    clock.now += 40  # the new key signs now; the verifier fetched it with the old one
    fresh = mint(issuer, expires_at=clock.now + 60).token
    assert jwt.get_unverified_header(fresh)["kid"] != ring.public_keys()[0].kid
    verifier.verify(fresh, audience=TOOL)
    assert executor.jwks_fetches == 1


def test_an_unreachable_executor_is_not_a_verdict(
    issuer: CredentialIssuer, executor: Executor, clock: EpochClock
) -> None:
    verifier = executor.verifier(clock)
    token = mint(issuer).token
    executor.down = True
    with pytest.raises(VerificationUnavailable):
        verifier.verify(token, audience=TOOL)
    executor.down = False
    verifier.verify(token, audience=TOOL)
    executor.down = True
    clock.now += JWKS_TTL_S  # the refresh fails, so the cached keys carry on...
    assert verifier.verify(token, audience=TOOL, check_revocation=False).jti
    with pytest.raises(VerificationUnavailable):  # ...but revocation cannot be answered
        verifier.verify(token, audience=TOOL)
