"""OIDC bearer tokens without sockets: CORRAL_OIDC_ISSUERS parsing, every reason a token is
refused, the claim forms tenant, subject and roles come in, the token cache, and the JWKS cache
(over httpx's MockTransport) with its refetch throttling and fail-closed behaviour."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from services.common.auth.jwks import HttpJwksSource
from services.common.auth.oidc import (
    IssuerConfigError,
    OidcIssuer,
    OidcVerifier,
    looks_like_jwt,
    parse_issuers,
)
from services.common.auth.principal import CredentialKind, Role
from services.common.errors import Unauthenticated
from services.common.settings import Settings, SettingsError
from tests.fakes.common import EpochClock
from tests.issuer import FakeJwksSource, LocalIssuer

pytestmark = pytest.mark.timeout(30)

GOOD = {"issuer": "https://idp.example/realms/corral", "audience": "corral",
        "jwks_url": "https://idp.example/realms/corral/certs"}


# -- CORRAL_OIDC_ISSUERS -------------------------------------------------------------------------


def test_no_issuers_configured() -> None:
    assert parse_issuers("") == ()
    assert parse_issuers("  \n") == ()
    assert Settings.from_env({}).oidc_issuers == ()


def test_an_issuer_with_every_field() -> None:
    entry = {**GOOD, "algorithms": ["RS256", "ES256"], "tenant_claim": "org",
             "subject_claim": "email", "roles_claim": "realm_access.roles", "tenant": "acme",
             "leeway_s": 5}
    other = {**GOOD, "issuer": "https://other.example/"}
    assert parse_issuers(json.dumps([entry, other])) == (
        OidcIssuer(
            issuer=GOOD["issuer"], audience="corral", jwks_url=GOOD["jwks_url"],
            algorithms=("RS256", "ES256"), tenant_claim="org", subject_claim="email",
            roles_claim="realm_access.roles", tenant="acme", leeway_s=5.0,
        ),
        OidcIssuer(issuer="https://other.example/", audience="corral", jwks_url=GOOD["jwks_url"]),
    )
    defaults = parse_issuers(json.dumps([GOOD]))[0]
    assert (defaults.algorithms, defaults.tenant_claim, defaults.subject_claim,
            defaults.roles_claim, defaults.tenant, defaults.leeway_s) == (
        ("RS256",), "tenant", "sub", "roles", None, 30.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[{", "CORRAL_OIDC_ISSUERS: is not JSON"),
        (json.dumps(GOOD), "CORRAL_OIDC_ISSUERS: must be a JSON list"),
        (json.dumps([GOOD, "https://idp"]), "CORRAL_OIDC_ISSUERS[1]: must be an object"),
        (json.dumps([GOOD, {k: v for k, v in GOOD.items() if k != "audience"}]),
         "CORRAL_OIDC_ISSUERS[1].audience: is required"),
        (json.dumps([{**GOOD, "audiance": "x"}]),
         "CORRAL_OIDC_ISSUERS[0].audiance: is not a field"),
        (json.dumps([{**GOOD, "audience": ""}]), "CORRAL_OIDC_ISSUERS[0].audience: must be"),
        (json.dumps([{**GOOD, "audience": 7}]), "CORRAL_OIDC_ISSUERS[0].audience: 7 is not a"),
        (json.dumps([{**GOOD, "algorithms": ["none"]}]),
         "[0].algorithms: 'none' is refused: unsigned tokens"),
        (json.dumps([{**GOOD, "algorithms": ["RS256", "HS256"]}]),
         "[0].algorithms: HS256 is refused: it signs with a shared secret"),
        (json.dumps([{**GOOD, "algorithms": []}]), "[0].algorithms: name at least one of RS256"),
        (json.dumps([{**GOOD, "algorithms": ["RS1"]}]), "[0].algorithms: 'RS1' is not one of"),
        (json.dumps([{**GOOD, "jwks_url": "http://idp.example/certs"}]),
         "[0].jwks_url: 'http://idp.example/certs' must use https"),
        (json.dumps([{**GOOD, "jwks_url": "idp.example/certs"}]),
         "[0].jwks_url: 'idp.example/certs' is not an http(s) URL"),
        (json.dumps([{**GOOD, "leeway_s": -1}]), "[0].leeway_s: must be between 0 and 300"),
        (json.dumps([{**GOOD, "leeway_s": True}]), "[0].leeway_s: True is not a number"),
        (json.dumps([{**GOOD, "tenant": "a b"}]), "[0].tenant: 'a b' is not a valid tenant"),
        (json.dumps([GOOD, GOOD]),
         f"[1].issuer: '{GOOD['issuer']}' is configured twice (also entry 0)"),
    ],
)
def test_a_bad_issuer_entry_is_refused_naming_entry_and_field(text: str, expected: str) -> None:
    with pytest.raises(IssuerConfigError) as info:
        parse_issuers(text)
    assert expected in str(info.value)


def test_settings_refuse_a_bad_issuer_setting_with_its_message() -> None:
    bad = json.dumps([{**GOOD, "algorithms": "HS256"}])
    with pytest.raises(SettingsError, match=r"CORRAL_OIDC_ISSUERS\[0\]\.algorithms: HS256"):
        Settings.from_env({"CORRAL_OIDC_ISSUERS": bad})
    loopback = {**GOOD, "jwks_url": "http://127.0.0.1:8080/jwks.json", "tenant": None}
    (issuer,) = Settings.from_env({"CORRAL_OIDC_ISSUERS": json.dumps([loopback])}).oidc_issuers
    assert issuer.jwks_url == "http://127.0.0.1:8080/jwks.json"


def test_what_looks_like_a_jwt() -> None:
    assert looks_like_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.c2ln")
    assert looks_like_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.")  # unsigned: refused later
    assert not looks_like_jwt("crl_0123456789abcdef")
    assert not looks_like_jwt("a.b")
    assert not looks_like_jwt("a b.c.d")
    assert not looks_like_jwt("a." + "b" * 20000 + ".c")


# -- the verifier ----------------------------------------------------------------------------------


@pytest.fixture
def clock() -> EpochClock:
    return EpochClock()  # 2030-01-01T00:00:00Z


@pytest.fixture
def idp(clock: EpochClock) -> LocalIssuer:
    return LocalIssuer(serve=False, clock=clock)


@pytest.fixture
def source(idp: LocalIssuer) -> FakeJwksSource:
    return FakeJwksSource(idp)


def verifier_for(
    idp: LocalIssuer, source: FakeJwksSource, clock: EpochClock, *, cache: int = 1024,
    **overrides: Any,
) -> OidcVerifier:
    issuers = parse_issuers(json.dumps([idp.config(**overrides)]))
    return OidcVerifier(issuers, source=source, clock=clock, token_cache_size=cache)


@pytest.fixture
def verifier(idp: LocalIssuer, source: FakeJwksSource, clock: EpochClock) -> OidcVerifier:
    return verifier_for(idp, source, clock)


async def refused(verifier: OidcVerifier, token: str, reason: str) -> str:
    with pytest.raises(Unauthenticated) as info:
        await verifier.verify(token)
    assert info.value.reason == reason, info.value.message
    return info.value.message


async def test_a_valid_token_proves_its_principal(
    verifier: OidcVerifier, idp: LocalIssuer
) -> None:
    principal = await verifier.verify(idp.mint("acme", "auth0|123", roles=("operator",)))
    assert (principal.tenant, principal.subject, principal.roles) == (
        "acme", "auth0|123", frozenset({Role.OPERATOR}))
    assert principal.kind is CredentialKind.JWT
    assert principal.credential == idp.issuer
    assert principal.describe() == f"auth0|123 (jwt {idp.issuer})"


REFUSALS = [
    ({"issuer": "https://evil.example"}, "UNKNOWN_ISSUER",
     ("issuer 'https://evil.example' is not an identity provider this platform trusts: use a "
     "token from a configured one, or ask the operator to add it to CORRAL_OIDC_ISSUERS")),
    ({"claims": {"iss": None}}, "UNKNOWN_ISSUER", "names no issuer"),
    ({"expires_in": -60}, "TOKEN_EXPIRED", "expired at 2029-12-31T23:59:00Z: get a new one from"),
    ({"not_before": 600}, "TOKEN_NOT_YET_VALID", "not valid before 2030-01-01T00:10:00Z"),
    ({"audience": "billing"}, "WRONG_AUDIENCE",
     "audience 'billing', not 'corral': ask the identity provider for a token whose audience"),
    ({"claims": {"aud": None}}, "WRONG_AUDIENCE", "audience None, not 'corral'"),
    ({"key": "foreign"}, "BAD_SIGNATURE", "does not match key 'key-1-"),
    ({"algorithm": "none"}, "ALGORITHM_NOT_ALLOWED", "signed with 'none', but tokens of"),
    ({"algorithm": "HS256"}, "ALGORITHM_NOT_ALLOWED", "signed with 'HS256'"),
    ({"algorithm": "RS512"}, "ALGORITHM_NOT_ALLOWED", "signed with 'RS512'"),
    ({"claims": {"tenant": None}}, "MISSING_CLAIM",
     "carries no tenant (claim 'tenant'): configure"),
    ({"claims": {"tenant": ""}}, "MISSING_CLAIM", "carries no tenant (claim 'tenant')"),
    ({"claims": {"tenant": ["acme"]}}, "MISSING_CLAIM", "carries no tenant (claim 'tenant')"),
    ({"claims": {"sub": None}}, "MISSING_CLAIM", "carries no subject (claim 'sub')"),
    ({"claims": {"tenant": "ac me"}}, "INVALID_CLAIM",
     "claim 'tenant': 'ac me' is not a valid tenant"),
    ({"claims": {"sub": "alice/bob"}}, "INVALID_CLAIM", "claim 'sub': 'alice/bob' is not a valid"),
    ({"claims": {"roles": {"admin": True}}}, "INVALID_CLAIM",
     "claim 'roles' must be a list of roles or a string"),
    ({"claims": {"exp": None}}, "MALFORMED_TOKEN", "no exp claim"),
    ({"claims": {"exp": "tomorrow"}}, "MALFORMED_TOKEN", "exp claim is not a time in seconds"),
]


@pytest.mark.parametrize(("mint", "reason", "expected"), REFUSALS)
async def test_a_token_is_refused_saying_why(
    verifier: OidcVerifier, idp: LocalIssuer, mint: dict[str, Any], reason: str, expected: str
) -> None:
    assert expected in await refused(verifier, idp.mint("acme", "alice", **mint), reason)


@pytest.mark.parametrize(
    "mint",
    [
        {"expires_in": -10},  # expired, but within the issuer's leeway (30 s)
        {"not_before": 10},  # not yet valid, but within the leeway
        {"claims": {"aud": ["billing", "corral"]}},
        {"claims": {"sub": "a+b@example.com"}},
    ],
)
async def test_a_token_is_accepted(
    verifier: OidcVerifier, idp: LocalIssuer, mint: dict[str, Any]
) -> None:
    assert (await verifier.verify(idp.mint("acme", "alice", **mint))).tenant == "acme"


async def test_an_altered_token_is_refused(verifier: OidcVerifier, idp: LocalIssuer) -> None:
    header, _, signature = idp.mint("acme", "alice", roles=("viewer",)).split(".")
    _, payload, _ = idp.mint("acme", "alice", roles=("admin",)).split(".")
    await refused(verifier, f"{header}.{payload}.{signature}", "BAD_SIGNATURE")


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("crl_notajwt", "is not a JWT"),
        ("aaaa.bbbb.cccc", "cannot be read"),
    ],
)
async def test_a_malformed_token_is_refused(
    verifier: OidcVerifier, token: str, expected: str
) -> None:
    assert expected in await refused(verifier, token, "MALFORMED_TOKEN")


async def test_a_key_pinned_to_one_algorithm_verifies_no_other(
    idp: LocalIssuer, source: FakeJwksSource, clock: EpochClock
) -> None:
    verifier = verifier_for(idp, source, clock, algorithms=["RS256", "RS512"])
    message = await refused(
        verifier, idp.mint("acme", "alice", algorithm="RS512"), "BAD_SIGNATURE"
    )
    assert "cannot verify an RS512 signature" in message


async def test_an_unknown_key_id_is_refused_after_one_refetch(
    verifier: OidcVerifier, idp: LocalIssuer, source: FakeJwksSource
) -> None:
    message = await refused(verifier, idp.mint("acme", "alice", key="unknown"), "UNKNOWN_KEY")
    assert f"not among the keys {idp.issuer} publishes at {idp.jwks_url}" in message
    assert source.fetches == [(idp.jwks_url, False), (idp.jwks_url, True)]


async def test_a_key_published_after_the_last_fetch_is_found_by_the_refetch(
    idp: LocalIssuer, clock: EpochClock
) -> None:
    class Stale(FakeJwksSource):
        """Answers from the JWKS as it was before the rotation unless asked to refresh."""

        def __init__(self) -> None:
            super().__init__(idp)
            self.before = idp.jwks()

        async def keys(self, url: str, *, refresh: bool) -> Any:
            current = await super().keys(url, refresh=refresh)
            return current if refresh else {kid: k for kid, k in current.items()
                                            if kid == self.before["keys"][0]["kid"]}

    source = Stale()
    verifier = verifier_for(idp, source, clock)
    idp.rotate()
    assert (await verifier.verify(idp.mint("acme", "alice"))).subject == "alice"
    assert [refresh for _, refresh in source.fetches] == [False, True]


async def test_a_provider_that_cannot_be_reached_fails_closed(
    verifier: OidcVerifier, idp: LocalIssuer, source: FakeJwksSource
) -> None:
    source.available = False
    message = await refused(verifier, idp.mint("acme", "alice"), "JWKS_UNAVAILABLE")
    assert f"could not be fetched from {idp.jwks_url}" in message


async def test_an_issuer_with_a_fixed_tenant_ignores_the_tenant_claim(
    idp: LocalIssuer, source: FakeJwksSource, clock: EpochClock
) -> None:
    verifier = verifier_for(idp, source, clock, tenant="acme")
    assert (await verifier.verify(idp.mint("globex", "alice"))).tenant == "acme"
    assert (await verifier.verify(idp.mint("", "bob", claims={"tenant": None}))).tenant == "acme"


async def test_claims_named_elsewhere_and_nested(
    idp: LocalIssuer, source: FakeJwksSource, clock: EpochClock
) -> None:
    verifier = verifier_for(
        idp, source, clock, tenant_claim="https://corral.example/tenant",
        subject_claim="email", roles_claim="realm_access.roles",
    )
    token = idp.mint("ignored", "ignored", claims={
        "https://corral.example/tenant": "acme", "email": "alice@acme.example",
        "realm_access": {"roles": ["offline_access", "operator"]},
    })
    principal = await verifier.verify(token)
    assert (principal.tenant, principal.subject, principal.roles) == (
        "acme", "alice@acme.example", frozenset({Role.OPERATOR}))


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        (["viewer", "operator"], {Role.VIEWER, Role.OPERATOR}),
        ("viewer operator", {Role.VIEWER, Role.OPERATOR}),
        ("invoker,Admin", {Role.INVOKER, Role.ADMIN}),
        (["offline_access", "uma_authorization", "ADMIN", 7], {Role.ADMIN}),
        ("", set()),
        (None, set()),
    ],
)
async def test_roles_come_as_a_list_or_a_string_and_unknown_ones_are_ignored(
    verifier: OidcVerifier, idp: LocalIssuer, roles: Any, expected: set[Role]
) -> None:
    principal = await verifier.verify(idp.mint("acme", "alice", claims={"roles": roles}))
    assert principal.roles == frozenset(expected)


async def test_a_verified_token_is_cached_until_it_expires(
    verifier: OidcVerifier, idp: LocalIssuer, source: FakeJwksSource, clock: EpochClock
) -> None:
    token = idp.mint("acme", "alice", expires_in=120)
    first = await verifier.verify(token)
    fetches = len(source.fetches)
    source.available = False  # a cached token needs no key
    assert await verifier.verify(token) == first
    assert len(source.fetches) == fetches
    clock.now += 120  # its exp: verified again, which needs the keys
    await refused(verifier, token, "JWKS_UNAVAILABLE")
    source.available = True
    clock.now += 31  # past the leeway too
    await refused(verifier, token, "TOKEN_EXPIRED")


async def test_the_token_cache_is_bounded(
    idp: LocalIssuer, source: FakeJwksSource, clock: EpochClock
) -> None:
    verifier = verifier_for(idp, source, clock, cache=1)
    alice, bob = idp.mint("acme", "alice"), idp.mint("acme", "bob")
    await verifier.verify(alice)
    await verifier.verify(bob)  # evicts alice
    fetches = len(source.fetches)
    await verifier.verify(bob)
    assert len(source.fetches) == fetches
    await verifier.verify(alice)
    assert len(source.fetches) == fetches + 1


# -- the JWKS cache over HTTP ----------------------------------------------------------------------


class Provider:
    """An identity provider's JWKS endpoint behind httpx.MockTransport, counting requests."""

    def __init__(self, idp: LocalIssuer) -> None:
        self.idp = idp
        self.requests = 0
        self.failure: int | Exception | None = None
        self.body: bytes | None = None

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if isinstance(self.failure, Exception):
            raise self.failure
        if self.failure is not None:
            return httpx.Response(self.failure)
        if self.body is not None:
            return httpx.Response(200, content=self.body)
        return httpx.Response(200, json=self.idp.jwks())


@pytest.fixture
def provider(idp: LocalIssuer) -> Provider:
    return Provider(idp)


@pytest.fixture
def monotonic() -> EpochClock:
    return EpochClock(1000.0)


@pytest.fixture
def http_verifier(
    idp: LocalIssuer, provider: Provider, clock: EpochClock, monotonic: EpochClock
) -> Iterator[OidcVerifier]:
    http = HttpJwksSource(transport=httpx.MockTransport(provider.handle), clock=monotonic)
    issuers = parse_issuers(json.dumps([idp.config()]))
    # No token cache, so that every verification asks the JWKS cache.
    yield OidcVerifier(issuers, source=http, clock=clock, token_cache_size=0)


async def test_the_jwks_is_fetched_once_per_ttl(
    http_verifier: OidcVerifier, idp: LocalIssuer, provider: Provider, monotonic: EpochClock
) -> None:
    await asyncio.gather(*(http_verifier.verify(idp.mint("acme", f"u{i}")) for i in range(10)))
    assert provider.requests == 1
    monotonic.now += 299
    await http_verifier.verify(idp.mint("acme", "alice"))
    assert provider.requests == 1
    monotonic.now += 1
    await http_verifier.verify(idp.mint("acme", "alice"))
    assert provider.requests == 2


async def test_unknown_key_ids_refetch_at_most_once_per_30_seconds(
    http_verifier: OidcVerifier, idp: LocalIssuer, provider: Provider, monotonic: EpochClock
) -> None:
    await http_verifier.verify(idp.mint("acme", "alice"))
    forged = idp.mint("acme", "mallory", key="unknown")
    await refused(http_verifier, forged, "UNKNOWN_KEY")
    assert provider.requests == 1  # keys fetched less than 30 s ago are taken as current
    monotonic.now += 30
    for _ in range(20):
        await refused(http_verifier, forged, "UNKNOWN_KEY")
    assert provider.requests == 2  # one refetch for the 20
    idp.rotate()
    rotated = idp.mint("acme", "alice")
    await refused(http_verifier, rotated, "UNKNOWN_KEY")  # within 30 s of the refetch
    monotonic.now += 30
    assert (await http_verifier.verify(rotated)).subject == "alice"
    assert provider.requests == 3


@pytest.mark.parametrize(
    ("failure", "body", "expected"),
    [
        (httpx.ConnectError("connection refused"), None, "(ConnectError: connection refused)"),
        (503, None, "(it answered HTTP 503)"),
        (None, b"<html>", "(the answer is not JSON)"),
        (None, b'{"issuer": "x"}', '(the answer is not a JWKS: no "keys" list)'),
        (None, b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "(the JWKS holds no public signing key)"),
    ],
)
async def test_a_jwks_that_cannot_be_had_fails_closed(
    http_verifier: OidcVerifier, idp: LocalIssuer, provider: Provider,
    failure: int | Exception | None, body: bytes | None, expected: str,
) -> None:
    provider.failure, provider.body = failure, body
    message = await refused(http_verifier, idp.mint("acme", "alice"), "JWKS_UNAVAILABLE")
    assert f"could not be fetched from {idp.jwks_url} {expected}" in message
    assert "are refused" in message


async def test_after_a_failed_fetch_calls_fail_fast_then_retry(
    http_verifier: OidcVerifier, idp: LocalIssuer, provider: Provider, monotonic: EpochClock
) -> None:
    provider.failure = 503
    for _ in range(5):
        await refused(http_verifier, idp.mint("acme", "alice"), "JWKS_UNAVAILABLE")
    assert provider.requests == 1
    provider.failure = None
    monotonic.now += 5
    assert (await http_verifier.verify(idp.mint("acme", "alice"))).subject == "alice"
    assert provider.requests == 2


async def test_keys_past_their_ttl_are_not_used_when_the_refetch_fails(
    http_verifier: OidcVerifier, idp: LocalIssuer, provider: Provider, monotonic: EpochClock
) -> None:
    await http_verifier.verify(idp.mint("acme", "alice"))
    provider.failure = httpx.ConnectTimeout("timed out")
    monotonic.now += 300
    await refused(http_verifier, idp.mint("acme", "alice"), "JWKS_UNAVAILABLE")


async def test_encryption_keys_are_not_used_to_verify(
    http_verifier: OidcVerifier, idp: LocalIssuer, provider: Provider
) -> None:
    (key,) = idp.jwks()["keys"]
    provider.body = json.dumps({"keys": [{**key, "use": "enc"}]}).encode()
    await refused(http_verifier, idp.mint("acme", "alice"), "JWKS_UNAVAILABLE")
