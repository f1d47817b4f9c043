"""Helpers for the escape suite: a broker stub, invoking a sandbox, and the well-behaved
neighbour's turns, asserted in full."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.sandbox.v1 import sandbox_pb2 as pb
from services.executor.drivers.bwrap import BwrapWorker
from services.executor.sandbox import Done, Sandbox

AGENTS = Path(__file__).parent / "agents"
SCRATCH_MB = 16
PIDS_MAX = 64

# The `driver` fixture carries these per driver: a host without one says so instead of failing
# every test.
needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap (bwrap) is not installed: run `sh scripts/setup-sandbox.sh` as root "
    "(Debian: apt-get install bubblewrap)",
)
needs_runsc = pytest.mark.skipif(
    shutil.which("runsc") is None,
    reason="runsc is not installed (scripts/setup-sandbox.sh installs it)",
)


def worker(sandbox: Sandbox) -> BwrapWorker:
    """The sandbox's outer process (bwrap, or runsc: GvisorWorker is a BwrapWorker), with its
    cgroup and the limit that ended it."""
    assert isinstance(sandbox.process, BwrapWorker)
    return sandbox.process


async def broker(call: pb.ModelCall) -> pb.ModelResult:
    return pb.ModelResult(call_id=call.call_id, text=f"model says {call.prompt}")


@dataclass
class Turn:
    chunks: list[bytes]
    done: Done

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode()

    def json(self) -> dict:
        return json.loads(self.text)  # type: ignore[no-any-return]


async def invoke(sandbox: Sandbox, payload: dict, state: bytes = b"") -> Turn:
    chunks: list[bytes] = []
    inv = pb.Invocation(
        invocation_id=uuid.uuid4().hex, session_id=sandbox.spec.session,
        version=sandbox.spec.version,
        payload=json.dumps(payload).encode(), content_type="application/json", state=state,
    )
    async for item in sandbox.invoke(inv, broker):
        if isinstance(item, Done):
            return Turn(chunks, item)
        chunks.append(item)
    raise AssertionError("the sandbox ended the invocation without Done")


async def neighbour_turns(sandbox: Sandbox, turns: int = 2) -> None:
    """The well-behaved session's invocations, asserted in full."""
    state = b""
    for n in range(1, turns + 1):
        text = f"hello {n}"
        turn = await asyncio.wait_for(invoke(sandbox, {"text": text}, state), 20)
        assert turn.text == f"echo:{text}|model says {text}|sum:{sum(range(100_000))}"
        assert json.loads(turn.done.state) == {"turns": n}
        state = turn.done.state
