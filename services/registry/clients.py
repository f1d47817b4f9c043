"""The registry's calls out, the only place it makes them: telemetry analyses rollouts and
experiments, sessions applies rollback policies to live sessions, an executor starts a new
version once before DEFAULT moves to it. Each returns domain values and raises the domain error
tree."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from datetime import datetime
from typing import TypeVar

from corral.executor.v1 import executor_pb2, executor_pb2_grpc
from corral.names import EndpointRef, VersionRef
from corral.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from corral.telemetry.v1 import telemetry_pb2 as tel
from corral.telemetry.v1 import telemetry_pb2_grpc
from services.common.clients import ServiceClient
from services.common.execution import StartFailure
from services.common.metric_protos import metric_pb
from services.common.settings import Settings
from services.common.status import calling
from services.common.timestamps import optional_time, timestamp
from services.registry.analysis_protos import analysis_from_pb, experiment_analysis_from_pb
from services.registry.lifecycle_model import VersionSessions
from services.registry.rollout_model import (
    Analysis,
    AnalysisConfig,
    ExperimentAnalysis,
    ExperimentSpec,
)
from services.registry.tenancy import acting_for

TIMEOUT_S = 30
# The most versions one CountPinnedSessions names (its request's limit).
PINNED_PER_CALL = 1000
# Downloading and unpacking the bundle, then the executor's own start limit (30 s by default).
START_CHECK_TIMEOUT_S = 120
Response = TypeVar("Response")


async def _answer(call: Awaitable[Response], service: str) -> Response:
    """The response of a call to `service`, or the domain error its failure stands for."""
    with calling(service):
        return await call


class TelemetryClient(ServiceClient["telemetry_pb2_grpc.TelemetryServiceAsyncStub"]):
    """Implements VersionAnalysis and ExperimentAnalyzer."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "telemetry", telemetry_pb2_grpc.TelemetryServiceStub)

    async def compare_versions(
        self, tenant: str, endpoint: EndpointRef, baseline: int, candidate: int, config: AnalysisConfig,
        start: datetime, end: datetime,
    ) -> Analysis:
        agent = endpoint.parent
        request = tel.CompareVersionsRequest(
            agent=agent.name,
            baseline_version=agent.version(baseline).name,
            candidate_version=agent.version(candidate).name,
            metrics=[metric_pb(m) for m in config.metrics],
            min_sessions=config.min_sessions, alpha=config.alpha,
            endpoint=endpoint.name, start_time=timestamp(start), end_time=timestamp(end),
        )
        call = self._stub.CompareVersions(request, metadata=self.metadata(acting_for(tenant)),
                                          timeout=TIMEOUT_S)
        return analysis_from_pb(await _answer(call, "telemetry"))

    async def analyze_experiment(
        self, tenant: str, endpoint: EndpointRef, spec: ExperimentSpec, start: datetime, end: datetime
    ) -> ExperimentAnalysis:
        agent = endpoint.parent
        request = tel.AnalyzeExperimentRequest(
            agent=agent.name,
            variants=[tel.ExperimentVariant(version=agent.version(v.version).name, percent=v.percent)
                      for v in spec.variants],
            metrics=[metric_pb(m) for m in spec.metrics], alpha=spec.alpha,
            endpoint=endpoint.name, start_time=timestamp(start), end_time=timestamp(end),
        )
        call = self._stub.AnalyzeExperiment(request, metadata=self.metadata(acting_for(tenant)),
                                            timeout=TIMEOUT_S)
        return experiment_analysis_from_pb(await _answer(call, "telemetry"))


class SessionsClient(ServiceClient["sessions_pb2_grpc.SessionsServiceAsyncStub"]):
    """Implements SessionRetirement and PinnedSessions."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "sessions", sessions_pb2_grpc.SessionsServiceStub)

    async def retire_version(
        self, tenant: str, version: VersionRef, endpoint: EndpointRef, migrate_to: VersionRef | None,
        migrate_digest: str,
    ) -> int:
        request = sessions_pb2.RetireVersionRequest(version=version.name, endpoint=endpoint.name)
        if migrate_to is not None:
            request.action = sessions_pb2.RETIRE_ACTION_MIGRATE
            request.to_version = migrate_to.name
            request.to_version_digest = migrate_digest
        else:
            request.action = sessions_pb2.RETIRE_ACTION_STOP
        call = self._stub.RetireVersion(request, metadata=self.metadata(acting_for(tenant)),
                                        timeout=TIMEOUT_S)
        return (await _answer(call, "sessions")).sessions

    async def pinned_sessions(
        self, tenant: str, versions: Sequence[VersionRef]
    ) -> Mapping[VersionRef, VersionSessions]:
        found: dict[VersionRef, VersionSessions] = {}
        for start in range(0, len(versions), PINNED_PER_CALL):
            request = sessions_pb2.CountPinnedSessionsRequest(
                versions=[v.name for v in versions[start : start + PINNED_PER_CALL]])
            call = self._stub.CountPinnedSessions(
                request, metadata=self.metadata(acting_for(tenant)), timeout=TIMEOUT_S)
            for pins in (await _answer(call, "sessions")).pins:
                found[VersionRef.parse(pins.version)] = VersionSessions(
                    pins.active_sessions, optional_time(pins, "last_active_time"))
        return found

class ExecutorClient(ServiceClient["executor_pb2_grpc.ExecutorServiceAsyncStub"]):
    """Implements VersionStarts."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "executor", executor_pb2_grpc.ExecutorServiceStub)

    async def check_start(self, tenant: str, version: VersionRef, digest: str) -> StartFailure | None:
        request = executor_pb2.CheckVersionRequest(version=version.name, digest=digest)
        call = self._stub.CheckVersion(request, metadata=self.metadata(acting_for(tenant)),
                                       timeout=START_CHECK_TIMEOUT_S)
        answer = await _answer(call, "executor")
        if not answer.HasField("failure"):
            return None
        f = answer.failure
        return StartFailure(f.error_type, f.message, f.traceback)
