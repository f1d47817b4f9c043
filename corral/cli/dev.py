"""corral dev: publish a directory, point an endpoint at it, and again on every change, showing
the invocations the served version answers, until Ctrl-C."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import ParamSpec, TypeVar

import click
import grpc
from rich.text import Text

from corral import names
from corral.bundle import BundleError, Target, inspect
from corral.cli.logs import log_line
from corral.cli.options import State, json_option, pass_state
from corral.cli.output import out, rpc_error, session_id, to_dict
from corral.cli.publishing import bundle_directory, target_options
from corral.client import CorralClient
from corral.dev.loop import (
    Build,
    Changed,
    DevEvent,
    DevFailure,
    DevLoop,
    Failed,
    Published,
    Routed,
    Tail,
    Unchanged,
    Watching,
    no_tail,
)
from corral.dev.syntax import syntax_error
from corral.dev.watch import scan
from corral.manifest import ManifestError
from corral.telemetry.v1 import telemetry_pb2 as tel

P = ParamSpec("P")
R = TypeVar("R")
TRACE_POLL_SECONDS = 1.0
TRACES_PER_POLL = 20
LOG_POLL_SECONDS = 1.0
LOGS_PER_POLL = 500
# What a `changed:` line lists before it says how many more.
_SHOWN_PATHS = 3


class ClientPlatform:
    """The dev loop's platform: packs the directory as `corral publish` does (after checking that
    its Python compiles) and calls the registry through the command's client, off the loop."""

    def __init__(self, client: CorralClient, directory: Path, target: Target) -> None:
        self._client = client
        self._directory = directory
        self._target = target
        # This interpreter can only judge the syntax of the Python it is.
        self._check_syntax = target.python_version == Target.current().python_version

    def _build(self) -> Build:
        broken = syntax_error(self._directory, scan(self._directory)) if self._check_syntax else None
        if broken is not None:
            raise DevFailure(broken)
        try:
            data = bundle_directory(self._directory, self._target)
            checked = inspect(data)
        except (BundleError, ManifestError, OSError) as exc:
            raise DevFailure(str(exc)) from None
        return Build(data, checked.digest, checked.manifest.name)

    async def build(self) -> Build:
        return await asyncio.to_thread(self._build)

    async def publish(self, build: Build) -> names.VersionRef:
        version = await _call(self._client.publish_bundle, build.data)
        return names.VersionRef.parse(version.name)

    async def route(self, endpoint: names.EndpointRef, version: names.VersionRef) -> None:
        await _call(self._client.set_endpoint, endpoint.agent, endpoint.endpoint,
                    [(version.number, 100.0)])


async def _call(method: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    try:
        return await asyncio.to_thread(method, *args, **kwargs)
    except grpc.RpcError as exc:
        code, details = rpc_error(exc)
        raise DevFailure(f"{code}: {details}") from None


def trace_tail(client: CorralClient, show: Callable[[tel.TraceSummary], None]) -> Tail:
    """Shows each invocation of the served version once its trace reaches telemetry. Those
    already there when the version is served (it served before) are not shown: the first poll,
    made at once, only takes note of them."""

    async def recent(span_filter: tel.SpanFilter) -> list[tel.TraceSummary]:
        try:
            return await _call(client.traces, span_filter, TRACES_PER_POLL)
        except DevFailure:
            return []  # telemetry restarting: asked again at the next poll

    async def tail(version: names.VersionRef) -> None:
        span_filter = tel.SpanFilter(agent=version.parent.name, version=version.name)
        shown = {trace.trace_id for trace in await recent(span_filter)}
        while True:
            await asyncio.sleep(TRACE_POLL_SECONDS)
            for trace in reversed(await recent(span_filter)):  # oldest first
                if trace.trace_id not in shown:
                    shown.add(trace.trace_id)
                    show(trace)

    return tail


def log_tail(client: CorralClient, show: Callable[[tel.LogRecord], None]) -> Tail:
    """Shows what the served version prints and logs from the moment it is served, as `corral
    logs --follow` would."""

    async def tail(version: names.VersionRef) -> None:
        request = tel.ListLogsRequest(agent=version.parent.name, version=version.name,
                                      page_size=LOGS_PER_POLL)
        request.start_time.FromDatetime(datetime.now(UTC))
        while True:
            try:
                page = await _call(client.logs, request)
            except DevFailure:  # telemetry restarting: asked again at the next poll
                await asyncio.sleep(LOG_POLL_SECONDS)
                continue
            for record in page.records:
                show(record)
            request.page_token = page.next_page_token or page.follow_token
            if not page.next_page_token:
                await asyncio.sleep(LOG_POLL_SECONDS)

    return tail


def both(*tails: Tail) -> Tail:
    """The tails side by side."""

    async def tail(version: names.VersionRef) -> None:
        await asyncio.gather(*(each(version) for each in tails))

    return tail


# -- one line per event ----------------------------------------------------------------------


def _paths_text(paths: tuple[str, ...]) -> str:
    more = len(paths) - _SHOWN_PATHS
    return ", ".join(paths[:_SHOWN_PATHS]) + (f" and {more} more" if more > 0 else "")


def _event_text(event: DevEvent) -> Text:
    match event:
        case Watching(directory, endpoint):
            return Text(f"watching {directory} for changes; endpoint {endpoint} follows each "
                        "new version (Ctrl-C to stop)")
        case Changed(paths):
            return Text(f"changed: {_paths_text(paths)}")
        case Published(version, digest):
            return Text(f"published version {version.number} of {version.agent} "
                        f"({digest[:19]}…)", style="green")
        case Routed(endpoint, version):
            return Text(f"{endpoint.endpoint} -> version {version.number}", style="bold")
        case Unchanged(version):
            return Text(f"unchanged: the same bytes as version {version.number}, nothing published")
        case Failed(message, serving):
            stays = f" (still on version {serving.number})" if serving else ""
            return Text.assemble(("error: ", "red"), message + stays)


def _event_json(event: DevEvent) -> dict[str, object]:
    match event:
        case Watching(directory, endpoint):
            return {"event": "watching", "directory": str(directory), "endpoint": endpoint}
        case Changed(paths):
            return {"event": "changed", "paths": list(paths)}
        case Published(version, digest):
            return {"event": "published", "version": version.name, "digest": digest}
        case Routed(endpoint, version):
            return {"event": "routed", "endpoint": endpoint.name, "version": version.name}
        case Unchanged(version):
            return {"event": "unchanged", "version": version.name}
        case Failed(message, serving):
            return {"event": "error", "message": message,
                    "version": serving.name if serving else None}


def _reporter(state: State) -> Callable[[DevEvent], None]:
    if state.json:
        return lambda event: click.echo(json.dumps(_event_json(event)))
    # Not wrapped at the terminal's width: one event, one line, whatever its length.
    return lambda event: out.print(_event_text(event), soft_wrap=True)


def _trace_shower(state: State) -> Callable[[tel.TraceSummary], None]:
    def show(trace: tel.TraceSummary) -> None:
        status = "error" if trace.status == tel.SPAN_STATUS_ERROR else "ok"
        if state.json:
            click.echo(json.dumps({"event": "invocation", "trace": trace.trace_id,
                                   "version": trace.version, "session": trace.session,
                                   "duration_ms": trace.duration_ms, "status": status}))
        else:
            out.print(Text(f"  invocation · {session_id(trace.session)} · "
                           f"{trace.duration_ms:.0f} ms · {status} · trace {trace.trace_id}",
                           style="red" if status == "error" else "dim"), soft_wrap=True)

    return show


def _log_shower(state: State) -> Callable[[tel.LogRecord], None]:
    def show(record: tel.LogRecord) -> None:
        if state.json:
            click.echo(json.dumps({"event": "log", **to_dict(record)}))
        else:
            out.print(Text("  " + log_line(record)), soft_wrap=True)

    return show


def _agent_id(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not names.valid_agent_id(value):
        raise click.BadParameter(f"{value!r} {names.AGENT_IDS.rule}")
    return value


def _endpoint_id(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not names.valid_endpoint_id(value):
        raise click.BadParameter(f"{value!r} {names.ENDPOINT_IDS.rule}")
    if value == "DEFAULT":
        raise click.BadParameter("DEFAULT always serves the newest version and cannot be set; "
                                 "name another endpoint")
    return value


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--agent", callback=_agent_id,
              help="Refuse to publish unless agent.toml names this agent (default: the agent "
                   "agent.toml names at the start).")
@click.option("--endpoint", default="dev", show_default=True, callback=_endpoint_id,
              help="The endpoint sent to each new version (created if missing).")
@click.option("--traces/--no-traces", default=True, show_default=True,
              help="Show each invocation the served version answers.")
@click.option("--logs/--no-logs", default=True, show_default=True,
              help="Show what the served version prints and logs (as `corral logs --follow`).")
@target_options
@json_option
@pass_state
def dev(
    state: State, directory: Path, agent: str | None, endpoint: str, traces: bool, logs: bool,
    target: Target,
) -> None:
    """Publish DIRECTORY, point the endpoint at the new version, and do it again each time a
    file in it changes, until Ctrl-C. Unchanged bytes publish nothing; a publish that fails (a bad
    agent.toml, a syntax error) leaves the endpoint on the last good version. Under --json, one
    JSON object per line and event."""
    client = state.client
    tails = [*([log_tail(client, _log_shower(state))] if logs else []),
             *([trace_tail(client, _trace_shower(state))] if traces else [])]
    loop = DevLoop(directory, endpoint, ClientPlatform(client, directory, target),
                   _reporter(state), agent=agent, tail=both(*tails) if tails else no_tail)
    try:
        asyncio.run(loop.run())
    except KeyboardInterrupt:
        # Ctrl-C is how the loop ends: not a failure.
        if state.json:
            click.echo(json.dumps({"event": "stopped"}))
        else:
            out.print("stopped")
    finally:
        client.close()


COMMANDS: tuple[click.Command, ...] = (dev,)
