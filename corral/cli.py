"""The corral command: publish, route, invoke, chat, and look at sessions, traces and metrics.
Every command takes --json for scripts."""

from __future__ import annotations

import json
import queue
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from corral import names
from corral.bundle import LIMITS, BundleError, Target, check_size, pack, stage, unpacked_size
from corral.client import CorralClient, parse_split
from corral.config import ClientConfig
from corral.manifest import ManifestError
from corral.router.v1 import router_pb2 as rt
from corral.strategy import StrategyError
from corral.telemetry.v1 import telemetry_pb2 as tel

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


class State:
    def __init__(self) -> None:
        self.json = False
        self.tenant: str | None = None
        self.user: str | None = None
        self._client: CorralClient | None = None

    @property
    def client(self) -> CorralClient:
        if self._client is None:
            self._client = CorralClient(ClientConfig.from_env(tenant=self.tenant, user=self.user))
        return self._client


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(State).json = True


json_option = click.option(
    "--json", "as_json", is_flag=True, expose_value=False, callback=_set_json, is_eager=True,
    help="Print machine-readable JSON.",
)


def emit(state: State, data: Any, human: Callable[[], None]) -> None:
    if state.json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        human()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--tenant", envvar="CORRAL_TENANT", help="Tenant to act as (default: default).")
@click.option("--user", envvar="CORRAL_USER", help="User to act as (default: your login).")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, tenant: str | None, user: str | None) -> None:
    """Corral: a self-hosted runtime for AI agents."""
    state = ctx.ensure_object(State)
    state.json = state.json or as_json
    state.tenant, state.user = tenant, user


pass_state = click.make_pass_decorator(State, ensure=True)


# -- agents and versions ------------------------------------------------------------------

def _target(python_version: str | None, platforms: tuple[str, ...]) -> Target:
    current = Target.current()
    if python_version is not None and not re.fullmatch(r"3\.\d{1,2}", python_version):
        raise click.BadParameter(f"{python_version!r} must look like 3.11",
                                 param_hint="--python-version")
    return Target(python_version or current.python_version, platforms or current.platforms)


@cli.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--python-version", help="The executor's Python, e.g. 3.11 (default: this one).")
@click.option("--platform", "platforms", multiple=True,
              help="The executor's pip platform tag, e.g. manylinux2014_x86_64; repeatable "
                   "(default: this machine's).")
@json_option
@pass_state
def publish(
    state: State, directory: Path, python_version: str | None, platforms: tuple[str, ...]
) -> None:
    """Pack DIRECTORY (with its agent.toml) and publish it as a new version.
    Dependencies it declares (agent.toml `dependencies` or requirements.txt) are installed into
    the bundle's deps/ first, so a sandbox needs no network. Publishing the same bytes again
    returns the existing version."""
    target = _target(python_version, platforms)
    try:
        with tempfile.TemporaryDirectory(prefix="corral-publish-") as work:
            root = stage(directory, Path(work), target, lambda line: err.print(line, markup=False))
            data = pack(root)
            # Refused here, before uploading, with both sizes; the registry checks again.
            check_size(len(data), unpacked_size(data), LIMITS)
            v = state.client.publish(root)
    except (BundleError, ManifestError) as exc:
        raise click.ClickException(str(exc)) from None
    emit(state, {"name": v.name, "number": v.number, "digest": v.digest, "size_bytes": v.size_bytes},
         lambda: out.print(f"{v.name}  {v.digest}"))


@cli.command()
@json_option
@pass_state
def agents(state: State) -> None:
    """List agents."""
    rows = state.client.agents()

    def human() -> None:
        t = Table("agent", "latest version", "created")
        for a in rows:
            t.add_row(a.name, a.latest_version or "-", a.create_time.ToDatetime().isoformat(timespec="seconds"))
        out.print(t)

    emit(state, [to_dict(a) for a in rows], human)


@cli.command()
@click.argument("agent")
@json_option
@pass_state
def versions(state: State, agent: str) -> None:
    """List the versions of AGENT."""
    rows = state.client.versions(agent)

    def human() -> None:
        t = Table("version", "digest", "model", "size", "created", "by")
        for v in rows:
            t.add_row(str(v.number), v.digest[:19] + "…", f"{v.manifest.model_provider}/{v.manifest.model_id}",
                      f"{v.size_bytes:,}", v.create_time.ToDatetime().isoformat(timespec="seconds"), v.creator)
        out.print(t)

    emit(state, [to_dict(v) for v in rows], human)


def _split_text(ep: Any) -> str:
    return ", ".join(f"v{names.parse_version(t.version).number}={t.percent:g}%" for t in ep.traffic)


@cli.command()
@click.argument("agent")
@json_option
@pass_state
def endpoints(state: State, agent: str) -> None:
    """List the endpoints of AGENT and their traffic."""
    rows = state.client.endpoints(agent)

    def human() -> None:
        t = Table("endpoint", "traffic", "revision", "updated")
        for e in rows:
            t.add_row(names.parse_endpoint(e.name)[1], _split_text(e), str(e.revision),
                      e.update_time.ToDatetime().isoformat(timespec="seconds"))
        out.print(t)

    emit(state, [to_dict(e) for e in rows], human)


@cli.group()
def endpoint() -> None:
    """Show or change one endpoint."""


@endpoint.command("set")
@click.argument("agent")
@click.argument("name")
@click.option("--split", help="Traffic by version, in percent: 1=90,2=10.")
@click.option("--version", "version", type=int, help="Send all new sessions to this version.")
@click.option("--etag", default="", help="Only apply if the endpoint is still at this etag.")
@json_option
@pass_state
def endpoint_set(state: State, agent: str, name: str, split: str | None, version: int | None, etag: str) -> None:
    """Set the traffic of endpoint NAME (created if missing). Existing sessions keep their version."""
    if (split is None) == (version is None):
        raise click.UsageError("give exactly one of --split 1=90,2=10 or --version N")
    try:
        shares = parse_split(split) if split is not None else [(version or 0, 100.0)]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--split") from None
    e = state.client.set_endpoint(agent, name, shares, etag)
    emit(state, to_dict(e), lambda: out.print(f"{e.name}: {_split_text(e)} (revision {e.revision})"))


@endpoint.command("get")
@click.argument("agent")
@click.argument("name")
@json_option
@pass_state
def endpoint_get(state: State, agent: str, name: str) -> None:
    """Show endpoint NAME of AGENT."""
    e = state.client.get_endpoint(agent, name)
    emit(state, to_dict(e), lambda: out.print(f"{e.name}: {_split_text(e)} (revision {e.revision}, etag {e.etag})"))


# -- invoking -----------------------------------------------------------------------------

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
        raise click.BadParameter(f"not valid JSON ({exc}); use --raw to send plain text", param_hint="--data")
    return data.encode(), "application/json"


def _info_line(info: rt.InvocationInfo, completed: rt.InvocationCompleted) -> str:
    return (f"served by {info.version} · {info.session} · turn {completed.turn} · "
            f"{completed.duration_ms} ms · trace {info.trace_id}")


@cli.command()
@click.argument("agent")
@click.option("--endpoint", "-e", default="", help="Endpoint to route through (default DEFAULT).")
@click.option("--version", "-v", default="", help="Explicit version for a new session (bypasses the endpoint).")
@click.option("--session", "-s", default="", help="Session id; a new session is created when omitted.")
@click.option("--data", "-d", help="Request body (JSON), @file, or stdin when omitted.")
@click.option("--raw", is_flag=True, help="Send --data as plain text, not JSON.")
@json_option
@pass_state
def invoke(state: State, agent: str, endpoint: str, version: str, session: str, data: str | None, raw: bool) -> None:
    """Invoke AGENT; output streams to the terminal as it is produced."""
    payload, content_type = _payload(data, raw)
    info, completed = rt.InvocationInfo(), rt.InvocationCompleted()
    chunks: list[bytes] = []
    for event in state.client.invoke_stream(agent, payload, endpoint=endpoint, version=version,
                                           session=session, content_type=content_type):
        kind = event.WhichOneof("event")
        if kind == "started":
            info = event.started
        elif kind == "chunk":
            chunks.append(event.chunk.data)
            if not state.json:
                sys.stdout.write(event.chunk.data.decode(errors="replace"))
                sys.stdout.flush()
        elif kind == "completed":
            completed = event.completed
    if state.json:
        click.echo(json.dumps({
            "session": info.session, "invocation_id": info.invocation_id, "trace_id": info.trace_id,
            "endpoint": info.endpoint, "new_session": info.new_session, "turn": completed.turn,
            "duration_ms": completed.duration_ms, "output": b"".join(chunks).decode(errors="replace"),
            "chunks": len(chunks), "version": info.version,
        }, indent=2))
    else:
        sys.stdout.write("\n")
        err.print(f"[dim]{_info_line(info, completed)}[/dim]")


@cli.command()
@click.argument("agent")
@click.option("--endpoint", "-e", default="", help="Endpoint to route through (default DEFAULT).")
@click.option("--version", "-v", default="", help="Explicit version for the session.")
@click.option("--session", "-s", default="", help="Continue this session instead of starting one.")
@json_option
@pass_state
def chat(state: State, agent: str, endpoint: str, version: str, session: str) -> None:
    """An interactive conversation with AGENT: every turn over one bidirectional stream.
    Each line you type is sent as {"text": line}; an empty line or Ctrl-D ends it."""
    turns: queue.Queue[rt.ConverseRequest | None] = queue.Queue()
    start = rt.ConverseStart(agent=names.agent_name(agent), endpoint=endpoint, version=version, session_id=session)

    def requests() -> Iterator[rt.ConverseRequest]:
        yield rt.ConverseRequest(start=start)
        while (item := turns.get()) is not None:
            yield item

    responses = state.client.converse(requests())
    interactive = sys.stdin.isatty() and not state.json
    transcript: list[dict[str, Any]] = []
    try:
        while True:
            if interactive:
                err.print("[bold]you>[/bold] ", end="")
            line = sys.stdin.readline()
            if not line.strip():
                break
            turns.put(rt.ConverseRequest(turn=rt.Turn(payload=json.dumps({"text": line.strip()}).encode(),
                                                      content_type="application/json")))
            info, text = rt.InvocationInfo(), []
            if interactive:
                err.print("[bold]agent>[/bold] ", end="")
            for event in responses:
                kind = event.WhichOneof("event")
                if kind == "started":
                    info = event.started
                elif kind == "chunk":
                    text.append(event.chunk.data.decode(errors="replace"))
                    if not state.json:
                        sys.stdout.write(text[-1])
                        sys.stdout.flush()
                elif kind == "completed":
                    if not state.json:
                        sys.stdout.write("\n")
                        err.print(f"[dim]{_info_line(info, event.completed)}[/dim]")
                    transcript.append({"session": info.session, "version": info.version,
                                       "turn": event.completed.turn, "output": "".join(text)})
                    break
    finally:
        turns.put(None)
    if state.json:
        click.echo(json.dumps(transcript, indent=2))


# -- sessions, traces, metrics, audit ------------------------------------------------------

@cli.group()
def sessions() -> None:
    """List, show and stop sessions."""


@sessions.command("list")
@click.option("--agent", default="", help="Only sessions of this agent.")
@click.option("--version", "version", default="", help="Only sessions pinned to this version number.")
@click.option("--limit", default=50, show_default=True)
@json_option
@pass_state
def sessions_list(state: State, agent: str, version: str, limit: int) -> None:
    """List your tenant's sessions, newest first."""
    agent_name = names.agent_name(agent) if agent else ""
    version_name = names.version_name(agent, int(version)) if agent and version.isdigit() else version
    rows = state.client.list_sessions(agent_name, version_name, limit)

    def human() -> None:
        t = Table("session", "version", "status", "turns", "user", "last active")
        for s in rows:
            t.add_row(s.name.removeprefix("sessions/"), _short_version(s.version), _status(s.status),
                      str(s.turn_count), s.user, s.last_active_time.ToDatetime().isoformat(timespec="seconds"))
        out.print(t)

    emit(state, [to_dict(s) for s in rows], human)


def _short_version(version: str) -> str:
    """agents/a/versions/2 → a v2, for narrow tables."""
    try:
        ref = names.parse_version(version)
    except names.ResourceNameError:
        return version
    return f"{ref.agent} v{ref.number}"


def _span_status(value: int) -> str:
    # OpenTelemetry leaves successful spans UNSET; to a reader that is "ok".
    return "error" if value == tel.SPAN_STATUS_ERROR else "ok"


def _status(value: int) -> str:
    from corral.sessions.v1 import sessions_pb2

    return sessions_pb2.SessionStatus.Name(value).removeprefix("SESSION_STATUS_").lower()


@sessions.command("get")
@click.argument("session")
@json_option
@pass_state
def sessions_get(state: State, session: str) -> None:
    """Show SESSION and its state."""
    s = state.client.get_session(session)
    st = state.client.session_state(session)
    data = {**to_dict(s), "state": json.loads(st.state) if st.state else None}
    emit(state, data, lambda: out.print_json(json.dumps(data, default=str)))


@sessions.command("stop")
@click.argument("session")
@json_option
@pass_state
def sessions_stop(state: State, session: str) -> None:
    """Stop SESSION now: its sandbox is torn down, later invocations are refused."""
    state.client.stop_session(session)
    emit(state, {"stopped": names.session_name(session)}, lambda: out.print(f"stopped sessions/{session}"))


def _filter(agent: str, version: str, endpoint: str, session: str, trace: str, errors: bool) -> tel.SpanFilter:
    f = tel.SpanFilter(trace_id=trace, errors_only=errors)
    if agent:
        f.agent = names.agent_name(agent)
        if version:
            f.version = names.version_name(agent, int(version)) if version.isdigit() else version
        if endpoint:
            f.endpoint = names.endpoint_name(agent, endpoint)
    if session:
        f.session = names.session_name(session)
    return f


@cli.command()
@click.option("--agent", default="")
@click.option("--version", "version", default="", help="Version number (needs --agent).")
@click.option("--endpoint", default="", help="Endpoint id (needs --agent).")
@click.option("--session", default="")
@click.option("--errors", is_flag=True, help="Only failed invocations.")
@click.option("--limit", default=20, show_default=True)
@json_option
@pass_state
def traces(state: State, agent: str, version: str, endpoint: str, session: str, errors: bool, limit: int) -> None:
    """Recent invocations' traces, newest first."""
    if (version or endpoint) and not agent:
        raise click.UsageError("--version and --endpoint need --agent")
    rows = state.client.traces(_filter(agent, version, endpoint, session, "", errors), limit)

    def human() -> None:
        t = Table("trace", "started", "version", "session", "ms", "status", "spans")
        for r in rows:
            t.add_row(r.trace_id, r.start_time.ToDatetime().strftime("%H:%M:%S"), _short_version(r.version),
                      r.session.removeprefix("sessions/"), f"{r.duration_ms:.1f}", _span_status(r.status),
                      str(r.span_count))
        out.print(t)

    emit(state, [to_dict(r) for r in rows], human)


@cli.command()
@click.argument("trace_id")
@json_option
@pass_state
def spans(state: State, trace_id: str) -> None:
    """The spans of one trace."""
    rows = state.client.spans(tel.SpanFilter(trace_id=trace_id), 1000)

    def human() -> None:
        t = Table("span", "service", "ms", "status", "parent")
        for r in sorted(rows, key=lambda r: r.start_time.ToNanoseconds()):
            t.add_row(r.name, r.service, f"{r.duration_ms:.2f}", _span_status(r.status), r.parent_span_id or "-")
        out.print(t)

    emit(state, [to_dict(r) for r in rows], human)


@cli.command()
@click.argument("agent")
@json_option
@pass_state
def metrics(state: State, agent: str) -> None:
    """Per-version invocations, errors, latency percentiles, tool calls and tokens of AGENT."""
    rows = state.client.metrics(agent)

    def human() -> None:
        t = Table("version", "calls", "errors", "err %", "sessions", "p50 ms", "p95 ms", "p99 ms",
                  "tool calls", "tool fail %", "tokens in/out", "cost $")
        for m in rows:
            t.add_row(_short_version(m.version), str(m.invocations), str(m.errors), f"{m.error_rate:.1%}", str(m.sessions),
                      f"{m.latency_p50_ms:.1f}", f"{m.latency_p95_ms:.1f}", f"{m.latency_p99_ms:.1f}",
                      str(m.tool_calls), f"{m.tool_failure_rate:.1%}", f"{m.input_tokens}/{m.output_tokens}",
                      f"{m.cost_usd:.4f}" + ("*" if m.unpriced_models else ""))
        out.print(t)

    emit(state, [to_dict(m) | {"latency_p50_ms": m.latency_p50_ms, "latency_p95_ms": m.latency_p95_ms,
                                "latency_p99_ms": m.latency_p99_ms} for m in rows], human)


@cli.command()
@json_option
@pass_state
def sandboxes(state: State) -> None:
    """The executor's sandboxes (session, version, state, age, memory) and its warm pools."""
    listing = state.client.sandboxes()

    def human() -> None:
        t = Table("session", "version", "state", "age", "memory MiB", "cpu s", "pid", "driver")
        for sb in listing.sandboxes:
            state_name = sb.State.Name(sb.state).removeprefix("STATE_").lower()
            t.add_row(sb.session or "-", _short_version(sb.version), state_name,
                      f"{sb.age.ToTimedelta().total_seconds():.0f}s", f"{sb.memory_bytes / 2**20:.1f}",
                      f"{sb.cpu_seconds:.1f}", str(sb.pid), sb.driver)
        out.print(t)
        p = Table("warm pool", "ready", "target", "hits", "misses", "why")
        for pool in listing.pools:
            p.add_row(_short_version(pool.version), str(pool.ready), str(pool.target), str(pool.hits),
                      str(pool.misses), ", ".join(pool.reasons) or "-")
        out.print(p)

    emit(state, to_dict(listing), human)


@cli.command()
@click.option("--resource", default="", help="Only changes to this resource (name prefix).")
@click.option("--limit", default=50, show_default=True)
@json_option
@pass_state
def audit(state: State, resource: str, limit: int) -> None:
    """Who changed what, when: newest first."""
    rows = state.client.audit(resource, limit)

    def human() -> None:
        t = Table("time", "who", "what", "resource", "details")
        for e in rows:
            t.add_row(e.time.ToDatetime().isoformat(timespec="seconds"), f"{e.user}@{e.tenant}", e.method,
                      e.resource, json.dumps(json_format.MessageToDict(e.details)))
        out.print(t)

    emit(state, [to_dict(e) for e in rows], human)


def main() -> None:
    import corral.cli_experiments
    import corral.cli_rollouts  # noqa: F401 - registers the rollout commands on `cli`
    from corral.cli_tools import tools

    cli.add_command(tools)

    try:
        cli(standalone_mode=True)
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"  # type: ignore[union-attr]
        details = exc.details() if hasattr(exc, "details") else str(exc)  # type: ignore[union-attr]
        if code == "UNAVAILABLE":
            details += " (is the platform running? start it with `make run`)"
        if "--json" in sys.argv:
            click.echo(json.dumps({"error": {"code": code, "message": details}}))
        else:
            err.print(f"[red]error:[/red] {code}: {details}")
        sys.exit(1)
    except (BundleError, ManifestError, StrategyError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(1)
