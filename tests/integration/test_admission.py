"""Admission control through the whole mesh: an executor capped at 4 sandboxes, 12 sessions at
once. The 4 admitted run; the other 8 are told at once (while the 4 still run) to come back
later — RESOURCE_EXHAUSTED, EXECUTOR_AT_CAPACITY from the executor, with a retry delay — and
the sandbox processes on the machine never outnumber the cap."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import psutil
import pytest
import pytest_asyncio

from corral.executor.v1 import executor_pb2 as ex
from corral.router.v1 import router_pb2 as rt
from services.common.settings import Settings
from tests.bundles import BEHAVIOUR
from tests.mesh import Mesh, started_mesh
from tests.rpc import error_details, retry_delay_s

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CAP = 4
SESSIONS = 12


@pytest_asyncio.fixture
async def capped(settings: Settings, tmp_path: Path) -> AsyncIterator[Mesh]:
    """The mesh with an executor of CAP sandboxes, none of them stopped to make room (however
    long a session has been idle), so that which sessions are admitted does not depend on time;
    the starts at once are not what binds here."""
    executor = replace(
        settings.executor, max_live_sandboxes=CAP, evict_idle_s=3600.0, max_starting=SESSIONS)
    async with started_mesh(replace(settings, executor=executor), tmp_path) as mesh:
        yield mesh


class SandboxCount:
    """The sandbox processes this process (where the executor runs) has, counted until stopped;
    each sandbox is one child (the worker, or the bwrap or runsc that runs it)."""

    def __init__(self) -> None:
        self.peak = 0

    def now(self) -> int:
        count = 0
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                count += any("corral.sdk._" in part for part in child.cmdline())
        return count

    async def run(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            await asyncio.sleep(0.02)


async def test_sessions_over_the_cap_are_refused_at_once_with_a_retry_delay(capped: Mesh) -> None:
    agent = await capped.publish_agent("capped", BEHAVIOUR)
    count = SandboxCount()
    counting = asyncio.ensure_future(count.run())
    try:
        calls = {
            asyncio.ensure_future(capped.invoke(
                agent, {"mode": "sleep", "seconds": 5}, session_id=f"{capped.prefix}-s{i}"))
            for i in range(SESSIONS)
        }
        refused: list[grpc.aio.AioRpcError] = []
        pending = calls
        while len(refused) < SESSIONS - CAP:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for call in done:
                error = call.exception()
                assert isinstance(error, grpc.aio.AioRpcError), f"an admitted call ended first: {call}"
                refused.append(error)
        # Every refusal came while the admitted sessions' turns were still running.
        assert len(pending) == CAP
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            info, _ = error_details(error)
            assert (info.reason, info.domain) == ("EXECUTOR_AT_CAPACITY", "executor")
            assert f"CORRAL_EXECUTOR_MAX_SANDBOXES={CAP}" in (error.details() or "")
            assert retry_delay_s(error)
        answers = await asyncio.gather(*pending)
        assert all(isinstance(a, rt.InvokeResponse) and a.output.endswith(b"Slept.") for a in answers)
        listing = await capped.executor.ListSandboxes(
            ex.ListSandboxesRequest(), metadata=capped.me)
        assert len(listing.sandboxes) == CAP
    finally:
        counting.cancel()
    assert 0 < count.peak <= CAP
    # Room made by stopping an admitted session: a refused one is admitted on its retry.
    first = answers[0].info.session
    await capped.router.StopSession(rt.StopSessionRequest(name=first), metadata=capped.me)
    retried = await capped.invoke(agent, {}, session_id=f"{capped.prefix}-s-retry")
    assert retried.output == b"Turn 1."
    assert count.now() <= CAP
