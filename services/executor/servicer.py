"""ExecutorService over gRPC: converts requests to domain calls and domain values to protos."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

from corral import names
from corral.executor.v1 import executor_pb2 as pb
from corral.executor.v1 import executor_pb2_grpc
from corral.names import SessionRef, VersionRef
from services.common.errors import InvalidArgument
from services.common.execution import Completed, Started, StartFailure
from services.common.identity import caller
from services.common.interceptors import Context, close_when_done
from services.common.requests import REQUEST_IDS
from services.common.timestamps import timestamp
from services.common.tracing import extract_metadata
from services.executor.credentials import JTI
from services.executor.executor import Executor
from services.executor.model import (
    Invocation,
    PoolReport,
    SandboxInfo,
    SandboxState,
)

_STATES = {
    SandboxState.WARM: pb.Sandbox.STATE_WARM,
    SandboxState.IDLE: pb.Sandbox.STATE_IDLE,
    SandboxState.BUSY: pb.Sandbox.STATE_BUSY,
}


def sandbox_pb(info: SandboxInfo) -> pb.Sandbox:
    message = pb.Sandbox(
        session=info.session, version=info.version, start_time=timestamp(info.start_time),
        last_used_time=timestamp(info.last_used_time), pid=info.pid,
        busy=info.state is SandboxState.BUSY, memory_bytes=info.memory_bytes,
        cpu_seconds=info.cpu_seconds, state=_STATES[info.state], driver=info.driver,
    )
    message.age.FromTimedelta(timedelta(seconds=info.age_s))
    return message


def pool_pb(pool: PoolReport) -> pb.WarmPool:
    return pb.WarmPool(
        version=pool.version, ready=pool.ready, target=pool.target, hits=pool.hits,
        misses=pool.misses, reasons=pool.reasons,
    )


def start_failure_pb(failure: StartFailure) -> pb.StartFailure:
    return pb.StartFailure(
        error_type=failure.error_type, message=failure.message, traceback=failure.traceback
    )


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    async def Execute(
        self, request: pb.ExecuteRequest, context: Context
    ) -> AsyncIterator[pb.ExecuteResponse]:
        inv = Invocation(
            session=SessionRef.parse(request.session, field="session"),
            version=VersionRef.parse(request.version, field="version"),
            digest=names.DIGESTS.check(request.digest, field="digest"),
            endpoint=request.endpoint, invocation_id=request.invocation_id, payload=request.payload,
            content_type=request.content_type,
            request_id=(
                REQUEST_IDS.check(request.request_id, field="request_id") if request.request_id else ""
            ),
        )
        # (key, value) pairs, whether the stubs call them grpc.aio.Metadata or a tuple.
        parent = extract_metadata(tuple(context.invocation_metadata() or ()))
        events = self.executor.execute(caller(context), inv, parent)
        close_when_done(context, events)
        async for event in events:
            if isinstance(event, bytes):
                yield pb.ExecuteResponse(chunk=pb.ExecuteChunk(data=event))
            elif isinstance(event, Started):
                yield pb.ExecuteResponse(started=pb.ExecuteStarted(
                    invocation_id=event.invocation_id or inv.invocation_id, trace_id=event.trace_id,
                    replayed=event.replayed,
                ))
            elif isinstance(event, Completed):
                yield pb.ExecuteResponse(
                    completed=pb.ExecuteCompleted(duration_ms=event.duration_ms, turn=event.turn)
                )

    async def StopSession(
        self, request: pb.StopSessionRequest, context: Context
    ) -> pb.StopSessionResponse:
        session = SessionRef.parse(request.session, field="session")
        stopped = await self.executor.stop_session(caller(context), session)
        return pb.StopSessionResponse(stopped=stopped)

    async def ListSandboxes(
        self, request: pb.ListSandboxesRequest, context: Context
    ) -> pb.ListSandboxesResponse:
        listing = self.executor.list_sandboxes(caller(context), request.page_size, request.page_token)
        return pb.ListSandboxesResponse(
            sandboxes=[sandbox_pb(s) for s in listing.sandboxes],
            pools=[pool_pb(p) for p in listing.pools],
            next_page_token=listing.next_page_token,
        )

    async def GetJwks(self, request: pb.GetJwksRequest, context: Context) -> pb.Jwks:
        return pb.Jwks(keys=[pb.Jwk(**key) for key in (await self.executor.jwks())["keys"]])

    async def CheckRevocation(
        self, request: pb.CheckRevocationRequest, context: Context
    ) -> pb.CheckRevocationResponse:
        if not request.jti:
            raise InvalidArgument.field("jti", "is required: the credential's jti claim")
        if not JTI.match(request.jti):
            raise InvalidArgument.field("jti", "is not a token id (32 lowercase hex digits)")
        return pb.CheckRevocationResponse(revoked=await self.executor.is_revoked(request.jti))

    async def CheckVersion(
        self, request: pb.CheckVersionRequest, context: Context
    ) -> pb.CheckVersionResponse:
        version = VersionRef.parse(request.version, field="version")
        digest = names.DIGESTS.check(request.digest, field="digest")
        result = await self.executor.check_version(version, digest)
        response = pb.CheckVersionResponse()
        response.start_duration.FromTimedelta(timedelta(seconds=result.duration_s))
        if result.failure is not None:
            response.failure.CopyFrom(start_failure_pb(result.failure))
        return response
