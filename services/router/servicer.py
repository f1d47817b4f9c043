"""gRPC ↔ router domain: the three ways to invoke (unary, server stream, bidirectional)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from corral.router.v1 import router_pb2 as pb
from corral.router.v1 import router_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.identity import Caller, caller
from services.common.interceptors import close_when_done
from services.router.router import Resolved, Router, Target

_TRACE_KEYS = ("traceparent", "tracestate")


def _trace_metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    return tuple(
        (k, v) for k, v in (context.invocation_metadata() or ()) if k in _TRACE_KEYS and isinstance(v, str)
    )


def _info(resolved: Resolved, invocation_id: str, trace_id: str) -> pb.InvocationInfo:
    return pb.InvocationInfo(
        session=resolved.session, version=resolved.version, endpoint=resolved.endpoint,
        invocation_id=invocation_id, trace_id=trace_id, new_session=resolved.new_session,
    )


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def _stream(
        self, context: grpc.aio.ServicerContext, who: Caller, target: Target, payload: bytes, content_type: str,
        trace: tuple[tuple[str, str], ...],
    ) -> AsyncIterator[pb.InvokeStreamResponse]:
        stream = self.router.invoke(who, target, payload, content_type, trace)
        close_when_done(context, stream)
        async for resolved, response in stream:
            kind = response.WhichOneof("event")
            if kind == "started":
                yield pb.InvokeStreamResponse(
                    started=_info(resolved, response.started.invocation_id, response.started.trace_id)
                )
            elif kind == "chunk":
                yield pb.InvokeStreamResponse(chunk=pb.OutputChunk(data=response.chunk.data))
            elif kind == "completed":
                yield pb.InvokeStreamResponse(
                    completed=pb.InvocationCompleted(
                        duration_ms=response.completed.duration_ms, turn=response.completed.turn
                    )
                )

    @staticmethod
    def _target(request: pb.InvokeRequest | pb.ConverseStart) -> Target:
        return Target(request.agent, request.endpoint, request.version, request.session_id)

    async def Invoke(self, request: pb.InvokeRequest, context: grpc.aio.ServicerContext) -> pb.InvokeResponse:
        response = pb.InvokeResponse()
        output: list[bytes] = []
        async for event in self._stream(
            context, caller(context), self._target(request), request.payload, request.content_type,
            _trace_metadata(context),
        ):
            kind = event.WhichOneof("event")
            if kind == "started":
                response.info.CopyFrom(event.started)
            elif kind == "chunk":
                output.append(event.chunk.data)
            elif kind == "completed":
                response.completed.CopyFrom(event.completed)
        response.output = b"".join(output)
        return response

    async def InvokeStream(
        self, request: pb.InvokeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InvokeStreamResponse]:
        async for event in self._stream(
            context, caller(context), self._target(request), request.payload, request.content_type,
            _trace_metadata(context),
        ):
            yield event

    async def Converse(
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ConverseResponse]:
        who = caller(context)
        trace = _trace_metadata(context)
        target: Target | None = None
        async for message in request_iterator:
            kind = message.WhichOneof("event")
            if kind == "start":
                if target is not None:
                    raise InvalidArgument.field("start", "sent twice; a stream is one conversation")
                target = self._target(message.start)
                continue
            if kind != "turn":
                raise InvalidArgument.field("event", "each message must be a start or a turn")
            if target is None:
                raise InvalidArgument.field("start", "must be the first message of the stream")
            async for event in self._stream(context, who, target, message.turn.payload, message.turn.content_type, trace):
                if event.HasField("started") and not target.session_id:
                    # Later turns continue the session the first turn created.
                    target = Target(target.agent, target.endpoint, target.version,
                                    event.started.session.removeprefix("sessions/"))
                yield pb.ConverseResponse(
                    started=event.started if event.HasField("started") else None,
                    chunk=event.chunk if event.HasField("chunk") else None,
                    completed=event.completed if event.HasField("completed") else None,
                )

    async def StopSession(
        self, request: pb.StopSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopSessionResponse:
        await self.router.stop_session(caller(context), request.name)
        return pb.StopSessionResponse()

    async def GetCachedEndpoint(
        self, request: pb.GetCachedEndpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.CachedEndpoint:
        view, synced = self.router.cached_endpoint(request.name)
        out = pb.CachedEndpoint(name=request.name, synced=synced)
        if view is not None:
            out.revision = view.revision
            for share in view.shares:
                out.traffic.add(version=view.ref.parent.version(share.version).name,
                                percent=share.basis_points / 100)
        return out
