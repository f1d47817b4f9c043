"""corral sandboxes: the executor's view of its sandboxes and warm pools, for an operator."""

from __future__ import annotations

import click

from corral.cli.options import State, json_option, pass_state
from corral.cli.output import emit_message, enum_label, print_table, short_version
from corral.executor.v1 import executor_pb2 as ex


@click.command()
@json_option
@pass_state
def sandboxes(state: State) -> None:
    """The executor's sandboxes (session, version, state, age, memory) and its warm pools."""
    listing = state.client.sandboxes()

    def human() -> None:
        print_table(
            listing.sandboxes,
            ("session", "version", "state", "age", "memory MiB", "cpu s", "pid", "driver"),
            lambda sb: (sb.session or "-", short_version(sb.version),
                        enum_label(ex.Sandbox.State, sb.state).lower(),
                        f"{sb.age.ToTimedelta().total_seconds():.0f}s",
                        f"{sb.memory_bytes / 2**20:.1f}", f"{sb.cpu_seconds:.1f}", str(sb.pid),
                        sb.driver),
        )
        print_table(
            listing.pools, ("warm pool", "ready", "target", "hits", "misses", "why"),
            lambda pool: (short_version(pool.version), str(pool.ready), str(pool.target),
                          str(pool.hits), str(pool.misses), ", ".join(pool.reasons) or "-"),
        )

    emit_message(state, listing, human)


COMMANDS: tuple[click.Command, ...] = (sandboxes,)
