"""The registry's domain: publishing immutable versions, endpoints and their traffic, the audit log."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

from corral import names
from corral.bundle import BundleError, inspect
from corral.manifest import ManifestError
from services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.common.identity import Caller
from services.registry.rollouts import Rollouts
from services.registry.store import (
    AgentRecord,
    AuditRecord,
    EndpointRecord,
    RegistryStore,
    VersionRecord,
)
from services.registry.traffic import TrafficShare, normalize_split

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "DEFAULT"


def parse_name(parse: object, value: str, field: str) -> object:
    try:
        return parse(value)  # type: ignore[operator]
    except names.ResourceNameError as exc:
        raise InvalidArgument.field(field, str(exc)) from None


class Registry:
    def __init__(self, store: RegistryStore, rollouts: Rollouts | None = None) -> None:
        self.store = store
        self.rollouts = rollouts
        self._watchers: set[asyncio.Queue[str]] = set()
        self._stop_listening: object = None

    # -- agents ----------------------------------------------------------------------------

    async def create_agent(self, caller: Caller, agent: str) -> AgentRecord:
        if not names.valid_agent_id(agent):
            raise InvalidArgument.field(
                "agent_id", f"{agent!r} must be 1-63 lowercase letters, digits or '-'"
            )
        async with self.store.tx() as tx:
            if not await tx.ensure_agent(agent, caller.user):
                raise AlreadyExists(f"agents/{agent} already exists")
            await tx.audit(caller.tenant, caller.user, "CreateAgent", f"agents/{agent}", {})
        return await self.get_agent(f"agents/{agent}")

    async def get_agent(self, name: str) -> AgentRecord:
        agent = str(parse_name(names.parse_agent, name, "name"))
        record = await self.store.get_agent(agent)
        if record is None:
            raise NotFound(f"{name} does not exist; publish a bundle to create it")
        return record

    async def list_agents(self, offset: int, limit: int) -> list[AgentRecord]:
        return await self.store.list_agents(offset, limit)

    # -- versions --------------------------------------------------------------------------

    async def publish(
        self, caller: Caller, parent: str, data: bytes, expected_digest: str, request_id: str
    ) -> tuple[VersionRecord, bool]:
        """Stores a bundle as the next version, or returns the version that already has its
        digest. Returns (version, created)."""
        try:
            checked = inspect(data)
        except ManifestError as exc:
            raise InvalidArgument.field(f"agent.toml:{exc.field}", exc.description) from None
        except BundleError as exc:
            if "limit is" in exc.description or "more than" in exc.description:
                raise ResourceExhausted(str(exc), reason="BUNDLE_TOO_LARGE") from None
            raise InvalidArgument.field(f"bundle:{exc.path or '(archive)'}", exc.description) from None
        if expected_digest and expected_digest != checked.digest:
            raise InvalidArgument.field(
                "header.digest", f"{expected_digest} does not match the uploaded bytes ({checked.digest})"
            )
        agent = checked.manifest.name
        if parent and parent != names.agent_name(agent):
            raise InvalidArgument.field(
                "header.parent", f"{parent} does not match agent.toml's name {agent!r}"
            )
        manifest = dataclasses.asdict(checked.manifest)
        async with self.store.tx() as tx:
            await tx.ensure_agent(agent, caller.user)
            existing = await tx.version_by_digest(agent, checked.digest)
            if existing is not None:
                return existing, False
            version = await tx.insert_version(agent, checked.digest, data, manifest, caller.user)
            # DEFAULT follows the newest version, like AgentCore's DEFAULT endpoint.
            await tx.put_endpoint(
                agent, DEFAULT_ENDPOINT, (TrafficShare(version.number, 10_000),), follow_latest=True,
                description="always the newest version",
            )
            await tx.audit(
                caller.tenant, caller.user, "PublishVersion", names.version_name(agent, version.number),
                {"digest": checked.digest, "size": checked.size, "request_id": request_id},
            )
        log.info("published agents/%s/versions/%d (%s)", agent, version.number, checked.digest)
        return version, True

    async def get_version(self, name: str) -> VersionRecord:
        ref = parse_name(lambda n: names.parse_version(n, allow_digest=True), name, "name")
        assert isinstance(ref, names.VersionRef)
        if ref.number:
            record = await self.store.get_version(ref.agent, ref.number)
        else:
            record = await self.store.get_version_by_digest(ref.agent, ref.digest)
        if record is None:
            raise NotFound(f"{name} does not exist; `corral versions {ref.agent}` lists them")
        return record

    async def list_versions(self, parent: str, offset: int, limit: int) -> list[VersionRecord]:
        record = await self.get_agent(parent)
        return await self.store.list_versions(record.id, offset, limit)

    async def download(self, name: str) -> tuple[VersionRecord, bytes]:
        version = await self.get_version(name)
        data = await self.store.bundle(version.digest)
        if data is None:
            raise NotFound(f"the bundle of {name} ({version.digest}) is missing from the store")
        return version, data

    # -- endpoints -------------------------------------------------------------------------

    async def get_endpoint(self, name: str) -> EndpointRecord:
        agent, endpoint = parse_name(names.parse_endpoint, name, "name")  # type: ignore[misc]
        record = await self.store.get_endpoint(agent, endpoint)
        if record is None:
            if await self.store.get_agent(agent) is None:
                raise NotFound(f"agents/{agent} does not exist; publish a bundle to create it")
            raise NotFound(
                f"{name} does not exist; create it with `corral endpoint set {agent} {endpoint} --version N`"
            )
        return record

    async def list_endpoints(self, parent: str, offset: int, limit: int) -> list[EndpointRecord]:
        agent = None
        if parent:
            agent = (await self.get_agent(parent)).id
        return await self.store.list_endpoints(agent, offset, limit)

    async def set_endpoint(
        self,
        caller: Caller,
        name: str,
        split: list[tuple[int, float]],
        *,
        etag: str = "",
        allow_missing: bool = False,
        must_create: bool = False,
        description: str = "",
        method: str = "UpdateEndpoint",
    ) -> EndpointRecord:
        agent, endpoint = parse_name(names.parse_endpoint, name, "endpoint.name")  # type: ignore[misc]
        if endpoint == DEFAULT_ENDPOINT:
            raise FailedPrecondition(
                f"{name} always serves the newest version and cannot be set; use another endpoint "
                "name such as prod",
                reason="DEFAULT_ENDPOINT_READ_ONLY",
            )
        traffic = normalize_split(split)
        async with self.store.tx() as tx:
            if not await tx.lock_agent(agent):
                raise NotFound(f"agents/{agent} does not exist; publish a bundle to create it")
            wanted = [s.version for s in traffic]
            missing = sorted(set(wanted) - await tx.existing_versions(agent, wanted))
            if missing:
                raise FailedPrecondition(
                    f"agents/{agent} has no version {', '.join(map(str, missing))}; "
                    f"`corral versions {agent}` lists what exists",
                    reason="VERSION_NOT_FOUND",
                )
            current = await tx.endpoint_for_update(agent, endpoint)
            if current is None and not allow_missing:
                raise NotFound(f"{name} does not exist (set allow_missing to create it)")
            if current is not None and must_create:
                raise AlreadyExists(f"{name} already exists")
            if current is not None and etag and etag != current.etag:
                raise Aborted(
                    f"{name} changed since it was read (etag {etag}, now {current.etag}); "
                    "read it again and retry",
                    reason="ETAG_MISMATCH",
                )
            aborted = None
            if current is not None and self.rollouts is not None:
                aborted = await self.rollouts.abort_for_manual_change(tx, agent, endpoint, caller)
            record = await tx.put_endpoint(agent, endpoint, traffic, description=description)
            await tx.audit(
                caller.tenant, caller.user, method, name,
                {
                    "before": _split_dict(current.traffic) if current else None,
                    "after": _split_dict(traffic),
                    "revision": record.revision,
                },
            )
        if aborted is not None and self.rollouts is not None:
            self.rollouts.notify(aborted)
        return record

    # -- watch -----------------------------------------------------------------------------

    async def start_watching(self) -> None:
        self._stop_listening = await self.store.listen_endpoints(self._on_change)

    async def stop_watching(self) -> None:
        if self._stop_listening is not None:
            await self._stop_listening()  # type: ignore[operator]
            self._stop_listening = None
        for q in self._watchers:
            q.put_nowait("")

    def _on_change(self, payload: str) -> None:
        for q in self._watchers:
            q.put_nowait(payload)

    async def watch(self, parent: str) -> AsyncIterator[tuple[list[EndpointRecord], bool]]:
        """Yields (every endpoint, True) once, then ([changed endpoint], False) per change."""
        agent = (await self.get_agent(parent)).id if parent else None
        queue: asyncio.Queue[str] = asyncio.Queue()
        # Subscribe before the snapshot, so a change between the two is not lost.
        self._watchers.add(queue)
        try:
            snapshot = await self.store.list_endpoints(agent, 0, 1_000_000)
            yield snapshot, True
            while True:
                payload = await queue.get()
                if not payload:
                    return
                changed_agent, endpoint, _rev = payload.rsplit("/", 2)
                if agent and changed_agent != agent:
                    continue
                record = await self.store.get_endpoint(changed_agent, endpoint)
                if record is not None:
                    yield [record], False
        finally:
            self._watchers.discard(queue)

    # -- audit -----------------------------------------------------------------------------

    async def list_audit(self, prefix: str, offset: int, limit: int) -> list[AuditRecord]:
        return await self.store.list_audit(prefix, offset, limit)


def _split_dict(traffic: tuple[TrafficShare, ...]) -> dict[str, float]:
    return {str(s.version): s.percent for s in traffic}


