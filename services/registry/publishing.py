"""Publishing: a bundle stored as the agent's next version, started once by an executor (the start
check), and only then made DEFAULT; a version that cannot start is kept as FAILED with what it
raised, and nothing routes to it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping

from corral.bundle import BundleError, CheckedBundle, inspect
from corral.manifest import ManifestError
from corral.names import AgentRef, VersionRef
from services.common.endpoints import TrafficShare
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.common.execution import StartFailure
from services.common.identity import Caller
from services.common.settings import StartCheck
from services.registry import rules
from services.registry.model import (
    RegistryStore,
    RegistryTx,
    VersionRecord,
    VersionStarts,
    VersionState,
)
from services.registry.tenancy import tenant_of

log = logging.getLogger(__name__)
# Told the version once it is stored and about to be started: the caller hears which it is
# before the check ends.
OnChecking = Callable[[VersionRecord], Awaitable[None]]


async def check_routable(tx: RegistryTx, tenant: str, agent: AgentRef, wanted: Collection[int]) -> None:
    """Refuses traffic to a version that does not exist or is not READY."""
    rules.check_routable(agent, wanted, await tx.version_states(tenant, agent, wanted))


def _checked(data: bytes, expected_digest: str) -> CheckedBundle:
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
    return checked


async def _make_default(tx: RegistryTx, version: VersionRecord) -> None:
    """DEFAULT follows the newest READY version, like AgentCore's DEFAULT endpoint."""
    endpoint = version.ref.parent.endpoint(rules.DEFAULT_ENDPOINT)
    current = await tx.get_endpoint(version.tenant, endpoint, for_update=True)
    if rules.default_moves_to(current, version.number):
        await tx.put_endpoint(
            version.tenant, endpoint, (TrafficShare(version.number, 10_000),),
            follow_latest=True, description="always the newest version",
        )


class Publishing:
    def __init__(
        self, store: RegistryStore, starts: VersionStarts | None = None,
        start_check: StartCheck = StartCheck.OFF,
    ) -> None:
        self._store = store
        self._starts = starts
        self._start_check = start_check if starts is not None else StartCheck.OFF

    async def publish(
        self, caller: Caller, parent: AgentRef | None, data: bytes, expected_digest: str,
        request_id: str, on_checking: OnChecking | None = None,
    ) -> tuple[VersionRecord, bool]:
        """Stores a bundle as the next version, or returns the version that already has its
        digest (finishing its start check if that never ended). Returns (version, created);
        raises VERSION_CANNOT_START for a version that could not start, now or before."""
        checked = _checked(data, expected_digest)
        rules.check_publish_parent(parent, checked.manifest.name)
        agent = AgentRef(checked.manifest.name)
        tenant = tenant_of(caller)
        checking = self._start_check is not StartCheck.OFF
        # Audited once the version is published: at once, or when its start check has ended.
        published = {"digest": checked.digest, "size": checked.size, "request_id": request_id}
        async with self._store.tx() as tx:
            await tx.ensure_agent(tenant, agent, caller.user)
            version = await tx.get_version(tenant, VersionRef(agent.agent, digest=checked.digest))
            created = version is None
            if version is None:
                state = VersionState.CHECKING if checking else VersionState.READY
                version = await tx.insert_version(
                    tenant, agent, checked.digest, data, checked.manifest, caller.user, state)
                if not checking:
                    await _make_default(tx, version)
                    await tx.audit(caller, "PublishVersion", version.ref.name, published)
        if created:
            log.info("stored %s (%s) in tenant %s", version.ref.name, checked.digest, tenant)
        if version.state is VersionState.CHECKING:
            if on_checking is not None:
                await on_checking(version)
            version = await self._check(caller, version, published)
        if version.state is VersionState.FAILED:
            raise rules.cannot_start(version)
        return version, created

    async def _check(
        self, caller: Caller, version: VersionRecord, published: Mapping[str, object]
    ) -> VersionRecord:
        """Has an executor start `version` once, then records what it found: READY (and DEFAULT
        moves to it) or FAILED. Unreachable executors: see StartCheck. (A version left CHECKING
        while the check was on becomes READY unchecked once it is off.)"""
        skipped = self._starts is None or self._start_check is StartCheck.OFF
        try:
            failure = None if skipped else await self._start(version)
        except Unavailable as exc:
            if self._start_check is StartCheck.REQUIRED:
                log.warning("start check of %s: no executor answered: %s", version.ref.name,
                            exc.message)
                raise Unavailable(
                    f"no executor could be reached to start {version.ref.name} once before "
                    "DEFAULT moves to it; it is stored but not routable until then: publish the "
                    "same bundle again shortly to finish",
                    reason="START_CHECK_UNAVAILABLE",
                ) from None
            log.warning("start check of %s skipped, no executor answered: %s",
                        version.ref.name, exc.message)
            failure, skipped = None, True
        async with self._store.tx() as tx:
            await tx.lock_agent(version.tenant, version.ref.parent)
            current = await tx.get_version(version.tenant, version.ref)
            if current is None:
                raise NotFound(f"{version.ref.name} was deleted while it was being started")
            if current.state is not VersionState.CHECKING:
                return current  # another publish of the same bytes finished first
            state = VersionState.FAILED if failure is not None else VersionState.READY
            current = await tx.settle_version(version.tenant, version.ref, state, failure)
            if state is VersionState.READY:
                await _make_default(tx, current)
            outcome = "skipped" if skipped else "failed" if failure is not None else "passed"
            details = {**published, "state": state.value, "start_check": outcome}
            if failure is not None:
                details["error_type"] = failure.error_type
            await tx.audit(caller, "PublishVersion", version.ref.name, details)
        return current

    async def _start(self, version: VersionRecord) -> StartFailure | None:
        assert self._starts is not None
        failure = await self._starts.check_start(version.tenant, version.ref, version.digest)
        return failure.bounded() if failure is not None else None
