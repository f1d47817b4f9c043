"""Calling Corral's services as a client does, and reading what they answer: the caller's
headers, a JSON payload, a call that must fail with a given code, and the details on a failure."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common import identity

Metadata = tuple[tuple[str, str], ...]


def who(tenant: str, user: str = "alice") -> Metadata:
    """The headers naming the caller, as the gateway in front of Corral sets them; an empty
    tenant or user is left out."""
    headers = (("x-corral-tenant", tenant), ("x-corral-user", user))
    return tuple((key, value) for key, value in headers if value)


def described(metadata: Metadata) -> str:
    """How the audit log names the caller these headers name."""
    return identity.caller_from_metadata(metadata).describe()


def new_tenant() -> str:
    """A tenant of a test's own: the run shares one database, and this keeps the test's lists
    to what it made."""
    return f"t-{uuid.uuid4().hex[:10]}"


def body(payload: object) -> bytes:
    """`payload` as the JSON bytes an invocation carries."""
    return json.dumps(payload).encode()


async def fails(code: grpc.StatusCode, call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """Awaits `call`, which must fail with `code`; the failure, for a test to look into."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, f"{info.value.code()}: {info.value.details()}"
    return info.value


def error_details(err: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """The ErrorInfo and the BadRequest field names a Corral service attached to a failure."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status on {err.code()}: {err.details()}"
    info, fields = error_details_pb2.ErrorInfo(), []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return info, fields


class _CallsAs:
    """Adds `metadata` to every call that carries none of its own."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        if details.metadata:
            return details
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, grpc.aio.Metadata(*self.metadata),
            details.credentials, details.wait_for_ready,
        )


# grpc.aio files an interceptor under the first kind of call it handles: one class per kind.
class _UnaryUnaryAs(_CallsAs, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request)


class _UnaryStreamAs(_CallsAs, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request)


class _StreamUnaryAs(_CallsAs, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), requests)


class _StreamStreamAs(_CallsAs, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), requests)


def channel_as(address: str, metadata: Metadata) -> grpc.aio.Channel:
    """A channel whose calls name the caller `metadata` names unless a call names its own: the
    registry keeps each tenant's resources apart, so a test reads as the tenant that wrote."""
    kinds = (_UnaryUnaryAs, _UnaryStreamAs, _StreamUnaryAs, _StreamStreamAs)
    return grpc.aio.insecure_channel(address, interceptors=[kind(metadata) for kind in kinds])
