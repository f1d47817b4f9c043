"""The registry's calls out: telemetry for rollout analysis, sessions for rollback policies."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import json_format

from corral import names
from corral.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from corral.telemetry.v1 import telemetry_pb2 as tel
from corral.telemetry.v1 import telemetry_pb2_grpc
from services.common.clients import call_metadata, channel
from services.common.identity import Caller
from services.common.settings import Settings
from services.registry.rollout_servicer import metric_pb
from services.registry.rollout_store import RolloutRecord
from services.registry.store import RegistryStore

log = logging.getLogger(__name__)
PLATFORM = Caller(tenant="system", user="corral-controller")


def _short(verdict: str) -> str:
    return verdict.removeprefix("VERDICT_") if verdict != "VERDICT_UNSPECIFIED" else "INCONCLUSIVE"


def analysis_dict(response: tel.CompareVersionsResponse) -> dict[str, Any]:
    d = json_format.MessageToDict(response, preserving_proto_field_name=True,
                                  always_print_fields_with_no_presence=True)
    d["verdict"] = _short(d.get("verdict", "VERDICT_UNSPECIFIED"))
    for c in d.get("comparisons", []):
        c["verdict"] = _short(c.get("verdict", "VERDICT_UNSPECIFIED"))
    return d


class TelemetryAnalysis:
    """Asks telemetry to compare the candidate with the stable version over the window since the
    candidate started receiving traffic. An unreachable telemetry is inconclusive, never a fail."""

    def __init__(self, settings: Settings) -> None:
        self.channel = channel(settings, "telemetry")
        self.stub = telemetry_pb2_grpc.TelemetryServiceStub(self.channel)

    async def __call__(self, r: RolloutRecord) -> dict[str, Any]:
        analysis = r.spec["analysis"]
        request = tel.CompareVersionsRequest(
            agent=names.agent_name(r.agent),
            baseline_version=names.version_name(r.agent, r.stable_version),
            candidate_version=names.version_name(r.agent, r.candidate_version),
            metrics=[metric_pb(m) for m in analysis["metrics"]],
            min_sessions=int(analysis["min_sessions"]), alpha=float(analysis["alpha"]),
            endpoint=names.endpoint_name(r.agent, r.endpoint),
        )
        request.start_time.FromDatetime(r.traffic_start_time or r.create_time)
        request.end_time.FromDatetime(datetime.now(UTC))
        try:
            response = await self.stub.CompareVersions(request, metadata=call_metadata(PLATFORM), timeout=30)
        except grpc.aio.AioRpcError as exc:
            log.warning("analysis of %s unavailable: %s", r.name, exc.details())
            return {"verdict": "INCONCLUSIVE", "comparisons": [],
                    "error": f"telemetry: {exc.code().name}: {exc.details()}"}
        return analysis_dict(response)

    async def close(self) -> None:
        await self.channel.close()


class TelemetryExperiments:
    """Asks telemetry for an experiment's per-variant analysis since its split started."""

    def __init__(self, analysis: TelemetryAnalysis) -> None:
        self.stub = analysis.stub

    async def __call__(self, r: RolloutRecord) -> tel.AnalyzeExperimentResponse:
        request = tel.AnalyzeExperimentRequest(
            agent=names.agent_name(r.agent),
            variants=[tel.ExperimentVariant(version=names.version_name(r.agent, int(v)), percent=p)
                      for v, p in r.spec["variants"]],
            metrics=[metric_pb(m) for m in r.spec["metrics"]], alpha=float(r.spec.get("alpha", 0.05)),
            endpoint=names.endpoint_name(r.agent, r.endpoint),
        )
        request.start_time.FromDatetime(r.traffic_start_time or r.create_time)
        request.end_time.FromDatetime(r.end_time or datetime.now(UTC))
        return await self.stub.AnalyzeExperiment(request, metadata=call_metadata(PLATFORM), timeout=30)


class SessionPolicies:
    """What happens to a rolled-back candidate's live sessions: drain (nothing now; stopped after
    the drain timeout), migrate (re-pinned to stable at their next turn) or stop."""

    def __init__(self, settings: Settings, store: RegistryStore) -> None:
        self.channel = channel(settings, "sessions")
        self.stub = sessions_pb2_grpc.SessionsServiceStub(self.channel)
        self.store = store

    async def retire(self, agent: str, endpoint: str, version: int, policy: str, to_version: int) -> int:
        if policy == "DRAIN":
            return 0
        request = sessions_pb2.RetireVersionRequest(
            version=names.version_name(agent, version), endpoint=names.endpoint_name(agent, endpoint),
        )
        if policy == "MIGRATE":
            target = await self.store.get_version(agent, to_version)
            request.action = sessions_pb2.RETIRE_ACTION_MIGRATE
            request.to_version = names.version_name(agent, to_version)
            request.to_version_digest = target.digest if target else ""
        else:
            request.action = sessions_pb2.RETIRE_ACTION_STOP
        try:
            response = await self.stub.RetireVersion(request, metadata=call_metadata(PLATFORM), timeout=30)
        except grpc.aio.AioRpcError as exc:
            log.error("could not apply the %s policy to %s sessions: %s", policy, request.version, exc.details())
            return 0
        log.info("%s: %d sessions on %s (%s)", policy.lower(), response.sessions, request.version, endpoint)
        return response.sessions

    async def after_rollback(self, r: RolloutRecord, policy: str | None = None) -> None:
        await self.retire(r.agent, r.endpoint, r.candidate_version, policy or r.spec["rollback_policy"],
                          r.stable_version)

    async def close(self) -> None:
        await self.channel.close()
