"""The escape suite, run with each sandbox driver (bwrap, gvisor): an attacking agent runs next
to a well-behaved one, both sandboxes live at the same time; every test asserts that the attack
is contained (a clear error or a harmless result) and that the neighbour's invocations complete
correctly. Where gVisor's own kernel answers differently but still contains the attack (EACCES
for EROFS, its own loopback for EPERM), its assertions say so; bwrap's stay exact."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from services.executor.drivers import cgroups
from services.executor.drivers.base import SandboxDriver
from services.executor.drivers.bwrap import OUTPUT_LOG_LIMIT
from services.executor.runtime import site_packages
from services.executor.sandbox import Sandbox, SandboxCrashed
from tests.security.sandboxes import (
    AGENTS,
    PIDS_MAX,
    SCRATCH_MB,
    invoke,
    neighbour_turns,
    worker,
)

pytestmark = pytest.mark.timeout(60)

StartSandbox = Callable[..., Awaitable[Sandbox]]
# The sandbox's uid 65534 is nobody (to gVisor's own kernel, and on the host under bwrap): a file
# it does not own is refused by its mode (EACCES) before the read-only mount is (EROFS).
WRITE_ERRORS = {"EROFS", "EACCES"}


async def pair(start: StartSandbox, **limits: int) -> tuple[Sandbox, Sandbox]:
    attacker, neighbour = await asyncio.gather(start("attacker", **limits), start("neighbour"))
    return attacker, neighbour


async def beside(attacker: Sandbox, neighbour: Sandbox, payload: dict) -> dict:
    """Runs the attack and the neighbour's turns at the same time; returns the attack's report."""
    turn, _ = await asyncio.gather(invoke(attacker, payload), neighbour_turns(neighbour))
    return turn.json()


def errors(report: dict) -> set[str]:
    return {value["error"] if isinstance(value, dict) else value for value in report.values()}


# -- files ------------------------------------------------------------------------------------


async def test_reading_host_files_finds_nothing(start: StartSandbox, tmp_path: Path) -> None:
    attacker, neighbour = await pair(start)
    paths = [
        "/etc/shadow", "/etc/passwd", "/root/.bash_history", "/proc/1/root/etc/shadow",
        str(neighbour.spec.bundle_dir / "agent.py"),  # the bundle store
        str(tmp_path),  # where the executor keeps its files
        str(Path(sys.prefix).parent / "pyproject.toml"),  # the project next to the virtualenv
    ]
    report = await beside(attacker, neighbour, {"attack": "read", "paths": paths})
    assert all("content" not in r for r in report.values()), report
    assert errors(report) <= {"ENOENT", "EACCES"}, report


async def test_another_sessions_scratch_files_are_invisible(start: StartSandbox) -> None:
    attacker, neighbour = await pair(start)
    await neighbour_turns(neighbour, 1)  # writes $TMPDIR/secret in its own scratch
    paths = ["/tmp/secret"] + [f"/proc/{pid}/root/tmp/secret" for pid in range(1, 5)]
    report = await beside(attacker, neighbour, {"attack": "read", "paths": paths})
    assert all("content" not in r for r in report.values()), report


async def test_reading_the_executors_environment_finds_nothing(
    start: StartSandbox, monkeypatch: pytest.MonkeyPatch, driver: SandboxDriver
) -> None:
    canary = "canary-" + os.urandom(8).hex()
    monkeypatch.setenv("CORRAL_DATABASE_URL", f"postgresql://corral:{canary}@127.0.0.1/corral")
    attacker, neighbour = await pair(start)
    report = await beside(attacker, neighbour, {"attack": "environ", "executor_pid": os.getpid()})
    assert canary not in json.dumps(report)
    assert "CORRAL" not in json.dumps(report["visible"])
    if driver.name == "gvisor":
        # No init: pid 1 is the worker, with exactly the environment the OCI spec gives it.
        names = {v.split("=")[0] for v in report["visible"]["1"]["content"].split("\0") if v}
        assert names == {"PATH", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE",
                         "PYTHONUNBUFFERED", "LANG"}, report["visible"]["1"]
    elif driver.as_root:  # type: ignore[attr-defined]
        # bwrap's init is pid 1 in there, root's, so unreadable by the sandbox's nobody.
        assert report["visible"]["1"] == {"error": "EACCES"}, report["visible"]["1"]
    else:
        # bwrap's init is pid 1 in there; it was started with nothing but PATH.
        assert report["visible"]["1"]["content"].split("\0")[0] == "PATH=/usr/bin:/bin"
    assert report["executor"] == {"error": "ENOENT"}


async def test_proc_lists_only_the_sandbox_itself(
    start: StartSandbox, driver: SandboxDriver
) -> None:
    attacker, neighbour = await pair(start)
    report = await beside(attacker, neighbour, {"attack": "processes"})
    processes = report["processes"]
    # bwrap's init and the worker (under gVisor the worker alone); none of the host's processes
    # (this test runner included).
    programs = sorted(cmd.split()[0] for cmd in processes.values())
    python = driver.python  # type: ignore[attr-defined]  # the agents' runtime
    expected = [python] if driver.name == "gvisor" else [str(shutil.which("bwrap")), python]
    assert programs == sorted(expected), processes
    assert str(os.getpid()) not in processes


async def test_its_bundle_and_the_interpreter_are_read_only(
    start: StartSandbox, driver: SandboxDriver
) -> None:
    attacker, neighbour = await pair(start)
    before = (attacker.spec.bundle_dir / "agent.py").read_bytes()
    # The agents' runtime: its interpreter, standard library and corral.sdk.
    runtime = Path(driver.python).parent.parent  # type: ignore[attr-defined]
    stdlib = runtime / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    # corral.sdk where the runtime's interpreter reads it (Debian's: lib/python3/dist-packages).
    sdk = site_packages(runtime) / "corral" / "sdk" / "__init__.py"
    paths = ["/bundle/agent.py", "/bundle/evil.py", f"{runtime}/bin/evil", f"{stdlib}/os.py", str(sdk),
             "/usr/bin/evil", "/evil", "/dev/evil"]
    report = await beside(attacker, neighbour, {"attack": "write", "paths": paths})
    assert set(report.values()) <= WRITE_ERRORS, report
    assert (attacker.spec.bundle_dir / "agent.py").read_bytes() == before
    assert not (attacker.spec.bundle_dir / "evil.py").exists()


async def test_global_sysctls_are_read_only(start: StartSandbox, driver: SandboxDriver) -> None:
    # The sandbox's uid maps to host root when the executor runs as root: a writable /proc/sys
    # would hand it kernel.core_pattern.
    attacker, neighbour = await pair(start)
    report = await beside(attacker, neighbour, {"attack": "sysctl"})
    if driver.name == "gvisor":
        # gVisor's /proc/sys is its own, partial and not writable by nobody: ENOENT or EACCES.
        assert set(report.values()) <= {"ENOENT", "EACCES", "EROFS"}, report
    else:
        assert set(report.values()) == {"EROFS"}, report


async def test_filling_the_scratch_disk_stops_at_its_size(start: StartSandbox) -> None:
    attacker, neighbour = await pair(start)
    report = await beside(attacker, neighbour, {"attack": "fill_disk"})
    assert report["error"] in {"ENOSPC", "EFBIG"}, report
    assert report["written"] <= SCRATCH_MB << 20
    await neighbour_turns(neighbour)  # its own scratch is untouched


# -- network ----------------------------------------------------------------------------------


async def test_no_network_at_all(start: StartSandbox, driver: SandboxDriver) -> None:
    connections = 0

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    # Stands for the executor's and the other services' ports.
    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        attacker, neighbour = await pair(start)
        targets = [["127.0.0.1", 5432], ["127.0.0.1", 6379], ["127.0.0.1", port], ["::1", 5432],
                   ["1.1.1.1", 443], ["8.8.8.8", 53]]
        report = await beside(attacker, neighbour, {"attack": "connect", "targets": targets})
    finally:
        server.close()
        await server.wait_closed()
    if driver.name == "gvisor":
        # Sockets are gVisor's own netstack with a loopback and nothing else: they open (udp,
        # netlink) but every connection is refused or unreachable.
        refused = {"ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "EADDRNOTAVAIL", "EPERM",
                   "EAFNOSUPPORT"}
        assert {report[f"{h}:{p}"] for h, p in targets} <= refused, report
        assert "connected" not in report.values()
    else:
        assert set(report.values()) == {"EPERM"}, report  # vsock, netlink, packet and udp too
    assert connections == 0


async def test_host_names_do_not_resolve(start: StartSandbox) -> None:
    attacker, neighbour = await pair(start)
    names = ["example.com", "localhost", "postgres"]
    report = await beside(attacker, neighbour, {"attack": "resolve", "names": names})
    assert all(isinstance(v, str) and v.startswith("gaierror") for v in report.values()), report


# -- resources --------------------------------------------------------------------------------


async def test_fork_bomb_stops_at_the_pids_limit(
    start: StartSandbox, driver: SandboxDriver
) -> None:
    attacker, neighbour = await pair(start)
    if driver.name == "gvisor":
        # gVisor's kernel refuses forks past RLIMIT_NPROC, but each of its processes costs far
        # more host memory than a bwrap one (ptrace stubs, page tables): the memory limit may
        # kill the sandbox first. Either is contained, and says which limit ended it.
        bomb = asyncio.create_task(invoke(attacker, {"attack": "fork_bomb"}))
        await neighbour_turns(neighbour)
        try:
            report = (await asyncio.wait_for(bomb, 30)).json()
        except SandboxCrashed:
            await worker(attacker).wait()
            assert worker(attacker).limit_hit == "memory"
        else:
            assert report["error"] == "EAGAIN", report
            assert report["forked"] < PIDS_MAX
        await neighbour_turns(neighbour)
        return
    report = await beside(attacker, neighbour, {"attack": "fork_bomb"})
    assert report["error"] == "EAGAIN", report
    assert report["forked"] < PIDS_MAX
    assert worker(attacker).cgroup.pids_refused() > 0
    await neighbour_turns(neighbour)  # while the bomb's children keep trying


async def test_memory_bomb_is_killed_with_a_clear_status(start: StartSandbox) -> None:
    attacker, neighbour = await pair(start, memory_mb=128)
    bomb = asyncio.create_task(invoke(attacker, {"attack": "memory_bomb"}))
    await neighbour_turns(neighbour)
    with pytest.raises(SandboxCrashed):
        await asyncio.wait_for(bomb, 30)
    assert await worker(attacker).wait() == 128 + 9  # bwrap reports the SIGKILL
    assert worker(attacker).limit_hit == "memory"
    await neighbour_turns(neighbour)


async def test_cpu_spin_is_held_to_one_cpu_and_killed_past_its_budget(start: StartSandbox) -> None:
    attacker, neighbour = await pair(start, cpu_seconds=2)
    used_before = worker(attacker).cgroup.cpu_seconds()
    started = time.monotonic()
    spin = asyncio.create_task(invoke(attacker, {"attack": "cpu_spin", "helpers": 3}))
    await neighbour_turns(neighbour)
    with pytest.raises(SandboxCrashed):
        await asyncio.wait_for(spin, 30)
    elapsed = time.monotonic() - started
    await worker(attacker).wait()
    assert worker(attacker).limit_hit == "cpu"
    # Four spinning processes, yet no more than one CPU's worth of time (plus polling slack).
    assert (worker(attacker).cpu_used_s - used_before) / elapsed < 1.25
    await neighbour_turns(neighbour)


async def test_printing_gigabytes_is_drained_not_logged(
    start: StartSandbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.executor.drivers.bwrap")
    attacker, neighbour = await pair(start)
    report = await beside(attacker, neighbour, {"attack": "shout", "mib": 128})
    assert report == {"printed_mib": 128}
    logged = sum(len(r.getMessage()) for r in caplog.records if "stdout" in r.getMessage())
    assert logged < 2 * OUTPUT_LOG_LIMIT


# -- other processes and privileges ----------------------------------------------------------


async def test_cannot_ptrace_or_signal_other_processes(
    start: StartSandbox, driver: SandboxDriver
) -> None:
    attacker, neighbour = await pair(start)
    payload = {"attack": "ptrace", "neighbour_pid": worker(neighbour).pid,
               "executor_pid": os.getpid()}
    report = await beside(attacker, neighbour, payload)
    if driver.name == "gvisor":
        # gVisor implements ptrace in its own kernel: tracing its own child stays inside the
        # sandbox; its init is refused and the host's pids do not exist in there.
        assert report.pop("ptrace child") in {"attached", "EPERM"}
        assert report.pop("ptrace init") == "EPERM"
        assert {v for k, v in report.items() if k.startswith("ptrace")} <= {"ESRCH", "EPERM"}
    else:
        assert {v for k, v in report.items() if k.startswith("ptrace")} == {"EPERM"}, report
    assert {v for k, v in report.items() if k.startswith("kill")} == {"ESRCH"}, report
    await neighbour_turns(neighbour)


async def test_cannot_mount(start: StartSandbox, driver: SandboxDriver) -> None:
    attacker, neighbour = await pair(start)
    report = await beside(attacker, neighbour, {"attack": "mount"})
    assert report["mount(2)"] == "EPERM"
    # gVisor's kernel allows a user namespace of its own (bwrap's seccomp filter refuses it);
    # nothing gets mounted either way.
    assert report["unshare(2)"] in ({"EPERM", "unshared"} if driver.name == "gvisor" else {"EPERM"})
    assert report["mount(8)"]["returncode"] != 0
    assert report["mounted"] is False


async def test_setuid_binaries_gain_no_privilege(start: StartSandbox) -> None:
    attacker, neighbour = await pair(start)
    report = await beside(attacker, neighbour, {"attack": "setuid"})
    assert report.pop("no_new_privs") == "1"
    assert report.pop("su_ran") is False
    seen = [r["uids"] for r in report.values() if r["uids"]]
    assert seen, report  # at least one was caught while running
    assert all(uids == ["65534"] * 4 for uids in seen), report
    assert all(r["returncode"] != 0 for r in report.values()), report


async def test_nothing_outlives_a_stopped_sandbox(start: StartSandbox) -> None:
    attacker, neighbour = await pair(start)
    report = await beside(attacker, neighbour, {"attack": "outlive"})
    host_pids = worker(attacker).cgroup.pids()
    assert len(host_pids) >= 4  # bwrap outside, its init, the worker, the daemon
    await attacker.stop()
    assert report["daemon"] > 0
    still = [pid for pid in host_pids if _running(pid)]
    assert still == [], f"still running after stop: {still}"
    assert not any(d.exists() for d in worker(attacker).cgroup.directories())
    await neighbour_turns(neighbour)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


CRASHING_EXECUTOR = """
import asyncio, json, sys, time
from pathlib import Path
from services.executor.drivers.base import SandboxSpec
from services.executor.drivers.bwrap import BwrapDriver
from services.executor.drivers.gvisor import GvisorDriver
from services.executor.sandbox import Sandbox
from tests.security.sandboxes import invoke

async def main():
    bundle = Path(sys.argv[1])
    sandbox = Sandbox(SandboxSpec(session="s", version="v", bundle_dir=bundle,
        workdir=bundle.parent / "work", entrypoint="agent:app", prompt_file="",
        python=""))
    await sandbox.start(GvisorDriver() if sys.argv[2] == "gvisor" else BwrapDriver())
    await invoke(sandbox, {"attack": "outlive"})
    group = sandbox.process.cgroup
    print(json.dumps({"pids": group.pids(), "dirs": [str(d) for d in group.directories()]}),
          flush=True)
    time.sleep(60)

asyncio.run(main())
"""


async def test_a_crashed_executor_takes_its_sandboxes_along(
    start: StartSandbox, tmp_path: Path, driver: SandboxDriver
) -> None:
    neighbour = await start("neighbour")
    bundle = tmp_path / "crash-bundle"
    bundle.mkdir()
    (bundle / "agent.py").write_text((AGENTS / "attacker.py").read_text())
    executor = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_EXECUTOR, str(bundle), driver.name,
        cwd=Path(__file__).parents[2], stdout=asyncio.subprocess.PIPE,
    )
    assert executor.stdout is not None
    left = json.loads(await asyncio.wait_for(executor.stdout.readline(), 20))
    assert len(left["pids"]) >= 4
    executor.kill()  # SIGKILL: no clean-up of its own
    await executor.wait()
    deadline = time.monotonic() + 5
    while any(_running(pid) for pid in left["pids"]) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [pid for pid in left["pids"] if _running(pid)] == []
    # What the next executor's start-up finds and removes.
    hierarchy = cgroups.detect()
    assert {str(p) for p in cgroups.orphans(hierarchy)} >= set(left["dirs"])
    cgroups.remove_orphans(hierarchy)
    assert not any(Path(d).exists() for d in left["dirs"])
    await neighbour_turns(neighbour)
