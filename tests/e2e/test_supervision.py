"""`make run` as a supervisor: a service killed with SIGKILL, then the embedded Redis, come back
on their own (the launcher says so) and the platform answers again, on the same addresses."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.conftest import corral, launched

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def platform_embedding_redis(own_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The launcher with no CORRAL_REDIS_URL: it starts, and watches, a Redis of its own."""
    with launched(own_database, None, tmp_path_factory.mktemp("supervised")) as env:
        yield env


def started_by(env: dict[str, str], command: str) -> psutil.Process:
    """The launcher's child whose command line has `command` (this test's launcher only)."""
    found = [p for p in psutil.Process(int(env["_PID"])).children()
             if command in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE]
    assert len(found) == 1, [p.cmdline() for p in found]
    return found[0]


def launcher_runs(env: dict[str, str]) -> bool:
    return psutil.Process(int(env["_PID"])).status() != psutil.STATUS_ZOMBIE


def wait_for_output(env: dict[str, str], *texts: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        output = Path(env["_LOG"]).read_text()
        if all(text in output for text in texts):
            return output
        if time.monotonic() > deadline:
            pytest.fail(f"the launcher did not say {texts}:\n{output[-4000:]}")
        time.sleep(0.2)


def invoke_until_it_answers(env: dict[str, str], session: str, timeout_s: float = 30) -> Any:
    """An invocation, retried while the platform comes back (the first may meet a broken
    connection); the last failure is reported."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return corral(env, "invoke", "progress-report", "--endpoint", "prod", "--session", session,
                          "--data", '{"text": "Still there?"}')
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_killed_services_are_restarted_on_their_addresses(platform_embedding_redis: dict[str, str]) -> None:
    env = platform_embedding_redis
    first = corral(env, "invoke", "progress-report", "--endpoint", "prod", "--session", "kept",
                   "--data", '{"text": "Before."}')
    assert first["output"].startswith("Turn 1.")
    router, sessions = started_by(env, "services.router"), started_by(env, "services.sessions")
    router.kill()
    sessions.kill()

    output = wait_for_output(env, "router restarted: serving on", "sessions restarted: serving on")
    assert "router exited (killed by SIGKILL)" in output and "sessions exited (killed by SIGKILL)" in output
    assert f"router restarted: serving on {env['CORRAL_ROUTER_ADDR']} " in output, "moved to another address"
    assert "stopping the platform" not in output and launcher_runs(env)
    # The same address the client was given, and the session's state survived its service.
    again = invoke_until_it_answers(env, "kept")
    assert again["output"].startswith("Turn 2.")
    assert started_by(env, "services.router").pid != router.pid


def test_killed_embedded_redis_is_restarted(platform_embedding_redis: dict[str, str]) -> None:
    env = platform_embedding_redis
    redis = started_by(env, "redis-server")
    redis.kill()

    output = wait_for_output(env, "redis restarted: socket")
    assert "redis exited (killed by SIGKILL)" in output
    assert started_by(env, "redis-server").pid != redis.pid
    # Sessions keeps its leases in Redis: a turn needs it back.
    assert invoke_until_it_answers(env, "after-redis")["output"].startswith("Turn 1.")


def test_killed_embedded_postgres_is_restarted_on_its_data(tmp_path: Path) -> None:
    with launched(None, None, tmp_path) as env:
        first = corral(env, "invoke", "progress-report", "--endpoint", "prod", "--session", "kept",
                       "--data", '{"text": "Before."}')
        assert first["output"].startswith("Turn 1.")
        # Started by this test's launcher: the server of its own data directory.
        postmaster = psutil.Process(int((tmp_path / "pg" / "postmaster.pid").read_text().split()[0]))
        assert str(tmp_path / "pg") in " ".join(postmaster.cmdline())
        postmaster.kill()

        output = wait_for_output(env, "postgres restarted: data in")
        assert "postgres exited (exit status unknown)" in output
        # The same data: the session's first turn is still there.
        assert invoke_until_it_answers(env, "kept")["output"].startswith("Turn 2.")
    # Stopping the launcher (SIGTERM) stopped the PostgreSQL it restarted.
    assert not (tmp_path / "pg" / "postmaster.pid").exists()


def test_ctrl_c_stops_the_supervised_platform_without_restarting_anything(
        platform_embedding_redis: dict[str, str]) -> None:
    launcher = psutil.Process(int(platform_embedding_redis["_PID"]))
    children = launcher.children(recursive=True)
    log = Path(platform_embedding_redis["_LOG"])
    before = len(log.read_text())
    os.killpg(launcher.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, alive = psutil.wait_procs([launcher, *children], timeout=30)
    assert not alive, f"still running after Ctrl-C: {[p.cmdline() for p in alive]}"
    stopping = log.read_text()[before:]
    assert "exited (" not in stopping and "restarting it" not in stopping and " restarted: " not in stopping, stopping
    assert stopping.rstrip().endswith("stopped")
