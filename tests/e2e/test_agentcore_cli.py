"""An agent written with AWS's bedrock-agentcore SDK, published and invoked with the corral
command as a user would: `corral publish` vendors its dependencies into the bundle, and
`corral invoke` gets plain and streamed replies and the session's memory across turns."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.e2e.conftest import CORRAL, ROOT, corral

pytestmark = [
    pytest.mark.e2e, pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]


def publish(platform: dict[str, str]) -> dict:
    # Longer than corral()'s timeout: the first publish downloads bedrock-agentcore and its
    # dependencies (about 15 MB) into pip's cache.
    result = subprocess.run(
        [CORRAL, "--json", "publish", str(ROOT / "examples" / "agentcore-hello")], env=platform,
        capture_output=True, text=True, timeout=540, check=False,
    )
    if result.returncode != 0 and "Could not find a version" in result.stderr + result.stdout:
        pytest.skip(f"PyPI is not reachable to vendor bedrock-agentcore: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vendoring 1 dependency from agent.toml" in result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_an_agentcore_sdk_agent_runs_unchanged_through_corral_invoke(platform: dict[str, str]) -> None:
    version = publish(platform)
    assert version["name"].startswith("agents/agentcore-hello/versions/")

    first = corral(platform, "invoke", "agentcore-hello", "--session", "ac-1",
                   "--data", json.dumps({"prompt": "hi"}))
    assert json.loads(first["output"]) == {"result": "Hello! You said: hi.", "session_id": "ac-1"}
    assert first["new_session"] is True

    # Streamed as server-sent events by the agent, arriving as several chunks, and remembering
    # the session's first turn.
    streamed = corral(platform, "invoke", "agentcore-hello", "--session", "ac-1",
                      "--data", json.dumps({"prompt": "again", "stream": True}))
    assert streamed["output"].strip() == "Hello again! You said: again. Before that: hi."
    assert streamed["chunks"] > 3 and streamed["turn"] == 2 and streamed["new_session"] is False

    # Another session starts with an empty memory.
    other = corral(platform, "invoke", "agentcore-hello", "--session", "ac-2",
                   "--data", json.dumps({"prompt": "who"}))
    assert json.loads(other["output"])["result"] == "Hello! You said: who."
