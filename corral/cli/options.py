"""What every corral command takes: the State that the root options set (credential,
--json, the connection: profile, address, CA, TLS) with the client built from it, the --json
flag each command repeats, and the argument types
that more than one area uses."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable

import click

from corral import names
from corral.client import CorralClient
from corral.config import ConfigError
from corral.profiles import ConnectionOptions, ProfileError, client_config


class State:
    """One run of the command: its options, and a client made on first use (so --help and
    argument errors open no channel) unless one is given."""

    def __init__(self, client: CorralClient | None = None) -> None:
        self.json = False
        self.connection = ConnectionOptions()
        self.api_key: str | None = None
        self.token: str | None = None
        self._client = client

    @property
    def client(self) -> CorralClient:
        if self._client is None:
            try:
                config = client_config(self.connection, api_key=self.api_key, token=self.token)
            except (ProfileError, ConfigError) as exc:
                raise click.UsageError(str(exc)) from None
            self._client = CorralClient(config)
        return self._client


pass_state = click.make_pass_decorator(State, ensure=True)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(State).json = True


# Repeated on every command so that `corral invoke ... --json` works as well as `corral --json`.
json_option = click.option(
    "--json", "as_json", is_flag=True, expose_value=False, callback=_set_json, is_eager=True,
    help="Print machine-readable JSON.",
)

_ID = re.compile(r"[1-9][0-9]*")


class NewestOrNumber(click.ParamType[int | None]):
    """The id of a rollout or an experiment: a number, or "-" for the endpoint's newest (None,
    as the references in corral.names hold it)."""

    name = "id"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | None:
        if value is None or isinstance(value, int):
            return value
        text = str(value)
        if text == "-":
            return None
        if not _ID.fullmatch(text):
            self.fail(f"{text!r} is not a number, or - for the newest", param, ctx)
        return int(text)


NEWEST_OR_NUMBER = NewestOrNumber()


CommandMaker = Callable[[Callable[..., None]], click.Command]


def endpoint_command(make: CommandMaker) -> CommandMaker:
    """A command on one endpoint, `... AGENT ENDPOINT [OPTIONS] [--json]`, made by `make` (a
    group's .command(...)): the decorated function takes the State and the endpoint, `target`,
    then the values of the options that decorate it."""

    def decorate(command: Callable[..., None]) -> click.Command:
        with_state = pass_state(command)

        @functools.wraps(with_state)
        def with_target(*args: object, agent: str, endpoint: str, **values: object) -> None:
            with_state(*args, target=names.EndpointRef(agent, endpoint), **values)

        made = make(click.argument("agent")(click.argument("endpoint")(with_target)))
        # Added to the command itself, --json comes after the options in --help, as elsewhere.
        return json_option(made)

    return decorate


# Deleting commands ask first when a person is at the terminal; --yes (or a script's stdin) skips.
yes_option = click.option(
    "--yes", "-y", "yes", is_flag=True, help="Do not ask for confirmation.",
)


def at_terminal() -> bool:
    """Whether a person types this command's input (stdin is a terminal)."""
    return sys.stdin.isatty()


def confirm_deletion(what: str, yes: bool) -> None:
    """Asks whether to delete `what` when stdin is a terminal and --yes was not given; aborts
    (exit 1, nothing deleted) on no."""
    if not yes and at_terminal():
        click.confirm(f"Delete {what}?", abort=True)


class ListingGroup(click.Group):
    """A group whose bare use, or use with arguments that name no subcommand, runs its listing
    command (`corral agents`, `corral versions AGENT`) while `delete` and the like are
    subcommands."""

    listing = "list"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.listing, *args]
        return super().parse_args(ctx, args)
