"""RouterService over gRPC: the three ways to invoke (unary, server stream, bidirectional), stopping
a session, and the endpoint cache. Converts requests to refs and domain calls, events to protos."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import TypeVar

from corral import names
from corral.names import AgentRef, EndpointRef, SessionRef, VersionRef
from corral.router.v1 import router_pb2 as pb
from corral.router.v1 import router_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.execution import Completed, Started
from services.common.identity import Caller, caller
from services.common.interceptors import Context, close_when_done
from services.common.requests import REQUEST_IDS
from services.router.model import (
    Chunk,
    ExecutionEvent,
    Invocation,
    Target,
    TraceContext,
)
from services.router.router import Router

_TRACE_KEYS = ("traceparent", "tracestate")


def _trace_context(context: Context) -> TraceContext:
    return tuple(
        (k, v)
        for k, v in (context.invocation_metadata() or ())
        if k in _TRACE_KEYS and isinstance(v, str)
    )


# Bounds on an invocation's attributes (not read yet, so held small until they are).
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY_CHARS = 128
MAX_ATTRIBUTE_VALUE_CHARS = 1024


def check_attributes(attributes: Mapping[str, str]) -> None:
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidArgument.field(
            "attributes", f"{len(attributes)} entries is over the limit of {MAX_ATTRIBUTES}"
        )
    for key, value in attributes.items():
        if not key or len(key) > MAX_ATTRIBUTE_KEY_CHARS:
            raise InvalidArgument.field(
                "attributes", f"a key must be 1-{MAX_ATTRIBUTE_KEY_CHARS} characters, not {len(key)}"
            )
        if len(value) > MAX_ATTRIBUTE_VALUE_CHARS:
            raise InvalidArgument.field(
                f"attributes[{key!r}]",
                f"{len(value)} characters is over the limit of {MAX_ATTRIBUTE_VALUE_CHARS}",
            )


def target_of(request: pb.InvokeRequest | pb.ConverseStart) -> Target:
    """The agent, endpoint, version and session an invocation names. A version may be given as
    its number alone."""
    check_attributes(request.attributes)
    agent = AgentRef.parse(request.agent, field="agent")
    version = None
    if request.version:
        raw = request.version
        name = agent.version(int(raw)).name if raw.isdigit() and int(raw) > 0 else raw
        version = VersionRef.parse(name, field="version")
    endpoint = None
    if request.endpoint:
        endpoint = agent.endpoint(names.ENDPOINT_IDS.check(request.endpoint, field="endpoint"))
    session = None
    if request.session_id:
        session = SessionRef(names.SESSION_IDS.check(request.session_id, field="session_id"))
    return Target(agent, endpoint, version, session)


def _info(invocation: Invocation, started: Started) -> pb.InvocationInfo:
    pin = invocation.resolved.pin
    return pb.InvocationInfo(
        session=pin.session.name,
        version=pin.version.name,
        endpoint=pin.endpoint.name if pin.endpoint is not None else "",
        invocation_id=started.invocation_id or invocation.invocation_id,
        trace_id=started.trace_id,
        new_session=invocation.resolved.new_session,
        replayed=started.replayed,
    )


# InvokeStream and Converse stream the same events.
_Streamed = TypeVar("_Streamed", pb.InvokeStreamResponse, pb.ConverseResponse)


def _event_pb(kind: type[_Streamed], invocation: Invocation, event: ExecutionEvent) -> _Streamed:
    match event:
        case Started():
            return kind(started=_info(invocation, event))
        case Chunk(data=data):
            return kind(chunk=pb.OutputChunk(data=data))
        case Completed(duration_ms=duration_ms, turn=turn):
            return kind(completed=pb.InvocationCompleted(duration_ms=duration_ms, turn=turn))


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    def _invoke(
        self, context: Context, who: Caller, target: Target, turn: pb.InvokeRequest | pb.Turn
    ) -> AsyncGenerator[tuple[Invocation, ExecutionEvent], None]:
        request_id = REQUEST_IDS.check(turn.request_id, field="request_id") if turn.request_id else ""
        stream = self.router.invoke(
            who, target, turn.payload, turn.content_type, _trace_context(context), request_id
        )
        close_when_done(context, stream)
        return stream

    async def Invoke(self, request: pb.InvokeRequest, context: Context) -> pb.InvokeResponse:
        response = pb.InvokeResponse()
        output: list[bytes] = []
        async for invocation, event in self._invoke(
            context, caller(context), target_of(request), request
        ):
            match event:
                case Started():
                    response.info.CopyFrom(_info(invocation, event))
                case Chunk(data=data):
                    output.append(data)
                case Completed(duration_ms=duration_ms, turn=turn):
                    response.completed.duration_ms = duration_ms
                    response.completed.turn = turn
        response.output = b"".join(output)
        return response

    async def InvokeStream(
        self, request: pb.InvokeRequest, context: Context
    ) -> AsyncIterator[pb.InvokeStreamResponse]:
        async for invocation, event in self._invoke(
            context, caller(context), target_of(request), request
        ):
            yield _event_pb(pb.InvokeStreamResponse, invocation, event)

    async def Converse(
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context: Context
    ) -> AsyncIterator[pb.ConverseResponse]:
        who = caller(context)
        target: Target | None = None
        async for message in request_iterator:
            kind = message.WhichOneof("event")
            if kind == "start":
                if target is not None:
                    raise InvalidArgument.field("start", "sent twice; a stream is one conversation")
                target = target_of(message.start)
                continue
            if kind != "turn":
                raise InvalidArgument.field("event", "each message must be a start or a turn")
            if target is None:
                raise InvalidArgument.field("start", "must be the first message of the stream")
            async for invocation, event in self._invoke(context, who, target, message.turn):
                if target.session is None:
                    # Later turns continue the session the first turn created.
                    target = dataclasses.replace(target, session=invocation.resolved.pin.session)
                yield _event_pb(pb.ConverseResponse, invocation, event)

    async def StopSession(
        self, request: pb.StopSessionRequest, context: Context
    ) -> pb.StopSessionResponse:
        session = SessionRef.parse(request.name, field="name")
        await self.router.stop_session(caller(context), session)
        return pb.StopSessionResponse()

    async def GetCachedEndpoint(
        self, request: pb.GetCachedEndpointRequest, context: Context
    ) -> pb.CachedEndpoint:
        endpoint = EndpointRef.parse(request.name, field="name")
        view, synced = self.router.cached_endpoint(caller(context).tenant, endpoint)
        out = pb.CachedEndpoint(name=request.name, synced=synced)
        if view is not None:
            out.revision = view.revision
            for share in view.shares:
                out.traffic.add(
                    version=view.ref.parent.version(share.version).name, percent=share.percent
                )
        return out
