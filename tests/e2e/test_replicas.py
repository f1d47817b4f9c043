"""`make run` with CORRAL_REPLICAS: two routers, registries, sessions and telemetry services and
two executors (a fleet) as separate processes against one PostgreSQL and Redis. The platform behaves as with one of each:
both routers hear endpoint changes, a session continues through either router, and a replica
killed with SIGKILL costs at most the calls it had in flight while the others answer and the
launcher starts it again."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from corral.router.v1 import router_pb2, router_pb2_grpc
from tests.e2e.conftest import CORRAL, corral, launched

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

REPLICATED = ("router", "registry", "sessions", "telemetry")
# Executors join the fleet: two processes, sessions placed on either.
FLEET = "executor=2"


@pytest.fixture(scope="module")
def replicated(own_database: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with launched(own_database, redis_url, tmp_path_factory.mktemp("replicated"),
                  CORRAL_REPLICAS=",".join([*(f"{svc}=2" for svc in REPLICATED), FLEET])) as env:
        yield env


def replicas_of(env: dict[str, str], service: str) -> dict[str, psutil.Process]:
    """The launcher's processes of `service`, by the address each listens on (a service that is
    not replicated: by its process id)."""
    found = {}
    for child in psutil.Process(int(env["_PID"])).children():
        if f"services.{service}" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
            found[child.environ().get(f"CORRAL_{service.upper()}_LISTEN", str(child.pid))] = child
    return found


def invoke(env: dict[str, str], session: str, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CORRAL, "--json", "invoke", "progress-report", "--endpoint", "prod", "--session", session,
         "--data", json.dumps({"text": text})],
        env=env, capture_output=True, text=True, timeout=60, check=False)


def cached_revisions(env: dict[str, str], endpoint: str) -> list[int]:
    """The revision of `endpoint` each router replica holds."""
    key = (Path(env["CORRAL_DATA_DIR"]) / "admin.key").read_text().strip()
    revisions = []
    for address in env["CORRAL_ROUTER_ADDR"].split(","):
        with grpc.insecure_channel(address) as channel:
            cached = router_pb2_grpc.RouterServiceStub(channel).GetCachedEndpoint(
                router_pb2.GetCachedEndpointRequest(name=endpoint), timeout=5,
                metadata=(("authorization", f"Bearer {key}"),))
            assert cached.synced, address
            revisions.append(cached.revision)
    return revisions


def test_every_service_runs_twice_and_both_routers_follow_the_endpoints(replicated: dict[str, str]) -> None:
    env = replicated
    for svc in (*REPLICATED, "executor"):
        assert len(replicas_of(env, svc)) == 2, svc
    executors = corral(env, "executors", "list")
    assert len(executors) == 2, executors
    assert len(env["CORRAL_ROUTER_ADDR"].split(",")) == 2
    endpoint = "agents/progress-report/endpoints/prod"
    corral(env, "endpoint", "set", "progress-report", "prod", "--split", "1=100")
    deadline = time.monotonic() + 10
    while len(set(revisions := cached_revisions(env, endpoint))) != 1 or revisions[0] == 0:
        assert time.monotonic() < deadline, revisions
        time.sleep(0.1)

    # One session, turn after turn: each CLI call may go to either router, sessions service and
    # registry; the session's state is the same wherever it lands.
    for turn in range(1, 5):
        reply = corral(env, "invoke", "progress-report", "--endpoint", "prod", "--session", "both",
                       "--data", json.dumps({"text": f"Turn {turn} of many."}))
        assert reply["output"].startswith(f"Turn {turn}."), reply


@pytest.mark.parametrize("service", ["sessions", "registry", "telemetry", "router", "executor"])
def test_a_killed_replica_costs_at_most_its_calls_in_flight(replicated: dict[str, str], service: str) -> None:
    env = replicated
    session = f"through-{service}-death"
    assert json.loads(invoke(env, session, "Before.").stdout)["output"].startswith("Turn 1.")
    victim_address, victim = min(replicas_of(env, service).items())
    victim.kill()
    # Turns go on while the launcher starts it again; each is a new CLI process, so only a call
    # that was on the dead replica's connection may fail, and then as UNAVAILABLE.
    log = Path(env["_LOG"])
    failures, turns = [], 1
    deadline = time.monotonic() + 90
    while f"restarted: serving on {victim_address}" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        result = invoke(env, session, "During.")
        if result.returncode == 0:
            turns += 1
            assert json.loads(result.stdout)["output"].startswith(f"Turn {turns}."), result.stdout
        else:
            failures.append(result.stderr)
    assert len(failures) <= 1, failures
    assert all("UNAVAILABLE" in f and "INTERNAL" not in f and "UNKNOWN" not in f for f in failures), failures
    assert turns >= 2, "no turn succeeded while one replica was down"
    # Back: both replicas serve again, and the session carries on.
    assert len(replicas_of(env, service)) == 2
    result = invoke(env, session, "After.")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["output"].startswith(f"Turn {turns + 1}.")
