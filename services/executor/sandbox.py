"""One live sandbox: a worker process for one session, and the framed socket to it. The only
module that speaks the sandbox protocol (corral.sandbox.v1 frames); `run` turns the domain's
values into frames and back."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import struct
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable

from corral.sandbox.v1 import sandbox_pb2 as pb
from services.common.errors import Internal
from services.executor.admission import Slot
from services.executor.drivers.base import SandboxDriver, SandboxSpec, Usage, WorkerProcess
from services.executor.model import (
    AgentLogLine,
    ChunkSink,
    LogSink,
    ModelHandler,
    ModelRequest,
    ToolHandler,
    ToolRequest,
    TurnInput,
    TurnOutput,
)

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
START_TIMEOUT_S = 30.0


class AgentFailed(Exception):
    """The agent's own code raised: its exception type and message, for the caller."""

    def __init__(self, error_type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class SandboxCrashed(Exception):
    """The worker went away mid-invocation."""


# The end of a turn, as `invoke` and `run` yield it.
Done = TurnOutput

ModelFrames = Callable[[pb.ModelCall], Awaitable[pb.ModelResult]]
ToolFrames = Callable[[pb.ToolCall], Awaitable[pb.ToolResult]]


async def _tool_result(call: pb.ToolCall, tools: ToolFrames | None) -> pb.ToolResult:
    if tools is None:
        return pb.ToolResult(call_id=call.call_id, error="tool calls are not available here",
                             error_code="UNAVAILABLE")
    result = await tools(call)
    result.call_id = call.call_id
    return result


def _log_line(record: pb.LogRecord) -> AgentLogLine:
    return AgentLogLine(record.time_unix_nano, record.source, record.severity_number,
                        record.severity_text, record.body)


class Sandbox:
    def __init__(self, spec: SandboxSpec) -> None:
        self.spec = spec
        self.id = spec.workdir.name or uuid.uuid4().hex
        self.process: WorkerProcess | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.started = time.time()
        self.last_used = time.monotonic()
        # The session it serves: none while it waits in a warm pool.
        self.session = ""
        self.bound_at = self.started
        # Taken from a warm pool rather than started for its session.
        self.warm = False
        # One exchange on the socket at a time: an invocation, or a ping between invocations.
        self._exchange = asyncio.Lock()
        # Its place under the executor's cap, given back once its worker has been reaped.
        self.slot: Slot | None = None

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def digest(self) -> str:
        return self.spec.digest

    async def start(self, driver: SandboxDriver) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = await driver.spawn(self.spec, child.fileno())
        finally:
            child.close()
        self.reader, self.writer = await asyncio.open_unix_connection(sock=parent, limit=MAX_FRAME)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                frame = await self._receive()
        except TimeoutError:
            self.kill()
            raise Internal(f"the sandbox for {self.spec.session} did not start within {START_TIMEOUT_S:g}s",
                           reason="SANDBOX_START_TIMEOUT") from None
        except SandboxCrashed:
            code = await self.process.wait()
            raise Internal(f"the sandbox for {self.spec.session} exited at start (code {code})",
                           reason="SANDBOX_START_FAILED") from None
        except BaseException:  # cancelled while it started: nothing may be left running
            self.kill()
            raise
        if frame.HasField("failed"):
            self.kill()
            raise AgentFailed(frame.failed.error_type, frame.failed.message, frame.failed.traceback)
        if not frame.HasField("ready"):
            self.kill()
            raise Internal("the sandbox sent something other than Ready at start", reason="SANDBOX_PROTOCOL")

    async def send(self, frame: pb.HostFrame) -> None:
        assert self.writer is not None
        data = frame.SerializeToString()
        self.writer.write(_HEADER.pack(len(data)) + data)
        await self.writer.drain()

    _send = send

    async def _receive(self) -> pb.WorkerFrame:
        assert self.reader is not None
        try:
            (size,) = _HEADER.unpack(await self.reader.readexactly(_HEADER.size))
            if size > MAX_FRAME:
                raise SandboxCrashed(f"the sandbox sent a frame of {size} bytes")
            frame = pb.WorkerFrame()
            frame.ParseFromString(await self.reader.readexactly(size))
            return frame
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise SandboxCrashed("the sandbox closed its socket") from exc

    async def run(
        self, turn: TurnInput, model: ModelHandler, tools: ToolHandler, logs: LogSink | None = None
    ) -> AsyncGenerator[bytes | Done, None]:
        """`invoke` in the domain's terms: the turn's input, handlers for the agent's model and
        tool calls, and where its output (print, stderr, logging) goes as it arrives."""

        async def model_frames(call: pb.ModelCall) -> pb.ModelResult:
            async def chunk(text: str) -> None:
                await self.send(pb.HostFrame(model_chunk=pb.ModelChunk(call_id=call.call_id, text=text)))

            on_chunk: ChunkSink | None = chunk if call.stream else None
            answer = await model(
                ModelRequest(call.call_id, call.prompt, call.system, call.stream), on_chunk
            )
            return pb.ModelResult(
                call_id=answer.call_id, text=answer.text, error=answer.error,
                input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
            )

        async def tool_frames(call: pb.ToolCall) -> pb.ToolResult:
            outcome = await tools(ToolRequest(
                call.call_id, call.tool, call.payload, call.content_type, call.timeout_s))
            return pb.ToolResult(
                payload=outcome.payload, content_type=outcome.content_type,
                error=outcome.error, error_code=outcome.error_code,
            )

        invocation = pb.Invocation(
            invocation_id=turn.invocation_id, session_id=turn.session_id, version=turn.version,
            payload=turn.payload, content_type=turn.content_type, state=turn.state,
            traceparent=turn.traceparent, endpoint=turn.endpoint, tenant=turn.tenant,
            user=turn.user, credentials=turn.credentials, deadline_unix_ms=turn.deadline_unix_ms,
        )
        def log_frames(frame: pb.Logs) -> None:
            if logs is not None:
                logs([_log_line(r) for r in frame.records], frame.dropped_bytes)

        # aclosing: closing this generator (a caller that went away) must end the exchange too.
        async with contextlib.aclosing(
            self.invoke(invocation, model_frames, tool_frames, log_frames)
        ) as items:
            async for item in items:
                yield item

    async def invoke(
        self, invocation: pb.Invocation, broker: ModelFrames, tools: ToolFrames | None = None,
        logs: Callable[[pb.Logs], None] | None = None,
    ) -> AsyncGenerator[bytes | Done, None]:
        """Runs one invocation; yields output chunks, then a Done. Raises AgentFailed or
        SandboxCrashed. `broker` answers model calls (it may send ModelChunk frames itself
        through `send` for a streamed call); `tools` answers tool calls; `logs` takes the
        agent's output as it arrives."""
        async with self._exchange:
            await self.send(pb.HostFrame(invoke=invocation))
            while True:
                frame = await self._receive()
                kind = frame.WhichOneof("frame")
                if kind == "chunk":
                    yield frame.chunk.data
                elif kind == "model_call":
                    result = await broker(frame.model_call)
                    await self.send(pb.HostFrame(model_result=result))
                elif kind == "tool_call":
                    await self.send(pb.HostFrame(tool_result=await _tool_result(frame.tool_call, tools)))
                elif kind == "done":
                    yield Done(state=frame.done.state, otlp_spans=frame.done.otlp_spans)
                    return
                elif kind == "failed":
                    raise AgentFailed(frame.failed.error_type, frame.failed.message, frame.failed.traceback)
                elif kind == "logs":
                    if logs is not None:
                        logs(frame.logs)
                elif kind == "pong":
                    continue  # the answer to a ping that gave up waiting
                else:
                    raise SandboxCrashed(f"unexpected frame {kind!r} from the sandbox")

    async def ping(self, timeout_s: float = 2.0) -> str:
        """Asks an idle http-protocol worker whether its agent is busy (AgentCore's /ping):
        "Healthy" or "HealthyBusy"; "" when it does not answer in time."""
        if self._exchange.locked():
            return "HealthyBusy"  # an invocation is running
        async with self._exchange:
            await self.send(pb.HostFrame(ping=pb.Ping()))
            try:
                async with asyncio.timeout(timeout_s):
                    while True:
                        frame = await self._receive()
                        if frame.HasField("pong"):
                            return frame.pong.status
            except TimeoutError:
                return ""

    def bind(self, session: str, *, warm: bool) -> None:
        """Gives the sandbox to `session`, for good: a sandbox never serves a second session."""
        assert not self.session, f"sandbox already serves {self.session}"
        self.warm = warm
        self.session = session
        self.bound_at = time.time()
        self.last_used = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def usage(self) -> Usage:
        return self.process.usage() if self.process is not None else Usage()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
        if self.writer is not None:
            self.writer.close()

    async def stop(self) -> None:
        """Ends the worker and wipes its private disk: nothing of a session outlives its sandbox.
        Its slot comes free once the worker has been reaped."""
        if self.slot is not None:
            self.slot.stop_begins()
        try:
            self.kill()
            if self.process is not None:
                await self.process.wait()
        finally:
            if self.slot is not None:
                self.slot.release()
        await asyncio.to_thread(shutil.rmtree, self.spec.workdir, ignore_errors=True)
