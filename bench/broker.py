"""`python -m bench.broker`: what the model broker adds to a model call, with the scripted
provider (so the model itself costs next to nothing). Three figures from one run:
- the provider called in-process (ScriptedProvider().complete);
- ModelBroker.call in-process (the span, the attributes, the proto answer);
- a call from agent code inside a bwrap sandbox: the same sandbox runs the same agent with k=K
  model calls and with k=0, alternately; the per-call cost is (with - without) / K per pair.
The sandbox's callback is ModelBroker.call, as the executor wires it, with an SDK tracer whose
batch processor drops the spans (the executor's exports them to telemetry). Prints one JSON
object; times in microseconds."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from services.executor.broker import ModelBroker
from services.executor.drivers.base import SandboxSpec
from services.executor.model import (
    ChunkSink,
    ModelAnswer,
    ModelRequest,
    ToolOutcome,
    ToolRequest,
    TurnInput,
)
from services.executor.providers import ScriptedProvider
from services.executor.sandbox import Done, Sandbox

AGENT = Path(__file__).parent / "agents" / "model"
# Invocations per variant (with and without model calls), and model calls per invocation.
N = int(os.environ.get("CORRAL_BENCH_BROKER_N", "200"))
K = int(os.environ.get("CORRAL_BENCH_BROKER_K", "20"))
WARM_UP = 10
PROMPT = "benchmark prompt number 7 about latency"
MODEL: tuple[str, str, dict[str, object]] = ("scripted", "scripted-1", {})  # provider, model, params
# What the executor puts on each model-call span (the invocation's attributes).
ATTRIBUTES: dict[str, str | int] = {
    "corral.agent": "agents/bench-model", "corral.version": "agents/bench-model/versions/1",
    "corral.version.number": 1, "corral.endpoint": "DEFAULT", "corral.session": "sessions/bench",
    "corral.tenant": "default", "corral.user": "bench", "corral.invocation": "bench",
    "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "bench-model",
}


class _Dropped(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def summarize_us(ns: list[float]) -> dict[str, float]:
    q = statistics.quantiles(sorted(ns), n=100, method="inclusive")
    return {"n": len(ns), "median_us": round(q[49] / 1000, 1), "p99_us": round(q[98] / 1000, 1)}


async def time_calls(op: Callable[[], Awaitable[object]], n: int) -> list[float]:
    for _ in range(WARM_UP):
        await op()
    samples: list[float] = []
    for _ in range(n):
        start = time.perf_counter_ns()
        await op()
        samples.append(time.perf_counter_ns() - start)
    return samples


async def start_sandbox(tmp: Path) -> Sandbox:
    from services.executor.drivers.bwrap import BwrapDriver  # needs bubblewrap: imported late

    bundle = tmp / "bundle"
    shutil.copytree(AGENT, bundle)
    spec = SandboxSpec(
        session=f"sessions/bench-broker-{uuid.uuid4().hex[:8]}", version="agents/bench-model/versions/1",
        bundle_dir=bundle, workdir=tmp / "work", entrypoint="agent:app", prompt_file="",
        python=sys.executable, memory_mb=256, cpu_seconds=600,
    )
    sandbox = Sandbox(spec)
    await sandbox.start(BwrapDriver())
    return sandbox


async def measure(tmp: Path) -> dict[str, object]:
    provider = ScriptedProvider()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(_Dropped()))
    broker = ModelBroker({"scripted": provider}, tracer=tracer_provider.get_tracer("bench.broker"))
    parent = trace.set_span_in_context(tracer_provider.get_tracer("bench").start_span("invoke_agent"))
    call = ModelRequest(call_id="bench", prompt=PROMPT)
    try:
        print(f"bench: broker: in-process ({N * K} calls)...", file=sys.stderr, flush=True)
        direct = await time_calls(lambda: provider.complete(MODEL[1], MODEL[2], PROMPT, ""), N * K)
        brokered = await time_calls(lambda: broker.call(*MODEL, call, ATTRIBUTES, parent), N * K)

        async def model(request: ModelRequest, on_chunk: ChunkSink | None) -> ModelAnswer:
            return await broker.call(*MODEL, request, ATTRIBUTES, parent, on_chunk=on_chunk)

        async def no_tools(request: ToolRequest) -> ToolOutcome:
            return ToolOutcome(error="this bench has no tools", error_code="UNAVAILABLE")

        sandbox = await start_sandbox(tmp)
        try:
            async def invoke(k: int) -> None:
                turn = TurnInput(
                    invocation_id=uuid.uuid4().hex,
                    session_id=sandbox.spec.session.removeprefix("sessions/"),
                    version=sandbox.spec.version, payload=json.dumps({"k": k}).encode(),
                    content_type="application/json", state=b"", traceparent="", endpoint="",
                    tenant="default", user="bench", credentials="", deadline_unix_ms=0,
                )
                async for item in sandbox.run(turn, model, no_tools):
                    if isinstance(item, Done):
                        return
                raise RuntimeError("the sandbox ended the invocation without Done")

            print(f"bench: broker: through a bwrap sandbox ({N} invocations x2, K={K})...",
                  file=sys.stderr, flush=True)
            for _ in range(WARM_UP):
                await invoke(0)
                await invoke(K)
            without: list[float] = []
            with_calls: list[float] = []
            for i in range(N):
                # Alternating which goes first, so a slow stretch of the machine hits both.
                for k in ((0, K) if i % 2 else (K, 0)):
                    start = time.perf_counter_ns()
                    await invoke(k)
                    (with_calls if k else without).append(time.perf_counter_ns() - start)
        finally:
            await sandbox.stop()
    finally:
        tracer_provider.shutdown()
    per_call = [(w - wo) / K for w, wo in zip(with_calls, without, strict=True)]
    in_process = summarize_us(direct)
    via_broker = summarize_us(brokered)
    sandboxed = summarize_us(per_call)
    return {
        "k_calls_per_invocation": K,
        "provider_in_process": in_process,
        "broker_call_in_process": via_broker,
        "sandbox_invocation_without_calls": summarize_us(without),
        f"sandbox_invocation_with_{K}_calls": summarize_us(with_calls),
        "sandbox_per_model_call": sandboxed,
        "ratio": {
            "broker_call_over_provider_p50": round(via_broker["median_us"] / in_process["median_us"], 2),
            "sandbox_call_over_provider_p50": round(sandboxed["median_us"] / in_process["median_us"], 2),
            "sandbox_call_over_broker_call_p50": round(sandboxed["median_us"] / via_broker["median_us"], 2),
        },
    }


async def run() -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="corral-bench-broker-") as tmp:
        return await measure(Path(tmp))


def main() -> int:
    print(json.dumps(asyncio.run(run()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
