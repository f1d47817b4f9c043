"""corral tools: the tools your tenant's agents may call. Secrets are read from an environment
variable or a file, never from the command line (where `ps` and shell history would show them)."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.table import Table

from corral import names
from corral.cli.options import State, json_option, pass_state
from corral.cli.output import emit, emit_message, emit_rows, enum_label, out, timestamp
from corral.registry.v1 import tools_pb2 as pb
from corral.strategy import StrategyError, duration, parse_duration

KINDS = {"http": pb.TOOL_KIND_HTTP, "grpc": pb.TOOL_KIND_GRPC}
_KIND_HELP = "http: POST to a URL; grpc: corral.tools.v1.ToolService/Invoke."
_ADDRESS_HELP = "http(s)://... for http, host:port for grpc."

kind_option = click.option("--kind", type=click.Choice(sorted(KINDS)), help=_KIND_HELP)
address_option = click.option("--address", help=_ADDRESS_HELP)
timeout_option = click.option("--timeout",
                              help="How long one call may take, e.g. 10s (at most 300s).")
description_option = click.option("--description", help="What the tool does.")
secret_env_option = click.option("--secret-env", metavar="VAR",
                                 help="Take the tool's secret from environment variable VAR.")
secret_file_option = click.option(
    "--secret-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Take the tool's secret from this file (one trailing newline is dropped).")


def _timeout_text(tool: pb.Tool) -> str:
    return f"{tool.timeout.ToMilliseconds() / 1000:g}s"


def _secret(secret_env: str | None, secret_file: Path | None) -> str | None:
    """The secret the options name, or None when neither is given."""
    if secret_env and secret_file:
        raise click.UsageError("give at most one of --secret-env and --secret-file")
    if secret_env:
        value = os.environ.get(secret_env, "")
        if not value:
            raise click.BadParameter(f"environment variable {secret_env} is not set or empty",
                                     param_hint="--secret-env")
        return value
    if secret_file:
        text = secret_file.read_text()
        value = text.removesuffix("\n")
        value = value.removesuffix("\r")
        if not value:
            raise click.BadParameter(f"{secret_file} is empty", param_hint="--secret-file")
        return value
    return None


def _set_timeout(tool: pb.Tool, text: str) -> None:
    try:
        tool.timeout.CopyFrom(duration(parse_duration(text, "--timeout")))
    except StrategyError as exc:
        raise click.BadParameter(str(exc), param_hint="--timeout") from None


def _show(state: State, tool: pb.Tool) -> None:
    def human() -> None:
        t = Table.grid(padding=(0, 2))
        for label, value in (
            ("name", tool.name), ("kind", enum_label(pb.ToolKind, tool.kind).lower()),
            ("address", tool.address),
            ("timeout", _timeout_text(tool)), ("secret", "set" if tool.has_secret else "none"),
            ("description", tool.description or "-"), ("etag", tool.etag),
            ("updated", timestamp(tool.update_time)),
        ):
            t.add_row(label, value)
        out.print(t)

    emit_message(state, tool, human)


@click.group()
def tools() -> None:
    """Tools your agents may call (agent.toml [[tools]] names them), registered per tenant."""


@tools.command("create")
@click.argument("name")
@click.option("--kind", type=click.Choice(sorted(KINDS)), required=True, help=_KIND_HELP)
@click.option("--address", required=True, help=_ADDRESS_HELP)
@timeout_option
@secret_env_option
@secret_file_option
@description_option
@json_option
@pass_state
def tools_create(state: State, name: str, kind: str, address: str, timeout: str | None,
                 secret_env: str | None, secret_file: Path | None, description: str | None) -> None:
    """Register tool NAME for your tenant."""
    tool = pb.Tool(kind=KINDS[kind], address=address, description=description or "")
    if timeout:
        _set_timeout(tool, timeout)
    secret = _secret(secret_env, secret_file)
    if secret:
        tool.secret = secret
    _show(state, state.client.create_tool(name, tool))


@tools.command("list")
@json_option
@pass_state
def tools_list(state: State) -> None:
    """List your tenant's tools."""
    emit_rows(
        state, state.client.list_tools(),
        ("tool", "kind", "address", "timeout", "secret", "updated"),
        lambda tool: (names.ToolRef.parse(tool.name).tool,
                      enum_label(pb.ToolKind, tool.kind).lower(), tool.address,
                      _timeout_text(tool), "set" if tool.has_secret else "-",
                      timestamp(tool.update_time)),
    )


@tools.command("get")
@click.argument("name")
@json_option
@pass_state
def tools_get(state: State, name: str) -> None:
    """Show tool NAME (its secret is never shown, only whether it has one)."""
    _show(state, state.client.get_tool(names.ToolRef(name)))


@tools.command("update")
@click.argument("name")
@kind_option
@address_option
@timeout_option
@secret_env_option
@secret_file_option
@click.option("--clear-secret", is_flag=True, help="Remove the tool's secret.")
@description_option
@click.option("--etag", default="", help="Only apply if the tool is still at this etag.")
@json_option
@pass_state
def tools_update(state: State, name: str, kind: str | None, address: str | None,
                 timeout: str | None, secret_env: str | None, secret_file: Path | None,
                 clear_secret: bool, description: str | None, etag: str) -> None:
    """Change tool NAME: only the options given change."""
    tool = pb.Tool(name=names.ToolRef(name).name, etag=etag,
                   kind=KINDS[kind] if kind else pb.TOOL_KIND_UNSPECIFIED,
                   address=address or "", description=description or "")
    paths = [p for p, given in (("kind", kind is not None), ("address", address is not None),
                                ("description", description is not None)) if given]
    if timeout is not None:
        _set_timeout(tool, timeout)
        paths.append("timeout")
    secret = _secret(secret_env, secret_file)
    if secret is not None and clear_secret:
        raise click.UsageError("give either a new secret or --clear-secret, not both")
    if secret is not None or clear_secret:
        # "secret" in the mask with an empty secret removes it.
        tool.secret = secret or ""
        paths.append("secret")
    if not paths:
        raise click.UsageError("nothing to change: give --kind, --address, --timeout, "
                               "--description, --secret-env, --secret-file or --clear-secret")
    _show(state, state.client.update_tool(tool, paths))


@tools.command("delete")
@click.argument("name")
@click.option("--etag", default="", help="Only delete if the tool is still at this etag.")
@json_option
@pass_state
def tools_delete(state: State, name: str, etag: str) -> None:
    """Delete tool NAME. Agents that call it get NOT_FOUND from then on."""
    ref = names.ToolRef(name)
    state.client.delete_tool(ref, etag)
    emit(state, {"deleted": ref.name}, lambda: out.print(f"deleted {ref.name}"))


COMMANDS: tuple[click.Command, ...] = (tools,)
