"""gRPC ↔ executor domain."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import timestamp_pb2

from corral.executor.v1 import executor_pb2 as pb
from corral.executor.v1 import executor_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.identity import caller
from services.common.interceptors import close_when_done
from services.common.timestamps import timestamp
from services.common.tracing import extract_metadata
from services.executor.executor import Completed, Executor, Invocation, Started


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    return timestamp(datetime.fromtimestamp(seconds, UTC))


def _cgroup_reading(sandbox: object, reading: str) -> int | float:
    cgroup = getattr(getattr(sandbox, "process", None), "cgroup", None)
    if cgroup is None:
        return 0
    try:
        return getattr(cgroup, reading)()  # type: ignore[no-any-return]
    except OSError:  # the sandbox ended between the listing and the reading
        return 0


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    async def Execute(
        self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExecuteResponse]:
        inv = Invocation(
            session=request.session, version=request.version, digest=request.digest,
            endpoint=request.endpoint, invocation_id=request.invocation_id, payload=request.payload,
            content_type=request.content_type,
        )
        parent = extract_metadata(context.invocation_metadata())  # type: ignore[arg-type]
        events = self.executor.execute(caller(context), inv, parent)
        close_when_done(context, events)
        async for event in events:
            if isinstance(event, bytes):
                yield pb.ExecuteResponse(chunk=pb.ExecuteChunk(data=event))
            elif isinstance(event, Started):
                yield pb.ExecuteResponse(
                    started=pb.ExecuteStarted(invocation_id=event.invocation_id, trace_id=event.trace_id)
                )
            elif isinstance(event, Completed):
                yield pb.ExecuteResponse(
                    completed=pb.ExecuteCompleted(duration_ms=event.duration_ms, turn=event.turn)
                )

    async def StopSession(
        self, request: pb.StopSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopSessionResponse:
        return pb.StopSessionResponse(stopped=await self.executor.stop_session(request.session))

    async def ListSandboxes(
        self, request: pb.ListSandboxesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSandboxesResponse:
        now_wall, now_mono = time.time(), time.monotonic()
        response = pb.ListSandboxesResponse()
        for sb, state in self.executor.list_sandboxes():
            item = response.sandboxes.add(
                session=sb.session, version=sb.spec.version, start_time=_ts(sb.started),
                last_used_time=_ts(now_wall - (now_mono - sb.last_used)),
                pid=sb.process.pid if sb.process else 0, busy=state == "BUSY",
                memory_bytes=_cgroup_reading(sb, "memory_bytes"),
                cpu_seconds=float(_cgroup_reading(sb, "cpu_seconds")),
                state=pb.Sandbox.State.Value(f"STATE_{state}"), driver=self.executor.driver.name,
            )
            item.age.FromTimedelta(timedelta(seconds=max(0.0, now_wall - sb.started)))
        if self.executor.pools is not None:
            for version, ready, target, hits, misses, reasons in self.executor.pools.report():
                response.pools.add(version=version, ready=ready, target=target, hits=hits,
                                   misses=misses, reasons=reasons)
        return response

    async def GetJwks(self, request: pb.GetJwksRequest, context: grpc.aio.ServicerContext) -> pb.Jwks:
        issuer = self.executor.credentials
        if issuer is None:
            return pb.Jwks()
        return pb.Jwks(keys=[pb.Jwk(**key) for key in issuer.jwks()["keys"]])

    async def CheckRevocation(
        self, request: pb.CheckRevocationRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckRevocationResponse:
        if not request.jti:
            raise InvalidArgument.field("jti", "is required: the credential's jti claim")
        issuer = self.executor.credentials
        revoked = await issuer.is_revoked(request.jti) if issuer is not None else False
        return pb.CheckRevocationResponse(revoked=revoked)
