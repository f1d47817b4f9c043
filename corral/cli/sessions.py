"""corral sessions list / get / stop / delete: conversations and the version each is pinned
to."""

from __future__ import annotations

import json

import click

from corral import names
from corral.cli.options import State, confirm_deletion, json_option, pass_state, yes_option
from corral.cli.output import (
    emit,
    emit_rows,
    enum_label,
    err,
    out,
    session_id,
    short_version,
    timestamp,
    to_dict,
)
from corral.sessions.v1 import sessions_pb2 as ses


@click.group()
def sessions() -> None:
    """List, show, stop and delete sessions."""


@sessions.command("list")
@click.option("--agent", default="", help="Only sessions of this agent.")
@click.option("--version", "version", default="",
              help="Only sessions pinned to this version number.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000),
              help="Sessions per page.")
@click.option("--page-token", default="", metavar="TOKEN",
              help="Continue a listing where its previous page ended (the token it printed).")
@click.option("--all", "every", is_flag=True, help="Every session, all pages at once.")
@json_option
@pass_state
def sessions_list(state: State, agent: str, version: str, limit: int, page_token: str,
                  every: bool) -> None:
    """List your tenant's sessions, newest first, a page at a time."""
    agent_name = names.agent_name(agent) if agent else ""
    version_name = (names.version_name(agent, int(version)) if agent and version.isdigit()
                    else version)
    if every:
        rows = state.client.list_sessions(agent_name, version_name)
    else:
        page = state.client.list_sessions_page(agent_name, version_name, limit, page_token)
        rows = list(page.sessions)
        if page.next_page_token:
            # On stderr, so that --json's output stays a list.
            err.print(f"more sessions: add --page-token {page.next_page_token} for the next "
                      f"page, or --all for every one", soft_wrap=True)
    emit_rows(
        state, rows,
        ("session", "version", "status", "turns", "user", "last active"),
        lambda s: (session_id(s.name), short_version(s.version),
                   enum_label(ses.SessionStatus, s.status).lower(),
                   str(s.turn_count), s.user, timestamp(s.last_active_time)),
    )


@sessions.command("get")
@click.argument("session")
@json_option
@pass_state
def sessions_get(state: State, session: str) -> None:
    """Show SESSION and its state."""
    s = state.client.get_session(session)
    st = state.client.session_state(session)
    data = {**to_dict(s), "state": json.loads(st.state) if st.state else None}
    emit(state, data, lambda: out.print_json(json.dumps(data, default=str)))


@sessions.command("stop")
@click.argument("session")
@json_option
@pass_state
def sessions_stop(state: State, session: str) -> None:
    """Stop SESSION now: its sandbox is torn down, later invocations are refused."""
    state.client.stop_session(session)
    name = names.SessionRef(session).name
    emit(state, {"stopped": name}, lambda: out.print(f"stopped {name}"))


@sessions.command("delete")
@click.argument("session")
@yes_option
@json_option
@pass_state
def sessions_delete(state: State, session: str, yes: bool) -> None:
    """Delete SESSION with its state and turns; a live one is stopped and its sandbox ended."""
    name = names.SessionRef(session).name
    confirm_deletion(name, yes)
    state.client.delete_session(session)
    emit(state, {"deleted": name}, lambda: out.print(f"deleted {name}"))


COMMANDS: tuple[click.Command, ...] = (sessions,)
