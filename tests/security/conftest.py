"""Fixtures for the escape suite: each sandbox driver (bwrap, gvisor) in turn, and sandboxes
started through services/executor/sandbox.py from bundles each test writes."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from services.executor.drivers.base import SandboxSpec
from services.executor.drivers.bwrap import BwrapDriver
from services.executor.drivers.gvisor import GvisorDriver
from services.executor.sandbox import Sandbox
from tests.security.sandboxes import (
    AGENTS,
    PIDS_MAX,
    SCRATCH_MB,
    needs_bwrap,
    needs_runsc,
    worker,
)


@pytest.fixture(
    scope="module",
    params=[pytest.param("bwrap", marks=needs_bwrap), pytest.param("gvisor", marks=needs_runsc)],
)
def driver(request: pytest.FixtureRequest) -> BwrapDriver | GvisorDriver:
    if request.param == "gvisor":
        return GvisorDriver(scratch_mb=SCRATCH_MB, pids_max=PIDS_MAX)
    return BwrapDriver(scratch_mb=SCRATCH_MB, pids_max=PIDS_MAX)


StartSandbox = Callable[..., Awaitable[Sandbox]]


@pytest_asyncio.fixture
async def start(driver: BwrapDriver | GvisorDriver, tmp_path: Path) -> AsyncIterator[StartSandbox]:
    """start(agent="attacker", memory_mb=..., cpu_seconds=...) → a started Sandbox; at the end
    every sandbox is stopped and must leave no process and no cgroup behind."""
    started: list[Sandbox] = []

    async def _start(agent: str, *, memory_mb: int = 256, cpu_seconds: int = 30) -> Sandbox:
        bundle = tmp_path / f"{agent}-{uuid.uuid4().hex[:6]}"
        bundle.mkdir()
        (bundle / "agent.py").write_text((AGENTS / f"{agent}.py").read_text())
        (bundle / "agent.toml").write_text(f'name = "{agent}"\nentrypoint = "agent:app"\n')
        spec = SandboxSpec(
            session=f"sessions/{agent}-{uuid.uuid4().hex[:8]}", version="agents/test/versions/1",
            bundle_dir=bundle, workdir=tmp_path / f"work-{uuid.uuid4().hex[:6]}",
            entrypoint="agent:app", prompt_file="", python=sys.executable,
            memory_mb=memory_mb, cpu_seconds=cpu_seconds,
        )
        sandbox = Sandbox(spec)
        started.append(sandbox)
        await sandbox.start(driver)
        return sandbox

    yield _start
    for sandbox in started:
        await sandbox.stop()
        if sandbox.process is not None:
            assert sandbox.process.returncode is not None
            assert not any(d.exists() for d in worker(sandbox).cgroup.directories()), \
                "the sandbox's cgroup outlived it"
