"""Escape attempts that need the whole platform: outliving the session's max lifetime, and
publishing a bundle whose tar reaches outside itself. Each runs beside a well-behaved session on
the same executor, whose turns must complete."""

from __future__ import annotations

import asyncio
import tarfile
import uuid
from pathlib import Path

import grpc
import psutil
import pytest

from corral.bundle import unpack
from tests.bundles import link, publish_requests, tar_of
from tests.mesh import Mesh
from tests.rpc import fails
from tests.security.sandboxes import needs_bwrap

pytestmark = [pytest.mark.integration, needs_bwrap, pytest.mark.timeout(90)]


# Leaves a detached grandchild and a spinning thread behind, then returns as if all were well.
IMMORTAL = """
import os, subprocess, threading
from corral.sdk import App

app = App()


@app.entrypoint
def run(payload, ctx):
    child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    threading.Thread(target=lambda: [None for _ in iter(int, 1)], daemon=True).start()
    yield f"{os.getpid()} {child.pid}"
"""

NEIGHBOUR = """
from corral.sdk import App

app = App()


@app.entrypoint
def run(payload, ctx):
    ctx.state["turns"] = ctx.state.get("turns", 0) + 1
    yield f"turn {ctx.state['turns']}: {payload['text']}"
"""


async def neighbour_keeps_working(mesh: Mesh, agent: str, turns: int) -> None:
    session = f"{mesh.prefix}-n-{uuid.uuid4().hex[:6]}"
    for n in range(1, turns + 1):
        reply = await mesh.invoke(agent, {"text": f"hi {n}"}, session_id=session)
        assert reply.output == f"turn {n}: hi {n}".encode()
        await asyncio.sleep(0.5)


def sandbox_processes(root_pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(root_pid)
        return [p for p in [root, *root.children(recursive=True)] if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


async def test_a_sandbox_does_not_outlive_its_max_lifetime(mesh: Mesh) -> None:
    attacker = await mesh.publish_agent(
        "immortal", IMMORTAL, toml_extra="\n[lifecycle]\nidle_timeout_s = 2\nmax_lifetime_s = 3\n")
    neighbour = await mesh.publish_agent("neighbour", NEIGHBOUR)
    session = f"{mesh.prefix}-immortal"
    await mesh.invoke(attacker, {}, session_id=session)
    listed = await mesh.sandboxes()
    pid = next(s.pid for s in listed if s.session == f"sessions/{session}")
    assert len(sandbox_processes(pid)) >= 3  # bwrap, the worker, its detached sleep

    # The neighbour keeps working while the attacker's lifetime runs out and is enforced.
    await neighbour_keeps_working(mesh, neighbour, 4)
    deadline = asyncio.get_running_loop().time() + 20
    while sandbox_processes(pid):
        assert asyncio.get_running_loop().time() < deadline, \
            f"still running after the max lifetime: {sandbox_processes(pid)}"
        await asyncio.sleep(0.5)
    err = await fails(grpc.StatusCode.FAILED_PRECONDITION, mesh.invoke(attacker, {}, session_id=session))
    assert "expired" in (err.details() or "")
    await neighbour_keeps_working(mesh, neighbour, 1)


EVIL = {
    "dot-dot path": ("../evil.py", b"import os"),
    "absolute path": ("/etc/cron.d/evil", b"* * * * * root true"),
    "symlink outside": link("lib", "/etc"),
    "relative symlink outside": link("lib", "../../../etc"),
    "hard link outside": link("shadow", "/etc/shadow", tarfile.LNKTYPE),
    "device node": link("null", "", tarfile.CHRTYPE),
}


@pytest.mark.parametrize("case", list(EVIL))
async def test_a_tar_reaching_outside_is_refused_at_publish_and_never_unpacked(
    mesh: Mesh, case: str, tmp_path: Path
) -> None:
    neighbour = await mesh.publish_agent("neighbour", NEIGHBOUR)
    name = f"{mesh.prefix}-evil"
    data = tar_of(
        ("agent.toml", f'name = "{name}"\nentrypoint = "agent:app"\n'.encode()),
        ("agent.py", b"from corral.sdk import App\napp = App()\n"), EVIL[case],
    )
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, mesh.registry.PublishVersion(
        iter(publish_requests(data)), metadata=mesh.me))  # type: ignore[arg-type]
    assert "bundle" in (err.details() or "")
    # The executor's own unpacking refuses it too, writing nothing outside its destination.
    dest = tmp_path / "unpacked"
    with pytest.raises(ValueError):
        unpack(data, dest)
    assert not (tmp_path / "evil.py").exists() and not any(tmp_path.glob("**/shadow"))
    await neighbour_keeps_working(mesh, neighbour, 2)
