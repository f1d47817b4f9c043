"""What a sandbox sees of the host, with each driver (bwrap, gvisor): an agent lists every path
visible from inside (walking / without following symlinks, not into /proc, /sys, /dev or the
trees bound whole) and the lists are compared with an allow-list. Nothing of the platform's
checkout, its virtualenv, its data directory or /root may be visible."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from services.executor.drivers.base import SandboxDriver
from services.executor.sandbox import Sandbox
from tests.security.sandboxes import invoke, worker

pytestmark = pytest.mark.timeout(90)

StartSandbox = Callable[..., Awaitable[Sandbox]]
CHECKOUT = Path(__file__).resolve().parents[2]
DEPTH = 7
LIMIT = 50_000
# Trees a sandbox sees whole: the system's /usr, its own kernel's files and the agents' runtime
# (services/executor/runtime.py). Listed themselves, not walked (/usr alone is tens of thousands
# of entries).
WHOLE = ("/usr", "/proc", "/sys", "/dev")
# What else it may see: its scratch and its bundle.
ALLOWED = (*WHOLE, "/tmp", "/bundle")


def runtime_prefix(driver: SandboxDriver) -> str:
    """The prefix of the interpreter the driver runs agents with (<prefix>/bin/python3.X)."""
    python: str = driver.python  # type: ignore[attr-defined]
    return str(Path(python).parent.parent)


def allowed(path: str, runtime: str) -> bool:
    """Inside an allowed tree or the runtime, or a directory on the way to the runtime; or one
    of the host's /bin-style symlinks into /usr."""
    if any(path == root or path.startswith(root + "/") for root in (*ALLOWED, runtime)):
        return True
    if runtime.startswith(path + "/"):
        return True
    return os.path.dirname(path) == "/" and os.path.islink(path) and \
        os.path.realpath(path).startswith("/usr/")


def forbidden() -> dict[str, str]:
    """The host paths nothing of which may be visible inside, by what they are."""
    return {
        "the platform's checkout": str(CHECKOUT),
        "its virtualenv": os.path.realpath(sys.prefix),
        "its data directory": str(CHECKOUT / ".corral"),
        "root's home": "/root",
    }


async def visible(start: StartSandbox, driver: SandboxDriver) -> list[str]:
    """Every path the sandboxed agent can see, as it lists them."""
    sandbox = await start("attacker")
    prune = [*WHOLE, runtime_prefix(driver)]
    turn = await invoke(sandbox, {"attack": "paths", "prune": prune, "depth": DEPTH,
                                  "limit": LIMIT})
    report = turn.json()
    assert not report["truncated"], f"more than {LIMIT} paths visible"
    paths: list[str] = report["paths"]
    return paths


async def test_the_walk_sees_what_is_bound(start: StartSandbox, driver: SandboxDriver) -> None:
    """The listing itself works: it finds the agent's bundle, the system's /usr and the runtime,
    so an empty list cannot pass the tests below."""
    paths = await visible(start, driver)
    expected = {"/usr", "/tmp", "/bundle/agent.py", "/bundle/agent.toml", runtime_prefix(driver)}
    assert expected <= set(paths), paths[:50]


async def test_every_visible_path_is_on_the_allow_list(
    start: StartSandbox, driver: SandboxDriver
) -> None:
    runtime = runtime_prefix(driver)
    outside = [p for p in await visible(start, driver) if not allowed(p, runtime)]
    assert not outside, f"{driver.name} sandbox sees {len(outside)} paths off the allow-list: " \
        f"{outside[:20]}"


async def test_nothing_of_the_platform_is_visible(
    start: StartSandbox, driver: SandboxDriver
) -> None:
    paths = await visible(start, driver)
    seen = {
        what: [p for p in paths if p == host or p.startswith(host + "/")][:5]
        for what, host in forbidden().items()
    }
    assert not any(seen.values()), f"{driver.name} sandbox sees {seen}"


async def test_a_root_only_file_in_a_bound_path_is_unreadable(
    start: StartSandbox,
) -> None:
    """The sandbox's processes are no host root: a file only root may read, inside a path the
    sandbox sees (its own bundle here), stays unreadable."""
    sandbox = await start("attacker")
    secret = sandbox.spec.bundle_dir / "root-only"
    secret.write_text("only root reads this\n")
    secret.chmod(0o600)
    turn = await invoke(sandbox, {"attack": "read", "paths": ["/bundle/root-only"]})
    assert turn.json() == {"/bundle/root-only": {"error": "EACCES"}}


async def test_an_agent_imports_only_the_standard_library_and_the_sdk(
    start: StartSandbox,
) -> None:
    sandbox = await start("attacker")
    turn = await invoke(sandbox, {"attack": "imports",
                                  "modules": ["json", "corral.sdk", "numpy", "grpc", "asyncpg"]})
    assert turn.json() == {"json": "imported", "corral.sdk": "imported",
                           "numpy": "ModuleNotFoundError", "grpc": "ModuleNotFoundError",
                           "asyncpg": "ModuleNotFoundError"}


async def test_the_agent_runs_as_an_unprivileged_uid_without_capabilities(
    start: StartSandbox, driver: SandboxDriver
) -> None:
    sandbox = await start("attacker")
    report = (await invoke(sandbox, {"attack": "whoami"})).json()
    assert report["uid"] == [65534, 65534, 65534] and report["gid"] == [65534, 65534, 65534]
    assert set(report["groups"]) <= {65534}, report
    assert set(report["caps"].values()) == {"0000000000000000"}, report["caps"]
    assert {"CapEff", "CapBnd"} <= set(report["caps"]), report["caps"]
    if driver.name == "bwrap":
        # And on the host: every process of the sandbox but bwrap's own (the outer one and its
        # init, pid 1 inside) is host uid 65534, not root.
        outer = worker(sandbox).pid
        agents = [pid for pid in worker(sandbox).cgroup.pids()
                  if pid != outer and _host_ids(pid)["PPid"] != str(outer)]
        assert agents, "no process of the sandbox found on the host"
        for pid in agents:
            ids = _host_ids(pid)
            assert ids["Uid"].split() == ["65534"] * 4, ids
            assert ids["Gid"].split() == ["65534"] * 4, ids


def _host_ids(pid: int) -> dict[str, str]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in status.splitlines())}
