"""The short version of `make chaos`: a router, the sessions service and Redis killed with SIGKILL
in turn under multi-turn sessions, then a small overload. What callers must never see: a turn
lost or applied twice, UNKNOWN or INTERNAL, a session that stays stuck after the restart. (How
fast they recover is `make chaos`'s figure, not asserted here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
NEVER = {"UNKNOWN", "INTERNAL"}


def test_faults_under_load_lose_nothing_repeat_nothing_and_recover() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update({"CORRAL_CHAOS_SESSIONS": "4", "CORRAL_CHAOS_WINDOW_S": "10",
                "CORRAL_CHAOS_FAULTS": "router,sessions,redis", "CORRAL_CHAOS_OVERLOAD": "24",
                "CORRAL_CHAOS_OVERLOAD_TURNS": "2", "PYTHONPATH": str(ROOT)})
    run = subprocess.run([sys.executable, "-m", "bench.chaos"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=540, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["request_ids"], "the router takes no request id: retries are not safe"
    for fault, seen in report["faults"].items():
        assert seen["acknowledged_turns_lost"] == 0, (fault, seen)
        assert seen["turns_applied_twice"] == 0, (fault, seen)
        assert not NEVER & set(seen["errors_by_code"]), (fault, seen)
        assert seen["sessions_stuck"] == 0, (fault, seen)
        assert seen["restart_s"] is not None, (fault, seen)
        assert seen["turns_succeed_again_after_kill_s"] is not None, (fault, seen)
    overload = report["overload"]
    assert not NEVER & set(overload["answers_by_code"]), overload
    assert overload["turns_completed"] == overload["turns_asked"] == 24 * 2, overload
