"""corral publish, agents, versions: agent bundles in, versions out."""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import click

from corral import names
from corral.bundle import LIMITS, BundleError, Target, check_size, pack, stage, unpacked_size
from corral.cli.options import (
    ListingGroup,
    State,
    confirm_deletion,
    json_option,
    pass_state,
    yes_option,
)
from corral.cli.output import emit, emit_rows, err, out, timestamp
from corral.manifest import ManifestError


def _target(python_version: str | None, platforms: tuple[str, ...]) -> Target:
    current = Target.current()
    if python_version is not None and not re.fullmatch(r"3\.\d{1,2}", python_version):
        raise click.BadParameter(f"{python_version!r} must look like 3.11",
                                 param_hint="--python-version")
    return Target(python_version or current.python_version, platforms or current.platforms)


def target_options(command: Callable[..., None]) -> Callable[..., None]:
    """--python-version and --platform, for a command that packs a directory: the decorated
    function takes the Target they make as `target`."""

    @functools.wraps(command)
    def with_target(
        *args: object, python_version: str | None, platforms: tuple[str, ...], **values: object
    ) -> None:
        command(*args, target=_target(python_version, platforms), **values)

    made = click.option(
        "--platform", "platforms", multiple=True,
        help="The executor's pip platform tag, e.g. manylinux2014_x86_64; repeatable "
             "(default: this machine's).")(with_target)
    return click.option(
        "--python-version", help="The executor's Python, e.g. 3.11 (default: this one).")(made)


def bundle_directory(directory: Path, target: Target) -> bytes:
    """The bundle's bytes, packed once: what is measured is what is uploaded."""
    with tempfile.TemporaryDirectory(prefix="corral-publish-") as work:
        root = stage(directory, Path(work), target, lambda line: err.print(line, markup=False))
        data = pack(root)
    # Refused here, before uploading, with both sizes; the registry checks again.
    check_size(len(data), unpacked_size(data), LIMITS)
    return data


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@target_options
@json_option
@pass_state
def publish(state: State, directory: Path, target: Target) -> None:
    """Pack DIRECTORY (with its agent.toml) and publish it as a new version.
    Dependencies it declares (agent.toml `dependencies` or requirements.txt) are installed into
    the bundle's deps/ first, so a sandbox needs no network. Publishing the same bytes again
    returns the existing version."""
    try:
        data = bundle_directory(directory, target)
    except (BundleError, ManifestError) as exc:
        raise click.ClickException(str(exc)) from None
    v = state.client.publish_bundle(data)
    emit(state,
         {"name": v.name, "number": v.number, "digest": v.digest, "size_bytes": v.size_bytes},
         lambda: out.print(f"{v.name}  {v.digest}"))


@click.group(cls=ListingGroup)
def agents() -> None:
    """List agents (`corral agents`), or delete one."""


@agents.command("list")
@json_option
@pass_state
def agents_list(state: State) -> None:
    """List agents."""
    emit_rows(state, state.client.agents(), ("agent", "latest version", "created"),
              lambda a: (a.name, a.latest_version or "-", timestamp(a.create_time)))


@agents.command("delete")
@click.argument("agent")
@click.option("--force", is_flag=True,
              help="Also delete its versions and endpoints (refused while sessions are live).")
@yes_option
@json_option
@pass_state
def agents_delete(state: State, agent: str, force: bool, yes: bool) -> None:
    """Delete AGENT. Without --force an agent that has versions is refused."""
    name = names.agent_name(agent)
    confirm_deletion(f"{name}{' with its versions and endpoints' if force else ''}", yes)
    state.client.delete_agent(agent, force=force)
    emit(state, {"deleted": name}, lambda: out.print(f"deleted {name}"))


@click.group(cls=ListingGroup)
def versions() -> None:
    """List the versions of an agent (`corral versions AGENT`), or delete one."""


@versions.command("list")
@click.argument("agent")
@json_option
@pass_state
def versions_list(state: State, agent: str) -> None:
    """List the versions of AGENT."""
    emit_rows(
        state, state.client.versions(agent),
        ("version", "digest", "model", "size", "created", "by"),
        lambda v: (str(v.number), v.digest[:19] + "…",
                   f"{v.manifest.model_provider}/{v.manifest.model_id}", f"{v.size_bytes:,}",
                   timestamp(v.create_time), v.creator),
    )


@versions.command("delete")
@click.argument("agent")
@click.argument("number", type=click.IntRange(min=1))
@yes_option
@json_option
@pass_state
def versions_delete(state: State, agent: str, number: int, yes: bool) -> None:
    """Delete version NUMBER of AGENT. Refused while an endpoint routes to it or keeps it for
    rollback, a rollout or experiment uses it, or live sessions are pinned to it."""
    name = names.version_name(agent, number)
    confirm_deletion(name, yes)
    state.client.delete_version(agent, number)
    emit(state, {"deleted": name}, lambda: out.print(f"deleted {name}"))


COMMANDS: tuple[click.Command, ...] = (publish, agents, versions)
