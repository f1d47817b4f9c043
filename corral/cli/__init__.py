"""The corral command: publish, route, invoke, chat, and look at sessions, traces and metrics.
Every command takes --json for scripts.

Each area's commands live in a module of their own, which lists them in COMMANDS; they are
added to the root group here, in one place, when this package is imported."""

from __future__ import annotations

from pathlib import Path

import click
import grpc

from corral.bundle import BundleError
from corral.cli import (
    dev,
    endpoints,
    executors,
    experiments,
    invoking,
    keys,
    logs,
    observability,
    publishing,
    rollouts,
    sandboxes,
    sessions,
    tools,
)
from corral.cli.options import State
from corral.cli.output import local_failure, rpc_failure
from corral.manifest import ManifestError
from corral.profiles import ConnectionOptions
from corral.strategy import StrategyError

AREAS = (publishing, dev, endpoints, invoking, sessions, observability, logs, sandboxes, executors,
         rollouts, experiments, tools, keys)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="corral", prog_name="corral",
                      message="%(prog)s %(version)s",
                      help="Print the installed corral package's version and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--api-key", envvar="CORRAL_API_KEY", metavar="KEY",
              help="API key (crl_...) to call with; prefer the CORRAL_API_KEY variable, which "
                   "`ps` does not show. Default: .corral/admin.key for a platform on this machine.")
@click.option("--token", envvar="CORRAL_TOKEN", metavar="JWT",
              help="Identity provider token (a JWT) to call with, instead of an API key.")
@click.option("--profile", envvar="CORRAL_PROFILE", metavar="NAME",
              help="Connection profile from ~/.config/corral/config.toml (CORRAL_CONFIG).")
@click.option("--address", metavar="HOST:PORT",
              help="Call every service at this address (a platform's edge).")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Verify the platform's TLS certificate with this CA (PEM); implies --tls.")
@click.option("--tls/--no-tls", default=None, help="Use TLS (default: as the profile says, else no).")
@click.pass_context
def cli(ctx: click.Context, as_json: bool,
        api_key: str | None, token: str | None,
        profile: str | None, address: str | None, ca: Path | None, tls: bool | None) -> None:
    """Corral: a self-hosted runtime for AI agents."""
    state = ctx.ensure_object(State)
    state.json = state.json or as_json
    state.api_key, state.token = api_key, token
    state.connection = ConnectionOptions(profile, address, ca, tls)


for _area in AREAS:
    for _command in _area.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except grpc.RpcError as exc:
        rpc_failure(exc)
    except (BundleError, ManifestError, StrategyError, OSError) as exc:
        local_failure(exc)


__all__ = ["State", "cli", "main"]
