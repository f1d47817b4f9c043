"""Run by build-image.sh inside the image it has just built (as root, with writable cgroups, as
in a privileged executor pod): every service imports, the agents' runtime is installed, and each
sandbox driver starts a real sandbox that runs an agent's worker up to Ready."""

from __future__ import annotations

import asyncio
import importlib
import tempfile
from pathlib import Path

from services.common.settings import SERVICES
from services.executor import runtime
from services.executor.drivers import driver_for
from services.executor.drivers.base import SandboxSpec
from services.executor.sandbox import Sandbox

AGENT = "from corral.sdk import App\napp = App()\n\n@app.entrypoint\ndef run(payload, ctx):\n    return 'hi'\n"


async def start_one(driver_name: str, work: Path) -> None:
    bundle = work / driver_name / "bundle"
    bundle.mkdir(parents=True)
    (bundle / "agent.py").write_text(AGENT)
    (bundle / "agent.toml").write_text('name = "image-check"\nentrypoint = "agent:app"\n')
    spec = SandboxSpec(session="sessions/image-check", version="agents/image-check/versions/1",
                       bundle_dir=bundle, workdir=work / driver_name / "work",
                       entrypoint="agent:app", prompt_file="", python="")
    sandbox = Sandbox(spec)
    await sandbox.start(driver_for(driver_name))
    await sandbox.stop()
    print(f"sandbox driver {driver_name}: a sandbox started and its worker said Ready")


async def main() -> None:
    for svc in SERVICES:
        importlib.import_module(f"services.{svc}.app")
    print(f"services import: {', '.join(SERVICES)}; agents' runtime: {runtime.installed()}")
    with tempfile.TemporaryDirectory(dir="/var/lib/corral") as work:
        for name in ("bwrap", "gvisor"):
            await start_one(name, Path(work))


asyncio.run(main())
