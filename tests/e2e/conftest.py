"""The platform started as `make run` starts it, once per test module, on a database of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
import pytest

from services.common.settings import SERVICES
from services.launcher.__main__ import ANY_PORT, HTTP_PORTS
from tests import harness

ROOT = Path(__file__).resolve().parents[2]
CORRAL = str(Path(sys.executable).parent / "corral")


@pytest.fixture(scope="module")
def own_database(postgres_server_url: str) -> Iterator[str]:
    """A database of its own: the walk-through expects the example agent's first versions."""
    with harness.scratch_database(postgres_server_url, "corral_e2e") as url:
        yield url


@pytest.fixture(scope="module")
def platform(own_database: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The launcher's environment, then, once it runs, where it says its services serve: every
    port is one the OS picked."""
    with launched(own_database, redis_url, tmp_path_factory.mktemp("platform")) as env:
        yield env


@contextmanager
def launched(
    database_url: str | None, redis_url: str | None, data: Path, **settings: str
) -> Iterator[dict[str, str]]:
    """`python -m services.launcher` on `database_url` and `redis_url`, or (None) a PostgreSQL or
    Redis it embeds, with its data in `data` and further `settings` (CORRAL_* variables); yields its environment and where its services serve, and `_PID` and
    `_LOG` (its process and its output). Killed, with whatever it started, afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update({f"CORRAL_{svc.upper()}_ADDR": "127.0.0.1:0" for svc in SERVICES})
    env.update({
        "CORRAL_DATA_DIR": str(data),
        "CORRAL_REDIS_PREFIX": f"e2e-{os.getpid()}:",
        # This checkout's code, for the corral command too: the virtualenv's console script may
        # be an editable install of another checkout.
        "PYTHONPATH": str(ROOT),
        **dict.fromkeys(HTTP_PORTS, ANY_PORT),
        **settings,
    })
    if database_url is not None:
        env["CORRAL_DATABASE_URL"] = database_url
    if redis_url is not None:
        env["CORRAL_REDIS_URL"] = redis_url
    log = (data / "platform.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.launcher"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while b"Corral is running" not in (data / "platform.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the platform did not start:\n" + (data / "platform.log").read_text()[-3000:])
        time.sleep(0.2)
    env.update(json.loads((data / "addresses.json").read_text()))
    env["_PID"] = str(proc.pid)
    env["_LOG"] = str(data / "platform.log")
    try:
        yield env
    finally:
        if proc.poll() is None:
            # SIGTERM stops all it started, an embedded PostgreSQL too (which pg_ctl detached).
            started = psutil.Process(proc.pid).children(recursive=True)
            proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(60)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                for child in started:  # the embedded Redis runs in a session of its own
                    with suppress(psutil.NoSuchProcess):
                        child.kill()


def corral(env: dict[str, str], *args: str, stdin: str | None = None, check: bool = True) -> Any:
    """Runs the corral command with --json and returns its parsed output."""
    result = subprocess.run([CORRAL, "--json", *args], env=env, input=stdin, capture_output=True,
                            text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"corral {' '.join(args)} failed: {result.stdout}{result.stderr}")
    return json.loads(result.stdout) if result.stdout.strip() else None
