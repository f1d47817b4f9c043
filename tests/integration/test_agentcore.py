"""AgentCore-contract agents (`protocol = "http"`): examples/agentcore-hello, written with AWS's
bedrock-agentcore SDK and its dependencies installed into the bundle's deps/, runs unchanged
through the real executor in bwrap sandboxes; and what such an agent's server can see."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from corral.router.v1 import router_pb2 as rt
from corral.sandbox.v1 import sandbox_pb2 as pb
from corral.telemetry.v1 import telemetry_pb2 as tel
from services.common.settings import Settings
from services.executor.drivers.bwrap import BwrapDriver
from services.executor.sandbox import AgentFailed, Done, Sandbox
from tests import harness
from tests.bundles import copy_example, write_bundle
from tests.mesh import Mesh
from tests.rpc import body, debug_stack, error_details, fails

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        shutil.which("bwrap") is None,
        reason="bubblewrap (bwrap) is not installed: run `sh scripts/setup-sandbox.sh` as root",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "agentcore-hello"
# pip installs are kept across runs, keyed by the dependency list and the interpreter.
CACHE = ROOT / ".corral" / "test-cache"
# What pip prints when it cannot reach an index at all (as opposed to a real install failure).
_OFFLINE = (
    "Failed to establish a new connection", "Temporary failure in name resolution",
    "Network is unreachable", "NewConnectionError", "(from versions: none)",
)


# -- the example's dependencies ----------------------------------------------------------------


def _pip_target(deps: list[str]) -> Path:
    key = json.dumps([deps, sys.version_info[:2], platform.machine()]).encode()
    return CACHE / f"deps-{hashlib.sha256(key).hexdigest()[:16]}"


@pytest.fixture(scope="session")
def agentcore_deps() -> Path:
    """agent.toml's `dependencies`, pip-installed once per dependency list (what `corral
    publish` puts into a bundle's deps/)."""
    deps = tomllib.loads((EXAMPLE / "agent.toml").read_text())["dependencies"]
    target = _pip_target(deps)
    if (target / ".complete").exists():
        return target
    staging = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-input", "--target",
         str(staging), *deps],
        capture_output=True, text=True, timeout=900, check=False,
    )
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        if any(marker in proc.stderr for marker in _OFFLINE):
            pytest.skip(f"PyPI is unreachable, so {deps} cannot be installed: {proc.stderr[-300:]}")
        pytest.fail(f"pip install {deps} failed:\n{proc.stderr[-2000:]}")
    (staging / ".complete").touch()
    try:
        staging.rename(target)
    except OSError:  # a concurrent run finished first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _link_tree(source: Path, dest: Path) -> None:
    """Hard links where the file system allows (the deps are 50 MB), copies otherwise."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=link)


def example_bundle(dest: Path, deps: Path, name: str = "agentcore-hello") -> Path:
    root = copy_example(EXAMPLE, dest, name)
    _link_tree(deps, root / "deps")
    return root


# -- the mesh, with bwrap sandboxes --------------------------------------------------------------


@pytest.fixture(params=["bwrap", "gvisor"])
def settings(
    request: pytest.FixtureRequest, database_url: str, redis_url: str, tmp_path: Path
) -> Settings:
    if request.param == "gvisor" and shutil.which("runsc") is None:
        pytest.skip("runsc is not installed (scripts/setup-sandbox.sh installs it)")
    return harness.make_settings(database_url, redis_url, tmp_path, CORRAL_SANDBOX_DRIVER=request.param)


def _line_of(text: str) -> int:
    """The number of the example's line that contains `text`."""
    lines = (EXAMPLE / "app.py").read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


async def publish_example(mesh: Mesh, deps: Path) -> str:
    agent = f"{mesh.prefix}-agentcore"
    await mesh.publish(example_bundle(mesh.tmp / "agentcore-hello", deps, agent))
    return agent


async def stream(mesh: Mesh, agent: str, session: str, payload: object) -> list[rt.InvokeStreamResponse]:
    call = mesh.router.InvokeStream(
        rt.InvokeRequest(agent=f"agents/{agent}", session_id=session, payload=body(payload)),
        metadata=mesh.me,
    )
    return [event async for event in call]


async def test_the_example_answers_streams_and_remembers_each_session(
    mesh: Mesh, agentcore_deps: Path
) -> None:
    agent = await publish_example(mesh, agentcore_deps)
    session = f"{mesh.prefix}-s1"

    first = await mesh.invoke(agent, {"prompt": "hi"}, session_id=session)
    assert json.loads(first.output) == {"result": "Hello! You said: hi.", "session_id": session}
    assert first.completed.turn == 1

    # Streamed: the SDK's server-sent events arrive as several chunks, and the agent remembers
    # the first turn in its own process.
    events = await stream(mesh, agent, session, {"prompt": "how are you", "stream": True})
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "completed" and set(kinds[1:-1]) == {"chunk"}
    chunks = [e.chunk.data for e in events[1:-1]]
    assert len(chunks) > 3
    assert b"".join(chunks) == b"Hello again! You said: how are you. Before that: hi. "
    assert events[-1].completed.turn == 2

    # Another session starts with no memory.
    other = await mesh.invoke(agent, {"prompt": "hey"}, session_id=f"{mesh.prefix}-s2")
    assert json.loads(other.output)["result"] == "Hello! You said: hey."


async def test_what_the_agents_server_prints_and_logs_is_the_invocations_log(
    mesh: Mesh, agentcore_deps: Path
) -> None:
    agent = await publish_example(mesh, agentcore_deps)
    session = f"{mesh.prefix}-logs"
    await mesh.invoke(agent, {"prompt": "quiet"}, session_id=session)
    noted = await mesh.invoke(agent, {"prompt": "hi", "note": "careful"}, session_id=session)

    # The SDK's own request log (JSON lines on stderr) is the agent's output too.
    mine = [("stdout", "INFO", f"note for session {session}"), ("stderr", "WARN", "the note: careful")]
    request = tel.ListLogsRequest(agent=f"agents/{agent}", session=f"sessions/{session}")
    async with asyncio.timeout(10):
        while True:
            records = list((await mesh.telemetry.ListLogs(request, metadata=mesh.me)).records)
            if set(mine) <= {(r.source, r.severity_text, r.body) for r in records}:
                break
            await asyncio.sleep(0.1)
    said = [(r.source, r.severity_text, r.body) for r in records
            if r.invocation_id == noted.info.invocation_id]
    # stdout and stderr are two pipes read apart: each stream keeps its order, not their mix.
    assert sorted(line for line in said if line in mine) == sorted(mine)
    assert {r.session for r in records} == {f"sessions/{session}"}
    assert len({r.invocation_id for r in records}) == 2  # the quiet one logged its request too


async def test_a_500_from_the_agent_fails_the_invocation_and_the_session_carries_on(
    mesh: Mesh, agentcore_deps: Path
) -> None:
    agent = await publish_example(mesh, agentcore_deps)
    session = f"{mesh.prefix}-boom"
    await mesh.invoke(agent, {"prompt": "one"}, session_id=session)

    err = await fails(
        grpc.StatusCode.INTERNAL, mesh.invoke(agent, {"fail": True}, session_id=session)
    )
    details = err.details() or ""
    assert "500" in details and "asked to fail" in details, details
    info, _ = error_details(err)
    assert info.reason == "AGENT_ERROR" and info.metadata["error_type"] == "HTTPError"
    # The traceback the server logged, with the bundle's frames only.
    stack = debug_stack(err)
    assert stack[0] == "Traceback (most recent call last):", stack
    assert [line for line in stack if line.startswith("  File ")] == [
        f'  File "app.py", line {_line_of("asked to fail")}, in invoke'
    ]
    assert stack[-1] == "RuntimeError: asked to fail"

    after = await mesh.invoke(agent, {"prompt": "two"}, session_id=session)
    assert json.loads(after.output)["result"] == "Hello again! You said: two. Before that: one."
    assert after.completed.turn == 2


# -- sandboxes driven directly --------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver() -> BwrapDriver:
    return BwrapDriver()


StartSandbox = Callable[[Path, str], Awaitable[Sandbox]]


@pytest_asyncio.fixture
async def start(driver: BwrapDriver, tmp_path: Path) -> AsyncIterator[StartSandbox]:
    sandboxes = harness.Sandboxes(driver, tmp_path)

    async def _start(bundle: Path, entrypoint: str) -> Sandbox:
        spec = sandboxes.spec(bundle, entrypoint, agent="ac", version="agents/ac/versions/1")
        return await sandboxes.start(replace(spec, protocol="http"))

    yield _start
    await sandboxes.stop()


def invocation(payload: object, session: str = "s-1", credentials: str = "") -> pb.Invocation:
    return pb.Invocation(
        invocation_id=uuid.uuid4().hex, session_id=session, version="agents/ac/versions/1",
        payload=json.dumps(payload).encode(), content_type="application/json",
        state=b'{"kept": true}', credentials=credentials,
    )


async def receive(sandbox: Sandbox) -> pb.WorkerFrame:
    """The next frame other than the agent's output (Logs frames; the executor's turn reads
    those, and the tests of output are elsewhere)."""
    while (frame := await sandbox._receive()).WhichOneof("frame") == "logs":
        pass
    return frame


async def ping(sandbox: Sandbox) -> tuple[str, list[bytes]]:
    """Sends a Ping frame and reads up to its Pong, with the chunks of a running invocation
    that arrive before it. (Sandbox has no ping() yet: this is the one it needs.)"""
    await sandbox._send(pb.HostFrame(ping=pb.Ping()))
    chunks: list[bytes] = []
    while True:
        frame = await receive(sandbox)
        kind = frame.WhichOneof("frame")
        if kind == "pong":
            return frame.pong.status, chunks
        assert kind == "chunk", kind
        chunks.append(frame.chunk.data)


async def _finish(sandbox: Sandbox) -> tuple[list[bytes], pb.WorkerFrame]:
    chunks: list[bytes] = []
    while True:
        frame = await receive(sandbox)
        if frame.WhichOneof("frame") != "chunk":
            return chunks, frame
        chunks.append(frame.chunk.data)


async def until_status(sandbox: Sandbox, status: str, attempts: int = 100) -> None:
    for _ in range(attempts):
        if (await ping(sandbox))[0] == status:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the sandbox never reported {status}")


async def test_a_ping_while_an_invocation_runs_reports_healthy_busy(
    start: StartSandbox, agentcore_deps: Path, tmp_path: Path
) -> None:
    sandbox = await start(example_bundle(tmp_path / "bundle", agentcore_deps), "app:app")
    assert (await ping(sandbox))[0] == "Healthy"

    # 200 words at 10 ms each: the stream runs for about two seconds.
    prompt = " ".join(f"w{i}" for i in range(200))
    await sandbox._send(pb.HostFrame(invoke=invocation({"prompt": prompt, "stream": True})))
    first = await receive(sandbox)
    assert first.WhichOneof("frame") == "chunk"
    status, before = await ping(sandbox)
    assert status == "HealthyBusy"
    rest, end = await _finish(sandbox)
    assert end.WhichOneof("frame") == "done" and end.done.state == b'{"kept": true}'
    text = b"".join([first.chunk.data, *before, *rest]).decode()
    assert text == f"Hello! You said: {prompt}. "
    assert (await ping(sandbox))[0] == "Healthy"

    # The agent's own status passes through: its background task keeps it busy when idle.
    async for item in sandbox.invoke(invocation({"background_s": 1}), _no_model):
        if isinstance(item, Done):
            break
    assert (await ping(sandbox))[0] == "HealthyBusy"
    await until_status(sandbox, "Healthy")


async def _no_model(call: pb.ModelCall) -> pb.ModelResult:
    raise AssertionError("an http agent made a model call through the broker")


# -- what an http agent's server sees --------------------------------------------------------------

# A stdlib-only server on AgentCore's contract that reports its view of the sandbox.
PROBE = r"""
import importlib.util, json, os, socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def reach(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return "connected"
    except OSError as exc:
        return type(exc).__name__


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, kind, data):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply(200, "text/plain", b"Healthy")

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if payload.get("plain"):
            return self.reply(200, "text/plain", b"just text")
        if payload.get("sse"):
            return self.reply(200, "text/event-stream", SSE[payload["sse"]])
        view = {
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "sys_path": sys.path,
            "cwd": os.getcwd(),
            "importable": {m: importlib.util.find_spec(m) is not None
                           for m in ("corral", "grpc", "google", "vendored")},
            "host_port": reach("127.0.0.1", payload["host_port"]),
            "outside": reach("192.0.2.1", 80),
        }
        self.reply(200, "application/json", json.dumps(view).encode())

    def log_message(self, *args):
        pass


# Comments, event names, ids, a multi-line event; then the event bedrock-agentcore sends (with
# status 200) when the agent's generator raised.
SSE = {
    "events": b': hello\nevent: message\nid: 1\ndata: "one "\n\ndata: {"n":\ndata: 2}\n\n',
    "error": b'data: "partial"\n\ndata: {"error": "no more", "error_type": "ValueError", '
             b'"message": "An error occurred during streaming"}\n\n',
}
app = None
if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", 8080), Handler).serve_forever()
"""


def probe_bundle(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "probe", {
        "agent.toml": 'name = "probe"\nentrypoint = "server:app"\nprotocol = "http"\n',
        "server.py": PROBE,
        "deps/vendored.py": "",
    })


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A port listening on the host's loopback, which no sandbox should reach."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


async def test_the_agent_server_sees_its_bundle_and_deps_and_nothing_outside(
    start: StartSandbox, tmp_path: Path, host_listener: int
) -> None:
    sandbox = await start(probe_bundle(tmp_path), "server:app")
    inv = invocation({"host_port": host_listener}, session="s-probe", credentials="tok.en")
    inv.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    chunks: list[bytes] = []
    async for item in sandbox.invoke(inv, _no_model):
        if isinstance(item, Done):
            assert item.state == b'{"kept": true}'
        else:
            chunks.append(item)
    assert len(chunks) == 1
    view = json.loads(chunks[0])

    headers = view["headers"]
    assert headers["x-amzn-bedrock-agentcore-runtime-session-id"] == "s-probe"
    assert headers["x-amzn-bedrock-agentcore-runtime-request-id"] == inv.invocation_id
    assert headers["authorization"] == "Bearer tok.en"
    assert headers["traceparent"] == inv.traceparent
    # The bundle first, then the standard library, then deps/; nothing of Corral's virtualenv.
    assert view["sys_path"][0] == "/bundle" and view["sys_path"][-1] == "/bundle/deps"
    assert not any("site-packages" in p for p in view["sys_path"])
    assert view["importable"] == {
        "corral": False, "grpc": False, "google": False, "vendored": True,
    }
    assert view["cwd"] == "/bundle"
    # inet sockets work on the sandbox's own loopback only.
    assert view["host_port"] == "ConnectionRefusedError"
    assert view["outside"] == "OSError"  # ENETUNREACH: no route out of the namespace

    # A plain-text body is one chunk, as sent.
    plain = [item async for item in sandbox.invoke(invocation({"plain": True}), _no_model)]
    assert plain[0] == b"just text" and isinstance(plain[1], Done)


async def test_server_sent_events_become_chunks_and_the_sdk_error_event_a_failure(
    start: StartSandbox, tmp_path: Path
) -> None:
    sandbox = await start(probe_bundle(tmp_path), "server:app")
    events = [item async for item in sandbox.invoke(invocation({"sse": "events"}), _no_model)]
    assert events[:2] == [b"one ", b'{"n":\n2}'] and isinstance(events[2], Done)

    chunks: list[bytes] = []
    with pytest.raises(AgentFailed) as info:
        async for item in sandbox.invoke(invocation({"sse": "error"}), _no_model):
            chunks.append(item)  # type: ignore[arg-type]
    assert chunks == [b"partial"]
    assert (info.value.error_type, info.value.message) == ("ValueError", "no more")


async def test_an_agent_that_does_not_start_fails_the_sandbox_start_with_its_error(
    start: StartSandbox, tmp_path: Path
) -> None:
    bundle = write_bundle(tmp_path / "broken", {
        "agent.toml": 'name = "broken"\nentrypoint = "server:app"\nprotocol = "http"\n',
        "server.py": "import not_installed_anywhere\n",
    })
    with pytest.raises(AgentFailed) as info:
        await start(bundle, "server:app")
    assert "not_installed_anywhere" in info.value.message
    assert "exited with code 1" in info.value.message
