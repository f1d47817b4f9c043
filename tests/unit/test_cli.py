"""The corral command without a platform: a recording client (tests/fakes/cli.py) stands in for
the services, so these tests check what the command sends and prints, and open no socket."""

from __future__ import annotations

import importlib.metadata
import io
import json
import math
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from rich.console import Console

from corral import names
from corral.bundle import digest_of, pack, unpack
from corral.cli import State, cli, options, publishing
from corral.cli.output import enum_label
from corral.client import CorralClient, pages
from corral.config import ClientConfig
from corral.registry.v1 import keys_pb2 as ks
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as ro
from corral.registry.v1 import tools_pb2 as tls
from corral.telemetry.v1 import telemetry_pb2 as tel
from tests.bundles import SAYS_HI, agent_files, write_bundle
from tests.fakes.cli import KEY, RecordingClient


def run(client: CorralClient, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--json", *args], obj=State(client=client))
    return result.exit_code, result.output


def test_version_prints_the_installed_package_version_without_calling_the_platform() -> None:
    result = CliRunner().invoke(cli, ["--version"], obj=State(client=RecordingClient()))
    assert result.exit_code == 0, result.output
    assert result.output == f"corral {importlib.metadata.version('corral')}\n"


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


def test_pause_resume_and_promote_help_say_that_only_promote_skips_an_analysis_gate() -> None:
    def help_of(command: str) -> str:
        result = CliRunner().invoke(cli, ["rollout", command, "--help"])
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    assert "current step and weight: nothing moves and no gate passes until" in help_of("pause")
    resume = help_of("resume")
    assert "at the step it was held at" in resume
    assert "analysis gate is evaluated again and must pass before the weight moves" in resume
    assert "To skip an analysis gate, use `promote`" in resume
    assert "The only way past an analysis gate that has not passed" in help_of("promote")


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


def shown(client: CorralClient, *args: str) -> str:
    """What a person sees (no --json), on a terminal wide enough for whole table rows."""
    result = CliRunner().invoke(cli, list(args), obj=State(client=client),
                                env={"COLUMNS": "200"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_rollout_status_says_no_data_for_an_empty_window_and_labels_relative_metrics() -> None:
    client = RecordingClient()
    nan = math.nan
    client.last_analysis = tel.CompareVersionsResponse(comparisons=[
        tel.MetricComparison(
            metric=tel.MetricSpec(name="session_error_rate"),
            baseline=tel.ArmStats(sessions=40, estimate=0.025), candidate=tel.ArmStats(estimate=nan),
            difference=nan, ci_low=nan, ci_high=nan, tolerance=0.03),
        tel.MetricComparison(
            metric=tel.MetricSpec(name="latency_p95"),
            baseline=tel.ArmStats(sessions=40, estimate=0.05), candidate=tel.ArmStats(sessions=3, estimate=0.08),
            difference=0.03, ci_low=-0.2, ci_high=0.26, tolerance=0.05),
    ])
    output = shown(client, "rollout", "status", "a", "prod")
    assert "nan" not in output and "difference [interval]" in output
    rows = {line.split("│")[1].strip(): line for line in output.splitlines() if line.count("│") > 2}
    assert "no data" in rows["session_error_rate"] and "0.025" in rows["session_error_rate"]
    assert "+0.03 [-0.2, +0.26]" in rows["latency_p95 (relative)"]
    assert "latency_p95 (relative): share of invocations slower than the baseline's p95" in output


def test_an_experiment_variant_without_data_reads_no_data_not_nan() -> None:
    client = RecordingClient()
    nan = math.nan
    client.report = ro.ExperimentReport(
        experiment=ro.Experiment(name="agents/a/endpoints/prod/experiments/1", variants=[
            reg.TrafficTarget(version="agents/a/versions/1", percent=50),
            reg.TrafficTarget(version="agents/a/versions/2", percent=50)]),
        analysis=tel.AnalyzeExperimentResponse(sessions=[30, 0], metrics=[tel.ExperimentMetricResult(
            metric=tel.MetricSpec(name="latency_p95"), unit="share of invocations slower than the baseline's p95",
            variants=[
                tel.VariantMetric(version="agents/a/versions/1", sessions=30, estimate=0.05,
                                  ci_low=0.01, ci_high=0.09, control=True),
                tel.VariantMetric(version="agents/a/versions/2", estimate=nan, ci_low=-math.inf,
                                  ci_high=math.inf, effect=nan, effect_low=nan, effect_high=nan),
            ])]))
    output = shown(client, "experiment", "status", "a", "prod")
    assert "nan" not in output and "mean [interval]" in output
    assert "latency_p95 (relative): share of invocations slower" in output
    v2 = next(line for line in output.splitlines() if line.lstrip("│ ").startswith("v2") and "no data" in line)
    assert v2.count("no data") == 2 and "control" not in v2


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


def test_delete_commands_send_what_they_name() -> None:
    client = RecordingClient()
    for args in (("agents", "delete", "a", "--force"), ("versions", "delete", "a", "3"),
                 ("endpoint", "delete", "a", "prod", "--etag", 'W/"4"'),
                 ("sessions", "delete", "s1")):
        code, output = run(client, *args)
        assert code == 0, output
    assert client.deleted == [
        ("agent", "a", True), ("version", "agents/a/versions/3", None),
        ("endpoint", "agents/a/endpoints/prod", 'W/"4"'), ("session", "sessions/s1", None),
    ]
    assert json.loads(output) == {"deleted": "sessions/s1"}
    # The listings are where they were: `corral agents`, `corral versions AGENT`.
    code, output = run(client, "agents")
    assert code == 0 and [a["name"] for a in json.loads(output)] == ["agents/a"]
    code, output = run(client, "versions", "a")
    assert code == 0 and [v["number"] for v in json.loads(output)] == ["1", "2"]


@pytest.mark.parametrize(("answer", "yes", "deleted"), [("n\n", False, False), ("y\n", False, True),
                                                        ("", True, True)])
def test_deleting_at_a_terminal_asks_first_unless_yes(
    monkeypatch: pytest.MonkeyPatch, answer: str, yes: bool, deleted: bool
) -> None:
    monkeypatch.setattr(options, "at_terminal", lambda: True)
    client = RecordingClient()
    args = ["versions", "delete", "a", "2", *(["--yes"] if yes else [])]
    result = CliRunner().invoke(cli, args, obj=State(client=client), input=answer)
    assert (result.exit_code == 0) == deleted, result.output
    assert bool(client.deleted) == deleted
    assert ("Delete agents/a/versions/2?" in result.output) != yes


@pytest.mark.parametrize(("endpoint", "message"), [
    ("DEFAULT", "DEFAULT always serves the newest version"),
    ("not/one", "must start with a letter"),
])
def test_corral_dev_refuses_an_endpoint_it_cannot_set(
    tmp_path: Path, endpoint: str, message: str
) -> None:
    root = write_bundle(tmp_path / "agent", agent_files("a", SAYS_HI))
    code, output = run(RecordingClient(), "dev", str(root), "--endpoint", endpoint)
    assert code == 2 and message in output, output


# -- the commands the documentation shows ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = ("README.md", "examples/agentcore-hello/README.md", "deploy/k8s/README.md",
              "deploy/envoy/README.md", "docs/edge-and-profiles.md", "docs/oidc.md")


def documented_commands(text: str) -> list[str]:
    """The `corral ...` command lines of a Markdown file's code blocks (where a block prompts
    with `$ `, only those lines), continuation lines joined, comments and pipes cut off."""
    found: list[str] = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        lines = block.replace("\\\n", " ").splitlines()
        if any(line.startswith("$ ") for line in lines):
            lines = [line.removeprefix("$ ") for line in lines if line.startswith("$ ")]
        found += [re.split(r" #| \| ", line)[0] for line in lines if line.startswith("corral ")]
    return found


@pytest.mark.parametrize("doc", DOCUMENTED)
def test_every_command_the_documentation_shows_exists_with_its_options(doc: str) -> None:
    """A removed command or flag (--tenant/--user to invoke, say) fails here, not for a reader."""
    commands = documented_commands((ROOT / doc).read_text())
    wrong = []
    for command in commands:
        # --ca must name an existing file; the documents' placeholders do not exist here.
        args = re.sub(r"--ca \S+", "", command).split()[1:]
        try:
            # --help after the command: its options are parsed (an unknown one is an error),
            # then help is printed instead of running it.
            cli.main([*args, "--help"], prog_name="corral", standalone_mode=False)
        except click.UsageError as exc:
            wrong.append(f"{command}: {exc.format_message()}")
    assert wrong == []
    assert commands or doc.startswith("docs/oidc"), f"no corral commands found in {doc}"


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
