"""`python -m bench.credentials`: what a per-invocation credential costs. Minting; verifying with
the JWKS cached (pure CPU: what a tool pays per call with check_revocation=False); verifying with
the revocation round trip to the executor's HTTP port and Redis behind it. The executor's HTTP
server and the verifier share one event loop here, so the round trip includes the server's work.
Redis is $CORRAL_REDIS_URL, or an embedded one. Prints one JSON object."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from corral.verify import TokenVerifier
from services.common import embedded
from services.common.kv import create_redis
from services.executor.credentials import Credential, CredentialIssuer, KeyRing
from services.executor.http import ExecutorHttp
from services.executor.store import RedisRevocations

N = int(os.environ.get("CORRAL_BENCH_N", "2000"))
WARM_UP = 50
TOOL = "search"


def summarize(ns: list[int]) -> dict[str, float]:
    q = statistics.quantiles(sorted(ns), n=100, method="inclusive")
    return {"median_us": round(q[49] / 1000, 1), "p99_us": round(q[98] / 1000, 1)}


def time_sync(op: Callable[[int], object], n: int) -> dict[str, float]:
    for i in range(WARM_UP):
        op(i)
    samples = []
    for i in range(n):
        start = time.perf_counter_ns()
        op(i)
        samples.append(time.perf_counter_ns() - start)
    return summarize(samples)


async def time_async(op: Callable[[int], Awaitable[object]], n: int) -> dict[str, float]:
    for i in range(WARM_UP):
        await op(i)
    samples = []
    for i in range(n):
        start = time.perf_counter_ns()
        await op(i)
        samples.append(time.perf_counter_ns() - start)
    return summarize(samples)


async def measure(redis_url: str, keys_dir: Path, n: int) -> dict[str, object]:
    redis = create_redis(redis_url)
    keyring = KeyRing(keys_dir, rotation_s=86400, retain_s=3600)
    revocations = RedisRevocations(redis, f"corral-bench-{uuid.uuid4().hex[:8]}:")
    issuer = CredentialIssuer(keyring, revocations, "bench")
    http = ExecutorHttp(issuer, CollectorRegistry(), "127.0.0.1", 0)
    await http.start()
    verifier = TokenVerifier(f"http://127.0.0.1:{http.port}/.well-known/jwks.json")
    try:

        def mint(i: int) -> Credential:
            return issuer.mint(
                version="agents/bench/versions/1",
                session=f"sessions/{i}",
                invocation_id=uuid.uuid4().hex,
                tenant="bench",
                user="bench",
                audience=[TOOL, "calendar"],
                expires_at=time.time() + 300,
            )

        minted = time_sync(mint, n)
        tokens = [mint(i).token for i in range(n + WARM_UP)]
        await verifier.averify(tokens[0], audience=TOOL)  # fetches the JWKS once
        cached = time_sync(
            lambda i: verifier.verify(tokens[i], audience=TOOL, check_revocation=False), n
        )

        async def with_revocation(i: int) -> object:
            return await verifier.averify(tokens[i], audience=TOOL)

        revocation = await time_async(with_revocation, n)
        return {
            "n": n,
            "mint": minted,
            "verify_cached_jwks": cached,
            "verify_with_revocation": revocation,
        }
    finally:
        await verifier.aclose()
        await http.close()
        await redis.aclose()


async def run() -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="corral-bench-cred-") as tmp:
        url = os.environ.get("CORRAL_REDIS_URL")
        if url:
            return await measure(url, Path(tmp) / "keys", N)
        server = embedded.start_redis(Path(tmp) / "redis")
        try:
            return await measure(server.url, Path(tmp) / "keys", N)
        finally:
            server.stop()


def main() -> int:
    print(json.dumps(asyncio.run(run()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
