"""The `process` driver: the worker is its own process, in its own process group and working
directory, with none of the executor's environment. It does not isolate the file system or the
network; stronger drivers come with the sandbox work. An http-protocol agent's server listens on
the host's port 8080 here, so only one such session can run at a time (its worker refuses to
start when the port is taken)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from services.executor.drivers.base import Limit, SandboxSpec, Usage, worker_module


class _Process:
    # No cgroup: nothing is measured, and no limit ends the worker.
    limit_hit: Limit | None = None

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.pid = proc.pid

    async def wait(self) -> int:
        return await self._proc.wait()

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def usage(self) -> Usage:
        return Usage()


class ProcessDriver:
    name = "process"

    def remove_orphans(self) -> int:
        """None to remove: this driver keeps no cgroups or runtime state, and the scratch
        directories are the executor's to wipe at start."""
        return 0

    async def spawn(self, spec: SandboxSpec, socket_fd: int) -> _Process:
        spec.workdir.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(spec.workdir),
            "TMPDIR": str(spec.workdir),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "LANG": "C.UTF-8",
        }
        proc = await asyncio.create_subprocess_exec(
            spec.python or sys.executable,
            "-m", worker_module(spec.protocol),
            str(socket_fd), str(spec.bundle_dir), spec.entrypoint, spec.prompt_file,
            json.dumps(spec.resource),
            cwd=spec.workdir,
            env=env,
            pass_fds=(socket_fd,),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        return _Process(proc)
