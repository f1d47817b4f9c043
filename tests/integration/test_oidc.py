"""OidcVerifier against a real identity provider on loopback (tests/issuer.py): tokens accepted
over HTTP with the issuers read from CORRAL_OIDC_ISSUERS, a key rotation picked up, and a provider
that is down, failing or silent refused with a message saying so."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest

from services.common.auth.jwks import HttpJwksSource
from services.common.auth.oidc import OidcVerifier
from services.common.auth.principal import Role
from services.common.errors import Unauthenticated
from services.common.settings import Settings
from tests.fakes.common import EpochClock
from tests.issuer import LocalIssuer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def idp() -> Iterator[LocalIssuer]:
    with LocalIssuer() as issuer:
        yield issuer


@pytest.fixture
def monotonic() -> EpochClock:
    return EpochClock(1000.0)


@pytest.fixture
async def verifier(idp: LocalIssuer, monotonic: EpochClock) -> AsyncIterator[OidcVerifier]:
    """A verifier of the provider's tokens over HTTP, its JWKS cache on a clock the test moves,
    and no token cache, so that every verification needs the provider's keys."""
    settings = Settings.from_env({"CORRAL_OIDC_ISSUERS": json.dumps([idp.config()])})
    source = HttpJwksSource(clock=monotonic)
    yield OidcVerifier(settings.oidc_issuers, source=source, token_cache_size=0)
    await source.aclose()


async def refused(verifier: OidcVerifier, token: str, reason: str) -> str:
    with pytest.raises(Unauthenticated) as info:
        await verifier.verify(token)
    assert info.value.reason == reason, info.value.message
    return info.value.message


async def test_tokens_of_a_configured_provider_are_accepted(idp: LocalIssuer) -> None:
    settings = Settings.from_env({"CORRAL_OIDC_ISSUERS": json.dumps([idp.config()])})
    verifier = OidcVerifier(settings.oidc_issuers)  # as a service builds it
    try:
        alice = await verifier.verify(idp.mint("acme", "alice", roles=("invoker",)))
        bob = await verifier.verify(idp.mint("globex", "bob", roles=("admin",)))
        assert [(p.tenant, p.subject, p.role) for p in (alice, bob)] == [
            ("acme", "alice", Role.INVOKER), ("globex", "bob", Role.ADMIN),
        ]
        assert alice.credential == idp.issuer
        assert idp.jwks_requests == 1  # one fetch for both
        await refused(verifier, idp.mint("acme", "alice", key="foreign"), "BAD_SIGNATURE")
    finally:
        await verifier.aclose()


async def test_a_key_rotation_is_picked_up(
    idp: LocalIssuer, verifier: OidcVerifier, monotonic: EpochClock
) -> None:
    before = idp.mint("acme", "alice")
    await verifier.verify(before)
    idp.rotate()
    after = idp.mint("acme", "alice")
    # The keys were fetched a moment ago: the new key is looked for 30 s after that fetch.
    await refused(verifier, after, "UNKNOWN_KEY")
    assert idp.jwks_requests == 1
    monotonic.now += 30
    assert (await verifier.verify(after)).subject == "alice"
    assert idp.jwks_requests == 2
    assert (await verifier.verify(before)).subject == "alice"  # the old key is still published
    assert idp.jwks_requests == 2


async def test_a_provider_that_is_down_fails_closed_until_it_is_back(
    idp: LocalIssuer, verifier: OidcVerifier, monotonic: EpochClock
) -> None:
    token = idp.mint("acme", "alice")
    await verifier.verify(token)
    idp.available = False
    monotonic.now += 300  # the cached keys are due
    message = await refused(verifier, token, "JWKS_UNAVAILABLE")
    assert f"could not be fetched from {idp.jwks_url} (it answered HTTP 503)" in message
    idp.available = True
    monotonic.now += 5
    assert (await verifier.verify(token)).subject == "alice"


async def test_a_provider_that_is_gone_fails_closed(idp: LocalIssuer) -> None:
    settings = Settings.from_env({"CORRAL_OIDC_ISSUERS": json.dumps([idp.config()])})
    verifier = OidcVerifier(settings.oidc_issuers)
    token = idp.mint("acme", "alice")
    idp.close()
    try:
        message = await refused(verifier, token, "JWKS_UNAVAILABLE")
    finally:
        await verifier.aclose()
    assert f"could not be fetched from {idp.jwks_url} (ConnectError" in message
    assert "tokens cannot be checked and are refused" in message


async def test_a_provider_that_never_answers_fails_closed_within_the_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, reads, never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with LocalIssuer(serve=False) as idp:
        config = idp.config(jwks_url=f"http://127.0.0.1:{port}/jwks.json")
        issuers = Settings.from_env({"CORRAL_OIDC_ISSUERS": json.dumps([config])}).oidc_issuers
        source = HttpJwksSource(timeout_s=0.5)
        verifier = OidcVerifier(issuers, source=source)
        try:
            message = await asyncio.wait_for(
                refused(verifier, idp.mint("acme", "alice"), "JWKS_UNAVAILABLE"), timeout=10
            )
        finally:
            await source.aclose()
            server.close()
    assert "(ReadTimeout" in message
