"""OTLP over HTTP against a real telemetry server and PostgreSQL: POST /v1/traces (and /v1/logs) in binary
protobuf, JSON (hex ids) and gzip, with the trust rules of the gRPC export (a user's spans land in
its own tenant and never count), and the HTTP status an exporter acts on for each refusal."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from corral.telemetry.v1 import telemetry_pb2 as pb
from corral.telemetry.v1.telemetry_pb2_grpc import TelemetryServiceStub
from services.common.settings import Settings
from services.telemetry.otlp_http import MAX_BODY_BYTES
from tests import harness
from tests.credentials import public_channel
from tests.otlp import export_request, invocation, logs_request, otlp_span
from tests.rpc import who
from tests.telemetry_client import uid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
PROTOBUF, JSON = "application/x-protobuf", "application/json"


@dataclass
class Receiver:
    url: str
    api: TelemetryServiceStub
    http: httpx.AsyncClient

    async def post(self, body: bytes, content_type: str = PROTOBUF, tenant: str = "",
                   role: str = "operator", **headers: str) -> httpx.Response:
        credential = dict(who(tenant, user="", role=role)) if tenant else {}
        return await self.http.post(self.url, content=body, headers={
            "Content-Type": content_type, **credential, **headers})

    async def spans(self, tenant: str) -> list[pb.Span]:
        listed = await self.api.ListSpans(pb.ListSpansRequest(page_size=1000),
                                          metadata=who(tenant, user=""))
        return list(listed.spans)


@pytest_asyncio.fixture
async def receiver(settings: Settings, tmp_path: Path) -> AsyncIterator[Receiver]:
    port = harness.held_port()
    s = harness.make_settings(settings.database_url or "", settings.redis_url or "", tmp_path,
                              CORRAL_OTLP_HTTP_PORT=str(port.port))
    platform = harness.Platform(s)
    try:
        await platform.start("telemetry")
        channel = public_channel(platform.settings.addrs["telemetry"])
        async with httpx.AsyncClient(timeout=10) as http:
            yield Receiver(f"http://127.0.0.1:{port.port}/v1/traces", TelemetryServiceStub(channel), http)
        await channel.close()
    finally:
        port.close()
        await platform.stop()


def batch(tenant_claimed: str, agent: str = "") -> ExportTraceServiceRequest:
    """One invocation span of version 1 of `agent` claiming to be `tenant_claimed`'s."""
    return export_request([otlp_span(
        uuid.uuid4().int >> 1, 1, 0, 5,
        invocation(agent or f"agents/pr-{uid()}", 1, f"sessions/{uid()}", tenant_claimed))])


def status_of(response: httpx.Response) -> status_pb2.Status:
    status = status_pb2.Status()
    if response.headers["content-type"].startswith(PROTOBUF):
        status.ParseFromString(response.content)
    else:
        json_format.Parse(response.text, status, ignore_unknown_fields=True)
    return status


async def test_a_users_protobuf_export_lands_in_its_own_tenant_and_never_counts(receiver: Receiver) -> None:
    tenant, agent = f"h-{uid()}", f"agents/pr-{uid()}"
    sent = batch("someone-else", agent)
    response = await receiver.post(sent.SerializeToString(), tenant=tenant)
    assert response.status_code == 200 and response.headers["content-type"].startswith(PROTOBUF)
    answer = ExportTraceServiceResponse.FromString(response.content)
    assert not answer.HasField("partial_success")

    [span] = await receiver.spans(tenant)
    assert span.trace_id == sent.resource_spans[0].scope_spans[0].spans[0].trace_id.hex()
    assert (span.tenant, span.version) == (tenant, f"{agent}/versions/1")
    assert await receiver.spans("someone-else") == []
    metrics = await receiver.api.GetVersionMetrics(
        pb.GetVersionMetricsRequest(agent=agent), metadata=who(tenant, user=""))
    assert [m.invocations for m in metrics.versions] in ([], [0])


async def test_json_with_hex_ids_and_gzip_are_accepted(receiver: Receiver) -> None:
    tenant = f"h-{uid()}"
    sent = batch(tenant)
    document = json_format.MessageToDict(sent)
    span = document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    # OTLP/JSON ids are hex, not proto3's base64.
    span["traceId"], span["spanId"] = uuid.uuid4().hex, "0102030405060708"
    response = await receiver.post(json.dumps(document).encode(), JSON, tenant=tenant)
    assert response.status_code == 200 and response.headers["content-type"].startswith(JSON)
    assert response.json() == {}
    [stored] = await receiver.spans(tenant)
    assert (stored.trace_id, stored.span_id) == (span["traceId"], "0102030405060708")

    compressed = gzip.compress(batch(tenant).SerializeToString())
    response = await receiver.post(compressed, tenant=tenant, **{"Content-Encoding": "gzip"})
    assert response.status_code == 200
    assert len(await receiver.spans(tenant)) == 2


async def test_spans_with_wrong_sized_ids_are_a_partial_success(receiver: Receiver) -> None:
    tenant = f"h-{uid()}"
    document = json_format.MessageToDict(batch(tenant))
    span = document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    span["traceId"], span["spanId"] = uuid.uuid4().hex, "0102"  # a span id must be 8 bytes
    response = await receiver.post(json.dumps(document).encode(), JSON, tenant=tenant)
    assert response.status_code == 200
    assert response.json()["partialSuccess"]["rejectedSpans"] == "1"
    assert await receiver.spans(tenant) == []


async def test_who_may_export(receiver: Receiver) -> None:
    body = batch("x").SerializeToString()
    anonymous = await receiver.post(body)
    assert anonymous.status_code == 401
    assert status_of(anonymous).code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "Bearer" in status_of(anonymous).message
    forged = await receiver.post(body, Authorization="Bearer not-a-credential")
    assert forged.status_code == 401
    # Export needs the operator role, over HTTP as over gRPC.
    viewer = await receiver.post(body, tenant=f"h-{uid()}", role="viewer")
    assert viewer.status_code == 403 and "operator" in status_of(viewer).message


@pytest.mark.parametrize(("body", "content_type", "headers", "code", "says"), [
    (b"\xff\xff\xff", PROTOBUF, {}, 400, "binary protobuf"),
    (b"{not json", JSON, {}, 400, "OTLP/JSON"),
    (b"[]", JSON, {}, 400, "JSON object"),
    (json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}).encode(),
     JSON, {}, 400, "resourceSpans[0].scopeSpans[0].spans[0].traceId"),
    (b"gzip?", PROTOBUF, {"Content-Encoding": "gzip"}, 400, "gzip"),
    (b"", "text/plain", {}, 415, "Content-Type"),
    (b"", PROTOBUF, {"Content-Encoding": "br"}, 415, "Content-Encoding"),
    (gzip.compress(b"\x00" * (MAX_BODY_BYTES + 1)), PROTOBUF, {"Content-Encoding": "gzip"}, 413,
     "larger than"),
], ids=["protobuf", "json", "json-array", "hex-id", "gzip", "content-type", "encoding", "gzip-bomb"])
async def test_bad_requests_get_the_status_an_exporter_acts_on(
    receiver: Receiver, body: bytes, content_type: str, headers: dict[str, str], code: int, says: str,
) -> None:
    response = await receiver.post(body, content_type, tenant=f"h-{uid()}", **headers)
    assert response.status_code == code, response.text
    assert says in status_of(response).message or says in response.text


async def test_a_body_over_the_limit_is_413_before_it_is_read(receiver: Receiver) -> None:
    response = await receiver.post(b"\x00" * (MAX_BODY_BYTES + 1), tenant=f"h-{uid()}")
    assert response.status_code == 413
    assert "larger than" in status_of(response).message


async def test_only_post_is_served(receiver: Receiver) -> None:
    assert (await receiver.http.get(receiver.url)).status_code == 405


async def test_logs_over_http_land_in_the_exporters_own_tenant(receiver: Receiver) -> None:
    """POST /v1/logs takes OTLP/JSON and protobuf logs in as LogsService/Export does: a user's
    records are its own tenant's whatever their resource claims."""
    mallory, agent = f"h-{uid()}", f"agents/l-{uid()}"
    url = receiver.url.replace("/v1/traces", "/v1/logs")
    forged = logs_request("someone-else", agent, "inv1", "printed by the agent")
    document = json_format.MessageToDict(forged)
    credential = dict(who(mallory, user="", role="operator"))
    response = await receiver.http.post(url, content=json.dumps(document).encode(),
                                        headers={"Content-Type": JSON, **credential})
    assert response.status_code == 200, response.text
    response = await receiver.http.post(
        url, content=logs_request("x", agent, "inv2", "and again").SerializeToString(),
        headers={"Content-Type": PROTOBUF, **credential})
    assert response.status_code == 200 and not ExportLogsServiceResponse.FromString(
        response.content).HasField("partial_success")

    async def bodies(tenant: str) -> list[str]:
        listed = await receiver.api.ListLogs(pb.ListLogsRequest(agent=agent, page_size=100),
                                             metadata=who(tenant, user=""))
        return [r.body for r in listed.records]

    assert await bodies(mallory) == ["printed by the agent", "and again"]
    assert await bodies("someone-else") == []
    anonymous = await receiver.http.post(url, content=b"{}", headers={"Content-Type": JSON})
    assert anonymous.status_code == 401
