"""All five services in-process, telemetry stopped and started again under them: turns made while
it is down answer as usual and their spans and output reach telemetry once it is back (the
executor held them); an executor that had to drop spans says so, and an analysis over a window
they belong to is INCONCLUSIVE, naming them, while one before the outage is not held up."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from corral.router.v1 import router_pb2 as rt
from corral.telemetry.v1 import telemetry_pb2 as tel
from corral.telemetry.v1.telemetry_pb2_grpc import TelemetryServiceStub
from services.common.export_buffer import BufferLimits
from services.common.settings import Settings
from services.common.timestamps import timestamp
from tests import harness
from tests.credentials import internal_channel
from tests.mesh import Mesh, connect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def draft_spans(mesh: Mesh, session: str, count: int) -> list[tel.Span]:
    """The agent's `draft_note` spans of `session`, once there are `count`."""
    query = tel.ListSpansRequest(filter=tel.SpanFilter(session=f"sessions/{session}"))
    async with asyncio.timeout(30):
        while True:
            spans = [s for s in (await mesh.telemetry.ListSpans(query, metadata=mesh.me)).spans
                     if s.name == "draft_note"]
            if len(spans) >= count:
                return spans
            await asyncio.sleep(0.2)


async def turns(mesh: Mesh, agent: str, session: str, n: int) -> list[rt.InvokeResponse]:
    return [await mesh.invoke(agent, endpoint="prod", session_id=session) for _ in range(n)]


def exporter_of(settings: Settings) -> str:
    """The name the executor reports its deliveries under (kept beside what it spills)."""
    return (settings.data_dir / "telemetry-buffer" / "exporter").read_text().strip()


async def forget_reports(settings: Settings, exporter: str) -> None:
    """The database is shared by the run: this executor's drops must not hold up another test's
    analyses."""
    conn = await asyncpg.connect(settings.require_database())
    try:
        await conn.execute("DELETE FROM telemetry.dropped_spans WHERE exporter = $1", exporter)
        await conn.execute("DELETE FROM telemetry.exporter_delivery WHERE exporter = $1", exporter)
    finally:
        await conn.close()


async def delivered_everything(settings: Settings, exporter: str) -> None:
    """Waits for the executor's report that it holds nothing (made once it is through a backlog:
    an executor that was never behind has no row)."""
    conn = await asyncpg.connect(settings.require_database())
    try:
        async with asyncio.timeout(30):
            while True:
                row = await conn.fetchrow(
                    "SELECT undelivered_since FROM telemetry.exporter_delivery WHERE exporter = $1",
                    exporter)
                if row is not None and row["undelivered_since"] is None:
                    return
                await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def test_turns_made_while_telemetry_is_down_reach_it_once_it_is_back(
    settings: Settings, tmp_path: Path
) -> None:
    platform = await harness.start_mesh(harness.with_tracing(settings))
    exporter = exporter_of(platform.settings)
    try:
        async with connect(platform.settings, platform.hosts, tmp_path) as mesh:
            agent = await mesh.publish_examples()
            await mesh.set_split(agent, "prod", [(1, 100)])
            session = f"{mesh.prefix}-outage"
            await turns(mesh, agent, session, 1)
            await draft_spans(mesh, session, 1)

            await platform.hosts["telemetry"].stop(grace=0.5)
            during = await turns(mesh, agent, session, 3)
            assert [r.output.split(b".")[0] for r in during] == [b"Turn 2", b"Turn 3", b"Turn 4"]
            await platform.start("telemetry")

            spans = await draft_spans(mesh, session, 4)
            assert sorted(s.attributes["progress_report.turn"] for s in spans) == [1, 2, 3, 4]
            await delivered_everything(platform.settings, exporter)
    finally:
        await platform.stop()
        await forget_reports(platform.settings, exporter)


async def test_a_restarted_executor_sends_what_it_held_when_it_stopped(
    settings: Settings, tmp_path: Path
) -> None:
    platform = await harness.start_mesh(harness.with_tracing(settings))
    exporter = exporter_of(platform.settings)
    spill_dir = platform.settings.data_dir / "telemetry-buffer"
    try:
        async with connect(platform.settings, platform.hosts, tmp_path) as mesh:
            agent = await mesh.publish_examples()
            await mesh.set_split(agent, "prod", [(1, 100)])
            session = f"{mesh.prefix}-restarted"
            await turns(mesh, agent, session, 1)
            await draft_spans(mesh, session, 1)

            await platform.hosts["telemetry"].stop(grace=0.5)
            await turns(mesh, agent, session, 2)
            await platform.hosts["executor"].stop(grace=0.5)
            assert list(spill_dir.glob("*.otlp")), "the executor wrote what it held to disk"
            await platform.start("telemetry", "executor")

            spans = await draft_spans(mesh, session, 3)
            assert sorted(s.attributes["progress_report.turn"] for s in spans) == [1, 2, 3]
            await delivered_everything(platform.settings, exporter)
            assert list(spill_dir.glob("*.otlp")) == []
    finally:
        await platform.stop()
        await forget_reports(platform.settings, exporter)


async def test_spans_dropped_in_an_outage_make_the_analysis_of_their_window_inconclusive(
    settings: Settings, tmp_path: Path
) -> None:
    # An executor that holds one batch in memory and nothing on disk: of the two turns made while
    # telemetry is down, the second's spans are dropped.
    one = replace(settings.executor, telemetry_buffer=BufferLimits(memory_bytes=1, disk_bytes=0))
    platform = await harness.start_mesh(replace(harness.with_tracing(settings), executor=one))
    exporter = exporter_of(platform.settings)
    try:
        async with connect(platform.settings, platform.hosts, tmp_path) as mesh:
            agent = await mesh.publish_examples()
            await mesh.set_split(agent, "prod", [(1, 100)])
            session = f"{mesh.prefix}-dropped"
            await turns(mesh, agent, session, 1)
            await draft_spans(mesh, session, 1)
            before = datetime.now(UTC)

            await platform.hosts["telemetry"].stop(grace=0.5)
            await turns(mesh, agent, session, 2)  # answered; their spans have nowhere to go
            await platform.start("telemetry")
            await draft_spans(mesh, session, 2)  # the one held
            await turns(mesh, agent, session, 1)

            spans = await draft_spans(mesh, session, 3)
            assert sorted(s.attributes["progress_report.turn"] for s in spans) == [1, 2, 4]
            registry = internal_channel(platform.settings, "telemetry", "registry")
            try:
                analyses = TelemetryServiceStub(registry)

                async def compare(start: datetime, end: datetime) -> tel.CompareVersionsResponse:
                    return await analyses.CompareVersions(tel.CompareVersionsRequest(
                        agent=f"agents/{agent}", baseline_version=f"agents/{agent}/versions/1",
                        candidate_version=f"agents/{agent}/versions/2", start_time=timestamp(start),
                        end_time=timestamp(end), min_sessions=1,
                    ))

                # The executor reports its drops once telemetry is back (before its next export).
                async with asyncio.timeout(30):
                    while not (answer := await compare(before, datetime.now(UTC))).missing_data:
                        await asyncio.sleep(0.2)
                assert answer.verdict == tel.VERDICT_INCONCLUSIVE
                assert f"spans dropped by {exporter}" in answer.missing_data
                assert answer.missing_data in answer.reason
                # A window that ended before the outage is not held up.
                earlier = await compare(before - timedelta(minutes=5), before)
                assert earlier.missing_data == ""
            finally:
                await registry.close()
    finally:
        await platform.stop()
        await forget_reports(platform.settings, exporter)
