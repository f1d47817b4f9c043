"""Exactly-once turns as `make run` serves them: the router process is killed with SIGKILL mid-turn,
or after a turn committed but before its caller read the reply, and the client's retry under the
same request id (through the router the launcher restarted) returns the turn's result with the
turn applied once."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import psutil
import pytest

from corral import retries
from corral.client import CorralClient
from corral.config import ClientConfig
from corral.router.v1 import router_pb2 as rt
from corral.sessions.v1 import sessions_pb2 as ses
from tests.bundles import BEHAVIOUR, agent_files, write_bundle
from tests.e2e.conftest import corral

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

# Long enough for the router to come back (the launcher restarts it at once; a few seconds).
PATIENT = retries.RetryPolicy(attempts=30, first_s=0.2, max_s=1.0)


@pytest.fixture(scope="module")
def agent(platform: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    root = write_bundle(tmp_path_factory.mktemp("once"), agent_files("once", BEHAVIOUR))
    corral(platform, "publish", str(root))
    return "once"


@pytest.fixture
def client(platform: dict[str, str]) -> Iterator[CorralClient]:
    c = CorralClient(ClientConfig.from_env(platform), retry_policy=PATIENT)
    yield c
    c.close()


def kill_router(env: dict[str, str]) -> None:
    (router,) = [p for p in psutil.Process(int(env["_PID"])).children()
                 if "services.router" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE]
    router.kill()


def turns_run(client: CorralClient, session: str) -> int:
    """How many turns the agent ran in the session: it counts them in its own state."""
    state = client.sessions.GetSessionState(
        ses.GetSessionStateRequest(name=session), metadata=client.metadata)
    return int(json.loads(state.state)["turns"])


def committed_turns(client: CorralClient, session_id: str) -> int:
    try:
        return client.get_session(session_id).turn_count
    except grpc.RpcError:
        return 0  # not created yet


def test_a_turn_whose_router_was_killed_mid_turn_runs_once(
    platform: dict[str, str], agent: str, client: CorralClient,
) -> None:
    session = f"killed-{uuid.uuid4().hex[:8]}"
    outcome: list[rt.InvokeResponse | BaseException] = []

    def call() -> None:
        try:
            outcome.append(client.invoke(
                agent, json.dumps({"mode": "sleep", "seconds": 2}).encode(), session=session))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 30
    while not any(s.session == f"sessions/{session}" and s.busy for s in client.sandboxes().sandboxes):
        assert time.monotonic() < deadline, "the turn never reached a sandbox"
        time.sleep(0.1)
    kill_router(platform)  # the agent is asleep in its turn
    caller.join(120)
    (response,) = outcome
    assert isinstance(response, rt.InvokeResponse), response
    assert response.output == b"Turn 1. Slept." and response.completed.turn == 1
    assert turns_run(client, f"sessions/{session}") == 1


def test_a_committed_turn_whose_reply_was_lost_with_the_router_is_replayed(
    platform: dict[str, str], agent: str, client: CorralClient,
) -> None:
    session = f"lost-{uuid.uuid4().hex[:8]}"
    request = rt.InvokeRequest(agent=f"agents/{agent}", session_id=session, payload=b"{}",
                               request_id=str(uuid.uuid4()))
    # The caller never reads its reply: the turn commits, and then the router dies.
    unread = client.router.InvokeStream(request, metadata=client.metadata)
    deadline = time.monotonic() + 30
    while committed_turns(client, session) < 1:
        assert time.monotonic() < deadline, "the turn never committed"
        time.sleep(0.05)
    kill_router(platform)
    unread.cancel()

    again = client.invoke(agent, b"{}", session=session, request_id=request.request_id)
    assert again.info.replayed and again.output == b"Turn 1." and again.completed.turn == 1
    assert turns_run(client, f"sessions/{session}") == 1
    # The next request is a new turn.
    assert client.invoke(agent, b"{}", session=session).output == b"Turn 2."
