"""The start check at publish: a version started once in a sandbox under this executor's driver,
as a session's sandbox starts (its entrypoint imported, or its HTTP server answering /ping), and
stopped again. A version that cannot start is an answer, what it raised, not an error."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from corral.names import VersionRef
from services.common.errors import Internal
from services.common.execution import StartFailure
from services.executor.admission import Slot
from services.executor.bundles import UnpackedBundle
from services.executor.drivers.base import Limit
from services.executor.model import StartCheckResult
from services.executor.sandbox import AgentFailed, Sandbox
from services.executor.starter import SandboxStarter

log = logging.getLogger(__name__)


def _timed_out(bundle: UnpackedBundle, timeout_s: float) -> StartFailure:
    manifest = bundle.manifest
    if manifest.protocol == "http":
        what = f"its server did not answer GET /ping within {timeout_s:g}s"
    else:
        what = f"importing {manifest.entrypoint} took longer than {timeout_s:g}s"
    return StartFailure("StartTimeout", f"{bundle.version} did not start: {what}")


def _over_limit(bundle: UnpackedBundle, limit: Limit) -> StartFailure:
    manifest = bundle.manifest
    if limit is Limit.MEMORY:
        return StartFailure("MemoryLimit", f"{bundle.version} went over its memory limit while "
                            f"starting (resources.memory_mb={manifest.memory_mb})")
    return StartFailure("CpuLimit", f"{bundle.version} used up its CPU time while starting "
                        f"(resources.cpu_seconds={manifest.cpu_seconds})")


class StartChecks:
    def __init__(
        self, starter: SandboxStarter, timeout_s: float, admit: Callable[[], Awaitable[Slot]]
    ) -> None:
        self._starter = starter
        self._timeout_s = timeout_s
        # A slot under the executor's cap, as a new session gets one (or its refusal).
        self._admit = admit

    async def check(self, version: VersionRef, digest: str) -> StartCheckResult:
        """Starts `version` (which must have `digest`) once and stops it."""
        bundle = await self._starter.bundles.ensure(version, digest)
        sandbox = self._starter.prepared(bundle, await self._admit(), purpose="start check")
        began = time.monotonic()
        try:
            failure = await self._start(sandbox, bundle)
        finally:
            await sandbox.stop()
        took = time.monotonic() - began
        if failure is not None:
            log.info("start check: %s cannot start: %s: %s", version, failure.error_type,
                     failure.message)
        return StartCheckResult(failure, took)

    async def _start(self, sandbox: Sandbox, bundle: UnpackedBundle) -> StartFailure | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await sandbox.start(self._starter.driver)
        except AgentFailed as exc:
            return StartFailure(exc.error_type, exc.message, exc.traceback).bounded()
        except TimeoutError:
            return _timed_out(bundle, self._timeout_s)
        except Internal as exc:
            if exc.reason == "SANDBOX_START_TIMEOUT":
                return _timed_out(bundle, self._timeout_s)
            # The worker died before a word: the version's fault only when a limit ended it.
            limit = sandbox.process.limit_hit if sandbox.process is not None else None
            if limit is None:
                raise
            return _over_limit(bundle, limit)
        return None
