"""Starts sandboxes: a version's bundle unpacked, the driver's spec built from its manifest, the
worker started and the agent imported, bound to no session yet (for a warm pool, or for a
session that found none). Every start is given a slot under the executor's cap (`slots`, taken
by the caller before anything is spawned), which the sandbox keeps until it is stopped."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from pathlib import Path

from corral.names import VersionRef
from services.executor.admission import SandboxSlots, Slot
from services.executor.bundles import BundleCache, UnpackedBundle
from services.executor.drivers import SandboxDriver, SandboxSpec
from services.executor.metrics import ExecutorMetrics
from services.executor.model import AgentError
from services.executor.sandbox import AgentFailed, Sandbox


class SandboxStarter:
    def __init__(
        self, driver: SandboxDriver, bundles: BundleCache, workdirs: Path, python: str,
        metrics: ExecutorMetrics, max_sandboxes: int = 64, max_starting: int = 4,
        start_queue: int = 16,
    ) -> None:
        self.driver, self.bundles, self.metrics = driver, bundles, metrics
        # The cap on this executor's sandbox processes, whoever starts them.
        self.slots = SandboxSlots(
            max_sandboxes, metrics.sandbox_processes.set, max_starting, start_queue)
        metrics.sandbox_cap.set(max_sandboxes)
        # Each sandbox's private directory goes under `workdirs`; `python` runs its worker.
        self.workdirs, self.python = workdirs, python

    def remove_leftovers(self) -> None:
        """Scratch directories a crashed predecessor on this data dir left (the process
        driver's; bwrap's scratch is a tmpfs that died with its sandbox)."""
        if self.workdirs.is_dir():
            for leftover in self.workdirs.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)

    async def start(self, version: VersionRef, digest: str, slot: Slot) -> Sandbox:
        try:
            bundle = await self.bundles.ensure(version, digest)
        except BaseException:
            slot.release()
            raise
        return await self.start_bundle(bundle, slot)

    async def start_bundle(self, bundle: UnpackedBundle, slot: Slot) -> Sandbox:
        """A started sandbox holding `slot`; when it cannot start, its worker is reaped (and the
        slot given back) before the error is raised."""
        sandbox = self.prepared(bundle, slot)
        began = time.monotonic()
        slot.start_begins()
        try:
            await sandbox.start(self.driver)
        except AgentFailed as exc:
            await sandbox.stop()
            raise AgentError(
                f"the agent failed to load: {exc.error_type}: {exc.message}", reason="AGENT_LOAD_ERROR",
                stack=exc.traceback, agent_exception=exc.error_type, agent_message=exc.message,
            ) from None
        except BaseException:
            await asyncio.shield(sandbox.stop())
            raise
        finally:
            slot.start_ends()
        self.metrics.sandbox_start.labels(self.driver.name).observe(time.monotonic() - began)
        return sandbox

    def prepared(self, bundle: UnpackedBundle, slot: Slot, purpose: str = "warm") -> Sandbox:
        """A sandbox of `bundle`, not started yet, holding `slot` (which its `stop` gives back)."""
        sandbox = Sandbox(self.spec(bundle, purpose))
        sandbox.slot = slot
        return sandbox

    def spec(self, bundle: UnpackedBundle, purpose: str = "warm") -> SandboxSpec:
        """What the driver runs for a sandbox of `bundle`, bound to no session yet; `purpose`
        names it in logs until it has a session."""
        manifest, version = bundle.manifest, bundle.version
        return SandboxSpec(
            session=f"({purpose}) {version}", version=version.name, digest=bundle.digest,
            bundle_dir=bundle.path, workdir=self.workdirs / uuid.uuid4().hex,
            entrypoint=manifest.entrypoint, prompt_file=manifest.prompt_file, python=self.python,
            # Per version only: the session, endpoint and tenant of each invocation are set on
            # the agent's spans by the worker, and enforced by the executor when it forwards them.
            resource={
                "service.name": f"agent-{version.agent}",
                "corral.agent": version.parent.name,
                "corral.version": version.name,
            },
            memory_mb=manifest.memory_mb, cpu_seconds=manifest.cpu_seconds,
            protocol=manifest.protocol,
        )
