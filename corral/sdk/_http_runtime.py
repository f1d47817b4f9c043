"""The worker for `protocol = "http"` agents (AgentCore's service contract): it starts the
agent's own HTTP server inside the sandbox, then turns each Invocation frame into
`POST /invocations` and each Ping frame into `GET /ping`, over the same framed socket and argv as
corral/sdk/_runtime.py.

The agent's server is a child process, started the way AgentCore starts a container's code: its
entrypoint module run as `__main__` (so `if __name__ == "__main__": app.run()` serves on port
8080), by the sandbox's interpreter in isolated mode without site (`-I -S`). Its sys.path is
then only the bundle, the standard library and `<bundle>/deps` (with that directory's .pth
files): none of Corral's or the virtualenv's packages, so the agent's pinned versions are the
only ones it can import. The bridge itself speaks HTTP with the standard library only.

The server's stdout and stderr are pipes the bridge reads: what arrives while an invocation is in
flight (one at a time per sandbox) is that invocation's output, sent as Logs frames before its
final frame and bounded as corral/sdk/_output.py bounds it; what arrives between invocations
(start-up, idle, background work) goes to the sandbox's stderr, as a corral agent's does, which
the executor's log keeps.
"""

from __future__ import annotations

import codecs
import collections
import http.client
import json
import logging
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from corral.sandbox.v1 import sandbox_pb2 as pb
from corral.sdk._output import STDERR, STDOUT, OutputCapture
from corral.sdk._runtime import Channel, _die_with_parent
from corral.sdk._server_traceback import server_traceback

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
PORT = 8080  # AgentCore's contract: the agent serves on 8080
SESSION_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"
REQUEST_ID_HEADER = "X-Amzn-Bedrock-AgentCore-Runtime-Request-Id"
START_TIMEOUT_S = 25.0  # below the executor's 30 s, so a slow start fails with our message
PING_TIMEOUT_S = 2.0
ERROR_BODY_LIMIT = 4096  # bytes of a failed response's body kept in the failure message
STDERR_TAIL = 4096  # bytes of the agent's stderr kept for a start failure
# After a response, how long the bridge waits for the server's pipes to go quiet (output written
# just before the response ends is still the invocation's), and for at most how long in all.
SETTLE_QUIET_S = 0.05
SETTLE_MAX_S = 1.0
# Lines of the server's stderr kept per invocation to find a failure's traceback in.
STDERR_LINES = 400
HEALTHY, BUSY = "Healthy", "HealthyBusy"
# The event bedrock-agentcore streams (with status 200) when the agent's generator raised.
_SDK_STREAM_ERROR = "An error occurred during streaming"

# Runs in the agent's interpreter: argv is bundle, entrypoint, port. PR_SET_PDEATHSIG first, so
# the server never outlives the bridge. A module that returns without serving (no `app.run()`
# under `__main__`) has its entrypoint attribute served with uvicorn on the same port instead.
_BOOT = """\
import ctypes, runpy, signal, site, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)
bundle, entrypoint, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
module, attr = entrypoint.split(":")
sys.argv = [module]
sys.path.insert(0, bundle)
site.addsitedir(bundle + "/deps")
namespace = runpy.run_module(module, run_name="__main__", alter_sys=True)
if attr not in namespace:
    sys.exit(f"{entrypoint}: module {module!r} has no attribute {attr!r}")
import uvicorn
uvicorn.run(namespace[attr], host="127.0.0.1", port=port, log_level="warning")
"""


class AgentServerError(RuntimeError):
    """The agent's server did not start, or went away."""


class ServerOutput:
    """The server's stdout and stderr, read as they arrive: into `capture` while it is active
    (an invocation is in flight), else copied to the sandbox's stderr."""

    def __init__(self, capture: OutputCapture, tail: collections.deque[bytes]) -> None:
        self.capture = capture
        self.tail = tail
        self._lock = threading.Lock()  # held while a read is delivered, so `settle` can wait
        self._open: dict[int, str] = {}
        # The in-flight invocation's stderr, as lines, for its traceback if it fails.
        self.stderr_lines: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._stderr_partial = ""

    def watch(self, fd: int, source: str) -> None:
        """Reads `fd` on a thread of its own until end of file."""
        self._open[fd] = source
        threading.Thread(target=self._read, args=(fd, source), daemon=True).start()

    def _read(self, fd: int, source: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            select.select([fd], [], [])
            with self._lock:
                data = os.read(fd, 65536)
                if not data:
                    self._open.pop(fd, None)
                    return
                self.deliver(source, data, decoder.decode(data))

    def deliver(self, source: str, data: bytes, text: str) -> None:
        if source == STDERR:
            self.tail.append(data)
        if self.capture.active:
            self.capture.write(source, text)
            if source == STDERR:
                *lines, self._stderr_partial = (self._stderr_partial + text).split("\n")
                self.stderr_lines.extend(lines)
        else:
            sys.stderr.buffer.write(data)
            sys.stderr.flush()

    def begin(self) -> None:
        with self._lock:
            self.stderr_lines.clear()
            self._stderr_partial = ""
            self.capture.begin()

    def settle(self) -> None:
        """Returns once the pipes hold nothing unread and no read is being delivered (or after
        SETTLE_MAX_S): what the server wrote before it answered is then in the capture."""
        deadline = time.monotonic() + SETTLE_MAX_S
        while time.monotonic() < deadline:
            fds = list(self._open)
            readable = select.select(fds, [], [], SETTLE_QUIET_S)[0] if fds else []
            if not readable:
                break
            time.sleep(0.005)
        with self._lock:
            return


@dataclass
class AgentServer:
    """The agent's HTTP server process, its output and the last of what it wrote to stderr."""

    process: subprocess.Popen[bytes]
    stderr_tail: collections.deque[bytes]
    output: ServerOutput
    stopping: bool = False

    def tail(self) -> str:
        return b"".join(self.stderr_tail).decode(errors="replace")[-STDERR_TAIL:]

    def stop(self) -> None:
        self.stopping = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(2)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _port_answers() -> bool:
    try:
        socket.create_connection((HOST, PORT), timeout=0.5).close()
        return True
    except OSError:
        return False


def start_server(bundle: Path, entrypoint: str, capture: OutputCapture) -> AgentServer:
    # Something else on the port would get the session's payloads: only possible without a
    # network namespace of our own (the process driver), and refused there.
    if _port_answers():
        raise AgentServerError(
            f"{HOST}:{PORT} is already taken: this sandbox shares its network with another "
            "process (the process driver runs one http-protocol agent at a time; use bwrap)"
        )
    process = subprocess.Popen(
        # -I: no PYTHON* variables, no user site; -S: no site-packages; -B: the bundle is
        # read-only (and must stay unchanged where it is not); -u: its output arrives as written.
        [sys.executable, "-I", "-S", "-B", "-u", "-c", _BOOT, str(bundle), entrypoint, str(PORT)],
        cwd=bundle, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    tail: collections.deque[bytes] = collections.deque(maxlen=64)
    output = ServerOutput(capture, tail)
    for stream, source in ((process.stdout, STDOUT), (process.stderr, STDERR)):
        output.watch(stream.fileno(), source)
    return AgentServer(process, tail, output)


def _get_ping(timeout: float) -> str:
    conn = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
    try:
        conn.request("GET", "/ping")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise AgentServerError(f"GET /ping answered {response.status}")
        return _ping_status(body)
    finally:
        conn.close()


def _ping_status(body: bytes) -> str:
    """AgentCore's /ping answers {"status": "Healthy" | "HealthyBusy", ...}; plain text too."""
    text = body.decode(errors="replace").strip()
    try:
        doc = json.loads(text)
        text = str(doc.get("status", "")) if isinstance(doc, dict) else str(doc)
    except ValueError:
        pass
    return BUSY if text.lower() == BUSY.lower() else HEALTHY


def wait_until_serving(server: AgentServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise AgentServerError(
                f"the agent's server exited with code {code} before serving:\n{server.tail()}"
            )
        try:
            _get_ping(PING_TIMEOUT_S)
            return
        except (OSError, http.client.HTTPException, AgentServerError):
            time.sleep(0.05)
    raise AgentServerError(
        f"the agent's server did not answer GET http://{HOST}:{PORT}/ping within "
        f"{START_TIMEOUT_S:g}s:\n{server.tail()}"
    )


def _sse_events(response: http.client.HTTPResponse) -> Iterator[str]:
    """The data of each server-sent event as it arrives (multi-line data joined by newlines)."""
    data: list[str] = []
    for raw in response:
        line = raw.decode(errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value.removeprefix(" "))
        # event:, id:, retry: and comments say nothing a Corral chunk can carry
    if data:
        yield "\n".join(data)


def _chunk(data: bytes) -> bytes:
    """A JSON string becomes its text, as a corral agent's yielded str does; anything else is
    passed on as the JSON (or text) the agent sent."""
    try:
        value = json.loads(data)
    except ValueError:
        return data
    return value.encode() if isinstance(value, str) else data


def _stream_error(text: str) -> pb.Failed | None:
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if isinstance(event, dict) and event.get("message") == _SDK_STREAM_ERROR and "error" in event:
        return pb.Failed(error_type=str(event.get("error_type", "StreamError")),
                         message=str(event["error"]))
    return None


def _headers(inv: pb.Invocation) -> dict[str, str]:
    headers = {
        "Content-Type": inv.content_type or "application/json",
        "Accept": "text/event-stream, application/json",
        SESSION_HEADER: inv.session_id,
        REQUEST_ID_HEADER: inv.invocation_id,
    }
    if inv.credentials:
        headers["Authorization"] = f"Bearer {inv.credentials}"
    if inv.traceparent:
        headers["traceparent"] = inv.traceparent
    return headers


def _timeout(inv: pb.Invocation) -> float | None:
    """Per read; the executor enforces the whole invocation's deadline by itself."""
    if not inv.deadline_unix_ms:
        return None
    return max(1.0, inv.deadline_unix_ms / 1000 - time.time())


class Bridge:
    def __init__(self, channel: Channel, output: ServerOutput, bundle: Path) -> None:
        self.channel = channel
        self.output = output
        self.bundle = PurePosixPath(os.path.abspath(bundle))  # as the server names its files
        self.invocations: queue.Queue[pb.Invocation] = queue.Queue()
        self.in_flight = threading.Event()

    def _post(self, inv: pb.Invocation) -> pb.WorkerFrame:
        """Streams the response's chunks; returns the frame that ends the invocation."""
        conn = http.client.HTTPConnection(HOST, PORT, timeout=_timeout(inv))
        try:
            conn.request("POST", "/invocations", body=inv.payload, headers=_headers(inv))
            failed = self._relay(conn.getresponse())
        except (OSError, http.client.HTTPException) as exc:
            failed = pb.Failed(
                error_type=type(exc).__name__,
                message=f"POST http://{HOST}:{PORT}/invocations failed: {exc}",
            )
        finally:
            conn.close()
        if failed is not None:
            return pb.WorkerFrame(failed=failed)
        # The http contract has no state of its own (the agent keeps its memory in-process), so
        # the session's committed state passes through unchanged.
        return pb.WorkerFrame(done=pb.Done(state=inv.state))

    def _relay(self, response: http.client.HTTPResponse) -> pb.Failed | None:
        """Sends the response on as chunks: one per server-sent event, or one for the body."""
        if not 200 <= response.status < 300:
            error = response.read(ERROR_BODY_LIMIT).decode(errors="replace")
            return pb.Failed(
                error_type="HTTPError",
                message=f"POST /invocations answered {response.status} {response.reason}: {error}",
            )
        kind = response.getheader("Content-Type", "").split(";")[0].strip().lower()
        if kind == "text/event-stream":
            for event in _sse_events(response):
                failed = _stream_error(event)
                if failed is not None:
                    return failed
                self._send_chunk(_chunk(event.encode()))
            return None
        body = response.read()
        self._send_chunk(_chunk(body) if kind == "application/json" else body)
        return None

    def _send_chunk(self, data: bytes) -> None:
        if data:
            self.channel.send(pb.WorkerFrame(chunk=pb.Chunk(data=data)))

    def _run_invocations(self) -> None:
        while True:
            inv = self.invocations.get()
            self.in_flight.set()
            self.output.begin()
            try:
                end = self._post(inv)
                self.output.settle()
                if end.HasField("failed") and not end.failed.traceback:
                    end.failed.traceback = server_traceback(
                        list(self.output.stderr_lines), self.bundle)
            finally:
                self.channel.capture.end()
                self.in_flight.clear()
            self.channel.send(end)

    def ping(self) -> str:
        # A running invocation is work even when the agent's own /ping only counts its
        # background tasks (bedrock-agentcore's default), and a ping must not wait behind it.
        if self.in_flight.is_set():
            return BUSY
        try:
            return _get_ping(PING_TIMEOUT_S)
        except (OSError, http.client.HTTPException, AgentServerError) as exc:
            log.warning("GET /ping failed: %s", exc)
            return BUSY if self.in_flight.is_set() else HEALTHY

    def serve(self) -> None:
        threading.Thread(target=self._run_invocations, daemon=True).start()
        for frame in self.channel.serve():
            kind = frame.WhichOneof("frame")
            if kind == "invoke":
                self.invocations.put(frame.invoke)
            elif kind == "ping":
                self.channel.send(pb.WorkerFrame(pong=pb.Pong(status=self.ping())))
            # model and tool results answer calls an http agent never makes: nothing to do


def _exit_with_server(server: AgentServer) -> None:
    """The agent's server is the sandbox's reason to exist: when it ends, so does the bridge,
    and the executor sees a crashed sandbox instead of requests that can never succeed."""
    code = server.process.wait()
    if server.stopping:
        return
    log.error("the agent's server exited with code %s:\n%s", code, server.tail())
    os._exit(70)


def main(argv: list[str]) -> int:
    # Inside the sandbox stderr is the only way out: the executor's driver logs what comes.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="corral: %(message)s")
    _die_with_parent()
    fd, bundle_dir, entrypoint = int(argv[1]), Path(argv[2]), argv[3]
    channel = Channel(socket.socket(fileno=fd))
    server: AgentServer | None = None
    try:
        server = start_server(bundle_dir, entrypoint, channel.capture)
        wait_until_serving(server)
    except Exception as exc:  # noqa: BLE001 - reported to the executor as a start failure
        channel.send(pb.WorkerFrame(failed=pb.Failed(
            error_type=type(exc).__name__, message=f"starting {entrypoint}: {exc}",
        )))
        if server is not None:
            server.stop()
        return 1
    threading.Thread(target=_exit_with_server, args=(server,), daemon=True).start()
    try:
        Bridge(channel, server.output, bundle_dir).serve()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
