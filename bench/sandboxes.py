"""`python -m bench.sandboxes`: what a warm pool buys a new session, measured through the router
on two platforms started one after the other, each on a scratch database of its own (the
executor warms every version any endpoint in its database routes to):
- no pool (CORRAL_WARM_POOL_SIZE=0): a session's first invocation starts its sandbox;
- a pool of POOL_SIZE per version: before every measured call the pools are back at their size,
  so each first invocation is a hit (checked against the pool's hit and miss counts) and no
  sandbox is starting in the background while a call is timed.
On each: the first invocation of a new session and the session's second (live) turn; on the
pooled platform also the first chunk of a streamed invocation (RouterService.InvokeStream), and
the memory of an idle warm sandbox (RSS of its process tree, and its cgroup's reading).
`measure(env)` is synchronous (it starts and stops platforms); it returns one JSON-able dict."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import psutil

from bench import platform as bench_platform
from corral.client import CorralClient
from corral.config import ClientConfig
from corral.executor.v1 import executor_pb2 as ex
from corral.executor.v1 import executor_pb2_grpc
from corral.router.v1 import router_pb2, router_pb2_grpc
from services.common.kv import create_redis
from tests.harness import scratch_database

AGENTS = Path(__file__).parent / "agents"
POOL_SIZE = 4  # warm sandboxes per version on the pooled platform; also the RSS sample
WARM_UP = 3
REFILL_TIMEOUT_S = 60.0
PAYLOAD = b'{"text": "hello"}'
MIB = 1024 * 1024


def _log(message: str) -> None:
    print(f"bench: sandboxes: {message}", file=sys.stderr, flush=True)


def summarize(seconds: list[float]) -> dict[str, float]:
    q = statistics.quantiles(sorted(seconds), n=100, method="inclusive")
    return {"calls": len(seconds), "p50_ms": round(q[49] * 1000, 3), "p99_ms": round(q[98] * 1000, 3)}


# -- a platform of its own ------------------------------------------------------------------


@contextmanager
def platform(
    base: Mapping[str, str], tag: str, pool_size: int, **extra: str
) -> Iterator[dict[str, str]]:
    """Starts the five services on ports the OS picks, with a data dir and (when base names a
    PostgreSQL server) a scratch database of their own, and `extra` settings; yields the
    environment that reaches them; stops and cleans up."""
    data = Path(tempfile.mkdtemp(prefix=f"corral-bench-{tag}-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, data, ignore_errors=True)
        env = {
            "CORRAL_WARM_POOL_SIZE": str(pool_size),
            "CORRAL_REDIS_PREFIX": f"corral-bench-{tag}-{uuid.uuid4().hex[:8]}:",
            **extra,
        }
        if base.get("CORRAL_DATABASE_URL"):
            env["CORRAL_DATABASE_URL"] = stack.enter_context(
                scratch_database(base["CORRAL_DATABASE_URL"], "corral_bench"))
        if base.get("CORRAL_REDIS_URL"):
            stack.callback(_forget_keys, base["CORRAL_REDIS_URL"], env["CORRAL_REDIS_PREFIX"])
        launcher = bench_platform.launcher(base, data, **env)
        stack.callback(launcher.stop)
        bench_platform.start_storage(launcher)
        launcher.start_services()
        yield bench_platform.client_environ(launcher)


def _forget_keys(url: str, prefix: str) -> None:
    async def forget() -> None:
        redis = create_redis(url)
        try:
            keys = [key async for key in redis.scan_iter(match=prefix + "*", count=1000)]
            if keys:
                await redis.delete(*keys)
        finally:
            await redis.aclose()

    asyncio.run(forget())


def publish(env: Mapping[str, str], agent: str) -> str:
    client = CorralClient(ClientConfig.from_env(env))
    try:
        return client.publish(AGENTS / agent).name
    finally:
        client.close()


# -- the measurements -----------------------------------------------------------------------


class Probe:
    """The router and the executor's sandbox listing, on one channel each."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._router_channel = grpc.aio.insecure_channel(env["CORRAL_ROUTER_ADDR"])
        self._executor_channel = grpc.aio.insecure_channel(env["CORRAL_EXECUTOR_ADDR"])
        self.router = router_pb2_grpc.RouterServiceStub(self._router_channel)
        self.executor = executor_pb2_grpc.ExecutorServiceStub(self._executor_channel)
        # The platform administrator's key: ListSandboxes needs an operator.
        self.metadata = (("authorization", f"Bearer {env['CORRAL_API_KEY']}"),)
        self.run = uuid.uuid4().hex[:8]
        self._n = 0

    async def close(self) -> None:
        await self._router_channel.close()
        await self._executor_channel.close()

    def new_session_id(self) -> str:
        self._n += 1
        return f"bench-sb-{self.run}-{self._n}"

    def request(self, agent: str, session_id: str) -> router_pb2.InvokeRequest:
        return router_pb2.InvokeRequest(
            agent=f"agents/{agent}", endpoint="DEFAULT", session_id=session_id, payload=PAYLOAD)

    async def invoke(self, agent: str, session_id: str) -> tuple[float, router_pb2.InvokeResponse]:
        start = time.perf_counter()
        response = await self.router.Invoke(self.request(agent, session_id), metadata=self.metadata)
        return time.perf_counter() - start, response

    async def invoke_stream(self, agent: str, session_id: str) -> tuple[float, float]:
        """Seconds to the first chunk of output, and to the end of the invocation."""
        start = time.perf_counter()
        first = 0.0
        async for event in self.router.InvokeStream(self.request(agent, session_id),
                                                   metadata=self.metadata):
            if event.WhichOneof("event") == "chunk" and not first:
                first = time.perf_counter() - start
        if not first:
            raise RuntimeError(f"{agent} streamed no output")
        return first, time.perf_counter() - start

    async def stop(self, session_id: str) -> None:
        await self.router.StopSession(router_pb2.StopSessionRequest(name=f"sessions/{session_id}"),
                                     metadata=self.metadata)

    async def listing(self) -> ex.ListSandboxesResponse:
        return await self.executor.ListSandboxes(ex.ListSandboxesRequest(), metadata=self.metadata)

    async def pools(self) -> dict[str, ex.WarmPool]:
        return {p.version: p for p in (await self.listing()).pools}

    async def refilled(self, versions: list[str]) -> None:
        """Waits until every version's pool is at its size: nothing starting in the background."""
        async with asyncio.timeout(REFILL_TIMEOUT_S):
            while True:
                pools = await self.pools()
                if all(v in pools and pools[v].target > 0 and pools[v].ready >= pools[v].target
                       for v in versions):
                    return
                await asyncio.sleep(0.02)

    async def first_call(self, agent: str) -> None:
        """The router learns of a just-published agent's DEFAULT endpoint within moments."""
        deadline = time.monotonic() + 30
        while True:
            session_id = self.new_session_id()
            try:
                await self.invoke(agent, session_id)
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() > deadline or exc.code() not in (
                        grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.FAILED_PRECONDITION):
                    raise
                await asyncio.sleep(0.2)
                continue
            await self.stop(session_id)
            return


async def sessions(probe: Probe, agent: str, n: int, pooled: list[str]) -> dict[str, list[float]]:
    """n new sessions: the first invocation of each, then its second turn. With `pooled`, each
    call waits first for those versions' pools to be full."""
    first: list[float] = []
    live: list[float] = []
    for i in range(WARM_UP + n):
        session_id = probe.new_session_id()
        if pooled:
            await probe.refilled(pooled)
        took, response = await probe.invoke(agent, session_id)
        if not response.info.new_session:
            raise RuntimeError(f"{session_id} was not a new session")
        if pooled:
            await probe.refilled(pooled)
        took_live, _ = await probe.invoke(agent, session_id)
        await probe.stop(session_id)  # else every session keeps a live sandbox for 15 minutes
        if i >= WARM_UP:
            first.append(took)
            live.append(took_live)
        if (i + 1) % 10 == 0:
            _log(f"{agent}: {i + 1}/{WARM_UP + n} sessions")
    return {"first": first, "live": live}


async def streams(probe: Probe, agent: str, n: int, pooled: list[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"new_first_chunk": [], "new_whole": [], "live_first_chunk": [],
                                   "live_whole": []}
    for i in range(WARM_UP + n):
        session_id = probe.new_session_id()
        await probe.refilled(pooled)
        new = await probe.invoke_stream(agent, session_id)
        await probe.refilled(pooled)
        live = await probe.invoke_stream(agent, session_id)
        await probe.stop(session_id)
        if i >= WARM_UP:
            for key, value in zip(out, (*new, *live), strict=True):
                out[key].append(value)
        if (i + 1) % 10 == 0:
            _log(f"{agent}: {i + 1}/{WARM_UP + n} streamed sessions")
    return out


def tree_memory(pid: int) -> dict[str, float]:
    """RSS, PSS and USS summed over a sandbox's process tree (bwrap and everything under it).
    RSS counts the pages shared between sandboxes (the interpreter, libraries) once per
    sandbox; PSS splits them; USS is what stopping the sandbox would free."""
    root = psutil.Process(pid)
    totals = {"rss": 0.0, "pss": 0.0, "uss": 0.0, "processes": 0.0}
    for proc in [root, *root.children(recursive=True)]:
        try:
            full = proc.memory_full_info()
            rss, pss, uss = full.rss, full.pss, full.uss
        except psutil.AccessDenied:  # a process of another user's: only its RSS is readable
            rss, pss, uss = proc.memory_info().rss, 0, 0
        totals["rss"] += rss
        totals["pss"] += pss
        totals["uss"] += uss
        totals["processes"] += 1
    return totals


async def idle_memory(probe: Probe, version: str) -> dict[str, object]:
    await probe.refilled([version])
    await asyncio.sleep(1.0)  # let the just-started ones settle
    warm = [s for s in (await probe.listing()).sandboxes
            if s.state == ex.Sandbox.STATE_WARM and s.version == version]
    trees = [tree_memory(s.pid) for s in warm]
    n = len(warm)

    def mean_mib(values: list[float]) -> float:
        return round(sum(values) / n / MIB, 1)

    return {
        "warm_sandboxes": n,
        "processes_per_sandbox": round(sum(t["processes"] for t in trees) / n, 1),
        "rss_mib_per_sandbox": mean_mib([t["rss"] for t in trees]),
        "pss_mib_per_sandbox": mean_mib([t["pss"] for t in trees]),
        "uss_mib_per_sandbox": mean_mib([t["uss"] for t in trees]),
        "cgroup_mib_per_sandbox": mean_mib([float(s.memory_bytes) for s in warm]),
    }


async def unpooled(env: Mapping[str, str], n: int) -> dict[str, list[float]]:
    probe = Probe(env)
    try:
        await probe.first_call("bench-echo")
        return await sessions(probe, "bench-echo", n, pooled=[])
    finally:
        await probe.close()


async def pooled(env: Mapping[str, str], n: int, echo: str, stream: str) -> dict[str, object]:
    probe = Probe(env)
    try:
        _log(f"waiting for the pools to fill ({POOL_SIZE} per version)...")
        await probe.refilled([echo, stream])
        await probe.first_call("bench-echo")
        await probe.first_call("bench-stream")
        before = await probe.pools()
        calls = await sessions(probe, "bench-echo", n, pooled=[echo, stream])
        streamed = await streams(probe, "bench-stream", n, pooled=[echo, stream])
        after = await probe.pools()
        counts = {
            v: {"new_sessions": WARM_UP + n, "hits": after[v].hits - before[v].hits,
                "misses": after[v].misses - before[v].misses}
            for v in (echo, stream)
        }
        _log("memory of idle warm sandboxes...")
        memory = await idle_memory(probe, echo)
        driver = next((s.driver for s in (await probe.listing()).sandboxes), "")
        return {"calls": calls, "streams": streamed, "counts": counts, "memory": memory, "driver": driver}
    finally:
        await probe.close()


def measure(env: Mapping[str, str]) -> dict[str, object]:
    """`env` is the environment to start from (os.environ under `make bench`): its
    CORRAL_DATABASE_URL names a PostgreSQL server to make scratch databases on and its
    CORRAL_REDIS_URL a Redis to share (without them each platform starts embedded ones), and
    CORRAL_BENCH_SANDBOX_N the calls per figure (default 40)."""
    n = int(env.get("CORRAL_BENCH_SANDBOX_N") or "40")
    _log(f"platform without warm pools (n={n})...")
    with platform(env, "nopool", 0) as platform_env:
        publish(platform_env, "echo")
        cold = asyncio.run(unpooled(platform_env, n))
    _log(f"platform with warm pools of {POOL_SIZE} (n={n})...")
    with platform(env, "pool", POOL_SIZE) as platform_env:
        echo = publish(platform_env, "echo")
        stream = publish(platform_env, "stream")
        warm = asyncio.run(pooled(platform_env, n, echo, stream))
    calls, streamed = warm["calls"], warm["streams"]
    assert isinstance(calls, dict) and isinstance(streamed, dict)
    no_pool_first, pool_first = summarize(cold["first"]), summarize(calls["first"])
    live = summarize(calls["live"])
    counts = warm["counts"]
    assert isinstance(counts, dict)
    return {
        "n": n,
        "driver": warm["driver"],
        "pool_size": POOL_SIZE,
        "new_session_first_invocation": {"no_pool": no_pool_first, "from_warm_pool": pool_first},
        "live_session_invocation": {"no_pool_platform": summarize(cold["live"]), "pool_platform": live},
        "streaming": {
            "live_session": {"first_chunk": summarize(streamed["live_first_chunk"]),
                             "whole": summarize(streamed["live_whole"])},
            "new_session_from_warm_pool": {"first_chunk": summarize(streamed["new_first_chunk"]),
                                           "whole": summarize(streamed["new_whole"])},
        },
        "pool_counts": counts,
        "every_new_session_was_a_hit": all(
            c["hits"] == c["new_sessions"] and c["misses"] == 0 for c in counts.values()),
        "idle_warm_sandbox_memory": warm["memory"],
        "ratio": {
            "no_pool_over_warm_first_invocation_p50": round(no_pool_first["p50_ms"] / pool_first["p50_ms"], 2),
            "no_pool_over_warm_first_invocation_p99": round(no_pool_first["p99_ms"] / pool_first["p99_ms"], 2),
            "warm_first_invocation_over_live_p50": round(pool_first["p50_ms"] / live["p50_ms"], 2),
            "warm_first_invocation_over_live_p99": round(pool_first["p99_ms"] / live["p99_ms"], 2),
        },
    }


def main() -> int:
    with contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(measure(dict(os.environ)), indent=2))
        return 0
    return 130


if __name__ == "__main__":
    sys.exit(main())
