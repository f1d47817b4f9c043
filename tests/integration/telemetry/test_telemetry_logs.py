"""Agents' log records through a real telemetry server and PostgreSQL: the executor's exports are
filed under the tenant they name and bounded per invocation over every export; a user's own
export lands in the user's tenant whatever it claims."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc

from corral.telemetry.v1 import telemetry_pb2 as pb
from tests.credentials import internal_channel
from tests.otlp import logs_request
from tests.rpc import who
from tests.telemetry_client import Telemetry, uid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _logs_service(channel: grpc.aio.Channel) -> logs_service_pb2_grpc.LogsServiceStub:
    return logs_service_pb2_grpc.LogsServiceStub(channel)  # type: ignore[no-untyped-call]


async def _bodies(telemetry: Telemetry, tenant: str, agent: str) -> list[str]:
    answer = await telemetry.api.ListLogs(
        pb.ListLogsRequest(agent=agent, page_size=1000), metadata=who(tenant))
    return [r.body for r in answer.records]


async def test_an_invocations_logs_are_bounded_over_its_exports(telemetry: Telemetry) -> None:
    tenant, agent, line = f"t-{uid()}", f"agents/l-{uid()}", "q" * 1023
    async with internal_channel(telemetry.settings, "telemetry", "executor") as channel:
        executor = _logs_service(channel)
        for _ in range(3):
            await executor.Export(logs_request(tenant, agent, "inv1", *[line] * 40))
        await executor.Export(logs_request(tenant, agent, "inv2", "the next invocation"))
    bodies = await _bodies(telemetry, tenant, agent)
    assert bodies[:64] == [line] * 64
    assert bodies[64].startswith("[output truncated") and bodies[65:] == ["the next invocation"]


async def test_a_users_export_lands_in_its_own_tenant(telemetry: Telemetry) -> None:
    victim, mallory, agent = f"v-{uid()}", f"m-{uid()}", f"agents/l-{uid()}"
    users = _logs_service(telemetry.channel)
    forged = logs_request(victim, agent, "inv1", "I am the victim's agent")
    await users.Export(forged, metadata=who(mallory, role="operator"))
    assert await _bodies(telemetry, victim, agent) == []
    assert await _bodies(telemetry, mallory, agent) == ["I am the victim's agent"]
