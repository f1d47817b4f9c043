"""The corral command: publish, route, invoke, chat, and look at sessions, traces and metrics.
Every command takes --json for scripts.

Each area's commands live in a module of their own, which lists them in COMMANDS; they are
added to the root group here, in one place, when this package is imported."""

from __future__ import annotations

import click
import grpc

from corral.bundle import BundleError
from corral.cli import (
    endpoints,
    experiments,
    invoking,
    keys,
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
from corral.strategy import StrategyError

AREAS = (publishing, endpoints, invoking, sessions, observability, sandboxes, rollouts,
         experiments, tools, keys)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--tenant", envvar="CORRAL_TENANT", help="Tenant to act as (default: default).")
@click.option("--user", envvar="CORRAL_USER", help="User to act as (default: your login).")
@click.option("--api-key", envvar="CORRAL_API_KEY", metavar="KEY",
              help="API key (crl_...) to call with; prefer the CORRAL_API_KEY variable, which "
                   "`ps` does not show. Default: .corral/admin.key for a platform on this machine.")
@click.option("--token", envvar="CORRAL_TOKEN", metavar="JWT",
              help="Identity provider token (a JWT) to call with, instead of an API key.")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, tenant: str | None, user: str | None,
        api_key: str | None, token: str | None) -> None:
    """Corral: a self-hosted runtime for AI agents."""
    state = ctx.ensure_object(State)
    state.json = state.json or as_json
    state.tenant, state.user = tenant, user
    state.api_key, state.token = api_key, token


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
