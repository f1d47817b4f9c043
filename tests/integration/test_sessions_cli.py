"""`corral sessions list` against a real sessions service, PostgreSQL and Redis: what a user
sees of their tenant's sessions, a page at a time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from click.testing import CliRunner, Result

from corral.cli import State, cli
from corral.sessions.v1 import sessions_pb2 as pb
from corral.sessions.v1 import sessions_pb2_grpc
from tests.credentials import internal_channel, token
from tests.harness import Platform
from tests.rpc import new_tenant, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DIGEST = "sha256:" + "0f" * 32


@pytest_asyncio.fixture
async def stub(services: Platform) -> AsyncIterator[sessions_pb2_grpc.SessionsServiceAsyncStub]:
    await services.start("sessions")
    async with internal_channel(services.settings, "sessions", "router") as channel:
        yield sessions_pb2_grpc.SessionsServiceStub(channel)


async def corral(services: Platform, tenant: str, *args: str) -> Result:
    """`corral <args> --json` as alice of `tenant` would run it (her token in CORRAL_TOKEN)."""

    def run() -> Result:
        state = State()
        try:
            return CliRunner().invoke(
                cli, [*args, "--json"], obj=state, env={
                    "CORRAL_SESSIONS_ADDR": services.settings.addrs["sessions"],
                    "CORRAL_TOKEN": token(tenant), "CORRAL_API_KEY": None, "CORRAL_PROFILE": None,
                })
        finally:
            state.client.close()

    return await asyncio.to_thread(run)


def listed(result: Result) -> list[str]:
    assert result.exit_code == 0, (result.output, result.exception)
    return [s["name"].removeprefix("sessions/") for s in json.loads(result.stdout)]


def next_token(result: Result) -> str:
    """The token the listing says continues it, or "" when it says nothing."""
    words = result.stderr.split()
    return words[words.index("--page-token") + 1] if "--page-token" in words else ""


async def test_sessions_list_is_newest_first_and_pages_through_every_session(
    services: Platform, stub: sessions_pb2_grpc.SessionsServiceAsyncStub
) -> None:
    tenant = new_tenant()
    ids = [f"{tenant}-{i}" for i in range(5)]
    for session_id in ids:  # oldest first
        await stub.CreateSession(pb.CreateSessionRequest(session_id=session_id, session=pb.Session(
            agent="agents/demo", version="agents/demo/versions/1", version_digest=DIGEST,
        )), metadata=who(tenant))
    newest_first = ids[::-1]

    first = await corral(services, tenant, "sessions", "list", "--limit", "2")
    assert listed(first) == newest_first[:2]
    second = await corral(services, tenant, "sessions", "list", "--limit", "2",
                          "--page-token", next_token(first))
    assert listed(second) == newest_first[2:4]
    last = await corral(services, tenant, "sessions", "list", "--limit", "2",
                        "--page-token", next_token(second))
    assert listed(last) == newest_first[4:] and next_token(last) == ""

    every = await corral(services, tenant, "sessions", "list", "--all")
    assert listed(every) == newest_first and next_token(every) == ""
    assert listed(await corral(services, new_tenant(), "sessions", "list", "--all")) == []

    refused = await corral(services, tenant, "sessions", "list", "--page-token", "not-a-token")
    assert isinstance(refused.exception, grpc.RpcError)
    assert refused.exception.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (refused.exception.details() or "")
