"""`make chaos`: the platform as `make run` starts it (two routers, two executors; embedded
PostgreSQL and Redis),
multi-turn sessions of a turn-counting agent running against it, and one fault at a time: each
service's process, then PostgreSQL, then Redis, killed with SIGKILL while the sessions go on
(the launcher restarts each). Then an overload: many sessions at once. Prints one JSON document:
per fault, how long until every session's turns succeeded again (from the kill, and from the
launcher's restart), the errors callers saw by gRPC code, acknowledged turns lost, turns applied
twice and sessions stuck; the overload's latencies and answers by code; how long an endpoint
change took to reach every router after PostgreSQL's restart.

A session's client is what a careful caller does: one request id per turn (when the router takes
one), retried on UNAVAILABLE, RESOURCE_EXHAUSTED and ABORTED with a short back-off, the same turn
until it succeeds. The agent returns its session's turn count, so a reply says whether a turn was
lost (a count lower than the turns acknowledged) or applied twice (higher).

Loopback only, every loop bounded. CORRAL_CHAOS_SESSIONS (16), CORRAL_CHAOS_WINDOW_S (15 s per
fault), CORRAL_CHAOS_FAULTS (a comma-separated subset of FAULTS), CORRAL_CHAOS_OVERLOAD (200
sessions; 0 skips it), CORRAL_CHAOS_OVERLOAD_TURNS (3 each)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from corral import retries
from corral.client import CorralClient
from corral.config import ADMIN_KEY_FILE, ClientConfig
from corral.router.v1 import router_pb2, router_pb2_grpc
from services.common.settings import SERVICES
from services.launcher.__main__ import HTTP_PORTS

HERE = Path(__file__).parent
ROOT = HERE.parent
AGENT = "chaos-counter"
ENDPOINT = "chaos"
FAULTS = ("router", "sessions", "registry", "telemetry", "executor", "postgres", "redis")
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
           grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 10.0
START_TIMEOUT_S = 180.0


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


@dataclass
class Settings:
    sessions: int = field(default_factory=lambda: _int("CORRAL_CHAOS_SESSIONS", 16))
    window_s: float = field(default_factory=lambda: float(os.environ.get("CORRAL_CHAOS_WINDOW_S") or 15))
    faults: tuple[str, ...] = field(default_factory=lambda: tuple(
        f for f in (os.environ.get("CORRAL_CHAOS_FAULTS") or ",".join(FAULTS)).split(",") if f))
    overload: int = field(default_factory=lambda: _int("CORRAL_CHAOS_OVERLOAD", 200))
    overload_turns: int = field(default_factory=lambda: _int("CORRAL_CHAOS_OVERLOAD_TURNS", 3))


class Platform:
    """`python -m services.launcher` in a process group of its own, every port OS-picked."""

    def __init__(self, data: Path, replicas: str) -> None:
        self.data = data
        # The platform's own settings only: CORRAL_CHAOS_SET passes some on (A=1,B=2).
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env.update(dict(item.split("=", 1) for item in
                        filter(None, os.environ.get("CORRAL_CHAOS_SET", "").split(","))))
        env.update({f"CORRAL_{svc.upper()}_ADDR": "127.0.0.1:0" for svc in SERVICES})
        env.update(dict.fromkeys(HTTP_PORTS, "0"))
        env.update({"CORRAL_DATA_DIR": str(data), "CORRAL_REPLICAS": replicas, "PYTHONPATH": str(ROOT),
                    "CORRAL_LOG_LEVEL": os.environ.get("CORRAL_CHAOS_LOG_LEVEL") or "WARNING"})
        self.log_path = data / "platform.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.launcher"], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"Corral is running" not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the platform did not start:\n" + self.log_path.read_text()[-3000:])
            time.sleep(0.2)
        self.env = {**env, **json.loads((data / "addresses.json").read_text())}
        self.env["CORRAL_API_KEY"] = (data / ADMIN_KEY_FILE).read_text().strip()
        self.routers = self.env["CORRAL_ROUTER_ADDR"].split(",")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def victim(self, target: str) -> psutil.Process:
        """The process a fault kills: a service's first process, or the embedded store's."""
        if target == "postgres":
            return psutil.Process(int((self.data / "pg" / "postmaster.pid").read_text().split()[0]))
        command = "redis-server" if target == "redis" else f"services.{target}"
        for child in psutil.Process(self.proc.pid).children():
            environ = {}
            with suppress(psutil.Error):
                environ = child.environ()
            listen = environ.get(f"CORRAL_{target.upper()}_LISTEN", "")
            if command in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE and (
                    target in ("redis",) or "," not in listen):
                return child
        raise RuntimeError(f"no process of {target} to kill")

    def stop(self) -> None:
        if self.proc.poll() is None:
            started = psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                for child in started:
                    with suppress(psutil.NoSuchProcess):
                        child.kill()
        self._log.close()


@dataclass
class Tally:
    """What the callers saw in one stretch of time."""

    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    # The first message seen for each code, to tell what went wrong.
    examples: dict[str, str] = field(default_factory=dict)
    lost: int = 0
    twice: int = 0
    turns: int = 0
    latencies: list[float] = field(default_factory=list)


class Session:
    """One multi-turn session, run turn after turn by a careful caller."""

    def __init__(self, stub: router_pb2_grpc.RouterServiceAsyncStub, metadata: tuple[tuple[str, str], ...],
                 name: str, request_ids: bool) -> None:
        self.stub, self.metadata, self.name, self.request_ids = stub, metadata, name, request_ids
        self.acked = 0
        self.last_success = time.monotonic()
        # When each turn that succeeded had been started (monotonic), newest last.
        self.started_ok: list[float] = []

    async def turn(self, tally: Tally, until: float) -> None:
        request = router_pb2.InvokeRequest(agent=f"agents/{AGENT}", endpoint=ENDPOINT, session_id=self.name,
                                           payload=b"{}")
        if self.request_ids:
            request.request_id = uuid.uuid4().hex
        delay = 0.05
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                reply = await self.stub.Invoke(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                tally.errors[exc.code().name] += 1
                tally.examples.setdefault(exc.code().name, (exc.details() or "")[:300])
                if exc.code() not in RETRIED:
                    await asyncio.sleep(delay)  # counted; a careful caller still carries on
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            turn = int(json.loads(reply.output)["turn"])
            expected = self.acked + 1
            if turn < expected:
                tally.lost += expected - turn
            elif turn > expected:
                tally.twice += turn - expected
            self.acked = turn
            tally.turns += 1
            tally.latencies.append(time.monotonic() - started)
            self.last_success = time.monotonic()
            self.started_ok.append(started)
            return

    async def run(self, tally: Tally, until: float) -> None:
        while time.monotonic() < until:
            await self.turn(tally, until)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def _channel(routers: list[str]) -> Iterator[grpc.aio.Channel]:
    target = routers[0] if len(routers) == 1 else "ipv4:" + ",".join(routers)
    channel = grpc.aio.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
    yield channel


async def _settle(sessions: list[Session], limit_s: float = 90.0) -> float | None:
    """Runs turns until every session has just succeeded (the previous fault is over), at most
    `limit_s`; how long that took, None if some session never did."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        step = time.monotonic()
        await asyncio.gather(*(s.turn(Tally(), step + 10) for s in sessions))
        if all(s.last_success >= step for s in sessions):
            return round(time.monotonic() - start, 2)
    return None


async def _fault(platform: Platform, sessions: list[Session], target: str, window_s: float) -> dict[str, object]:
    tally = Tally()
    settled = await _settle(sessions)
    before = len(platform.log())
    until = time.monotonic() + window_s
    runs = [asyncio.create_task(s.run(tally, until)) for s in sessions]
    await asyncio.sleep(1)
    victim = platform.victim(target)
    killed = time.monotonic()
    victim.kill()
    restarted = None
    while time.monotonic() < until:
        if restarted is None and f"{target} restarted: " in platform.log()[before:]:
            restarted = time.monotonic()
        await asyncio.sleep(0.05)
    await asyncio.gather(*runs)
    # Recovered: every session has had a turn started after the kill succeed.
    recovered = [min((t for t in s.started_ok if t >= killed), default=None) for s in sessions]
    ok = [t for t in recovered if t is not None]
    recovery = (max(ok) - killed) if len(ok) == len(sessions) else None
    stuck = sum(1 for s in sessions if time.monotonic() - s.last_success > min(5.0, window_s / 2))
    return {
        "settled_before_s": settled,
        "restart_s": round(restarted - killed, 2) if restarted else None,
        "turns_succeed_again_after_kill_s": round(recovery, 2) if recovery is not None else None,
        "turns_succeed_again_after_restart_s": (
            round(max(0.0, recovery - (restarted - killed)), 2)
            if recovery is not None and restarted is not None else None),
        "errors_by_code": dict(tally.errors),
        "first_error_by_code": tally.examples,
        "turns": tally.turns,
        "acknowledged_turns_lost": tally.lost,
        "turns_applied_twice": tally.twice,
        "sessions_stuck": stuck,
    }


async def _endpoint_propagation(platform: Platform, metadata: tuple[tuple[str, str], ...]) -> float | None:
    """Seconds from an endpoint change (just after PostgreSQL came back) until every router holds
    it; None if one did not within 30 s."""
    client = CorralClient(ClientConfig.from_env(platform.env))
    try:
        changed = await asyncio.to_thread(client.set_endpoint, AGENT, ENDPOINT, [(1, 100.0)])
    finally:
        client.close()
    revision = changed.revision
    start = time.monotonic()
    name = f"agents/{AGENT}/endpoints/{ENDPOINT}"
    pending = set(platform.routers)
    while pending and time.monotonic() - start < 30:
        for address in list(pending):
            async with grpc.aio.insecure_channel(address) as channel:
                with suppress(grpc.aio.AioRpcError):
                    cached = await router_pb2_grpc.RouterServiceStub(channel).GetCachedEndpoint(
                        router_pb2.GetCachedEndpointRequest(name=name), metadata=metadata, timeout=2)
                    if cached.synced and cached.revision >= revision:
                        pending.discard(address)
        await asyncio.sleep(0.02)
    return None if pending else round(time.monotonic() - start, 3)


async def _overload(stub: router_pb2_grpc.RouterServiceAsyncStub, metadata: tuple[tuple[str, str], ...],
                    count: int, turns: int) -> dict[str, object]:
    """`count` new sessions at once, `turns` turns each, by callers who wait as long as a refusal
    asks (RetryInfo) and retry under the same request id, each turn for at most a minute: how
    fast every answer came (a success or a clear back-off), the answers by code, and how long
    turns took to complete."""
    answers: list[float] = []
    completed: list[float] = []
    codes: collections.Counter[str] = collections.Counter()

    async def one(n: int) -> None:
        for _ in range(turns):
            request = router_pb2.InvokeRequest(agent=f"agents/{AGENT}", endpoint=ENDPOINT,
                                               session_id=f"overload-{n}", payload=b"{}",
                                               request_id=uuid.uuid4().hex)
            began = time.monotonic()
            while time.monotonic() - began < 60:
                started = time.monotonic()
                try:
                    await stub.Invoke(request, metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    answers.append(time.monotonic() - started)
                    codes[exc.code().name] += 1
                    if exc.code() not in RETRIED:
                        break
                    await asyncio.sleep(retries.retry_delay(exc) or 0.5)
                else:
                    answers.append(time.monotonic() - started)
                    completed.append(time.monotonic() - began)
                    codes["OK"] += 1
                    break

    start = time.monotonic()
    await asyncio.gather(*(one(n) for n in range(count)))
    wall = time.monotonic() - start
    return {
        "sessions": count, "turns_asked": count * turns, "turns_completed": len(completed),
        "answers_by_code": dict(codes), "completed_turns_per_s": round(len(completed) / wall, 1),
        "answer_p50_ms": round(_quantile(answers, 0.5) * 1000),
        "answer_p99_ms": round(_quantile(answers, 0.99) * 1000),
        "slowest_answer_ms": round(max(answers) * 1000) if answers else None,
        "turn_completed_p50_ms": round(_quantile(completed, 0.5) * 1000),
        "turn_completed_p99_ms": round(_quantile(completed, 0.99) * 1000),
    }


async def run(settings: Settings, platform: Platform) -> dict[str, object]:
    client = CorralClient(ClientConfig.from_env(platform.env))
    try:
        version = await asyncio.to_thread(client.publish, HERE / "agents" / "counter")
        await asyncio.to_thread(client.set_endpoint, AGENT, ENDPOINT, [(version.number, 100.0)])
    finally:
        client.close()
    metadata = (("authorization", f"Bearer {platform.env['CORRAL_API_KEY']}"),)
    request_ids = "request_id" in router_pb2.InvokeRequest.DESCRIPTOR.fields_by_name
    report: dict[str, object] = {"sessions": settings.sessions, "window_s": settings.window_s,
                                 "routers": len(platform.routers), "request_ids": request_ids}
    with _channel(platform.routers) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        sessions = [Session(stub, metadata, f"chaos-{n}-{uuid.uuid4().hex[:6]}", request_ids)
                    for n in range(settings.sessions)]
        faults: dict[str, object] = {}
        for target in settings.faults:
            print(f"chaos: killing {target} under {settings.sessions} sessions...", file=sys.stderr, flush=True)
            faults[target] = await _fault(platform, sessions, target, settings.window_s)
            if target == "postgres":
                report["endpoint_change_reaches_every_router_after_postgres_restart_s"] = (
                    await _endpoint_propagation(platform, metadata))
        report["faults"] = faults
        if settings.overload:
            print(f"chaos: {settings.overload} sessions at once...", file=sys.stderr, flush=True)
            report["overload"] = await _overload(stub, metadata, settings.overload, settings.overload_turns)
        await channel.close()
    return report


def main() -> int:
    settings = Settings()
    unknown = set(settings.faults) - set(FAULTS)
    if unknown:
        print(f"CORRAL_CHAOS_FAULTS: {', '.join(sorted(unknown))} unknown; choose from {', '.join(FAULTS)}",
              file=sys.stderr)
        return 2
    data = Path(tempfile.mkdtemp(prefix="corral-chaos-"))
    print(f"chaos: starting the platform in {data}...", file=sys.stderr, flush=True)
    platform = Platform(data, "router=2,executor=2")
    try:
        report = asyncio.run(run(settings, platform))
    finally:
        platform.stop()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
