"""`python -m bench.overload` (`CORRAL_BENCH_ONLY=overload`): admission control under load. One
platform (a scratch database of its own, loopback ports), the echo agent, and two runs on it one
after the other: SMALL concurrent sessions, then LARGE, each session making TURNS turns through
the router as a well-behaved client does (a refusal carrying a retry delay is retried after it;
any other error ends the session). Every run is bounded by RUN_TIMEOUT_S.

Per run: turns/s (successful turns over the run's wall time), p50/p99 latency of the successful
calls, every answer by gRPC code (and refusal reason), the executor's sandbox processes at their
peak (its child processes, sampled every SAMPLE_S) against its cap, the sandbox processes started
and the cold starts (new sessions that found no warm sandbox: the warm pools' misses). The ratios
compare the large run with the small one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Mapping

import grpc
import psutil

from bench.sandboxes import Probe, platform, publish
from tests.rpc import error_details, retry_delay_s

SMALL, LARGE = 16, 200
CAP = 64  # CORRAL_EXECUTOR_MAX_SANDBOXES, the default, as in the measurement of issue 14
SAMPLE_S = 0.05
RUN_TIMEOUT_S = 240.0
CALL_TIMEOUT_S = 60.0
AGENT = "bench-echo"


def _log(message: str) -> None:
    print(f"bench: overload: {message}", file=sys.stderr, flush=True)


class ProcessSampler:
    """The executor's sandbox processes (its children), counted every SAMPLE_S."""

    def __init__(self) -> None:
        self.executor = _executor_process()
        self.peak = 0
        self.started: set[int] = set()

    def reset(self) -> None:
        self.peak, self.started = 0, set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                children = self.executor.children()
                self.peak = max(self.peak, len(children))
                self.started.update(c.pid for c in children)
            await asyncio.sleep(SAMPLE_S)


def _executor_process() -> psutil.Process:
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "services.executor" in " ".join(child.cmdline()):
                return child
    raise RuntimeError("the platform's executor process was not found")


async def _misses(probe: Probe) -> int:
    return sum(p.misses for p in (await probe.pools()).values())


async def run(probe: Probe, sampler: ProcessSampler, sessions: int, turns: int) -> dict[str, object]:
    latencies: list[float] = []
    answers: Counter[str] = Counter()
    done_sessions = 0
    deadline = time.monotonic() + RUN_TIMEOUT_S

    async def session() -> None:
        nonlocal done_sessions
        session_id = probe.new_session_id()
        done = 0
        while done < turns and time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                await probe.router.Invoke(
                    probe.request(AGENT, session_id), metadata=probe.metadata,
                    timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                reason = error_details(err)[0].reason if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED else ""
                answers[f"{err.code().name} {reason}".strip()] += 1
                delay = retry_delay_s(err)
                if delay is None:
                    return  # not a refusal to retry: the session ends here
                await asyncio.sleep(delay)
                continue
            latencies.append(time.perf_counter() - began)
            answers["OK"] += 1
            done += 1
        done_sessions += done == turns

    misses_before = await _misses(probe)
    sampler.reset()
    start = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(sessions)))
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    q = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else [0.0] * 99
    return {
        "sessions": sessions,
        "turns_per_session": turns,
        "sessions_completed": done_sessions,
        "wall_s": round(wall, 2),
        "turns_ok": len(latencies),
        "turns_per_s": round(len(latencies) / wall, 1),
        "ok_p50_ms": round(q[49] * 1000, 1),
        "ok_p99_ms": round(q[98] * 1000, 1),
        "answers": dict(answers.most_common()),
        "sandbox_processes_peak": sampler.peak,
        "sandbox_cap": CAP,
        "sandbox_processes_started": len(sampler.started),
        "cold_starts": await _misses(probe) - misses_before,
    }


async def overload(env: Mapping[str, str], turns: int) -> dict[str, object]:
    probe = Probe(env)
    sampler = ProcessSampler()
    sampling = asyncio.ensure_future(sampler.run())
    try:
        await probe.first_call(AGENT)
        _log(f"{SMALL} sessions x {turns} turns...")
        small = await run(probe, sampler, SMALL, turns)
        await asyncio.sleep(3)  # the small run's sandboxes go idle (evictable) before the next
        _log(f"{LARGE} sessions x {turns} turns...")
        large = await run(probe, sampler, LARGE, turns)
    finally:
        sampling.cancel()
        await probe.close()
    return {"small": small, "large": large, "ratio": _ratios(small, large)}


def _ratios(small: Mapping[str, object], large: Mapping[str, object]) -> dict[str, float]:
    def ratio(key: str) -> float:
        a, b = small[key], large[key]
        assert isinstance(a, int | float) and isinstance(b, int | float)
        return round(b / a, 2) if a else 0.0

    return {f"large_over_small_{key}": ratio(key) for key in ("turns_per_s", "ok_p50_ms", "ok_p99_ms")}


def measure(env: Mapping[str, str]) -> dict[str, object]:
    """`env` as for bench.sandboxes.measure; CORRAL_BENCH_OVERLOAD_TURNS turns per session
    (default 5)."""
    turns = int(env.get("CORRAL_BENCH_OVERLOAD_TURNS") or "5")
    with platform(env, "overload", 1, CORRAL_EXECUTOR_MAX_SANDBOXES=str(CAP)) as platform_env:
        publish(platform_env, "echo")
        report = asyncio.run(overload(platform_env, turns))
    return {"benchmark": "admission under overload", "cap": CAP, **report}


def main() -> int:
    with contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(measure(dict(os.environ)), indent=2))
        return 0
    return 130


if __name__ == "__main__":
    sys.exit(main())
