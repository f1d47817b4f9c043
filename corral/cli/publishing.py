"""corral publish, agents, versions: agent bundles in, versions out."""

from __future__ import annotations

import functools
import json
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import click
import grpc
from rich.console import Console

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
from corral.cli.output import (
    emit,
    emit_rows,
    enum_label,
    err,
    error_reason,
    out,
    reason_metadata,
    timestamp,
    to_dict,
)
from corral.manifest import ManifestError
from corral.registry.v1 import registry_pb2 as reg

DEFAULT_ENDPOINT = "DEFAULT"


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


class PublishLines:
    """What `corral publish` says while it works, on stderr (stdout stays the result): a line per
    phase; on a terminal the upload's progress is rewritten in place, piped it is one line."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.tty = console.is_terminal

    def say(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def uploading(self, total: int) -> None:
        if not self.tty:
            self.say(f"uploading {_size(total)}...")

    def uploaded(self, sent: int, total: int) -> None:
        if self.tty:
            end = "\n" if sent >= total else ""
            self.console.file.write(
                f"\ruploading {_size(total)}... {sent * 100 // max(total, 1)}% "
                f"({sent:,} bytes){end}")
            self.console.file.flush()

    def checking(self, version: str) -> None:
        self.say(f"starting version {_number(version)} once to check it...")


def _size(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB" if n >= 1_000_000 else f"{n / 1000:.1f} kB"


def _number(version: str) -> str:
    return version.rsplit("/", 1)[-1]


def _cannot_start(state: State, exc: grpc.RpcError) -> NoReturn:
    """A version the registry started once and that failed: its traceback, from the version."""
    version = state.client.get_version(reason_metadata(exc)["version"])
    failure = version.failure
    if state.json:
        click.echo(json.dumps({"error": {
            "code": "FAILED_PRECONDITION", "reason": "VERSION_CANNOT_START", "message": exc.details(),
            "version": to_dict(version)}}, indent=2))
    else:
        err.print(f"[red]error:[/red] version {version.number} ({version.name}) cannot start; "
                  "it is kept as FAILED and DEFAULT stays where it was:", soft_wrap=True)
        err.print(failure.traceback.rstrip() or f"{failure.error_type}: {failure.message}",
                  markup=False, highlight=False, soft_wrap=True)
    sys.exit(1)


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@target_options
@json_option
@pass_state
def publish(state: State, directory: Path, target: Target) -> None:
    """Pack DIRECTORY (with its agent.toml) and publish it as a new version.
    Dependencies it declares (agent.toml `dependencies` or requirements.txt) are installed into
    the bundle's deps/ first, so a sandbox needs no network. The registry then starts the new
    version once, and DEFAULT moves to it only if it starts; one that cannot is kept as FAILED
    and its traceback shown. Publishing the same bytes again returns the existing version."""
    try:
        data = bundle_directory(directory, target)
    except (BundleError, ManifestError) as exc:
        raise click.ClickException(str(exc)) from None
    lines = PublishLines(err)
    lines.uploading(len(data))
    try:
        v = state.client.publish_bundle(data, lines)
    except grpc.RpcError as exc:
        if error_reason(exc) == "VERSION_CANNOT_START":
            _cannot_start(state, exc)
        raise
    ref = names.VersionRef.parse(v.name)
    default = state.client.get_endpoint(ref.agent, DEFAULT_ENDPOINT)
    serving = ", ".join(_number(t.version) for t in default.traffic) or "-"
    emit(state,
         {"name": v.name, "number": v.number, "digest": v.digest, "size_bytes": v.size_bytes,
          "state": enum_label(reg.Version.State, v.state),
          "default": [t.version for t in default.traffic]},
         lambda: out.print(f"published version {v.number} of {ref.agent} ({v.digest}), "
                           f"DEFAULT -> {serving}", soft_wrap=True))


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
        ("version", "state", "digest", "model", "size", "created", "by"),
        lambda v: (str(v.number), enum_label(reg.Version.State, v.state), v.digest[:19] + "…",
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
