"""Every method of every service, sent hostile input generated from the proto descriptors
(tests/fuzz.py): each must answer with a status a client can act on — never UNKNOWN or INTERNAL —
with a message short enough to read, and a refused call must store nothing."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from corral.registry.v1 import registry_pb2 as reg
from corral.telemetry.v1 import telemetry_pb2 as tel
from corral.telemetry.v1 import telemetry_pb2_grpc
from services.common.auth.methods import access_for
from services.common.server import ServiceHost
from services.telemetry import otlp
from tests.credentials import internal_channel, public_channel
from tests.fuzz import MB, Case, cases_for, method_path, methods_of, seed
from tests.mesh import Mesh
from tests.otlp import export_request, otlp_span

pytestmark = pytest.mark.timeout(600)

log = logging.getLogger(__name__)

ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ABORTED,
}
# An error message a client can read: the ~200 bytes of input it may quote, and its own words.
MAX_MESSAGE_BYTES = 320
CONCURRENCY = 8

# A unary call must answer; a response stream (a watch) may still be open when the test stops
# reading, which is fine.
UNARY_DEADLINE_S = 30.0
STREAM_READ_S = 3.0


# The agent the plausible messages name: whatever payload it gets, it answers, so that an
# INTERNAL from an invocation is the platform's failure, not the agent's own exception.
ANSWERS_ANYTHING = """
from corral.sdk import App

app = App()


@app.entrypoint
def run(payload, ctx):
    yield "ok"
"""


@dataclass(frozen=True)
class Answer:
    method: str
    case: str
    code: grpc.StatusCode
    details: str


def _target(mesh: Mesh, host: ServiceHost, path: str) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]]:
    """The channel and metadata a caller allowed to call `path` uses: an admin of the test's
    tenant on the public port, or, for an internal method, a service allowed to call it."""
    access = access_for(path)
    assert access is not None, path
    if access.role is not None or access.open or access.any_principal:
        return public_channel(host.address, mesh.tenant, "fuzzer", "admin"), ()
    as_service = min(access.services)
    channel = internal_channel(mesh.settings, host.name, as_service)
    return channel, (("x-corral-tenant", mesh.tenant),)


async def _send(
    channel: grpc.aio.Channel, method: MethodDescriptor, case: Case, metadata: tuple[tuple[str, str], ...]
) -> tuple[grpc.StatusCode, str]:
    """Sends `case`'s bytes as they are (identity serializers) and returns the final status."""
    path = method_path(method)
    # Bytes as they are: the multicallables without serializers send and return bytes.
    raw: Any = channel
    try:
        if not method.client_streaming and not method.server_streaming:
            await raw.unary_unary(path)(
                case.messages[0], metadata=metadata, timeout=UNARY_DEADLINE_S
            )
        elif method.client_streaming and not method.server_streaming:
            await raw.stream_unary(path)(
                iter(case.messages), metadata=metadata, timeout=UNARY_DEADLINE_S
            )
        else:
            if method.client_streaming:
                call = raw.stream_stream(path)(iter(case.messages), metadata=metadata)
            else:
                call = raw.unary_stream(path)(case.messages[0], metadata=metadata)
            try:
                async with asyncio.timeout(STREAM_READ_S):
                    async for _ in call:
                        pass
            except TimeoutError:
                call.cancel()
                return grpc.StatusCode.OK, "still streaming"
        return grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""


async def _row_counts(database_url: str) -> dict[str, int]:
    """Rows in every table of every schema the services made."""
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        if not tables:
            return {}
        query = " UNION ALL ".join(
            f"SELECT '{t['table_schema']}.{t['table_name']}' AS t, count(*) AS n "
            f'FROM "{t["table_schema"]}"."{t["table_name"]}"'
            for t in tables
        )
        return {r["t"]: r["n"] for r in await conn.fetch(query)}
    finally:
        await conn.close()


def _methods(mesh: Mesh) -> list[tuple[ServiceHost, MethodDescriptor]]:
    return [
        (host, method)
        for host in mesh.hosts.values()
        for method in methods_of(host._services)
    ]


async def _fuzz_method(
    mesh: Mesh,
    host: ServiceHost,
    method: MethodDescriptor,
    cases: list[Case],
    limit: asyncio.Semaphore,
) -> list[Answer]:
    path = method_path(method)
    channel, metadata = _target(mesh, host, path)

    async def one(case: Case) -> Answer:
        async with limit:
            code, details = await _send(channel, method, case, metadata)
        return Answer(path, case.what, code, details)

    try:
        return list(await asyncio.gather(*(one(c) for c in cases)))
    finally:
        await channel.close()


async def _seed(mesh: Mesh) -> None:
    """An agent with a version, an endpoint routing to it and a session, for the plausible
    messages to name: a hostile field then meets the code behind the names."""
    agent = await mesh.publish_agent("fz", ANSWERS_ANYTHING)
    await mesh.publish_agent("fz", ANSWERS_ANYTHING + "\n# version 2\n")
    version = await mesh.registry.GetVersion(
        reg.GetVersionRequest(name=f"agents/{agent}/versions/1"), metadata=mesh.me
    )
    await mesh.set_split(agent, "prod", [(1, 100.0)])
    await mesh.invoke(agent, {}, session_id="fz-session")
    digest = version.digest
    seed(
        {"agent": agent, "session": "fz-session", "endpoint": "prod"},
        {
            "digest": digest, "version_digest": digest, "to_version_digest": digest,
            "tenant": mesh.tenant,
            "CompareVersionsRequest.candidate_version": f"agents/{agent}/versions/2",
        },
    )


async def test_every_method_answers_hostile_input_with_a_status_a_client_can_act_on(
    mesh: Mesh,
) -> None:
    await _seed(mesh)
    limit = asyncio.Semaphore(CONCURRENCY)
    wrong: list[str] = []
    unread: list[str] = []
    stored: list[str] = []
    calls = 0
    codes: collections.Counter[str] = collections.Counter()
    database_url = mesh.settings.database_url
    assert database_url is not None
    for host, method in _methods(mesh):
        cases = cases_for(method)
        answers = await _fuzz_method(mesh, host, method, cases, limit)
        calls += len(answers)
        codes.update(a.code.name for a in answers)
        for a in answers:
            if a.code not in ACCEPTABLE:
                wrong.append(f"{a.method} [{a.case}] -> {a.code.name}: {a.details[:200]}")
            if len(a.details.encode()) > MAX_MESSAGE_BYTES:
                unread.append(f"{a.method} [{a.case}] -> {len(a.details.encode())} bytes: {a.details[:100]}")
        # The refused calls once more, alone: the rows must not change. (The accepted ones may
        # store what they were asked to, and so may the good messages a stream sent before its
        # bad one: a Converse turn is served before the next message is read.)
        refused = [
            c for c, a in zip(cases, answers, strict=True)
            if a.code != grpc.StatusCode.OK and len(c.messages) <= 1
        ]
        before = await _row_counts(database_url)
        again = await _fuzz_method(mesh, host, method, refused, limit)
        after = await _row_counts(database_url)
        calls += len(again)
        changed = {t: (before.get(t, 0), n) for t, n in after.items() if before.get(t, 0) != n}
        if changed and all(a.code != grpc.StatusCode.OK for a in again):
            stored.append(f"{method_path(method)}: every call refused, yet rows changed {changed}")
    log.info("sent %d hostile calls (the refused ones twice); first answers: %s", calls, dict(codes))
    assert calls > 1000
    assert not wrong, f"{len(wrong)} calls ended UNKNOWN/INTERNAL/other:\n" + "\n".join(wrong[:80])
    assert not unread, f"{len(unread)} error messages too long:\n" + "\n".join(unread[:40])
    assert not stored, "\n".join(stored)




@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("authorization", "Bearer " + "x" * 7000),
        ("authorization", "Bearer crl_" + "y" * 7000),
        ("authorization", "Bearer eyJ" + "a" * 3000 + "." + "b" * 3000 + ".c"),
        ("authorization", "Basic " + "z" * 7000),
    ],
)
async def test_a_huge_credential_is_refused_with_a_short_message(
    mesh: Mesh, header: str, value: str
) -> None:
    host = mesh.hosts["registry"]
    channel = public_channel(host.address, mesh.tenant)
    try:
        call: Any = channel.unary_unary("/corral.registry.v1.RegistryService/ListAgents")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"", metadata=((header, value),), timeout=10)
    finally:
        await channel.close()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len((info.value.details() or "").encode()) <= MAX_MESSAGE_BYTES


async def test_a_huge_tenant_header_from_a_service_is_refused_with_a_short_message(
    mesh: Mesh,
) -> None:
    host = mesh.hosts["sessions"]
    channel = internal_channel(mesh.settings, "sessions", "executor")
    try:
        call: Any = channel.unary_unary("/corral.sessions.v1.SessionsService/AcquireLease")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"", metadata=(("x-corral-tenant", "t" * 7000),), timeout=10)
    finally:
        await channel.close()
    assert host.name == "sessions"
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len((info.value.details() or "").encode()) <= MAX_MESSAGE_BYTES


async def test_an_exported_span_keeps_only_bounded_attributes(mesh: Mesh) -> None:
    """OTLP Export once stored a 5 MB attribute: what a span carries is cut to the bounds."""
    host = mesh.hosts["telemetry"]
    channel = public_channel(host.address, mesh.tenant, "fuzzer", "admin")
    trace = int.from_bytes(os.urandom(16), "big")
    huge = {"name": "n" * MB, "big": "x" * (5 * MB), "k" * 10_000: "v"}
    many = {f"a{i}": "v" for i in range(1000)}
    try:
        await trace_service_pb2_grpc.TraceServiceStub(channel).Export(
            export_request([otlp_span(trace, 1, 0, 5, {**huge, **many})]), timeout=30
        )
        listed = await telemetry_pb2_grpc.TelemetryServiceStub(channel).ListSpans(
            tel.ListSpansRequest(filter=tel.SpanFilter(trace_id=f"{trace:032x}")), timeout=30
        )
    finally:
        await channel.close()
    [span] = listed.spans
    assert len(span.name) <= otlp.MAX_VALUE_CHARS
    stored = dict(span.attributes)
    assert len(stored) <= otlp.MAX_ATTRIBUTES + 1  # and the count of those left out
    assert all(len(key) <= otlp.MAX_KEY_CHARS for key in stored)
    assert len(stored["big"]) <= otlp.MAX_VALUE_CHARS
