"""`corral dev` as a user runs it beside an editor: a real process watching a copy of the example
agent on the platform started as `make run` starts it, edits saved into the copy, invocations
through the dev endpoint, and Ctrl-C."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.bundles import copy_example
from tests.e2e.conftest import CORRAL, ROOT, corral

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

AGENT = "dev-loop"
# How long a saved change may take to show: a poll, a quiet poll, packing and publishing.
WAIT_S = 30


class DevProcess:
    """`corral dev` running, its output read line by line as it comes."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen([CORRAL, "dev", *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._new.put(line.rstrip("\n"))

    def expect(self, pattern: str) -> str:
        """The next line of output matching `pattern` (lines before it are passed over)."""
        deadline = time.monotonic() + WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                break
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; corral dev printed:\n" + self.output)

    def expect_all(self, *patterns: str) -> None:
        """Lines matching each of `patterns`, in any order (the log and trace tails are
        independent streams, so which of their lines comes first is not fixed)."""
        waiting = list(patterns)
        deadline = time.monotonic() + WAIT_S
        while waiting and (left := deadline - time.monotonic()) > 0:
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                break
            self.lines.append(line)
            waiting = [p for p in waiting if not re.search(p, line)]
        if waiting:
            raise AssertionError(f"no lines matching {waiting!r}; corral dev printed:\n"
                                 + self.output)

    def exit_status(self) -> int:
        """Its exit status once it ends, with the rest of its output read."""
        status = self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        while not self._new.empty():
            self.lines.append(self._new.get())
        return status

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def served_by(env: dict[str, str], text: str, session: str = "") -> tuple[str, str]:
    """A new session's reply through the dev endpoint: (version, output)."""
    reply = corral(env, "invoke", AGENT, "--endpoint", "dev", "--data", json.dumps({"text": text}),
                   *(["--session", session] if session else []))
    return reply["version"], reply["output"]


def dev_traffic(env: dict[str, str]) -> list[str]:
    return [t["version"] for t in corral(env, "endpoint", "get", AGENT, "dev")["traffic"]]


def test_corral_dev_republishes_each_change_and_moves_the_dev_endpoint(
    platform: dict[str, str], tmp_path: Path
) -> None:
    agent = copy_example(ROOT / "examples" / "progress-report", tmp_path / "agent", AGENT)
    code, toml = agent / "agent.py", agent / "agent.toml"
    original_toml = toml.read_text()
    dev = DevProcess(platform, str(agent))
    try:
        dev.expect(r"^watching .*agent for changes")
        dev.expect(rf"^published version 1 of {AGENT} \(sha256:")
        dev.expect(r"^dev -> version 1$")
        version, output = served_by(platform, "Client slept better.")
        assert (version, output[:8]) == (f"agents/{AGENT}/versions/1", "Turn 1. ")

        # An edit: a new version, and the endpoint follows it.
        code.write_text(code.read_text().replace(
            'yield f"Turn {turns}. "', 'print(f"dev sees round {turns}"); yield f"Round {turns}. "'))
        dev.expect(r"^changed: agent\.py$")
        dev.expect(rf"^published version 2 of {AGENT} ")
        dev.expect(r"^dev -> version 2$")
        version, output = served_by(platform, "Fewer panic attacks.", session="dev-2")
        assert (version, output[:9]) == (f"agents/{AGENT}/versions/2", "Round 1. ")
        # The served version's invocation shows up in the loop's output, and so does what it
        # printed, stamped with its version and session.
        dev.expect_all(r"^  invocation · dev-2 · \d+ ms · ok · trace [0-9a-f]{32}$",
                       r"^  \S+ v2 dev-2 [0-9a-f]{8} .* stdout: dev sees round 1$")

        # A save that changes no byte: nothing is published.
        os.utime(code)
        dev.expect(r"^changed: agent\.py$")
        dev.expect(r"^unchanged: the same bytes as version 2, nothing published$")
        assert [v["number"] for v in corral(platform, "versions", AGENT)] == ["1", "2"]

        # A broken agent.toml, then a syntax error: each said, the loop goes on, the endpoint
        # stays on the last good version.
        toml.write_text(original_toml.replace('entrypoint = "agent:app"', 'entrypoint = agent:app'))
        line = dev.expect(r"^error: ")
        assert "agent.toml" in line and line.endswith("(still on version 2)"), line
        toml.write_text(original_toml)
        code.write_text(code.read_text().replace("def draft(", "def draft(("))
        line = dev.expect(r"^error: ")
        assert re.search(r"agent\.py:\d+: ", line) and line.endswith("(still on version 2)"), line
        assert dev.proc.poll() is None, dev.output
        assert dev_traffic(platform) == [f"agents/{AGENT}/versions/2"]
        assert served_by(platform, "still there?")[0] == f"agents/{AGENT}/versions/2"

        # Fixed, with a change: published and routed again.
        code.write_text(code.read_text().replace("def draft((", "def draft(").replace(
            'yield f"Round {turns}. "', 'yield f"Meeting {turns}. "'))
        dev.expect(rf"^published version 3 of {AGENT} ")
        dev.expect(r"^dev -> version 3$")
        version, output = served_by(platform, "Sleeping through the night.")
        assert (version, output[:11]) == (f"agents/{AGENT}/versions/3", "Meeting 1. ")

        # Ctrl-C: a clean exit.
        dev.proc.send_signal(signal.SIGINT)
        assert dev.exit_status() == 0, dev.output
        assert dev.lines[-1] == "stopped", dev.output
    finally:
        dev.stop()



def test_corral_dev_under_json_and_started_again_on_the_same_directory(
    platform: dict[str, str], tmp_path: Path
) -> None:
    agent = copy_example(ROOT / "examples" / "progress-report", tmp_path / "agent", "dev-json")
    for _ in range(2):  # the second time, the same bytes: the same version, routed again
        dev = DevProcess(platform, "--json", str(agent), "--endpoint", "try-out", "--no-traces")
        try:
            routed = json.loads(dev.expect(r'"event": "(routed|error)"'))
            assert routed == {"event": "routed", "endpoint": "agents/dev-json/endpoints/try-out",
                                 "version": "agents/dev-json/versions/1"}, dev.output
            dev.proc.send_signal(signal.SIGINT)
            assert dev.exit_status() == 0, dev.output
            assert json.loads(dev.lines[-1]) == {"event": "stopped"}
        finally:
            dev.stop()
    assert [v["number"] for v in corral(platform, "versions", "dev-json")] == ["1"]
