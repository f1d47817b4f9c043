"""Fixtures for the escape suite: each sandbox driver (bwrap, gvisor) in turn, and sandboxes
started through services/executor/sandbox.py from bundles each test writes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio

from services.executor.drivers.bwrap import BwrapDriver
from services.executor.drivers.gvisor import GvisorDriver
from services.executor.sandbox import Sandbox
from tests.bundles import write_bundle
from tests.harness import Sandboxes
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
    sandboxes = Sandboxes(driver, tmp_path)

    async def _start(agent: str, *, memory_mb: int = 256, cpu_seconds: int = 30) -> Sandbox:
        bundle = write_bundle(tmp_path / f"{agent}-{uuid.uuid4().hex[:6]}", {
            "agent.py": (AGENTS / f"{agent}.py").read_text(),
            "agent.toml": f'name = "{agent}"\nentrypoint = "agent:app"\n',
        })
        spec = sandboxes.spec(bundle, "agent:app", agent=agent, version="agents/test/versions/1")
        return await sandboxes.start(replace(spec, memory_mb=memory_mb, cpu_seconds=cpu_seconds))

    yield _start
    await sandboxes.stop()
    for sandbox in sandboxes.started:
        if sandbox.process is not None:
            assert sandbox.process.returncode is not None
            assert not any(d.exists() for d in worker(sandbox).cgroup.directories()), \
                "the sandbox's cgroup outlived it"
