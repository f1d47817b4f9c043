"""Rollouts over windows with missing data: while an executor reports spans it still holds, or
spans it dropped, in the candidate's window, the analysis is INCONCLUSIVE and the rollout holds
at its step, saying why; it is never promoted over dropped spans."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest

from corral.telemetry.v1 import telemetry_pb2 as tel
from corral.telemetry.v1.telemetry_pb2_grpc import TelemetryServiceStub
from services.common.timestamps import timestamp
from tests.conftest import StartServices
from tests.credentials import token
from tests.rollout_world import TENANT, USER, World, analysis, gate, ready, state, weight
from tests.rpc import fails

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[3]


@asynccontextmanager
async def executor_reports(w: World) -> AsyncIterator[tuple[str, TelemetryServiceStub]]:
    """An exporter name of the test's own and telemetry as an executor reaches it; the reports
    are removed at the end (the database is shared by the run, and drops and backlogs hold up
    every tenant's analyses)."""
    exporter = f"executor-{w.agent}"
    try:
        yield exporter, TelemetryServiceStub(w.internal("telemetry", "executor"))
    finally:
        conn = await asyncpg.connect(w.settings.require_database())
        try:
            await conn.execute("DELETE FROM telemetry.dropped_spans WHERE exporter = $1", exporter)
            await conn.execute(
                "DELETE FROM telemetry.exporter_delivery WHERE exporter = $1", exporter)
        finally:
            await conn.close()


async def rollout_status(w: World) -> str:
    """`corral rollout status AGENT prod` as a user runs it, its output to a pipe."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env |= {"CORRAL_REGISTRY_ADDR": w.settings.addrs["registry"],
            "CORRAL_TOKEN": token(TENANT, USER), "COLUMNS": "1000"}
    status = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from corral.cli import main; main()",
        "rollout", "status", w.agent, "prod",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, errors = await asyncio.wait_for(status.communicate(), 30)
    assert status.returncode == 0, errors.decode()
    return out.decode()


async def test_a_rollout_waits_for_the_spans_an_executor_still_holds(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    async with executor_reports(w) as (exporter, telemetry):
        r = await w.start_rollout(2, [weight(50), gate(60), weight(100)], analysis(20))
        await w.wait(r.name, lambda x: x.current_weight == 50, what="at 50%")
        # An executor could not deliver since a second ago (telemetry was out of its reach).
        since = datetime.now(UTC) - timedelta(seconds=1)
        await telemetry.ReportDelivery(
            tel.ReportDeliveryRequest(exporter=exporter, undelivered_since=timestamp(since)))
        # Both versions serve the same way: without that report, this passes.
        await w.send_sessions(1, 200)
        await w.send_sessions(2, 200)

        held = await w.wait(r.name, lambda x: "missing data" in x.state_reason,
                            what="held for missing data")
        assert state(held) == "PROGRESSING" and held.current_weight == 50
        assert f"not yet delivered by {exporter}" in held.state_reason
        assert held.last_analysis.verdict == tel.VERDICT_INCONCLUSIVE
        assert exporter in held.last_analysis.missing_data

        # It delivered what it held: the same sessions now pass.
        await telemetry.ReportDelivery(tel.ReportDeliveryRequest(exporter=exporter))
        done = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="finished")
        assert state(done) == "SUCCEEDED", done.state_reason
        assert done.last_analysis.verdict == tel.VERDICT_PASS


async def test_a_rollout_is_never_promoted_over_dropped_spans(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    async with executor_reports(w) as (exporter, telemetry):
        r = await w.start_rollout(2, [weight(50), gate(4), weight(100)], analysis(20))
        await w.wait(r.name, lambda x: x.current_weight == 50, what="at 50%")
        now = datetime.now(UTC)
        drop = tel.DroppedSpans(start_time=timestamp(now - timedelta(milliseconds=500)),
                                end_time=timestamp(now), count=37)
        await telemetry.ReportDelivery(tel.ReportDeliveryRequest(exporter=exporter, drops=[drop]))
        await w.send_sessions(1, 200)
        await w.send_sessions(2, 200)

        # The gate's maximum passes without a verdict: a human decides.
        paused = await w.wait(r.name, lambda x: state(x) != "PROGRESSING", what="paused")
        assert state(paused) == "PAUSED", paused.state_reason
        assert paused.current_weight == 50
        assert f"missing data: 37 spans dropped by {exporter}" in paused.state_reason
        assert paused.last_analysis.verdict == tel.VERDICT_INCONCLUSIVE
        # And the user sees why.
        shown = await rollout_status(w)
        assert f"missing data: 37 spans dropped by {exporter}" in shown, shown


async def test_a_report_is_the_executors_alone_and_checked(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    async with executor_reports(w) as (exporter, telemetry):
        now = datetime.now(UTC)
        backwards = tel.DroppedSpans(
            start_time=timestamp(now), end_time=timestamp(now - timedelta(seconds=1)), count=1)
        bad = await fails(grpc.StatusCode.INVALID_ARGUMENT, telemetry.ReportDelivery(
            tel.ReportDeliveryRequest(exporter=exporter, drops=[backwards])))
        assert "drops[0].end_time" in (bad.details() or "")
        as_registry = TelemetryServiceStub(w.internal("telemetry", "registry"))
        await fails(grpc.StatusCode.PERMISSION_DENIED,
                    as_registry.ReportDelivery(tel.ReportDeliveryRequest(exporter=exporter)))
