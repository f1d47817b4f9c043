"""A canary rollout through the corral command, end to end: a candidate that fails one session
in three is rolled back by the analysis alone, and new sessions go back to the stable version."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.bundles import agent_files, write_bundle
from tests.e2e.conftest import corral

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

GOOD = """
from corral.sdk import App
app = App()

@app.entrypoint
def handle(payload, ctx):
    ctx.state["turns"] = ctx.state.get("turns", 0) + 1
    return "ok"
"""
# Fails every third session (by a stable hash of its id), on its first turn.
BAD = """
import hashlib
from corral.sdk import App
app = App()

@app.entrypoint
def handle(payload, ctx):
    if int(hashlib.sha256(ctx.session_id.encode()).hexdigest(), 16) % 3 == 0:
        raise RuntimeError("candidate regression")
    return "ok"
"""


class Hooks:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        received = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_bad_canary_rolls_back_by_itself(platform: dict[str, str], tmp_path: Path) -> None:
    env = platform
    good = corral(env, "publish", str(write_bundle(tmp_path / "good", agent_files("canary-demo", GOOD))))
    bad = corral(env, "publish", str(write_bundle(tmp_path / "bad", agent_files("canary-demo", BAD))))
    corral(env, "endpoint", "set", "canary-demo", "prod", "--version", str(good["number"]))
    hooks = Hooks()
    started = corral(env, "rollout", "start", "canary-demo", "prod", "--to", str(bad["number"]),
                     "--steps", "50,100", "--interval", "1s", "--min-sessions", "30", "--webhook", hooks.url)
    assert started["name"].endswith("/rollouts/1")

    second = harness_run(env, "rollout", "start", "canary-demo", "prod", "--to", str(bad["number"]))
    assert second["error"]["code"] == "FAILED_PRECONDITION" and "rollouts/1" in second["error"]["message"]

    status: dict[str, Any] = {}
    served = {good["number"]: 0, bad["number"]: 0}
    for i in range(400):
        out = corral(env, "invoke", "canary-demo", "--endpoint", "prod", "--data", "{}", check=False)
        if out and "version" in out:
            served[int(out["version"].rsplit("/", 1)[1])] += 1
        if i % 10 == 9:
            status = corral(env, "rollout", "status", "canary-demo", "prod")
            if status["state"] != "ROLLOUT_STATE_PROGRESSING":
                break
    assert status["state"] == "ROLLOUT_STATE_ROLLED_BACK", status
    assert "error_rate" in status["state_reason"], status["state_reason"]
    assert served[bad["number"]] > 0
    failing = [c for c in status["last_analysis"]["comparisons"] if c["verdict"] == "VERDICT_FAIL"]
    assert failing and int(failing[0]["candidate"]["sessions"]) > 0

    for _ in range(10):  # new sessions are back on the stable version at once
        out = corral(env, "invoke", "canary-demo", "--endpoint", "prod", "--data", "{}")
        assert out["version"].endswith(f"/versions/{good['number']}")
    endpoint = corral(env, "endpoint", "get", "canary-demo", "prod")
    assert [t["version"] for t in endpoint["traffic"]] == [f"agents/canary-demo/versions/{good['number']}"]

    deadline = time.monotonic() + 10
    while not any(e["event"] == "ROLLED_BACK" for e in hooks.events) and time.monotonic() < deadline:
        time.sleep(0.2)
    events = [e["event"] for e in hooks.events]
    assert events[0] == "STARTED" and "ROLLED_BACK" in events, events
    assert next(e for e in hooks.events if e["event"] == "ROLLED_BACK")["evidence"]["verdict"] == "FAIL"
    hooks.server.shutdown()

    audit = corral(env, "audit", "--resource", started["name"])
    assert any(e["method"] == "Rollout:ROLLED_BACK" for e in audit)
    deadline = time.monotonic() + 20
    url = f"http://127.0.0.1:{env['CORRAL_REGISTRY_METRICS_PORT']}/metrics"
    wanted = 'corral_rollout_state{agent="canary-demo",endpoint="prod",kind="rollout",rollout="1",state="ROLLED_BACK",tenant="default"} 1.0'
    while wanted not in (text := urllib.request.urlopen(url, timeout=5).read().decode()) and time.monotonic() < deadline:
        time.sleep(1)
    assert wanted in text
    assert 'corral_rollout_analysis_verdict{agent="canary-demo"' in text

    listed = corral(env, "rollout", "list", "canary-demo", "prod")
    assert listed[0]["state"] == "ROLLOUT_STATE_ROLLED_BACK"

    finished = harness_run(env, "rollout", "promote", "canary-demo", "prod")
    assert finished["error"]["code"] == "FAILED_PRECONDITION"


def harness_run(env: dict[str, str], *args: str) -> Any:
    return corral(env, *args, check=False)


def test_score_moves_the_score_metric(platform: dict[str, str], tmp_path: Path) -> None:
    env = platform
    v = corral(env, "publish", str(write_bundle(tmp_path / "s", agent_files("scored", GOOD))))
    out = corral(env, "invoke", "scored", "--version", str(v["number"]), "--session", "scored-1", "--data", "{}")
    # At once: the invocation's spans may not have reached telemetry yet, the session exists.
    recorded = corral(env, "score", "scored-1", "clinical_accuracy", "0.75", "--source", "judge", check=False)
    assert recorded["value"] == 0.75 and recorded["version"] == out["version"], recorded
    listed = corral(env, "scores", "--session", "scored-1")
    assert [(x["score_name"], x["value"]) for x in listed] == [("clinical_accuracy", 0.75)]

    # Agent code records a score too (corral.sdk ctx.score), and it lands on the same session.
    selfscored = corral(env, "publish", str(write_bundle(tmp_path / "self", agent_files(
        "scored", GOOD.replace('return "ok"', 'ctx.score("self_check", 0.9, comment="looked fine")\n    return "ok"')))))
    corral(env, "invoke", "scored", "--version", str(selfscored["number"]), "--session", "scored-2", "--data", "{}")
    deadline = time.monotonic() + 15
    while not (own := corral(env, "scores", "--session", "scored-2")) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert [(x["score_name"], x["value"], x["comment"]) for x in own] == [("self_check", 0.9, "looked fine")]
    assert own[0]["version"] == selfscored["name"]

    bad = corral(env, "score", "no-such-session", "clinical_accuracy", "0.5", check=False)
    assert bad["error"]["code"] == "NOT_FOUND"
    out_of_range = corral(env, "score", "scored-1", "clinical_accuracy", "7", check=False)
    assert out_of_range["error"]["code"] == "INVALID_ARGUMENT" and "[0, 1]" in out_of_range["error"]["message"]


def test_experiment_report_and_conclusion(platform: dict[str, str], tmp_path: Path) -> None:
    env = platform
    a = corral(env, "publish", str(write_bundle(tmp_path / "a", agent_files("ab-demo", GOOD))))
    b = corral(env, "publish", str(write_bundle(
        tmp_path / "b", agent_files("ab-demo", GOOD + "\n# variant b\n"))))
    corral(env, "endpoint", "set", "ab-demo", "prod", "--version", str(a["number"]))
    bad_split = corral(env, "experiment", "start", "ab-demo", "prod", "--variants",
                       f"{a['number']}=80,{b['number']}=30", check=False)
    assert bad_split["error"]["code"] == "INVALID_ARGUMENT" and "100" in bad_split["error"]["message"]
    started = corral(env, "experiment", "start", "ab-demo", "prod", "--variants",
                     f"{a['number']}=50,{b['number']}=50", "--sessions", "5000")
    assert started["state"] == "EXPERIMENT_STATE_RUNNING"
    for _ in range(40):
        corral(env, "invoke", "ab-demo", "--endpoint", "prod", "--data", "{}")
    deadline = time.monotonic() + 15
    while True:
        report = corral(env, "experiment", "status", "ab-demo", "prod")
        sessions = [int(n) for n in report["analysis"].get("sessions", [])]
        if sum(sessions) >= 40 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sum(sessions) == 40 and min(sessions) > 0, report
    assert not report["analysis"].get("sample_ratio_mismatch", False)
    assert report["analysis"]["metrics"], "the report has per-metric results"
    concluded = corral(env, "experiment", "conclude", "ab-demo", "prod", "--winner", str(b["number"]))
    assert concluded["state"] == "EXPERIMENT_STATE_CONCLUDED"
    endpoint = corral(env, "endpoint", "get", "ab-demo", "prod")
    assert [t["version"] for t in endpoint["traffic"]] == [b["name"]]
    again = corral(env, "experiment", "conclude", "ab-demo", "prod", "--keep-control", check=False)
    assert again["error"]["code"] == "FAILED_PRECONDITION"
    audit = corral(env, "audit", "--resource", started["name"])
    assert any(e["method"] == "ConcludeExperiment" for e in audit)
