"""corral logs: what an agent printed and logged while it ran, oldest first, and as it comes with
--follow."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import click

from corral import names
from corral.cli.options import State, json_option, pass_state
from corral.cli.output import out, session_id, to_dict
from corral.telemetry.v1 import telemetry_pb2 as tel

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
# How often --follow asks for what arrived since.
POLL_S = 1.0
_PAGE = 500


def since_time(value: str, now: datetime) -> datetime:
    """--since 10m (s, m, h, d): that long before `now`."""
    match = _DURATION.match(value.strip())
    if match is None:
        raise click.BadParameter(f"{value!r} is not a duration such as 30s, 10m, 2h or 1d",
                                 param_hint="--since")
    return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def log_line(r: tel.LogRecord) -> str:
    """One record as a terminal line: time, version, session, invocation, level, source, text."""
    when = r.time.ToDatetime(tzinfo=UTC).astimezone().strftime("%H:%M:%S.%f")[:-3]
    version = r.version.rsplit("/", 1)[-1]
    return (f"{when} v{version} {session_id(r.session)} {r.invocation_id[:8]} "
            f"{r.severity_text or '-':5} {r.source}: {r.body}")


def _records(
    state: State, request: tel.ListLogsRequest, follow: bool
) -> Iterator[tel.LogRecord]:
    """Every page; with `follow`, then what arrives later, until Ctrl-C."""
    while True:
        page = state.client.logs(request)
        yield from page.records
        if page.next_page_token:
            request.page_token = page.next_page_token
            continue
        if not follow:
            return
        request.page_token = page.follow_token
        time.sleep(POLL_S)


@click.command()
@click.argument("agent")
@click.option("--version", "version", default="", help="Only this version's (a number).")
@click.option("--session", default="", help="Only this session's.")
@click.option("--invocation", default="", help="Only this invocation's (its id).")
@click.option("--since", default="", help="Only the last 30s, 10m, 2h, 1d...")
@click.option("--follow", "-f", is_flag=True, help="Keep printing what arrives, until Ctrl-C.")
@json_option
@pass_state
def logs(
    state: State, agent: str, version: str, session: str, invocation: str, since: str,
    follow: bool,
) -> None:
    """What AGENT's code printed (stdout, stderr) and logged, oldest first, each line with its
    version, session and invocation."""
    ref = names.AgentRef(agent.removeprefix("agents/"))
    request = tel.ListLogsRequest(agent=ref.name, invocation_id=invocation, page_size=_PAGE)
    if version:
        request.version = ref.version(int(version)).name if version.isdigit() else version
    if session:
        request.session = names.session_name(session)
    if since:
        request.start_time.FromDatetime(since_time(since, datetime.now(UTC)))
    records = _records(state, request, follow)
    try:
        if state.json and not follow:
            click.echo(json.dumps([to_dict(r) for r in records], indent=2))
            return
        for r in records:
            if state.json:  # one object a line, as they come
                click.echo(json.dumps(to_dict(r)))
            else:
                out.print(log_line(r), markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        return


COMMANDS: tuple[click.Command, ...] = (logs,)
