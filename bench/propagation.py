"""Propagation of an endpoint change to three router replicas: the time from the registry
committing a change to each router routing by it (polled through GetCachedEndpoint)."""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import grpc

from bench import platform
from corral.client import CorralClient
from corral.config import ClientConfig
from corral.router.v1 import router_pb2, router_pb2_grpc
from services.launcher.__main__ import Launcher

ROUTERS = 3
CHANGES = int(os.environ.get("CORRAL_BENCH_PROPAGATION_CHANGES", "100"))
HERE = Path(__file__).parent


def _own_ports(launcher: Launcher, service: str) -> None:
    """Makes the next instance of `service` listen on ports the OS picks: the launcher holds one
    address per service, which a further instance would otherwise try to bind again."""
    launcher.settings = launcher.settings.with_address(service, "127.0.0.1:0", "127.0.0.1:0")


def measure() -> dict[str, float]:
    data = Path(tempfile.mkdtemp(prefix="corral-bench-prop-"))
    stack = ExitStack()
    launcher = platform.launcher(os.environ, data, CORRAL_TRACING="false",
                                 **platform.own_database(os.environ, stack))
    try:
        platform.start_storage(launcher)
        launcher.start_service("registry")
        addrs = []
        for n in range(1, ROUTERS + 1):
            _own_ports(launcher, "router")
            addrs.append(launcher.start_service("router", f"router-{n}"))
        env = platform.client_environ(launcher)
        client = CorralClient(ClientConfig.from_env(env))
        md = (("authorization", f"Bearer {env['CORRAL_API_KEY']}"),)
        v1 = client.publish(HERE / "agents" / "echo")
        copy = Path(tempfile.mkdtemp()) / "echo2"
        subprocess.run(["cp", "-r", str(HERE / "agents" / "echo"), str(copy)], check=True)
        (copy / "agent.py").write_text((copy / "agent.py").read_text() + "\n# v2\n")
        v2 = client.publish(copy)
        stubs = [router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(a)) for a in addrs]
        name = "agents/bench-echo/endpoints/prop"
        client.set_endpoint("bench-echo", "prop", [(v1.number, 100.0)])
        for stub in stubs:  # every router up and synced
            deadline = time.monotonic() + 60
            while True:
                try:
                    if stub.GetCachedEndpoint(router_pb2.GetCachedEndpointRequest(name=name), timeout=1,
                                          metadata=md).synced:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("a router did not sync its endpoints")
                time.sleep(0.05)
        delays: list[float] = []
        for i in range(CHANGES):
            split = [(v1.number, 100.0 - (i % 9 + 1) * 10), (v2.number, (i % 9 + 1) * 10.0)]
            t0 = time.perf_counter()
            revision = client.set_endpoint("bench-echo", "prop", split).revision
            committed = time.perf_counter()
            pending = set(range(ROUTERS))
            while pending:
                for k in list(pending):
                    got = stubs[k].GetCachedEndpoint(router_pb2.GetCachedEndpointRequest(name=name), metadata=md)
                    if got.revision >= revision:
                        delays.append((time.perf_counter() - committed) * 1000)
                        pending.discard(k)
                if time.perf_counter() - t0 > 10:
                    raise RuntimeError("an endpoint change did not reach every router within 10 s")
        client.close()
    finally:
        launcher.stop()
        stack.close()
    q = statistics.quantiles(delays, n=100, method="inclusive")
    return {"routers": ROUTERS, "changes": CHANGES, "p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2),
            "max_ms": round(max(delays), 2)}


if __name__ == "__main__":
    import json

    print(json.dumps({"propagation": measure()}, indent=2))
