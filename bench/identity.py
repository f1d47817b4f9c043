"""`python -m bench.identity`: what identity costs per call, each figure beside its alternative in
the same run. An API-key check on the registry's store path (parse, one PostgreSQL row, SHA-256,
constant-time compare) and through the cache every service puts in front of it
(CachedKeyVerifier, CORRAL_CREDENTIAL_CACHE_S); a JWT verified by OidcVerifier the first time
(RS256 signature and claims; the JWKS already fetched over loopback HTTP) and again (its cache);
the end user's assertion signed and checked on internal hops; one trivial unary internal hop over
a long-lived channel, plaintext and mutual TLS with the service certificates, and what opening a
new connection costs each way. PostgreSQL is a scratch database on the server of
$CORRAL_DATABASE_URL, or an embedded one.
Prints one JSON object."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.credentials import WARM_UP, summarize, time_async, time_sync
from services.common import embedded
from services.common.auth.assertions import AssertionSigner, AssertionVerifier
from services.common.auth.key_client import CachedKeyVerifier
from services.common.auth.oidc import OidcIssuer, OidcVerifier
from services.common.auth.pki import ensure_pki, load_identity
from services.common.auth.principal import CredentialKind, Principal, Role
from services.common.db import create_pool, migrate
from services.common.settings import SERVICES, Settings
from services.registry.app import MIGRATIONS
from services.registry.keys import Keys
from services.registry.store import PgStore
from tests.harness import scratch_database

N = int(os.environ.get("CORRAL_BENCH_N", "2000"))
# New connections are slow and the point is only their order of magnitude.
CONNECTIONS = int(os.environ.get("CORRAL_BENCH_CONNECTIONS", "30"))
HOP = "/bench.Hop/Echo"
PAYLOAD = b'{"text": "hello"}'


# -- API keys -----------------------------------------------------------------------------------

async def api_key_check(database_url: str, n: int) -> dict[str, object]:
    pool = await create_pool(database_url)
    try:
        await migrate(pool, "registry", MIGRATIONS)
        keys = Keys(PgStore(pool))
        key = await keys.ensure_bootstrap("")  # a new key, whatever the database held
        assert key is not None
        credential = str(key)
        ttl_s = Settings.from_env().credential_cache_s  # as the services are configured
        cached = CachedKeyVerifier(keys, ttl_s)
        store = await time_async(lambda _i: keys.verify(credential), n)
        through_cache = await time_async(lambda _i: cached.verify(credential), n)
    finally:
        await pool.close()
    return {
        "n": n,
        "store_path": store,
        "cached": through_cache,
        "cache_ttl_s": ttl_s,
    }


# -- JWTs ---------------------------------------------------------------------------------------

def _jwks_server(private: rsa.RSAPrivateKey, kid: str) -> ThreadingHTTPServer:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": kid, "use": "sig", "alg": "RS256"}]}).encode()

    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="bench-jwks", daemon=True).start()
    return server


async def jwt_verification(n: int) -> dict[str, object]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = uuid.uuid4().hex[:8]
    server = _jwks_server(private, kid)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    verifier = OidcVerifier([OidcIssuer(issuer=url, audience="corral", jwks_url=f"{url}/jwks.json")])
    now = int(time.time())

    def mint(i: int) -> str:
        claims = {"iss": url, "aud": "corral", "sub": f"user-{i}", "tenant": "bench",
                  "roles": ["invoker"], "iat": now, "exp": now + 3600}
        return jwt.encode(claims, private, algorithm="RS256", headers={"kid": kid})

    tokens = [mint(i) for i in range(n + WARM_UP + 1)]
    try:
        start = time.perf_counter_ns()
        await verifier.verify(tokens[-1])
        first = time.perf_counter_ns() - start
        # Each token once: the signature checked every time (the JWKS is cached by now).
        fresh = iter(tokens)
        cold = await time_async(lambda _i: verifier.verify(next(fresh)), n)
        cached = await time_async(lambda _i: verifier.verify(tokens[0]), n)
    finally:
        await verifier.aclose()
        server.shutdown()
        server.server_close()
    return {
        "n": n,
        "algorithm": "RS256 (2048-bit)",
        "first_with_jwks_fetch_ms": round(first / 1e6, 3),
        "cold": cold,
        "cached": cached,
    }


# -- the user's principal on internal hops ------------------------------------------------------

def assertions(pki: Path, n: int) -> dict[str, object]:
    """What relaying the user to the next service costs: the edge signs (once per principal per
    few minutes), every next hop checks (once per assertion)."""
    router = load_identity(pki, "router")
    signer, verifier = AssertionSigner(router), AssertionVerifier(router.ca)

    def principal(i: int) -> Principal:
        return Principal(tenant="bench", subject=f"user-{i}", roles=frozenset({Role.INVOKER}),
                         kind=CredentialKind.API_KEY, credential=f"key-{i}")

    principals = [principal(i) for i in range(n + WARM_UP)]
    new_principals = iter(principals)
    sign_cold = time_sync(lambda _i: signer.sign(next(new_principals)), n)
    sign_cached = time_sync(lambda _i: signer.sign(principals[0]), n)
    tokens = [signer.sign(p) for p in principals]  # signed above, never checked yet
    new_tokens = iter(tokens)
    verify_cold = time_sync(lambda _i: verifier.verify(next(new_tokens)), n)
    verify_cached = time_sync(lambda _i: verifier.verify(tokens[0]), n)
    return {
        "n": n,
        "sign_new_principal": sign_cold,
        "sign_cached": sign_cached,
        "verify_new_assertion": verify_cold,
        "verify_cached": verify_cached,
    }


# -- one internal hop ---------------------------------------------------------------------------

async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


@asynccontextmanager
async def hop_server(pki: Path) -> AsyncIterator[tuple[str, str]]:
    """A trivial unary method on a plaintext port and a mutual-TLS port (the executor's
    certificate, a client certificate required), as a service's two listeners are."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Hop", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    plain = server.add_insecure_port("127.0.0.1:0")
    secure = server.add_secure_port("127.0.0.1:0", load_identity(pki, "executor").server_credentials())
    await server.start()
    try:
        yield f"127.0.0.1:{plain}", f"127.0.0.1:{secure}"
    finally:
        await server.stop(None)


def _channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, credentials)


async def _long_lived(address: str, credentials: grpc.ChannelCredentials | None, n: int) -> dict[str, float]:
    async with _channel(address, credentials) as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(HOP)
        start = time.perf_counter()
        figures = await time_async(lambda _i: echo(PAYLOAD), n)
        wall = time.perf_counter() - start
    return {**figures, "throughput_per_s": round((n + WARM_UP) / wall, 1)}


async def _new_connections(address: str, credentials: grpc.ChannelCredentials | None, n: int) -> dict[str, float]:
    """A new channel each time: connect (and handshake) plus the first call."""

    async def connect_and_call(_i: int) -> None:
        async with _channel(address, credentials) as channel:
            echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(HOP)
            await echo(PAYLOAD)

    samples = []
    for i in range(n):
        start = time.perf_counter_ns()
        await connect_and_call(i)
        samples.append(time.perf_counter_ns() - start)
    return summarize(samples)


async def internal_hop(pki: Path, n: int, connections: int) -> dict[str, object]:
    mtls = load_identity(pki, "router").channel_credentials()
    async with hop_server(pki) as (plain, secure):
        insecure_hop = await _long_lived(plain, None, n)
        mtls_hop = await _long_lived(secure, mtls, n)
        insecure_new = await _new_connections(plain, None, connections)
        mtls_new = await _new_connections(secure, mtls, connections)
    return {
        "n": n,
        "long_lived_insecure": insecure_hop,
        "long_lived_mtls": mtls_hop,
        "mtls_over_insecure_median": round(mtls_hop["median_us"] / insecure_hop["median_us"], 2),
        "new_connections": connections,
        "new_connection_insecure": insecure_new,
        "new_connection_mtls": mtls_new,
    }


# -- all of it ----------------------------------------------------------------------------------

async def measure(database_url: str, pki: Path, n: int) -> dict[str, object]:
    return {
        "api_key_check_us": await api_key_check(database_url, n),
        "jwt_verification_us": await jwt_verification(n),
        "principal_assertion_us": assertions(pki, n),
        "internal_hop_us": await internal_hop(pki, n, CONNECTIONS),
    }


def run() -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="corral-bench-identity-") as tmp:
        pki = Path(tmp) / "pki"
        ensure_pki(pki, SERVICES)
        server_url = os.environ.get("CORRAL_DATABASE_URL")
        if server_url:
            # A database of its own: the bench makes (and replaces) a bootstrap administrator key.
            with scratch_database(server_url, "corral_bench") as url:
                return asyncio.run(measure(url, pki, N))
        server = embedded.start_postgres(Path(tmp) / "pg")
        try:
            return asyncio.run(measure(server.url, pki, N))
        finally:
            server.stop()


def main() -> int:
    print(json.dumps(run(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
