"""corral executors: the executor fleet (its members, their load and warm pools), and draining
one for an upgrade — for a platform administrator."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from corral.cli.options import State, json_option, pass_state
from corral.cli.output import emit_message, emit_rows, out, short_version
from corral.sessions.v1 import fleet_pb2 as flt


def _age(executor: flt.Executor) -> str:
    if not executor.HasField("heartbeat_time"):
        return "-"
    seconds = (datetime.now(UTC) - executor.heartbeat_time.ToDatetime(tzinfo=UTC)).total_seconds()
    return f"{max(0.0, seconds):.1f}s"


@click.group()
def executors() -> None:
    """The executor fleet: list it, drain an executor before an upgrade (platform admins)."""


@executors.command("list")
@json_option
@pass_state
def executors_list(state: State) -> None:
    """The live executors: address, driver, sandboxes in use of capacity, warm versions,
    whether drained, and how long ago each last said it was alive."""
    emit_rows(
        state, state.client.executors(),
        ("name", "address", "driver", "sandboxes", "warm", "draining", "heartbeat"),
        lambda e: (e.name.removeprefix("executors/"), e.address, e.driver,
                   f"{e.sandboxes_in_use}/{e.capacity}",
                   ", ".join(short_version(v) for v in e.warm_versions) or "-",
                   "yes" if e.draining else "no", _age(e)),
    )


@executors.command("drain")
@click.argument("name")
@json_option
@pass_state
def executors_drain(state: State, name: str) -> None:
    """Drain NAME: it takes no new sessions, and its live sessions move to another executor at
    their next turn (from their last committed state). Undo with `corral executors undrain`."""
    drained = state.client.drain_executor(name, drained=True)
    emit_message(state, drained, lambda: out.print(
        f"{drained.name} is drained: new sessions go elsewhere, its sessions move at their "
        "next turn"))


@executors.command("undrain")
@click.argument("name")
@json_option
@pass_state
def executors_undrain(state: State, name: str) -> None:
    """Take NAME's drained mark off: it takes new sessions again."""
    undrained = state.client.drain_executor(name, drained=False)
    emit_message(state, undrained, lambda: out.print(f"{undrained.name} takes new sessions again"))


COMMANDS: tuple[click.Command, ...] = (executors,)
