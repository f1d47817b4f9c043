"""gRPC ↔ executor domain."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import timestamp_pb2

from corral.executor.v1 import executor_pb2 as pb
from corral.executor.v1 import executor_pb2_grpc
from services.common.identity import caller
from services.common.interceptors import close_when_done
from services.common.tracing import extract_metadata
from services.executor.executor import Completed, Executor, Invocation, Started


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


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
        import time

        now_wall, now_mono = time.time(), time.monotonic()
        return pb.ListSandboxesResponse(
            sandboxes=[
                pb.Sandbox(
                    session=sb.spec.session, version=sb.spec.version, start_time=_ts(sb.started),
                    last_used_time=_ts(now_wall - (now_mono - sb.last_used)),
                    pid=sb.process.pid if sb.process else 0, busy=busy,
                    memory_bytes=_cgroup_reading(sb, "memory_bytes"),
                    cpu_seconds=float(_cgroup_reading(sb, "cpu_seconds")),
                )
                for sb, busy in self.executor.list_sandboxes()
            ]
        )
