"""`make bench`: the mesh (client → router → executor → sandbox, state committed in sessions)
against a plain grpc.aio echo round trip, both measured in this run, sequentially and with 32
calls in flight; the rollout analysis simulated (sessions to roll back a bad canary, A/A false
rollbacks, sessions to promote); endpoint-change propagation to three routers; warm pools,
streaming and sandbox memory (bench/sandboxes.py); the model broker's overhead (bench/broker.py);
invocation credentials (bench/credentials.py); what identity costs per call: API keys, JWTs,
principal assertions, mutual TLS (bench/identity.py); admission control under 200 concurrent
sessions against 16 (bench/overload.py). CORRAL_BENCH_ONLY=part,part runs some of them.
Prints one JSON document."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import grpc

from bench import broker, credentials, identity, overload, platform, propagation, sandboxes
from bench.rollouts_sim import simulate
from corral.client import CorralClient
from corral.config import ClientConfig
from corral.registry.v1 import keys_pb2
from corral.router.v1 import router_pb2, router_pb2_grpc

HERE = Path(__file__).parent
SEQUENTIAL = int(os.environ.get("CORRAL_BENCH_SEQUENTIAL", "400"))
IN_FLIGHT = 32
CONCURRENT_PER_WORKER = int(os.environ.get("CORRAL_BENCH_CONCURRENT", "25"))
# CORRAL_BENCH_ONLY=a,b picks some of these; unset, all run.
INVOKER = keys_pb2.KEY_ROLE_INVOKER
PARTS = ("overhead", "rollouts", "propagation", "sandboxes", "broker", "credentials", "identity",
         "overload")


def summarize(latencies: list[float], wall: float) -> dict[str, float]:
    ordered = sorted(latencies)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "calls": len(ordered),
        "p50_ms": round(q[49] * 1000, 3),
        "p99_ms": round(q[98] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
        "throughput_per_s": round(len(ordered) / wall, 1),
    }


async def measure(call: Callable[[int], Awaitable[None]], workers: int, per_worker: int) -> dict[str, float]:
    latencies: list[float] = []

    async def worker(w: int) -> None:
        for _ in range(per_worker):
            t = time.perf_counter()
            await call(w)
            latencies.append(time.perf_counter() - t)

    for w in range(workers):  # warm-up: connections, sandboxes, caches
        await call(w)
    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    return summarize(latencies, time.perf_counter() - start)


async def bench_echo(addr: str) -> dict[str, dict[str, float]]:
    async with grpc.aio.insecure_channel(addr) as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/bench.Echo/Echo")
        payload = b'{"text": "hello"}'

        async def call(_w: int) -> None:
            await echo(payload)

        return {
            "sequential": await measure(call, 1, SEQUENTIAL),
            f"in_flight_{IN_FLIGHT}": await measure(call, IN_FLIGHT, CONCURRENT_PER_WORKER),
        }


async def bench_mesh(router_addr: str, api_key: str) -> dict[str, dict[str, float]]:
    """Invocations as a caller makes them: an API key on every call, one long-lived channel."""
    async with grpc.aio.insecure_channel(router_addr) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        run = os.getpid()
        metadata = (("authorization", f"Bearer {api_key}"),)

        async def call(w: int) -> None:
            await stub.Invoke(router_pb2.InvokeRequest(
                agent="agents/bench-echo", endpoint="DEFAULT", session_id=f"bench-{run}-{w}",
                payload=b'{"text": "hello"}',
            ), metadata=metadata)

        return {
            "sequential": await measure(call, 1, SEQUENTIAL),
            f"in_flight_{IN_FLIGHT}": await measure(call, IN_FLIGHT, CONCURRENT_PER_WORKER),
        }


def overhead() -> dict[str, object]:
    data = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    stack = ExitStack()
    launcher = platform.launcher(os.environ, data, **platform.own_database(os.environ, stack))
    echo_proc = subprocess.Popen([sys.executable, "-m", "bench.echo_server"], stdout=subprocess.PIPE)
    try:
        print("bench: starting the platform...", file=sys.stderr, flush=True)
        platform.start_storage(launcher)
        launcher.start_services()
        client = CorralClient(ClientConfig.from_env(platform.client_environ(launcher)))
        version = client.publish(HERE / "agents" / "echo")
        # The invocations carry an invoker's key, as a tenant's script would.
        invoker = client.create_key(keys_pb2.Key(display_name="bench-invoker", role=INVOKER)).api_key
        client.close()
        assert echo_proc.stdout is not None
        echo_addr = echo_proc.stdout.readline().decode().strip()  # it prints where it serves
        print("bench: measuring the raw grpc.aio echo...", file=sys.stderr, flush=True)
        raw = asyncio.run(bench_echo(echo_addr))
        print("bench: measuring the mesh...", file=sys.stderr, flush=True)
        mesh = asyncio.run(bench_mesh(launcher.settings.addrs["router"], invoker))
    finally:
        echo_proc.terminate()
        launcher.stop()
        stack.close()
    seq, conc = "sequential", f"in_flight_{IN_FLIGHT}"
    report: dict[str, object] = {
        "benchmark": "invocation overhead",
        "agent": version.name,
        "mesh": mesh,
        "raw_grpc_echo": raw,
        "ratio": {
            "sequential_p50_latency": round(mesh[seq]["p50_ms"] / raw[seq]["p50_ms"], 2),
            "sequential_p99_latency": round(mesh[seq]["p99_ms"] / raw[seq]["p99_ms"], 2),
            f"{conc}_p50_latency": round(mesh[conc]["p50_ms"] / raw[conc]["p50_ms"], 2),
            f"{conc}_throughput": round(raw[conc]["throughput_per_s"] / mesh[conc]["throughput_per_s"], 2),
        },
    }
    return report


def main() -> int:
    only = os.environ.get("CORRAL_BENCH_ONLY", "")
    parts = {p.strip() for p in only.split(",") if p.strip()} or set(PARTS)
    if unknown := parts - set(PARTS):
        print(f"CORRAL_BENCH_ONLY: unknown part(s) {', '.join(sorted(unknown))}; "
              f"choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    report: dict[str, object] = overhead() if "overhead" in parts else {}
    if "rollouts" in parts:
        print("bench: simulating rollouts (analysis only)...", file=sys.stderr, flush=True)
        report["rollouts"] = simulate()
    if "propagation" in parts:
        print("bench: endpoint-change propagation to three routers...", file=sys.stderr, flush=True)
        report["propagation"] = propagation.measure()
    if "sandboxes" in parts:
        print("bench: warm pools, streaming and sandbox memory...", file=sys.stderr, flush=True)
        report["sandboxes"] = sandboxes.measure(dict(os.environ))
    if "broker" in parts:
        print("bench: the model broker's overhead...", file=sys.stderr, flush=True)
        report["broker"] = asyncio.run(broker.run())
    if "credentials" in parts:
        print("bench: invocation credentials...", file=sys.stderr, flush=True)
        report["credentials"] = asyncio.run(credentials.run())
    if "identity" in parts:
        print("bench: what identity costs per call...", file=sys.stderr, flush=True)
        report["identity"] = identity.run()
    if "overload" in parts:
        print("bench: admission control, 200 sessions against 16...", file=sys.stderr, flush=True)
        report["overload"] = overload.measure(dict(os.environ))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
