"""All five services in-process, an agent in a real sandbox: what it prints, writes to stderr and
logs reaches ListLogs stamped with its ids (its tenant's only, bounded per invocation), and the
traceback of its exception comes back with the error, its frames from the bundle's files."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from corral.telemetry.v1 import telemetry_pb2 as tel
from tests.bundles import DEBUGGED_LINE, debugged_agent, write_bundle
from tests.mesh import Mesh
from tests.rpc import debug_stack, error_details, fails, new_tenant, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]



async def _publish(mesh: Mesh) -> str:
    agent = f"{mesh.prefix}-debugged"
    await mesh.publish(write_bundle(mesh.tmp / agent, debugged_agent(agent)))
    return agent


async def _logs(mesh: Mesh, request: tel.ListLogsRequest, at_least: int) -> list[tel.LogRecord]:
    """The records ListLogs answers once `at_least` have arrived (the executor exports them in
    the background), every page read."""
    async with asyncio.timeout(10):
        while True:
            records: list[tel.LogRecord] = []
            page = tel.ListLogsRequest()
            page.CopyFrom(request)
            while True:
                answer = await mesh.telemetry.ListLogs(page, metadata=mesh.me)
                records += answer.records
                if not answer.next_page_token:
                    break
                page.page_token = answer.next_page_token
            if len(records) >= at_least:
                return records
            await asyncio.sleep(0.1)


async def test_an_agents_output_and_traceback_reach_its_author(mesh: Mesh) -> None:
    agent = await _publish(mesh)
    session = f"{mesh.prefix}-debug"
    ok = await mesh.invoke(agent, {"n": 4}, session_id=session)
    assert ok.output == b"0.25"

    err = await fails(grpc.StatusCode.INTERNAL, mesh.invoke(agent, {"n": 0}, session_id=session))
    assert error_details(err)[0].reason == "AGENT_ERROR"
    stack = debug_stack(err)
    # The agent's frames, named as in its bundle, and none of the runtime's.
    assert stack[0] == "Traceback (most recent call last):"
    assert f'  File "agent.py", line {DEBUGGED_LINE}, in run' in stack
    assert '  File "helpers.py", line 2, in ratio' in stack
    assert "    return str(a / b)" in stack
    assert stack[-1] == "ZeroDivisionError: division by zero"
    assert not [line for line in stack if "_runtime" in line or "site-packages" in line]

    request = tel.ListLogsRequest(agent=f"agents/{agent}", session=f"sessions/{session}")
    records = await _logs(mesh, request, 6)
    said = [(r.source, r.severity_text, r.body) for r in records]
    assert said == [
        ("stdout", "INFO", "starting 4"),
        ("debugged", "INFO", "dividing by 4"),
        ("stderr", "WARN", "a note on stderr"),
        ("stdout", "INFO", "starting 0"),
        ("debugged", "INFO", "dividing by 0"),
        ("stderr", "WARN", "a note on stderr"),
    ]
    first, failed = records[0], records[3]
    assert first.invocation_id == ok.info.invocation_id
    assert failed.invocation_id not in ("", first.invocation_id)
    for r in records:
        assert r.agent == f"agents/{agent}" and r.version == f"agents/{agent}/versions/1"
        assert r.session == f"sessions/{session}"
    # (Their trace and span are the invocation span's: tracing is off in-process, so the e2e test
    # tests/e2e/test_debugging.py checks those.)

    # One invocation's lines alone, and the filters' mistakes named.
    only = await _logs(mesh, tel.ListLogsRequest(
        agent=f"agents/{agent}", invocation_id=failed.invocation_id), 3)
    assert [r.body for r in only] == ["starting 0", "dividing by 0", "a note on stderr"]
    for bad, field in (
        (tel.ListLogsRequest(), "agent"),
        (tel.ListLogsRequest(agent=f"agents/{agent}", version="agents/other/versions/1"),
         "version"),
        (tel.ListLogsRequest(agent=f"agents/{agent}", invocation_id="no spaces"), "invocation_id"),
    ):
        refused = await fails(grpc.StatusCode.INVALID_ARGUMENT,
                              mesh.telemetry.ListLogs(bad, metadata=mesh.me))
        assert error_details(refused)[1] == [field]

    # Another tenant sees none of it, even naming the agent and the invocation.
    other = await mesh.telemetry.ListLogs(request, metadata=who(new_tenant()))
    assert list(other.records) == []

    # A follow token returns only what arrives later.
    first_page = await mesh.telemetry.ListLogs(request, metadata=mesh.me)
    assert first_page.follow_token
    await mesh.invoke(agent, {"n": 2}, session_id=session)
    later = tel.ListLogsRequest()
    later.CopyFrom(request)
    later.page_token = first_page.follow_token
    assert [r.body for r in await _logs(mesh, later, 3)] == [
        "starting 2", "dividing by 2", "a note on stderr"]


async def test_a_flood_of_output_is_cut_at_the_invocations_bound(mesh: Mesh) -> None:
    agent = await _publish(mesh)
    answer = await mesh.invoke(agent, {"n": 1, "flood": 500})  # ~500 KB of lines
    assert answer.output == b"1.0"
    request = tel.ListLogsRequest(agent=f"agents/{agent}", invocation_id=answer.info.invocation_id)
    records = await _logs(mesh, request, 10)
    await asyncio.sleep(0.5)  # nothing more arrives
    records = await _logs(mesh, request, len(records))
    kept = sum(len(r.body.encode()) + 1 for r in records if r.source != "corral")  # + newlines
    assert 60 * 1024 < kept <= 64 * 1024
    assert records[-1].source == "corral" and "truncated" in records[-1].body
    assert records[-1].severity_text == "WARN"
    # The lines kept are the first ones, in order.
    flood = [r.body for r in records if r.body.startswith("0")]
    assert flood[:3] == [f"{i:06d} " + "x" * 1000 for i in range(3)]
