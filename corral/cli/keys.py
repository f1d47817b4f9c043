"""corral keys: API keys for people, scripts and CI (a key is printed once, when it is created;
the platform keeps only a hash of it), and corral whoami: who the platform takes you to be."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal

import click
from rich.table import Table

from corral.cli.options import State, json_option, pass_state
from corral.cli.output import (
    emit,
    emit_message,
    emit_rows,
    enum_label,
    err,
    out,
    timestamp,
    to_dict,
)
from corral.registry.v1 import keys_pb2 as pb
from corral.strategy import duration

ROLES = {"viewer": pb.KEY_ROLE_VIEWER, "invoker": pb.KEY_ROLE_INVOKER,
         "operator": pb.KEY_ROLE_OPERATOR, "admin": pb.KEY_ROLE_ADMIN}
_TENANT_HELP = "The keys' tenant (default: the one you act in)."
ONCE = "Store it now: it cannot be shown again."
_LIFETIME = re.compile(r"(\d+)\s*([dhm])")
_UNITS = {"d": 86400, "h": 3600, "m": 60}


def _role(key: pb.Key) -> str:
    return enum_label(pb.KeyRole, key.role).lower()


def _when(key: pb.Key, field: Literal["expire_time", "last_use_time"]) -> str:
    return timestamp(getattr(key, field)) if key.HasField(field) else "-"


def _state(key: pb.Key) -> str:
    if key.HasField("revoke_time"):
        return "revoked"
    if key.HasField("expire_time") and key.expire_time.ToDatetime(tzinfo=UTC) <= datetime.now(UTC):
        return "expired"
    return "active"


def expires_in(text: str) -> int:
    """Seconds in "90d", "12h", "30m", for --expires: a unit is required (a bare 90 could be
    meant as days as easily as seconds)."""
    found = _LIFETIME.fullmatch(text.strip())
    if not found or int(found[1]) == 0:
        raise click.BadParameter(
            f"{text!r} is not a lifetime: a whole number above 0 and a unit, d (days), h (hours) "
            "or m (minutes), e.g. 90d, 12h, 30m", param_hint="--expires")
    return int(found[1]) * _UNITS[found[2]]


@click.group()
def keys() -> None:
    """API keys: credentials for people, scripts and CI, per tenant (admins only)."""


@keys.command("create")
@click.option("--tenant", default="", help=_TENANT_HELP)
@click.option("--role", type=click.Choice(list(ROLES)), required=True,
              help="What the key may do; at most your own role.")
@click.option("--name", default="", help="A name unique among the tenant's keys (default: generated).")
@click.option("--expires", metavar="DURATION",
              help="How long the key lives, e.g. 90d, 12h, 30m (default: until revoked).")
@click.option("--platform-admin", is_flag=True,
              help="May manage every tenant's keys (platform administrators only).")
@json_option
@pass_state
def keys_create(state: State, tenant: str, role: str, name: str, expires: str | None,
                platform_admin: bool) -> None:
    """Create an API key and print it, the only time it is shown."""
    key = pb.Key(display_name=name, role=ROLES[role], platform_admin=platform_admin)
    if expires:
        key.ttl.CopyFrom(duration(expires_in(expires)))
    made = state.client.create_key(key, tenant)

    def human() -> None:
        expiry = f"expires {_when(made.key, 'expire_time')}" if made.key.HasField(
            "expire_time") else "does not expire"
        err.print(f"API key {made.key.display_name} ({made.key.key_id}) for tenant "
                  f"{made.key.tenant}, role {_role(made.key)}, {expiry}:")
        click.echo(made.api_key)
        err.print(f"[yellow]{ONCE}[/yellow]")

    emit(state, {"key": made.api_key, "warning": ONCE, **to_dict(made.key)}, human)


@keys.command("list")
@click.option("--tenant", default="", help=_TENANT_HELP + ' "-" for every tenant.')
@click.option("--all", "show_revoked", is_flag=True, help="Revoked keys too.")
@json_option
@pass_state
def keys_list(state: State, tenant: str, show_revoked: bool) -> None:
    """List API keys (never their secrets)."""
    every_tenant = tenant == "-"
    emit_rows(
        state, state.client.list_keys(tenant, show_revoked),
        ("id", "name", *(("tenant",) if every_tenant else ()), "role", "expires", "last used",
         "state"),
        lambda k: (k.key_id, k.display_name, *((k.tenant,) if every_tenant else ()),
                   _role(k) + (" (platform)" if k.platform_admin else ""),
                   _when(k, "expire_time"), _when(k, "last_use_time"), _state(k)),
    )


@keys.command("revoke")
@click.argument("name_or_id")
@click.option("--tenant", default="", help=_TENANT_HELP)
@json_option
@pass_state
def keys_revoke(state: State, name_or_id: str, tenant: str) -> None:
    """Revoke key NAME_OR_ID: every service refuses it within a few seconds."""
    key = state.client.revoke_key(name_or_id, tenant)
    emit_message(state, key, lambda: out.print(
        f"revoked {key.display_name} ({key.key_id}) of tenant {key.tenant}"))


@click.command()
@json_option
@pass_state
def whoami(state: State) -> None:
    """Who the platform takes your credential to prove: tenant, subject, roles, credential."""
    me = state.client.whoami()

    def human() -> None:
        t = Table.grid(padding=(0, 2))
        for label, value in (
            ("tenant", me.tenant or "-"), ("subject", me.subject),
            ("roles", ", ".join(me.roles) or "-"),
            ("credential", f"{me.credential_kind} {me.credential}".strip()),
            ("platform admin", "yes" if me.platform_admin else "no"),
        ):
            t.add_row(label, value)
        out.print(t)

    emit_message(state, me, human)


COMMANDS: tuple[click.Command, ...] = (keys, whoami)
