"""Starts sandboxes: a version's bundle unpacked, the driver's spec built from its manifest, the
worker started and the agent imported, bound to no session yet (for a warm pool, or for a
session that found none)."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

from corral.names import VersionRef
from services.executor.bundles import BundleCache, UnpackedBundle
from services.executor.drivers import SandboxDriver, SandboxSpec
from services.executor.metrics import ExecutorMetrics
from services.executor.model import AgentError
from services.executor.sandbox import AgentFailed, Sandbox


class SandboxStarter:
    def __init__(
        self, driver: SandboxDriver, bundles: BundleCache, workdirs: Path, python: str,
        metrics: ExecutorMetrics,
    ) -> None:
        self.driver, self.bundles, self.metrics = driver, bundles, metrics
        # Each sandbox's private directory goes under `workdirs`; `python` runs its worker.
        self.workdirs, self.python = workdirs, python

    def remove_leftovers(self) -> None:
        """Scratch directories a crashed predecessor on this data dir left (the process
        driver's; bwrap's scratch is a tmpfs that died with its sandbox)."""
        if self.workdirs.is_dir():
            for leftover in self.workdirs.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)

    async def start(self, version: VersionRef, digest: str) -> Sandbox:
        return await self.start_bundle(await self.bundles.ensure(version, digest))

    async def start_bundle(self, bundle: UnpackedBundle) -> Sandbox:
        sandbox = Sandbox(self.spec(bundle))
        began = time.monotonic()
        try:
            await sandbox.start(self.driver)
        except AgentFailed as exc:
            raise AgentError(
                f"the agent failed to load: {exc.error_type}: {exc.message}", reason="AGENT_LOAD_ERROR",
                stack=exc.traceback, agent_exception=exc.error_type, agent_message=exc.message,
            ) from None
        self.metrics.sandbox_start.labels(self.driver.name).observe(time.monotonic() - began)
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
