"""corral invoke, chat: one request streamed to an agent, or a conversation with it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from corral import names, retries
from corral.cli.options import State, json_option, pass_state
from corral.cli.output import err
from corral.conversation import Conversation
from corral.router.v1 import router_pb2 as rt

_endpoint_option = click.option("--endpoint", "-e", default="",
                               help="Endpoint to route through (default DEFAULT).")


def _payload(data: str | None, raw: bool) -> tuple[bytes, str]:
    if data is None:
        data = sys.stdin.read() if not sys.stdin.isatty() else "{}"
    elif data.startswith("@"):
        data = Path(data[1:]).read_text()
    if raw:
        return data.encode(), "text/plain"
    try:
        json.loads(data)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc}); use --raw to send plain text",
                                 param_hint="--data") from None
    return data.encode(), "application/json"


class _Turn:
    """What one invocation's events said: who served it, its output, and how it ended. Output
    goes to the terminal as it arrives unless the command prints JSON."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.info = rt.InvocationInfo()
        self.completed = rt.InvocationCompleted()
        self.chunks: list[bytes] = []

    def take(self, event: rt.InvokeStreamResponse | rt.ConverseResponse) -> bool:
        """Takes one event of the turn; True when it was the one that ends it."""
        kind = event.WhichOneof("event")
        if kind == "started":
            if self.chunks and self.echo:
                # A retried stream starts over: what was shown came from a failed attempt.
                sys.stdout.write("\n")
                err.print("[yellow]connection lost; retried with the same request id[/yellow]")
            self.chunks = []
            self.info = event.started
        elif kind == "chunk":
            self.chunks.append(event.chunk.data)
            if self.echo:
                sys.stdout.write(event.chunk.data.decode(errors="replace"))
                sys.stdout.flush()
        elif kind == "completed":
            self.completed = event.completed
            return True
        return False

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def finish(self) -> None:
        """Ends the streamed output's line and says who served it, on stderr."""
        if self.echo:
            sys.stdout.write("\n")
            err.print(
                f"[dim]served by {self.info.version} · {self.info.session} · turn "
                f"{self.completed.turn} · {self.completed.duration_ms} ms · trace "
                f"{self.info.trace_id}{' · replayed (it had already run)' if self.info.replayed else ''}"
                "[/dim]"
            )


@click.command()
@click.argument("agent")
@_endpoint_option
@click.option("--version", "-v", default="",
              help="Explicit version for a new session (bypasses the endpoint).")
@click.option("--session", "-s", default="",
              help="Session id; a new session is created when omitted.")
@click.option("--data", "-d", help="Request body (JSON), @file, or stdin when omitted.")
@click.option("--raw", is_flag=True, help="Send --data as plain text, not JSON.")
@click.option("--request-id", default="",
              help="Request id (AIP-155), e.g. a UUID; a new one when omitted. Sending the same "
                   "request again under it returns its committed result instead of running it "
                   "twice.")
@json_option
@pass_state
def invoke(
    state: State, agent: str, endpoint: str, version: str, session: str, data: str | None,
    raw: bool, request_id: str,
) -> None:
    """Invoke AGENT; output streams to the terminal as it is produced. A call that fails with
    UNAVAILABLE (or a back-off request) is retried under the same request id, so it runs once."""
    payload, content_type = _payload(data, raw)
    turn = _Turn(echo=not state.json)
    for event in state.client.invoke_stream(agent, payload, endpoint=endpoint, version=version,
                                            session=session, content_type=content_type,
                                            request_id=request_id or retries.new_request_id()):
        turn.take(event)
    if state.json:
        info, completed = turn.info, turn.completed
        click.echo(json.dumps({
            "session": info.session, "invocation_id": info.invocation_id,
            "trace_id": info.trace_id, "endpoint": info.endpoint,
            "new_session": info.new_session, "turn": completed.turn,
            "duration_ms": completed.duration_ms, "output": turn.output,
            "chunks": len(turn.chunks), "version": info.version, "replayed": info.replayed,
        }, indent=2))
    else:
        turn.finish()


@click.command()
@click.argument("agent")
@_endpoint_option
@click.option("--version", "-v", default="", help="Explicit version for the session.")
@click.option("--session", "-s", default="", help="Continue this session instead of starting one.")
@json_option
@pass_state
def chat(state: State, agent: str, endpoint: str, version: str, session: str) -> None:
    """An interactive conversation with AGENT: every turn over one bidirectional stream.
    Each line you type is sent as {"text": line}; an empty line or Ctrl-D ends it."""
    conversation = Conversation(
        state.client.converse,
        rt.ConverseStart(agent=names.agent_name(agent), endpoint=endpoint, version=version,
                         session_id=session),
        state.client.retry_policy,
    )
    interactive = sys.stdin.isatty() and not state.json
    transcript: list[dict[str, object]] = []
    try:
        while True:
            if interactive:
                err.print("[bold]you>[/bold] ", end="")
            line = sys.stdin.readline()
            if not line.strip():
                break
            if interactive:
                err.print("[bold]agent>[/bold] ", end="")
            turn = _Turn(echo=not state.json)
            for event in conversation.send(json.dumps({"text": line.strip()}).encode()):
                if turn.take(event):
                    turn.finish()
                    transcript.append({"session": turn.info.session, "version": turn.info.version,
                                       "turn": turn.completed.turn, "output": turn.output})
    finally:
        conversation.close()
    if state.json:
        click.echo(json.dumps(transcript, indent=2))


COMMANDS: tuple[click.Command, ...] = (invoke, chat)
