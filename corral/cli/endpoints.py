"""corral endpoints, endpoint get / set / delete: where an agent's new sessions are routed."""

from __future__ import annotations

import click

from corral import names
from corral.cli.options import State, confirm_deletion, json_option, pass_state, yes_option
from corral.cli.output import emit, emit_message, emit_rows, out, timestamp, traffic_text
from corral.client import parse_split


@click.command()
@click.argument("agent")
@json_option
@pass_state
def endpoints(state: State, agent: str) -> None:
    """List the endpoints of AGENT and their traffic."""
    emit_rows(
        state, state.client.endpoints(agent), ("endpoint", "traffic", "revision", "updated"),
        lambda e: (names.EndpointRef.parse(e.name).endpoint, traffic_text(e.traffic),
                   str(e.revision), timestamp(e.update_time)),
    )


@click.group()
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
def endpoint_set(
    state: State, agent: str, name: str, split: str | None, version: int | None, etag: str
) -> None:
    """Set the traffic of endpoint NAME (created if missing). Existing sessions keep their
    version."""
    if (split is None) == (version is None):
        raise click.UsageError("give exactly one of --split 1=90,2=10 or --version N")
    try:
        shares = parse_split(split) if split is not None else [(version or 0, 100.0)]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--split") from None
    e = state.client.set_endpoint(agent, name, shares, etag)
    emit_message(state, e, lambda: out.print(
        f"{e.name}: {traffic_text(e.traffic)} (revision {e.revision})"))


@endpoint.command("get")
@click.argument("agent")
@click.argument("name")
@json_option
@pass_state
def endpoint_get(state: State, agent: str, name: str) -> None:
    """Show endpoint NAME of AGENT."""
    e = state.client.get_endpoint(agent, name)
    emit_message(state, e, lambda: out.print(
        f"{e.name}: {traffic_text(e.traffic)} (revision {e.revision}, etag {e.etag})"))


@endpoint.command("delete")
@click.argument("agent")
@click.argument("name")
@click.option("--etag", default="", help="Only delete if the endpoint is still at this etag.")
@yes_option
@json_option
@pass_state
def endpoint_delete(state: State, agent: str, name: str, etag: str, yes: bool) -> None:
    """Delete endpoint NAME of AGENT (not DEFAULT). Sessions it routed keep their version."""
    endpoint = names.endpoint_name(agent, name)
    confirm_deletion(endpoint, yes)
    state.client.delete_endpoint(agent, name, etag)
    emit(state, {"deleted": endpoint}, lambda: out.print(f"deleted {endpoint}"))


COMMANDS: tuple[click.Command, ...] = (endpoints, endpoint)
