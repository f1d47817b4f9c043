"""The worker that runs inside a sandbox: imports the bundle's entrypoint once, then serves
invocations over the Unix socket the executor passed in (length-prefixed protobuf frames)."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import socket
import struct
import sys
import threading
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral import names
from corral.sandbox.v1 import sandbox_pb2 as pb
from corral.sdk import App, Context, ModelError, ToolError
from corral.sdk._output import OutputCapture, install

if TYPE_CHECKING:
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.sdk.trace import Span
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import Tracer

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024


class Channel:
    """Blocking framed I/O on the socket to the executor. Frames may be sent from the agent's
    threads (its output, `capture`), so writes hold a lock, and output waiting to be sent goes
    first: the executor reads an invocation's output in the order it was written."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.RLock()
        self.capture = OutputCapture(self._send_logs, self.lock)

    def _write(self, frame: pb.WorkerFrame) -> None:
        data = frame.SerializeToString()
        self.sock.sendall(_HEADER.pack(len(data)) + data)

    def _send_logs(self, logs: pb.Logs) -> None:
        with self.lock:
            self._write(pb.WorkerFrame(logs=logs))

    def send(self, frame: pb.WorkerFrame) -> None:
        with self.lock:
            logs = self.capture.take()
            if logs is not None:
                self._write(pb.WorkerFrame(logs=logs))
            self._write(frame)

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise EOFError("executor closed the socket")
            buf += part
        return bytes(buf)

    def receive(self) -> pb.HostFrame:
        (size,) = _HEADER.unpack(self._read(_HEADER.size))
        if size > MAX_FRAME:
            raise ValueError(f"frame of {size} bytes is over the limit")
        frame = pb.HostFrame()
        frame.ParseFromString(self._read(size))
        return frame

    def serve(self) -> Iterator[pb.HostFrame]:
        """Tells the executor this worker is ready, then yields its frames until it closes the
        socket."""
        self.send(pb.WorkerFrame(ready=pb.Ready(pid=os.getpid())))
        while True:
            try:
                yield self.receive()
            except EOFError:
                return


class BrokeredModel:
    """ctx.model: each call is a frame to the executor's broker, which holds the provider."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def _answers(self, prompt: str, system: str, stream: bool) -> Iterator[str]:
        """Yields streamed pieces (stream=True), then the whole answer last."""
        call_id = uuid.uuid4().hex
        self.channel.send(pb.WorkerFrame(model_call=pb.ModelCall(
            call_id=call_id, prompt=prompt, system=system, stream=stream)))
        finished = False
        try:
            while True:
                reply = self.channel.receive()
                if reply.HasField("model_chunk") and reply.model_chunk.call_id == call_id:
                    yield reply.model_chunk.text
                    continue
                finished = True
                if not reply.HasField("model_result") or reply.model_result.call_id != call_id:
                    raise ModelError("the executor answered a model call out of order")
                if reply.model_result.error:
                    raise ModelError(reply.model_result.error)
                if not stream:
                    yield reply.model_result.text
                return
        finally:
            if not finished:
                # The agent stopped reading early: the rest of this answer is still on its way
                # and must not be taken for the answer to its next call.
                while not self.channel.receive().HasField("model_result"):
                    pass

    def complete(self, prompt: str, *, system: str = "") -> str:
        return "".join(self._answers(prompt, system, stream=False))

    def stream(self, prompt: str, *, system: str = "") -> Iterator[str]:
        return self._answers(prompt, system, stream=True)

    async def acomplete(self, prompt: str, *, system: str = "") -> str:
        return self.complete(prompt, system=system)


class BrokeredTools:
    """ctx.tools: each call is a frame to the executor's tool broker."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def call(self, name: str, payload: Any = None, *, timeout_s: float | None = None) -> Any:
        if isinstance(payload, bytes):
            data, content_type = payload, "application/octet-stream"
        else:
            data, content_type = json.dumps(payload).encode(), "application/json"
        call_id = uuid.uuid4().hex
        self.channel.send(pb.WorkerFrame(tool_call=pb.ToolCall(
            call_id=call_id, tool=name, payload=data, content_type=content_type,
            timeout_s=timeout_s or 0.0)))
        reply = self.channel.receive()
        if not reply.HasField("tool_result") or reply.tool_result.call_id != call_id:
            raise ToolError("UNAVAILABLE", "the executor answered a tool call out of order")
        result = reply.tool_result
        if result.error or result.error_code:
            raise ToolError(result.error_code or "TOOL_ERROR", result.error)
        if result.content_type.split(";")[0].strip() == "application/json":
            try:
                return json.loads(result.payload)
            except ValueError:
                pass
        return result.payload


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def _bundle_frames(exc: BaseException, root: Path) -> list[str]:
    """`exc` as Python prints it, with only the frames of files under `root` (named relative to
    it)."""
    lines = ["Traceback (most recent call last):\n"]
    for frame in traceback.extract_tb(exc.__traceback__):
        try:
            path = Path(frame.filename).resolve().relative_to(root)
        except (ValueError, OSError):
            continue
        lines.append(f'  File "{path}", line {frame.lineno}, in {frame.name}\n')
        if frame.line:
            lines.append(f"    {frame.line.strip()}\n")
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return lines


def agent_traceback(exc: BaseException, bundle: Path) -> str:
    """`exc` and the exceptions it was raised from, as Python prints them, but with only the
    frames of the bundle's own files: the agent's author can act on those; the runtime's are
    noise."""
    root = bundle.resolve()
    chain: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain[:0] = _bundle_frames(current, root)
        if current.__cause__ is not None:
            chain[:0] = [_CAUSE]
            current = current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            chain[:0] = [_CONTEXT]
            current = current.__context__
        else:
            current = None
    return "".join(chain)


def _failed(exc: BaseException, bundle: Path, message: str) -> pb.WorkerFrame:
    return pb.WorkerFrame(failed=pb.Failed(
        error_type=type(exc).__name__, message=message, traceback=agent_traceback(exc, bundle)))


def _encode(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    return json.dumps(item).encode()


class _Tracing:
    """The agent's own tracer: spans are kept in memory and sent back with each invocation's
    result, since the sandbox has no network to export them itself."""

    exporter: InMemorySpanExporter | None
    # The current invocation's, stamped on every span it starts.
    attributes: dict[str, str]
    tracer: Tracer

    def __init__(self, resource: dict[str, str]) -> None:
        self.attributes = {}
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        except ImportError:  # the agent runs without the OTel SDK: a no-op tracer
            from opentelemetry import trace

            self.exporter = None
            self.tracer = trace.get_tracer("corral.agent")
            return
        from opentelemetry.sdk.trace import SpanProcessor

        tracing = self

        class _InvocationAttributes(SpanProcessor):
            """Stamps every span with the current invocation's session, endpoint and tenant: one
            worker may wait in a warm pool before it knows which session it serves."""

            def on_start(self, span: Span, parent_context: OtelContext | None = None) -> None:
                span.set_attributes(tracing.attributes)

        self.exporter = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create(resource))
        provider.add_span_processor(_InvocationAttributes())
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("corral.agent")

    def context(self, traceparent: str) -> OtelContext:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        return TraceContextTextMapPropagator().extract({"traceparent": traceparent} if traceparent else {})

    def drain(self) -> bytes:
        if self.exporter is None:
            return b""
        spans = self.exporter.get_finished_spans()
        self.exporter.clear()
        if not spans:
            return b""
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        return encode_spans(spans).SerializeToString()


class Worker:
    def __init__(
        self, app: App, channel: Channel, prompt: str, resource: dict[str, str], bundle: Path
    ) -> None:
        self.app = app
        self.bundle = bundle
        self.channel = channel
        self.prompt = prompt
        self.model = BrokeredModel(channel)
        self.tools = BrokeredTools(channel)
        self.tracing = _Tracing(resource)
        self.loop = asyncio.new_event_loop()

    def _outputs(self, result: object) -> Iterator[object]:
        if inspect.isasyncgen(result):
            while True:
                try:
                    yield self.loop.run_until_complete(result.__anext__())
                except StopAsyncIteration:
                    return
        elif inspect.isgenerator(result):
            yield from result
        elif inspect.iscoroutine(result):
            value = self.loop.run_until_complete(result)
            if value is not None:
                yield value
        elif result is not None:
            yield result

    def invoke(self, inv: pb.Invocation) -> None:
        state = json.loads(inv.state) if inv.state else {}
        if not isinstance(state, dict):
            state = {"value": state}
        payload: Any = inv.payload
        if not inv.content_type or inv.content_type == "application/json":
            try:
                payload = json.loads(inv.payload) if inv.payload else {}
            except ValueError:
                payload = inv.payload.decode(errors="replace")
        self.tracing.attributes = {
            "corral.session": names.session_name(inv.session_id), "corral.endpoint": inv.endpoint,
            "corral.tenant": inv.tenant, "corral.invocation": inv.invocation_id,
        }
        ctx = Context(
            session_id=inv.session_id, invocation_id=inv.invocation_id, version=inv.version,
            endpoint=inv.endpoint, state=state, model=self.model, tracer=self.tracing.tracer,
            tenant=inv.tenant, user=inv.user, prompt=self.prompt,
            credentials=inv.credentials, tools=self.tools,
        )
        assert self.app.handler is not None
        try:
            from opentelemetry import context as otel_context

            token = otel_context.attach(self.tracing.context(inv.traceparent))
        except ImportError:
            token = None
        self.channel.capture.begin()
        try:
            for item in self._outputs(self.app.handler(payload, ctx)):
                self.channel.send(pb.WorkerFrame(chunk=pb.Chunk(data=_encode(item))))
        except Exception as exc:  # noqa: BLE001 - the agent's failure is reported, not fatal
            self.channel.capture.end()
            self.channel.send(_failed(exc, self.bundle, str(exc)))
            self.tracing.drain()
            return
        finally:
            self.channel.capture.end()
            if token is not None:
                otel_context.detach(token)
        try:
            new_state = json.dumps(ctx.state).encode()
        except (TypeError, ValueError) as exc:
            self.channel.send(pb.WorkerFrame(failed=pb.Failed(
                error_type="StateError", message=f"ctx.state is not JSON-serialisable: {exc}",
            )))
            return
        self.channel.send(pb.WorkerFrame(done=pb.Done(state=new_state, otlp_spans=self.tracing.drain())))

    def warm_up(self) -> None:
        """Pays the one-time costs of a first invocation (lazy imports, the first span and its
        encoding) before Ready, so a sandbox from a warm pool answers its first invocation about
        as fast as a live session's next one."""
        try:
            from opentelemetry import context as otel_context

            token = otel_context.attach(self.tracing.context(""))
            with self.tracing.tracer.start_as_current_span("warm-up"):
                pass
            otel_context.detach(token)
        except ImportError:
            pass
        self.tracing.drain()  # discarded

    def serve(self) -> None:
        self.warm_up()
        for frame in self.channel.serve():
            if frame.HasField("invoke"):
                self.invoke(frame.invoke)


def load_app(bundle: Path, entrypoint: str) -> App:
    sys.path.insert(0, str(bundle))
    # Dependencies vendored by `corral publish`: after the bundle's own modules (the agent's
    # code wins a name clash), before the executor's site-packages (the versions it pinned win).
    if (bundle / "deps").is_dir():
        sys.path.insert(1, str(bundle / "deps"))
    module_name, attr = entrypoint.split(":")
    module = importlib.import_module(module_name)
    app = getattr(module, attr)
    if not isinstance(app, App) or app.handler is None:
        raise TypeError(f"{entrypoint} is not a corral.sdk.App with an @app.entrypoint handler")
    return app


def _die_with_parent() -> None:
    """Asks the kernel to kill this worker if the executor dies, so no orphan outlives it."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


def main(argv: list[str]) -> int:
    _die_with_parent()
    fd, bundle_dir, entrypoint, prompt_file = int(argv[1]), Path(argv[2]), argv[3], argv[4]
    resource = json.loads(argv[5]) if len(argv) > 5 else {}
    if fd == 0:
        # The channel came in as stdin (gVisor passes no other descriptor): move it off fd 0
        # so that the agent's subprocesses, which inherit stdin, cannot read its frames.
        fd = os.dup(0)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    channel = Channel(socket.socket(fileno=fd))
    install(channel.capture)
    try:
        app = load_app(bundle_dir, entrypoint)
        prompt = (bundle_dir / prompt_file).read_text() if prompt_file else ""
    except Exception as exc:  # noqa: BLE001 - reported to the executor as a start failure
        channel.send(_failed(exc, bundle_dir, f"loading {entrypoint}: {exc}"))
        return 1
    Worker(app, channel, prompt, resource, bundle_dir).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
