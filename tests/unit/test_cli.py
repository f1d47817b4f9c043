"""The corral command without a platform: a recording client (tests/fakes/cli.py) stands in for
the services, so these tests check what the command sends and prints, and open no socket."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from corral import names
from corral.bundle import digest_of, pack, unpack
from corral.cli import State, cli, publishing
from corral.cli.output import enum_label
from corral.client import CorralClient, pages
from corral.config import ClientConfig
from corral.registry.v1 import keys_pb2 as ks
from corral.registry.v1 import rollouts_pb2 as ro
from corral.registry.v1 import tools_pb2 as tls
from tests.bundles import SAYS_HI, agent_files, write_bundle
from tests.fakes.cli import KEY, RecordingClient


def run(client: CorralClient, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--json", *args], obj=State(client=client))
    return result.exit_code, result.output


def test_publish_packs_once_and_uploads_what_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packed: list[bytes] = []

    def counted_pack(root: Path) -> bytes:
        packed.append(pack(root))
        return packed[-1]

    monkeypatch.setattr(publishing, "pack", counted_pack)
    client = RecordingClient()
    source = write_bundle(tmp_path / "b", agent_files("a", SAYS_HI))
    result = CliRunner().invoke(cli, ["--json", "publish", str(source)], obj=State(client=client))
    assert result.exit_code == 0, result.output
    assert len(packed) == 1 and client.uploaded == packed
    published = json.loads(result.stdout)
    assert published["digest"] == digest_of(packed[0])
    assert published["default"] == ["agents/a/versions/1"]
    # Progress goes to stderr, as plain lines when it is not a terminal.
    assert result.stderr.splitlines() == [f"uploading {len(packed[0]) / 1e3:.1f} kB..."]
    unpack(packed[0], tmp_path / "out")
    assert (tmp_path / "out" / "agent.toml").exists()


@pytest.mark.parametrize(
    ("given", "expected"), [([], None), (["--id", "3"], 3), (["--id", "-"], None)]
)
def test_a_rollout_action_resolves_the_rollout_then_acts_on_it(
    given: list[str], expected: int | None
) -> None:
    client = RecordingClient()
    code, output = run(client, "rollout", "promote", "a", "prod", *given, "--full")
    assert code == 0, output
    endpoint = names.EndpointRef("a", "prod")
    assert client.asked == [names.RolloutRef(endpoint, expected)]
    acted_on = names.RolloutRef(endpoint, expected or 7)
    assert client.promoted == [(acted_on, True)]
    assert json.loads(output)["name"] == acted_on.name


@pytest.mark.parametrize("bad", ["abc", "0", "07", "1.5"])
def test_a_rollout_id_is_a_number_or_a_dash(bad: str) -> None:
    client = RecordingClient()
    code, output = run(client, "rollout", "status", "a", "prod", "--id", bad)
    assert code == 2 and "--id" in output and not client.asked


def test_pages_follows_next_page_token_to_the_end() -> None:
    book = {"": (["a", "b"], "t1"), "t1": (["c"], "t2"), "t2": ([], "")}

    def fetch(token: str) -> tls.ListToolsResponse:
        items, next_token = book[token]
        return tls.ListToolsResponse(tools=[tls.Tool(name=f"tools/{i}") for i in items],
                                     next_page_token=next_token)

    listed = [t.name for t in pages(fetch, lambda page: page.tools)]
    assert listed == ["tools/a", "tools/b", "tools/c"]


def test_enum_labels_drop_their_enums_prefix() -> None:
    assert enum_label(ro.RolloutState, ro.ROLLOUT_STATE_ROLLED_BACK) == "ROLLED_BACK"
    assert enum_label(tls.ToolKind, tls.TOOL_KIND_GRPC) == "GRPC"


# -- API keys and credentials ----------------------------------------------------------------


def test_keys_create_prints_the_key_once_and_warns_it_cannot_be_shown_again() -> None:
    client = RecordingClient()
    result = CliRunner().invoke(
        cli, ["keys", "create", "--tenant", "acme", "--role", "operator", "--name", "ci",
              "--expires", "90d"], obj=State(client=client))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == KEY, "the key alone on stdout, for `$(corral keys create ...)`"
    assert result.output.count(KEY) == 1 and "cannot be shown again" in result.output
    (tenant, key), = client.keys_created
    assert (tenant, key.display_name, key.role) == ("acme", "ci", ks.KEY_ROLE_OPERATOR)
    assert key.ttl.ToSeconds() == 90 * 86400


def test_keys_create_json_has_the_key_in_a_field_named_key() -> None:
    client = RecordingClient()
    code, output = run(client, "keys", "create", "--role", "viewer", "--expires", "12h")
    assert code == 0, output
    printed = json.loads(output)
    assert printed["key"] == KEY and printed["key_id"] == "abcdefgh234567ab"
    assert client.keys_created[0][1].ttl.ToSeconds() == 12 * 3600


@pytest.mark.parametrize("bad", ["90", "9x", "-5m", "0m", "1.5d", "soon"])
def test_a_bad_expiry_is_refused_before_anything_is_sent(bad: str) -> None:
    client = RecordingClient()
    code, output = run(client, "keys", "create", "--role", "viewer", "--expires", bad)
    assert code == 2 and "--expires" in output and not client.keys_created


def test_keys_list_and_revoke_send_the_tenant_they_are_given() -> None:
    client = RecordingClient()
    code, output = run(client, "keys", "list", "--tenant", "-", "--all")
    assert code == 0, output
    assert client.keys_listed == [("-", True)]
    assert [k["display_name"] for k in json.loads(output)] == ["ci"]
    assert KEY not in output
    code, output = run(client, "keys", "revoke", "ci", "--tenant", "acme")
    assert code == 0, output
    assert client.keys_revoked == [("ci", "acme")] and json.loads(output)["revoke_time"]


def test_every_call_carries_the_credential_as_a_bearer_token() -> None:
    state = State()
    state.api_key = KEY
    # The credential alone says who calls: no header naming a tenant or a user.
    assert state.client.metadata == (("authorization", f"Bearer {KEY}"),)
    without = CorralClient(ClientConfig(addrs={}))
    assert not any(k == "authorization" for k, _ in without.metadata)


def test_an_api_key_and_a_token_together_are_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["--api-key", KEY, "--token", "a.b.c", "keys", "list"],
                                obj=State())
    assert result.exit_code == 2 and "not both" in result.output


def test_whoami_prints_the_principal() -> None:
    code, output = run(RecordingClient(), "whoami")
    assert code == 0, output
    me = json.loads(output)
    assert (me["tenant"], me["subject"], me["roles"], me["credential_kind"]) == (
        "t", "key:ci", ["operator"], "api_key")
    human = CliRunner().invoke(cli, ["whoami"], obj=State(client=RecordingClient()))
    assert human.exit_code == 0 and "key:ci" in human.output
    assert "api_key abcdefgh234567ab" in human.output


def test_publish_progress_is_rewritten_in_place_on_a_terminal_and_plain_lines_when_piped() -> None:
    def lines(terminal: bool) -> str:
        buf = io.StringIO()
        progress = publishing.PublishLines(Console(file=buf, force_terminal=terminal, width=40))
        progress.uploading(3_200_000)
        for sent in (1_048_576, 2_097_152, 3_145_728, 3_200_000):
            progress.uploaded(sent, 3_200_000)
        progress.checking("agents/a/versions/3")
        return buf.getvalue()

    on_terminal = lines(True)
    assert on_terminal.startswith("\ruploading 3.2 MB... 32% (1,048,576 bytes)\ruploading 3.2 MB... 65%")
    assert "\ruploading 3.2 MB... 100% (3,200,000 bytes)\n" in on_terminal
    assert on_terminal.endswith("starting version 3 once to check it...\n")
    assert lines(False) == "uploading 3.2 MB...\nstarting version 3 once to check it...\n"
