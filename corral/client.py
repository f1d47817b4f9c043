"""A typed, synchronous client for the Corral services: the corral command is built on it, and
scripts can use it directly. Each method makes one call (or one listing's pages) with the
caller's tenant and user, and returns the service's messages."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from corral import names, retries
from corral.bundle import digest_of, pack
from corral.config import ClientConfig
from corral.executor.v1 import executor_pb2 as ex
from corral.executor.v1 import executor_pb2_grpc
from corral.identity.v1 import identity_pb2, identity_pb2_grpc
from corral.registry.v1 import keys_pb2 as ks
from corral.registry.v1 import keys_pb2_grpc, registry_pb2_grpc, rollouts_pb2_grpc, tools_pb2_grpc
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as ro
from corral.registry.v1 import tools_pb2 as tls
from corral.router.v1 import router_pb2 as rt
from corral.router.v1 import router_pb2_grpc
from corral.sessions.v1 import fleet_pb2 as flt
from corral.sessions.v1 import fleet_pb2_grpc, sessions_pb2_grpc
from corral.sessions.v1 import sessions_pb2 as ses
from corral.telemetry.v1 import telemetry_pb2 as tel
from corral.telemetry.v1 import telemetry_pb2_grpc

CHUNK = 1024 * 1024
# PublishVersion's initial metadata while the registry starts the new version (registry.proto).
VERSION_HEADER = "corral-version"
START_CHECK_HEADER = "corral-start-check"
_OPTIONS: list[tuple[str, str | int]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024)]


def _target(address: str) -> tuple[str, list[tuple[str, str | int]]]:
    """The gRPC target for an address setting: one host:port, or replicas as a comma-separated
    list of ip:port, called round-robin (those that stop answering are left out)."""
    parts = [p.strip() for p in address.split(",") if p.strip()]
    if len(parts) <= 1:
        return address, list(_OPTIONS)
    family = "ipv6" if parts[0].startswith("[") else "ipv4"
    return f"{family}:{','.join(parts)}", [*_OPTIONS, ("grpc.lb_policy_name", "round_robin")]


# Listings that a command shows whole are read in pages this large.
_PAGE = 500


class Page(Protocol):
    """A List response: its items are in a field of its own, the next page's token in this."""

    @property
    def next_page_token(self) -> str: ...


class PublishProgress(Protocol):
    """Told how a publish goes: bytes uploaded so far, then the version the registry starts."""

    def uploaded(self, sent: int, total: int) -> None: ...

    def checking(self, version: str) -> None: ...


P = TypeVar("P", bound=Page)
T = TypeVar("T")


def pages(fetch: Callable[[str], P], items: Callable[[P], Iterable[T]]) -> Iterator[T]:
    """Every item of a listing: `fetch(token)` gets one page, `items(page)` its items."""
    token = ""
    while True:
        page = fetch(token)
        yield from items(page)
        token = page.next_page_token
        if not token:
            return


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


S = TypeVar("S")


class _Stub(Generic[S]):
    """A client's stub for one gRPC service, on the channel to the Corral service serving it."""

    def __init__(self, service: str, stub: Callable[[grpc.Channel], S]) -> None:
        self.service = service
        self.stub = stub

    def __get__(self, client: CorralClient, owner: type[CorralClient]) -> S:
        return self.stub(client.channel(self.service))


def _invoke_request(
    agent: str, payload: bytes, endpoint: str, version: str, session: str, content_type: str,
    request_id: str,
) -> rt.InvokeRequest:
    """One turn's request, under `request_id` or a new one: every attempt sends the same."""
    return rt.InvokeRequest(
        agent=names.agent_name(agent), endpoint=endpoint, version=version, session_id=session,
        payload=payload, content_type=content_type,
        request_id=request_id or retries.new_request_id(),
    )


class CorralClient:
    registry = _Stub("registry", registry_pb2_grpc.RegistryServiceStub)
    rollouts = _Stub("registry", rollouts_pb2_grpc.RolloutServiceStub)
    # The tenant's tools (corral tools ...).
    tools = _Stub("registry", tools_pb2_grpc.ToolServiceStub)
    # API keys (corral keys ...).
    api_keys = _Stub("registry", keys_pb2_grpc.KeyServiceStub)
    # Every service answers it; the registry, which keeps the keys, is asked.
    identity = _Stub("registry", identity_pb2_grpc.IdentityServiceStub)
    router = _Stub("router", router_pb2_grpc.RouterServiceStub)
    sessions = _Stub("sessions", sessions_pb2_grpc.SessionsServiceStub)
    # The executor fleet (corral executors ...), which the sessions service keeps.
    fleet = _Stub("sessions", fleet_pb2_grpc.FleetServiceStub)
    telemetry = _Stub("telemetry", telemetry_pb2_grpc.TelemetryServiceStub)
    executor = _Stub("executor", executor_pb2_grpc.ExecutorServiceStub)

    def __init__(
        self, config: ClientConfig | None = None, retry_policy: retries.RetryPolicy | None = None
    ) -> None:
        self.config = config or ClientConfig.from_env()
        # How turns (which carry request ids, so are safe to send again) are retried.
        self.retry_policy = retry_policy or retries.RetryPolicy()
        self._channels: dict[str, grpc.Channel] = {}
        # The services take the caller, and its tenant, from the credential alone.
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {self.config.credential}"),) if self.config.credential else ()
        )

    def channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            address, options = _target(self.config.addrs[service])
            if self.config.tls:
                ca = self.config.ca_file.read_bytes() if self.config.ca_file else None
                credentials = grpc.ssl_channel_credentials(root_certificates=ca)
                self._channels[service] = grpc.secure_channel(address, credentials, options)
            else:
                self._channels[service] = grpc.insecure_channel(address, options=options)
        return self._channels[service]

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    # -- registry: agents, versions, endpoints, audit ---------------------------------------

    def publish(self, directory: Path) -> reg.Version:
        """Packs `directory` as it is (dependencies already in deps/) and publishes it."""
        return self.publish_bundle(pack(directory))

    def publish_bundle(self, data: bytes, progress: PublishProgress | None = None) -> reg.Version:
        """Publishes a packed bundle; the same bytes again return the existing version. The
        registry starts a new version once before DEFAULT moves to it: a version that cannot
        start fails FAILED_PRECONDITION (reason VERSION_CANNOT_START)."""

        def messages() -> Iterator[reg.PublishVersionRequest]:
            yield reg.PublishVersionRequest(header=reg.PublishVersionHeader(
                size_bytes=len(data), digest=digest_of(data), request_id=uuid.uuid4().hex))
            for i in range(0, len(data), CHUNK):
                chunk = data[i : i + CHUNK]
                yield reg.PublishVersionRequest(chunk=chunk)
                if progress is not None:
                    progress.uploaded(i + len(chunk), len(data))

        call = self.registry.PublishVersion.future(messages(), metadata=self.metadata, timeout=180)
        if progress is not None:
            # Sent once the version is stored and being started; with the response otherwise.
            headers = dict(call.initial_metadata() or ())
            if headers.get(START_CHECK_HEADER) == "running":
                progress.checking(str(headers.get(VERSION_HEADER, "")))
        return call.result()

    def get_version(self, name: str) -> reg.Version:
        return self.registry.GetVersion(reg.GetVersionRequest(name=name), metadata=self.metadata)

    def versions(self, agent: str) -> list[reg.Version]:
        parent = names.agent_name(agent)
        return list(pages(
            lambda token: self.registry.ListVersions(reg.ListVersionsRequest(
                parent=parent, page_token=token, page_size=_PAGE), metadata=self.metadata),
            lambda page: page.versions))

    def agents(self) -> list[reg.Agent]:
        return list(pages(lambda token: self.registry.ListAgents(
            reg.ListAgentsRequest(page_token=token, page_size=_PAGE), metadata=self.metadata),
            lambda page: page.agents))

    def endpoints(self, agent: str) -> list[reg.Endpoint]:
        request = reg.ListEndpointsRequest(parent=names.agent_name(agent), page_size=_PAGE)

        def fetch(token: str) -> reg.ListEndpointsResponse:
            request.page_token = token
            return self.registry.ListEndpoints(request, metadata=self.metadata)

        return list(pages(fetch, lambda page: page.endpoints))

    def get_endpoint(self, agent: str, endpoint: str) -> reg.Endpoint:
        request = reg.GetEndpointRequest(name=names.endpoint_name(agent, endpoint))
        return self.registry.GetEndpoint(request, metadata=self.metadata)

    def set_endpoint(
        self, agent: str, endpoint: str, split: Iterable[tuple[int, float]], etag: str = ""
    ) -> reg.Endpoint:
        body = reg.Endpoint(
            name=names.endpoint_name(agent, endpoint), etag=etag,
            traffic=[reg.TrafficTarget(version=names.version_name(agent, v), percent=p)
                     for v, p in split],
        )
        request = reg.UpdateEndpointRequest(endpoint=body, allow_missing=True)
        return self.registry.UpdateEndpoint(request, metadata=self.metadata)

    def delete_agent(self, agent: str, *, force: bool = False) -> None:
        request = reg.DeleteAgentRequest(name=names.agent_name(agent), force=force)
        self.registry.DeleteAgent(request, metadata=self.metadata)

    def delete_version(self, agent: str, number: int) -> None:
        request = reg.DeleteVersionRequest(name=names.version_name(agent, number))
        self.registry.DeleteVersion(request, metadata=self.metadata)

    def delete_endpoint(self, agent: str, endpoint: str, etag: str = "") -> None:
        request = reg.DeleteEndpointRequest(name=names.endpoint_name(agent, endpoint), etag=etag)
        self.registry.DeleteEndpoint(request, metadata=self.metadata)

    def audit(self, prefix: str = "", limit: int = 50) -> list[reg.AuditEvent]:
        request = reg.ListAuditEventsRequest(resource_prefix=prefix, page_size=limit)
        return list(self.registry.ListAuditEvents(request, metadata=self.metadata).events)

    # -- registry: rollouts and experiments -------------------------------------------------

    def create_rollout(self, endpoint: names.EndpointRef, rollout: ro.Rollout) -> ro.Rollout:
        request = ro.CreateRolloutRequest(parent=endpoint.name, rollout=rollout)
        return self.rollouts.CreateRollout(request, metadata=self.metadata)

    def get_rollout(self, rollout: names.RolloutRef) -> ro.Rollout:
        request = ro.GetRolloutRequest(name=rollout.name)
        return self.rollouts.GetRollout(request, metadata=self.metadata)

    def list_rollouts(self, endpoint: names.EndpointRef, limit: int = 100) -> list[ro.Rollout]:
        request = ro.ListRolloutsRequest(parent=endpoint.name, page_size=limit)
        return list(self.rollouts.ListRollouts(request, metadata=self.metadata).rollouts)

    def promote_rollout(self, rollout: names.RolloutRef, *, full: bool = False) -> ro.Rollout:
        request = ro.PromoteRolloutRequest(name=rollout.name, full=full)
        return self.rollouts.PromoteRollout(request, metadata=self.metadata)

    def pause_rollout(self, rollout: names.RolloutRef, *, reason: str = "") -> ro.Rollout:
        request = ro.PauseRolloutRequest(name=rollout.name, reason=reason)
        return self.rollouts.PauseRollout(request, metadata=self.metadata)

    def resume_rollout(self, rollout: names.RolloutRef) -> ro.Rollout:
        request = ro.ResumeRolloutRequest(name=rollout.name)
        return self.rollouts.ResumeRollout(request, metadata=self.metadata)

    def abort_rollout(self, rollout: names.RolloutRef, *, reason: str = "") -> ro.Rollout:
        request = ro.AbortRolloutRequest(name=rollout.name, reason=reason)
        return self.rollouts.AbortRollout(request, metadata=self.metadata)

    def rollback_endpoint(
        self, endpoint: names.EndpointRef, to: names.VersionRef | None,
        policy: ro.SessionPolicy.ValueType,
    ) -> reg.Endpoint:
        """Sets `endpoint` back to `to`, or (None) to the last version that was stable on it."""
        request = ro.RollbackEndpointRequest(
            name=endpoint.name, version=to.name if to else "", session_policy=policy)
        return self.rollouts.RollbackEndpoint(request, metadata=self.metadata)

    def create_experiment(
        self, endpoint: names.EndpointRef, experiment: ro.Experiment
    ) -> ro.Experiment:
        request = ro.CreateExperimentRequest(parent=endpoint.name, experiment=experiment)
        return self.rollouts.CreateExperiment(request, metadata=self.metadata)

    def experiment_report(self, experiment: names.ExperimentRef) -> ro.ExperimentReport:
        request = ro.GetExperimentReportRequest(name=experiment.name)
        return self.rollouts.GetExperimentReport(request, metadata=self.metadata)

    def list_experiments(
        self, endpoint: names.EndpointRef, limit: int = 100
    ) -> list[ro.Experiment]:
        request = ro.ListExperimentsRequest(parent=endpoint.name, page_size=limit)
        return list(self.rollouts.ListExperiments(request, metadata=self.metadata).experiments)

    def conclude_experiment(
        self, experiment: names.ExperimentRef, *, winner: names.VersionRef | None,
        keep_control: bool,
    ) -> ro.Experiment:
        request = ro.ConcludeExperimentRequest(
            name=experiment.name, winner=winner.name if winner else "", keep_control=keep_control)
        return self.rollouts.ConcludeExperiment(request, metadata=self.metadata)

    # -- registry: tools --------------------------------------------------------------------

    def create_tool(self, tool_id: str, tool: tls.Tool) -> tls.Tool:
        request = tls.CreateToolRequest(tool_id=tool_id, tool=tool, request_id=uuid.uuid4().hex)
        return self.tools.CreateTool(request, metadata=self.metadata)

    def get_tool(self, tool: names.ToolRef) -> tls.Tool:
        return self.tools.GetTool(tls.GetToolRequest(name=tool.name), metadata=self.metadata)

    def list_tools(self) -> list[tls.Tool]:
        return list(pages(
            lambda token: self.tools.ListTools(tls.ListToolsRequest(
                page_size=_PAGE, page_token=token), metadata=self.metadata),
            lambda page: page.tools))

    def update_tool(self, tool: tls.Tool, paths: Iterable[str]) -> tls.Tool:
        """Changes the fields of `tool` that `paths` name (its name says which tool)."""
        mask = field_mask_pb2.FieldMask(paths=paths)
        request = tls.UpdateToolRequest(tool=tool, update_mask=mask)
        return self.tools.UpdateTool(request, metadata=self.metadata)

    def delete_tool(self, tool: names.ToolRef, etag: str = "") -> None:
        request = tls.DeleteToolRequest(name=tool.name, etag=etag)
        self.tools.DeleteTool(request, metadata=self.metadata)

    # -- registry: API keys ------------------------------------------------------------------

    def create_key(self, key: ks.Key, tenant: str = "") -> ks.CreateKeyResponse:
        """A new key of `tenant` (the caller's when empty); the response holds the key itself."""
        request = ks.CreateKeyRequest(tenant=tenant, key=key)
        return self.api_keys.CreateKey(request, metadata=self.metadata)

    def list_keys(self, tenant: str = "", show_revoked: bool = False) -> list[ks.Key]:
        return list(pages(
            lambda token: self.api_keys.ListKeys(ks.ListKeysRequest(
                tenant=tenant, show_revoked=show_revoked, page_size=_PAGE, page_token=token),
                metadata=self.metadata),
            lambda page: page.keys))

    def revoke_key(self, name_or_id: str, tenant: str = "") -> ks.Key:
        request = ks.RevokeKeyRequest(name=name_or_id, tenant=tenant)
        return self.api_keys.RevokeKey(request, metadata=self.metadata)

    def whoami(self) -> identity_pb2.WhoAmIResponse:
        """The principal the platform takes this client's credential to prove."""
        return self.identity.WhoAmI(identity_pb2.WhoAmIRequest(), metadata=self.metadata)

    # -- router -----------------------------------------------------------------------------

    def invoke(
        self, agent: str, payload: bytes, *, endpoint: str = "", version: str = "",
        session: str = "", content_type: str = "application/json", request_id: str = "",
    ) -> rt.InvokeResponse:
        """One turn, its whole output in the response. It carries a request id (a new one unless
        given) and is retried under it as `retry_policy` says, so a retry never runs the turn
        twice: a turn that committed comes back with `info.replayed`."""
        request = _invoke_request(agent, payload, endpoint, version, session, content_type, request_id)
        return retries.call(
            self.retry_policy, lambda: self.router.Invoke(request, metadata=self.metadata)
        )

    def invoke_stream(
        self, agent: str, payload: bytes, *, endpoint: str = "", version: str = "",
        session: str = "", content_type: str = "application/json", request_id: str = "",
    ) -> Iterator[rt.InvokeStreamResponse]:
        """As invoke, the output streamed. A stream that fails and is retried starts over: its
        events begin again with `started`."""
        request = _invoke_request(agent, payload, endpoint, version, session, content_type, request_id)
        return retries.stream(
            self.retry_policy, lambda: self.router.InvokeStream(request, metadata=self.metadata)
        )

    def converse(self, requests: Iterator[rt.ConverseRequest]) -> Iterator[rt.ConverseResponse]:
        return self.router.Converse(requests, metadata=self.metadata)

    def stop_session(self, session: str) -> None:
        request = rt.StopSessionRequest(name=names.session_name(session))
        self.router.StopSession(request, metadata=self.metadata)

    # -- sessions ---------------------------------------------------------------------------

    def list_sessions_page(
        self, agent: str = "", version: str = "", limit: int = 50, page_token: str = ""
    ) -> ses.ListSessionsResponse:
        """One page of the tenant's sessions, newest first; its next_page_token continues it."""
        request = ses.ListSessionsRequest(
            agent=agent, version=version, page_size=limit, page_token=page_token)
        return self.sessions.ListSessions(request, metadata=self.metadata)

    def list_sessions(self, agent: str = "", version: str = "") -> list[ses.Session]:
        """Every session of the tenant (of `agent`, pinned to `version`, where given), newest
        first."""
        return list(pages(
            lambda token: self.list_sessions_page(agent, version, _PAGE, token),
            lambda page: page.sessions))

    def get_session(self, session: str) -> ses.Session:
        request = ses.GetSessionRequest(name=names.session_name(session))
        return self.sessions.GetSession(request, metadata=self.metadata)

    def delete_session(self, session: str) -> None:
        request = ses.DeleteSessionRequest(name=names.session_name(session))
        self.sessions.DeleteSession(request, metadata=self.metadata)

    def session_state(self, session: str) -> ses.SessionState:
        request = ses.GetSessionStateRequest(name=names.session_name(session))
        return self.sessions.GetSessionState(request, metadata=self.metadata)

    # -- telemetry --------------------------------------------------------------------------

    def traces(self, span_filter: tel.SpanFilter, limit: int = 20) -> list[tel.TraceSummary]:
        request = tel.ListTracesRequest(filter=span_filter, page_size=limit)
        return list(self.telemetry.ListTraces(request, metadata=self.metadata).traces)

    def spans(self, span_filter: tel.SpanFilter, limit: int = 100) -> list[tel.Span]:
        request = tel.ListSpansRequest(filter=span_filter, page_size=limit)
        return list(self.telemetry.ListSpans(request, metadata=self.metadata).spans)

    def logs(self, request: tel.ListLogsRequest) -> tel.ListLogsResponse:
        """One page of an agent's log records (what it printed and logged), oldest first."""
        return self.telemetry.ListLogs(request, metadata=self.metadata)

    def metrics(self, agent: str) -> list[tel.VersionMetrics]:
        request = tel.GetVersionMetricsRequest(agent=names.agent_name(agent))
        return list(self.telemetry.GetVersionMetrics(request, metadata=self.metadata).versions)

    def record_score(self, score: tel.Score) -> tel.Score:
        request = tel.RecordScoreRequest(score=score)
        return self.telemetry.RecordScore(request, metadata=self.metadata)

    def scores(self, session: str = "", score_name: str = "", limit: int = 50) -> list[tel.Score]:
        """The newest scores, of one session (its name) and one score name where given."""
        request = tel.ListScoresRequest(
            filter=tel.SpanFilter(session=session), score_name=score_name, page_size=limit)
        return list(self.telemetry.ListScores(request, metadata=self.metadata).scores)

    # -- executor fleet ---------------------------------------------------------------------

    def executors(self) -> list[flt.Executor]:
        """The live executors (platform administrators only)."""
        def fetch(token: str) -> flt.ListExecutorsResponse:
            request = flt.ListExecutorsRequest(page_size=_PAGE, page_token=token)
            return self.fleet.ListExecutors(request, metadata=self.metadata)

        return list(pages(fetch, lambda page: page.executors))

    def drain_executor(self, name: str, drained: bool = True) -> flt.Executor:
        """Drains (no new sessions; live ones move at their next turn) or undrains `name`."""
        full = name if name.startswith("executors/") else f"executors/{name}"
        if drained:
            return self.fleet.DrainExecutor(flt.DrainExecutorRequest(name=full), metadata=self.metadata)
        return self.fleet.UndrainExecutor(flt.UndrainExecutorRequest(name=full), metadata=self.metadata)

    # -- executor ---------------------------------------------------------------------------

    def sandboxes(self) -> ex.ListSandboxesResponse:
        """The executor's sandboxes, every page of them, and its warm pools (an operator's view,
        across tenants)."""
        listing = ex.ListSandboxesResponse()

        def fetch(token: str) -> ex.ListSandboxesResponse:
            request = ex.ListSandboxesRequest(page_size=_PAGE, page_token=token)
            page = self.executor.ListSandboxes(request, metadata=self.metadata)
            listing.pools.extend(page.pools)  # only the first page carries them
            return page

        listing.sandboxes.extend(pages(fetch, lambda page: page.sandboxes))
        return listing
