"""What the executor keeps outside itself: session state and leases (the sessions service),
bundles (the registry, cached on local disk), and agent spans (telemetry)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from corral.bundle import digest_of, unpack
from corral.registry.v1 import registry_pb2, registry_pb2_grpc
from corral.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from services.common.clients import call_metadata, channel
from services.common.errors import FailedPrecondition
from services.common.identity import Caller
from services.common.settings import Settings

log = logging.getLogger(__name__)


class SessionsClient:
    def __init__(self, settings: Settings) -> None:
        self.channel = channel(settings, "sessions")
        self.stub = sessions_pb2_grpc.SessionsServiceStub(self.channel)

    async def acquire(self, caller: Caller, session: str, holder: str, ttl_s: int) -> sessions_pb2.Lease:
        request = sessions_pb2.AcquireLeaseRequest(session=session, holder=holder)
        request.ttl.FromTimedelta(timedelta(seconds=ttl_s))
        return await self.stub.AcquireLease(request, metadata=call_metadata(caller))

    async def renew(self, caller: Caller, session: str, lease_id: str, ttl_s: int) -> None:
        request = sessions_pb2.RenewLeaseRequest(session=session, lease_id=lease_id)
        request.ttl.FromTimedelta(timedelta(seconds=ttl_s))
        await self.stub.RenewLease(request, metadata=call_metadata(caller))

    async def release(self, caller: Caller, session: str, lease_id: str) -> None:
        await self.stub.ReleaseLease(
            sessions_pb2.ReleaseLeaseRequest(session=session, lease_id=lease_id),
            metadata=call_metadata(caller),
        )

    async def commit(
        self, caller: Caller, session: str, lease_id: str, etag: str, state: bytes,
        invocation_id: str, payload: bytes, output: bytes,
    ) -> sessions_pb2.SessionState:
        return await self.stub.CommitTurn(
            sessions_pb2.CommitTurnRequest(
                session=session, lease_id=lease_id, etag=etag, state=state,
                invocation_id=invocation_id, input=payload, output=output,
            ),
            metadata=call_metadata(caller),
        )

    async def close(self) -> None:
        await self.channel.close()


class BundleCache:
    """Unpacked bundles on local disk, one directory per digest, fetched from the registry once."""

    def __init__(self, settings: Settings, root: Path) -> None:
        self.root = root
        self.channel = channel(settings, "registry")
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self._locks: dict[str, asyncio.Lock] = {}

    def path(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    async def ensure(self, version: str, digest: str) -> Path:
        dest = self.path(digest)
        if dest.exists():
            return dest
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:
            if dest.exists():
                return dest
            parts: list[bytes] = []
            async for msg in self.stub.DownloadVersion(registry_pb2.DownloadVersionRequest(name=version)):
                if msg.HasField("chunk"):
                    parts.append(msg.chunk)
            data = b"".join(parts)
            if digest_of(data) != digest:
                raise FailedPrecondition(
                    f"{version} downloaded as {digest_of(data)}, but the session is pinned to {digest}",
                    reason="DIGEST_MISMATCH",
                )
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".unpack-"))
            try:
                await asyncio.to_thread(unpack, data, tmp)
                # mkdtemp makes it 0700: a sandbox's real uid (gVisor's nobody) must read it.
                tmp.chmod(0o755)
                tmp.rename(dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("unpacked %s (%s) into %s", version, digest, dest)
        return dest

    async def close(self) -> None:
        await self.channel.close()


class SpanForwarder:
    """Sends the agent's own spans (already OTLP-encoded inside the sandbox) to telemetry."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.tracing
        self.channel = channel(settings, "telemetry")
        self.stub = trace_service_pb2_grpc.TraceServiceStub(self.channel)
        self._tasks: set[asyncio.Task[None]] = set()

    def forward(self, encoded: bytes, trusted: Mapping[str, str]) -> None:
        """Sends the spans of one invocation, with `trusted` (agent, version, session, tenant...)
        stamped on their resource and removed from their own attributes: the spans come from
        untrusted code, which must not file them under another tenant or session."""
        if not encoded or not self.enabled:
            return
        task = asyncio.create_task(self._send(encoded, dict(trusted)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, encoded: bytes, trusted: dict[str, str]) -> None:
        request = trace_service_pb2.ExportTraceServiceRequest()
        try:
            request.ParseFromString(encoded)
        except DecodeError:
            log.warning("dropped agent spans that do not parse as OTLP")
            return
        for resource_spans in request.resource_spans:
            _replace(resource_spans.resource.attributes, trusted)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    kept = [kv for kv in span.attributes
                            if kv.key not in trusted and not _counted_by_telemetry(kv.key)]
                    del span.attributes[:]
                    span.attributes.extend(kept)
        try:
            await self.stub.Export(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not forward agent spans to telemetry: %s", exc.details())

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        await self.channel.close()


def _counted_by_telemetry(key: str) -> bool:
    """Attributes telemetry counts per version (invocations, tool calls, tokens): only the
    executor's own spans may carry them, or an agent could forge its version's figures."""
    return key in ("gen_ai.operation.name", "corral.tool.name") or key.startswith("gen_ai.usage.")


def _replace(attributes: Any, values: Mapping[str, str]) -> None:
    """Sets string `values` in an OTLP KeyValue list, replacing what was there under those keys."""
    kept = [kv for kv in attributes if kv.key not in values]
    del attributes[:]
    attributes.extend(kept)
    for key, value in values.items():
        attributes.add(key=key).value.string_value = value
