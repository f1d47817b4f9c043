"""The gvisor driver under the whole platform, not only under the escape suite: a session's
turns run in gVisor with their state, an agent's exception is the agent's, and the bundle cache
is readable by the sandbox's real uid nobody."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from tests import harness
from tests.bundles import BEHAVIOUR
from tests.mesh import started_mesh
from tests.rpc import fails

pytestmark = [
    pytest.mark.integration, pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("runsc") is None,
                       reason="runsc is not installed (scripts/setup-sandbox.sh installs it)"),
]


async def test_a_session_runs_its_turns_in_gvisor(database_url: str, redis_url: str, tmp_path: Path) -> None:
    settings = harness.make_settings(database_url, redis_url, tmp_path, CORRAL_SANDBOX_DRIVER="gvisor")
    async with started_mesh(settings, tmp_path) as mesh:
        agent = await mesh.publish_agent("gvisor", BEHAVIOUR)
        session = f"{mesh.prefix}-gvisor"
        assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 1."
        listed = await mesh.sandboxes()
        assert [s.driver for s in listed if s.session == f"sessions/{session}"] == ["gvisor"]
        err = await fails(grpc.StatusCode.INTERNAL,
                          mesh.invoke(agent, {"mode": "boom"}, session_id=session))
        assert "ValueError: boom" in (err.details() or "")
        # The failed turn committed nothing: the next one is turn 2.
        assert (await mesh.invoke(agent, {}, session_id=session)).output == b"Turn 2."
