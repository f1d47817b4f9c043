"""The corral command on a real registry and telemetry, run as a user runs it: a process of its
own whose output goes to a pipe."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.registry.v1 import rollouts_pb2 as ro
from tests.conftest import StartServices
from tests.credentials import token
from tests.rollout_world import ALICE, TENANT, USER, World, manual, ready, weight

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[3]


async def test_a_piped_watch_prints_a_line_per_change_while_the_rollout_runs(
    start_services: StartServices, make_world: Callable[..., World]
) -> None:
    await start_services("telemetry", "registry")
    w = await ready(make_world)
    r = await w.start_rollout(2, [weight(10), manual(), weight(100)])
    await w.wait(r.name, lambda x: x.current_step == 1, what="at its manual gate")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env |= {"CORRAL_REGISTRY_ADDR": w.settings.addrs["registry"], "CORRAL_TOKEN": token(TENANT, USER)}
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from corral.cli import main; main()",
        "rollout", "status", w.agent, "prod", "--watch",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert watch.stdout is not None
    try:
        # Seen while the rollout still waits at its gate, not only once it has ended.
        first = (await asyncio.wait_for(watch.stdout.readline(), 20)).decode()
        assert f"{r.name} | PAUSED | weight 10% | step 2/3 manual gate" in first, first
        await w.rollouts.PromoteRollout(ro.PromoteRolloutRequest(name=r.name, full=True), metadata=ALICE)
        rest, errors = await asyncio.wait_for(watch.communicate(), 20)
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()
    assert watch.returncode == 0, errors.decode()
    lines = [first, *rest.decode().splitlines()]
    assert "| SUCCEEDED | weight 100%" in lines[-1], lines
    assert len(set(lines)) == len(lines)  # a line per change, not per poll
    assert not any("\x1b" in line for line in lines)  # no cursor control or colour in a pipe
