"""A typed, synchronous client for the Corral services: the corral command is built on it, and
scripts can use it directly."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc

from corral import names
from corral.bundle import pack
from corral.config import ClientConfig
from corral.executor.v1 import executor_pb2 as ex
from corral.executor.v1 import executor_pb2_grpc
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import registry_pb2_grpc, rollouts_pb2_grpc, tools_pb2_grpc
from corral.router.v1 import router_pb2 as rt
from corral.router.v1 import router_pb2_grpc
from corral.sessions.v1 import sessions_pb2 as ses
from corral.sessions.v1 import sessions_pb2_grpc
from corral.telemetry.v1 import telemetry_pb2 as tel
from corral.telemetry.v1 import telemetry_pb2_grpc

CHUNK = 1024 * 1024
_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024)]


def parse_split(text: str) -> list[tuple[int, float]]:
    """"1=90,2=10" → [(1, 90.0), (2, 10.0)]."""
    out = []
    for part in text.split(","):
        version, sep, percent = part.strip().partition("=")
        if not sep or not version.strip().isdigit():
            raise ValueError(f"{part!r}: write each share as VERSION=PERCENT, e.g. 1=90,2=10")
        try:
            out.append((int(version), float(percent)))
        except ValueError:
            raise ValueError(f"{part!r}: {percent!r} is not a percentage") from None
    return out


class CorralClient:
    def __init__(self, config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig.from_env()
        self._channels: dict[str, grpc.Channel] = {}
        self.metadata = (("x-corral-tenant", self.config.tenant), ("x-corral-user", self.config.user))

    def _channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            self._channels[service] = grpc.insecure_channel(self.config.addrs[service], options=_OPTIONS)
        return self._channels[service]

    @property
    def registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return registry_pb2_grpc.RegistryServiceStub(self._channel("registry"))

    @property
    def rollouts(self) -> rollouts_pb2_grpc.RolloutServiceStub:
        return rollouts_pb2_grpc.RolloutServiceStub(self._channel("registry"))

    @property
    def router(self) -> router_pb2_grpc.RouterServiceStub:
        return router_pb2_grpc.RouterServiceStub(self._channel("router"))

    @property
    def sessions(self) -> sessions_pb2_grpc.SessionsServiceStub:
        return sessions_pb2_grpc.SessionsServiceStub(self._channel("sessions"))

    @property
    def telemetry(self) -> telemetry_pb2_grpc.TelemetryServiceStub:
        return telemetry_pb2_grpc.TelemetryServiceStub(self._channel("telemetry"))

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    # -- registry ---------------------------------------------------------------------------

    def publish(self, directory: Path) -> reg.Version:
        data = pack(directory)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()

        def messages() -> Iterator[reg.PublishVersionRequest]:
            yield reg.PublishVersionRequest(header=reg.PublishVersionHeader(
                size_bytes=len(data), digest=digest, request_id=uuid.uuid4().hex))
            for i in range(0, len(data), CHUNK):
                yield reg.PublishVersionRequest(chunk=data[i : i + CHUNK])

        return self.registry.PublishVersion(messages(), metadata=self.metadata, timeout=120)

    def versions(self, agent: str) -> list[reg.Version]:
        return list(self._pages(lambda token: self.registry.ListVersions(
            reg.ListVersionsRequest(parent=names.agent_name(agent), page_token=token, page_size=500),
            metadata=self.metadata), "versions"))

    def agents(self) -> list[reg.Agent]:
        return list(self._pages(lambda token: self.registry.ListAgents(
            reg.ListAgentsRequest(page_token=token, page_size=500), metadata=self.metadata), "agents"))

    def endpoints(self, agent: str) -> list[reg.Endpoint]:
        return list(self._pages(lambda token: self.registry.ListEndpoints(
            reg.ListEndpointsRequest(parent=names.agent_name(agent), page_token=token, page_size=500),
            metadata=self.metadata), "endpoints"))

    def get_endpoint(self, agent: str, endpoint: str) -> reg.Endpoint:
        return self.registry.GetEndpoint(
            reg.GetEndpointRequest(name=names.endpoint_name(agent, endpoint)), metadata=self.metadata)

    def set_endpoint(self, agent: str, endpoint: str, split: Iterable[tuple[int, float]], etag: str = "") -> reg.Endpoint:
        body = reg.Endpoint(
            name=names.endpoint_name(agent, endpoint), etag=etag,
            traffic=[reg.TrafficTarget(version=names.version_name(agent, v), percent=p) for v, p in split],
        )
        return self.registry.UpdateEndpoint(
            reg.UpdateEndpointRequest(endpoint=body, allow_missing=True), metadata=self.metadata)

    def audit(self, prefix: str = "", limit: int = 50) -> list[reg.AuditEvent]:
        return list(self.registry.ListAuditEvents(
            reg.ListAuditEventsRequest(resource_prefix=prefix, page_size=limit), metadata=self.metadata).events)

    # -- router -----------------------------------------------------------------------------

    def invoke_stream(
        self, agent: str, payload: bytes, *, endpoint: str = "", version: str = "", session: str = "",
        content_type: str = "application/json",
    ) -> Iterator[rt.InvokeStreamResponse]:
        request = rt.InvokeRequest(
            agent=names.agent_name(agent), endpoint=endpoint, version=version, session_id=session,
            payload=payload, content_type=content_type,
        )
        return self.router.InvokeStream(request, metadata=self.metadata)  # type: ignore[no-any-return]

    def converse(self, requests: Iterator[rt.ConverseRequest]) -> Iterator[rt.ConverseResponse]:
        return self.router.Converse(requests, metadata=self.metadata)  # type: ignore[no-any-return]

    def stop_session(self, session: str) -> None:
        self.router.StopSession(rt.StopSessionRequest(name=names.session_name(session)), metadata=self.metadata)

    # -- sessions ---------------------------------------------------------------------------

    def list_sessions(self, agent: str = "", version: str = "", limit: int = 50) -> list[ses.Session]:
        return list(self.sessions.ListSessions(
            ses.ListSessionsRequest(agent=agent, version=version, page_size=limit), metadata=self.metadata
        ).sessions)

    def get_session(self, session: str) -> ses.Session:
        return self.sessions.GetSession(ses.GetSessionRequest(name=names.session_name(session)), metadata=self.metadata)

    def session_state(self, session: str) -> ses.SessionState:
        return self.sessions.GetSessionState(
            ses.GetSessionStateRequest(name=names.session_name(session)), metadata=self.metadata)

    # -- telemetry --------------------------------------------------------------------------

    def traces(self, span_filter: tel.SpanFilter, limit: int = 20) -> list[tel.TraceSummary]:
        return list(self.telemetry.ListTraces(
            tel.ListTracesRequest(filter=span_filter, page_size=limit), metadata=self.metadata).traces)

    def spans(self, span_filter: tel.SpanFilter, limit: int = 100) -> list[tel.Span]:
        return list(self.telemetry.ListSpans(
            tel.ListSpansRequest(filter=span_filter, page_size=limit), metadata=self.metadata).spans)

    def metrics(self, agent: str) -> list[tel.VersionMetrics]:
        return list(self.telemetry.GetVersionMetrics(
            tel.GetVersionMetricsRequest(agent=names.agent_name(agent)), metadata=self.metadata).versions)

    @staticmethod
    def _pages(fetch, field: str):  # type: ignore[no-untyped-def]
        token = ""
        while True:
            page = fetch(token)
            yield from getattr(page, field)
            token = page.next_page_token
            if not token:
                return

    @property
    def tools(self) -> tools_pb2_grpc.ToolServiceStub:
        """The tenant's tools (corral tools ...); served by the registry."""
        return tools_pb2_grpc.ToolServiceStub(self._channel("registry"))

    def sandboxes(self) -> ex.ListSandboxesResponse:
        """The executor's sandboxes and warm pools (an operator's view, across tenants)."""
        stub = executor_pb2_grpc.ExecutorServiceStub(self._channel("executor"))
        return stub.ListSandboxes(ex.ListSandboxesRequest(), metadata=self.metadata)
