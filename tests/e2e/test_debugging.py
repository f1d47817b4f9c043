"""Debugging an agent through the corral command, as README's "Debugging an agent" shows it: its
traceback under `corral invoke`'s error, its output in `corral logs`, the exception in `corral
spans`."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.bundles import DEBUGGED_LINE, debugged_agent, write_bundle
from tests.e2e.conftest import CORRAL, corral

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _human(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The corral command as a person runs it (no --json)."""
    return subprocess.run([CORRAL, *args], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def _eventually(probe: Any, timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def test_a_failing_agent_shows_its_traceback_logs_and_exception(
    platform: dict[str, str], tmp_path: Path
) -> None:
    env = platform
    corral(env, "publish", str(write_bundle(tmp_path / "debugged", debugged_agent("debugged"))))
    assert corral(env, "invoke", "debugged", "--session", "dbg", "--data", '{"n": 4}')[
        "output"] == "0.25"

    failed = _human(env, "invoke", "debugged", "--session", "dbg", "--data", '{"n": 0}')
    assert failed.returncode == 1
    lines = failed.stderr.splitlines()
    at = next(i for i, line in enumerate(lines) if "ZeroDivisionError: division by zero" in line)
    assert "INTERNAL" in lines[at]
    # The traceback follows the error: the bundle's frames, with file and line.
    assert lines[at + 1:] == [
        "Traceback (most recent call last):",
        f'  File "agent.py", line {DEBUGGED_LINE}, in run',
        "    yield ratio(1, payload.get(\"n\", 0))",
        '  File "helpers.py", line 2, in ratio',
        "    return str(a / b)",
        "ZeroDivisionError: division by zero",
    ]

    session_logs = _eventually(lambda: [
        r for r in corral(env, "logs", "debugged", "--session", "dbg", "--since", "10m")
        if r["body"] == "starting 0"
    ] and corral(env, "logs", "debugged", "--session", "dbg", "--since", "10m"))
    assert [r["body"] for r in session_logs] == [
        "starting 4", "dividing by 4", "a note on stderr",
        "starting 0", "dividing by 0", "a note on stderr",
    ]
    records = session_logs[3:]
    assert [(r["source"], r["body"]) for r in records] == [
        ("stdout", "starting 0"), ("debugged", "dividing by 0"), ("stderr", "a note on stderr")]
    invocation = records[0]["invocation_id"]
    assert {r["invocation_id"] for r in records} == {invocation} != {session_logs[0]["invocation_id"]}
    assert {r["version"] for r in records} == {"agents/debugged/versions/1"}
    # The lines as a person reads them: version, session, invocation, level, source, text.
    shown = _human(env, "logs", "debugged", "--invocation", invocation).stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in shown] == [
        f"v1 dbg {invocation[:8]} INFO  stdout: starting 0",
        f"v1 dbg {invocation[:8]} INFO  debugged: dividing by 0",
        f"v1 dbg {invocation[:8]} WARN  stderr: a note on stderr",
    ]

    trace = records[0]["trace_id"]
    spans = _eventually(lambda: [
        s for s in corral(env, "spans", trace) if s.get("events")
    ])
    assert spans and spans[0]["name"] == "invoke_agent debugged"
    event = spans[0]["events"][0]
    assert event["name"] == "exception"
    assert event["attributes"]["exception.type"] == "ZeroDivisionError"
    assert event["attributes"]["exception.message"] == "division by zero"
    assert '"helpers.py", line 2, in ratio' in event["attributes"]["exception.stacktrace"]
    table = _human(env, "spans", trace).stdout
    assert "exception in invoke_agent debugged" in table
    assert 'File "helpers.py", line 2, in ratio' in table


def test_logs_follow_prints_what_arrives_until_ctrl_c(platform: dict[str, str], tmp_path: Path) -> None:
    env = platform
    corral(env, "publish", str(write_bundle(tmp_path / "followed", debugged_agent("followed"))))
    follow = subprocess.Popen([CORRAL, "--json", "logs", "followed", "--follow"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # following: nothing yet
        corral(env, "invoke", "followed", "--data", '{"n": 5}')
        assert follow.stdout is not None
        bodies = [json.loads(follow.stdout.readline())["body"] for _ in range(3)]
        assert bodies == ["starting 5", "dividing by 5", "a note on stderr"]
        follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=10) == 0
    finally:
        follow.kill()
