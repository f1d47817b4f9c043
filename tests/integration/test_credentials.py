"""Invocation credentials end to end over real sockets: the executor's HTTP port backed by a real
Redis, and a tool service that verifies the Bearer token the way a tool author would, requiring
its invocation id to match the X-Corral-Invocation header the call carries."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry, Counter

from corral.verify import (
    InvalidInvocationToken,
    InvocationClaims,
    TokenVerifier,
    VerificationUnavailable,
    averify_invocation_token,
    verifier_for,
    verify_invocation_token,
)
from services.common.kv import create_redis
from services.executor.credentials import Credential, CredentialIssuer
from services.executor.fleet_keys import FleetKeys
from services.executor.http import ExecutorHttp
from services.executor.keys import KeyRing, jwk_thumbprint
from services.executor.store import RedisJwks, RedisRevocations
from tests.fakes.common import EpochClock
from tests.fakes.executor import forge, mint, tamper
from tests.harness import refused_address

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TOOL = "search"


def search_tool(jwks_url: str) -> web.Application:
    """A tool service as its author would write it with corral.verify."""

    async def search(request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            return web.json_response({"error": "no bearer token"}, status=401)
        try:
            claims = await averify_invocation_token(token, audience=TOOL, jwks_url=jwks_url)
        except InvalidInvocationToken as err:
            return web.json_response({"error": err.reason}, status=401)
        except VerificationUnavailable:
            return web.json_response({"error": "cannot verify now"}, status=503)
        if claims.invocation_id != request.headers.get("X-Corral-Invocation"):
            return web.json_response({"error": "wrong invocation"}, status=403)
        return web.json_response({"results": ["a", "b"], "for": [claims.tenant, claims.user]})

    app = web.Application()
    app.router.add_post("/search", search)
    return app


@dataclass
class Stack:
    keyring: KeyRing
    keyring_clock: EpochClock
    issuer: CredentialIssuer
    http: ExecutorHttp
    jwks_url: str
    tool_url: str
    client: httpx.AsyncClient
    registry: CollectorRegistry

    def mint(self, invocation_id: str = "inv-1", **overrides: object) -> Credential:
        return mint(self.issuer, invocation_id=invocation_id, **overrides)

    async def call(self, token: str, invocation_id: str = "inv-1") -> tuple[int, dict[str, object]]:
        response = await self.client.post(
            self.tool_url,
            headers={"Authorization": f"Bearer {token}", "X-Corral-Invocation": invocation_id},
        )
        return response.status_code, response.json()


@pytest_asyncio.fixture
async def stack(redis_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    clock = EpochClock(time.time())
    keyring = KeyRing(
        tmp_path / "keys", rotation_s=3600, retain_s=600, publish_ahead_s=60, clock=clock
    )
    redis = create_redis(redis_url)
    revocations = RedisRevocations(redis, f"corral-test-{uuid.uuid4().hex[:8]}:")
    issuer = CredentialIssuer(keyring, revocations, "executor")
    registry = CollectorRegistry()
    Counter("corral_credentials_minted", "Invocation credentials minted.", registry=registry).inc()
    http = ExecutorHttp(issuer, registry, "127.0.0.1", 0)
    await http.start()
    jwks_url = f"http://127.0.0.1:{http.port}/.well-known/jwks.json"
    tool = web.AppRunner(search_tool(jwks_url))
    await tool.setup()
    site = web.TCPSite(tool, "127.0.0.1", 0)
    await site.start()
    tool_url = f"http://127.0.0.1:{tool.addresses[0][1]}/search"
    async with httpx.AsyncClient() as client:
        yield Stack(keyring, clock, issuer, http, jwks_url, tool_url, client, registry)
    await verifier_for(jwks_url).aclose()
    verifier_for(jwks_url).close()
    await tool.cleanup()
    await http.close()
    await redis.aclose()


async def test_a_valid_call_succeeds(stack: Stack) -> None:
    status, body = await stack.call(stack.mint().token)
    assert (status, body) == (200, {"results": ["a", "b"], "for": ["acme", "alice"]})


async def test_another_invocations_token_is_refused(stack: Stack) -> None:
    other = stack.mint(invocation_id="inv-2")
    assert await stack.call(other.token, invocation_id="inv-1") == (
        403,
        {"error": "wrong invocation"},
    )


async def test_an_expired_token_is_refused(stack: Stack) -> None:
    # Minted ten minutes ago for a one-minute invocation.
    earlier = CredentialIssuer(
        stack.keyring, stack.issuer.revocations, "executor", clock=lambda: time.time() - 600
    )
    expired = mint(earlier, expires_at=time.time() - 540)
    assert await stack.call(expired.token) == (401, {"error": "expired"})


async def test_a_revoked_token_is_refused_when_replayed(stack: Stack) -> None:
    cred = stack.mint()
    assert (await stack.call(cred.token))[0] == 200
    await stack.issuer.revoke(cred)  # the invocation ended
    assert await stack.call(cred.token) == (401, {"error": "revoked"})
    assert (await stack.call(stack.mint().token))[0] == 200  # other tokens are unaffected


async def test_a_token_for_other_tools_is_refused(stack: Stack) -> None:
    cred = stack.mint(audience=["calendar", "mail"])
    assert await stack.call(cred.token) == (401, {"error": "wrong audience"})


async def test_forged_and_tampered_tokens_are_refused(stack: Stack) -> None:
    genuine = stack.mint().token
    forger = Ed25519PrivateKey.generate()
    own_kid = forge(genuine, forger, jwk_thumbprint(forger.public_key()))
    assert await stack.call(own_kid) == (401, {"error": "unknown key"})
    real_kid = forge(genuine, forger, stack.keyring.signing_key().kid)
    assert await stack.call(real_kid) == (401, {"error": "bad signature"})
    other_invocation = tamper(genuine, invocation_id="inv-9")
    assert await stack.call(other_invocation, "inv-9") == (401, {"error": "bad signature"})
    assert await stack.call("garbage") == (401, {"error": "malformed"})


async def test_a_token_signed_before_rotation_verifies_while_its_key_is_retained(
    stack: Stack,
) -> None:
    before = stack.mint()
    old_kid = stack.keyring.signing_key().kid
    stack.keyring_clock.now += 3600 - 60  # the successor is published a minute ahead...
    stack.keyring.maybe_rotate()
    assert (await stack.call(before.token))[0] == 200  # ...and the tool's JWKS fetch gets it

    stack.keyring_clock.now += 60  # it takes over; the old key is retired
    stack.keyring.maybe_rotate()
    after = stack.mint()
    assert jwt.get_unverified_header(after.token)["kid"] != old_kid
    assert (await stack.call(after.token))[0] == 200
    assert (await stack.call(before.token))[0] == 200

    stack.keyring_clock.now += 600  # retention over: the old key leaves the JWKS
    stack.keyring.maybe_rotate()
    fresh = TokenVerifier(stack.jwks_url)  # one that never cached the old key
    with pytest.raises(InvalidInvocationToken, match="unknown key"):
        await fresh.averify(before.token, audience=TOOL)
    assert (await fresh.averify(after.token, audience=TOOL)).jti == after.jti
    await fresh.aclose()


async def test_a_blocking_tool_verifies_with_the_sync_call(stack: Stack) -> None:
    cred = stack.mint()

    def verify(token: str) -> InvocationClaims:
        return verify_invocation_token(token, audience=TOOL, jwks_url=stack.jwks_url)

    claims = await asyncio.to_thread(verify, cred.token)
    assert claims.jti == cred.jti
    await stack.issuer.revoke(cred)
    with pytest.raises(InvalidInvocationToken, match="revoked"):
        await asyncio.to_thread(verify, cred.token)


async def test_the_executor_http_routes(stack: Stack) -> None:
    base = f"http://127.0.0.1:{stack.http.port}"
    jwks = await stack.client.get(f"{base}/.well-known/jwks.json")
    assert jwks.headers["Cache-Control"] == "public, max-age=300"
    assert jwks.json() == await stack.issuer.jwks()
    cred = stack.mint()
    revocation = await stack.client.get(f"{base}/v1/revocations/{cred.jti}")
    assert revocation.json() == {"jti": cred.jti, "revoked": False}
    assert (await stack.client.get(f"{base}/v1/revocations/../etc")).status_code in (400, 404)
    assert (await stack.client.get(f"{base}/v1/revocations/XYZ")).status_code == 400
    metrics = await stack.client.get(f"{base}/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert "corral_credentials_minted_total 1.0" in metrics.text


async def test_without_redis_the_revocation_check_fails_closed(stack: Stack) -> None:
    dead = create_redis(f"redis://{refused_address()}/0")
    issuer = CredentialIssuer(stack.keyring, RedisRevocations(dead, "unused:"), "executor")
    http = ExecutorHttp(issuer, stack.registry, "127.0.0.1", 0)
    await http.start()
    try:
        verifier = TokenVerifier(f"http://127.0.0.1:{http.port}/.well-known/jwks.json")
        with pytest.raises(VerificationUnavailable, match="503"):
            await verifier.averify(stack.mint().token, audience=TOOL)
        await verifier.aclose()
    finally:
        await http.close()
        await dead.aclose()


async def test_any_executor_of_the_fleet_serves_every_executors_keys(
    redis_url: str, tmp_path: Path
) -> None:
    """Two executors behind one JWKS URL: a tool verifying against either's JWKS accepts the
    tokens both sign; an executor gone for good leaves its keys as long as they may be needed."""
    redis = create_redis(redis_url)
    prefix = f"corral-test-{uuid.uuid4().hex[:8]}:"
    clock = EpochClock(time.time())
    stacks = []
    for name in ("a", "b"):
        keyring = KeyRing(tmp_path / name, rotation_s=3600, retain_s=600, publish_ahead_s=60, clock=clock)
        fleet = FleetKeys(keyring, RedisJwks(redis, prefix), clock=clock)
        await fleet.publish()
        issuer = CredentialIssuer(keyring, RedisRevocations(redis, prefix), "executor", fleet=fleet)
        http = ExecutorHttp(issuer, CollectorRegistry(), "127.0.0.1", 0)
        await http.start()
        stacks.append((issuer, http))
    (a, _), (b, b_http) = stacks
    try:
        assert {k["kid"] for k in (await a.jwks())["keys"]} == {k["kid"] for k in (await b.jwks())["keys"]}
        # Signed by a, verified against b's JWKS (a tool whose URL's balancer picked b).
        token = mint(a, invocation_id="inv-a").token
        b_url = f"http://127.0.0.1:{b_http.port}/.well-known/jwks.json"
        claims = await averify_invocation_token(token, audience=TOOL, jwks_url=b_url)
        assert claims.invocation_id == "inv-a"
        # a stops publishing (gone); its keys stay while its tokens may live, then leave.
        a_kid = a.keyring.signing_key().kid
        clock.now += 590
        assert b.fleet is not None
        await b.fleet.publish()
        assert a_kid in {k["kid"] for k in (await b.jwks())["keys"]}
        clock.now += 20
        assert a_kid not in {k["kid"] for k in (await b.jwks())["keys"]}
    finally:
        await verifier_for(f"http://127.0.0.1:{b_http.port}/.well-known/jwks.json").aclose()
        for _, http in stacks:
            await http.close()
        await redis.aclose()
