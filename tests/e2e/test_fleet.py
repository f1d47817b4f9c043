"""Two executors as separate processes beside `make run`'s platform: sessions spread over both,
a drained executor's session moves at its next turn, and an executor killed with SIGKILL
mid-conversation costs the turn in flight (UNAVAILABLE, naming it) but nothing committed: the
session's next turn runs on the other executor from its committed state. The launcher's own
executor, killed, answers again once the launcher restarted it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.bundles import BEHAVIOUR, agent_files, write_bundle
from tests.e2e.conftest import CORRAL, ROOT, corral

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SECOND = "exec-two"
AGENT = "fleet-e2e"


def executor_of(env: dict[str, str]) -> psutil.Process:
    """The launcher's executor process."""
    found = [p for p in psutil.Process(int(env["_PID"])).children()
             if "services.executor" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE]
    assert len(found) == 1, [p.cmdline() for p in found]
    return found[0]


def until(check: Callable[[], Any], what: str, timeout_s: float = 30) -> Any:
    """Polls `check` (bounded) until it returns something true, and returns that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def members(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {e["name"].removeprefix("executors/"): e for e in corral(env, "executors", "list")}


@pytest.fixture(scope="module")
def second(platform: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    """A second executor process, started as the launcher starts its own but with a name, data
    dir and ports of its own."""
    env = dict(executor_of(platform).environ())
    data = tmp_path_factory.mktemp(SECOND)
    env.update({
        "CORRAL_EXECUTOR_NAME": SECOND, "CORRAL_DATA_DIR": str(data),
        "CORRAL_EXECUTOR_ADDR": "127.0.0.1:0", "CORRAL_EXECUTOR_LISTEN": "127.0.0.1:0",
        "CORRAL_EXECUTOR_INTERNAL_ADDR": "127.0.0.1:0",
        "CORRAL_EXECUTOR_INTERNAL_LISTEN": "127.0.0.1:0", "CORRAL_EXECUTOR_HTTP_PORT": "0",
    })
    env.pop("CORRAL_ADDRESS_FILE", None)
    env.pop("CORRAL_EXECUTOR_ADVERTISE", None)
    log = (data / "executor.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.executor"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        until(lambda: SECOND in members(platform), "the second executor in the fleet")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def invoke(env: dict[str, str], session: str, data: object = None) -> dict[str, Any]:
    return corral(env, "invoke", AGENT, "--session", session, "--data", json.dumps(data or {}))  # type: ignore[no-any-return]


def placed_on(env: dict[str, str], session: str) -> str:
    return corral(env, "sessions", "get", session)["executor"].removeprefix("executors/")  # type: ignore[no-any-return]


def session_on(env: dict[str, str], executor: str, prefix: str) -> str:
    """A new session (one turn run) that the fleet placed on `executor`."""
    for n in range(40):
        session = f"{prefix}-{n}"
        assert invoke(env, session)["output"] == "Turn 1."
        if placed_on(env, session) == executor:
            return session
    raise AssertionError(f"no new session was placed on {executor}")


def test_sessions_move_off_a_drained_or_killed_executor_and_keep_their_state(
    platform: dict[str, str], second: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    corral(platform, "publish", str(write_bundle(tmp_path / AGENT, agent_files(AGENT, BEHAVIOUR))))
    fleet = members(platform)
    [first] = set(fleet) - {SECOND}
    assert fleet[SECOND]["driver"] and int(fleet[SECOND]["capacity"]) > 0
    on_first, on_second = session_on(platform, first, "a"), session_on(platform, SECOND, "b")

    # Drained, exec-two takes no new session, and its session moves at its next turn.
    assert corral(platform, "executors", "drain", SECOND)["draining"]
    assert until(lambda: members(platform)[SECOND].get("draining"), "the drain in the listing")
    time.sleep(1.5)  # a router polls the fleet every second
    assert invoke(platform, on_second)["output"] == "Turn 2."
    assert placed_on(platform, on_second) == first
    corral(platform, "executors", "undrain", SECOND)
    until(lambda: not members(platform)[SECOND].get("draining"), "the undrain in the listing")
    time.sleep(1.5)

    # Killed mid-turn: the platform fails that turn UNAVAILABLE naming the executor (the mesh
    # tests check the status); `corral invoke` retries it under its request id, and it runs on
    # the other executor from the last committed state: nothing of the killed attempt counts.
    victim = session_on(platform, SECOND, "c")
    slow = subprocess.Popen(
        [CORRAL, "--json", "invoke", AGENT, "--session", victim, "--data",
         json.dumps({"mode": "sleep", "seconds": 4})],
        env=platform, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)  # the turn is running in exec-two's sandbox
        os.kill(second.pid, signal.SIGKILL)
        out, err = slow.communicate(timeout=60)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert slow.returncode == 0, (out, err)
    assert json.loads(out)["output"] == "Turn 2. Slept.", out
    assert placed_on(platform, victim) == first
    assert invoke(platform, victim)["output"] == "Turn 3."
    assert until(lambda: SECOND not in members(platform), "the killed executor out of the fleet",
                 timeout_s=10)

    # The launcher's own executor killed: restarted under the same name, it answers again.
    executor_of(platform).send_signal(signal.SIGKILL)

    def answers() -> dict[str, Any] | None:
        result = subprocess.run(
            [CORRAL, "--json", "invoke", AGENT, "--session", on_first, "--data", "{}"],
            env=platform, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode == 0:
            return json.loads(result.stdout)  # type: ignore[no-any-return]
        assert json.loads(result.stdout)["error"]["code"] == "UNAVAILABLE", result.stdout
        return None

    assert until(answers, "the restarted executor to answer", timeout_s=60)["output"] == "Turn 2."
    assert placed_on(platform, on_first) == first
