"""End to end, as a user runs it: the platform started the way `make run` starts it (separate
processes), driven through the `corral` command, then stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from services.common.settings import SERVICES
from tests.e2e.conftest import CORRAL, ROOT, corral

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_walkthrough(platform: dict[str, str]) -> None:
    env = platform
    # make run already published the example and pointed prod at it.
    v1 = corral(env, "publish", str(ROOT / "examples" / "progress-report"))
    assert v1["name"] == "agents/progress-report/versions/1"
    assert corral(env, "publish", str(ROOT / "examples" / "progress-report"))["number"] == 1
    v2 = corral(env, "publish", str(ROOT / "examples" / "progress-report-v2"))
    assert v2["number"] == 2 and v2["digest"] != v1["digest"]
    assert [v["number"] for v in corral(env, "versions", "progress-report")] == ["1", "2"]

    first = corral(env, "invoke", "progress-report", "--endpoint", "prod", "--session", "e2e-a",
                   "--data", '{"text": "Client slept better."}')
    assert first["version"] == "agents/progress-report/versions/1"
    assert first["output"].startswith("Turn 1.")

    corral(env, "endpoint", "set", "progress-report", "prod", "--version", "2")
    second = corral(env, "invoke", "progress-report", "--endpoint", "prod", "--session", "e2e-a",
                    "--data", '{"text": "Fewer panic attacks."}')
    assert second["version"] == first["version"], "a session must keep the version it started on"
    assert second["output"].startswith("Turn 2."), "the second turn must see the first turn's state"
    fresh = corral(env, "invoke", "progress-report", "--endpoint", "prod", "--data", '{"text": "hi"}')
    assert fresh["version"] == "agents/progress-report/versions/2"

    split = corral(env, "endpoint", "set", "progress-report", "prod", "--split", "1=50,2=50")
    assert [t["percent"] for t in split["traffic"]] == [50, 50]
    endpoints = {e["name"].rsplit("/", 1)[1]: e for e in corral(env, "endpoints", "progress-report")}
    assert {"DEFAULT", "prod"} <= set(endpoints)

    chat = corral(env, "chat", "progress-report", "--endpoint", "prod", "--session", "e2e-chat",
                  stdin="first message\nsecond message\n\n")
    assert [t["turn"] for t in chat] == [1, 2]
    assert chat[1]["output"].startswith("Turn 2.") and chat[0]["version"] == chat[1]["version"]

    sessions = {s["name"] for s in corral(env, "sessions", "list", "--agent", "progress-report")}
    assert {"sessions/e2e-a", "sessions/e2e-chat"} <= sessions

    deadline = time.monotonic() + 20
    while True:
        traces = corral(env, "traces", "--agent", "progress-report", "--version", "1")
        if any(t["session"] == "sessions/e2e-a" for t in traces) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any(t["session"] == "sessions/e2e-a" for t in traces), traces
    assert all(t["version"] == "agents/progress-report/versions/1" for t in traces)
    metrics = {m["version"]: m for m in corral(env, "metrics", "progress-report")}
    assert int(metrics["agents/progress-report/versions/1"]["invocations"]) >= 2
    assert "latency_p99_ms" in metrics["agents/progress-report/versions/1"]

    # Prometheus: the executor counted the invocations under the version's labels, with their
    # latency as a histogram and the model's tokens.
    executor_metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{env['CORRAL_EXECUTOR_HTTP_PORT']}/metrics", timeout=5).read().decode()
    assert ('corral_invocations_total{agent="progress-report",code="OK",endpoint="prod",'
            'tenant="default",version="1"}') in executor_metrics
    assert ('corral_invocation_duration_seconds_bucket{agent="progress-report",endpoint="prod",'
            'le="+Inf",tenant="default",version="1"}') in executor_metrics
    assert ('corral_model_tokens_total{agent="progress-report",direction="input",endpoint="prod",'
            'model="scripted-1",tenant="default",version="1"}') in executor_metrics

    # The executor's view: the live sessions' sandboxes, the warm pools kept for prod's versions,
    # and its own Prometheus page counting pool hits and misses.
    listing = corral(env, "sandboxes")
    live = {s["session"]: s for s in listing["sandboxes"] if s.get("session")}
    assert live["sessions/e2e-a"]["state"] in ("STATE_IDLE", "STATE_BUSY")
    if live["sessions/e2e-a"]["driver"] != "process":  # memory is read from its cgroup
        assert int(live["sessions/e2e-a"].get("memory_bytes", 0)) > 0
    pools = {p["version"]: p for p in listing["pools"]}
    assert "routed" in pools["agents/progress-report/versions/2"]["reasons"]
    assert "corral_warm_pool_misses_total" in urllib.request.urlopen(
        f"http://127.0.0.1:{env['CORRAL_EXECUTOR_HTTP_PORT']}/metrics", timeout=5).read().decode()
    jwks = json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{env['CORRAL_EXECUTOR_HTTP_PORT']}/.well-known/jwks.json", timeout=5).read())
    assert jwks["keys"] and jwks["keys"][0]["crv"] == "Ed25519"

    audit = corral(env, "audit", "--resource", "agents/progress-report/endpoints/prod")
    assert any(e["method"] == "UpdateEndpoint" and e["user"].startswith("key:bootstrap-admin (")
               and e["tenant"] == "default" for e in audit)

    bad = subprocess.run([CORRAL, "--json", "endpoint", "set", "progress-report", "prod", "--split", "1=50,2=40"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["code"] == "INVALID_ARGUMENT" and "100" in bad.stdout

    # Deleting (stdin is no terminal here, so nothing is asked): a session, an endpoint; a
    # version still in use is refused, naming what uses it.
    corral(env, "sessions", "delete", "e2e-chat")
    sessions = {s["name"] for s in corral(env, "sessions", "list", "--agent", "progress-report")}
    assert "sessions/e2e-chat" not in sessions and "sessions/e2e-a" in sessions
    corral(env, "endpoint", "delete", "progress-report", "prod")
    assert "prod" not in {e["name"].rsplit("/", 1)[1] for e in corral(env, "endpoints", "progress-report")}
    refused = corral(env, "versions", "delete", "progress-report", "1", check=False)
    assert refused["error"]["code"] == "FAILED_PRECONDITION"
    assert "agents/progress-report/endpoints/DEFAULT (rollback_version)" in refused["error"]["message"]


def test_ctrl_c_stops_everything(platform: dict[str, str]) -> None:
    launcher = psutil.Process(int(platform["_PID"]))
    children = launcher.children(recursive=True)
    assert len(children) >= 5
    os.killpg(launcher.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, alive = psutil.wait_procs([launcher, *children], timeout=30)
    assert not alive, f"still running after Ctrl-C: {[p.cmdline() for p in alive]}"
    assert "stopped" in Path(platform["_LOG"]).read_text()
    for svc in SERVICES:
        port = int(platform[f"CORRAL_{svc.upper()}_ADDR"].rsplit(":", 1)[1])
        assert not any(c.laddr.port == port for c in psutil.net_connections("tcp") if c.status == "LISTEN")
