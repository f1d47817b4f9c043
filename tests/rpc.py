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

from tests import credentials
from tests.credentials import DEFAULT_TENANT, DEFAULT_USER, bearer

Metadata = tuple[tuple[str, str], ...]


def who(tenant: str, user: str = "alice", role: str = "admin") -> Metadata:
    """The credential of `user` with `role` in `tenant` (empty: the default tenant and an unnamed
    user): a token from the run's identity provider, which every test service accepts."""
    return bearer(tenant or DEFAULT_TENANT, user or DEFAULT_USER, role)


def described(metadata: Metadata) -> str:
    """How the audit log names the caller whose credential `metadata` holds."""
    return credentials.principal_of(metadata).describe()


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


def retry_delay_s(err: grpc.aio.AioRpcError) -> float | None:
    """The google.rpc.RetryInfo delay a failure asked the caller to wait, if any."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToMilliseconds() / 1000
    return None


def debug_stack(err: grpc.aio.AioRpcError) -> list[str]:
    """The stack entries of the DebugInfo a Corral service attached to a failure (an agent's
    traceback), or none."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status on {err.code()}: {err.details()}"
    for detail in status.details:
        debug = error_details_pb2.DebugInfo()
        if detail.Unpack(debug):
            return list(debug.stack_entries)
    return []


def channel_as(address: str, metadata: Metadata) -> grpc.aio.Channel:
    """A channel to a public port whose calls carry the credential `metadata` holds unless a call
    brings its own: the services keep each tenant's resources apart, so a test reads as the
    tenant that wrote."""
    return credentials.channel_with(address, metadata)
